//! whaled's fused expand -> depthwise op for tract (crates/whaled-tract-ops/src/expand.rs) against two
//! independent computations of the same block: tract's own ops (the same ONNX file optimised with
//! `stock = true`) and onnxruntime (outputs written by tools/expand_cases.py through its Python API).
//! The cases: the EfficientNet-Lite0 blocks with large expanded activations (112x112, 56x56 with 3x3
//! and TF-padded stride-2 5x5, 28x28), a 14x14 block of 60 channel blocks, odd sizes without
//! activations and with ReLU, the B0's SiLU blocks, two blocks in a row, a network's stem conv into its
//! first depthwise conv (its product run direct, and through its im2col matrix, as each case says),
//! blocks whose depthwise conv takes the blocked path (7x7 in two groups, a stride-2 5x5 into 7x7, and
//! where the CPU has AVX-512 a 14x14 and a 16x16 5x5); and pairs it must leave apart (the expanded
//! activation also read by a residual add, after ReLU6 and after SiLU, a batch of 2), at 1 and 2
//! threads.
//!
//! Compiled only where whaled fuses the pair (x86_64, aarch64).
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

mod common;

use common::tract_ops::{generate_cases, load, max_diff, read_npy, run};

const _: () = assert!(whaled_tract_ops::expand::ENABLED);

#[test]
fn whaled_expand_depthwise_matches_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let cases = generate_cases("expand_cases.py", dir.path());
    assert!(cases.len() >= 20, "{} cases", cases.len());
    // Thread even the small cases at 2 threads, so the split into channel groups is exercised.
    tract_linalg::multithread::set_threading_element_threshold(0);
    let mut worst = (0f32, String::new());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        // On aarch64 tract's declutter takes some chains channel-last, where whaled's ops do not run.
        let key = if cfg!(target_arch = "aarch64") { "fused_aarch64" } else { "fused" };
        let want = case[key].as_u64().unwrap() as usize;
        let onnx = dir.path().join(format!("{name}.onnx"));
        let (shape, x) = read_npy(&dir.path().join(format!("{name}.input.npy")));
        let (ref_shape, reference) = read_npy(&dir.path().join(format!("{name}.ort.npy")));
        let stock = load(&onnx, &shape, true, 1, "WhaledExpandDepthwise");
        assert_eq!((stock.substituted.expand_depthwise, stock.in_plan), (0, 0), "{name}: stock tract must not fuse");
        let (stock_shape, stock_out) = run(&stock.plan, &shape, &x);
        assert_eq!(stock_shape, ref_shape, "{name}: tract's own ops disagree with onnxruntime on the shape");
        for threads in [1, 2] {
            let ours = load(&onnx, &shape, false, threads, "WhaledExpandDepthwise");
            assert_eq!((ours.substituted.expand_depthwise, ours.in_plan), (want, want), "{name}: fused pairs ({case})");
            if let (Some(path), true) = (case["stem_path"].as_str(), want > 0) {
                assert!(ours.info.contains(&format!(", {path}:")), "{name}: stem not run {path}: {}", ours.info);
            }
            if want > 0 {
                // Which path each depthwise conv takes, as the op says (`Geometry::blocked`).
                let said: Vec<bool> = ours
                    .info
                    .split("; ")
                    .filter(|l| l.contains("dilation"))
                    .map(|l| l.contains(", blocked,"))
                    .collect();
                let expected: Vec<bool> = case["depthwise_blocked"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| match p.as_str() {
                        Some("always") => true,
                        Some("avx512") => avx512(),
                        _ => false,
                    })
                    .collect();
                assert_eq!(said, expected, "{name}: blocked depthwise path: {}", ours.info);
            }
            let (out_shape, out) = run(&ours.plan, &shape, &x);
            assert_eq!(out_shape, ref_shape, "{name}: output shape");
            // Inputs N(0, 1), weights scaled to keep activations near 1: compared at the scale of the
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

/// Whether this CPU runs the depthwise op's register-row kernel (AVX-512 with FMA).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
