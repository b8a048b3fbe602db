//! The `v4l2` source: a USB or CSI camera through Video4Linux2, mmap streaming.
//!
//! On open it negotiates the first pixel format of the camera's preference list that the device
//! offers, the frame size nearest the configured one and the configured rate, and logs what it chose.
//! Frames carry the kernel's capture timestamp (CLOCK_MONOTONIC, mapped to wall-clock time). A device
//! that errors, disappears, or delivers nothing within the timeout is closed; the next `next()` call
//! reopens it (the pipeline's capture loop applies the backoff), so one dead camera never stalls others.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use v4l::buffer::Type;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::{Device, FourCC};

use super::pixels::RawFormat;
use super::{Frame, FrameData, Source, SourceEvent};
use crate::config::PixelFormat;
pub use crate::config::V4l2Settings;
use crate::error::{Error, Result};

const BUFFERS: u32 = 4;

impl PixelFormat {
    pub fn fourcc(self) -> FourCC {
        FourCC::new(match self {
            PixelFormat::Mjpeg => b"MJPG",
            PixelFormat::Yuyv => b"YUYV",
            PixelFormat::Nv12 => b"NV12",
            PixelFormat::Grey => b"GREY",
            PixelFormat::Rgb24 => b"RGB3",
        })
    }

    fn raw(self) -> Option<RawFormat> {
        match self {
            PixelFormat::Mjpeg => None,
            PixelFormat::Yuyv => Some(RawFormat::Yuyv),
            PixelFormat::Nv12 => Some(RawFormat::Nv12),
            PixelFormat::Grey => Some(RawFormat::Grey),
            PixelFormat::Rgb24 => Some(RawFormat::Rgb24),
        }
    }
}

/// The format a device agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    pub stride: u32,
}

struct Open {
    // Field order matters: the stream must be dropped before the device it streams from.
    stream: v4l::io::mmap::Stream<'static>,
    _device: Device,
    negotiated: Negotiated,
}

/// A V4L2 capture device, reopened after failures.
pub struct V4l2Source {
    camera: Arc<str>,
    settings: V4l2Settings,
    open: Option<Open>,
    seq: u64,
}

impl V4l2Source {
    pub fn new(camera: Arc<str>, settings: V4l2Settings) -> Self {
        V4l2Source { camera, settings, open: None, seq: 0 }
    }

    /// The format in use, once the device is open.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.open.as_ref().map(|o| o.negotiated)
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Input(format!("camera {} ({}): {what}: {e}", self.camera, self.settings.path.display()))
    }

    fn open(&mut self) -> Result<()> {
        let s = &self.settings;
        let device = Device::with_path(&s.path).map_err(|e| self.fail("cannot open", e))?;
        let caps = device.query_caps().map_err(|e| self.fail("not a V4L2 device", e))?;
        if !caps.capabilities.contains(v4l::capability::Flags::VIDEO_CAPTURE) {
            return Err(self.fail(
                "cannot capture video",
                format!("{} ({}) has no video capture capability", caps.card, caps.driver),
            ));
        }
        let offered: Vec<FourCC> =
            device.enum_formats().map_err(|e| self.fail("cannot list formats", e))?.iter().map(|d| d.fourcc).collect();
        let format = s.formats.iter().copied().find(|f| offered.contains(&f.fourcc())).ok_or_else(|| {
            let names: Vec<String> = offered.iter().map(|f| f.to_string()).collect();
            self.fail(
                "no acceptable pixel format",
                format!("wanted {:?}, the device offers {}", s.formats, names.join(", ")),
            )
        })?;
        let (width, height) = nearest_size(&device, format.fourcc(), s.width, s.height);
        let set = device
            .set_format(&v4l::Format::new(width, height, format.fourcc()))
            .map_err(|e| self.fail("cannot set format", e))?;
        if set.fourcc != format.fourcc() {
            return Err(
                self.fail("format refused", format!("asked for {}, the driver set {}", format.fourcc(), set.fourcc))
            );
        }
        let fps = match device.set_params(&v4l::video::capture::Parameters::with_fps(s.fps)) {
            Ok(p) if p.interval.numerator > 0 => {
                format!("{:.1} fps", p.interval.denominator as f64 / p.interval.numerator as f64)
            }
            Ok(_) => "driver-default rate".into(),
            Err(e) => {
                log::warn!("camera {}: cannot set {} fps ({e}); using the driver's rate", self.camera, s.fps);
                "driver-default rate".into()
            }
        };
        let negotiated = Negotiated { format, width: set.width, height: set.height, stride: set.stride };
        let mut stream = v4l::io::mmap::Stream::with_buffers(&device, Type::VideoCapture, BUFFERS)
            .map_err(|e| self.fail("cannot map buffers", e))?;
        stream.set_timeout(s.timeout);
        log::info!(
            "camera {}: {} ({}, {}): {} {}x{} at {fps}",
            self.camera,
            s.path.display(),
            caps.card,
            caps.driver,
            format.fourcc(),
            set.width,
            set.height
        );
        self.open = Some(Open { stream, _device: device, negotiated });
        Ok(())
    }

    /// Closes the device (and its file descriptor, so a re-plugged camera gets its node back).
    /// The v4l crate's `Drop` panics if stopping the stream fails with anything but ENODEV (device
    /// gone), so a stream that fails to stop otherwise is leaked instead of dropped: rare, and bounded
    /// by the reconnect backoff.
    fn close(&mut self) {
        if let Some(mut open) = self.open.take() {
            match v4l::io::traits::Stream::stop(&mut open.stream) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => {
                    log::warn!("camera {}: cannot stop streaming ({e}); leaking its buffers", self.camera);
                    std::mem::forget(open.stream);
                }
            }
        }
    }
}

impl Source for V4l2Source {
    #[allow(clippy::useless_conversion)] // time_t is i32 on armv7
    fn next_sampled(&mut self, wanted: &mut dyn FnMut() -> bool) -> Result<SourceEvent> {
        if self.open.is_none() {
            self.open()?;
        }
        let Some(open) = self.open.as_mut() else { return Err(self.fail("not open", "")) };
        // The frame is copied out of the mmap buffer only if the sampler wants it: the buffer goes back
        // to the driver on the next call either way.
        let result = open.stream.next().map(|(buf, meta)| {
            let used = (meta.bytesused as usize).min(buf.len());
            if !wanted() {
                return None;
            }
            let (captured_at, captured_mono) =
                kernel_time(i64::from(meta.timestamp.sec), i64::from(meta.timestamp.usec));
            let n = open.negotiated;
            let data = match n.format.raw() {
                None => FrameData::Encoded(Arc::from(&buf[..used])),
                Some(raw) => FrameData::Raw {
                    format: raw,
                    colour: Default::default(),
                    width: n.width,
                    height: n.height,
                    stride: n.stride,
                    bytes: Arc::from(&buf[..used]),
                },
            };
            Some((data, captured_at, captured_mono))
        });
        match result {
            Ok(Some((data, captured_at, captured_mono))) => {
                let frame = Frame { camera: self.camera.clone(), seq: self.seq, captured_at, captured_mono, data };
                self.seq += 1;
                Ok(SourceEvent::Frame(frame))
            }
            Ok(None) => {
                self.seq += 1;
                Ok(SourceEvent::Skipped)
            }
            Err(e) => {
                let what = if e.kind() == std::io::ErrorKind::TimedOut {
                    format!("no frame within {:?}", self.settings.timeout)
                } else {
                    "capture failed".to_string()
                };
                let err = self.fail(&what, e);
                self.close();
                Err(err)
            }
        }
    }
}

impl Drop for V4l2Source {
    fn drop(&mut self) {
        self.close();
    }
}

/// The discrete frame size closest to the request (or the request itself for stepwise sizes).
fn nearest_size(device: &Device, fourcc: FourCC, width: u32, height: u32) -> (u32, u32) {
    let sizes = device.enum_framesizes(fourcc).unwrap_or_default();
    let discrete: Vec<(u32, u32)> =
        sizes.into_iter().flat_map(|s| s.size.to_discrete()).map(|d| (d.width, d.height)).collect();
    let distance =
        |(w, h): (u32, u32)| (i64::from(w) - i64::from(width)).abs() + (i64::from(h) - i64::from(height)).abs();
    discrete.into_iter().min_by_key(|&s| distance(s)).unwrap_or((width, height))
}

/// Maps a CLOCK_MONOTONIC timestamp from the driver to wall-clock time (now minus its age).
// time_t and c_long are i32 on armv7: the conversions are not useless there.
#[allow(clippy::useless_conversion)]
fn kernel_time(sec: i64, usec: i64) -> (SystemTime, Instant) {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec we own.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } == 0;
    let frame_us = sec.saturating_mul(1_000_000).saturating_add(usec);
    let now_us = i64::from(now.tv_sec).saturating_mul(1_000_000).saturating_add(i64::from(now.tv_nsec) / 1000);
    match (ok, u64::try_from(now_us - frame_us)) {
        (true, Ok(age)) if frame_us > 0 && age < 60_000_000 => {
            let age = Duration::from_micros(age);
            (SystemTime::now() - age, Instant::now().checked_sub(age).unwrap_or_else(Instant::now))
        }
        _ => (SystemTime::now(), Instant::now()),
    }
}

/// One device as `whaled cameras` prints it.
pub fn describe(path: &Path) -> Result<String> {
    use std::fmt::Write;
    let err = |what: &str, e: std::io::Error| Error::Input(format!("{}: {what}: {e}", path.display()));
    let device = Device::with_path(path).map_err(|e| err("cannot open", e))?;
    let caps = device.query_caps().map_err(|e| err("not a V4L2 device", e))?;
    let mut out = format!("{}: {} (driver {}, bus {})\n", path.display(), caps.card, caps.driver, caps.bus);
    if !caps.capabilities.contains(v4l::capability::Flags::VIDEO_CAPTURE) {
        out += "  no video capture (metadata or output node)\n";
        return Ok(out);
    }
    for f in device.enum_formats().map_err(|e| err("cannot list formats", e))? {
        let _ = writeln!(out, "  [{}] '{}' ({})", f.index, f.fourcc, f.description);
        for size in device.enum_framesizes(f.fourcc).unwrap_or_default() {
            for d in size.size.to_discrete() {
                let rates: Vec<String> = device
                    .enum_frameintervals(f.fourcc, d.width, d.height)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|i| match i.interval {
                        v4l::frameinterval::FrameIntervalEnum::Discrete(fr) if fr.numerator > 0 => {
                            Some(format!("{:.3}", fr.denominator as f64 / fr.numerator as f64))
                        }
                        _ => None,
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "      {}x{} @ {} fps",
                    d.width,
                    d.height,
                    if rates.is_empty() { "?".into() } else { rates.join(", ") }
                );
            }
        }
    }
    Ok(out)
}

/// `/dev/video*` nodes, sorted by number.
pub fn device_nodes() -> Vec<PathBuf> {
    let mut nodes: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("video").and_then(|n| n.parse().ok()).map(|n| (n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes.into_iter().map(|(_, p)| p).collect()
}
