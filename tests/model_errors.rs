//! A wrong model file must fail at load time with a message naming the manifest and the mismatch, on
//! both backends: shapes, names, digests, unreadable or malformed ONNX, head files.

mod common;

use std::path::Path;

use common::*;
use whaled::head::IdentificationHead;
use whaled::manifest::{BackendKind, ModelManifest, Role};
use whaled::model::Model;

/// Every backend this build has: onnxruntime only with the cargo feature (armv7 CI runs tract alone).
#[cfg(feature = "onnxruntime")]
const BACKENDS: [BackendKind; 2] = [BackendKind::Tract, BackendKind::Onnxruntime];
#[cfg(not(feature = "onnxruntime"))]
const BACKENDS: [BackendKind; 1] = [BackendKind::Tract];

/// The B0 manifest with `edit` applied, written into `dir`, pointing at the generated ONNX file.
fn edited_b0(dir: &Path, edit: impl Fn(String) -> String) -> ModelManifest {
    let src = std::fs::read_to_string(b0_manifest()).unwrap();
    let onnx = generated().join("efficientnet-b0-random/efficientnet_b0_224.onnx");
    let src = src.replace("file = \"efficientnet_b0_224.onnx\"", &format!("file = \"{}\"", onnx.display()));
    let path = write(dir, "model.toml", edit(src).as_bytes());
    ModelManifest::load(&path).unwrap()
}

fn load_err(m: ModelManifest, backend: BackendKind) -> String {
    Model::load(m, None, &inference(backend)).expect_err("load must fail").to_string()
}

type Edit = Box<dyn Fn(String) -> String>;

#[test]
fn shape_and_name_mismatches_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // (edit, expected message fragment)
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|s| s.replace("width = 224", "width = 256")),
            "the ONNX graph's input `input` is 1x3x224x224, but the manifest describes 1x3x224x256",
        ),
        (Box::new(|s| s.replace("layout = \"nchw\"", "layout = \"nhwc\"")), "but the manifest describes 1x224x224x3"),
        (
            Box::new(|s| s.replace("[input]\nname = \"input\"", "[input]\nname = \"image\"")),
            "the ONNX graph's input is `input`, the manifest says `image`",
        ),
        (Box::new(|s| s.replace("name = \"logits\"", "name = \"probs\"")), "has no output `probs` (it has: logits)"),
        (
            Box::new(|s| s.replace("classes = 1000", "classes = 1001")),
            "output `logits` is [1, 1000], but the manifest describes 1001 values",
        ),
    ];
    for (edit, want) in &cases {
        for backend in BACKENDS {
            let e = load_err(edited_b0(dir.path(), edit), backend);
            assert!(e.contains(want), "{backend:?}: {e}\n lacks: {want}");
            assert!(e.contains("model.toml"), "{backend:?}: error does not name the manifest: {e}");
        }
    }
}

#[test]
fn corrupt_or_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = edited_b0(dir.path(), |s| {
        s.replace(&s[s.find("sha256 = \"").unwrap() + 10..s.find("sha256 = \"").unwrap() + 74], &"0".repeat(64))
    });
    let e = load_err(m, BackendKind::Tract);
    assert!(e.contains("has SHA-256") && e.contains("the file is corrupt"), "{e}");

    let garbage = write(dir.path(), "garbage.onnx", b"this is not a protobuf \x00\x01\x02");
    let m = edited_b0(dir.path(), |s| {
        let s = s.lines().filter(|l| !l.starts_with("sha256")).collect::<Vec<_>>().join("\n");
        let from = s.find("file = \"").unwrap();
        let to = from + s[from..].find('\n').unwrap();
        format!("{}file = \"{}\"{}", &s[..from], garbage.display(), &s[to..])
    });
    for backend in BACKENDS {
        let e = load_err(m.clone(), backend);
        assert!(e.contains("garbage.onnx") || e.contains("onnxruntime: cannot load"), "{backend:?}: {e}");
        assert!(e.starts_with("model "), "{backend:?}: {e}");
    }

    let m = edited_b0(dir.path(), |s| {
        s.replace(
            &generated().join("efficientnet-b0-random/efficientnet_b0_224.onnx").display().to_string(),
            "/nonexistent/model.onnx",
        )
    });
    let e = load_err(m, BackendKind::Tract);
    assert!(e.contains("cannot read ONNX file /nonexistent/model.onnx"), "{e}");
}

#[test]
fn head_files_must_match_the_embedder() {
    let m = ModelManifest::load(&b4_manifest()).unwrap();
    let Role::Embedder(spec) = &m.role else { panic!("b4 is an embedder") };
    let spec = spec.head.as_ref().expect("b4 has a head");
    let e = IdentificationHead::load(m.path(), spec, 256).unwrap_err().to_string();
    assert!(e.contains("rows have 512 values but the embedder outputs 256"), "{e}");

    let mut too_many = spec.clone();
    too_many.active_slots = 20_000;
    let e = IdentificationHead::load(m.path(), &too_many, 512).unwrap_err().to_string();
    assert!(e.contains("has 15587 rows, fewer than active_slots = 20000"), "{e}");

    let mut swapped = spec.clone();
    swapped.labels = spec.species_map.clone();
    let e = IdentificationHead::load(m.path(), &swapped, 512).unwrap_err().to_string();
    assert!(e.contains("species_map.csv is not a .npy file"), "{e}");

    // A head file that is not the one the manifest's SHA-256 names (an SD card flipped a bit).
    let mut pinned = spec.clone();
    pinned.head_sha256 = Some("0".repeat(64));
    let e = IdentificationHead::load(m.path(), &pinned, 512).unwrap_err().to_string();
    assert!(e.contains("head.npy has SHA-256") && e.contains("the manifest says 0000"), "{e}");

    let head = IdentificationHead::load(m.path(), spec, 512).unwrap();
    assert_eq!(head.slots(), 13_837);
    assert_eq!(head.id(0).len(), 12);
    assert!(head.id(0).bytes().all(|b| b.is_ascii_hexdigit()));
}

#[cfg(feature = "onnxruntime")]
#[test]
fn onnxruntime_library_errors_are_clear() {
    // A missing library is caught by config validation; here the backend gets a library that is not onnxruntime.
    let m = ModelManifest::load(&b0_manifest()).unwrap();
    let mut cfg = inference(BackendKind::Onnxruntime);
    cfg.onnxruntime.library = Some("/bin/true".into());
    let e = Model::load(m.clone(), None, &cfg).unwrap_err().to_string();
    // Either this process already loaded the real library (tests share a process) or loading /bin/true fails.
    assert!(e.contains("cannot load onnxruntime from /bin/true") || e.contains("already loaded from"), "{e}");
    // A failed load must not poison the backend: the real library still loads afterwards.
    Model::load(m, None, &inference(BackendKind::Onnxruntime)).expect("the real library loads after a failed attempt");
}

#[cfg(not(feature = "onnxruntime"))]
#[test]
fn onnxruntime_without_the_feature_is_a_clear_error() {
    let m = ModelManifest::load(&b0_manifest()).unwrap();
    let mut cfg = inference(BackendKind::Tract);
    cfg.backend = BackendKind::Onnxruntime;
    let e = Model::load(m, None, &cfg).unwrap_err().to_string();
    assert!(e.contains("built without the `onnxruntime` feature"), "{e}");
}
