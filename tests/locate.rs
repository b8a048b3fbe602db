//! The gate's map (`[prefilter] locate = "gate_map"`, src/locate.rs) checked against independent
//! answers: the gate's own graph (its pool and head average what the map computes per cell), the
//! refusals of gates whose head is not linear, and the crop the embedder sees (the same photo cropped by
//! the test and identified as a whole file must give the same ranking).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use image::RgbImage;
use serde_json::Value;
use std::sync::Arc;
use whaled::config::Config;
use whaled::identify::{GalleryAccess, Identifier};
use whaled::locate::{feature_graph, Locator, PixelBox, STRIDE};
use whaled::manifest::{BackendKind, ModelManifest, OutputKind};
use whaled::model::Model;
use whaled::preprocess::Preprocessor;
use whaled::source::FrameData;

fn backends() -> Vec<BackendKind> {
    let mut b = vec![BackendKind::Tract];
    if cfg!(feature = "onnxruntime") {
        b.push(BackendKind::Onnxruntime);
    }
    b
}

/// The gate's input for a real whale photo, preprocessed as the gate's manifest says.
fn gate_input(manifest: &ModelManifest, photo: &Path) -> Vec<f32> {
    let img = whaled::decode::decode_file(photo).unwrap();
    let mut t = Vec::new();
    Preprocessor::new(&manifest.input).run(&img, &mut t).unwrap();
    t
}

/// A copy of the generated ResNet-18 whose head is `Gemm(transB = 0)` with the weight stored [C, K]
/// (the same function: the exporters write either form), with its manifest (no digest) in `dir`.
fn resnet_with_untransposed_head(dir: &Path) -> std::path::PathBuf {
    use prost::Message;
    let src = resnet_manifest();
    let text = std::fs::read_to_string(&src).unwrap();
    let onnx = std::fs::read(src.parent().unwrap().join("resnet18_224.onnx")).unwrap();
    let mut model = tract_onnx::pb::ModelProto::decode(&onnx[..]).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let gemm = graph.node.iter_mut().find(|n| n.op_type == "Gemm").unwrap();
    let trans_b = gemm.attribute.iter_mut().find(|a| a.name == "transB").unwrap();
    assert_eq!(trans_b.i, 1);
    trans_b.i = 0;
    let weight = gemm.input[1].clone();
    let t = graph.initializer.iter_mut().find(|t| t.name == weight).unwrap();
    let (k, c) = (t.dims[0] as usize, t.dims[1] as usize);
    let w: Vec<f32> = t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    t.raw_data = (0..c)
        .flat_map(|ci| (0..k).map(move |ki| (ci, ki)))
        .flat_map(|(ci, ki)| w[ki * c + ci].to_le_bytes())
        .collect();
    t.dims = vec![c as i64, k as i64];
    let d = dir.join("resnet18-transb0");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("resnet18_224.onnx"), model.encode_to_vec()).unwrap();
    let manifest: String = text.lines().filter(|l| !l.starts_with("sha256")).map(|l| format!("{l}\n")).collect();
    std::fs::write(d.join("model.toml"), manifest.replace("name = \"resnet18-random\"", "name = \"resnet18-transb0\""))
        .unwrap();
    d.join("model.toml")
}

/// The head is linear and the pool is a mean, so the mean over cells of the head's per-cell logits must
/// be the gate's own logits: the rewritten graph, the head read from the Gemm and the per-cell product
/// are checked against the unmodified graph on both backends, for the shipped gate, the generated
/// EfficientNet-B0 (16 squeeze-excitation pools before the head's) and ResNet-18, and that ResNet with
/// its head stored the other way round (`transB = 0`).
#[test]
fn the_maps_cells_average_to_the_gates_own_logits() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = [
        repo().join("models/marine-gate-v2/model.toml"),
        b0_manifest(),
        resnet_manifest(),
        resnet_with_untransposed_head(dir.path()),
    ];
    let photo = &whales_dev("cetacean", 1)[0];
    for path in manifests {
        let manifest = ModelManifest::load(&path).unwrap();
        let input = gate_input(&manifest, photo);
        let (w, h) = (manifest.input.width, manifest.input.height);
        let variant = manifest.select_variant(Some("fp32"), BackendKind::Tract).unwrap().clone();
        let onnx = std::fs::read(&variant.file).unwrap();
        let (bytes, head) = feature_graph(&onnx, &manifest.input.name, w, h).unwrap();
        let cells = (w.div_ceil(STRIDE) * h.div_ceil(STRIDE)) as usize;
        for backend in backends() {
            let whole = Model::load(manifest.clone(), Some("fp32"), &inference(backend)).unwrap();
            let want = whole.run(&input).unwrap();
            let mut m = manifest.clone();
            m.output.name = "whaled_feature_map".into();
            m.output.kind = OutputKind::FeatureMap { channels: head.channels, cells };
            let fmap =
                Model::from_bytes(m, variant.clone(), bytes.clone(), String::new(), &inference(backend)).unwrap();
            let features = fmap.run(&input).unwrap();
            let logits = head.cell_logits(&features, cells);
            let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
            for (k, &want_k) in want.iter().enumerate() {
                let mean = (0..cells).map(|c| logits[c * head.classes + k]).sum::<f64>() / cells as f64;
                assert!(
                    (mean as f32 - want_k).abs() <= 1e-4 * scale,
                    "{} on {backend:?}: class {k}: mean of the cells' logits {mean} vs the gate's {want_k}",
                    manifest.name
                );
            }
        }
    }
}

/// Gates whose pool does not feed a final linear layer cannot be mapped this way, and say so at load.
#[test]
fn gates_without_a_linear_head_after_the_pool_are_refused_by_name() {
    let cases = [
        // v1: pool -> ImageNet classifier -> LogSoftmax -> trained Gemm.
        (repo().join("models/marine-gate-lite0/model.toml"), "computes more after its pool"),
        // A ViT: class token, no pool.
        (generated().join("vit-b16-mini/model.toml"), "a GlobalAveragePool"),
    ];
    for (path, want) in cases {
        let manifest = ModelManifest::load(&path).unwrap();
        let positive = [0];
        let gate = Model::load(manifest, Some("fp32"), &inference(BackendKind::Tract)).unwrap();
        let err = Locator::new(&gate, &positive, 640, &inference(BackendKind::Tract)).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("model.toml"), "{}: {err}", path.display());
    }
}

fn whaled(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_whaled")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn detections(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A 1920x1080 sea frame with a whale photo pasted at `(x, y)`, `size` px on its longer side. PNG, so
/// that whaled and this test decode the same pixels.
fn composite(size: u32, x: u32, y: u32) -> (RgbImage, PixelBox) {
    let ocean = std::fs::read_dir(shared_data().join("marine-dev/ocean"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .min()
        .unwrap();
    let sea = whaled::decode::decode_file(&ocean).unwrap();
    let mut canvas = image::imageops::resize(&sea, 1920, 1080, image::imageops::FilterType::Triangle);
    let whale = whaled::decode::decode_file(&whales_dev("cetacean", 3)[2]).unwrap();
    let s = f64::from(size) / f64::from(whale.width().max(whale.height()));
    let (pw, ph) = ((f64::from(whale.width()) * s).round() as u32, (f64::from(whale.height()) * s).round() as u32);
    let small = image::imageops::resize(&whale, pw, ph, image::imageops::FilterType::Triangle);
    image::imageops::replace(&mut canvas, &small, i64::from(x), i64::from(y));
    (canvas, PixelBox { x, y, w: pw, h: ph })
}

/// The embedder's crop for a `bbox` in a `width` x `height` frame, written out here: 15 % of the box's
/// width and height added on each side (outwards to whole pixels), clipped to the frame.
fn crop_of(b: [u32; 4], width: u32, height: u32) -> PixelBox {
    let (x, y, w, h) = (f64::from(b[0]), f64::from(b[1]), f64::from(b[2]), f64::from(b[3]));
    let x0 = (x - 0.15 * w).floor().max(0.0) as u32;
    let y0 = (y - 0.15 * h).floor().max(0.0) as u32;
    let x1 = ((x + w + 0.15 * w).ceil() as u32).min(width);
    let y1 = ((y + h + 0.15 * h).ceil() as u32).min(height);
    PixelBox { x: x0, y: y0, w: x1 - x0, h: y1 - y0 }
}

fn iou(a: [u32; 4], b: PixelBox) -> f64 {
    let ix = (a[0] + a[2]).min(b.x + b.w).saturating_sub(a[0].max(b.x));
    let iy = (a[1] + a[3]).min(b.y + b.h).saturating_sub(a[1].max(b.y));
    let inter = f64::from(ix) * f64::from(iy);
    inter / (f64::from(a[2]) * f64::from(a[3]) + f64::from(b.w) * f64::from(b.h) - inter)
}

fn png(img: &RgbImage) -> Arc<[u8]> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    Arc::from(out.into_inner())
}

/// With the map the embedder runs on the crop of the full-size frame around the box: the test cuts that
/// crop itself (the box grown by `MARGIN`, clipped) and embeds it as a whole photo, which must give the
/// same embedding; the whole frame's differs. The embedder is the Lite0's 1000 logits (content-sensitive,
/// unlike the random-weight B4 stand-in), the gate the shipped one, on both backends.
#[test]
fn the_embedder_sees_the_crop_around_the_box() {
    let dir = tempfile::tempdir().unwrap();
    let (frame, pasted) = composite(600, 1100, 420);
    let embedder = gallery_only_embedder(dir.path(), "models/efficientnet-lite0/efficientnet_lite0_fp32.onnx", "lite0");
    for backend in backends() {
        let text = format!(
            "[inference]\nbackend = \"{}\"\n[inference.onnxruntime]\nlibrary = \"{}\"\n\
             [prefilter]\nlocate = \"gate_map\"\n[identification]\nmodel = \"{}\"\n",
            backend.name(),
            ort_library().display(),
            embedder.display()
        );
        let cfg = Config::parse(&dir.path().join("whaled.toml"), &text).unwrap();
        let mut id = Identifier::from_config(&cfg, GalleryAccess::ReadOnly).unwrap();
        id.open_gates();
        let mut ws = id.workspace();
        let a = id.assess(&mut ws, &FrameData::Encoded(png(&frame)), "composite").unwrap();
        let bbox = a.bbox();
        assert!(a.located.is_some() && a.timings.locate_ms > 0.0, "{a:?}");
        assert!(iou(bbox, pasted) >= 0.3, "{backend:?}: bbox {bbox:?} vs the pasted whale {pasted:?}");
        let located = a.identified.expect("identified").embedding;

        let b = crop_of(bbox, 1920, 1080);
        let crop = image::imageops::crop_imm(&frame, b.x, b.y, b.w, b.h).to_image();
        let cropped = id.embed(&mut ws, &FrameData::Encoded(png(&crop)), "crop").unwrap();
        let diff = located.iter().zip(&cropped).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-6, "{backend:?}: the located embedding differs from the crop's by {diff}");
        let whole = id.embed(&mut ws, &FrameData::Encoded(png(&frame)), "frame").unwrap();
        let cosine: f32 = located.iter().zip(&whole).map(|(a, b)| a * b).sum();
        assert!(cosine < 0.95, "{backend:?}: the crop's embedding is the whole frame's (cosine {cosine})");
    }
}

/// The Detection `whaled identify` prints carries the map's box and its cost; with the default
/// (`locate = "frame"`) the box is the whole frame and the map never runs.
#[test]
fn detections_carry_the_maps_box() {
    let dir = tempfile::tempdir().unwrap();
    let (frame, pasted) = composite(400, 300, 600);
    let path = dir.path().join("frame.png");
    frame.save(&path).unwrap();
    // Threshold 0: every frame passes (this 400 px whale need not convince the whole-frame gate).
    let map = write(dir.path(), "map.toml", b"[prefilter]\nlocate = \"gate_map\"\nthreshold = 0.0\n");
    let d = &detections(&whaled(&["identify", "--config", map.to_str().unwrap(), path.to_str().unwrap()]))[0];
    let b: Vec<u32> = d["bbox"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert!(iou([b[0], b[1], b[2], b[3]], pasted) >= 0.3, "bbox {b:?} vs the pasted whale {pasted:?}");
    assert!(d["timings"]["locate_ms"].as_f64().unwrap() > 0.0, "{d}");
    // The same frame as a JPEG: the gate decodes it at a reduced DCT scale, the map and the box are
    // still in the full frame's pixels.
    let jpeg_path = dir.path().join("frame.jpg");
    std::fs::write(&jpeg_path, jpeg(&frame, 92)).unwrap();
    let dj = &detections(&whaled(&["identify", "--config", map.to_str().unwrap(), jpeg_path.to_str().unwrap()]))[0];
    let bj: Vec<u32> = dj["bbox"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert!(iou([bj[0], bj[1], bj[2], bj[3]], pasted) >= 0.3, "JPEG: bbox {bj:?} vs the pasted whale {pasted:?}");
    let plain = write(dir.path(), "plain.toml", b"[prefilter]\nthreshold = 0.0\n");
    let d = &detections(&whaled(&["identify", "--config", plain.to_str().unwrap(), path.to_str().unwrap()]))[0];
    assert_eq!(d["bbox"], serde_json::json!([0, 0, 1920, 1080]));
    assert_eq!(d["timings"]["locate_ms"].as_f64(), Some(0.0));
    // check-config builds and runs the map for a 16:9 frame as start-up does, and says so.
    let out = whaled(&["check-config", map.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("locate: gate_map, marine-gate-v2 cut at its pool (1280 channels, a 7-class head per 32 px cell), longer side 640 px"), "{text}");
}

/// `whaled eval` on the 48 hand-drawn boxes (models/localisation/marine-dev-boxes.csv): with the map the
/// Detection's `bbox` overlaps the drawn box at IoU >= 0.5 on 66.7 % of the photos (Python's
/// tools/localise_eval.py, on its own resize and onnxruntime, found 67 %); the whole frame, 29.2 %.
#[test]
fn eval_measures_the_maps_boxes_against_drawn_ones() {
    let csv_path = repo().join("models/localisation/marine-dev-boxes.csv");
    shared_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "map.toml", b"[prefilter]\nlocate = \"gate_map\"\n");
    let out = whaled(&["eval", "--config", cfg.to_str().unwrap(), "--manifest", csv_path.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let l = &r["localisation"];
    assert_eq!(l["n"].as_u64(), Some(48));
    let hit = l["iou_at_least_half"].as_f64().unwrap();
    assert!(hit >= 0.6, "{l}: the map's boxes, IoU >= 0.5 on {hit}");
    assert!(l["median_iou"].as_f64().unwrap() >= 0.55, "{l}");
}

/// The daemon with the map and sighting snapshots: an ended sighting's best frame arrives whole on
/// `.../sighting/<id>/snapshot` and, beside it, the crop the embedder saw on `.../sighting/<id>/crop`:
/// the best frame's Detection `bbox` grown by `MARGIN`, to the pixel.
#[test]
fn a_sightings_snapshot_comes_with_the_crop_around_the_animal() {
    use common::broker::{unsafe_kill, Broker, Subscriber};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let cam = dir.path().join("cam");
    std::fs::create_dir_all(&cam).unwrap();
    for (i, (x, y)) in [(200, 500), (900, 400), (1300, 600)].into_iter().enumerate() {
        composite(500, x, y).0.save(cam.join(format!("{i:03}.png"))).unwrap();
    }
    let broker = Broker::start(&dir.path().join("broker"), "");
    let embedder = gallery_only_embedder(dir.path(), "models/efficientnet-lite0/efficientnet_lite0_fp32.onnx", "lite0");
    let cfg = write(
        dir.path(),
        "whaled.toml",
        format!(
            "device_id = \"boat\"\n[prefilter]\nlocate = \"gate_map\"\nthreshold = 0.0\n\
             [identification]\nmodel = \"{}\"\n\
             [[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"{}\"\nfps = 2\n\
             [sightings]\npublish = \"both\"\nidentify_interval = \"1ms\"\nidentify_quality = 0.0\nsnapshot = true\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {}\n[mqtt.outbox]\ndir = \"{}\"\n",
            embedder.display(),
            cam.display(),
            broker.port,
            dir.path().join("outbox").display()
        )
        .as_bytes(),
    );
    let detections = Subscriber::start(broker.port, "shore-detections", "whaled/boat/bow/detection");
    let sightings = Subscriber::start(broker.port, "shore-sightings", "whaled/boat/bow/sighting");
    let images = Subscriber::start(broker.port, "shore-images", "whaled/boat/bow/sighting/+/+");
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = Killed(
        Command::new(env!("CARGO_BIN_EXE_whaled"))
            .args(["--log-level", "warn", "run", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut daemon.0;
    detections.wait_for(Duration::from_secs(120), "3 detections", |m| m.len() >= 3);
    unsafe_kill(child.id(), "TERM");
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "whaled did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ends = sightings
        .wait_for(Duration::from_secs(30), "a sighting's end", |m| m.iter().any(|x| x.json()["event"] == "end"));
    let end = ends.iter().map(|x| x.json()).find(|e| e["event"] == "end").unwrap();
    assert_eq!(end["best_frame"]["snapshot"], true, "{end}");
    let id = end["sighting_id"].as_str().unwrap().to_string();
    let best = end["best_frame"]["image_ind"].as_str().unwrap().to_string();
    let prefix = format!("whaled/boat/bow/sighting/{id}/");
    let got = images.wait_for(Duration::from_secs(30), "the snapshot and the crop", |m| {
        ["snapshot", "crop"].iter().all(|p| m.iter().any(|x| x.topic == format!("{prefix}{p}")))
    });
    let image = |part: &str| {
        let m = got.iter().find(|x| x.topic == format!("{prefix}{part}")).unwrap();
        assert!(m.payload.starts_with(&[0xFF, 0xD8]), "{part} is not a JPEG");
        image::load_from_memory(&m.payload).unwrap().to_rgb8()
    };
    assert_eq!(image("snapshot").dimensions(), (1920, 1080));
    let d =
        detections.snapshot().iter().map(|x| x.json()).find(|d| d["image_ind"] == best.as_str()).unwrap_or_else(|| {
            let inds: Vec<String> = detections.snapshot().iter().map(|x| x.json()["image_ind"].to_string()).collect();
            panic!("no detection for the best frame {best} among {inds:?}")
        });
    let b: Vec<u32> = d["bbox"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_ne!(b, [0, 0, 1920, 1080], "the best frame was not located: {d}");
    let g = crop_of([b[0], b[1], b[2], b[3]], 1920, 1080);
    let crop = image("crop");
    assert_eq!(crop.dimensions(), (g.w, g.h), "the crop of bbox {b:?}");
    // And it is that part of the best frame (both JPEG-coded: compared on average, within a few levels).
    let frames: Vec<RgbImage> =
        (0..3).map(|i| image::open(cam.join(format!("{i:03}.png"))).unwrap().to_rgb8()).collect();
    let diff = |f: &RgbImage| {
        let part = image::imageops::crop_imm(f, g.x, g.y, g.w, g.h).to_image();
        part.as_raw().iter().zip(crop.as_raw()).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>()
            / part.as_raw().len() as f64
    };
    let best_diff = frames.iter().map(diff).fold(f64::INFINITY, f64::min);
    assert!(best_diff < 4.0, "the crop matches none of the frames at {g:?} (mean |diff| {best_diff})");
}
