//! `whaled run` with `[gps]` against a real gpsd fed by gpsfake: every detection and sighting carries
//! the fix current at capture (position and the fix's own UTC time, as the track says, at most 1.5 s
//! old where fixes come every 0.5 s and `max_age` would allow 3 s; only the reports before gpsd's first
//! dated sentence lack the time), a lost fix gives records without a position and the
//! `frames_without_fix` counter counts exactly those, gpsd killed and restarted while frames keep
//! flowing costs positions for a while, never frames, and the sighting's start and end positions are
//! those of its first and last frames with a fix.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::gpsd::{Gpsfake, Track};
use common::repo;

struct Daemon {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    /// whaled's log lines (also passed on to this test's stderr).
    log: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(cfg: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_whaled"))
            .args(["--log-level", "info", "run", "--config"])
            .arg(cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (l, out) = (lines.clone(), child.stdout.take().unwrap());
        let stdout = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(serde_json::from_str(&line).unwrap());
            }
        });
        let (l, err) = (log.clone(), child.stderr.take().unwrap());
        let stderr = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("{line}");
                l.lock().unwrap().push(line);
            }
        });
        Daemon { child, lines, log, readers: vec![stdout, stderr] }
    }

    fn detections(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().iter().filter(|v| v.get("image_ind").is_some()).cloned().collect()
    }

    fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&[serde_json::Value]) -> bool) {
        let t = Instant::now();
        while !done(&self.detections()) {
            assert!(t.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The number of leading records whose position has no `fix_time`; panics if a dated one precedes an
/// undated one: only gpsd's reports before its first dated sentence (RMC) after it starts may lack it.
fn undated_prefix(what: &str, with: &[&serde_json::Value]) -> usize {
    let dated = |x: &serde_json::Value| x["position"].get("fix_time").is_some();
    let n = with.iter().take_while(|x| !dated(x)).count();
    if let Some(x) = with[n..].iter().find(|x| !dated(x)) {
        panic!("{what}: a fix without its time after dated ones: {x}");
    }
    n
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A position's fix must be the track's epoch at its fix_time, to the sentence's precision. gpsd's first
/// report after (re)connecting can come from a GGA sentence, which has no date: no fix_time; that fix
/// must still be one of the track's.
fn on_track(track: &Track, p: &serde_json::Value) -> usize {
    let (lat, lon) = (p["lat"].as_f64().unwrap(), p["lon"].as_f64().unwrap());
    let near = |i: usize| track.epochs[i].fix.is_some_and(|f| (lat - f.lat).abs() < 1e-6 && (lon - f.lon).abs() < 1e-6);
    match p["fix_time"].as_str() {
        Some(t) => {
            let i = track.index_of(t).unwrap_or_else(|| panic!("fix_time {t} is not on the track"));
            assert!(near(i), "{p} vs epoch {i}: {:?}", track.epochs[i]);
            i
        }
        None => (0..track.epochs.len()).find(|&i| near(i)).unwrap_or_else(|| panic!("{p} is on no epoch of the track")),
    }
}

#[test]
fn detections_and_sightings_carry_the_fix_through_loss_and_a_gpsd_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // 20 s steaming, 8 s without a fix, 20 s steaming (looped by gpsfake).
    let track = Track::default().steam(43.5, -1.5, 5.0, 45.0, 20).no_fix(8).steam(43.5006, -1.4990, 4.0, 180.0, 20);
    let mut gps = Gpsfake::start(&tmp.path().join("gps"), &track, false);
    let cfg = tmp.path().join("whaled.toml");
    std::fs::write(
        &cfg,
        format!(
            "device_id = \"boat\"\n[prefilter]\nthreshold = 0.0\n\
             [[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"{}\"\nfps = 4\n\
             [sightings]\npublish = \"both\"\ngap = \"30s\"\n\
             [gps]\naddress = \"127.0.0.1:{}\"\nmax_age = \"3s\"\nreconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n",
            repo().join("tests/photos").display(),
            gps.port
        ),
    )
    .unwrap();
    let d = Daemon::start(&cfg);
    // Through the track once: positions on the track, then the no-fix stretch, then positions again.
    d.wait("positions, none, then positions again", Duration::from_secs(120), |ds| {
        let mut phase = 0;
        for x in ds {
            let has = x.get("position").is_some();
            phase = match (phase, has) {
                (0, true) => 1,
                (1, false) => 2,
                (2, true) => 3,
                (p, _) => p,
            };
        }
        phase == 3
    });
    let ds = d.detections();
    let with: Vec<&serde_json::Value> = ds.iter().filter(|x| x.get("position").is_some()).collect();
    let undated = undated_prefix("first connection", &with);
    assert!(undated < with.len(), "no fix with its time");
    for x in &with {
        on_track(&track, &x["position"]);
        // A fix arrives every 0.5 s: a position is at most one cycle old, plus scheduling; `max_age` (3 s)
        // would let a stale one through.
        assert!(x["position"]["age_s"].as_f64().unwrap().abs() <= 1.5, "{x}");
    }
    let epochs: std::collections::BTreeSet<usize> = with.iter().map(|x| on_track(&track, &x["position"])).collect();
    assert!(epochs.iter().any(|&i| i < 20) && epochs.iter().any(|&i| i >= 28), "both legs: {epochs:?}");
    assert!(ds.iter().all(|x| x.get("clock_synced").is_some()), "clock status on every record");

    // gpsd killed while frames keep flowing; then restarted.
    let before = d.detections().len();
    gps.kill();
    // 12 more frames: natively 3 s at 4 fps; under qemu-user (cross/test.sh) more than 30 s.
    d.wait("frames without a position after the kill", Duration::from_secs(120), |ds| {
        ds.len() > before + 12 && ds[before..].iter().rev().take(4).all(|x| x.get("position").is_none())
    });
    let during = d.detections().len();
    gps.restart();
    d.wait("positions again after the restart", Duration::from_secs(60), |ds| {
        ds.len() > during && ds[during..].iter().any(|x| x.get("position").is_some())
    });
    let after = d.detections();
    let with_after: Vec<&serde_json::Value> = after[during..].iter().filter(|x| x.get("position").is_some()).collect();
    undated_prefix("after the restart", &with_after);
    for x in &with_after {
        on_track(&track, &x["position"]);
    }

    // SIGTERM: the sighting ends with its first and last positions on the track.
    common::broker::unsafe_kill(d.child.id(), "TERM");
    let t = Instant::now();
    let mut d = d;
    while d.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "whaled did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    for r in std::mem::take(&mut d.readers) {
        r.join().unwrap();
    }
    let lines = d.lines.lock().unwrap().clone();
    let ends: Vec<&serde_json::Value> = lines.iter().filter(|v| v["event"] == "end").collect();
    assert!(!ends.is_empty(), "a sighting ended");
    let end = ends.last().unwrap();
    let first = on_track(&track, &end["start_position"]);
    on_track(&track, &end["end_position"]);
    assert!(first < 20, "the sighting started on the first leg: epoch {first}");
    // Its start and end positions are its first and last frames' with a fix (every frame passes at
    // threshold 0, and one worker keeps them in order).
    let own: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| {
            v.get("image_ind").is_some() && v["sighting_id"] == end["sighting_id"] && v.get("position").is_some()
        })
        .collect();
    let place = |p: &serde_json::Value| (p["lat"].as_f64().unwrap(), p["lon"].as_f64().unwrap());
    assert_eq!(place(&end["start_position"]), place(&own[0]["position"]), "start_position");
    assert_eq!(place(&end["end_position"]), place(&own[own.len() - 1]["position"]), "end_position");
    // The lost-fix counter counts exactly the frames without a position.
    let without = lines.iter().filter(|v| v.get("image_ind").is_some() && v.get("position").is_none()).count();
    let log = d.log.lock().unwrap().clone();
    let stats: serde_json::Value = log
        .iter()
        .find_map(|l| l.split_once("final stats ").map(|(_, json)| serde_json::from_str(json).unwrap()))
        .expect("a final stats line");
    assert!(without > 0, "the no-fix stretch and the kill left frames without a position");
    assert_eq!(stats["frames_without_fix"], without, "frames_without_fix vs records without a position: {stats}");
    assert_eq!(end["end_reason"], "shutdown");
    let schema = |name: &str| {
        let text = std::fs::read_to_string(repo().join("schemas").join(name)).unwrap();
        jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
    };
    let (det, sig) = (schema("detection.schema.json"), schema("sighting.schema.json"));
    for v in &lines {
        let s = if v.get("image_ind").is_some() { &det } else { &sig };
        if let Err(e) = s.validate(v) {
            panic!("{e}: {v}");
        }
    }
}
