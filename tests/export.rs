//! The upstream checkpoint, end to end: a synthetic checkpoint in the real format (torch's zip + pickle,
//! Lightning-shaped, timm's efficientnet_b4 key set) -> `tools/export_upstream.py` -> `whaled identify`,
//! on tract and on onnxruntime, against the top-5 an independent numpy forward of the state dict
//! computed (`tools/effnet_ref.py`, written by `tools/make_synthetic_ckpt.py` as reference.json). And the
//! exporter's refusals: a checkpoint with a missing, an extra or a misshaped key.
#![cfg(feature = "onnxruntime")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{ort_library, repo, whales_dev};

fn python(args: &[&str]) -> Output {
    Command::new("python3").current_dir(repo()).args(args).output().expect("python3")
}

fn check(out: &Output, what: &str) -> String {
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed: {}\nstdout: {o}\nstderr: {e}", out.status);
    o.into_owned()
}

/// Synthetic checkpoint + photos + reference (made once per test binary), then the export.
fn exported() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("whaled-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let synth = root.join("synth");
        let mut photos: Vec<String> = whales_dev("cetacean", 3).iter().map(|p| p.display().to_string()).collect();
        photos.extend(whales_dev("non_cetacean", 1).iter().map(|p| p.display().to_string()));
        let mut args = vec!["tools/make_synthetic_ckpt.py", "--out", synth.to_str().unwrap(), "--photos"];
        args.extend(photos.iter().map(String::as_str));
        check(&python(&args), "make_synthetic_ckpt.py");
        let model = root.join("model");
        check(
            &python(&[
                "tools/export_upstream.py",
                "--ckpt",
                synth.join("efficientnet_b4_512_fold0.ckpt").to_str().unwrap(),
                "--classes",
                synth.join("encoder_classes.npy").to_str().unwrap(),
                "--species",
                synth.join("species_map.csv").to_str().unwrap(),
                "--out",
                model.to_str().unwrap(),
            ]),
            "export_upstream.py",
        );
        (synth, model)
    })
}

fn config(dir: &Path, model: &Path, backend: &str) -> PathBuf {
    let path = dir.join(format!("whaled-{backend}.toml"));
    std::fs::write(
        &path,
        format!(
            "[inference]\nbackend = \"{backend}\"\n[inference.onnxruntime]\nlibrary = \"{}\"\n\
             [prefilter]\nthreshold = 0.0\n[identification]\nmodel = \"{}\"\n",
            ort_library().display(),
            model.join("model.toml").display()
        ),
    )
    .unwrap();
    path
}

fn identify_matches_the_reference(backend: &str) {
    let (synth, model) = exported();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(synth.join("reference.json")).unwrap()).unwrap();
    let cfg = config(synth.parent().unwrap(), model, backend);
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(synth.join("photos")).unwrap().map(|e| e.unwrap().path()).collect();
    pngs.sort();
    assert_eq!(pngs.len(), 4);
    let mut args = vec!["identify".to_string(), "--config".into(), cfg.display().to_string()];
    args.extend(pngs.iter().map(|p| p.display().to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_whaled")).args(&args).output().unwrap();
    let stdout = check(&out, "whaled identify");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    let mut worst = 0f64;
    for d in &lines {
        let name = d["image_ind"].as_str().unwrap();
        let want = reference[name]["top5"].as_array().unwrap_or_else(|| panic!("no reference for {name}"));
        let got: Vec<&serde_json::Value> =
            std::iter::once(d).chain(d["candidates"].as_array().unwrap().iter()).collect();
        assert_eq!(got.len(), 5, "{d}");
        assert_eq!(d["model_version"], "effb4-arcface-v1");
        for (rank, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                (g["class_animal"].as_str(), g["id_animal"].as_str()),
                (w["class_animal"].as_str(), w["id_animal"].as_str()),
                "{backend} {name} rank {}: {d}",
                rank + 1
            );
            // 4 dp; a value within 1e-5 of a rounding boundary may land on either side.
            let (gp, wp) = (g["probability"].as_f64().unwrap(), w["probability_raw"].as_f64().unwrap());
            let diff = (gp - wp).abs();
            worst = worst.max(diff);
            assert!(diff <= 0.5e-4 + 1e-5, "{backend} {name} rank {}: {gp} vs reference {wp}", rank + 1);
        }
        // The planted answers are meaningful: a spread-out top-5, not all ~1 or ~0.
        assert!(d["probability"].as_f64().unwrap() > 0.3, "{d}");
    }
    eprintln!("{backend}: 4 photos, top-5 ids and species equal to the numpy reference, max |p - p_ref| = {worst:.2e}");
}

#[test]
fn tract_identifies_like_the_reference() {
    identify_matches_the_reference("tract");
}

#[test]
fn onnxruntime_identifies_like_the_reference() {
    identify_matches_the_reference("onnxruntime");
}

#[test]
fn the_manifest_pins_every_file() {
    let (_, model) = exported();
    let m = std::fs::read_to_string(model.join("model.toml")).unwrap();
    for key in ["sha256", "head_sha256", "labels_sha256", "species_map_sha256"] {
        assert!(m.lines().any(|l| l.trim_start().starts_with(&format!("{key} = \""))), "{key} missing:\n{m}");
    }
    // A head file that changed after export is refused at load, naming it.
    let copy = model.parent().unwrap().join("model-tampered");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(model).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
    }
    let csv = copy.join("species_map.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text.push_str("ffffffffffff,beluga\n");
    std::fs::write(&csv, text).unwrap();
    let cfg = config(copy.parent().unwrap(), &copy, "tract");
    let out = Command::new(env!("CARGO_BIN_EXE_whaled")).args(["check-config"]).arg(&cfg).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("species_map.csv has SHA-256") && e.contains("the manifest says"), "{e}");
}

#[test]
fn the_exporter_refuses_missing_extra_and_misshaped_keys() {
    let root = std::env::temp_dir().join(format!("whaled-export-bad-{}", std::process::id()));
    for kind in ["missing", "extra", "misshape"] {
        let dir = root.join(kind);
        let _ = std::fs::remove_dir_all(&dir);
        check(
            &python(&["tools/make_synthetic_ckpt.py", "--out", dir.to_str().unwrap(), "--corrupt", kind]),
            "make_synthetic_ckpt.py --corrupt",
        );
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("corrupt.json")).unwrap()).unwrap();
        let key = info["key"].as_str().unwrap_or_else(|| panic!("corrupt.json names the key: {info}"));
        let out = python(&[
            "tools/export_upstream.py",
            "--ckpt",
            dir.join("efficientnet_b4_512_fold0.ckpt").to_str().unwrap(),
            "--classes",
            dir.join("encoder_classes.npy").to_str().unwrap(),
            "--species",
            dir.join("species_map.csv").to_str().unwrap(),
            "--out",
            dir.join("model").to_str().unwrap(),
        ]);
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{kind}: {e}");
        assert!(e.contains(key), "{kind}: the error names {key}: {e}");
        assert!(!e.contains("Traceback"), "{kind}: a clear error, not a traceback: {e}");
        assert!(!dir.join("model/model.toml").exists(), "{kind}: nothing exported");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// The checkpoint reader against files real torch wrote (views at offsets, shared storage, fp16, bf16,
/// the legacy format), compared with the values torch saved beside them.
#[test]
fn the_reader_reads_what_torch_writes() {
    let out = python(&["tools/check_torch_fixtures.py"]);
    let text = check(&out, "check_torch_fixtures.py");
    assert!(
        text.contains("lightning_zip.ckpt: 7 tensors") && text.contains("lightning_legacy.ckpt: 7 tensors"),
        "{text}"
    );
}
