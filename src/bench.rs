//! `whaled bench`: time a model's preprocessing and inference on this machine, the way the pipeline
//! runs them (same preprocessor, same backend), so users can choose backend, variant and threads on
//! their own board. docs/BENCHMARKS.md is produced with it (see bench/models.sh).

use std::time::Instant;

use image::RgbImage;

use crate::error::Result;
use crate::model::Model;
use crate::preprocess::Preprocessor;

/// Latency statistics over the timed runs, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: f64,
    pub p90: f64,
    pub min: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Stats {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Stats { median: at(0.5), p90: at(0.9), min: v[0] }
    }
}

/// Preprocessing and inference timings of one model.
#[derive(Debug, Clone, Copy)]
pub struct BenchResult {
    pub preprocess: Stats,
    pub inference: Stats,
}

/// Runs `warmup` untimed then `runs` timed iterations (at least one) of preprocess + inference on `frame`.
pub fn bench_model(model: &Model, frame: &RgbImage, warmup: usize, runs: usize) -> Result<BenchResult> {
    let mut pre = Preprocessor::new(&model.manifest().input);
    let mut input = Vec::new();
    let (mut tp, mut ti) = (Vec::new(), Vec::new());
    for i in 0..warmup + runs.max(1) {
        let t0 = Instant::now();
        pre.run(frame, &mut input)?;
        let t1 = Instant::now();
        std::hint::black_box(model.run(&input)?);
        if i >= warmup {
            tp.push((t1 - t0).as_secs_f64() * 1e3);
            ti.push(t1.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(BenchResult { preprocess: Stats::of(tp), inference: Stats::of(ti) })
}

/// A deterministic 1920x1080 test frame (a sea-like gradient), used when no image is given.
pub fn synthetic_frame() -> RgbImage {
    RgbImage::from_fn(1920, 1080, |x, y| {
        let r = ((x * 7 + y * 3) % 61) as u8;
        image::Rgb([20 + r, (80 + y / 12) as u8, (150 + x / 24) as u8])
    })
}
