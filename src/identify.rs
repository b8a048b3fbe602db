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
use crate::detection::{Candidate, Detection, FrameMeta, PrefilterInfo, RejectionReason, Timings};
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

/// Checks everything start-up checks, keeping nothing: the manifests and their roles, each ONNX file's
/// SHA-256, the graphs' input and output shapes on the configured backend, and the identification head.
/// Used by `whaled check-config` and by SIGHUP before a reload, so that a config they accept never fails
/// at start-up. Returns one summary line per model.
pub fn check(cfg: &Config) -> Result<Vec<String>> {
    let lines = cfg.check_models()?;
    Identifier::from_config(cfg)?;
    Ok(lines)
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

/// The wire record of an assessment: the upstream decision table (see `detection.rs` for the sentinels).
impl Detection {
    /// The record for an assessed frame.
    pub fn from_assessment(a: &Assessment, meta: &FrameMeta, device_id: &str) -> Detection {
        let mut d = Detection::base(meta, device_id, a.model_version.clone());
        d.bbox = [0, 0, a.width, a.height];
        d.cetacean_score = round4(a.prefilter_score);
        d.is_cetacean = a.passed;
        d.prefilter =
            Some(PrefilterInfo { model: a.prefilter_model.clone(), score: a.prefilter_score, threshold: a.threshold });
        d.timings = a.timings.clone();
        if !a.passed {
            d.rejected = true;
            d.rejection_reason = Some(RejectionReason::NotAMarineMammal);
            return d;
        }
        match &a.identified {
            None => d.id_animal = "cetacean_unidentified".into(),
            Some(Identified { ranked, low_confidence }) => {
                if let Some((top, rest)) = ranked.split_first() {
                    d.class_animal = top.class_animal.clone();
                    d.id_animal = top.id_animal.clone();
                    d.probability = top.probability;
                    d.candidates = rest.to_vec();
                }
                if *low_confidence {
                    d.rejected = true;
                    d.rejection_reason = Some(RejectionReason::LowConfidence);
                }
            }
        }
        d
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn assessment(passed: bool, identified: Option<Identified>) -> Assessment {
        Assessment {
            width: 640,
            height: 480,
            prefilter_model: "pf".into(),
            prefilter_score: 0.123456,
            threshold: 0.1,
            passed,
            identified,
            model_version: "effb4-arcface-v1".into(),
            timings: Timings { decode_ms: 1.5, prefilter_ms: 2.0, total_ms: 4.5, ..Timings::default() },
        }
    }

    fn meta() -> FrameMeta {
        FrameMeta { image_ind: "f.jpg".into(), source: "/p/f.jpg".into(), captured_at: SystemTime::UNIX_EPOCH }
    }

    fn cand(id: &str, sp: &str, p: f64) -> Candidate {
        Candidate { class_animal: id.into(), id_animal: sp.into(), probability: p }
    }

    /// The upstream decision table: (passed, identification outcome) -> the fields consumers read.
    #[test]
    fn upstream_sentinels() {
        let ranked = vec![
            cand("aaaaaaaaaaaa", "beluga", 0.7024),
            cand("bbbbbbbbbbbb", "fin_whale", 0.2116),
            cand("cccccccccccc", "beluga", 0.086),
        ];
        let cases = [
            (assessment(false, None), "", "unknown", 0.0, true, Some(RejectionReason::NotAMarineMammal), 0),
            (assessment(true, None), "", "cetacean_unidentified", 0.0, false, None, 0),
            (
                assessment(true, Some(Identified { ranked: ranked.clone(), low_confidence: false })),
                "aaaaaaaaaaaa",
                "beluga",
                0.7024,
                false,
                None,
                2,
            ),
            (
                assessment(true, Some(Identified { ranked, low_confidence: true })),
                "aaaaaaaaaaaa",
                "beluga",
                0.7024,
                true,
                Some(RejectionReason::LowConfidence),
                2,
            ),
        ];
        for (a, class, species, p, rejected, reason, n_cands) in cases {
            let d = Detection::from_assessment(&a, &meta(), "dev");
            assert_eq!((d.class_animal.as_str(), d.id_animal.as_str(), d.probability), (class, species, p), "{d:?}");
            assert_eq!((d.rejected, d.rejection_reason, d.candidates.len()), (rejected, reason, n_cands), "{d:?}");
            assert_eq!(d.is_cetacean, a.passed);
            assert_eq!(d.cetacean_score, 0.1235);
            assert_eq!(d.bbox, [0, 0, 640, 480]);
            assert_eq!(d.timings.total_ms, 4.5);
            assert_eq!(d.captured_at, "1970-01-01T00:00:00.000Z");
        }
    }
}
