//! What the TensorRT and CUDA execution providers are given for one model: the config's options
//! resolved against the model (its role, whether its graph is QDQ-quantised, its SHA-256) and the
//! libraries' versions, written as onnxruntime's own option keys (`trt_fp16_enable`, `gpu_mem_limit`,
//! ...). Everything here is pure except the two version probes at the bottom, so the plumbing is
//! unit-tested without a GPU; `imp` turns a [`TrtPlan`] into `ort`'s builder and the tests check that
//! the builder holds exactly [`TrtPlan::options`].
//!
//! Engine cache layout (docs/JETSON.md), under `[inference.onnxruntime.tensorrt] cache_dir`:
//!
//! ```text
//! engines/<model name>/<sha256:16>-ort<version>-trt<version>-<precision>/   engines + profiles
//! timing/trt<version>/                                                      the timing cache, all models
//! ```
//!
//! onnxruntime names its engine files by a hash of the graph's input and node names, its own version
//! and the TensorRT version it was *compiled* against, not by the weights: a retrained model with the
//! same topology would silently reuse the old engine, and a TensorRT upgrade under the same onnxruntime
//! build would fail to deserialise it. The key directory makes both start afresh.

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};

use crate::config::{ArenaExtendStrategy, CudaConfig, Switch, TensorRtConfig};
use crate::manifest::Role;

/// What a model is for, as far as precision goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// The pre-filter or the zero-shot gate: a score compared with a threshold calibrated in fp32.
    Gate,
    /// The identification embedder: cosines ranked, robust to fp16.
    Embedder,
}

impl Stage {
    pub(super) fn of(role: &Role) -> Stage {
        match role {
            Role::Embedder(_) => Stage::Embedder,
            Role::Prefilter(_) | Role::ZeroShot(_) => Stage::Gate,
        }
    }
}

/// The facts about one model that the TensorRT options depend on.
#[derive(Debug, Clone)]
pub(super) struct ModelFacts {
    pub name: String,
    pub stage: Stage,
    /// SHA-256 of the ONNX file, lowercase hex.
    pub sha256: String,
    /// The graph holds QuantizeLinear and DequantizeLinear nodes (see [`is_qdq`]).
    pub qdq: bool,
}

/// A TensorRT library version (from `getInferLibVersion()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TrtVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl TrtVersion {
    /// Decodes `NV_TENSORRT_VERSION`: `major * 1000 + minor * 100 + patch` up to TensorRT 8,
    /// `major * 10000 + minor * 100 + patch` from TensorRT 9 on (8.6.1 = 8601, 10.3.0 = 100300).
    pub(super) fn from_code(code: i32) -> Option<TrtVersion> {
        let c = u32::try_from(code).ok().filter(|&c| c > 0)?;
        Some(if c >= 10_000 {
            TrtVersion { major: c / 10_000, minor: c / 100 % 100, patch: c % 100 }
        } else {
            TrtVersion { major: c / 1000, minor: c / 100 % 10, patch: c % 100 }
        })
    }
}

impl std::fmt::Display for TrtVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The library versions that invalidate a cached engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Versions {
    /// onnxruntime's `GetVersionString()`, e.g. "1.20.0"; `None`: could not be read.
    pub onnxruntime: Option<String>,
    /// The TensorRT library onnxruntime's provider uses; `None`: could not be found.
    pub tensorrt: Option<TrtVersion>,
}

/// The TensorRT provider's options for one model, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TrtPlan {
    pub device_id: i32,
    pub fp16: bool,
    pub int8: bool,
    /// `trt_engine_cache_path`: this model's key directory; `None`: no engine cache.
    pub engine_cache: Option<PathBuf>,
    /// `trt_timing_cache_path`; `None`: no timing cache.
    pub timing_cache: Option<PathBuf>,
    /// `trt_max_workspace_size`, bytes; `None`: onnxruntime's default.
    pub max_workspace: Option<usize>,
}

impl TrtPlan {
    /// The config's options for this model: `"auto"` fp16 is on for the embedder only, `"auto"` int8 on
    /// for QDQ graphs only; the caches go to their keyed directories under `cache_dir`.
    pub(super) fn resolve(cfg: &TensorRtConfig, model: &ModelFacts, versions: &Versions) -> TrtPlan {
        let fp16 = match cfg.fp16 {
            Switch::On => true,
            Switch::Off => false,
            Switch::Auto => model.stage == Stage::Embedder,
        };
        let int8 = match cfg.int8 {
            Switch::On => true,
            Switch::Off => false,
            Switch::Auto => model.qdq,
        };
        let trt = versions.tensorrt.map_or("unknown".to_string(), |v| v.to_string());
        let engine_cache = cfg.engine_cache.then(|| {
            let key = format!(
                "{}-ort{}-trt{trt}-{}",
                model.sha256.get(..16).unwrap_or(&model.sha256),
                versions.onnxruntime.as_deref().map_or("unknown".to_string(), path_safe),
                precision(fp16, int8)
            );
            cfg.cache_dir.join("engines").join(path_safe(&model.name)).join(key)
        });
        let timing_cache = cfg.timing_cache.then(|| cfg.cache_dir.join("timing").join(format!("trt{trt}")));
        TrtPlan {
            device_id: cfg.device.get(),
            fp16,
            int8,
            engine_cache,
            timing_cache,
            max_workspace: cfg.max_workspace_bytes,
        }
    }

    /// What onnxruntime is given, under its own key names (`OrtTensorRTProviderOptionsV2`), in the order
    /// `imp::tensorrt_provider` sets them. Every switch is explicit, so nothing depends on the library's
    /// defaults. Switches are `true`/`false`, as `ort`'s setters write them (onnxruntime's option parser
    /// takes `true`/`false`/`True`/`False`/`1`/`0`).
    pub(super) fn options(&self) -> Vec<(&'static str, String)> {
        let flag = |b: bool| b.to_string();
        let mut o = vec![
            ("device_id", self.device_id.to_string()),
            ("trt_fp16_enable", flag(self.fp16)),
            ("trt_int8_enable", flag(self.int8)),
            ("trt_engine_cache_enable", flag(self.engine_cache.is_some())),
        ];
        if let Some(p) = &self.engine_cache {
            o.push(("trt_engine_cache_path", p.to_string_lossy().into_owned()));
        }
        o.push(("trt_timing_cache_enable", flag(self.timing_cache.is_some())));
        if let Some(p) = &self.timing_cache {
            o.push(("trt_timing_cache_path", p.to_string_lossy().into_owned()));
        }
        if let Some(w) = self.max_workspace {
            o.push(("trt_max_workspace_size", w.to_string()));
        }
        o
    }

    pub(super) fn precision(&self) -> &'static str {
        precision(self.fp16, self.int8)
    }
}

fn precision(fp16: bool, int8: bool) -> &'static str {
    match (fp16, int8) {
        (false, false) => "fp32",
        (true, false) => "fp16",
        (false, true) => "int8",
        (true, true) => "fp16int8",
    }
}

/// What the CUDA provider is given, under onnxruntime's key names (`OrtCUDAProviderOptionsV2`).
pub(super) fn cuda_options(cfg: &CudaConfig) -> Vec<(&'static str, String)> {
    let mut o = vec![("device_id", cfg.device.get().to_string())];
    if let Some(limit) = cfg.memory_limit_bytes {
        o.push(("gpu_mem_limit", limit.to_string()));
    }
    let strategy = match cfg.arena_extend_strategy {
        ArenaExtendStrategy::NextPowerOfTwo => "kNextPowerOfTwo",
        ArenaExtendStrategy::SameAsRequested => "kSameAsRequested",
    };
    o.push(("arena_extend_strategy", strategy.to_string()));
    o
}

/// Whether an ONNX file is QDQ-quantised: it holds nodes whose `op_type` (NodeProto field 4, a
/// length-delimited string: tag 0x22, then the length) is `QuantizeLinear` and others `DequantizeLinear`,
/// as static quantisation (onnxruntime's `quantize_static`) writes them. Scans the encoded bytes; no
/// parsing.
pub(super) fn is_qdq(onnx: &[u8]) -> bool {
    const Q: &[u8] = b"\x22\x0eQuantizeLinear";
    const DQ: &[u8] = b"\x22\x10DequantizeLinear";
    let (mut q, mut dq) = (false, false);
    for (i, _) in onnx.iter().enumerate().filter(|(_, &b)| b == 0x22) {
        q |= onnx[i..].starts_with(Q);
        dq |= onnx[i..].starts_with(DQ);
        if q && dq {
            return true;
        }
    }
    false
}

/// A name safe as one path component: ASCII letters, digits, `-`, `_` and `.` kept, anything else `_`;
/// at most 64 characters; never empty, `.` or `..`.
pub(super) fn path_safe(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .take(64)
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "_".to_string()
    } else {
        s
    }
}

/// Whether `dir` holds a built engine (`*.engine`) already.
pub(super) fn has_engine(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "engine")))
        .unwrap_or(false)
}

/// The sonames TensorRT's runtime library has had, newest first.
const NVINFER: &[&str] =
    &["libnvinfer.so.10", "libnvinfer.so.9", "libnvinfer.so.8", "libnvinfer.so.7", "libnvinfer.so"];

/// The version of the TensorRT library in this process (`getInferLibVersion()` of the first
/// `libnvinfer` already loaded, which is the one onnxruntime's TensorRT provider linked), else of the
/// newest one the dynamic loader finds. Call it after the TensorRT provider was registered once, so
/// that its library is loaded.
pub(super) fn tensorrt_version() -> Option<TrtVersion> {
    let code = [true, false].into_iter().find_map(|loaded_only| {
        NVINFER.iter().find_map(|lib| {
            let f = symbol(lib, c"getInferLibVersion", loaded_only)?;
            // SAFETY: TensorRT declares `extern "C" int32_t getInferLibVersion() noexcept`, which takes
            // nothing and only returns a constant; the library stays loaded (never dlclose'd).
            let f: unsafe extern "C" fn() -> i32 = unsafe { std::mem::transmute::<*mut c_void, _>(f) };
            Some(unsafe { f() })
        })
    })?;
    TrtVersion::from_code(code)
}

/// onnxruntime's own version string (`OrtGetApiBase()->GetVersionString()`) of the library loaded from
/// `library` (already loaded: looked up without loading anything), else the version in its file name
/// (`libonnxruntime.so.1.20.0`).
pub(super) fn onnxruntime_version(library: &Path) -> Option<String> {
    let from_api = symbol(&library.to_string_lossy(), c"OrtGetApiBase", true).and_then(|f| {
        // SAFETY: `OrtGetApiBase` is `const OrtApiBase* ORT_API_CALL OrtGetApiBase(void)`, and the base's
        // `GetVersionString` returns a static NUL-terminated string; both stay valid while the library
        // is loaded, which it is until the process exits (ort never unloads it).
        unsafe {
            let get: unsafe extern "C" fn() -> *const ort::sys::OrtApiBase = std::mem::transmute::<*mut c_void, _>(f);
            let base = get();
            if base.is_null() {
                return None;
            }
            let s = ((*base).GetVersionString)();
            (!s.is_null()).then(|| CStr::from_ptr(s).to_string_lossy().into_owned())
        }
    });
    from_api.or_else(|| version_in_file_name(library))
}

/// `1.20.0` from `.../libonnxruntime.so.1.20.0`.
pub(super) fn version_in_file_name(library: &Path) -> Option<String> {
    let name = library.file_name()?.to_string_lossy().into_owned();
    let v = name.split_once(".so.")?.1;
    (!v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.')).then(|| v.to_string())
}

/// `symbol` in the shared library `lib` (a path or a soname): only if it is loaded already when
/// `loaded_only`, else loading it. The handle is never closed.
fn symbol(lib: &str, symbol: &CStr, loaded_only: bool) -> Option<*mut c_void> {
    let name = CString::new(lib).ok()?;
    let flags = libc::RTLD_LAZY | libc::RTLD_LOCAL | if loaded_only { libc::RTLD_NOLOAD } else { 0 };
    // SAFETY: both strings are valid and NUL-terminated for the calls; dlopen/dlsym do not keep them.
    // A handle that is not null is a loaded library, left loaded.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), flags);
        if handle.is_null() {
            return None;
        }
        let f = libc::dlsym(handle, symbol.as_ptr());
        (!f.is_null()).then_some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GpuDevice;

    fn facts(stage: Stage, qdq: bool) -> ModelFacts {
        ModelFacts { name: "effb4-arcface v1".into(), stage, sha256: "ab".repeat(32), qdq }
    }

    fn cfg(dir: &Path) -> TensorRtConfig {
        TensorRtConfig { cache_dir: dir.to_path_buf(), ..TensorRtConfig::default() }
    }

    const V: fn() -> Versions = || Versions {
        onnxruntime: Some("1.20.0".into()),
        tensorrt: Some(TrtVersion { major: 10, minor: 3, patch: 0 }),
    };

    #[test]
    fn auto_precision_follows_the_stage_and_the_graph() {
        let c = cfg(Path::new("/var/lib/whaled/tensorrt"));
        let p = |stage, qdq| {
            let p = TrtPlan::resolve(&c, &facts(stage, qdq), &V());
            (p.fp16, p.int8)
        };
        assert_eq!(p(Stage::Embedder, false), (true, false), "embedder: fp16");
        assert_eq!(p(Stage::Gate, false), (false, false), "fp32 gate: as calibrated");
        assert_eq!(p(Stage::Gate, true), (false, true), "QDQ gate: its int8 scales");
        assert_eq!(p(Stage::Embedder, true), (true, true));
        let forced = TensorRtConfig { fp16: Switch::On, int8: Switch::Off, ..c.clone() };
        let p = TrtPlan::resolve(&forced, &facts(Stage::Gate, true), &V());
        assert_eq!((p.fp16, p.int8), (true, false));
        let off = TensorRtConfig { fp16: Switch::Off, ..c };
        assert!(!TrtPlan::resolve(&off, &facts(Stage::Embedder, false), &V()).fp16);
    }

    #[test]
    fn cache_directories_are_keyed_by_model_digest_versions_and_precision() {
        let c = cfg(Path::new("/state/tensorrt"));
        let p = TrtPlan::resolve(&c, &facts(Stage::Embedder, false), &V());
        let want = format!("/state/tensorrt/engines/effb4-arcface_v1/{}-ort1.20.0-trt10.3.0-fp16", "ab".repeat(8));
        assert_eq!(p.engine_cache.as_deref(), Some(Path::new(&want)));
        assert_eq!(p.timing_cache.as_deref(), Some(Path::new("/state/tensorrt/timing/trt10.3.0")));

        // Each input of the key changes the directory: a new model file, a new onnxruntime, a new
        // TensorRT, another precision. The timing cache follows TensorRT only.
        let dir = |f: &ModelFacts, v: &Versions| TrtPlan::resolve(&c, f, v).engine_cache.unwrap();
        let base = dir(&facts(Stage::Embedder, false), &V());
        let retrained = ModelFacts { sha256: format!("cd{}", &"ab".repeat(32)[2..]), ..facts(Stage::Embedder, false) };
        assert_ne!(dir(&retrained, &V()), base);
        let ort = Versions { onnxruntime: Some("1.21.0".into()), ..V() };
        assert_ne!(dir(&facts(Stage::Embedder, false), &ort), base);
        let trt = Versions { tensorrt: Some(TrtVersion { major: 10, minor: 3, patch: 1 }), ..V() };
        assert_ne!(dir(&facts(Stage::Embedder, false), &trt), base);
        assert_ne!(TrtPlan::resolve(&c, &facts(Stage::Embedder, false), &trt).timing_cache, p.timing_cache);
        assert_ne!(dir(&facts(Stage::Embedder, true), &V()), base);
        // Unknown versions still give a stable key, marked as such.
        let unknown = Versions { onnxruntime: None, tensorrt: None };
        let u = TrtPlan::resolve(&c, &facts(Stage::Gate, false), &unknown);
        assert!(u.engine_cache.unwrap().ends_with(format!("{}-ortunknown-trtunknown-fp32", "ab".repeat(8))));
        assert_eq!(u.timing_cache.as_deref(), Some(Path::new("/state/tensorrt/timing/trtunknown")));
    }

    #[test]
    fn options_use_onnxruntimes_key_names() {
        let c = TensorRtConfig {
            device: GpuDevice::new(1).unwrap(),
            max_workspace_bytes: Some(2 << 30),
            ..cfg(Path::new("/c"))
        };
        let p = TrtPlan::resolve(&c, &facts(Stage::Embedder, false), &V());
        let o = p.options();
        let get = |k: &str| o.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("device_id"), Some("1"));
        assert_eq!(get("trt_fp16_enable"), Some("true"));
        assert_eq!(get("trt_int8_enable"), Some("false"));
        assert_eq!(get("trt_engine_cache_enable"), Some("true"));
        assert_eq!(get("trt_engine_cache_path"), p.engine_cache.as_deref().and_then(Path::to_str));
        assert_eq!(get("trt_timing_cache_enable"), Some("true"));
        assert_eq!(get("trt_timing_cache_path"), Some("/c/timing/trt10.3.0"));
        assert_eq!(get("trt_max_workspace_size"), Some("2147483648"));
        assert_eq!(o.len(), 8);

        // Caches off: the switches say so and no path is given.
        let off = TensorRtConfig { engine_cache: false, timing_cache: false, ..cfg(Path::new("/c")) };
        let o = TrtPlan::resolve(&off, &facts(Stage::Gate, false), &V()).options();
        assert_eq!(
            o,
            vec![
                ("device_id", "0".to_string()),
                ("trt_fp16_enable", "false".into()),
                ("trt_int8_enable", "false".into()),
                ("trt_engine_cache_enable", "false".into()),
                ("trt_timing_cache_enable", "false".into()),
            ]
        );
    }

    #[test]
    fn cuda_options_use_onnxruntimes_key_names() {
        assert_eq!(
            cuda_options(&CudaConfig::default()),
            vec![("device_id", "0".to_string()), ("arena_extend_strategy", "kNextPowerOfTwo".into())]
        );
        let c = CudaConfig {
            device: GpuDevice::new(2).unwrap(),
            memory_limit_bytes: Some(1536 << 20),
            arena_extend_strategy: ArenaExtendStrategy::SameAsRequested,
        };
        assert_eq!(
            cuda_options(&c),
            vec![
                ("device_id", "2".to_string()),
                ("gpu_mem_limit", "1610612736".into()),
                ("arena_extend_strategy", "kSameAsRequested".into())
            ]
        );
    }

    #[test]
    fn qdq_graphs_are_recognised_from_their_bytes() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let read = |p: &str| std::fs::read(models.join(p)).unwrap();
        assert!(is_qdq(&read("efficientnet-lite0/efficientnet_lite0_int8.onnx")), "the shipped static-QDQ int8");
        assert!(!is_qdq(&read("efficientnet-lite0/efficientnet_lite0_fp32.onnx")));
        assert!(!is_qdq(&read("marine-gate-lite0/marine_gate_lite0_fp32.onnx")));
        // Both kinds of node are needed, wherever they sit; a name alone is not a node's op_type.
        assert!(is_qdq(b"..\x22\x10DequantizeLinear..\x22\x0eQuantizeLinear"));
        assert!(!is_qdq(b"\x22\x10DequantizeLinear only"));
        assert!(!is_qdq(b"QuantizeLinear DequantizeLinear as names"));
        assert!(!is_qdq(b""));
    }

    #[test]
    fn tensorrt_version_codes() {
        let v = |c| TrtVersion::from_code(c).map(|v| v.to_string());
        assert_eq!(v(8502).as_deref(), Some("8.5.2"), "JetPack 5");
        assert_eq!(v(8602).as_deref(), Some("8.6.2"), "JetPack 6.0");
        assert_eq!(v(100300).as_deref(), Some("10.3.0"), "JetPack 6.1/6.2");
        assert_eq!(v(90200).as_deref(), Some("9.2.0"));
        assert_eq!(v(7103).as_deref(), Some("7.1.3"));
        assert_eq!(v(0), None);
        assert_eq!(v(-1), None);
    }

    #[test]
    fn symbols_are_found_in_loaded_libraries_only_when_asked() {
        // libc is loaded in every process; a library nobody has is not, and is not invented.
        assert!(symbol("libc.so.6", c"getpid", true).is_some());
        assert!(symbol("libc.so.6", c"no_such_symbol_in_libc", true).is_none());
        assert!(symbol("libwhaled-no-such-library.so.1", c"x", false).is_none());
    }

    #[test]
    fn names_become_safe_path_components() {
        assert_eq!(path_safe("effb4-arcface-v1"), "effb4-arcface-v1");
        assert_eq!(path_safe("../../etc"), ".._.._etc");
        assert_eq!(path_safe(".."), "_");
        assert_eq!(path_safe(""), "_");
        assert_eq!(path_safe("a/b c"), "a_b_c");
        assert_eq!(version_in_file_name(Path::new("/x/libonnxruntime.so.1.20.0")).as_deref(), Some("1.20.0"));
        assert_eq!(version_in_file_name(Path::new("/x/libonnxruntime.so")), None);
    }
}
