//! A 2-D max pooling op for tract, substituted into a model at load time.
//!
//! Why: tract 0.23's `MaxPool` took 1.07 ms of ResNet-18's 40 on x86_64 (its one 3x3 stride-2 pool over
//! 64 planes of 112x112), against 0.13 ms for onnxruntime's (`whaled bench --profile` beside
//! onnxruntime's own per-node profile, docs/BENCHMARKS.md). Every ResNet has this layer.
//!
//! What: [`substitute`] replaces every float NCHW (or CHW) 2-D `MaxPool` without an indices output by
//! [`MaxPool2d`], which works like the depthwise op's plane path ([`crate::depthwise`]) and shares its
//! thread-local scratch: each channel plane is copied into the phase-split scratch laid out with -inf
//! padding (so the padding never wins), every tap of every output is one flat offset into it, and runs of
//! 32 outputs take the maximum over the taps in registers (AVX-512 or AVX2 where the CPU has them), rows
//! copied out; planes split across tract's intra-op pool.
//!
//! Numerics: a maximum is exact; a NaN input is skipped in favour of the other values (`f32::max`),
//! tract's and onnxruntime's handling of NaN is not matched. tests/maxpool.rs checks the op against
//! tract's own op and onnxruntime.

use tract_core::internal::*;
use tract_core::ops::cnn::MaxPool;

use crate::depthwise::{fill_scratch, spec_geometry, with_scratch, Geometry, CHUNK};

/// Whether this build substitutes max pooling: where the depthwise op runs (x86_64, aarch64).
pub const ENABLED: bool = crate::depthwise::ENABLED;

/// 2-D max pooling, f32. Input `[N, C, H, W]` (or `[C, H, W]`, batch 1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPool2d {
    geometry: Geometry,
    batch_axis: bool,
}

impl MaxPool2d {
    /// `batch_axis: false` takes `[C, H, W]` data and needs a batch-1 geometry.
    pub fn new(geometry: Geometry, batch_axis: bool) -> TractResult<MaxPool2d> {
        ensure!(batch_axis || geometry.batch() == 1, "a max pool without a batch axis has batch 1");
        Ok(MaxPool2d { geometry, batch_axis })
    }

    fn shape(&self, hw: [usize; 2]) -> TVec<usize> {
        let g = &self.geometry;
        if self.batch_axis {
            tvec![g.batch(), g.channels(), hw[0], hw[1]]
        } else {
            tvec![g.channels(), hw[0], hw[1]]
        }
    }

    fn compute(&self, input: &Tensor) -> TractResult<Tensor> {
        let g = &self.geometry;
        let x = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let planes = g.batch() * g.channels();
        ensure!(x.len() == planes * g.in_plane(), "WhaledMaxPool: input does not match {g:?}");
        let (plane_out, [ow, qw]) = (g.out_plane(), [g.out_hw()[1], g.phase_width()]);
        // SAFETY: f32 has no invalid bit patterns, and every element is written below: each output plane
        // is `out_hw[0]` rows of `out_hw[1]`, copied from the virtual plane (`virtual_len >= out_hw[0] *
        // phase_width`).
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.shape(g.out_hw()))? };
        let offsets = g.tap_offsets();
        let kernel = select_kernel();
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let total = planes * plane_out;
            tract_linalg::multithread::par_chunks_mut(
                view.as_slice_mut::<f32>()?,
                plane_out,
                total,
                |first, chunk| {
                    with_scratch(g, f32::NEG_INFINITY, |scratch, virt| {
                        virt.resize(g.virtual_len(), 0.0);
                        for (i, o) in chunk.chunks_exact_mut(plane_out).enumerate() {
                            fill_scratch(g, &x[(first + i) * g.in_plane()..][..g.in_plane()], scratch);
                            kernel(scratch, &offsets, virt);
                            // Keep the first out_hw[1] of every phase_width-long virtual row.
                            for (dst, src) in o.chunks_exact_mut(ow).zip(virt.chunks(qw)) {
                                dst.copy_from_slice(&src[..ow]);
                            }
                        }
                    });
                    Ok(())
                },
            )?;
        }
        Ok(out)
    }
}

/// The body of every kernel: each chunk of the virtual plane, the maximum over the taps.
#[inline(always)]
fn pool_any(scratch: &[f32], offsets: &[usize], virt: &mut [f32]) {
    for (j, out) in virt.chunks_exact_mut(CHUNK).enumerate() {
        let t0 = j * CHUNK;
        let mut acc = [f32::NEG_INFINITY; CHUNK];
        for &off in offsets {
            let Some(src) = scratch.get(off + t0..off + t0 + CHUNK) else {
                // The scratch leaves room for the last chunk's furthest tap: a miss is a bug here, and
                // returning would leave stale values in `out`.
                unreachable!("max pool scratch too short for tap offset {off} at {t0}")
            };
            for i in 0..CHUNK {
                acc[i] = acc[i].max(src[i]);
            }
        }
        out.copy_from_slice(&acc);
    }
}

type Kernel = fn(&[f32], &[usize], &mut [f32]);

fn pool_portable(scratch: &[f32], offsets: &[usize], virt: &mut [f32]) {
    pool_any(scratch, offsets, virt)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn pool_avx512(scratch: &[f32], offsets: &[usize], virt: &mut [f32]) {
    pool_any(scratch, offsets, virt)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn pool_avx2(scratch: &[f32], offsets: &[usize], virt: &mut [f32]) {
    pool_any(scratch, offsets, virt)
}

#[cfg(target_arch = "x86_64")]
fn pool_avx512_checked(scratch: &[f32], offsets: &[usize], virt: &mut [f32]) {
    // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx512f and avx2.
    unsafe { pool_avx512(scratch, offsets, virt) }
}

#[cfg(target_arch = "x86_64")]
fn pool_avx2_checked(scratch: &[f32], offsets: &[usize], virt: &mut [f32]) {
    // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx2.
    unsafe { pool_avx2(scratch, offsets, virt) }
}

/// The widest kernel this CPU runs.
fn select_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") {
            return pool_avx512_checked;
        }
        if is_x86_feature_detected!("avx2") {
            return pool_avx2_checked;
        }
    }
    pool_portable
}

impl Op for MaxPool2d {
    fn name(&self) -> StaticName {
        "WhaledMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "k {:?} stride {:?} in {:?} out {:?} x {} channels",
            g.kernel(),
            g.stride(),
            g.in_hw(),
            g.out_hw(),
            g.channels()
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Accurate
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for MaxPool2d {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        ensure!(inputs.len() == 1, "WhaledMaxPool takes one input");
        Ok(Some(tvec!(self.compute(&inputs[0])?.into_tvalue())))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "WhaledMaxPool takes one input");
        Ok(tvec!(self.compute(&inputs[0])?.into_tvalue()))
    }
}

impl TypedOp for MaxPool2d {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "WhaledMaxPool takes one input");
        let want = self.shape(self.geometry.in_hw());
        ensure!(
            inputs[0].datum_type == f32::datum_type() && inputs[0].shape.as_concrete() == Some(&want[..]),
            "WhaledMaxPool expects f32 {want:?}, got {:?}",
            inputs[0]
        );
        Ok(tvec!(f32::fact(self.shape(self.geometry.out_hw()))))
    }
}

/// Replaces every eligible `MaxPool` of a decluttered model by [`MaxPool2d`] and returns how many it
/// replaced: f32, NCHW or CHW, 2-D, no indices output, concrete shapes. Others are left to tract.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(pool) = node.op_as::<MaxPool>() else { continue };
        if pool.with_index_outputs.is_some() || node.inputs.len() != 1 || node.outputs.len() != 1 {
            continue;
        }
        let Some((geometry, batch_axis)) = spec_geometry(model, node, &pool.pool_spec)? else { continue };
        let mut patch = TypedModelPatch::new(format!("whaled max pool {}", node.name));
        let x = patch.tap_model(model, node.inputs[0])?;
        let out = patch.wire_node(&node.name, MaxPool2d::new(geometry, batch_axis)?, &[x])?;
        patch.shunt_outside(model, id.into(), out[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}
