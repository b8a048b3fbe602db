//! The `whaled` binary end to end: check-config, identify (including corrupt input and the upstream
//! sentinels), identification with the generated upstream-topology model, eval, and the onnxruntime
//! backend selected from a config file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn whaled(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whaled"))
        .args(args)
        .env_remove("WHALED_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .expect("run whaled")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("stdout line is JSON")).collect()
}

/// Photos for identify: two JPEGs, a PNG, a corrupt file and a truncated JPEG.
fn photo_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a_sea.jpg", &jpeg(&frame(1, 640, 480), 90));
    write(dir.path(), "b_sea.jpg", &jpeg(&frame(2, 320, 240), 90));
    let mut png = Vec::new();
    frame(3, 200, 100).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    write(dir.path(), "c_sea.png", &png);
    write(dir.path(), "d_corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg");
    let full = jpeg(&frame(4, 640, 480), 90);
    write(dir.path(), "e_truncated.jpg", &full[..full.len() / 2]);
    dir
}

fn config(dir: &Path, body: &str) -> PathBuf {
    write(dir, "whaled.toml", body.as_bytes())
}

const UPSTREAM_FIELDS: &[&str] = &[
    "image_ind",
    "bbox",
    "class_animal",
    "id_animal",
    "probability",
    "mask",
    "is_cetacean",
    "cetacean_score",
    "rejected",
    "rejection_reason",
    "model_version",
    "candidates",
];

#[test]
fn check_config_accepts_the_example_and_names_errors() {
    let ok = whaled(&["check-config", repo().join("config/whaled.toml").to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("prefilter: marine-gate-v2"));

    let dir = tempfile::tempdir().unwrap();
    let bad = config(
        dir.path(),
        "[inference]\nbackend = \"tract\"\n\n[prefilter]\nmodel = \"efficientnet-lite0\"\nthreshhold = 0.3\n",
    );
    let out = whaled(&["check-config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("whaled.toml") && e.contains("line 6") && e.contains("unknown field `threshhold`"), "{e}");

    let missing = whaled(&["check-config", "/nonexistent/whaled.toml"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("cannot read config file /nonexistent/whaled.toml"), "{}", stderr(&missing));
}

#[test]
fn identify_reports_every_image_and_survives_corrupt_ones() {
    let photos = photo_dir();
    let out = whaled(&["identify", photos.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let recs = json_lines(&out);
    let names: Vec<&str> = recs.iter().map(|r| r["image_ind"].as_str().unwrap()).collect();
    assert_eq!(names, ["a_sea.jpg", "b_sea.jpg", "c_sea.png", "d_corrupt.jpg", "e_truncated.jpg"]);
    for r in &recs {
        for f in UPSTREAM_FIELDS {
            assert!(r.get(*f).is_some(), "missing upstream field {f} in {r}");
        }
        for f in ["event_id", "device_id", "source", "captured_at", "timings"] {
            assert!(r.get(f).is_some(), "missing field {f} in {r}");
        }
        assert!(r["captured_at"].as_str().unwrap().ends_with('Z'));
        humantime::parse_rfc3339(r["captured_at"].as_str().unwrap()).expect("captured_at is RFC 3339");
    }
    assert_eq!(recs[0]["bbox"], serde_json::json!([0, 0, 640, 480]));
    assert_eq!(recs[2]["bbox"], serde_json::json!([0, 0, 200, 100]));
    for r in &recs[3..] {
        assert_eq!(r["rejection_reason"], "corrupted_image", "{r}");
        assert_eq!(r["rejected"], true);
        assert_eq!(r["class_animal"], "");
        assert_eq!(r["id_animal"], "unknown");
    }
    assert!(recs[4]["error"].as_str().unwrap().contains("truncated JPEG"), "{}", recs[4]);
    // No identification model: a frame that passes is cetacean_unidentified, one that fails is unknown.
    for r in &recs[..3] {
        let passed = r["is_cetacean"].as_bool().unwrap();
        assert_eq!(r["id_animal"], if passed { "cetacean_unidentified" } else { "unknown" }, "{r}");
        assert_eq!(r["rejection_reason"], if passed { Value::Null } else { "not_a_marine_mammal".into() });
        assert_eq!(r["model_version"], "marine-gate-v2");
        let score = r["prefilter"]["score"].as_f64().unwrap();
        assert_eq!(r["cetacean_score"].as_f64().unwrap(), (score * 1e4).round() / 1e4);
    }
    let ids: std::collections::HashSet<&str> = recs.iter().map(|r| r["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), recs.len(), "event ids must be unique");
}

#[test]
fn identify_missing_path_is_an_error() {
    let out = whaled(&["identify", "/nonexistent/photos"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/photos"), "{}", stderr(&out));
}

/// On tract, a model with an int8 variant that runs fp32 says at start-up when this CPU would run the
/// int8 file on whaled's integer kernels (AVX-512 VNNI), and says nothing where it would not or when
/// int8 is already chosen. The shipped gate has an int8 variant.
#[test]
fn start_up_names_the_int8_variant_where_the_cpu_runs_it_on_integer_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let photo = write(dir.path(), "sea.jpg", &jpeg(&frame(1, 320, 240), 90));
    let hint = "this CPU has AVX-512 VNNI, where the model's int8 variant runs on whaled's integer kernels";
    let vnni = whaled::backend::tract::int8_kernels();
    let out = whaled(&["identify", photo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out).contains(hint), vnni, "VNNI {vnni}: {}", stderr(&out));
    let cfg = config(dir.path(), "[prefilter]\nvariant = \"int8\"\n");
    let out = whaled(&["identify", "--config", cfg.to_str().unwrap(), photo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("variant int8"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(hint), "{}", stderr(&out));
}

/// The generated upstream-topology model: every frame passes (threshold 0), identification ranks the
/// 13,837 active slots, the top-1 and 4 candidates carry 12-hex ids and species from species_map.csv.
#[test]
fn identify_with_the_upstream_identification_network() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "whale.jpg", &jpeg(&frame(5, 800, 600), 90));
    let cfg = config(dir.path(), &format!(
        "device_id = \"test-boat\"\n[prefilter]\nmodel = \"{}\"\nthreshold = 0.0\n[identification]\nmodel = \"{}\"\nmin_confidence = 0.0\n",
        b0_manifest().display(), b4_manifest().display()));
    let out = whaled(&["identify", "--config", cfg.to_str().unwrap(), dir.path().join("whale.jpg").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = &json_lines(&out)[0];
    assert_eq!(r["device_id"], "test-boat");
    assert_eq!(r["model_version"], "effb4-arcface-random");
    assert_eq!(r["is_cetacean"], true);
    assert_eq!(r["rejected"], false);
    let id = r["class_animal"].as_str().unwrap();
    assert!(id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{r}");
    let species_map = std::fs::read_to_string(generated().join("effb4-arcface-random/species_map.csv")).unwrap();
    assert!(species_map.contains(&format!("{id},{}\n", r["id_animal"].as_str().unwrap())), "{r}");
    let cands = r["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 4, "top-5 = top-1 + 4 candidates");
    let mut last = r["probability"].as_f64().unwrap();
    for c in cands {
        let p = c["probability"].as_f64().unwrap();
        assert!(p <= last, "candidates sorted by probability: {r}");
        assert_eq!(p, (p * 1e4).round() / 1e4, "4 dp");
        last = p;
    }
    assert!(r["timings"]["identification_ms"].as_f64().unwrap() > 0.0);

    // The same frame with min_confidence 1: low_confidence, candidates still reported.
    let cfg =
        config(
            dir.path(),
            &format!(
        "[prefilter]\nmodel = \"{}\"\nthreshold = 0.0\n[identification]\nmodel = \"{}\"\nmin_confidence = 1.0\n",
        b0_manifest().display(), b4_manifest().display()),
        );
    let out = whaled(&["identify", "--config", cfg.to_str().unwrap(), dir.path().join("whale.jpg").to_str().unwrap()]);
    let r = &json_lines(&out)[0];
    assert_eq!(r["rejected"], true);
    assert_eq!(r["rejection_reason"], "low_confidence");
    assert_eq!(r["class_animal"].as_str().unwrap(), id);
    assert_eq!(r["candidates"].as_array().unwrap().len(), 4);

    // Threshold 1: the pre-filter rejects, identification does not run.
    let cfg = config(
        dir.path(),
        &format!(
            "[prefilter]\nmodel = \"{}\"\nthreshold = 1.0\n[identification]\nmodel = \"{}\"\n",
            b0_manifest().display(),
            b4_manifest().display()
        ),
    );
    let out = whaled(&["identify", "--config", cfg.to_str().unwrap(), dir.path().join("whale.jpg").to_str().unwrap()]);
    let r = &json_lines(&out)[0];
    assert_eq!((r["class_animal"].as_str(), r["id_animal"].as_str()), (Some(""), Some("unknown")));
    assert_eq!(r["rejection_reason"], "not_a_marine_mammal");
    assert_eq!(r["identification_ms"], Value::Null);
    assert_eq!(r["timings"]["identification_ms"].as_f64(), Some(0.0));
}

/// The onnxruntime backend chosen in a config file gives the same scores as tract (both fp32), and
/// without a `variant` picks the manifest's preference for it (int8).
#[cfg(feature = "onnxruntime")]
#[test]
fn onnxruntime_backend_from_config_matches_tract() {
    let photos = photo_dir();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &format!(
        "[inference]\nbackend = \"onnxruntime\"\n[inference.onnxruntime]\nlibrary = \"{}\"\nexecution_providers = [\"tensorrt\", \"cuda\", \"cpu\"]\n[prefilter]\nmodel = \"marine-gate-v2\"\nvariant = \"fp32\"\n",
        ort_library().display()));
    let ort = whaled(&["identify", "--config", cfg.to_str().unwrap(), photos.path().to_str().unwrap()]);
    assert!(ort.status.success(), "{}", stderr(&ort));
    // The CPU-only wheel has neither TensorRT nor CUDA: each is skipped with a WARN naming it.
    let log = stderr(&ort);
    assert!(log.contains("WARN") && log.contains("`tensorrt`") && log.contains("`cuda`"), "{log}");
    let tract = whaled(&["identify", photos.path().to_str().unwrap()]);
    for (a, b) in json_lines(&ort).iter().zip(json_lines(&tract).iter()) {
        let (sa, sb) = (a["prefilter"]["score"].as_f64(), b["prefilter"]["score"].as_f64());
        match (sa, sb) {
            (Some(x), Some(y)) => assert!((x - y).abs() < 1e-4, "{x} vs {y}"),
            (None, None) => assert_eq!(a["rejection_reason"], "corrupted_image"),
            _ => panic!("backends disagree on which images decode"),
        }
    }
    let cfg = config(
        dir.path(),
        &format!(
            "[inference]\nbackend = \"onnxruntime\"\n[inference.onnxruntime]\nlibrary = \"{}\"\n[prefilter]\nmodel = \"efficientnet-lite0\"\n",
            ort_library().display()
        ),
    );
    // The zero-shot model's manifest prefers its int8 file on onnxruntime.
    let out = whaled(&["identify", "--config", cfg.to_str().unwrap(), photos.path().to_str().unwrap()]);
    assert!(stderr(&out).contains("variant int8"), "{}", stderr(&out));
}

#[test]
fn eval_reports_metrics_as_json_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("relpath,label,individual_id,species,source,license,split\n");
    for i in 0..6u32 {
        write(dir.path(), &format!("{i}.jpg"), &jpeg(&frame(i, 320, 240), 85));
        let label = if i % 2 == 0 { "cetacean" } else { "non_cetacean" };
        csv += &format!("{i}.jpg,{label},,,generated,none,test\n");
    }
    write(dir.path(), "broken.jpg", b"not an image");
    csv += "broken.jpg,cetacean,,,generated,none,test\n";
    let manifest = write(dir.path(), "manifest.csv", csv.as_bytes());
    let roc = dir.path().join("roc.svg");
    let out = whaled(&["eval", "--manifest", manifest.to_str().unwrap(), "--json", "--roc", roc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["positives"].as_u64(), r["negatives"].as_u64()), (Some(3), Some(3)));
    assert_eq!(r["failures"].as_array().unwrap().len(), 1);
    for k in ["tpr", "tnr", "precision", "f1"] {
        let v = r["at_threshold"][k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert!(r["roc_auc"].as_f64().is_some());
    assert!(std::fs::read_to_string(&roc).unwrap().starts_with("<svg"));

    let table = whaled(&["eval", "--manifest", manifest.to_str().unwrap()]);
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(t.contains("TPR") && t.contains("ROC AUC") && t.contains("unreadable: "), "{t}");

    let bad = write(dir.path(), "bad.csv", b"relpath,label\n0.jpg,whale\n");
    let out = whaled(&["eval", "--manifest", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bad.csv: line 2: label must be `cetacean` or `non_cetacean`, got `whale`"),
        "{}",
        stderr(&out)
    );
}

/// Issue 21 part 3, evidence (b): `whaled eval` on the 48 real photos with hand-drawn boxes
/// (models/localisation/marine-dev-boxes.csv) reports how the Detection's bbox overlaps them. The
/// reference is computed here from the CSV alone: the bbox is the whole frame, whose size the CSV
/// records as Pillow read it (so whaled's decoded size is checked too), and the IoU is this test's own.
#[test]
fn eval_reports_localisation_against_drawn_boxes() {
    let csv_path = repo().join("models/localisation/marine-dev-boxes.csv");
    shared_data(); // the photos are under ../shared/data
    let out = whaled(&["eval", "--manifest", csv_path.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["failures"].as_array().unwrap().len(), 0);
    let text = std::fs::read_to_string(&csv_path).unwrap();
    let mut want: Vec<f64> = text
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<f64> = l.split(',').skip(3).map(|v| v.parse().unwrap()).collect();
            let (fw, fh, x, y, w, h) = (c[0], c[1], c[2], c[3], c[4], c[5]);
            // The box lies inside the frame, so the intersection is the box itself.
            assert!(x + w <= fw && y + h <= fh, "{l}");
            (w * h) / (fw * fh)
        })
        .collect();
    want.sort_by(f64::total_cmp);
    let n = want.len();
    assert!(n >= 40, "{n} boxes");
    let l = &r["localisation"];
    assert_eq!(l["n"].as_u64(), Some(n as u64));
    let share = want.iter().filter(|&&v| v >= 0.5).count() as f64 / n as f64;
    let median = if n % 2 == 1 { want[n / 2] } else { (want[n / 2 - 1] + want[n / 2]) / 2.0 };
    assert!((l["iou_at_least_half"].as_f64().unwrap() - share).abs() < 1e-12, "{l} vs {share}");
    assert!((l["median_iou"].as_f64().unwrap() - median).abs() < 1e-12, "{l} vs {median}");
    let table = whaled(&["eval", "--manifest", csv_path.to_str().unwrap()]);
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(t.contains(&format!("localisation: the Detection's bbox against {n} boxes")), "{t}");
}

/// An installed package (`<prefix>/bin/whaled` + `<prefix>/share/whaled/models`) finds its shipped
/// models with no config: the prefix is searched before the source checkout.
#[test]
fn defaults_use_the_models_of_an_installed_prefix() {
    let prefix = tempfile::tempdir().unwrap();
    let bin = prefix.path().join("bin");
    let models = prefix.path().join("share/whaled/models/marine-gate-v2");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_whaled"), bin.join("whaled")).unwrap();
    for f in ["model.toml", "marine_gate_v2_fp32.onnx"] {
        std::fs::copy(repo().join("models/marine-gate-v2").join(f), models.join(f)).unwrap();
    }
    let out = Command::new(bin.join("whaled"))
        .args(["identify", repo().join("tests/photos/synthetic_0.jpg").to_str().unwrap()])
        .env_remove("WHALED_CONFIG")
        .env_remove("WHALED_MODEL_DIR")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("built-in defaults"), "{log}");
    assert!(log.contains(&format!("variant fp32, {})", models.join("marine_gate_v2_fp32.onnx").display())), "{log}");
    assert_eq!(json_lines(&out).len(), 1);
}

/// config/jetson.toml (docs/JETSON.md) is valid once its library path points at a real onnxruntime:
/// here the CPU-only wheel's, with which TensorRT and CUDA are skipped with a WARN and identify works.
#[cfg(feature = "onnxruntime")]
#[test]
fn jetson_example_config_validates_and_falls_back_to_cpu() {
    let text = std::fs::read_to_string(repo().join("config/jetson.toml")).unwrap();
    let lib_line = text.lines().find(|l| l.starts_with("library = ")).unwrap();
    let text = text
        .replace(lib_line, &format!("library = \"{}\"", ort_library().display()))
        .replace("path = \"/dev/video0\"", "path = \"/dev/video-jetson-test\"");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "jetson.toml", text.as_bytes());
    let ok = whaled(&["check-config", cfg.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("backend onnxruntime"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let photos = photo_dir();
    let run = whaled(&["identify", "--config", cfg.to_str().unwrap(), photos.path().to_str().unwrap()]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("`tensorrt`") && !json_lines(&run).is_empty());
}

/// `prefilter.score` of every record, by file name.
fn scores(o: &Output) -> Vec<(String, Option<f64>)> {
    json_lines(o)
        .iter()
        .map(|r| (r["image_ind"].as_str().unwrap().to_string(), r["prefilter"]["score"].as_f64()))
        .collect()
}

/// Each file identified by a whaled process of its own: the reference, with no state carried over.
fn one_by_one(files: &[PathBuf]) -> Vec<(String, Option<f64>)> {
    files
        .iter()
        .flat_map(|f| {
            let out = whaled(&["identify", f.to_str().unwrap()]);
            assert!(out.status.success(), "{}", stderr(&out));
            scores(&out)
        })
        .collect()
}

/// Issue 10 §1: ten whales-dev photos as uncompressed 320x240 PNGs (so every file has the same length),
/// scenes and whales interleaved. The decoder once keyed its cache on the payload's address and length:
/// the allocator handed each file the previous one's address and six of ten records carried the
/// previous file's score. In one run every score must equal the score of that file identified alone.
#[test]
fn identify_scores_same_length_files_each_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let (whales, scenes) = (whales_dev("cetacean", 5), whales_dev("non_cetacean", 5));
    let mut files = Vec::new();
    let mut len = None;
    for (k, src) in scenes.iter().zip(&whales).flat_map(|(s, w)| [s, w]).enumerate() {
        let img = image::open(src).unwrap().to_rgb8();
        let img = image::imageops::resize(&img, 320, 240, image::imageops::FilterType::Triangle);
        let mut png = Vec::new();
        let enc = image::codecs::png::PngEncoder::new_with_quality(
            &mut png,
            image::codecs::png::CompressionType::Uncompressed,
            image::codecs::png::FilterType::NoFilter,
        );
        image::ImageEncoder::write_image(enc, img.as_raw(), 320, 240, image::ExtendedColorType::Rgb8).unwrap();
        assert_eq!(*len.get_or_insert(png.len()), png.len(), "the PNGs must all have one length");
        files.push(write(dir.path(), &format!("{k:02}.png"), &png));
    }
    let together = whaled(&["identify", dir.path().to_str().unwrap()]);
    assert!(together.status.success(), "{}", stderr(&together));
    let together = scores(&together);
    let alone = one_by_one(&files);
    assert_eq!(together.len(), 10);
    // The photos differ, so their scores do: a repeated score is a stale frame.
    let distinct: std::collections::HashSet<u64> = alone.iter().map(|(_, s)| s.unwrap().to_bits()).collect();
    assert_eq!(distinct.len(), 10, "{alone:?}");
    for ((name, got), (_, want)) in together.iter().zip(&alone) {
        let (got, want) = (got.unwrap(), want.unwrap());
        assert!((got - want).abs() < 1e-9, "{name}: scored {got} in one run, {want} alone: {together:?}");
    }
}

/// Issue 10 §1b: a photo whose first DQT segment claims a length of 1 (a USB transfer error in an MJPEG
/// stream looks like this), then three valid photos. libjpeg-turbo's handle stayed failed after the
/// header error and all four came out `corrupted_image`.
#[test]
fn identify_recovers_after_a_damaged_jpeg_header() {
    let dir = tempfile::tempdir().unwrap();
    let photos = whales_dev("cetacean", 4);
    let mut bad = std::fs::read(&photos[0]).unwrap();
    let dqt = bad.windows(2).position(|w| w == [0xFF, 0xDB]).expect("a DQT segment");
    bad[dqt + 2..dqt + 4].copy_from_slice(&[0, 1]);
    write(dir.path(), "0_damaged.jpg", &bad);
    let mut good = Vec::new();
    for (k, p) in photos[1..].iter().enumerate() {
        good.push(write(dir.path(), &format!("{}_good.jpg", k + 1), &std::fs::read(p).unwrap()));
    }
    let out = whaled(&["identify", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let recs = json_lines(&out);
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[0]["rejection_reason"], "corrupted_image", "{}", recs[0]);
    let got = scores(&out);
    for ((name, got), (_, want)) in got[1..].iter().zip(one_by_one(&good)) {
        assert_eq!(*got, want, "{name}: after the damaged file: {recs:?}");
        assert!(got.is_some(), "{name} was not assessed");
    }
}

/// Issue 10 §4: check-config checks what start-up checks. One byte changed in the model file (its
/// SHA-256 no longer matches the manifest) was "ok" for check-config and refused at start-up.
#[test]
fn check_config_verifies_model_digests_like_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("lite0");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(repo().join("models/efficientnet-lite0")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = config(dir.path(), "[prefilter]\nmodel = \"./lite0\"\n");
    let ok = whaled(&["check-config", cfg.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // One byte of each ONNX variant (whichever the backend picks).
    for entry in std::fs::read_dir(&model).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "onnx") {
            let mut bytes = std::fs::read(&p).unwrap();
            let n = bytes.len();
            bytes[n / 2] ^= 0x01;
            std::fs::write(&p, &bytes).unwrap();
        }
    }
    for args in
        [vec!["check-config", cfg.to_str().unwrap()], vec!["identify", "--config", cfg.to_str().unwrap(), "/dev/null"]]
    {
        let out = whaled(&args);
        assert!(!out.status.success(), "{args:?} accepted a corrupt model");
        assert!(stderr(&out).contains("SHA-256"), "{args:?}: {}", stderr(&out));
    }
}

/// Issue 10 §2: under systemd (`ProcSubset=pid`) /proc/sys/kernel/hostname is hidden; the default
/// device_id must still be the box's host name. A private UTS and mount namespace with its own host name
/// and /proc/sys hidden plays that box.
#[test]
fn default_device_id_is_the_host_name_even_with_proc_sys_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let script = format!(
        "hostname whale-box-7 && mount -t tmpfs none /proc/sys && ! test -e /proc/sys/kernel/hostname && exec {} check-config {}",
        env!("CARGO_BIN_EXE_whaled"),
        cfg.display()
    );
    let out = Command::new("unshare")
        .args(["--uts", "--mount", "--propagation", "private", "sh", "-c", &script])
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .expect("unshare (util-linux) runs");
    assert!(out.status.success(), "needs root for unshare --uts --mount: {}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("device_id whale-box-7,"), "{stdout}");
}
