//! A depthwise 2-D convolution op for tract, substituted into a model at load time.
//!
//! Why: `whaled bench --profile` showed tract 0.23's own `DepthWiseConv` taking half of an EfficientNet
//! Lite0 inference on x86_64 (14.7 of 28.8 ms), for 4 % of its multiply-adds. The depthwise layers of
//! the EfficientNet family (3x3 and 5x5, strides 1 and 2) are where tract is furthest from onnxruntime.
//!
//! What: [`substitute`] walks a decluttered tract model and replaces every float NCHW (or CHW) 2-D
//! `Conv` whose group count equals its input and output channels (and whose kernel and bias are
//! constants) by [`DepthwiseConv`], through tract's public op API; nothing in tract is forked. A chain of
//! element-wise max/min with constants right after it (ReLU, ReLU6) is fused into the op. The op
//! computes one channel plane at a time: the plane is copied once into a thread-local zero-padded
//! scratch split into `stride[0] x stride[1]` phases, so that every tap of every output is one flat
//! offset into the scratch; outputs are accumulated in registers over all taps (chunks of 32) with fused
//! multiply-adds where the CPU has them (AVX2+FMA or AVX-512 chosen at run time on x86_64; NEON on
//! aarch64, where FMA is baseline) and clamped. Where the output rows are whole chunks (every plane of 32
//! columns or a multiple: the large planes), the chunks are stored straight into the output, row by
//! row; elsewhere "virtual" output rows `phase_width` wide are computed as one flat run of chunks and
//! their first `out_w` columns copied out. Output rows under `BLOCKED_BELOW` columns (7x7 planes), and
//! on AVX-512 stride-1 layers with kernels 5 or 7 wide and rows under `BLOCKED_ROWS_BELOW` (the 14x14
//! to 32x32 planes of the EfficientNets), go through the `blocked` module instead: 16 channels at a
//! time, interleaved, one vector per output pixel. Channel planes are split across tract's intra-op
//! thread pool.

//! Numerics: every output is `bias + sum over taps of w * x`, taps in row-major kernel order, in f32,
//! the same sum tract and onnxruntime compute in some order; tests/depthwise.rs checks it against both
//! (tract's own op and onnxruntime) on random shapes, strides, paddings and dilations, with and without
//! the fused activations.
//!
//! Where it is not used: armv7 (no NEON in the base target, so the auto-vectorised loops would be
//! scalar; tract's op stays), quantized or non-float convolutions, NHWC graphs, 1-D and 3-D convs.

use std::cell::RefCell;

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat, PoolSpec};
use tract_core::ops::nn::DataFormat;

use crate::blocked::{self, BlockKernel};
pub use crate::fuse::Post;
use crate::fuse::{self, fusable_successors};

/// Whether this build substitutes depthwise convolutions (see the module docs for where it does not).
pub const ENABLED: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Output columns accumulated in registers at once: 32 f32 = 4 AVX2 / 2 AVX-512 / 8 NEON registers.
pub(crate) const CHUNK: usize = 32;

/// Output rows narrower than this are computed channel-blocked ([`crate::blocked`]). Measured on AVX-512
/// (1 thread, docs/BENCHMARKS.md): at 7 columns the blocked path takes 0.56-0.71 of the plane path's
/// time; at 14 columns 1.02-1.15 of it (with the pixel-at-a-time block kernel).
const BLOCKED_BELOW: usize = 12;

/// Where the blocked path has its register-row kernel ([`blocked::rows_kernel_runs`]), output rows
/// narrower than this are computed channel-blocked too for stride 1 and kernels 5 or 7 wide.
/// Measured (1 thread, docs/BENCHMARKS.md, "sixth round"): 14x14 k5 0.69 of the plane path's time
/// (dwbench), the B4's 16x16 k5 layers and 32x32 k5 layers faster in the model; its 64x64 layers, and
/// every 3x3 or stride-2 layer above 7x7, slower (the transposes in and out cost more than the
/// multiply-adds gain).
const BLOCKED_ROWS_BELOW: usize = 33;

/// The flat virtual plane is whole runs of this many outputs: the widest kernel's run (4 chunks), so
/// that no kernel has a latency-bound single chunk left at its end (see [`plane`]).
const RUN: usize = 4 * CHUNK;

/// The shape of one depthwise convolution, all in elements. Private fields: built only by
/// [`Geometry::new`], which checks that no size is zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Geometry {
    batch: usize,
    channels: usize,
    in_hw: [usize; 2],
    out_hw: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    /// Zero rows above / columns left of the input; the bottom and right padding follow from out_hw.
    pad_before: [usize; 2],
}

impl Geometry {
    /// Checks that every size, stride and dilation is positive. The padding after the input is implied
    /// by `out_hw` (outputs may lie wholly in the padding: they are the bias).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        batch: usize,
        channels: usize,
        in_hw: [usize; 2],
        out_hw: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        pad_before: [usize; 2],
    ) -> TractResult<Geometry> {
        let all = [batch, channels, in_hw[0], in_hw[1], out_hw[0], out_hw[1], kernel[0], kernel[1]];
        ensure!(all.iter().all(|&v| v > 0), "depthwise conv with an empty dimension");
        ensure!(stride.iter().chain(&dilation).all(|&v| v > 0), "depthwise conv with a zero stride or dilation");
        Ok(Geometry { batch, channels, in_hw, out_hw, kernel, stride, dilation, pad_before })
    }

    /// The same geometry for one plane: one image, one channel (the stem op's per-channel layout).
    pub(crate) fn one_plane(&self) -> Geometry {
        Geometry { batch: 1, channels: 1, ..self.clone() }
    }

    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    pub(crate) fn channels(&self) -> usize {
        self.channels
    }

    pub(crate) fn in_hw(&self) -> [usize; 2] {
        self.in_hw
    }

    pub(crate) fn out_hw(&self) -> [usize; 2] {
        self.out_hw
    }

    pub(crate) fn kernel(&self) -> [usize; 2] {
        self.kernel
    }

    pub(crate) fn stride(&self) -> [usize; 2] {
        self.stride
    }

    pub(crate) fn dilation(&self) -> [usize; 2] {
        self.dilation
    }

    pub(crate) fn pad_before(&self) -> [usize; 2] {
        self.pad_before
    }

    /// Whether the op computes this geometry channel-blocked ([`crate::blocked`]): output rows narrower
    /// than [`BLOCKED_BELOW`], or than [`BLOCKED_ROWS_BELOW`] where the register-row kernel runs.
    pub(crate) fn blocked(&self) -> bool {
        let w = self.out_hw[1];
        w < BLOCKED_BELOW
            || (w < BLOCKED_ROWS_BELOW
                && self.stride == [1, 1]
                && self.kernel[1] >= 5
                && blocked::rows_kernel_runs(self))
    }

    /// The scratch one input plane needs: every phase ([`fill_scratch`]).
    pub(crate) fn scratch_len(&self) -> usize {
        self.stride[0] * self.stride[1] * self.phase_len()
    }

    pub(crate) fn out_plane(&self) -> usize {
        self.out_hw[0] * self.out_hw[1]
    }

    pub(crate) fn in_plane(&self) -> usize {
        self.in_hw[0] * self.in_hw[1]
    }

    pub(crate) fn taps(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }

    /// Rows of one phase plane: the output rows plus the furthest tap's row offset inside the phase.
    fn phase_rows(&self) -> usize {
        self.out_hw[0] + (self.kernel[0] - 1) * self.dilation[0] / self.stride[0]
    }

    /// Columns of one phase plane, likewise.
    pub(crate) fn phase_width(&self) -> usize {
        self.out_hw[1] + (self.kernel[1] - 1) * self.dilation[1] / self.stride[1]
    }

    /// Outputs computed per plane: every row `phase_width` long (the columns past `out_hw[1]` are
    /// computed and dropped), rounded up to whole runs.
    pub(crate) fn virtual_len(&self) -> usize {
        (self.out_hw[0] * self.phase_width()).div_ceil(RUN) * RUN
    }

    /// One phase plane's length in the scratch, with room for the last chunk's furthest tap.
    fn phase_len(&self) -> usize {
        self.virtual_len() + self.phase_rows() * self.phase_width()
    }

    /// For each tap, in row-major kernel order, where its input starts in the scratch relative to the
    /// virtual output index.
    pub(crate) fn tap_offsets(&self) -> Vec<usize> {
        let [sh, sw] = self.stride;
        let mut offsets = Vec::with_capacity(self.taps());
        for ky in 0..self.kernel[0] {
            for kx in 0..self.kernel[1] {
                let (oy, ox) = (ky * self.dilation[0], kx * self.dilation[1]);
                let phase = (oy % sh) * sw + ox % sw;
                offsets.push(phase * self.phase_len() + (oy / sh) * self.phase_width() + ox / sw);
            }
        }
        offsets
    }
}

/// Depthwise convolution, f32. Inputs: data `[N, C, H, W]` (or `[C, H, W]`, the form tract's
/// declutter gives batch-1 graphs), kernel `[C, KH*KW]`, bias `[C]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DepthwiseConv {
    geometry: Geometry,
    /// Whether data and output carry the batch axis (`NCHW`) or not (`CHW`, batch 1).
    batch_axis: bool,
    /// Element-wise max/min with constants applied to every output, in order: the graph's ReLU or
    /// ReLU6 (Clip 0..6) that followed the convolution, fused (one pass over the output fewer).
    post: Vec<Post>,
}

impl DepthwiseConv {
    /// `batch_axis: false` takes `[C, H, W]` data and needs a batch-1 geometry.
    pub fn new(geometry: Geometry, batch_axis: bool) -> TractResult<DepthwiseConv> {
        ensure!(batch_axis || geometry.batch == 1, "a depthwise conv without a batch axis has batch 1");
        Ok(DepthwiseConv { geometry, batch_axis, post: Vec::new() })
    }

    /// The same convolution followed by `post` (at most 4 steps).
    pub fn with_post(mut self, post: Vec<Post>) -> TractResult<DepthwiseConv> {
        ensure!(post.len() <= 4, "at most 4 fused steps");
        self.post = post;
        Ok(self)
    }

    fn shape(&self, hw: [usize; 2]) -> TVec<usize> {
        let g = &self.geometry;
        if self.batch_axis {
            tvec![g.batch, g.channels, hw[0], hw[1]]
        } else {
            tvec![g.channels, hw[0], hw[1]]
        }
    }
}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        "WhaledDepthwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "k {:?} stride {:?} dilation {:?} pad {:?} in {:?} out {:?} x {} channels, kernel {}, {}, then {:?}",
            g.kernel,
            g.stride,
            g.dilation,
            g.pad_before,
            g.in_hw,
            g.out_hw,
            g.channels,
            kernel_name(),
            if g.blocked() { "blocked" } else { "planes" },
            self.post
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for DepthwiseConv {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.compute(inputs)?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.compute(inputs)
    }
}

impl TypedOp for DepthwiseConv {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &self.geometry;
        ensure!(inputs.len() == 3, "WhaledDepthwiseConv takes data, kernel and bias");
        let want = self.shape(g.in_hw);
        ensure!(
            inputs[0].datum_type == f32::datum_type() && inputs[0].shape.as_concrete() == Some(&want[..]),
            "WhaledDepthwiseConv expects f32 {want:?}, got {:?}",
            inputs[0]
        );
        Ok(tvec!(f32::fact(self.shape(g.out_hw))))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        let macs = g.batch * g.channels * g.out_plane() * g.taps();
        Ok(tvec!((Cost::FMA(f32::datum_type()), macs.into())))
    }
}

thread_local! {
    /// Per thread, reused across planes, ops and inferences: the padded, phase-split input plane, the
    /// virtual output plane, and the geometry and padding value the scratch was laid out for.
    static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch { input: Vec::new(), virt: Vec::new(), laid_for: None }) };
}

/// A thread's working memory. Invariant: when `laid_for` is `Some((g, pad))`, `input` holds `g`'s
/// layout with `pad` (as f32 bits) at every padding position, so planes of that geometry only
/// overwrite the interior.
struct Scratch {
    input: Vec<f32>,
    virt: Vec<f32>,
    laid_for: Option<(Geometry, u32)>,
}

/// Runs `f` with this thread's input scratch laid out for `g` with `pad` at every padding position
/// (filled anew when it was last laid out for another geometry or padding: see [`Scratch`]) and its
/// virtual-plane buffer (any length: the caller sizes it). The depthwise and stem ops pad with 0, the
/// max-pool op ([`crate::maxpool`]) with -inf; `f` must not call back into any of them.
pub(crate) fn with_scratch<R>(g: &Geometry, pad: f32, f: impl FnOnce(&mut [f32], &mut Vec<f32>) -> R) -> R {
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        if s.laid_for.as_ref().is_none_or(|(laid, bits)| laid != g || *bits != pad.to_bits()) {
            s.input.clear();
            s.input.resize(g.scratch_len(), pad);
            s.laid_for = Some((g.clone(), pad.to_bits()));
        }
        f(&mut s.input, &mut s.virt)
    })
}

impl DepthwiseConv {
    pub(crate) fn compute(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (_, plane, block) = select_kernel();
        self.compute_with(inputs, plane, block)
    }

    fn compute_with(&self, inputs: TVec<TValue>, kernel: PlaneKernel, block: BlockKernel) -> TractResult<TVec<TValue>> {
        let g = &self.geometry;
        ensure!(inputs.len() == 3, "WhaledDepthwiseConv takes data, kernel and bias");
        let (x, k, b) = (&inputs[0], &inputs[1], &inputs[2]);
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let k = k.try_as_plain_ram()?.as_slice::<f32>()?;
        let b = b.try_as_plain_ram()?.as_slice::<f32>()?;
        let planes = g.batch * g.channels;
        ensure!(
            x.len() == planes * g.in_plane() && k.len() == g.channels * g.taps() && b.len() == g.channels,
            "WhaledDepthwiseConv: inputs do not match {g:?}"
        );
        // SAFETY: f32 has no invalid bit patterns, and every element is written below before the tensor
        // is returned: on the plane path each output plane is `out_hw[0]` rows of `out_hw[1]`, each row
        // either computed in place as whole chunks (`out_hw[1]` a multiple of CHUNK) or copied from the
        // virtual plane (`virtual_len >= out_hw[0] * phase_width`); on the blocked path every run's
        // planes are written whole (`blocked::unfill`). No uninitialised value escapes.
        // Not zeroing saves a full write pass over the output (measured: docs/BENCHMARKS.md).
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.shape(g.out_hw))? };
        let (plane_in, plane_out) = (g.in_plane(), g.out_plane());
        let path = self.path_with(kernel, block);
        {
            let mut view = out.try_as_plain_ram_mut()?;
            tract_linalg::multithread::par_chunks_mut(
                view.as_slice_mut::<f32>()?,
                plane_out,
                planes * plane_out,
                |first, chunk| {
                    let planes = chunk.len() / plane_out;
                    self.run_part(&path, first, &x[first * plane_in..][..planes * plane_in], k, b, chunk);
                    Ok(())
                },
            )?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl DepthwiseConv {
    /// Output plane `out` of channel `c` from its `input` plane (the plane path, not for a
    /// [`Geometry::blocked`] geometry), in this thread's `scratch` and `virt` ([`with_scratch`] with
    /// padding 0); `offsets` are the geometry's [`Geometry::tap_offsets`], `k` and `b` every channel's
    /// taps and bias.
    #[allow(clippy::too_many_arguments)]
    fn plane(
        &self,
        c: usize,
        input: &[f32],
        k: &[f32],
        b: &[f32],
        out: &mut [f32],
        kernel: PlaneKernel,
        offsets: &[usize],
        scratch: &mut [f32],
        virt: &mut Vec<f32>,
    ) {
        let g = &self.geometry;
        fill_scratch(g, input, scratch);
        let taps = &k[c * g.taps()..][..g.taps()];
        let (ow, qw) = (g.out_hw[1], g.phase_width());
        if ow.is_multiple_of(CHUNK) {
            // Output row y is virtual row y's first `ow`: computed in place. Saves the copy (B4 at
            // 512: -4 % of the inference, docs/BENCHMARKS.md).
            kernel(scratch, offsets, taps, b[c], &self.post, out, [ow, qw]);
            return;
        }
        virt.resize(g.virtual_len(), 0.0);
        let flat = [g.virtual_len(), 0];
        kernel(scratch, offsets, taps, b[c], &self.post, &mut virt[..g.virtual_len()], flat);
        // Keep the first out_hw[1] of every phase_width-long virtual row.
        for (dst, src) in out.chunks_exact_mut(ow).zip(virt.chunks(qw)) {
            dst.copy_from_slice(&src[..ow]);
        }
    }

    /// This op's path with these kernels, laid out once per call: the plane path's kernel and tap
    /// offsets, or (a [`Geometry::blocked`] geometry) the blocked path's layout and kernel.
    fn path_with(&self, plane: PlaneKernel, block: BlockKernel) -> Path {
        let g = &self.geometry;
        if g.blocked() {
            Path::Blocked(blocked::Layout::new(g), block)
        } else {
            Path::Planes(plane, g.tap_offsets())
        }
    }

    /// [`DepthwiseConv::path_with`] the kernels this CPU runs.
    pub(crate) fn path(&self) -> Path {
        let (_, plane, block) = select_kernel();
        self.path_with(plane, block)
    }

    /// Output planes `first..` (whole planes, as many as `out` holds, counted over every image) from
    /// their `input` planes, on this thread, by `path` (this op's [`DepthwiseConv::path`]): a share of
    /// [`DepthwiseConv::compute_with`], and the depthwise step of [`crate::expand`].
    pub(crate) fn run_part(&self, path: &Path, first: usize, input: &[f32], k: &[f32], b: &[f32], out: &mut [f32]) {
        match path {
            Path::Planes(kernel, offsets) => self.run_planes(first, input, k, b, out, *kernel, offsets),
            Path::Blocked(layout, kernel) => self.run_blocks(first, layout, input, k, b, out, *kernel),
        }
    }

    /// [`DepthwiseConv::run_part`] on the plane path, with the plane `kernel` and the geometry's
    /// [`Geometry::tap_offsets`].
    #[allow(clippy::too_many_arguments)]
    fn run_planes(
        &self,
        first: usize,
        x: &[f32],
        k: &[f32],
        b: &[f32],
        out: &mut [f32],
        kernel: PlaneKernel,
        offsets: &[usize],
    ) {
        let g = &self.geometry;
        assert!(!g.blocked() && x.len() / g.in_plane() == out.len() / g.out_plane(), "depthwise planes do not match");
        with_scratch(g, 0.0, |scratch, virt| {
            for (i, (o, input)) in out.chunks_exact_mut(g.out_plane()).zip(x.chunks_exact(g.in_plane())).enumerate() {
                self.plane((first + i) % g.channels, input, k, b, o, kernel, offsets, scratch, virt);
            }
        });
    }

    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The output's shape.
    pub(crate) fn output_shape(&self) -> TVec<usize> {
        self.shape(self.geometry.out_hw)
    }
}

impl DepthwiseConv {
    /// Output planes `out` (whole planes) from their `input` planes, the first being plane `first` of
    /// the batch, channel-blocked: runs of up to [`blocked::LANES`] consecutive channels of one image,
    /// in this thread's blocked scratch ([`DepthwiseConv::run_part`] on the blocked path).
    #[allow(clippy::too_many_arguments)]
    fn run_blocks(
        &self,
        first: usize,
        layout: &blocked::Layout,
        input: &[f32],
        k: &[f32],
        b: &[f32],
        out: &mut [f32],
        kernel: BlockKernel,
    ) {
        let g = &self.geometry;
        let (plane_in, plane_out, taps) = (g.in_plane(), g.out_plane(), g.taps());
        let planes = out.len() / plane_out;
        debug_assert_eq!(input.len(), planes * plane_in);
        blocked::with_scratch(g, layout, |scratch, weights, result| {
            let mut i = 0;
            while i < planes {
                let c = (first + i) % g.channels;
                let n = blocked::LANES.min(g.channels - c).min(planes - i);
                blocked::fill(g, layout, &input[i * plane_in..][..n * plane_in], scratch);
                // Value by value: a copy of n (a run-time length) values is a call to memcpy.
                let bias: [f32; blocked::LANES] = std::array::from_fn(|l| if l < n { b[c + l] } else { 0.0 });
                blocked::interleave(&k[c * taps..][..n * taps], taps, weights);
                kernel(layout, scratch, weights, &bias, &self.post, result);
                // Back to planes: lane l of every pixel is plane i + l.
                blocked::unfill(result, &mut out[i * plane_out..][..n * plane_out], plane_out);
                i += n;
            }
        });
    }
}

/// How a [`DepthwiseConv`] computes its planes, laid out once per call ([`DepthwiseConv::path`]).
pub(crate) enum Path {
    /// The plane path: its kernel and the geometry's [`Geometry::tap_offsets`].
    Planes(PlaneKernel, Vec<usize>),
    /// The channel-blocked path ([`Geometry::blocked`]): its layout and kernel.
    Blocked(blocked::Layout, BlockKernel),
}

/// Writes the zero-padded input plane as `stride[0] x stride[1]` phases, each `phase_len` long and
/// laid out `phase_rows x phase_width`: phase `(pr, pc)`, row `i`, column `j` holds padded input
/// `(i * stride[0] + pr, j * stride[1] + pc)`. Writes only the positions inside the input: the caller
/// zeroes the scratch once per geometry (every plane of a geometry writes the same positions).
pub(crate) fn fill_scratch(g: &Geometry, input: &[f32], scratch: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the features just checked.
            return unsafe { fill_scratch_avx512(g, input, scratch) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: likewise.
            return unsafe { fill_scratch_avx2(g, input, scratch) };
        }
    }
    fill_scratch_any(g, input, scratch)
}

/// [`fill_scratch`] compiled for AVX-512: the stride-2 deinterleave then takes 512-bit permutes (with
/// the baseline's SSE shuffles it was half of a stride-2 layer's time; docs/BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn fill_scratch_avx512(g: &Geometry, input: &[f32], scratch: &mut [f32]) {
    fill_scratch_any(g, input, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fill_scratch_avx2(g: &Geometry, input: &[f32], scratch: &mut [f32]) {
    fill_scratch_any(g, input, scratch)
}

/// The body of [`fill_scratch`], inlined into each CPU variant.
#[inline(always)]
fn fill_scratch_any(g: &Geometry, input: &[f32], scratch: &mut [f32]) {
    if g.stride[1] == 2 {
        fill_scratch_sw2(g, input, scratch);
        return;
    }
    let [sh, sw] = g.stride;
    let (qh, qw, len) = (g.phase_rows(), g.phase_width(), g.phase_len());
    let [h, w] = g.in_hw;
    let [pt, pl] = g.pad_before;
    for pr in 0..sh {
        for pc in 0..sw {
            let phase = &mut scratch[(pr * sw + pc) * len..][..qh * qw];
            // Columns j whose input column j * sw + pc - pl lies in 0..w.
            let j_lo = pl.saturating_sub(pc).div_ceil(sw);
            let j_hi = (w + pl).saturating_sub(pc).div_ceil(sw).min(qw);
            if j_lo >= j_hi {
                continue;
            }
            let ix_lo = j_lo * sw + pc - pl;
            for (i, dst) in phase.chunks_exact_mut(qw).enumerate() {
                let Some(iy) = (i * sh + pr).checked_sub(pt).filter(|&iy| iy < h) else { continue };
                let src = &input[iy * w + ix_lo..];
                let dst = &mut dst[j_lo..j_hi];
                if sw == 1 {
                    dst.copy_from_slice(&src[..dst.len()]);
                } else {
                    for (d, s) in dst.iter_mut().zip(src.iter().step_by(sw)) {
                        *d = *s;
                    }
                }
            }
        }
    }
}

/// [`fill_scratch`] for a column stride of 2, the stride-2 layers of every EfficientNet: one pass over
/// each input row deals its even and odd columns into the two column phases. (The general path reads
/// each row once per phase with `step_by`, which does not vectorise: 11 of the 15 ms of the B4's first
/// stride-2 layer, 144 planes of 256x256.) Input column `ix` is padded column `ix + pl`, so phase
/// `(ix + pl) % 2`, column `(ix + pl) / 2`: the even columns go to phase `pl % 2` from column `pl / 2`,
/// the odd ones to phase `(pl + 1) % 2` from column `(pl + 1) / 2`, both cut at `phase_width`.
#[inline(always)]
fn fill_scratch_sw2(g: &Geometry, input: &[f32], scratch: &mut [f32]) {
    let sh = g.stride[0];
    let (qh, qw, len) = (g.phase_rows(), g.phase_width(), g.phase_len());
    let w = g.in_hw[1];
    let [pt, pl] = g.pad_before;
    let (pe, je) = (pl % 2, pl / 2);
    let (po, jo) = ((pl + 1) % 2, pl.div_ceil(2));
    let n_even = w.div_ceil(2).min(qw.saturating_sub(je));
    let n_odd = (w / 2).min(qw.saturating_sub(jo));
    debug_assert!(n_odd <= n_even && n_even <= n_odd + 1);
    // Input rows in order (padded row `iy + pt` is phase row `(iy + pt) % sh`, row `(iy + pt) / sh`),
    // so the plane is read front to back.
    for (iy, src) in input.chunks_exact(w).enumerate() {
        let (pr, i) = ((iy + pt) % sh, (iy + pt) / sh);
        if i >= qh {
            break;
        }
        let row = |pc: usize| (pr * 2 + pc) * len + i * qw;
        let (even_at, odd_at) = (row(pe) + je, row(po) + jo);
        // The two phases are disjoint `len`-long blocks of the scratch: split it between them.
        let (even, odd) = if even_at < odd_at {
            let (a, b) = scratch.split_at_mut(odd_at);
            (&mut a[even_at..][..n_even], &mut b[..n_odd])
        } else {
            let (a, b) = scratch.split_at_mut(even_at);
            (&mut b[..n_even], &mut a[odd_at..][..n_odd])
        };
        // Never more odd columns than even ones (`jo >= je`), and at most one even column more.
        for ((e, o), s) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
            *e = s[0];
            *o = s[1];
        }
        if n_even > n_odd {
            even[n_odd] = src[2 * n_odd];
        }
    }
}

/// Computes output rows from the scratch of their input plane: `out` is rows of `rows[0]` outputs (a
/// multiple of `CHUNK`), row `y` starting at virtual index `y * rows[1]`. The flat virtual plane is one
/// row (`[virt.len(), 0]`); an output plane whose rows are whole chunks, its rows (`[out_w, phase_width]`).
pub(crate) type PlaneKernel = fn(&[f32], &[usize], &[f32], f32, &[Post], &mut [f32], [usize; 2]);

/// `acc + x * w`, fused where `FMA` (a plain function, not a closure: it must inline into the
/// `target_feature` kernels to be compiled with their features).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(acc: f32, x: f32, w: f32) -> f32 {
    if FMA {
        x.mul_add(w, acc)
    } else {
        acc + x * w
    }
}

/// The body of every plane kernel: the outputs (see [`PlaneKernel`] for `rows`) in runs of `K`
/// consecutive chunks of `CHUNK`, each run the bias plus every tap accumulated in registers, then one
/// store. `K` chunks in flight hide the fused multiply-add's latency: with one chunk (2 AVX-512
/// accumulators) every tap waited on the previous one's result (measured: docs/BENCHMARKS.md). `FMA`
/// selects fused multiply-adds (only where the CPU has them: without hardware FMA `mul_add` is a
/// library call).
#[inline(always)]
fn plane<const FMA: bool, const K: usize>(
    scratch: &[f32],
    offsets: &[usize],
    taps: &[f32],
    bias: f32,
    post: &[Post],
    out: &mut [f32],
    rows: [usize; 2],
) {
    let [row_len, row_at] = rows;
    for (y, row) in out.chunks_exact_mut(row_len).enumerate() {
        let mut t0 = y * row_at;
        let mut runs = row.chunks_exact_mut(K * CHUNK);
        for out in &mut runs {
            run::<FMA, K>(scratch, offsets, taps, bias, post, t0, out);
            t0 += K * CHUNK;
        }
        // The rest (fewer than K chunks: only rows of 32, 64 or 96 outputs, since the flat plane is
        // whole runs) in pairs, then one.
        let mut pairs = runs.into_remainder().chunks_exact_mut(2 * CHUNK);
        for out in &mut pairs {
            run::<FMA, 2>(scratch, offsets, taps, bias, post, t0, out);
            t0 += 2 * CHUNK;
        }
        for out in pairs.into_remainder().chunks_exact_mut(CHUNK) {
            run::<FMA, 1>(scratch, offsets, taps, bias, post, t0, out);
            t0 += CHUNK;
        }
    }
}

/// One run of [`plane`]: the `K * CHUNK` outputs at virtual index `t0`, stored into `out` (that long).
#[inline(always)]
fn run<const FMA: bool, const K: usize>(
    scratch: &[f32],
    offsets: &[usize],
    taps: &[f32],
    bias: f32,
    post: &[Post],
    t0: usize,
    out: &mut [f32],
) {
    let mut acc = [[bias; CHUNK]; K];
    for (&off, &w) in offsets.iter().zip(taps) {
        let Some(src) = scratch.get(off + t0..off + t0 + K * CHUNK) else {
            // `phase_len` leaves room for the last chunk's furthest tap: a miss is a bug here, and
            // returning would leave stale values in `out`.
            unreachable!("depthwise scratch too short for tap offset {off} at {t0}")
        };
        let (src, _) = src.as_chunks::<CHUNK>();
        for (acc, src) in acc.iter_mut().zip(src) {
            for i in 0..CHUNK {
                acc[i] = madd::<FMA>(acc[i], src[i], w);
            }
        }
    }
    // Fused element-wise successors (ReLU, ReLU6), in graph order.
    fuse::apply(post, acc.as_flattened_mut());
    out.copy_from_slice(acc.as_flattened());
}

fn plane_portable(
    scratch: &[f32],
    offsets: &[usize],
    taps: &[f32],
    bias: f32,
    post: &[Post],
    out: &mut [f32],
    rows: [usize; 2],
) {
    plane::<
        { cfg!(target_arch = "aarch64") },
        {
            if cfg!(target_arch = "aarch64") {
                2
            } else {
                1
            }
        },
    >(scratch, offsets, taps, bias, post, out, rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn plane_avx2(
    scratch: &[f32],
    offsets: &[usize],
    taps: &[f32],
    bias: f32,
    post: &[Post],
    out: &mut [f32],
    rows: [usize; 2],
) {
    plane::<true, 2>(scratch, offsets, taps, bias, post, out, rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn plane_avx512(
    scratch: &[f32],
    offsets: &[usize],
    taps: &[f32],
    bias: f32,
    post: &[Post],
    out: &mut [f32],
    rows: [usize; 2],
) {
    plane::<true, 4>(scratch, offsets, taps, bias, post, out, rows)
}

#[cfg(target_arch = "x86_64")]
fn plane_avx2_checked(
    scratch: &[f32],
    offsets: &[usize],
    taps: &[f32],
    bias: f32,
    post: &[Post],
    out: &mut [f32],
    rows: [usize; 2],
) {
    // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx2 and fma.
    unsafe { plane_avx2(scratch, offsets, taps, bias, post, out, rows) }
}

#[cfg(target_arch = "x86_64")]
fn plane_avx512_checked(
    scratch: &[f32],
    offsets: &[usize],
    taps: &[f32],
    bias: f32,
    post: &[Post],
    out: &mut [f32],
    rows: [usize; 2],
) {
    // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx512f, avx2 and fma.
    unsafe { plane_avx512(scratch, offsets, taps, bias, post, out, rows) }
}

/// The widest plane and block kernels this CPU runs, with their name (for logs and `whaled bench
/// --profile`).
fn select_kernel() -> (&'static str, PlaneKernel, BlockKernel) {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if fma && is_x86_feature_detected!("avx512f") {
            return ("avx512f+fma", plane_avx512_checked, blocked::block_avx512_checked);
        }
        if fma {
            return ("avx2+fma", plane_avx2_checked, blocked::block_avx2_checked);
        }
        return ("sse2", plane_portable, blocked::block_portable);
    }
    #[allow(unreachable_code)]
    (if cfg!(target_arch = "aarch64") { "neon+fma" } else { "portable" }, plane_portable, blocked::block_portable)
}

/// Which plane kernel this CPU runs.
pub fn kernel_name() -> &'static str {
    select_kernel().0
}

/// Replaces every eligible depthwise `Conv` of a decluttered model by [`DepthwiseConv`] and returns
/// how many it replaced. Ineligible convolutions are left to tract, untouched.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else { continue };
        let Some((geometry, batch_axis, kernel, bias)) = eligible(model, node, conv)? else {
            continue;
        };
        let (post, last) = fusable_successors(model, id)?;
        let mut patch = TypedModelPatch::new(format!("whaled depthwise {}", node.name));
        let x = patch.tap_model(model, node.inputs[0])?;
        let k = patch.add_const(format!("{}.whaled_kernel", node.name), kernel)?;
        let b = patch.add_const(format!("{}.whaled_bias", node.name), bias)?;
        let op = DepthwiseConv::new(geometry, batch_axis)?.with_post(post)?;
        let out = patch.wire_node(&node.name, op, &[x, k, b])?;
        patch.shunt_outside(model, last.into(), out[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// A conv's constant bias as `n` values: its own when it has `n`, a scalar (tract's zero bias for a
/// conv without one) repeated; `None` for any other size or a tensor that is not plain f32.
pub(crate) fn per_channel(bias: &Tensor, n: usize) -> Option<Vec<f32>> {
    let values = bias.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec();
    match values.len() {
        len if len == n => Some(values),
        1 => Some(vec![values[0]; n]),
        _ => None,
    }
}

/// The geometry, whether the data has a batch axis, and the `[C, KH*KW]` kernel and `[C]` bias of a
/// conv this op can run, or `None`.
fn eligible(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
) -> TractResult<Option<(Geometry, bool, Tensor, Tensor)>> {
    let spec = &conv.pool_spec;
    let c = spec.input_channels;
    if conv.q_params.is_some() || conv.group != c || spec.output_channels != c || node.inputs.len() != 3 {
        return Ok(None);
    }
    let Some((geometry, batch_axis)) = spec_geometry(model, node, spec)? else { return Ok(None) };
    if geometry.channels != c {
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
    let [kh, kw] = geometry.kernel;
    // The kernel as [C, KH*KW], whatever its format.
    let Ok(view) = kernel.to_plain_array_view::<f32>() else { return Ok(None) };
    let mut flat = Vec::with_capacity(c * kh * kw);
    let dims = view.shape().to_vec();
    for ch in 0..c {
        for y in 0..kh {
            for x in 0..kw {
                let idx: [usize; 4] = match conv.kernel_fmt {
                    KernelFormat::OIHW if dims == [c, 1, kh, kw] => [ch, 0, y, x],
                    KernelFormat::HWIO if dims == [kh, kw, 1, c] => [y, x, 0, ch],
                    KernelFormat::OHWI if dims == [c, kh, kw, 1] => [ch, y, x, 0],
                    _ => return Ok(None),
                };
                flat.push(view[idx.as_slice()]);
            }
        }
    }
    let Some(bias) = per_channel(&bias, c) else { return Ok(None) };
    Ok(Some((geometry, batch_axis, tensor1(&flat).into_shape(&[c, kh * kw])?, tensor1(&bias))))
}

/// The geometry of a node that slides a 2-D window per channel (a depthwise conv's or a pool's
/// `spec`, or a dense conv's), and whether its data carries the batch axis: f32 NCHW (or CHW) data of a
/// concrete shape, whose output is the spec's output channels over the window's output size (the input
/// channels for a depthwise conv or a pool). `None` for anything else (the node stays tract's). Shared
/// by the depthwise, max-pool and stem ops ([`crate::maxpool`], [`crate::stem`]).
pub(crate) fn spec_geometry(
    model: &TypedModel,
    node: &TypedNode,
    spec: &PoolSpec,
) -> TractResult<Option<(Geometry, bool)>> {
    if !matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW) || spec.kernel_shape.len() != 2 {
        return Ok(None);
    }
    let fact = model.outlet_fact(node.inputs[0])?;
    let out_fact = model.outlet_fact(node.id.into())?;
    let (Some(shape), Some(out_shape)) = (fact.shape.as_concrete(), out_fact.shape.as_concrete()) else {
        return Ok(None);
    };
    let batch_axis = spec.data_format == DataFormat::NCHW;
    // [N, C, H, W] as four numbers, whichever form the graph uses.
    let nchw = |s: &[usize]| -> Option<[usize; 4]> {
        match (batch_axis, s) {
            (true, &[n, c, h, w]) => Some([n, c, h, w]),
            (false, &[c, h, w]) => Some([1, c, h, w]),
            _ => None,
        }
    };
    let (Some(shape), Some(out_shape)) = (nchw(shape), nchw(out_shape)) else { return Ok(None) };
    if fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let pads = spec.computed_padding(&shape[2..]);
    let out_hw = [pads[0].convoluted, pads[1].convoluted];
    if out_shape != [shape[0], spec.output_channels, out_hw[0], out_hw[1]] {
        return Ok(None);
    }
    let (stride, dilation) = (spec.strides(), spec.dilations());
    let Ok(geometry) = Geometry::new(
        shape[0],
        shape[1],
        [shape[2], shape[3]],
        out_hw,
        [spec.kernel_shape[0], spec.kernel_shape[1]],
        [stride[0], stride[1]],
        [dilation[0], dilation[1]],
        [pads[0].pad_before, pads[1].pad_before],
    ) else {
        return Ok(None);
    };
    Ok(Some((geometry, batch_axis)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, uniform};

    /// Direct loop, f64: the definition of a depthwise convolution.
    fn reference(g: &Geometry, x: &[f32], k: &[f32], b: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        for n in 0..g.batch {
            for c in 0..g.channels {
                for oy in 0..g.out_hw[0] {
                    for ox in 0..g.out_hw[1] {
                        let mut s = b[c] as f64;
                        for ky in 0..g.kernel[0] {
                            for kx in 0..g.kernel[1] {
                                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad_before[0] as isize;
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pad_before[1] as isize;
                                if iy < 0 || ix < 0 || iy >= g.in_hw[0] as isize || ix >= g.in_hw[1] as isize {
                                    continue;
                                }
                                let xi = ((n * g.channels + c) * g.in_hw[0] + iy as usize) * g.in_hw[1] + ix as usize;
                                s += k[c * g.taps() + ky * g.kernel[1] + kx] as f64 * x[xi] as f64;
                            }
                        }
                        out.push(s as f32);
                    }
                }
            }
        }
        out
    }

    /// Every plane and block kernel this CPU can run, not only the ones `select_kernel` picks.
    fn available_kernels() -> Vec<(&'static str, PlaneKernel, BlockKernel)> {
        #[allow(unused_mut)]
        let mut kernels: Vec<(&'static str, PlaneKernel, BlockKernel)> =
            vec![("portable", plane_portable, blocked::block_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(("avx2", plane_avx2_checked, blocked::block_avx2_checked));
                if is_x86_feature_detected!("avx512f") {
                    kernels.push(("avx512", plane_avx512_checked, blocked::block_avx512_checked));
                }
            }
        }
        kernels
    }

    #[test]
    fn matches_the_definition_on_odd_shapes() {
        let mut rnd = uniform(1);
        // (in, kernel, stride, dilation, pad_before, pad_after)
        let cases = [
            ([7, 9], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1]),
            ([8, 8], [3, 3], [2, 2], [1, 1], [0, 0], [1, 1]),
            ([9, 11], [5, 5], [2, 2], [1, 1], [2, 2], [2, 2]),
            ([40, 37], [5, 3], [1, 2], [2, 1], [4, 1], [3, 0]),
            ([5, 70], [3, 3], [3, 3], [1, 2], [0, 2], [2, 1]),
            ([1, 1], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1]),
            // Column stride 2 (`fill_scratch_sw2`): odd and even pads and widths, TF-style (0, 1) pads,
            // a pad larger than a phase's first column, dilation.
            ([10, 10], [3, 3], [2, 2], [1, 1], [0, 0], [1, 1]),
            ([10, 13], [3, 3], [2, 2], [1, 1], [1, 1], [1, 1]),
            ([13, 12], [5, 5], [2, 2], [1, 1], [1, 3], [2, 2]),
            ([6, 5], [3, 5], [2, 2], [2, 2], [2, 4], [1, 3]),
            ([4, 2], [3, 3], [3, 2], [1, 1], [1, 1], [1, 1]),
            // Output rows of whole chunks (computed in place, row by row): 32 and 64 columns, strides
            // 1 and 2, 3x3 and 5x5, and 96 columns from a 5x3 with unequal pads.
            ([5, 32], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1]),
            ([9, 64], [5, 5], [1, 1], [1, 1], [2, 2], [2, 2]),
            ([9, 128], [3, 3], [2, 2], [1, 1], [0, 0], [1, 1]),
            ([7, 63], [5, 5], [2, 2], [1, 1], [2, 2], [2, 2]),
            ([6, 96], [5, 3], [1, 1], [1, 1], [3, 2], [1, 0]),
            // Rows of 5 and 7 chunks: a run of 4 (AVX-512) or pairs (AVX2, NEON), then a pair and one.
            ([4, 160], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1]),
            ([3, 224], [3, 5], [1, 1], [1, 1], [1, 2], [1, 2]),
            // Rows 12 to 32 wide, stride 1, kernels 5 or 7 wide: blocked where the register-row kernel
            // runs (AVX-512), on the plane path elsewhere; runs of 8 and a remainder.
            ([14, 14], [5, 5], [1, 1], [1, 1], [2, 2], [2, 2]),
            ([9, 23], [7, 7], [1, 1], [1, 1], [3, 3], [3, 3]),
            ([5, 32], [3, 5], [1, 1], [1, 1], [1, 2], [1, 2]),
        ];
        for (in_hw, kernel, stride, dilation, pb, pa) in cases {
            let out_hw: [usize; 2] =
                std::array::from_fn(|a| (in_hw[a] + pb[a] + pa[a] - (kernel[a] - 1) * dilation[a] - 1) / stride[a] + 1);
            // 19 channels: on the blocked path (rows under 12 wide) a whole block and a partial one per
            // image.
            let c = 19;
            let g = Geometry::new(2, c, in_hw, out_hw, kernel, stride, dilation, pb).unwrap();
            let x: Vec<f32> = (0..2 * c * g.in_plane()).map(|_| rnd()).collect();
            let k: Vec<f32> = (0..c * g.taps()).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..c).map(|_| rnd()).collect();
            let op = DepthwiseConv::new(g.clone(), true).unwrap();
            let inputs = tvec![
                Tensor::from_shape(&[2, c, in_hw[0], in_hw[1]], &x).unwrap().into_tvalue(),
                Tensor::from_shape(&[c, g.taps()], &k).unwrap().into_tvalue(),
                tensor1(&b).into_tvalue(),
            ];
            let want = reference(&g, &x, &k, &b);
            for (name, kernel, block) in available_kernels() {
                let got = op.compute_with(inputs.clone(), kernel, block).unwrap();
                let got = got[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                assert_eq!(got.len(), want.len());
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-5, "{name} {g:?}: max diff {diff}");
            }
        }
    }

    #[test]
    fn geometry_refuses_empty_sizes() {
        assert!(Geometry::new(1, 0, [4, 4], [4, 4], [3, 3], [1, 1], [1, 1], [1, 1]).is_err());
        assert!(Geometry::new(1, 1, [4, 4], [4, 4], [3, 3], [0, 1], [1, 1], [1, 1]).is_err());
    }
}
