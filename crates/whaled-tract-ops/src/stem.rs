//! A dense 2-D convolution (a network's stem: 3x3 over RGB, stride 2; a ResNet's 3x3 convolutions; a
//! vision transformer's patch embedding) for tract, substituted into a model at load time.
//!
//! Why: tract 0.23 runs an EfficientNet's stem as an im2col and a general matrix product at about 14
//! GMAC/s, plus a separate pass for its activation: 1.2 of the marine gate's 13 ms on x86_64 (the
//! product 0.75, its ReLU6 0.35). Its 27 "input channels" (3 colours x 9 taps) and one output row per
//! channel are exactly what whaled's 1x1 op ([`crate::pointwise`]) computes at 40-55 GMAC/s. The same
//! holds for ResNet-18's 3x3 convolutions (tract: im2col and its general product, 48 ms for the whole
//! network; with this op 40 ms, its convolutions at 41-47 GMAC/s).
//!
//! What: [`substitute`] replaces every float NCHW (or CHW) `Conv` with one group, at most
//! [`MAX_ROWS`] input channels x taps, a multiple of [`BLOCK`] output channels, constant weights and
//! bias, for one image, by [`StemConv`], fusing a following ReLU / ReLU6; output rows as wide as those
//! tract runs as its own direct convolution ([`TRACT_DIRECT_MIN_WIDTH`]) only where the op runs direct.
//! The op writes every input channel into the depthwise op's zero-padded, phase-split scratch, where
//! every tap of every output row is one contiguous run, and the whole tap (all output rows, each
//! `phase_width` long) one stretch. Then either:
//! - **direct** (where that adds at most [`DIRECT_MAX_EXTRA`] percent of computed columns: wide rows,
//!   ResNet's 56x56 layers): the 1x1 op's kernel reads the stretches in place through a table of row
//!   starts (one row per input channel and tap) and the columns past each output row are dropped: no
//!   im2col matrix is written and read back;
//! - or **through an im2col matrix** `[cin x taps, out plane]` of exact rows, each a few copies out of
//!   the scratch (narrow rows: a 7x7 output of a 3x3 computes 9 columns per row for 7).
//!
//! Either way the weights are flattened `[cout, cin x taps]` and packed once.
//!
//! Numerics: every output is `bias + sum over (ci, ky, kx) of w * x`, in that order, in f32: the sum
//! tract and onnxruntime compute in some order; tests/stem.rs checks it against both.
//!
//! Where it is not used: where the 1x1 op is not (armv7), batches of more than one image, NHWC graphs,
//! grouped convolutions (the depthwise op takes those with one channel per group), wide inputs.

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat};

use crate::depthwise::{fill_scratch, per_channel, spec_geometry, with_scratch, Geometry};
use crate::fuse::{fusable_successors, Post};
use crate::pointwise::{pack_weights, select_kernel, Kernel, Out, PointwiseConv, Pool, RowTable, Split, BLOCK};
use std::cell::RefCell;

/// Whether this build substitutes stem convolutions (where the 1x1 op runs).
pub const ENABLED: bool = crate::pointwise::ENABLED;

/// The most input channels x taps the op takes. First set to 80 (a 3 x 5 x 5 stem is 75) on the guess
/// that a larger im2col matrix made tract's own convolution the better tool; measured, it is not: with
/// every ResNet conv taken (up to 512 x 3 x 3 = 4608 rows, and the 3 x 7 x 7 stem) ResNet-18 went from
/// 48.1 to 39.8 ms, ResNet-54 136.5 -> 121.2, ResNet-101 166.5 -> 156.8, and a ViT-B/16's patch
/// embedding (768 rows, stride 16) 2.8 -> 2.4 ms (docs/BENCHMARKS.md). The bound keeps the packed
/// weights and the im2col matrix of one conv within what a model of that size holds anyway.
pub const MAX_ROWS: usize = 16_384;

/// The output row width from which tract 0.23 runs such a convolution as its own direct spatial
/// convolution (its `MIN_DIRECT_SPATIAL_W`, NCHW only). There the im2col path was no faster (the B4's
/// stem at 512, 256 wide: 213 / 224 ms, min / median of p50s, whole inference, with tract's; 215 / 227
/// through an im2col matrix), so such convolutions are taken only where the op runs direct: the B4's
/// stem, SiLU and first depthwise conv 8.0-9.8 ms as tract's conv and the separate ops, 5.7-5.9 as the
/// direct stem fused with the depthwise conv ([`crate::expand`]; docs/BENCHMARKS.md).
pub const TRACT_DIRECT_MIN_WIDTH: usize = 128;

/// Dense convolution, f32, one image. Inputs: data `[1, Cin, H, W]` (or `[Cin, H, W]`), the weights
/// packed by [`pack_weights`] from `[cout, cin x taps]`, bias `[cout]`. Private fields: built only by
/// [`StemConv::new`], which checks the sizes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StemConv {
    /// One channel's geometry (batch 1, 1 channel): the scratch and tap offsets of each input channel.
    plane: Geometry,
    cin: usize,
    cout: usize,
    /// Whether the data and the output carry the batch axis.
    batch_axis: bool,
    /// The 1x1 op over the taps (read direct, or from the im2col matrix), with the fused steps.
    product: PointwiseConv,
    /// Elements of one input channel's scratch in the direct path's buffer ([`StemConv::input`]).
    channel_len: usize,
    /// Where each row of the product (input channel `c`, tap `t`) starts in that buffer:
    /// `c * channel_len + tap_offsets[t]`.
    rows: RowTable,
    /// Whether the op runs direct (the product reads the scratch through `rows`) or through an im2col
    /// matrix ([`DIRECT_MAX_EXTRA`]).
    direct: bool,
}

/// The direct path computes every row `phase_width` long (and the span's last vector whole) and drops
/// the columns past the output's width: it is taken where that adds at most this many percent to the
/// columns computed. Measured on ResNet-18 (AVX-512, 1 thread, per node): at 56x56 (58 computed for 56,
/// +4 %) the direct path takes 0.93-0.97 of the im2col path's time, its 7x7 stem (115 for 112) 0.86; at
/// 28x28 (+8 %) 1.02-1.05, at 14x14 (+14 %) 1.05, a 7x7 output of a stride-2 3x3 (+31 %) 1.26.
const DIRECT_MAX_EXTRA: usize = 5;

/// Whether the direct path suits this geometry: it computes (in whole vectors of this CPU's 1x1
/// kernel) at most [`DIRECT_MAX_EXTRA`] percent more columns than the output has (which the im2col path
/// computes about exactly: its last few columns go to the 1x1 op's narrow kernel).
pub(crate) fn direct_suits(plane: &Geometry) -> bool {
    let lanes = select_kernel().lanes();
    let computed = (plane.out_hw()[0] * plane.phase_width()).div_ceil(lanes) * lanes;
    computed * 100 <= plane.out_plane() * (100 + DIRECT_MAX_EXTRA)
}

/// The product's input for one image ([`StemConv::input`]).
pub(crate) enum StemInput {
    /// The im2col matrix `[cin x taps, out rows, out columns]`.
    Matrix(Tensor),
    /// The direct path's buffer (see [`DIRECT`]).
    Scratch(Laid),
}

/// A scratch buffer and the geometry and channel count it is laid out for.
type Laid = (Vec<f32>, Option<(Geometry, usize)>);

thread_local! {
    /// The direct path's zero-padded input scratch, one `channel_len` stretch per input channel, and
    /// the geometry and channel count it is laid out for (padding positions are never written, so they
    /// stay zero while the layout holds).
    static DIRECT: RefCell<Laid> = const { RefCell::new((Vec::new(), None)) };
}

impl StemConv {
    /// `plane` is one channel's geometry (batch 1, 1 channel); `cin x taps` at most [`MAX_ROWS`],
    /// `cout` a multiple of [`BLOCK`].
    pub fn new(plane: Geometry, cin: usize, cout: usize, batch_axis: bool, post: Vec<Post>) -> TractResult<StemConv> {
        ensure!(
            plane.batch() == 1 && plane.channels() == 1,
            "a stem conv's plane geometry is one channel of one image"
        );
        ensure!(cin >= 1 && cin * plane.taps() <= MAX_ROWS, "stem conv with {cin} x {} rows", plane.taps());
        let product =
            PointwiseConv::new(1, cin * plane.taps(), cout, plane.out_hw(), [false, batch_axis])?.with_post(post)?;
        let channel_len = plane.scratch_len();
        let offsets = plane.tap_offsets();
        let rows = RowTable::new((0..cin).flat_map(|c| offsets.iter().map(move |t| c * channel_len + t)).collect());
        let direct = direct_suits(&plane);
        Ok(StemConv { plane, cin, cout, batch_axis, product, channel_len, rows, direct })
    }

    fn shape(&self, channels: usize, hw: [usize; 2]) -> TVec<usize> {
        crate::pointwise::nchw(channels, 1, hw, self.batch_axis)
    }

    pub(crate) fn compute(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 3, "WhaledStemConv takes data, packed weights and bias");
        if self.direct {
            return self.compute_direct(&inputs);
        }
        let matrix = self.im2col(inputs[0].try_as_plain_ram()?.as_slice::<f32>()?)?;
        self.product.compute(tvec![matrix.into_tvalue(), inputs[1].clone(), inputs[2].clone()])
    }

    /// The direct path: every input channel's zero-padded, phase-split scratch once, in one buffer
    /// ([`StemConv::input`]), where each (channel, tap) row of the im2col matrix is the stretch
    /// starting at `rows[k]` (output row `y` of tap `t` is `scratch[offsets[t] + y * phase_width..][..out
    /// width]`, so the whole tap is one stretch of `out rows x phase_width` columns). The 1x1 op's kernel
    /// reads those stretches through the row table; the columns past the output width in each row are
    /// computed and dropped ([`StemConv::spread`]). So no matrix of `cin x taps` rows is written and read
    /// back (ResNet-18's 3x3s at 56x56: 576 rows of 3136).
    fn compute_direct(&self, inputs: &TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].try_as_plain_ram()?;
        let (w, b) = (inputs[1].try_as_plain_ram()?, inputs[2].try_as_plain_ram()?);
        let (w, b) = (w.as_slice::<f32>()?, b.as_slice::<f32>()?);
        self.check_weights(w, b)?;
        let x = x.as_slice::<f32>()?;
        let g = &self.plane;
        let out_plane = g.out_plane();
        let kernel = select_kernel();
        // SAFETY: f32 has no invalid bit patterns, and every element is written before the tensor is
        // returned: the items partition the blocks x tiles, and the tiles' kept columns are every
        // output column (`spread`).
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.shape(self.cout, g.out_hw()))? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            ensure!(out.len() == self.cout * out_plane, "WhaledStemConv: output does not match {self:?}");
            let out = Out { ptr: out.as_mut_ptr(), len: out.len() };
            // Last, so that no error return drops the scratch (it goes back below).
            let input = self.input(x)?;
            let StemInput::Scratch(buffer) = &input else { bail!("WhaledStemConv: no scratch for the direct path") };
            let blocks = self.cout / BLOCK;
            let pool = Pool::for_work(self.cout * self.cin * g.taps() * out_plane);
            let tiles = self.span().div_ceil(kernel.width());
            let split = if pool.threads() > 1 && out_plane > self.cout {
                Split::columns_first(blocks, tiles, pool.items())
            } else {
                Split::new(blocks, tiles, pool.items())
            };
            pool.run(split.items(), |i| {
                let (blocks, tiles) = split.item(i);
                // SAFETY: the items write disjoint blocks x columns of `out`, alive and otherwise unused.
                unsafe { self.run_direct(kernel, &buffer.0, w, b, blocks, tiles, out, 0) };
            });
            self.release(input);
        }
        Ok(tvec!(out.into_tvalue()))
    }

    fn check_weights(&self, w: &[f32], b: &[f32]) -> TractResult<()> {
        ensure!(
            w.len() == self.cout * self.cin * self.plane.taps() && b.len() == self.cout,
            "WhaledStemConv: weights do not match {self:?}"
        );
        Ok(())
    }

    /// Columns of the direct path's product: every output row `phase_width` long.
    fn span(&self) -> usize {
        self.plane.out_hw()[0] * self.plane.phase_width()
    }

    /// The direct path's product for output blocks `blocks` over column tiles `tiles`, on this thread,
    /// from the channels' scratch `buffer` into `out`, whose first row is output block `first`'s (the
    /// whole output: 0; [`StemConv::run_rows`]'s part of it: its first block). Every write is checked
    /// against `out.len`.
    ///
    /// # Safety
    /// `out` points into a live buffer that nothing else reads or writes at these blocks x tiles while
    /// this runs.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_direct(
        &self,
        kernel: Kernel,
        buffer: &[f32],
        w: &[f32],
        b: &[f32],
        blocks: std::ops::Range<usize>,
        tiles: std::ops::Range<usize>,
        out: Out<f32>,
        first: usize,
    ) {
        let (out_plane, full) = (self.plane.out_plane(), kernel.width());
        self.product.run_table(kernel, buffer, &self.rows, w, b, self.span(), blocks, tiles, |block, p0, n, values| {
            self.spread(p0, n, values, full, |r, at, src| {
                let at = ((block - first) * BLOCK + r) * out_plane + at;
                assert!(at + src.len() <= out.len, "stem output run out of bounds");
                // SAFETY: in bounds (checked); exclusive by the caller's contract.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out.ptr.add(at), src.len()) };
            })
        });
    }

    /// Hands the kept columns of one computed tile (columns `p0..p0 + n` of the span, `BLOCK` rows of
    /// `values`, `full` apart) to `put(row, where in the output plane, values)`, one run per output row:
    /// column `p` of the span is output row `p / phase_width`, column `p % phase_width`, kept below the
    /// output width.
    fn spread(&self, p0: usize, n: usize, values: &[f32], full: usize, mut put: impl FnMut(usize, usize, &[f32])) {
        let (ow, qw) = (self.plane.out_hw()[1], self.plane.phase_width());
        let mut p = p0;
        while p < p0 + n {
            let (y, c) = (p / qw, p % qw);
            let end = (p - c + qw).min(p0 + n);
            let kept = end.min(p - c + ow);
            if p < kept {
                for r in 0..BLOCK {
                    put(r, y * ow + c, &values[r * full + p - p0..][..kept - p]);
                }
            }
            p = end;
        }
    }

    /// The product's input for one image `x`: the direct path's scratch of every channel (filled on
    /// tract's pool), or the im2col matrix. Hand it back with [`StemConv::release`].
    pub(crate) fn input(&self, x: &[f32]) -> TractResult<StemInput> {
        if !self.direct {
            return Ok(StemInput::Matrix(self.im2col(x)?));
        }
        let g = &self.plane;
        let in_plane = g.in_plane();
        ensure!(x.len() == self.cin * in_plane, "WhaledStemConv: data does not match {self:?}");
        let mut buffer = DIRECT.with(|d| std::mem::take(&mut *d.borrow_mut()));
        let key = (g.clone(), self.cin);
        if buffer.1.as_ref() != Some(&key) {
            buffer.0.clear();
            // A tile's width of slack after the last channel: the last tile reads whole vectors.
            buffer.0.resize(self.cin * self.channel_len + select_kernel().width(), 0.0);
            buffer.1 = Some(key);
        }
        let channels = &mut buffer.0[..self.cin * self.channel_len];
        tract_linalg::multithread::par_chunks_mut(channels, self.channel_len, self.cin * in_plane, |first, chunk| {
            for (i, dst) in chunk.chunks_exact_mut(self.channel_len).enumerate() {
                fill_scratch(&self.plane, &x[(first + i) * in_plane..][..in_plane], dst);
            }
            Ok(())
        })?;
        Ok(StemInput::Scratch(buffer))
    }

    /// Puts the direct path's scratch back in this thread's slot (its padding stays laid out).
    pub(crate) fn release(&self, input: StemInput) {
        if let StemInput::Scratch(buffer) = input {
            DIRECT.with(|d| *d.borrow_mut() = buffer);
        }
    }

    /// Output blocks `blocks` of the whole plane, on this thread, into `out` (`blocks.len() * BLOCK`
    /// planes): the stem step of [`crate::expand`]. `input` is [`StemConv::input`]'s for this image.
    pub(crate) fn run_rows(
        &self,
        input: &StemInput,
        w: &[f32],
        b: &[f32],
        blocks: std::ops::Range<usize>,
        out: &mut [f32],
    ) -> TractResult<()> {
        self.check_weights(w, b)?;
        match input {
            StemInput::Matrix(m) => self.product.run_rows(m.try_as_plain_ram()?.as_slice::<f32>()?, w, b, blocks, out),
            StemInput::Scratch(buffer) => {
                let out_plane = self.plane.out_plane();
                ensure!(out.len() == blocks.len() * BLOCK * out_plane, "WhaledStemConv: rows do not match {self:?}");
                let kernel = select_kernel();
                let (first, tiles) = (blocks.start, self.span().div_ceil(kernel.width()));
                let out = Out { ptr: out.as_mut_ptr(), len: out.len() };
                // SAFETY: `out` is this call's exclusive slice, `blocks.len()` blocks from `first`.
                unsafe { self.run_direct(kernel, &buffer.0, w, b, blocks, 0..tiles, out, first) };
            }
        }
        Ok(())
    }

    /// The 1x1 op that runs over the taps (with the fused steps).
    pub(crate) fn product(&self) -> &PointwiseConv {
        &self.product
    }

    /// The data's shape.
    pub(crate) fn input_shape(&self) -> TVec<usize> {
        self.shape(self.cin, self.plane.in_hw())
    }

    /// The im2col matrix `[cin x taps, out rows, out columns]` of one image's data `x`.
    pub(crate) fn im2col(&self, x: &[f32]) -> TractResult<Tensor> {
        let g = &self.plane;
        let (in_plane, out_plane, taps) = (g.in_plane(), g.out_plane(), g.taps());
        ensure!(x.len() == self.cin * in_plane, "WhaledStemConv: data does not match {self:?}");
        let rows = self.cin * taps;
        let ([oh, ow], qw) = (g.out_hw(), g.phase_width());
        // SAFETY: f32 has no invalid bit patterns, and every element is written below before the tensor
        // is used: each of the `rows` rows is `oh` output rows of `ow`, each copied from the scratch.
        let mut matrix = unsafe { Tensor::uninitialized::<f32>(&[rows, oh, ow])? };
        {
            let mut view = matrix.try_as_plain_ram_mut()?;
            let offsets = g.tap_offsets();
            // Matrix rows split across tract's pool, each thread with its own scratch, filled with a
            // row's input channel when the row is the first of that channel in the thread's share: the
            // matrix is a full pass over memory (serial it was a tenth of ResNet-18 at 2 threads), and a
            // stem has 3 channels but 27-147 rows to share.
            let total = rows * out_plane;
            tract_linalg::multithread::par_chunks_mut(
                view.as_slice_mut::<f32>()?,
                out_plane,
                total,
                |first, chunk| {
                    with_scratch(g, 0.0, |scratch, _| {
                        for (i, row) in chunk.chunks_exact_mut(out_plane).enumerate() {
                            let (ci, t) = ((first + i) / taps, (first + i) % taps);
                            if i == 0 || t == 0 {
                                // Every channel writes the same scratch positions: the zeros (padding)
                                // stay zeros.
                                fill_scratch(g, &x[ci * in_plane..][..in_plane], scratch);
                            }
                            for (y, dst) in row.chunks_exact_mut(ow).enumerate() {
                                dst.copy_from_slice(&scratch[offsets[t] + y * qw..][..ow]);
                            }
                        }
                    });
                    Ok(())
                },
            )?;
        }
        Ok(matrix)
    }
}

impl Op for StemConv {
    fn name(&self) -> StaticName {
        "WhaledStemConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.plane;
        Ok(vec![format!(
            "{} -> {} channels, k {:?} stride {:?} in {:?} out {:?}, as {} rows of a 1x1, {}: {}",
            self.cin,
            self.cout,
            g.kernel(),
            g.stride(),
            g.in_hw(),
            g.out_hw(),
            self.cin * g.taps(),
            if self.direct { "direct" } else { "im2col" },
            self.product.info()?.join(", ")
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for StemConv {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.compute(inputs)?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.compute(inputs)
    }
}

impl TypedOp for StemConv {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "WhaledStemConv takes data, packed weights and bias");
        let want = self.shape(self.cin, self.plane.in_hw());
        ensure!(
            inputs[0].datum_type == f32::datum_type() && inputs[0].shape.as_concrete() == Some(&want[..]),
            "WhaledStemConv expects f32 {want:?}, got {:?}",
            inputs[0]
        );
        Ok(tvec!(f32::fact(self.shape(self.cout, self.plane.out_hw()))))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let macs = self.cout * self.cin * self.plane.taps() * self.plane.out_plane();
        Ok(tvec!((Cost::FMA(f32::datum_type()), macs.into())))
    }
}

/// Replaces every eligible stem convolution of a decluttered model by [`StemConv`] and returns how
/// many it replaced. Ineligible convolutions are left to tract, untouched.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else { continue };
        let Some((plane, cin, cout, batch_axis, weights, bias)) = eligible(model, node, conv)? else { continue };
        let (post, last) = fusable_successors(model, id)?;
        let mut patch = TypedModelPatch::new(format!("whaled stem {}", node.name));
        let x = patch.tap_model(model, node.inputs[0])?;
        let w = patch.add_const(format!("{}.whaled_packed_weights", node.name), weights)?;
        let b = patch.add_const(format!("{}.whaled_bias", node.name), bias)?;
        let op = StemConv::new(plane, cin, cout, batch_axis, post)?;
        let out = patch.wire_node(&node.name, op, &[x, w, b])?;
        patch.shunt_outside(model, last.into(), out[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// One channel's geometry, `cin`, `cout`, whether the data has a batch axis, the packed weights and
/// the `[cout]` bias of a conv this op can run, or `None`.
#[allow(clippy::type_complexity)]
fn eligible(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
) -> TractResult<Option<(Geometry, usize, usize, bool, Tensor, Tensor)>> {
    let spec = &conv.pool_spec;
    let (cin, cout) = (spec.input_channels, spec.output_channels);
    if conv.q_params.is_some()
        || spec.kernel_shape.len() != 2
        || conv.group != 1
        || node.inputs.len() != 3
        || !cout.is_multiple_of(BLOCK)
    {
        return Ok(None);
    }
    let [kh, kw] = [spec.kernel_shape[0], spec.kernel_shape[1]];
    // A 1x1 is the pointwise op's; more rows than MAX_ROWS stay tract's.
    if kh * kw == 1 || cin * kh * kw > MAX_ROWS {
        return Ok(None);
    }
    // One image of `cin` channels; output rows narrower than tract's own direct convolution takes, or
    // rows this op runs direct.
    let Some((geometry, batch_axis)) = spec_geometry(model, node, spec)? else { return Ok(None) };
    if geometry.batch() != 1
        || geometry.channels() != cin
        || (batch_axis && geometry.out_hw()[1] >= TRACT_DIRECT_MIN_WIDTH && !direct_suits(&geometry.one_plane()))
    {
        return Ok(None);
    }
    let (Some(kernel), Some(bias)) =
        (model.outlet_fact(node.inputs[1])?.konst.clone(), model.outlet_fact(node.inputs[2])?.konst.clone())
    else {
        return Ok(None);
    };
    if kernel.datum_type() != f32::datum_type() || bias.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    // The weights as [cout, cin * kh * kw] (row index ci, ky, kx), whatever the kernel's format.
    let Ok(view) = kernel.to_plain_array_view::<f32>() else { return Ok(None) };
    let dims = view.shape().to_vec();
    let mut flat = Vec::with_capacity(cout * cin * kh * kw);
    for o in 0..cout {
        for i in 0..cin {
            for y in 0..kh {
                for x in 0..kw {
                    let idx: [usize; 4] = match conv.kernel_fmt {
                        KernelFormat::OIHW if dims == [cout, cin, kh, kw] => [o, i, y, x],
                        KernelFormat::HWIO if dims == [kh, kw, cin, cout] => [y, x, i, o],
                        KernelFormat::OHWI if dims == [cout, kh, kw, cin] => [o, y, x, i],
                        _ => return Ok(None),
                    };
                    flat.push(view[idx.as_slice()]);
                }
            }
        }
    }
    let Some(bias) = per_channel(&bias, cout) else { return Ok(None) };
    let plane = geometry.one_plane();
    Ok(Some((plane, cin, cout, batch_axis, pack_weights(&flat, cout, cin * kh * kw)?, tensor1(&bias))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::as_clamp;
    use crate::test_util::{max_diff, uniform};

    /// Direct loop, f64: the definition of a dense convolution (weights `[cout, cin, kh, kw]`).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        cin: usize,
        cout: usize,
        in_hw: [usize; 2],
        out_hw: [usize; 2],
        k: [usize; 2],
        s: [usize; 2],
        d: [usize; 2],
        p: [usize; 2],
        x: &[f32],
        w: &[f32],
        b: &[f32],
    ) -> Vec<f32> {
        let mut out = Vec::new();
        for o in 0..cout {
            for oy in 0..out_hw[0] {
                for ox in 0..out_hw[1] {
                    let mut acc = b[o] as f64;
                    for i in 0..cin {
                        for ky in 0..k[0] {
                            for kx in 0..k[1] {
                                let iy = (oy * s[0] + ky * d[0]) as isize - p[0] as isize;
                                let ix = (ox * s[1] + kx * d[1]) as isize - p[1] as isize;
                                if iy < 0 || ix < 0 || iy >= in_hw[0] as isize || ix >= in_hw[1] as isize {
                                    continue;
                                }
                                let xi = (i * in_hw[0] + iy as usize) * in_hw[1] + ix as usize;
                                acc += w[((o * cin + i) * k[0] + ky) * k[1] + kx] as f64 * x[xi] as f64;
                            }
                        }
                    }
                    out.push(acc as f32);
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_odd_shapes() {
        tract_linalg::multithread::set_threading_element_threshold(0);
        let mut rnd = uniform(5);
        // (cin, cout, in, kernel, stride, dilation, pad_before, pad_after): stems (3x3 stride 2 with
        // torch and TF pads), a 5x5 and a 7x7-like one, one channel in, dilation, odd sizes.
        let cases = [
            (3, 32, [17, 19], [3, 3], [2, 2], [1, 1], [1, 1], [1, 1]),
            (3, 48, [16, 16], [3, 3], [2, 2], [1, 1], [0, 0], [1, 1]),
            (3, 8, [9, 40], [5, 5], [2, 2], [1, 1], [2, 2], [2, 2]),
            (1, 16, [7, 9], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1]),
            (2, 24, [12, 11], [3, 5], [1, 2], [2, 1], [2, 2], [1, 2]),
            (4, 8, [5, 5], [3, 3], [3, 3], [1, 1], [1, 1], [1, 1]),
            (3, 16, [64, 64], [3, 3], [2, 2], [1, 1], [1, 1], [1, 1]),
            (24, 16, [13, 30], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1]),
            (5, 8, [9, 33], [16, 16], [16, 16], [1, 1], [0, 0], [7, 15]),
            (3, 8, [20, 41], [2, 2], [3, 3], [1, 1], [1, 0], [0, 1]),
        ];
        for (cin, cout, in_hw, kernel, stride, dilation, pb, pa) in cases {
            let out_hw: [usize; 2] =
                std::array::from_fn(|a| (in_hw[a] + pb[a] + pa[a] - (kernel[a] - 1) * dilation[a] - 1) / stride[a] + 1);
            let taps = kernel[0] * kernel[1];
            let w: Vec<f32> = (0..cout * cin * taps).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..cout).map(|_| rnd()).collect();
            // Two images in turn through each op: the direct path keeps its scratch between calls.
            let images: Vec<Vec<f32>> =
                (0..2).map(|_| (0..cin * in_hw[0] * in_hw[1]).map(|_| rnd()).collect()).collect();
            for post in [vec![], vec![Post::Max(0f32.to_bits()), Post::Min(6f32.to_bits())]] {
                let clamp = as_clamp(&post);
                let plane = Geometry::new(1, 1, in_hw, out_hw, kernel, stride, dilation, pb).unwrap();
                let mut op = StemConv::new(plane, cin, cout, true, post.clone()).unwrap();
                // Both paths on every shape, whichever this CPU's rule picks.
                for direct in [true, false] {
                    op.direct = direct;
                    for threads in [1, 3] {
                        for x in &images {
                            let want = reference(cin, cout, in_hw, out_hw, kernel, stride, dilation, pb, x, &w, &b);
                            let want: Vec<f32> =
                                want.iter().map(|&v| clamp.map_or(v, |(lo, hi)| v.max(lo).min(hi))).collect();
                            let inputs = tvec![
                                Tensor::from_shape(&[1, cin, in_hw[0], in_hw[1]], x).unwrap().into_tvalue(),
                                pack_weights(&w, cout, cin * taps).unwrap().into_tvalue(),
                                tensor1(&b).into_tvalue(),
                            ];
                            let pool = tract_linalg::multithread::Executor::multithread(threads);
                            let got = tract_linalg::multithread::multithread_tract_scope(pool, || op.compute(inputs))
                                .unwrap();
                            assert_eq!(got[0].shape(), &[1, cout, out_hw[0], out_hw[1]]);
                            let got = got[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                            let diff = max_diff(&got, &want);
                            let what = format!("{cin}->{cout} {in_hw:?} k{kernel:?} s{stride:?} {post:?} x{threads}");
                            // f32 sums of cin x taps terms of O(1): 1e-5 up to 100 terms, then in proportion.
                            let tolerance = 1e-7 * (cin * taps).max(100) as f32;
                            assert!(diff < tolerance, "{what}, direct {direct}: {diff}");
                        }
                    }
                }
            }
        }
    }

    /// The direct path's rule on the shapes it was measured on (AVX-512's 16 lanes and NEON's 4 agree
    /// on each).
    #[test]
    fn runs_direct_where_few_columns_are_dropped() {
        let g = |in_hw: [usize; 2], out_hw, k, s, p| Geometry::new(1, 1, in_hw, out_hw, k, s, [1, 1], p).unwrap();
        // Stems at 224 and 512, ResNet's 7x7 stem and its 56x56 3x3s: direct.
        assert!(direct_suits(&g([224, 224], [112, 112], [3, 3], [2, 2], [1, 1])));
        assert!(direct_suits(&g([512, 512], [256, 256], [3, 3], [2, 2], [1, 1])));
        assert!(direct_suits(&g([224, 224], [112, 112], [7, 7], [2, 2], [3, 3])));
        assert!(direct_suits(&g([56, 56], [56, 56], [3, 3], [1, 1], [1, 1])));
        // ResNet's 28x28 and smaller 3x3s: through the im2col matrix.
        assert!(!direct_suits(&g([28, 28], [28, 28], [3, 3], [1, 1], [1, 1])));
        assert!(!direct_suits(&g([14, 14], [14, 14], [3, 3], [1, 1], [1, 1])));
        assert!(!direct_suits(&g([14, 14], [7, 7], [3, 3], [2, 2], [1, 1])));
    }

    #[test]
    fn refuses_sizes_it_cannot_run() {
        let g = Geometry::new(1, 1, [8, 8], [4, 4], [3, 3], [2, 2], [1, 1], [1, 1]).unwrap();
        assert!(StemConv::new(g.clone(), 3, 12, true, vec![]).is_err());
        assert!(StemConv::new(g.clone(), MAX_ROWS / 9 + 1, 16, true, vec![]).is_err());
        assert!(StemConv::new(g.clone(), MAX_ROWS / 9, 16, true, vec![]).is_ok());
        assert!(StemConv::new(g, 0, 16, true, vec![]).is_err());
        let two = Geometry::new(1, 2, [8, 8], [4, 4], [3, 3], [2, 2], [1, 1], [1, 1]).unwrap();
        assert!(StemConv::new(two, 3, 16, true, vec![]).is_err());
    }
}
