//! The `replay` source: plays a directory of images or a file of concatenated JPEGs (an MJPEG dump) at a
//! configured rate, once or in a loop. This is what the README's default run and the tests use when no
//! camera exists. Frames are read into memory at start-up (a replay is a test tool, not an archive
//! player), so playback timing is not disturbed by disk reads.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::{Frame, FrameData, Source, SourceEvent};
use crate::error::{Error, Result};

/// Plays pre-loaded encoded frames at `fps`.
pub struct ReplaySource {
    camera: Arc<str>,
    frames: Vec<Arc<[u8]>>,
    period: Duration,
    looping: bool,
    next_index: usize,
    seq: u64,
    next_due: Option<Instant>,
    /// With a speed-up: the recording's own frame period and its first frame's time (capture times are
    /// `start + seq x period`, not the wall clock).
    virtual_clock: Option<(Duration, Option<(SystemTime, Instant)>)>,
}

impl ReplaySource {
    /// Loads the frames at `path`: a directory (its .jpg/.jpeg/.png files, sorted) or a file of one or
    /// more concatenated JPEGs.
    pub fn open(camera: Arc<str>, path: &Path, fps: f64, looping: bool) -> Result<Self> {
        let frames = if path.is_dir() {
            let files = crate::images::expand(&[path.to_path_buf()])?;
            files
                .iter()
                .map(|f| std::fs::read(f).map(Arc::from).map_err(|e| Error::io(f, e)))
                .collect::<Result<Vec<_>>>()?
        } else {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            split_jpegs(&bytes).into_iter().map(Arc::from).collect()
        };
        if frames.is_empty() {
            return Err(Error::Input(format!("camera {camera}: replay source {} holds no images", path.display())));
        }
        Ok(Self::from_frames(camera, frames, fps, looping))
    }

    /// A replay of in-memory encoded frames.
    pub fn from_frames(camera: Arc<str>, frames: Vec<Arc<[u8]>>, fps: f64, looping: bool) -> Self {
        ReplaySource {
            camera,
            frames,
            period: Duration::from_secs_f64(1.0 / fps.max(1e-3)),
            looping,
            next_index: 0,
            seq: 0,
            next_due: None,
            virtual_clock: None,
        }
    }

    /// Plays `speed` times faster than the recording's `fps`, stamping frames on the recording's clock.
    pub fn set_speed(&mut self, fps: f64, speed: f64) {
        let recorded = Duration::from_secs_f64(1.0 / fps.max(1e-3));
        self.period = recorded.div_f64(speed.max(1e-3));
        self.virtual_clock = Some((recorded, None));
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

impl Source for ReplaySource {
    fn next_sampled(&mut self, wanted: &mut dyn FnMut() -> bool) -> Result<SourceEvent> {
        if self.next_index == self.frames.len() {
            if !self.looping {
                return Ok(SourceEvent::End);
            }
            self.next_index = 0;
        }
        let now = Instant::now();
        let due = self.next_due.unwrap_or(now);
        if due > now {
            std::thread::sleep(due - now);
        }
        // Keep the cadence, but never try to catch up after a stall (that would burst frames).
        self.next_due = Some(due.max(now) + self.period);
        if !wanted() {
            self.next_index += 1;
            self.seq += 1;
            return Ok(SourceEvent::Skipped);
        }
        let data = FrameData::Encoded(self.frames[self.next_index].clone());
        self.next_index += 1;
        let (captured_at, captured_mono) = match &mut self.virtual_clock {
            None => (SystemTime::now(), Instant::now()),
            Some((period, start)) => {
                let (t0, m0) = *start.get_or_insert_with(|| (SystemTime::now(), Instant::now()));
                let offset = period.saturating_mul(u32::try_from(self.seq).unwrap_or(u32::MAX));
                (t0 + offset, m0 + offset)
            }
        };
        let frame = Frame { camera: self.camera.clone(), seq: self.seq, captured_at, captured_mono, data };
        self.seq += 1;
        Ok(SourceEvent::Frame(frame))
    }
}

/// Splits a byte stream of concatenated JPEGs at their start-of-image markers (FF D8 FF). Bytes before
/// the first marker are ignored; each piece runs to the next marker, so a truncated or garbage frame
/// stays a frame of its own (and is reported as corrupt when decoded) instead of swallowing the next.
pub fn split_jpegs(bytes: &[u8]) -> Vec<Vec<u8>> {
    let starts: Vec<usize> =
        bytes.windows(3).enumerate().filter(|(_, w)| *w == [0xFF, 0xD8, 0xFF]).map(|(i, _)| i).collect();
    let mut out = Vec::with_capacity(starts.len());
    for (k, &s) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(bytes.len());
        out.push(bytes[s..end].to_vec());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soi(n: u8) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0, n, n];
        v.extend_from_slice(&[0xFF, 0xD9]);
        v
    }

    #[test]
    fn split_finds_every_frame() {
        let mut stream = b"junk".to_vec();
        for n in 0..3 {
            stream.extend(soi(n));
        }
        let parts = split_jpegs(&stream);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1], soi(1));
        assert!(split_jpegs(b"no jpeg here").is_empty());
    }

    #[test]
    fn plays_once_or_loops_at_the_rate() {
        let frames: Vec<Arc<[u8]>> = (0..3).map(|n| Arc::from(soi(n))).collect();
        let mut once = ReplaySource::from_frames("c".into(), frames.clone(), 1000.0, false);
        let mut seqs = Vec::new();
        while let SourceEvent::Frame(f) = once.next().unwrap() {
            seqs.push(f.seq);
        }
        assert_eq!(seqs, vec![0, 1, 2]);

        let mut looping = ReplaySource::from_frames("c".into(), frames, 50.0, true);
        let t = Instant::now();
        for _ in 0..7 {
            assert!(matches!(looping.next().unwrap(), SourceEvent::Frame(_)));
        }
        // 7 frames at 50 fps: 6 periods of 20 ms.
        let elapsed = t.elapsed();
        assert!(elapsed >= Duration::from_millis(115), "{elapsed:?}");
    }
}
