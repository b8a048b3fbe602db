//! whaled's max-pooling op for tract (crates/whaled-tract-ops/src/maxpool.rs) against two independent
//! computations of the same pooling: tract's own op (the same ONNX file optimised with `stock = true`)
//! and onnxruntime (outputs written by tools/maxpool_cases.py through its Python API). The cases: the
//! ResNet stem's 3x3 stride-2 pool over 64 planes of 112x112, SAME_UPPER, 2x2 stride 2, ceil_mode,
//! unequal kernels and strides, dilation, wide padding over negative inputs (the padding must never
//! win), batch 2, at 1 and 2 threads; and a pool with an indices output, which must stay tract's.
//! A maximum is exact: the outputs must be equal, not close.
//!
//! Compiled only where whaled substitutes the op (x86_64, aarch64).
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

mod common;

use common::tract_ops::{generate_cases, load, max_diff, read_npy, run};

const _: () = assert!(whaled_tract_ops::maxpool::ENABLED);

#[test]
fn whaled_max_pool_matches_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let cases = generate_cases("maxpool_cases.py", dir.path());
    assert!(cases.len() >= 9, "{} cases", cases.len());
    tract_linalg::multithread::set_threading_element_threshold(0);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let substituted = case["substituted"].as_bool().unwrap();
        let onnx = dir.path().join(format!("{name}.onnx"));
        let (shape, x) = read_npy(&dir.path().join(format!("{name}.input.npy")));
        let (ref_shape, reference) = read_npy(&dir.path().join(format!("{name}.ort.npy")));
        let stock = load(&onnx, &shape, true, 1, "WhaledMaxPool");
        assert_eq!((stock.substituted.pools, stock.in_plan), (0, 0), "{name}: stock tract must not substitute");
        let (stock_shape, stock_out) = run(&stock.plan, &shape, &x);
        assert_eq!(stock_shape, ref_shape, "{name}: tract's own op disagrees with onnxruntime on the shape");
        for threads in [1, 2] {
            let ours = load(&onnx, &shape, false, threads, "WhaledMaxPool");
            let want = usize::from(substituted);
            assert_eq!((ours.substituted.pools, ours.in_plan), (want, want), "{name}: substituted ({case})");
            let (out_shape, out) = run(&ours.plan, &shape, &x);
            assert_eq!(out_shape, ref_shape, "{name}: output shape");
            assert_eq!(max_diff(&out, &reference), 0.0, "{name} ({threads} threads): whaled vs onnxruntime ({case})");
            assert_eq!(max_diff(&out, &stock_out), 0.0, "{name} ({threads} threads): whaled vs tract ({case})");
        }
    }
}
