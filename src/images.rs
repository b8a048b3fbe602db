//! Still images on disk, for `identify`, `eval` and replay cameras: expand directories into image files,
//! file times, and JPEG encoding (snapshots). A leaf module: decoding is `decode.rs`'s, frames are
//! `source`'s.

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

/// Encodes `img` as a camera would send MJPEG: baseline, 4:2:2 chroma, quality 85 (snapshots of raw
/// frames, benchmark frames).
pub fn encode_jpeg(img: &RgbImage) -> Result<Vec<u8>> {
    let mut c = turbojpeg::Compressor::new().map_err(|e| Error::Input(format!("JPEG encoder: {e}")))?;
    let setup = c.set_quality(85).and_then(|()| c.set_subsamp(turbojpeg::Subsamp::Sub2x1));
    setup.map_err(|e| Error::Input(format!("JPEG encoder: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = turbojpeg::Image {
        pixels: img.as_raw().as_slice(),
        width: w,
        pitch: w * 3,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    };
    c.compress_to_vec(src).map_err(|e| Error::Input(format!("JPEG encoder: {e}")))
}

/// A file's modification time: the best capture time a still photo offers.
pub fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).and_then(|m| m.modified()).unwrap_or_else(|_| SystemTime::now())
}
