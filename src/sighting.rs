//! Sightings: the frames of one encounter turned into one record per camera, and the frame budget that
//! chooses which of them the identification model sees.
//!
//! A [`Tracker`] (one per camera) is fed every assessed frame in capture order, as far as the workers
//! keep it (frames of one camera on two workers may arrive a few frames out of order; times are taken
//! as the latest seen). It knows nothing of models: the pipeline tells it what the gates said, asks
//! whether to identify, and hands back identification results with a ranking function for the
//! aggregate. Events queue inside the tracker, in the order they happen, and leave only through
//! [`Tracker::drain`] (the pipeline's output thread), so a camera's events are delivered in order and
//! the open-sightings record is taken together with the events that led to it.
//!
//! Durations (gap, max_duration, the budget's interval, the update rate limit) are measured on the
//! frames' monotonic capture clock, so a system clock stepped at sea (a board without an RTC getting
//! GPS or NTP time) neither ends nor freezes a sighting; wall-clock times are only reported.
//!
//! # Rules
//! - **Sighting**: consecutive passing frames whose capture times are no more than `gap` apart. It ends
//!   (`end`, reason `gap`) at the first frame of the camera captured more than `gap` after the last
//!   passing frame, when the camera delivers nothing for `gap` (`camera_silent`, from [`Tracker::tick`]),
//!   at the first passing frame `max_duration` after its start (that frame starts the next one), or
//!   when whaled stops (`shutdown`).
//! - **Budget**: the first passing frame is identified; after it, at most one frame per
//!   `identify_interval` (capture time), and only a frame whose pre-filter score is at least
//!   `identify_quality` x the best score of the sighting so far; at most `max_identified` per
//!   sighting. The pre-filter still runs on every sampled frame; skipped frames are counted.
//! - **Aggregate**: the mean of the identified frames' L2-normalised embeddings, re-normalised, ranked
//!   like one frame; each candidate also carries its votes (identified frames that had it as top-1).
//! - **Events**: `new` once the sighting has `min_frames` passing frames (default 2: a gate's stray
//!   false positive on one frame is no encounter, and is never published, only counted) and its first
//!   frame has been identified; `update` when the aggregate's top-1 changes, at most one per `update_interval` (a
//!   change inside the interval is sent when it ends, if still current); `end` as above, with the
//!   final aggregate.

use std::time::{Duration, Instant, SystemTime};

use crate::config::SightingsConfig;
use crate::detection::{
    BestFrame, EndReason, MatchSource, Position, SightingCandidate, SightingEvent, SightingFrames,
    SightingIdentification, SightingPhase,
};
use crate::locate::PixelBox;
use crate::source::FrameData;

/// An ended sighting's best frame, to publish as its snapshot (and, where the map located the animal,
/// the crop around it).
#[derive(Debug, Clone)]
pub struct BestFrameData {
    pub sighting_id: String,
    pub data: FrameData,
    pub located: Option<PixelBox>,
}

/// What the gates said about one frame.
#[derive(Debug, Clone)]
pub struct FrameInfo {
    /// Wall-clock capture time (reported).
    pub time: SystemTime,
    /// Monotonic capture time (measured).
    pub mono: Instant,
    pub passed: bool,
    pub score: f64,
    pub image_ind: String,
    pub position: Option<Position>,
    pub clock_synced: Option<bool>,
    pub gallery_version: Option<u64>,
    /// The frame itself, when sightings publish their best frame (`snapshot`).
    pub data: Option<FrameData>,
    /// Where the gate's map located the animal (`[prefilter] locate = "gate_map"`): a best frame's crop
    /// is published beside it.
    pub located: Option<PixelBox>,
}

/// A ranked candidate as the aggregate needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedCandidate {
    pub class_animal: String,
    pub id_animal: String,
    pub probability: f64,
    pub source: MatchSource,
}

/// The ranking of an aggregate embedding (the pipeline's `Identifier` makes it).
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    pub top: Vec<RankedCandidate>,
    pub new_individual: bool,
}

/// The identification a frame got, handed back to its sighting.
#[derive(Debug, Clone)]
pub struct FrameIdentity {
    /// L2-normalised.
    pub embedding: Vec<f32>,
    /// Top-1 (`class_animal`, `id_animal`), for the votes.
    pub top1: Option<(String, String)>,
}

/// One camera's sighting state.
pub struct Tracker {
    camera: String,
    device_id: String,
    model_version: String,
    settings: SightingsConfig,
    /// Whether an identification model is configured (else nothing is ever identified).
    identifies: bool,
    open: Option<Open>,
    /// The last frame: when it arrived (real time) and its capture time (monotonic), for ticks.
    last_frame: Option<(Instant, Instant)>,
    discarded: u64,
    /// Events not yet taken by [`Tracker::drain`], in order.
    pending: Vec<SightingEvent>,
    /// Best frames of ended sightings to publish, taken by [`Tracker::drain`].
    snapshots: Vec<BestFrameData>,
}

struct Open {
    id: String,
    started: SystemTime,
    started_mono: Instant,
    last_pass: SystemTime,
    last_pass_mono: Instant,
    frames: SightingFrames,
    best: Option<BestFrame>,
    best_score: f64,
    best_data: Option<FrameData>,
    best_located: Option<PixelBox>,
    last_identified: Option<Instant>,
    sum: Vec<f64>,
    /// Embeddings in `sum`.
    embedded: u64,
    votes: Vec<(String, u64)>,
    aggregate: Option<SightingIdentification>,
    new_sent: bool,
    /// The first frame's identification has not come back yet (`new` waits for it).
    awaiting_first: bool,
    published_top1: Option<String>,
    last_update: Option<Instant>,
    update_pending: bool,
    start_position: Option<Position>,
    end_position: Option<Position>,
    clock_synced: Option<bool>,
    gallery_version: Option<u64>,
}

/// What to do with a frame: identify it for this sighting, or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Identify it and hand the result to [`Tracker::identified`] with this sighting id.
    Identify(String),
    Skip,
}

fn rfc3339(t: SystemTime) -> String {
    crate::detection::rfc3339_millis(t)
}

fn since(later: Instant, earlier: Instant) -> Duration {
    later.saturating_duration_since(earlier)
}

impl Tracker {
    pub fn new(
        camera: &str,
        device_id: &str,
        model_version: &str,
        settings: SightingsConfig,
        identifies: bool,
    ) -> Tracker {
        Tracker {
            camera: camera.into(),
            device_id: device_id.into(),
            model_version: model_version.into(),
            settings,
            identifies,
            open: None,
            last_frame: None,
            discarded: 0,
            pending: Vec::new(),
            snapshots: Vec::new(),
        }
    }

    /// Whether a sighting is open.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// The open sighting's id.
    pub fn open_id(&self) -> Option<String> {
        self.open.as_ref().map(|o| o.id.clone())
    }

    /// Whether events wait for [`Tracker::drain`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the events in order, and the record of the open sighting as it stands after them (see
    /// [`Tracker::restart_record`]): taken together, so a record never runs ahead of the events.
    pub fn drain(&mut self) -> (Vec<SightingEvent>, Option<SightingEvent>, Vec<BestFrameData>) {
        (std::mem::take(&mut self.pending), self.restart_record(), std::mem::take(&mut self.snapshots))
    }

    /// Records an assessed frame (`now`: when it reached the tracker, real time).
    pub fn frame(&mut self, f: &FrameInfo, now: Instant) -> Decision {
        self.last_frame = Some((now, f.mono));
        let s = self.settings.clone();
        if let Some(o) = &self.open {
            if since(f.mono, o.last_pass_mono) > s.gap {
                self.end(EndReason::Gap, f.time);
            } else if f.passed && since(f.mono, o.started_mono) >= s.max_duration {
                self.end(EndReason::MaxDuration, f.time);
            }
        }
        let decision = match (&mut self.open, f.passed) {
            (Some(o), _) => {
                o.frames.sampled += 1;
                if let Some(c) = f.clock_synced {
                    // Unsynchronised at any frame: the sighting's times may be wrong.
                    o.clock_synced = Some(o.clock_synced.unwrap_or(true) && c);
                }
                if f.passed {
                    o.frames.passed += 1;
                    if f.mono > o.last_pass_mono {
                        o.last_pass_mono = f.mono;
                        o.last_pass = f.time;
                    }
                    if f.position.is_some() {
                        // The first fix of the sighting (its first frames may have had none) and the latest.
                        if o.start_position.is_none() {
                            o.start_position = f.position.clone();
                        }
                        o.end_position = f.position.clone();
                    }
                    if f.score > o.best_score {
                        o.best_score = f.score;
                        o.best = Some(BestFrame {
                            image_ind: f.image_ind.clone(),
                            captured_at: rfc3339(f.time),
                            score: f.score,
                            snapshot: false,
                        });
                        o.best_data = f.data.clone();
                        o.best_located = f.located;
                    }
                    o.gallery_version = f.gallery_version.or(o.gallery_version);
                    let due = o.last_identified.is_none_or(|t| since(f.mono, t) >= s.identify_interval);
                    if !self.identifies {
                        Decision::Skip
                    } else if (o.frames.identified as usize) < s.max_identified
                        && due
                        && f.score >= s.identify_quality * o.best_score
                    {
                        o.frames.identified += 1;
                        o.last_identified = Some(f.mono);
                        Decision::Identify(o.id.clone())
                    } else {
                        o.frames.skipped_budget += 1;
                        Decision::Skip
                    }
                } else {
                    Decision::Skip
                }
            }
            (None, true) => {
                let id = uuid::Uuid::now_v7().to_string();
                let identify = self.identifies;
                self.open = Some(Open {
                    id: id.clone(),
                    started: f.time,
                    started_mono: f.mono,
                    last_pass: f.time,
                    last_pass_mono: f.mono,
                    frames: SightingFrames {
                        sampled: 1,
                        passed: 1,
                        identified: u64::from(identify),
                        skipped_budget: 0,
                    },
                    best: Some(BestFrame {
                        image_ind: f.image_ind.clone(),
                        captured_at: rfc3339(f.time),
                        score: f.score,
                        snapshot: false,
                    }),
                    best_score: f.score,
                    best_data: f.data.clone(),
                    best_located: f.located,
                    last_identified: identify.then_some(f.mono),
                    sum: Vec::new(),
                    embedded: 0,
                    votes: Vec::new(),
                    aggregate: None,
                    new_sent: false,
                    awaiting_first: identify,
                    published_top1: None,
                    last_update: None,
                    update_pending: false,
                    start_position: f.position.clone(),
                    end_position: f.position.clone(),
                    clock_synced: f.clock_synced,
                    gallery_version: f.gallery_version,
                });
                if identify {
                    Decision::Identify(id)
                } else {
                    Decision::Skip
                }
            }
            (None, false) => Decision::Skip,
        };
        if f.passed {
            self.maybe_new(f.time);
        }
        self.flush_update(f.mono, f.time);
        decision
    }

    /// Hands back the identification of a frame [`Tracker::frame`] asked for (`None`: it failed).
    /// `rank` ranks the aggregate embedding; `mono`/`time`: the frame's capture times.
    pub fn identified(
        &mut self,
        sighting: &str,
        result: Option<FrameIdentity>,
        rank: &dyn Fn(Vec<f32>) -> Option<Ranking>,
        mono: Instant,
        time: SystemTime,
    ) {
        let Some(o) = self.open.as_mut().filter(|o| o.id == sighting) else {
            log::debug!("camera {}: identification for sighting {sighting}, which has ended", self.camera);
            return;
        };
        if let Some(r) = result {
            if o.sum.is_empty() {
                o.sum = vec![0.0; r.embedding.len()];
            }
            if o.sum.len() == r.embedding.len() {
                o.sum.iter_mut().zip(&r.embedding).for_each(|(s, &e)| *s += f64::from(e));
                o.embedded += 1;
                if let Some((id, _)) = &r.top1 {
                    match o.votes.iter_mut().find(|(v, _)| v == id) {
                        Some(v) => v.1 += 1,
                        None => o.votes.push((id.clone(), 1)),
                    }
                }
                let norm = o.sum.iter().map(|v| v * v).sum::<f64>().sqrt();
                if norm > 0.0 {
                    let mean: Vec<f32> = o.sum.iter().map(|v| (v / norm) as f32).collect();
                    if let Some(ranking) = rank(mean) {
                        let top = ranking
                            .top
                            .into_iter()
                            .map(|c| {
                                let votes = o.votes.iter().find(|v| v.0 == c.class_animal).map_or(0, |v| v.1);
                                SightingCandidate {
                                    class_animal: c.class_animal,
                                    id_animal: c.id_animal,
                                    probability: c.probability,
                                    source: c.source,
                                    votes,
                                }
                            })
                            .collect();
                        o.aggregate = Some(SightingIdentification {
                            rule: "mean_embedding",
                            frames: o.embedded,
                            top,
                            new_individual: ranking.new_individual,
                        });
                    }
                }
            }
        }
        o.awaiting_first = false;
        let top1 = o.aggregate.as_ref().and_then(|a| a.top.first()).map(|c| c.class_animal.clone());
        if !o.new_sent {
            self.maybe_new(time);
        } else if top1 != o.published_top1 {
            o.update_pending = true;
            self.flush_update(mono, time);
        }
    }

    /// Time passing without frames (`now`: real time): ends the sighting of a silent camera, sends a
    /// held-back update once its interval has passed on the capture clock.
    pub fn tick(&mut self, now: Instant, wall: SystemTime) {
        let Some((arrived, mono)) = self.last_frame else { return };
        let silent = since(now, arrived);
        if self.open.is_some() && silent >= self.settings.gap {
            self.end(EndReason::CameraSilent, wall);
        }
        // The capture clock runs on while no frame comes (as far as the last frame lets us tell).
        self.flush_update(mono + silent, wall);
    }

    /// Ends the open sighting, if any (whaled stopping).
    pub fn close(&mut self, reason: EndReason, wall: SystemTime) {
        if self.open.is_some() {
            self.end(reason, wall);
        }
    }

    /// Open sightings dropped for having fewer than `min_frames` passing frames, since start.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// The `end` this sighting would get if whaled died now (reason `restart`, ended at its last passing
    /// frame), for the state file; `None` when none is open or its `new` has not been sent.
    pub fn restart_record(&self) -> Option<SightingEvent> {
        let o = self.open.as_ref().filter(|o| o.new_sent)?;
        Some(self.event(o, SightingPhase::End, Some(EndReason::Restart), o.last_pass))
    }

    fn flush_update(&mut self, mono: Instant, time: SystemTime) {
        let interval = self.settings.update_interval;
        let Some(o) = self.open.as_mut() else { return };
        if !o.update_pending || !o.new_sent {
            return;
        }
        if o.last_update.is_some_and(|t| since(mono, t) < interval) {
            return;
        }
        let top1 = o.aggregate.as_ref().and_then(|a| a.top.first()).map(|c| c.class_animal.clone());
        o.update_pending = false;
        if top1 != o.published_top1 {
            o.last_update = Some(mono);
            self.emit(SightingPhase::Update, None, time);
        }
    }

    /// Sends `new` once the sighting has `min_frames` passing frames and its first identification
    /// (if any) is back.
    fn maybe_new(&mut self, time: SystemTime) {
        let min = self.settings.min_frames as u64;
        if self.open.as_ref().is_some_and(|o| !o.new_sent && !o.awaiting_first && o.frames.passed >= min) {
            self.emit(SightingPhase::New, None, time);
        }
    }

    fn end(&mut self, reason: EndReason, at: SystemTime) {
        if let Some(o) = &self.open {
            if o.frames.passed < self.settings.min_frames as u64 {
                // Fewer passing frames than a sighting needs: a gate's stray false positive, not an
                // encounter. Never published; counted.
                log::debug!("camera {}: {} passing frame(s) only: not a sighting", self.camera, o.frames.passed);
                self.discarded += 1;
                self.open = None;
                return;
            }
            if !o.new_sent {
                // Its identification never came back (it failed, or whaled is stopping): say it started.
                self.emit(SightingPhase::New, None, at);
            }
        }
        if let Some(o) = self.open.as_mut() {
            if let (true, Some(data), Some(best)) = (self.settings.snapshot, o.best_data.take(), o.best.as_mut()) {
                best.snapshot = true;
                self.snapshots.push(BestFrameData { sighting_id: o.id.clone(), data, located: o.best_located });
            }
        }
        self.emit(SightingPhase::End, Some(reason), at);
        self.open = None;
    }

    fn emit(&mut self, phase: SightingPhase, reason: Option<EndReason>, at: SystemTime) {
        let Some(o) = self.open.as_mut() else { return };
        if phase == SightingPhase::New {
            o.new_sent = true;
        }
        o.published_top1 = o.aggregate.as_ref().and_then(|a| a.top.first()).map(|c| c.class_animal.clone());
        let Some(o) = self.open.as_ref() else { return };
        // Never before its last frame (a replay's recorded clock can run ahead of the wall clock).
        let at = at.max(o.last_pass);
        let e = self.event(o, phase, reason, at);
        self.pending.push(e);
    }

    fn event(&self, o: &Open, phase: SightingPhase, reason: Option<EndReason>, at: SystemTime) -> SightingEvent {
        SightingEvent {
            // An `end` sent twice (after a crash, reason `restart`) keeps one id: consumers drop the repeat.
            event_id: match phase {
                SightingPhase::End => crate::detection::end_event_id(&o.id),
                _ => uuid::Uuid::now_v7().to_string(),
            },
            sighting_id: o.id.clone(),
            event: phase,
            device_id: self.device_id.clone(),
            camera: self.camera.clone(),
            model_version: self.model_version.clone(),
            started_at: rfc3339(o.started),
            last_seen_at: rfc3339(o.last_pass),
            ended_at: (phase == SightingPhase::End).then(|| rfc3339(at)),
            end_reason: reason,
            frames: o.frames.clone(),
            best_frame: o.best.clone(),
            identification: o.aggregate.clone(),
            start_position: o.start_position.clone(),
            end_position: o.end_position.clone(),
            clock_synced: o.clock_synced,
            gallery_version: o.gallery_version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One monotonic origin for every frame of a test.
    fn base() -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    fn settings() -> SightingsConfig {
        SightingsConfig {
            gap: Duration::from_secs(3),
            max_duration: Duration::from_secs(600),
            update_interval: Duration::from_secs(5),
            identify_interval: Duration::from_secs(2),
            identify_quality: 0.9,
            max_identified: 3,
            min_frames: 1,
            ..SightingsConfig::default()
        }
    }

    fn frame(t: f64, passed: bool, score: f64) -> FrameInfo {
        FrameInfo {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1e9 + t),
            mono: base() + Duration::from_secs_f64(t),
            passed,
            score,
            image_ind: format!("cam#{t}"),
            position: None,
            clock_synced: Some(true),
            gallery_version: None,
            data: None,
            located: None,
        }
    }

    /// A frame sequence (time s, passes, score) and what happens: sightings split at the gap, the
    /// budget's choices, new/end events.
    #[test]
    fn sightings_split_at_the_gap_and_the_budget_picks_good_frames() {
        let mut t = Tracker::new("cam", "dev", "m", settings(), true);
        let start = Instant::now();
        let seq = [
            (0.0, false, 0.1),
            (1.0, true, 0.8),  // starts sighting 1, identified (first)
            (1.5, true, 0.9),  // too soon
            (3.0, true, 0.5),  // due, but 0.5 < 0.9 * 0.9
            (3.5, true, 0.95), // due and good: identified
            (4.0, false, 0.1), // a miss inside the sighting
            (5.0, true, 0.9),  // too soon after 3.5
            (6.0, true, 0.92), // due: identified (3rd)
            (8.5, true, 0.99), // due but the cap (3) is reached
            (9.0, false, 0.1),
            (12.0, false, 0.1), // 3.5 s after the last pass > gap 3 s: end
            (13.0, true, 0.7),  // sighting 2
        ];
        let mut events = Vec::new();
        let mut identified = Vec::new();
        for (i, (time, passed, score)) in seq.iter().enumerate() {
            let f = frame(*time, *passed, *score);
            let d = t.frame(&f, start + Duration::from_secs_f64(*time));
            events.extend(t.drain().0);
            if let Decision::Identify(id) = d {
                identified.push(*time);
                let rank = |_: Vec<f32>| {
                    Some(Ranking {
                        top: vec![RankedCandidate {
                            class_animal: "a".into(),
                            id_animal: "sp".into(),
                            probability: 0.5,
                            source: MatchSource::Head,
                        }],
                        new_individual: false,
                    })
                };
                let r = FrameIdentity { embedding: vec![1.0, 0.0], top1: Some(("a".into(), "sp".into())) };
                t.identified(&id, Some(r), &rank, f.mono, f.time);
                events.extend(t.drain().0);
            }
            let _ = i;
        }
        assert_eq!(identified, [1.0, 3.5, 6.0, 13.0]);
        let phases: Vec<(SightingPhase, Option<EndReason>)> = events.iter().map(|e| (e.event, e.end_reason)).collect();
        assert_eq!(
            phases,
            [(SightingPhase::New, None), (SightingPhase::End, Some(EndReason::Gap)), (SightingPhase::New, None)]
        );
        let end = &events[1];
        assert_eq!(end.frames, SightingFrames { sampled: 9, passed: 7, identified: 3, skipped_budget: 4 });
        assert_eq!(end.best_frame.as_ref().unwrap().score, 0.99);
        let agg = end.identification.as_ref().unwrap();
        assert_eq!((agg.frames, agg.top[0].votes), (3, 3));
        assert_ne!(events[0].sighting_id, events[2].sighting_id);
        assert_eq!(events[0].sighting_id, events[1].sighting_id);
    }

    /// With min_frames = 2 a one-frame false positive makes no event; two frames make a sighting.
    #[test]
    fn a_single_passing_frame_is_no_sighting() {
        let mut t = Tracker::new("cam", "dev", "m", SightingsConfig { min_frames: 2, ..settings() }, false);
        let start = Instant::now();
        let mut events = Vec::new();
        for (time, passed) in [(0.0, true), (1.0, false), (5.0, false), (6.0, true), (6.5, true), (12.0, false)] {
            t.frame(&frame(time, passed, 0.8), start + Duration::from_secs_f64(time));
            events.extend(t.drain().0);
        }
        let phases: Vec<_> = events.iter().map(|e| (e.event, e.frames.passed)).collect();
        assert_eq!(phases, [(SightingPhase::New, 2), (SightingPhase::End, 2)]);
        assert_eq!(t.discarded(), 1);
    }

    #[test]
    fn silent_cameras_and_shutdown_end_sightings_and_a_restart_record_is_kept() {
        let mut t = Tracker::new("cam", "dev", "m", SightingsConfig { min_frames: 2, ..settings() }, false);
        let start = Instant::now();
        let mut events = Vec::new();
        assert_eq!(t.frame(&frame(0.0, true, 0.8), start), Decision::Skip);
        assert!(t.drain().0.is_empty(), "min_frames 2: not yet a sighting");
        t.frame(&frame(0.5, true, 0.8), start);
        events.extend(t.drain().0);
        assert_eq!(events.len(), 1, "new at once when nothing is identified");
        assert_eq!(t.restart_record().unwrap().end_reason, Some(EndReason::Restart));
        t.tick(start + Duration::from_secs(1), SystemTime::now());
        events.extend(t.drain().0);
        assert_eq!(events.len(), 1);
        t.tick(start + Duration::from_secs(4), SystemTime::now());
        events.extend(t.drain().0);
        assert_eq!(events[1].end_reason, Some(EndReason::CameraSilent));
        assert!(t.restart_record().is_none());
        t.frame(&frame(10.0, true, 0.8), start + Duration::from_secs(10));
        t.frame(&frame(10.5, true, 0.8), start + Duration::from_secs(10));
        t.close(EndReason::Shutdown, SystemTime::now());
        events.extend(t.drain().0);
        assert_eq!(events.last().unwrap().end_reason, Some(EndReason::Shutdown));
    }
}
