//! How much DCT-domain downscaling changes the pre-filter's decisions: every JPEG under the given
//! directories is assessed twice with the default pre-filter, decoded at full size and with
//! `jpeg_dct_scaling`, as the photo itself and as a 1920x1080 4:2:2 MJPEG-like frame made from it
//! (what a camera would send). Prints the largest score difference and the verdicts that differ.
//! Usage: cargo run --release --example dct_agreement -- DIR...   (docs/BENCHMARKS.md)

use std::path::PathBuf;
use std::sync::Arc;

use whaled::config::Config;
use whaled::identify::{GalleryAccess, Identifier};
use whaled::source::FrameData;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dirs: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let files: Vec<PathBuf> =
        whaled::images::expand(&dirs)?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "jpg")).collect();
    let mut cfg = Config::defaults()?;
    let full = Identifier::from_config(
        &{
            cfg.inference.jpeg_dct_scaling = false;
            cfg.clone()
        },
        GalleryAccess::ReadOnly,
    )?;
    cfg.inference.jpeg_dct_scaling = true;
    let scaled = Identifier::from_config(&cfg, GalleryAccess::ReadOnly)?;
    let (mut wf, mut ws) = (full.workspace(), scaled.workspace());
    for variant in ["photo", "1920x1080 frame"] {
        let (mut n, mut scaled_n, mut worst, mut flips, mut sum) = (0, 0, 0f64, Vec::new(), 0f64);
        for f in &files {
            let bytes = std::fs::read(f)?;
            let bytes = if variant == "photo" {
                bytes
            } else {
                let img = whaled::decode::decode_image(&bytes, "x")?;
                let s = (1920.0 / img.width() as f64).max(1080.0 / img.height() as f64);
                let (w, h) = ((img.width() as f64 * s).round() as u32, (img.height() as f64 * s).round() as u32);
                let big = image::imageops::resize(&img, w, h, image::imageops::FilterType::CatmullRom);
                let crop = image::imageops::crop_imm(&big, (w - 1920) / 2, (h - 1080) / 2, 1920, 1080).to_image();
                whaled::images::encode_jpeg(&crop)?
            };
            let data = FrameData::Encoded(Arc::from(bytes));
            let name = f.display().to_string();
            let a = full.assess(&mut wf, &data, &name)?;
            let b = scaled.assess(&mut ws, &data, &name)?;
            let mut probe = whaled::decode::Decoder::new(true);
            let pre = whaled::preprocess::Preprocessor::new(&scaled.prefilter().manifest().input);
            if probe.decode(&data, |w, h| pre.fits(w, h), &name)?.scale != (1, 1) {
                scaled_n += 1;
            }
            let d = (a.prefilter_score - b.prefilter_score).abs();
            n += 1;
            sum += d;
            worst = worst.max(d);
            if a.passed != b.passed {
                flips.push(format!("{} ({:.4} -> {:.4})", f.display(), a.prefilter_score, b.prefilter_score));
            }
        }
        println!(
            "{variant}: {n} images, {scaled_n} decoded at reduced scale; score |diff| mean {:.5} max {worst:.5}; \
             verdict differs on {} of {n} at threshold {}",
            sum / n.max(1) as f64,
            flips.len(),
            scaled.threshold()
        );
        for f in flips {
            println!("  differs: {f}");
        }
    }
    Ok(())
}
