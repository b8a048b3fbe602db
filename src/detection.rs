//! The Detection JSON: the upstream service's fields (names and meanings kept, so shore consumers need
//! no change) plus whaled's own (`event_id`, `device_id`, `source`, `captured_at`, pre-filter details,
//! timings). A wire type, and a leaf of the crate: it imports nothing of whaled's. The record for an
//! assessed frame is built by `Detection::from_assessment`, which lives beside `Assessment` in
//! `identify.rs` (the core builds wire records; the wire types know nothing of the core).
//!
//! Upstream sentinels: a frame the pre-filter rejects has `class_animal: ""`, `id_animal: "unknown"`,
//! `rejection_reason: "not_a_marine_mammal"`; a frame that passes with no identification model configured
//! has `id_animal: "cetacean_unidentified"`; a top-1 probability below `min_confidence` gives
//! `rejected: true, rejection_reason: "low_confidence"` with the candidates still reported; an image that
//! cannot be decoded gives `rejection_reason: "corrupted_image"`. `bbox` is the whole frame, or with
//! `[prefilter] locate = "gate_map"` the box the gate's map drew around the animal (src/locate.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde::Serialize;

/// What a wire timestamp says for a time before 1970 (a clock stepped to garbage): the earliest one.
pub const TIME_BEFORE_1970: &str = "1970-01-01T00:00:00.000Z";
/// What a wire timestamp says for a time after the year 9999: the latest one.
pub const TIME_AFTER_9999: &str = "9999-12-31T23:59:59.999Z";
/// 10000-01-01T00:00:00Z in seconds since the epoch: RFC 3339 has four-digit years.
const YEAR_10000: u64 = 253_402_300_800;

static OUT_OF_RANGE_WARNED: AtomicBool = AtomicBool::new(false);

/// Whether `t` can be written as RFC 3339 (1970-01-01 up to the end of 9999). A time outside is a
/// clock gone wrong: its records say `clock_synced: false`.
pub fn time_in_range(t: SystemTime) -> bool {
    t.duration_since(SystemTime::UNIX_EPOCH).is_ok_and(|d| d.as_secs() < YEAR_10000)
}

/// `t` as RFC 3339 UTC with milliseconds (`captured_at`, sighting times). Never panics: a time before
/// 1970 is written as [`TIME_BEFORE_1970`], one after 9999 as [`TIME_AFTER_9999`] (the clock was stepped
/// to garbage; one WARN per process says so).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let clamped = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) if d.as_secs() < YEAR_10000 => return humantime::format_rfc3339_millis(t).to_string(),
        Ok(_) => TIME_AFTER_9999,
        Err(_) => TIME_BEFORE_1970,
    };
    if !OUT_OF_RANGE_WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "a time outside 1970..9999 ({t:?}; the system clock or a file time is garbage) is reported as {clamped}, \
             with clock_synced false (said once)"
        );
    }
    clamped.to_string()
}

/// The `event_id` of a sighting's `end`: derived from its `sighting_id` (a UUIDv8 from the SHA-256 of
/// "whaled sighting end" and the id), so an `end` sent twice (a live one, then `restart` after a crash
/// before the state file was rewritten; or a restored one sent again) carries the same id and a
/// consumer that de-duplicates on `event_id` keeps one.
pub fn end_event_id(sighting_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::new().chain_update(b"whaled sighting end\0").chain_update(sighting_id.as_bytes()).finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    uuid::Builder::from_custom_bytes(b).into_uuid().to_string()
}

/// Why a frame was rejected (upstream's `rejection_reason` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    NotAMarineMammal,
    LowConfidence,
    CorruptedImage,
}

/// Where an identification candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchSource {
    /// A slot of the model's ArcFace head.
    Head,
    /// The nearest enrolled photo of a gallery individual.
    Gallery,
}

/// A ranked alternative (upstream: ranks 2..k). `source` and `cosine` are whaled's additions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub class_animal: String,
    pub id_animal: String,
    pub probability: f64,
    pub source: MatchSource,
    /// Cosine similarity of the frame's embedding with the head row or nearest gallery photo (4 dp).
    pub cosine: f64,
}

/// How the top answer was reached (not in upstream).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentificationInfo {
    /// Where the top-1 candidate came from.
    pub source: MatchSource,
    /// Its cosine similarity (4 dp).
    pub cosine: f64,
    /// The best match was below `new_individual_below`: `class_animal` is `"new_individual"`, and the
    /// nearest known individuals are all in `candidates`.
    pub new_individual: bool,
}

/// The zero-shot stage's verdict (not in upstream's Detection, but upstream's gate score).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZeroShotInfo {
    pub model: String,
    /// Sum of the positive prompts' softmax probabilities (unrounded).
    pub score: f64,
    pub threshold: f64,
    pub passed: bool,
}

/// Pre-filter details (not in upstream): unrounded score, the threshold applied and the model, and
/// for a multi-class pre-filter that rejected the frame, what it saw instead.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefilterInfo {
    pub model: String,
    pub score: f64,
    pub threshold: f64,
    /// A multi-class pre-filter that rejected the frame: its most probable non-cetacean category
    /// (the manifest's `[output] labels`, e.g. "seabird") and that category's probability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category_probability: Option<f64>,
}

/// How good a GPS fix is (gpsd's TPV `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FixMode {
    #[serde(rename = "2d")]
    TwoD,
    #[serde(rename = "3d")]
    ThreeD,
}

/// Where the box was when a frame was captured: the latest GPS fix (from gpsd), if one was current.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Position {
    /// WGS84 degrees.
    pub lat: f64,
    pub lon: f64,
    pub fix_mode: FixMode,
    /// The fix's own UTC time (RFC 3339, from the satellites): correct even when the system clock is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix_time: Option<String>,
    /// Seconds between the fix's arrival and the frame's capture (monotonic clock).
    pub age_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub altitude_m: Option<f64>,
    /// Speed over ground, m/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed_mps: Option<f64>,
    /// Course over ground, degrees from true north.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub course_deg: Option<f64>,
    /// Estimated horizontal error, metres (gpsd `eph`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub horizontal_error_m: Option<f64>,
}

/// Per-stage wall time in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    pub decode_ms: f64,
    pub preprocess_ms: f64,
    pub prefilter_ms: f64,
    pub zero_shot_ms: f64,
    /// The gate's map and its box (`[prefilter] locate = "gate_map"`; 0 otherwise), preprocessing included.
    pub locate_ms: f64,
    pub identification_ms: f64,
    pub total_ms: f64,
}

/// Where a frame came from and when.
#[derive(Debug, Clone)]
pub struct FrameMeta {
    /// Upstream `image_ind`: the file name or frame identifier.
    pub image_ind: String,
    /// The path or camera the frame came from.
    pub source: String,
    pub captured_at: SystemTime,
}

/// One Detection record, as printed by `whaled identify` and published by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub image_ind: String,
    pub bbox: [u32; 4],
    pub class_animal: String,
    pub id_animal: String,
    pub probability: f64,
    pub mask: Option<String>,
    pub is_cetacean: bool,
    pub cetacean_score: f64,
    pub rejected: bool,
    pub rejection_reason: Option<RejectionReason>,
    pub model_version: String,
    pub candidates: Vec<Candidate>,
    pub event_id: String,
    pub device_id: String,
    pub source: String,
    /// The camera that took the frame (`whaled run`); absent for photos (`whaled identify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub camera: Option<String>,
    pub captured_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefilter: Option<PrefilterInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_shot: Option<ZeroShotInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identification: Option<IdentificationInfo>,
    /// The sighting this frame belongs to (`[sightings] publish = "both"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sighting_id: Option<String>,
    /// The GPS fix current at capture (absent: no `[gps]`, or no fix; stats count those frames).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
    /// Whether the kernel considered the system clock synchronised (NTP/PPS/chrony) at capture; absent
    /// when it cannot be read. `false`: `captured_at` may be wrong (a Pi with no RTC booted at sea);
    /// `position.fix_time` is then the time to trust.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_synced: Option<bool>,
    /// The version of the gallery in use when the frame was assessed (absent: no gallery configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gallery_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub timings: Timings,
}

/// The phase of a sighting that an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SightingPhase {
    New,
    Update,
    End,
}

/// Why a sighting ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// No frame passed the gates for `gap`.
    Gap,
    /// A passing frame came `max_duration` after its start; that frame starts the next sighting.
    MaxDuration,
    /// The camera delivered no frame at all for `gap`.
    CameraSilent,
    /// whaled stopped (SIGTERM, a reload) while it was open.
    Shutdown,
    /// whaled found it open at start-up: the previous run ended without closing it (a crash, power).
    Restart,
}

/// Frame counts of a sighting.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SightingFrames {
    /// Frames of the camera assessed while the sighting was open (passing or not).
    pub sampled: u64,
    /// Of those, frames that passed the gates.
    pub passed: u64,
    /// Passing frames run through identification.
    pub identified: u64,
    /// Passing frames not identified because of the frame budget.
    pub skipped_budget: u64,
}

/// The best frame of a sighting (highest pre-filter score).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BestFrame {
    /// The frame's `image_ind` (`<camera>#<seq>`), as in its detection.
    pub image_ind: String,
    pub captured_at: String,
    pub score: f64,
    /// Its JPEG is published on `<prefix>/<camera>/sighting/<sighting_id>/snapshot` (`[sightings]
    /// snapshot = true`; sent with the `end`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

/// An aggregated candidate: the rule's probability, and how many identified frames had it as top-1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SightingCandidate {
    pub class_animal: String,
    pub id_animal: String,
    pub probability: f64,
    pub source: MatchSource,
    pub votes: u64,
}

/// The aggregated identification of a sighting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SightingIdentification {
    /// `mean_embedding`: the identified frames' L2-normalised embeddings averaged, re-normalised and
    /// ranked like one frame (head + gallery, softmax of scale x cosine).
    pub rule: &'static str,
    /// The frames the answer uses.
    pub frames: u64,
    pub top: Vec<SightingCandidate>,
    pub new_individual: bool,
}

/// One lifecycle event of a sighting, on `<prefix>/<camera>/sighting` (a wire type).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SightingEvent {
    /// Unique per event (de-duplicate on it; delivery is at-least-once).
    pub event_id: String,
    /// The same for every event of one sighting.
    pub sighting_id: String,
    pub event: SightingPhase,
    pub device_id: String,
    pub camera: String,
    pub model_version: String,
    pub started_at: String,
    /// The last passing frame's capture time.
    pub last_seen_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
    pub frames: SightingFrames,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_frame: Option<BestFrame>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identification: Option<SightingIdentification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_position: Option<Position>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_position: Option<Position>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_synced: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gallery_version: Option<u64>,
}

impl Detection {
    /// The record for a frame that could not be read or decoded.
    pub fn corrupted(meta: &FrameMeta, device_id: &str, model_version: String, error: String) -> Detection {
        let mut d = Detection::base(meta, device_id, model_version);
        d.rejected = true;
        d.rejection_reason = Some(RejectionReason::CorruptedImage);
        d.error = Some(error);
        d
    }

    pub(crate) fn base(meta: &FrameMeta, device_id: &str, model_version: String) -> Detection {
        Detection {
            image_ind: meta.image_ind.clone(),
            bbox: [0, 0, 0, 0],
            class_animal: String::new(),
            id_animal: "unknown".into(),
            probability: 0.0,
            mask: None,
            is_cetacean: false,
            cetacean_score: 0.0,
            rejected: false,
            rejection_reason: None,
            model_version,
            candidates: Vec::new(),
            event_id: uuid::Uuid::now_v7().to_string(),
            device_id: device_id.to_string(),
            source: meta.source.clone(),
            camera: None,
            captured_at: rfc3339_millis(meta.captured_at),
            prefilter: None,
            zero_shot: None,
            identification: None,
            gallery_version: None,
            position: None,
            // A capture time outside what RFC 3339 can say is a clock gone wrong.
            clock_synced: (!time_in_range(meta.captured_at)).then_some(false),
            sighting_id: None,
            error: None,
            timings: Timings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> FrameMeta {
        FrameMeta { image_ind: "f.jpg".into(), source: "/p/f.jpg".into(), captured_at: SystemTime::UNIX_EPOCH }
    }

    /// A clock stepped to garbage (before 1970, after 9999) gives the documented clamped timestamps and
    /// `clock_synced: false`, never a panic (humantime's formatter panics on both).
    #[test]
    fn times_outside_rfc3339_are_clamped_not_a_panic() {
        use std::time::Duration;
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400 * 365 * 10);
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(YEAR_10000 + 86_400);
        let last_ok = SystemTime::UNIX_EPOCH + Duration::from_millis(YEAR_10000 * 1000 - 1);
        assert_eq!(rfc3339_millis(before), TIME_BEFORE_1970);
        assert_eq!(rfc3339_millis(SystemTime::UNIX_EPOCH - Duration::from_nanos(1)), TIME_BEFORE_1970);
        assert_eq!(rfc3339_millis(after), TIME_AFTER_9999);
        assert_eq!(rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_secs(YEAR_10000)), TIME_AFTER_9999);
        assert_eq!(rfc3339_millis(last_ok), TIME_AFTER_9999, "the last representable millisecond itself");
        assert_eq!(rfc3339_millis(SystemTime::UNIX_EPOCH), TIME_BEFORE_1970);
        assert!(time_in_range(last_ok) && time_in_range(SystemTime::UNIX_EPOCH));
        assert!(!time_in_range(before) && !time_in_range(after));
        for (t, want) in [(before, TIME_BEFORE_1970), (after, TIME_AFTER_9999)] {
            let m = FrameMeta { captured_at: t, ..meta() };
            let d = Detection::corrupted(&m, "dev", "v".into(), "bad".into());
            assert_eq!((d.captured_at.as_str(), d.clock_synced), (want, Some(false)));
        }
        let d = Detection::corrupted(&meta(), "dev", "v".into(), "bad".into());
        assert_eq!(d.clock_synced, None, "an ordinary time leaves clock_synced to the kernel's answer");
    }

    /// An `end`'s event id is a function of its sighting id: the same across restarts, distinct per
    /// sighting, and a UUID (version 8).
    #[test]
    fn end_event_ids_are_derived_from_the_sighting() {
        let a = end_event_id("0190c2a8-0000-7000-8000-000000000001");
        assert_eq!(a, end_event_id("0190c2a8-0000-7000-8000-000000000001"));
        assert_ne!(a, end_event_id("0190c2a8-0000-7000-8000-000000000002"));
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version_num(), 8);
    }

    #[test]
    fn corrupted_record() {
        let d = Detection::corrupted(&meta(), "dev", "v".into(), "bad".into());
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["rejection_reason"], "corrupted_image");
        assert_eq!(json["id_animal"], "unknown");
        assert_eq!(json["mask"], serde_json::Value::Null);
        assert_eq!(json["bbox"], serde_json::json!([0, 0, 0, 0]));
        assert_eq!(json["error"], "bad");
    }
}
