//! Galleries: the individuals a crew knows, as L2-normalised embeddings of their photos, bound to the
//! one embedder that made them, searched by cosine beside (or instead of) the ArcFace head.
//!
//! # On disk
//! One file, `magic` then framed records, the outbox's framing:
//!
//! ```text
//!  8 bytes  "WHGALRY1" (a gallery) or "WHGDELT1" (a delta, see [`Delta`])
//!  records: u32 LE payload length N, u32 LE CRC-32 of the payload, N bytes payload
//!  payload: one kind byte, then
//!   'H' header   u32 dim, 64 ASCII hex: SHA-256 of the embedder's ONNX file, u64 version
//!   'R' row      i64 added (ms since epoch), str id, str species, str photo, str added_by, dim x f32 LE
//!   'V' version  u64 (ends a transaction: the rows before it and the version they make)
//!   'B' base     u64 + 64 ASCII hex (deltas only: the version the delta applies to and the SHA-256
//!                of that version's rows, [`Gallery::content_sha256`])
//!   'D' remove   str id (deltas only: every row of that individual goes)
//!  str = u16 LE length + UTF-8
//! ```
//!
//! # Invariants
//! 1. The header is the first record and there is exactly one; a gallery is never used with another
//!    embedder (its SHA-256 must equal the loaded model file's, checked at load and on every update).
//! 2. An append (`enroll`) is one transaction: its rows and a closing `V` record go in one `write(2)`,
//!    then `fdatasync`. Bytes after the last complete `V` (or the header) that are a *torn tail* — the
//!    file ends inside a record being written, every length field in it the one written — are a
//!    transaction cut short by a crash or a full disk: a writer (under the lock: an enrolment, remove,
//!    merge, the daemon's load) cuts them off (WARN; the bytes are kept in `<file>.torn-<time>`), so an
//!    enrolment is all there or not at all; a reader ([`Gallery::open`]) ignores them (WARN) and
//!    writes nothing. Damage is never cut: a damaged record *before* the last `V`, a complete record
//!    with a bad checksum at the very end (written whole, then damaged), or an intact record whose
//!    length field is wrong (one flipped bit in the last `V` would otherwise look like a torn tail and
//!    take the whole last enrolment with it) is data loss and an error naming the offset, with the file
//!    left as it is: a gallery silently missing individuals would give wrong answers.
//! 3. Every other change (remove, merge, a shore update) writes a whole new file beside the old one,
//!    fsyncs it, renames it over the old and fsyncs the directory: readers see the old gallery or the
//!    new one, never a mix; it keeps the old file's mode and owner. Each change raises the version by one
//!    (a shore update sets its own, always above the one in use: a forced rollback installs old rows
//!    under a new version); at `u64::MAX` (which a signed shore update may set) a change on board is
//!    refused, never wrapped. A delta applies only to the exact rows it
//!    was made from (version and content SHA-256), never to a gallery changed on board since.
//! 4. Writers hold an exclusive `flock` on `<file>.lock` (opened read-only, created world-readable, so
//!    whoever created it the daemon's user can lock it) for the duration of the change; read-only
//!    commands (`gallery list`, `diff`, the galleries merged in, and `identify`, `eval`, `check-config`
//!    and SIGHUP's check through `identify::GalleryAccess::ReadOnly`) take no lock and create nothing. The
//!    daemon reads the gallery and takes its [`FileStamp`] (size, mtime, inode) in one step under the
//!    lock ([`Gallery::load`]), waits at most [`LOCK_WAIT`] for it when installing, and installs an
//!    update only if the file is still the one it loaded.
//! 5. `gallery build` and the first enrolment into a new file write it whole (one rename).
//! 6. Rows are L2-normalised when made, so a query is a dot product; a non-finite query matches nobody.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"WHGALRY1";
const DELTA_MAGIC: &[u8; 8] = b"WHGDELT1";
/// A record larger than this is damage (a 4096-d row with long strings is ~17 KiB).
const MAX_RECORD: usize = 1 << 20;
const MAX_STR: usize = u16::MAX as usize;

/// One enrolled photo of an individual.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub species: String,
    /// Where the embedding came from (a file name).
    pub photo: String,
    /// Who added it (`user@host`, `shore`, ...).
    pub added_by: String,
    pub added: SystemTime,
    /// L2-normalised.
    embedding: Vec<f32>,
}

impl Row {
    /// A row; `embedding` is L2-normalised here. Fails on an empty id, a zero or non-finite vector, or a
    /// string too long for the file format.
    pub fn new(
        id: &str,
        species: &str,
        photo: &str,
        added_by: &str,
        added: SystemTime,
        mut embedding: Vec<f32>,
    ) -> Result<Row> {
        if id.is_empty() || id.chars().any(char::is_control) {
            return Err(Error::Input(format!("gallery row: individual id {id:?} is empty or has control characters")));
        }
        if id == "new_individual" {
            return Err(Error::Input(
                "gallery row: \"new_individual\" is the answer for an unknown animal, not an id".into(),
            ));
        }
        for (what, s) in [("id", id), ("species", species), ("photo", photo), ("added_by", added_by)] {
            if s.len() > MAX_STR {
                return Err(Error::Input(format!("gallery row {id}: {what} is longer than {MAX_STR} bytes")));
            }
        }
        let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        if !norm.is_finite() || norm == 0.0 {
            return Err(Error::Input(format!("gallery row {id} ({photo}): embedding has norm {norm}")));
        }
        // Rows read back from a file are already unit length: leave their bits as written.
        if (norm - 1.0).abs() > 1e-6 {
            embedding.iter_mut().for_each(|v| *v /= norm);
        }
        Ok(Row {
            id: id.into(),
            species: species.into(),
            photo: photo.into(),
            added_by: added_by.into(),
            added,
            embedding,
        })
    }

    pub fn embedding(&self) -> &[f32] {
        &self.embedding
    }
}

/// A gallery in memory: rows, their vectors packed for search, and what it is bound to.
#[derive(Debug, Clone)]
pub struct Gallery {
    dim: usize,
    embedder_sha256: String,
    version: u64,
    rows: Vec<Row>,
    /// `rows.len() x dim`, row-major: what a query scans.
    vectors: Vec<f32>,
    /// Distinct individual ids, first appearance order; `row_individual[r]` indexes it.
    individuals: Vec<String>,
    /// `individuals` position of each id.
    index: HashMap<String, u32>,
    row_individual: Vec<u32>,
}

/// The best match of one individual: its nearest row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    /// Index into [`Gallery::individual`].
    pub individual: usize,
    pub row: usize,
    pub cosine: f32,
}

impl Gallery {
    /// An empty gallery for the embedder with this output size and ONNX SHA-256.
    pub fn empty(dim: usize, embedder_sha256: &str) -> Result<Gallery> {
        if dim == 0 || dim > 65536 {
            return Err(Error::Input(format!("gallery: embedding size {dim} out of range")));
        }
        if embedder_sha256.len() != 64 || !embedder_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Input(format!("gallery: {embedder_sha256:?} is not a SHA-256 in hex")));
        }
        Ok(Gallery {
            dim,
            embedder_sha256: embedder_sha256.to_ascii_lowercase(),
            version: 0,
            rows: Vec::new(),
            vectors: Vec::new(),
            individuals: Vec::new(),
            index: HashMap::new(),
            row_individual: Vec::new(),
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn embedder_sha256(&self) -> &str {
        &self.embedder_sha256
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Distinct individuals.
    pub fn individuals(&self) -> usize {
        self.individuals.len()
    }

    pub fn individual(&self, i: usize) -> &str {
        &self.individuals[i]
    }

    /// Fails unless this gallery was made by the embedder whose ONNX file has `sha256`.
    pub fn check_embedder(&self, sha256: &str, dim: usize, what: &str) -> Result<()> {
        if self.embedder_sha256 != sha256 || self.dim != dim {
            return Err(Error::Input(format!(
                "{what} was made by the embedder with SHA-256 {} ({}-d), but the loaded embedder is {sha256} ({dim}-d): \
                 its embeddings are not comparable; rebuild it with `whaled gallery build`",
                self.embedder_sha256, self.dim
            )));
        }
        Ok(())
    }

    fn push(&mut self, row: Row) -> Result<()> {
        if row.embedding.len() != self.dim {
            return Err(Error::Input(format!(
                "gallery row {} has {} values, the gallery holds {}-d embeddings",
                row.id,
                row.embedding.len(),
                self.dim
            )));
        }
        let next = self.individuals.len() as u32;
        let ind = *self.index.entry(row.id.clone()).or_insert(next);
        if ind == next {
            self.individuals.push(row.id.clone());
        }
        self.row_individual.push(ind);
        self.vectors.extend_from_slice(&row.embedding);
        self.rows.push(row);
        Ok(())
    }

    /// The version a change on board gives: one more, refused (never wrapped) at `u64::MAX`, which a
    /// shore update may have set.
    fn next_version(&self, path: &Path) -> Result<u64> {
        self.version.checked_add(1).ok_or_else(|| {
            Error::Input(format!(
                "{}: the gallery is at version {} (the largest there is) and cannot be changed on board; \
                 versions only rise, so rebuild it (`whaled gallery build`) to go on",
                path.display(),
                self.version
            ))
        })
    }

    fn rebuilt(&self, rows: impl IntoIterator<Item = Row>, version: u64) -> Result<Gallery> {
        let mut g = Gallery::empty(self.dim, &self.embedder_sha256)?;
        g.version = version;
        for r in rows {
            g.push(r)?;
        }
        Ok(g)
    }

    /// For every individual, its nearest row by cosine to `query` (L2-normalised). `scratch` is reused
    /// between calls; the result is in `out`, one entry per individual, in no particular order.
    pub fn nearest(&self, query: &[f32], scratch: &mut Vec<f32>, out: &mut Vec<Match>) {
        out.clear();
        if query.len() != self.dim || self.rows.is_empty() {
            return;
        }
        scratch.clear();
        scratch.extend(self.vectors.chunks_exact(self.dim).map(|row| dot(row, query)));
        out.resize(self.individuals.len(), Match { individual: 0, row: usize::MAX, cosine: f32::NEG_INFINITY });
        for (r, (&c, &ind)) in scratch.iter().zip(&self.row_individual).enumerate() {
            let m = &mut out[ind as usize];
            if c > m.cosine {
                *m = Match { individual: ind as usize, row: r, cosine: c };
            }
        }
        // A non-finite query compares with nothing: no match rather than a made-up one.
        out.retain(|m| m.row != usize::MAX);
    }

    /// A new gallery of `rows` at `version` (a build, a test).
    pub fn with_rows(dim: usize, embedder_sha256: &str, version: u64, rows: Vec<Row>) -> Result<Gallery> {
        let mut g = Gallery::empty(dim, embedder_sha256)?;
        g.version = version;
        for r in rows {
            g.push(r)?;
        }
        Ok(g)
    }

    /// SHA-256 (hex) of the rows, in order: what a delta names as its base, so that it is never applied
    /// to a gallery that has the same version number but other content.
    pub fn content_sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for r in &self.rows {
            h.update(row_payload(r));
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The species recorded for an individual's row.
    pub fn species_of_row(&self, row: usize) -> &str {
        &self.rows[row].species
    }

    // ----- files -----

    /// Reads a gallery file and writes nothing (no lock file, no cut-off): `whaled gallery list`, `diff`,
    /// the galleries merged in. A torn tail is left where it is (WARN): the next change cuts it off.
    /// Damage inside the file is an error naming the offset, as for every reader.
    pub fn open(path: &Path) -> Result<Gallery> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (g, good) = parse(&bytes, &path.display().to_string(), MAGIC)?;
        if good < bytes.len() {
            log::warn!(
                "gallery {}: ignoring {} bytes after the last complete change at byte {good} (an enrolment torn by a \
                 crash or a full disk); the next change to the gallery cuts them off",
                path.display(),
                bytes.len() - good
            );
        }
        g.into_gallery()
    }

    /// Opens the gallery the daemon will use, with its [`FileStamp`] taken under the lock (invariant 4):
    /// nobody can enrol between the read and the stamp, so an update installed later never overwrites a
    /// change the daemon did not load. A torn tail is cut off (invariant 2). `None`: no file yet. Where
    /// the lock cannot be taken (a read-only directory) the file is read as [`Gallery::open`] does; an
    /// update would fail there anyway.
    pub fn load(path: &Path) -> Result<Option<(Gallery, FileStamp)>> {
        let held = match lock(path) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("gallery {}: reading without the lock ({e})", path.display());
                None
            }
        };
        let Some(before) = Gallery::stamp(path) else {
            if path.exists() {
                return Err(Error::io(path, std::io::Error::other("cannot read its metadata")));
            }
            return Ok(None);
        };
        let g = if held.is_some() { Gallery::recover_locked(path)? } else { Gallery::open(path)? };
        // Taken after any cut-off and still under the lock.
        let stamp = Gallery::stamp(path).unwrap_or(before);
        drop(held);
        Ok(Some((g, stamp)))
    }

    /// Reads the gallery for a change: the caller holds the lock. A torn tail is cut off (WARN; the bytes
    /// are kept in `<file>.torn-<time>`); damage is an error and the file is left as it is.
    fn recover_locked(path: &Path) -> Result<Gallery> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (g, good) = parse(&bytes, &path.display().to_string(), MAGIC)?;
        let g = g.into_gallery()?;
        if good < bytes.len() {
            log::warn!(
                "gallery {}: cut off {} bytes after the last complete change at byte {good} (an enrolment torn by a \
                 crash or a full disk)",
                path.display(),
                bytes.len() - good
            );
            // Keep what is cut off beside the gallery, for whoever wants to look at it.
            let mut keep = path.as_os_str().to_owned();
            keep.push(format!(
                ".torn-{}",
                SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
            ));
            if let Err(e) = std::fs::write(&keep, &bytes[good..]) {
                log::warn!("gallery {}: cannot keep the torn bytes: {e}", path.display());
            }
            let f = OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
            f.set_len(good as u64).and_then(|()| f.sync_data()).map_err(|e| Error::io(path, e))?;
        }
        Ok(g)
    }

    /// Identifies the file at `path` as last read or written, for [`Gallery::install`]'s check that
    /// nobody changed it since (size, modification time, inode).
    pub fn stamp(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp { len: m.len(), mtime_ns: (m.mtime(), m.mtime_nsec()), inode: m.ino() })
    }

    /// A gallery from the bytes of a gallery file (a shore update); damage anywhere is an error.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Gallery> {
        let (g, good) = parse(bytes, what, MAGIC)?;
        if good != bytes.len() {
            return Err(Error::Input(format!("{what}: {} bytes after the last complete change", bytes.len() - good)));
        }
        g.into_gallery()
    }

    /// The bytes of this gallery as one file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        frame(&mut out, &header_payload(self.dim, &self.embedder_sha256, self.version));
        for r in &self.rows {
            frame(&mut out, &row_payload(r));
        }
        frame(&mut out, &version_payload(self.version));
        out
    }

    /// Writes a new gallery file; fails if `path` exists.
    pub fn create(&self, path: &Path) -> Result<()> {
        let _lock = lock(path)?;
        if path.exists() {
            return Err(Error::Input(format!(
                "{} already exists; add to it with `whaled gallery enroll`",
                path.display()
            )));
        }
        self.replace_file(path)
    }

    /// Replaces the file at `path` with this gallery, atomically (invariant 3). The caller holds the lock
    /// or owns the path.
    fn replace_file(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let old = std::fs::metadata(path).ok();
        let result = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&self.to_bytes())?;
            if let Some(m) = &old {
                // The new file keeps the old one's mode and (when allowed) owner: a gallery the daemon's
                // user owns stays writable by it after root ran `whaled gallery remove`.
                f.set_permissions(m.permissions())?;
                let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
            }
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            sync_dir(path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(|e| Error::io(path, e))
    }

    /// Appends `rows` to the file at `path` as one transaction (invariant 2) and to `self`. `self` must
    /// be what the file holds (it is re-read under the lock to make sure).
    pub fn append(path: &Path, rows: Vec<Row>) -> Result<Gallery> {
        let _lock = lock(path)?;
        let mut g = Gallery::recover_locked(path)?;
        let version = g.next_version(path)?;
        let mut buf = Vec::new();
        for r in rows {
            frame(&mut buf, &row_payload(&r));
            g.push(r)?;
        }
        frame(&mut buf, &version_payload(version));
        g.version = version;
        let mut f = OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        let before = f.metadata().map_err(|e| Error::io(path, e))?.len();
        if let Err(e) = f.write_all(&buf).and_then(|()| f.sync_data()) {
            // Leave no torn transaction behind if we can help it (open() would cut it off anyway).
            let _ = f.set_len(before).and_then(|()| f.sync_data());
            return Err(Error::io(path, e));
        }
        Ok(g)
    }

    /// Removes every row of `id` from the file at `path`; returns the new gallery and how many rows went.
    pub fn remove(path: &Path, id: &str) -> Result<(Gallery, usize)> {
        let _lock = lock(path)?;
        let g = Gallery::recover_locked(path)?;
        let kept: Vec<Row> = g.rows.iter().filter(|r| r.id != id).cloned().collect();
        let removed = g.rows.len() - kept.len();
        if removed == 0 {
            return Err(Error::Input(format!("{}: no individual {id:?}", path.display())));
        }
        let new = g.rebuilt(kept, g.next_version(path)?)?;
        new.replace_file(path)?;
        Ok((new, removed))
    }

    /// Adds the rows of `others` (same embedder) to the file at `path`, skipping rows it already has
    /// (same id, photo and embedding). Returns the new gallery and how many rows were added.
    pub fn merge(path: &Path, others: &[Gallery]) -> Result<(Gallery, usize)> {
        let _lock = lock(path)?;
        let g = Gallery::recover_locked(path)?;
        let key =
            |r: &Row| (r.id.clone(), r.photo.clone(), r.embedding.iter().map(|v| v.to_bits()).collect::<Vec<u32>>());
        let mut have: std::collections::HashSet<_> = g.rows.iter().map(key).collect();
        let mut rows = g.rows.clone();
        let mut added = 0;
        for o in others {
            o.check_embedder(&g.embedder_sha256, g.dim, "a gallery to merge")?;
            for r in &o.rows {
                if have.insert(key(r)) {
                    rows.push(r.clone());
                    added += 1;
                }
            }
        }
        let new = g.rebuilt(rows, g.next_version(path)?)?;
        new.replace_file(path)?;
        Ok((new, added))
    }

    /// Installs `new` (a whole gallery or a delta applied) as the file at `path`, atomically, provided
    /// the file is still the one `expect` stamped (`None`: there was no file) — else someone changed it
    /// since it was read (a `whaled gallery enroll`): an error, and nothing written. Waits at most
    /// [`LOCK_WAIT`] for another writer. Returns the new file's stamp.
    pub fn install(path: &Path, new: &Gallery, expect: Option<FileStamp>) -> Result<Option<FileStamp>> {
        let _lock = lock_within(path, LOCK_WAIT)?;
        if Gallery::stamp(path) != expect {
            return Err(Error::Input(format!(
                "{} changed on disk since whaled loaded it (`whaled gallery enroll`?); reload whaled (SIGHUP), then update",
                path.display()
            )));
        }
        new.replace_file(path)?;
        Ok(Gallery::stamp(path))
    }

    /// This gallery with `delta` applied, or an error (and nothing changed) if the delta does not apply.
    pub fn apply(&self, delta: &Delta) -> Result<Gallery> {
        if delta.base_version != self.version {
            return Err(Error::Input(format!(
                "the delta applies to gallery version {}, this gallery is at version {}; send the whole gallery",
                delta.base_version, self.version
            )));
        }
        if delta.base_content_sha256 != self.content_sha256() {
            return Err(Error::Input(format!(
                "the delta applies to version {} as shore has it, but this gallery's version {} holds other rows \
                 (changed on board since); send the whole gallery",
                delta.base_version, self.version
            )));
        }
        if delta.version <= self.version {
            return Err(Error::Input(format!(
                "the delta's version {} is not above the gallery's {}",
                delta.version, self.version
            )));
        }
        self.check_embedder(&delta.embedder_sha256, delta.dim, "the delta")?;
        for id in &delta.removes {
            if !self.index.contains_key(id) {
                return Err(Error::Input(format!(
                    "the delta removes individual {id:?}, which the gallery does not have"
                )));
            }
        }
        let removes: std::collections::HashSet<&String> = delta.removes.iter().collect();
        let kept = self.rows.iter().filter(|r| !removes.contains(&r.id)).cloned();
        self.rebuilt(kept.chain(delta.adds.iter().cloned()), delta.version)
    }
}

/// A change to a gallery sent from shore: rows removed (by individual) and added, from one version to
/// the next, for one embedder.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub dim: usize,
    pub embedder_sha256: String,
    pub base_version: u64,
    /// [`Gallery::content_sha256`] of the base: a gallery at the same version with other rows (a local
    /// enrolment since) does not take the delta.
    pub base_content_sha256: String,
    pub version: u64,
    pub removes: Vec<String>,
    pub adds: Vec<Row>,
}

impl Delta {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = DELTA_MAGIC.to_vec();
        frame(&mut out, &header_payload(self.dim, &self.embedder_sha256, self.version));
        let mut b = vec![b'B'];
        b.extend_from_slice(&self.base_version.to_le_bytes());
        b.extend_from_slice(self.base_content_sha256.as_bytes());
        frame(&mut out, &b);
        for id in &self.removes {
            let mut p = vec![b'D'];
            put_str(&mut p, id);
            frame(&mut out, &p);
        }
        for r in &self.adds {
            frame(&mut out, &row_payload(r));
        }
        frame(&mut out, &version_payload(self.version));
        out
    }

    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Delta> {
        let (p, good) = parse(bytes, what, DELTA_MAGIC)?;
        if good != bytes.len() {
            return Err(Error::Input(format!("{what}: {} bytes after the last complete change", bytes.len() - good)));
        }
        let Some((base_version, base_content_sha256)) = p.base else {
            return Err(Error::Input(format!("{what}: a delta without its base version")));
        };
        Ok(Delta {
            dim: p.dim,
            embedder_sha256: p.sha,
            base_version,
            base_content_sha256,
            version: p.version,
            removes: p.removes,
            adds: p.rows,
        })
    }
}

/// Tells a gallery file from a delta by its magic.
pub fn is_delta(bytes: &[u8]) -> bool {
    bytes.starts_with(DELTA_MAGIC)
}

struct Parsed {
    dim: usize,
    sha: String,
    version: u64,
    base: Option<(u64, String)>,
    rows: Vec<Row>,
    removes: Vec<String>,
}

impl Parsed {
    fn into_gallery(self) -> Result<Gallery> {
        let mut g = Gallery::empty(self.dim, &self.sha)?;
        g.version = self.version;
        for r in self.rows {
            g.push(r)?;
        }
        Ok(g)
    }
}

/// The last complete transaction seen while parsing: (rows, removes, version, base, end offset).
type Commit = (usize, usize, u64, Option<(u64, String)>, usize);

/// Parses framed records after `magic`; returns the content up to the last complete transaction and its
/// end offset. Damage before that end is an error.
fn parse(bytes: &[u8], what: &str, magic: &[u8; 8]) -> Result<(Parsed, usize)> {
    let bad = |off: usize, msg: &str| Error::Input(format!("{what}: {msg} at byte {off}"));
    if bytes.len() < 8 || &bytes[..8] != magic {
        let kind = if magic == MAGIC { "a whaled gallery" } else { "a whaled gallery delta" };
        return Err(Error::Input(format!("{what} is not {kind} (bad magic)")));
    }
    let mut off = 8;
    let mut cur: Option<Parsed> = None;
    // The last commit: (rows, removes, version, base, end offset).
    let mut committed: Option<Commit> = None;
    let mut pending_base: Option<(u64, String)> = None;
    while off < bytes.len() {
        let Some(head) = bytes.get(off..off + 8) else { break };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(off + 8..off + 8 + len) else { break };
        if crc32fast::hash(payload) != crc {
            if off + 8 + len == bytes.len() {
                // A whole record up to the end of the file: written completely, then damaged (a torn
                // write is short, or zeros). Not a crash's leftover: refuse rather than cut data off.
                return Err(bad(
                    off,
                    "damaged record (checksum) at the end of the file (data loss; restore the gallery)",
                ));
            }
            break;
        }
        let rec_off = off;
        off += 8 + len;
        let mut r = Reader { buf: &payload[1..], what, off: rec_off };
        match payload[0] {
            b'H' => {
                if cur.is_some() {
                    return Err(bad(rec_off, "a second header"));
                }
                let dim = r.u32()? as usize;
                let sha =
                    String::from_utf8(r.take(64)?.to_vec()).map_err(|_| bad(rec_off, "header SHA-256 not ASCII"))?;
                let version = r.u64()?;
                Gallery::empty(dim, &sha).map_err(|e| bad(rec_off, &e.to_string()))?;
                cur = Some(Parsed { dim, sha, version, base: None, rows: Vec::new(), removes: Vec::new() });
                if magic == MAGIC {
                    // A gallery's header alone is a complete (empty) gallery.
                    committed = Some((0, 0, version, None, off));
                }
            }
            kind => {
                let Some(p) = cur.as_mut() else { return Err(bad(rec_off, "a record before the header")) };
                match kind {
                    b'R' => {
                        let added = SystemTime::UNIX_EPOCH + Duration::from_millis(r.u64()?);
                        let id = r.str()?;
                        let species = r.str()?;
                        let photo = r.str()?;
                        let added_by = r.str()?;
                        let raw = r.take(p.dim * 4)?;
                        let emb = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                        let row = Row::new(&id, &species, &photo, &added_by, added, emb)
                            .map_err(|e| bad(rec_off, &e.to_string()))?;
                        p.rows.push(row);
                    }
                    b'D' | b'B' if magic == MAGIC => {
                        return Err(bad(rec_off, "a delta record in a gallery file (send deltas as kind \"delta\")"))
                    }
                    b'D' => p.removes.push(r.str()?),
                    b'B' => {
                        let v = r.u64()?;
                        let sha = String::from_utf8(r.take(64)?.to_vec())
                            .map_err(|_| bad(rec_off, "base SHA-256 not ASCII"))?;
                        pending_base = Some((v, sha));
                    }
                    b'V' => {
                        let version = r.u64()?;
                        let base = pending_base.clone().or_else(|| committed.as_ref().and_then(|c| c.3.clone()));
                        committed = Some((p.rows.len(), p.removes.len(), version, base, off));
                    }
                    k => return Err(bad(rec_off, &format!("unknown record kind {k:#04x}"))),
                }
            }
        }
    }
    let (Some(mut parsed), Some((rows, removes, version, base, end))) = (cur, committed) else {
        return Err(Error::Input(format!("{what}: incomplete: no complete header and change (cut short or damaged)")));
    };
    // We stopped at the first bad record: it must be a torn tail (the file ends inside a record that was
    // being written), not damage inside the file.
    if off < bytes.len() && later_commit(bytes, off) {
        return Err(bad(
            off,
            "damaged record followed by intact changes (data loss; restore the gallery from a backup or from shore)",
        ));
    }
    if let Some((declared, whole)) = misframed(bytes, off, parsed.dim) {
        // A torn write never writes a wrong length: a whole, intact record there with another length than
        // its field says was damaged after it was written (one flipped bit in the last `V` would otherwise
        // cut off the whole last enrolment).
        return Err(bad(
            off,
            &format!(
                "damaged record (its length field says {declared} bytes, but an intact {whole}-byte record is there) \
                 inside the file, not a torn tail (data loss; restore the gallery from a backup or from shore)"
            ),
        ));
    }
    parsed.rows.truncate(rows);
    parsed.removes.truncate(removes);
    parsed.version = version;
    parsed.base = base;
    Ok((parsed, end))
}

/// Whether the record at `off` (where parsing stopped) is whole and intact but for its length field:
/// `Some((declared length, real length))`. The real length comes from the payload itself (a kind's fixed
/// size, or a row's string lengths and `dim`); it counts only if the stored CRC matches that many bytes.
/// A torn tail is a prefix of what was being written, so its length fields are the real ones.
fn misframed(bytes: &[u8], off: usize, dim: usize) -> Option<(usize, usize)> {
    let head = bytes.get(off..off + 8)?;
    let declared = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let payload = &bytes[off + 8..];
    let u16_at = |i: usize| payload.get(i..i + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let len = match *payload.first()? {
        b'V' => 9,
        b'H' => 77,
        b'B' => 73,
        b'D' => 3 + u16_at(1)?,
        b'R' => {
            let mut at = 9;
            for _ in 0..4 {
                at += 2 + u16_at(at)?;
            }
            at + dim * 4
        }
        _ => return None,
    };
    (len != declared && crc32fast::hash(payload.get(..len)?) == crc).then_some((declared, len))
}

/// Whether an intact `V` record starts anywhere after `from` (damage in the middle, not a torn tail).
fn later_commit(bytes: &[u8], from: usize) -> bool {
    (from + 1..bytes.len().saturating_sub(16)).any(|o| {
        let h = &bytes[o..o + 8];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        len == 9
            && bytes.get(o + 8) == Some(&b'V')
            && bytes
                .get(o + 8..o + 17)
                .is_some_and(|p| crc32fast::hash(p) == u32::from_le_bytes([h[4], h[5], h[6], h[7]]))
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'a str,
    off: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Input(format!("{}: record at byte {} is too short", self.what, self.off)));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<String> {
        let b = self.take(2)?;
        let n = u16::from_le_bytes([b[0], b[1]]) as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| {
            Error::Input(format!("{}: record at byte {} has a string that is not UTF-8", self.what, self.off))
        })
    }
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Row::new bounds every string to MAX_STR; ids in deltas are checked by the sender's Row::new too.
    let s = &s.as_bytes()[..s.len().min(MAX_STR)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

fn header_payload(dim: usize, sha: &str, version: u64) -> Vec<u8> {
    let mut p = vec![b'H'];
    p.extend_from_slice(&(dim as u32).to_le_bytes());
    p.extend_from_slice(sha.as_bytes());
    p.extend_from_slice(&version.to_le_bytes());
    p
}

fn version_payload(version: u64) -> Vec<u8> {
    let mut p = vec![b'V'];
    p.extend_from_slice(&version.to_le_bytes());
    p
}

fn row_payload(r: &Row) -> Vec<u8> {
    let mut p = vec![b'R'];
    let ms = r.added.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    p.extend_from_slice(&ms.to_le_bytes());
    for s in [&r.id, &r.species, &r.photo, &r.added_by] {
        put_str(&mut p, s);
    }
    for v in &r.embedding {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// Dot product with eight independent sums (vectorises; ~4x a naive fold). The gallery's and the
/// head's cosines both use it.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// What identifies a gallery file's content as last seen (see [`Gallery::stamp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    mtime_ns: (i64, i64),
    inode: u64,
}

/// The longest the daemon waits for another writer's lock (a shore update must not stall MQTT).
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Holds `<path>.lock` exclusively until dropped.
pub struct Lock(#[allow(dead_code)] File);

/// The lock file, opened read-only (flock needs no write access), created world-readable if missing:
/// whoever runs a gallery command first, the daemon's user can still take the lock.
fn open_lock(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let lp = lock_path(path);
    match File::open(&lp) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let created = OpenOptions::new().write(true).create(true).truncate(false).mode(0o644).open(&lp);
            drop(created.map_err(|e| Error::io(&lp, e))?);
            File::open(&lp).map_err(|e| Error::io(&lp, e))
        }
        Err(e) => Err(Error::io(&lp, e)),
    }
}

fn flock(f: &File, flags: i32) -> std::io::Result<()> {
    // SAFETY: flock on a file descriptor we own; it does not touch memory.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(f), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn lock(path: &Path) -> Result<Lock> {
    let f = open_lock(path)?;
    flock(&f, libc::LOCK_EX).map_err(|e| Error::io(&lock_path(path), e))?;
    Ok(Lock(f))
}

fn lock_within(path: &Path, wait: Duration) -> Result<Lock> {
    let f = open_lock(path)?;
    let t = std::time::Instant::now();
    loop {
        match flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => return Ok(Lock(f)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) && t.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                return Err(Error::Input(format!(
                    "{}: another process holds the gallery lock (a `whaled gallery` command?) for over {wait:?}",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io(&lock_path(path), e)),
        }
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Rows grouped by individual, for `whaled gallery list`: (id, species, rows), in first-seen order.
pub fn summary(g: &Gallery) -> Vec<(String, String, usize)> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut out: Vec<(String, String, usize)> = Vec::new();
    for r in &g.rows {
        match index.get(r.id.as_str()) {
            Some(&i) => out[i].2 += 1,
            None => {
                index.insert(&r.id, out.len());
                out.push((r.id.clone(), r.species.clone(), 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn row(id: &str, seed: u32) -> Row {
        let emb = (0..16).map(|i| ((i as u32 * 7 + seed * 13) % 11) as f32 - 5.0).collect();
        Row::new(id, "humpback_whale", &format!("{id}-{seed}.jpg"), "test", SystemTime::UNIX_EPOCH, emb).unwrap()
    }

    /// A gallery path in a fresh directory, removed when the returned guard drops.
    fn tmp(name: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::Builder::new().prefix(&format!("whaled-gallery-{name}-")).tempdir().unwrap();
        let path = d.path().join("g.wgal");
        (d, path)
    }

    #[test]
    fn round_trip_and_nearest() {
        let mut g = Gallery::empty(16, SHA).unwrap();
        for (id, s) in [("a", 1), ("b", 2), ("a", 3)] {
            g.push(row(id, s)).unwrap();
        }
        let back = Gallery::from_bytes(&g.to_bytes(), "mem").unwrap();
        assert_eq!(back.rows(), g.rows());
        assert_eq!(back.individuals(), 2);
        let q = row("q", 3).embedding;
        let (mut s, mut out) = (Vec::new(), Vec::new());
        back.nearest(&q, &mut s, &mut out);
        let a = out.iter().find(|m| back.individual(m.individual) == "a").unwrap();
        assert_eq!(a.row, 2);
        assert!((a.cosine - 1.0).abs() < 1e-6);
    }

    /// The names in the gallery's directory, sorted.
    fn listing(path: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A crash at every byte of an enrolment leaves the gallery as before it (and appendable), never a
    /// partial enrolment. A reader ([`Gallery::open`]) sees the old gallery and writes nothing; the
    /// daemon's [`Gallery::load`] (a writer, under the lock) cuts the tail off and keeps it aside.
    #[test]
    fn torn_append_at_every_byte_is_cut_off() {
        let (_dir, path) = tmp("torn");
        let mut g = Gallery::empty(16, SHA).unwrap();
        g.push(row("a", 1)).unwrap();
        g.create(&path).unwrap();
        let before = std::fs::read(&path).unwrap();
        Gallery::append(&path, vec![row("b", 2), row("c", 3)]).unwrap();
        let after = std::fs::read(&path).unwrap();
        let torn_files = || listing(&path).into_iter().filter(|n| n.contains(".torn-")).count();
        for cut in before.len()..after.len() {
            std::fs::write(&path, &after[..cut]).unwrap();
            let names = listing(&path);
            let g = Gallery::open(&path).unwrap();
            assert_eq!(g.len(), 1, "cut at {cut}");
            assert_eq!(std::fs::read(&path).unwrap(), &after[..cut], "cut at {cut}: a reader writes nothing");
            assert_eq!(listing(&path), names, "cut at {cut}: a reader creates nothing");
            let (g, stamp) = Gallery::load(&path).unwrap().unwrap();
            assert_eq!(g.len(), 1, "cut at {cut}");
            assert_eq!(std::fs::read(&path).unwrap(), before, "cut at {cut}: file trimmed to the last commit");
            assert_eq!(Some(stamp), Gallery::stamp(&path), "cut at {cut}: stamped after the cut");
            assert_eq!(torn_files() >= 1, cut > before.len(), "cut at {cut}: the torn bytes are kept aside");
        }
        let g = Gallery::append(&path, vec![row("d", 4)]).unwrap();
        assert_eq!((g.len(), g.version()), (2, 1));
        assert_eq!(Gallery::open(&path).unwrap().rows(), g.rows());
    }

    #[test]
    fn damage_before_a_commit_is_an_error_naming_the_offset() {
        let (_dir, path) = tmp("damage");
        let mut g = Gallery::empty(16, SHA).unwrap();
        g.push(row("a", 1)).unwrap();
        g.create(&path).unwrap();
        Gallery::append(&path, vec![row("b", 2)]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let header_end = 8 + 8 + 77;
        bytes[header_end + 30] ^= 0xff; // inside the first row
        std::fs::write(&path, &bytes).unwrap();
        let e = Gallery::open(&path).unwrap_err().to_string();
        assert!(e.contains("damaged record") && e.contains(&format!("byte {header_end}")), "{e}");
        bytes[header_end + 30] ^= 0xff;
        bytes[40] ^= 0xff; // inside the header
        std::fs::write(&path, &bytes).unwrap();
        let e = Gallery::open(&path).unwrap_err().to_string();
        assert!(e.contains("incomplete"), "{e}");
    }

    /// One flipped bit or byte in the length field of the last `V` record: the file is whole, the
    /// record intact but misframed. That is damage (an error naming the record's offset, the file left
    /// byte for byte as it is), not a torn tail to cut off with the whole last enrolment.
    #[test]
    fn a_damaged_length_in_the_last_version_record_is_an_error_not_a_cut() {
        let (_dir, path) = tmp("vlen");
        let mut g = Gallery::empty(16, SHA).unwrap();
        g.push(row("a", 1)).unwrap();
        g.create(&path).unwrap();
        Gallery::append(&path, vec![row("b", 2), row("c", 3)]).unwrap();
        let good = std::fs::read(&path).unwrap();
        let v_off = good.len() - 17; // the last record: 8 bytes of framing + 'V' + u64
        assert_eq!(good[v_off + 8], b'V');
        for byte in 0..4 {
            for mask in [0x01u8, 0x02, 0x08, 0x10, 0x80, 0xff] {
                let mut bytes = good.clone();
                bytes[v_off + byte] ^= mask;
                std::fs::write(&path, &bytes).unwrap();
                let names = listing(&path);
                let what = format!("length byte {byte} ^ {mask:#04x}");
                for e in [
                    Gallery::open(&path).unwrap_err(),
                    Gallery::load(&path).unwrap_err(),
                    Gallery::append(&path, vec![row("d", 4)]).unwrap_err(),
                    Gallery::remove(&path, "a").unwrap_err(),
                ] {
                    let e = e.to_string();
                    assert!(e.contains("damaged record") && e.contains(&format!("byte {v_off}")), "{what}: {e}");
                }
                assert_eq!(std::fs::read(&path).unwrap(), bytes, "{what}: the file is left as it is");
                assert_eq!(listing(&path), names, "{what}: nothing kept aside (nothing was cut)");
            }
        }
        // The same damage in a row's length field in the middle of the last transaction, too.
        let last_row = {
            let mut off = 8;
            let mut starts = Vec::new();
            while off < good.len() {
                starts.push(off);
                off += 8 + u32::from_le_bytes(good[off..off + 4].try_into().unwrap()) as usize;
            }
            starts[starts.len() - 2]
        };
        let mut bytes = good.clone();
        bytes[last_row] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap();
        let e = Gallery::load(&path).unwrap_err().to_string();
        assert!(e.contains(&format!("byte {last_row}")), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    /// A gallery at version `u64::MAX` (a shore update may set it) cannot be changed on board: every
    /// change is refused, nothing wraps to 0, the file stays as it is.
    #[test]
    fn version_u64_max_is_refused_never_wrapped() {
        let (_dir, path) = tmp("vmax");
        let g = Gallery::with_rows(16, SHA, u64::MAX, vec![row("a", 1), row("b", 2)]).unwrap();
        g.create(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let other = Gallery::with_rows(16, SHA, 1, vec![row("c", 3)]).unwrap();
        for e in [
            Gallery::append(&path, vec![row("c", 3)]).map(|g| g.version()).unwrap_err(),
            Gallery::remove(&path, "a").map(|(g, _)| g.version()).unwrap_err(),
            Gallery::merge(&path, &[other]).map(|(g, _)| g.version()).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(e.contains(&format!("version {}", u64::MAX)) && e.contains("cannot be changed"), "{e}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing written");
        assert_eq!(Gallery::open(&path).unwrap().version(), u64::MAX);
    }

    /// The daemon's read and its stamp are one step under the lock: an enrolment that holds the lock
    /// while the daemon starts is either wholly in what it loaded and in its stamp, or in neither. (Read
    /// without the lock and stamped after, the enrolment could land between the two: never loaded, yet
    /// the stamp matches, and the next shore update would overwrite it.)
    #[test]
    fn the_daemons_stamp_is_taken_with_its_read_under_the_lock() {
        let (_dir, path) = tmp("stamp");
        Gallery::with_rows(16, SHA, 1, vec![row("a", 1)]).unwrap().create(&path).unwrap();
        // An enrolment in progress: it holds the lock while it writes.
        let held = lock(&path).unwrap();
        let loader = {
            let path = path.clone();
            std::thread::spawn(move || Gallery::load(&path).unwrap().unwrap())
        };
        std::thread::sleep(Duration::from_millis(300));
        let mut tx = Vec::new();
        frame(&mut tx, &row_payload(&row("b", 2)));
        frame(&mut tx, &version_payload(2));
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&tx).unwrap();
        f.sync_data().unwrap();
        drop(held);
        let (g, stamp) = loader.join().unwrap();
        assert_eq!((g.len(), g.version()), (2, 2), "loaded after the enrolment it waited for");
        assert_eq!(Some(stamp), Gallery::stamp(&path), "the stamp is of the file it loaded");
        // So an update made against what it loaded installs; one against an older stamp would not.
        let new = Gallery::with_rows(16, SHA, 3, vec![row("c", 3)]).unwrap();
        Gallery::install(&path, &new, Some(stamp)).unwrap();
        assert_eq!(Gallery::load(&tmp("none").1).unwrap().map(|(g, _)| g.len()), None, "no file: nothing loaded");
    }

    #[test]
    fn delta_applies_only_to_its_base() {
        let mut g = Gallery::empty(16, SHA).unwrap();
        g.push(row("a", 1)).unwrap();
        g.push(row("b", 2)).unwrap();
        let d = Delta {
            dim: 16,
            embedder_sha256: SHA.into(),
            base_version: 0,
            base_content_sha256: g.content_sha256(),
            version: 5,
            removes: vec!["a".into()],
            adds: vec![row("c", 3)],
        };
        let d = Delta::from_bytes(&d.to_bytes(), "mem").unwrap();
        let n = g.apply(&d).unwrap();
        assert_eq!(n.rows().iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(n.version(), 5);
        assert!(n.apply(&d).unwrap_err().to_string().contains("version 0"));
        let wrong = Delta { embedder_sha256: "ff".repeat(32), ..d.clone() };
        assert!(g.apply(&wrong).unwrap_err().to_string().contains("SHA-256"));
        let missing = Delta { removes: vec!["zz".into()], ..d.clone() };
        assert!(g.apply(&missing).unwrap_err().to_string().contains("zz"));
        // Same version number, other rows (enrolled on board since shore's copy): refused.
        let mut diverged = g.clone();
        diverged.push(row("x", 9)).unwrap();
        assert!(diverged.apply(&d).unwrap_err().to_string().contains("holds other rows"));
        // A gallery file carrying delta records is refused.
        let mut bytes = g.to_bytes();
        let mut b = vec![b'B'];
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(SHA.as_bytes());
        frame(&mut bytes, &b);
        frame(&mut bytes, &version_payload(1));
        assert!(Gallery::from_bytes(&bytes, "mem")
            .unwrap_err()
            .to_string()
            .contains("a delta record in a gallery file"));
    }

    #[test]
    fn a_nan_query_matches_nobody() {
        let mut g = Gallery::empty(16, SHA).unwrap();
        g.push(row("a", 1)).unwrap();
        let (mut s, mut out) = (Vec::new(), Vec::new());
        g.nearest(&[f32::NAN; 16], &mut s, &mut out);
        assert!(out.is_empty());
        assert!(Row::new("new_individual", "s", "p", "t", SystemTime::UNIX_EPOCH, vec![1.0]).is_err());
    }

    #[test]
    fn bad_rows_are_refused() {
        assert!(Row::new("", "s", "p", "t", SystemTime::UNIX_EPOCH, vec![1.0]).is_err());
        assert!(Row::new("a", "s", "p", "t", SystemTime::UNIX_EPOCH, vec![0.0; 4]).is_err());
        assert!(Row::new("a", "s", "p", "t", SystemTime::UNIX_EPOCH, vec![f32::NAN; 4]).is_err());
        assert!(Gallery::empty(16, "nothex").is_err());
    }
}
