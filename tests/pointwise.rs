//! whaled's pointwise (1x1) convolution op for tract (crates/whaled-tract-ops/src/pointwise.rs) against two
//! independent computations of the same convolution: tract's own op (the same ONNX file optimised with
//! `stock = true`) and onnxruntime (outputs written by tools/pointwise_cases.py through its Python API).
//! The cases: the 1x1 layers of the shipped and generated models (Lite0 expansions ending in ReLU6,
//! which the op fuses, and projections; EfficientNet-B4 at 512 with SiLU, which it does not; the head;
//! a ResNet bottleneck with ReLU), a batch of 2, random shapes at every tile width and tail, with and
//! without bias, at 1 and 2 threads; and 1x1 convolutions the op must leave to tract (output channels
//! not a multiple of 8, padded, grouped), which must still be right; a strided 1x1 (tract makes it a
//! subsampling and a 1x1) is substituted.

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

/// The plan, how many convs were substituted, how many of whaled's pointwise ops are in the plan, and
/// whether an activation was fused into one.
fn load(onnx: &Path, shape: &[usize], stock: bool, threads: usize) -> (Arc<TypedRunnableModel>, usize, usize, bool) {
    let mut model = tract_onnx::onnx().model_for_path(onnx).unwrap();
    model.set_input_fact(0, f32::fact(shape).into()).unwrap();
    let (typed, substituted) = optimise(model, stock, false).unwrap();
    assert_eq!(substituted.depthwise, 0, "{onnx:?}: a 1x1 conv with one group is no depthwise conv");
    let ours: Vec<_> = typed.nodes().iter().filter(|n| n.op().name() == "WhaledPointwiseConv").collect();
    let in_plan = ours.len();
    let fused = ours.iter().any(|n| n.op().info().unwrap().iter().any(|l| l.contains("then [Max")));
    let leftover = typed.nodes().iter().any(|n| n.op().name().contains("Max") || n.op().name().contains("Min"));
    assert!(stock || !fused || !leftover, "{onnx:?}: fused, yet a Max/Min op is left in the plan");
    let mut options = RunOptions::default();
    if threads > 1 {
        options.executor = Some(tract_linalg::multithread::Executor::multithread(threads));
    }
    let plan = typed.into_runnable_with_options(&options).unwrap();
    (plan, substituted.pointwise, in_plan, fused)
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
fn whaled_pointwise_matches_tract_and_onnxruntime() {
    if !whaled_tract_ops::pointwise::ENABLED {
        eprintln!("whaled's pointwise op is not used on this architecture: tract's own runs (nothing to compare)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("python3")
        .current_dir(common::repo())
        .arg("tools/pointwise_cases.py")
        .arg("--out")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "tools/pointwise_cases.py failed");
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.path().join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    // Thread even the small cases at 2 threads, so the block split across the pool is exercised on every shape.
    tract_linalg::multithread::set_threading_element_threshold(0);
    let mut worst = (0f32, String::new());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let want_substituted = case["substituted"].as_bool().unwrap();
        let onnx = dir.path().join(format!("{name}.onnx"));
        let (shape, x) = read_npy(&dir.path().join(format!("{name}.input.npy")));
        let (ref_shape, reference) = read_npy(&dir.path().join(format!("{name}.ort.npy")));
        let (stock, stock_n, stock_in_plan, _) = load(&onnx, &shape, true, 1);
        assert_eq!((stock_n, stock_in_plan), (0, 0), "{name}: stock tract must not substitute");
        let (stock_shape, stock_out) = run(&stock, &shape, &x);
        assert_eq!(stock_shape, ref_shape, "{name}: tract's own op disagrees with onnxruntime on the shape");
        for threads in [1, 2] {
            let (ours, n, in_plan, fused) = load(&onnx, &shape, false, threads);
            let want = usize::from(want_substituted);
            assert_eq!((n, in_plan), (want, want), "{name}: substituted {n}, {in_plan} in the plan ({case})");
            assert_eq!(fused, case["fused"].as_bool().unwrap(), "{name}: activation fusion ({case})");
            let (out_shape, out) = run(&ours, &shape, &x);
            assert_eq!(out_shape, ref_shape, "{name}: output shape");
            // Random N(0,1) data and weights: outputs are O(sqrt(cin)); f32 sums of up to 1632 terms.
            let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
            let d_ort = max_diff(&out, &reference);
            let d_tract = max_diff(&out, &stock_out);
            assert!(d_ort <= 1e-5 * scale, "{name} ({threads} threads): max |whaled - onnxruntime| = {d_ort} ({case})");
            assert!(d_tract <= 1e-5 * scale, "{name} ({threads} threads): max |whaled - tract| = {d_tract} ({case})");
            if d_ort / scale > worst.0 {
                worst = (d_ort / scale, name.to_string());
            }
        }
    }
    eprintln!("{} cases; worst |whaled - onnxruntime| / max |y| = {:e} ({})", cases.len(), worst.0, worst.1);
}
