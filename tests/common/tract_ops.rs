//! Helpers for the tests of whaled's own tract ops (tests/depthwise.rs, tests/pointwise.rs): the case
//! files a tools/*_cases.py script writes (ONNX model, input and onnxruntime's output per case), and a
//! model loaded with or without the substitution, with what was substituted and fused.

use std::path::Path;

use tract_onnx::prelude::*;
use whaled::backend::tract::{optimise, Substituted};

/// Runs `tools/<script>` into `dir` and returns its `cases.json`.
pub fn generate_cases(script: &str, dir: &Path) -> Vec<serde_json::Value> {
    let status = std::process::Command::new("python3")
        .current_dir(super::repo())
        .arg(format!("tools/{script}"))
        .arg("--out")
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "tools/{script} failed");
    serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap()
}

pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let f = std::fs::File::open(path).unwrap();
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f)).unwrap();
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    (shape, npy.into_vec::<f32>().unwrap())
}

/// A case's model, optimised and planned.
pub struct Loaded {
    pub plan: Arc<TypedRunnableModel>,
    pub substituted: Substituted,
    /// How many nodes named `op` survived into the plan.
    pub in_plan: usize,
    /// Whether a ReLU / ReLU6 was fused into one of them (its info lists the steps).
    pub fused: bool,
    /// Whether one of them takes its data times per-channel factors (a squeeze-excitation product
    /// folded into a pointwise conv: its info says so).
    pub scaled: bool,
    /// The info lines of those nodes, joined (where an op says which path it takes).
    pub info: String,
}

/// Loads `onnx` for input `shape`, through whaled's substitution unless `stock`, at `threads`
/// intra-op threads; `op` is the name of whaled's op under test. A fused activation must leave no
/// Max/Min op in the plan.
pub fn load(onnx: &Path, shape: &[usize], stock: bool, threads: usize, op: &str) -> Loaded {
    let mut model = tract_onnx::onnx().model_for_path(onnx).unwrap();
    model.set_input_fact(0, f32::fact(shape).into()).unwrap();
    let (typed, substituted) = optimise(model, stock, false).unwrap();
    // The op must survive tract's optimiser into the plan, not be rewritten away.
    let ours: Vec<_> = typed.nodes().iter().filter(|n| n.op().name() == op).collect();
    let in_plan = ours.len();
    let fused = ours.iter().any(|n| n.op().info().unwrap().iter().any(|l| l.contains("then [Max")));
    let scaled = ours.iter().any(|n| n.op().info().unwrap().iter().any(|l| l.contains("input scaled per channel")));
    let info = ours.iter().flat_map(|n| n.op().info().unwrap()).collect::<Vec<_>>().join("; ");
    let leftover = typed.nodes().iter().any(|n| n.op().name().contains("Max") || n.op().name().contains("Min"));
    assert!(stock || !fused || !leftover, "{onnx:?}: fused, yet a Max/Min op is left in the plan");
    let mut options = RunOptions::default();
    if threads > 1 {
        options.executor = Some(tract_linalg::multithread::Executor::multithread(threads));
    }
    let plan = typed.into_runnable_with_options(&options).unwrap();
    Loaded { plan, substituted, in_plan, fused, scaled, info }
}

/// The plan's first output on `x`: shape and values.
pub fn run(plan: &Arc<TypedRunnableModel>, shape: &[usize], x: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let out = plan.run(tvec![Tensor::from_shape(shape, x).unwrap().into_tvalue()]).unwrap();
    let view = out[0].to_plain_array_view::<f32>().unwrap();
    (view.shape().to_vec(), view.iter().copied().collect())
}

/// The largest |a - b| over two outputs of one computation, which must have the same length (a short
/// output fails here rather than being compared on its prefix, as `zip` alone would). NaN on either
/// side counts as an infinite difference (`f32::max` would skip it, and a kernel writing NaN would pass).
#[track_caller]
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "outputs of different lengths: {} and {} values", a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
}
