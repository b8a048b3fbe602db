//! whaled's pointwise (1x1) convolution op for tract (crates/whaled-tract-ops/src/pointwise.rs) against two
//! independent computations of the same convolution: tract's own op (the same ONNX file optimised with
//! `stock = true`) and onnxruntime (outputs written by tools/pointwise_cases.py through its Python API).
//! The cases: the 1x1 layers of the shipped and generated models (Lite0 expansions ending in ReLU6,
//! which the op fuses, and projections; EfficientNet-B4 at 512 with SiLU, which it does not; the head;
//! a ResNet bottleneck with ReLU), a batch of 2, random shapes at every tile width and tail, with and
//! without bias, at 1 and 2 threads; squeeze-excitation products feeding the conv (folded into its
//! weights where the plane is at least as large as the output channels and the batch is 1, left to
//! tract elsewhere); and 1x1 convolutions the op must leave to tract (output channels
//! not a multiple of 8, padded, grouped), which must still be right; a strided 1x1 (tract makes it a
//! subsampling and a 1x1) is substituted.
//!
//! Compiled only where whaled substitutes the op (x86_64, aarch64): on armv7 tract's own op runs and
//! there is nothing of whaled's to compare, so the file is no test at all there rather than one that
//! passes having checked nothing.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

mod common;

use common::tract_ops::{generate_cases, load, max_diff, read_npy, run};

// This file is compiled only where the op is used.
const _: () = assert!(whaled_tract_ops::pointwise::ENABLED);

#[test]
fn whaled_pointwise_matches_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let cases = generate_cases("pointwise_cases.py", dir.path());
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
        let stock = load(&onnx, &shape, true, 1, "WhaledPointwiseConv");
        let (stock_n, stock_in_plan) = (stock.substituted.pointwise, stock.in_plan);
        assert_eq!((stock_n, stock_in_plan), (0, 0), "{name}: stock tract must not substitute");
        let (stock_shape, stock_out) = run(&stock.plan, &shape, &x);
        assert_eq!(stock_shape, ref_shape, "{name}: tract's own op disagrees with onnxruntime on the shape");
        for threads in [1, 2] {
            let ours = load(&onnx, &shape, false, threads, "WhaledPointwiseConv");
            let (n, in_plan, fused) = (ours.substituted.pointwise, ours.in_plan, ours.fused);
            assert_eq!(ours.substituted.depthwise, 0, "{name}: a 1x1 conv with one group is no depthwise conv");
            let want = usize::from(want_substituted);
            assert_eq!((n, in_plan), (want, want), "{name}: substituted {n}, {in_plan} in the plan ({case})");
            assert_eq!(fused, case["fused"].as_bool().unwrap(), "{name}: activation fusion ({case})");
            assert_eq!(ours.scaled, case["scaled"].as_bool().unwrap(), "{name}: input scale folded ({case})");
            let (out_shape, out) = run(&ours.plan, &shape, &x);
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
