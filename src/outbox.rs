//! The durable outbox: every event bound for the broker is appended here before it is published, and
//! leaves only once the broker has acknowledged it (PUBACK). It is what makes "no identification lost"
//! hold across link outages, daemon crashes and restarts.
//!
//! # On disk
//! A directory of segment files `<first id, 20 digits>.seg` plus `acked`, a text file holding the
//! acknowledged watermark. A segment is a sequence of records:
//!
//! ```text
//!  u32 LE  payload length N           ┐ header, 24 bytes
//!  u32 LE  CRC-32 of bytes 8..24+N    │ (the id, the time and the payload)
//!  u64 LE  id                         │
//!  u64 LE  append time, ms since epoch┘
//!  N bytes payload: u16 LE topic length, topic (UTF-8), message bytes
//! ```
//!
//! # Invariants
//! 1. Ids are assigned by [`Outbox::append`], strictly increasing by one, never reused (after a restart
//!    numbering continues after the highest id found on disk or acknowledged).
//! 2. A record is only ever delivered whole and checksum-verified: [`Outbox::open`] scans every segment,
//!    and a torn or corrupt record (power loss mid-write, a bad SD card block) is cut off together with
//!    everything after it in that segment — logged, counted in [`Recovery`], never delivered.
//! 3. Records with `id <= acked` (the watermark) have been acknowledged by the broker; every record above
//!    it is delivered again after a reconnect or a restart, in id order. Delivery is therefore
//!    at-least-once: consumers de-duplicate on `event_id` (the watermark file is written at most every
//!    `fsync_interval`, so a crash can re-send what was acknowledged in that last interval).
//! 4. A segment is deleted only when every record in it is acknowledged, or when the size cap forces
//!    it; in the latter case the unacknowledged records lost are counted (`dropped`) and logged at ERROR.
//! 5. Durability against power loss: each append is written to the file at once (a crash of the process
//!    loses nothing); `fsync` runs every `fsync_every` appends or `fsync_interval`, whichever comes first,
//!    so a power cut loses at most that window of events.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Result};

const HEADER: usize = 24;
/// Larger records are refused on append and treated as corruption on recovery.
pub const MAX_RECORD: usize = 16 << 20;
const SEGMENT_SUFFIX: &str = "seg";
const ACKED_FILE: &str = "acked";

/// How the outbox is kept (from `[mqtt.outbox]`).
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub dir: PathBuf,
    /// Total size of the segment files; beyond it the oldest segment is dropped (counted, ERROR).
    pub max_bytes: u64,
    /// A segment is closed and a new one started beyond this size.
    pub segment_bytes: u64,
    pub fsync_every: usize,
    pub fsync_interval: Duration,
}

impl OutboxConfig {
    pub fn new(dir: PathBuf) -> Self {
        OutboxConfig {
            dir,
            max_bytes: 256 << 20,
            segment_bytes: 4 << 20,
            fsync_every: 16,
            fsync_interval: Duration::from_millis(250),
        }
    }
}

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
    /// Bytes cut off because a record was torn or corrupt.
    pub truncated_bytes: u64,
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
    /// Records dropped by the size cap since start.
    pub dropped: u64,
}

/// The outbox; see the module docs for its invariants. Not thread-safe by itself: share it behind a
/// mutex (appends and reads are short).
pub struct Outbox {
    cfg: OutboxConfig,
    segments: VecDeque<Segment>,
    active: File,
    next_id: u64,
    /// Every id up to here is acknowledged.
    acked: u64,
    acked_on_disk: u64,
    /// Acknowledged ids above the watermark (acks that arrived out of order).
    acked_above: BTreeSet<u64>,
    /// Append time of each unacknowledged record still in memory order: (id, time_ms).
    times: VecDeque<(u64, u64)>,
    cursor: Cursor,
    reader: Option<(u64, File)>,
    unsynced: usize,
    last_sync: Instant,
    dropped: u64,
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

impl Outbox {
    /// Opens (or creates) the outbox in `cfg.dir`, verifying every record and cutting off torn or corrupt
    /// tails (invariant 2).
    pub fn open(cfg: OutboxConfig) -> Result<(Outbox, Recovery)> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let acked_path = dir.join(ACKED_FILE);
        let acked = match std::fs::read_to_string(&acked_path) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or_else(|_| {
                log::warn!(
                    "{}: unreadable watermark {s:?}; every stored event will be sent again",
                    acked_path.display()
                );
                0
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::io(&acked_path, e)),
        };
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
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
        for first in firsts {
            let path = segment_path(&dir, first);
            let mut file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
            let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
            let mut reader = std::io::BufReader::new(&mut file);
            let (mut offset, mut last_id) = (0u64, first.saturating_sub(1));
            let bad = loop {
                match read_record(&mut reader).map_err(|e| Error::io(&path, e))? {
                    Ok(None) => break None,
                    Ok(Some((r, len))) if r.id > last_id && (offset > 0 || r.id == first) => {
                        if r.id > acked {
                            recovery.pending += 1;
                            times.push_back((r.id, r.time_ms));
                        }
                        last_id = r.id;
                        offset += len;
                    }
                    Ok(Some((r, _))) => break Some(format!("id {} out of sequence after {last_id}", r.id)),
                    Err(reason) => break Some(reason),
                }
            };
            drop(reader);
            if let Some(reason) = bad {
                recovery.damaged_segments += 1;
                recovery.truncated_bytes += size - offset;
                log::warn!(
                    "{}: {reason} at byte {offset}; cutting off the last {} bytes (a write torn by a crash or power loss)",
                    path.display(),
                    size - offset
                );
                file.set_len(offset).map_err(|e| Error::io(&path, e))?;
                file.sync_all().map_err(|e| Error::io(&path, e))?;
            }
            highest = highest.max(last_id);
            segments.push_back(Segment { first_id: first, last_id, path, bytes: offset });
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
        let cursor = Cursor {
            next_id: acked + 1,
            segment_first_id: segments.front().map_or(next_id, |s| s.first_id),
            offset: 0,
        };
        let mut outbox = Outbox {
            cfg,
            segments,
            active,
            next_id,
            acked,
            acked_on_disk: acked,
            acked_above: BTreeSet::new(),
            times,
            cursor,
            reader: None,
            unsynced: 0,
            last_sync: Instant::now(),
            dropped: 0,
        };
        outbox.collect_acked_segments()?;
        outbox.rewind();
        Ok((outbox, recovery))
    }

    /// Appends an event; returns its id. Written to the file before returning (see invariant 5 for
    /// when it is also on the medium).
    pub fn append(&mut self, topic: &str, message: &[u8]) -> Result<u64> {
        let tlen = u16::try_from(topic.len()).map_err(|_| Error::Input(format!("topic too long: {topic}")))?;
        let len = 2 + topic.len() + message.len();
        if len > MAX_RECORD {
            return Err(Error::Input(format!("event of {len} bytes exceeds the outbox record limit {MAX_RECORD}")));
        }
        let active_full = self
            .segments
            .back()
            .is_some_and(|s| s.bytes > 0 && s.bytes + (HEADER + len) as u64 > self.cfg.segment_bytes);
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
        let seg = self.segments.back_mut().ok_or_else(|| Error::Input("outbox has no active segment".into()))?;
        if let Err(e) = self.active.write_all(&buf) {
            // A partial write would be a torn record in the middle of the file: cut it off now.
            let _ = self.active.set_len(seg.bytes);
            return Err(Error::io(&seg.path, e));
        }
        seg.bytes += buf.len() as u64;
        seg.last_id = id;
        self.next_id += 1;
        self.times.push_back((id, time_ms));
        self.unsynced += 1;
        if self.unsynced >= self.cfg.fsync_every {
            self.sync()?;
        }
        self.enforce_cap()?;
        Ok(id)
    }

    /// Flushes appended records and the watermark to the medium if the interval has passed; call it
    /// periodically (the publisher does).
    pub fn sync_if_due(&mut self) -> Result<()> {
        if (self.unsynced > 0 || self.acked != self.acked_on_disk)
            && self.last_sync.elapsed() >= self.cfg.fsync_interval
        {
            self.sync()?;
        }
        Ok(())
    }

    /// Flushes appended records and the acknowledged watermark to the medium now.
    pub fn sync(&mut self) -> Result<()> {
        if self.unsynced > 0 {
            let path = self.segments.back().map(|s| s.path.clone()).unwrap_or_default();
            self.active.sync_data().map_err(|e| Error::io(&path, e))?;
            self.unsynced = 0;
        }
        if self.acked != self.acked_on_disk {
            let path = self.cfg.dir.join(ACKED_FILE);
            let tmp = self.cfg.dir.join("acked.tmp");
            let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            writeln!(f, "{}", self.acked).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
            self.acked_on_disk = self.acked;
            self.collect_acked_segments()?;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Marks `id` as acknowledged by the broker (invariant 3). Unknown or repeated ids are ignored.
    pub fn ack(&mut self, id: u64) {
        if id <= self.acked || id >= self.next_id {
            return;
        }
        self.acked_above.insert(id);
        while self.acked_above.remove(&(self.acked + 1)) {
            self.acked += 1;
        }
        while self.times.front().is_some_and(|&(i, _)| i <= self.acked) {
            self.times.pop_front();
        }
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
                // The segment was dropped by the size cap: continue at the oldest remaining.
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
            depth: self.next_id - 1 - self.acked - self.acked_above.len() as u64,
            bytes: self.segments.iter().map(|s| s.bytes).sum(),
            oldest_age_ms: self.times.front().map(|&(_, t)| now_ms().saturating_sub(t)),
            dropped: self.dropped,
        }
    }

    /// The highest id appended so far (0 if none).
    pub fn last_id(&self) -> u64 {
        self.next_id - 1
    }

    fn rewind_to_oldest(&mut self) {
        let first = self.segments.front().map_or(self.next_id, |s| s.first_id);
        self.cursor = Cursor { next_id: first.max(self.acked + 1), segment_first_id: first, offset: 0 };
        self.reader = None;
    }

    fn rotate(&mut self) -> Result<()> {
        self.sync()?;
        let path = segment_path(&self.cfg.dir, self.next_id);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.cfg.dir)?;
        self.active = file;
        self.segments.push_back(Segment { first_id: self.next_id, last_id: self.next_id - 1, path, bytes: 0 });
        Ok(())
    }

    /// Deletes closed segments whose records are all acknowledged and on-disk watermarked (invariant 4).
    fn collect_acked_segments(&mut self) -> Result<()> {
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.last_id <= self.acked_on_disk) {
            if let Some(s) = self.segments.pop_front() {
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
            let Some(oldest) = self.segments.pop_front() else { return Ok(()) };
            let lost = oldest.last_id.saturating_sub(self.acked.max(oldest.first_id - 1))
                - self.acked_above.range(oldest.first_id..=oldest.last_id).count() as u64;
            std::fs::remove_file(&oldest.path).map_err(|e| Error::io(&oldest.path, e))?;
            if lost > 0 {
                self.dropped += lost;
                log::error!(
                    "outbox {} over its {} byte cap: dropped {lost} undelivered events (ids {}..={}); {} dropped since start",
                    self.cfg.dir.display(),
                    self.cfg.max_bytes,
                    oldest.first_id,
                    oldest.last_id,
                    self.dropped
                );
            }
            self.acked = self.acked.max(oldest.last_id);
            self.acked_above = self.acked_above.split_off(&(self.acked + 1));
            while self.times.front().is_some_and(|&(i, _)| i <= self.acked) {
                self.times.pop_front();
            }
            if self.cursor.segment_first_id == oldest.first_id {
                self.rewind_to_oldest();
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let before = std::fs::read_dir(dir.path()).unwrap().count();
        for id in 1..=20 {
            o.ack(id);
        }
        o.sync().unwrap();
        let after = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(after < before && after <= 2, "{before} -> {after} files");
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
                o.append("cam/detection", &[i; 14]).unwrap(); // 24 + 2 + 13 + 14 = 53 bytes... per record
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
            // The next append lands after the last good record and is readable.
            let id = o.append("cam/detection", b"after").unwrap();
            assert_eq!(id, want.len() as u64 + 1, "{what}");
            o.rewind();
            assert_eq!(drain(&mut o).last(), Some(&id), "{what}");
        }
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
        assert!(s.dropped > 0 && s.dropped + s.depth == 40, "{s:?}");
        let ids = drain(&mut o);
        assert_eq!(ids.len() as u64, s.depth);
        assert_eq!(ids.last(), Some(&40));
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
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
}
