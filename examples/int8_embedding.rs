//! How close an embedder's int8 variant stays to its fp32 file, per backend, on real photos: cosine of
//! the int8 embedding to the fp32 one (tract fp32 as the reference), the identification top-1 through
//! the head, and tract int8 against onnxruntime int8.
//!
//! cargo run --release --features onnxruntime --example int8_embedding -- MODEL.toml PHOTO...
//! (needs ORT_DYLIB_PATH). bench/int8.sh runs it on the exporter's stand-in checkpoint; figures go to
//! models/README.md ("int8 on tract").

use std::path::PathBuf;

use whaled::config::{ExecutionProvider, InferenceConfig, OrtConfig};
use whaled::head::IdentificationHead;
use whaled::manifest::{BackendKind, ModelManifest, Role};
use whaled::model::Model;
use whaled::preprocess::Preprocessor;
use whaled::scoring::rank;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let manifest_path = PathBuf::from(args.next().ok_or("usage: int8_embedding MODEL.toml PHOTO...")?);
    let photos: Vec<PathBuf> = args.map(PathBuf::from).collect();
    let manifest = ModelManifest::load(&manifest_path)?;
    let Role::Embedder(spec) = &manifest.role else { return Err("not an embedder".into()) };
    let head = spec
        .head
        .as_ref()
        .map(|h| IdentificationHead::load(manifest.path(), h, manifest.output.kind.values()))
        .transpose()?;
    let cfg = |backend| InferenceConfig {
        backend,
        threads: 1,
        jpeg_dct_scaling: true,
        tract_precision: whaled::config::TractPrecision::F32,
        onnxruntime: OrtConfig { library: None, execution_providers: vec![ExecutionProvider::Cpu], sessions: 1 },
    };
    let fp32 = Model::load(manifest.clone(), Some("fp32"), &cfg(BackendKind::Tract))?;
    let backends = [BackendKind::Tract, BackendKind::Onnxruntime];
    let int8: Vec<_> =
        backends.iter().map(|&b| Model::load(manifest.clone(), Some("int8"), &cfg(b))).collect::<Result<_, _>>()?;
    let mut pre = Preprocessor::new(&manifest.input);
    let mut input = Vec::new();
    let top1 = |e: &[f32]| {
        head.as_ref().map(|h| {
            let mut c = Vec::new();
            h.cosines(e, &mut c);
            rank(&c, spec.scale, 1)[0].slot
        })
    };
    let (mut worst, mut sum, mut same_top1, mut between) = ([f64::INFINITY; 2], [0f64; 2], [0usize; 2], f64::INFINITY);
    for p in &photos {
        pre.run(&whaled::decode::decode_file(p)?, &mut input)?;
        let reference = fp32.run(&input)?;
        let outs: Vec<Vec<f32>> = int8.iter().map(|m| m.run(&input)).collect::<Result<_, _>>()?;
        for (i, o) in outs.iter().enumerate() {
            let c = cosine(o, &reference);
            worst[i] = worst[i].min(c);
            sum[i] += c;
            same_top1[i] += usize::from(top1(o) == top1(&reference));
        }
        between = between.min(cosine(&outs[0], &outs[1]));
    }
    let n = photos.len();
    for (i, b) in backends.iter().enumerate() {
        println!(
            "{}: int8 embedding cosine to fp32: mean {:.5}, min {:.5} over {n} photos; same identification top-1 on {}/{n}",
            b.name(),
            sum[i] / n as f64,
            worst[i],
            same_top1[i]
        );
    }
    println!("tract int8 vs onnxruntime int8: min cosine {between:.5}");
    Ok(())
}
