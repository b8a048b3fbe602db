//! The live pipeline with real models and real JPEG streams: replay playback, corrupt frames in an
//! MJPEG stream, several cameras sharing one model set, dropping under a slow model with bounded
//! latency, clean shutdown from another thread and from SIGTERM.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use whaled::config::Config;
use whaled::detection::Detection;
use whaled::identify::{GalleryAccess, Identifier};
use whaled::pipeline::{run, Camera, Options, Shutdown};
use whaled::source::replay::ReplaySource;

fn identifier(config: &str) -> Arc<Identifier> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(&dir.path().join("whaled.toml"), config).unwrap();
    Arc::new(Identifier::from_config(&cfg, GalleryAccess::ReadWrite).unwrap())
}

fn options(emit_rejected: bool) -> Options {
    Options { workers: 1, emit_rejected, stats_interval: None, device_id: "test".into(), ..Options::default() }
}

fn jpegs(n: u32) -> Vec<Arc<[u8]>> {
    (0..n).map(|i| Arc::from(jpeg(&frame(i, 640, 360), 85))).collect()
}

fn camera(name: &str, frames: Vec<Arc<[u8]>>, fps: f64, looping: bool) -> Camera {
    Camera {
        name: name.into(),
        source: Box::new(ReplaySource::from_frames(name.into(), frames, fps, looping)),
        sample_interval: None,
    }
}

/// Frame sequence numbers of emitted detections (`cam#N`).
fn seqs(ds: &[Detection]) -> Vec<u64> {
    ds.iter().map(|d| d.image_ind.rsplit('#').next().unwrap().parse().unwrap()).collect()
}

/// Tests run in parallel on two cores, so inference may fall behind even slow playback: assertions
/// hold whatever was dropped (every frame accounted for, order kept, the last frame always assessed).
#[test]
fn replay_once_emits_frames_in_order_and_accounts_for_all() {
    let id = identifier("");
    let mut got = Vec::new();
    let stats = run(id, vec![camera("cam0", jpegs(5), 10.0, false)], &options(true), &Shutdown::new(), |d| {
        got.push(d);
        Ok(())
    })
    .unwrap();
    let seq = seqs(&got);
    assert!(seq.windows(2).all(|w| w[0] < w[1]), "{seq:?}");
    assert_eq!(seq.last(), Some(&4), "the freshest frame is never dropped");
    assert!(got.iter().all(|d| d.source == "cam0" && d.device_id == "test" && d.bbox == [0, 0, 640, 360]));
    let s = &stats[0];
    assert_eq!((s.frames_captured, s.frames_sampled), (5, 5));
    assert_eq!(s.frames_decoded + s.frames_dropped, 5, "{s:?}");
    assert_eq!(s.frames_decoded, got.len() as u64);
    assert!(s.latency_p50_ms.is_some() && s.fps > 0.0);
}

#[test]
fn corrupt_frames_in_an_mjpeg_stream_are_counted_and_skipped() {
    // The corrupt frames come first: the first frame always finds the worker idle, and a corrupt
    // frame costs no inference, so this holds however slow the machine (or emulator) is.
    let good = jpeg(&frame(1, 320, 240), 85);
    let mut stream = good[..good.len() / 3].to_vec(); // truncated frame
    stream.extend_from_slice(b"\xff\xd8\xff\xe0garbage that is no JPEG at all");
    stream.extend_from_slice(&good);
    stream.extend_from_slice(&good);
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "dump.mjpeg", &stream);
    let source = ReplaySource::open("mjpeg".into(), &path, 2.0, false).unwrap();
    assert_eq!(source.len(), 4);
    let mut got = Vec::new();
    let cams = vec![Camera { name: "mjpeg".into(), source: Box::new(source), sample_interval: None }];
    let stats = run(identifier(""), cams, &options(true), &Shutdown::new(), |d| {
        got.push(d);
        Ok(())
    })
    .unwrap();
    let s = &stats[0];
    assert!(seqs(&got).iter().all(|n| [2, 3].contains(n)), "only the intact frames give detections: {:?}", seqs(&got));
    assert_eq!(seqs(&got).last(), Some(&3));
    assert_eq!(s.frames_captured, 4);
    assert_eq!(s.frames_corrupt + s.frames_decoded + s.frames_dropped, 4, "{s:?}");
    assert!(s.frames_corrupt >= 1, "the first frame, corrupt, reaches the decoder and is counted: {s:?}");
}

/// A JPEG whose first DQT segment claims a length of 1: what a USB transfer error makes of an MJPEG frame.
fn damaged_header(mut j: Vec<u8>) -> Vec<u8> {
    let dqt = j.windows(2).position(|w| w == [0xFF, 0xDB]).expect("a DQT segment");
    j[dqt + 2..dqt + 4].copy_from_slice(&[0, 1]);
    j
}

/// Issue 10 §1b, live: an MJPEG stream of damaged frames, then intact ones. libjpeg-turbo's handle once
/// stayed failed after the first header error: every later frame was counted corrupt, none assessed.
/// Paced so that every frame reaches the decoder (the slow-model test covers dropping).
#[test]
fn good_frames_after_damaged_headers_in_an_mjpeg_stream_are_assessed() {
    let mut stream = Vec::new();
    for i in 0..12 {
        stream.extend(damaged_header(jpeg(&frame(i, 320, 240), 85)));
    }
    for i in 0..4 {
        stream.extend(jpeg(&frame(100 + i, 320, 240), 85));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "dump.mjpeg", &stream);
    let source = ReplaySource::open("usb".into(), &path, 8.0, false).unwrap();
    assert_eq!(source.len(), 16);
    let mut got = Vec::new();
    let cams = vec![Camera { name: "usb".into(), source: Box::new(source), sample_interval: None }];
    let stats = run(identifier(""), cams, &options(true), &Shutdown::new(), |d| {
        got.push(d);
        Ok(())
    })
    .unwrap();
    let s = &stats[0];
    let seq = seqs(&got);
    assert!(seq.iter().all(|n| *n >= 12), "only intact frames give detections: {seq:?}");
    assert_eq!(seq.last(), Some(&15), "the last intact frame is assessed: {s:?}");
    assert_eq!(s.frames_corrupt + s.frames_decoded + s.frames_dropped, 16, "{s:?}");
    assert!(s.frames_corrupt >= 1, "{s:?}");
}

#[test]
fn cameras_share_the_models() {
    let id = identifier("");
    let cams = vec![camera("left", jpegs(3), 30.0, false), camera("right", jpegs(3), 30.0, false)];
    let mut per_cam = std::collections::HashMap::new();
    let stats = run(id.clone(), cams, &options(true), &Shutdown::new(), |d| {
        *per_cam.entry(d.source).or_insert(0) += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(stats.len(), 2);
    for s in &stats {
        assert_eq!(s.frames_captured, 3);
        assert_eq!(per_cam[&s.camera] as u64, s.frames_decoded, "{s:?}");
        assert_eq!(s.frames_decoded + s.frames_dropped, 3, "{s:?}");
    }
    // One model set: only the Identifier's own handle and ours remain.
    assert_eq!(Arc::strong_count(id.prefilter()), 1);
}

/// Frames arrive at 50 fps, identification takes far longer: the pipeline drops the oldest frames
/// instead of queueing, so every emitted frame is fresh (its age stays within a few inference times)
/// and the drop counter accounts for every frame not assessed.
#[test]
fn slow_model_drops_oldest_frames_and_latency_stays_bounded() {
    let id = identifier(&format!(
        "[prefilter]\nmodel = \"{}\"\nthreshold = 0.0\n[identification]\nmodel = \"{}\"\n",
        b0_manifest().display(),
        b4_manifest().display()
    ));
    let shutdown = Shutdown::new();
    let stopper = shutdown.clone();
    let started = Instant::now();
    let mut emitted: Vec<(Detection, Duration)> = Vec::new();
    let stats = run(id, vec![camera("fast", jpegs(10), 50.0, true)], &options(true), &shutdown, |d| {
        let age =
            SystemTime::now().duration_since(humantime::parse_rfc3339(&d.captured_at).unwrap()).unwrap_or_default();
        emitted.push((d, age));
        if emitted.len() == 4 {
            stopper.trigger();
        }
        Ok(())
    })
    .unwrap();
    let s = &stats[0];
    let per_frame = Duration::from_secs_f64(s.latency_p95_ms.unwrap() / 1e3);
    eprintln!("{s:?}, elapsed {:?}", started.elapsed());
    assert!(s.frames_dropped > 0, "a slow model must cause drops: {s:?}");
    assert_eq!(s.frames_sampled, s.frames_captured);
    // Every sampled frame was assessed, dropped, or still pending at shutdown (at most one).
    assert!(s.frames_sampled - s.frames_decoded - s.frames_dropped <= 1, "{s:?}");
    assert_eq!(emitted.len() as u64, s.frames_decoded);
    for (d, age) in &emitted {
        assert!(
            *age < per_frame * 3 + Duration::from_millis(500),
            "{} is {age:?} old (per frame {per_frame:?})",
            d.image_ind
        );
        assert_eq!(d.candidates.len(), 4, "identification ran");
    }
}

#[test]
fn shutdown_finishes_the_frame_in_hand_and_returns_promptly() {
    let id = identifier("");
    let shutdown = Shutdown::new();
    let trigger = shutdown.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        trigger.trigger();
        Instant::now()
    });
    let mut n = 0u64;
    let stats = run(id, vec![camera("loop", jpegs(3), 20.0, true)], &options(true), &shutdown, |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    let returned = Instant::now();
    let triggered = t.join().unwrap();
    assert!(
        returned.duration_since(triggered) < Duration::from_secs(2),
        "took {:?}",
        returned.duration_since(triggered)
    );
    assert!(n > 0);
    assert_eq!(n, stats[0].frames_decoded, "every assessed frame reached the sink");
}

#[test]
fn rejected_frames_are_not_emitted_by_default() {
    let id = identifier("[prefilter]\nmodel = \"efficientnet-lite0\"\nthreshold = 1.0\n");
    let mut n = 0;
    let stats = run(id, vec![camera("c", jpegs(3), 50.0, false)], &options(false), &Shutdown::new(), |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 0);
    assert_eq!(stats[0].frames_decoded + stats[0].frames_dropped, 3);
    assert!(stats[0].frames_decoded >= 1);
    assert_eq!(stats[0].passed_prefilter, 0);
}

#[test]
fn sigterm_stops_whaled_run_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        write(dir.path(), &format!("{i}.jpg"), &jpeg(&frame(i, 320, 240), 85));
    }
    let cfg = write(
        dir.path(),
        "whaled.toml",
        format!("[[camera]]\nname = \"replay\"\nkind = \"replay\"\npath = \"{}\"\nfps = 10\n[pipeline]\nemit_rejected = true\n", dir.path().display()).as_bytes(),
    );
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_whaled"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "whaled took {:?} to stop", t.elapsed());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("stopped on request") && log.contains("final stats"), "{log}");
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(lines > 0, "{log}");
    assert!(
        log.contains(&format!("\"frames_decoded\":{lines},")),
        "every decoded frame was printed: {lines} lines\n{log}"
    );
}

#[test]
fn run_without_cameras_says_what_to_do() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whaled"))
        .args(["run"])
        .env_remove("WHALED_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("no cameras configured") && log.contains("config/replay.toml"), "{log}");
}

/// The output fails while a sighting is open: its `end` was never delivered, so the state file keeps
/// it, and the next run (a restart) ends it (reason `restart`) before anything else.
#[test]
fn a_sighting_open_when_the_output_fails_is_ended_by_the_next_run() {
    use whaled::config::{PublishMode, SightingsConfig};
    use whaled::pipeline::{run_controlled, Control, Event};
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("open-sightings.json");
    let id = identifier("[prefilter]\nthreshold = 0.0\n");
    let opts = Options {
        sightings: Some(SightingsConfig { publish: PublishMode::Sightings, ..SightingsConfig::default() }),
        state_file: Some(state.clone()),
        ..options(false)
    };
    let cams = || vec![camera("cam0", jpegs(6), 20.0, false)];
    let control = |id: &Arc<Identifier>| Arc::new(Control::new(&["cam0".into()], id.clone()));
    // First run: every frame passes; the sink takes the `new`, then fails on the next event.
    let mut delivered = Vec::new();
    let r = run_controlled(id.clone(), cams(), &opts, &Shutdown::new(), &control(&id), |e| match e {
        Event::Sighting(s) if delivered.is_empty() => {
            delivered.push(s);
            Ok(())
        }
        Event::Sighting(_) => Err(whaled::Error::Input("the outbox is gone".into())),
        _ => Ok(()),
    });
    assert!(r.is_err(), "the output failure stops the run");
    assert_eq!(delivered.len(), 1, "new");
    let open = delivered[0].sighting_id.clone();
    let text = std::fs::read_to_string(&state).expect("the open sighting is kept for the next start");
    assert!(text.contains(&open), "{text}");
    // Second run: the first thing out is the end of that sighting, reason restart.
    let mut first = None;
    run_controlled(
        id.clone(),
        vec![camera("cam0", jpegs(1), 20.0, false)],
        &opts,
        &Shutdown::new(),
        &control(&id),
        |e| {
            if first.is_none() {
                first = Some(e);
            }
            Ok(())
        },
    )
    .unwrap();
    let Some(Event::Restored { json, .. }) = first else { panic!("expected the restored end first, got {first:?}") };
    assert_eq!((json["sighting_id"].as_str(), json["end_reason"].as_str()), (Some(open.as_str()), Some("restart")));
    assert!(!state.exists(), "restored and nothing open: the file is gone");
}
