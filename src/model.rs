//! A loaded model: manifest + chosen ONNX variant + a backend that runs it.
//!
//! Loading verifies the file's SHA-256 against the manifest (SD cards do corrupt files) and checks that
//! the ONNX graph's input and output agree with the manifest, so a wrong file fails at start-up with a
//! message naming both, never mid-run with a shape error. After loading, [`Model::run`] is the only
//! thing the pipeline calls; a model is `Send + Sync` and is shared, not copied, between cameras.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::backend::{self, Backend, LoadRequest};
use crate::config::InferenceConfig;
use crate::error::{Error, Result};
use crate::manifest::{BackendKind, ModelManifest, Variant};

/// A model ready to run.
pub struct Model {
    manifest: ModelManifest,
    variant: Variant,
    backend_kind: BackendKind,
    backend: Box<dyn Backend>,
    /// SHA-256 of the ONNX file as loaded, lowercase hex: what galleries are bound to.
    sha256: String,
    /// Reading and verifying the file, milliseconds.
    read_ms: f64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.manifest.name)
            .field("variant", &self.variant.name)
            .field("backend", &self.backend_kind)
            .finish()
    }
}

impl Model {
    /// Loads the manifest's `variant` (or the backend's preferred one) on the configured backend.
    pub fn load(manifest: ModelManifest, variant: Option<&str>, inference: &InferenceConfig) -> Result<Arc<Model>> {
        let started = std::time::Instant::now();
        let variant = manifest.select_variant(variant, inference.backend)?.clone();
        let (onnx, got) = read_verified(&manifest, &variant)?;
        let read_ms = started.elapsed().as_secs_f64() * 1e3;
        let model = Model::from_bytes(manifest, variant, onnx, got, inference)?;
        log::info!(
            "loaded model {} (variant {}, {}) on {}{}",
            model.manifest.name,
            model.variant.name,
            model.variant.file.display(),
            model.backend_kind.name(),
            if model.manifest.random_weights { " -- RANDOM WEIGHTS, test model" } else { "" }
        );
        let has_int8 = model.manifest.variants().iter().any(|v| v.name == "int8");
        if model.backend_kind == BackendKind::Tract
            && model.variant.name != "int8"
            && has_int8
            && backend::tract::int8_kernels()
        {
            log::info!(
                "{}: this CPU has AVX-512 VNNI, where the model's int8 variant runs on whaled's integer kernels, \
                 faster than fp32 on tract: `variant = \"int8\"` in its config section turns it on (its quality \
                 against fp32: models/README.md)",
                model.manifest.name
            );
        }
        Ok(Arc::new(Model { read_ms, ..model }))
    }

    /// Builds a model from ONNX bytes already read and verified (`sha256` is the file's digest): a
    /// graph derived from a verified file, such as [`crate::locate`]'s feature-map view of the gate.
    pub fn from_bytes(
        manifest: ModelManifest,
        variant: Variant,
        onnx: Vec<u8>,
        sha256: String,
        inference: &InferenceConfig,
    ) -> Result<Model> {
        let backend_kind = inference.backend;
        let req = LoadRequest { manifest: &manifest, variant: &variant, onnx: std::cell::Cell::new(onnx), inference };
        let backend: Box<dyn Backend> = match backend_kind {
            BackendKind::Tract => Box::new(backend::tract::TractBackend::load(&req)?),
            BackendKind::Onnxruntime => backend::onnxruntime::load(&req)?,
        };
        Ok(Model { manifest, variant, backend_kind, backend, sha256, read_ms: 0.0 })
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    pub fn variant(&self) -> &Variant {
        &self.variant
    }

    /// Load phases, milliseconds: (reading + verifying the file, the backend's parse and optimise).
    pub fn load_times(&self) -> (f64, crate::backend::LoadTimes) {
        (self.read_ms, self.backend.load_times())
    }

    /// SHA-256 of the ONNX file this model was loaded from (lowercase hex).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn backend_kind(&self) -> BackendKind {
        self.backend_kind
    }

    /// Per-operator time of one inference of `input`, averaged over `runs` (`whaled bench --profile`);
    /// `None` where the backend cannot report it.
    pub fn profile(&self, input: &[f32], runs: usize) -> Result<Option<Vec<crate::backend::OpTime>>> {
        self.backend.profile(input, runs)
    }

    /// Runs one input tensor (`manifest.input.shape()` elements) and returns the output vector.
    pub fn run(&self, input: &[f32]) -> Result<Vec<f32>> {
        let want: usize = self.manifest.input.shape().iter().product();
        if input.len() != want {
            return Err(self.inference_error(format!("input has {} values, expected {want}", input.len())));
        }
        let out = self.backend.run(input)?;
        if out.len() != self.manifest.output.kind.values() {
            return Err(self.inference_error(format!(
                "output has {} values, expected {}",
                out.len(),
                self.manifest.output.kind.values()
            )));
        }
        Ok(out)
    }

    fn inference_error(&self, msg: String) -> Error {
        Error::Inference { backend: self.backend_kind.name(), model: self.manifest.name.clone(), msg }
    }
}

/// Reads `variant`'s ONNX file and checks it against the manifest's SHA-256: (bytes, digest as lowercase
/// hex). Every load goes through here, the gate's map ([`crate::locate`]) included.
pub fn read_verified(manifest: &ModelManifest, variant: &Variant) -> Result<(Vec<u8>, String)> {
    let onnx = std::fs::read(&variant.file)
        .map_err(|e| Error::model(manifest.path(), format!("cannot read ONNX file {}: {e}", variant.file.display())))?;
    let got = hex(&Sha256::digest(&onnx));
    if let Some(want) = &variant.sha256 {
        if &got != want {
            return Err(Error::model(
                manifest.path(),
                format!(
                    "{} has SHA-256 {got}, the manifest says {want}: the file is corrupt or not the one the manifest describes",
                    variant.file.display()
                ),
            ));
        }
    }
    Ok((onnx, got))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
