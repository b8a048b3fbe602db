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

/// Identity of the last frame decoded: a weak reference to its payload. Payloads are immutable `Arc`s,
/// and a `Weak` keeps the allocation (not the frame) alive, so no later payload can be given the same
/// address while it is cached: an address match *is* the same frame. (An address-and-length key is not:
/// raw camera frames all have one length, and the allocator hands a dropped frame's address to the next.)
#[derive(Debug, Clone)]
struct Key(std::sync::Weak<[u8]>);

impl Key {
    fn of(data: &FrameData) -> Key {
        Key(std::sync::Arc::downgrade(data.payload()))
    }

    fn is(&self, data: &FrameData) -> bool {
        std::ptr::addr_eq(self.0.as_ptr(), std::sync::Arc::as_ptr(data.payload()))
    }
}

/// Per-thread decoding state; see the module docs.
pub struct Decoder {
    dct_scaling: bool,
    turbo: Option<turbojpeg::Decompressor>,
    rgb: RgbImage,
    last: Option<(Key, u32, u32, (usize, usize))>,
}

/// What the last frame decoded to (the key lives beside it, in `Decoder::last`).
type Geometry = (u32, u32, (usize, usize));

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
        let reusable = self
            .last
            .as_ref()
            .is_some_and(|(k, .., s)| k.is(data) && (fits(self.rgb.width(), self.rgb.height()) || *s == (1, 1)));
        if !reusable {
            self.last = None;
            let (full_w, full_h, scale) = match data {
                FrameData::Encoded(bytes) if is_jpeg(bytes) => self.decode_jpeg(bytes, &fits, name)?,
                FrameData::Encoded(bytes) => {
                    self.rgb = decode_other(bytes, name)?;
                    (self.rgb.width(), self.rgb.height(), (1, 1))
                }
                FrameData::Raw { format, colour, width, height, stride, bytes } => {
                    check_size(u64::from(*width), u64::from(*height), name)?;
                    let mut buf = std::mem::take(&mut self.rgb).into_raw();
                    pixels::convert_into(*format, *colour, *width, *height, *stride, bytes, name, &mut buf)?;
                    self.rgb = into_image(*width, *height, buf, name)?;
                    (*width, *height, (1, 1))
                }
            };
            self.last = Some((Key::of(data), full_w, full_h, scale));
        }
        let (_, full_width, full_height, scale) =
            self.last.as_ref().cloned().ok_or_else(|| Error::Input("decoder state lost".into()))?;
        Ok(Decoded { image: &self.rgb, full_width, full_height, scale })
    }

    /// Decodes a JPEG. After any libjpeg-turbo error the decompressor is thrown away and the next frame
    /// gets a fresh one: a handle that failed in the middle of a header can stay in a failed state and
    /// refuse every later frame with the same error (one damaged MJPEG frame would blind the camera).
    fn decode_jpeg(&mut self, bytes: &[u8], fits: &dyn Fn(u32, u32) -> bool, name: &str) -> Result<Geometry> {
        let result = self.decode_jpeg_with(bytes, fits, name);
        if result.is_err() {
            self.turbo = None;
        }
        result
    }

    fn decode_jpeg_with(&mut self, bytes: &[u8], fits: &dyn Fn(u32, u32) -> bool, name: &str) -> Result<Geometry> {
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

/// Decodes an in-memory image (JPEG or PNG) to RGB8 at full size; `name` labels errors. JPEGs without
/// Huffman tables (MJPEG from many UVC webcams) decode with the standard tables. The live pipeline uses
/// a reusable [`Decoder`] instead, which also downscales in the DCT domain.
pub fn decode_image(bytes: &[u8], name: &str) -> Result<RgbImage> {
    decode_frame(&FrameData::Encoded(std::sync::Arc::from(bytes)), name)
}

/// Decodes an image file (format sniffed from its bytes) to RGB8 at full size.
pub fn decode_file(path: &std::path::Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, &path.display().to_string())
}

/// Decodes any frame (JPEG, PNG or raw camera pixels) to RGB8 at full size.
pub fn decode_frame(data: &FrameData, name: &str) -> Result<RgbImage> {
    let mut decoder = Decoder::new(false);
    let decoded = decoder.decode(data, |_, _| true, name)?;
    Ok(decoded.image.clone())
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

    /// Issue 10 §1: fifty same-length YUYV frames, each dropped before the next is allocated (so the
    /// allocator may hand the next one the same address), must each be decoded, never served from the
    /// previous frame's pixels. Decoded twice per frame, as `assess` does for the two models.
    #[test]
    fn same_length_frames_at_a_reused_address_are_decoded_afresh() {
        let (w, h) = (640u32, 480u32);
        let mut d = Decoder::new(true);
        let mut stale = 0;
        let mut addresses = std::collections::HashSet::new();
        for i in 0..50u8 {
            let luma = 16 + i * 4;
            let mut yuyv = vec![128u8; (w * h * 2) as usize];
            yuyv.iter_mut().step_by(2).for_each(|y| *y = luma);
            let bytes: Arc<[u8]> = Arc::from(yuyv);
            addresses.insert(bytes.as_ptr() as usize);
            let data = FrameData::Raw {
                format: pixels::RawFormat::Yuyv,
                colour: Default::default(),
                width: w,
                height: h,
                stride: 0,
                bytes,
            };
            // The reference: the converter called directly, with no decoder (and no cache) involved.
            let FrameData::Raw { bytes, .. } = &data else { unreachable!() };
            let want = pixels::to_rgb(pixels::RawFormat::Yuyv, Default::default(), w, h, 0, bytes, "ref").unwrap();
            for _ in 0..2 {
                if d.decode(&data, |_, _| true, "cam").unwrap().image != &want {
                    stale += 1;
                }
            }
            drop(data);
        }
        assert_eq!(stale, 0, "stale frames among 50 ({} distinct payload addresses)", addresses.len());
    }

    /// A JPEG whose first DQT segment claims a length of 1 (what a USB transfer error makes).
    fn bogus_dqt(mut j: Vec<u8>) -> Vec<u8> {
        let dqt = j.windows(2).position(|w| w == [0xFF, 0xDB]).unwrap();
        j[dqt + 2..dqt + 4].copy_from_slice(&[0, 1]);
        j
    }

    /// Issue 10 §1b: one damaged header must not leave the decompressor failing every later frame.
    #[test]
    fn a_damaged_header_does_not_blind_the_decoder() {
        let mut d = Decoder::new(true);
        let e = d.decode(&encoded(bogus_dqt(jpeg(320, 240))), |_, _| true, "bad").err().unwrap().to_string();
        assert!(e.contains("bad"), "{e}");
        for _ in 0..3 {
            let got = d.decode(&encoded(jpeg(320, 240)), |w, h| w >= 320 && h >= 240, "good");
            assert_eq!(got.map(|g| g.image.dimensions()).map_err(|e| e.to_string()), Ok((320, 240)));
        }
        // Many bad frames in a row, then good ones: still decoded.
        for _ in 0..20 {
            assert!(d.decode(&encoded(bogus_dqt(jpeg(64, 48))), |_, _| true, "bad").is_err());
        }
        assert!(d.decode(&encoded(jpeg(64, 48)), |_, _| true, "good").is_ok());
    }

    #[test]
    fn raw_frames_reuse_the_buffer() {
        let data = FrameData::Raw {
            format: pixels::RawFormat::Grey,
            colour: Default::default(),
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

    fn small_jpeg() -> Vec<u8> {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
        out
    }

    /// Removes every DHT segment, as MJPEG webcams do (they rely on the standard tables).
    fn strip_dht(j: &[u8]) -> Vec<u8> {
        let mut out = j[..2].to_vec();
        let mut i = 2;
        while i + 4 <= j.len() && j[i] == 0xFF && j[i + 1] != 0xDA {
            let len = u16::from_be_bytes([j[i + 2], j[i + 3]]) as usize;
            if j[i + 1] != 0xC4 {
                out.extend_from_slice(&j[i..i + 2 + len]);
            }
            i += 2 + len;
        }
        out.extend_from_slice(&j[i..]);
        out
    }

    #[test]
    fn mjpeg_without_huffman_tables_decodes() {
        let full = small_jpeg();
        let bare = strip_dht(&full);
        assert!(bare.len() < full.len() && !bare.windows(2).any(|w| w == [0xFF, 0xC4]));
        let a = decode_image(&full, "full").unwrap();
        let b = decode_image(&bare, "bare").unwrap();
        assert_eq!(a.dimensions(), b.dimensions());
        assert_eq!(a.as_raw(), b.as_raw(), "same pixels with the standard tables inserted");
    }

    #[test]
    fn corrupt_and_truncated_frames_are_errors() {
        let full = small_jpeg();
        let cases: &[(&[u8], &str)] = &[
            (&full[..full.len() / 2], "truncated JPEG"),
            (b"", "not a JPEG or PNG image"),
            (b"\xff\xd8\xff garbage", "frame"),
            (&[0u8; 100], "not a JPEG or PNG image"),
        ];
        for (bytes, want) in cases {
            let e = decode_image(bytes, "frame").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // Zero padding after EOI (some cameras) is fine.
        let mut padded = full.clone();
        padded.extend_from_slice(&[0; 16]);
        assert!(decode_image(&padded, "padded").is_ok());
    }
}
