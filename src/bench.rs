//! `whaled bench`: time a model's preprocessing and inference on this machine, the way the pipeline
//! runs them (same preprocessor, same backend), so users can choose backend, variant and threads on
//! their own board, and the cost of getting a camera frame to the model's input (JPEG decode with and
//! without DCT scaling, resize and normalisation) beside it. docs/BENCHMARKS.md is produced with it (see
//! bench/models.sh and bench/decode.sh).

use std::time::Instant;

use image::RgbImage;

use crate::decode::Decoder;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::preprocess::Preprocessor;
use crate::source::FrameData;

/// Latency statistics over the timed runs, in milliseconds (the seed's protocol: mean ± standard
/// deviation, p50, p95; plus p90 and min).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub mean: f64,
    /// Sample standard deviation (n - 1).
    pub std: f64,
    pub median: f64,
    pub p90: f64,
    pub p95: f64,
    pub min: f64,
}

impl Stats {
    /// Statistics of `v` (nearest-rank percentiles); all zero for no samples.
    pub fn of(mut v: Vec<f64>) -> Stats {
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std =
            if v.len() > 1 { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Stats { mean, std, median: at(0.5), p90: at(0.9), p95: at(0.95), min: v[0] }
    }

    /// As JSON (`whaled bench --json`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"mean": self.mean, "std": self.std, "p50": self.median, "p90": self.p90, "p95": self.p95, "min": self.min})
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

/// Frame -> input tensor costs for one model: full-size decode and DCT-scaled decode, each followed by
/// the model's resize + normalisation.
#[derive(Debug, Clone, Copy)]
pub struct FrameBench {
    pub full_decode: Stats,
    pub full_preprocess: Stats,
    pub scaled_decode: Stats,
    pub scaled_preprocess: Stats,
    /// The DCT scale chosen for this model, (numerator, denominator).
    pub scale: (usize, usize),
    pub scaled_size: (u32, u32),
}

/// Times decode + preprocess of `frame` for `model`'s input, with and without DCT scaling (at least one
/// warm-up run, which sizes the reused buffers).
pub fn bench_frame(model: &Model, frame: &FrameData, warmup: usize, runs: usize) -> Result<FrameBench> {
    let mut pre = Preprocessor::new(&model.manifest().input);
    let mut input = Vec::new();
    /// Decode stats, preprocess stats, DCT scale chosen, decoded size.
    type Pass = (Stats, Stats, (usize, usize), (u32, u32));
    let mut one = |dct: bool| -> Result<Pass> {
        let mut decoder = Decoder::new(dct);
        let (mut td, mut tp) = (Vec::new(), Vec::new());
        let (mut scale, mut size) = ((1, 1), (0, 0));
        for _ in 0..warmup.max(1) + runs.max(1) {
            let t0 = Instant::now();
            let decoded = decoder.decode(frame, |w, h| pre.fits(w, h), "bench")?;
            let t1 = Instant::now();
            pre.run(decoded.image, &mut input)?;
            let t2 = Instant::now();
            scale = decoded.scale;
            size = decoded.image.dimensions();
            td.push((t1 - t0).as_secs_f64() * 1e3);
            tp.push((t2 - t1).as_secs_f64() * 1e3);
            // Like a camera's next frame: decoded again, not served from the decoder's last pixels.
            decoder.forget();
        }
        let skip = warmup.max(1);
        Ok((Stats::of(td.split_off(skip)), Stats::of(tp.split_off(skip)), scale, size))
    };
    let (full_decode, full_preprocess, ..) = one(false)?;
    let (scaled_decode, scaled_preprocess, scale, scaled_size) = one(true)?;
    if scaled_size.0 == 0 {
        return Err(Error::Input("benchmark frame decoded to nothing".into()));
    }
    Ok(FrameBench { full_decode, full_preprocess, scaled_decode, scaled_preprocess, scale, scaled_size })
}

/// A deterministic 1920x1080 test frame (a sea-like gradient), used when no image is given.
pub fn synthetic_frame() -> RgbImage {
    RgbImage::from_fn(1920, 1080, |x, y| {
        let r = ((x * 7 + y * 3) % 61) as u8;
        image::Rgb([20 + r, (80 + y / 12) as u8, (150 + x / 24) as u8])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy: mean 3.0, std(ddof=1) 1.5811388300841898, percentiles by nearest rank on 5 values.
    #[test]
    fn stats_match_numpy() {
        let s = Stats::of(vec![5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!((s.mean, s.median, s.p95, s.min), (3.0, 3.0, 5.0, 1.0));
        assert!((s.std - 1.5811388300841898).abs() < 1e-12);
        assert_eq!(Stats::of(Vec::new()), Stats::default());
    }
}
