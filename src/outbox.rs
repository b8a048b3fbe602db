//! The durable outbox: every event bound for the broker is appended here before it is published, and
//! leaves only once the broker has acknowledged it (PUBACK). It is what makes "no identification lost"
//! hold across link outages, daemon crashes and restarts.
//!
//! # On disk
//! A directory of segment files `<first id, 20 digits>.seg`, `acked` (a text file holding the
//! acknowledged watermark, 20 digits, rewritten in place) and `lock` (held with an exclusive `flock` while the outbox is open; it
//! holds the owner's pid). A segment is a sequence of records:
//!
//! ```text
//!  u32 LE  payload length N           ┐ header, 24 bytes
//!  u32 LE  CRC-32 of bytes 8..24+N    │ (the id, the time and the payload)
//!  u64 LE  id                         │
//!  u64 LE  append time, ms since epoch┘
//!  N bytes payload: u16 LE topic length, topic (UTF-8), message bytes
//! ```
//!
//! Within a segment ids increase; they are consecutive except where records were lost to damage (see
//! 2). A segment's name is a lower bound of its ids and every id in it is below the next segment's name.
//!
//! # Invariants
//! 1. Ids are assigned by [`Outbox::append`], strictly increasing by one, never reused (after a restart
//!    numbering continues after the highest id found on disk or acknowledged).
//! 2. A record is only ever delivered whole and checksum-verified: [`Outbox::open`] scans every segment.
//!    At a torn or corrupt record it resynchronises: it looks for the next intact record further on
//!    (a valid header, length <= [`MAX_RECORD`], CRC, an id above the last good one and below the next
//!    segment's first). If there is one (a bad block in the middle: SD card damage), the damaged bytes
//!    are skipped, the intact records after them kept, and the segment is rewritten without the damage
//!    (a new file renamed over the old, so delivery reads every segment sequentially); the events lost
//!    are counted in [`Recovery`] and logged at ERROR. If there is none, the rest of the segment is cut
//!    off: in the last segment that is a write torn by a crash or power loss (WARN); in a closed
//!    segment it is data lost (ERROR, counted). Damaged bytes are never delivered.
//! 3. Records with `id <= acked` (the watermark) have been acknowledged by the broker, or no longer
//!    exist (lost to damage or dropped by the cap): the watermark is always just below the oldest
//!    stored record not yet acknowledged. Every record above it is delivered again after a reconnect or
//!    a restart, in id order. Delivery is therefore at-least-once: consumers de-duplicate on `event_id`
//!    (the watermark file is written at most every `fsync_interval`, so a crash can re-send what was
//!    acknowledged in that last interval).
//! 4. A segment is deleted only when every record in it is acknowledged, or to make room: when the size
//!    cap (`max_bytes`) forces it, or when the disk is full before the cap is reached (ENOSPC on append:
//!    the oldest segments are dropped and the write retried; the newest events are kept, and later
//!    segments are made smaller, a quarter of what fitted, so that the next time costs less). The
//!    undelivered records lost are counted (`dropped`, and `dropped_disk_full` for the full disk) and
//!    logged at ERROR, at most one line per 10 s with the counts since the last. A record larger than
//!    the cap is refused by `append` (it could never be kept).
//! 5. Durability against power loss: each append is written to the file at once (a crash of the process
//!    loses nothing); a sync (fdatasync of the segments written since the last one, the watermark file,
//!    the directory) runs every `fsync_every` appends, and the append that reaches that count returns
//!    only once it is done, or after `fsync_interval` (from [`SharedOutbox::sync_if_due`], which the
//!    publisher calls periodically), so a power cut loses at most that window of events.
//! 6. Shared use goes through [`SharedOutbox`], whose mutex is held only for in-memory work and
//!    `write(2)`: the expensive part of a sync (fdatasync/fsync, writing the watermark) runs without it,
//!    on duplicated file descriptors prepared under it, so the pipeline's appends, the publisher's
//!    reads and acknowledgements and `/healthz` never wait for the medium. Syncs are serialised among
//!    themselves by a second lock.
//! 7. One process per directory: [`Outbox::open`] takes an exclusive `flock` on `lock` and fails,
//!    naming the directory, if another process (or another open outbox) holds it.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Result};

const HEADER: usize = 24;
/// Larger records are refused on append and treated as corruption on recovery.
pub const MAX_RECORD: usize = 16 << 20;
const SEGMENT_SUFFIX: &str = "seg";
const ACKED_FILE: &str = "acked";
const LOCK_FILE: &str = "lock";
/// Segments are never made smaller than this to fit a small disk (a file takes whole blocks anyway; the
/// unit tests simulate disks of a few hundred bytes).
const MIN_SEGMENT: u64 = if cfg!(test) { 64 } else { 4096 };
/// At most one ERROR line about dropped events per this interval (with the counts since the last one).
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// The disk counts as full (stats, /healthz) for this long after the last ENOSPC.
const DISK_FULL_FOR: Duration = Duration::from_secs(60);

pub use crate::config::OutboxConfig;

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    /// Append time, ms since the Unix epoch.
    pub time_ms: u64,
    pub topic: String,
    pub message: Vec<u8>,
}

/// What [`Outbox::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Intact, unacknowledged records waiting to be delivered.
    pub pending: u64,
    /// Bytes cut off the end of a segment because no intact record followed a torn or corrupt one.
    pub truncated_bytes: u64,
    /// Damaged bytes skipped inside a segment, with intact records after them (resynchronised).
    pub skipped_bytes: u64,
    /// Unacknowledged events known to be lost to damage (ids missing between intact records).
    pub lost_records: u64,
    /// Segments in which a bad record was found.
    pub damaged_segments: usize,
}

#[derive(Debug, Clone)]
struct Segment {
    first_id: u64,
    /// Highest id in the segment; `first_id - 1` while empty.
    last_id: u64,
    path: PathBuf,
    bytes: u64,
}

/// Where the next record to deliver is read from.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    next_id: u64,
    segment_first_id: u64,
    offset: u64,
}

/// Counters for the stats topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Unacknowledged records.
    pub depth: u64,
    pub bytes: u64,
    /// Age of the oldest unacknowledged record.
    pub oldest_age_ms: Option<u64>,
    /// Undelivered records dropped since start: by the size cap or to make room on a full disk.
    pub dropped: u64,
    /// Of `dropped`, those dropped because the disk was full (ENOSPC) before the size cap, plus events
    /// refused because even then nothing fitted.
    pub dropped_disk_full: u64,
    /// The disk was found full (ENOSPC) within the last minute.
    pub disk_full: bool,
}

/// The ERROR line about dropped events, at most one per [`REPORT_EVERY`].
#[derive(Debug, Default)]
struct DropReport {
    last: Option<Instant>,
    cap: u64,
    disk_full: u64,
    ids: Option<(u64, u64)>,
    /// Lines logged (for tests).
    lines: u64,
}

/// The expensive half of a sync: prepared under the lock ([`Outbox::begin_sync`]), run without it
/// ([`SyncJob::run`]), recorded under it again ([`Outbox::finish_sync`]).
struct SyncJob {
    /// Duplicated descriptors of the segments written since the last sync (the active one last).
    files: Vec<(File, PathBuf)>,
    /// Appends covered by this sync.
    appended: usize,
    /// Whether the directory itself must be synced (new segment files).
    dir_dirty: bool,
    /// The watermark to write, if it moved.
    watermark: Option<u64>,
    dir: PathBuf,
}

impl SyncJob {
    fn run(&self) -> Result<()> {
        for (file, path) in &self.files {
            file.sync_data().map_err(|e| Error::io(path, e))?;
        }
        if let Some(acked) = self.watermark {
            write_watermark(&self.dir, acked)?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// The outbox; see the module docs for its invariants. Not thread-safe by itself: share it as a
/// [`SharedOutbox`], which keeps syncs outside its mutex.
pub struct Outbox {
    cfg: OutboxConfig,
    /// Held (flock) for as long as the outbox is open.
    _lock: File,
    segments: VecDeque<Segment>,
    active: File,
    /// Segment size in use: `cfg.segment_bytes`, smaller when the file system is smaller than the cap.
    segment_bytes: u64,
    next_id: u64,
    /// Every id up to here is acknowledged or gone.
    acked: u64,
    acked_on_disk: u64,
    /// Stored ids above the watermark acknowledged out of order.
    acked_above: BTreeSet<u64>,
    /// Every stored record above the watermark, in id order: (id, append time in ms).
    times: VecDeque<(u64, u64)>,
    cursor: Cursor,
    reader: Option<(u64, File)>,
    unsynced: usize,
    /// Closed segments not yet synced since they were last written.
    closing: Vec<(File, PathBuf)>,
    dir_dirty: bool,
    last_sync: Instant,
    dropped: u64,
    dropped_disk_full: u64,
    disk_full_at: Option<Instant>,
    report: DropReport,
    /// Test seam: a simulated file system of this many bytes of segment data (ENOSPC beyond).
    #[cfg(test)]
    fake_disk: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn segment_path(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(format!("{first_id:020}.{SEGMENT_SUFFIX}"))
}

fn checksum(body: &[u8]) -> u32 {
    crc32fast::hash(body)
}

fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Reads one record at the reader's position; `Ok(None)` at a clean end of file, `Err(reason)` for a
/// torn or corrupt record.
fn read_record(r: &mut impl Read) -> std::io::Result<std::result::Result<Option<(Record, u64)>, String>> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut header[got..])?;
        if n == 0 {
            return Ok(if got == 0 { Ok(None) } else { Err(format!("torn header ({got} of {HEADER} bytes)")) });
        }
        got += n;
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return Ok(Err(format!("record length {len} exceeds {MAX_RECORD}")));
    }
    let mut body = vec![0u8; 16 + len];
    body[..16].copy_from_slice(&header[8..]);
    let mut filled = 16;
    while filled < body.len() {
        let n = r.read(&mut body[filled..])?;
        if n == 0 {
            return Ok(Err(format!("torn record ({} of {} payload bytes)", filled - 16, len)));
        }
        filled += n;
    }
    if checksum(&body) != crc {
        return Ok(Err("checksum mismatch".into()));
    }
    let id = u64::from_le_bytes(body[0..8].try_into().unwrap_or_default());
    let time_ms = u64::from_le_bytes(body[8..16].try_into().unwrap_or_default());
    let payload = &body[16..];
    if payload.len() < 2 {
        return Ok(Err("payload shorter than its topic length".into()));
    }
    let tlen = u16::from_le_bytes([payload[0], payload[1]]) as usize;
    let Some(topic) = payload.get(2..2 + tlen).and_then(|t| std::str::from_utf8(t).ok()) else {
        return Ok(Err("bad topic".into()));
    };
    let record = Record { id, time_ms, topic: topic.to_string(), message: payload[2 + tlen..].to_vec() };
    Ok(Ok(Some((record, (HEADER + len) as u64))))
}

/// A record parsed from a segment held in memory.
enum At {
    End,
    Record(Record, usize),
    Bad(String),
}

fn record_at(bytes: &[u8], pos: usize) -> At {
    let mut r = bytes.get(pos..).unwrap_or_default();
    match read_record(&mut r) {
        Ok(Ok(None)) => At::End,
        Ok(Ok(Some((record, len)))) => At::Record(record, len as usize),
        Ok(Err(reason)) => At::Bad(reason),
        Err(e) => At::Bad(e.to_string()),
    }
}

/// The next offset at or after `from` where an intact record with an id in `(after, below)` starts.
fn resync(bytes: &[u8], from: usize, after: u64, below: u64) -> Option<(usize, u64)> {
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    (from..bytes.len().saturating_sub(HEADER - 1)).find_map(|p| {
        let h = &bytes[p..p + HEADER];
        let (len, id) = (le32(&h[0..4]), le64(&h[8..16]));
        let plausible = len <= MAX_RECORD && p + HEADER + len <= bytes.len() && id > after && id < below;
        match plausible.then(|| record_at(bytes, p)) {
            Some(At::Record(r, _)) if r.id == id => Some((p, id)),
            _ => None,
        }
    })
}

/// Bytes available to an unprivileged writer on the file system holding `dir`.
#[allow(clippy::unnecessary_cast)] // the statvfs field types differ between targets
fn available_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid, exclusively borrowed out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Takes the directory's lock file (invariant 7).
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = owner.trim();
            let owner = if owner.is_empty() { String::new() } else { format!(" (pid {owner})") };
            return Err(Error::Input(format!(
                "outbox {} is in use by another process{owner}: is whaled already running with this \
                 [mqtt.outbox] dir? Each daemon needs its own outbox directory",
                dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    // Who holds it, for the message above (best effort: the lock itself is what counts).
    let _ = file.set_len(0).and_then(|_| writeln!(file, "{}", std::process::id()));
    Ok(file)
}

/// One segment's scan at open: appends its pending records to `times`, repairs damage (invariant 2),
/// and returns (last id, size after repair).
fn scan_segment(
    path: &Path,
    first: u64,
    below: u64,
    is_last: bool,
    acked: u64,
    times: &mut VecDeque<(u64, u64)>,
    recovery: &mut Recovery,
) -> Result<(u64, u64)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (mut pos, mut run_start, mut last_id) = (0usize, 0usize, first.saturating_sub(1));
    let mut keep: Vec<Range<usize>> = Vec::new();
    let (mut damaged, mut skipped, mut cut) = (false, false, false);
    loop {
        let reason = match record_at(&bytes, pos) {
            At::End => break,
            At::Record(r, len) if r.id > last_id && r.id < below => {
                if r.id > acked {
                    recovery.pending += 1;
                    times.push_back((r.id, r.time_ms));
                }
                last_id = r.id;
                pos += len;
                continue;
            }
            At::Record(r, _) => format!("id {} out of sequence after {last_id}", r.id),
            At::Bad(reason) => reason,
        };
        damaged = true;
        keep.push(run_start..pos);
        // Lost: the unacknowledged ids between the last good record and the next one.
        let lost_below = |next: u64| next.saturating_sub(1).saturating_sub(last_id.max(acked));
        match resync(&bytes, pos + 1, last_id, below) {
            Some((next, id)) => {
                let lost = lost_below(id);
                recovery.skipped_bytes += (next - pos) as u64;
                recovery.lost_records += lost;
                let what = format!(
                    "{}: {reason} at byte {pos}; skipped {} damaged bytes to the next intact record (id {id})",
                    path.display(),
                    next - pos
                );
                if lost > 0 {
                    log::error!("{what}: {lost} undelivered event(s) lost (ids {}..{id})", last_id.max(acked) + 1);
                } else {
                    log::warn!("{what}: no undelivered event lost");
                }
                skipped = true;
                pos = next;
                run_start = next;
            }
            None => {
                let tail = bytes.len() - pos;
                recovery.truncated_bytes += tail as u64;
                if is_last {
                    log::warn!(
                        "{}: {reason} at byte {pos}; cutting off the last {tail} bytes (a write torn by a crash \
                         or power loss)",
                        path.display()
                    );
                } else {
                    let lost = lost_below(below);
                    recovery.lost_records += lost;
                    let what = format!(
                        "{}: {reason} at byte {pos}; no intact record in the last {tail} bytes of this closed segment",
                        path.display()
                    );
                    if lost > 0 {
                        log::error!(
                            "{what}: {lost} undelivered event(s) lost (ids {}..{below})",
                            last_id.max(acked) + 1
                        );
                    } else {
                        log::warn!("{what}: cut off; no undelivered event lost");
                    }
                }
                cut = true;
                break;
            }
        }
    }
    if !cut {
        keep.push(run_start..pos);
    }
    let size: usize = keep.iter().map(|r| r.len()).sum();
    if damaged {
        recovery.damaged_segments += 1;
        if skipped {
            // Without the damaged ranges, so delivery reads the segment sequentially; renamed over the
            // original only once complete and synced (a crash leaves one or the other, whole).
            let tmp = path.with_extension(format!("{SEGMENT_SUFFIX}.tmp"));
            let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            for r in &keep {
                f.write_all(&bytes[r.clone()]).map_err(|e| Error::io(&tmp, e))?;
            }
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        } else {
            let f = OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
            f.set_len(size as u64).map_err(|e| Error::io(path, e))?;
            f.sync_all().map_err(|e| Error::io(path, e))?;
        }
    }
    Ok((last_id, size as u64))
}

impl Outbox {
    /// Opens (or creates) the outbox in `cfg.dir`: takes the directory's lock (invariant 7), verifies
    /// every record and repairs damage (invariant 2).
    pub fn open(cfg: OutboxConfig) -> Result<(Outbox, Recovery)> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock = lock_dir(&dir)?;
        let acked_path = dir.join(ACKED_FILE);
        let acked = match std::fs::read_to_string(&acked_path) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or_else(|_| {
                log::warn!(
                    "{}: unreadable watermark {s:?}; every stored event will be sent again",
                    acked_path.display()
                );
                0
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_watermark(&dir, 0)?;
                0
            }
            Err(e) => return Err(Error::io(&acked_path, e)),
        };
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.ends_with(&format!(".{SEGMENT_SUFFIX}.tmp")) {
                // A repair interrupted before its rename: the original segment is still there.
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_SUFFIX) {
                continue;
            }
            match path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()) {
                Some(first) => firsts.push(first),
                None => log::warn!("{}: not an outbox segment name; ignored", path.display()),
            }
        }
        firsts.sort_unstable();

        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        let mut times = VecDeque::new();
        let mut highest = acked;
        for (i, &first) in firsts.iter().enumerate() {
            let path = segment_path(&dir, first);
            let below = firsts.get(i + 1).copied().unwrap_or(u64::MAX);
            let is_last = i + 1 == firsts.len();
            let (last_id, bytes) = scan_segment(&path, first, below, is_last, acked, &mut times, &mut recovery)?;
            highest = highest.max(last_id);
            segments.push_back(Segment { first_id: first, last_id, path, bytes });
        }
        // Numbering continues after everything seen; an empty last segment is reused.
        let next_id = highest + 1;
        let reuse_last = segments.back().is_some_and(|s| s.bytes == 0 && s.first_id == next_id);
        if !reuse_last {
            // Empty segments whose ids were never used would break the name = first id rule.
            while segments.back().is_some_and(|s| s.bytes == 0) {
                if let Some(s) = segments.pop_back() {
                    std::fs::remove_file(&s.path).map_err(|e| Error::io(&s.path, e))?;
                }
            }
            let path = segment_path(&dir, next_id);
            File::create(&path).map_err(|e| Error::io(&path, e))?;
            segments.push_back(Segment { first_id: next_id, last_id: next_id - 1, path, bytes: 0 });
        }
        let active_path = segments.back().map(|s| s.path.clone()).unwrap_or_default();
        let active = OpenOptions::new().append(true).open(&active_path).map_err(|e| Error::io(&active_path, e))?;
        sync_dir(&dir)?;
        // A file system smaller than the cap: segments of a quarter of it, so that a full disk costs a
        // quarter of the backlog, not all of it (invariant 4).
        let stored: u64 = segments.iter().map(|s| s.bytes).sum();
        let mut segment_bytes = cfg.segment_bytes;
        if let Some(room) = available_bytes(&dir).map(|a| a + stored).filter(|&room| room < cfg.max_bytes) {
            segment_bytes = segment_bytes.min((room / 4).max(MIN_SEGMENT));
            log::warn!(
                "outbox {}: its file system has room for {room} bytes, less than the {} byte cap; when it is \
                 full the oldest undelivered events are dropped",
                dir.display(),
                cfg.max_bytes
            );
        }
        let cursor = Cursor {
            next_id: acked + 1,
            segment_first_id: segments.front().map_or(next_id, |s| s.first_id),
            offset: 0,
        };
        let mut outbox = Outbox {
            cfg,
            _lock: lock,
            segments,
            active,
            segment_bytes,
            next_id,
            acked,
            acked_on_disk: acked,
            acked_above: BTreeSet::new(),
            times,
            cursor,
            reader: None,
            unsynced: 0,
            closing: Vec::new(),
            dir_dirty: false,
            last_sync: Instant::now(),
            dropped: 0,
            dropped_disk_full: 0,
            disk_full_at: None,
            report: DropReport::default(),
            #[cfg(test)]
            fake_disk: None,
        };
        // Ids missing below the oldest pending record (lost, or in segments dropped before the
        // watermark was written) are gone: the watermark moves past them (invariant 3).
        outbox.advance();
        outbox.collect_acked_segments()?;
        outbox.rewind();
        Ok((outbox, recovery))
    }

    /// Appends an event; returns its id. Written to the file before returning; synced too when it is
    /// the `fsync_every`-th since the last sync (invariant 5).
    pub fn append(&mut self, topic: &str, message: &[u8]) -> Result<u64> {
        let (id, sync) = self.append_unsynced(topic, message)?;
        if sync {
            self.sync()?;
        }
        Ok(id)
    }

    /// Appends without syncing; returns the id and whether a sync is now due by count.
    fn append_unsynced(&mut self, topic: &str, message: &[u8]) -> Result<(u64, bool)> {
        let tlen = u16::try_from(topic.len()).map_err(|_| Error::Input(format!("topic too long: {topic}")))?;
        let len = 2 + topic.len() + message.len();
        if len > MAX_RECORD {
            return Err(Error::Input(format!("event of {len} bytes exceeds the outbox record limit {MAX_RECORD}")));
        }
        let size = (HEADER + len) as u64;
        if size > self.cfg.max_bytes {
            return Err(Error::Input(format!(
                "outbox {}: an event of {size} bytes can never fit under its size cap of {} bytes \
                 ([mqtt.outbox] max_size_mb); not stored",
                self.cfg.dir.display(),
                self.cfg.max_bytes
            )));
        }
        let active_full = self.segments.back().is_some_and(|s| s.bytes > 0 && s.bytes + size > self.segment_bytes);
        if active_full {
            self.rotate()?;
        }
        let id = self.next_id;
        let time_ms = now_ms();
        let mut buf = Vec::with_capacity(HEADER + len);
        buf.extend_from_slice(&(len as u32).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&id.to_le_bytes());
        buf.extend_from_slice(&time_ms.to_le_bytes());
        buf.extend_from_slice(&tlen.to_le_bytes());
        buf.extend_from_slice(topic.as_bytes());
        buf.extend_from_slice(message);
        let crc = checksum(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        loop {
            match self.write_active(&buf) {
                Ok(()) => break,
                Err(e) if is_disk_full(&e) => {
                    if let Err(e) = self.make_room(&e) {
                        // Nothing of ours left to drop: the event is lost too.
                        self.dropped += 1;
                        self.dropped_disk_full += 1;
                        return Err(e);
                    }
                }
                Err(e) => {
                    let path = self.segments.back().map(|s| s.path.clone()).unwrap_or_default();
                    return Err(Error::io(&path, e));
                }
            }
        }
        let seg = self.segments.back_mut().ok_or_else(|| Error::Input("outbox has no active segment".into()))?;
        seg.bytes += buf.len() as u64;
        seg.last_id = id;
        self.next_id += 1;
        self.times.push_back((id, time_ms));
        self.unsynced += 1;
        self.enforce_cap()?;
        Ok((id, self.unsynced >= self.cfg.fsync_every))
    }

    /// Writes a record at the end of the active segment; a partial write is cut off again at once (it
    /// would be a torn record in the middle of the file).
    fn write_active(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let seg_bytes = self.segments.back().map_or(0, |s| s.bytes);
        #[cfg(test)]
        if let Some(room) = self.fake_disk {
            if self.segments.iter().map(|s| s.bytes).sum::<u64>() + buf.len() as u64 > room {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        if let Err(e) = self.active.write_all(buf) {
            let _ = self.active.set_len(seg_bytes);
            return Err(e);
        }
        Ok(())
    }

    /// The disk is full before the size cap: drops the oldest segment (never the newest events) so the
    /// write can be retried, and makes later segments smaller (invariant 4). Fails when there is nothing
    /// left to drop.
    fn make_room(&mut self, e: &std::io::Error) -> Result<()> {
        self.disk_full_at = Some(Instant::now());
        let stored: u64 = self.segments.iter().map(|s| s.bytes).sum();
        self.segment_bytes = self.segment_bytes.min((stored / 4).max(MIN_SEGMENT));
        let full = || {
            Error::Input(format!(
                "outbox {}: the disk is full ({e}) and the outbox holds nothing more to drop; event not stored",
                self.cfg.dir.display()
            ))
        };
        if self.segments.len() == 1 {
            if self.segments.back().is_none_or(|s| s.bytes == 0) {
                return Err(full());
            }
            // Everything is in the active segment: start a new one (an empty file takes no blocks) and
            // drop the old one below.
            self.rotate()?;
        }
        self.drop_oldest(true)
    }

    /// Flushes appended records and the watermark to the medium now.
    pub fn sync(&mut self) -> Result<()> {
        let job = self.begin_sync()?;
        let result = job.run();
        self.finish_sync(job, result)
    }

    /// Whether the interval has passed with something to sync.
    fn sync_due(&self) -> bool {
        (self.unsynced > 0 || self.acked != self.acked_on_disk || !self.closing.is_empty())
            && self.last_sync.elapsed() >= self.cfg.fsync_interval
    }

    /// Takes what a sync must write (duplicated descriptors, the watermark), under the lock.
    fn begin_sync(&mut self) -> Result<SyncJob> {
        let mut files = std::mem::take(&mut self.closing);
        if self.unsynced > 0 {
            if let Some(seg) = self.segments.back() {
                let dup = self.active.try_clone().map_err(|e| Error::io(&seg.path, e))?;
                files.push((dup, seg.path.clone()));
            }
        }
        Ok(SyncJob {
            files,
            appended: self.unsynced,
            dir_dirty: std::mem::take(&mut self.dir_dirty),
            watermark: (self.acked != self.acked_on_disk).then_some(self.acked),
            dir: self.cfg.dir.clone(),
        })
    }

    /// Records a finished sync, under the lock; on failure what it had to write is kept for the next.
    fn finish_sync(&mut self, job: SyncJob, result: Result<()>) -> Result<()> {
        self.last_sync = Instant::now();
        self.flush_report(false);
        if let Err(e) = result {
            let active = self.segments.back().map(|s| s.path.clone());
            // Closed segments stay to be synced; the active one is dup'ed again next time.
            self.closing.extend(job.files.into_iter().filter(|(_, p)| Some(p) != active.as_ref()));
            self.dir_dirty |= job.dir_dirty;
            return Err(e);
        }
        // Appends made while the job ran are not covered by it.
        self.unsynced = self.unsynced.saturating_sub(job.appended);
        if let Some(acked) = job.watermark {
            self.acked_on_disk = acked;
            self.collect_acked_segments()?;
        }
        Ok(())
    }

    /// Marks `id` as acknowledged by the broker (invariant 3). Unknown or repeated ids are ignored.
    pub fn ack(&mut self, id: u64) {
        if id <= self.acked || id >= self.next_id || self.times.binary_search_by_key(&id, |&(i, _)| i).is_err() {
            return;
        }
        self.acked_above.insert(id);
        self.advance();
    }

    /// Moves the watermark up to just below the oldest stored record not acknowledged (invariant 3).
    fn advance(&mut self) {
        while let Some(&(id, _)) = self.times.front() {
            if id <= self.acked || self.acked_above.remove(&id) {
                self.times.pop_front();
            } else {
                break;
            }
        }
        let below = self.times.front().map_or(self.next_id - 1, |&(id, _)| id - 1);
        self.acked = self.acked.max(below);
    }

    /// Starts delivery over from the oldest unacknowledged record (after a reconnect).
    pub fn rewind(&mut self) {
        let first = self.acked + 1;
        let seg = self.segments.iter().find(|s| s.last_id >= first).or(self.segments.back());
        self.cursor = Cursor { next_id: first, segment_first_id: seg.map_or(first, |s| s.first_id), offset: 0 };
        self.reader = None;
    }

    /// The next unacknowledged record not yet handed out since the last [`rewind`](Self::rewind), in id
    /// order; `None` when all have been handed out.
    pub fn next_to_send(&mut self) -> Result<Option<Record>> {
        loop {
            if self.cursor.next_id >= self.next_id {
                return Ok(None);
            }
            let Some(seg) = self.segments.iter().find(|s| s.first_id == self.cursor.segment_first_id).cloned() else {
                // The segment was dropped to make room: continue at the oldest remaining.
                self.rewind_to_oldest();
                continue;
            };
            if self.cursor.offset >= seg.bytes {
                match self.segments.iter().find(|s| s.first_id > seg.first_id) {
                    Some(next) => {
                        self.cursor = Cursor {
                            next_id: self.cursor.next_id.max(next.first_id),
                            segment_first_id: next.first_id,
                            offset: 0,
                        };
                        self.reader = None;
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            if self.reader.as_ref().is_none_or(|(first, _)| *first != seg.first_id) {
                let f = File::open(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
                self.reader = Some((seg.first_id, f));
            }
            let (_, file) = self.reader.as_mut().ok_or_else(|| Error::Input("outbox reader lost".into()))?;
            file.seek(SeekFrom::Start(self.cursor.offset)).map_err(|e| Error::io(&seg.path, e))?;
            match read_record(file).map_err(|e| Error::io(&seg.path, e))? {
                Ok(Some((record, len))) => {
                    self.cursor.offset += len;
                    self.cursor.next_id = record.id + 1;
                    if record.id <= self.acked || self.acked_above.contains(&record.id) {
                        continue;
                    }
                    return Ok(Some(record));
                }
                Ok(None) => return Ok(None),
                Err(reason) => {
                    // Written by this process and verified on open: the medium itself failed.
                    return Err(Error::Input(format!(
                        "{}: record at byte {} unreadable ({reason}); the outbox medium is failing",
                        seg.path.display(),
                        self.cursor.offset
                    )));
                }
            }
        }
    }

    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            depth: (self.times.len() - self.acked_above.len()) as u64,
            bytes: self.segments.iter().map(|s| s.bytes).sum(),
            // The front is never acknowledged (`advance` pops those).
            oldest_age_ms: self.times.front().map(|&(_, t)| now_ms().saturating_sub(t)),
            dropped: self.dropped,
            dropped_disk_full: self.dropped_disk_full,
            disk_full: self.disk_full_at.is_some_and(|t| t.elapsed() < DISK_FULL_FOR),
        }
    }

    /// The highest id appended so far (0 if none).
    pub fn last_id(&self) -> u64 {
        self.next_id - 1
    }

    /// The outbox directory.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    fn rewind_to_oldest(&mut self) {
        let first = self.segments.front().map_or(self.next_id, |s| s.first_id);
        self.cursor = Cursor { next_id: first.max(self.acked + 1), segment_first_id: first, offset: 0 };
        self.reader = None;
    }

    /// Closes the active segment (it is synced by the next sync, not here: no fsync under the lock) and
    /// starts a new one.
    fn rotate(&mut self) -> Result<()> {
        let path = segment_path(&self.cfg.dir, self.next_id);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let old = std::mem::replace(&mut self.active, file);
        if let Some(seg) = self.segments.back() {
            if self.unsynced > 0 {
                self.closing.push((old, seg.path.clone()));
            }
        }
        self.dir_dirty = true;
        self.segments.push_back(Segment { first_id: self.next_id, last_id: self.next_id - 1, path, bytes: 0 });
        Ok(())
    }

    /// Deletes closed segments whose records are all acknowledged and on-disk watermarked (invariant 4).
    fn collect_acked_segments(&mut self) -> Result<()> {
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.last_id <= self.acked_on_disk) {
            if let Some(s) = self.segments.pop_front() {
                self.closing.retain(|(_, p)| *p != s.path);
                std::fs::remove_file(&s.path).map_err(|e| Error::io(&s.path, e))?;
            }
        }
        Ok(())
    }

    /// The size cap: drops the oldest segments, counting unacknowledged records lost (invariant 4).
    fn enforce_cap(&mut self) -> Result<()> {
        loop {
            let total: u64 = self.segments.iter().map(|s| s.bytes).sum();
            if total <= self.cfg.max_bytes {
                return Ok(());
            }
            if self.segments.len() == 1 {
                self.rotate()?;
            }
            self.drop_oldest(false)?;
        }
    }

    /// Deletes the oldest segment, counting (and reporting) the undelivered records in it.
    fn drop_oldest(&mut self, disk_full: bool) -> Result<()> {
        let Some(oldest) = self.segments.pop_front() else { return Ok(()) };
        self.closing.retain(|(_, p)| *p != oldest.path);
        std::fs::remove_file(&oldest.path).map_err(|e| Error::io(&oldest.path, e))?;
        let mut lost = 0;
        while let Some(&(id, _)) = self.times.front().filter(|&&(id, _)| id <= oldest.last_id) {
            self.times.pop_front();
            if !self.acked_above.remove(&id) {
                lost += 1;
            }
        }
        self.advance();
        if self.cursor.segment_first_id == oldest.first_id {
            self.rewind_to_oldest();
        }
        if lost > 0 {
            self.dropped += lost;
            if disk_full {
                self.dropped_disk_full += lost;
                self.report.disk_full += lost;
            } else {
                self.report.cap += lost;
            }
            let (a, _) = self.report.ids.unwrap_or((oldest.first_id, oldest.last_id));
            self.report.ids = Some((a, oldest.last_id));
            self.flush_report(false);
        }
        Ok(())
    }

    /// Logs the events dropped since the last report, at most once per [`REPORT_EVERY`] unless `now`.
    fn flush_report(&mut self, now: bool) {
        let r = &mut self.report;
        if r.cap + r.disk_full == 0 || !(now || r.last.is_none_or(|t| t.elapsed() >= REPORT_EVERY)) {
            return;
        }
        let mut why = Vec::new();
        if r.cap > 0 {
            why.push(format!("{} over its {} byte size cap", r.cap, self.cfg.max_bytes));
        }
        if r.disk_full > 0 {
            why.push(format!("{} because the disk is full (below the size cap)", r.disk_full));
        }
        let since = match r.last {
            Some(t) => format!(" in the last {:.0?}", t.elapsed()),
            None => String::new(),
        };
        let ids = r.ids.map(|(a, b)| format!(" (ids {a}..={b})")).unwrap_or_default();
        log::error!(
            "outbox {}: dropped undelivered events{since}{ids}: {}; {} dropped since start ({} for a full disk)",
            self.cfg.dir.display(),
            why.join(", "),
            self.dropped,
            self.dropped_disk_full
        );
        *r = DropReport { last: Some(Instant::now()), lines: r.lines + 1, ..DropReport::default() };
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.flush_report(true);
    }
}

/// Overwrites the watermark in place, fixed width: the file's block is allocated once, at open, so the
/// watermark can still be written when the disk is full (a new file, or a rename, would need a new
/// block). 21 bytes at offset 0 lie in one sector, which storage writes whole; a torn write would only
/// make the next start send everything again (invariant 3: at-least-once).
fn write_watermark(dir: &Path, acked: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(ACKED_FILE);
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all_at(format!("{acked:020}\n").as_bytes(), 0).map_err(|e| Error::io(&path, e))?;
    f.sync_data().map_err(|e| Error::io(&path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// The outbox shared between threads (the pipeline's sink, the publisher, `/healthz`): every method
/// takes the mutex only for in-memory work and `write(2)`; syncs run outside it (invariant 6).
pub struct SharedOutbox {
    inner: Mutex<Outbox>,
    /// Serialises syncs (one watermark writer at a time) without blocking the outbox.
    syncing: Mutex<()>,
    /// Test seam: runs inside a sync, after the outbox's mutex was released.
    #[cfg(test)]
    in_sync: Option<Box<dyn Fn() + Send + Sync>>,
}

impl SharedOutbox {
    pub fn new(outbox: Outbox) -> Self {
        SharedOutbox {
            inner: Mutex::new(outbox),
            syncing: Mutex::new(()),
            #[cfg(test)]
            in_sync: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Outbox::append`]; the sync it may trigger runs without the mutex.
    pub fn append(&self, topic: &str, message: &[u8]) -> Result<u64> {
        let (id, sync) = self.lock().append_unsynced(topic, message)?;
        if sync {
            self.sync()?;
        }
        Ok(id)
    }

    /// Flushes appended records and the watermark to the medium now, without holding the mutex while
    /// the medium works.
    pub fn sync(&self) -> Result<()> {
        let _one = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let job = self.lock().begin_sync()?;
        #[cfg(test)]
        if let Some(hook) = &self.in_sync {
            hook();
        }
        let result = job.run();
        self.lock().finish_sync(job, result)
    }

    /// Syncs if the interval has passed with something to sync; call it periodically (the publisher
    /// does). Also logs drop counts held back by the rate limit.
    pub fn sync_if_due(&self) -> Result<()> {
        let due = {
            let mut o = self.lock();
            o.flush_report(false);
            o.sync_due()
        };
        if due {
            self.sync()?;
        }
        Ok(())
    }

    pub fn ack(&self, id: u64) {
        self.lock().ack(id)
    }

    pub fn rewind(&self) {
        self.lock().rewind()
    }

    pub fn next_to_send(&self) -> Result<Option<Record>> {
        self.lock().next_to_send()
    }

    pub fn stats(&self) -> OutboxStats {
        self.lock().stats()
    }

    pub fn dir(&self) -> PathBuf {
        self.lock().dir().to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc};

    fn cfg(dir: &Path) -> OutboxConfig {
        OutboxConfig { segment_bytes: 300, ..OutboxConfig::new(dir.to_path_buf()) }
    }

    fn drain(o: &mut Outbox) -> Vec<u64> {
        let mut ids = Vec::new();
        while let Some(r) = o.next_to_send().unwrap() {
            ids.push(r.id);
        }
        ids
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == SEGMENT_SUFFIX))
            .collect();
        v.sort();
        v
    }

    /// Byte offset of each record in a segment file.
    fn offsets(bytes: &[u8]) -> Vec<usize> {
        let (mut pos, mut out) = (0, Vec::new());
        while let At::Record(_, len) = record_at(bytes, pos) {
            out.push(pos);
            pos += len;
        }
        out
    }

    #[test]
    fn appends_survive_reopen_and_only_unacked_are_resent() {
        let dir = tempfile::tempdir().unwrap();
        let (mut o, rec) = Outbox::open(cfg(dir.path())).unwrap();
        assert_eq!(rec, Recovery::default());
        for i in 0..10 {
            assert_eq!(o.append("t/a", format!("event {i}").as_bytes()).unwrap(), i + 1);
        }
        assert!(o.segments.len() >= 2, "small segments rotate");
        assert_eq!(drain(&mut o), (1..=10).collect::<Vec<_>>());
        for id in [1, 2, 3, 5] {
            o.ack(id);
        }
        assert_eq!(o.stats().depth, 6);
        o.rewind();
        assert_eq!(drain(&mut o), vec![4, 6, 7, 8, 9, 10]);
        o.sync().unwrap();
        drop(o);

        let (mut o, rec) = Outbox::open(cfg(dir.path())).unwrap();
        // 5 was acked above the watermark (3) and is not remembered: sent again (at-least-once).
        assert_eq!(rec.pending, 7);
        let r = o.next_to_send().unwrap().unwrap();
        assert_eq!((r.id, r.topic.as_str(), r.message.as_slice()), (4, "t/a", b"event 3".as_slice()));
        assert_eq!(o.append("t/b", b"x").unwrap(), 11, "ids continue after a restart");
    }

    #[test]
    fn acked_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(cfg(dir.path())).unwrap();
        for _ in 0..20 {
            o.append("t", &[7; 40]).unwrap();
        }
        let before = segment_files(dir.path()).len();
        for id in 1..=20 {
            o.ack(id);
        }
        o.sync().unwrap();
        let after = segment_files(dir.path()).len();
        assert!(after < before && after <= 1, "{before} -> {after} segments");
        drop(o);
        let (mut o, rec) = Outbox::open(cfg(dir.path())).unwrap();
        assert_eq!(rec.pending, 0);
        assert_eq!(o.append("t", b"y").unwrap(), 21);
    }

    /// Each row: how the tail of the last segment is damaged; every earlier record must survive.
    #[test]
    fn torn_and_corrupt_tails_are_cut_off() {
        type Damage = fn(&mut Vec<u8>);
        let cases: [(&str, Damage); 4] = [
            ("truncated payload", |b| b.truncate(b.len() - 3)),
            ("truncated header", |b| b.truncate(b.len() - 40 + 10)),
            ("flipped bit", |b| {
                let n = b.len();
                b[n - 2] ^= 0x10
            }),
            ("garbage appended", |b| b.extend_from_slice(&[0xAB; 30])),
        ];
        for (what, damage) in cases {
            let dir = tempfile::tempdir().unwrap();
            let c = OutboxConfig { segment_bytes: 1 << 20, ..OutboxConfig::new(dir.path().to_path_buf()) };
            let (mut o, _) = Outbox::open(c.clone()).unwrap();
            for i in 0..5u8 {
                o.append("cam/detection", &[i; 14]).unwrap(); // 24 + 2 + 13 + 14 = 53 bytes per record
            }
            drop(o);
            let seg = segment_path(dir.path(), 1);
            let mut bytes = std::fs::read(&seg).unwrap();
            damage(&mut bytes);
            std::fs::write(&seg, &bytes).unwrap();
            let (mut o, rec) = Outbox::open(c).unwrap();
            let ids = drain(&mut o);
            let want: Vec<u64> = if what == "garbage appended" { (1..=5).collect() } else { (1..=4).collect() };
            assert_eq!(ids, want, "{what}");
            assert_eq!(rec.damaged_segments, 1, "{what}");
            assert!(rec.truncated_bytes > 0, "{what}");
            assert_eq!((rec.skipped_bytes, rec.lost_records), (0, 0), "{what}: a torn tail is not counted as lost");
            // The next append lands after the last good record and is readable.
            let id = o.append("cam/detection", b"after").unwrap();
            assert_eq!(id, want.len() as u64 + 1, "{what}");
            o.rewind();
            assert_eq!(drain(&mut o).last(), Some(&id), "{what}");
        }
    }

    /// A bad block in the middle of a closed segment: the records after it are kept, the loss counted,
    /// the segment rewritten, and the watermark moves past the missing ids once the rest is acked.
    #[test]
    fn damage_in_a_closed_segment_keeps_the_intact_records_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = OutboxConfig { segment_bytes: 600, ..OutboxConfig::new(dir.path().to_path_buf()) };
        let (mut o, _) = Outbox::open(c.clone()).unwrap();
        for i in 0..30u8 {
            o.append("cam/detection", &[i; 20]).unwrap(); // 59 bytes: 10 records per segment
        }
        o.ack(1); // acknowledged records lost to damage are no loss
        o.sync().unwrap();
        drop(o);
        let segs = segment_files(dir.path());
        assert!(segs.len() >= 3, "{segs:?}");
        // Segment 1 (ids 1..=10): damage records 1 (acked), 5 and 6 (one bad block across both).
        let mut bytes = std::fs::read(&segs[0]).unwrap();
        let at = offsets(&bytes);
        assert_eq!(at.len(), 10);
        bytes[at[0] + 30] ^= 0xFF;
        for b in &mut bytes[at[4] + 10..at[5] + 40] {
            *b = 0;
        }
        std::fs::write(&segs[0], &bytes).unwrap();
        // Segment 2 (ids 11..=20): its last record is damaged and nothing intact follows in it.
        let mut bytes = std::fs::read(&segs[1]).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 0x01;
        std::fs::write(&segs[1], &bytes).unwrap();

        let (mut o, rec) = Outbox::open(c.clone()).unwrap();
        let want: Vec<u64> = (2..=4).chain(7..=19).chain(21..=30).collect();
        assert_eq!(drain(&mut o), want, "every intact record is delivered");
        assert_eq!(rec.damaged_segments, 2, "{rec:?}");
        assert_eq!(rec.lost_records, 3, "ids 5, 6 and 20 (1 was acknowledged): {rec:?}");
        assert_eq!(rec.skipped_bytes, 59 * 3, "{rec:?}");
        assert_eq!(rec.truncated_bytes, 59, "{rec:?}");
        assert_eq!(rec.pending, want.len() as u64);
        assert_eq!(o.stats().depth, want.len() as u64);
        for id in &want {
            o.ack(*id);
        }
        let s = o.stats();
        assert_eq!((s.depth, o.acked), (0, 30), "the watermark passes the lost ids: {s:?}");
        o.sync().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 1, "acked segments are deleted");
        drop(o);
        // Repaired on disk: a second open finds nothing wrong.
        let (mut o, rec) = Outbox::open(c).unwrap();
        assert_eq!(rec, Recovery::default());
        assert_eq!(o.append("t", b"x").unwrap(), 31);
    }

    #[test]
    fn a_record_larger_than_the_size_cap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = OutboxConfig { max_bytes: 1000, segment_bytes: 300, ..OutboxConfig::new(dir.path().to_path_buf()) };
        let (mut o, _) = Outbox::open(c).unwrap();
        o.append("t", b"before").unwrap();
        let e = o.append("t", &[0; 1000]).unwrap_err().to_string();
        assert!(e.contains("size cap") && e.contains(&dir.path().display().to_string()), "{e}");
        let s = o.stats();
        assert_eq!((s.depth, s.dropped), (1, 0), "nothing stored, nothing else dropped: {s:?}");
        assert_eq!(drain(&mut o), vec![1]);
        assert_eq!(o.append("t", b"after").unwrap(), 2);
    }

    #[test]
    fn the_size_cap_drops_the_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let c = OutboxConfig { max_bytes: 1000, segment_bytes: 300, ..OutboxConfig::new(dir.path().to_path_buf()) };
        let (mut o, _) = Outbox::open(c).unwrap();
        for _ in 0..40 {
            o.append("t", &[1; 50]).unwrap();
        }
        let s = o.stats();
        assert!(s.bytes <= 1000, "{s:?}");
        assert!(s.dropped > 0 && s.dropped + s.depth == 40 && s.dropped_disk_full == 0, "{s:?}");
        assert_eq!(o.report.lines, 1, "one ERROR line for a burst of drops");
        let ids = drain(&mut o);
        assert_eq!(ids.len() as u64, s.depth);
        assert_eq!(ids.last(), Some(&40));
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
    }

    /// ENOSPC before the cap (through the simulated disk): like the cap, the oldest go and the newest
    /// stay, counted separately, one ERROR line per burst.
    #[test]
    fn a_full_disk_drops_the_oldest_keeps_the_newest_and_counts() {
        for (what, segment_bytes) in [("small segments", 300), ("one big segment at first", 1 << 20)] {
            let dir = tempfile::tempdir().unwrap();
            let c = OutboxConfig { segment_bytes, ..OutboxConfig::new(dir.path().to_path_buf()) };
            let (mut o, _) = Outbox::open(c).unwrap();
            o.fake_disk = Some(1000);
            for i in 0..200 {
                o.append("t", &[1; 50]).unwrap_or_else(|e| panic!("{what}: append {i}: {e}"));
            }
            let s = o.stats();
            assert!(s.disk_full && s.bytes <= 1000, "{what}: {s:?}");
            assert!(s.dropped_disk_full > 0 && s.dropped == s.dropped_disk_full, "{what}: {s:?}");
            assert_eq!(s.depth + s.dropped, 200, "{what}: {s:?}");
            assert!(s.depth >= 6, "{what}: smaller segments after the first time keep most of the room: {s:?}");
            assert_eq!(o.report.lines, 1, "{what}: not one ERROR line per event");
            let ids = drain(&mut o);
            assert_eq!(ids.last(), Some(&200), "{what}: the newest is kept");
            assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{what}: {ids:?}");
        }
        // Nothing left to drop: the event is refused, and counted.
        let dir = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(cfg(dir.path())).unwrap();
        o.fake_disk = Some(10);
        let e = o.append("t", b"x").unwrap_err().to_string();
        assert!(e.contains("disk is full") && e.contains(&dir.path().display().to_string()), "{e}");
        assert_eq!((o.stats().dropped_disk_full, o.stats().depth), (1, 0));
    }

    /// Two opens of one directory (flock is per open file description, so this works in one process)
    /// and another process: the second fails, naming the directory, until the first is closed.
    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (o, _) = Outbox::open(cfg(dir.path())).unwrap();
        let e = Outbox::open(cfg(dir.path())).err().expect("second open must fail").to_string();
        assert!(e.contains(&dir.path().display().to_string()) && e.contains("in use"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        let other = std::process::Command::new("flock")
            .arg("--nonblock")
            .arg(dir.path().join(LOCK_FILE))
            .arg("true")
            .status()
            .expect("flock(1) from util-linux");
        assert!(!other.success(), "another process must not get the lock");
        drop(o);
        Outbox::open(cfg(dir.path())).unwrap();
    }

    #[test]
    fn a_corrupt_watermark_resends_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(cfg(dir.path())).unwrap();
        o.append("t", b"a").unwrap();
        o.append("t", b"b").unwrap();
        o.ack(1);
        o.sync().unwrap();
        drop(o);
        std::fs::write(dir.path().join(ACKED_FILE), "garbage").unwrap();
        let (mut o, rec) = Outbox::open(cfg(dir.path())).unwrap();
        assert_eq!(rec.pending, 2);
        assert_eq!(drain(&mut o), vec![1, 2]);
    }

    /// While a sync is inside fsync (held there by the seam), appends, acks, reads and stats of other
    /// threads go on; appends made meanwhile stay counted as unsynced. With fsync under the mutex (the
    /// old design) every one of them waited for the medium.
    #[test]
    fn a_sync_does_not_hold_the_outbox_lock() {
        let dir = tempfile::tempdir().unwrap();
        let c = OutboxConfig { fsync_every: 1000, ..cfg(dir.path()) };
        let (o, _) = Outbox::open(c).unwrap();
        let mut shared = SharedOutbox::new(o);
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        shared.in_sync = Some(Box::new(move || {
            let _ = entered_tx.send(());
            let _ = release_rx.lock().unwrap().recv_timeout(Duration::from_secs(30));
        }));
        let shared = Arc::new(shared);
        shared.append("t", b"one").unwrap();
        shared.ack(1);
        shared.append("t", b"two").unwrap();
        let syncer = {
            let s = shared.clone();
            std::thread::spawn(move || s.sync())
        };
        entered_rx.recv_timeout(Duration::from_secs(10)).expect("sync started");
        let (done_tx, done_rx) = mpsc::channel();
        let worker = {
            let s = shared.clone();
            std::thread::spawn(move || {
                let id = s.append("t", b"three").unwrap();
                s.ack(2);
                s.rewind();
                let next = s.next_to_send().unwrap().map(|r| r.id);
                let _ = done_tx.send((id, next, s.stats()));
            })
        };
        let got = done_rx.recv_timeout(Duration::from_secs(5));
        release_tx.send(()).unwrap();
        let (id, next, stats) = got.expect("append/ack/read/stats blocked while a sync was in progress");
        assert_eq!((id, next, stats.depth), (3, Some(3), 1));
        syncer.join().unwrap().unwrap();
        worker.join().unwrap();
        let o = shared.lock();
        assert_eq!(o.unsynced, 1, "the append made during the sync is not covered by it");
        assert_eq!(o.acked_on_disk, 1, "the watermark taken when the sync began");
        drop(o);
        let mut shared = Arc::try_unwrap(shared).ok().unwrap();
        shared.in_sync = None;
        shared.sync().unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join(ACKED_FILE)).unwrap().trim().parse::<u64>().unwrap(), 2);
    }
}
