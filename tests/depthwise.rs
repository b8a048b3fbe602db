//! whaled's depthwise-convolution op for tract (crates/whaled-tract-ops/src/depthwise.rs) against two independent
//! computations of the same convolution: tract's own op (the same ONNX file optimised with
//! `stock = true`) and onnxruntime (outputs written by tools/depthwise_cases.py through its Python API).
//! The cases: every depthwise geometry of the shipped and generated EfficientNets (3x3/5x5, strides
//! 1/2, PyTorch and TF-style padding, SAME_UPPER, 1632 channels at 7x7, batch 2) and 40 random ones
//! (kernels 1-7, strides 1-3, dilations 1-3, asymmetric padding up to beyond the kernel's reach, some
//! convolutions without a bias), at 1 and 2 threads; the Lite0 geometries end in ReLU6 and some random
//! ones in ReLU, as in the models, which the op fuses.

mod common;

use std::path::Path;

use tract_onnx::prelude::*;
use whaled::backend::tract::optimise;

fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let f = std::fs::File::open(path).unwrap();
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f)).unwrap();
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    (shape, npy.into_vec::<f32>().unwrap())
}

/// The plan, how many convs were substituted, how many of whaled's ops are in the plan, and whether a
/// ReLU/ReLU6 was fused into one.
fn load(onnx: &Path, shape: &[usize], stock: bool, threads: usize) -> (Arc<TypedRunnableModel>, usize, usize, bool) {
    let mut model = tract_onnx::onnx().model_for_path(onnx).unwrap();
    model.set_input_fact(0, f32::fact(shape).into()).unwrap();
    let (typed, substituted) = optimise(model, stock, false).unwrap();
    let substituted = substituted.depthwise;
    // The op must survive tract's optimiser into the plan, not be rewritten away.
    let ours: Vec<_> = typed.nodes().iter().filter(|n| n.op().name() == "WhaledDepthwiseConv").collect();
    let in_plan = ours.len();
    // A ReLU / ReLU6 after the conv is fused into the op (its info lists the steps), leaving no Max/Min.
    let fused = ours.iter().any(|n| n.op().info().unwrap().iter().any(|l| l.contains("then [Max")));
    let leftover = typed.nodes().iter().any(|n| n.op().name().contains("Max") || n.op().name().contains("Min"));
    assert!(stock || !fused || !leftover, "{onnx:?}: fused, yet a Max/Min op is left in the plan");
    let mut options = RunOptions::default();
    if threads > 1 {
        options.executor = Some(tract_linalg::multithread::Executor::multithread(threads));
    }
    let plan = typed.into_runnable_with_options(&options).unwrap();
    (plan, substituted, in_plan, fused)
}

fn run(plan: &Arc<TypedRunnableModel>, shape: &[usize], x: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let out = plan.run(tvec![Tensor::from_shape(shape, x).unwrap().into_tvalue()]).unwrap();
    let view = out[0].to_plain_array_view::<f32>().unwrap();
    (view.shape().to_vec(), view.iter().copied().collect())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    // NaN counts as the largest difference (f32::max would skip it).
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
}

#[test]
fn whaled_depthwise_matches_tract_and_onnxruntime() {
    if !whaled_tract_ops::depthwise::ENABLED {
        eprintln!("whaled's depthwise op is not used on this architecture: tract's own runs (nothing to compare)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("python3")
        .current_dir(common::repo())
        .arg("tools/depthwise_cases.py")
        .arg("--out")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "tools/depthwise_cases.py failed");
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.path().join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 45, "{} cases", cases.len());
    // Thread even the small cases at 2 threads (tract's default keeps outputs under 32768 elements inline),
    // so the plane split across the pool is exercised on every geometry.
    tract_linalg::multithread::set_threading_element_threshold(0);
    let mut worst = (0f32, String::new());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let onnx = dir.path().join(format!("{name}.onnx"));
        let (shape, x) = read_npy(&dir.path().join(format!("{name}.input.npy")));
        let (ref_shape, reference) = read_npy(&dir.path().join(format!("{name}.ort.npy")));
        let (stock, stock_n, stock_in_plan, _) = load(&onnx, &shape, true, 1);
        assert_eq!((stock_n, stock_in_plan), (0, 0), "{name}: stock tract must not substitute");
        let (stock_shape, stock_out) = run(&stock, &shape, &x);
        assert_eq!(stock_shape, ref_shape, "{name}: tract's own op disagrees with onnxruntime on the shape");
        for threads in [1, 2] {
            let (ours, n, in_plan, fused) = load(&onnx, &shape, false, threads);
            assert_eq!((n, in_plan), (1, 1), "{name}: the depthwise conv was not substituted ({case})");
            assert_eq!(fused, !case["post"].is_null(), "{name}: the activation after the conv was not fused ({case})");
            let (out_shape, out) = run(&ours, &shape, &x);
            assert_eq!(out_shape, ref_shape, "{name}: output shape");
            // Random N(0,1) data and weights: outputs are O(sqrt(taps)); f32 sums of up to 49 terms.
            let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
            let d_ort = max_diff(&out, &reference);
            let d_tract = max_diff(&out, &stock_out);
            assert!(d_ort <= 1e-5 * scale, "{name} ({threads} threads): max |whaled - onnxruntime| = {d_ort} ({case})");
            assert!(d_tract <= 1e-5 * scale, "{name} ({threads} threads): max |whaled - tract| = {d_tract} ({case})");
            if d_ort > worst.0 {
                worst = (d_ort, name.to_string());
            }
        }
    }
    eprintln!("{} cases; worst |whaled - onnxruntime| = {:e} ({})", cases.len(), worst.0, worst.1);
}
