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

/// Decodes an in-memory image (JPEG or PNG) to RGB8; `name` labels errors. JPEGs without Huffman
/// tables (MJPEG from many UVC webcams) get the standard tables of JPEG Annex K inserted.
pub fn decode(bytes: &[u8], name: &str) -> Result<RgbImage> {
    match with_standard_huffman_tables(bytes) {
        Some(fixed) => decode_inner(&fixed, name),
        None => decode_inner(bytes, name),
    }
}

/// The DHT segments of JPEG Annex K, as the `image` crate's baseline encoder writes them.
fn standard_dht() -> &'static [u8] {
    static DHT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DHT.get_or_init(|| {
        let mut jpeg = Vec::new();
        let img = RgbImage::new(8, 8);
        if image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode_image(&img).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for_each_segment(&jpeg, |marker, seg| {
            if marker == 0xC4 {
                out.extend_from_slice(seg);
            }
        });
        out
    })
}

/// Calls `f(marker, whole segment)` for each marker segment before the start of scan; returns the
/// offset of the SOS marker, if the header is well formed.
fn for_each_segment(bytes: &[u8], mut f: impl FnMut(u8, &[u8])) -> Option<usize> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0xDA {
            return Some(i);
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        let end = (i + 2 + len).min(bytes.len());
        f(marker, &bytes[i..end]);
        i += 2 + len;
    }
    None
}

/// A copy of `bytes` with the standard Huffman tables inserted before the scan, if it is a JPEG that
/// has none; `None` if it needs no fixing.
fn with_standard_huffman_tables(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut has_dht = false;
    let sos = for_each_segment(bytes, |marker, _| has_dht |= marker == 0xC4)?;
    if has_dht || standard_dht().is_empty() {
        return None;
    }
    let mut fixed = Vec::with_capacity(bytes.len() + standard_dht().len());
    fixed.extend_from_slice(&bytes[..sos]);
    fixed.extend_from_slice(standard_dht());
    fixed.extend_from_slice(&bytes[sos..]);
    Some(fixed)
}

fn decode_inner(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let fail = |msg: String| Error::Image { source_name: name.to_string(), msg };
    let reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| fail(e.to_string()))?;
    match reader.format() {
        None => return Err(fail("not a JPEG or PNG image".into())),
        Some(image::ImageFormat::Jpeg) if !has_jpeg_end(bytes) => {
            // zune-jpeg decodes a cut-off stream into a grey-filled picture; we refuse it instead.
            return Err(fail("truncated JPEG (no end-of-image marker)".into()));
        }
        Some(_) => {}
    }
    let img = reader.decode().map_err(|e| fail(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(fail("image has no pixels".into()));
    }
    Ok(img.into_rgb8())
}

/// Whether a JPEG stream ends with its EOI marker (0xFFD9), ignoring trailing zero padding that some
/// cameras add.
pub fn has_jpeg_end(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes[..end].ends_with(&[0xFF, 0xD9])
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
