//! An inverted-residual block's expand 1x1 convolution and the depthwise convolution after it, run as
//! one op, a group of expanded channels at a time, so that the expanded activation never goes to
//! memory.
//!
//! Why: in an EfficientNet-Lite0 the 1x1 op ([`crate::pointwise`]) writes each expanded activation
//! (96 x 112 x 112 floats: 4.8 MB) to memory and the depthwise op ([`crate::depthwise`]) reads it back.
//! With its input hot the 96-channel 112 -> 56 depthwise layer takes 0.24 ms; inside the model, where
//! the input comes from memory, 0.37-0.51 ms (docs/BENCHMARKS.md). onnxruntime's graph stays
//! channel-blocked and its layer takes 0.22 ms.
//!
//! What: [`substitute`] replaces every [`PointwiseConv`] whose only consumer is a [`DepthwiseConv`],
//! directly (the Lite family: the ReLU6 is fused into the 1x1 op) or through a SiLU that nothing else
//! reads (EfficientNet-B0..B7), both for one image, by [`ExpandDepthwise`]; likewise a network's stem
//! conv ([`StemConv`]: its input, the scratch its product reads direct or its im2col matrix, is built
//! first, then its product runs group by group like an expand conv) and the first depthwise conv. For
//! each group of expanded channels (whole 8-channel blocks, about [`GROUP_BYTES`] of expanded planes;
//! whole 16-channel runs where the depthwise conv is channel-blocked) the op runs the 1x1 op's blocks
//! into a thread-local buffer, tract's own SiLU kernel over it where the graph had one, and the
//! depthwise op's planes (or its channel-blocked runs, [`crate::blocked`]) from it into the output.
//! Every step is the same code as the separate ops', with their fused ReLU / ReLU6, so the numbers are
//! theirs. On more than one thread the
//! op runs the two steps apart, as the separate ops would (see [`ExpandDepthwise::compute_apart`]: there
//! the groups were the slower). Measured (docs/BENCHMARKS.md): the B4's 24 -> 144 block at 256x256
//! 13.3 -> 9.8 ms, the gate's 16 -> 96 block at 112x112 1.01 -> 0.70 ms.
//!
//! Where it is not used: wherever either op is not (armv7), batches of more than one image, a 1x1
//! conv whose output is used elsewhere too (a model output, a residual).

use tract_core::internal::*;
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::nn::Silu;

use crate::blocked;
use crate::depthwise::DepthwiseConv;
use crate::pointwise::{PointwiseConv, Pool, BLOCK};
use crate::stem::StemConv;

/// Whether this build fuses the two ops (where both run).
pub const ENABLED: bool = crate::pointwise::ENABLED && crate::depthwise::ENABLED;

/// About how many bytes of expanded planes one group holds: with the depthwise op's scratch and the
/// 1x1 op's input it stays within a 512 KB - 1 MB L2. At least one block (8 planes) whatever the plane
/// (the B4's 256x256 planes: 2 MB, which still halved that block's time against the separate ops), and
/// where the depthwise conv is channel-blocked whole runs of 16 planes (two blocks).
const GROUP_BYTES: usize = 256 * 1024;

/// The expand 1x1 convolution and the depthwise convolution that consumes it. Inputs: the 1x1 op's
/// data, packed weights and bias, then the depthwise op's kernel and bias. Private fields: built only
/// by [`ExpandDepthwise::new`], which checks that the two fit together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExpandDepthwise {
    /// Where the "expand" step is a network's stem conv ([`StemConv`]): its input (the scratch its
    /// product reads direct, or its im2col matrix) is built first, and the stem's product runs over it.
    stem: Option<StemConv>,
    expand: PointwiseConv,
    /// Whether the expanded activation goes through a SiLU (`x * sigmoid(x)`, tract's own kernel)
    /// before the depthwise conv: the EfficientNet-B0..B7 blocks. The 1x1 op's fused ReLU / ReLU6 (the
    /// Lite family) needs no step of its own.
    silu: bool,
    depthwise: DepthwiseConv,
    /// Blocks (of [`BLOCK`] expanded channels) per group.
    group: usize,
}

impl ExpandDepthwise {
    pub fn new(expand: PointwiseConv, silu: bool, depthwise: DepthwiseConv) -> TractResult<ExpandDepthwise> {
        let g = depthwise.geometry();
        ensure!(expand.single_image() && g.batch() == 1, "an expand-depthwise block is for one image");
        ensure!(expand.cout() == g.channels(), "the expand conv's outputs are the depthwise conv's channels");
        let hw = expand.input_shape();
        ensure!(hw[hw.len() - 2..] == g.in_hw(), "the expand conv's plane is the depthwise conv's input");
        let mut group = (GROUP_BYTES / (BLOCK * g.in_plane() * 4)).clamp(1, expand.cout() / BLOCK);
        if g.blocked() {
            // Whole runs of the blocked path's lanes per group (but the last).
            let per = blocked::LANES / BLOCK;
            group = (group.div_ceil(per) * per).min(expand.cout() / BLOCK);
        }
        Ok(ExpandDepthwise { stem: None, expand, silu, depthwise, group })
    }

    /// A network's stem conv and the depthwise conv that consumes it (the EfficientNets' first block).
    pub fn after_stem(stem: StemConv, silu: bool, depthwise: DepthwiseConv) -> TractResult<ExpandDepthwise> {
        let op = ExpandDepthwise::new(stem.product().clone(), silu, depthwise)?;
        Ok(ExpandDepthwise { stem: Some(stem), ..op })
    }

    /// The data's shape.
    fn input_shape(&self) -> TVec<usize> {
        self.stem.as_ref().map_or_else(|| self.expand.input_shape(), |s| s.input_shape())
    }

    /// Multiply-adds per call (the 1x1 op's and the depthwise op's).
    fn macs(&self) -> usize {
        let g = self.depthwise.geometry();
        self.expand.cout() * (self.expand.cin() * g.in_plane() + g.taps() * g.out_plane())
    }

    fn compute(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 5, "WhaledExpandDepthwise takes data, weights, bias, kernel and bias");
        if Pool::for_work(self.macs()).threads() > 1 {
            return self.compute_apart(inputs);
        }
        let slice = |i: usize| inputs[i].try_as_plain_ram().and_then(|t| t.as_slice::<f32>());
        let (x, w, b, k, kb) = (slice(0)?, slice(1)?, slice(2)?, slice(3)?, slice(4)?);
        let g = self.depthwise.geometry();
        let (cin, channels) = (self.expand.cin(), self.expand.cout());
        let (plane_in, plane_out) = (g.in_plane(), g.out_plane());
        ensure!(
            (self.stem.is_some() || x.len() == cin * plane_in)
                && w.len() == channels * cin
                && b.len() == channels
                && k.len() == channels * g.taps()
                && kb.len() == channels,
            "WhaledExpandDepthwise: inputs do not match {self:?}"
        );
        // SAFETY: f32 has no invalid bit patterns, and every element is written before the tensor is
        // returned: the groups partition the channels, and each writes all of its output planes.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.depthwise.output_shape())? };
        let silu = if self.silu { Some(tract_linalg::routines::Func::Silu.ew_f32()?) } else { None };
        let path = self.depthwise.path();
        // A stem's data becomes its product's input (its scratch, or its im2col matrix): after every
        // fallible step above, so that no error return drops the scratch (it goes back below).
        let stem = match &self.stem {
            Some(s) => Some((s, s.input(x)?)),
            None => None,
        };
        // Taken out of the thread's slot, not borrowed (put back at the end).
        let mut expanded = EXPANDED.with(|e| std::mem::take(&mut *e.borrow_mut()));
        let result = (|| {
            let mut view = out.try_as_plain_ram_mut()?;
            let groups = view.as_slice_mut::<f32>()?.chunks_mut(self.group * BLOCK * plane_out);
            for (i, planes) in groups.enumerate() {
                let n = planes.len() / plane_out;
                let c0 = i * self.group * BLOCK;
                if expanded.len() < n * plane_in {
                    expanded.resize(n * plane_in, 0.0);
                }
                let expanded = &mut expanded[..n * plane_in];
                let blocks = c0 / BLOCK..(c0 + n) / BLOCK;
                match &stem {
                    Some((s, input)) => s.run_rows(input, w, b, blocks, expanded)?,
                    None => self.expand.run_rows(x, w, b, blocks, expanded),
                }
                if let Some(silu) = &silu {
                    // Element-wise: the same values as tract's op on the whole tensor.
                    silu.run(expanded)?;
                }
                self.depthwise.run_part(&path, c0, expanded, k, kb, planes);
            }
            TractResult::Ok(())
        })();
        EXPANDED.with(|e| *e.borrow_mut() = expanded);
        if let Some((s, input)) = stem {
            s.release(input);
        }
        result?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl ExpandDepthwise {
    /// On more than one thread: the two steps one after the other, as the separate ops run them (each
    /// split across the pool its own way: the 1x1 op by columns, the depthwise op by planes), the SiLU
    /// between them on the pool too. Measured on the 2-vCPU AMD EPYC, alternated rounds of the gate v2 at
    /// 2 threads: the groups 5.27-5.35 ms (min), the separate ops 5.06-5.13 (docs/BENCHMARKS.md).
    fn compute_apart(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut inputs = inputs;
        let (k, kb) = (inputs[3].clone(), inputs[4].clone());
        inputs.truncate(3);
        let expanded = match &self.stem {
            Some(stem) => stem.compute(inputs)?,
            None => self.expand.compute(inputs)?,
        };
        let mut expanded = expanded.into_iter().next().context("the 1x1 op gave no output")?.into_tensor();
        if self.silu {
            let silu = tract_linalg::routines::Func::Silu.ew_f32()?;
            let mut view = expanded.try_as_plain_ram_mut()?;
            let values = view.as_slice_mut::<f32>()?;
            let len = values.len();
            let plane = self.depthwise.geometry().in_plane();
            tract_linalg::multithread::par_chunks_mut(values, plane, len, |_, planes| silu.run(planes))?;
        }
        self.depthwise.compute(tvec![expanded.into_tvalue(), k, kb])
    }
}

thread_local! {
    /// Per thread: one group's expanded planes.
    static EXPANDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Op for ExpandDepthwise {
    fn name(&self) -> StaticName {
        "WhaledExpandDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = match &self.stem {
            Some(stem) => stem.info()?,
            None => self.expand.info()?,
        };
        if self.silu {
            info.push("then SiLU".to_string());
        }
        info.extend(self.depthwise.info()?);
        info.push(format!("{} channels per group", self.group * BLOCK));
        Ok(info)
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for ExpandDepthwise {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.compute(inputs)?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.compute(inputs)
    }
}

impl TypedOp for ExpandDepthwise {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 5, "WhaledExpandDepthwise takes data, weights, bias, kernel and bias");
        let want = self.input_shape();
        ensure!(
            inputs[0].datum_type == f32::datum_type() && inputs[0].shape.as_concrete() == Some(&want[..]),
            "WhaledExpandDepthwise expects f32 {want:?}, got {:?}",
            inputs[0]
        );
        Ok(tvec!(f32::fact(self.depthwise.output_shape())))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = self.depthwise.geometry();
        let macs = self.expand.cout() * (self.expand.cin() * g.in_plane() + g.taps() * g.out_plane());
        Ok(tvec!((Cost::FMA(f32::datum_type()), macs.into())))
    }
}

/// Replaces every [`PointwiseConv`] whose output only a [`DepthwiseConv`] reads, both for
/// one image, and that depthwise op, by one [`ExpandDepthwise`]; returns how many pairs it fused. Runs
/// after the two ops' own substitutions.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    let outputs = model.output_outlets()?.to_vec();
    // The one node that reads `id`'s only output, unless that output is also a model output.
    let only_consumer = |model: &TypedModel, id: usize| -> Option<(usize, usize)> {
        let node = model.node(id);
        let succ = &node.outputs.first()?.successors;
        (node.outputs.len() == 1 && succ.len() == 1 && !outputs.contains(&OutletId::new(id, 0)))
            .then(|| (succ[0].node, succ[0].slot))
    };
    for id in model.eval_order()? {
        let node = model.node(id);
        let stem = node.op_as::<StemConv>();
        if node.op_as::<PointwiseConv>().is_none() && stem.is_none() {
            continue;
        }
        let Some((mut next, slot)) = only_consumer(model, id) else { continue };
        // A SiLU between them (tract's declutter has made `x * sigmoid(x)` one op).
        let silu = model.node(next).op_as::<ElementWiseOp>().is_some_and(|op| op.0.is::<Silu>());
        if silu {
            let Some((after, 0)) = only_consumer(model, next) else { continue };
            next = after;
        } else if slot != 0 {
            continue;
        }
        let next = model.node(next);
        let Some(depthwise) = next.op_as::<DepthwiseConv>() else { continue };
        if node.inputs.len() != 3 || next.inputs.len() != 3 {
            continue;
        }
        let op = match (stem, node.op_as::<PointwiseConv>()) {
            (Some(stem), _) => ExpandDepthwise::after_stem(stem.clone(), silu, depthwise.clone()),
            (None, Some(expand)) => ExpandDepthwise::new(expand.clone(), silu, depthwise.clone()),
            (None, None) => continue,
        };
        let Ok(op) = op else { continue };
        let mut patch = TypedModelPatch::new(format!("whaled expand-depthwise {}", next.name));
        let mut taps = tvec![];
        for input in node.inputs.iter().chain(&next.inputs[1..]) {
            taps.push(patch.tap_model(model, *input)?);
        }
        let out = patch.wire_node(&next.name, op, &taps)?;
        patch.shunt_outside(model, next.id.into(), out[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}
