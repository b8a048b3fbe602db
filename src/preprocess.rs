//! Frame -> model input tensor, exactly as a model's manifest describes it.
//!
//! One resize, then a per-channel lookup table turns bytes into normalised floats in the model's
//! layout. The resize is either `fast_image_resize` (SIMD, antialiased convolution like Pillow's, with
//! the crop folded into it as a source rectangle so a centre crop costs no extra copy), or, where the
//! manifest says `resampler = "pillow"`, Pillow's own arithmetic ([`crate::resample`]) on the frame
//! decoded at full size, for models trained on Pillow's pixels. A [`Preprocessor`] owns its buffers
//! and is reused frame after frame: after the first frame of a given size it allocates nothing.

use fast_image_resize as fr;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::manifest::{InputSpec, Interpolation, Layout, Resampler, Resize};
use crate::resample::{Filter, Geometry, PillowResizer};

/// Reusable preprocessing state for one model input.
pub struct Preprocessor {
    spec: InputSpec,
    resizer: fr::Resizer,
    /// The resized frame (either resampler's output).
    resized: fr::images::Image<'static>,
    /// Pillow's resampler, for `resampler = "pillow"` manifests.
    pillow: Option<PillowResizer>,
    /// `lut[c][v]` = (v / 255 - mean[c]) / std[c].
    lut: [[f32; 256]; 3],
}

impl Preprocessor {
    pub fn new(spec: &InputSpec) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - spec.mean[c]) / spec.std[c];
            }
        }
        Preprocessor {
            spec: spec.clone(),
            resizer: fr::Resizer::new(),
            resized: fr::images::Image::new(spec.width, spec.height, fr::PixelType::U8x3),
            // The manifest refuses `pillow` with nearest; fall back to the fast path if it ever came.
            pillow: match spec.resampler {
                Resampler::Pillow => Filter::of(spec.interpolation).map(PillowResizer::new),
                Resampler::Fast => None,
            },
            lut,
        }
    }

    /// The source rectangle (left, top, width, height) that maps onto the model input.
    pub fn source_rect(&self, width: u32, height: u32) -> (f64, f64, f64, f64) {
        let (w, h) = (f64::from(width), f64::from(height));
        match self.spec.resize {
            Resize::Stretch => (0.0, 0.0, w, h),
            Resize::CenterCrop { fraction } => {
                // timm: shorter side -> floor(size / crop_pct), then the centre `size` box.
                let (tw, th) = (f64::from(self.spec.width), f64::from(self.spec.height));
                let scale_size = (tw.min(th) / fraction).floor();
                let scale = scale_size / w.min(h);
                let (cw, ch) = ((tw / scale).min(w), (th / scale).min(h));
                ((w - cw) / 2.0, (h - ch) / 2.0, cw, ch)
            }
        }
    }

    /// The input this preprocessor writes.
    pub fn spec(&self) -> &InputSpec {
        &self.spec
    }

    /// Whether a `width x height` frame covers the model input at 1:1 or better (the resize only
    /// shrinks): the test [`crate::decode::Decoder`] uses to pick a DCT scale. Never for the Pillow
    /// resampler, whose pixels are Pillow's only from the full-size decode.
    pub fn fits(&self, width: u32, height: u32) -> bool {
        if self.pillow.is_some() {
            return false;
        }
        let (_, _, cw, ch) = self.source_rect(width, height);
        cw + 1e-6 >= f64::from(self.spec.width) && ch + 1e-6 >= f64::from(self.spec.height)
    }

    /// Writes the input tensor for `frame` into `out` (resized to the model's input length).
    pub fn run(&mut self, frame: &RgbImage, out: &mut Vec<f32>) -> Result<()> {
        let (width, height) = frame.dimensions();
        if width == 0 || height == 0 {
            return Err(Error::Input(format!("cannot preprocess an empty {width}x{height} frame")));
        }
        match &mut self.pillow {
            Some(resizer) => {
                let (w, h) = (self.spec.width as usize, self.spec.height as usize);
                let g = match self.spec.resize {
                    Resize::Stretch => Some(Geometry::stretch(w, h)),
                    Resize::CenterCrop { fraction } => {
                        let short = (w.min(h) as f64 / fraction).floor() as usize;
                        Geometry::center_crop(width as usize, height as usize, short, w)
                    }
                };
                let g =
                    g.ok_or_else(|| Error::Input(format!("cannot centre-crop a {width}x{height} frame to {w}x{h}")))?;
                resizer.resize(frame.as_raw(), width as usize, height as usize, g, self.resized.buffer_mut());
            }
            None => {
                let src = fr::images::ImageRef::new(width, height, frame.as_raw(), fr::PixelType::U8x3)
                    .map_err(|e| Error::Input(format!("frame buffer does not match {width}x{height} RGB: {e}")))?;
                let (left, top, cw, ch) = self.source_rect(width, height);
                let alg = match self.spec.interpolation {
                    Interpolation::Nearest => fr::ResizeAlg::Nearest,
                    Interpolation::Bilinear => fr::ResizeAlg::Convolution(fr::FilterType::Bilinear),
                    Interpolation::Bicubic => fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom),
                    Interpolation::Lanczos3 => fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3),
                };
                let options = fr::ResizeOptions::new().resize_alg(alg).crop(left, top, cw, ch);
                self.resizer.resize(&src, &mut self.resized, &options).map_err(|e| {
                    Error::Input(format!("resize {width}x{height} -> {}x{}: {e}", self.spec.width, self.spec.height))
                })?;
            }
        }
        let pixels = self.resized.buffer();
        let plane = (self.spec.width * self.spec.height) as usize;
        out.resize(plane * 3, 0.0);
        match self.spec.layout {
            Layout::Nchw => {
                let (r, rest) = out.split_at_mut(plane);
                let (g, b) = rest.split_at_mut(plane);
                for (i, px) in pixels.chunks_exact(3).enumerate() {
                    r[i] = self.lut[0][px[0] as usize];
                    g[i] = self.lut[1][px[1] as usize];
                    b[i] = self.lut[2][px[2] as usize];
                }
            }
            Layout::Nhwc => {
                for (o, px) in out.chunks_exact_mut(3).zip(pixels.chunks_exact(3)) {
                    for c in 0..3 {
                        o[c] = self.lut[c][px[c] as usize];
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resize: Resize, layout: Layout) -> InputSpec {
        InputSpec {
            name: "input".into(),
            width: 4,
            height: 4,
            layout,
            resize,
            interpolation: Interpolation::Bilinear,
            resampler: Resampler::Fast,
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 1.0],
        }
    }

    #[test]
    fn uniform_frame_normalises_per_channel() {
        let frame = RgbImage::from_pixel(10, 6, image::Rgb([255, 0, 51]));
        let mut p = Preprocessor::new(&spec(Resize::Stretch, Layout::Nchw));
        let mut out = Vec::new();
        p.run(&frame, &mut out).unwrap();
        assert_eq!(out.len(), 48);
        assert!(out[..16].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(out[16..32].iter().all(|&v| (v + 1.0).abs() < 1e-6));
        assert!(out[32..].iter().all(|&v| (v - 0.2).abs() < 1e-6));
        let mut p = Preprocessor::new(&spec(Resize::Stretch, Layout::Nhwc));
        p.run(&frame, &mut out).unwrap();
        assert!((out[0] - 1.0).abs() < 1e-6 && (out[1] + 1.0).abs() < 1e-6 && (out[2] - 0.2).abs() < 1e-6);
    }

    #[test]
    fn centre_crop_takes_the_middle_of_the_shorter_side() {
        let p = Preprocessor::new(&spec(Resize::CenterCrop { fraction: 0.5 }, Layout::Nchw));
        // 4 / 0.5 = 8 for the shorter side (100 -> scale 0.08); the 4x4 box is 50x50 source pixels.
        let (l, t, w, h) = p.source_rect(200, 100);
        assert_eq!((l, t, w, h), (75.0, 25.0, 50.0, 50.0));
        let p = Preprocessor::new(&spec(Resize::Stretch, Layout::Nchw));
        assert_eq!(p.source_rect(200, 100), (0.0, 0.0, 200.0, 100.0));
    }

    #[test]
    fn centre_crop_reads_only_the_centre() {
        // Left and right thirds red, middle green: a tight centre crop sees only green.
        let frame = RgbImage::from_fn(300, 100, |x, _| {
            if (100..200).contains(&x) {
                image::Rgb([0, 255, 0])
            } else {
                image::Rgb([255, 0, 0])
            }
        });
        let mut s = spec(Resize::CenterCrop { fraction: 1.0 }, Layout::Nchw);
        s.mean = [0.0; 3];
        s.std = [1.0; 3];
        let mut p = Preprocessor::new(&s);
        let mut out = Vec::new();
        p.run(&frame, &mut out).unwrap();
        // Like timm's resize-then-crop, the filter may reach just past the crop box: only the inner
        // columns must be pure green.
        let red = &out[..16];
        assert!((0..4).all(|y| red[y * 4 + 1] < 0.01 && red[y * 4 + 2] < 0.01), "red plane {red:?}");
        assert!(red.iter().all(|&v| v < 0.2), "red plane {red:?}");
        assert!(out[16..32].iter().all(|&v| v > 0.8));
    }
}
