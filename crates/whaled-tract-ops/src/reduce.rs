//! A sum over a tensor's trailing axes for tract, substituted into a model at load time: the squeeze of
//! every squeeze-excitation block (one sum per channel plane, before the mean's scale).
//!
//! Why: tract 0.23 computes `Reduce<Sum>` over axes `[1, 2]` of a `[C, H, W]` activation through
//! ndarray's `sum_axis`; `whaled bench --profile` showed the 17 of EfficientNet-B0 taking 0.68 ms of its
//! 13.3 (onnxruntime's `GlobalAveragePool`s: 0.19 ms) and the B4's 9 ms, at about 17 GB/s on data just
//! written.
//!
//! What: [`substitute`] replaces every f32 `Reduce<Sum>` whose axes are its input's last ones by
//! [`TrailingSum`]: each run of contiguous values summed with 64 independent accumulators (compiled for
//! AVX-512 or AVX2 where the CPU has them), runs split across tract's intra-op pool.
//!
//! Numerics: the same sum in another order (64 interleaved partial sums, then their pairwise sum):
//! at least as accurate as a sequential f32 sum; tests/reduce.rs checks it against an f64 sum, tract's
//! op and onnxruntime.

use tract_core::internal::*;
use tract_core::ops::nn::{Reduce, Reducer};

/// Whether this build substitutes trailing sums: where the other float ops are (x86_64, aarch64; on
/// armv7 tract's own op stays, as for the convolutions).
pub const ENABLED: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Partial sums kept per run: 64 f32 = 4 AVX-512 / 8 AVX2 registers, enough to hide the adds' latency.
const LANES: usize = 64;

/// Sum over the last `axes` axes of an f32 tensor, keeping them (as size 1). Private fields: built by
/// [`TrailingSum::new`], which refuses zero axes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrailingSum {
    axes: usize,
}

impl TrailingSum {
    pub fn new(axes: usize) -> TractResult<TrailingSum> {
        ensure!(axes >= 1, "a trailing sum over no axis");
        Ok(TrailingSum { axes })
    }

    fn compute(&self, input: &Tensor) -> TractResult<Tensor> {
        let rank = input.rank();
        ensure!(rank >= self.axes, "WhaledTrailingSum over {} axes of a rank-{rank} tensor", self.axes);
        let len: usize = input.shape()[rank - self.axes..].iter().product();
        let mut shape: TVec<usize> = input.shape().into();
        shape[rank - self.axes..].iter_mut().for_each(|d| *d = 1);
        let xs = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut out = Tensor::zero::<f32>(&shape)?;
        if len == 0 {
            return Ok(out);
        }
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let sums = view.as_slice_mut::<f32>()?;
            let kernel = select_kernel();
            tract_linalg::multithread::par_chunks_mut(sums, 1, xs.len(), |first, chunk| {
                for (i, s) in chunk.iter_mut().enumerate() {
                    *s = kernel(&xs[(first + i) * len..][..len]);
                }
                Ok(())
            })?;
        }
        Ok(out)
    }
}

/// The body of every kernel: [`LANES`] interleaved partial sums, the tail added to them, then a
/// pairwise sum of the partials.
#[inline(always)]
fn sum_any(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (chunks, tail) = xs.as_chunks::<LANES>();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    for (a, x) in acc.iter_mut().zip(tail) {
        *a += *x;
    }
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            acc[i] += acc[i + n];
        }
    }
    acc[0]
}

fn sum_portable(xs: &[f32]) -> f32 {
    sum_any(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn sum_avx512(xs: &[f32]) -> f32 {
    sum_any(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(xs: &[f32]) -> f32 {
    sum_any(xs)
}

#[cfg(target_arch = "x86_64")]
fn sum_avx512_checked(xs: &[f32]) -> f32 {
    // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx512f and avx2.
    unsafe { sum_avx512(xs) }
}

#[cfg(target_arch = "x86_64")]
fn sum_avx2_checked(xs: &[f32]) -> f32 {
    // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx2.
    unsafe { sum_avx2(xs) }
}

/// The widest kernel this CPU runs.
fn select_kernel() -> fn(&[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") {
            return sum_avx512_checked;
        }
        if is_x86_feature_detected!("avx2") {
            return sum_avx2_checked;
        }
    }
    sum_portable
}

impl Op for TrailingSum {
    fn name(&self) -> StaticName {
        "WhaledTrailingSum".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("sum over the last {} axes", self.axes)])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for TrailingSum {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        ensure!(inputs.len() == 1, "WhaledTrailingSum takes one input");
        Ok(Some(tvec!(self.compute(&inputs[0])?.into_tvalue())))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "WhaledTrailingSum takes one input");
        Ok(tvec!(self.compute(&inputs[0])?.into_tvalue()))
    }
}

impl TypedOp for TrailingSum {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "WhaledTrailingSum takes one input");
        let x = inputs[0];
        ensure!(x.datum_type == f32::datum_type(), "WhaledTrailingSum expects f32, got {x:?}");
        let rank = x.rank();
        ensure!(rank >= self.axes, "WhaledTrailingSum over {} axes of {x:?}", self.axes);
        let mut shape: TVec<TDim> = x.shape.iter().cloned().collect();
        shape[rank - self.axes..].iter_mut().for_each(|d| *d = 1.into());
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((Cost::FMA(f32::datum_type()), inputs[0].shape.volume())))
    }
}

/// Replaces every f32 `Reduce<Sum>` over its input's trailing axes (of a concrete shape) by
/// [`TrailingSum`] and returns how many it replaced. Other reductions are left to tract.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(reduce) = node.op_as::<Reduce>() else { continue };
        if !matches!(reduce.reducer, Reducer::Sum) || node.inputs.len() != 1 {
            continue;
        }
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = fact.shape.as_concrete() else { continue };
        let rank = shape.len();
        let mut axes: Vec<usize> = reduce.axes.to_vec();
        axes.sort_unstable();
        axes.dedup();
        let k = axes.len();
        if fact.datum_type != f32::datum_type() || k == 0 || axes != (rank - k.min(rank)..rank).collect::<Vec<_>>() {
            continue;
        }
        let mut patch = TypedModelPatch::new(format!("whaled trailing sum {}", node.name));
        let x = patch.tap_model(model, node.inputs[0])?;
        let out = patch.wire_node(&node.name, TrailingSum::new(k)?, &[x])?;
        patch.shunt_outside(model, id.into(), out[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::uniform;

    /// Every kernel against an f64 sum, on lengths around the accumulator count and large planes.
    #[test]
    fn kernels_match_an_f64_sum() {
        let mut rnd = uniform(7);
        #[allow(unused_mut)]
        let mut kernels: Vec<fn(&[f32]) -> f32> = vec![sum_portable, select_kernel()];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            kernels.push(sum_avx2_checked);
        }
        for len in [0, 1, 5, 63, 64, 65, 127, 200, 3136, 65_536 + 17] {
            let xs: Vec<f32> = (0..len).map(|_| rnd()).collect();
            let want: f64 = xs.iter().map(|&v| v as f64).sum();
            let scale: f64 = xs.iter().map(|&v| (v as f64).abs()).sum::<f64>().max(1.0);
            for k in &kernels {
                let got = k(&xs) as f64;
                assert!((got - want).abs() <= 1e-6 * scale, "len {len}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn keeps_the_summed_axes_as_ones() {
        let x = Tensor::from_shape(&[2, 3, 2, 2], &(0..24).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let two = TrailingSum::new(2).unwrap().compute(&x).unwrap();
        assert_eq!(two.shape(), &[2, 3, 1, 1]);
        let want: Vec<f32> = (0..6).map(|p| (0..4).map(|i| (p * 4 + i) as f32).sum()).collect();
        assert_eq!(two.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(), &want[..]);
        let all = TrailingSum::new(4).unwrap().compute(&x).unwrap();
        assert_eq!(all.shape(), &[1, 1, 1, 1]);
        assert_eq!(all.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(), &[276.0]);
        assert!(TrailingSum::new(0).is_err());
        assert!(TrailingSum::new(5).unwrap().compute(&x).is_err());
    }
}
