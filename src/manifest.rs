//! Model manifests: the small TOML file beside every ONNX model that says how to feed it and read it.
//!
//! A manifest is parsed once into [`ModelManifest`], whose fields are already validated (sizes non-zero,
//! std non-zero, crop fraction in (0, 1], role-specific tables present), with every path resolved
//! against the manifest's directory. Whether the ONNX graph really has the declared shapes is checked
//! when a backend loads it (see `crate::model`), because only the backend can read the graph.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::values::{Count, Positive, Probability};

/// Which inference backend runs a model; also keys the manifest's preferred variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Tract,
    Onnxruntime,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Tract => "tract",
            BackendKind::Onnxruntime => "onnxruntime",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    role: RoleName,
    #[serde(default)]
    description: String,
    #[serde(default)]
    random_weights: bool,
    #[serde(default)]
    license: String,
    variants: Vec<RawVariant>,
    #[serde(default)]
    preferred_variant: BTreeMap<BackendKind, String>,
    input: RawInput,
    output: RawOutput,
    prefilter: Option<RawPrefilter>,
    embedder: Option<RawEmbedder>,
    zero_shot: Option<RawZeroShot>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZeroShot {
    text_embeddings: PathBuf,
    text_embeddings_sha256: Option<String>,
    positives: Count,
    scale: Positive,
    threshold: Probability,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RoleName {
    Prefilter,
    Embedder,
    #[serde(rename = "zero_shot")]
    ZeroShot,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: String,
    file: PathBuf,
    sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    width: Count,
    height: Count,
    layout: Layout,
    resize: ResizeName,
    crop_fraction: Option<Positive>,
    interpolation: Interpolation,
    /// `"fast"` (default) or `"pillow"`.
    resampler: Option<Resampler>,
    mean: [f32; 3],
    std: [Positive; 3],
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum ResizeName {
    Stretch,
    CenterCrop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    kind: OutputKindName,
    classes: Option<Count>,
    dim: Option<Count>,
    /// Optional class names (a multi-class pre-filter's categories), one per class.
    labels: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum OutputKindName {
    Logits,
    Probabilities,
    Embedding,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrefilter {
    positive_classes: Vec<usize>,
    threshold: Probability,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedder {
    head: Option<PathBuf>,
    labels: Option<PathBuf>,
    species_map: Option<PathBuf>,
    head_sha256: Option<String>,
    labels_sha256: Option<String>,
    species_map_sha256: Option<String>,
    active_slots: Option<Count>,
    scale: Positive,
    top_k: Count,
    min_confidence: Probability,
    model_version: String,
}

/// Memory layout of the model's input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `[1, 3, H, W]`, PyTorch's layout.
    Nchw,
    /// `[1, H, W, 3]`, TensorFlow's layout.
    Nhwc,
}

/// How a frame becomes the model's input rectangle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resize {
    /// Whole frame to W x H, aspect ratio not kept (what the upstream identification model does).
    Stretch,
    /// Shorter side to `size / fraction`, then the centre W x H (timm's `crop_pct`).
    CenterCrop { fraction: f64 },
}

/// Resampling filter (antialiased convolution, as Pillow does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos3,
}

/// Which implementation resizes frames for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Resampler {
    /// `fast_image_resize` (SIMD), with the crop folded into the resize and JPEG frames decoded at a
    /// reduced DCT scale when that still covers the input: the cheapest path, within +-1 level of
    /// Pillow's pixels.
    #[default]
    Fast,
    /// Pillow's own resize, byte for byte ([`crate::resample`]), on the frame decoded at full size:
    /// what a model trained on Pillow-preprocessed images (the upstream's) sees in training.
    Pillow,
}

/// The validated input description.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    pub resize: Resize,
    pub interpolation: Interpolation,
    pub resampler: Resampler,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl InputSpec {
    /// The input tensor shape, batch 1.
    pub fn shape(&self) -> [usize; 4] {
        let (w, h) = (self.width as usize, self.height as usize);
        match self.layout {
            Layout::Nchw => [1, 3, h, w],
            Layout::Nhwc => [1, h, w, 3],
        }
    }
}

/// What the model's (single used) output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// Unnormalised class scores; softmax gives probabilities.
    Logits { classes: usize },
    /// Class probabilities that already sum to 1.
    Probabilities { classes: usize },
    /// An embedding vector (L2-normalised again by whaled before scoring).
    Embedding { dim: usize },
    /// A convolutional feature map, `channels` x `cells`, flattened channel-major: what
    /// [`crate::locate`] derives from a gate's graph (never read from a manifest file).
    FeatureMap { channels: usize, cells: usize },
}

impl OutputKind {
    /// Number of values in the output tensor.
    pub fn values(self) -> usize {
        match self {
            OutputKind::Logits { classes } | OutputKind::Probabilities { classes } => classes,
            OutputKind::Embedding { dim } => dim,
            OutputKind::FeatureMap { channels, cells } => channels * cells,
        }
    }
}

/// The validated output description.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub name: String,
    pub kind: OutputKind,
    /// The class names, one per class (`[output] labels`), when the manifest gives them: a multi-class
    /// pre-filter reports the top non-cetacean category of a rejected frame by name.
    pub labels: Option<Vec<String>>,
}

impl OutputSpec {
    /// The name of class `c`, if the manifest names its classes.
    pub fn label(&self, c: usize) -> Option<&str> {
        self.labels.as_ref().and_then(|l| l.get(c)).map(String::as_str)
    }
}

/// One ONNX file of a model (fp32, int8, ...), with its expected digest.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub file: PathBuf,
    pub sha256: Option<String>,
}

/// Pre-filter settings: which classes count as "cetacean" and the default threshold.
#[derive(Debug, Clone)]
pub struct PrefilterSpec {
    pub positive_classes: Vec<usize>,
    pub threshold: Probability,
}

/// The ArcFace head files (upstream formats) and how many slots are active.
#[derive(Debug, Clone)]
pub struct HeadFiles {
    pub head: PathBuf,
    pub labels: PathBuf,
    pub species_map: PathBuf,
    /// Expected SHA-256 of each file (`None`: not checked), lowercase hex.
    pub head_sha256: Option<String>,
    pub labels_sha256: Option<String>,
    pub species_map_sha256: Option<String>,
    pub active_slots: usize,
}

/// Identification settings: the ArcFace head (optional: an embedder without one identifies against a
/// gallery only) and the upstream scoring constants.
#[derive(Debug, Clone)]
pub struct EmbedderSpec {
    pub head: Option<HeadFiles>,
    pub scale: f64,
    pub top_k: usize,
    pub min_confidence: Probability,
    pub model_version: String,
}

/// The zero-shot gate (upstream's CLIP rule): an image encoder plus text embeddings of prompts, the
/// first `positives` of which describe a cetacean.
#[derive(Debug, Clone)]
pub struct ZeroShotSpec {
    /// float32 `.npy`, `[prompts, dim]`.
    pub text_embeddings: PathBuf,
    pub text_embeddings_sha256: Option<String>,
    pub positives: usize,
    pub scale: f64,
    pub threshold: Probability,
}

/// What the model is for; each role carries its own settings.
#[derive(Debug, Clone)]
pub enum Role {
    Prefilter(PrefilterSpec),
    Embedder(EmbedderSpec),
    ZeroShot(ZeroShotSpec),
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Prefilter(_) => "prefilter",
            Role::Embedder(_) => "embedder",
            Role::ZeroShot(_) => "zero_shot",
        }
    }
}

/// A parsed, validated model manifest.
#[derive(Debug, Clone)]
pub struct ModelManifest {
    path: PathBuf,
    pub name: String,
    pub description: String,
    pub random_weights: bool,
    pub license: String,
    variants: Vec<Variant>,
    preferred: BTreeMap<BackendKind, String>,
    pub input: InputSpec,
    pub output: OutputSpec,
    pub role: Role,
}

impl ModelManifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let src = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &src)
    }

    /// Validates manifest text; `path` locates it (relative file names resolve against its directory).
    pub fn parse(path: &Path, src: &str) -> Result<Self> {
        let err = |msg: String| Error::model(path, msg);
        let raw: RawManifest = toml::from_str(src).map_err(|e| err(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));

        if raw.variants.is_empty() {
            return Err(err("needs at least one [[variants]] entry (an ONNX file)".into()));
        }
        let mut variants = Vec::with_capacity(raw.variants.len());
        for v in raw.variants {
            if variants.iter().any(|o: &Variant| o.name == v.name) {
                return Err(err(format!("variant `{}` is listed twice", v.name)));
            }
            if let Some(h) = &v.sha256 {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(err(format!("variant `{}`: sha256 must be 64 hex digits, got `{h}`", v.name)));
                }
            }
            variants.push(Variant {
                name: v.name,
                file: dir.join(v.file),
                sha256: v.sha256.map(|h| h.to_ascii_lowercase()),
            });
        }
        for (backend, name) in &raw.preferred_variant {
            if !variants.iter().any(|v| &v.name == name) {
                return Err(err(format!(
                    "preferred_variant.{} = `{name}` names no [[variants]] entry",
                    backend.name()
                )));
            }
        }

        let i = raw.input;
        let resize = match (i.resize, i.crop_fraction) {
            (ResizeName::Stretch, None) => Resize::Stretch,
            (ResizeName::Stretch, Some(_)) => {
                return Err(err("input.crop_fraction only applies to resize = \"center_crop\"".into()))
            }
            (ResizeName::CenterCrop, Some(f)) if f.get() <= 1.0 => Resize::CenterCrop { fraction: f.get() },
            (ResizeName::CenterCrop, Some(f)) => {
                return Err(err(format!("input.crop_fraction must be in (0, 1], got {}", f.get())))
            }
            (ResizeName::CenterCrop, None) => {
                return Err(err("input.resize = \"center_crop\" needs input.crop_fraction (e.g. 0.875)".into()))
            }
        };
        let resampler = i.resampler.unwrap_or_default();
        if resampler == Resampler::Pillow {
            if i.interpolation == Interpolation::Nearest {
                return Err(err(
                    "input.resampler = \"pillow\" supports bilinear, bicubic and lanczos3, not nearest".into()
                ));
            }
            if matches!(resize, Resize::CenterCrop { .. }) && i.width.get() != i.height.get() {
                return Err(err(format!(
                    "input.resampler = \"pillow\" with resize = \"center_crop\" needs a square input (torchvision's \
                     CenterCrop after Resize(int)), got {}x{}",
                    i.width.get(),
                    i.height.get()
                )));
            }
        }
        let input = InputSpec {
            name: i.name,
            width: u32::try_from(i.width.get()).map_err(|_| err("input.width is too large".into()))?,
            height: u32::try_from(i.height.get()).map_err(|_| err("input.height is too large".into()))?,
            layout: i.layout,
            resize,
            interpolation: i.interpolation,
            resampler,
            mean: i.mean,
            std: i.std.map(|s| s.get() as f32),
        };

        let o = raw.output;
        let kind = match (o.kind, o.classes, o.dim) {
            (OutputKindName::Logits, Some(c), None) => OutputKind::Logits { classes: c.get() },
            (OutputKindName::Probabilities, Some(c), None) => OutputKind::Probabilities { classes: c.get() },
            (OutputKindName::Embedding, None, Some(d)) => OutputKind::Embedding { dim: d.get() },
            (OutputKindName::Embedding, _, _) => {
                return Err(err("output.kind = \"embedding\" needs output.dim and no output.classes".into()))
            }
            _ => {
                return Err(err(
                    "output.kind = \"logits\"/\"probabilities\" needs output.classes and no output.dim".into()
                ))
            }
        };
        if let Some(labels) = &o.labels {
            let (OutputKind::Logits { classes } | OutputKind::Probabilities { classes }) = kind else {
                return Err(err("output.labels needs output.kind = \"logits\" or \"probabilities\"".into()));
            };
            if labels.len() != classes {
                return Err(err(format!(
                    "output.labels has {} names, but the output has {classes} classes",
                    labels.len()
                )));
            }
            if let Some(bad) = labels.iter().find(|l| l.trim().is_empty() || l.trim() != l.as_str()) {
                return Err(err(format!("output.labels has an empty or padded name `{bad}`")));
            }
            for (i, l) in labels.iter().enumerate() {
                if labels[..i].contains(l) {
                    return Err(err(format!("output.labels names `{l}` twice")));
                }
            }
        }
        let output = OutputSpec { name: o.name, kind, labels: o.labels };

        if raw.role != RoleName::ZeroShot && raw.zero_shot.is_some() {
            return Err(err("a [zero_shot] table needs role = \"zero_shot\"".into()));
        }
        let role = match (raw.role, raw.prefilter, raw.embedder) {
            (RoleName::ZeroShot, None, None) => {
                let Some(z) = raw.zero_shot else {
                    return Err(err("role = \"zero_shot\" needs a [zero_shot] table".into()));
                };
                if !matches!(kind, OutputKind::Embedding { .. }) {
                    return Err(err(
                        "a zero_shot model's output.kind must be \"embedding\" (the image embedding)".into()
                    ));
                }
                if let Some(h) = &z.text_embeddings_sha256 {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(err(format!("zero_shot.text_embeddings_sha256 must be 64 hex digits, got `{h}`")));
                    }
                }
                Role::ZeroShot(ZeroShotSpec {
                    text_embeddings: dir.join(z.text_embeddings),
                    text_embeddings_sha256: z.text_embeddings_sha256.map(|h| h.to_ascii_lowercase()),
                    positives: z.positives.get(),
                    scale: z.scale.get(),
                    threshold: z.threshold,
                })
            }
            (RoleName::ZeroShot, _, _) => {
                return Err(err("role = \"zero_shot\" takes a [zero_shot] table, no [prefilter] or [embedder]".into()))
            }
            (RoleName::Prefilter, Some(p), None) => {
                let classes = match kind {
                    OutputKind::Logits { classes } | OutputKind::Probabilities { classes } => classes,
                    OutputKind::Embedding { .. } | OutputKind::FeatureMap { .. } => {
                        return Err(err("a prefilter's output.kind must be \"logits\" or \"probabilities\"".into()))
                    }
                };
                if p.positive_classes.is_empty() {
                    return Err(err("prefilter.positive_classes is empty: the score would always be 0".into()));
                }
                if let Some(c) = p.positive_classes.iter().find(|&&c| c >= classes) {
                    return Err(err(format!(
                        "prefilter.positive_classes has class {c}, but the output has only {classes} classes"
                    )));
                }
                Role::Prefilter(PrefilterSpec { positive_classes: p.positive_classes, threshold: p.threshold })
            }
            (RoleName::Embedder, None, Some(e)) => {
                if !matches!(kind, OutputKind::Embedding { .. }) {
                    return Err(err("an embedder's output.kind must be \"embedding\"".into()));
                }
                let sha = |key: &str, v: Option<String>| -> Result<Option<String>> {
                    match v {
                        Some(h) if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                            Err(err(format!("embedder.{key} must be 64 hex digits, got `{h}`")))
                        }
                        v => Ok(v.map(|h| h.to_ascii_lowercase())),
                    }
                };
                let head = match (e.head, e.labels, e.species_map, e.active_slots) {
                    (Some(h), Some(l), Some(s), Some(n)) => Some(HeadFiles {
                        head: dir.join(h),
                        labels: dir.join(l),
                        species_map: dir.join(s),
                        head_sha256: sha("head_sha256", e.head_sha256)?,
                        labels_sha256: sha("labels_sha256", e.labels_sha256)?,
                        species_map_sha256: sha("species_map_sha256", e.species_map_sha256)?,
                        active_slots: n.get(),
                    }),
                    (None, None, None, None) => {
                        if e.head_sha256.is_some() || e.labels_sha256.is_some() || e.species_map_sha256.is_some() {
                            return Err(err("embedder: *_sha256 given without the head files".into()));
                        }
                        None
                    }
                    _ => {
                        return Err(err(
                            "embedder: head, labels, species_map and active_slots go together: give all four \
                             (an ArcFace head) or none (identification against a gallery only)"
                                .into(),
                        ))
                    }
                };
                Role::Embedder(EmbedderSpec {
                    head,
                    scale: e.scale.get(),
                    top_k: e.top_k.get(),
                    min_confidence: e.min_confidence,
                    model_version: e.model_version,
                })
            }
            (RoleName::Prefilter, _, _) => {
                return Err(err("role = \"prefilter\" needs a [prefilter] table and no [embedder] table".into()))
            }
            (RoleName::Embedder, _, _) => {
                return Err(err("role = \"embedder\" needs an [embedder] table and no [prefilter] table".into()))
            }
        };

        Ok(ModelManifest {
            path: path.to_path_buf(),
            name: raw.name,
            description: raw.description,
            random_weights: raw.random_weights,
            license: raw.license,
            variants,
            preferred: raw.preferred_variant,
            input,
            output,
            role,
        })
    }

    /// Where this manifest was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }

    /// The variant to run: `requested` by name if given, else the manifest's preference for `backend`,
    /// else the first listed.
    pub fn select_variant(&self, requested: Option<&str>, backend: BackendKind) -> Result<&Variant> {
        let name = requested.or(self.preferred.get(&backend).map(String::as_str));
        match name {
            None => Ok(&self.variants[0]),
            Some(n) => self.variants.iter().find(|v| v.name == n).ok_or_else(|| {
                let known: Vec<&str> = self.variants.iter().map(|v| v.name.as_str()).collect();
                Error::model(&self.path, format!("has no variant `{n}` (it has: {})", known.join(", ")))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFILTER: &str = r#"
name = "t"
role = "prefilter"
[[variants]]
name = "fp32"
file = "m.onnx"
[input]
name = "input"
width = 224
height = 224
layout = "nchw"
resize = "center_crop"
crop_fraction = 0.875
interpolation = "bicubic"
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
[output]
name = "logits"
kind = "logits"
classes = 1000
[prefilter]
positive_classes = [147, 148]
threshold = 0.05
"#;

    fn parse(src: &str) -> Result<ModelManifest> {
        ModelManifest::parse(Path::new("/m/model.toml"), src)
    }

    #[test]
    fn valid_prefilter_manifest() {
        let m = parse(PREFILTER).unwrap();
        assert_eq!(m.input.shape(), [1, 3, 224, 224]);
        assert_eq!(m.input.resize, Resize::CenterCrop { fraction: 0.875 });
        assert_eq!(m.input.resampler, Resampler::Fast);
        let pillow = parse(&PREFILTER.replace("layout =", "resampler = \"pillow\"\nlayout =")).unwrap();
        assert_eq!(pillow.input.resampler, Resampler::Pillow);
        assert_eq!(m.variants()[0].file, Path::new("/m/m.onnx"));
        let Role::Prefilter(p) = &m.role else { panic!("role") };
        assert_eq!(p.positive_classes, vec![147, 148]);
        assert_eq!(m.select_variant(None, BackendKind::Tract).unwrap().name, "fp32");
        let e = m.select_variant(Some("int8"), BackendKind::Tract).unwrap_err().to_string();
        assert!(e.contains("has no variant `int8` (it has: fp32)"), "{e}");
    }

    /// Each edit of the valid manifest must fail with a message that names the problem.
    #[test]
    fn invalid_manifests_name_the_problem() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "positive_classes = [147, 148]",
                "positive_classes = [1000]",
                "has class 1000, but the output has only 1000 classes",
            ),
            ("positive_classes = [147, 148]", "positive_classes = []", "positive_classes is empty"),
            ("threshold = 0.05", "threshold = 5", "expected a probability between 0 and 1, got 5"),
            ("crop_fraction = 0.875", "crop_fraction = 1.5", "crop_fraction must be in (0, 1]"),
            ("crop_fraction = 0.875\n", "", "needs input.crop_fraction"),
            ("std = [0.5, 0.5, 0.5]", "std = [0.5, 0, 0.5]", "expected a finite number greater than 0, got 0"),
            ("layout = \"nchw\"", "layout = \"chw\"", "unknown variant `chw`"),
            ("width = 224", "width = 0", "expected a whole number of at least 1, got 0"),
            ("role = \"prefilter\"", "role = \"embedder\"", "needs an [embedder] table"),
            ("kind = \"logits\"", "kind = \"embedding\"", "needs output.dim"),
            ("name = \"input\"", "name = \"input\"\nsize = 3", "unknown field `size`"),
            (
                "classes = 1000",
                "classes = 1000\nlabels = [\"a\", \"b\"]",
                "output.labels has 2 names, but the output has 1000 classes",
            ),
            ("classes = 1000", "classes = 2\nlabels = [\"a\", \"a\"]", "output.labels names `a` twice"),
            ("classes = 1000", "classes = 2\nlabels = [\"a\", \" \"]", "empty or padded name"),
            (
                "interpolation = \"bicubic\"",
                "interpolation = \"bicubic\"\nresampler = \"pil\"",
                "unknown variant `pil`",
            ),
            (
                "interpolation = \"bicubic\"",
                "interpolation = \"nearest\"\nresampler = \"pillow\"",
                "supports bilinear, bicubic and lanczos3, not nearest",
            ),
            (
                "width = 224",
                "width = 256\nresampler = \"pillow\"",
                "with resize = \"center_crop\" needs a square input",
            ),
        ];
        for (from, to, want) in cases {
            assert!(PREFILTER.contains(from), "bad case {from}");
            let src = PREFILTER.replacen(from, to, 1);
            let e = parse(&src).expect_err(to).to_string();
            assert!(e.contains(want), "{to}: {e}");
            assert!(e.starts_with("model /m/model.toml: "), "{e}");
        }
    }

    #[test]
    fn output_labels_name_the_classes() {
        let src = PREFILTER
            .replace("classes = 1000", "classes = 3\nlabels = [\"cetacean\", \"shark\", \"seabird\"]")
            .replace("[147, 148]", "[0]");
        let m = parse(&src).unwrap();
        assert_eq!(m.output.label(2), Some("seabird"));
        assert_eq!(m.output.label(3), None);
        assert_eq!(parse(PREFILTER).unwrap().output.label(0), None);
    }

    #[test]
    fn errors_carry_line_numbers() {
        let src = PREFILTER.replace("threshold = 0.05", "threshold = 5");
        let e = parse(&src).unwrap_err().to_string();
        assert!(e.contains("line 23"), "{e}");
    }
}
