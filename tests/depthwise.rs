//! whaled's depthwise-convolution op for tract (crates/whaled-tract-ops/src/depthwise.rs) against two independent
//! computations of the same convolution: tract's own op (the same ONNX file optimised with
//! `stock = true`) and onnxruntime (outputs written by tools/depthwise_cases.py through its Python API).
//! The cases: every depthwise geometry of the shipped and generated EfficientNets (3x3/5x5, strides
//! 1/2, PyTorch and TF-style padding, SAME_UPPER, 1632 and 1152 channels at 7x7, batch 2) and 40 random ones
//! (kernels 1-7, strides 1-3, dilations 1-3, asymmetric padding up to beyond the kernel's reach, some
//! convolutions without a bias), at 1 and 2 threads; the Lite0 geometries end in ReLU6 and some random
//! ones in ReLU, as in the models, which the op fuses. Outputs under 12 columns wide (the 7x7 layers, most
//! random cases, a batch-2 case of 37 channels: whole and partial blocks) take the op's channel-blocked
//! path, the rest its plane path.
//!
//! Compiled only where whaled substitutes the op (x86_64, aarch64): on armv7 tract's own op runs and
//! there is nothing of whaled's to compare, so the file is no test at all there rather than one that
//! passes having checked nothing.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

mod common;

use common::tract_ops::{generate_cases, load, max_diff, read_npy, run};

// This file is compiled only where the op is used.
const _: () = assert!(whaled_tract_ops::depthwise::ENABLED);

#[test]
fn whaled_depthwise_matches_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let cases = generate_cases("depthwise_cases.py", dir.path());
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
        let stock = load(&onnx, &shape, true, 1, "WhaledDepthwiseConv");
        let (stock_n, stock_in_plan) = (stock.substituted.depthwise, stock.in_plan);
        assert_eq!((stock_n, stock_in_plan), (0, 0), "{name}: stock tract must not substitute");
        let (stock_shape, stock_out) = run(&stock.plan, &shape, &x);
        assert_eq!(stock_shape, ref_shape, "{name}: tract's own op disagrees with onnxruntime on the shape");
        for threads in [1, 2] {
            let ours = load(&onnx, &shape, false, threads, "WhaledDepthwiseConv");
            let (n, in_plan, fused) = (ours.substituted.depthwise, ours.in_plan, ours.fused);
            assert_eq!((n, in_plan), (1, 1), "{name}: the depthwise conv was not substituted ({case})");
            assert_eq!(fused, !case["post"].is_null(), "{name}: the activation after the conv was not fused ({case})");
            let (out_shape, out) = run(&ours.plan, &shape, &x);
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
