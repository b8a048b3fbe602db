//! Issue 20, items 5 and 6: sightings across output faults, and clocks stepped to garbage.
//!
//! - An `end` the outbox did not take (a read-only remount, EIO) reached stdout only: the sightings state
//!   file keeps it, and the next start sends it again with the same `event_id`. The pipeline and the
//!   fan-out ([`Sinks`]) are the real ones; the outbox is a sink that says it is durable and fails its
//!   appends as told (a real outbox cannot be made to fail its appends for root on a test machine), and
//!   stdout a sink that records its lines.
//! - A restored `end`'s `event_id` is derived from its sighting id: the same across restarts.
//! - A time before 1970 or after 9999 (file times, a stepped clock) is written as the documented clamped
//!   value with one WARN, never a panic.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;
use whaled::config::{Config, PublishMode, SightingsConfig};
use whaled::detection::{end_event_id, rfc3339_millis, TIME_AFTER_9999, TIME_BEFORE_1970};
use whaled::identify::{GalleryAccess, Identifier};
use whaled::pipeline::{run_controlled, Camera, Control, Event, Options, Shutdown};
use whaled::sink::{Failure, Sink, Sinks};
use whaled::source::replay::ReplaySource;

fn identifier() -> Arc<Identifier> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(&dir.path().join("whaled.toml"), "[prefilter]\nthreshold = 0.0\n").unwrap();
    Arc::new(Identifier::from_config(&cfg, GalleryAccess::ReadWrite).unwrap())
}

fn camera(frames: u32) -> Vec<Camera> {
    let jpegs = (0..frames).map(|i| Arc::from(jpeg(&frame(i, 320, 240), 85))).collect();
    vec![Camera {
        name: "cam0".into(),
        source: Box::new(ReplaySource::from_frames("cam0".into(), jpegs, 20.0, false)),
        sample_interval: None,
    }]
}

/// Sighting lines a sink received: (event, sighting_id, event_id, end_reason).
type Lines = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// A sink recording the sighting lines it gets; `durable` ones (the outbox) fail sighting `end`s while
/// `fail_ends` is set, as an outbox on a file system gone read-only does.
struct Recording {
    name: &'static str,
    durable: bool,
    fail_ends: bool,
    got: Lines,
}

impl Sink for Recording {
    fn name(&self) -> &'static str {
        self.name
    }

    fn durable(&self) -> bool {
        self.durable
    }

    fn deliver(&mut self, e: &Event, line: &str) -> Result<(), Failure> {
        if !matches!(e, Event::Sighting(_) | Event::Restored { .. }) {
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        if self.fail_ends && s("event") == "end" {
            return Err(Failure::Event(whaled::Error::Input("Read-only file system (os error 30)".into())));
        }
        self.got.lock().unwrap().push((s("event"), s("sighting_id"), s("event_id"), s("end_reason")));
        Ok(())
    }
}

/// One run of the real pipeline into an outbox (failing its `end`s or not) and stdout; what each got.
fn run(state: &std::path::Path, frames: u32, outbox_fails_ends: bool) -> (Lines, Lines) {
    let id = identifier();
    let opts = Options {
        workers: 1,
        device_id: "test".into(),
        sightings: Some(SightingsConfig { publish: PublishMode::Sightings, ..SightingsConfig::default() }),
        state_file: Some(state.to_path_buf()),
        ..Options::default()
    };
    let (outbox, stdout): (Lines, Lines) = Default::default();
    let mut sinks = Sinks::new(vec![
        Box::new(Recording { name: "outbox", durable: true, fail_ends: outbox_fails_ends, got: outbox.clone() }),
        Box::new(Recording { name: "stdout", durable: false, fail_ends: false, got: stdout.clone() }),
    ]);
    let control = Arc::new(Control::new(&["cam0".into()], id.clone()));
    run_controlled(id, camera(frames), &opts, &Shutdown::new(), &control, |e| sinks.deliver(&e)).unwrap();
    (outbox, stdout)
}

fn ends(lines: &Lines) -> Vec<(String, String, String, String)> {
    lines.lock().unwrap().iter().filter(|l| l.0 == "end").cloned().collect()
}

/// The outbox fails to append the `end` of a sighting (stdout gets it): the state file must keep that
/// `end` (today it is removed, the `end` lost to shore), and the next start sends it to the outbox with
/// the event id stdout already showed, then removes the file.
#[test]
fn an_end_the_outbox_did_not_take_stays_in_the_state_file() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("open-sightings.json");
    let (outbox, stdout) = run(&state, 6, true);
    let out_ends = ends(&stdout);
    assert_eq!(out_ends.len(), 1, "one sighting, ended at shutdown, on stdout: {:?}", stdout.lock().unwrap());
    let (_, sighting, event_id, reason) = out_ends[0].clone();
    assert_eq!(reason, "shutdown");
    assert_eq!(event_id, end_event_id(&sighting), "an end's id is derived from its sighting");
    assert!(ends(&outbox).is_empty(), "the outbox failed it");
    assert!(outbox.lock().unwrap().iter().any(|l| l.0 == "new" && l.1 == sighting), "the new went through");
    let text = std::fs::read_to_string(&state).expect("the state file keeps the end the outbox does not hold");
    assert!(text.contains(&sighting), "{text}");

    // Next start, the outbox works again: the end goes there first, same event id, and the file goes.
    let (outbox, _) = run(&state, 1, false);
    let first = outbox.lock().unwrap().first().cloned().expect("something delivered");
    assert_eq!(first, ("end".to_string(), sighting.clone(), event_id.clone(), "shutdown".to_string()));
    assert!(!state.exists(), "held by the outbox, nothing open: the file is gone");
}

/// A sighting left open by a run that died is ended (reason `restart`) by each following start until
/// the outbox holds that `end`: with the same event id every time (today: a fresh one per start, and
/// the file removed after the first try whether the outbox took the `end` or not).
#[test]
fn restored_ends_keep_one_event_id_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("open-sightings.json");
    let sighting = "0190c2a8-1111-7000-8000-000000000042";
    // What a run that died leaves: the record of an open sighting (with the id it had then).
    let record = serde_json::json!([{
        "event_id": "0190c2a8-2222-7000-8000-000000000001",
        "sighting_id": sighting,
        "event": "end",
        "device_id": "test",
        "camera": "cam0",
        "end_reason": "restart",
    }]);
    std::fs::write(&state, serde_json::to_vec(&record).unwrap()).unwrap();
    let want = end_event_id(sighting);
    // Two starts whose outbox cannot append: the end reaches stdout each time, the file stays.
    for start in 1..=2 {
        let (outbox, stdout) = run(&state, 1, true);
        let restored: Vec<_> = ends(&stdout).into_iter().filter(|l| l.1 == sighting).collect();
        assert_eq!(restored.len(), 1, "start {start}: {restored:?}");
        assert_eq!(restored[0].2, want, "start {start}: the event id is derived from the sighting id");
        assert_eq!(restored[0].3, "restart");
        assert!(ends(&outbox).iter().all(|l| l.1 != sighting), "start {start}");
        let text = std::fs::read_to_string(&state).unwrap_or_else(|e| panic!("start {start}: the file is gone: {e}"));
        assert!(text.contains(sighting), "start {start}: {text}");
    }
    // The third start's outbox takes it: same id, file gone.
    let (outbox, _) = run(&state, 1, false);
    let first = outbox.lock().unwrap().first().cloned().expect("something delivered");
    assert_eq!((first.0.as_str(), first.1.as_str(), first.2.as_str()), ("end", sighting, want.as_str()));
    assert!(!state.exists());
}

/// A clock stepped to garbage: times before 1970 and after 9999 are written as the documented clamped
/// values (humantime's formatter panics on both), and said once at WARN however often they come.
#[test]
fn garbage_times_are_clamped_and_said_once() {
    logs::capture();
    let before = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400 * 3650);
    let after = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400 * 365);
    for _ in 0..3 {
        assert_eq!(rfc3339_millis(before), TIME_BEFORE_1970);
        assert_eq!(rfc3339_millis(after), TIME_AFTER_9999);
    }
    let warned = logs::matching(log::Level::Warn, &["outside 1970..9999"]);
    assert_eq!(warned.len(), 1, "{warned:?}");
}

/// `whaled identify` on photos whose file times are before 1970 (`captured_at` comes from the file
/// time): the clamped value, `clock_synced: false`, one WARN for both, exit 0 (today: a panic). (File
/// systems cannot store a time after 9999 — ext4 stops in 2446 — so that side is covered above and in
/// the unit tests.)
#[test]
fn identify_with_garbage_file_times_does_not_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let img = jpeg(&frame(1, 320, 240), 85);
    let set_mtime = |p: &std::path::Path, secs: i64| {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        // time_t is 32 bits on armv7: both times below fit (1902 is after i32's 1901-12-13).
        let secs = libc::time_t::try_from(secs).expect("the time fits this platform's time_t");
        let t = libc::timespec { tv_sec: secs, tv_nsec: 0 };
        // SAFETY: futimens on a descriptor we own, with two valid timespecs.
        let rc = unsafe { libc::futimens(std::os::fd::AsRawFd::as_raw_fd(&f), [t, t].as_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let back = std::fs::metadata(p).unwrap().modified().unwrap();
        assert!(back < SystemTime::UNIX_EPOCH, "the file system keeps times before 1970");
    };
    let a = write(tmp.path(), "a-1960.jpg", &img);
    set_mtime(&a, -315_619_200); // 1960-01-01
    let b = write(tmp.path(), "b-1901.jpg", &img);
    set_mtime(&b, -2_145_916_800); // 1902-01-01
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whaled"))
        .args(["identify", a.to_str().unwrap(), b.to_str().unwrap()])
        .env_remove("WHALED_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    let dets: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dets.len(), 2, "{stdout}");
    for d in &dets {
        assert_eq!(
            (d["captured_at"].as_str(), d["clock_synced"].as_bool()),
            (Some(TIME_BEFORE_1970), Some(false)),
            "{d}"
        );
    }
    assert_eq!(
        stderr.lines().filter(|l| l.contains("WARN") && l.contains("outside 1970..9999")).count(),
        1,
        "{stderr}"
    );
}
