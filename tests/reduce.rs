//! whaled's trailing-sum op for tract (crates/whaled-tract-ops/src/reduce.rs) against two independent
//! computations of the same reduction: tract's own op (the same ONNX file optimised with
//! `stock = true`) and onnxruntime (outputs written by tools/reduce_cases.py through its Python API).
//! The cases: the squeeze-excitation squeezes of the EfficientNets as exported (GlobalAveragePool,
//! ReduceMean over H and W, with and without keepdims, negative axes, batch 2, up to 1152 channels and
//! 112x112 planes), ReduceSum over the last one, two and three axes; and reductions it must leave to
//! tract (the channel axis, non-trailing axes, a max), at 1 and 2 threads.
//!
//! Compiled only where whaled substitutes the op (x86_64, aarch64).
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

mod common;

use common::tract_ops::{generate_cases, load, max_diff, read_npy, run};

const _: () = assert!(whaled_tract_ops::reduce::ENABLED);

#[test]
fn whaled_trailing_sum_matches_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let cases = generate_cases("reduce_cases.py", dir.path());
    assert!(cases.len() >= 12, "{} cases", cases.len());
    // Thread even the small cases at 2 threads, so the split across the pool is exercised.
    tract_linalg::multithread::set_threading_element_threshold(0);
    let mut worst = (0f32, String::new());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let substituted = case["substituted"].as_bool().unwrap();
        let onnx = dir.path().join(format!("{name}.onnx"));
        let (shape, x) = read_npy(&dir.path().join(format!("{name}.input.npy")));
        let (ref_shape, reference) = read_npy(&dir.path().join(format!("{name}.ort.npy")));
        let stock = load(&onnx, &shape, true, 1, "WhaledTrailingSum");
        assert_eq!((stock.substituted.sums, stock.in_plan), (0, 0), "{name}: stock tract must not substitute");
        let (stock_shape, stock_out) = run(&stock.plan, &shape, &x);
        assert_eq!(stock_shape, ref_shape, "{name}: tract's own op disagrees with onnxruntime on the shape");
        for threads in [1, 2] {
            let ours = load(&onnx, &shape, false, threads, "WhaledTrailingSum");
            let want = usize::from(substituted);
            assert_eq!((ours.substituted.sums, ours.in_plan), (want, want), "{name}: substituted ({case})");
            let (out_shape, out) = run(&ours.plan, &shape, &x);
            assert_eq!(out_shape, ref_shape, "{name}: output shape");
            // Inputs N(0.5, 1): sums of up to 12544 values (means of them), compared at the scale of the
            // largest output.
            let scale = reference.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
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
