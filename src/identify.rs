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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use image::RgbImage;

use crate::config::ZeroShotPosition;
use crate::config::{Config, Locate};
use crate::decode::Decoder;
use crate::detection::{
    Candidate, Detection, FrameMeta, IdentificationInfo, MatchSource, PrefilterInfo, RejectionReason, Timings,
    ZeroShotInfo,
};
use crate::error::{Error, Result};
use crate::gallery::{FileStamp, Gallery, Match};
use crate::head::IdentificationHead;
use crate::locate::{Locator, PixelBox};
use crate::manifest::{ModelManifest, OutputKind, Role};
use crate::model::Model;
use crate::preprocess::Preprocessor;
use crate::scoring::{l2_normalise, prefilter_score, rank, round4, top_negative_class, zero_shot_score};
use crate::source::FrameData;

/// The identification stage: embedder model, head and/or gallery, and the scoring constants.
pub struct Identification {
    model: Arc<Model>,
    dim: usize,
    head: Option<IdentificationHead>,
    /// Head slot of each head individual id (to merge a gallery individual with the same id).
    head_slots: HashMap<String, usize>,
    /// The gallery file and what it holds now (swapped whole by a shore update).
    gallery: Option<GallerySlot>,
    new_individual_below: Option<f64>,
    scale: f64,
    top_k: usize,
    min_confidence: f64,
    model_version: String,
}

/// The zero-shot gate stage: image encoder, normalised text embeddings and the upstream rule's constants.
pub struct ZeroShot {
    model: Arc<Model>,
    /// `prompts x dim`, rows L2-normalised.
    text: Vec<f32>,
    positives: usize,
    scale: f64,
    threshold: f64,
    position: ZeroShotPosition,
}

impl ZeroShot {
    fn load(cfg: &crate::config::ZeroShotConfig, inference: &crate::config::InferenceConfig) -> Result<ZeroShot> {
        let manifest = ModelManifest::load(&cfg.manifest)?;
        let Role::ZeroShot(spec) = manifest.role.clone() else {
            return Err(Error::model(
                manifest.path(),
                "is configured as [zero_shot] but its role is not \"zero_shot\"",
            ));
        };
        let OutputKind::Embedding { dim } = manifest.output.kind else {
            return Err(Error::model(manifest.path(), "a zero_shot model must output an embedding"));
        };
        let path = manifest.path().to_path_buf();
        let err = |msg: String| Error::model(&path, msg);
        let file = &spec.text_embeddings;
        crate::head::verify_pinned(file, spec.text_embeddings_sha256.as_deref()).map_err(err)?;
        let f = std::fs::File::open(file).map_err(|e| err(format!("cannot open {}: {e}", file.display())))?;
        let npy = npyz::NpyFile::new(std::io::BufReader::new(f))
            .map_err(|e| err(format!("{} is not a .npy file: {e}", file.display())))?;
        let shape = npy.shape().to_vec();
        let [prompts, cols] = shape[..] else {
            return Err(err(format!("{} has shape {shape:?}; expected [prompts, {dim}]", file.display())));
        };
        if cols as usize != dim || npy.order() != npyz::Order::C {
            return Err(err(format!(
                "{} has shape {shape:?} ({:?} order); expected C-ordered [prompts, {dim}] (the image embedding's size)",
                file.display(),
                npy.order()
            )));
        }
        if spec.positives >= prompts as usize {
            return Err(err(format!(
                "zero_shot.positives = {} but {} has {prompts} prompts: the rule needs negative prompts too",
                spec.positives,
                file.display()
            )));
        }
        let mut text: Vec<f32> =
            npy.into_vec().map_err(|e| err(format!("{}: expected float32 values: {e}", file.display())))?;
        for (i, row) in text.chunks_exact_mut(dim).enumerate() {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if !n.is_finite() || n == 0.0 {
                return Err(err(format!("{}: prompt {i} has norm {n}", file.display())));
            }
            row.iter_mut().for_each(|v| *v /= n);
        }
        let threshold = cfg.threshold.unwrap_or(spec.threshold).get();
        let model = Model::load(manifest, cfg.variant.as_deref(), inference)?;
        Ok(ZeroShot { model, text, positives: spec.positives, scale: spec.scale, threshold, position: cfg.position })
    }

    /// Scores decoded pixels: (score, passed).
    fn score(
        &self,
        pre: &mut Preprocessor,
        tensor: &mut Vec<f32>,
        frame: &RgbImage,
        timings: &mut Timings,
    ) -> Result<(f64, bool)> {
        let t = Instant::now();
        pre.run(frame, tensor)?;
        let t1 = Instant::now();
        let image = self.model.run(tensor)?;
        let score = zero_shot_score(&image, &self.text, self.positives, self.scale);
        timings.preprocess_ms += ms(t1 - t);
        timings.zero_shot_ms += ms(t1.elapsed());
        Ok((score, score >= self.threshold))
    }
}

/// The configured gallery: its file, what it holds now (swapped whole by a shore update), and the
/// writer's mutex holding the file's stamp as last loaded or written (updates are serialised, and one
/// that finds the file changed by someone else is refused).
struct GallerySlot {
    path: PathBuf,
    current: RwLock<Arc<Gallery>>,
    /// The file's stamp at the last read or install (`None` inside: no file yet); `None`: opened
    /// read-only ([`GalleryAccess::ReadOnly`]), so nothing may be installed.
    writer: Option<Mutex<Option<FileStamp>>>,
}

/// How an [`Identifier`] opens the configured gallery file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GalleryAccess {
    /// The daemon: read and stamped under the gallery lock, a torn tail cut off, updates installed.
    ReadWrite,
    /// `whaled identify`, `eval`, `check-config`, SIGHUP's check, `gallery build`/`enroll` (which
    /// write through their own locked path): the file is only read, no lock file is created, a torn
    /// tail is left for the next writer, and [`Identifier::replace_gallery`] refuses.
    ReadOnly,
}

impl GallerySlot {
    fn get(&self) -> Arc<Gallery> {
        self.current.read().map_or_else(|p| Arc::clone(&p.into_inner()), |g| Arc::clone(&g))
    }
}

/// Loaded models and thresholds; immutable once built.
pub struct Identifier {
    prefilter: Arc<Model>,
    positive_classes: Vec<usize>,
    /// The pre-filter threshold as `f64` bits: changeable at run time (MQTT `set_threshold`).
    threshold: AtomicU64,
    identification: Option<Identification>,
    zero_shot: Option<ZeroShot>,
    /// `[prefilter] locate = "gate_map"`: where the animal in a passing frame is.
    locator: Option<Locator>,
    jpeg_dct_scaling: bool,
}

/// Per-thread scratch buffers: preprocessors and tensors, reused frame after frame.
pub struct Workspace {
    decoder: Decoder,
    prefilter: Preprocessor,
    embedder: Option<Preprocessor>,
    zero_shot: Option<Preprocessor>,
    /// The gate's map input (built for the first frame's map size).
    map: Option<Preprocessor>,
    tensor: Vec<f32>,
    cosines: Vec<f32>,
    gallery_scratch: Vec<f32>,
    matches: Vec<Match>,
}

/// The outcome of the identification stage for a frame that passed the pre-filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Identified {
    /// Top-k, most probable first, probabilities rounded to 4 dp.
    pub ranked: Vec<Candidate>,
    /// Top-1 probability below `min_confidence`.
    pub low_confidence: bool,
    /// Top-1 cosine below `new_individual_below`.
    pub new_individual: bool,
    /// The L2-normalised embedding (for galleries and multi-frame aggregation).
    pub embedding: Vec<f32>,
    pub gallery_version: Option<u64>,
}

/// What a multi-class pre-filter saw instead of a cetacean: its most probable other category.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub category: String,
    pub probability: f64,
}

/// Everything decided about one frame.
#[derive(Debug, Clone)]
pub struct Assessment {
    pub width: u32,
    pub height: u32,
    pub prefilter_model: String,
    /// 0 when the pre-filter did not run (the zero-shot stage ran first and rejected the frame).
    pub prefilter_score: f64,
    pub prefilter_ran: bool,
    /// A multi-class pre-filter's most probable non-cetacean category (`None`: a two-class or unlabelled
    /// model, or the pre-filter did not run).
    pub prefilter_seen: Option<Seen>,
    pub threshold: f64,
    /// The zero-shot stage's verdict, if it ran.
    pub zero_shot: Option<ZeroShotInfo>,
    /// Every gate that ran passed the frame.
    pub passed: bool,
    /// `None` when the frame was rejected or no identification model is configured.
    pub identified: Option<Identified>,
    pub model_version: String,
    /// The gallery's version when the frame was assessed (`None`: no gallery configured).
    pub gallery_version: Option<u64>,
    /// Where the gate's map put the animal, in the frame's pixels (`None`: the frame was rejected or
    /// `locate = "frame"`).
    pub located: Option<PixelBox>,
    pub timings: Timings,
}

impl Assessment {
    /// Where the animal is, `[x, y, w, h]` in the frame's pixels: the Detection's `bbox`, and what
    /// `whaled eval` measures against a manifest's boxes: the map's box where the frame was located,
    /// else the whole frame, as the upstream reports it.
    pub fn bbox(&self) -> [u32; 4] {
        self.located.map_or([0, 0, self.width, self.height], PixelBox::as_array)
    }
}

/// Checks everything start-up checks, keeping nothing: the manifests and their roles, each ONNX file's
/// SHA-256, the graphs' input and output shapes on the configured backend, and the identification head.
/// Used by `whaled check-config` and by SIGHUP before a reload, so that a config they accept never fails
/// at start-up. Returns one summary line per model.
pub fn check(cfg: &Config) -> Result<Vec<String>> {
    let mut lines = cfg.check_models()?;
    let id = Identifier::from_config(cfg, GalleryAccess::ReadOnly)?;
    if let Some(l) = &id.locator {
        lines.push(l.describe());
    }
    Ok(lines)
}

impl Identifier {
    /// Loads the configured models (and the identification head, and the gallery as `access` says) on
    /// the configured backend.
    pub fn from_config(cfg: &Config, access: GalleryAccess) -> Result<Identifier> {
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
                let head = match &spec.head {
                    Some(files) => Some(IdentificationHead::load(manifest.path(), files, dim)?),
                    None => None,
                };
                let model = Model::load(manifest, idc.variant.as_deref(), &cfg.inference)?;
                let gallery = match &idc.gallery {
                    Some(path) => {
                        let (g, stamp) = open_gallery(path, &model, dim, access)?;
                        log::info!(
                            "gallery {}: version {}, {} photos of {} individuals",
                            path.display(),
                            g.version(),
                            g.len(),
                            g.individuals()
                        );
                        Some(GallerySlot {
                            path: path.clone(),
                            current: RwLock::new(Arc::new(g)),
                            writer: (access == GalleryAccess::ReadWrite).then(|| Mutex::new(stamp)),
                        })
                    }
                    None => None,
                };
                if head.is_none() && gallery.is_none() {
                    // Fine for `whaled gallery build` (which embeds photos); for identification it means
                    // every passing frame is reported as cetacean_unidentified.
                    log::warn!(
                        "model {}: no ArcFace head and no [identification] gallery: nothing to identify against \
                         (frames that pass are reported as cetacean_unidentified)",
                        model.manifest().path().display()
                    );
                }
                let head_slots = head
                    .as_ref()
                    .map(|h| (0..h.slots()).map(|s| (h.id(s).to_string(), s)).collect())
                    .unwrap_or_default();
                Some(Identification {
                    model,
                    dim,
                    head,
                    head_slots,
                    gallery,
                    new_individual_below: idc.new_individual_below.map(|p| p.get()),
                    scale: spec.scale,
                    top_k: idc.top_k.unwrap_or(spec.top_k),
                    min_confidence: idc.min_confidence.unwrap_or(spec.min_confidence).get(),
                    model_version: spec.model_version,
                })
            }
        };
        let zero_shot = match &cfg.zero_shot {
            Some(z) => Some(ZeroShot::load(z, &cfg.inference)?),
            None => None,
        };
        let locator = match cfg.prefilter.locate {
            Locate::Frame => None,
            Locate::GateMap { long_side } => {
                let l = Locator::new(&prefilter, &positive_classes, long_side, &cfg.inference)?;
                log::info!(
                    "locating animals with {}'s map (longer side {long_side} px): bbox and the embedder's crop",
                    prefilter.manifest().name
                );
                Some(l)
            }
        };
        Ok(Identifier {
            zero_shot,
            locator,
            prefilter,
            positive_classes,
            threshold: AtomicU64::new(threshold.to_bits()),
            identification,
            jpeg_dct_scaling: cfg.inference.jpeg_dct_scaling,
        })
    }

    /// The name a multi-class pre-filter gives a frame it passes: its (first) positive class's label.
    pub fn passed_label(&self) -> Option<&str> {
        self.positive_classes.first().and_then(|&c| self.prefilter.manifest().output.label(c))
    }

    pub fn prefilter(&self) -> &Arc<Model> {
        &self.prefilter
    }

    pub fn threshold(&self) -> f64 {
        f64::from_bits(self.threshold.load(Ordering::Relaxed))
    }

    /// Lets every frame through to identification (`whaled identify --no-prefilter`): the pre-filter still
    /// runs and its score is reported, but at threshold 0 it rejects nothing; the zero-shot gate is dropped.
    pub fn open_gates(&mut self) {
        self.set_threshold(0.0);
        self.zero_shot = None;
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
            zero_shot: self.zero_shot.as_ref().map(|z| Preprocessor::new(&z.model.manifest().input)),
            map: None,
            tensor: Vec::new(),
            cosines: Vec::new(),
            gallery_scratch: Vec::new(),
            matches: Vec::new(),
        }
    }

    /// The L2-normalised embedding of a whole photo (no pre-filter): what galleries are built from.
    pub fn embed(&self, ws: &mut Workspace, data: &FrameData, name: &str) -> Result<Vec<f32>> {
        let id = self.identification.as_ref().ok_or_else(|| {
            Error::Input("no identification model configured ([identification] model): nothing to embed with".into())
        })?;
        let pre =
            ws.embedder.as_mut().ok_or_else(|| Error::Input("workspace was made for another identifier".into()))?;
        let decoded = ws.decoder.decode(data, |w, h| pre.fits(w, h), name)?;
        pre.run(decoded.image, &mut ws.tensor)?;
        let mut embedding = id.model.run(&ws.tensor)?;
        finite(&embedding, &id.model)?;
        l2_normalise(&mut embedding);
        Ok(embedding)
    }

    /// Ranks an L2-normalised embedding like a frame's (head + gallery): a sighting's aggregate.
    pub fn rank_embedding(&self, embedding: Vec<f32>) -> Option<Identified> {
        let id = self.identification.as_ref()?;
        Some(id.rank(embedding, &mut Vec::new(), &mut Vec::new(), &mut Vec::new()))
    }

    /// The species the head records for an individual id, if the head knows it.
    pub fn head_species(&self, individual: &str) -> Option<&str> {
        let id = self.identification.as_ref()?;
        let slot = *id.head_slots.get(individual)?;
        id.head.as_ref().map(|h| h.species(slot))
    }

    /// The identification model (`None`: pre-filter only).
    pub fn embedder(&self) -> Option<&Arc<Model>> {
        self.identification.as_ref().map(|i| &i.model)
    }

    /// The gallery in use now, if one is configured.
    pub fn gallery(&self) -> Option<Arc<Gallery>> {
        Some(self.identification.as_ref()?.gallery.as_ref()?.get())
    }

    /// The configured gallery file.
    pub fn gallery_path(&self) -> Option<&Path> {
        self.identification.as_ref()?.gallery.as_ref().map(|g| g.path.as_path())
    }

    /// Installs `new` as the gallery: written to the gallery file atomically, then used for the frames
    /// assessed from now on. Fails, changing nothing, if no gallery is configured, `new` belongs to
    /// another embedder, the file was changed by someone else since it was loaded (a `whaled gallery
    /// enroll` before a reload), or the file cannot be written.
    pub fn replace_gallery(&self, new: Gallery) -> Result<()> {
        let id =
            self.identification.as_ref().ok_or_else(|| Error::Input("no identification model configured".into()))?;
        let slot = id
            .gallery
            .as_ref()
            .ok_or_else(|| Error::Input("no gallery configured ([identification] gallery)".into()))?;
        let writer = slot.writer.as_ref().ok_or_else(|| {
            Error::Input(format!("gallery {}: opened read-only by this command; not changed", slot.path.display()))
        })?;
        new.check_embedder(id.model.sha256(), id.dim, "the new gallery")?;
        // The file work happens under the writer's mutex only: frames keep reading the current gallery.
        let mut stamp = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *stamp = Gallery::install(&slot.path, &new, *stamp)?;
        *slot.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
        Ok(())
    }

    /// The pre-filter score of decoded pixels (probability mass of the positive classes).
    pub fn prefilter_score(&self, ws: &mut Workspace, frame: &RgbImage, timings: &mut Timings) -> Result<f64> {
        Ok(self.score(&mut ws.prefilter, &mut ws.tensor, frame, timings)?.0)
    }

    fn score(
        &self,
        pre: &mut Preprocessor,
        tensor: &mut Vec<f32>,
        frame: &RgbImage,
        timings: &mut Timings,
    ) -> Result<(f64, Option<Seen>)> {
        let t = Instant::now();
        pre.run(frame, tensor)?;
        let t1 = Instant::now();
        let out = self.prefilter.run(tensor)?;
        timings.preprocess_ms += ms(t1 - t);
        timings.prefilter_ms += ms(t1.elapsed());
        let output = &self.prefilter.manifest().output;
        let score = prefilter_score(&out, output.kind, &self.positive_classes);
        // A multi-class pre-filter (its manifest names the classes) also says what it saw instead.
        let seen = output
            .labels
            .as_ref()
            .and_then(|_| top_negative_class(&out, output.kind, &self.positive_classes))
            .and_then(|(c, probability)| output.label(c).map(|l| Seen { category: l.to_string(), probability }));
        Ok((score, seen))
    }

    /// Decodes and assesses one frame; `name` labels errors. A frame that cannot be decoded is
    /// `Err(Error::Image)`; any other error is the models'.
    pub fn assess(&self, ws: &mut Workspace, data: &FrameData, name: &str) -> Result<Assessment> {
        self.assess_with(ws, data, name, &mut |_, _| true)
    }

    /// [`Identifier::assess`], identifying a frame that passes the gates only if `identify(score, box)`
    /// says so (the sighting's frame budget; `box`: where the map located the animal, if it ran):
    /// skipped frames have `identified: None`.
    pub fn assess_with(
        &self,
        ws: &mut Workspace,
        data: &FrameData,
        name: &str,
        identify: &mut dyn FnMut(f64, Option<PixelBox>) -> bool,
    ) -> Result<Assessment> {
        let start = Instant::now();
        let mut timings = Timings::default();
        let Workspace { decoder, prefilter, embedder, zero_shot, map, tensor, cosines, gallery_scratch, matches } = ws;
        let decoded = decoder.decode(data, |w, h| prefilter.fits(w, h), name)?;
        let (width, height) = (decoded.full_width, decoded.full_height);
        timings.decode_ms += ms(start.elapsed());
        let threshold = self.threshold();
        // The zero-shot gate, before or after the pre-filter; a frame goes on only while every gate passes.
        let mut zero_shot_info = None;
        let mut run_zero_shot = |decoder: &mut Decoder, timings: &mut Timings, tensor: &mut Vec<f32>| -> Result<bool> {
            let (Some(zs), Some(pre)) = (&self.zero_shot, zero_shot.as_mut()) else { return Ok(true) };
            let t = Instant::now();
            let decoded = decoder.decode(data, |w, h| pre.fits(w, h), name)?;
            timings.decode_ms += ms(t.elapsed());
            let (score, passed) = zs.score(pre, tensor, decoded.image, timings)?;
            zero_shot_info =
                Some(ZeroShotInfo { model: zs.model.manifest().name.clone(), score, threshold: zs.threshold, passed });
            Ok(passed)
        };
        let before = self.zero_shot.as_ref().is_some_and(|z| z.position == ZeroShotPosition::BeforePrefilter);
        let mut passed = if before { run_zero_shot(decoder, &mut timings, tensor)? } else { true };
        let (mut score, mut prefilter_ran, mut prefilter_seen) = (0.0, false, None);
        if passed {
            let decoded = decoder.decode(data, |w, h| prefilter.fits(w, h), name)?;
            (score, prefilter_seen) = self.score(prefilter, tensor, decoded.image, &mut timings)?;
            prefilter_ran = true;
            passed = score >= threshold;
        }
        if passed && !before {
            passed = run_zero_shot(decoder, &mut timings, tensor)?;
        }
        // The gate's map on the full-size frame (the crop below comes from the same pixels).
        let located = match (&self.locator, passed) {
            (Some(loc), true) => {
                let t = Instant::now();
                let decoded = decoder.decode(data, |_, _| false, name)?;
                timings.decode_ms += ms(t.elapsed());
                let t = Instant::now();
                let found = loc.locate(decoded.image, map, tensor);
                timings.locate_ms += ms(t.elapsed());
                match found {
                    Ok(found) => Some(found),
                    // The frame passed: it goes on whole, as without the map (never dropped for it).
                    Err(e) => {
                        if let (n, true) = loc.failed() {
                            log::warn!("{name}: not located, identified on the whole frame ({n} so far): {e}");
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        let identified = match (&self.identification, passed && identify(score, located)) {
            (Some(id), true) => {
                let pre = embedder
                    .as_mut()
                    .ok_or_else(|| Error::Input("workspace was made for another identifier".into()))?;
                let t = Instant::now();
                let crop;
                let image = match located {
                    // The animal with a margin, cut from the full-size decode (the map's own pixels).
                    Some(b) => {
                        crop = crate::locate::crop(decoder.decode(data, |_, _| false, name)?.image, b);
                        &crop
                    }
                    None => decoder.decode(data, |w, h| pre.fits(w, h), name)?.image,
                };
                timings.decode_ms += ms(t.elapsed());
                let t = Instant::now();
                pre.run(image, tensor)?;
                let t1 = Instant::now();
                let mut embedding = id.model.run(tensor)?;
                finite(&embedding, &id.model)?;
                l2_normalise(&mut embedding);
                timings.preprocess_ms += ms(t1 - t);
                let found = id.rank(embedding, cosines, gallery_scratch, matches);
                timings.identification_ms += ms(t1.elapsed());
                Some(found)
            }
            _ => None,
        };
        timings.total_ms = ms(start.elapsed());
        let gallery_version = match &identified {
            Some(found) => found.gallery_version,
            None => self.gallery().map(|g| g.version()),
        };
        Ok(Assessment {
            width,
            height,
            prefilter_model: self.prefilter.manifest().name.clone(),
            prefilter_score: score,
            prefilter_ran,
            prefilter_seen,
            threshold,
            zero_shot: zero_shot_info,
            passed,
            identified,
            model_version: self.model_version(),
            gallery_version,
            located,
            timings,
        })
    }
}

/// An embedding with NaN or infinite values (an fp16 overflow, a broken model) identifies nobody: an
/// inference error, never a ranking of garbage.
fn finite(embedding: &[f32], model: &Model) -> Result<()> {
    if embedding.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    Err(Error::Inference {
        backend: model.backend_kind().name(),
        model: model.manifest().name.clone(),
        msg: "the embedding has NaN or infinite values".into(),
    })
}

/// Opens the configured gallery and checks it belongs to `model`; for a writer with the file's stamp,
/// taken under the gallery lock together with the read (`None`: no file yet), for
/// [`Identifier::replace_gallery`]. A reader writes nothing.
fn open_gallery(path: &Path, model: &Model, dim: usize, access: GalleryAccess) -> Result<(Gallery, Option<FileStamp>)> {
    let empty = || {
        // Written on the first change (an enrolment or an update from shore).
        log::info!("gallery {}: no such file yet; starting with an empty gallery", path.display());
        Gallery::empty(dim, model.sha256())
    };
    let (g, stamp) = match access {
        GalleryAccess::ReadWrite => match Gallery::load(path)? {
            Some((g, stamp)) => (g, Some(stamp)),
            None => return Ok((empty()?, None)),
        },
        GalleryAccess::ReadOnly if path.exists() => (Gallery::open(path)?, None),
        GalleryAccess::ReadOnly => return Ok((empty()?, None)),
    };
    g.check_embedder(model.sha256(), dim, &format!("gallery {}", path.display()))?;
    Ok((g, stamp))
}

/// What a candidate index of the combined ranking stands for.
#[derive(Clone, Copy)]
enum Slot {
    Head(usize),
    /// A gallery row (the nearest photo of an individual the head does not know, or knows less well).
    Gallery(usize),
}

impl Identification {
    fn rank(
        &self,
        embedding: Vec<f32>,
        cosines: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
        matches: &mut Vec<Match>,
    ) -> Identified {
        let gallery = self.gallery.as_ref().map(GallerySlot::get);
        Ranker {
            head: self.head.as_ref(),
            head_slots: &self.head_slots,
            gallery: gallery.as_deref(),
            scale: self.scale,
            top_k: self.top_k,
            min_confidence: self.min_confidence,
            new_individual_below: self.new_individual_below,
        }
        .rank(embedding, cosines, scratch, matches)
    }
}

/// The identification rule over a head and a gallery, apart from any model (so it is tested alone).
pub struct Ranker<'a> {
    pub head: Option<&'a IdentificationHead>,
    /// Head slot of each head individual id.
    pub head_slots: &'a HashMap<String, usize>,
    pub gallery: Option<&'a Gallery>,
    pub scale: f64,
    pub top_k: usize,
    pub min_confidence: f64,
    pub new_individual_below: Option<f64>,
}

impl Ranker<'_> {
    /// Ranks an L2-normalised embedding against the head and the gallery together.
    ///
    /// The rule (ARCHITECTURE.md, "Identification"): every active head slot scores its cosine; every
    /// gallery individual scores the cosine of its nearest photo; an individual in both keeps the larger
    /// (and that source). Probabilities are the upstream softmax of `scale` x cosine over all of them, so
    /// with no gallery the answer is exactly upstream's.
    pub fn rank(
        &self,
        embedding: Vec<f32>,
        cosines: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
        matches: &mut Vec<Match>,
    ) -> Identified {
        match self.head {
            Some(h) => h.cosines(&embedding, cosines),
            None => cosines.clear(),
        }
        let mut slots: Vec<Slot> = (0..cosines.len()).map(Slot::Head).collect();
        let gallery = self.gallery;
        if let Some(g) = &gallery {
            g.nearest(&embedding, scratch, matches);
            for m in matches.iter() {
                match self.head_slots.get(g.individual(m.individual)) {
                    Some(&s) if m.cosine > cosines[s] => {
                        cosines[s] = m.cosine;
                        slots[s] = Slot::Gallery(m.row);
                    }
                    Some(_) => {}
                    None => {
                        cosines.push(m.cosine);
                        slots.push(Slot::Gallery(m.row));
                    }
                }
            }
        }
        let ranked = rank(cosines, self.scale, self.top_k);
        // Nobody to compare with (an empty gallery and no head): not a low-confidence answer but no
        // answer; with `new_individual_below` set it is a new individual.
        let low_confidence = ranked.first().is_some_and(|r| r.probability < self.min_confidence);
        let new_individual = match (self.new_individual_below, ranked.first()) {
            (Some(t), Some(r)) => f64::from(cosines[r.slot]) < t,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let ranked = ranked
            .iter()
            .map(|r| {
                let (class_animal, id_animal, source) = match (slots[r.slot], self.head, gallery) {
                    (Slot::Head(s), Some(h), _) => (h.id(s).to_string(), h.species(s).to_string(), MatchSource::Head),
                    (Slot::Gallery(row), _, Some(g)) => {
                        let row = &g.rows()[row];
                        (row.id.clone(), row.species.clone(), MatchSource::Gallery)
                    }
                    // Unreachable by construction: head slots exist only with a head, gallery slots only
                    // with a gallery.
                    _ => (String::new(), "unknown".to_string(), MatchSource::Head),
                };
                Candidate {
                    class_animal,
                    id_animal,
                    probability: round4(r.probability),
                    source,
                    cosine: round4(f64::from(cosines[r.slot])),
                }
            })
            .collect();
        Identified { ranked, low_confidence, new_individual, embedding, gallery_version: gallery.map(|g| g.version()) }
    }
}

/// The wire record of an assessment: the upstream decision table (see `detection.rs` for the sentinels).
impl Detection {
    /// The record for an assessed frame.
    pub fn from_assessment(a: &Assessment, meta: &FrameMeta, device_id: &str) -> Detection {
        let mut d = Detection::base(meta, device_id, a.model_version.clone());
        d.bbox = a.bbox();
        // cetacean_score: the pre-filter's score, or the zero-shot score when it rejected the frame first.
        d.cetacean_score = match (&a.zero_shot, a.prefilter_ran) {
            (Some(z), false) => round4(z.score),
            _ => round4(a.prefilter_score),
        };
        d.is_cetacean = a.passed;
        // The category seen goes out only when the pre-filter itself rejected the frame.
        let seen = a.prefilter_seen.as_ref().filter(|_| a.prefilter_score < a.threshold);
        d.prefilter = a.prefilter_ran.then(|| PrefilterInfo {
            model: a.prefilter_model.clone(),
            score: a.prefilter_score,
            threshold: a.threshold,
            category: seen.map(|s| s.category.clone()),
            category_probability: seen.map(|s| s.probability),
        });
        d.zero_shot = a.zero_shot.clone();
        d.timings = a.timings.clone();
        d.gallery_version = a.gallery_version;
        if !a.passed {
            d.rejected = true;
            d.rejection_reason = Some(RejectionReason::NotAMarineMammal);
            return d;
        }
        match &a.identified {
            None => d.id_animal = "cetacean_unidentified".into(),
            Some(found) if found.ranked.is_empty() => {
                d.id_animal = "cetacean_unidentified".into();
                if found.new_individual {
                    d.class_animal = "new_individual".into();
                }
            }
            Some(found) => {
                if let Some(top) = found.ranked.first() {
                    d.id_animal = top.id_animal.clone();
                    d.probability = top.probability;
                    d.identification = Some(IdentificationInfo {
                        source: top.source,
                        cosine: top.cosine,
                        new_individual: found.new_individual,
                    });
                    if found.new_individual {
                        // Nobody known is close enough: the nearest known individuals are all candidates.
                        d.class_animal = "new_individual".into();
                        d.candidates = found.ranked.clone();
                    } else {
                        d.class_animal = top.class_animal.clone();
                        d.candidates = found.ranked[1..].to_vec();
                    }
                }
                if found.low_confidence {
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
            prefilter_ran: true,
            prefilter_seen: None,
            threshold: 0.1,
            zero_shot: None,
            passed,
            identified,
            model_version: "effb4-arcface-v1".into(),
            gallery_version: Some(3),
            located: None,
            timings: Timings { decode_ms: 1.5, prefilter_ms: 2.0, total_ms: 4.5, ..Timings::default() },
        }
    }

    fn meta() -> FrameMeta {
        FrameMeta { image_ind: "f.jpg".into(), source: "/p/f.jpg".into(), captured_at: SystemTime::UNIX_EPOCH }
    }

    fn cand(id: &str, sp: &str, p: f64) -> Candidate {
        Candidate {
            class_animal: id.into(),
            id_animal: sp.into(),
            probability: p,
            source: MatchSource::Head,
            cosine: 0.5,
        }
    }

    fn found(ranked: Vec<Candidate>, low_confidence: bool, new_individual: bool) -> Identified {
        Identified { ranked, low_confidence, new_individual, embedding: vec![1.0], gallery_version: Some(3) }
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// Head and gallery ranked together, checked against a brute-force union computed here: each id's
    /// best cosine over its head row and gallery photos, softmax of 30 x cosine over all ids.
    #[test]
    fn head_and_gallery_rank_as_one_softmax() {
        let vecs: Vec<Vec<f32>> = (0..9u32)
            .map(|i| unit(&(0..8u32).map(|j| ((i * 31 + j * 17) % 13) as f32 - 6.0).collect::<Vec<_>>()))
            .collect();
        let head_ids = ["a", "b", "c", "d"];
        let head = IdentificationHead::from_parts(
            8,
            vecs[..4].concat(),
            head_ids.iter().map(|s| s.to_string()).collect(),
            vec!["sp_head".into(); 4],
        )
        .unwrap();
        let head_slots: HashMap<String, usize> = head_ids.iter().enumerate().map(|(i, s)| (s.to_string(), i)).collect();
        let mut g = Gallery::empty(8, &"a".repeat(64)).unwrap();
        let gallery_rows = [("b", 4), ("x", 5), ("c", 6), ("x", 7), ("y", 8)];
        let d = crate::gallery::Delta {
            dim: 8,
            embedder_sha256: "a".repeat(64),
            base_version: 0,
            base_content_sha256: g.content_sha256(),
            version: 7,
            removes: vec![],
            adds: gallery_rows
                .iter()
                .map(|(id, v)| {
                    crate::gallery::Row::new(id, "sp_gal", "p.jpg", "t", SystemTime::UNIX_EPOCH, vecs[*v].clone())
                        .unwrap()
                })
                .collect(),
        };
        g = g.apply(&d).unwrap();
        for q in 0..9 {
            let query = unit(&vecs[q].iter().zip(&vecs[(q + 3) % 9]).map(|(a, b)| a + 0.5 * b).collect::<Vec<_>>());
            // Brute force.
            let dot = |v: &[f32]| v.iter().zip(&query).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>();
            let mut best: Vec<(String, f64, MatchSource)> = Vec::new();
            let mut offer = |id: &str, c: f64, src: MatchSource| match best.iter_mut().find(|e| e.0 == id) {
                Some(e) if c > e.1 => *e = (id.to_string(), c, src),
                Some(_) => {}
                None => best.push((id.to_string(), c, src)),
            };
            for (i, id) in head_ids.iter().enumerate() {
                offer(id, dot(&vecs[i]), MatchSource::Head);
            }
            for (id, v) in gallery_rows {
                offer(id, dot(&vecs[v]), MatchSource::Gallery);
            }
            let z: f64 = best.iter().map(|e| (30.0 * e.1).exp()).sum();
            best.sort_by(|a, b| b.1.total_cmp(&a.1));
            let ranker = Ranker {
                head: Some(&head),
                head_slots: &head_slots,
                gallery: Some(&g),
                scale: 30.0,
                top_k: 5,
                min_confidence: 0.05,
                new_individual_below: Some(0.9),
            };
            let got = ranker.rank(query.clone(), &mut Vec::new(), &mut Vec::new(), &mut Vec::new());
            assert_eq!(got.ranked.len(), 5);
            assert_eq!(got.gallery_version, Some(7));
            for (c, (id, cos, src)) in got.ranked.iter().zip(&best) {
                assert_eq!((&c.class_animal, c.source), (id, *src), "query {q}: {got:?}");
                assert!((c.probability - round4((30.0 * cos).exp() / z)).abs() <= 1e-4, "query {q}: {c:?}");
                assert!((c.cosine - cos).abs() < 1e-4, "query {q}: {c:?} vs {cos}");
                let sp = if *src == MatchSource::Head { "sp_head" } else { "sp_gal" };
                assert_eq!(c.id_animal, sp);
            }
            assert_eq!(got.new_individual, best[0].1 < 0.9, "query {q}");
        }
        // Gallery only (no head): the same rule over the gallery's individuals.
        let empty = HashMap::new();
        let ranker = Ranker {
            head: None,
            head_slots: &empty,
            gallery: Some(&g),
            scale: 30.0,
            top_k: 5,
            min_confidence: 0.05,
            new_individual_below: None,
        };
        let got = ranker.rank(vecs[5].clone(), &mut Vec::new(), &mut Vec::new(), &mut Vec::new());
        assert_eq!(got.ranked.len(), 4, "b, x, c, y");
        assert_eq!((got.ranked[0].class_animal.as_str(), got.ranked[0].cosine), ("x", 1.0));
        assert!(!got.new_individual);
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
                assessment(true, Some(found(ranked.clone(), false, false))),
                "aaaaaaaaaaaa",
                "beluga",
                0.7024,
                false,
                None,
                2,
            ),
            (
                assessment(true, Some(found(ranked.clone(), true, false))),
                "aaaaaaaaaaaa",
                "beluga",
                0.7024,
                true,
                Some(RejectionReason::LowConfidence),
                2,
            ),
            // Nobody close enough: "new_individual", the nearest known individuals all kept as candidates.
            (assessment(true, Some(found(ranked, false, true))), "new_individual", "beluga", 0.7024, false, None, 3),
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

    /// A multi-class pre-filter's category goes into the record only when the pre-filter rejected the
    /// frame; the JSON has no category keys otherwise.
    #[test]
    fn prefilter_category_only_when_rejected_by_it() {
        let seen = Some(Seen { category: "seabird".into(), probability: 0.91 });
        let mut rejected = assessment(false, None);
        rejected.threshold = 0.5;
        rejected.prefilter_seen = seen.clone();
        let d = Detection::from_assessment(&rejected, &meta(), "dev");
        let p = d.prefilter.clone().unwrap();
        assert_eq!((p.category.as_deref(), p.category_probability), (Some("seabird"), Some(0.91)));
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["prefilter"]["category"], "seabird");
        let mut passed = assessment(true, None);
        passed.prefilter_seen = seen;
        let d = Detection::from_assessment(&passed, &meta(), "dev");
        let p = d.prefilter.clone().unwrap();
        assert_eq!((p.category, p.category_probability), (None, None));
        let json = serde_json::to_value(&d).unwrap();
        assert!(json["prefilter"].get("category").is_none(), "{json}");
    }
}
