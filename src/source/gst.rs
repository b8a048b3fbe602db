//! Network cameras through GStreamer (the `gstreamer` feature): `kind = "rtsp"` builds
//! `rtspsrc ! depay ! parse ! DECODER ! appsink` from its settings, `kind = "gstreamer"` runs the
//! operator's own pipeline up to `appsink name=whaled`.
//!
//! The contract is the V4L2 source's:
//! - **Freshest frame only.** The appsink keeps one buffer and drops older ones (`max-buffers=1
//!   drop=true`, `sync=false`), so a slow model never makes the pipeline queue. A compressed stream is
//!   still decoded frame by frame (H.264 needs every frame to decode the next), but a frame the sampler
//!   does not want is never copied or colour-converted: decoders hand over I420/NV12 and the conversion
//!   to RGB happens only for frames that enter inference.
//! - **Capture time from the stream.** A buffer's PTS on the pipeline clock (the monotonic system
//!   clock): RTP timestamps, anchored at arrival by the jitter buffer, or the camera's RTCP sender
//!   reports (NTP) with `ntp_sync`; a buffer without a usable PTS gets its arrival time.
//! - **Failures are closed and reopened.** An error on the bus, the end of the stream, or no frame for
//!   `timeout` (a stream that stalls without closing) closes the pipeline and returns the error; the
//!   capture loop reopens it with backoff. A refused login or a missing path is marked `refused`.
//! - **No credential in any string.** The RTSP password goes to `rtspsrc` as a property, never into a
//!   URL or a pipeline description, and is removed from every message that could carry it back.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use super::pixels::RawFormat;
use super::{Frame, FrameData, Source, SourceEvent};
use crate::config::network::{GstSettings, RtspSettings, Transport, VideoCodec, APPSINK_NAME};
use crate::error::{Error, Result};

/// The formats whaled takes from a pipeline without a conversion element: what software and hardware
/// decoders emit (I420, NV12), raw camera formats, and JPEG (HTTP MJPEG cameras).
const APPSINK_CAPS: &str = "video/x-raw,format=(string){I420,NV12,YUY2,RGB,GRAY8}; image/jpeg";

/// How often a waiting capture loop comes round (shutdown, the watchdog's progress rule).
const POLL: Duration = Duration::from_millis(200);

/// Initialises GStreamer once per process; the error (no plugins, a broken registry) is kept.
fn init() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| gst::init().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::Input(format!("GStreamer cannot start: {e}")))
}

/// The pipeline description for an RTSP camera: the source is named so its properties (location,
/// credentials) are set on the object, never written into this string.
fn rtsp_description(s: &RtspSettings) -> String {
    let (depay, parse) = match s.codec {
        VideoCodec::H264 => ("rtph264depay", "h264parse"),
        VideoCodec::H265 => ("rtph265depay", "h265parse"),
    };
    format!("rtspsrc name=src ! {depay} ! {parse} ! {} ! appsink name={APPSINK_NAME}", s.decoder)
}

/// What a source runs: a description plus, for RTSP, the properties of its `rtspsrc`.
#[derive(Debug, Clone)]
enum Spec {
    Rtsp(RtspSettings),
    Pipeline(GstSettings),
}

impl Spec {
    fn description(&self) -> String {
        match self {
            Spec::Rtsp(s) => rtsp_description(s),
            Spec::Pipeline(s) => s.pipeline.clone(),
        }
    }

    fn timeout(&self) -> Duration {
        match self {
            Spec::Rtsp(s) => s.timeout,
            Spec::Pipeline(s) => s.timeout,
        }
    }

    /// Where the frames come from, as logs show it (no credentials).
    fn shown(&self) -> String {
        match self {
            Spec::Rtsp(s) => s.url.to_string(),
            Spec::Pipeline(_) => "gstreamer pipeline".into(),
        }
    }

    fn password(&self) -> Option<&str> {
        match self {
            Spec::Rtsp(s) => s.password.as_ref().map(|p| p.expose()).filter(|p| !p.is_empty()),
            Spec::Pipeline(_) => None,
        }
    }
}

/// Builds the pipeline (not started), naming every element the machine lacks.
fn build(spec: &Spec, camera: &str) -> Result<(gst::Pipeline, gst_app::AppSink)> {
    init()?;
    let fail = |msg: String| Error::Camera { camera: camera.to_string(), msg, refused: false };
    let mut ctx = gst::ParseContext::new();
    let element =
        gst::parse::launch_full(&spec.description(), Some(&mut ctx), gst::ParseFlags::FATAL_ERRORS).map_err(|e| {
            let missing = ctx.missing_elements();
            if missing.is_empty() {
                fail(format!("invalid GStreamer pipeline: {e}"))
            } else {
                fail(format!(
                    "this machine has no GStreamer element {} (install the plugin that provides it; \
                     gst-inspect-1.0 lists what is installed)",
                    missing.join(", ")
                ))
            }
        })?;
    let pipeline = element
        .downcast::<gst::Pipeline>()
        .map_err(|_| fail("the description is a single element, not a pipeline ending in appsink".into()))?;
    let sink = pipeline
        .by_name(APPSINK_NAME)
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or_else(|| fail(format!("the pipeline has no appsink named {APPSINK_NAME}")))?;
    sink.set_max_buffers(1);
    sink.set_drop(true);
    sink.set_property("sync", false);
    if sink.caps().is_none() {
        let caps = gst::Caps::from_str(APPSINK_CAPS).map_err(|e| fail(format!("appsink caps: {e}")))?;
        sink.set_caps(Some(&caps));
    }
    if let Spec::Rtsp(s) = spec {
        let src = pipeline.by_name("src").ok_or_else(|| fail("the pipeline lost its rtspsrc".into()))?;
        src.set_property("location", s.url.as_str());
        src.set_property("latency", u32::try_from(s.latency.as_millis()).unwrap_or(u32::MAX));
        src.set_property_from_str("protocols", if s.transport == Transport::Tcp { "tcp" } else { "udp" });
        let micros = u64::try_from(s.timeout.as_micros()).unwrap_or(u64::MAX);
        // Connecting and waiting for UDP packets: never longer than the stall timeout.
        src.set_property("tcp-timeout", micros);
        src.set_property("timeout", micros);
        if src.find_property("teardown-timeout").is_some() {
            // A server that stopped answering must not hold up closing (nanoseconds).
            src.set_property("teardown-timeout", 200_000_000u64);
        }
        src.set_property("ntp-sync", s.ntp_sync);
        if let Some(user) = &s.user {
            src.set_property("user-id", user.as_str());
        }
        if let Some(p) = &s.password {
            src.set_property("user-pw", p.expose());
        }
    }
    Ok((pipeline, sink))
}

/// Checks that a camera's pipeline can be built on this machine (for `whaled check-config`): every
/// element installed, the appsink present. Nothing is started and nothing connects.
pub fn check(cfg: &crate::config::CameraConfig) -> Result<()> {
    let spec = match &cfg.source {
        crate::config::SourceConfig::Rtsp(s) => Spec::Rtsp(s.clone()),
        crate::config::SourceConfig::Gstreamer(s) => Spec::Pipeline(s.clone()),
        _ => return Ok(()),
    };
    let (pipeline, _) = build(&spec, &cfg.name)?;
    let _ = pipeline.set_state(gst::State::Null);
    Ok(())
}

struct Running {
    pipeline: gst::Pipeline,
    sink: gst_app::AppSink,
    bus: gst::Bus,
    /// When the last frame arrived (or the pipeline started): the stall timeout counts from here.
    last_frame: Instant,
    /// Whether the stream's format has been logged.
    announced: bool,
}

/// A network camera or pipeline, restarted after failures.
pub struct GstSource {
    camera: Arc<str>,
    spec: Spec,
    running: Option<Running>,
    seq: u64,
}

impl GstSource {
    pub fn rtsp(camera: Arc<str>, settings: RtspSettings) -> Self {
        GstSource { camera, spec: Spec::Rtsp(settings), running: None, seq: 0 }
    }

    pub fn pipeline(camera: Arc<str>, settings: GstSettings) -> Self {
        GstSource { camera, spec: Spec::Pipeline(settings), running: None, seq: 0 }
    }

    /// A message with the password (if any) taken out: GStreamer's debug strings may quote properties.
    fn scrub(&self, text: &str) -> String {
        match self.spec.password() {
            Some(p) => text.replace(p, "***"),
            None => text.to_string(),
        }
    }

    fn fail(&self, msg: impl std::fmt::Display, refused: bool) -> Error {
        Error::Camera {
            camera: self.camera.to_string(),
            msg: self.scrub(&format!("{}: {msg}", self.spec.shown())),
            refused,
        }
    }

    fn start(&mut self) -> Result<()> {
        let (pipeline, sink) = build(&self.spec, &self.camera)?;
        let bus = pipeline.bus().ok_or_else(|| self.fail("the pipeline has no bus", false))?;
        if pipeline.set_state(gst::State::Playing).is_err() {
            // The reason is on the bus.
            let err = drain_bus(&bus).map(|(m, r)| self.fail(m, r));
            let _ = pipeline.set_state(gst::State::Null);
            return Err(err.unwrap_or_else(|| self.fail("the pipeline would not start", false)));
        }
        log::debug!("camera {}: {} starting", self.camera, self.spec.shown());
        self.running = Some(Running { pipeline, sink, bus, last_frame: Instant::now(), announced: false });
        Ok(())
    }

    fn close(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.pipeline.set_state(gst::State::Null);
        }
    }

    /// Copies a sample's frame out of GStreamer's buffer into a `FrameData` (tightly packed planes),
    /// straight into the frame's own allocation.
    fn copy(sample: &gst::Sample) -> std::result::Result<FrameData, String> {
        let caps = sample.caps().ok_or("a frame without caps")?;
        let buffer = sample.buffer().ok_or("a sample without a buffer")?;
        let structure = caps.structure(0).ok_or("empty caps")?;
        if structure.name() == "image/jpeg" {
            let map = buffer.map_readable().map_err(|e| e.to_string())?;
            return Ok(FrameData::Encoded(Arc::from(map.as_slice())));
        }
        let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| format!("{e} ({caps})"))?;
        let frame =
            gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).map_err(|e| format!("{e} ({caps})"))?;
        let (w, h) = (info.width() as usize, info.height() as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        // (plane, bytes per row, rows) in the packed layout RawFormat expects.
        let (format, planes): (RawFormat, &[(u32, usize, usize)]) = match info.format() {
            gst_video::VideoFormat::I420 => (RawFormat::I420, &[(0, w, h), (1, cw, ch), (2, cw, ch)]),
            gst_video::VideoFormat::Nv12 => (RawFormat::Nv12, &[(0, w, h), (1, cw * 2, ch)]),
            gst_video::VideoFormat::Yuy2 => (RawFormat::Yuyv, &[(0, w * 2, h)]),
            gst_video::VideoFormat::Rgb => (RawFormat::Rgb24, &[(0, w * 3, h)]),
            gst_video::VideoFormat::Gray8 => (RawFormat::Grey, &[(0, w, h)]),
            other => return Err(format!("unsupported pixel format {other:?}")),
        };
        let len = planes.iter().map(|(_, row, rows)| row * rows).sum();
        let mut bytes: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
        let mut out = Arc::get_mut(&mut bytes).ok_or("a new frame buffer is shared")?;
        for &(plane, row, rows) in planes {
            let data = frame.plane_data(plane).map_err(|e| e.to_string())?;
            let stride = usize::try_from(frame.plane_stride()[plane as usize]).map_err(|_| "negative stride")?;
            if stride < row || data.len() < stride * (rows.max(1) - 1) + row {
                return Err(format!("plane {plane} is short: {} bytes, stride {stride}, {rows} rows", data.len()));
            }
            for src in data.chunks(stride).take(rows) {
                let (dst, rest) = out.split_at_mut(row);
                dst.copy_from_slice(&src[..row]);
                out = rest;
            }
        }
        Ok(FrameData::Raw {
            format,
            colour: colour(&info),
            width: info.width(),
            height: info.height(),
            stride: 0,
            bytes,
        })
    }
}

/// The range and matrix the caps declare; where they say nothing, GStreamer's own defaults (BT.709
/// from 720 lines up, limited range).
fn colour(info: &gst_video::VideoInfo) -> super::pixels::Colour {
    use super::pixels::{Colour, Matrix};
    use gst_video::VideoColorMatrix as M;
    let c = info.colorimetry();
    let matrix = match c.matrix() {
        M::Bt709 => Matrix::Bt709,
        M::Bt601 | M::Fcc | M::Smpte240m => Matrix::Bt601,
        _ if info.height() >= 720 => Matrix::Bt709,
        _ => Matrix::Bt601,
    };
    Colour { full_range: c.range() == gst_video::VideoColorRange::Range0_255, matrix }
}

/// A stream's format in a few words for the log: "I420 1920x1080 at 30/1 fps, BT.709 limited range".
fn describe(caps: &gst::CapsRef) -> String {
    match gst_video::VideoInfo::from_caps(caps) {
        Ok(info) => {
            let c = colour(&info);
            format!(
                "{:?} {}x{} at {}/{} fps, {} {} range",
                info.format(),
                info.width(),
                info.height(),
                info.fps().numer(),
                info.fps().denom(),
                match c.matrix {
                    super::pixels::Matrix::Bt601 => "BT.601",
                    super::pixels::Matrix::Bt709 => "BT.709",
                },
                if c.full_range { "full" } else { "limited" }
            )
        }
        Err(_) => caps.structure(0).map_or_else(|| caps.to_string(), |s| s.name().to_string()),
    }
}

/// The first error (or end of stream) waiting on the bus, with whether it is a refusal (credentials,
/// a path that does not exist) that no retry will fix.
fn drain_bus(bus: &gst::Bus) -> Option<(String, bool)> {
    while let Some(msg) = bus.pop() {
        match msg.view() {
            gst::MessageView::Error(e) => {
                let err = e.error();
                let refused = matches!(
                    err.kind::<gst::ResourceError>(),
                    Some(gst::ResourceError::NotAuthorized | gst::ResourceError::NotFound)
                );
                let from = msg.src().map(|s| s.name().to_string()).unwrap_or_default();
                let mut text = if refused && err.matches(gst::ResourceError::NotAuthorized) {
                    format!("the camera refused the credentials ({from}: {err})")
                } else {
                    format!("{from}: {err}")
                };
                if let Some(debug) = e.debug() {
                    // The last line of GStreamer's debug text says why, without its source-file prefix.
                    if let Some(why) = debug.lines().last().map(|l| l.rsplit(":\n").next().unwrap_or(l)) {
                        text += &format!(" [{}]", why.trim());
                    }
                }
                return Some((text, refused));
            }
            gst::MessageView::Eos(_) => return Some(("the stream ended".into(), false)),
            gst::MessageView::Warning(w) => {
                log::debug!("GStreamer warning: {}", w.error());
            }
            _ => {}
        }
    }
    None
}

/// The capture time of a buffer: its PTS on the pipeline clock, as an age mapped to both clocks.
fn capture_time(pipeline: &gst::Pipeline, buffer: &gst::BufferRef) -> (SystemTime, Instant) {
    let arrival = (SystemTime::now(), Instant::now());
    let (Some(pts), Some(base), Some(clock)) = (buffer.pts(), pipeline.base_time(), pipeline.clock()) else {
        return arrival;
    };
    let now = clock.time();
    // Checked: a stream's timestamps are the sender's to choose.
    match base.checked_add(pts).and_then(|at| now.checked_sub(at)) {
        // A frame from the future or from more than a minute ago: the stream's clock is not usable.
        Some(age) if age < gst::ClockTime::from_seconds(60) => {
            let age = Duration::from_nanos(age.nseconds());
            (arrival.0 - age, arrival.1.checked_sub(age).unwrap_or(arrival.1))
        }
        _ => arrival,
    }
}

impl Source for GstSource {
    fn next_sampled(&mut self, wanted: &mut dyn FnMut() -> bool) -> Result<SourceEvent> {
        if self.running.is_none() {
            self.start()?;
        }
        let timeout = self.spec.timeout();
        let Some(r) = self.running.as_mut() else { return Err(self.fail("not running", false)) };
        let sample = r.sink.try_pull_sample(gst::ClockTime::from_nseconds(POLL.as_nanos() as u64));
        if let Some((msg, refused)) = drain_bus(&r.bus) {
            let err = self.fail(msg, refused);
            self.close();
            return Err(err);
        }
        let Some(sample) = sample else {
            let r = self.running.as_ref();
            if r.is_some_and(|r| r.sink.is_eos()) {
                let err = self.fail("the stream ended", false);
                self.close();
                return Err(err);
            }
            if r.is_some_and(|r| r.last_frame.elapsed() >= timeout) {
                let err = self.fail(format!("no frame within {timeout:?}: stalled"), false);
                self.close();
                return Err(err);
            }
            return Ok(SourceEvent::Idle);
        };
        r.last_frame = Instant::now();
        if !r.announced {
            r.announced = true;
            let what = sample.caps().map(describe).unwrap_or_else(|| "frames without caps".into());
            log::info!("camera {}: {}: receiving {what}", self.camera, self.spec.shown());
        }
        let seq = self.seq;
        self.seq += 1;
        if !wanted() {
            return Ok(SourceEvent::Skipped);
        }
        let (captured_at, captured_mono) = match (sample.buffer(), self.running.as_ref()) {
            (Some(b), Some(r)) => capture_time(&r.pipeline, b),
            _ => (SystemTime::now(), Instant::now()),
        };
        let data = Self::copy(&sample).map_err(|m| self.fail(format!("cannot read a frame: {m}"), false))?;
        Ok(SourceEvent::Frame(Frame { camera: self.camera.clone(), seq, captured_at, captured_mono, data }))
    }
}

impl Drop for GstSource {
    fn drop(&mut self) {
        self.close();
    }
}

/// What a stream offers, for `whaled cameras --probe URL`: container, codecs, sizes and rates, found
/// by GStreamer's Discoverer (any URI it can open: rtsp://, http://, file://).
pub fn probe(url: &str, timeout: Duration) -> Result<String> {
    use gstreamer_pbutils as pbutils;
    use gstreamer_pbutils::prelude::*;
    use std::fmt::Write;
    init()?;
    let split = crate::config::network::split_url(url, &["rtsp", "rtsps", "http", "https", "file"])
        .map_err(|m| Error::Input(format!("--probe: {m}")))?;
    let shown = split.url.to_string();
    let fail = |m: String| {
        let m = match &split.password {
            Some(p) if !p.expose().is_empty() => m.replace(p.expose(), "***"),
            _ => m,
        };
        Error::Input(format!("{shown}: {m}"))
    };
    let discoverer = pbutils::Discoverer::new(gst::ClockTime::from_nseconds(timeout.as_nanos() as u64))
        .map_err(|e| fail(e.to_string()))?;
    let info = discoverer.discover_uri(url).map_err(|e| fail(e.to_string()))?;
    let mut out = format!("{shown}:\n");
    if let Some(d) = info.duration() {
        let _ = writeln!(out, "  duration {d}");
    } else {
        let _ = writeln!(out, "  live stream");
    }
    let video = info.video_streams();
    if video.is_empty() {
        let _ = writeln!(out, "  no video stream");
    }
    for v in video {
        let codec = v.caps().map(|c| pbutils::functions::pb_utils_get_codec_description(&c).to_string());
        let rate = v.framerate();
        let fps = if rate.denom() > 0 && rate.numer() > 0 {
            format!("{:.2} fps", rate.numer() as f64 / rate.denom() as f64)
        } else {
            "variable rate".into()
        };
        let _ = writeln!(
            out,
            "  video: {} {}x{} @ {fps}",
            codec.unwrap_or_else(|| "unknown codec".into()),
            v.width(),
            v.height()
        );
    }
    for a in info.audio_streams() {
        let codec = a.caps().map(|c| pbutils::functions::pb_utils_get_codec_description(&c).to_string());
        let _ = writeln!(out, "  audio: {} (ignored)", codec.unwrap_or_else(|| "unknown codec".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtsp_descriptions_carry_no_credentials() {
        let split = crate::config::network::split_url("rtsp://root:hunter2@cam/x", &["rtsp"]).unwrap();
        let s = RtspSettings {
            url: split.url,
            user: split.user,
            password: split.password,
            transport: Transport::Tcp,
            latency: Duration::from_millis(200),
            codec: VideoCodec::H265,
            decoder: "nvv4l2decoder ! nvvidconv".into(),
            timeout: Duration::from_secs(10),
            ntp_sync: false,
        };
        let d = rtsp_description(&s);
        assert_eq!(d, "rtspsrc name=src ! rtph265depay ! h265parse ! nvv4l2decoder ! nvvidconv ! appsink name=whaled");
        let src = GstSource::rtsp(Arc::from("mast"), s);
        assert!(!src.fail("x", false).to_string().contains("hunter2"));
        assert_eq!(src.scrub("location rtsp://root:hunter2@cam"), "location rtsp://root:***@cam");
    }
}
