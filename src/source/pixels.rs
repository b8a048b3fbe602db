//! Raw camera pixel formats -> RGB. YUYV, NV12 and I420 go through the `yuv` crate's SIMD converters
//! (BT.601 or BT.709, limited or full range, as the source declares; V4L2 cameras are BT.601 limited);
//! GREY and RGB24 are copied.

use image::RgbImage;

use crate::error::{Error, Result};

/// How a YUV frame's values map to RGB. V4L2 cameras get the default (BT.601, limited range: what UVC
/// and CSI cameras deliver); a GStreamer source takes what the stream's caps declare (HD H.264 is
/// usually BT.709; an encoder fed from JPEG may signal full range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Colour {
    /// 0-255 instead of 16-235 (luma) / 16-240 (chroma).
    pub full_range: bool,
    pub matrix: Matrix,
}

/// The YUV -> RGB matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Matrix {
    #[default]
    Bt601,
    Bt709,
}

/// Uncompressed pixel formats whaled accepts from V4L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFormat {
    Yuyv,
    Nv12,
    /// Planar 4:2:0 (Y, then U, then V): what software H.264/H.265 decoders emit.
    I420,
    Grey,
    Rgb24,
}

impl RawFormat {
    /// Bytes a `width x height` frame needs (tightly packed).
    pub fn frame_len(self, width: u32, height: u32) -> usize {
        let (w, h) = (width as usize, height as usize);
        match self {
            RawFormat::Yuyv => w * h * 2,
            RawFormat::Nv12 | RawFormat::I420 => w * h + w.div_ceil(2) * 2 * h.div_ceil(2),
            RawFormat::Grey => w * h,
            RawFormat::Rgb24 => w * h * 3,
        }
    }
}

/// Converts one raw frame (rows of `stride` bytes; 0 = tightly packed) to RGB8, with the frame's
/// colour range and matrix (`Colour::default()` for a V4L2 camera's).
pub fn to_rgb(
    format: RawFormat,
    colour: Colour,
    width: u32,
    height: u32,
    stride: u32,
    data: &[u8],
    name: &str,
) -> Result<RgbImage> {
    let mut rgb = Vec::new();
    convert_into(format, colour, width, height, stride, data, name, &mut rgb)?;
    RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::Image { source_name: name.to_string(), msg: "RGB buffer size mismatch".into() })
}

/// Like [`to_rgb`], into a caller-owned buffer (resized to `width * height * 3`): the live pipeline
/// reuses one buffer per worker, so a raw frame costs no allocation once the size is known.
#[allow(clippy::too_many_arguments)]
pub fn convert_into(
    format: RawFormat,
    colour: Colour,
    width: u32,
    height: u32,
    stride: u32,
    data: &[u8],
    name: &str,
    rgb: &mut Vec<u8>,
) -> Result<()> {
    let fail = |msg: String| Error::Image { source_name: name.to_string(), msg };
    let min_stride = match format {
        RawFormat::Yuyv => width * 2,
        RawFormat::Nv12 | RawFormat::I420 | RawFormat::Grey => width,
        RawFormat::Rgb24 => width * 3,
    };
    let stride = if stride == 0 { min_stride } else { stride };
    let rows = match format {
        RawFormat::Nv12 | RawFormat::I420 => height as usize + (height as usize).div_ceil(2),
        _ => height as usize,
    };
    if width == 0
        || height == 0
        || stride < min_stride
        || data.len() < stride as usize * (rows - 1) + min_stride as usize
    {
        return Err(fail(format!(
            "short {format:?} frame: {} bytes for {width}x{height} (stride {stride})",
            data.len()
        )));
    }
    rgb.resize(width as usize * height as usize * 3, 0);
    let rgb = rgb.as_mut_slice();
    let range = if colour.full_range { yuv::YuvRange::Full } else { yuv::YuvRange::Limited };
    let matrix = match colour.matrix {
        Matrix::Bt601 => yuv::YuvStandardMatrix::Bt601,
        Matrix::Bt709 => yuv::YuvStandardMatrix::Bt709,
    };
    match format {
        RawFormat::Yuyv => {
            let img = yuv::YuvPackedImage { yuy: data, yuy_stride: stride, width, height };
            yuv::yuyv422_to_rgb(&img, rgb, width * 3, range, matrix).map_err(|e| fail(e.to_string()))?;
        }
        RawFormat::Nv12 => {
            let y_len = stride as usize * height as usize;
            let img = yuv::YuvBiPlanarImage {
                y_plane: &data[..y_len],
                y_stride: stride,
                uv_plane: &data[y_len..],
                uv_stride: stride,
                width,
                height,
            };
            yuv::yuv_nv12_to_rgb(&img, rgb, width * 3, range, matrix, yuv::YuvConversionMode::Balanced)
                .map_err(|e| fail(e.to_string()))?;
        }
        RawFormat::I420 => {
            // Chroma planes follow the luma plane, each ceil(h/2) rows of stride ceil(stride/2) bytes
            // (the packed layout the GStreamer source writes with stride 0).
            let y_len = stride as usize * height as usize;
            let c_stride = stride.div_ceil(2);
            let c_len = c_stride as usize * (height as usize).div_ceil(2);
            let (u, v) = data[y_len..].split_at(c_len.min(data.len() - y_len));
            if v.len() < c_len - (c_stride - width.div_ceil(2)) as usize {
                return Err(fail(format!("short I420 frame: {} bytes for {width}x{height}", data.len())));
            }
            let img = yuv::YuvPlanarImage {
                y_plane: &data[..y_len],
                y_stride: stride,
                u_plane: u,
                u_stride: c_stride,
                v_plane: v,
                v_stride: c_stride,
                width,
                height,
            };
            yuv::yuv420_to_rgb(&img, rgb, width * 3, range, matrix).map_err(|e| fail(e.to_string()))?;
        }
        RawFormat::Grey => {
            for (y, row) in rgb.chunks_exact_mut(width as usize * 3).enumerate() {
                let src = &data[y * stride as usize..][..width as usize];
                for (px, &g) in row.chunks_exact_mut(3).zip(src) {
                    px.fill(g);
                }
            }
        }
        RawFormat::Rgb24 => {
            for (y, row) in rgb.chunks_exact_mut(width as usize * 3).enumerate() {
                row.copy_from_slice(&data[y * stride as usize..][..width as usize * 3]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limited-range BT.601: Y=235 is white, Y=16 black, U=V=128 grey axis.
    #[test]
    fn yuyv_and_nv12_map_the_grey_axis() {
        let (w, h) = (4u32, 2u32);
        let yuyv: Vec<u8> =
            (0..w * h / 2).flat_map(|i| if i % 2 == 0 { [235, 128, 235, 128] } else { [16, 128, 16, 128] }).collect();
        let img = to_rgb(RawFormat::Yuyv, Colour::default(), w, h, 0, &yuyv, "t").unwrap();
        assert!(img.get_pixel(0, 0).0.iter().all(|&c| c >= 250), "{:?}", img.get_pixel(0, 0));
        assert!(img.get_pixel(2, 0).0.iter().all(|&c| c <= 5), "{:?}", img.get_pixel(2, 0));

        let mut nv12 = vec![235u8; (w * h) as usize];
        nv12.extend(std::iter::repeat_n(128u8, (w * h / 2) as usize));
        let img = to_rgb(RawFormat::Nv12, Colour::default(), w, h, 0, &nv12, "t").unwrap();
        assert!(img.pixels().all(|p| p.0.iter().all(|&c| c >= 250)));
    }

    #[test]
    fn grey_rgb_and_short_frames() {
        let img = to_rgb(RawFormat::Grey, Colour::default(), 2, 1, 0, &[10, 200], "t").unwrap();
        assert_eq!(img.get_pixel(1, 0).0, [200, 200, 200]);
        let img = to_rgb(RawFormat::Rgb24, Colour::default(), 1, 2, 4, &[1, 2, 3, 0, 4, 5, 6], "t").unwrap();
        assert_eq!(img.get_pixel(0, 1).0, [4, 5, 6]);
        let e = to_rgb(RawFormat::Yuyv, Colour::default(), 640, 480, 0, &[0; 100], "cam#3").unwrap_err().to_string();
        assert!(e.contains("cam#3") && e.contains("short Yuyv frame: 100 bytes for 640x480"), "{e}");
    }
}
