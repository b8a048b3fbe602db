//! An integer pointwise (1x1, stride 1) convolution op for tract: u8 activations times i8 weights,
//! accumulated in i32, substituted into a static-QDQ int8 model at load time.
//!
//! Why: tract 0.23 runs a QDQ model's convolutions in float. Its declutter folds each weight
//! `DequantizeLinear` into a float constant and leaves the activation `QuantizeLinear` ->
//! `DequantizeLinear` pairs around float einsums, so the int8 EfficientNet-Lite0 ran 2.1x *slower* than
//! its fp32 file (docs/BENCHMARKS.md, "tract speed work", section 3). A CPU with AVX-512 VNNI does 64
//! u8 x i8 multiply-adds per `vpdpbusd`, four times the f32 FMA's 16: that is where int8 can pay.
//!
//! What: [`substitute`] finds, in the decluttered graph, `DequantizeLinearF32` (of a u8 tensor) ->
//! `EinSum` (a 1x1 conv by a constant) -> bias `Add` -> [ReLU / ReLU6] -> [`QuantizeLinearU8`], and
//! replaces the chain by [`QPointwiseConv`], which reads the u8 tensor itself and, when the chain ends
//! in a quantization, writes u8. The int8 weights are recovered from the folded float constant: per
//! output channel, `scale = max |w| / 127` (the symmetric per-channel scheme onnxruntime's
//! `quantize_static` writes) and `q = w / scale` must come out as whole numbers in [-127, 127] for
//! every weight, to 1e-3 of a step, or the conv is left to tract as it was. Per call the op interleaves
//! the activation as `[cin / 4][pixels][4]` (so one 32-bit lane holds one pixel's 4 consecutive input
//! channels: `vpdpbusd`'s operand), then tiles 8 output channels x 48 pixels accumulate in 24 registers
//! over all input channels.
//!
//! Numerics: `acc = sum q_w * q_x` is exact in i32 (at most 1152 x 255 x 127 < 2^31 for every shipped
//! width; [`QPointwiseConv::new`] refuses a `cin` where it could overflow); then
//! `y = (acc - z_x * sum q_w) * (s_x * s_w) + bias` in f32 (what tract's float graph computes, up to
//! float rounding), then the fused clamp, then for a u8 output `round_half_even(y / s_y) + z_y`
//! saturated to [0, 255] like `QuantizeLinear`. Off-by-one-level differences against tract's float
//! graph or onnxruntime's integer kernels happen where `y / s_y` lies within float rounding of a half
//! step; tests/int8.rs bounds them on real frames.
//!
//! Where it is used: x86_64 CPUs with AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4).
//! Elsewhere the QDQ graph stays tract's: a portable kernel exists as the reference the tests hold the
//! VNNI one to (and runs under qemu on the ARM targets), but on a CPU without an integer dot product
//! it would not beat float FMAs, so it is not substituted there.

use std::cell::RefCell;

use tract_core::internal::*;
use tract_core::ops::einsum::EinSum;

use crate::fuse::{as_clamp, fusable_successors, Post};
use crate::pointwise::{bias_after, conv_1x1, nchw, Conv1x1, Out, Pool, Split};
use crate::quantize::{dequantized_u8, quantize_after, quantize_one};

/// Output channels per block: a substituted conv has a multiple of this many.
pub const BLOCK: usize = 8;

/// Pixels per full tile: 3 vectors of 16.
const TILE: usize = 48;

/// Input channels per 32-bit lane.
const QUAD: usize = 4;

/// The largest `cin` whose i32 accumulator cannot overflow: `cin * 255 * 127 < 2^31`.
pub const MAX_CIN: usize = (i32::MAX as usize) / (255 * 127);

/// What the op writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QOutput {
    /// f32, as the bias `Add` (or the fused clamp) produced it.
    F32,
    /// u8, quantized like tract's `QuantizeLinearU8`: `round_half_even(y * inv_scale) + zero_point`,
    /// saturated. `inv_scale` as f32 bits (so the op is `Eq + Hash`).
    U8 { inv_scale: u32, zero_point: u8 },
}

/// Integer pointwise convolution. Inputs: data u8 `[N, Cin, H, W]` (or `[Cin, H, W]`), the weights
/// packed by [`pack_weights`] (i8 `[Cout / BLOCK, ceil(Cin / 4), BLOCK, 4]`), the per-channel
/// correction `z_x * sum q_w` (i32 `[Cout]`), multiplier `s_x * s_w` (f32 `[Cout]`) and bias (f32
/// `[Cout]`). Private fields: built only by [`QPointwiseConv::new`], which checks the sizes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QPointwiseConv {
    batch: usize,
    cin: usize,
    cout: usize,
    hw: [usize; 2],
    batch_axis: [bool; 2],
    post: Vec<Post>,
    output: QOutput,
}

impl QPointwiseConv {
    /// Checks that no size is zero, that `cout` is a multiple of [`BLOCK`], that `cin` is at most
    /// [`MAX_CIN`], and that a side without a batch axis has batch 1.
    pub fn new(
        batch: usize,
        cin: usize,
        cout: usize,
        hw: [usize; 2],
        batch_axis: [bool; 2],
        output: QOutput,
    ) -> TractResult<QPointwiseConv> {
        ensure!([batch, cin, cout, hw[0], hw[1]].iter().all(|&v| v > 0), "int8 pointwise conv with an empty dimension");
        ensure!(
            cout.is_multiple_of(BLOCK),
            "int8 pointwise conv with {cout} output channels, not a multiple of {BLOCK}"
        );
        ensure!(cin <= MAX_CIN, "int8 pointwise conv with {cin} input channels could overflow its i32 sums");
        ensure!(batch_axis == [true, true] || batch == 1, "an int8 pointwise conv without a batch axis has batch 1");
        Ok(QPointwiseConv { batch, cin, cout, hw, batch_axis, post: Vec::new(), output })
    }

    /// The same convolution with `post` (at most 4 max/min steps) applied before the output's
    /// quantization.
    pub fn with_post(mut self, post: Vec<Post>) -> TractResult<QPointwiseConv> {
        ensure!(post.len() <= 4, "at most 4 fused steps");
        self.post = post;
        Ok(self)
    }

    fn plane(&self) -> usize {
        self.hw[0] * self.hw[1]
    }

    fn quads(&self) -> usize {
        self.cin.div_ceil(QUAD)
    }

    fn shape(&self, side: usize) -> TVec<usize> {
        nchw([self.cin, self.cout][side], self.batch, self.hw, self.batch_axis[side])
    }

    fn output_type(&self) -> DatumType {
        match self.output {
            QOutput::F32 => f32::datum_type(),
            QOutput::U8 { .. } => u8::datum_type(),
        }
    }
}

/// Packs `[cout, cin]` int8 weights (row-major) as the op reads them: `[cout / BLOCK, ceil(cin / 4),
/// BLOCK, 4]`, input channels past `cin` zero (they multiply the interleaved activation's padding).
pub fn pack_weights(q: &[i8], cout: usize, cin: usize) -> TractResult<Tensor> {
    ensure!(
        cout.is_multiple_of(BLOCK) && q.len() == cout * cin,
        "int8 pointwise weights: {} values for {cout} x {cin}",
        q.len()
    );
    let quads = cin.div_ceil(QUAD);
    let mut packed = vec![0i8; cout * quads * QUAD];
    for co in 0..cout {
        let (block, r) = (co / BLOCK, co % BLOCK);
        for ci in 0..cin {
            let (quad, k) = (ci / QUAD, ci % QUAD);
            packed[((block * quads + quad) * BLOCK + r) * QUAD + k] = q[co * cin + ci];
        }
    }
    Tensor::from_shape(&[cout / BLOCK, quads, BLOCK, QUAD], &packed)
}

/// The per-output-channel symmetric int8 form of `[cout, cin]` float weights that are exactly
/// `q * scale` (a folded `DequantizeLinear`): `(q, scales)`, or `None` when some row is not. A row's
/// scale is `max |w| / k` for the largest `k` in 127..=1 that makes every `w / scale` a whole number (to
/// 1e-3 of a step): 127 for most rows of onnxruntime's `quantize_static`, less where its scale floor
/// left a row's largest weight short of 127 steps. Any such `k` gives the same products `q * scale`.
pub fn recover_int8(w: &[f32], cout: usize, cin: usize) -> Option<(Vec<i8>, Vec<f32>)> {
    if w.len() != cout * cin || cin == 0 {
        return None;
    }
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(cout);
    for row in w.chunks_exact(cin) {
        if !row.iter().all(|v| v.is_finite()) {
            return None;
        }
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max == 0.0 {
            q.extend(std::iter::repeat_n(0i8, cin));
            scales.push(1.0);
            continue;
        }
        let whole = |scale: f32| row.iter().all(|&v| ((v / scale) - (v / scale).round()).abs() <= 1e-3);
        let k = (1..=127u8).rev().find(|&k| whole(max / k as f32))?;
        let scale = max / k as f32;
        q.extend(row.iter().map(|&v| (v / scale).round() as i8));
        scales.push(scale);
    }
    Some((q, scales))
}

impl Op for QPointwiseConv {
    fn name(&self) -> StaticName {
        "WhaledQPointwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} -> {} channels, {:?} x {}, u8 x i8 kernel {}, then {:?}, out {:?}",
            self.cin,
            self.cout,
            self.hw,
            self.batch,
            kernel_name(),
            self.post,
            self.output
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for QPointwiseConv {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.compute(inputs)?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.compute(inputs)
    }
}

impl TypedOp for QPointwiseConv {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 5, "WhaledQPointwiseConv takes data, weights, correction, multiplier and bias");
        let want = self.shape(0);
        ensure!(
            inputs[0].datum_type == u8::datum_type() && inputs[0].shape.as_concrete() == Some(&want[..]),
            "WhaledQPointwiseConv expects u8 {want:?}, got {:?}",
            inputs[0]
        );
        Ok(tvec!(self.output_type().fact(self.shape(1))))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let macs = self.batch * self.cout * self.cin * self.plane();
        Ok(tvec!((Cost::FMA(i32::datum_type()), macs.into())))
    }
}

thread_local! {
    /// Per calling thread: the interleaved activation, `[batch][quads][padded plane][4]`.
    static PACKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One tile: `BLOCK` output channels x `n` pixels from pixel `p0` of one image.
struct QTile<'a> {
    /// The image's interleaved activation: `quads` rows of `padded * 4` bytes.
    x: &'a [u8],
    padded: usize,
    quads: usize,
    p0: usize,
    n: usize,
    /// The block's packed weights: `quads * BLOCK` lanes of 4 i8.
    w: &'a [i8],
    corr: &'a [i32],
    mul: &'a [f32],
    bias: &'a [f32],
    clamp: Option<(f32, f32)>,
    output: QOutput,
    /// The output tensor's bytes (f32 or u8 values, [`QOutput`]), shared by the work items.
    out: Out<u8>,
    /// Element index of the tile's first output (row 0, pixel p0) and the row stride, in elements.
    out_at: usize,
    out_stride: usize,
}

impl QTile<'_> {
    /// The bounds the kernels rely on before they read and write through raw pointers; a failure is
    /// a bug in this module (the op checks its inputs' sizes), never bad input.
    fn check(&self, vectors: usize) {
        let elem = match self.output {
            QOutput::F32 => 4,
            QOutput::U8 { .. } => 1,
        };
        assert!(
            self.quads >= 1
                && (1..=TILE / 16).contains(&vectors)
                && self.n >= 1
                && self.n <= vectors * 16
                && self.padded >= self.p0 + vectors * 16
                && self.x.len() >= self.quads * self.padded * QUAD
                && self.w.len() >= self.quads * BLOCK * QUAD
                && self.corr.len() >= BLOCK
                && self.mul.len() >= BLOCK
                && self.bias.len() >= BLOCK
                && self.out.len >= (self.out_at + (BLOCK - 1) * self.out_stride + self.n) * elem,
            "int8 pointwise tile out of bounds"
        );
    }

    /// Writes `value` (already corrected, scaled and biased) for row `r`, pixel `j` of the tile.
    #[inline]
    fn store(&self, r: usize, j: usize, y: f32) {
        let y = match self.clamp {
            Some((lo, hi)) => y.max(lo).min(hi),
            None => y,
        };
        let at = self.out_at + r * self.out_stride + j;
        match self.output {
            // SAFETY: in bounds (`check`).
            QOutput::F32 => unsafe { (self.out.ptr as *mut f32).add(at).write_unaligned(y) },
            QOutput::U8 { inv_scale, zero_point } => {
                let q = quantize_one(y, f32::from_bits(inv_scale), zero_point as i32);
                // SAFETY: in bounds (`check`).
                unsafe { self.out.ptr.add(at).write(q) }
            }
        }
    }
}

/// A tile kernel: computes one [`QTile`] of `vectors` vectors of 16 pixels.
type QTileFn = fn(&QTile, usize);

/// A kernel and its name.
#[derive(Clone, Copy)]
pub(crate) struct QKernel {
    name: &'static str,
    tile: QTileFn,
}

const PORTABLE: QKernel = QKernel { name: "portable", tile: tile_portable };

/// The portable kernel: i32 sums over the same interleaved layout, 16 pixels at a time (the reference
/// the tests hold the VNNI kernel to; not substituted into models, see the module docs).
fn tile_portable(t: &QTile, vectors: usize) {
    t.check(vectors);
    for r in 0..BLOCK {
        for v in 0..vectors {
            let mut acc = [0i32; 16];
            for q in 0..t.quads {
                let w = &t.w[(q * BLOCK + r) * QUAD..][..QUAD];
                let x = &t.x[(q * t.padded + t.p0 + 16 * v) * QUAD..][..16 * QUAD];
                for (a, px) in acc.iter_mut().zip(x.chunks_exact(QUAD)) {
                    *a += px.iter().zip(w).map(|(&x, &w)| x as i32 * w as i32).sum::<i32>();
                }
            }
            for (j, &a) in acc.iter().enumerate().take(t.n.saturating_sub(16 * v).min(16)) {
                let y = ((a - t.corr[r]) as f32).mul_add(t.mul[r], t.bias[r]);
                t.store(r, 16 * v + j, y);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::{QOutput, QTile, BLOCK, QUAD};
    use std::arch::x86_64::*;

    /// AVX-512 VNNI: `BLOCK` rows x `V` vectors of 16 pixels in `BLOCK * V` i32 accumulators (24 at
    /// V = 3), one `vpdpbusd` per row, vector and 4 input channels.
    ///
    /// # Safety
    /// The CPU has avx512f, avx512bw and avx512vnni, and `t.check(V)` passed.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni<const V: usize>(t: &QTile) {
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr() as *const i32);
        let mut acc = [[_mm512_setzero_si512(); V]; BLOCK];
        for q in 0..t.quads {
            // SAFETY: row q has V * 16 readable pixels from p0, and the block's weights cover quads
            // (checked).
            let xp = unsafe { x.add((q * t.padded + t.p0) * QUAD) };
            let mut xv = [_mm512_setzero_si512(); V];
            for v in 0..V {
                xv[v] = unsafe { _mm512_loadu_si512(xp.add(64 * v) as *const _) };
            }
            let wp = unsafe { w.add(q * BLOCK) };
            for r in 0..BLOCK {
                let wr = _mm512_set1_epi32(unsafe { wp.add(r).read_unaligned() });
                for v in 0..V {
                    acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], xv[v], wr);
                }
            }
        }
        let (lo, hi) = t.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        for r in 0..BLOCK {
            let corr = _mm512_set1_epi32(t.corr[r]);
            let mul = _mm512_set1_ps(t.mul[r]);
            let bias = _mm512_set1_ps(t.bias[r]);
            for v in 0..V {
                let cols = t.n.saturating_sub(16 * v).min(16);
                if cols == 0 {
                    continue;
                }
                let mask: __mmask16 = if cols == 16 { 0xffff } else { (1u16 << cols) - 1 };
                let y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], corr)), mul, bias);
                let y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
                let at = t.out_at + r * t.out_stride + 16 * v;
                match t.output {
                    // SAFETY: `cols` elements from `at` are in bounds (checked).
                    QOutput::F32 => unsafe { _mm512_mask_storeu_ps((t.out.ptr as *mut f32).add(at), mask, y) },
                    QOutput::U8 { inv_scale, zero_point } => {
                        let s = _mm512_mul_ps(y, _mm512_set1_ps(f32::from_bits(inv_scale)));
                        // Saturate in float first (as `quantize`), so the conversion cannot overflow.
                        let s = _mm512_min_ps(_mm512_max_ps(s, _mm512_set1_ps(-512.0)), _mm512_set1_ps(512.0));
                        let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(s);
                        let q = _mm512_add_epi32(q, _mm512_set1_epi32(zero_point as i32));
                        let q = _mm512_max_epi32(q, _mm512_setzero_si512());
                        // SAFETY: as above; unsigned saturation to [0, 255] of non-negative lanes.
                        unsafe { _mm512_mask_cvtusepi32_storeu_epi8(t.out.ptr.add(at) as *mut _, mask, q) };
                    }
                }
            }
        }
    }

    pub(super) fn tile_vnni(t: &QTile, vectors: usize) {
        t.check(vectors);
        // SAFETY: the kernel is only selected when the CPU has these features (`select_kernel`), and
        // the tile's bounds were checked.
        unsafe {
            match vectors {
                1 => vnni::<1>(t),
                2 => vnni::<2>(t),
                _ => vnni::<3>(t),
            }
        }
    }

    /// Interleaves 4 rows of 16 bytes into 16 lanes of 4 (SSE2: baseline on x86_64).
    ///
    /// # Safety
    /// Each row pointer has 16 readable bytes and `out` 64 writable ones.
    #[inline]
    pub(super) unsafe fn interleave16(rows: [*const u8; 4], out: *mut u8) {
        unsafe {
            let a = _mm_loadu_si128(rows[0] as *const __m128i);
            let b = _mm_loadu_si128(rows[1] as *const __m128i);
            let c = _mm_loadu_si128(rows[2] as *const __m128i);
            let d = _mm_loadu_si128(rows[3] as *const __m128i);
            let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
            let (cd_lo, cd_hi) = (_mm_unpacklo_epi8(c, d), _mm_unpackhi_epi8(c, d));
            let o = out as *mut __m128i;
            _mm_storeu_si128(o, _mm_unpacklo_epi16(ab_lo, cd_lo));
            _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(ab_lo, cd_lo));
            _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(ab_hi, cd_hi));
            _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(ab_hi, cd_hi));
        }
    }
}

/// Whether this CPU has the integer dot product the op is substituted for (AVX-512 VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn select_kernel() -> QKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if available() {
            return QKernel { name: "avx512-vnni 8x48", tile: x86::tile_vnni };
        }
    }
    PORTABLE
}

/// Which kernel this CPU runs (for logs and `whaled bench --profile`).
pub fn kernel_name() -> &'static str {
    select_kernel().name
}

/// Interleaves one image's `[cin, plane]` u8 activation into `out` as `[quads][padded][4]`, zero in
/// the padding (channels past `cin`, pixels past `plane`).
fn interleave(x: &[u8], cin: usize, plane: usize, padded: usize, out: &mut [u8]) {
    let quads = cin.div_ceil(QUAD);
    debug_assert!(x.len() == cin * plane && out.len() == quads * padded * QUAD);
    for q in 0..quads {
        let dst = &mut out[q * padded * QUAD..][..padded * QUAD];
        let mut rows: [&[u8]; QUAD] = [&[]; QUAD];
        let present = ((q + 1) * QUAD).min(cin) - q * QUAD;
        for (k, row) in rows.iter_mut().enumerate().take(present) {
            *row = &x[(q * QUAD + k) * plane..][..plane];
        }
        // Whole runs of 16 pixels with SSE2 where there are 4 channels; the rest (and other targets) below.
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut p = 0;
        #[cfg(target_arch = "x86_64")]
        if present == QUAD {
            while p + 16 <= plane {
                let ptrs = [rows[0][p..].as_ptr(), rows[1][p..].as_ptr(), rows[2][p..].as_ptr(), rows[3][p..].as_ptr()];
                // SAFETY: each row has 16 bytes from p (p + 16 <= plane), and dst 64 from 4p
                // (padded >= plane).
                unsafe { x86::interleave16(ptrs, dst[p * QUAD..][..16 * QUAD].as_mut_ptr()) };
                p += 16;
            }
        }
        for p in p..padded {
            for k in 0..QUAD {
                dst[p * QUAD + k] = rows[k].get(p).copied().unwrap_or(0);
            }
        }
    }
}

impl QPointwiseConv {
    fn compute(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.compute_with(inputs, select_kernel())
    }

    pub(crate) fn compute_with(&self, inputs: TVec<TValue>, kernel: QKernel) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 5, "WhaledQPointwiseConv takes data, weights, correction, multiplier and bias");
        let x = inputs[0].try_as_plain_ram()?.as_slice::<u8>()?;
        let w = inputs[1].try_as_plain_ram()?.as_slice::<i8>()?;
        let corr = inputs[2].try_as_plain_ram()?.as_slice::<i32>()?;
        let mul = inputs[3].try_as_plain_ram()?.as_slice::<f32>()?;
        let bias = inputs[4].try_as_plain_ram()?.as_slice::<f32>()?;
        let (cin, cout, plane, quads) = (self.cin, self.cout, self.plane(), self.quads());
        ensure!(
            x.len() == self.batch * cin * plane
                && w.len() == cout * quads * QUAD
                && corr.len() == cout
                && mul.len() == cout
                && bias.len() == cout,
            "WhaledQPointwiseConv: inputs do not match {self:?}"
        );
        let padded = plane.next_multiple_of(16);
        let image_bytes = quads * padded * QUAD;
        let clamp = as_clamp(&self.post);
        // SAFETY: u8 and f32 have no invalid bit patterns, and every element is written before the
        // tensor is returned: the work items partition the output (`Split`), and each writes every
        // element of its rectangle.
        let mut out = unsafe { Tensor::uninitialized_dt(self.output_type(), &self.shape(1))? };
        let blocks_per_image = cout / BLOCK;
        let pool = Pool::for_work(self.batch * cout * cin * plane / 4);
        let split = Split::new(self.batch * blocks_per_image, plane.div_ceil(TILE), pool.items());
        // The interleaving buffer is taken out of the thread-local for the call, not borrowed across
        // the pool's run: a pool thread waiting there may run another inference's op meanwhile
        // (`on_pool`), which then finds the slot empty and packs into a buffer of its own.
        let mut packed = PACKED.with(|p| std::mem::take(&mut *p.borrow_mut()));
        packed.resize(self.batch * image_bytes, 0);
        for (image, dst) in packed.chunks_exact_mut(image_bytes).enumerate() {
            interleave(&x[image * cin * plane..][..cin * plane], cin, plane, padded, dst);
        }
        {
            let packed = &packed[..];
            let mut view = out.try_as_plain_ram_mut()?;
            let bytes = view.as_bytes_mut();
            let raw = Out { ptr: bytes.as_mut_ptr(), len: bytes.len() };
            let item = |i: usize| {
                let (blocks, tiles) = split.item(i);
                let columns = tiles.start * TILE..(tiles.end * TILE).min(plane);
                for block in blocks {
                    let (image, in_image) = (block / blocks_per_image, block % blocks_per_image);
                    let co = in_image * BLOCK;
                    let mut p0 = columns.start;
                    while p0 < columns.end {
                        let n = TILE.min(columns.end - p0);
                        let t = QTile {
                            x: &packed[image * image_bytes..][..image_bytes],
                            padded,
                            quads,
                            p0,
                            n,
                            w: &w[in_image * quads * BLOCK * QUAD..][..quads * BLOCK * QUAD],
                            corr: &corr[co..][..BLOCK],
                            mul: &mul[co..][..BLOCK],
                            bias: &bias[co..][..BLOCK],
                            clamp,
                            output: self.output,
                            out: raw,
                            out_at: (image * cout + co) * plane + p0,
                            out_stride: plane,
                        };
                        (kernel.tile)(&t, n.div_ceil(16));
                        p0 += n;
                    }
                }
            };
            pool.run(split.items(), item);
        }
        PACKED.with(|p| *p.borrow_mut() = packed);
        Ok(tvec!(out.into_tvalue()))
    }
}

/// Replaces every eligible dequantize -> 1x1 conv -> bias [-> clamp] [-> quantize] chain of a
/// decluttered static-QDQ model by [`QPointwiseConv`] and returns how many it replaced; nothing when
/// the CPU lacks AVX-512 VNNI (see the module docs). Must run before [`crate::pointwise::substitute`],
/// which would otherwise take the same einsums as float convolutions.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    substitute_with_any_kernel(model)
}

/// [`substitute`] whatever the CPU (the op then runs the portable kernel): for tests.
pub fn substitute_with_any_kernel(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(einsum) = node.op_as::<EinSum>() else { continue };
        let Some(conv) = conv_1x1(model, node, einsum)? else { continue };
        let Conv1x1 { batch, cin, cout, hw, batch_axis, weights: wf } = conv;
        let Some((data, x_scale, x_zero)) = dequantized_u8(model, node.inputs[0])? else { continue };
        let Some((q, scales)) = recover_int8(&wf, cout, cin) else { continue };
        let (bias, conv_end) = match bias_after(model, node.id, cout)? {
            Some((bias, add)) => (bias, add),
            None => (vec![0f32; cout], node.id),
        };
        let (post, last) = fusable_successors(model, conv_end)?;
        let (output, last) = match quantize_after(model, last)? {
            Some((qid, inv_scale, zero_point)) => (QOutput::U8 { inv_scale: inv_scale.to_bits(), zero_point }, qid),
            None => (QOutput::F32, last),
        };
        let Ok(op) = QPointwiseConv::new(batch, cin, cout, hw, batch_axis, output) else { continue };
        let op = op.with_post(post)?;
        let mul: Vec<f32> = scales.iter().map(|s| x_scale * s).collect();
        // Finite products and biases only: the VNNI epilogue's clamp would turn a NaN into -inf where
        // the portable kernel and tract keep it.
        if !mul.iter().chain(&bias).all(|v| v.is_finite()) {
            continue;
        }
        let corr: Vec<i32> =
            q.chunks_exact(cin).map(|row| x_zero as i32 * row.iter().map(|&v| v as i32).sum::<i32>()).collect();
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("whaled int8 pointwise {name}"));
        let x = patch.tap_model(model, data)?;
        let wires = [
            x,
            patch.add_const(format!("{name}.whaled_q_weights"), pack_weights(&q, cout, cin)?)?,
            patch.add_const(format!("{name}.whaled_q_correction"), tensor1(&corr))?,
            patch.add_const(format!("{name}.whaled_q_multiplier"), tensor1(&mul))?,
            patch.add_const(format!("{name}.whaled_bias"), tensor1(&bias))?,
        ];
        let out = patch.wire_node(&name, op, &wires)?;
        patch.shunt_outside(model, last.into(), out[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::uniform;

    /// Every kernel this CPU can run.
    fn kernels() -> Vec<QKernel> {
        let mut k = vec![PORTABLE];
        if available() {
            k.push(select_kernel());
        }
        k
    }

    /// The definition, in f64: `((sum (x - z_x) q_w) * s_x * s_w + bias)`, clamped, then quantized
    /// (as f64 before rounding, so a near-tie may differ from f32 by one level).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        batch: usize,
        cin: usize,
        cout: usize,
        plane: usize,
        x: &[u8],
        z: u8,
        q: &[i8],
        mul: &[f32],
        bias: &[f32],
        clamp: Option<(f32, f32)>,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        for n in 0..batch {
            for co in 0..cout {
                for p in 0..plane {
                    let mut acc = 0f64;
                    for ci in 0..cin {
                        acc += (x[(n * cin + ci) * plane + p] as f64 - z as f64) * q[co * cin + ci] as f64;
                    }
                    let mut y = acc * mul[co] as f64 + bias[co] as f64;
                    if let Some((lo, hi)) = clamp {
                        y = y.max(lo as f64).min(hi as f64);
                    }
                    out.push(y);
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_odd_shapes() {
        tract_linalg::multithread::set_threading_element_threshold(0);
        let mut rnd = uniform(11);
        // (batch, cin, cout, hw): channels off the quad, planes around 16, 48 and their tails.
        let cases = [
            (1, 1, 8, [1, 1]),
            (1, 3, 16, [7, 7]),
            (2, 5, 8, [4, 12]),
            (1, 16, 24, [1, 47]),
            (1, 17, 8, [6, 8]),
            (3, 9, 32, [13, 11]),
            (1, 40, 40, [2, 50]),
            (1, 96, 24, [3, 33]),
            (2, 2, 16, [97, 1]),
        ];
        for (batch, cin, cout, hw) in cases {
            let plane = hw[0] * hw[1];
            let x: Vec<u8> = (0..batch * cin * plane).map(|_| ((rnd() + 1.0) * 127.9) as u8).collect();
            let q: Vec<i8> = (0..cout * cin).map(|_| (rnd() * 127.0).round() as i8).collect();
            let z = 37u8;
            let mul: Vec<f32> = (0..cout).map(|_| (rnd() + 1.5) * 1e-3).collect();
            let bias: Vec<f32> = (0..cout).map(|_| rnd()).collect();
            let corr: Vec<i32> =
                q.chunks_exact(cin).map(|r| z as i32 * r.iter().map(|&v| v as i32).sum::<i32>()).collect();
            for (post, output) in [
                (vec![], QOutput::F32),
                (vec![Post::Max(0f32.to_bits()), Post::Min(0.5f32.to_bits())], QOutput::F32),
                (vec![], QOutput::U8 { inv_scale: (1.0f32 / 0.01).to_bits(), zero_point: 100 }),
                (vec![Post::Max(0f32.to_bits())], QOutput::U8 { inv_scale: (1.0f32 / 0.004).to_bits(), zero_point: 0 }),
            ] {
                let clamp = as_clamp(&post);
                let want = reference(batch, cin, cout, plane, &x, z, &q, &mul, &bias, clamp);
                let op = QPointwiseConv::new(batch, cin, cout, hw, [true; 2], output)
                    .unwrap()
                    .with_post(post.clone())
                    .unwrap();
                let inputs = tvec![
                    Tensor::from_shape(&[batch, cin, hw[0], hw[1]], &x).unwrap().into_tvalue(),
                    pack_weights(&q, cout, cin).unwrap().into_tvalue(),
                    tensor1(&corr).into_tvalue(),
                    tensor1(&mul).into_tvalue(),
                    tensor1(&bias).into_tvalue(),
                ];
                for (kernel, threads) in kernels().into_iter().flat_map(|k| [(k, 1), (k, 3)]) {
                    let pool = tract_linalg::multithread::Executor::multithread(threads);
                    let got = tract_linalg::multithread::multithread_tract_scope(pool, || {
                        op.compute_with(inputs.clone(), kernel)
                    })
                    .unwrap();
                    let what = format!("{} x{threads} {batch}x{cin}->{cout} {hw:?} {post:?} {output:?}", kernel.name);
                    match output {
                        QOutput::F32 => {
                            let got = got[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                            assert_eq!(got.len(), want.len(), "{what}");
                            let diff = got.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0f64, f64::max);
                            let scale = want.iter().fold(1f64, |m, w| m.max(w.abs()));
                            // f32 rounding of the product and the bias: relative to the largest output.
                            assert!(diff <= 1e-6 * scale, "{what}: max diff {diff} of {scale}");
                        }
                        QOutput::U8 { inv_scale, zero_point } => {
                            let got = got[0].try_as_plain_ram().unwrap().as_slice::<u8>().unwrap().to_vec();
                            assert_eq!(got.len(), want.len(), "{what}");
                            let inv = f32::from_bits(inv_scale) as f64;
                            for (i, (&g, &y)) in got.iter().zip(&want).enumerate() {
                                let exact = (y * inv + zero_point as f64).clamp(0.0, 255.0);
                                // Within half a level plus float rounding of the exact value.
                                assert!(
                                    (g as f64 - exact).abs() <= 0.5 + 1e-3,
                                    "{what}: element {i} is {g}, the definition {exact}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn recovers_only_weights_that_are_whole_steps() {
        // Weights as a folded DequantizeLinear writes them: f32(q * scale).
        let w: Vec<f32> = [64i8, -127, 32].iter().map(|&q| q as f32 * 0.013).chain([0.0; 3]).collect();
        let (q, s) = recover_int8(&w, 2, 3).unwrap();
        assert_eq!(q, vec![64, -127, 32, 0, 0, 0]);
        assert!((s[0] - 0.013).abs() < 1e-8 && s[1] == 1.0, "{s:?}");
        // A row whose largest weight is 20 steps (onnxruntime's scale floor).
        let w: Vec<f32> = [20i8, -3, 7].iter().map(|&q| q as f32 * 0.0021).collect();
        let (q, s) = recover_int8(&w, 1, 3).unwrap();
        let back: Vec<f32> = q.iter().map(|&q| q as f32 * s[0]).collect();
        assert!(back.iter().zip(&w).all(|(a, b)| (a - b).abs() <= 1e-6 * 0.042), "{q:?} {s:?}");
        // 1 and pi / 10 are no whole numbers of any common step max / k, k <= 127: float weights.
        assert!(recover_int8(&[1.0, std::f32::consts::PI / 10.0], 1, 2).is_none());
        assert!(recover_int8(&[1.0, f32::NAN], 1, 2).is_none());
        assert!(recover_int8(&[1.0], 1, 2).is_none());
    }

    #[test]
    fn refuses_sizes_it_cannot_run() {
        assert!(QPointwiseConv::new(1, 4, 12, [2, 2], [true; 2], QOutput::F32).is_err());
        assert!(QPointwiseConv::new(1, MAX_CIN + 1, 8, [2, 2], [true; 2], QOutput::F32).is_err());
        assert!(QPointwiseConv::new(2, 4, 8, [2, 2], [true, false], QOutput::F32).is_err());
        assert!(pack_weights(&[0; 7], 8, 1).is_err());
    }
}
