//! Sightings through `whaled run` on a replayed sequence: scenes, whale frames, a gap of scenes, more
//! whale frames, scenes. Checked against what the documented rules say, computed here and in
//! `tools/sighting_ref.py` (onnxruntime + numpy, not whaled): the new/update/end events, two sightings
//! when the gap is longer than `gap` and one otherwise, the frame budget's choices, and the aggregated
//! top-5. Then a sighting through a broker outage and a SIGKILL: the next run ends it (reason
//! `restart`), and every event reaches the broker.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::{free_port, Broker, Subscriber};
use common::{repo, whales_dev};

const LITE0: &str = "models/efficientnet-lite0/efficientnet_lite0_fp32.onnx";

fn ok(out: &std::process::Output) -> String {
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "failed: {}\nstdout: {o}\nstderr: {e}", out.status);
    o.into_owned()
}

fn whaled(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_whaled")).args(args).output().unwrap()
}

/// 224x224 PNG of a photo: the exact input of the 224 stretch embedder (and of the reference).
fn png(src: &Path, out: &Path) {
    let img = image::open(src).unwrap().to_rgb8();
    image::imageops::resize(&img, 224, 224, image::imageops::FilterType::Triangle).save(out).unwrap();
}

struct Scene {
    dir: PathBuf,
    embedder: PathBuf,
    gallery: PathBuf,
    /// (gallery id, png) of the enrolled photos.
    enrolled: Vec<(String, PathBuf)>,
    /// Whale frames that pass the gate, scenes that do not, each with its pre-filter score.
    whales: Vec<(PathBuf, f64)>,
    scenes: Vec<(PathBuf, f64)>,
}

/// Photos as PNGs, a gallery-only Lite0 embedder and a gallery of 4 individuals, and each photo's gate
/// verdict and score from `whaled identify` (setup, not the thing under test).
fn scene(dir: &Path) -> Scene {
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let mut pngs = Vec::new();
    for (i, p) in whales_dev("cetacean", 14).iter().chain(&whales_dev("non_cetacean", 8)).enumerate() {
        let out = photos.join(format!("p{i:02}.png"));
        png(p, &out);
        pngs.push(out);
    }
    let embedder = common::gallery_only_embedder(dir, LITE0, "lite0-embedder");
    // The gallery: whale photos 10..13 as four individuals (frames come from 0..9).
    let cat = dir.join("catalogue");
    let mut enrolled = Vec::new();
    for (k, p) in pngs[10..14].iter().enumerate() {
        let id = format!("ind-{k}");
        std::fs::create_dir_all(cat.join(&id)).unwrap();
        let dst = cat.join(&id).join(p.file_name().unwrap());
        std::fs::copy(p, &dst).unwrap();
        enrolled.push((id, dst));
    }
    let gallery = dir.join("g.wgal");
    let cfg = dir.join("build.toml");
    std::fs::write(
        &cfg,
        format!("[identification]\nmodel = \"{}\"\ngallery = \"{}\"\n", embedder.display(), gallery.display()),
    )
    .unwrap();
    ok(&whaled(&[
        "gallery",
        "build",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        gallery.to_str().unwrap(),
        cat.to_str().unwrap(),
    ]));
    let mut args = vec!["--log-level".to_string(), "warn".into(), "identify".into()];
    args.extend(pngs.iter().map(|p| p.display().to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_whaled")).args(&args).output().unwrap();
    let (mut whales, mut scenes) = (Vec::new(), Vec::new());
    let stdout = ok(&out);
    assert_eq!(stdout.lines().count(), pngs.len(), "one detection per photo: {stdout}");
    for (line, p) in stdout.lines().zip(&pngs) {
        let d: serde_json::Value = serde_json::from_str(line).unwrap();
        let score = d["prefilter"]["score"].as_f64().unwrap();
        match (d["is_cetacean"].as_bool().unwrap(), pngs.iter().position(|x| x == p).unwrap()) {
            (true, i) if i < 10 => whales.push((p.clone(), score)),
            (false, i) if i >= 14 => scenes.push((p.clone(), score)),
            _ => {}
        }
    }
    assert!(
        whales.len() >= 8 && scenes.len() >= 6,
        "the gate separates the photos: {} whales, {} scenes",
        whales.len(),
        scenes.len()
    );
    Scene { dir: dir.to_path_buf(), embedder, gallery, enrolled, whales, scenes }
}

/// Runs `whaled run` on `frames` (1 fps, once), returns its stdout records.
fn run(sc: &Scene, frames: &[&(PathBuf, f64)], gap: &str, tag: &str) -> Vec<serde_json::Value> {
    let cam = sc.dir.join(format!("cam-{tag}"));
    std::fs::create_dir_all(&cam).unwrap();
    for (i, (p, _)) in frames.iter().enumerate() {
        std::fs::copy(p, cam.join(format!("{i:03}.png"))).unwrap();
    }
    let cfg = sc.dir.join(format!("run-{tag}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "device_id = \"boat\"\n[identification]\nmodel = \"{}\"\ngallery = \"{}\"\n\
             [[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"{}\"\nfps = 1\nloop = false\n\
             [sightings]\npublish = \"both\"\ngap = \"{gap}\"\nupdate_interval = \"1ms\"\nidentify_interval = \"1500ms\"\n\
             identify_quality = 0.9\nmax_identified = 3\n",
            sc.embedder.display(),
            sc.gallery.display(),
            cam.display()
        ),
    )
    .unwrap();
    let out = whaled(&["--log-level", "info", "run", "--config", cfg.to_str().unwrap()]);
    ok(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The budget rule, computed here: first passing frame; then one per 1.5 s (frames are 1 s apart, so
/// two frames on) whose score is >= 0.9 x the best so far (itself included); at most 3.
fn budget(scores: &[(usize, f64)]) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::new();
    let mut best = 0f64;
    for &(i, s) in scores {
        best = best.max(s);
        let due = chosen.last().is_none_or(|&l| i >= l + 2);
        if chosen.is_empty() || (chosen.len() < 3 && due && s >= 0.9 * best) {
            chosen.push(i);
        }
    }
    chosen
}

fn reference(sc: &Scene, frames: &[PathBuf]) -> Vec<serde_json::Value> {
    let mut cmd = Command::new("python3");
    cmd.current_dir(repo()).args(["tools/sighting_ref.py", "--onnx", LITE0, "--gallery"]);
    cmd.args(sc.enrolled.iter().map(|(id, p)| format!("{id}={}", p.display())));
    cmd.arg("--frames").args(frames);
    ok(&cmd.output().unwrap()).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Checks one sighting's events against the rules; returns its id.
fn check_sighting(
    sc: &Scene,
    events: &[&serde_json::Value],
    dets: &[&serde_json::Value],
    passing: &[(usize, f64)],
    frames: &[&(PathBuf, f64)],
    end_reason: &str,
) {
    let id = events[0]["sighting_id"].as_str().unwrap();
    assert!(events.iter().all(|e| e["sighting_id"] == id));
    let chosen = budget(passing);
    // Which frames were identified: the per-frame detections of this sighting (publish = "both").
    let seqs: Vec<usize> = dets
        .iter()
        .filter(|d| d["sighting_id"] == id)
        .map(|d| d["image_ind"].as_str().unwrap().rsplit('#').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, chosen, "the budget's choice (passing frames and scores {passing:?})");
    let refs = reference(sc, &chosen.iter().map(|&i| frames[i].0.clone()).collect::<Vec<_>>());
    // Expected phases: new after the first identification, update whenever the aggregate top-1 changes.
    let mut want = vec!["new".to_string()];
    let mut published = refs[0]["top"][0]["class_animal"].clone();
    for r in &refs[1..] {
        if r["top"][0]["class_animal"] != published {
            want.push("update".into());
            published = r["top"][0]["class_animal"].clone();
        }
    }
    want.push("end".into());
    let got: Vec<String> = events.iter().map(|e| e["event"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, want, "{events:#?}");
    let end = events.last().unwrap();
    assert_eq!(end["end_reason"], end_reason);
    let last = refs.last().unwrap();
    let agg = &end["identification"];
    assert_eq!(agg["rule"], "mean_embedding");
    assert_eq!(agg["frames"].as_u64(), Some(chosen.len() as u64));
    let (got_top, want_top) = (agg["top"].as_array().unwrap(), last["top"].as_array().unwrap());
    assert!(!want_top.is_empty(), "the reference has candidates: {last}");
    assert_eq!(got_top.len(), want_top.len(), "{agg} vs {last}");
    for (g, w) in got_top.iter().zip(want_top) {
        assert_eq!(g["class_animal"], w["class_animal"], "{agg} vs {last}");
        assert!(
            (g["probability"].as_f64().unwrap() - w["probability"].as_f64().unwrap()).abs() <= 1.5e-4,
            "{agg} vs {last}"
        );
        assert_eq!(g["votes"], w["votes"], "{agg} vs {last}");
    }
    let first = &events[0]["identification"]["top"][0];
    assert_eq!(first["class_animal"], refs[0]["top"][0]["class_animal"], "new carries the first frame's answer");
    let f = &end["frames"];
    assert_eq!(f["passed"].as_u64(), Some(passing.len() as u64));
    assert_eq!(f["identified"].as_u64(), Some(chosen.len() as u64));
    assert_eq!(f["skipped_budget"].as_u64(), Some((passing.len() - chosen.len()) as u64));
    let best = passing.iter().map(|p| p.1).fold(0f64, f64::max);
    assert!((end["best_frame"]["score"].as_f64().unwrap() - best).abs() < 1e-9, "{end}");
}

#[test]
fn a_replayed_survey_gives_the_expected_sightings() {
    let tmp = tempfile::tempdir().unwrap();
    let sc = scene(tmp.path());
    let (w, s) = (&sc.whales, &sc.scenes);
    // scenes, 5 whale frames, 2 scenes (2 s without a passing frame), 3 whale frames, 2 scenes.
    let frames: Vec<&(PathBuf, f64)> =
        vec![&s[0], &s[1], &w[0], &w[1], &w[2], &w[3], &w[4], &s[2], &s[3], &w[5], &w[6], &w[7], &s[4], &s[5]];
    let passing = |range: std::ops::Range<usize>| -> Vec<(usize, f64)> { range.map(|i| (i, frames[i].1)).collect() };

    // gap 1.5 s: the 2 s of scenes split the encounter in two.
    let out = run(&sc, &frames, "1500ms", "split");
    let sightings: Vec<&serde_json::Value> =
        out.iter().filter(|e| e.get("sighting_id").is_some() && e.get("event").is_some()).collect();
    let dets: Vec<&serde_json::Value> = out.iter().filter(|e| e.get("image_ind").is_some()).collect();
    let ids: Vec<&str> = sightings.iter().map(|e| e["sighting_id"].as_str().unwrap()).collect::<Vec<_>>();
    let distinct: Vec<&str> = ids.iter().fold(Vec::new(), |mut v, i| {
        if !v.contains(i) {
            v.push(*i)
        }
        v
    });
    assert_eq!(distinct.len(), 2, "{sightings:#?}");
    for (k, (range, sampled)) in [(2..7, 6u64), (9..12, 4)].into_iter().enumerate() {
        let ev: Vec<&serde_json::Value> =
            sightings.iter().copied().filter(|e| e["sighting_id"] == distinct[k]).collect();
        let p = passing(range);
        check_sighting(&sc, &ev, &dets, &p, &frames, "gap");
        assert_eq!(
            ev.last().unwrap()["frames"]["sampled"].as_u64(),
            Some(sampled),
            "frames while open, the first miss included"
        );
    }

    // gap 10 s: one sighting, ended when whaled stops (the replay ends).
    let out = run(&sc, &frames, "10s", "one");
    let sightings: Vec<&serde_json::Value> =
        out.iter().filter(|e| e.get("sighting_id").is_some() && e.get("event").is_some()).collect();
    let dets: Vec<&serde_json::Value> = out.iter().filter(|e| e.get("image_ind").is_some()).collect();
    let mut p = passing(2..7);
    p.extend(passing(9..12));
    check_sighting(&sc, &sightings, &dets, &p, &frames, "shutdown");
    assert_eq!(sightings.last().unwrap()["frames"]["sampled"].as_u64(), Some(12));
}

/// A whaled process with its stdout collected.
struct Daemon {
    child: std::process::Child,
}

impl Daemon {
    fn start(cfg: &Path) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_whaled"))
            .args(["--log-level", "info", "run", "--config"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Daemon { child }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_sighting_survives_a_broker_outage_and_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let sc = scene(tmp.path());
    let cam = tmp.path().join("cam");
    std::fs::create_dir_all(&cam).unwrap();
    for (i, (p, _)) in sc.whales.iter().take(4).enumerate() {
        std::fs::copy(p, cam.join(format!("{i:03}.png"))).unwrap();
    }
    let port = free_port();
    let cfg = tmp.path().join("whaled.toml");
    std::fs::write(
        &cfg,
        format!(
            "device_id = \"boat\"\n[identification]\nmodel = \"{}\"\ngallery = \"{}\"\n\
             [[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"{}\"\nfps = 2\n\
             [sightings]\nupdate_interval = \"1ms\"\nidentify_interval = \"500ms\"\nidentify_quality = 0.0\nsnapshot = true\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\
             [mqtt.outbox]\ndir = \"{}\"\n",
            sc.embedder.display(),
            sc.gallery.display(),
            cam.display(),
            tmp.path().join("outbox").display()
        ),
    )
    .unwrap();
    let state = tmp.path().join("outbox/open-sightings.json");
    // The broker is down: the first run opens a sighting (looping whale frames) and is killed.
    let mut first = Daemon::start(&cfg);
    let t = Instant::now();
    while !state.is_file() {
        assert!(t.elapsed() < Duration::from_secs(120), "no open sighting recorded");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let _ = first.child.kill(); // SIGKILL: no chance to end the sighting
    let _ = first.child.wait();
    let recorded: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let crashed = recorded[0]["sighting_id"].as_str().unwrap().to_string();

    // The broker comes up; the second run ends the crashed sighting, starts its own, and stops on SIGTERM.
    let _broker = Broker::start_on(&tmp.path().join("broker"), port, "");
    let sub = Subscriber::start(port, "shore", "whaled/boat/+/sighting");
    let snaps = Subscriber::start(port, "shore-snapshots", "whaled/boat/+/sighting/+/snapshot");
    let second = Daemon::start(&cfg);
    sub.wait_for(Duration::from_secs(120), "the crashed sighting's end and a new one", |m| {
        let ev: Vec<serde_json::Value> = m.iter().map(|x| x.json()).collect();
        ev.iter().any(|e| e["sighting_id"] == crashed.as_str() && e["event"] == "end")
            && ev.iter().any(|e| e["sighting_id"] != crashed.as_str() && e["event"] == "new")
    });
    common::broker::unsafe_kill(second.child.id(), "TERM");
    let t = Instant::now();
    let mut second = second;
    while second.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "whaled did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut err = String::new();
    if let Some(e) = second.child.stderr.take() {
        BufReader::new(e).lines().map_while(Result::ok).for_each(|l| {
            err.push_str(&l);
            err.push('\n')
        });
    }
    assert!(err.contains("was open when whaled last stopped"), "{err}");
    let msgs = sub.wait_for(Duration::from_secs(30), "the second sighting's end", |m| {
        m.iter().map(|x| x.json()).filter(|e| e["event"] == "end").count() >= 2
    });
    let schema = {
        let text = std::fs::read_to_string(repo().join("schemas/sighting.schema.json")).unwrap();
        jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
    };
    // Fold as a shore consumer would: de-duplicate on event_id, group by sighting.
    let mut seen = HashSet::new();
    let mut by_sighting: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for m in &msgs {
        let e = m.json();
        if let Err(err) = schema.validate(&e) {
            panic!("{err}: {e}");
        }
        if seen.insert(e["event_id"].as_str().unwrap().to_string()) {
            by_sighting.entry(e["sighting_id"].as_str().unwrap().to_string()).or_default().push(e);
        }
    }
    assert_eq!(by_sighting.len(), 2, "{by_sighting:#?}");
    let old = &by_sighting[&crashed];
    let phases: Vec<&str> = old.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(phases.first(), Some(&"new"), "the events stored while the broker was down arrived: {phases:?}");
    assert_eq!(phases.last(), Some(&"end"));
    assert_eq!(phases.iter().filter(|p| **p == "end").count(), 1);
    assert_eq!(old.last().unwrap()["end_reason"], "restart");
    // An end's event id is derived from its sighting: sent again, it would be the same event.
    assert_eq!(old.last().unwrap()["event_id"].as_str(), Some(whaled::detection::end_event_id(&crashed).as_str()));
    let new = by_sighting.values().find(|v| v[0]["sighting_id"] != crashed.as_str()).unwrap();
    assert_eq!(new.first().unwrap()["event"], "new");
    assert_eq!(new.last().unwrap()["end_reason"], "shutdown");
    let new_id = new[0]["sighting_id"].as_str().unwrap();
    assert_eq!(new.last().unwrap()["event_id"].as_str(), Some(whaled::detection::end_event_id(new_id).as_str()));
    assert!(!state.exists(), "no sighting left open after a clean stop");
    // The ended sighting's best frame, as a JPEG on its own topic; its end says so.
    let end = new.last().unwrap();
    assert_eq!(end["best_frame"]["snapshot"], true, "{end}");
    let topic = format!("whaled/boat/bow/sighting/{}/snapshot", end["sighting_id"].as_str().unwrap());
    let got = snaps.wait_for(Duration::from_secs(30), "the snapshot", |m| m.iter().any(|x| x.topic == topic));
    let jpeg = &got.iter().find(|x| x.topic == topic).unwrap().payload;
    assert!(jpeg.starts_with(&[0xFF, 0xD8]) && image::load_from_memory(jpeg).is_ok(), "a JPEG");
}
