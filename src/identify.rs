//! The identification core shared by `whaled identify`, `whaled eval` and (later) the live pipeline:
//! pre-filter every frame, run the ArcFace embedder only on frames that pass, rank candidates.
//!
//! Decision order is upstream's: gate -> identification top-k -> low-confidence check.
//! An [`Identifier`] is immutable and shared; per-thread scratch (decoder, preprocessors, tensors) lives
//! in a [`Workspace`], so several cameras use one set of loaded models without copying them, and a frame
//! costs no allocation outside the inference engines once the first one of its size is through.
//!
//! Frames arrive still encoded: each stage asks the [`Decoder`] for pixels that just cover its model's
//! input, so a 1080p JPEG is decoded at 1/4 size for the pre-filter and, only if it passes, again at
//! 1/2 for a 512x512 embedder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;

use crate::config::Config;
use crate::decode::Decoder;
use crate::detection::{Candidate, Timings};
use crate::error::{Error, Result};
use crate::head::IdentificationHead;
use crate::manifest::{ModelManifest, OutputKind, Role};
use crate::model::Model;
use crate::preprocess::Preprocessor;
use crate::scoring::{l2_normalise, prefilter_score, rank, round4};
use crate::source::FrameData;

/// The identification stage: embedder model, head and upstream scoring constants.
pub struct Identification {
    model: Arc<Model>,
    head: IdentificationHead,
    scale: f64,
    top_k: usize,
    min_confidence: f64,
    model_version: String,
}

/// Loaded models and thresholds; immutable once built.
pub struct Identifier {
    prefilter: Arc<Model>,
    positive_classes: Vec<usize>,
    /// The pre-filter threshold as `f64` bits: changeable at run time (MQTT `set_threshold`).
    threshold: AtomicU64,
    identification: Option<Identification>,
    jpeg_dct_scaling: bool,
}

/// Per-thread scratch buffers: preprocessors and tensors, reused frame after frame.
pub struct Workspace {
    decoder: Decoder,
    prefilter: Preprocessor,
    embedder: Option<Preprocessor>,
    tensor: Vec<f32>,
    cosines: Vec<f32>,
}

/// The outcome of the identification stage for a frame that passed the pre-filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Identified {
    /// Top-k, most probable first, probabilities rounded to 4 dp.
    pub ranked: Vec<Candidate>,
    /// Top-1 probability below `min_confidence`.
    pub low_confidence: bool,
}

/// Everything decided about one frame.
#[derive(Debug, Clone)]
pub struct Assessment {
    pub width: u32,
    pub height: u32,
    pub prefilter_model: String,
    pub prefilter_score: f64,
    pub threshold: f64,
    pub passed: bool,
    /// `None` when the frame was rejected or no identification model is configured.
    pub identified: Option<Identified>,
    pub model_version: String,
    pub timings: Timings,
}

impl Identifier {
    /// Loads the configured models (and the identification head) on the configured backend.
    pub fn from_config(cfg: &Config) -> Result<Identifier> {
        let manifest = ModelManifest::load(&cfg.prefilter.manifest)?;
        let Role::Prefilter(spec) = &manifest.role else {
            return Err(Error::model(
                manifest.path(),
                "is configured as [prefilter] but its role is not \"prefilter\"",
            ));
        };
        let positive_classes = spec.positive_classes.clone();
        let threshold = cfg.prefilter.threshold.unwrap_or(spec.threshold).get();
        let prefilter = Model::load(manifest, cfg.prefilter.variant.as_deref(), &cfg.inference)?;

        let identification = match &cfg.identification {
            None => None,
            Some(idc) => {
                let manifest = ModelManifest::load(&idc.manifest)?;
                let Role::Embedder(spec) = manifest.role.clone() else {
                    return Err(Error::model(
                        manifest.path(),
                        "is configured as [identification] but its role is not \"embedder\"",
                    ));
                };
                let OutputKind::Embedding { dim } = manifest.output.kind else {
                    return Err(Error::model(manifest.path(), "an embedder must output an embedding"));
                };
                let head = IdentificationHead::load(manifest.path(), &spec, dim)?;
                let model = Model::load(manifest, idc.variant.as_deref(), &cfg.inference)?;
                Some(Identification {
                    model,
                    head,
                    scale: spec.scale,
                    top_k: idc.top_k.unwrap_or(spec.top_k),
                    min_confidence: idc.min_confidence.unwrap_or(spec.min_confidence).get(),
                    model_version: spec.model_version,
                })
            }
        };
        Ok(Identifier {
            prefilter,
            positive_classes,
            threshold: AtomicU64::new(threshold.to_bits()),
            identification,
            jpeg_dct_scaling: cfg.inference.jpeg_dct_scaling,
        })
    }

    pub fn prefilter(&self) -> &Arc<Model> {
        &self.prefilter
    }

    pub fn threshold(&self) -> f64 {
        f64::from_bits(self.threshold.load(Ordering::Relaxed))
    }

    /// Changes the pre-filter threshold for the frames assessed from now on; `t` must be in [0, 1].
    pub fn set_threshold(&self, t: f64) {
        if (0.0..=1.0).contains(&t) {
            self.threshold.store(t.to_bits(), Ordering::Relaxed);
        }
    }

    /// Whether the identification model is a random-weights test model.
    pub fn identification_random_weights(&self) -> bool {
        self.identification.as_ref().is_some_and(|i| i.model.manifest().random_weights)
    }

    pub fn has_identification(&self) -> bool {
        self.identification.is_some()
    }

    /// The `model_version` reported in detections: the identification model's, else the pre-filter's name.
    pub fn model_version(&self) -> String {
        match &self.identification {
            Some(i) => i.model_version.clone(),
            None => self.prefilter.manifest().name.clone(),
        }
    }

    pub fn workspace(&self) -> Workspace {
        Workspace {
            decoder: Decoder::new(self.jpeg_dct_scaling),
            prefilter: Preprocessor::new(&self.prefilter.manifest().input),
            embedder: self.identification.as_ref().map(|i| Preprocessor::new(&i.model.manifest().input)),
            tensor: Vec::new(),
            cosines: Vec::new(),
        }
    }

    /// The pre-filter score of decoded pixels (probability mass of the positive classes).
    pub fn prefilter_score(&self, ws: &mut Workspace, frame: &RgbImage, timings: &mut Timings) -> Result<f64> {
        self.score(&mut ws.prefilter, &mut ws.tensor, frame, timings)
    }

    fn score(
        &self,
        pre: &mut Preprocessor,
        tensor: &mut Vec<f32>,
        frame: &RgbImage,
        timings: &mut Timings,
    ) -> Result<f64> {
        let t = Instant::now();
        pre.run(frame, tensor)?;
        let t1 = Instant::now();
        let out = self.prefilter.run(tensor)?;
        timings.preprocess_ms += ms(t1 - t);
        timings.prefilter_ms += ms(t1.elapsed());
        Ok(prefilter_score(&out, self.prefilter.manifest().output.kind, &self.positive_classes))
    }

    /// Decodes and assesses one frame; `name` labels errors. A frame that cannot be decoded is
    /// `Err(Error::Image)`; any other error is the models'.
    pub fn assess(&self, ws: &mut Workspace, data: &FrameData, name: &str) -> Result<Assessment> {
        let start = Instant::now();
        let mut timings = Timings::default();
        let Workspace { decoder, prefilter, embedder, tensor, cosines } = ws;
        let decoded = decoder.decode(data, |w, h| prefilter.fits(w, h), name)?;
        let (width, height) = (decoded.full_width, decoded.full_height);
        timings.decode_ms += ms(start.elapsed());
        let score = self.score(prefilter, tensor, decoded.image, &mut timings)?;
        let threshold = self.threshold();
        let passed = score >= threshold;
        let identified = match (&self.identification, passed) {
            (Some(id), true) => {
                let pre = embedder
                    .as_mut()
                    .ok_or_else(|| Error::Input("workspace was made for another identifier".into()))?;
                let t = Instant::now();
                let decoded = decoder.decode(data, |w, h| pre.fits(w, h), name)?;
                timings.decode_ms += ms(t.elapsed());
                Some(self.identify(id, pre, tensor, cosines, decoded.image, &mut timings)?)
            }
            _ => None,
        };
        timings.total_ms = ms(start.elapsed());
        Ok(Assessment {
            width,
            height,
            prefilter_model: self.prefilter.manifest().name.clone(),
            prefilter_score: score,
            threshold,
            passed,
            identified,
            model_version: self.model_version(),
            timings,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn identify(
        &self,
        id: &Identification,
        pre: &mut Preprocessor,
        tensor: &mut Vec<f32>,
        cosines: &mut Vec<f32>,
        frame: &RgbImage,
        timings: &mut Timings,
    ) -> Result<Identified> {
        let t = Instant::now();
        pre.run(frame, tensor)?;
        let t1 = Instant::now();
        let mut embedding = id.model.run(tensor)?;
        l2_normalise(&mut embedding);
        id.head.cosines(&embedding, cosines);
        let ranked = rank(cosines, id.scale, id.top_k);
        timings.preprocess_ms += ms(t1 - t);
        timings.identification_ms += ms(t1.elapsed());
        let low_confidence = ranked.first().is_none_or(|r| r.probability < id.min_confidence);
        let ranked = ranked
            .iter()
            .map(|r| Candidate {
                class_animal: id.head.id(r.slot).to_string(),
                id_animal: id.head.species(r.slot).to_string(),
                probability: round4(r.probability),
            })
            .collect();
        Ok(Identified { ranked, low_confidence })
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
