//! The int8 (static QDQ) models on tract with whaled's integer pointwise op
//! (crates/whaled-tract-ops/src/qpointwise.rs) and vectorised `QuantizeLinear`
//! (crates/whaled-tract-ops/src/quantize.rs), against two independent computations of the same model on
//! real photos: tract as it comes (`stock`: the QDQ graph in float, tract's own scalar quantization) and
//! onnxruntime (its integer kernels). Where the CPU has AVX-512 VNNI every 1x1 convolution of the int8
//! Lite0 must be on whaled's op; elsewhere none may be, and the vectorised quantization still runs.
#![cfg(feature = "onnxruntime")]

mod common;

use common::tract_ops::{load, max_diff, run};
use common::*;
use tract_onnx::prelude::*;
use whaled::manifest::{BackendKind, ModelManifest};
use whaled::model::Model;
use whaled::preprocess::Preprocessor;

/// Class probabilities of logits, as whaled scores them.
fn softmax(v: &[f32]) -> Vec<f32> {
    whaled::scoring::softmax(v.iter().map(|&x| f64::from(x))).into_iter().map(|p| p as f32).collect()
}

#[test]
fn int8_lite0_on_whaleds_integer_op_agrees_with_tract_and_onnxruntime() {
    check(&shipped_manifest(), "efficientnet_lite0_int8.onnx", 32);
}

/// The shipped marine gate's int8 variant (tools/quantize_model.py): the same backbone, a 7-class head.
#[test]
fn int8_marine_gate_on_whaleds_integer_op_agrees_with_tract_and_onnxruntime() {
    check(&repo().join("models/marine-gate-v2/model.toml"), "marine_gate_v2_int8.onnx", 32);
}

/// An EfficientNet-B0 (the generated one, random weights), quantized here by tools/quantize_model.py on
/// real photos: SiLU after every conv (a dequantize feeding both a sigmoid and a `Mul`, which whaled
/// turns into one lookup table) and squeeze-excitation (a per-channel `Mul` of u8 tensors), the
/// structure of the upstream's B4 at a fraction of its cost.
#[test]
fn int8_b0_with_silu_and_squeeze_excitation_agrees_with_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let src = generated().join("efficientnet-b0-random");
    for f in ["model.toml", "efficientnet_b0_224.onnx"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let manifest = dir.path().join("model.toml");
    let status = std::process::Command::new("python3")
        .arg(repo().join("tools/quantize_model.py"))
        .args(["--model".as_ref(), manifest.as_os_str(), "--set".as_ref(), "whales".as_ref()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "tools/quantize_model.py failed");
    // 16 expansions and projections and the head conv whose output channels are a multiple of 8; the
    // squeeze-excitation convs (on 1x1 planes, some of 4 or 6 channels) stay tract's.
    let substituted = check(&manifest, "efficientnet_b0_224_int8.onnx", 32);
    assert!(substituted.int8_tables >= 32, "{substituted:?}: the SiLUs as lookup tables");
    assert!(substituted.int8_binary >= 16, "{substituted:?}: squeeze-excitation and residual in u8");
}

/// Runs the manifest's int8 file (`onnx`, beside it) three ways on 8 whales-dev photos at 1 and 2 threads;
/// `pointwise` 1x1 convolutions must be on whaled's integer op where the CPU has AVX-512 VNNI. Returns
/// what was substituted.
fn check(manifest_path: &std::path::Path, onnx: &str, pointwise: usize) -> whaled::backend::tract::Substituted {
    let manifest = ModelManifest::load(manifest_path).unwrap();
    let onnx = manifest_path.parent().unwrap().join(onnx);
    assert!(
        manifest.variants().iter().any(|v| v.name == "int8" && manifest_path.parent().unwrap().join(&v.file) == onnx),
        "{}: no int8 variant for {}",
        manifest.name,
        onnx.display()
    );
    let shape = [1, 3, 224, 224];
    let stock = load(&onnx, &shape, true, 1, "WhaledQPointwiseConv");
    assert_eq!((stock.substituted.int8_pointwise, stock.in_plan), (0, 0), "stock tract must not substitute");
    let ort = Model::load(manifest.clone(), Some("int8"), &inference(BackendKind::Onnxruntime)).unwrap();
    let photos: Vec<_> = whales_dev("cetacean", 4).into_iter().chain(whales_dev("non_cetacean", 4)).collect();
    assert_eq!(photos.len(), 8);
    let mut pre = Preprocessor::new(&manifest.input);
    let inputs: Vec<Vec<f32>> = photos
        .iter()
        .map(|p| {
            let mut input = Vec::new();
            pre.run(&image::open(p).unwrap().to_rgb8(), &mut input).unwrap();
            input
        })
        .collect();
    let vnni = whaled_tract_ops::qpointwise::available();
    let mut substituted = None;
    for threads in [1, 2] {
        let ours = load(&onnx, &shape, false, threads, "WhaledQPointwiseConv");
        // The Lite0 backbone's 32 1x1 convolutions (16 expansions, 15 projections, the head conv).
        let want = if vnni { pointwise } else { 0 };
        assert_eq!(
            (ours.substituted.int8_pointwise, ours.in_plan),
            (want, want),
            "int8 pointwise convolutions substituted / in the plan (VNNI: {vnni})"
        );
        assert!(ours.substituted.quantize >= 25, "only {} quantizations vectorised", ours.substituted.quantize);
        let (mut worst_tract, mut worst_ort, mut worst_prob, mut worst_ref) = (0f32, 0f32, 0f32, 0f32);
        for (photo, x) in photos.iter().zip(&inputs) {
            let (_, a) = run(&ours.plan, &shape, x);
            let (_, b) = run(&stock.plan, &shape, x);
            let c = ort.run(x).unwrap();
            let (d_tract, d_ort, d_ref) = (max_diff(&a, &b), max_diff(&a, &c), max_diff(&b, &c));
            let (pa, pc) = (softmax(&a), softmax(&c));
            let d_prob = max_diff(&pa, &pc);
            eprintln!(
                "{} ({threads} threads): max |whaled - tract| = {d_tract:.4}, |whaled - onnxruntime| = {d_ort:.4} \
                 (logits span {:.1}), probabilities {d_prob:.4}; tract - onnxruntime {d_ref:.4}",
                photo.display(),
                c.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) - c.iter().fold(f32::INFINITY, |m, &v| m.min(v)),
            );
            assert_eq!(top_k(&a, 1), top_k(&c, 1), "{}: top-1 differs from onnxruntime's", photo.display());
            assert_eq!(top_k(&a, 1), top_k(&b, 1), "{}: top-1 differs from tract's", photo.display());
            (worst_tract, worst_ort, worst_prob) =
                (worst_tract.max(d_tract), worst_ort.max(d_ort), worst_prob.max(d_prob));
            worst_ref = worst_ref.max(d_ref);
        }
        // A u8 level off somewhere (a near-tie rounded the other way: whaled's op sums in i32 and
        // scales once, tract sums the dequantized values in float, onnxruntime requantizes its i32 sums)
        // moves the logits by a few of their quantization levels (0.047-0.062 here); tract's own float
        // QDQ graph and onnxruntime are 1-3 levels apart. Measured worst, whaled against either: 0.31
        // (Lite0, 5 levels) and 0.19 (gate, 4 levels); probabilities within 0.04.
        assert!(worst_tract <= 0.4, "max |whaled - tract| = {worst_tract}");
        assert!(worst_ort <= 0.4, "max |whaled - onnxruntime| = {worst_ort} (tract's own graph: {worst_ref})");
        assert!(worst_prob <= 0.05, "max probability difference {worst_prob}");
        substituted = Some(ours.substituted);
    }
    substituted.unwrap()
}

/// A model parsed, decluttered, changed by `substitute` and optimised into a plan, at `threads` intra-op
/// threads.
fn plan_with(
    onnx: &std::path::Path,
    shape: &[usize],
    threads: usize,
    substitute: impl Fn(&mut TypedModel) -> TractResult<()>,
) -> std::sync::Arc<TypedRunnableModel> {
    let mut model = tract_onnx::onnx().model_for_path(onnx).unwrap();
    model.set_input_fact(0, f32::fact(shape).into()).unwrap();
    let mut typed = model.into_typed().unwrap().into_decluttered().unwrap();
    substitute(&mut typed).unwrap();
    let mut options = RunOptions::default();
    if threads > 1 {
        options.executor = Some(tract_linalg::multithread::Executor::multithread(threads));
    }
    typed.into_optimized().unwrap().into_runnable_with_options(&options).unwrap()
}

/// Each int8 op against tract's own graph on small QDQ graphs as onnxruntime's quantizer writes them
/// (tools/int8_cases.py: zero points away from 0, weight rows short of 127 steps, a batch of 2, SiLU,
/// squeeze-excitation, a residual), op by op so that a wrong scale or zero point in a substitution shows:
/// the vectorised quantize with the tables and u8 `Mul` / `Add` must give tract's output bit for bit; the
/// integer 1x1 op (VNNI here, or the portable kernel where the CPU has none, through
/// `substitute_with_any_kernel`) at most one output level off, on at most 2 % of the values (a sum in
/// i32 against tract's float sum rounds a near-tie the other way). A zero point off by one shifts every
/// output of a channel by `s_x * sum w`, which this count catches.
#[test]
fn each_int8_op_matches_tracts_own_graph_on_small_qdq_graphs() {
    tract_linalg::multithread::set_threading_element_threshold(0);
    let dir = tempfile::tempdir().unwrap();
    let cases = common::tract_ops::generate_cases("int8_cases.py", dir.path());
    assert_eq!(cases.len(), 3);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let step = case["step"].as_f64().unwrap() as f32;
        let onnx = dir.path().join(format!("{name}.onnx"));
        let (shape, x) = common::tract_ops::read_npy(&dir.path().join(format!("{name}.input.npy")));
        let (_, want) = run(&plan_with(&onnx, &shape, 1, |_| Ok(())), &shape, &x);
        let counts = std::cell::Cell::new((0, 0, 0));
        let elementwise = |m: &mut TypedModel| -> TractResult<()> {
            let q = whaled_tract_ops::quantize::substitute(m)?;
            let (t, b) = whaled_tract_ops::qelementwise::substitute(m)?;
            counts.set((q, t, b));
            Ok(())
        };
        for threads in [1, 2] {
            let (_, got) = run(&plan_with(&onnx, &shape, threads, elementwise), &shape, &x);
            assert_eq!(
                got, want,
                "{name} ({threads} threads): quantize, tables and u8 Mul/Add must be tract's bit for bit"
            );
        }
        let (q, t, b) = counts.get();
        assert!(q >= 1, "{name}: no quantization vectorised");
        if name == "silu-se-residual" {
            // The SiLU's sigmoid (its dequantized input also feeds the Mul; tract tables the
            // squeeze-excitation gate itself, a single-consumer chain), then the SiLU's Mul fused into
            // one table, the per-channel Mul and the residual Add.
            assert!(t >= 1 && b >= 3, "{name}: {t} tables, {b} u8 Mul/Add");
        }
        let n = std::cell::Cell::new(0);
        let integer = |m: &mut TypedModel| -> TractResult<()> {
            n.set(whaled_tract_ops::qpointwise::substitute_with_any_kernel(m)?);
            elementwise(m)
        };
        for threads in [1, 2] {
            let (_, got) = run(&plan_with(&onnx, &shape, threads, integer), &shape, &x);
            let levels: Vec<f32> = got.iter().zip(&want).map(|(a, b)| ((a - b) / step).abs()).collect();
            let worst = levels.iter().fold(0f32, |m, &l| m.max(l));
            let off = levels.iter().filter(|&&l| l > 0.5).count();
            eprintln!(
                "{name} ({threads} threads): {} int8 1x1 convs; {off} of {} values a level off",
                n.get(),
                levels.len()
            );
            // Every 1x1 conv on a plane; the squeeze-excitation's two on its pooled 1x1 values stay
            // tract's in this graph (they are a few hundred multiply-adds).
            let want = match name {
                "pointwise" => 2,
                "batch2" => 1,
                _ => 2,
            };
            assert_eq!(n.get(), want, "{name}: 1x1 convs on the integer op");
            assert!(worst <= 1.01, "{name} ({threads} threads): {worst} levels off tract");
            assert!(
                off * 50 <= levels.len(),
                "{name} ({threads} threads): {off} of {} values a level off",
                levels.len()
            );
        }
    }
}
