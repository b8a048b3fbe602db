//! whaled's stem convolution op for tract (crates/whaled-tract-ops/src/stem.rs: a dense convolution as
//! whaled's 1x1 op over the taps, direct or through an im2col matrix) against two independent
//! computations of the same convolution: tract's own op (the same ONNX file optimised with `stock =
//! true`) and onnxruntime (outputs written by tools/stem_cases.py through its Python API). The cases:
//! the stems of the shipped and generated models (Lite0's TF-padded 3x3 stride 2 with ReLU6, B0's and
//! B4's), SAME_UPPER, 5x5, dilation, unequal strides, one and four input channels, no bias, ResNet 3x3s
//! of 64-512 input channels (stride 1 and 2; 56x56 and smaller), ResNet-18's 7x7 stem (at 48 and 224),
//! a ViT patch embedding, rows 130 wide, random small geometries, at 1 and 2 threads (the scratch's
//! input channels and the product split across the pool), each run the way the case says (direct or
//! im2col, where every vector width agrees); and convolutions the op must leave to tract (a batch of 2,
//! 12 output channels, 16389 rows, rows 142 wide where it would not run direct: tract's direct
//! convolution), which must still be right.
//!
//! Compiled only where whaled substitutes the op (x86_64, aarch64), like tests/pointwise.rs.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

mod common;

use common::tract_ops::{generate_cases, load, max_diff, read_npy, run};

// This file is compiled only where the op is used.
const _: () = assert!(whaled_tract_ops::stem::ENABLED);

#[test]
fn whaled_stem_matches_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let cases = generate_cases("stem_cases.py", dir.path());
    assert!(cases.len() >= 20, "{} cases", cases.len());
    // Thread even the small cases at 2 threads, so the 1x1 op's split is exercised on every shape.
    tract_linalg::multithread::set_threading_element_threshold(0);
    let mut worst = (0f32, String::new());
    let mut paths = [0, 0];
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let want = usize::from(case["substituted"].as_bool().unwrap());
        let onnx = dir.path().join(format!("{name}.onnx"));
        let (shape, x) = read_npy(&dir.path().join(format!("{name}.input.npy")));
        let (ref_shape, reference) = read_npy(&dir.path().join(format!("{name}.ort.npy")));
        let stock = load(&onnx, &shape, true, 1, "WhaledStemConv");
        assert_eq!((stock.substituted.stem, stock.in_plan), (0, 0), "{name}: stock tract must not substitute");
        let (stock_shape, stock_out) = run(&stock.plan, &shape, &x);
        assert_eq!(stock_shape, ref_shape, "{name}: tract's own op disagrees with onnxruntime on the shape");
        for threads in [1, 2] {
            let ours = load(&onnx, &shape, false, threads, "WhaledStemConv");
            let (n, in_plan) = (ours.substituted.stem, ours.in_plan);
            assert_eq!((n, in_plan), (want, want), "{name}: substituted {n}, {in_plan} in the plan ({case})");
            assert_eq!(ours.fused, case["fused"].as_bool().unwrap(), "{name}: activation fusion ({case})");
            if let Some(path) = case["path"].as_str() {
                assert!(ours.info.contains(&format!(", {path}:")), "{name}: not run {path}: {}", ours.info);
                paths[usize::from(path == "direct")] += usize::from(threads == 1);
            }
            let (out_shape, out) = run(&ours.plan, &shape, &x);
            assert_eq!(out_shape, ref_shape, "{name}: output shape");
            // Random N(0,1) data and weights: outputs are O(sqrt(rows)); f32 sums of up to 80 terms.
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
    assert!(paths[0] >= 10 && paths[1] >= 6, "cases run through an im2col matrix / direct: {paths:?}");
    eprintln!("{} cases; worst |whaled - onnxruntime| / max |y| = {:e} ({})", cases.len(), worst.0, worst.1);
}
