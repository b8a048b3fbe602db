//! Frame bytes -> RGB pixels, no larger than inference needs.
//!
//! JPEG (files, replay, MJPEG cameras) goes through libjpeg-turbo, which can run its inverse DCT at 1/2,
//! 1/4 or 1/8 of the frame's size: a 1920x1080 MJPEG frame for a 224x224 pre-filter is decoded straight
//! to 480x270, about a quarter of the full decode's cost, and the resize that follows reads 16x fewer
//! pixels. The factor is the smallest whose output still covers the model's input at 1:1 or better (the
//! resizer only ever shrinks), so the model sees what a full decode + antialiased resize would give it,
//! up to rounding (measured in docs/BENCHMARKS.md). Raw camera formats are converted with SIMD
//! ([`crate::source::pixels`]); PNG (files only) through the `image` crate.
//!
//! A [`Decoder`] belongs to one inference thread and keeps its output buffer and libjpeg-turbo handle:
//! after the first frame of a given size, decoding allocates nothing. It also remembers what it decoded
//! last, so the identification stage, which may need a larger scale than the pre-filter, reuses the
//! pre-filter's pixels when they are large enough.
//!
//! libjpeg-turbo fills the standard Huffman tables in for MJPEG frames that omit them (most UVC
//! webcams). A truncated or corrupt frame is an error ([`Error::Image`]), never a grey-filled picture.

use image::RgbImage;

use crate::error::{Error, Result};
use crate::source::{pixels, FrameData};

/// Frames claiming more pixels than this are refused before any buffer is allocated for them (a
/// corrupt header must not make the daemon allocate gigabytes).
pub const MAX_PIXELS: u64 = 120_000_000;

/// DCT scaling factors tried, smallest first (libjpeg-turbo has fast SIMD paths for these).
const FACTORS: [(usize, usize); 4] = [(1, 8), (1, 4), (1, 2), (1, 1)];

/// What a decoded frame is: its pixels plus the frame's full size (the bbox of a detection is in full
/// frame coordinates whatever scale the pixels were decoded at).
pub struct Decoded<'a> {
    pub image: &'a RgbImage,
    pub full_width: u32,
    pub full_height: u32,
    /// The DCT scale the pixels were decoded at, as (numerator, denominator); (1, 1) for non-JPEG.
    pub scale: (usize, usize),
}

/// Identity of the last frame decoded: the payload's address and length (payloads are immutable
/// `Arc`s, so an equal key within one call sequence is the same frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key(usize, usize);

/// Per-thread decoding state; see the module docs.
pub struct Decoder {
    dct_scaling: bool,
    turbo: Option<turbojpeg::Decompressor>,
    rgb: RgbImage,
    last: Option<(Key, u32, u32, (usize, usize))>,
}

impl Decoder {
    /// `dct_scaling: false` always decodes JPEG at full size (for comparisons, and for users who
    /// want upstream's exact full-decode path).
    pub fn new(dct_scaling: bool) -> Self {
        Decoder { dct_scaling, turbo: None, rgb: RgbImage::new(0, 0), last: None }
    }

    /// Forgets the last frame, so decoding the same payload again really decodes it (benchmarks).
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// Decodes `data` at the smallest scale whose output satisfies `fits(width, height)` (full size if
    /// none does, or for formats that cannot be scaled). `name` labels errors.
    pub fn decode(&mut self, data: &FrameData, fits: impl Fn(u32, u32) -> bool, name: &str) -> Result<Decoded<'_>> {
        let key = match data {
            FrameData::Encoded(b) => Key(b.as_ptr() as usize, b.len()),
            FrameData::Raw { bytes, .. } => Key(bytes.as_ptr() as usize, bytes.len()),
        };
        let reusable = matches!(self.last, Some((k, ..)) if k == key)
            && (fits(self.rgb.width(), self.rgb.height()) || self.last.is_some_and(|(.., s)| s == (1, 1)));
        if !reusable {
            self.last = None;
            let (full_w, full_h, scale) = match data {
                FrameData::Encoded(bytes) if is_jpeg(bytes) => self.decode_jpeg(bytes, &fits, name)?,
                FrameData::Encoded(bytes) => {
                    self.rgb = decode_other(bytes, name)?;
                    (self.rgb.width(), self.rgb.height(), (1, 1))
                }
                FrameData::Raw { format, width, height, stride, bytes } => {
                    check_size(u64::from(*width), u64::from(*height), name)?;
                    let mut buf = std::mem::take(&mut self.rgb).into_raw();
                    pixels::convert_into(*format, *width, *height, *stride, bytes, name, &mut buf)?;
                    self.rgb = into_image(*width, *height, buf, name)?;
                    (*width, *height, (1, 1))
                }
            };
            self.last = Some((key, full_w, full_h, scale));
        }
        let (_, full_width, full_height, scale) = self.last.ok_or_else(|| Error::Input("decoder state lost".into()))?;
        Ok(Decoded { image: &self.rgb, full_width, full_height, scale })
    }

    fn decode_jpeg(
        &mut self,
        bytes: &[u8],
        fits: &dyn Fn(u32, u32) -> bool,
        name: &str,
    ) -> Result<(u32, u32, (usize, usize))> {
        let fail = |msg: String| Error::Image { source_name: name.to_string(), msg };
        if self.turbo.is_none() {
            self.turbo =
                Some(turbojpeg::Decompressor::new().map_err(|e| fail(format!("cannot start the JPEG decoder: {e}")))?);
        }
        let turbo = self.turbo.as_mut().ok_or_else(|| fail("JPEG decoder unavailable".into()))?;
        let header = turbo.read_header(bytes).map_err(|e| fail(format!("corrupt JPEG header: {}", reason(&e))))?;
        let (w, h) = (header.width, header.height);
        check_size(w as u64, h as u64, name)?;
        let factor = if self.dct_scaling && !header.is_lossless {
            FACTORS
                .iter()
                .map(|&(n, d)| turbojpeg::ScalingFactor::new(n, d))
                .find(|f| fits(f.scale(w) as u32, f.scale(h) as u32))
                .unwrap_or(turbojpeg::ScalingFactor::ONE)
        } else {
            turbojpeg::ScalingFactor::ONE
        };
        turbo.set_scaling_factor(factor).map_err(|e| fail(format!("JPEG scaling: {e}")))?;
        let (sw, sh) = (factor.scale(w), factor.scale(h));
        let mut buf = std::mem::take(&mut self.rgb).into_raw();
        buf.resize(sw * sh * 3, 0);
        let image = turbojpeg::Image {
            pixels: buf.as_mut_slice(),
            width: sw,
            pitch: sw * 3,
            height: sh,
            format: turbojpeg::PixelFormat::RGB,
        };
        match turbo.decompress(bytes, image) {
            Ok(()) => {}
            // libjpeg-turbo reports padding between the scan and the end marker (some UVC cameras add
            // it) as a warning; every pixel was still decoded, so the frame is good.
            Err(e) if reason(&e).contains("extraneous bytes before marker") => {
                log::trace!("{name}: {}", reason(&e));
            }
            Err(e) => {
                self.rgb = RgbImage::new(0, 0);
                let why = reason(&e);
                return Err(fail(if why.contains("Premature end") {
                    format!("truncated JPEG ({why})")
                } else {
                    format!("corrupt JPEG data: {why}")
                }));
            }
        }
        self.rgb = into_image(sw as u32, sh as u32, buf, name)?;
        Ok((w as u32, h as u32, (factor.num(), factor.denom())))
    }
}

/// libjpeg-turbo's message without the crate's "TurboJPEG error: " prefix.
fn reason(e: &turbojpeg::Error) -> String {
    match e {
        turbojpeg::Error::TurboJpegError(m) => m.clone(),
        other => other.to_string(),
    }
}

fn check_size(w: u64, h: u64, name: &str) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(Error::Image { source_name: name.to_string(), msg: "image has no pixels".into() });
    }
    if w * h > MAX_PIXELS {
        return Err(Error::Image {
            source_name: name.to_string(),
            msg: format!("claims {w}x{h} pixels, more than the {} megapixel limit", MAX_PIXELS / 1_000_000),
        });
    }
    Ok(())
}

fn into_image(w: u32, h: u32, buf: Vec<u8>, name: &str) -> Result<RgbImage> {
    RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| Error::Image { source_name: name.to_string(), msg: "RGB buffer size mismatch".into() })
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8])
}

/// PNG (and anything else the `image` crate sniffs) at full size.
fn decode_other(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let fail = |msg: String| Error::Image { source_name: name.to_string(), msg };
    let reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| fail(e.to_string()))?;
    if reader.format() != Some(image::ImageFormat::Png) {
        return Err(fail("not a JPEG or PNG image".into()));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| fail(e.to_string()))?;
    check_size(u64::from(w), u64::from(h), name)?;
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?
        .decode()
        .map_err(|e| fail(e.to_string()))?;
    Ok(img.into_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
        out
    }

    fn encoded(b: Vec<u8>) -> FrameData {
        FrameData::Encoded(Arc::from(b))
    }

    /// Each row: frame size, what the consumer needs (min width, min height), expected decoded size.
    #[test]
    fn picks_the_smallest_scale_that_still_covers_the_input() {
        let cases = [
            ((1920, 1080), (224, 224), (480, 270)), // 1/4: 1/8 would give 135 rows
            ((1920, 1080), (512, 512), (960, 540)), // 1/2
            ((1920, 1080), (1000, 600), (1920, 1080)),
            ((640, 480), (224, 224), (320, 240)),
            ((1920, 1080), (100, 100), (240, 135)), // 1/8
        ];
        for ((w, h), (nw, nh), want) in cases {
            let data = encoded(jpeg(w, h));
            let mut d = Decoder::new(true);
            let got = d.decode(&data, |x, y| x >= nw && y >= nh, "t").unwrap();
            assert_eq!(got.image.dimensions(), want, "{w}x{h} for {nw}x{nh}");
            assert_eq!((got.full_width, got.full_height), (w, h));
            let mut full = Decoder::new(false);
            assert_eq!(full.decode(&data, |x, y| x >= nw && y >= nh, "t").unwrap().image.dimensions(), (w, h));
        }
    }

    #[test]
    fn a_later_larger_need_decodes_again_a_smaller_one_reuses() {
        let data = encoded(jpeg(1920, 1080));
        let mut d = Decoder::new(true);
        assert_eq!(d.decode(&data, |_, h| h >= 224, "t").unwrap().scale, (1, 4));
        assert_eq!(d.decode(&data, |_, h| h >= 512, "t").unwrap().scale, (1, 2));
        // The 1/2 pixels already cover a 224 need: no new decode, same scale.
        assert_eq!(d.decode(&data, |_, h| h >= 224, "t").unwrap().scale, (1, 2));
        // Another frame starts over.
        let other = encoded(jpeg(1920, 1080));
        assert_eq!(d.decode(&other, |_, h| h >= 224, "t").unwrap().scale, (1, 4));
    }

    #[test]
    fn scaled_pixels_match_a_full_decode_downsampled() {
        // A smooth gradient: 1/4-scale IDCT and a 4x4 box average of the full decode agree closely.
        let data = encoded(jpeg(640, 480));
        let mut d = Decoder::new(true);
        let quarter = d.decode(&data, |w, _| w >= 160, "t").unwrap().image.clone();
        assert_eq!(quarter.dimensions(), (160, 120));
        let mut f = Decoder::new(false);
        let full = f.decode(&data, |_, _| true, "t").unwrap().image.clone();
        let mut worst = 0i32;
        for (x, y, p) in quarter.enumerate_pixels() {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..4 {
                    for dx in 0..4 {
                        sum += u32::from(full.get_pixel(x * 4 + dx, y * 4 + dy)[c]);
                    }
                }
                worst = worst.max((i32::from(p[c]) - (sum / 16) as i32).abs());
            }
        }
        assert!(worst <= 6, "max difference {worst}");
    }

    #[test]
    fn huge_claimed_sizes_are_refused_before_allocating() {
        let mut j = jpeg(16, 16);
        // SOF0 height/width fields -> 65000 x 65000.
        let sof = j.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        j[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
        let e = Decoder::new(true).decode(&encoded(j), |_, _| true, "cam#1").err().unwrap().to_string();
        assert!(e.contains("cam#1") && e.contains("65000x65000") && e.contains("megapixel limit"), "{e}");
    }

    #[test]
    fn raw_frames_reuse_the_buffer() {
        let data = FrameData::Raw {
            format: pixels::RawFormat::Grey,
            width: 4,
            height: 2,
            stride: 0,
            bytes: Arc::from(vec![7u8; 8]),
        };
        let mut d = Decoder::new(true);
        let got = d.decode(&data, |_, _| true, "t").unwrap();
        assert_eq!((got.image.dimensions(), got.scale), ((4, 2), (1, 1)));
        assert_eq!(got.image.get_pixel(3, 1).0, [7, 7, 7]);
        let png = {
            let mut out = Vec::new();
            RgbImage::new(3, 5).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
            out
        };
        assert_eq!(d.decode(&encoded(png), |_, _| true, "t").unwrap().image.dimensions(), (3, 5));
        let e = d.decode(&encoded(b"GIF89a....".to_vec()), |_, _| true, "x.gif").err().unwrap().to_string();
        assert!(e.contains("not a JPEG or PNG"), "{e}");
    }
}
