//! Shared test helpers: the generated models (made on first use by tools/gen_test_models.py), the
//! onnxruntime library from the PyPI wheel, synthetic frames and JPEG streams.
#![allow(dead_code)]

pub mod broker;
pub mod gpsd;
pub mod logs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use image::{Rgb, RgbImage};
use whaled::config::{ExecutionProvider, InferenceConfig, OrtConfig};
use whaled::manifest::BackendKind;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `models/generated`, created by the deterministic generator if missing. Concurrent test processes
/// each generate into a private directory and rename it into place; the loser's identical copy is dropped.
pub fn generated() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = repo().join("models/generated");
        if dir.join("effb4-arcface-random/model.toml").is_file() {
            if !dir.join("zeroshot-random/model.toml").is_file() {
                // A directory from before the zero-shot test model (`.ci/test` regenerates everything first).
                let status = Command::new("python3")
                    .arg(repo().join("tools/gen_test_models.py"))
                    .args(["--only", "zeroshot", "--out"])
                    .arg(&dir)
                    .status()
                    .expect("python3 must be installed to generate the test models");
                assert!(status.success(), "tools/gen_test_models.py --only zeroshot failed");
            }
            return dir;
        }
        let tmp = repo().join(format!("models/.generated-{}", std::process::id()));
        let status = Command::new("python3")
            .arg(repo().join("tools/gen_test_models.py"))
            .arg("--out")
            .arg(&tmp)
            .status()
            .expect("python3 must be installed to generate the test models");
        assert!(status.success(), "tools/gen_test_models.py failed: pip install -r requirements-dev.txt");
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        assert!(dir.join("effb4-arcface-random/model.toml").is_file());
        dir
    })
    .clone()
}

/// The onnxruntime shared library: `$ORT_DYLIB_PATH`, else the one inside the pip `onnxruntime` wheel.
pub fn ort_library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let out = Command::new("python3")
            .args(["-c", "import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[-1])"])
            .output()
            .expect("python3 must be installed");
        assert!(out.status.success(), "the onnxruntime tests need `pip install onnxruntime` (see requirements-dev.txt) or ORT_DYLIB_PATH");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

pub fn inference(backend: BackendKind) -> InferenceConfig {
    InferenceConfig {
        backend,
        threads: 1,
        jpeg_dct_scaling: true,
        onnxruntime: OrtConfig {
            library: (backend == BackendKind::Onnxruntime).then(ort_library),
            execution_providers: vec![ExecutionProvider::Cpu],
            sessions: 1,
        },
    }
}

pub fn shipped_manifest() -> PathBuf {
    repo().join("models/efficientnet-lite0/model.toml")
}

pub fn b0_manifest() -> PathBuf {
    generated().join("efficientnet-b0-random/model.toml")
}

pub fn resnet_manifest() -> PathBuf {
    generated().join("resnet18-random/model.toml")
}

pub fn b4_manifest() -> PathBuf {
    generated().join("effb4-arcface-random/model.toml")
}

/// A deterministic synthetic "sea" frame: a blue gradient with a dark elongated blob whose place and
/// size depend on `seed`. Real photos may not be committed; tests make their own.
pub fn frame(seed: u32, width: u32, height: u32) -> RgbImage {
    let cx = (seed * 97 % width.max(1)) as f32;
    let cy = (height / 2 + seed * 13 % (height / 4 + 1)) as f32;
    let (rx, ry) = (width as f32 / 5.0, height as f32 / 12.0);
    RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let d = ((fx - cx) / rx).powi(2) + ((fy - cy) / ry).powi(2);
        if d < 1.0 {
            Rgb([40, 45, 50])
        } else {
            let t = fy / height as f32;
            let ripple = (((fx * 0.3 + fy * 0.7 + seed as f32).sin() + 1.0) * 10.0) as u8;
            Rgb([(20.0 + 40.0 * t) as u8 + ripple, (80.0 + 60.0 * t) as u8, (150.0 + 60.0 * t) as u8 + ripple / 2])
        }
    })
}

/// Encodes a frame as baseline JPEG.
pub fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).expect("encode JPEG");
    out
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write test file");
    p
}

/// Indices of the `k` largest values, largest first.
pub fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `../shared/data` beside the checkout (development photos; never copied into the repository). CI lays
/// it there too, so a test that needs it fails, rather than skips, without it.
pub fn shared_data() -> PathBuf {
    let dir = repo().join("../shared/data");
    assert!(
        dir.join("whales-dev/manifest.csv").is_file(),
        "{} is missing (see README: development data)",
        dir.display()
    );
    dir
}

/// The first `n` photos of `label` (`cetacean` / `non_cetacean`) in whales-dev, in manifest order.
pub fn whales_dev(label: &str, n: usize) -> Vec<PathBuf> {
    let root = shared_data().join("whales-dev");
    let csv = std::fs::read_to_string(root.join("manifest.csv")).expect("read whales-dev manifest");
    csv.lines()
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split(',');
            let (rel, lab) = (cols.next()?, cols.next()?);
            (lab == label).then(|| root.join(rel))
        })
        .take(n)
        .collect()
}

/// An embedder manifest with no head (gallery-only identification) for an ONNX under the repository
/// whose output is 1000 values at 224x224, stretch-resized, mean/std 0.5: the Lite0 logits as an embedding.
pub fn gallery_only_embedder(dir: &Path, onnx: &str, name: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let onnx = repo().join(onnx);
    let toml = format!(
        "name = \"{name}\"\nrole = \"embedder\"\ndescription = \"gallery-only embedder for tests\"\nlicense = \"test\"\n\
         [[variants]]\nname = \"fp32\"\nfile = \"{}\"\n\
         [input]\nname = \"input\"\nwidth = 224\nheight = 224\nlayout = \"nchw\"\nresize = \"stretch\"\n\
         interpolation = \"bilinear\"\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n\
         [output]\nname = \"logits\"\nkind = \"embedding\"\ndim = 1000\n\
         [embedder]\nscale = 30.0\ntop_k = 5\nmin_confidence = 0.0\nmodel_version = \"{name}\"\n",
        onnx.display()
    );
    std::fs::write(d.join("model.toml"), toml).unwrap();
    d.join("model.toml")
}
