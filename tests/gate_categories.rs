//! The multi-class marine gate (`models/marine-gate-v2`, 7 named classes) through `whaled identify` on
//! tract: a frame the pre-filter rejects carries the gate's most probable non-cetacean category and its
//! probability in the pre-filter block; a frame it passes does not. The category and probability are
//! checked against the gate's own probabilities, recomputed here from the manifest's labels and the
//! score (P(cetacean) + the category's probability can never exceed 1, and the top of six other
//! classes holds at least a sixth of what is left), and against a second path: the gate run here through
//! the library on the same decoded pixels, with the softmax, the arg-max over the non-cetacean classes and
//! the label lookup written out in this test.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{inference, repo};
use whaled::decode::Decoder;
use whaled::manifest::{BackendKind, ModelManifest};
use whaled::model::Model;
use whaled::preprocess::Preprocessor;
use whaled::source::FrameData;

/// P(cetacean) and the most probable other class (label, probability) of `photo`, computed here.
fn reference(model: &Model, photo: &std::path::Path) -> (f64, String, f64) {
    let m = model.manifest();
    let mut pre = Preprocessor::new(&m.input);
    let data = FrameData::Encoded(std::sync::Arc::from(std::fs::read(photo).unwrap()));
    // As `whaled identify` decodes by default: libjpeg-turbo's DCT scale where the gate's input still fits.
    let mut decoder = Decoder::new(true);
    let decoded = decoder.decode(&data, |w, h| pre.fits(w, h), "photo").unwrap();
    let mut t = Vec::new();
    pre.run(decoded.image, &mut t).unwrap();
    let logits = model.run(&t).unwrap();
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|v| v / sum).collect();
    let labels = m.output.labels.as_ref().unwrap();
    assert_eq!(labels[0], "cetacean");
    let (k, pk) =
        p.iter().enumerate().skip(1).fold((0, -1.0), |(bk, bp), (k, &v)| if v > bp { (k, v) } else { (bk, bp) });
    (p[0], labels[k].clone(), pk)
}

fn gate() -> PathBuf {
    repo().join("models/marine-gate-v2/model.toml")
}

fn identify(dir: &std::path::Path, threshold: f64, photos: &[PathBuf]) -> Vec<serde_json::Value> {
    let cfg = dir.join("whaled.toml");
    std::fs::write(&cfg, format!("[prefilter]\nmodel = \"{}\"\nthreshold = {threshold}\n", gate().display())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_whaled"))
        .arg("identify")
        .arg("--config")
        .arg(&cfg)
        .args(photos)
        .output()
        .unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "whaled identify failed: {}\nstdout: {o}\nstderr: {e}", out.status);
    o.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_rejected_frame_says_what_the_gate_saw() {
    let tmp = tempfile::tempdir().unwrap();
    let photos: Vec<PathBuf> =
        (0..3).map(|i| repo().join(format!("tests/photos/synthetic_{i}.jpg"))).filter(|p| p.is_file()).collect();
    assert!(!photos.is_empty(), "tests/photos has the synthetic photos");
    let labels = ["shark", "pinniped", "seabird", "boat", "ocean", "other_marine"];

    // Threshold 1: every frame is rejected by the pre-filter, and says what it saw.
    for d in identify(tmp.path(), 1.0, &photos) {
        let p = &d["prefilter"];
        assert_eq!(d["rejection_reason"], "not_a_marine_mammal", "{d}");
        let category = p["category"].as_str().unwrap_or_else(|| panic!("no category: {d}"));
        assert!(labels.contains(&category), "{category} is a non-cetacean label: {d}");
        let (score, prob) = (p["score"].as_f64().unwrap(), p["category_probability"].as_f64().unwrap());
        assert!(score + prob <= 1.0 + 1e-9, "{d}");
        assert!(prob >= (1.0 - score) / 6.0 - 1e-9, "the top of six classes holds at least a sixth: {d}");
    }
    // The same numbers by the second path, photo by photo (records come in the order given).
    let model =
        Model::load(ModelManifest::load(&gate()).unwrap(), Some("fp32"), &inference(BackendKind::Tract)).unwrap();
    let records = identify(tmp.path(), 1.0, &photos);
    assert_eq!(records.len(), photos.len());
    for (photo, d) in photos.iter().zip(&records) {
        assert_eq!(d["image_ind"].as_str(), photo.file_name().and_then(|n| n.to_str()), "{d}");
        let (score, category, prob) = reference(&model, photo);
        let p = &d["prefilter"];
        assert_eq!(p["category"].as_str(), Some(category.as_str()), "{}: {d}", photo.display());
        assert!((p["score"].as_f64().unwrap() - score).abs() < 1e-5, "score {score} by hand: {d}");
        assert!((p["category_probability"].as_f64().unwrap() - prob).abs() < 1e-5, "{category} {prob} by hand: {d}");
    }
    // Threshold 0: every frame passes; no category in the record.
    for d in identify(tmp.path(), 0.0, &photos) {
        assert!(d["prefilter"].get("category").is_none(), "{d}");
        assert!(d["prefilter"].get("category_probability").is_none(), "{d}");
    }
}
