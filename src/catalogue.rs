//! `whaled gallery ...`: a crew's own catalogue of individuals, built from labelled photos and extended
//! on the device. The file format and its invariants are `gallery.rs`'s; this module turns photos into
//! rows with the configured embedder and runs the commands.
//!
//! Labelled photos come as a directory (`DIR/<individual id>/<photo>.jpg`) or a CSV with a header row:
//! a path column (`path`, `image` or `relpath`; relative to the CSV), `individual_id`, and optionally
//! `species`. A photo that cannot be read is skipped with a WARN naming it (and counted); a run that
//! embeds nothing is an error.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::error::{Error, Result};
use crate::gallery::{Delta, Gallery, Row};
use crate::identify::Identifier;
use crate::images;
use crate::source::FrameData;

/// A labelled photo to enrol.
#[derive(Debug, Clone, PartialEq)]
pub struct Photo {
    pub path: PathBuf,
    pub id: String,
    pub species: Option<String>,
}

/// Reads labelled photos from a directory of per-individual folders or a CSV.
pub fn labelled_photos(input: &Path) -> Result<Vec<Photo>> {
    let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
    if meta.is_dir() {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(|e| Error::io(input, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        let mut out = Vec::new();
        for d in dirs {
            let id = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for path in images::expand(std::slice::from_ref(&d))? {
                out.push(Photo { path, id: id.clone(), species: None });
            }
        }
        if out.is_empty() {
            return Err(Error::Input(format!(
                "{}: no photos found; expected one folder per individual id holding its photos",
                input.display()
            )));
        }
        return Ok(out);
    }
    let err = |msg: String| Error::Input(format!("{}: {msg}", input.display()));
    let mut reader = csv::Reader::from_path(input).map_err(|e| err(e.to_string()))?;
    let headers = reader.headers().map_err(|e| err(e.to_string()))?.clone();
    let col = |names: &[&str]| headers.iter().position(|h| names.contains(&h));
    let (Some(path_col), Some(id_col)) = (col(&["path", "image", "relpath"]), col(&["individual_id"])) else {
        return Err(err(format!(
            "needs a path column (path, image or relpath) and individual_id; it has {:?}",
            headers.iter().collect::<Vec<_>>()
        )));
    };
    let species_col = col(&["species"]);
    let base = input.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, row) in reader.records().enumerate() {
        let row = row.map_err(|e| err(e.to_string()))?;
        let (Some(p), Some(id)) = (row.get(path_col), row.get(id_col)) else {
            return Err(err(format!("row {}: missing path or individual_id", n + 2)));
        };
        if id.is_empty() {
            return Err(err(format!("row {}: empty individual_id", n + 2)));
        }
        let species = species_col.and_then(|c| row.get(c)).filter(|s| !s.is_empty()).map(str::to_string);
        out.push(Photo { path: base.join(p), id: id.to_string(), species });
    }
    if out.is_empty() {
        return Err(err("no rows".into()));
    }
    Ok(out)
}

/// Who is adding rows: `$USER@hostname`.
pub fn default_added_by() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = crate::config::default_device_id();
    format!("{user}@{host}")
}

/// Embeds each photo into a row. Species: the photo's, else `species`, else the head's record of the id,
/// else "unknown". Unreadable photos are skipped (WARN) and returned.
pub fn rows_for(
    identifier: &Identifier,
    photos: &[Photo],
    species: Option<&str>,
    added_by: &str,
) -> Result<(Vec<Row>, Vec<PathBuf>)> {
    let mut ws = identifier.workspace();
    let (mut rows, mut skipped) = (Vec::new(), Vec::new());
    for p in photos {
        let name = p.path.display().to_string();
        let embedded = FrameData::read_file(&p.path).and_then(|f| identifier.embed(&mut ws, &f, &name));
        let embedding = match embedded {
            Ok(e) => e,
            Err(e @ (Error::Image { .. } | Error::Io { .. })) => {
                log::warn!("skipping {name}: {e}");
                skipped.push(p.path.clone());
                continue;
            }
            Err(e) => return Err(e),
        };
        let sp = p
            .species
            .as_deref()
            .or(species)
            .or_else(|| identifier.head_species(&p.id))
            .unwrap_or("unknown")
            .to_string();
        let photo = p.path.file_name().map_or_else(|| name.clone(), |n| n.to_string_lossy().into_owned());
        rows.push(Row::new(&p.id, &sp, &photo, added_by, SystemTime::now(), embedding)?);
        log::debug!("embedded {name} as {}", p.id);
    }
    if rows.is_empty() {
        return Err(Error::Input(format!("none of the {} photos could be read", photos.len())));
    }
    Ok((rows, skipped))
}

/// The embedder's identity for a new gallery: (output size, ONNX SHA-256).
fn embedder_identity(identifier: &Identifier) -> Result<(usize, String)> {
    let m = identifier
        .embedder()
        .ok_or_else(|| Error::Input("no identification model configured ([identification] model)".into()))?;
    Ok((m.manifest().output.kind.values(), m.sha256().to_string()))
}

/// `whaled gallery build`: a new gallery file at `out` from labelled photos.
pub fn build(identifier: &Identifier, input: &Path, out: &Path, added_by: &str) -> Result<(Gallery, Vec<PathBuf>)> {
    if out.exists() {
        return Err(Error::Input(format!("{} already exists; add to it with `whaled gallery enroll`", out.display())));
    }
    let photos = labelled_photos(input)?;
    let (dim, sha) = embedder_identity(identifier)?;
    let (rows, skipped) = rows_for(identifier, &photos, None, added_by)?;
    // One file, written whole and renamed into place: a crash leaves no gallery or the whole one.
    let g = Gallery::with_rows(dim, &sha, 1, rows)?;
    g.create(out)?;
    Ok((g, skipped))
}

/// `whaled gallery enroll`: photos of one individual added to the gallery at `path` (created if absent).
pub fn enroll(
    identifier: &Identifier,
    path: &Path,
    id: &str,
    species: Option<&str>,
    photos: &[PathBuf],
    added_by: &str,
) -> Result<(Gallery, Vec<PathBuf>)> {
    let (dim, sha) = embedder_identity(identifier)?;
    if path.exists() {
        Gallery::open(path)?.check_embedder(&sha, dim, &format!("gallery {}", path.display()))?;
    }
    let files = images::expand(photos)?;
    let photos: Vec<Photo> = files.into_iter().map(|path| Photo { path, id: id.into(), species: None }).collect();
    let (rows, skipped) = rows_for(identifier, &photos, species, added_by)?;
    if !path.exists() {
        let g = Gallery::with_rows(dim, &sha, 1, rows)?;
        g.create(path)?;
        return Ok((g, skipped));
    }
    Ok((Gallery::append(path, rows)?, skipped))
}

/// `whaled gallery delta`: the change from gallery `old` to gallery `new` (same embedder), as a delta
/// that turns `old` (its version and exact content) into `new`'s content at `version`.
pub fn delta(old: &Gallery, new: &Gallery, version: u64) -> Result<Delta> {
    new.check_embedder(old.embedder_sha256(), old.dim(), "the new gallery")?;
    if version <= old.version() {
        return Err(Error::Input(format!(
            "the delta's version {version} must be above the old gallery's {}",
            old.version()
        )));
    }
    let group = |g: &Gallery| {
        let mut m: std::collections::HashMap<String, Vec<Row>> = std::collections::HashMap::new();
        for r in g.rows() {
            m.entry(r.id.clone()).or_default().push(r.clone());
        }
        m
    };
    let (before, after) = (group(old), group(new));
    // An individual whose rows changed in any way (added, removed, species corrected) is removed and
    // re-added whole: a delta removes by id.
    let mut removes: Vec<String> = before.keys().filter(|id| after.get(*id) != before.get(*id)).cloned().collect();
    removes.sort();
    let changed: std::collections::HashSet<&String> =
        after.keys().filter(|id| before.get(*id) != after.get(*id)).collect();
    let adds = new.rows().iter().filter(|r| changed.contains(&r.id)).cloned().collect();
    Ok(Delta {
        dim: old.dim(),
        embedder_sha256: old.embedder_sha256().to_string(),
        base_version: old.version(),
        base_content_sha256: old.content_sha256(),
        version,
        removes,
        adds,
    })
}

/// Query time of a gallery of `rows` random `dim`-d rows over `individuals` ids, median of `runs`, ms.
pub fn bench_query(rows: usize, dim: usize, individuals: usize, runs: usize) -> Result<f64> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut all = Vec::with_capacity(rows);
    for r in 0..rows {
        let v: Vec<f32> = (0..dim).map(|_| next()).collect();
        all.push(Row::new(
            &format!("{:012x}", r % individuals.max(1)),
            "x",
            "bench",
            "bench",
            SystemTime::UNIX_EPOCH,
            v,
        )?);
    }
    let g = Gallery::with_rows(dim, &"0".repeat(64), 1, all)?;
    let bytes = g.to_bytes().len();
    log::info!("bench gallery: {rows} rows, {} individuals, {bytes} bytes", g.individuals());
    let query: Vec<f32> = (0..dim).map(|_| next()).collect();
    let (mut scratch, mut out) = (Vec::new(), Vec::new());
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        g.nearest(&query, &mut scratch, &mut out);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
