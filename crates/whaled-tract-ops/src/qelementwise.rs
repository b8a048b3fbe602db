//! The element-wise steps of a static-QDQ int8 model kept in u8: lookup tables for
//! dequantize -> unary op -> quantize chains, and one pass for dequantize x2 -> `Mul` / `Add` ->
//! quantize, substituted at load time.
//!
//! Why: in a QDQ EfficientNet-B4 (SiLU = x * sigmoid(x) after every conv, a squeeze-excitation `Mul` and
//! a residual `Add` in every block), tract's declutter turns a dequantize -> sigmoid -> quantize chain
//! into a 256-entry lookup table only when the dequantized tensor feeds nothing else, and the SiLU's
//! feeds both the sigmoid and the `Mul`. So the int8 B4 ran 406 dequantizations, 96 float sigmoids and
//! 383 quantizations over activations of up to 48 x 256 x 256: 125 ms of its 270 (`whaled bench
//! --profile`), more than its convolutions, and slower than the fp32 file.
//!
//! What:
//! - [`substitute`] first gives every dequantize (of u8) -> chain of float unary element-wise ops ->
//!   quantize (to u8) a lookup table, whatever else the dequantized tensor feeds. The table is computed
//!   by running the chain's own tract ops on the 256 possible inputs (as tract's declutter does for the
//!   single-consumer case), so it is bit-exact with the graph it replaces.
//! - Then every binary `Mul` or `Add` whose two inputs are dequantized u8 tensors and whose only consumer
//!   is a quantize becomes [`QBinary`]: `quantize(op(dequantize(a), dequantize(b)))` with the same f32
//!   operations tract's ops perform, in one pass over u8, again bit-exact. The shapes must be equal or
//!   one side must be per-channel (`[.., C, 1, 1]` against `[.., C, H, W]`: the squeeze-excitation
//!   scale).
//!
//! Dequantize nodes left without consumers are dropped by tract's optimiser.

use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::element_wise::ElementWiseMiniOp;
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::quant::DequantizeLinearF32;

use crate::quantize::{dequantized_u8, quantize_after, quantize_one, quantize_params};

/// A 256-entry u8 -> u8 lookup table: AVX-512 VBMI byte permutes (64 bytes per 4 instructions) where
/// the CPU has them, else a plain indexed loop. tract's own `LookupTable` measured 0.26 ms per million
/// bytes here; this one is a memory pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastLut {
    table: Vec<u8>,
}

impl FastLut {
    /// `table` must have 256 entries.
    pub fn new(table: Vec<u8>) -> TractResult<FastLut> {
        ensure!(table.len() == 256, "a u8 lookup table has 256 entries, not {}", table.len());
        Ok(FastLut { table })
    }

    pub fn run(&self, xs: &[u8], ys: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
        {
            // SAFETY: the CPU has the features.
            return unsafe { lut_vbmi(&self.table, xs, ys) };
        }
        for (y, &x) in ys.iter_mut().zip(xs) {
            *y = self.table[x as usize];
        }
    }
}

/// # Safety
/// The CPU has avx512f, avx512bw and avx512vbmi; `table` has 256 entries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn lut_vbmi(table: &[u8], xs: &[u8], ys: &mut [u8]) {
    use std::arch::x86_64::*;
    let n = xs.len().min(ys.len());
    assert!(table.len() == 256);
    let t = table.as_ptr();
    // SAFETY: 4 x 64 bytes of the table.
    let (t0, t1, t2, t3) = unsafe {
        (
            _mm512_loadu_si512(t as *const _),
            _mm512_loadu_si512(t.add(64) as *const _),
            _mm512_loadu_si512(t.add(128) as *const _),
            _mm512_loadu_si512(t.add(192) as *const _),
        )
    };
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: 64 bytes from i in xs and ys.
        let x = unsafe { _mm512_loadu_si512(xs[i..].as_ptr() as *const _) };
        // Entries 0..127 from t0:t1 and 128..255 from t2:t3 (permutex2var uses the low 7 bits), chosen
        // by bit 7 of each index.
        let lo = _mm512_permutex2var_epi8(t0, x, t1);
        let hi = _mm512_permutex2var_epi8(t2, x, t3);
        let high = _mm512_movepi8_mask(x);
        let y = _mm512_mask_blend_epi8(high, lo, hi);
        unsafe { _mm512_storeu_si512(ys[i..].as_mut_ptr() as *mut _, y) };
        i += 64;
    }
    for j in i..n {
        ys[j] = table[xs[j] as usize];
    }
}

impl ElementWiseMiniOp for FastLut {
    fn name(&self) -> String {
        "WhaledLookupTable".into()
    }

    fn output_type(&self, input_type: DatumType) -> Option<DatumType> {
        (input_type == u8::datum_type()).then_some(u8::datum_type())
    }

    fn eval_out_of_place(&self, t: &Tensor, _out_dt: Option<DatumType>) -> TractResult<Tensor> {
        let xs = t.try_as_plain_ram()?.as_slice::<u8>()?;
        // SAFETY: u8 has no invalid bit patterns and `run` writes every element.
        let mut out = unsafe { Tensor::uninitialized::<u8>(t.shape())? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            self.run(xs, view.as_slice_mut::<u8>()?);
        }
        Ok(out)
    }
}

fn lut_op(table: Vec<u8>) -> TractResult<ElementWiseOp> {
    Ok(ElementWiseOp(Box::new(FastLut::new(table)?), None))
}

/// Whether node `id` is a float unary element-wise op with one consumer (not a model output).
fn unary_link(model: &TypedModel, id: usize) -> TractResult<bool> {
    let node = model.node(id);
    let outlet = OutletId::new(id, 0);
    if node.inputs.len() != 1
        || node.outputs.len() != 1
        || model.outlet_successors(outlet).len() != 1
        || model.output_outlets()?.contains(&outlet)
    {
        return Ok(false);
    }
    let Some(ew) = node.op_as::<ElementWiseOp>() else { return Ok(false) };
    if quantize_params(ew).is_some() {
        return Ok(false);
    }
    let (input, output) = (model.outlet_fact(node.inputs[0])?, model.outlet_fact(outlet)?);
    Ok(input.datum_type == f32::datum_type() && output.datum_type == f32::datum_type() && input.shape == output.shape)
}

/// Replaces dequantize -> unary chain -> quantize by lookup tables, then dequantize x2 -> Mul/Add ->
/// quantize by [`QBinary`]; returns how many of each.
pub fn substitute(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    Ok((tables(model)?, binaries(model)?))
}

fn tables(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some(node) = model.nodes().get(id) else { continue };
        if node.op_as::<DequantizeLinearF32>().is_none() {
            continue;
        }
        let Some((source, _, _)) = dequantized_u8(model, id.into())? else { continue };
        // Every consumer of the dequantized tensor that starts a unary chain ending in a quantize.
        for succ in model.outlet_successors(id.into()).to_vec() {
            let mut chain = vec![];
            let mut at = succ.node;
            let quant = loop {
                if !unary_link(model, at)? || chain.len() >= 4 {
                    break None;
                }
                chain.push(at);
                if let Some((q, _, _)) = quantize_after(model, at)? {
                    break Some(q);
                }
                at = model.outlet_successors(OutletId::new(at, 0))[0].node;
            };
            let Some(quant) = quant else { continue };
            // The chain's own ops on the 256 possible inputs; a chain tract cannot run on its own is
            // left to tract, in the graph, as it was.
            let table = || -> TractResult<Vec<u8>> {
                let mut adhoc = TypedModel::default();
                let mut wire = adhoc.add_source("u8", u8::fact([256]))?;
                for &n in std::iter::once(&id).chain(&chain).chain(std::iter::once(&quant)) {
                    let node = model.node(n);
                    wire = adhoc.wire_node(&*node.name, node.op.clone(), &[wire])?[0];
                }
                adhoc.select_output_outlets(&[wire])?;
                let input = tensor1(&(0u8..=255).collect::<Vec<u8>>());
                let out = SimplePlan::new(adhoc)?.run(tvec!(input.into_tvalue()))?;
                let table =
                    out.first().ok_or_else(|| format_err!("no output"))?.try_as_plain_ram()?.as_slice::<u8>()?.to_vec();
                ensure!(table.len() == 256, "{} table entries", table.len());
                Ok(table)
            };
            let Ok(table) = table() else { continue };
            let op = lut_op(table)?;
            let name = model.node(chain[0]).name.clone();
            let mut patch = TypedModelPatch::new(format!("whaled lookup table {name}"));
            let x = patch.tap_model(model, source)?;
            let out = patch.wire_node(format!("{name}.whaled_lut"), op, &[x])?;
            patch.shunt_outside(model, quant.into(), out[0])?;
            patch.apply(model)?;
            replaced += 1;
        }
    }
    Ok(replaced)
}

/// The binary operations [`QBinary`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinKind {
    Mul,
    Add,
}

/// `quantize(dequantize(a) op dequantize(b))` on u8 tensors, one pass: element by element over equal
/// shapes, or with `b` one value per `(image, channel)` (`per_channel`: `b` is `[.., C, 1, 1]`, `a`
/// `[.., C, H, W]`, and `plane = H * W`). Scales and zero points as f32 bits / i32 (so the op is `Eq +
/// Hash`); `q_inv` is 1 / the output scale, as in tract's quantize.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QBinary {
    kind: BinKind,
    a: (u32, i32),
    b: (u32, i32),
    q_inv: u32,
    q_zero: u8,
    shape: TVec<usize>,
    /// `Some(plane)` when `b` is per channel.
    per_channel: Option<usize>,
}

impl Op for QBinary {
    fn name(&self) -> StaticName {
        "WhaledQBinary".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} of two dequantized u8 tensors, quantized; per channel: {:?}",
            self.kind, self.per_channel
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Accurate
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for QBinary {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.compute(inputs)?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.compute(inputs)
    }
}

impl TypedOp for QBinary {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 2 && inputs.iter().all(|f| f.datum_type == u8::datum_type()),
            "WhaledQBinary takes two u8 tensors"
        );
        ensure!(
            inputs[0].shape.as_concrete() == Some(&self.shape[..]),
            "WhaledQBinary: input {:?}, built for {:?}",
            inputs[0],
            self.shape
        );
        Ok(tvec!(u8::fact(self.shape.clone())))
    }
}

#[inline(always)]
fn run_kernel(kind: BinKind, a: &[u8], b: &[u8], out: &mut [u8], pa: (f32, i32), pb: (f32, i32), q: (f32, u8)) {
    let deq = |v: u8, (scale, zero): (f32, i32)| (v as i32 - zero) as f32 * scale;
    let op = |x: f32, y: f32| match kind {
        BinKind::Mul => x * y,
        BinKind::Add => x + y,
    };
    let (q_inv, q_zero) = (q.0, q.1 as i32);
    if let [z] = b {
        let bf = deq(*z, pb);
        for (o, &x) in out.iter_mut().zip(a) {
            *o = quantize_one(op(deq(x, pa), bf), q_inv, q_zero);
        }
    } else {
        for ((o, &x), &z) in out.iter_mut().zip(a).zip(b) {
            *o = quantize_one(op(deq(x, pa), deq(z, pb)), q_inv, q_zero);
        }
    }
}

/// AVX2: 32 values per step, the same f32 operations as [`run_kernel`] (dequantize, op, then
/// `quantize::avx2`), so bit for bit the same results.
///
/// # Safety
/// The CPU has AVX2; `b` has `a`'s length or 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_kernel_avx2(
    kind: BinKind,
    a: &[u8],
    b: &[u8],
    out: &mut [u8],
    pa: (f32, i32),
    pb: (f32, i32),
    q: (f32, u8),
) {
    use std::arch::x86_64::*;
    let n = a.len().min(out.len());
    if n == 0 || b.is_empty() {
        return;
    }
    let broadcast = b.len() == 1;
    let (sa, za) = (_mm256_set1_ps(pa.0), _mm256_set1_epi32(pa.1));
    let (sb, zb) = (_mm256_set1_ps(pb.0), _mm256_set1_epi32(pb.1));
    let bconst = _mm256_set1_ps((b[0] as i32 - pb.1) as f32 * pb.0);
    // SAFETY (closures): the callers pass pointers with 8 readable bytes.
    let deq = |p: *const u8, s: __m256, z: __m256i| {
        let v = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(p as *const __m128i) });
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, z)), s)
    };
    let step = |i: usize| {
        let x = deq(unsafe { a.as_ptr().add(i) }, sa, za);
        let y = if broadcast { bconst } else { deq(unsafe { b.as_ptr().add(i) }, sb, zb) };
        let v = match kind {
            BinKind::Mul => _mm256_mul_ps(x, y),
            BinKind::Add => _mm256_add_ps(x, y),
        };
        crate::quantize::avx2::quantize8(v, q.0, q.1)
    };
    let mut i = 0;
    while i + 32 <= n {
        let packed = crate::quantize::avx2::pack32(step(i), step(i + 8), step(i + 16), step(i + 24));
        // SAFETY: 32 bytes from i are in out (i + 32 <= n).
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, packed) };
        i += 32;
    }
    let tail_b = if broadcast { b } else { &b[i..n] };
    run_kernel(kind, &a[i..n], tail_b, &mut out[i..n], pa, pb, q);
}

/// One run of the kernel over `a` and `b` (`b` of `a`'s length, or 1: a broadcast value) into `out`.
fn kernel(kind: BinKind, a: &[u8], b: &[u8], out: &mut [u8], pa: (f32, i32), pb: (f32, i32), q: (f32, u8)) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { run_kernel_avx2(kind, a, b, out, pa, pb, q) };
    }
    run_kernel(kind, a, b, out, pa, pb, q)
}

impl QBinary {
    fn compute(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2, "WhaledQBinary takes two inputs");
        let a = inputs[0].try_as_plain_ram()?.as_slice::<u8>()?;
        let b = inputs[1].try_as_plain_ram()?.as_slice::<u8>()?;
        let len: usize = self.shape.iter().product();
        let pa = (f32::from_bits(self.a.0), self.a.1);
        let pb = (f32::from_bits(self.b.0), self.b.1);
        let q = (f32::from_bits(self.q_inv), self.q_zero);
        // SAFETY: u8 has no invalid bit patterns; every element is written below.
        let mut out = unsafe { Tensor::uninitialized::<u8>(&self.shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let o = view.as_slice_mut::<u8>()?;
            ensure!(
                a.len() == len && o.len() == len,
                "WhaledQBinary: input of {} values for {:?}",
                a.len(),
                self.shape
            );
            match self.per_channel {
                None => {
                    ensure!(b.len() == len, "WhaledQBinary: second input of {} values for {:?}", b.len(), self.shape);
                    kernel(self.kind, a, b, o, pa, pb, q);
                }
                Some(plane) => {
                    ensure!(
                        plane > 0 && b.len() * plane == len,
                        "WhaledQBinary: {} channel values for {:?}",
                        b.len(),
                        self.shape
                    );
                    for ((oc, ac), bc) in o.chunks_exact_mut(plane).zip(a.chunks_exact(plane)).zip(b.chunks_exact(1)) {
                        kernel(self.kind, ac, bc, oc, pa, pb, q);
                    }
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

fn binaries(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some(node) = model.nodes().get(id) else { continue };
        let Some(bin) = node.op_as::<TypedBinOp>() else { continue };
        let kind = match bin.0.name() {
            "Mul" => BinKind::Mul,
            "Add" => BinKind::Add,
            _ => continue,
        };
        if node.inputs.len() != 2 || model.outlet_fact(id.into())?.datum_type != f32::datum_type() {
            continue;
        }
        let (Some(x), Some(y)) = (dequantized_u8(model, node.inputs[0])?, dequantized_u8(model, node.inputs[1])?)
        else {
            continue;
        };
        let Some((quant, q_inv, q_zero)) = quantize_after(model, id)? else { continue };
        let (Some(sx), Some(sy), Some(so)) = (
            model.outlet_fact(x.0)?.shape.as_concrete().map(|s| s.to_vec()),
            model.outlet_fact(y.0)?.shape.as_concrete().map(|s| s.to_vec()),
            model.outlet_fact(id.into())?.shape.as_concrete().map(|s| s.to_vec()),
        ) else {
            continue;
        };
        // x * table(x) (a SiLU: the sigmoid's chain became a table over the same u8 tensor): the whole
        // product depends on x alone, so it is one table too.
        if let Some((source, table)) = [(x, y), (y, x)].iter().find_map(|&(p, t)| {
            let n = model.node(t.0.node);
            let lut = n.op_as::<ElementWiseOp>()?.0.downcast_ref::<FastLut>()?;
            (n.inputs[0] == p.0).then(|| (p, (t, lut.table.clone())))
        }) {
            let ((_, tp_scale, tp_zero), lut) = (table.0, table.1);
            let combined: Vec<u8> = (0..=255u8)
                .map(|v| {
                    let af = (v as i32 - source.2 as i32) as f32 * source.1;
                    let bf = (lut[v as usize] as i32 - tp_zero as i32) as f32 * tp_scale;
                    let y = match kind {
                        BinKind::Mul => af * bf,
                        BinKind::Add => af + bf,
                    };
                    quantize_one(y, q_inv, q_zero as i32)
                })
                .collect();
            let name = node.name.clone();
            let mut patch = TypedModelPatch::new(format!("whaled lookup table {name}"));
            let w = patch.tap_model(model, source.0)?;
            let out = patch.wire_node(format!("{name}.whaled_lut"), lut_op(combined)?, &[w])?;
            patch.shunt_outside(model, quant.into(), out[0])?;
            patch.apply(model)?;
            replaced += 1;
            continue;
        }
        // Put the full-size operand first (Mul and Add commute, bit for bit in f32).
        let ((a, sa), (b, sb)) = if sx == so { ((x, sx), (y, sy)) } else { ((y, sy), (x, sx)) };
        if sa != so {
            continue;
        }
        let per_channel = if sb == so {
            None
        } else {
            // [.., C, 1, 1] against [.., C, H, W], same rank.
            let r = so.len();
            let ok = r >= 3 && sb.len() == r && sb[r - 2..] == [1, 1] && sb[..r - 2] == so[..r - 2];
            if !ok {
                continue;
            }
            Some(so[r - 2] * so[r - 1])
        };
        let op = QBinary {
            kind,
            a: (a.1.to_bits(), a.2 as i32),
            b: (b.1.to_bits(), b.2 as i32),
            q_inv: q_inv.to_bits(),
            q_zero,
            shape: so.into(),
            per_channel,
        };
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("whaled quantized {kind:?} {name}"));
        let wa = patch.tap_model(model, a.0)?;
        let wb = patch.tap_model(model, b.0)?;
        let out = patch.wire_node(format!("{name}.whaled_q"), op, &[wa, wb])?;
        patch.shunt_outside(model, quant.into(), out[0])?;
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
    fn lookup_table_is_the_table() {
        let table: Vec<u8> = (0..=255u8).map(|v| v.wrapping_mul(37).wrapping_add(11)).collect();
        let lut = FastLut::new(table.clone()).unwrap();
        // Every byte value, at lengths around the 64-byte step.
        for len in [0, 1, 63, 64, 65, 256, 1000] {
            let xs: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut ys = vec![0u8; len];
            lut.run(&xs, &mut ys);
            assert!(xs.iter().zip(&ys).all(|(&x, &y)| y == table[x as usize]), "length {len}");
        }
        assert!(FastLut::new(vec![0; 255]).is_err());
    }

    /// Against the definition written out with tract's own quantize: every element, both kinds, both
    /// layouts.
    #[test]
    fn qbinary_is_quantize_of_the_float_op() {
        let mut rnd = uniform(5);
        let shape: TVec<usize> = tvec![2, 3, 5, 7];
        let len = 2 * 3 * 5 * 7;
        let a: Vec<u8> = (0..len).map(|_| ((rnd() + 1.0) * 127.9) as u8).collect();
        let full: Vec<u8> = (0..len).map(|_| ((rnd() + 1.0) * 127.9) as u8).collect();
        let chan: Vec<u8> = (0..6).map(|_| ((rnd() + 1.0) * 127.9) as u8).collect();
        let (pa, pb, q) = ((0.031f32, 7), (0.0042f32, 128), (1.0f32 / 0.05, 3u8));
        for kind in [BinKind::Mul, BinKind::Add] {
            for per_channel in [None, Some(35)] {
                let b = if per_channel.is_some() { &chan } else { &full };
                let op = QBinary {
                    kind,
                    a: (pa.0.to_bits(), pa.1),
                    b: (pb.0.to_bits(), pb.1),
                    q_inv: q.0.to_bits(),
                    q_zero: q.1,
                    shape: shape.clone(),
                    per_channel,
                };
                let bshape: Vec<usize> = if per_channel.is_some() { vec![2, 3, 1, 1] } else { shape.to_vec() };
                let got = op
                    .compute(tvec![
                        Tensor::from_shape(&shape, &a).unwrap().into_tvalue(),
                        Tensor::from_shape(&bshape, b).unwrap().into_tvalue(),
                    ])
                    .unwrap();
                let got = got[0].try_as_plain_ram().unwrap().as_slice::<u8>().unwrap().to_vec();
                for i in 0..len {
                    let bv = if per_channel.is_some() { b[i / 35] } else { b[i] };
                    let af = (a[i] as i32 - pa.1) as f32 * pa.0;
                    let bf = (bv as i32 - pb.1) as f32 * pb.0;
                    let y = if kind == BinKind::Mul { af * bf } else { af + bf };
                    let want = tract_core::ops::quant::quantize_linear_f32_u8(y, q.0, q.1 as i32);
                    assert_eq!(got[i], want, "{kind:?} {per_channel:?} #{i}");
                }
            }
        }
    }
}
