//! The live frame pipeline: one capture thread per camera, a shared mailbox that keeps only each
//! camera's freshest sampled frame, inference workers sharing one [`Identifier`], and the caller's
//! thread writing detections.
//!
//! ```text
//!  camera A ─ capture thread ─┐ offer (replaces A's unread frame: counted as dropped)
//!  camera B ─ capture thread ─┤──▶ Mailbox [A: frame?, B: frame?] ──▶ worker(s) ──▶ bounded channel ──▶ sink
//! ```
//!
//! Invariants: memory is bounded (at most one pending frame per camera, one frame in hand per worker,
//! `OUTPUT_CAPACITY` detections queued); a slow model never makes capture queue up — the oldest unread
//! frame is dropped instead; on shutdown capture stops first, each worker finishes the frame in hand,
//! then the sink receives every detection produced before `run` returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{PublishMode, SightingsConfig};
use crate::detection::{Detection, EndReason, FrameMeta, SightingEvent, SightingPhase};
use crate::error::{Error, Result};
use crate::identify::Identifier;
use crate::jitter::Jitter;
use crate::sighting::{Decision, FrameIdentity, FrameInfo, RankedCandidate, Ranking, Tracker};
use crate::source::{Frame, Source, SourceEvent};

/// What the pipeline emits: per-frame detections and sighting events.
#[derive(Debug, Clone)]
pub enum Event {
    Detection(Detection),
    Sighting(SightingEvent),
    /// An `end` (reason `restart`) for a sighting a previous run left open, as read from the state file.
    Restored {
        camera: String,
        event_id: String,
        json: serde_json::Value,
    },
    /// A worker left sighting events in a tracker: the output thread drains them (never delivered).
    Wake,
    /// The best frame of an ended sighting, as JPEG (`[sightings] snapshot`); `crop`: the crop around
    /// the animal the gate's map located in it (`[prefilter] locate = "gate_map"`), the embedder's input.
    Snapshot {
        camera: String,
        sighting_id: String,
        jpeg: Vec<u8>,
        crop: bool,
    },
}

/// What became of an event the sink took: `Held` once an output that survives a crash (the outbox)
/// stores it, or where there is no such output to wait for; `NotHeld` when it failed there (the event
/// reached stdout only, or nothing). The sightings state file lets go of an `end` only once it is held.
/// A sink returning `Ok(())` is its own record: `Held`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Held,
    NotHeld,
}

impl From<()> for Delivery {
    fn from((): ()) -> Delivery {
        Delivery::Held
    }
}

/// Detections waiting for the sink; beyond this, workers wait (and frames are dropped upstream).
const OUTPUT_CAPACITY: usize = 64;
/// Latency samples kept per camera for p50/p95.
const LATENCY_WINDOW: usize = 256;
/// Capture instants kept per camera for the current frame rate.
const FPS_WINDOW: usize = 32;

/// A shutdown request shared by the caller, signal handlers and every pipeline thread.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The flag itself, for `signal_hook::flag::register`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

/// A JPEG of a camera's frame, taken when a snapshot was requested (`Control::request_snapshot`); the
/// MQTT connection publishes it.
pub struct Snapshot {
    pub camera: String,
    pub jpeg: Vec<u8>,
}

/// Live counters of one camera. Updated lock-free on the hot path except the two small windows.
#[derive(Default)]
pub struct CameraStats {
    captured: AtomicU64,
    sampled: AtomicU64,
    dropped: AtomicU64,
    decoded: AtomicU64,
    corrupt: AtomicU64,
    passed: AtomicU64,
    identified: AtomicU64,
    /// Passing frames the sighting's frame budget did not identify.
    skipped_budget: AtomicU64,
    /// Frames assessed while `[gps]` had no current fix.
    without_fix: AtomicU64,
    /// Would-be sightings with fewer than `min_frames` passing frames (never published).
    sightings_discarded: AtomicU64,
    errors: AtomicU64,
    reconnects: AtomicU64,
    /// Bytes copied out of the source for sampled frames (frames the sampler skips cost nothing).
    bytes_copied: AtomicU64,
    latencies_ms: Mutex<VecDeque<f64>>,
    captures: Mutex<VecDeque<Instant>>,
}

/// A camera's counters at one instant (the status wire type).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CameraSnapshot {
    pub camera: String,
    pub frames_captured: u64,
    pub frames_sampled: u64,
    pub frames_dropped: u64,
    pub frames_decoded: u64,
    pub frames_corrupt: u64,
    pub passed_prefilter: u64,
    pub identified: u64,
    /// Passing frames not identified because of the sighting frame budget.
    pub skipped_budget: u64,
    /// Frames assessed with `[gps]` configured but no current fix (their records carry no position).
    pub frames_without_fix: u64,
    /// Would-be sightings with fewer than `[sightings] min_frames` passing frames: not published.
    pub sightings_discarded: u64,
    pub errors: u64,
    pub reconnects: u64,
    /// Bytes of sampled frames copied out of the camera's buffers since start.
    pub bytes_copied: u64,
    pub fps: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
}

impl CameraStats {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn captured(&self, at: Instant) {
        Self::add(&self.captured);
        let mut w = self.captures.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() == FPS_WINDOW {
            w.pop_front();
        }
        w.push_back(at);
    }

    fn latency(&self, ms: f64) {
        let mut w = self.latencies_ms.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() == LATENCY_WINDOW {
            w.pop_front();
        }
        w.push_back(ms);
    }

    pub fn snapshot(&self, camera: &str) -> CameraSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let fps = {
            let w = self.captures.lock().unwrap_or_else(|p| p.into_inner());
            match (w.front(), w.back()) {
                (Some(a), Some(b)) if w.len() > 1 && b > a => (w.len() - 1) as f64 / (*b - *a).as_secs_f64(),
                _ => 0.0,
            }
        };
        let (p50, p95) = {
            let mut v: Vec<f64> = self.latencies_ms.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
            v.sort_by(f64::total_cmp);
            let q = |q: f64| (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * q).round() as usize]);
            (q(0.5), q(0.95))
        };
        CameraSnapshot {
            camera: camera.to_string(),
            frames_captured: get(&self.captured),
            frames_sampled: get(&self.sampled),
            frames_dropped: get(&self.dropped),
            frames_decoded: get(&self.decoded),
            frames_corrupt: get(&self.corrupt),
            passed_prefilter: get(&self.passed),
            identified: get(&self.identified),
            skipped_budget: get(&self.skipped_budget),
            frames_without_fix: get(&self.without_fix),
            sightings_discarded: get(&self.sightings_discarded),
            errors: get(&self.errors),
            reconnects: get(&self.reconnects),
            bytes_copied: get(&self.bytes_copied),
            fps,
            latency_p50_ms: p50,
            latency_p95_ms: p95,
        }
    }
}

/// What the outside (MQTT commands, the stats topic) sees and changes while the pipeline runs: the
/// per-camera counters, pause flags, snapshot requests and the pre-filter threshold.
pub struct Control {
    names: Vec<Arc<str>>,
    stats: Vec<Arc<CameraStats>>,
    /// Progress, for the systemd watchdog and /healthz: when each capture loop last came round (ms
    /// since `epoch`), each camera's state, and since when each inference worker holds a frame.
    epoch: Instant,
    capture_beat: Vec<AtomicU64>,
    camera_state: Vec<std::sync::atomic::AtomicU8>,
    busy_since: Mutex<Vec<Option<Instant>>>,
    /// Per camera: since when, and for how many frames in a row, every frame has been corrupt, and
    /// whether that has been reported (at WARN) yet.
    corrupt: Vec<Mutex<Option<(Instant, u64, bool)>>>,
    models: Mutex<ModelWindows>,
    paused: Vec<AtomicBool>,
    snapshot: Vec<AtomicBool>,
    stats_requested: AtomicBool,
    identifier: Arc<Identifier>,
    snapshot_tx: Mutex<Option<mpsc::SyncSender<Snapshot>>>,
}

impl Control {
    /// The identifier the workers use (for commands that change it: thresholds, galleries).
    pub fn identifier(&self) -> &Arc<Identifier> {
        &self.identifier
    }

    pub fn new(names: &[Arc<str>], identifier: Arc<Identifier>) -> Control {
        Control {
            names: names.to_vec(),
            stats: names.iter().map(|_| Arc::new(CameraStats::default())).collect(),
            epoch: Instant::now(),
            capture_beat: names.iter().map(|_| AtomicU64::new(0)).collect(),
            camera_state: names.iter().map(|_| std::sync::atomic::AtomicU8::new(CAMERA_STARTING)).collect(),
            busy_since: Mutex::new(Vec::new()),
            corrupt: names.iter().map(|_| Mutex::new(None)).collect(),
            models: Mutex::new(ModelWindows::default()),
            paused: names.iter().map(|_| AtomicBool::new(false)).collect(),
            snapshot: names.iter().map(|_| AtomicBool::new(false)).collect(),
            stats_requested: AtomicBool::new(false),
            identifier,
            snapshot_tx: Mutex::new(None),
        }
    }

    fn beat(&self, i: usize, state: u8) {
        self.capture_beat[i].store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.camera_state[i].store(state, Ordering::Relaxed);
    }

    /// The capture loop came round without a frame (a network source waiting within its timeout): the
    /// loop is alive, its camera's state is unchanged.
    fn touch(&self, i: usize) {
        self.capture_beat[i].store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn set_busy(&self, worker: usize, busy: bool) {
        let mut b = self.busy_since.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() <= worker {
            b.resize(worker + 1, None);
        }
        b[worker] = busy.then(Instant::now);
    }

    /// What is wrong now, in words (empty = healthy): a camera failing, not delivering or delivering
    /// only corrupt frames, a capture loop or an inference that has not come round for `stall_after`.
    pub fn problems(&self, stall_after: Duration) -> Vec<String> {
        self.problems_by_kind(stall_after).into_iter().map(|(text, _)| text).collect()
    }

    /// [`problems`](Self::problems), each with whether it is a stall (true: only a restart can help) or a
    /// camera problem the capture loop recovers from by itself (false).
    fn problems_by_kind(&self, stall_after: Duration) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        for (i, name) in self.names.iter().enumerate() {
            let state = self.camera_state[i].load(Ordering::Relaxed);
            let since = Duration::from_millis(now_ms.saturating_sub(self.capture_beat[i].load(Ordering::Relaxed)));
            match state {
                CAMERA_ENDED => {}
                CAMERA_FAILING => out.push((format!("camera {name}: failing, reopening with backoff"), false)),
                _ if since > stall_after => {
                    out.push((format!("camera {name}: capture loop stalled for {since:.0?}"), true))
                }
                _ => {}
            }
            if let Some((since, n, _)) = *self.corrupt[i].lock().unwrap_or_else(|p| p.into_inner()) {
                if corrupt_alarm(since, n) {
                    let text = format!(
                        "camera {name}: every frame corrupt for {:.0?} ({n} frames): damaged stream or cable",
                        since.elapsed()
                    );
                    out.push((text, false));
                }
            }
        }
        for (w, b) in self.busy_since.lock().unwrap_or_else(|p| p.into_inner()).iter().enumerate() {
            if let Some(t) = b.filter(|t| t.elapsed() > stall_after) {
                out.push((format!("inference worker {w}: one frame for {:.0?}", t.elapsed()), true));
            }
        }
        out
    }

    /// Records a decoded (`ok`) or corrupt frame of camera `i`. Logs the start of a run of corrupt frames
    /// at WARN, the moment it becomes an alarm (see [`corrupt_alarm`]) at WARN, and its end at INFO; the
    /// frames in between at DEBUG, so one bad cable does not flood the log.
    fn frame_decoded(&self, i: usize, ok: bool, err: Option<&Error>) {
        let name = &self.names[i];
        let mut c = self.corrupt[i].lock().unwrap_or_else(|p| p.into_inner());
        match (ok, *c) {
            (true, None) => {}
            (true, Some((since, n, _))) => {
                *c = None;
                log::info!("camera {name}: decoding again after {n} corrupt frame(s) in {:.1?}", since.elapsed());
            }
            (false, None) => {
                *c = Some((Instant::now(), 1, false));
                log::warn!("camera {name}: skipping corrupt frame: {}", err.map(|e| e.to_string()).unwrap_or_default());
            }
            (false, Some((since, n, reported))) => {
                let alarm = corrupt_alarm(since, n + 1);
                *c = Some((since, n + 1, reported || alarm));
                if alarm && !reported {
                    log::warn!(
                        "camera {name}: every frame for {:.1?} has been corrupt ({} frames); the last: {}",
                        since.elapsed(),
                        n + 1,
                        err.map(|e| e.to_string()).unwrap_or_default()
                    );
                } else {
                    log::debug!("camera {name}: corrupt frame: {}", err.map(|e| e.to_string()).unwrap_or_default());
                }
            }
        }
    }

    /// Whether the pipeline is making progress (cameras may be failing or delivering corrupt frames: that
    /// is recovered by retries, or needs a cable, not a restart): no capture loop and no inference stuck for `stall_after`.
    pub fn progressing(&self, stall_after: Duration) -> bool {
        self.problems_by_kind(stall_after).iter().all(|(_, stall)| !stall)
    }

    /// p50/p95 inference time of each model over the last frames.
    pub fn model_latencies(&self) -> ModelLatencies {
        let m = self.models.lock().unwrap_or_else(|p| p.into_inner());
        let (prefilter_p50_ms, prefilter_p95_ms) = quantiles(&m.prefilter);
        let (identification_p50_ms, identification_p95_ms) = quantiles(&m.identification);
        ModelLatencies { prefilter_p50_ms, prefilter_p95_ms, identification_p50_ms, identification_p95_ms }
    }

    fn record_models(&self, timings: &crate::detection::Timings, prefilter_ran: bool, identified: bool) {
        let mut m = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if prefilter_ran {
            push_window(&mut m.prefilter, timings.prefilter_ms);
        }
        if identified {
            push_window(&mut m.identification, timings.identification_ms);
        }
    }

    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    fn index(&self, camera: &str) -> Option<usize> {
        self.names.iter().position(|n| &**n == camera)
    }

    /// Every camera's counters now.
    pub fn snapshots(&self) -> Vec<CameraSnapshot> {
        self.names.iter().zip(&self.stats).map(|(n, s)| s.snapshot(n)).collect()
    }

    /// Pauses (no frame enters inference) or resumes a camera; returns (ok, message) for a reply.
    pub fn set_paused(&self, camera: &str, paused: bool) -> (bool, String) {
        match self.index(camera) {
            Some(i) => {
                self.paused[i].store(paused, Ordering::SeqCst);
                log::info!("camera {camera}: {} by command", if paused { "paused" } else { "resumed" });
                (true, format!("camera {camera} {}", if paused { "paused" } else { "resumed" }))
            }
            None => (false, format!("no camera named {camera:?}")),
        }
    }

    pub fn request_snapshot(&self, camera: &str) -> (bool, String) {
        match self.index(camera) {
            Some(i) => {
                self.snapshot[i].store(true, Ordering::SeqCst);
                (true, format!("the next frame of {camera} will be published as a snapshot"))
            }
            None => (false, format!("no camera named {camera:?}")),
        }
    }

    pub fn set_snapshot_sender(&self, tx: mpsc::SyncSender<Snapshot>) {
        *self.snapshot_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    pub fn threshold(&self) -> f64 {
        self.identifier.threshold()
    }

    pub fn set_threshold(&self, t: f64) {
        self.identifier.set_threshold(t);
    }

    pub fn request_stats(&self) {
        self.stats_requested.store(true, Ordering::SeqCst);
    }

    pub fn take_stats_request(&self) -> bool {
        self.stats_requested.swap(false, Ordering::SeqCst)
    }

    /// Sends a snapshot of `frame` if one was requested for camera `i`.
    fn maybe_snapshot(&self, i: usize, frame: &Frame) {
        if !self.snapshot[i].swap(false, Ordering::SeqCst) {
            return;
        }
        let jpeg = match &frame.data {
            crate::source::FrameData::Encoded(b) if b.starts_with(&[0xFF, 0xD8]) => Ok(b.to_vec()),
            other => {
                crate::decode::decode_frame(other, &self.names[i]).and_then(|img| crate::images::encode_jpeg(&img))
            }
        };
        match (jpeg, &*self.snapshot_tx.lock().unwrap_or_else(|p| p.into_inner())) {
            (Ok(jpeg), Some(tx)) => {
                let _ = tx.try_send(Snapshot { camera: self.names[i].to_string(), jpeg });
            }
            (Err(e), _) => log::warn!("camera {}: snapshot failed: {e}", self.names[i]),
            (_, None) => {}
        }
    }
}

/// A camera whose frames have all been corrupt for at least this long and this many frames is reported
/// by `/healthz` (and once at WARN): a damaged stream, not a stray bad frame.
const CORRUPT_ALARM_AFTER: Duration = Duration::from_secs(2);
const CORRUPT_ALARM_FRAMES: u64 = 10;

fn corrupt_alarm(since: Instant, frames: u64) -> bool {
    frames >= CORRUPT_ALARM_FRAMES && since.elapsed() >= CORRUPT_ALARM_AFTER
}

const CAMERA_STARTING: u8 = 0;
const CAMERA_RUNNING: u8 = 1;
const CAMERA_FAILING: u8 = 2;
const CAMERA_ENDED: u8 = 3;

/// Inference latency of each model over the last frames (the stats topic's wire type).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ModelLatencies {
    pub prefilter_p50_ms: Option<f64>,
    pub prefilter_p95_ms: Option<f64>,
    pub identification_p50_ms: Option<f64>,
    pub identification_p95_ms: Option<f64>,
}

/// Last `LATENCY_WINDOW` inference times of the pre-filter and of identification, in ms.
#[derive(Default)]
struct ModelWindows {
    prefilter: VecDeque<f64>,
    identification: VecDeque<f64>,
}

fn push_window(w: &mut VecDeque<f64>, v: f64) {
    if w.len() == LATENCY_WINDOW {
        w.pop_front();
    }
    w.push_back(v);
}

/// (p50, p95) of a window.
fn quantiles(w: &VecDeque<f64>) -> (Option<f64>, Option<f64>) {
    let mut v: Vec<f64> = w.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    let q = |q: f64| (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * q).round() as usize]);
    (q(0.5), q(0.95))
}

/// One camera as the pipeline runs it.
pub struct Camera {
    pub name: Arc<str>,
    pub source: Box<dyn Source>,
    /// At most one frame per interval is offered to inference.
    pub sample_interval: Option<Duration>,
}

/// The freshest unread frame of each camera, and whether its source is still running.
struct MailboxState {
    pending: Vec<Option<(u64, Frame)>>,
    live_sources: usize,
    arrivals: u64,
}

struct Mailbox {
    state: Mutex<MailboxState>,
    ready: Condvar,
}

impl Mailbox {
    /// Stores `frame` as camera `i`'s pending frame; returns whether an unread frame was replaced.
    fn offer(&self, i: usize, frame: Frame) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.arrivals += 1;
        let arrival = s.arrivals;
        let replaced = s.pending[i].replace((arrival, frame)).is_some();
        drop(s);
        self.ready.notify_one();
        replaced
    }

    fn source_ended(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.live_sources = s.live_sources.saturating_sub(1);
        drop(s);
        self.ready.notify_all();
    }

    /// The oldest pending frame across cameras; `None` once shut down, or once every source has ended
    /// and nothing is pending.
    fn take(&self, shutdown: &Shutdown) -> Option<(usize, Frame)> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if shutdown.is_triggered() {
                return None;
            }
            let oldest = s.pending.iter().enumerate().filter_map(|(i, p)| p.as_ref().map(|(a, _)| (*a, i))).min();
            if let Some((_, i)) = oldest {
                return s.pending[i].take().map(|(_, f)| (i, f));
            }
            if s.live_sources == 0 {
                return None;
            }
            // Timed wait: a shutdown triggered from a signal handler cannot notify the condvar.
            s = self.ready.wait_timeout(s, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// How the pipeline runs (from `[pipeline]` and `[sightings]` in the config).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Inference threads sharing the models.
    pub workers: usize,
    /// Also emit frames the pre-filter rejected (off in the field: they would flood the link).
    pub emit_rejected: bool,
    /// Log every camera's counters at INFO this often.
    pub stats_interval: Option<Duration>,
    pub device_id: String,
    /// Sightings and the frame budget (`None`: per-frame detections only, every passing frame identified).
    pub sightings: Option<SightingsConfig>,
    /// Where open sightings are recorded, so that a run that dies leaves them to be ended (reason
    /// `restart`) by the next.
    pub state_file: Option<std::path::PathBuf>,
    /// The GPS (`[gps]`): every record is stamped with the fix current at capture.
    pub gps: Option<Arc<crate::gps::Gps>>,
}

/// Runs the pipeline until every source ends or `shutdown` is triggered; `sink` receives each detection
/// on the calling thread. Returns the final counters.
pub fn run(
    identifier: Arc<Identifier>,
    cameras: Vec<Camera>,
    options: &Options,
    shutdown: &Shutdown,
    mut sink: impl FnMut(Detection) -> Result<()>,
) -> Result<Vec<CameraSnapshot>> {
    let names: Vec<Arc<str>> = cameras.iter().map(|c| c.name.clone()).collect();
    let control = Arc::new(Control::new(&names, identifier.clone()));
    run_controlled(identifier, cameras, options, shutdown, &control, |e| match e {
        Event::Detection(d) => sink(d),
        Event::Sighting(_) | Event::Restored { .. } | Event::Wake | Event::Snapshot { .. } => Ok(()),
    })
}

/// [`run`] with a [`Control`] made by the caller (for MQTT commands and the stats topic); its camera
/// names must be `cameras`' names, in order. `sink` says for each event whether the outbox holds it
/// ([`Delivery`]; `()` for held): an `end` it does not hold stays in the state file, is offered again
/// every 10 s, and is sent again by the next start, with the same `event_id`.
pub fn run_controlled<D: Into<Delivery>>(
    identifier: Arc<Identifier>,
    cameras: Vec<Camera>,
    options: &Options,
    shutdown: &Shutdown,
    control: &Arc<Control>,
    mut sink: impl FnMut(Event) -> Result<D>,
) -> Result<Vec<CameraSnapshot>> {
    let names: Vec<Arc<str>> = cameras.iter().map(|c| c.name.clone()).collect();
    if names != control.names {
        return Err(Error::Input("pipeline control was made for other cameras".into()));
    }
    let model_version = identifier.model_version();
    let trackers: Option<Vec<Mutex<Tracker>>> = options.sightings.as_ref().map(|s| {
        names
            .iter()
            .map(|n| {
                Mutex::new(Tracker::new(
                    n,
                    &options.device_id,
                    &model_version,
                    s.clone(),
                    identifier.has_identification(),
                ))
            })
            .collect()
    });
    // Sightings a previous run left open: end them now (reason "restart"), before anything new.
    let mut unheld = Vec::new();
    if let Some(path) = &options.state_file {
        for (e, json) in restore_open_sightings(path) {
            if sink(e)?.into() == Delivery::NotHeld {
                unheld.push(json);
            }
        }
        // Only once the outbox holds every `end` (a failure above leaves the file for the next start;
        // those it does not hold stay in it, below).
        if unheld.is_empty() {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("sightings state {}: {e}", path.display());
                }
            }
        }
    }
    let mut state = StateFile::new(options.state_file.clone(), unheld);
    let stats: Vec<Arc<CameraStats>> = control.stats.clone();
    let mailbox = Arc::new(Mailbox {
        state: Mutex::new(MailboxState {
            pending: cameras.iter().map(|_| None).collect(),
            live_sources: cameras.len(),
            arrivals: 0,
        }),
        ready: Condvar::new(),
    });
    let (tx, rx) = mpsc::sync_channel::<Event>(OUTPUT_CAPACITY);
    let mut sink_error = None;

    std::thread::scope(|scope| {
        for (i, cam) in cameras.into_iter().enumerate() {
            let (mailbox, stats, shutdown) = (mailbox.clone(), stats[i].clone(), shutdown.clone());
            let control = control.clone();
            let name = cam.name.clone();
            let ended = mailbox.clone();
            if let Err(e) = std::thread::Builder::new()
                .name(format!("capture-{name}"))
                .spawn_scoped(scope, move || capture(i, cam, &mailbox, &stats, &shutdown, &control))
            {
                log::error!("camera {name}: cannot start its capture thread: {e}");
                ended.source_ended();
            }
        }
        for w in 0..options.workers.max(1) {
            let (mailbox, stats, shutdown, tx) = (mailbox.clone(), stats.clone(), shutdown.clone(), tx.clone());
            let (identifier, names, control) = (identifier.clone(), names.clone(), control.clone());
            let trackers = trackers.as_deref();
            if let Err(e) = std::thread::Builder::new().name(format!("infer-{w}")).spawn_scoped(scope, move || {
                let ctx =
                    Ctx { identifier: &identifier, names: &names, stats: &stats, options, control: &control, trackers };
                infer(w, &ctx, &mailbox, &shutdown, &tx)
            }) {
                log::error!("cannot start inference thread {w}: {e}");
            }
        }
        drop(tx);
        // Ends when every worker has exited and dropped its sender.
        let mut next_stats = options.stats_interval.map(|d| Instant::now() + d);
        let mut next_tick = Instant::now() + TICK;
        let mut deliver = |e: Event, sink_error: &mut Option<Error>| -> Delivery {
            if sink_error.is_some() {
                return Delivery::NotHeld;
            }
            match sink(e) {
                Ok(d) => d.into(),
                Err(e) => {
                    log::error!("output failed, stopping: {e}");
                    *sink_error = Some(e);
                    shutdown.trigger();
                    Delivery::NotHeld
                }
            }
        };
        // Sighting events leave the trackers only here, in each camera's order, before anything a worker
        // sent after them; the state file is written from the records taken with them, and keeps every
        // `end` the outbox does not hold yet (offered again every STATE_EVERY; at the next start else).
        let mut drain = |deliver: &mut dyn FnMut(Event, &mut Option<Error>) -> Delivery,
                         sink_error: &mut Option<Error>| {
            let Some(trackers) = &trackers else { return };
            if sink_error.is_none() && state.retry_due() {
                let mut held = false;
                for json in state.take_unheld() {
                    if let Some(e) = restored_event(&json) {
                        // Offered to every sink again (stdout may repeat it, with the same event_id).
                        if deliver(e, sink_error) == Delivery::NotHeld {
                            state.put_back(json);
                        } else {
                            held = true;
                        }
                    }
                }
                // The file is rewritten only when the outbox took some: a failing disk is not written
                // every STATE_EVERY for nothing.
                state.unheld_changed |= held;
            }
            let mut records = Vec::new();
            for (t, st) in trackers.iter().zip(&stats) {
                let (events, record, snapshots, discarded) = {
                    let mut t = lock(t);
                    let (events, record, snapshots) = t.drain();
                    (events, record, snapshots, t.discarded())
                };
                st.sightings_discarded.store(discarded, Ordering::Relaxed);
                let camera = events.first().map(|e| e.camera.clone());
                for e in events {
                    let end = (e.event == SightingPhase::End).then(|| serde_json::to_value(&e));
                    if deliver(Event::Sighting(e), sink_error) == Delivery::NotHeld && sink_error.is_none() {
                        // Only stdout (if anything) has it: the state file keeps it for the outbox.
                        match end {
                            Some(Ok(json)) => state.keep_unheld(json),
                            Some(Err(e)) => log::error!("a sighting end to JSON: {e}"),
                            None => {}
                        }
                    }
                }
                for best in snapshots {
                    let camera = camera.clone().unwrap_or_default();
                    let id = &best.sighting_id;
                    match snapshot_jpeg(&best.data, id) {
                        Ok(jpeg) => {
                            let (camera, sighting_id) = (camera.clone(), id.clone());
                            deliver(Event::Snapshot { camera, sighting_id, jpeg, crop: false }, sink_error);
                        }
                        Err(e) => log::warn!("sighting {id}: no snapshot: {e}"),
                    }
                    if let Some(b) = best.located {
                        match crop_jpeg(&best.data, b, id) {
                            Ok(jpeg) => {
                                let sighting_id = id.clone();
                                deliver(Event::Snapshot { camera, sighting_id, jpeg, crop: true }, sink_error);
                            }
                            Err(e) => log::warn!("sighting {id}: no crop snapshot: {e}"),
                        }
                    }
                }
                records.extend(record);
            }
            // A failed output delivered nothing: keep the last record for the next start to end.
            if sink_error.is_none() {
                state.save(&records);
            }
        };
        loop {
            let wake = next_stats.map_or(next_tick, |s| s.min(next_tick));
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(e) => {
                    drain(&mut deliver, &mut sink_error);
                    if !matches!(e, Event::Wake) {
                        deliver(e, &mut sink_error);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if next_stats.is_some_and(|at| now >= at) {
                for (n, s) in names.iter().zip(&stats) {
                    log::info!("stats {}", serde_json::to_string(&s.snapshot(n)).unwrap_or_default());
                }
                next_stats = options.stats_interval.map(|d| now + d);
            }
            if now >= next_tick {
                next_tick = now + TICK;
                if let Some(trackers) = &trackers {
                    for t in trackers {
                        lock(t).tick(now, std::time::SystemTime::now());
                    }
                }
                drain(&mut deliver, &mut sink_error);
            }
        }
        // Every worker is done: end the sightings still open, unless the output failed (then the state
        // file keeps them for the next start to end).
        if sink_error.is_none() {
            if let Some(trackers) = &trackers {
                for t in trackers {
                    lock(t).close(EndReason::Shutdown, std::time::SystemTime::now());
                }
            }
            drain(&mut deliver, &mut sink_error);
        }
    });
    if let (Some(path), false) = (&state.path, state.unheld.is_empty()) {
        log::warn!(
            "sightings state {}: {} sighting end(s) the outbox did not store are kept there; the next start \
             sends them (same event_id)",
            path.display(),
            state.unheld.len()
        );
    }
    match sink_error {
        Some(e) => Err(e),
        None => Ok(names.iter().zip(&stats).map(|(n, s)| s.snapshot(n)).collect()),
    }
}

/// The crop the embedder saw ([`crate::locate::crop`]) of a frame, as JPEG.
fn crop_jpeg(data: &crate::source::FrameData, located: crate::locate::PixelBox, name: &str) -> Result<Vec<u8>> {
    crate::images::encode_jpeg(&crate::locate::crop(&crate::decode::decode_frame(data, name)?, located))
}

/// A frame as JPEG: MJPEG frames as they came, anything else decoded and encoded.
fn snapshot_jpeg(data: &crate::source::FrameData, name: &str) -> Result<Vec<u8>> {
    match data {
        crate::source::FrameData::Encoded(b) if b.starts_with(&[0xFF, 0xD8]) => Ok(b.to_vec()),
        other => crate::images::encode_jpeg(&crate::decode::decode_frame(other, name)?),
    }
}

/// How often sightings are checked for silent cameras and held-back updates.
const TICK: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The open sightings (as the `end` each would get after a crash), kept in a file beside the outbox,
/// with the `end`s the outbox did not take (a read-only remount, EIO: they reached stdout at most).
/// Written (temporary file, fsync, rename, fsync of the directory) when either set changes, and at most
/// every [`STATE_EVERY`] otherwise (SD cards wear); removed when both are empty, so never before the
/// outbox holds every `end`. Failures are logged, not fatal: the file only closes sightings after a crash.
struct StateFile {
    path: Option<std::path::PathBuf>,
    ids: Vec<String>,
    /// `end`s the outbox does not hold yet (JSON as delivered, or as restored).
    unheld: Vec<serde_json::Value>,
    /// `unheld` changed since the file was written.
    unheld_changed: bool,
    written: Option<Instant>,
    retried: Instant,
}

const STATE_EVERY: Duration = Duration::from_secs(10);
/// Most sighting `end`s kept for an outbox that does not take them (a few KiB each).
const MAX_UNHELD: usize = 1000;

impl StateFile {
    fn new(path: Option<std::path::PathBuf>, unheld: Vec<serde_json::Value>) -> StateFile {
        if let (Some(p), false) = (&path, unheld.is_empty()) {
            log::error!(
                "sightings state {}: the outbox did not take {} restored end(s); they stay in the file and are \
                 offered again every {STATE_EVERY:?} and at the next start (same event_id)",
                p.display(),
                unheld.len()
            );
        }
        // Restored ends not held force the first write (the file must keep them, whatever else changes).
        let unheld_changed = !unheld.is_empty();
        StateFile { path, ids: Vec::new(), unheld, unheld_changed, written: None, retried: Instant::now() }
    }

    /// An `end` the outbox did not take: kept in the file until it does (at most [`MAX_UNHELD`]; beyond,
    /// the oldest goes, at ERROR).
    fn keep_unheld(&mut self, json: serde_json::Value) {
        if self.path.is_some() {
            if self.unheld.len() >= MAX_UNHELD {
                let lost = self.unheld.remove(0);
                log::error!(
                    "{} sighting ends wait for an outbox that does not take them; the oldest ({}) is dropped",
                    MAX_UNHELD,
                    lost.get("sighting_id").and_then(|v| v.as_str()).unwrap_or("?")
                );
            }
            self.unheld.push(json);
            self.unheld_changed = true;
        }
    }

    /// An unheld `end` offered again and still not taken: back in the list, the file unchanged.
    fn put_back(&mut self, json: serde_json::Value) {
        self.unheld.push(json);
    }

    /// Whether to offer the unheld `end`s to the sink again (every STATE_EVERY).
    fn retry_due(&mut self) -> bool {
        if self.unheld.is_empty() || self.retried.elapsed() < STATE_EVERY {
            return false;
        }
        self.retried = Instant::now();
        true
    }

    fn take_unheld(&mut self) -> Vec<serde_json::Value> {
        std::mem::take(&mut self.unheld)
    }

    fn save(&mut self, open: &[SightingEvent]) {
        let Some(path) = &self.path else { return };
        let ids: Vec<String> = open.iter().map(|e| e.sighting_id.clone()).collect();
        let nothing = ids.is_empty() && self.unheld.is_empty();
        if !self.unheld_changed
            && ids == self.ids
            && (nothing || self.written.is_some_and(|t| t.elapsed() < STATE_EVERY))
        {
            return;
        }
        let result = if nothing {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            let tmp = path.with_extension("tmp");
            (|| -> std::io::Result<()> {
                let mut records = open.iter().map(serde_json::to_value).collect::<serde_json::Result<Vec<_>>>()?;
                records.extend(self.unheld.iter().cloned());
                let bytes = serde_json::to_vec(&records).map_err(std::io::Error::other)?;
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, path)?;
                if let Some(dir) = path.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                Ok(())
            })()
        };
        match result {
            Ok(()) => {
                self.ids = ids;
                self.unheld_changed = false;
                self.written = Some(Instant::now());
            }
            Err(e) => log::warn!("sightings state {}: {e}", path.display()),
        }
    }
}

/// The `end` events of sightings a previous run left open (or whose `end` the outbox did not take),
/// each with the JSON it came from. The event id is derived from the sighting id
/// ([`crate::detection::end_event_id`]), so an `end` sent again is recognisably the same event.
fn restore_open_sightings(path: &std::path::Path) -> Vec<(Event, serde_json::Value)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            log::error!("sightings state {}: {e}; sightings left open by the last run are not ended", path.display());
            return Vec::new();
        }
    };
    let events: Vec<serde_json::Value> = match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Array(v)) => v,
        _ => {
            log::error!("sightings state {}: not a JSON array (damaged); ignored", path.display());
            Vec::new()
        }
    };
    let mut out = Vec::new();
    for json in events {
        let Some(e) = restored_event(&json) else {
            log::error!(
                "sightings state {}: a record without camera or sighting_id, or a camera that is not a topic \
                 level; skipped",
                path.display()
            );
            continue;
        };
        if let Event::Restored { camera, json: j, .. } = &e {
            let sighting = j.get("sighting_id").and_then(|c| c.as_str()).unwrap_or_default();
            let reason = j.get("end_reason").and_then(|c| c.as_str()).unwrap_or("restart");
            log::warn!(
                "camera {camera}: sighting {sighting} was open when whaled last stopped, or its end was not stored; \
                 ending it (reason {reason})"
            );
        }
        out.push((e, json));
    }
    out
}

/// A stored `end` as an event to deliver, its `event_id` derived from its sighting id; `None` for a
/// record without camera or sighting id, or with a camera that is not a topic level.
fn restored_event(json: &serde_json::Value) -> Option<Event> {
    let camera = json.get("camera")?.as_str()?.to_string();
    let sighting = json.get("sighting_id")?.as_str()?;
    if camera.is_empty() || camera.contains(['/', '+', '#']) {
        return None;
    }
    let event_id = crate::detection::end_event_id(sighting);
    let mut json = json.clone();
    json["event_id"] = serde_json::Value::String(event_id.clone());
    Some(Event::Restored { camera, event_id, json })
}

/// First and longest wait before reopening a failed source.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

fn capture(i: usize, mut cam: Camera, mailbox: &Mailbox, stats: &CameraStats, shutdown: &Shutdown, control: &Control) {
    let paused = &control.paused[i];
    control.beat(i, CAMERA_STARTING);
    let mut last_sample: Option<Instant> = None;
    let mut backoff: Option<Duration> = None;
    // The outage being reported: the reasons already logged, the failed attempts and since when. A
    // camera that stays down logs each reason once per outage (a dead camera's attempts may alternate
    // between two, a refused connection and a timeout), not every retry.
    let mut failing: Option<(Vec<String>, u64, Instant)> = None;
    let mut jitter = Jitter::new(i as u64);
    while !shutdown.is_triggered() {
        // Sampling is decided before the source copies the frame out of the driver's buffer.
        let mut wanted = || {
            let now = Instant::now();
            let due = !paused.load(Ordering::Relaxed)
                && match (cam.sample_interval, last_sample) {
                    // 10 % slack: a camera at exactly the sample rate must not lose every other frame to jitter.
                    (Some(every), Some(last)) => now.duration_since(last) + every / 10 >= every,
                    _ => true,
                };
            if due {
                last_sample = Some(now);
            }
            due
        };
        match cam.source.next_sampled(&mut wanted) {
            Ok(event @ (SourceEvent::Frame(_) | SourceEvent::Skipped)) => {
                control.beat(i, CAMERA_RUNNING);
                backoff = None;
                if let Some((_, attempts, since)) = failing.take() {
                    CameraStats::add(&stats.reconnects);
                    log::warn!(
                        "camera {}: delivering frames again (after {attempts} failed attempt{} over {:.0?})",
                        cam.name,
                        if attempts == 1 { "" } else { "s" },
                        since.elapsed()
                    );
                }
                stats.captured(Instant::now());
                if let SourceEvent::Frame(frame) = event {
                    CameraStats::add(&stats.sampled);
                    stats.bytes_copied.fetch_add(frame.data.payload().len() as u64, Ordering::Relaxed);
                    if mailbox.offer(i, frame) {
                        CameraStats::add(&stats.dropped);
                        log::trace!("camera {}: inference busy, dropped the oldest sampled frame", cam.name);
                    }
                }
            }
            Ok(SourceEvent::Idle) => control.touch(i),
            Ok(SourceEvent::End) => {
                control.beat(i, CAMERA_ENDED);
                log::info!("camera {}: source ended", cam.name);
                break;
            }
            Err(e) => {
                control.beat(i, CAMERA_FAILING);
                CameraStats::add(&stats.errors);
                let base = backoff.map_or(BACKOFF_MIN, |b| (b * 2).min(BACKOFF_MAX));
                backoff = Some(base);
                // +-20 %: cameras that failed together (a switch rebooted) do not retry in lockstep.
                let wait = jitter.scale(base, 0.8, 1.2);
                let text = e.to_string();
                let (reported, attempts, _) = failing.get_or_insert_with(|| (Vec::new(), 0, Instant::now()));
                *attempts += 1;
                // Bounded: a source whose messages never repeat (a counter in them) still logs at most
                // 8 lines per outage.
                if reported.contains(&text) || reported.len() >= 8 {
                    log::debug!("{text} (attempt {attempts}); retrying in {wait:?}");
                } else {
                    // Credentials refused: no retry fixes that, an operator must (ERROR). Anything else
                    // is recovered by reopening (WARN); the counters show a camera that stays down.
                    if matches!(e, Error::Camera { refused: true, .. }) {
                        log::error!("{text}; retrying with backoff (repeats are logged at DEBUG)");
                    } else {
                        log::warn!("{text}; retrying in {wait:.1?} with backoff (repeats are logged at DEBUG)");
                    }
                    reported.push(text);
                }
                sleep_unless_shutdown(wait, shutdown);
            }
        }
    }
    control.beat(i, CAMERA_ENDED);
    log::info!("camera {}: capture stopped", cam.name);
    mailbox.source_ended();
}

fn sleep_unless_shutdown(total: Duration, shutdown: &Shutdown) {
    let until = Instant::now() + total;
    while !shutdown.is_triggered() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// What every inference worker shares.
struct Ctx<'a> {
    identifier: &'a Identifier,
    names: &'a [Arc<str>],
    stats: &'a [Arc<CameraStats>],
    options: &'a Options,
    control: &'a Control,
    /// One per camera, when sightings are on.
    trackers: Option<&'a [Mutex<Tracker>]>,
}

fn infer(worker: usize, ctx: &Ctx<'_>, mailbox: &Mailbox, shutdown: &Shutdown, out: &mpsc::SyncSender<Event>) {
    let mut ws = ctx.identifier.workspace();
    // Test hook for the watchdog test (tests/systemd): hang for good after this many frames.
    let stall_after: Option<u64> = std::env::var("WHALED_TEST_HANG_AFTER_FRAMES").ok().and_then(|v| v.parse().ok());
    let mut assessed = 0u64;
    let mut events = Vec::new();
    while let Some((i, frame)) = mailbox.take(shutdown) {
        ctx.control.set_busy(worker, true);
        if stall_after.is_some_and(|n| assessed >= n) {
            log::warn!("WHALED_TEST_HANG_AFTER_FRAMES: inference worker {worker} now hangs (test hook)");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        assessed += 1;
        assess_one(i, &frame, ctx, &mut ws, &mut events);
        ctx.control.set_busy(worker, false);
        for e in events.drain(..) {
            if out.send(e).is_err() {
                return;
            }
        }
    }
    log::debug!("inference worker {:?} done", std::thread::current().name());
}

/// `clock_synced` for a frame captured at `t`: the kernel's answer, but `false` for a time no timestamp
/// can show (before 1970, after 9999: a clock stepped to garbage, whatever the kernel says).
fn clock_synced_at(t: std::time::SystemTime) -> Option<bool> {
    if crate::detection::time_in_range(t) {
        crate::clock::synchronised()
    } else {
        Some(false)
    }
}

/// Assesses one frame, updates its camera's counters and sighting; pushes what to emit.
fn assess_one(i: usize, frame: &Frame, ctx: &Ctx<'_>, ws: &mut crate::identify::Workspace, out: &mut Vec<Event>) {
    let (identifier, names, control, options) = (ctx.identifier, ctx.names, ctx.control, ctx.options);
    let st = &ctx.stats[i];
    control.maybe_snapshot(i, frame);
    let started = Instant::now();
    let name = format!("{}#{}", names[i], frame.seq);
    let tracker = ctx.trackers.and_then(|t| t.get(i));
    let clock_synced = clock_synced_at(frame.captured_at);
    // The fix current when the frame was captured (on the monotonic clock: a clock step changes nothing).
    let position = options.gps.as_ref().and_then(|g| {
        let p = g.position(frame.captured_mono);
        if p.is_none() {
            CameraStats::add(&st.without_fix);
        }
        p
    });
    let info = |passed: bool, score: f64, located: Option<crate::locate::PixelBox>| FrameInfo {
        time: frame.captured_at,
        mono: frame.captured_mono,
        passed,
        score,
        image_ind: name.clone(),
        position: position.clone(),
        clock_synced,
        gallery_version: identifier.gallery().map(|g| g.version()),
        data: options.sightings.as_ref().filter(|s| s.snapshot).map(|_| frame.data.clone()),
        located,
    };
    let mut decision = Decision::Skip;
    let mut budget = |score: f64, located| match tracker {
        None => true,
        Some(t) => {
            decision = lock(t).frame(&info(true, score, located), Instant::now());
            matches!(decision, Decision::Identify(_))
        }
    };
    // Sighting events stay in the tracker until the output thread drains it; a Wake makes it look.
    let wake = |out: &mut Vec<Event>| {
        if tracker.is_some_and(|t| lock(t).has_pending()) {
            out.push(Event::Wake);
        }
    };
    let result = identifier.assess_with(ws, &frame.data, &name, &mut budget);
    let assessment = match result {
        Ok(a) => a,
        Err(e) => {
            if let (Some(t), Decision::Identify(sid)) = (tracker, &decision) {
                // Its sighting must not wait for an answer that will not come.
                lock(t).identified(sid, None, &|_| None, frame.captured_mono, frame.captured_at);
            }
            wake(out);
            match e {
                Error::Image { .. } => {
                    CameraStats::add(&st.corrupt);
                    control.frame_decoded(i, false, Some(&e));
                }
                e => {
                    CameraStats::add(&st.errors);
                    log::error!("camera {}: frame {} not assessed: {e}", names[i], frame.seq);
                }
            }
            return;
        }
    };
    if let Some(t) = tracker {
        let mut t = lock(t);
        if !assessment.passed {
            t.frame(&info(false, assessment.prefilter_score, None), Instant::now());
        }
        if let Decision::Identify(sid) = &decision {
            let result = assessment.identified.as_ref().map(|found| FrameIdentity {
                embedding: found.embedding.clone(),
                top1: found.ranked.first().map(|c| (c.class_animal.clone(), c.id_animal.clone())),
            });
            let rank = |mean: Vec<f32>| {
                identifier.rank_embedding(mean).map(|found| Ranking {
                    top: found
                        .ranked
                        .into_iter()
                        .map(|c| RankedCandidate {
                            class_animal: c.class_animal,
                            id_animal: c.id_animal,
                            probability: c.probability,
                            source: c.source,
                        })
                        .collect(),
                    new_individual: found.new_individual,
                })
            };
            t.identified(sid, result, &rank, frame.captured_mono, frame.captured_at);
        }
    }
    CameraStats::add(&st.decoded);
    control.frame_decoded(i, true, None);
    control.record_models(&assessment.timings, assessment.prefilter_ran, assessment.identified.is_some());
    if assessment.passed {
        CameraStats::add(&st.passed);
        if tracker.is_some() && assessment.identified.is_none() && identifier.has_identification() {
            CameraStats::add(&st.skipped_budget);
        }
    }
    if assessment.identified.is_some() {
        CameraStats::add(&st.identified);
    }
    st.latency(started.elapsed().as_secs_f64() * 1e3);
    log::debug!("camera {}: frame {} score {:.4}", names[i], frame.seq, assessment.prefilter_score);
    let publish = options.sightings.as_ref().map_or(PublishMode::Detections, |s| s.publish);
    let emit = match publish {
        PublishMode::Sightings => false,
        PublishMode::Detections => assessment.passed || options.emit_rejected,
        // Frames the budget skipped are in the sighting's counts only (without an identification model,
        // every passing frame).
        PublishMode::Both => {
            (assessment.passed && (assessment.identified.is_some() || !identifier.has_identification()))
                || (!assessment.passed && options.emit_rejected)
        }
    };
    if emit {
        let meta = FrameMeta { image_ind: name.clone(), source: names[i].to_string(), captured_at: frame.captured_at };
        let mut detection = Detection::from_assessment(&assessment, &meta, &options.device_id);
        detection.camera = Some(names[i].to_string());
        detection.clock_synced = clock_synced;
        detection.position = position;
        detection.sighting_id = match (&decision, tracker, assessment.passed) {
            (Decision::Identify(sid), _, _) => Some(sid.clone()),
            (_, Some(t), true) => lock(t).open_id(),
            _ => None,
        };
        // The Wake first: the output thread delivers the sighting's events before this detection.
        wake(out);
        out.push(Event::Detection(detection));
    } else {
        wake(out);
    }
}

#[cfg(test)]
mod tests {
    /// Ends an outbox never takes are bounded: the oldest go first, the newest are kept.
    #[test]
    fn unheld_ends_are_capped_oldest_first() {
        use super::{StateFile, MAX_UNHELD};
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateFile::new(Some(dir.path().join("open-sightings.json")), Vec::new());
        for i in 0..MAX_UNHELD + 5 {
            s.keep_unheld(serde_json::json!({"sighting_id": i.to_string()}));
        }
        assert_eq!(s.unheld.len(), MAX_UNHELD);
        assert_eq!(s.unheld[0]["sighting_id"], "5");
        assert_eq!(s.unheld[MAX_UNHELD - 1]["sighting_id"], (MAX_UNHELD + 4).to_string());
        // Offered again and not taken: back in the list without marking the file changed.
        s.unheld_changed = false;
        let taken = s.take_unheld();
        taken.into_iter().for_each(|j| s.put_back(j));
        assert_eq!((s.unheld.len(), s.unheld_changed), (MAX_UNHELD, false));
    }

    use std::time::{Duration, SystemTime};

    /// A capture time before 1970 or after 9999 (a clock stepped to garbage) is `clock_synced: false`
    /// even where the kernel says the clock is synchronised; an ordinary time gets the kernel's answer.
    #[test]
    fn a_garbage_capture_time_is_never_clock_synced() {
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 1);
        assert_eq!(super::clock_synced_at(before), Some(false));
        assert_eq!(super::clock_synced_at(after), Some(false));
        assert_eq!(super::clock_synced_at(SystemTime::now()), crate::clock::synchronised());
    }
}
