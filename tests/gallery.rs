//! Galleries end to end, through the `whaled` binary: build from labelled photos, identify against it,
//! enrol, remove, merge, refuse a gallery of another embedder, survive an enrolment cut short, and take
//! signed updates from shore over a real mosquitto (a good delta applied; corrupt, partial, unsigned,
//! foreign-signed, tampered and replayed ones refused with nothing changed; a signed rollback).
//!
//! The embedder is the shipped ImageNet Lite0 used as a gallery-only embedder (its 1000 logits as the
//! embedding, no head): real pretrained features, fast on tract, and an example of "any embedder".

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::{Broker, Msg, Subscriber};
use common::{repo, shared_data, whales_dev};
use sha2::{Digest, Sha256};

fn whaled(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whaled")).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "whaled failed: {}\nstdout: {o}\nstderr: {e}", out.status);
    o.into_owned()
}

/// An embedder manifest with no head (tests/common): the ONNX's output as the embedding.
fn embedder(dir: &Path, onnx: &str, name: &str) -> PathBuf {
    common::gallery_only_embedder(dir, onnx, name)
}

fn config(dir: &Path, embedder: &Path, gallery: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("whaled-{}.toml", embedder.parent().unwrap().file_name().unwrap().to_string_lossy()));
    std::fs::write(
        &path,
        format!(
            "device_id = \"boat\"\n[prefilter]\nthreshold = 0.0\n\
             [identification]\nmodel = \"{}\"\ngallery = \"{}\"\nnew_individual_below = 0.97\n{extra}",
            embedder.display(),
            gallery.display()
        ),
    )
    .unwrap();
    path
}

fn detections(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn list(gallery: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&whaled(&["gallery", "list", "--json", gallery.to_str().unwrap()]))).unwrap()
}

/// Whales-dev photos with their individual ids, as `DIR/<id>/<photo>`.
fn labelled(dir: &Path, photos: &[(PathBuf, String)]) -> PathBuf {
    let root = dir.join("catalogue");
    for (p, id) in photos {
        std::fs::create_dir_all(root.join(id)).unwrap();
        std::fs::copy(p, root.join(id).join(p.file_name().unwrap())).unwrap();
    }
    root
}

/// The first `n` whales-dev positives with distinct individuals: (photo, individual id).
fn individuals(n: usize, skip: usize) -> Vec<(PathBuf, String)> {
    let root = shared_data().join("whales-dev");
    let csv = std::fs::read_to_string(root.join("manifest.csv")).unwrap();
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for l in csv.lines().skip(1) {
        let c: Vec<&str> = l.split(',').collect();
        if c[1] == "cetacean" && !seen.contains(&c[2].to_string()) {
            seen.push(c[2].to_string());
            out.push((root.join(c[0]), c[2].to_string()));
        }
    }
    out.into_iter().skip(skip).take(n).collect()
}

#[test]
fn build_identify_enroll_remove_merge_and_wrong_embedder() {
    let tmp = tempfile::tempdir().unwrap();
    let lite0 = embedder(tmp.path(), "models/efficientnet-lite0/efficientnet_lite0_fp32.onnx", "lite0-embedder");
    let g = tmp.path().join("crew.wgal");
    let cfg = config(tmp.path(), &lite0, &g, "");
    let known = individuals(4, 0);
    let cat = labelled(tmp.path(), &known);

    ok(&whaled(&[
        "gallery",
        "build",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        g.to_str().unwrap(),
        cat.to_str().unwrap(),
    ]));
    let l = list(&g);
    assert_eq!(
        (l["version"].as_u64(), l["photos"].as_u64(), l["individuals"].as_array().unwrap().len()),
        (Some(1), Some(4), 4),
        "{l}"
    );
    let bound = l["embedder_sha256"].as_str().unwrap().to_string();
    let want_sha: String =
        Sha256::digest(std::fs::read(repo().join("models/efficientnet-lite0/efficientnet_lite0_fp32.onnx")).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
    assert_eq!(bound, want_sha, "bound to the embedder's ONNX file");

    // Each enrolled photo identifies as its individual, from the gallery, at cosine 1.
    let photos: Vec<String> = known.iter().map(|(p, _)| p.display().to_string()).collect();
    let mut args = vec!["identify", "--config", cfg.to_str().unwrap()];
    args.extend(photos.iter().map(String::as_str));
    let dets = detections(&ok(&whaled(&args)));
    assert_eq!(dets.len(), known.len(), "one detection per enrolled photo");
    for (d, (_, id)) in dets.iter().zip(&known) {
        assert_eq!(d["class_animal"].as_str(), Some(id.as_str()), "{d}");
        assert_eq!(d["identification"]["source"], "gallery", "{d}");
        assert!(d["identification"]["cosine"].as_f64().unwrap() > 0.9999, "{d}");
        assert_eq!(d["identification"]["new_individual"], false, "{d}");
        assert_eq!(d["gallery_version"], 1, "{d}");
        assert_eq!(d["candidates"].as_array().unwrap().len(), 3, "4 individuals: ranks 2..4");
        let p: Vec<f64> = std::iter::once(d["probability"].as_f64().unwrap())
            .chain(d["candidates"].as_array().unwrap().iter().map(|c| c["probability"].as_f64().unwrap()))
            .collect();
        assert!(p.windows(2).all(|w| w[0] >= w[1]) && (p.iter().sum::<f64>() - 1.0).abs() < 5e-4, "{p:?}");
    }

    // A scene nobody enrolled: new_individual, with the nearest known individuals as candidates.
    let scene = whales_dev("non_cetacean", 1).remove(0);
    let scene_s = scene.display().to_string();
    let d = &detections(&ok(&whaled(&["identify", "--config", cfg.to_str().unwrap(), &scene_s])))[0];
    assert_eq!(
        (d["class_animal"].as_str(), d["identification"]["new_individual"].as_bool()),
        (Some("new_individual"), Some(true)),
        "{d}"
    );
    assert_eq!(d["candidates"].as_array().unwrap().len(), 4, "{d}");

    // Enrol it on the device: the next identification finds it.
    let out = ok(&whaled(&[
        "gallery",
        "enroll",
        "--config",
        cfg.to_str().unwrap(),
        "--id",
        "crew-001",
        "--species",
        "killer_whale",
        "--added-by",
        "deckhand",
        &scene_s,
    ]));
    assert!(out.contains("version 2, 5 photos of 5 individuals"), "{out}");
    let d = &detections(&ok(&whaled(&["identify", "--config", cfg.to_str().unwrap(), &scene_s])))[0];
    assert_eq!((d["class_animal"].as_str(), d["id_animal"].as_str()), (Some("crew-001"), Some("killer_whale")), "{d}");
    assert_eq!(d["gallery_version"], 2);

    // Remove it: gone again.
    ok(&whaled(&["gallery", "remove", g.to_str().unwrap(), "--id", "crew-001"]));
    assert_eq!(list(&g)["version"], 3);
    let d = &detections(&ok(&whaled(&["identify", "--config", cfg.to_str().unwrap(), &scene_s])))[0];
    assert_eq!(d["class_animal"], "new_individual", "{d}");
    let e = whaled(&["gallery", "remove", g.to_str().unwrap(), "--id", "crew-001"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("no individual \"crew-001\""));

    // Merge a second crew's gallery (two new individuals); merging again adds nothing.
    let other = tmp.path().join("other.wgal");
    let cat2 = labelled(&tmp.path().join("2"), &individuals(2, 4));
    ok(&whaled(&[
        "gallery",
        "build",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
        cat2.to_str().unwrap(),
    ]));
    assert!(ok(&whaled(&["gallery", "merge", g.to_str().unwrap(), other.to_str().unwrap()])).contains("added 2 photos"));
    assert!(ok(&whaled(&["gallery", "merge", g.to_str().unwrap(), other.to_str().unwrap()])).contains("added 0 photos"));
    let l = list(&g);
    assert_eq!((l["version"].as_u64(), l["photos"].as_u64()), (Some(5), Some(6)), "{l}");

    // Another embedder (same output size, other weights) refuses this gallery, at start-up and on enrol.
    let b0 = embedder(tmp.path(), "models/generated/efficientnet-b0-random/efficientnet_b0_224.onnx", "b0-embedder");
    let cfg_b0 = config(tmp.path(), &b0, &g, "");
    for out in [
        whaled(&["identify", "--config", cfg_b0.to_str().unwrap(), &scene_s]),
        whaled(&["gallery", "enroll", "--config", cfg_b0.to_str().unwrap(), "--id", "x", &scene_s]),
        whaled(&["check-config", cfg_b0.to_str().unwrap()]),
    ] {
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{e}");
        assert!(
            e.contains(&format!("made by the embedder with SHA-256 {bound}")) && e.contains("not comparable"),
            "{e}"
        );
    }
    assert_eq!(list(&g)["version"], 5, "nothing changed");
    let e = whaled(&["gallery", "merge", g.to_str().unwrap(), &tmp.path().join("missing.wgal").display().to_string()]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("missing.wgal"));
}

/// An enrolment cut short, two ways: power lost mid-write (the file ends inside the new rows), and the
/// process killed at random points. The gallery is always the old one or the new one, never between.
#[test]
fn an_enrolment_cut_short_leaves_the_old_gallery_or_the_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let lite0 = embedder(tmp.path(), "models/efficientnet-lite0/efficientnet_lite0_fp32.onnx", "lite0-embedder");
    let g = tmp.path().join("crew.wgal");
    let cfg = config(tmp.path(), &lite0, &g, "");
    let cat = labelled(tmp.path(), &individuals(2, 0));
    ok(&whaled(&[
        "gallery",
        "build",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        g.to_str().unwrap(),
        cat.to_str().unwrap(),
    ]));
    let before = std::fs::read(&g).unwrap();
    let photos: Vec<String> = whales_dev("cetacean", 3).iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["gallery", "enroll", "--config", cfg.to_str().unwrap(), "--id", "crew-002"];
    args.extend(photos.iter().map(String::as_str));
    ok(&whaled(&args));
    let after = std::fs::read(&g).unwrap();
    assert!(after.starts_with(&before), "an enrolment appends");

    // Power cut: the file ends at arbitrary points inside the new transaction. `gallery list` (read-only)
    // shows the old gallery and writes nothing: no cut-off, no `.lock`, no `.torn-*`, the same bytes.
    let listing = || {
        let mut v: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        v.sort();
        v
    };
    let _ = std::fs::remove_file(tmp.path().join("crew.wgal.lock")); // left by build and enroll
    for cut in [before.len() + 1, before.len() + 100, (before.len() + after.len()) / 2, after.len() - 1] {
        std::fs::write(&g, &after[..cut]).unwrap();
        let names = listing();
        let out = whaled(&["gallery", "list", "--json", g.to_str().unwrap()]);
        let l: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((l["version"].as_u64(), l["photos"].as_u64()), (Some(1), Some(2)), "cut at {cut}: {l}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("WARN") && stderr.contains("ignoring"), "a WARN says so: {stderr}");
        assert_eq!(std::fs::read(&g).unwrap(), &after[..cut], "cut at {cut}: a read-only command changed the file");
        assert_eq!(listing(), names, "cut at {cut}: a read-only command created files");
    }
    // `identify` and `check-config` read the configured gallery the same way: they see the old gallery
    // and leave the file, its lock and its torn tail alone (only the daemon and the writers cut it).
    let cut = (before.len() + after.len()) / 2;
    std::fs::write(&g, &after[..cut]).unwrap();
    let names = listing();
    let out = whaled(&["identify", "--no-prefilter", "--config", cfg.to_str().unwrap(), &photos[0]]);
    let stdout = ok(&out);
    assert_eq!(detections(&stdout).len(), 1, "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignoring"), "identify WARNs about the torn tail");
    ok(&whaled(&["check-config", cfg.to_str().unwrap()]));
    assert_eq!(std::fs::read(&g).unwrap(), &after[..cut], "identify or check-config changed the gallery");
    assert_eq!(listing(), names, "identify or check-config created files");
    // And a read-only identifier refuses to install a gallery, changing nothing.
    let config = whaled::config::Config::load(&cfg).unwrap();
    let reader = whaled::identify::Identifier::from_config(&config, whaled::identify::GalleryAccess::ReadOnly).unwrap();
    let current = reader.gallery().unwrap();
    assert_eq!(current.len(), 2, "the old gallery, without the torn enrolment");
    let e = reader.replace_gallery((*current).clone()).unwrap_err().to_string();
    assert!(e.contains("opened read-only"), "{e}");
    assert_eq!(std::fs::read(&g).unwrap(), &after[..cut]);
    assert_eq!(listing(), names);
    // A writer (an enrolment) cuts the torn tail off, keeps it aside, and appends after the old gallery.
    let one = photos[0].clone();
    let out = whaled(&["gallery", "enroll", "--config", cfg.to_str().unwrap(), "--id", "crew-003", &one]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cut off"), "a WARN says so");
    assert!(std::fs::read(&g).unwrap().starts_with(&before), "the torn tail is gone, the old gallery kept");
    assert!(listing().iter().any(|n| n.starts_with("crew.wgal.torn-")), "{:?}", listing());
    let l = list(&g);
    assert_eq!((l["version"].as_u64(), l["photos"].as_u64()), (Some(2), Some(3)), "{l}");

    // SIGKILL at random points of an enrolment of 12 photos.
    let many: Vec<String> = whales_dev("cetacean", 12).iter().map(|p| p.display().to_string()).collect();
    for (i, delay_ms) in [50u64, 400, 900, 1500, 2500].into_iter().enumerate() {
        let l = list(&g);
        let (v0, n0) = (l["version"].as_u64().unwrap(), l["photos"].as_u64().unwrap());
        let id = format!("crew-k{i}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_whaled"))
            .args(["gallery", "enroll", "--config", cfg.to_str().unwrap(), "--id", &id])
            .args(&many)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let l = list(&g);
        let (v, n) = (l["version"].as_u64().unwrap(), l["photos"].as_u64().unwrap());
        assert!((v, n) == (v0, n0) || (v, n) == (v0 + 1, n0 + 12), "killed after {delay_ms} ms: {v0}/{n0} -> {v}/{n}");
        eprintln!("killed after {delay_ms} ms: version {v0} -> {v}");
    }
}

/// A running daemon, its stdout lines kept.
struct Daemon {
    child: std::process::Child,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_whaled"))
            .args(["--log-level", "info", "run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let o = stdout.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            BufReader::new(out).lines().map_while(Result::ok).for_each(|l| o.lock().unwrap().push(l))
        });
        Daemon { child, stdout }
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        self.stdout.lock().unwrap().iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn schema(name: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(repo().join("schemas").join(name)).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

/// `whaled gallery sign` of `file` with `key`, plus `extra` arguments: the whole MQTT message.
fn signed(dir: &Path, key: &Path, file: &Path, extra: &[&str]) -> Vec<u8> {
    let out = dir.join("signed.msg");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["gallery", "sign", "--key", key.to_str().unwrap(), file.to_str().unwrap()];
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    ok(&whaled(&args));
    std::fs::read(&out).unwrap()
}

/// A message's header (as JSON) and body.
fn split(message: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let nl = message.iter().position(|&b| b == b'\n').unwrap();
    (serde_json::from_slice(&message[..nl]).unwrap(), message[nl + 1..].to_vec())
}

fn join(header: &serde_json::Value, body: &[u8]) -> Vec<u8> {
    let mut m = serde_json::to_vec(header).unwrap();
    m.push(b'\n');
    m.extend_from_slice(body);
    m
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh key pair through `whaled gallery keygen`: the private key's path and the public key (hex).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.key"));
    let out = ok(&whaled(&["gallery", "keygen", "--out", path.to_str().unwrap(), "--name", name]));
    let public = out.lines().find_map(|l| l.split('"').nth(3).filter(|k| k.len() == 64)).unwrap().to_string();
    (path, public)
}

#[test]
fn shore_updates_apply_atomically_and_bad_ones_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lite0 = embedder(tmp.path(), "models/efficientnet-lite0/efficientnet_lite0_fp32.onnx", "lite0-embedder");
    let g = tmp.path().join("crew.wgal");
    let known = individuals(3, 0);
    let scene = whales_dev("non_cetacean", 1).remove(0);
    // The camera shows one scene, over and over.
    let cam = tmp.path().join("cam");
    std::fs::create_dir_all(&cam).unwrap();
    std::fs::copy(&scene, cam.join("scene.jpg")).unwrap();
    let broker = Broker::start(&tmp.path().join("broker"), "");
    // Shore's key is pinned on the boat; another key (a stranger's) is not.
    let (key, public) = keygen(tmp.path(), "shore-lab");
    let (stranger, _) = keygen(tmp.path(), "stranger");
    let extra = format!(
        "[[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"{}\"\nfps = 4\n\
         [sightings]\npublish = \"detections\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {}\nstats_interval = \"1s\"\nmax_packet_size = 4194304\n\
         [mqtt.gallery_keys]\nshore-lab = \"{public}\"\n[mqtt.outbox]\ndir = \"{}\"\n",
        cam.display(),
        broker.port,
        tmp.path().join("outbox").display()
    );
    let cfg = config(tmp.path(), &lite0, &g, &extra);
    let cat = labelled(tmp.path(), &known);
    ok(&whaled(&[
        "gallery",
        "build",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        g.to_str().unwrap(),
        cat.to_str().unwrap(),
    ]));

    // Shore side: the same gallery plus the scene enrolled as crew-009 (version 2), and its delta.
    let shore = tmp.path().join("shore.wgal");
    std::fs::copy(&g, &shore).unwrap();
    ok(&whaled(&[
        "gallery",
        "enroll",
        "--config",
        cfg.to_str().unwrap(),
        "--gallery",
        shore.to_str().unwrap(),
        "--id",
        "crew-009",
        &scene.display().to_string(),
    ]));
    let delta_path = tmp.path().join("v2.delta");
    ok(&whaled(&[
        "gallery",
        "delta",
        g.to_str().unwrap(),
        shore.to_str().unwrap(),
        "--out",
        delta_path.to_str().unwrap(),
    ]));
    let delta = std::fs::read(&delta_path).unwrap();
    let full_v2_path = tmp.path().join("full-v2.wgal");
    std::fs::copy(&shore, &full_v2_path).unwrap();
    let good_delta = signed(tmp.path(), &key, &delta_path, &["--request-id", "r10"]);
    let (header, body) = split(&good_delta);
    assert_eq!((header["kind"].as_str(), header["version"].as_u64()), (Some("delta"), Some(2)), "{header}");
    assert_eq!((header["sha256"].as_str().unwrap(), &body[..]), (sha256_hex(&delta).as_str(), &delta[..]));
    // The signing tool refuses a damaged file (it parses what it signs).
    std::fs::write(tmp.path().join("cut.delta"), &delta[..delta.len() - 10]).unwrap();
    let out = whaled(&[
        "gallery",
        "sign",
        "--key",
        key.to_str().unwrap(),
        tmp.path().join("cut.delta").to_str().unwrap(),
        "--out",
        tmp.path().join("cut.msg").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!tmp.path().join("cut.msg").exists());

    let sub = Subscriber::start(broker.port, "shore", "whaled/boat/#");
    let d = Daemon::start(&cfg);
    sub.wait_for(Duration::from_secs(60), "online", |m| {
        m.iter().any(|m| m.topic == "whaled/boat/status" && m.text() == "online")
    });
    let on_disk = std::fs::read(&g).unwrap();
    let replies = |m: &[Msg]| {
        m.iter().filter(|x| x.topic == "whaled/boat/cmd/gallery_update/reply").map(Msg::json).collect::<Vec<_>>()
    };
    let sent = std::cell::Cell::new(0);
    let send = |payload: Vec<u8>| {
        sub.publish("whaled/boat/cmd/gallery_update", &payload, false);
        sent.set(sent.get() + 1);
        let n = sent.get();
        let m = sub.wait_for(Duration::from_secs(30), "gallery_update reply", |m| replies(m).len() >= n);
        replies(&m)[n - 1].clone()
    };

    // Each refused, the file byte-identical:
    // - corrupt in transit (one byte of the body flipped) and partial (cut short): signed, but the bytes
    //   are not the ones signed;
    // - unsigned; signed by a key the boat does not pin; tampered after signing (the header's version
    //   changed; the body changed and its SHA-256 recomputed);
    // - no header at all.
    let mut flipped = body.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let unsigned = {
        let mut h = header.clone();
        h.as_object_mut().unwrap().remove("signature");
        join(&h, &body)
    };
    let mut lying = header.clone();
    lying["version"] = 7.into();
    let mut rehashed = header.clone();
    rehashed["sha256"] = sha256_hex(&flipped).into();
    let bad = [
        (join(&header, &flipped), "partial or corrupted transfer"),
        (join(&header, &body[..body.len() - 10]), "partial or corrupted transfer"),
        (unsigned, "unsigned"),
        (signed(tmp.path(), &stranger, &delta_path, &[]), "does not verify"),
        (join(&lying, &body), "does not verify"),
        (join(&rehashed, &flipped), "does not verify"),
        (delta.clone(), "header"),
    ];
    for (i, (payload, why)) in bad.into_iter().enumerate() {
        let r = send(payload);
        assert_eq!((r["ok"].as_bool(), r["gallery_version"].as_u64()), (Some(false), Some(1)), "{r}");
        assert!(r["message"].as_str().unwrap().contains(why), "{why}: {r}");
        assert_eq!(std::fs::read(&g).unwrap(), on_disk, "refused update {i} changed the file");
    }
    // A delta damaged on shore and signed anyway (not through `whaled gallery sign`, which refuses it):
    // the signature holds, the gallery code refuses it.
    let cut = &delta[..delta.len() - 10];
    let statement = whaled::signing::Statement {
        kind: "delta".into(),
        version: 2,
        sha256: sha256_hex(cut),
        force: false,
        replaces: None,
    };
    let sig = whaled::signing::SigningKey::load(&key).unwrap().sign(&statement);
    let h = serde_json::json!({"kind": "delta", "version": 2, "sha256": sha256_hex(cut), "signature": sig});
    let r = send(join(&h, cut));
    assert!(r["ok"] == false && r["message"].as_str().unwrap().contains("incomplete"), "{r}");
    assert_eq!(std::fs::read(&g).unwrap(), on_disk);

    // The good delta: applied, replied with the new version, written to disk, and used at once.
    let r = send(good_delta.clone());
    assert_eq!(
        (r["ok"].as_bool(), r["gallery_version"].as_u64(), r["request_id"].as_str()),
        (Some(true), Some(2), Some("r10")),
        "{r}"
    );
    assert!(r["message"].as_str().unwrap().contains("shore-lab"), "the reply names the signer: {r}");
    assert_eq!(list(&g)["version"], 2);
    assert_eq!(list(&g)["photos"], 4);
    let applied_at = d.lines().len();
    let t = Instant::now();
    let found = loop {
        let lines = d.lines();
        if let Some(x) = lines[applied_at..].iter().find(|x| x["gallery_version"] == 2) {
            break x.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no detection with gallery version 2");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(found["class_animal"], "crew-009", "{found}");
    let m = sub.wait_for(Duration::from_secs(10), "stats with gallery version 2", |m| {
        m.iter().any(|x| x.topic == "whaled/boat/stats" && x.json()["gallery"]["version"] == 2)
    });

    // The same signed delta replayed (its base is gone) and a whole gallery from another embedder: refused.
    let r = send(good_delta.clone());
    assert!(r["ok"] == false && r["message"].as_str().unwrap().contains("applies to gallery version 1"), "{r}");
    let foreign = {
        let mut f = std::fs::read(&shore).unwrap();
        // Same gallery bound to another embedder: rewrite the header's SHA-256 (and its CRC).
        let sha_at = 8 + 8 + 1 + 4;
        f[sha_at..sha_at + 64].copy_from_slice("ab".repeat(32).as_bytes());
        let payload_len = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
        let crc = crc32(&f[16..16 + payload_len]);
        f[12..16].copy_from_slice(&crc.to_le_bytes());
        f
    };
    let foreign_path = tmp.path().join("foreign.wgal");
    std::fs::write(&foreign_path, &foreign).unwrap();
    let r = send(signed(tmp.path(), &key, &foreign_path, &[]));
    assert!(r["ok"] == false && r["message"].as_str().unwrap().contains("not comparable"), "{r}");
    // A whole gallery of the right embedder at version 3 (crew-009 removed on shore): applied.
    ok(&whaled(&["gallery", "remove", shore.to_str().unwrap(), "--id", "crew-009"]));
    let v3 = std::fs::read(&shore).unwrap();
    let r = send(signed(tmp.path(), &key, &shore, &[]));
    assert_eq!((r["ok"].as_bool(), r["gallery_version"].as_u64()), (Some(true), Some(3)), "{r}");
    assert_eq!(std::fs::read(&g).unwrap(), v3, "the file is the gallery sent");
    // An older signed gallery (version 2) replayed: refused. The same version again: refused unless a
    // signed force names the version it replaces.
    let r = send(signed(tmp.path(), &key, &full_v2_path, &[]));
    assert!(r["ok"] == false && r["message"].as_str().unwrap().contains("not above"), "{r}");
    let r = send(signed(tmp.path(), &key, &shore, &[]));
    assert!(r["ok"] == false && r["message"].as_str().unwrap().contains("not above"), "{r}");
    let unsigned_force = {
        let (mut h, b) = split(&signed(tmp.path(), &key, &full_v2_path, &[]));
        h["force"] = true.into();
        h["replaces"] = 3.into();
        join(&h, &b)
    };
    let r = send(unsigned_force);
    assert!(r["ok"] == false && r["message"].as_str().unwrap().contains("does not verify"), "{r}");
    assert_eq!(std::fs::read(&g).unwrap(), v3);
    // A signed rollback to version 2's rows: installed as version 4 (versions only rise on the boat).
    // Replayed, it names version 3, which is gone; the bad version 3 it undid, replayed, is not above 4.
    let v3_message = signed(tmp.path(), &key, &shore, &[]);
    let rollback = signed(tmp.path(), &key, &full_v2_path, &["--force", "--replaces", "3"]);
    assert_eq!(split(&rollback).0["version"], 4, "the rollback's signed version is the one after 3");
    let r = send(rollback.clone());
    assert_eq!((r["ok"].as_bool(), r["gallery_version"].as_u64()), (Some(true), Some(4)), "{r}");
    let v2_rows = list(&full_v2_path);
    let now_rows = list(&g);
    assert_eq!((now_rows["version"].as_u64(), now_rows["photos"].as_u64()), (Some(4), Some(4)));
    assert_eq!(now_rows["individuals"], v2_rows["individuals"], "version 2's individuals are back");
    let now = std::fs::read(&g).unwrap();
    for (message, why) in [(rollback, "replaces version 3"), (v3_message, "not above")] {
        let r = send(message);
        assert!(r["ok"] == false && r["message"].as_str().unwrap().contains(why), "{why}: {r}");
        assert_eq!(std::fs::read(&g).unwrap(), now, "{why}: a replay changed the gallery");
    }
    // A forced delta, or a force that names no version it replaces, is refused by the signing tool.
    for extra in [&["--force"][..], &["--force", "--replaces", "18446744073709551615"][..]] {
        let mut args = vec!["gallery", "sign", "--key", key.to_str().unwrap(), delta_path.to_str().unwrap()];
        let out_path = tmp.path().join("refused.msg");
        args.extend_from_slice(&["--out", out_path.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let out = whaled(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--force"), "{extra:?}");
    }

    let all = sub.snapshot();
    let (det, stats, reply) =
        (schema("detection.schema.json"), schema("stats.schema.json"), schema("command-reply.schema.json"));
    for x in all.iter().chain(m.iter()) {
        let v = if x.topic.ends_with("/detection") {
            &det
        } else if x.topic.ends_with("/stats") {
            &stats
        } else if x.topic.ends_with("/reply") {
            &reply
        } else {
            continue;
        };
        if let Err(e) = v.validate(&x.json()) {
            panic!("{}: {e}\n{}", x.topic, x.text());
        }
    }
    drop(d);
}

/// CRC-32 (zlib polynomial), bit by bit: independent of the crate whaled uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A CSV catalogue (paths relative to the CSV, species given), and its errors.
#[test]
fn build_from_a_csv_catalogue() {
    let tmp = tempfile::tempdir().unwrap();
    let lite0 = embedder(tmp.path(), "models/efficientnet-lite0/efficientnet_lite0_fp32.onnx", "lite0-embedder");
    let g = tmp.path().join("csv.wgal");
    let cfg = config(tmp.path(), &lite0, &g, "");
    let photos = individuals(3, 0);
    let dir = tmp.path().join("survey");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut csv = String::from("path,individual_id,species\n");
    for (i, (p, id)) in photos.iter().enumerate() {
        std::fs::copy(p, dir.join(format!("img/{i}.jpg"))).unwrap();
        csv.push_str(&format!("img/{i}.jpg,{id},\"humpback_whale\"\n"));
    }
    std::fs::write(dir.join("catalogue.csv"), &csv).unwrap();
    let csv_path = dir.join("catalogue.csv");
    ok(&whaled(&[
        "gallery",
        "build",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        g.to_str().unwrap(),
        csv_path.to_str().unwrap(),
    ]));
    let l = list(&g);
    let ids: Vec<&str> =
        l["individuals"].as_array().unwrap().iter().map(|i| i["individual_id"].as_str().unwrap()).collect();
    assert_eq!(ids, photos.iter().map(|p| p.1.as_str()).collect::<Vec<_>>());
    assert!(l["individuals"].as_array().unwrap().iter().all(|i| i["species"] == "humpback_whale"), "{l}");

    // A CSV without the columns, and one naming a photo that is not there (built from the rest, exit 1).
    std::fs::write(dir.join("bad.csv"), "file,id\nimg/0.jpg,x\n").unwrap();
    let out = whaled(&[
        "gallery",
        "build",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        tmp.path().join("b.wgal").to_str().unwrap(),
        dir.join("bad.csv").to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && e.contains("needs a path column"), "{e}");
    csv.push_str("img/missing.jpg,zz,orca\n");
    std::fs::write(dir.join("gap.csv"), &csv).unwrap();
    let out = whaled(&[
        "gallery",
        "build",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        tmp.path().join("c.wgal").to_str().unwrap(),
        dir.join("gap.csv").to_str().unwrap(),
    ]);
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{o}{e}");
    assert!(
        e.contains("missing.jpg") && o.contains("3 photos of 3 individuals (1 unreadable photos skipped)"),
        "{o}{e}"
    );
}
