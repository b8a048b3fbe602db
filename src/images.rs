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

/// Decodes an in-memory image (JPEG or PNG) to RGB8; `name` labels errors.
pub fn decode(bytes: &[u8], name: &str) -> Result<RgbImage> {
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
