//! Frame sources behind one trait: `replay` (files, for trying whaled without a camera and for tests),
//! `v4l2` (USB/CSI cameras) and, with the `gstreamer` feature, `gst` (RTSP cameras and any GStreamer
//! pipeline). A source is owned by its capture thread; it hands out compressed or raw frames
//! and never decodes (decoding happens only for frames that enter inference).

#[cfg(feature = "gstreamer")]
pub mod gst;
pub mod pixels;
pub mod replay;
pub mod v4l2;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// One captured frame, still encoded as the camera delivered it.
#[derive(Debug, Clone)]
pub struct Frame {
    pub camera: Arc<str>,
    /// Per-camera sequence number, from 0.
    pub seq: u64,
    /// Wall-clock capture time: what records report (it jumps when the system clock is stepped).
    pub captured_at: SystemTime,
    /// Capture time on the monotonic clock: what durations between frames are measured on (sighting
    /// gaps, the frame budget, the GPS fix at capture), immune to clock steps.
    pub captured_mono: Instant,
    pub data: FrameData,
}

/// Frame payloads whaled knows how to decode.
#[derive(Debug, Clone)]
pub enum FrameData {
    /// A complete JPEG (or PNG) image: replay files, MJPEG cameras.
    Encoded(Arc<[u8]>),
    /// Uncompressed pixels as the camera delivered them.
    Raw { format: pixels::RawFormat, colour: pixels::Colour, width: u32, height: u32, stride: u32, bytes: Arc<[u8]> },
}

impl FrameData {
    /// The payload as the source delivered it (encoded or raw).
    pub fn payload(&self) -> &Arc<[u8]> {
        match self {
            FrameData::Encoded(b) | FrameData::Raw { bytes: b, .. } => b,
        }
    }

    /// Reads an image file's bytes as a frame (for `identify` and `eval`; decoded later, at the scale
    /// the models need).
    pub fn read_file(path: &std::path::Path) -> crate::Result<FrameData> {
        let bytes = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
        Ok(FrameData::Encoded(Arc::from(bytes)))
    }
}

/// What a source reports instead of a frame.
#[derive(Debug)]
pub enum SourceEvent {
    Frame(Frame),
    /// A frame was captured but the sampler did not want it: nothing was copied out of the driver's
    /// buffer.
    Skipped,
    /// No frame yet, and the source is still within its timeout: the capture loop comes round (for
    /// shutdown and the watchdog) and asks again.
    Idle,
    /// The source has no more frames and will not have any (a replay played once).
    End,
}

/// A camera or a recording.
pub trait Source: Send {
    /// Blocks until the next frame (pacing itself to its configured rate) or the end of the stream.
    /// `wanted` is asked once per captured frame, before its bytes are copied out of the driver's
    /// buffer: a camera at 30 fps sampled at 2 fps copies 2 frames a second, not 30.
    fn next_sampled(&mut self, wanted: &mut dyn FnMut() -> bool) -> crate::Result<SourceEvent>;

    /// Every frame, copied.
    fn next(&mut self) -> crate::Result<SourceEvent> {
        self.next_sampled(&mut || true)
    }
}

/// Opens the source a camera block describes.
pub fn open(cfg: &crate::config::CameraConfig) -> crate::Result<Box<dyn Source>> {
    match &cfg.source {
        crate::config::SourceConfig::Replay { path, fps, looping, speed } => {
            let mut r = replay::ReplaySource::open(Arc::from(cfg.name.as_str()), path, *fps, *looping)?;
            if let Some(k) = speed {
                r.set_speed(*fps, *k);
            }
            Ok(Box::new(r))
        }
        crate::config::SourceConfig::V4l2(settings) => {
            Ok(Box::new(v4l2::V4l2Source::new(Arc::from(cfg.name.as_str()), settings.clone())))
        }
        #[cfg(feature = "gstreamer")]
        crate::config::SourceConfig::Rtsp(s) => {
            Ok(Box::new(gst::GstSource::rtsp(Arc::from(cfg.name.as_str()), s.clone())))
        }
        #[cfg(feature = "gstreamer")]
        crate::config::SourceConfig::Gstreamer(s) => {
            Ok(Box::new(gst::GstSource::pipeline(Arc::from(cfg.name.as_str()), s.clone())))
        }
        // Config parsing refuses these kinds in a build without GStreamer; a config built in code gets
        // the same answer here.
        #[cfg(not(feature = "gstreamer"))]
        crate::config::SourceConfig::Rtsp(_) | crate::config::SourceConfig::Gstreamer(_) => Err(crate::Error::Input(
            format!("camera {}: network cameras need whaled built with the `gstreamer` feature", cfg.name),
        )),
    }
}
