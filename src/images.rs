//! Reading still images for `identify` and `eval`: expand directories, decode files, and describe a
//! failure in one line (the record then says `corrupted_image` and the run goes on).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use image::RgbImage;

use crate::error::{Error, Result};

/// File extensions picked up when a directory is given.
const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// Expands `paths`: files are kept as given (whatever their extension, so a mislabelled file is reported,
/// not skipped); directories contribute their images, recursively, in sorted order.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Decodes an image file (format sniffed from its bytes) to RGB8.
pub fn decode_file(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes, &path.display().to_string())
}

/// Reads an image file's bytes as a frame for [`crate::identify::Identifier::assess`] (which decodes it
/// at the scale its models need).
pub fn read_frame(path: &Path) -> Result<crate::source::FrameData> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(crate::source::FrameData::Encoded(std::sync::Arc::from(bytes)))
}

/// Decodes an in-memory image (JPEG or PNG) to RGB8 at full size; `name` labels errors. JPEGs without
/// Huffman tables (MJPEG from many UVC webcams) decode with the standard tables. The live pipeline uses
/// a reusable [`crate::decode::Decoder`] instead, which also downscales in the DCT domain.
pub fn decode(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let data = crate::source::FrameData::Encoded(std::sync::Arc::from(bytes));
    let mut decoder = crate::decode::Decoder::new(false);
    let decoded = decoder.decode(&data, |_, _| true, name)?;
    Ok(decoded.image.clone())
}

/// A file's modification time: the best capture time a still photo offers.
pub fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).and_then(|m| m.modified()).unwrap_or_else(|_| SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg() -> Vec<u8> {
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
        let full = jpeg();
        let bare = strip_dht(&full);
        assert!(bare.len() < full.len() && !bare.windows(2).any(|w| w == [0xFF, 0xC4]));
        let a = decode(&full, "full").unwrap();
        let b = decode(&bare, "bare").unwrap();
        assert_eq!(a.dimensions(), b.dimensions());
        assert_eq!(a.as_raw(), b.as_raw(), "same pixels with the standard tables inserted");
    }

    #[test]
    fn corrupt_and_truncated_frames_are_errors() {
        let full = jpeg();
        let cases: &[(&[u8], &str)] = &[
            (&full[..full.len() / 2], "truncated JPEG"),
            (b"", "not a JPEG or PNG image"),
            (b"\xff\xd8\xff garbage", "frame"),
            (&[0u8; 100], "not a JPEG or PNG image"),
        ];
        for (bytes, want) in cases {
            let e = decode(bytes, "frame").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // Zero padding after EOI (some cameras) is fine.
        let mut padded = full.clone();
        padded.extend_from_slice(&[0; 16]);
        assert!(decode(&padded, "padded").is_ok());
    }
}
