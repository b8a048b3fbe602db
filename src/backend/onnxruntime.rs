//! The onnxruntime backend (cargo feature `onnxruntime`): CUDA and TensorRT on Jetson, and the faster
//! CPU kernels where a native library is acceptable.
//!
//! `libonnxruntime.so` is loaded at run time (`ort`'s `load-dynamic`), from `inference.onnxruntime.library`,
//! else `$ORT_DYLIB_PATH`, else the dynamic loader's search path, so the binary builds offline and runs
//! without it when tract is configured. Execution providers are tried in the configured order; one
//! that is not in the library or fails to register is skipped with a WARN naming it and the next is
//! tried; if none registers, onnxruntime runs the model on its CPU provider (WARN). A session that then
//! fails to build (a TensorRT engine that cannot be built, a graph the providers reject) is an error:
//! the model does not load. The one exception: when a *cached* TensorRT engine was there and the build
//! fails, the cache directory is set aside (`<dir>.failed`) and the session built once more from scratch.
//!
//! The TensorRT and CUDA providers get the options of `[inference.onnxruntime.tensorrt]` and `.cuda`,
//! resolved per model by [`providers`] (fp16/int8 under `"auto"`, the engine cache directory keyed by
//! the model's SHA-256 and the onnxruntime and TensorRT versions); docs/JETSON.md has the details.
//!
//! An `ort` session runs one input at a time (`Session::run` takes `&mut self`), so a model holds one
//! session per inference worker (`OrtConfig::sessions`) and each run takes whichever is free: with two
//! workers two frames are inferred at once, as with tract, whose plans are shared.

use crate::backend::{Backend, LoadRequest};
use crate::error::Result;

#[cfg(feature = "onnxruntime")]
pub fn load(req: &LoadRequest) -> Result<Box<dyn Backend>> {
    Ok(Box::new(imp::OrtBackend::load(req)?))
}

#[cfg(not(feature = "onnxruntime"))]
pub fn load(req: &LoadRequest) -> Result<Box<dyn Backend>> {
    Err(crate::error::Error::model(
        req.manifest.path(),
        "inference.backend = \"onnxruntime\" but this whaled was built without the `onnxruntime` feature \
         (rebuild with `cargo build --release --features onnxruntime`, or use backend = \"tract\")",
    ))
}

#[cfg(feature = "onnxruntime")]
mod providers;

#[cfg(feature = "onnxruntime")]
mod imp {
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, OnceLock};

    use ort::environment::Environment;
    use ort::ep::{self, ExecutionProvider as _};
    use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
    use ort::session::Session;
    use ort::value::TensorRef;
    use sha2::{Digest, Sha256};

    use super::providers::{self, ModelFacts, Stage, TrtPlan, Versions};
    use crate::backend::{check_dims, output_shape_ok, Backend, LoadRequest};
    use crate::config::{ArenaExtendStrategy, CudaConfig, ExecutionProvider, OrtConfig, TensorRtConfig};
    use crate::error::{Error, Result};

    /// The process-wide onnxruntime environment, the library it was loaded from and that library's
    /// version. Only a success is kept: a failed load (wrong path) may be retried with another library.
    static ENV: Mutex<Option<(&'static Environment, PathBuf, Option<String>)>> = Mutex::new(None);

    /// The TensorRT library's version, probed once (after the provider's first registration loaded it).
    static TENSORRT_VERSION: OnceLock<Option<providers::TrtVersion>> = OnceLock::new();

    fn environment(cfg: &OrtConfig) -> std::result::Result<(&'static Environment, Option<String>), String> {
        let wanted = cfg
            .library
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"));
        let mut slot = ENV.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((env, loaded, version)) = slot.as_ref() {
            return if *loaded == wanted {
                Ok((*env, version.clone()))
            } else {
                Err(format!(
                    "onnxruntime is already loaded from {} in this process; cannot also load {}",
                    loaded.display(),
                    wanted.display()
                ))
            };
        }
        let builder = ort::init_from(&wanted).map_err(|e| {
            format!(
                "cannot load onnxruntime from {}: {e} (set inference.onnxruntime.library or ORT_DYLIB_PATH \
                 to a libonnxruntime.so, e.g. the one in the PyPI onnxruntime wheel under onnxruntime/capi/)",
                wanted.display()
            )
        })?;
        let env = builder.with_name("whaled").build().map_err(|e| format!("onnxruntime environment: {e}"))?;
        let version = providers::onnxruntime_version(&wanted);
        log::info!(
            "onnxruntime {} loaded from {}",
            version.as_deref().unwrap_or("(version unknown)"),
            wanted.display()
        );
        // One environment per process, alive until exit: leaking it gives the `'static` sessions need.
        let env: &'static Environment = Box::leak(Box::new(env));
        *slot = Some((env, wanted, version.clone()));
        Ok((env, version))
    }

    /// `ort`'s TensorRT provider holding exactly [`TrtPlan::options`] (the tests compare the two).
    pub(super) fn tensorrt_provider(plan: &TrtPlan) -> ep::TensorRT {
        let mut t = ep::TensorRT::default()
            .with_device_id(plan.device_id)
            .with_fp16(plan.fp16)
            .with_int8(plan.int8)
            .with_engine_cache(plan.engine_cache.is_some());
        if let Some(p) = &plan.engine_cache {
            t = t.with_engine_cache_path(p.to_string_lossy());
        }
        t = t.with_timing_cache(plan.timing_cache.is_some());
        if let Some(p) = &plan.timing_cache {
            t = t.with_timing_cache_path(p.to_string_lossy());
        }
        if let Some(w) = plan.max_workspace {
            t = t.with_max_workspace_size(w);
        }
        t
    }

    /// `ort`'s CUDA provider holding exactly [`providers::cuda_options`].
    pub(super) fn cuda_provider(cfg: &CudaConfig) -> ep::CUDA {
        let mut c = ep::CUDA::default().with_device_id(cfg.device.get());
        if let Some(limit) = cfg.memory_limit_bytes {
            c = c.with_memory_limit(limit);
        }
        c.with_arena_extend_strategy(match cfg.arena_extend_strategy {
            ArenaExtendStrategy::NextPowerOfTwo => ep::ArenaExtendStrategy::NextPowerOfTwo,
            ArenaExtendStrategy::SameAsRequested => ep::ArenaExtendStrategy::SameAsRequested,
        })
    }

    /// The TensorRT plan for the model of `req`: versions probed, facts gathered, cache directories
    /// created (a cache whose directory cannot be created is dropped with a WARN: the engine is then
    /// built at every start, but the model runs).
    fn tensorrt_plan(
        t: &TensorRtConfig,
        req: &LoadRequest,
        onnx: &[u8],
        env: &'static Environment,
        ort_version: Option<String>,
    ) -> TrtPlan {
        let m = req.manifest;
        let tensorrt = *TENSORRT_VERSION.get_or_init(|| {
            // Registering the provider once loads onnxruntime's TensorRT provider library and with it the
            // libnvinfer it was linked against, which the probe then finds among the loaded libraries.
            if let Ok(mut scratch) = Session::builder(env) {
                let _ = ep::TensorRT::default().register(&mut scratch);
            }
            providers::tensorrt_version()
        });
        if tensorrt.is_none() {
            log::warn!(
                "model {}: cannot tell which TensorRT version onnxruntime uses (no libnvinfer found): cached \
                 engines are keyed as `trtunknown`, so after a TensorRT upgrade delete {} by hand",
                m.name,
                t.cache_dir.join("engines").display()
            );
        }
        let facts = ModelFacts {
            name: m.name.clone(),
            stage: Stage::of(&m.role),
            // model.rs has checked the file against a pinned digest; otherwise compute it.
            sha256: req.variant.sha256.clone().unwrap_or_else(|| hex(&Sha256::digest(onnx))),
            qdq: providers::is_qdq(onnx),
        };
        let mut plan = TrtPlan::resolve(t, &facts, &Versions { onnxruntime: ort_version, tensorrt });
        if plan.int8 && !facts.qdq {
            log::warn!(
                "model {}: int8 = true, but its graph is not QDQ-quantised and whaled gives TensorRT no calibration \
                 table: TensorRT runs the layers it has no int8 scales for in fp16/fp32",
                m.name
            );
        }
        for (what, dir) in [("engine", &mut plan.engine_cache), ("timing", &mut plan.timing_cache)] {
            if let Some(d) = dir.as_ref() {
                if let Err(e) = std::fs::create_dir_all(d) {
                    log::warn!(
                        "model {}: cannot create the TensorRT {what} cache directory {}: {e}; running without it",
                        m.name,
                        d.display()
                    );
                    *dir = None;
                }
            }
        }
        plan
    }

    /// `key=value key=value`, for the DEBUG log of what a provider is given.
    fn show(options: &[(&str, String)]) -> String {
        options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// After a failed session build with a cached engine present: moves the key directory aside
    /// (`<dir>.failed`, replacing an older one) and recreates it empty. `false` if that failed.
    fn set_aside(dir: &Path) -> bool {
        let mut failed = dir.as_os_str().to_owned();
        failed.push(".failed");
        let failed = PathBuf::from(failed);
        let _ = std::fs::remove_dir_all(&failed);
        std::fs::rename(dir, &failed).is_ok() && std::fs::create_dir_all(dir).is_ok()
    }

    /// Registers one provider; a failure is a WARN naming it, and the builder comes back unchanged.
    /// Returns the builder and whether the provider registered.
    fn register(
        builder: SessionBuilder,
        dispatch: ep::ExecutionProviderDispatch,
        name: &str,
        model: &str,
    ) -> (SessionBuilder, bool) {
        match builder.with_execution_providers([dispatch.error_on_failure()]) {
            Ok(b) => (b, true),
            Err(e) => {
                log::warn!(
                    "model {model}: onnxruntime execution provider `{name}` failed to register: {e}; falling back"
                );
                (e.recover(), false)
            }
        }
    }

    pub struct OrtBackend {
        /// One session per worker; a run takes the first free one (waiting on one only if all are busy).
        sessions: Vec<Mutex<Session>>,
        next: std::sync::atomic::AtomicUsize,
        input_name: String,
        output_name: String,
        shape: [usize; 4],
        model_name: String,
        load_times: crate::backend::LoadTimes,
    }

    impl OrtBackend {
        pub fn load(req: &LoadRequest) -> Result<Self> {
            let onnx = req.onnx.take();
            let m = req.manifest;
            let err = |msg: String| Error::model(m.path(), msg);
            let cfg = &req.inference.onnxruntime;
            let (env, ort_version) = environment(cfg).map_err(&err)?;
            let oe = |what: &str, e: ort::Error| err(format!("onnxruntime: {what}: {e}"));

            let mut builder = Session::builder(env)
                .map_err(|e| oe("session builder", e))?
                // `All`, onnxruntime's own default (ORT_ENABLE_ALL), as its Python API runs it: in ort
                // 2.0.0-rc.15 `Level3` is ORT_ENABLE_LAYOUT (no measurable difference on the B4 here).
                .with_optimization_level(GraphOptimizationLevel::All)
                .map_err(|e| oe("optimisation level", e.into()))?
                .with_intra_threads(req.inference.threads)
                .map_err(|e| oe("intra-op threads", e.into()))?;
            let mut registered = Vec::new();
            // The TensorRT plan in use, and whether its engine cache held an engine before this load.
            let mut tensorrt: Option<(TrtPlan, bool)> = None;
            for provider in &cfg.execution_providers {
                let name = provider.name();
                let available = match provider {
                    ExecutionProvider::Tensorrt(_) => ep::TensorRT::is_available(),
                    ExecutionProvider::Cuda(_) => ep::CUDA::is_available(),
                    ExecutionProvider::Cpu => ep::CPU::is_available(),
                };
                match available {
                    Ok(true) => {}
                    Ok(false) => {
                        log::warn!("model {}: onnxruntime execution provider `{name}` is not in this onnxruntime build; skipping it", m.name);
                        continue;
                    }
                    Err(e) => {
                        log::warn!(
                            "model {}: cannot query onnxruntime execution provider `{name}`: {e}; skipping it",
                            m.name
                        );
                        continue;
                    }
                }
                let dispatch = match provider {
                    ExecutionProvider::Tensorrt(t) => {
                        let plan = tensorrt_plan(t, req, &onnx, env, ort_version.clone());
                        let cached = plan.engine_cache.as_deref().is_some_and(providers::has_engine);
                        log::debug!("model {}: TensorRT provider options {}", m.name, show(&plan.options()));
                        let dispatch = tensorrt_provider(&plan).build();
                        tensorrt = Some((plan, cached));
                        dispatch
                    }
                    ExecutionProvider::Cuda(c) => {
                        log::debug!("model {}: CUDA provider options {}", m.name, show(&providers::cuda_options(c)));
                        cuda_provider(c).build()
                    }
                    // The arena on, as onnxruntime's default: ort's `CPU::default()` turns it off, which
                    // made the B4 25 % slower than onnxruntime's Python API on the same file (262 vs
                    // 210 ms; Python with the arena off: 257 ms).
                    ExecutionProvider::Cpu => ep::CPU::default().with_arena_allocator(true).build(),
                };
                let (b, ok) = register(builder, dispatch, name, &m.name);
                builder = b;
                if ok {
                    registered.push(name);
                } else if name == "tensorrt" {
                    tensorrt = None;
                }
            }
            if registered.is_empty() {
                log::warn!("model {}: none of the configured execution providers registered; onnxruntime uses its CPU provider", m.name);
            }
            if let Some((plan, cached)) = &tensorrt {
                log::info!(
                    "model {}: TensorRT {} on GPU {}, engine cache {}{}",
                    m.name,
                    plan.precision(),
                    plan.device_id,
                    plan.engine_cache.as_ref().map_or("off".to_string(), |d| d.display().to_string()),
                    match (plan.engine_cache.is_some(), cached) {
                        (true, true) => ": loading the cached engine",
                        (true, false) =>
                            ": no cached engine yet, building it now (minutes for a large model on a Jetson)",
                        (false, _) =>
                            ": building the engine now, as at every start (minutes for a large model on a Jetson)",
                    }
                );
            }
            let mut sessions = Vec::with_capacity(cfg.sessions.max(1));
            let started = std::time::Instant::now();
            let mut first_ms = None;
            for i in 0..cfg.sessions.max(1) {
                let s = match builder.clone().commit_from_memory(&onnx) {
                    Ok(s) => s,
                    // A cached engine that cannot be used (a TensorRT change the key missed, a damaged
                    // file): set it aside and build from scratch, once.
                    Err(e) => match tensorrt
                        .as_ref()
                        .and_then(|(p, cached)| p.engine_cache.as_ref().filter(|_| *cached && i == 0))
                    {
                        Some(dir) if set_aside(dir) => {
                            log::warn!(
                                "model {}: onnxruntime could not build a session from the cached TensorRT engine in {} \
                                 ({e}); moved it to {}.failed, building a new one",
                                m.name,
                                dir.display(),
                                dir.display()
                            );
                            builder.clone().commit_from_memory(&onnx).map_err(|e| {
                                oe(
                                    &format!(
                                        "cannot load {} (also without the cached engine)",
                                        req.variant.file.display()
                                    ),
                                    e,
                                )
                            })?
                        }
                        _ => return Err(oe(&format!("cannot load {}", req.variant.file.display()), e)),
                    },
                };
                sessions.push(s);
                first_ms.get_or_insert(started.elapsed().as_secs_f64() * 1e3);
            }
            log::info!(
                "model {}: onnxruntime providers [{}], {} session(s) ready in {:.1} s",
                m.name,
                registered.join(", "),
                sessions.len(),
                started.elapsed().as_secs_f64()
            );
            let load_times = crate::backend::LoadTimes { parse_ms: None, optimise_ms: first_ms.unwrap_or(0.0) };
            let session = &sessions[0];
            if session.inputs().len() != 1 {
                return Err(err(format!(
                    "the ONNX graph has {} inputs; whaled models take exactly one image",
                    session.inputs().len()
                )));
            }
            let input = &session.inputs()[0];
            if input.name() != m.input.name {
                return Err(err(format!(
                    "the ONNX graph's input is `{}`, the manifest says `{}`",
                    input.name(),
                    m.input.name
                )));
            }
            let shape = m.input.shape();
            if let Some(s) = input.dtype().tensor_shape() {
                let declared: Vec<Option<i64>> = s.iter().map(|&d| (d > 0).then_some(d)).collect();
                check_dims(m.path(), "input", input.name(), &declared, &shape)?;
            }
            let Some(output) = session.outputs().iter().find(|o| o.name() == m.output.name) else {
                let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
                return Err(err(format!(
                    "the ONNX graph has no output `{}` (it has: {})",
                    m.output.name,
                    names.join(", ")
                )));
            };
            if let Some(s) = output.dtype().tensor_shape() {
                if s.iter().all(|&d| d > 0) {
                    let dims: Vec<usize> = s.iter().map(|&d| d as usize).collect();
                    if !output_shape_ok(&dims, m.output.kind.values()) {
                        return Err(err(format!(
                            "the ONNX graph's output `{}` is {dims:?}, but the manifest describes {} values ({:?})",
                            m.output.name,
                            m.output.kind.values(),
                            m.output.kind
                        )));
                    }
                }
            }
            let input_name = input.name().to_string();
            Ok(OrtBackend {
                input_name,
                output_name: m.output.name.clone(),
                sessions: sessions.into_iter().map(Mutex::new).collect(),
                next: std::sync::atomic::AtomicUsize::new(0),
                shape,
                model_name: m.name.clone(),
                load_times,
            })
        }
    }

    impl Backend for OrtBackend {
        fn load_times(&self) -> crate::backend::LoadTimes {
            self.load_times
        }

        fn run(&self, input: &[f32]) -> Result<Vec<f32>> {
            let fail = |msg: String| Error::Inference { backend: "onnxruntime", model: self.model_name.clone(), msg };
            let tensor = TensorRef::from_array_view((self.shape, input)).map_err(|e| fail(e.to_string()))?;
            // The first free session, starting at a rotating index; if all are busy, wait for one.
            let n = self.sessions.len();
            let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
            let free = (0..n).find_map(|k| self.sessions[(start + k) % n].try_lock().ok());
            // A poisoned lock only means another thread panicked mid-run; the session itself is intact.
            let mut session = match free {
                Some(s) => s,
                None => self.sessions[start].lock().unwrap_or_else(|p| p.into_inner()),
            };
            let outputs =
                session.run(ort::inputs![self.input_name.as_str() => tensor]).map_err(|e| fail(e.to_string()))?;
            let value = outputs
                .get(self.output_name.as_str())
                .ok_or_else(|| fail(format!("no output `{}`", self.output_name)))?;
            let (_, data) = value.try_extract_tensor::<f32>().map_err(|e| fail(e.to_string()))?;
            Ok(data.to_vec())
        }
    }

    #[cfg(test)]
    mod tests {
        use std::path::Path;

        use super::*;
        use crate::config::{GpuDevice, Switch};

        /// How `ort` prints a provider's options: its own `Debug`, an insertion-ordered map of C strings.
        fn rendered(name: &str, options: &[(&str, String)]) -> String {
            let pairs: Vec<String> = options.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
            format!("{name}(ExecutionProviderOptions({{{}}}))", pairs.join(", "))
        }

        fn facts(stage: Stage, qdq: bool) -> ModelFacts {
            ModelFacts { name: "m".into(), stage, sha256: "0123456789abcdef".repeat(4), qdq }
        }

        /// The builder `load` registers holds exactly the options [`TrtPlan::options`] lists under
        /// onnxruntime's key names: nothing missing, nothing extra, the same values. (With the CPU-only
        /// library the TensorRT provider is absent, so this is where the plumbing is checked.)
        #[test]
        fn the_tensorrt_builder_holds_exactly_the_planned_options() {
            let versions =
                Versions { onnxruntime: Some("1.20.0".into()), tensorrt: providers::TrtVersion::from_code(100300) };
            let full = TensorRtConfig {
                device: GpuDevice::new(1).unwrap(),
                cache_dir: "/var/lib/whaled/tensorrt".into(),
                max_workspace_bytes: Some(3 << 30),
                ..TensorRtConfig::default()
            };
            let bare = TensorRtConfig {
                fp16: Switch::Off,
                int8: Switch::On,
                engine_cache: false,
                timing_cache: false,
                ..full.clone()
            };
            for (cfg, stage, qdq) in [
                (&full, Stage::Embedder, false),
                (&full, Stage::Gate, true),
                (&full, Stage::Gate, false),
                (&bare, Stage::Embedder, false),
            ] {
                let plan = TrtPlan::resolve(cfg, &facts(stage, qdq), &versions);
                let got = format!("{:?}", tensorrt_provider(&plan));
                assert_eq!(got, rendered("TensorRT", &plan.options()), "{plan:?}");
            }
            let plan = TrtPlan::resolve(&full, &facts(Stage::Embedder, false), &versions);
            let got = format!("{:?}", tensorrt_provider(&plan));
            for want in [
                "\"trt_fp16_enable\": \"true\"",
                "\"trt_engine_cache_enable\": \"true\"",
                "\"trt_engine_cache_path\": \"/var/lib/whaled/tensorrt/engines/m/0123456789abcdef-ort1.20.0-trt10.3.0-fp16\"",
                "\"trt_timing_cache_path\": \"/var/lib/whaled/tensorrt/timing/trt10.3.0\"",
                "\"trt_max_workspace_size\": \"3221225472\"",
                "\"device_id\": \"1\"",
            ] {
                assert!(got.contains(want), "{got}\n lacks {want}");
            }
        }

        #[test]
        fn the_cuda_builder_holds_exactly_the_planned_options() {
            let configs = [
                CudaConfig::default(),
                CudaConfig {
                    device: GpuDevice::new(3).unwrap(),
                    memory_limit_bytes: Some(512 << 20),
                    arena_extend_strategy: ArenaExtendStrategy::SameAsRequested,
                },
            ];
            for c in &configs {
                assert_eq!(format!("{:?}", cuda_provider(c)), rendered("CUDA", &providers::cuda_options(c)));
            }
            let got = format!("{:?}", cuda_provider(&configs[1]));
            assert!(got.contains("\"gpu_mem_limit\": \"536870912\"") && got.contains("kSameAsRequested"), "{got}");
        }

        #[test]
        fn a_failed_cache_is_set_aside_and_recreated_empty() {
            let tmp = tempfile::tempdir().unwrap();
            let key = tmp.path().join("engines/m/k");
            std::fs::create_dir_all(&key).unwrap();
            std::fs::write(key.join("a.engine"), b"stale").unwrap();
            assert!(providers::has_engine(&key));
            assert!(set_aside(&key));
            assert!(key.is_dir() && !providers::has_engine(&key));
            assert!(Path::new(&format!("{}.failed", key.display())).join("a.engine").is_file());
            // Again: the older .failed is replaced.
            std::fs::write(key.join("b.engine"), b"stale too").unwrap();
            assert!(set_aside(&key));
            let failed = Path::new(&format!("{}.failed", key.display())).to_path_buf();
            assert!(failed.join("b.engine").is_file() && !failed.join("a.engine").exists());
        }
    }
}
