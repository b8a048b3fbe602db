//! The daemon's configuration: one TOML file parsed once into validated types.
//!
//! `Config::discover` finds the file (`--config`, then `$WHALED_CONFIG`, then
//! `$XDG_CONFIG_HOME/whaled/whaled.toml` or `~/.config/whaled/whaled.toml`, then
//! `/etc/whaled/whaled.toml`) and falls back to built-in defaults that run the shipped pre-filter. Every
//! error names the file, the line and the key and says what was expected; nothing downstream re-parses
//! strings or re-checks ranges. Unknown keys are errors (`deny_unknown_fields`): a typo must not silently
//! fall back to a default on a box nobody watches.

pub mod gps;
pub mod mqtt;
pub mod network;
pub mod onnxruntime;
pub mod secret;
pub use crate::values;
pub use mqtt::OutboxConfig;
pub use onnxruntime::{
    ArenaExtendStrategy, CudaConfig, ExecutionProvider, GpuDevice, OrtConfig, Switch, TensorRtConfig,
};

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};
use crate::manifest::{BackendKind, ModelManifest};
use values::{line_col, Count, Interval, Positive, Probability};

/// The model the built-in defaults use as pre-filter (a directory under a model search directory).
pub const DEFAULT_PREFILTER: &str = "marine-gate-v2";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    device_id: Option<Spanned<String>>,
    #[serde(default)]
    inference: RawInference,
    prefilter: Option<RawStage>,
    identification: Option<RawIdentification>,
    zero_shot: Option<RawZeroShot>,
    #[serde(default, rename = "camera")]
    cameras: Vec<RawCamera>,
    #[serde(default)]
    pipeline: RawPipeline,
    mqtt: Option<mqtt::RawMqtt>,
    gps: Option<gps::RawGps>,
    health: Option<RawHealth>,
    sightings: Option<RawSightings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSightings {
    publish: Option<PublishMode>,
    gap: Option<Interval>,
    max_duration: Option<Interval>,
    update_interval: Option<Interval>,
    identify_interval: Option<Interval>,
    identify_quality: Option<Probability>,
    max_identified: Option<Count>,
    min_frames: Option<Count>,
    snapshot: Option<bool>,
}

/// What `whaled run` publishes (and prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    /// Sighting events only (the default with `[mqtt]`): a few messages per encounter.
    Sightings,
    /// Per-frame detections only, every passing frame identified: the upstream's behaviour.
    Detections,
    /// Both; per-frame detections only for the frames the budget identifies.
    Both,
}

/// `[sightings]`: frames of one encounter -> one sighting, and the frame budget (see `sighting.rs`).
#[derive(Debug, Clone)]
pub struct SightingsConfig {
    pub publish: PublishMode,
    /// Passing frames no further apart than this belong to one sighting.
    pub gap: std::time::Duration,
    pub max_duration: std::time::Duration,
    /// At most one `update` event per this interval.
    pub update_interval: std::time::Duration,
    /// After the first, at most one identified frame per this interval of capture time.
    pub identify_interval: std::time::Duration,
    /// ... whose pre-filter score is at least this fraction of the sighting's best so far.
    pub identify_quality: f64,
    /// At most this many identified frames per sighting.
    pub max_identified: usize,
    /// A sighting is published only once it has this many passing frames (fewer: a stray false
    /// positive, counted, never sent).
    pub min_frames: usize,
    /// Publish the best frame's JPEG when a sighting ends.
    pub snapshot: bool,
}

impl Default for SightingsConfig {
    fn default() -> Self {
        SightingsConfig {
            publish: PublishMode::Detections,
            gap: std::time::Duration::from_secs(10),
            max_duration: std::time::Duration::from_secs(600),
            update_interval: std::time::Duration::from_secs(10),
            identify_interval: std::time::Duration::from_secs(2),
            identify_quality: 0.9,
            max_identified: 30,
            min_frames: 2,
            snapshot: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    listen: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    workers: Option<Count>,
    emit_rejected: Option<bool>,
    stats_interval: Option<Interval>,
    stall_timeout: Option<Interval>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCamera {
    name: Spanned<String>,
    kind: Spanned<SourceKind>,
    path: Option<Spanned<PathBuf>>,
    fps: Option<Spanned<Positive>>,
    #[serde(rename = "loop")]
    looping: Option<Spanned<bool>>,
    sample_fps: Option<Spanned<Positive>>,
    speed: Option<Spanned<Positive>>,
    formats: Option<Spanned<Vec<PixelFormat>>>,
    width: Option<Count>,
    height: Option<Count>,
    timeout: Option<Interval>,
    // Network cameras (network.rs).
    url: Option<Spanned<String>>,
    user: Option<String>,
    password: Option<String>,
    password_file: Option<Spanned<PathBuf>>,
    password_env: Option<Spanned<String>>,
    transport: Option<network::Transport>,
    latency: Option<Interval>,
    codec: Option<network::VideoCodec>,
    decoder: Option<Spanned<String>>,
    ntp_sync: Option<bool>,
    pipeline: Option<Spanned<String>>,
}

impl RawCamera {
    /// The keys only network cameras take, by name, where set (for "only applies to" errors).
    fn network_keys(&self) -> Vec<&'static str> {
        [
            ("url", self.url.is_some()),
            ("user", self.user.is_some()),
            ("password", self.password.is_some()),
            ("password_file", self.password_file.is_some()),
            ("password_env", self.password_env.is_some()),
            ("transport", self.transport.is_some()),
            ("latency", self.latency.is_some()),
            ("codec", self.codec.is_some()),
            ("decoder", self.decoder.is_some()),
            ("ntp_sync", self.ntp_sync.is_some()),
            ("pipeline", self.pipeline.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }
}

/// What a V4L2 camera is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct V4l2Settings {
    pub path: PathBuf,
    /// Pixel formats in order of preference.
    pub formats: Vec<PixelFormat>,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// No frame for this long counts as a stalled camera.
    pub timeout: std::time::Duration,
}

/// V4L2 pixel formats whaled can use, named as in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    Mjpeg,
    Yuyv,
    Nv12,
    Grey,
    Rgb24,
}

/// The kinds of frame source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A directory of images or a file of concatenated JPEGs, played at `fps`.
    Replay,
    /// A Video4Linux2 camera (USB/CSI) at `path`.
    V4l2,
    /// A network camera's RTSP stream at `url` (the `gstreamer` feature).
    Rtsp,
    /// Any GStreamer pipeline ending in `appsink name=whaled` (the `gstreamer` feature).
    Gstreamer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInference {
    backend: Option<BackendKind>,
    threads: Option<Count>,
    tract_precision: Option<TractPrecision>,
    jpeg_dct_scaling: Option<bool>,
    #[serde(default)]
    onnxruntime: onnxruntime::RawOrt,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    /// Optional: `[prefilter] threshold = 0.1` alone tunes the shipped pre-filter.
    model: Option<Spanned<String>>,
    variant: Option<String>,
    threshold: Option<Probability>,
    locate: Option<LocateMode>,
    locate_long_side: Option<Spanned<u32>>,
}

/// `[prefilter] locate`: how a passing frame's animal is found.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum LocateMode {
    Frame,
    GateMap,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZeroShot {
    model: Spanned<String>,
    variant: Option<String>,
    threshold: Option<Probability>,
    position: Option<ZeroShotPosition>,
}

/// Where the zero-shot gate runs relative to the pre-filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroShotPosition {
    /// Zero-shot first; the pre-filter runs only on frames it passes.
    BeforePrefilter,
    /// The cheap pre-filter first (default): the zero-shot encoder runs only on frames it passes.
    AfterPrefilter,
}

/// `[zero_shot]`: the optional zero-shot gate stage.
#[derive(Debug, Clone)]
pub struct ZeroShotConfig {
    pub manifest: PathBuf,
    pub variant: Option<String>,
    /// Overrides the manifest's threshold.
    pub threshold: Option<Probability>,
    pub position: ZeroShotPosition,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentification {
    model: Spanned<String>,
    variant: Option<String>,
    min_confidence: Option<Probability>,
    top_k: Option<Count>,
    gallery: Option<Spanned<PathBuf>>,
    new_individual_below: Option<Probability>,
}

/// Where the configuration came from (for the start-up log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Defaults,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub origin: Origin,
    /// Names this box in every event; safe as an MQTT topic level (no `/`, `+`, `#`).
    pub device_id: String,
    pub inference: InferenceConfig,
    pub prefilter: PrefilterConfig,
    pub identification: Option<IdentificationConfig>,
    /// The zero-shot gate stage; `None`: off.
    pub zero_shot: Option<ZeroShotConfig>,
    /// The cameras `whaled run` watches, in config order (names unique).
    pub cameras: Vec<CameraConfig>,
    pub pipeline: PipelineConfig,
    /// Publish to a broker through the durable outbox; `None`: JSON lines on stdout only.
    pub mqtt: Option<mqtt::MqttConfig>,
    /// Read the box's position from gpsd; `None`: off (detections carry no `position`).
    pub gps: Option<gps::GpsConfig>,
    /// Address of the `/healthz` + `/metrics` endpoint; `None`: off.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Sightings and the frame budget; `publish` defaults to sightings with `[mqtt]`, else detections.
    pub sightings: SightingsConfig,
}

/// `[pipeline]`: how `whaled run` processes frames.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Inference threads sharing the loaded models.
    pub workers: usize,
    /// Emit detections for frames the pre-filter rejected too (default: only frames that pass).
    pub emit_rejected: bool,
    /// How often per-camera counters are logged at INFO.
    pub stats_interval: std::time::Duration,
    /// A capture loop or an inference stuck this long counts as stalled (watchdog, /healthz).
    pub stall_timeout: std::time::Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 1,
            emit_rejected: false,
            stats_interval: std::time::Duration::from_secs(60),
            stall_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// One camera block (`[[camera]]`).
#[derive(Debug, Clone)]
pub struct CameraConfig {
    /// Unique; safe as an MQTT topic level.
    pub name: String,
    pub source: SourceConfig,
    /// At most one frame per this interval enters inference; `None`: every captured frame is offered.
    pub sample_interval: Option<std::time::Duration>,
}

impl CameraConfig {
    /// A V4L2 camera with the defaults of a `[[camera]]` block that names only its path.
    pub fn default_v4l2(name: &str, path: PathBuf) -> CameraConfig {
        CameraConfig {
            name: name.to_string(),
            source: SourceConfig::V4l2(V4l2Settings {
                path,
                formats: vec![PixelFormat::Mjpeg, PixelFormat::Yuyv],
                width: 1280,
                height: 720,
                fps: 30,
                timeout: std::time::Duration::from_secs(3),
            }),
            sample_interval: Some(std::time::Duration::from_millis(500)),
        }
    }
}

/// What a camera reads from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// `speed`: play `speed` times faster than `fps`, with capture times on the recording's own clock
    /// (frame n at start + n / fps): a long survey replayed in minutes with its real timing.
    Replay {
        path: PathBuf,
        fps: f64,
        looping: bool,
        speed: Option<f64>,
    },
    V4l2(V4l2Settings),
    Rtsp(network::RtspSettings),
    Gstreamer(network::GstSettings),
}

#[derive(Debug, Clone)]
pub struct InferenceConfig {
    pub backend: BackendKind,
    /// Intra-op threads per model (tract: a rayon pool; onnxruntime: intra-op threads).
    pub threads: usize,
    /// Decode JPEG frames at 1/2, 1/4 or 1/8 size when the models need no more (see `decode`).
    pub jpeg_dct_scaling: bool,
    /// The float type tract computes in (onnxruntime ignores it).
    pub tract_precision: TractPrecision,
    pub onnxruntime: OrtConfig,
}

/// `[inference] tract_precision`: `"f32"` (default), or `"f16"` for boards with half-precision
/// arithmetic (ARMv8.2: Jetson Orin, Raspberry Pi 5), where tract runs it natively; elsewhere tract
/// emulates it, slowly. f16 changes outputs by about 1e-3 relative (tests/parity.rs measures it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TractPrecision {
    #[default]
    F32,
    F16,
}

#[derive(Debug, Clone)]
pub struct PrefilterConfig {
    /// Path of the model manifest (`model.toml`).
    pub manifest: PathBuf,
    pub variant: Option<String>,
    /// Overrides the manifest's default threshold.
    pub threshold: Option<Probability>,
    pub locate: Locate,
}

/// Where the animal in a passing frame is, for the Detection's `bbox` and the embedder's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locate {
    /// The whole frame (the upstream's answer: its photographers crop).
    Frame,
    /// The gate's class-activation map on the whole frame resized to this longer side (see
    /// [`crate::locate`]); the embedder sees a crop of the decoded frame around the box.
    GateMap { long_side: u32 },
}

/// The default map size: the longer side of the gate's input for `locate = "gate_map"`.
pub const DEFAULT_LOCATE_LONG_SIDE: u32 = 640;
/// The map sizes accepted: at least 2 cells, at most 4096 px (a 4K frame at 1:1).
pub const LOCATE_LONG_SIDE_RANGE: std::ops::RangeInclusive<u32> = 64..=4096;

#[derive(Debug, Clone)]
pub struct IdentificationConfig {
    pub manifest: PathBuf,
    pub variant: Option<String>,
    pub min_confidence: Option<Probability>,
    pub top_k: Option<usize>,
    /// A gallery file searched beside the head (created empty, bound to the embedder, if missing).
    pub gallery: Option<PathBuf>,
    /// A top-1 cosine below this is reported as `new_individual`; `None`: never.
    pub new_individual_below: Option<Probability>,
}

impl Config {
    /// Finds and loads the configuration (see the module docs for the search order).
    pub fn discover(explicit: Option<&Path>) -> Result<Config> {
        if let Some(p) = explicit {
            return Config::load(p);
        }
        if let Some(p) = std::env::var_os("WHALED_CONFIG").filter(|p| !p.is_empty()) {
            return Config::load(Path::new(&p));
        }
        for p in search_path() {
            if p.is_file() {
                return Config::load(&p);
            }
        }
        Config::defaults()
    }

    /// Built-in defaults: the shipped pre-filter on tract, no identification model.
    pub fn defaults() -> Result<Config> {
        let manifest = find_shipped_model(DEFAULT_PREFILTER).ok_or_else(|| {
            Error::Config(format!(
                "no configuration file found and the shipped model `{DEFAULT_PREFILTER}` is in none of {}; \
                 pass --config or set WHALED_MODEL_DIR",
                display_dirs(&model_dirs())
            ))
        })?;
        Ok(Config {
            origin: Origin::Defaults,
            device_id: default_device_id(),
            inference: InferenceConfig {
                backend: BackendKind::Tract,
                threads: 1,
                jpeg_dct_scaling: true,
                tract_precision: TractPrecision::F32,
                onnxruntime: OrtConfig {
                    library: None,
                    execution_providers: vec![ExecutionProvider::Cpu],
                    sessions: 1,
                },
            },
            prefilter: PrefilterConfig { manifest, variant: None, threshold: None, locate: Locate::Frame },
            identification: None,
            zero_shot: None,
            cameras: Vec::new(),
            pipeline: PipelineConfig::default(),
            mqtt: None,
            gps: None,
            health_listen: None,
            sightings: SightingsConfig::default(),
        })
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let src = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read config file {}: {e}", path.display())))?;
        Config::parse(path, &src)
    }

    /// Validates config text; `path` names it in errors and anchors relative paths.
    pub fn parse(path: &Path, src: &str) -> Result<Config> {
        let raw: RawConfig = toml::from_str(src).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let at = |span: std::ops::Range<usize>, key: &str, msg: String| {
            let (line, col) = line_col(src, span.start);
            Error::Config(format!("{}:{line}:{col}: {key}: {msg}", path.display()))
        };

        let device_id = match raw.device_id {
            None => default_device_id(),
            Some(s) => {
                let v = s.get_ref();
                if !topic_safe(v) {
                    return Err(at(s.span(), "device_id", format!(
                        "expected 1 to 64 characters without '/', '+', '#' or spaces (it becomes an MQTT topic level), got {v:?}")));
                }
                v.clone()
            }
        };

        let shipped_prefilter = || {
            find_shipped_model(DEFAULT_PREFILTER).ok_or_else(|| {
                Error::Config(format!(
                    "{}: no [prefilter] model given and the shipped model `{DEFAULT_PREFILTER}` is in none of {}",
                    path.display(),
                    display_dirs(&model_dirs())
                ))
            })
        };
        let prefilter = match raw.prefilter {
            None => PrefilterConfig {
                manifest: shipped_prefilter()?,
                variant: None,
                threshold: None,
                locate: Locate::Frame,
            },
            Some(p) => PrefilterConfig {
                manifest: match &p.model {
                    Some(m) => resolve_model(dir, m.get_ref()).map_err(|e| at(m.span(), "prefilter.model", e))?,
                    None => shipped_prefilter()?,
                },
                variant: p.variant,
                threshold: p.threshold,
                locate: match (p.locate.unwrap_or(LocateMode::Frame), p.locate_long_side) {
                    (LocateMode::Frame, Some(l)) => {
                        return Err(at(
                            l.span(),
                            "prefilter.locate_long_side",
                            "is only read with locate = \"gate_map\"".into(),
                        ))
                    }
                    (LocateMode::Frame, None) => Locate::Frame,
                    (LocateMode::GateMap, None) => Locate::GateMap { long_side: DEFAULT_LOCATE_LONG_SIDE },
                    (LocateMode::GateMap, Some(l)) if LOCATE_LONG_SIDE_RANGE.contains(l.get_ref()) => {
                        Locate::GateMap { long_side: *l.get_ref() }
                    }
                    (LocateMode::GateMap, Some(l)) => {
                        return Err(at(
                            l.span(),
                            "prefilter.locate_long_side",
                            format!(
                                "must be {} to {} pixels, not {}",
                                LOCATE_LONG_SIDE_RANGE.start(),
                                LOCATE_LONG_SIDE_RANGE.end(),
                                l.get_ref()
                            ),
                        ))
                    }
                },
            },
        };
        let identification = match raw.identification {
            None => None,
            Some(i) => Some(IdentificationConfig {
                manifest: resolve_model(dir, i.model.get_ref())
                    .map_err(|m| at(i.model.span(), "identification.model", m))?,
                variant: i.variant,
                min_confidence: i.min_confidence,
                top_k: i.top_k.map(Count::get),
                gallery: match i.gallery {
                    None => None,
                    Some(g) => {
                        let p = dir.join(g.get_ref());
                        if !p.parent().is_some_and(Path::is_dir) {
                            return Err(at(
                                g.span(),
                                "identification.gallery",
                                format!("the directory of {} does not exist", p.display()),
                            ));
                        }
                        Some(p)
                    }
                },
                new_individual_below: i.new_individual_below,
            }),
        };

        let zero_shot = match raw.zero_shot {
            None => None,
            Some(z) => Some(ZeroShotConfig {
                manifest: resolve_model(dir, z.model.get_ref())
                    .map_err(|m| at(z.model.span(), "zero_shot.model", m))?,
                variant: z.variant,
                threshold: z.threshold,
                position: z.position.unwrap_or(ZeroShotPosition::AfterPrefilter),
            }),
        };

        let mut cameras: Vec<CameraConfig> = Vec::with_capacity(raw.cameras.len());
        for c in raw.cameras {
            let name = c.name.get_ref();
            if !topic_safe(name) {
                return Err(at(
                    c.name.span(),
                    "camera.name",
                    format!("expected 1 to 64 characters without '/', '+', '#' or spaces, got {name:?}"),
                ));
            }
            if cameras.iter().any(|o| &o.name == name) {
                return Err(at(c.name.span(), "camera.name", format!("camera `{name}` is defined twice")));
            }
            for (key, rate) in [("camera.fps", &c.fps), ("camera.sample_fps", &c.sample_fps)] {
                if let Some(r) = rate.as_ref().filter(|r| !(MIN_FPS..=MAX_FPS).contains(&r.get_ref().get())) {
                    return Err(at(
                        r.span(),
                        key,
                        format!("expected {MIN_FPS} to {MAX_FPS} frames per second, got {:?}", r.get_ref().get()),
                    ));
                }
            }
            let kind = *c.kind.get_ref();
            let network = matches!(kind, SourceKind::Rtsp | SourceKind::Gstreamer);
            if let (false, Some(key)) = (network, c.network_keys().first()) {
                return Err(at(
                    c.kind.span(),
                    &format!("camera.{key}"),
                    "only applies to kind = \"rtsp\" or \"gstreamer\"".into(),
                ));
            }
            // Replay and V4L2 read a path; network cameras refuse one (network_camera).
            let required_path = || {
                c.path.as_ref().ok_or_else(|| {
                    at(c.kind.span(), "camera.path", "is missing: the file, directory or device to read".into())
                })
            };
            let source = match kind {
                SourceKind::Replay => {
                    let path = required_path()?;
                    let p = dir.join(path.get_ref());
                    if !p.exists() {
                        return Err(at(
                            path.span(),
                            "camera.path",
                            format!("no such file or directory {}", p.display()),
                        ));
                    }
                    if let Some(f) = &c.formats {
                        return Err(at(f.span(), "camera.formats", "only applies to kind = \"v4l2\"".into()));
                    }
                    if c.width.is_some() || c.height.is_some() || c.timeout.is_some() {
                        return Err(at(
                            c.name.span(),
                            "camera",
                            "width, height and timeout only apply to kind = \"v4l2\"".into(),
                        ));
                    }
                    SourceConfig::Replay {
                        path: p,
                        fps: c.fps.as_ref().map_or(5.0, |f| f.get_ref().get()),
                        looping: c.looping.is_none_or(Spanned::into_inner),
                        speed: match &c.speed {
                            Some(k) if !(0.01..=1000.0).contains(&k.get_ref().get()) => {
                                return Err(at(
                                    k.span(),
                                    "camera.speed",
                                    format!("expected 0.01 to 1000, got {}", k.get_ref().get()),
                                ))
                            }
                            k => k.as_ref().map(|k| k.get_ref().get()),
                        },
                    }
                }
                SourceKind::V4l2 => {
                    let path = required_path()?;
                    if let Some(l) = &c.looping {
                        return Err(at(l.span(), "camera.loop", "only applies to kind = \"replay\"".into()));
                    }
                    if let Some(k) = &c.speed {
                        return Err(at(k.span(), "camera.speed", "only applies to kind = \"replay\"".into()));
                    }
                    let formats = match &c.formats {
                        None => vec![PixelFormat::Mjpeg, PixelFormat::Yuyv],
                        Some(f) if f.get_ref().is_empty() => {
                            return Err(at(
                                f.span(),
                                "camera.formats",
                                "is empty; list at least one pixel format".into(),
                            ))
                        }
                        Some(f) => f.get_ref().clone(),
                    };
                    // Not checked for existence: a camera may be plugged in after start-up.
                    SourceConfig::V4l2(V4l2Settings {
                        path: path.get_ref().clone(),
                        formats,
                        width: c.width.map_or(1280, |w| w.get() as u32),
                        height: c.height.map_or(720, |h| h.get() as u32),
                        fps: c.fps.as_ref().map_or(30, |f| f.get_ref().get().round().max(1.0) as u32),
                        timeout: c.timeout.map_or(std::time::Duration::from_secs(3), Interval::get),
                    })
                }
                SourceKind::Rtsp | SourceKind::Gstreamer => network_camera(&c, kind, dir, &at)?,
            };
            cameras.push(CameraConfig {
                name: name.clone(),
                source,
                sample_interval: c.sample_fps.map(|f| std::time::Duration::from_secs_f64(1.0 / f.get_ref().get())),
            });
        }

        let defaults = PipelineConfig::default();
        let pipeline = PipelineConfig {
            workers: raw.pipeline.workers.map_or(defaults.workers, Count::get),
            emit_rejected: raw.pipeline.emit_rejected.unwrap_or(defaults.emit_rejected),
            stats_interval: raw.pipeline.stats_interval.map_or(defaults.stats_interval, Interval::get),
            stall_timeout: raw.pipeline.stall_timeout.map_or(defaults.stall_timeout, Interval::get),
        };
        let workers = pipeline.workers;
        let backend = raw.inference.backend.unwrap_or(BackendKind::Tract);
        let (onnxruntime, warnings) = raw.inference.onnxruntime.validate(dir, backend, workers, &at)?;
        for w in warnings {
            log::warn!("{}: {w}", path.display());
        }

        let mqtt = match raw.mqtt {
            None => None,
            Some(m) => Some(m.validate(dir, &device_id, &at)?),
        };
        let gps = match raw.gps {
            None => None,
            Some(g) => Some(g.validate(&at)?),
        };

        let d = SightingsConfig::default();
        let sightings = match raw.sightings {
            None => SightingsConfig {
                publish: if mqtt.is_some() { PublishMode::Sightings } else { PublishMode::Detections },
                ..d
            },
            Some(r) => SightingsConfig {
                publish: r.publish.unwrap_or(if mqtt.is_some() {
                    PublishMode::Sightings
                } else {
                    PublishMode::Detections
                }),
                gap: r.gap.map_or(d.gap, Interval::get),
                max_duration: r.max_duration.map_or(d.max_duration, Interval::get),
                update_interval: r.update_interval.map_or(d.update_interval, Interval::get),
                identify_interval: r.identify_interval.map_or(d.identify_interval, Interval::get),
                identify_quality: r.identify_quality.map_or(d.identify_quality, Probability::get),
                max_identified: r.max_identified.map_or(d.max_identified, Count::get),
                min_frames: r.min_frames.map_or(d.min_frames, Count::get),
                snapshot: r.snapshot.unwrap_or(d.snapshot),
            },
        };
        if sightings.max_duration <= sightings.gap {
            return Err(Error::Config(format!(
                "{}: sightings.max_duration ({:?}) must be longer than sightings.gap ({:?})",
                path.display(),
                sightings.max_duration,
                sightings.gap
            )));
        }

        let health_listen = match raw.health {
            None => None,
            Some(h) => Some(h.listen.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
                at(
                    h.listen.span(),
                    "health.listen",
                    format!("expected an address and port such as \"127.0.0.1:9820\", got {:?}", h.listen.get_ref()),
                )
            })?),
        };

        Ok(Config {
            cameras,
            pipeline,
            mqtt,
            gps,
            health_listen,
            sightings,
            origin: Origin::File(path.to_path_buf()),
            device_id,
            inference: InferenceConfig {
                backend,
                threads: raw.inference.threads.map_or(1, Count::get),
                jpeg_dct_scaling: raw.inference.jpeg_dct_scaling.unwrap_or(true),
                tract_precision: raw.inference.tract_precision.unwrap_or_default(),
                onnxruntime,
            },
            prefilter,
            identification,
            zero_shot,
        })
    }
}

impl Config {
    /// Parses the model manifests this config names and checks their roles and files, without loading
    /// the models. Returns one summary line per model.
    pub fn check_models(&self) -> Result<Vec<String>> {
        let mut stages = vec![(&self.prefilter.manifest, self.prefilter.variant.as_deref(), "prefilter")];
        if let Some(i) = &self.identification {
            stages.push((&i.manifest, i.variant.as_deref(), "embedder"));
        }
        if let Some(z) = &self.zero_shot {
            stages.push((&z.manifest, z.variant.as_deref(), "zero_shot"));
        }
        let mut lines = Vec::new();
        for (path, variant, want) in stages {
            let m = ModelManifest::load(path)?;
            let role = m.role.name();
            if role != want {
                return Err(Error::model(path, format!("is configured as the {want} but its role is \"{role}\"")));
            }
            let v = m.select_variant(variant, self.inference.backend)?;
            if !v.file.is_file() {
                return Err(Error::model(path, format!("variant `{}`: no such file {}", v.name, v.file.display())));
            }
            lines.push(format!("{want}: {} (variant {}, {})", m.name, v.name, v.file.display()));
        }
        Ok(lines)
    }
}

/// The daemon's state directory (the outbox, open sightings and the TensorRT cache live under it):
/// systemd's `$STATE_DIRECTORY` (`StateDirectory=whaled`: /var/lib/whaled), else /var/lib/whaled when this
/// user may write there, else the user's data directory (`$XDG_DATA_HOME/whaled`, `~/.local/share/whaled`).
pub fn default_state_dir() -> PathBuf {
    if let Some(state) = std::env::var_os("STATE_DIRECTORY").filter(|s| !s.is_empty()) {
        // systemd may pass several, separated by ':'; the first is ours.
        let first = state.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    let system = Path::new("/var/lib/whaled");
    if system.is_dir() && onnxruntime::access_write(system) {
        return system.to_path_buf();
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("whaled")
}

/// Config files looked for when neither `--config` nor `$WHALED_CONFIG` is given, in order.
pub fn search_path() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        out.push(PathBuf::from(x).join("whaled/whaled.toml"));
    } else if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        out.push(PathBuf::from(h).join(".config/whaled/whaled.toml"));
    }
    out.push(PathBuf::from("/etc/whaled/whaled.toml"));
    out
}

/// Directories searched for shipped models by name, in order: `$WHALED_MODEL_DIR`, the installed
/// package's `<prefix>/share/whaled/models` (next to the binary's `bin/`), `/usr/share/whaled/models`,
/// and the source checkout's `models/` the binary was built from.
pub fn model_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("WHALED_MODEL_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(prefix) = std::env::current_exe().ok().and_then(|e| e.parent()?.parent().map(Path::to_path_buf)) {
        dirs.push(prefix.join("share/whaled/models"));
    }
    dirs.push(PathBuf::from("/usr/share/whaled/models"));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    dirs
}

/// The manifest of the shipped model `name` (`<dir>/<name>/model.toml`), if any search directory has it.
pub fn find_shipped_model(name: &str) -> Option<PathBuf> {
    model_dirs().into_iter().map(|d| d.join(name).join("model.toml")).find(|p| p.is_file())
}

/// A model reference is a path to a manifest (contains `/` or ends in `.toml`; relative to the config
/// file's directory) or the bare name of a shipped model.
pub fn resolve_model(config_dir: &Path, reference: &str) -> std::result::Result<PathBuf, String> {
    if reference.contains('/') || reference.ends_with(".toml") {
        let p = config_dir.join(reference);
        return if p.is_file() {
            Ok(p)
        } else if p.is_dir() && p.join("model.toml").is_file() {
            Ok(p.join("model.toml"))
        } else {
            Err(format!("no model manifest at {} (expected a model.toml, or a directory holding one)", p.display()))
        };
    }
    find_shipped_model(reference).ok_or_else(|| {
        format!(
            "no shipped model named `{reference}` in {} (or give a path to a model.toml)",
            display_dirs(&model_dirs())
        )
    })
}

/// Frame rates (`fps`, `sample_fps`) whaled accepts: one frame per 1000 s up to 1000 a second.
const MIN_FPS: f64 = 0.001;
const MAX_FPS: f64 = 1000.0;

/// 1 to 64 characters, none of them `/`, `+`, `#`, whitespace or control: usable as an MQTT topic level.
fn topic_safe(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && !v.chars().any(|c| matches!(c, '/' | '+' | '#') || c.is_control() || c.is_whitespace())
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// The host name from gethostname(2) (sanitised into a topic-safe id). Not from
/// `/proc/sys/kernel/hostname`: the unit's `ProcSubset=pid` hides it, and every box would become the
/// same `whaled`. A box with no host name falls back to its machine id, still unique in a fleet.
pub fn default_device_id() -> String {
    let sanitise = |s: &str| -> String {
        s.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(64).collect()
    };
    let id = sanitise(&host_name().unwrap_or_default());
    if !id.is_empty() && id != "localhost" && id != "(none)" {
        return id;
    }
    let machine: String = sanitise(&std::fs::read_to_string("/etc/machine-id").unwrap_or_default());
    if machine.is_empty() {
        "whaled".into()
    } else {
        format!("whaled-{}", machine.chars().take(12).collect::<String>())
    }
}

/// The kernel's host name (the UTS namespace's), through gethostname(2).
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its whole length; gethostname NUL-terminates within it
    // when the name fits (a longer one is truncated, and we cut at the first NUL or the end).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Validates a `kind = "rtsp"` or `kind = "gstreamer"` block (the keys the other kinds take, and those
/// of the other network kind, are errors).
fn network_camera(
    c: &RawCamera,
    kind: SourceKind,
    dir: &Path,
    at: &dyn Fn(std::ops::Range<usize>, &str, String) -> Error,
) -> Result<SourceConfig> {
    if let Some(p) = &c.path {
        return Err(at(p.span(), "camera.path", "network cameras take `url` or `pipeline`, not `path`".into()));
    }
    if !cfg!(feature = "gstreamer") {
        return Err(at(
            c.kind.span(),
            "camera.kind",
            "network cameras need whaled built with GStreamer (cargo build --release --features gstreamer; \
             tools/system-packages.sh gstreamer installs what that needs)"
                .into(),
        ));
    }
    for (key, set) in [
        ("formats", c.formats.is_some()),
        ("width", c.width.is_some()),
        ("height", c.height.is_some()),
        ("fps", c.fps.is_some()),
        ("loop", c.looping.is_some()),
        ("speed", c.speed.is_some()),
    ] {
        if set {
            return Err(at(
                c.kind.span(),
                &format!("camera.{key}"),
                "does not apply to network cameras: the stream (or the pipeline's caps) sets it".into(),
            ));
        }
    }
    let timeout = c.timeout.map_or(network::DEFAULT_TIMEOUT, Interval::get);
    if kind == SourceKind::Gstreamer {
        let keys = c.network_keys();
        if let Some(k) = keys.iter().find(|k| **k != "pipeline") {
            return Err(at(
                c.kind.span(),
                &format!("camera.{k}"),
                "only applies to kind = \"rtsp\"; a gstreamer pipeline sets its source's properties itself".into(),
            ));
        }
        let Some(p) = &c.pipeline else {
            return Err(at(
                c.kind.span(),
                "camera.pipeline",
                "is missing: a gst-launch-1.0 description ending in `appsink name=whaled`".into(),
            ));
        };
        let pipeline = network::check_pipeline(p.get_ref()).map_err(|m| at(p.span(), "camera.pipeline", m))?;
        return Ok(SourceConfig::Gstreamer(network::GstSettings { pipeline, timeout }));
    }
    if let Some(p) = &c.pipeline {
        return Err(at(p.span(), "camera.pipeline", "only applies to kind = \"gstreamer\"".into()));
    }
    let Some(url) = &c.url else {
        return Err(at(c.kind.span(), "camera.url", "is missing: the camera's rtsp:// URL".into()));
    };
    let split = network::split_url(url.get_ref(), &["rtsp", "rtsps"]).map_err(|m| at(url.span(), "camera.url", m))?;
    let given = secret::RawPassword {
        password: c.password.clone(),
        password_file: c.password_file.clone(),
        password_env: c.password_env.clone(),
    }
    .resolve(dir, "camera", at)?;
    if split.password.is_some() && given.is_some() {
        return Err(at(
            url.span(),
            "camera.url",
            "carries a password and the block sets one too: keep one (password_env keeps it out of the file)".into(),
        ));
    }
    if split.user.is_some() && c.user.is_some() {
        return Err(at(url.span(), "camera.url", "carries a user name and the block sets `user` too: keep one".into()));
    }
    let user = split.user.or_else(|| c.user.clone());
    let password = split.password.or(given);
    if password.is_some() && user.is_none() {
        return Err(at(c.kind.span(), "camera.user", "is missing: a password is set without a user name".into()));
    }
    let codec = c.codec.unwrap_or(network::VideoCodec::H264);
    let decoder = match &c.decoder {
        Some(d) => network::check_decoder(d.get_ref()).map_err(|m| at(d.span(), "camera.decoder", m))?,
        None => codec.default_decoder().to_string(),
    };
    let latency = c.latency.map_or(std::time::Duration::from_millis(200), Interval::get);
    if latency > std::time::Duration::from_secs(10) {
        return Err(at(c.kind.span(), "camera.latency", format!("expected at most 10s, got {latency:?}")));
    }
    Ok(SourceConfig::Rtsp(network::RtspSettings {
        url: split.url,
        user,
        password,
        transport: c.transport.unwrap_or(network::Transport::Tcp),
        latency,
        codec,
        decoder,
        timeout,
        ntp_sync: c.ntp_sync.unwrap_or(false),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Config> {
        Config::parse(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/test.toml"), src)
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.inference.backend, BackendKind::Tract);
        assert_eq!(c.inference.threads, 1);
        assert_eq!(c.inference.tract_precision, TractPrecision::F32);
        assert!(c.prefilter.manifest.ends_with("models/marine-gate-v2/model.toml"));
        assert!(c.identification.is_none());
        assert!(!c.device_id.is_empty());
    }

    #[test]
    fn locate_is_the_frame_unless_the_gate_map_is_asked_for() {
        assert_eq!(parse("").unwrap().prefilter.locate, Locate::Frame);
        assert_eq!(
            parse("[prefilter]\nlocate = \"gate_map\"\n").unwrap().prefilter.locate,
            Locate::GateMap { long_side: 640 }
        );
        let c = parse("[prefilter]\nlocate = \"gate_map\"\nlocate_long_side = 1280\n").unwrap();
        assert_eq!(c.prefilter.locate, Locate::GateMap { long_side: 1280 });
        for (src, want) in [
            (
                "[prefilter]\nlocate_long_side = 960\n",
                "2:20: prefilter.locate_long_side: is only read with locate = \"gate_map\"",
            ),
            ("[prefilter]\nlocate = \"gate_map\"\nlocate_long_side = 10\n", "must be 64 to 4096 pixels, not 10"),
            ("[prefilter]\nlocate = \"map\"\n", "unknown variant `map`, expected `frame` or `gate_map`"),
        ] {
            let e = parse(src).unwrap_err().to_string();
            assert!(e.contains(want), "{src:?}: {e}");
        }
    }

    #[test]
    fn tract_precision_f16() {
        let c = parse("[inference]\ntract_precision = \"f16\"\nthreads = 2\n").unwrap();
        assert_eq!(c.inference.tract_precision, TractPrecision::F16);
        assert_eq!(c.inference.threads, 2);
    }

    #[test]
    fn cameras_and_pipeline() {
        let c = parse(
            "[[camera]]\nname = \"bow\"\nkind = \"replay\"\npath = \"../tests/photos\"\nfps = 10\nloop = false\nsample_fps = 2\n\
             [pipeline]\nworkers = 2\nemit_rejected = true\nstats_interval = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(c.cameras.len(), 1);
        assert_eq!(c.cameras[0].name, "bow");
        assert_eq!(c.cameras[0].sample_interval, Some(std::time::Duration::from_millis(500)));
        let SourceConfig::Replay { path, fps, looping, .. } = &c.cameras[0].source else { panic!("replay") };
        assert!(path.ends_with("tests/photos") && *fps == 10.0 && !looping);
        assert_eq!((c.pipeline.workers, c.pipeline.emit_rejected), (2, true));
        assert_eq!(c.pipeline.stats_interval, std::time::Duration::from_secs(5));
        let c = parse("[[camera]]\nname = \"cam\"\nkind = \"v4l2\"\npath = \"/dev/video7\"\nformats = [\"yuyv\", \"grey\"]\nwidth = 640\nheight = 480\nfps = 15\ntimeout = \"500ms\"\n").unwrap();
        let SourceConfig::V4l2(v) = &c.cameras[0].source else { panic!("v4l2") };
        assert_eq!((v.width, v.height, v.fps), (640, 480, 15));
        assert_eq!(v.formats, vec![PixelFormat::Yuyv, PixelFormat::Grey]);
        assert_eq!(v.timeout, std::time::Duration::from_millis(500));
    }

    #[test]
    fn shipped_model_by_name_or_path() {
        // One setting of the shipped pre-filter, without naming it.
        let tuned = parse("[prefilter]\nthreshold = 0.1\n").unwrap();
        assert!(tuned.prefilter.manifest.ends_with("models/marine-gate-v2/model.toml"));
        assert_eq!(tuned.prefilter.threshold.map(|t| t.get()), Some(0.1));
        let by_name = parse("[prefilter]\nmodel = \"efficientnet-lite0\"").unwrap();
        let by_path = parse("[prefilter]\nmodel = \"../models/efficientnet-lite0\"").unwrap();
        assert!(by_path.prefilter.manifest.ends_with("models/efficientnet-lite0/model.toml"));
        assert_eq!(
            by_name.prefilter.manifest.canonicalize().unwrap(),
            by_path.prefilter.manifest.canonicalize().unwrap()
        );
    }

    /// Network cameras: defaults, credentials out of the URL, and every misplaced or missing key named.
    #[cfg(feature = "gstreamer")]
    #[test]
    fn network_cameras() {
        use network::{Transport, VideoCodec};
        let c = parse("[[camera]]\nname = \"mast\"\nkind = \"rtsp\"\nurl = \"rtsp://crew:s%3Dcret@10.0.0.9/axis-media/media.amp\"\n").unwrap();
        let SourceConfig::Rtsp(r) = &c.cameras[0].source else { panic!("rtsp") };
        assert_eq!(r.url.as_str(), "rtsp://10.0.0.9/axis-media/media.amp");
        assert_eq!((r.user.as_deref(), r.password.as_ref().map(|p| p.expose())), (Some("crew"), Some("s=cret")));
        assert_eq!((r.transport, r.codec, r.decoder.as_str()), (Transport::Tcp, VideoCodec::H264, "avdec_h264"));
        assert_eq!(
            (r.timeout, r.latency, r.ntp_sync),
            (network::DEFAULT_TIMEOUT, std::time::Duration::from_millis(200), false)
        );
        assert!(!format!("{c:?}").contains("s=cret"), "a password in Debug output");
        let c = parse("[[camera]]\nname = \"pi\"\nkind = \"rtsp\"\nurl = \"rtsp://cam/h265\"\ncodec = \"h265\"\ndecoder = \"v4l2slh265dec\"\ntransport = \"udp\"\nlatency = \"50ms\"\ntimeout = \"4s\"\nuser = \"u\"\npassword = \"p\"\n").unwrap();
        let SourceConfig::Rtsp(r) = &c.cameras[0].source else { panic!("rtsp") };
        assert_eq!((r.codec, r.decoder.as_str(), r.transport), (VideoCodec::H265, "v4l2slh265dec", Transport::Udp));
        let c = parse("[[camera]]\nname = \"http\"\nkind = \"gstreamer\"\npipeline = \"souphttpsrc location=http://cam/mjpg ! multipartdemux ! appsink name=whaled\"\n").unwrap();
        assert!(matches!(&c.cameras[0].source, SourceConfig::Gstreamer(g) if g.timeout == network::DEFAULT_TIMEOUT));

        let rtsp = "[[camera]]\nname = \"a\"\nkind = \"rtsp\"\n";
        let cases: &[(String, &[&str])] = &[
            (format!("{rtsp}path = \"/dev/video0\"\n"), &["config/test.toml:4:8: camera.path: network cameras take `url` or `pipeline`, not `path`"]),
            (rtsp.to_string(), &["config/test.toml:3:8: camera.url: is missing"]),
            (format!("{rtsp}url = \"http://cam/x\"\n"), &["config/test.toml:4:7: camera.url: expected a rtsp or rtsps URL, got a http:// one"]),
            (format!("{rtsp}url = \"rtsp://u:hunter2@cam/\"\npassword = \"x\"\n"), &["camera.url: carries a password and the block sets one too"]),
            (format!("{rtsp}url = \"rtsp://cam/\"\npassword = \"hunter2\"\n"), &["camera.user: is missing: a password is set without a user name"]),
            (format!("{rtsp}url = \"rtsp://cam/\"\nuser = \"u\"\npassword_env = \"WHALED_TEST_UNSET_VAR\"\n"), &["camera.password_env: environment variable WHALED_TEST_UNSET_VAR is not set"]),
            (format!("{rtsp}url = \"rtsp://cam/\"\nformats = [\"mjpeg\"]\n"), &["camera.formats: does not apply to network cameras"]),
            (format!("{rtsp}url = \"rtsp://cam/\"\ndecoder = \"avdec_h264 ! \"\n"), &["camera.decoder: expected a GStreamer element or a chain"]),
            (format!("{rtsp}url = \"rtsp://cam/\"\ntransport = \"quic\"\n"), &["unknown variant `quic`, expected `tcp` or `udp`"]),
            (format!("{rtsp}url = \"rtsp://cam/\"\npipeline = \"videotestsrc ! appsink name=whaled\"\n"), &["camera.pipeline: only applies to kind = \"gstreamer\""]),
            ("[[camera]]\nname = \"a\"\nkind = \"gstreamer\"\npipeline = \"videotestsrc ! fakesink\"\n".into(), &["config/test.toml:4:12: camera.pipeline: must end in `appsink name=whaled`"]),
            ("[[camera]]\nname = \"a\"\nkind = \"gstreamer\"\n".into(), &["camera.pipeline: is missing"]),
            ("[[camera]]\nname = \"a\"\nkind = \"gstreamer\"\npipeline = \"videotestsrc ! appsink name=whaled\"\nurl = \"rtsp://x/\"\n".into(), &["camera.url: only applies to kind = \"rtsp\""]),
        ];
        for (src, wants) in cases {
            let e = parse(src).expect_err(src).to_string();
            assert!(!e.contains("hunter2"), "the error repeats a password: {e}");
            for w in *wants {
                assert!(e.contains(w), "config {src:?}\n error: {e}\n lacks: {w}");
            }
        }
    }

    #[cfg(not(feature = "gstreamer"))]
    #[test]
    fn network_cameras_need_the_feature() {
        let e = parse("[[camera]]\nname = \"a\"\nkind = \"rtsp\"\nurl = \"rtsp://cam/\"\n").unwrap_err().to_string();
        assert!(e.contains("camera.kind: network cameras need whaled built with GStreamer"), "{e}");
    }

    /// Data-driven: each bad config must fail naming the file, the line and the key.
    #[test]
    fn errors_name_file_line_and_key() {
        let cases: &[(&str, &[&str])] = &[
            (
                "[prefilter]\nmodel = \"efficientnet-lite0\"\ntreshold = 0.5\n",
                &[
                    "config/test.toml",
                    "line 3",
                    "unknown field `treshold`",
                    "expected one of `model`, `variant`, `threshold`",
                ],
            ),
            (
                "[prefilter]\nmodel = \"efficientnet-lite0\"\nthreshold = 1.2\n",
                &["line 3", "threshold = 1.2", "expected a probability between 0 and 1, got 1.2"],
            ),
            (
                "[inference]\nbackend = \"pytorch\"\n",
                &["line 2", "unknown variant `pytorch`, expected `tract` or `onnxruntime`"],
            ),
            ("[inference]\nthreads = 0\n", &["line 2", "expected a whole number of at least 1, got 0"]),
            (
                "\n[prefilter]\nmodel = \"no-such-model\"\n",
                &["config/test.toml:3:9: prefilter.model: no shipped model named `no-such-model`"],
            ),
            (
                "[identification]\nmodel = \"./missing/model.toml\"\n",
                &["config/test.toml:2:9: identification.model: no model manifest at", "missing/model.toml"],
            ),
            ("device_id = \"boat/1\"\n", &["config/test.toml:1:13: device_id: expected 1 to 64 characters"]),
            (
                "[inference.onnxruntime]\nlibrary = \"/nonexistent/libonnxruntime.so\"\n",
                &["config/test.toml:2:11: inference.onnxruntime.library: no such file /nonexistent/libonnxruntime.so"],
            ),
            (
                "[inference]\ntract_precision = \"f8\"\n",
                &["line 2", "unknown variant `f8`, expected `f32` or `f16`"],
            ),
            (
                "[inference.onnxruntime]\nexecution_providers = [\"gpu\"]\n",
                &["line 2", "unknown variant `gpu`, expected one of `tensorrt`, `cuda`, `cpu`"],
            ),
            ("[inference.onnxruntime]\nexecution_providers = []\n", &["config/test.toml:2:23: inference.onnxruntime.execution_providers: is empty"]),
            ("[prefilter\nmodel = 1\n", &["config/test.toml: TOML parse error at line 1"]),
            ("[[camera]]\nname = \"a\"\nkind = \"replay\"\npath = \"../tests/photos\"\n[[camera]]\nname = \"a\"\nkind = \"replay\"\npath = \"../tests/photos\"\n",
             &["config/test.toml:6:8: camera.name: camera `a` is defined twice"]),
            ("[[camera]]\nname = \"a\"\nkind = \"replay\"\npath = \"nowhere\"\n",
             &["config/test.toml:4:8: camera.path: no such file or directory", "config/nowhere"]),
            ("[[camera]]\nname = \"a\"\nkind = \"webcam\"\npath = \"x\"\n", &["line 3", "unknown variant `webcam`, expected one of `replay`, `v4l2`, `rtsp`, `gstreamer`"]),
            ("[[camera]]\nname = \"a\"\nkind = \"v4l2\"\npath = \"/dev/video0\"\nurl = \"rtsp://x/\"\n", &["config/test.toml:3:8: camera.url: only applies to kind = \"rtsp\" or \"gstreamer\""]),
            ("[[camera]]\nname = \"a\"\nkind = \"replay\"\n", &["config/test.toml:3:8: camera.path: is missing"]),
            ("[[camera]]\nname = \"a\"\nkind = \"v4l2\"\npath = \"/dev/video0\"\nformats = [\"h264\"]\n", &["line 5", "unknown variant `h264`, expected one of `mjpeg`, `yuyv`, `nv12`, `grey`, `rgb24`"]),
            ("[[camera]]\nname = \"a\"\nkind = \"v4l2\"\npath = \"/dev/video0\"\nloop = true\n", &["config/test.toml:5:8: camera.loop: only applies to kind = \"replay\""]),
            ("[[camera]]\nname = \"a\"\nkind = \"replay\"\npath = \"../tests/photos\"\nformats = [\"yuyv\"]\n", &["config/test.toml:5:11: camera.formats: only applies to kind = \"v4l2\""]),
            ("[[camera]]\nname = \"a b\"\nkind = \"replay\"\npath = \"../tests/photos\"\n", &["config/test.toml:2:8: camera.name: expected 1 to 64"]),
            ("[[camera]]\nname = \"a\"\nkind = \"replay\"\npath = \"../tests/photos\"\nsample_fps = 0\n", &["line 5", "expected a finite number greater than 0, got 0"]),
            ("[[camera]]\nname = \"a\"\nkind = \"replay\"\npath = \"../tests/photos\"\nsample_fps = 1e-300\n", &["config/test.toml:5:14: camera.sample_fps: expected 0.001 to 1000 frames per second, got 1e-300"]),
            ("[[camera]]\nname = \"a\"\nkind = \"replay\"\npath = \"../tests/photos\"\nfps = 5e9\n", &["config/test.toml:5:7: camera.fps: expected 0.001 to 1000 frames per second, got 5000000000.0"]),
            ("[pipeline]\nstats_interval = \"often\"\n", &["line 2", "expected a duration such as"]),
            ("[mqtt]\nport = 1883\n", &["line 1", "missing field `host`"]),
            ("[health]\nlisten = \"localhost\"\n", &["config/test.toml:2:10: health.listen: expected an address and port"]),
            ("[mqtt]\nhost = \"b\"\nprot = 1883\n", &["line 3", "unknown field `prot`"]),
            ("[mqtt]\nhost = \"b\"\nport = 70000\n", &["line 3", "70000"]),
            ("[mqtt]\nhost = \"b\"\ntopic_prefix = \"whaled/#\"\n", &["config/test.toml:3:16: mqtt.topic_prefix: expected a topic like"]),
            ("[mqtt]\nhost = \"b\"\npassword = \"x\"\npassword_env = \"Y\"\n", &["set only one of password, password_file and password_env"]),
            ("[mqtt]\nhost = \"b\"\npassword_env = \"WHALED_TEST_UNSET_VAR\"\n", &["config/test.toml:3:16: mqtt.password_env: environment variable WHALED_TEST_UNSET_VAR is not set"]),
            ("[mqtt]\nhost = \"b\"\npassword_file = \"no-such.pass\"\n", &["config/test.toml:3:17: mqtt.password_file: cannot read", "no-such.pass"]),
            ("[mqtt]\nhost = \"b\"\n[mqtt.tls]\nca = \"ca.pem\"\n", &["config/test.toml:4:6: mqtt.tls.ca: cannot read", "ca.pem: No such file"]),
            ("[mqtt]\nhost = \"b\"\n[mqtt.outbox]\nfsync_every = 0\n", &["line 4", "expected a whole number of at least 1, got 0"]),
            ("[pipeline]\nworkers = 0\n", &["line 2", "expected a whole number of at least 1, got 0"]),
            ("[inference.onnxruntime]\nexecution_providers = [\"cuda\", \"cpu\", \"cuda\"]\n", &["config/test.toml:2:23: inference.onnxruntime.execution_providers: lists \"cuda\" twice"]),
            ("[inference.onnxruntime.tensorrt]\ndevice_id = -1\n", &["line 2", "device_id = -1", "expected a GPU index of 0 or more"]),
            ("[inference.onnxruntime.cuda]\ndevice_id = 3000000000\n", &["line 2", "expected a GPU index of 0 or more", "got 3000000000"]),
            ("[inference.onnxruntime.tensorrt]\nfp16 = \"yes\"\n", &["line 2", "invalid value: string \"yes\", expected true, false or \"auto\""]),
            ("[inference.onnxruntime.tensorrt]\nfp16 = 1\n", &["line 2", "expected true, false or \"auto\""]),
            ("[inference.onnxruntime.tensorrt]\nfp61 = true\n", &["line 2", "unknown field `fp61`", "expected one of `device_id`, `fp16`, `int8`, `engine_cache`, `timing_cache`, `cache_dir`, `max_workspace_mb`"]),
            ("[inference.onnxruntime.tensorrt]\nmax_workspace_mb = 0\n", &["line 2", "expected a whole number of at least 1, got 0"]),
            ("[inference.onnxruntime.cuda]\nmemory_limit_mb = 0\n", &["line 2", "expected a whole number of at least 1, got 0"]),
            ("[inference.onnxruntime.cuda]\ngpu_mem_limit = 1024\n", &["line 2", "unknown field `gpu_mem_limit`", "expected one of `device_id`, `memory_limit_mb`, `arena_extend_strategy`"]),
            ("[inference.onnxruntime.cuda]\narena_extend_strategy = \"double\"\n", &["line 2", "unknown variant `double`, expected `next_power_of_two` or `same_as_requested`"]),
            ("[inference]\nbackend = \"onnxruntime\"\n[inference.onnxruntime]\nexecution_providers = [\"tensorrt\", \"cpu\"]\n[inference.onnxruntime.tensorrt]\ncache_dir = \"../Cargo.toml/trt\"\n",
             &["config/test.toml:6:13: inference.onnxruntime.tensorrt.cache_dir: ", "Cargo.toml is not a directory"]),
            ("[inference]\nbackend = \"onnxruntime\"\n[inference.onnxruntime]\nexecution_providers = [\"tensorrt\", \"cuda\"]\n[inference.onnxruntime.cuda]\ndevice_id = 1\n",
             &["inference.onnxruntime.tensorrt.device_id (0) and inference.onnxruntime.cuda.device_id (1) differ"]),
        ];
        for (src, wants) in cases {
            let e = parse(src).expect_err(src).to_string();
            for w in *wants {
                assert!(e.contains(w), "config {src:?}\n error: {e}\n lacks: {w}");
            }
        }
        // Limits that depend on the target's word size (CI runs this on armv7 as well as 64-bit).
        let too_many_mb = usize::MAX / (1 << 20) + 1;
        let src = format!("[inference.onnxruntime.tensorrt]\nmax_workspace_mb = {too_many_mb}\n");
        let e = parse(&src).expect_err(&src).to_string();
        let want = format!(
            "config/test.toml:2:20: inference.onnxruntime.tensorrt.max_workspace_mb: {too_many_mb} MB is more than this machine can address"
        );
        assert!(e.contains(&want), "error: {e}\n lacks: {want}");
        if usize::BITS < 64 {
            let src = format!("[pipeline]\nworkers = {}\n", u64::from(u32::MAX) + 1);
            let e = parse(&src).expect_err(&src).to_string();
            assert!(e.contains("4294967296 is more than this machine can count (at most 4294967295)"), "error: {e}");
        }
    }

    #[test]
    fn mqtt_block_defaults_and_secrets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret-value\n").unwrap();
        std::fs::write(dir.path().join("ca.pem"), super::mqtt::tests::TEST_CERT_PEM).unwrap();
        let src = "device_id = \"boat\"\n[mqtt]\nhost = \"shore\"\nusername = \"u\"\npassword_file = \"pw\"\n\
                   [mqtt.tls]\nca = \"ca.pem\"\n[mqtt.outbox]\ndir = \"ob\"\nmax_size_mb = 8\n";
        let c = Config::parse(&dir.path().join("w.toml"), src).unwrap();
        let m = c.mqtt.unwrap();
        assert_eq!(
            (m.host.as_str(), m.port, m.client_id.as_str(), m.topic_prefix.as_str()),
            ("shore", 8883, "whaled-boat", "whaled/boat")
        );
        assert_eq!(m.password.as_ref().map(|p| p.expose()), Some("s3cret-value"));
        assert!(!format!("{m:?}").contains("s3cret"), "Debug must not show the password");
        assert_eq!(m.outbox.dir, dir.path().join("ob"));
        assert_eq!(m.outbox.max_bytes, 8 << 20);
        assert_eq!((m.keep_alive, m.replay_rate), (std::time::Duration::from_secs(30), 50.0));
    }
}
