//! Times the depthwise op alone on the depthwise geometries of the EfficientNet-Lite0 gate (224x224),
//! one thread, best of N calls: the microbenchmark behind the depthwise figures in docs/BENCHMARKS.md.
//!
//! `cargo run --release -p whaled-tract-ops --example dwbench` prints one line per geometry.
//! `ONLY=K` times geometry K alone (20,000 calls, for `perf record`); `NROT=N` rotates N different
//! inputs (12 of the 112x112 ones exceed the L3, so their input comes from memory, as inside a model).

use std::time::Instant;

use tract_core::internal::*;
use whaled_tract_ops::depthwise::{DepthwiseConv, Geometry, Post};

/// Channels, input and output size, kernel, stride, padding (square).
type Case = (usize, [usize; 2], [usize; 2], usize, usize, usize);

const CASES: &[Case] = &[
    (1152, [7, 7], [7, 7], 5, 1, 2),
    (1152, [7, 7], [7, 7], 3, 1, 1),
    (672, [14, 14], [14, 14], 5, 1, 2),
    (672, [14, 14], [7, 7], 5, 2, 1),
    (480, [14, 14], [14, 14], 3, 1, 1),
    (240, [28, 28], [28, 28], 5, 1, 2),
    (240, [28, 28], [14, 14], 3, 2, 0),
    (144, [56, 56], [56, 56], 3, 1, 1),
    (144, [56, 56], [28, 28], 5, 2, 1),
    (96, [112, 112], [56, 56], 3, 2, 0),
    (32, [112, 112], [112, 112], 3, 1, 1),
];

fn env(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() -> TractResult<()> {
    let only = env("ONLY");
    let rotate = env("NROT").unwrap_or(1).max(1);
    for (n, &(c, i, o, k, s, p)) in CASES.iter().enumerate() {
        if only.is_some_and(|v| v != n) {
            continue;
        }
        let g = Geometry::new(1, c, i, o, [k, k], [s, s], [1, 1], [p, p])?;
        let relu6 = vec![Post::Max(0f32.to_bits()), Post::Min(6f32.to_bits())];
        let op = DepthwiseConv::new(g, true)?.with_post(relu6)?;
        let inputs: Vec<TValue> = (0..rotate)
            .map(|r| {
                let x: Vec<f32> = (0..c * i[0] * i[1]).map(|v| ((v * 7919 + r) % 1000) as f32 / 1000.0).collect();
                Tensor::from_shape(&[1, c, i[0], i[1]], &x).map(|t| t.into_tvalue())
            })
            .collect::<TractResult<_>>()?;
        let taps: Vec<f32> = (0..c * k * k).map(|v| ((v * 31) % 100) as f32 / 100.0).collect();
        let taps = Tensor::from_shape(&[c, k * k], &taps)?.into_tvalue();
        let bias = tensor1(&vec![0.1f32; c]).into_tvalue();
        let mut best = f64::MAX;
        for call in 0..if only.is_some() { 20_000 } else { 400 } {
            let args = tvec![inputs[call % rotate].clone(), taps.clone(), bias.clone()];
            let t = Instant::now();
            std::hint::black_box(op.eval_out_of_plan(args)?);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{c:5} channels {i:?} -> {o:?} k{k} s{s}: {:.1} us", best * 1e6);
    }
    Ok(())
}
