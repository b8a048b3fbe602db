//! A vectorised `QuantizeLinear` (f32 -> u8) for tract, substituted into static-QDQ int8 models.
//!
//! Why: tract 0.23's `QuantizeLinearU8` rounds one element at a time through a scalar
//! round-half-to-even; `whaled bench --profile` showed its 61 nodes taking 14.4 ms of the int8
//! EfficientNet-Lite0's 28 on x86_64 (docs/BENCHMARKS.md), more than all its convolutions. The same
//! arithmetic as a loop the compiler vectorises costs a memory pass.
//!
//! What: [`substitute`] swaps the mini-op inside every `ElementWiseOp(QuantizeLinearU8)` of f32 input
//! for [`FastQuantizeU8`], which computes the same value: `round_half_even(x * inv_scale) +
//! zero_point`, saturated to [0, 255], NaN to the zero point. The rounding adds and subtracts
//! 1.5 * 2^23 (exact round-half-to-even in the default rounding mode for |v| <= 2^22; `v` is clamped
//! to +-512 first, beyond which every result saturates anyway), so it vectorises on SSE2, AVX2 and
//! NEON without a rounding instruction. Being an element-wise mini-op, it keeps tract's axis handling
//! (tract's optimiser can still move it between layouts).

use tract_core::internal::*;
use tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearU8};

/// `QuantizeLinear` to u8 with a vectorisable rounding. `inv_scale` is `1 / y_scale`, as in tract's
/// op, held as f32 bits (so the op is `Eq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastQuantizeU8 {
    inv_scale: u32,
    zero_point: u8,
}

impl FastQuantizeU8 {
    pub fn new(inv_scale: f32, zero_point: u8) -> FastQuantizeU8 {
        FastQuantizeU8 { inv_scale: inv_scale.to_bits(), zero_point }
    }

    /// 1 / scale and the zero point.
    pub fn params(&self) -> (f32, u8) {
        (f32::from_bits(self.inv_scale), self.zero_point)
    }
}

/// 1.5 * 2^23: adding it rounds any |v| <= 2^22 to a whole number, ties to even.
const ROUND: f32 = 12_582_912.0;

/// One value: `round_half_even(x * inv_scale) + zero_point`, saturated to [0, 255], NaN to the zero
/// point; bit for bit what tract's `QuantizeLinearU8` computes (tests below).
#[inline(always)]
pub(crate) fn quantize_one(x: f32, inv_scale: f32, zero_point: i32) -> u8 {
    let v = (x * inv_scale).clamp(-512.0, 512.0);
    let r = (v + ROUND) - ROUND;
    // `as` saturates and maps NaN to 0, so NaN gives the zero point, as tract's op does.
    (r as i32 + zero_point).clamp(0, 255) as u8
}

#[inline(always)]
fn slice(xs: &[f32], ys: &mut [u8], inv_scale: f32, zero_point: u8) {
    for (x, y) in xs.iter().zip(ys.iter_mut()) {
        *y = quantize_one(*x, inv_scale, zero_point as i32);
    }
}

/// The AVX2 forms of [`quantize_one`], shared by this op and `qelementwise`'s u8 `Mul` / `Add`.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::quantize_one`] on 8 lanes: the same arithmetic (NaN lanes zeroed first, so they give the
    /// zero point; the rounding instruction in round-half-even mode), as i32.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn quantize8(v: __m256, inv_scale: f32, zero_point: u8) -> __m256i {
        let v = _mm256_mul_ps(v, _mm256_set1_ps(inv_scale));
        let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
        let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-512.0)), _mm256_set1_ps(512.0));
        let v = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        _mm256_add_epi32(_mm256_cvttps_epi32(v), _mm256_set1_epi32(zero_point as i32))
    }

    /// Four vectors of 8 i32 as 32 u8, in order, saturated.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn pack32(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i {
        let packed = _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        // The packs work within 128-bit lanes: dwords a0-3 b0-3 c0-3 d0-3 | a4-7 ..., put back in order.
        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }
}

/// AVX2, 32 values per step ([`avx2::quantize8`], [`avx2::pack32`]).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn slice_avx2(xs: &[f32], ys: &mut [u8], inv_scale: f32, zero_point: u8) {
    use std::arch::x86_64::*;
    let n = xs.len().min(ys.len());
    // SAFETY: the caller reads 8 values from p, inside xs.
    let step = |p: *const f32| avx2::quantize8(unsafe { _mm256_loadu_ps(p) }, inv_scale, zero_point);
    let mut i = 0;
    while i + 32 <= n {
        let p = xs[i..].as_ptr();
        // SAFETY: 32 values from i are in xs (i + 32 <= n).
        let (a, b, c, d) = unsafe { (step(p), step(p.add(8)), step(p.add(16)), step(p.add(24))) };
        // SAFETY: 32 bytes from i are in ys.
        unsafe { _mm256_storeu_si256(ys[i..].as_mut_ptr() as *mut __m256i, avx2::pack32(a, b, c, d)) };
        i += 32;
    }
    slice(&xs[i..n], &mut ys[i..n], inv_scale, zero_point);
}

/// Quantizes `xs` into `ys` (same length).
pub fn quantize_slice(xs: &[f32], ys: &mut [u8], inv_scale: f32, zero_point: u8) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { slice_avx2(xs, ys, inv_scale, zero_point) };
    }
    slice(xs, ys, inv_scale, zero_point)
}

impl ElementWiseMiniOp for FastQuantizeU8 {
    fn name(&self) -> String {
        "WhaledQuantizeLinearU8".into()
    }

    fn validation(&self) -> Validation {
        Validation::Accurate
    }

    fn output_type(&self, input_type: DatumType) -> Option<DatumType> {
        (input_type == f32::datum_type()).then_some(u8::datum_type())
    }

    fn eval_out_of_place(&self, t: &Tensor, _out_dt: Option<DatumType>) -> TractResult<Tensor> {
        let xs = t.try_as_plain_ram()?.as_slice::<f32>()?;
        // SAFETY: u8 has no invalid bit patterns and `quantize_slice` writes every element.
        let mut out = unsafe { Tensor::uninitialized::<u8>(t.shape())? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            quantize_slice(xs, view.as_slice_mut::<u8>()?, f32::from_bits(self.inv_scale), self.zero_point);
        }
        Ok(out)
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("1/scale: {} zero_point: {}", f32::from_bits(self.inv_scale), self.zero_point)])
    }
}

/// The u8 tensor, scale and zero point behind the `DequantizeLinearF32` node at `outlet`, if it is one
/// of a u8 tensor with a positive, finite scale.
pub(crate) fn dequantized_u8(model: &TypedModel, outlet: OutletId) -> TractResult<Option<(OutletId, f32, u8)>> {
    let node = model.node(outlet.node);
    let Some(dq) = node.op_as::<DequantizeLinearF32>() else { return Ok(None) };
    let input = node.inputs[0];
    if model.outlet_fact(input)?.datum_type != u8::datum_type() || !(0..=255).contains(&dq.zero_point) {
        return Ok(None);
    }
    if !(dq.scale.is_finite() && dq.scale > 0.0) {
        return Ok(None);
    }
    Ok(Some((input, dq.scale, dq.zero_point as u8)))
}

/// 1 / scale and zero point of a quantization to u8: tract's `QuantizeLinearU8` or [`FastQuantizeU8`].
pub(crate) fn quantize_params(op: &ElementWiseOp) -> Option<(f32, u8)> {
    if let Some(q) = op.0.downcast_ref::<QuantizeLinearU8>() {
        return Some((q.scale, q.zero_point));
    }
    op.0.downcast_ref::<FastQuantizeU8>().map(FastQuantizeU8::params)
}

/// The quantization to u8 ([`quantize_params`]) that is the only consumer of node `id`'s output (not a
/// model output), with a finite 1 / scale: its node, 1 / scale and zero point.
pub(crate) fn quantize_after(model: &TypedModel, id: usize) -> TractResult<Option<(usize, f32, u8)>> {
    let outlet = OutletId::new(id, 0);
    let succ = model.outlet_successors(outlet);
    if succ.len() != 1 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    let next = model.node(succ[0].node);
    let Some((inv_scale, zero_point)) = next.op_as::<ElementWiseOp>().and_then(quantize_params) else {
        return Ok(None);
    };
    Ok(inv_scale.is_finite().then_some((next.id, inv_scale, zero_point)))
}

/// Replaces tract's scalar `QuantizeLinearU8` by [`FastQuantizeU8`] wherever its input is f32;
/// returns how many it replaced.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<ElementWiseOp>() else { continue };
        let Some(q) = op.0.downcast_ref::<QuantizeLinearU8>() else { continue };
        if model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type() {
            continue;
        }
        let fast = ElementWiseOp(Box::new(FastQuantizeU8::new(q.scale, q.zero_point)), op.1);
        let mut patch = TypedModelPatch::new(format!("whaled quantize {}", node.name));
        let x = patch.tap_model(model, node.inputs[0])?;
        let out = patch.wire_node(&node.name, fast, &[x])?;
        patch.shunt_outside(model, node.id.into(), out[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::uniform;

    #[test]
    fn quantize_is_quantize_linear() {
        // Ties go to even, like ONNX's QuantizeLinear; saturation both ways; NaN to the zero point.
        let cases = [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, 0), (300.0, 255), (-7.0, 0), (f32::NAN, 0)];
        for (v, want) in cases {
            assert_eq!(quantize_one(v, 1.0, 0), want, "{v}");
        }
        assert_eq!(quantize_one(0.5, 1.0, 10), 10);
        assert_eq!(quantize_one(1e30, 1.0, 10), 255);
        assert_eq!(quantize_one(-1e30, 1.0, 10), 0);
        assert_eq!(quantize_one(f32::NAN, 1.0, 10), 10);
    }

    /// Against tract's own op, element for element: random values over the saturating range, every
    /// tie around the zero point, and the edges (where tract's sum overflows, against ONNX's rule).
    #[test]
    fn equals_tracts_quantize_linear() {
        let mut rnd = uniform(3);
        let mut xs: Vec<f32> = (0..10_000).map(|_| rnd() * 3.0).collect();
        xs.extend((-600..600).map(|i| i as f32 * 0.5 * 0.02));
        xs.extend([0.0, -0.0, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE]);
        for (inv_scale, zero_point) in [(50.0f32, 0u8), (50.0, 128), (1.0 / 0.0235, 7), (3.1, 255)] {
            let mut got = vec![0u8; xs.len()];
            quantize_slice(&xs, &mut got, inv_scale, zero_point);
            let want: Vec<u8> = xs
                .iter()
                .map(|&x| match x * inv_scale {
                    // Past i32's range tract's `as i32 + zero_point` wraps (1e30 gives 0 with a zero
                    // point of 128); ONNX saturates, and so does this op.
                    v if v >= 1e9 => 255,
                    v if v <= -1e9 => 0,
                    _ => tract_core::ops::quant::quantize_linear_f32_u8(x, inv_scale, zero_point as i32),
                })
                .collect();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "x = {} at 1/scale {inv_scale}, zero point {zero_point} (#{i})", xs[i]);
            }
        }
    }
}
