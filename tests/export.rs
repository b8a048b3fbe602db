//! The upstream checkpoint, end to end: a synthetic checkpoint in the real format (torch's zip + pickle,
//! Lightning-shaped, timm's efficientnet_b4 key set) -> `tools/export_upstream.py` -> `whaled identify`,
//! on tract and on onnxruntime, against the top-5 an independent numpy forward of the state dict
//! computed (`tools/effnet_ref.py`, written by `tools/make_synthetic_ckpt.py` as reference.json), with
//! `--verify` passing on a photo and timm's parameter count; a DataParallel (`module.`) checkpoint; the
//! exporter's refusals (a missing, an extra or a misshaped key, and every other failure path: exit 2, the
//! cause named, no traceback, nothing left behind); and `whaled identify --no-prefilter`.
#![cfg(feature = "onnxruntime")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{ort_library, repo, whales_dev};

fn python(args: &[&str]) -> Output {
    Command::new("python3").current_dir(repo()).args(args).output().expect("python3")
}

/// The exporter under test; `WHALED_EXPORT_SCRIPT` runs these tests against another version of it (to
/// check that they fail on the old one).
fn exporter() -> String {
    std::env::var("WHALED_EXPORT_SCRIPT").unwrap_or_else(|_| "tools/export_upstream.py".into())
}

/// `export_upstream.py --ckpt .. --classes .. --species .. --out .. [extra]`.
fn export(ckpt: &Path, classes: &Path, species: &Path, out: &Path, extra: &[&str]) -> Output {
    let script = exporter();
    let mut args = vec![
        script.as_str(),
        "--ckpt",
        ckpt.to_str().unwrap(),
        "--classes",
        classes.to_str().unwrap(),
        "--species",
        species.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    python(&args)
}

fn check(out: &Output, what: &str) -> String {
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed: {}\nstdout: {o}\nstderr: {e}", out.status);
    o.into_owned()
}

const CKPT: &str = "efficientnet_b4_512_fold0.ckpt";

/// Synthetic checkpoint + photos + reference (made once per test binary), then the export (with
/// `--verify`): (synthetic dir, model dir, the exporter's stdout).
fn exported() -> &'static (PathBuf, PathBuf, String) {
    static DIRS: OnceLock<(PathBuf, PathBuf, String)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("whaled-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let synth = root.join("synth");
        let photos: Vec<String> = original_photos().iter().map(|p| p.display().to_string()).collect();
        let mut args = vec!["tools/make_synthetic_ckpt.py", "--out", synth.to_str().unwrap(), "--photos"];
        args.extend(photos.iter().map(String::as_str));
        check(&python(&args), "make_synthetic_ckpt.py");
        let model = root.join("model");
        let stdout = check(
            &export(
                &synth.join(CKPT),
                &synth.join("encoder_classes.npy"),
                &synth.join("species_map.csv"),
                &model,
                &["--verify"],
            ),
            "export_upstream.py",
        );
        (synth, model, stdout)
    })
}

/// Entries of `dir` the exporter's staging left behind (`.<name>.partial-*`).
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .filter(|n| n.contains(".partial-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A file's bytes, or a directory's files (name, bytes), sorted; `None`: nothing there.
fn snapshot(p: &Path) -> Option<Vec<(String, Vec<u8>)>> {
    if p.is_file() {
        return Some(vec![(String::new(), std::fs::read(p).unwrap())]);
    }
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(p)
        .ok()?
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap_or_default())
        })
        .collect();
    v.sort();
    Some(v)
}

/// Rewrites a checkpoint through tools/torch_legacy.py: `module` puts every key under `module.` (as
/// DataParallel saves), `overflow` scales the stem by 1e30 (float64 copes, float32 overflows).
fn rewrite(src: &Path, dst: &Path, mode: &str) {
    const SCRIPT: &str = r#"
import collections, sys
import numpy as np
sys.path.insert(0, "tools")
import torch_legacy
src, dst, mode = sys.argv[1:4]
sd, hp = torch_legacy.load_checkpoint(src)
if mode == "module":
    sd = collections.OrderedDict(("module." + k, v) for k, v in sd.items())
else:
    sd["model.conv_stem.weight"] = sd["model.conv_stem.weight"] * np.float32(1e30)
torch_legacy.save_checkpoint(dst, {"state_dict": sd, "hyper_parameters": hp})
"#;
    check(&python(&["-c", SCRIPT, src.to_str().unwrap(), dst.to_str().unwrap(), mode]), "rewrite checkpoint");
}

fn config(dir: &Path, model: &Path, backend: &str) -> PathBuf {
    config_gated(dir, model, backend, false)
}

/// `gated`: the shipped pre-filter at its own threshold; else threshold 0 (every photo identified).
fn config_gated(dir: &Path, model: &Path, backend: &str, gated: bool) -> PathBuf {
    let path = dir.join(format!("whaled-{backend}{}.toml", if gated { "-gated" } else { "" }));
    std::fs::write(
        &path,
        format!(
            "[inference]\nbackend = \"{backend}\"\n[inference.onnxruntime]\nlibrary = \"{}\"\n\
             {}[identification]\nmodel = \"{}\"\n",
            ort_library().display(),
            if gated { "" } else { "[prefilter]\nthreshold = 0.0\n" },
            model.join("model.toml").display()
        ),
    )
    .unwrap();
    path
}

/// The photos `exported()` planted answers for, as the camera gave them (JPEG at their own sizes).
fn original_photos() -> Vec<PathBuf> {
    let mut photos = whales_dev("cetacean", 3);
    photos.extend(whales_dev("non_cetacean", 1));
    photos
}

/// `whaled identify` on `inputs` against reference.json (keyed by the 512x512 PNG each photo became):
/// the same top-5 ids and species, probabilities within `tolerance`.
fn identify_matches_the_reference(backend: &str, inputs: &[PathBuf], tolerance: f64) {
    let (synth, model, _) = exported();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(synth.join("reference.json")).unwrap()).unwrap();
    let cfg = config(synth.parent().unwrap(), model, backend);
    assert_eq!(inputs.len(), 4);
    let mut args = vec!["identify".to_string(), "--config".into(), cfg.display().to_string()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_whaled")).args(&args).output().unwrap();
    let stdout = check(&out, "whaled identify");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    let mut worst = 0f64;
    for d in &lines {
        let name = d["image_ind"].as_str().unwrap();
        let key = format!("{}.png", Path::new(name).file_stem().unwrap().to_str().unwrap());
        let want = reference[&key]["top5"].as_array().unwrap_or_else(|| panic!("no reference for {name}"));
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
            let (gp, wp) = (g["probability"].as_f64().unwrap(), w["probability_raw"].as_f64().unwrap());
            let diff = (gp - wp).abs();
            worst = worst.max(diff);
            assert!(diff <= tolerance, "{backend} {name} rank {}: {gp} vs reference {wp}", rank + 1);
        }
        // The planted answers are meaningful: a spread-out top-5, not all ~1 or ~0.
        assert!(d["probability"].as_f64().unwrap() > 0.3, "{d}");
    }
    eprintln!("{backend}: 4 photos, top-5 ids and species equal to the numpy reference, max |p - p_ref| = {worst:.2e}");
}

/// The exported model's input as the reference embedded it: the 512x512 PNGs (the resize is the
/// identity), checked to the reference's 4 dp (a value within 1e-5 of a rounding boundary may land on
/// either side).
fn identify_the_pngs_like_the_reference(backend: &str) {
    let (synth, ..) = exported();
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(synth.join("photos")).unwrap().map(|e| e.unwrap().path()).collect();
    pngs.sort();
    identify_matches_the_reference(backend, &pngs, 0.5e-4 + 1e-5);
}

#[test]
fn tract_identifies_like_the_reference() {
    identify_the_pngs_like_the_reference("tract");
}

#[test]
fn onnxruntime_identifies_like_the_reference() {
    identify_the_pngs_like_the_reference("onnxruntime");
}

/// The whole chain the upstream runs, from the photographer's JPEG: whaled's decode and the Pillow
/// resampler the exported manifest names (`resampler = "pillow"`), against the reference computed on
/// Pillow's decode and `resize((512, 512), BILINEAR)`. With the fast resampler the same photos differ
/// by up to a few hundredths (the +-1 level differences amplified by the ArcFace scale of 30). One
/// backend: the pixels are the same on both, and the PNG tests above cover the model on each.
#[test]
fn the_whole_chain_from_the_original_jpegs_matches_pillow_and_the_reference() {
    let photos = original_photos();
    assert!(photos.iter().all(|p| p.extension().is_some_and(|e| e == "jpg")), "{photos:?}");
    identify_matches_the_reference("tract", &photos, 1e-3);
}

#[test]
fn the_manifest_pins_every_file() {
    let (_, model, _) = exported();
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
        let out = export(
            &dir.join(CKPT),
            &dir.join("encoder_classes.npy"),
            &dir.join("species_map.csv"),
            &dir.join("model"),
            &[],
        );
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{kind}: {e}");
        assert!(e.contains(key), "{kind}: the error names {key}: {e}");
        assert!(!e.contains("Traceback"), "{kind}: a clear error, not a traceback: {e}");
        assert!(!dir.join("model").exists(), "{kind}: no output directory left");
        assert_eq!(partials(&dir), Vec::<String>::new(), "{kind}: no temporary directory left");
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

/// `--verify` runs on a photo (tests/photos/synthetic_0.jpg, natural image statistics) and passes on a
/// correct export, judged relative to the embedding's scale; the parameter count is timm's (learnable
/// only: BatchNorm running statistics are buffers) for the real B4 topology; nothing temporary is left.
#[test]
fn the_export_verifies_on_a_photo_and_counts_parameters_like_timm() {
    let (_, model, stdout) = exported();
    let verify =
        stdout.lines().find(|l| l.starts_with("verify")).unwrap_or_else(|| panic!("no verify line:\n{stdout}"));
    assert!(verify.contains("synthetic_0.jpg") && verify.ends_with(": passed"), "{verify}");
    assert!(verify.contains("x the largest |value|") && verify.contains("peak activation"), "{verify}");
    assert!(stdout.contains("backbone 17,548,616 learnable (+ 125,200 BatchNorm running statistics)"), "{stdout}");
    assert!(model.join("model.toml").is_file());
    assert_eq!(partials(model.parent().unwrap()), Vec::<String>::new());
}

/// A checkpoint saved through DataParallel (every key under `module.`) exports to the same files as the
/// plain one, and says so; into an existing empty directory, which the export replaces.
#[test]
fn keys_under_a_dataparallel_prefix_are_recognised() {
    let (synth, model, _) = exported();
    let root = synth.parent().unwrap().join("dataparallel");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("model")).unwrap();
    let ckpt = root.join(CKPT);
    rewrite(&synth.join(CKPT), &ckpt, "module");
    let out =
        export(&ckpt, &synth.join("encoder_classes.npy"), &synth.join("species_map.csv"), &root.join("model"), &[]);
    let stdout = check(&out, "export of the module.-prefixed checkpoint");
    assert!(stdout.contains("keys saved under 'module.'") && stdout.contains("prefix removed"), "{stdout}");
    for f in ["embedder.onnx", "head.npy", "model.toml"] {
        assert!(
            std::fs::read(root.join("model").join(f)).unwrap() == std::fs::read(model.join(f)).unwrap(),
            "{f} differs from the plain checkpoint's export"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Every failure path of the exporter, from crafted inputs: exit status 2, a message naming the cause, no
/// Python traceback, and nothing left behind (no output directory, no temporary directory, no parent
/// directory it made; a file or directory that was already there is untouched).
#[test]
fn the_exporter_fails_cleanly() {
    let (synth, _, _) = exported();
    let root = synth.parent().unwrap().join("failures");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let (ckpt, classes, species) = (synth.join(CKPT), synth.join("encoder_classes.npy"), synth.join("species_map.csv"));
    let bytes = std::fs::read(&ckpt).unwrap();
    let truncated = root.join("truncated.ckpt");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let damaged = root.join("damaged.ckpt");
    let mut flipped = bytes.clone();
    let mid = bytes.len() / 2;
    flipped[mid..mid + 4096].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(&damaged, flipped).unwrap();
    let empty = root.join("empty.ckpt");
    std::fs::write(&empty, b"").unwrap();
    let not_a_photo = ["--verify-photo", species.to_str().unwrap()];
    let overflow = root.join("overflow.ckpt");
    rewrite(&ckpt, &overflow, "overflow");
    let a_file = root.join("a-file");
    std::fs::write(&a_file, "not a directory\n").unwrap();
    let full = root.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine\n").unwrap();

    struct Case<'a> {
        name: &'a str,
        ckpt: &'a Path,
        classes: &'a Path,
        species: &'a Path,
        out: PathBuf,
        extra: &'a [&'a str],
        cause: &'a str,
    }
    let mut cases = vec![
        Case {
            name: "truncated checkpoint (into parents that do not exist yet)",
            ckpt: &truncated,
            classes: &classes,
            species: &species,
            out: root.join("made/by/export/model"),
            extra: &[],
            cause: "truncated or damaged checkpoint",
        },
        Case {
            name: "damaged checkpoint (4 KiB of a record flipped)",
            ckpt: &damaged,
            classes: &classes,
            species: &species,
            out: root.join("model-damaged"),
            extra: &[],
            cause: "truncated or damaged checkpoint",
        },
        Case {
            name: "empty checkpoint",
            ckpt: &empty,
            classes: &classes,
            species: &species,
            out: root.join("model-empty"),
            extra: &[],
            cause: "truncated or damaged checkpoint (0 bytes): the file is empty",
        },
        Case {
            name: "not a checkpoint",
            ckpt: &species,
            classes: &classes,
            species: &species,
            out: root.join("model-csv-ckpt"),
            extra: &[],
            cause: "not a PyTorch checkpoint",
        },
        Case {
            name: "--classes given the CSV",
            ckpt: &ckpt,
            classes: &species,
            species: &species,
            out: root.join("model-csv-classes"),
            extra: &[],
            cause: "not a .npy file (it is text (first line 'individual_id,species'), a CSV file)",
        },
        Case {
            name: "--species given the .npy",
            ckpt: &ckpt,
            classes: &classes,
            species: &classes,
            out: root.join("model-npy-species"),
            extra: &[],
            cause: "not a UTF-8 CSV with a header individual_id,species",
        },
        Case {
            name: "--verify-photo not an image",
            ckpt: &ckpt,
            classes: &classes,
            species: &species,
            out: root.join("model-bad-photo"),
            extra: &not_a_photo,
            cause: "cannot read the image",
        },
        Case {
            name: "--out names an existing file",
            ckpt: &ckpt,
            classes: &classes,
            species: &species,
            out: a_file.clone(),
            extra: &[],
            cause: "exists and is not a directory",
        },
        Case {
            name: "--out below a file",
            ckpt: &ckpt,
            classes: &classes,
            species: &species,
            out: a_file.join("model"),
            extra: &[],
            cause: "is a file, not a directory",
        },
        Case {
            name: "--out a directory with files in it",
            ckpt: &ckpt,
            classes: &classes,
            species: &species,
            out: full.clone(),
            extra: &[],
            cause: "exists and is not empty",
        },
        Case {
            name: "--verify fails (activations float32 cannot hold)",
            ckpt: &overflow,
            classes: &classes,
            species: &species,
            out: root.join("model-overflow"),
            extra: &["--verify"],
            cause: "--verify: the exported ONNX disagrees with the numpy reference",
        },
    ];
    // Unwritable whatever the user (root included): /proc takes no new directories.
    if Path::new("/proc/self").exists() {
        cases.push(Case {
            name: "--out in an unwritable place",
            ckpt: &ckpt,
            classes: &classes,
            species: &species,
            out: PathBuf::from(format!("/proc/whaled-export-test-{}", std::process::id())),
            extra: &[],
            cause: "cannot create the output directory there",
        });
    }
    let mut failures = Vec::new();
    for c in &cases {
        // What is there before: the top-most directory the export would have to make, or the existing
        // file/directory's contents.
        let mut made = c.out.clone();
        while made.parent().is_some_and(|p| !p.exists()) {
            made = made.parent().unwrap().to_path_buf();
        }
        let before = snapshot(&c.out);
        let out = export(c.ckpt, c.classes, c.species, &c.out, c.extra);
        let e = String::from_utf8_lossy(&out.stderr);
        let mut why = Vec::new();
        if out.status.code() != Some(2) {
            why.push(format!("exit status {:?}, expected 2", out.status.code()));
        }
        if !e.contains(c.cause) {
            why.push(format!("the message does not name the cause ({:?})", c.cause));
        }
        if e.contains("Traceback") {
            why.push("a Python traceback".into());
        }
        if before.is_none() && made.exists() {
            why.push(format!("{} was left behind", made.display()));
        }
        if before.is_some() && snapshot(&c.out) != before {
            why.push(format!("{}, already there, was changed", c.out.display()));
        }
        let parent = c.out.parent().unwrap();
        if parent.starts_with(&root) && !partials(parent).is_empty() {
            why.push(format!("temporary directories left: {:?}", partials(parent)));
        }
        if !why.is_empty() {
            failures.push(format!("{}: {}\n  stderr: {e}", c.name, why.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{} of {} failure paths wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
    let _ = std::fs::remove_dir_all(&root);
}

/// `whaled identify --no-prefilter`: a photo the default gate rejects (the shipped pre-filter at its own
/// threshold) is still identified, with the same top-5 as the reference; without the flag it is rejected.
#[test]
fn no_prefilter_identifies_what_the_gate_rejects() {
    let (synth, model, _) = exported();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(synth.join("reference.json")).unwrap()).unwrap();
    let cfg = config_gated(synth.parent().unwrap(), model, "onnxruntime", true);
    let stem = whales_dev("non_cetacean", 1)[0].file_stem().unwrap().to_string_lossy().into_owned();
    let photo = synth.join("photos").join(format!("{stem}.png"));
    let run = |flag: Option<&str>| -> serde_json::Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_whaled"));
        cmd.arg("identify").arg("--config").arg(&cfg).args(flag).arg(&photo);
        let stdout = check(&cmd.output().unwrap(), "whaled identify");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        serde_json::from_str(lines[0]).unwrap()
    };
    let gated = run(None);
    assert_eq!(gated["rejected"], true, "{gated}");
    assert_eq!(gated["rejection_reason"], "not_a_marine_mammal", "{gated}");
    assert_eq!(gated["class_animal"], "", "{gated}");
    let score = gated["prefilter"]["score"].as_f64().unwrap();
    assert!(score < gated["prefilter"]["threshold"].as_f64().unwrap(), "{gated}");

    let open = run(Some("--no-prefilter"));
    let want = &reference[format!("{stem}.png")]["top5"][0];
    assert_eq!(open["rejected"], false, "{open}");
    assert_eq!(open["class_animal"], want["class_animal"], "{open}");
    assert_eq!(open["id_animal"], want["id_animal"], "{open}");
    let (p, p_ref) = (open["probability"].as_f64().unwrap(), want["probability_raw"].as_f64().unwrap());
    assert!((p - p_ref).abs() <= 0.5e-4 + 1e-5, "{p} vs reference {p_ref}");
    assert_eq!(open["candidates"].as_array().map(Vec::len), Some(4), "{open}");
    // The gate still ran and its score is reported; it just rejected nothing.
    assert_eq!(open["prefilter"]["score"].as_f64(), Some(score), "{open}");
    assert_eq!(open["prefilter"]["threshold"].as_f64(), Some(0.0), "{open}");

    // Without an identification model the flag has nothing to do: a clear error, not a silent no-op.
    let bare = synth.parent().unwrap().join("whaled-no-id.toml");
    std::fs::write(&bare, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_whaled"))
        .args(["identify", "--no-prefilter", "--config"])
        .arg(&bare)
        .arg(&photo)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--no-prefilter needs an identification model"), "{e}");
}
