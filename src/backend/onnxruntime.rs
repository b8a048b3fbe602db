//! The onnxruntime backend (cargo feature `onnxruntime`): CUDA and TensorRT on Jetson, and the faster
//! CPU kernels where a native library is acceptable.
//!
//! `libonnxruntime.so` is loaded at run time (`ort`'s `load-dynamic`), from `inference.onnxruntime.library`,
//! else `$ORT_DYLIB_PATH`, else the dynamic loader's search path, so the binary builds offline and runs
//! without it when tract is configured. Execution providers are tried in the configured order; one
//! that is unavailable or fails to register is skipped with a WARN and the next is tried (CPU last).
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
mod imp {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use ort::environment::Environment;
    use ort::ep::{self, ExecutionProvider as _};
    use ort::session::builder::GraphOptimizationLevel;
    use ort::session::Session;
    use ort::value::TensorRef;

    use crate::backend::{check_dims, output_shape_ok, Backend, LoadRequest};
    use crate::config::{ExecutionProvider, OrtConfig};
    use crate::error::{Error, Result};

    /// The process-wide onnxruntime environment and the library it was loaded from. Only a success is
    /// kept: a failed load (wrong path) may be retried with another library.
    static ENV: Mutex<Option<(&'static Environment, PathBuf)>> = Mutex::new(None);

    fn environment(cfg: &OrtConfig) -> std::result::Result<&'static Environment, String> {
        let wanted = cfg
            .library
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"));
        let mut slot = ENV.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((env, loaded)) = slot.as_ref() {
            return if *loaded == wanted {
                Ok(*env)
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
        log::info!("onnxruntime loaded from {}", wanted.display());
        // One environment per process, alive until exit: leaking it gives the `'static` sessions need.
        let env: &'static Environment = Box::leak(Box::new(env));
        *slot = Some((env, wanted));
        Ok(env)
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
            let m = req.manifest;
            let err = |msg: String| Error::model(m.path(), msg);
            let cfg = &req.inference.onnxruntime;
            let env = environment(cfg).map_err(&err)?;
            let oe = |what: &str, e: ort::Error| err(format!("onnxruntime: {what}: {e}"));

            let mut builder = Session::builder(env)
                .map_err(|e| oe("session builder", e))?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(|e| oe("optimisation level", e.into()))?
                .with_intra_threads(req.inference.threads)
                .map_err(|e| oe("intra-op threads", e.into()))?;
            let mut registered = Vec::new();
            for provider in &cfg.execution_providers {
                let (name, available, dispatch) = match provider {
                    ExecutionProvider::Tensorrt => {
                        ("tensorrt", ep::TensorRT::is_available(), ep::TensorRT::default().build())
                    }
                    ExecutionProvider::Cuda => ("cuda", ep::CUDA::is_available(), ep::CUDA::default().build()),
                    ExecutionProvider::Cpu => ("cpu", ep::CPU::is_available(), ep::CPU::default().build()),
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
                builder = match builder.with_execution_providers([dispatch.error_on_failure()]) {
                    Ok(b) => {
                        registered.push(name);
                        b
                    }
                    Err(e) => {
                        log::warn!(
                            "model {}: onnxruntime execution provider `{name}` failed to register: {e}; falling back",
                            m.name
                        );
                        e.recover()
                    }
                };
            }
            if registered.is_empty() {
                log::warn!("model {}: none of the configured execution providers registered; onnxruntime uses its CPU provider", m.name);
            }
            let mut sessions = Vec::with_capacity(cfg.sessions.max(1));
            let started = std::time::Instant::now();
            let mut first_ms = None;
            for _ in 0..cfg.sessions.max(1) {
                let s = builder
                    .clone()
                    .commit_from_memory(req.onnx)
                    .map_err(|e| oe(&format!("cannot load {}", req.variant.file.display()), e))?;
                sessions.push(s);
                first_ms.get_or_insert(started.elapsed().as_secs_f64() * 1e3);
            }
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
            log::debug!("model {}: onnxruntime providers {:?}, {} session(s)", m.name, registered, sessions.len());
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
}
