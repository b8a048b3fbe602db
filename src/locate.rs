//! Where the animal is: the gate's class-activation map (`[prefilter] locate = "gate_map"`).
//!
//! A vessel's camera sees a whale as a small part of a wide frame, and the upstream stretches the whole
//! photo to the embedder's 512x512 (its users' photographers crop). The gate is a convolutional backbone,
//! a global average pool and a linear head (`Gemm`); the head is linear, so applying it to every feature
//! cell before the pool gives a map of class logits whose mean over the cells *is* the whole-image
//! answer. [`Locator`] runs the gate's graph cut at its pool ([`feature_graph`], an ONNX rewrite done at
//! load: the file on disk is the verified gate, nothing extra ships) on the whole decoded frame resized
//! to a longer side of `long_side` px (the aspect ratio kept, rounded to the backbone's 32 px stride),
//! applies the head to each cell, and boxes the cells whose P(positive) is at least half the peak's,
//! 4-connected to the peak ([`box_from_map`]). The pipeline then embeds a crop of the decoded frame
//! around that box, and reports the box as the Detection's `bbox`.
//!
//! What it decides and what it does not: the frame's pass/reject stays the whole-frame gate's (a max over
//! hundreds of cells of a head trained on whole images passes many more sharks and seals:
//! models/README.md); the map only says *where*, for frames that passed. One box per frame: the peak's
//! component (a group of animals close together is one box).
//!
//! A plan is built per map size (a camera's frames all have one); the last [`PLANS`] are kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use tract_onnx::pb::{
    self, tensor_shape_proto::dimension::Value as Dim, type_proto::Value as TypeValue, AttributeProto, ModelProto,
    NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use crate::config::InferenceConfig;
use crate::error::{Error, Result};
use crate::manifest::{Layout, ModelManifest, OutputKind, Resize, Variant};
use crate::model::{read_verified, Model};
use crate::preprocess::Preprocessor;
use image::RgbImage;

/// The backbone's total stride: one feature cell per 32x32 input pixels (EfficientNet, ResNet, MobileNet).
pub const STRIDE: u32 = 32;
/// A cell belongs to the box when its P(positive) is at least this fraction of the peak's (evidence (b)
/// in models/README.md: 0.3 / 0.5 / 0.7 gave IoU >= 0.5 on 50 / 67 / 69 % of the drawn boxes).
pub const REL: f32 = 0.5;
/// How many map sizes keep a built plan.
pub const PLANS: usize = 4;
/// The crop given to the embedder: the box grown by this fraction of its width and height on each side
/// (the animal's edges, which the map's 32 px cells cut through), clipped to the frame.
pub const MARGIN: f64 = 0.15;
/// The output name of the rewritten graph.
const OUTPUT: &str = "whaled_feature_map";

/// A box in pixels of some image: `x`, `y`, width, height (width and height >= 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelBox {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl PixelBox {
    /// The same box in an image `sx` times as wide and `sy` times as tall, clipped to `(max_w, max_h)`.
    pub fn scaled(self, sx: f64, sy: f64, max_w: u32, max_h: u32) -> PixelBox {
        let x0 = (f64::from(self.x) * sx).floor().clamp(0.0, f64::from(max_w.saturating_sub(1)));
        let y0 = (f64::from(self.y) * sy).floor().clamp(0.0, f64::from(max_h.saturating_sub(1)));
        let x1 = (f64::from(self.x + self.w) * sx).ceil().clamp(x0 + 1.0, f64::from(max_w.max(1)));
        let y1 = (f64::from(self.y + self.h) * sy).ceil().clamp(y0 + 1.0, f64::from(max_h.max(1)));
        PixelBox { x: x0 as u32, y: y0 as u32, w: (x1 - x0) as u32, h: (y1 - y0) as u32 }
    }

    /// The box grown by `margin` x its size on every side, clipped to a `width` x `height` image.
    pub fn grown(self, margin: f64, width: u32, height: u32) -> PixelBox {
        let (mx, my) = (f64::from(self.w) * margin, f64::from(self.h) * margin);
        let x0 = (f64::from(self.x) - mx).floor().max(0.0);
        let y0 = (f64::from(self.y) - my).floor().max(0.0);
        let x1 = (f64::from(self.x + self.w) + mx).ceil().min(f64::from(width)).max(x0 + 1.0);
        let y1 = (f64::from(self.y + self.h) + my).ceil().min(f64::from(height)).max(y0 + 1.0);
        PixelBox { x: x0 as u32, y: y0 as u32, w: (x1 - x0) as u32, h: (y1 - y0) as u32 }
    }

    pub fn as_array(self) -> [u32; 4] {
        [self.x, self.y, self.w, self.h]
    }
}

/// The map input size for a `width` x `height` frame: the longer side `long_side`, the aspect ratio
/// kept, each side rounded to a multiple of [`STRIDE`] (at least one cell).
pub fn map_size(width: u32, height: u32, long_side: u32) -> (u32, u32) {
    let s = f64::from(long_side) / f64::from(width.max(height).max(1));
    let side = |v: u32| ((f64::from(v) * s / f64::from(STRIDE)).round().max(1.0) as u32) * STRIDE;
    (side(width), side(height))
}

/// The box around the peak of a `cols` x `rows` probability map (row-major): the cells with at least
/// `rel` x the peak's probability, 4-connected to the peak, in map-input pixels (cells of [`STRIDE`]).
/// `None` for an empty map or one without a finite peak.
pub fn box_from_map(p: &[f32], cols: usize, rows: usize, rel: f32) -> Option<PixelBox> {
    if cols == 0 || rows == 0 || p.len() != cols * rows {
        return None;
    }
    let (peak, &top) =
        p.iter().enumerate().filter(|(_, v)| v.is_finite()).max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
    let keep = |i: usize| p[i].is_finite() && p[i] >= rel * top;
    let mut seen = vec![false; p.len()];
    let mut stack = vec![peak];
    seen[peak] = true;
    let (mut x0, mut y0, mut x1, mut y1) = (peak % cols, peak / cols, peak % cols, peak / cols);
    while let Some(i) = stack.pop() {
        let (x, y) = (i % cols, i / cols);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        let mut visit = |j: usize| {
            if !seen[j] && keep(j) {
                seen[j] = true;
                stack.push(j);
            }
        };
        if x > 0 {
            visit(i - 1);
        }
        if x + 1 < cols {
            visit(i + 1);
        }
        if y > 0 {
            visit(i - cols);
        }
        if y + 1 < rows {
            visit(i + cols);
        }
    }
    let s = STRIDE as usize;
    Some(PixelBox {
        x: (x0 * s) as u32,
        y: (y0 * s) as u32,
        w: ((x1 - x0 + 1) * s) as u32,
        h: ((y1 - y0 + 1) * s) as u32,
    })
}

/// The gate's linear head, read from its `Gemm`: `weights[k * channels + c]`, `bias[k]`.
#[derive(Debug, Clone)]
pub struct Head {
    pub classes: usize,
    pub channels: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl Head {
    /// The head's logits at every cell of a channel-major feature map (`channels` x `cells`):
    /// `out[cell * classes + k]`. Accumulated channel by channel over contiguous feature rows (f32, as
    /// the graph computes), so a 1000-class head costs one pass over the features per class block.
    pub fn cell_logits(&self, features: &[f32], cells: usize) -> Vec<f64> {
        let mut acc = vec![0f32; self.classes * cells];
        for (c, row) in features.chunks_exact(cells).take(self.channels).enumerate() {
            for (k, out) in acc.chunks_exact_mut(cells).enumerate() {
                let w = self.weights[k * self.channels + c];
                for (o, &f) in out.iter_mut().zip(row) {
                    *o += w * f;
                }
            }
        }
        let mut logits = vec![0f64; cells * self.classes];
        for (k, out) in acc.chunks_exact(cells).enumerate() {
            for (cell, &v) in out.iter().enumerate() {
                logits[cell * self.classes + k] = f64::from(v + self.bias[k]);
            }
        }
        logits
    }

    /// P(any of `positive`) at every cell: [`Head::cell_logits`] and a softmax per cell.
    pub fn cell_probabilities(&self, features: &[f32], cells: usize, positive: &[usize]) -> Vec<f32> {
        self.cell_logits(features, cells)
            .chunks_exact(self.classes)
            .map(|logits| {
                let probs = crate::scoring::softmax(logits.iter().copied());
                positive.iter().filter_map(|&c| probs.get(c)).sum::<f64>() as f32
            })
            .collect()
    }
}

/// The gate's graph cut at its global average pool: input `input` as `[1, 3, height, width]`, one output
/// `whaled_feature_map` `[1, channels * cells]` (the pool's input, flattened), and the head the cut took
/// off. Accepts the tail the shipped gates have: `GlobalAveragePool` -> (`Flatten` | `Reshape` |
/// `Squeeze`)* -> `Gemm` (alpha = beta = 1) -> (`Identity` | `Softmax` | shape-only)* -> the output; a
/// graph without one is refused, saying why.
pub fn feature_graph(
    onnx: &[u8],
    input: &str,
    width: u32,
    height: u32,
) -> std::result::Result<(Vec<u8>, Head), String> {
    let mut model = ModelProto::decode(onnx).map_err(|e| format!("cannot parse the ONNX file: {e}"))?;
    let graph = model.graph.as_mut().ok_or("the ONNX file has no graph")?;
    // The pool that feeds the head (squeeze-and-excitation blocks have pools of their own).
    let pools: Vec<&NodeProto> = graph.node.iter().filter(|n| n.op_type == "GlobalAveragePool").collect();
    if pools.is_empty() {
        return Err("locating needs a gate with a GlobalAveragePool before its head; this graph has none".into());
    }
    let (features, gemm) =
        pools.iter().find_map(|pool| head_after(graph, pool).map(|gemm| (pool.input.first().cloned(), gemm))).ok_or(
            "locating needs a gate whose pool feeds its last linear layer (pool -> Gemm -> output); this gate \
             computes more after its pool",
        )?;
    let features = features.ok_or("the GlobalAveragePool has no input")?;
    let attr = |name: &str| gemm.attribute.iter().find(|a| a.name == name);
    let int = |name: &str, default: i64| attr(name).map_or(default, |a: &AttributeProto| a.i);
    let float = |name: &str| attr(name).map_or(1.0, |a: &AttributeProto| a.f);
    if int("transA", 0) != 0 || float("alpha") != 1.0 || float("beta") != 1.0 {
        return Err("the head's Gemm has transA, alpha or beta set; locating supports the plain linear head".into());
    }
    let trans_b = int("transB", 0) != 0;
    let tensor = |name: Option<&String>| -> std::result::Result<(Vec<i64>, Vec<f32>), String> {
        let name = name.ok_or("the head's Gemm lacks an input")?;
        let t = graph
            .initializer
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| format!("the head's `{name}` is not a constant"))?;
        Ok((t.dims.clone(), floats(t)?))
    };
    let (wd, w) = tensor(gemm.input.get(1))?;
    let (classes, channels) = match (&wd[..], trans_b) {
        (&[k, c], true) | (&[c, k], false) if k > 0 && c > 0 => (k as usize, c as usize),
        _ => return Err(format!("the head's weight has shape {wd:?}, not a matrix")),
    };
    if w.len() != classes * channels {
        return Err(format!("the head's weight holds {} values for shape {wd:?}", w.len()));
    }
    let weights = if trans_b {
        w
    } else {
        (0..classes).flat_map(|k| (0..channels).map(move |c| (k, c))).map(|(k, c)| w[c * classes + k]).collect()
    };
    let bias = match gemm.input.get(2).filter(|s| !s.is_empty()) {
        None => vec![0.0; classes],
        Some(name) => {
            let (_, b) = tensor(Some(name))?;
            match b.len() {
                n if n == classes => b,
                1 => vec![b[0]; classes],
                n => return Err(format!("the head's bias has {n} values for {classes} classes")),
            }
        }
    };

    // The new graph: every node the features need, then a Flatten to [1, channels * cells].
    let mut needed = std::collections::HashSet::from([features.clone()]);
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let mut nodes: Vec<NodeProto> =
        std::mem::take(&mut graph.node).into_iter().zip(keep).filter_map(|(n, k)| k.then_some(n)).collect();
    nodes.push(NodeProto {
        input: vec![features],
        output: vec![OUTPUT.to_string()],
        name: "whaled_flatten_features".into(),
        op_type: "Flatten".into(),
        attribute: vec![AttributeProto {
            name: "axis".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        }],
        ..Default::default()
    });
    graph.node = nodes;
    graph.initializer.retain(|t| needed.contains(&t.name));
    graph.value_info.clear();
    let image =
        graph.input.iter_mut().find(|i| i.name == input).ok_or_else(|| format!("the graph has no input `{input}`"))?;
    image.r#type = Some(float_type(&[1, 3, i64::from(height), i64::from(width)]));
    if !needed.contains(input) {
        return Err(format!("the features before the pool do not depend on the input `{input}`"));
    }
    // Keep the image input and the initializers an old (IR < 4) file also lists as inputs.
    graph.input.retain(|i| i.name == input || graph_initialised(&graph.initializer, &i.name));
    graph.output = vec![ValueInfoProto { name: OUTPUT.into(), r#type: Some(float_type(&[])), ..Default::default() }];
    let bytes = model.encode_to_vec();
    Ok((bytes, Head { classes, channels, weights, bias }))
}

fn graph_initialised(initializers: &[TensorProto], name: &str) -> bool {
    initializers.iter().any(|t| t.name == name)
}

/// The Gemm `pool` feeds through shape-only ops, if that Gemm's result is the graph's output up to ops
/// that keep the class scores (Identity, Softmax, shape-only).
fn head_after(graph: &pb::GraphProto, pool: &NodeProto) -> Option<NodeProto> {
    let only_consumer = |value: &String| -> Option<&NodeProto> {
        let mut c = graph.node.iter().filter(|n| n.input.iter().any(|i| i == value));
        let first = c.next()?;
        c.next().is_none().then_some(first)
    };
    let mut value = pool.output.first()?.clone();
    let gemm = loop {
        let n = only_consumer(&value)?;
        match n.op_type.as_str() {
            "Flatten" | "Reshape" | "Squeeze" => value = n.output.first()?.clone(),
            "Gemm" if n.input.first() == Some(&value) => break n.clone(),
            _ => return None,
        }
    };
    let mut value = gemm.output.first()?.clone();
    while !graph.output.iter().any(|o| o.name == value) {
        let n = only_consumer(&value)?;
        if !matches!(n.op_type.as_str(), "Identity" | "Softmax" | "Flatten" | "Reshape" | "Squeeze") {
            return None;
        }
        value = n.output.first()?.clone();
    }
    Some(gemm)
}

/// A float tensor type; `dims` empty: rank unknown.
fn float_type(dims: &[i64]) -> TypeProto {
    TypeProto {
        value: Some(TypeValue::TensorType(pb::type_proto::Tensor {
            elem_type: pb::tensor_proto::DataType::Float as i32,
            shape: (!dims.is_empty()).then(|| TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| pb::tensor_shape_proto::Dimension { value: Some(Dim::DimValue(d)), ..Default::default() })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
}

/// A float32 initializer's values (`float_data` or little-endian `raw_data`).
fn floats(t: &TensorProto) -> std::result::Result<Vec<f32>, String> {
    if t.data_type != pb::tensor_proto::DataType::Float as i32 {
        return Err(format!("the head's `{}` is not float32", t.name));
    }
    if !t.float_data.is_empty() {
        return Ok(t.float_data.clone());
    }
    if !t.raw_data.len().is_multiple_of(4) {
        return Err(format!("the head's `{}` has {} raw bytes", t.name, t.raw_data.len()));
    }
    Ok(t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A built map plan: (map width, map height) and its model.
type Plan = ((u32, u32), Arc<Model>);

/// The gate's map, built from its manifest: see the module docs.
pub struct Locator {
    manifest: ModelManifest,
    variant: Variant,
    /// The gate file's bytes as verified at start-up, and their SHA-256 (cut again for each map size).
    onnx: Arc<[u8]>,
    sha256: String,
    inference: InferenceConfig,
    positive: Vec<usize>,
    long_side: u32,
    head: Head,
    /// (map width, map height) -> plan, newest last.
    plans: Mutex<Vec<Plan>>,
    /// Frames the map failed on (see [`Locator::failed`]).
    failures: AtomicU64,
}

impl std::fmt::Debug for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locator").field("gate", &self.manifest.name).field("long_side", &self.long_side).finish()
    }
}

impl Locator {
    /// Cuts `gate` (as loaded for the pre-filter) at its pool, and builds and runs the map for a 16:9
    /// frame once: a gate that cannot be cut, or whose cut graph the backend refuses or answers in another
    /// shape, fails here, at start-up (and in `check-config`), not at the first whale.
    pub fn new(gate: &Model, positive: &[usize], long_side: u32, inference: &InferenceConfig) -> Result<Locator> {
        let manifest = gate.manifest().clone();
        if manifest.input.layout != Layout::Nchw {
            return Err(Error::model(manifest.path(), "locate = \"gate_map\" needs a gate with an NCHW input"));
        }
        let variant = gate.variant().clone();
        let (onnx, sha256) = read_verified(&manifest, &variant)?;
        let (w, h) = map_size(1920, 1080, long_side);
        let (bytes, head) =
            feature_graph(&onnx, &manifest.input.name, w, h).map_err(|e| Error::model(manifest.path(), e))?;
        if head.classes != manifest.output.kind.values() {
            return Err(Error::model(
                manifest.path(),
                format!(
                    "locate: the head after the pool has {} classes, the manifest's output {}",
                    head.classes,
                    manifest.output.kind.values()
                ),
            ));
        }
        if positive.iter().any(|&c| c >= head.classes) {
            return Err(Error::model(
                manifest.path(),
                format!("its positive classes {positive:?} are not all among the head's {} classes", head.classes),
            ));
        }
        let locator = Locator {
            manifest,
            variant,
            onnx: Arc::from(onnx),
            sha256,
            inference: inference.clone(),
            positive: positive.to_vec(),
            long_side,
            head,
            plans: Mutex::new(Vec::new()),
            failures: AtomicU64::new(0),
        };
        let model = locator.insert(w, h, locator.build(w, h, bytes)?);
        model.run(&vec![0.0; model.manifest().input.shape().iter().product()])?;
        Ok(locator)
    }

    /// One line for `whaled check-config`: what was cut and how the map is made.
    pub fn describe(&self) -> String {
        format!(
            "locate: gate_map, {} cut at its pool ({} channels, a {}-class head per {STRIDE} px cell), longer side {} px",
            self.manifest.name, self.head.channels, self.head.classes, self.long_side
        )
    }

    fn plans(&self) -> std::sync::MutexGuard<'_, Vec<Plan>> {
        self.plans.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The plan for a `width` x `height` map input, built on first use (outside the lock: other workers
    /// keep using the plans they have while one is built; two workers may build the same size once).
    fn plan(&self, width: u32, height: u32) -> Result<Arc<Model>> {
        {
            let mut plans = self.plans();
            if let Some(i) = plans.iter().position(|(k, ..)| *k == (width, height)) {
                let entry = plans.remove(i);
                let model = entry.1.clone();
                plans.push(entry);
                return Ok(model);
            }
        }
        let (bytes, _) = feature_graph(&self.onnx, &self.manifest.input.name, width, height)
            .map_err(|e| Error::model(self.manifest.path(), e))?;
        let model = self.build(width, height, bytes)?;
        Ok(self.insert(width, height, model))
    }

    /// The backend's model for the graph [`feature_graph`] cut for a `width` x `height` input.
    fn build(&self, width: u32, height: u32, bytes: Vec<u8>) -> Result<Arc<Model>> {
        let cells = (width / STRIDE) as usize * (height / STRIDE) as usize;
        let mut manifest = self.manifest.clone();
        manifest.name = format!("{} (map {width}x{height})", self.manifest.name);
        manifest.input.width = width;
        manifest.input.height = height;
        manifest.input.resize = Resize::Stretch;
        manifest.output.name = OUTPUT.into();
        manifest.output.kind = OutputKind::FeatureMap { channels: self.head.channels, cells };
        manifest.output.labels = None;
        let started = std::time::Instant::now();
        let model =
            Arc::new(Model::from_bytes(manifest, self.variant.clone(), bytes, self.sha256.clone(), &self.inference)?);
        log::debug!(
            "{}: built the map for {width}x{height} inputs in {:.0} ms",
            self.manifest.name,
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(model)
    }

    /// Keeps `model` as the plan for its size (the oldest of [`PLANS`] goes), or returns the one another
    /// worker kept first.
    fn insert(&self, width: u32, height: u32, model: Arc<Model>) -> Arc<Model> {
        let mut plans = self.plans();
        if let Some((_, built)) = plans.iter().find(|(k, _)| *k == (width, height)) {
            return built.clone();
        }
        if plans.len() >= PLANS {
            plans.remove(0);
        }
        plans.push(((width, height), model.clone()));
        model
    }

    /// The box around the peak of `image`'s map, in `image`'s pixels. `pre` and `tensor` are the
    /// caller's scratch (one per worker).
    pub fn locate(&self, image: &RgbImage, pre: &mut Option<Preprocessor>, tensor: &mut Vec<f32>) -> Result<PixelBox> {
        let (iw, ih) = image.dimensions();
        let (w, h) = map_size(iw, ih, self.long_side);
        let model = self.plan(w, h)?;
        let spec = &model.manifest().input;
        if pre.as_ref().is_none_or(|p| p.spec().width != w || p.spec().height != h) {
            *pre = Some(Preprocessor::new(spec));
        }
        let p = pre.as_mut().ok_or_else(|| Error::Input("map preprocessor missing".into()))?;
        p.run(image, tensor)?;
        let features = model.run(tensor)?;
        let (cols, rows) = ((w / STRIDE) as usize, (h / STRIDE) as usize);
        let map = self.head.cell_probabilities(&features, cols * rows, &self.positive);
        let cell_box = box_from_map(&map, cols, rows, REL).ok_or_else(|| Error::Inference {
            backend: model.backend_kind().name(),
            model: model.manifest().name.clone(),
            msg: "the map has no finite cell".into(),
        })?;
        Ok(cell_box.scaled(f64::from(iw) / f64::from(w), f64::from(ih) / f64::from(h), iw, ih))
    }

    /// Counts a frame the map failed on; true when that failure should be logged (the 1st, 2nd, 4th,
    /// 8th...: a broken map says so without a line per frame).
    pub fn failed(&self) -> (u64, bool) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        (n, n.is_power_of_two())
    }
}

/// The embedder's input for a located frame: `image` cut to `located` grown by [`MARGIN`] (clipped).
/// The same pixels go out as the sighting's crop snapshot.
pub fn crop(image: &RgbImage, located: PixelBox) -> RgbImage {
    let g = located.grown(MARGIN, image.width(), image.height());
    image::imageops::crop_imm(image, g.x, g.y, g.w, g.h).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes_keep_the_aspect_in_whole_cells() {
        assert_eq!(map_size(1920, 1080, 640), (640, 352));
        assert_eq!(map_size(1080, 1920, 640), (352, 640));
        assert_eq!(map_size(4000, 3000, 640), (640, 480));
        assert_eq!(map_size(100, 5000, 640), (32, 640));
        assert_eq!(map_size(0, 0, 640), (32, 32));
    }

    #[test]
    fn the_box_is_the_peaks_connected_cells() {
        // 5 x 3 map: a blob at (1..=2, 0..=1), a separate strong cell at (4, 2) below the peak.
        #[rustfmt::skip]
        let p = [
            0.1, 0.6, 0.9, 0.0, 0.0,
            0.0, 0.5, 0.4, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.8,
        ];
        let b = box_from_map(&p, 5, 3, 0.5).unwrap();
        assert_eq!(b, PixelBox { x: 32, y: 0, w: 64, h: 64 });
        // At rel 0.1 the 0.1 cell joins; the 0.8 cell stays apart (not 4-connected).
        let b = box_from_map(&p, 5, 3, 0.1).unwrap();
        assert_eq!(b, PixelBox { x: 0, y: 0, w: 96, h: 64 });
        assert_eq!(box_from_map(&[], 0, 0, 0.5), None);
        assert_eq!(box_from_map(&[f32::NAN; 4], 2, 2, 0.5), None);
        assert_eq!(box_from_map(&[0.5; 3], 2, 2, 0.5), None);
    }

    #[test]
    fn boxes_scale_and_grow_inside_the_frame() {
        let b = PixelBox { x: 32, y: 0, w: 64, h: 64 };
        assert_eq!(b.scaled(3.0, 3.0, 1920, 1080), PixelBox { x: 96, y: 0, w: 192, h: 192 });
        assert_eq!(b.scaled(100.0, 100.0, 1920, 1080), PixelBox { x: 1919, y: 0, w: 1, h: 1080 });
        let g = PixelBox { x: 100, y: 10, w: 200, h: 100 }.grown(0.15, 320, 1000);
        assert_eq!(g, PixelBox { x: 70, y: 0, w: 250, h: 125 });
    }
}
