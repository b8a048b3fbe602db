//! How often the int8 pre-filter keeps the fp32 model's ImageNet top-1, per backend, on a labelled set.
//!
//! cargo run --release --features onnxruntime --example int8_agreement -- ../shared/data/whales-dev/manifest.csv
//! (needs ORT_DYLIB_PATH). Figures go to models/README.md.

use std::path::PathBuf;

use whaled::config::{ExecutionProvider, InferenceConfig, OrtConfig};
use whaled::manifest::{BackendKind, ModelManifest, Role};
use whaled::model::Model;
use whaled::preprocess::Preprocessor;
use whaled::scoring::{prefilter_score, softmax};

/// fp32 top-1 probability from which an ImageNet top-1 counts as a real decision, not a near-tie.
const CONFIDENT: f64 = 0.3;

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

fn top5(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(5);
    idx
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let csv = PathBuf::from(std::env::args().nth(1).ok_or("usage: int8_agreement MANIFEST.csv")?);
    let samples = whaled::eval::read_manifest(&csv)?;
    let manifest =
        ModelManifest::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0/model.toml"))?;
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
    let Role::Prefilter(gate) = &manifest.role else { return Err("not a pre-filter".into()) };
    let kind = manifest.output.kind;
    let (mut same_top1, mut in_top5, mut backends_agree) = ([0usize; 2], [0usize; 2], 0usize);
    let (mut confident, mut confident_same, mut same_verdict) = (0usize, [0usize; 2], [0usize; 2]);
    for s in &samples {
        pre.run(&whaled::decode::decode_file(&s.path)?, &mut input)?;
        let reference = fp32.run(&input)?;
        let want = argmax(&reference);
        let p_top1 = softmax(reference.iter().map(|&v| f64::from(v)))[want];
        let is_confident = p_top1 >= CONFIDENT;
        confident += usize::from(is_confident);
        let verdict = |o: &[f32]| prefilter_score(o, kind, &gate.positive_classes) >= gate.threshold.get();
        let outs: Vec<Vec<f32>> = int8.iter().map(|m| m.run(&input)).collect::<Result<_, _>>()?;
        for (i, o) in outs.iter().enumerate() {
            same_top1[i] += usize::from(argmax(o) == want);
            confident_same[i] += usize::from(is_confident && argmax(o) == want);
            in_top5[i] += usize::from(top5(o).contains(&want));
            same_verdict[i] += usize::from(verdict(o) == verdict(&reference));
        }
        backends_agree += usize::from(argmax(&outs[0]) == argmax(&outs[1]));
    }
    let n = samples.len();
    for (i, b) in backends.iter().enumerate() {
        println!(
            "{}: int8 top-1 == fp32 top-1 on {}/{n} ({}/{confident} where fp32 top-1 p >= {CONFIDENT}); fp32 top-1 within int8 top-5 on {}/{n}; same gate verdict on {}/{n}",
            b.name(), same_top1[i], confident_same[i], in_top5[i], same_verdict[i]
        );
    }
    println!("tract int8 and onnxruntime int8 have the same top-1 on {backends_agree}/{n}");
    Ok(())
}
