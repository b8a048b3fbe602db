//! `[inference.onnxruntime]`: the library, the execution providers in the order they are tried, and
//! the options of the TensorRT (`[inference.onnxruntime.tensorrt]`) and CUDA
//! (`[inference.onnxruntime.cuda]`) providers, validated once at load.
//!
//! What the TensorRT options become for one model (fp16 and int8 under `"auto"`, the engine cache
//! directory keyed by the model's SHA-256 and the onnxruntime and TensorRT versions) is decided by the
//! backend when it loads the model (`backend::onnxruntime`), because only it knows the model and the
//! libraries. docs/JETSON.md describes the options, the defaults and the cache layout.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::values::Count;
use crate::error::{Error, Result};
use crate::manifest::BackendKind;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrt {
    library: Option<Spanned<PathBuf>>,
    execution_providers: Option<Spanned<Vec<ProviderName>>>,
    tensorrt: Option<Spanned<RawTensorRt>>,
    cuda: Option<Spanned<RawCuda>>,
}

/// An execution provider's name in `execution_providers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProviderName {
    Tensorrt,
    Cuda,
    Cpu,
}

impl ProviderName {
    fn name(self) -> &'static str {
        match self {
            ProviderName::Tensorrt => "tensorrt",
            ProviderName::Cuda => "cuda",
            ProviderName::Cpu => "cpu",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensorRt {
    device_id: Option<GpuDevice>,
    fp16: Option<Switch>,
    int8: Option<Switch>,
    engine_cache: Option<bool>,
    timing_cache: Option<bool>,
    cache_dir: Option<Spanned<PathBuf>>,
    max_workspace_mb: Option<Spanned<Count>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCuda {
    device_id: Option<GpuDevice>,
    memory_limit_mb: Option<Spanned<Count>>,
    arena_extend_strategy: Option<ArenaExtendStrategy>,
}

/// A CUDA device ordinal (`device_id`): 0 or more, as onnxruntime takes it (an `i32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuDevice(i32);

impl GpuDevice {
    /// `None` for a negative ordinal.
    pub fn new(id: i32) -> Option<Self> {
        (id >= 0).then_some(GpuDevice(id))
    }

    pub fn get(self) -> i32 {
        self.0
    }
}

impl<'de> Deserialize<'de> for GpuDevice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        i32::try_from(v).ok().and_then(GpuDevice::new).ok_or_else(|| {
            de::Error::custom(format!("expected a GPU index of 0 or more (0 on a Jetson, which has one GPU), got {v}"))
        })
    }
}

/// A TensorRT precision switch: `true`, `false`, or `"auto"` (decided per model by the backend; see
/// docs/JETSON.md: fp16 on for the embedder only, int8 on for QDQ-quantised graphs only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    Auto,
    On,
    Off,
}

impl Switch {
    pub fn name(self) -> &'static str {
        match self {
            Switch::Auto => "auto",
            Switch::On => "on",
            Switch::Off => "off",
        }
    }
}

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct SwitchVisitor;
        impl Visitor<'_> for SwitchVisitor {
            type Value = Switch;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Switch, E> {
                Ok(if v { Switch::On } else { Switch::Off })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Switch, E> {
                match v {
                    "auto" => Ok(Switch::Auto),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(SwitchVisitor)
    }
}

/// How the CUDA provider's memory arena grows (onnxruntime's `arena_extend_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArenaExtendStrategy {
    /// onnxruntime's default: each extension doubles.
    #[default]
    NextPowerOfTwo,
    /// Grow by exactly what is asked: less memory held on a Jetson, whose GPU shares the board's RAM.
    SameAsRequested,
}

impl ArenaExtendStrategy {
    pub fn name(self) -> &'static str {
        match self {
            ArenaExtendStrategy::NextPowerOfTwo => "next_power_of_two",
            ArenaExtendStrategy::SameAsRequested => "same_as_requested",
        }
    }
}

/// `[inference.onnxruntime.tensorrt]`: the TensorRT provider's options.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRtConfig {
    pub device: GpuDevice,
    /// FP16 kernels. `Auto`: on for the embedder, off for the gates (pre-filter, zero-shot), whose
    /// thresholds were calibrated on fp32 scores.
    pub fp16: Switch,
    /// INT8 kernels. `Auto`: on for a graph quantised with QuantizeLinear/DequantizeLinear pairs (QDQ,
    /// e.g. the shipped Lite0's `int8` variant), whose scales TensorRT then uses; off otherwise (no
    /// calibration table is ever given).
    pub int8: Switch,
    /// Where engines (`engines/<model>/<key>/`) and the timing cache (`timing/<TensorRT version>/`)
    /// live. Absolute. Default: `<state dir>/tensorrt`.
    pub cache_dir: PathBuf,
    /// Keep built engines across starts (`trt_engine_cache_enable`).
    pub engine_cache: bool,
    /// Keep TensorRT's layer timings, shared by all models (`trt_timing_cache_enable`): a new or
    /// changed model builds faster.
    pub timing_cache: bool,
    /// `trt_max_workspace_size` in bytes; `None`: onnxruntime's default.
    pub max_workspace_bytes: Option<usize>,
}

impl Default for TensorRtConfig {
    fn default() -> Self {
        TensorRtConfig {
            device: GpuDevice::default(),
            fp16: Switch::Auto,
            int8: Switch::Auto,
            cache_dir: absolute(&super::default_state_dir().join("tensorrt")),
            engine_cache: true,
            timing_cache: true,
            max_workspace_bytes: None,
        }
    }
}

/// `[inference.onnxruntime.cuda]`: the CUDA provider's options.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CudaConfig {
    pub device: GpuDevice,
    /// Cap of the CUDA arena in bytes (`gpu_mem_limit`); `None`: onnxruntime's default (no cap).
    pub memory_limit_bytes: Option<usize>,
    pub arena_extend_strategy: ArenaExtendStrategy,
}

/// An onnxruntime execution provider with its options, tried in the configured order.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutionProvider {
    Tensorrt(TensorRtConfig),
    Cuda(CudaConfig),
    Cpu,
}

impl ExecutionProvider {
    /// The name used in the config and in log lines.
    pub fn name(&self) -> &'static str {
        match self {
            ExecutionProvider::Tensorrt(_) => "tensorrt",
            ExecutionProvider::Cuda(_) => "cuda",
            ExecutionProvider::Cpu => "cpu",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OrtConfig {
    /// `libonnxruntime.so` to load; `None`: `$ORT_DYLIB_PATH`, else the dynamic loader's search path.
    pub library: Option<PathBuf>,
    /// Tried in this order, each with its options; no provider appears twice.
    pub execution_providers: Vec<ExecutionProvider>,
    /// Sessions per model: one per inference worker (`[pipeline] workers`), so that workers run in
    /// parallel (an `ort` session runs one input at a time). Each holds its own copy of the weights.
    pub sessions: usize,
}

impl OrtConfig {
    /// One line for `whaled check-config`: the providers in order, with their options.
    pub fn summary(&self) -> String {
        let mb = |b: Option<usize>| b.map_or("default".to_string(), |b| format!("{} MB", b >> 20));
        let providers: Vec<String> = self
            .execution_providers
            .iter()
            .map(|p| match p {
                ExecutionProvider::Tensorrt(t) => format!(
                    "tensorrt (device {}, fp16 {}, int8 {}, engine cache {}, timing cache {}, in {}, workspace {})",
                    t.device.get(),
                    t.fp16.name(),
                    t.int8.name(),
                    on_off(t.engine_cache),
                    on_off(t.timing_cache),
                    t.cache_dir.display(),
                    mb(t.max_workspace_bytes),
                ),
                ExecutionProvider::Cuda(c) => format!(
                    "cuda (device {}, memory limit {}, arena {})",
                    c.device.get(),
                    c.memory_limit_bytes.map_or("none".to_string(), |b| format!("{} MB", b >> 20)),
                    c.arena_extend_strategy.name()
                ),
                ExecutionProvider::Cpu => "cpu".to_string(),
            })
            .collect();
        format!("onnxruntime execution providers, in order: {}", providers.join(", "))
    }

    pub fn tensorrt(&self) -> Option<&TensorRtConfig> {
        self.execution_providers.iter().find_map(|p| match p {
            ExecutionProvider::Tensorrt(t) => Some(t),
            _ => None,
        })
    }

    pub fn cuda(&self) -> Option<&CudaConfig> {
        self.execution_providers.iter().find_map(|p| match p {
            ExecutionProvider::Cuda(c) => Some(c),
            _ => None,
        })
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Megabytes to bytes, or an error naming the key when it does not fit this machine's `usize`.
fn megabytes(
    v: &Spanned<Count>,
    key: &str,
    at: &dyn Fn(std::ops::Range<usize>, &str, String) -> Error,
) -> Result<usize> {
    let mb = v.get_ref().get();
    mb.checked_mul(1 << 20).ok_or_else(|| at(v.span(), key, format!("{mb} MB is more than this machine can address")))
}

/// `p` made absolute against the working directory (no file system access; `p` as it is if that fails).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Whether this process may create `dir` (or, if it exists, files in it): the nearest existing
/// ancestor must be a directory we can write to and search. `Err` says why not, naming the path.
pub fn check_writable_dir(dir: &Path) -> std::result::Result<(), String> {
    let Some(existing) = dir.ancestors().find(|a| a.symlink_metadata().is_ok()) else {
        return Err(format!("no part of {} exists", dir.display()));
    };
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    if !access_write(existing) {
        let uid = {
            // SAFETY: getuid(2) cannot fail and touches no memory of ours.
            unsafe { libc::getuid() }
        };
        return Err(format!(
            "{} is not writable by this user (uid {uid}){}",
            existing.display(),
            if existing == dir { String::new() } else { format!(", so {} cannot be created", dir.display()) }
        ));
    }
    Ok(())
}

/// access(2) with W_OK | X_OK: the kernel's own answer, including read-only mounts (EROFS), which
/// mode bits alone do not show.
pub(super) fn access_write(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

impl RawOrt {
    /// Validates; `at(span, key, message)` builds an error that names file, line and key. Returns the
    /// config and the warnings about options that have no effect (the caller logs them).
    pub(super) fn validate(
        self,
        dir: &Path,
        backend: BackendKind,
        sessions: usize,
        at: &dyn Fn(std::ops::Range<usize>, &str, String) -> Error,
    ) -> Result<(OrtConfig, Vec<String>)> {
        const KEY: &str = "inference.onnxruntime";
        let library = match self.library {
            None => None,
            Some(l) if l.get_ref().is_file() => Some(l.into_inner()),
            Some(l) => {
                return Err(at(l.span(), "inference.onnxruntime.library", format!(
                    "no such file {} (the onnxruntime shared library, e.g. .../onnxruntime/capi/libonnxruntime.so.1.32.0)",
                    l.get_ref().display())))
            }
        };
        let list_span = self.execution_providers.as_ref().map(Spanned::span);
        let names = match self.execution_providers {
            None => vec![ProviderName::Cpu],
            Some(list) => {
                let key = "inference.onnxruntime.execution_providers";
                let names = list.get_ref();
                if names.is_empty() {
                    return Err(at(list.span(), key, "is empty; list at least \"cpu\"".into()));
                }
                if let Some(n) = names.iter().enumerate().find_map(|(i, n)| names[..i].contains(n).then_some(n)) {
                    return Err(at(list.span(), key, format!("lists \"{}\" twice", n.name())));
                }
                list.into_inner()
            }
        };

        let mut warnings = Vec::new();
        let gpu_tables_ignored = |table: &str| {
            format!("{KEY}.{table} is set but inference.backend = \"{}\": its options are ignored", backend.name())
        };
        let not_listed = |table: &str| {
            format!("{KEY}.{table} is set but \"{table}\" is not in {KEY}.execution_providers: its options are ignored")
        };
        for (name, given) in
            [(ProviderName::Tensorrt, self.tensorrt.is_some()), (ProviderName::Cuda, self.cuda.is_some())]
        {
            if !given {
                continue;
            }
            let table = name.name();
            if backend != BackendKind::Onnxruntime {
                warnings.push(gpu_tables_ignored(table));
            } else if !names.contains(&name) {
                warnings.push(not_listed(table));
            }
        }

        let uses_tensorrt = backend == BackendKind::Onnxruntime && names.contains(&ProviderName::Tensorrt);
        let tensorrt_span = self.tensorrt.as_ref().map(Spanned::span);
        let tensorrt = match self.tensorrt {
            None => TensorRtConfig::default(),
            Some(t) => {
                let t = t.into_inner();
                let d = TensorRtConfig::default();
                let trt = TensorRtConfig {
                    device: t.device_id.unwrap_or(d.device),
                    fp16: t.fp16.unwrap_or(d.fp16),
                    int8: t.int8.unwrap_or(d.int8),
                    cache_dir: t.cache_dir.as_ref().map_or(d.cache_dir, |c| absolute(&dir.join(c.get_ref()))),
                    engine_cache: t.engine_cache.unwrap_or(d.engine_cache),
                    timing_cache: t.timing_cache.unwrap_or(d.timing_cache),
                    max_workspace_bytes: match &t.max_workspace_mb {
                        None => None,
                        Some(w) => Some(megabytes(w, "inference.onnxruntime.tensorrt.max_workspace_mb", at)?),
                    },
                };
                if let Some(c) =
                    t.cache_dir.as_ref().filter(|_| uses_tensorrt && (trt.engine_cache || trt.timing_cache))
                {
                    check_writable_dir(&trt.cache_dir)
                        .map_err(|e| at(c.span(), "inference.onnxruntime.tensorrt.cache_dir", e))?;
                }
                if t.cache_dir.is_some() && !trt.engine_cache && !trt.timing_cache {
                    warnings.push(format!(
                        "{KEY}.tensorrt.cache_dir is set but engine_cache and timing_cache are both false: nothing is cached"
                    ));
                }
                trt
            }
        };
        if uses_tensorrt && (tensorrt.engine_cache || tensorrt.timing_cache) {
            // An explicit cache_dir was checked above with its line; this catches the default (TensorRT is
            // listed, so the list's line is where it is asked for).
            check_writable_dir(&tensorrt.cache_dir).map_err(|e| {
                at(
                    list_span.clone().unwrap_or_default(),
                    "inference.onnxruntime.tensorrt.cache_dir",
                    format!(
                        "the default, <state dir>/tensorrt = {}: {e}; set cache_dir to a writable directory, or \
                         engine_cache = false and timing_cache = false",
                        tensorrt.cache_dir.display()
                    ),
                )
            })?;
        }

        let cuda_span = self.cuda.as_ref().map(Spanned::span);
        let cuda = match self.cuda {
            None => CudaConfig::default(),
            Some(c) => {
                let c = c.into_inner();
                CudaConfig {
                    device: c.device_id.unwrap_or_default(),
                    memory_limit_bytes: match &c.memory_limit_mb {
                        None => None,
                        Some(m) => Some(megabytes(m, "inference.onnxruntime.cuda.memory_limit_mb", at)?),
                    },
                    arena_extend_strategy: c.arena_extend_strategy.unwrap_or_default(),
                }
            }
        };
        let both = names.contains(&ProviderName::Tensorrt) && names.contains(&ProviderName::Cuda);
        if backend == BackendKind::Onnxruntime && both && tensorrt.device != cuda.device {
            return Err(at(
                cuda_span.or(tensorrt_span).unwrap_or_default(),
                "inference.onnxruntime",
                format!(
                    "{KEY}.tensorrt.device_id ({}) and {KEY}.cuda.device_id ({}) differ: TensorRT hands the nodes \
                     it cannot run to CUDA, which must be on the same GPU",
                    tensorrt.device.get(),
                    cuda.device.get()
                ),
            ));
        }

        let execution_providers = names
            .iter()
            .map(|n| match n {
                ProviderName::Tensorrt => ExecutionProvider::Tensorrt(tensorrt.clone()),
                ProviderName::Cuda => ExecutionProvider::Cuda(cuda.clone()),
                ProviderName::Cpu => ExecutionProvider::Cpu,
            })
            .collect();
        Ok((OrtConfig { library, execution_providers, sessions }, warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[inference.onnxruntime]` text -> the validated config and its warnings.
    fn validate(src: &str, backend: BackendKind) -> Result<(OrtConfig, Vec<String>)> {
        let raw: RawOrt = toml::from_str(src).map_err(|e| Error::Config(e.to_string()))?;
        let at = |_: std::ops::Range<usize>, key: &str, msg: String| Error::Config(format!("{key}: {msg}"));
        raw.validate(Path::new("/etc/whaled"), backend, 2, &at)
    }

    #[test]
    fn provider_tables_parse_into_their_providers() {
        let tmp = tempfile::tempdir().unwrap();
        let src = format!(
            "execution_providers = [\"tensorrt\", \"cuda\", \"cpu\"]\n\
             [tensorrt]\ndevice_id = 0\nfp16 = true\nint8 = \"auto\"\nengine_cache = true\ntiming_cache = false\n\
             cache_dir = \"{}\"\nmax_workspace_mb = 2048\n\
             [cuda]\nmemory_limit_mb = 1536\narena_extend_strategy = \"same_as_requested\"\n",
            tmp.path().join("trt").display()
        );
        let (c, warnings) = validate(&src, BackendKind::Onnxruntime).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c.sessions, 2);
        let names: Vec<_> = c.execution_providers.iter().map(ExecutionProvider::name).collect();
        assert_eq!(names, ["tensorrt", "cuda", "cpu"]);
        let t = c.tensorrt().unwrap();
        assert_eq!((t.device.get(), t.fp16, t.int8), (0, Switch::On, Switch::Auto));
        assert_eq!((t.engine_cache, t.timing_cache), (true, false));
        assert_eq!(t.cache_dir, tmp.path().join("trt"));
        assert_eq!(t.max_workspace_bytes, Some(2048 << 20));
        let cuda = c.cuda().unwrap();
        assert_eq!(cuda.memory_limit_bytes, Some(1536 << 20));
        assert_eq!(cuda.arena_extend_strategy, ArenaExtendStrategy::SameAsRequested);
        assert!(c.summary().contains("tensorrt (device 0, fp16 on, int8 auto, engine cache on, timing cache off"));
        assert!(c.summary().contains("cuda (device 0, memory limit 1536 MB, arena same_as_requested), cpu"));
    }

    #[test]
    fn defaults_cache_in_the_state_directory_with_auto_precision() {
        let (c, _) = validate("execution_providers = [\"tensorrt\", \"cpu\"]\n", BackendKind::Tract).unwrap();
        let t = c.tensorrt().unwrap();
        assert_eq!(*t, TensorRtConfig::default());
        assert_eq!((t.fp16, t.int8, t.engine_cache, t.timing_cache), (Switch::Auto, Switch::Auto, true, true));
        assert_eq!(t.cache_dir, absolute(&crate::config::default_state_dir().join("tensorrt")));
        assert!(t.cache_dir.is_absolute());
        // Relative cache_dir: against the config file's directory.
        let (c, _) = validate(
            "execution_providers = [\"tensorrt\"]\n[tensorrt]\ncache_dir = \"cache/trt\"\n",
            BackendKind::Tract,
        )
        .unwrap();
        assert_eq!(c.tensorrt().unwrap().cache_dir, Path::new("/etc/whaled/cache/trt"));
        // No list: CPU only, and no TensorRT options anywhere.
        let (c, _) = validate("[tensorrt]\ncache_dir = \"cache/trt\"\n", BackendKind::Tract).unwrap();
        assert_eq!(c.execution_providers, vec![ExecutionProvider::Cpu]);
        assert!(c.tensorrt().is_none());
    }

    /// Options that cannot take effect are accepted with a warning (the caller logs it), so that one
    /// file can be switched between backends by one line.
    #[test]
    fn options_that_take_no_effect_are_warned_about() {
        let (_, w) = validate("[tensorrt]\nfp16 = true\n[cuda]\ndevice_id = 0\n", BackendKind::Tract).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("inference.onnxruntime.tensorrt is set but inference.backend = \"tract\""), "{w:?}");
        assert!(w[1].contains("inference.onnxruntime.cuda is set"), "{w:?}");
        let (_, w) =
            validate("execution_providers = [\"cuda\", \"cpu\"]\n[tensorrt]\nfp16 = true\n", BackendKind::Onnxruntime)
                .unwrap();
        assert_eq!(w, ["inference.onnxruntime.tensorrt is set but \"tensorrt\" is not in inference.onnxruntime.execution_providers: its options are ignored"]);
        let (_, w) = validate("execution_providers = [\"cpu\"]\n", BackendKind::Onnxruntime).unwrap();
        assert!(w.is_empty());
        let (_, w) = validate(
            "execution_providers = [\"tensorrt\"]\n[tensorrt]\ncache_dir = \"/tmp\"\nengine_cache = false\ntiming_cache = false\n",
            BackendKind::Onnxruntime,
        )
        .unwrap();
        assert!(w[0].contains("nothing is cached"), "{w:?}");
    }

    #[test]
    fn cache_dir_must_be_creatable() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        let bad = format!(
            "execution_providers = [\"tensorrt\"]\n[tensorrt]\ncache_dir = \"{}\"\n",
            tmp.path().join("file/trt").display()
        );
        let e = validate(&bad, BackendKind::Onnxruntime).unwrap_err().to_string();
        assert!(
            e.contains("inference.onnxruntime.tensorrt.cache_dir: ") && e.contains("file is not a directory"),
            "{e}"
        );
        // Not checked when TensorRT is not used, or caches nothing.
        assert!(validate(&bad, BackendKind::Tract).is_ok());
        assert!(
            validate(&format!("{bad}engine_cache = false\ntiming_cache = false\n"), BackendKind::Onnxruntime).is_ok()
        );
        // A directory that does not exist yet is fine when its parent is writable.
        let deep = format!(
            "execution_providers = [\"tensorrt\"]\n[tensorrt]\ncache_dir = \"{}\"\n",
            tmp.path().join("a/b/c").display()
        );
        assert!(validate(&deep, BackendKind::Onnxruntime).is_ok());
        assert!(check_writable_dir(&tmp.path().join("x/y")).is_ok());
        assert!(check_writable_dir(&tmp.path().join("file")).is_err());
    }

    #[test]
    fn gpus_must_agree() {
        let e = validate(
            "execution_providers = [\"tensorrt\", \"cuda\"]\n[tensorrt]\ndevice_id = 1\n",
            BackendKind::Onnxruntime,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "inference.onnxruntime.tensorrt.device_id (1) and inference.onnxruntime.cuda.device_id (0) differ"
            ),
            "{e}"
        );
        let ok = "execution_providers = [\"tensorrt\", \"cuda\"]\n[tensorrt]\ndevice_id = 1\n[cuda]\ndevice_id = 1\n";
        let (c, _) = validate(ok, BackendKind::Onnxruntime).unwrap();
        assert_eq!((c.tensorrt().unwrap().device.get(), c.cuda().unwrap().device.get()), (1, 1));
    }
}
