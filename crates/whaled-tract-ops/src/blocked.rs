//! The depthwise op's path for small planes: [`LANES`] channels at a time, interleaved.
//!
//! Why: on a 7x7 plane the plane-at-a-time kernel ([`crate::depthwise`]) computes whole runs of 32
//! outputs along padded rows, 128 virtual outputs for 49 real ones, and pays a copy in and out per
//! plane; measured on an EfficientNet-Lite0 gate, its four 7x7 layers ran 2.8-3x slower than
//! onnxruntime's (which keeps the whole graph in a channel-blocked layout). Here each output is one
//! vector of [`LANES`] channels, so no lane is wasted whatever the plane's width.
//!
//! What: for a block of up to [`LANES`] consecutive channel planes of one image, the zero-padded input
//! is written interleaved (`[row][column][lane]`) into a thread-local scratch, the kernel taps and biases
//! likewise (`[tap][lane]`); every output pixel is then the bias plus one fused multiply-add per tap
//! over a whole vector, [`PIXELS`] pixels at a time so that the adds of one tap do not wait on each
//! other, with the op's fused ReLU/ReLU6; the interleaved result is written back as planes. Lanes past
//! the block's last channel compute on stale values and are never stored. On AVX-512 the outputs go a
//! row at a time instead, in runs of up to 8 pixels whose inputs for one kernel row are loaded into
//! registers once and shared by the row's taps (`x86::block_rows`): the pixel-at-a-time loop loads an
//! input and a weight per multiply-add and was bound by loads. That kernel took a 7x7 layer of 1152
//! channels from 97 to 65 us and made the path pay beyond 7x7 too (`depthwise::BLOCKED_ROWS_BELOW`).
//!
//! Numerics: the same sum as the plane path and tract, `bias + sum over taps of w * x` in row-major tap
//! order, in f32; tests/depthwise.rs and the unit tests check every kernel against an f64 definition,
//! tract and onnxruntime.

use std::cell::RefCell;

use crate::depthwise::{madd, Geometry};
use crate::fuse::{self, Post};

/// Channels per block: 16 f32 = one AVX-512 register, two AVX2, four NEON.
pub(crate) const LANES: usize = 16;

/// Output pixels accumulated at once: 4 independent sums per tap.
const PIXELS: usize = 4;

/// What the kernels read, laid out once per op call (see [`Layout::new`]).
pub(crate) struct Layout {
    /// Padded input rows and columns the outputs reach.
    padded: [usize; 2],
    /// Per output pixel (row-major), the padded pixel index of its first tap.
    pix: Vec<usize>,
    /// Per tap (row-major), its offset in padded pixels from an output's first tap.
    taps: Vec<usize>,
    /// Output rows and columns, kernel rows and columns, column stride; `rows` only when the
    /// dilation is 1 (what [`x86::block_rows`] needs).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    rows: Option<Rows>,
}

/// The shape [`x86::block_rows`] walks: output `[rows, columns]`, kernel `[rows, columns]`, column
/// stride. Row `y`'s first output starts at padded pixel `pix[y * out[1]]`, and output `x` of that
/// row `x * stride` pixels further.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Rows {
    out: [usize; 2],
    kernel: [usize; 2],
    stride: usize,
}

impl Layout {
    pub(crate) fn new(g: &Geometry) -> Layout {
        let ([oh, ow], [kh, kw], [sh, sw], [dh, dw]) = (g.out_hw(), g.kernel(), g.stride(), g.dilation());
        let padded = [(oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1];
        let pix = (0..oh).flat_map(|y| (0..ow).map(move |x| y * sh * padded[1] + x * sw)).collect();
        let taps = (0..kh).flat_map(|ky| (0..kw).map(move |kx| ky * dh * padded[1] + kx * dw)).collect();
        let rows = (dh == 1 && dw == 1).then_some(Rows { out: [oh, ow], kernel: [kh, kw], stride: sw });
        Layout { padded, pix, taps, rows }
    }

    /// The interleaved scratch's length.
    pub(crate) fn scratch_len(&self) -> usize {
        self.padded[0] * self.padded[1] * LANES
    }
}

thread_local! {
    /// Per thread, reused across blocks, ops and inferences (see [`Scratch`]).
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { input: Vec::new(), weights: Vec::new(), out: Vec::new(), zeroed_for: None })
    };
}

/// A thread's working memory: the interleaved input, kernel taps and output. Invariant: when
/// `zeroed_for` is `Some(g)`, `input` holds `g`'s padded layout with zeros at every padding position,
/// so blocks of that geometry only overwrite the interior.
struct Scratch {
    input: Vec<f32>,
    weights: Vec<f32>,
    out: Vec<f32>,
    zeroed_for: Option<Geometry>,
}

/// Runs `f` with this thread's interleaved input (zeroed when it was last laid out for another
/// geometry), its `[tap][lane]` weights and its `[pixel][lane]` output, sized for `g`.
pub(crate) fn with_scratch<R>(
    g: &Geometry,
    layout: &Layout,
    f: impl FnOnce(&mut [f32], &mut [f32], &mut [f32]) -> R,
) -> R {
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        // Each buffer one vector longer than it needs, used from its first 64-byte boundary: every
        // pixel's LANES values are then one aligned 512-bit line (unaligned, each load split across two
        // cache lines).
        if s.zeroed_for.as_ref() != Some(g) {
            s.input.clear();
            s.input.resize(layout.scratch_len() + LANES, 0.0);
            s.weights.resize(g.taps() * LANES + LANES, 0.0);
            s.out.resize(g.out_plane() * LANES + LANES, 0.0);
            s.zeroed_for = Some(g.clone());
        }
        let (input, weights, out) = (
            aligned(&mut s.input, layout.scratch_len()),
            aligned(&mut s.weights, g.taps() * LANES),
            aligned(&mut s.out, g.out_plane() * LANES),
        );
        f(input, weights, out)
    })
}

/// `len` values of `v` (which holds at least `len + LANES`) from its first 64-byte boundary.
fn aligned(v: &mut [f32], len: usize) -> &mut [f32] {
    let at = v.as_ptr().align_offset(64).min(LANES);
    &mut v[at..at + len]
}

/// Whether this CPU computes `g`'s blocks with the register-row kernel (`x86::block_rows`): AVX-512,
/// no dilation, a column stride of 1 or 2 and a kernel 3, 5 or 7 wide.
pub(crate) fn rows_kernel_runs(g: &Geometry) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let cpu =
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        cpu && g.dilation() == [1, 1] && x86::instance(g.stride()[1], g.kernel()[1]).is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
    }
}

/// Writes `planes` (consecutive input planes of one image, at most [`LANES`]) interleaved into
/// `scratch`, lane `l` of padded pixel `(y, x)` at `(y * padded[1] + x) * LANES + l`. Writes only the
/// positions inside the input: the caller zeroes the scratch once per geometry. With AVX-512 by 16 x 16
/// transposes (lanes past the last plane get zeros); else one value at a time.
pub(crate) fn fill(g: &Geometry, layout: &Layout, planes: &[f32], scratch: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has avx512f (checked above).
            return unsafe { x86::fill(g, layout, planes, scratch) };
        }
    }
    fill_scalar(g, layout, planes, scratch)
}

/// [`fill`], one value at a time.
fn fill_scalar(g: &Geometry, layout: &Layout, planes: &[f32], scratch: &mut [f32]) {
    let [h, w] = g.in_hw();
    let [pt, pl] = g.pad_before();
    let [ph, pw] = layout.padded;
    // Input rows and columns that land inside the padded area the outputs reach.
    let (rows, cols) = (h.min(ph.saturating_sub(pt)), w.min(pw.saturating_sub(pl)));
    for (l, plane) in planes.chunks_exact(h * w).enumerate() {
        for (iy, src) in plane.chunks_exact(w).take(rows).enumerate() {
            let row = &mut scratch[((iy + pt) * pw + pl) * LANES..];
            for (ix, &v) in src[..cols].iter().enumerate() {
                row[ix * LANES + l] = v;
            }
        }
    }
}

/// Writes the block's interleaved `result` (`[pixel][lane]`) back as planes: lane `l` of every pixel
/// is plane `l` of `planes` (whole planes, at most [`LANES`] of them). With AVX-512 by 16 x 16
/// transposes; else one value at a time.
pub(crate) fn unfill(result: &[f32], planes: &mut [f32], plane: usize) {
    assert!(planes.len() <= LANES * plane && result.len() >= plane * LANES, "blocked result does not match");
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has avx512f (checked above); the sizes were checked above.
            return unsafe { x86::unfill(result, planes, plane) };
        }
    }
    unfill_scalar(result, planes, plane)
}

/// [`unfill`], one value at a time.
fn unfill_scalar(result: &[f32], planes: &mut [f32], plane: usize) {
    for (l, o) in planes.chunks_exact_mut(plane).enumerate() {
        for (o, px) in o.iter_mut().zip(result.chunks_exact(LANES)) {
            *o = px[l];
        }
    }
}

/// Writes `rows` (at most [`LANES`] rows of `len` values) interleaved into `out`: value `p` of row `l`
/// at `p * LANES + l`; lanes past the last row get zeros. The kernel taps of a block's channels
/// (`[tap][lane]`). With AVX-512 by 16 x 16 transposes; else one value at a time.
pub(crate) fn interleave(rows: &[f32], len: usize, out: &mut [f32]) {
    let n = rows.len() / len;
    assert!(n <= LANES && n * len == rows.len() && out.len() >= len * LANES, "blocked interleave does not match");
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has avx512f (checked above); the sizes were checked above.
            return unsafe { x86::interleave(rows, len, out) };
        }
    }
    interleave_scalar(rows, len, out)
}

/// [`interleave`], one value at a time.
fn interleave_scalar(rows: &[f32], len: usize, out: &mut [f32]) {
    out[..len * LANES].fill(0.0);
    for (l, row) in rows.chunks_exact(len).enumerate() {
        for (p, &v) in row.iter().enumerate() {
            out[p * LANES + l] = v;
        }
    }
}

/// Computes one block: `out` is `out_plane` pixels of [`LANES`] lanes; `weights` is `[tap][lane]`.
pub(crate) type BlockKernel = fn(&Layout, &[f32], &[f32], &[f32; LANES], &[Post], &mut [f32]);

/// The body of every block kernel: output pixels in runs of [`PIXELS`], then one at a time.
#[inline(always)]
fn block<const FMA: bool>(
    layout: &Layout,
    scratch: &[f32],
    weights: &[f32],
    bias: &[f32; LANES],
    post: &[Post],
    out: &mut [f32],
) {
    // The bound `pixels` relies on (its reads are unchecked: a bounds check per multiply-add was a
    // third of this kernel's time).
    assert!(scratch.len() >= layout.scratch_len() && weights.len() >= layout.taps.len() * LANES);
    let (weights, _) = weights.as_chunks::<LANES>();
    let (out, _) = out.as_chunks_mut::<LANES>();
    let mut runs = out.chunks_exact_mut(PIXELS).zip(layout.pix.chunks_exact(PIXELS));
    for (out, pix) in &mut runs {
        pixels::<FMA, PIXELS>(scratch, &layout.taps, weights, bias, post, pix, out);
    }
    let done = layout.pix.len() / PIXELS * PIXELS;
    for (out, pix) in out[done..].iter_mut().zip(&layout.pix[done..]) {
        pixels::<FMA, 1>(
            scratch,
            &layout.taps,
            weights,
            bias,
            post,
            std::slice::from_ref(pix),
            std::slice::from_mut(out),
        );
    }
}

/// `N` output pixels (`pix`, `out`: `N` long) of [`block`].
#[inline(always)]
fn pixels<const FMA: bool, const N: usize>(
    scratch: &[f32],
    taps: &[usize],
    weights: &[[f32; LANES]],
    bias: &[f32; LANES],
    post: &[Post],
    pix: &[usize],
    out: &mut [[f32; LANES]],
) {
    let mut acc = [*bias; N];
    for (&t, w) in taps.iter().zip(weights) {
        for (acc, &p) in acc.iter_mut().zip(pix) {
            debug_assert!((p + t + 1) * LANES <= scratch.len());
            // SAFETY: `block` checked that the scratch holds `Layout::scratch_len` values, and every
            // output's first tap plus every tap offset lies inside the padded area (`Layout::new`).
            let x = unsafe { scratch.get_unchecked((p + t) * LANES..(p + t + 1) * LANES) };
            for l in 0..LANES {
                acc[l] = madd::<FMA>(acc[l], x[l], w[l]);
            }
        }
    }
    // Fused element-wise successors (ReLU, ReLU6), in graph order.
    fuse::apply(post, acc.as_flattened_mut());
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = *a;
    }
}

pub(crate) fn block_portable(
    layout: &Layout,
    scratch: &[f32],
    weights: &[f32],
    bias: &[f32; LANES],
    post: &[Post],
    out: &mut [f32],
) {
    block::<{ cfg!(target_arch = "aarch64") }>(layout, scratch, weights, bias, post, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(layout: &Layout, scratch: &[f32], weights: &[f32], bias: &[f32; LANES], post: &[Post], out: &mut [f32]) {
    block::<true>(layout, scratch, weights, bias, post, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn block_avx512(
    layout: &Layout,
    scratch: &[f32],
    weights: &[f32],
    bias: &[f32; LANES],
    post: &[Post],
    out: &mut [f32],
) {
    // SAFETY: this function's features include block_rows's.
    if !unsafe { x86::block_rows(layout, scratch, weights, bias, post, out) } {
        block::<true>(layout, scratch, weights, bias, post, out)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn block_avx512_checked(
    layout: &Layout,
    scratch: &[f32],
    weights: &[f32],
    bias: &[f32; LANES],
    post: &[Post],
    out: &mut [f32],
) {
    // SAFETY: only selected after `is_x86_feature_detected!` saw avx512f, avx2 and fma.
    unsafe { block_avx512(layout, scratch, weights, bias, post, out) }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn block_avx2_checked(
    layout: &Layout,
    scratch: &[f32],
    weights: &[f32],
    bias: &[f32; LANES],
    post: &[Post],
    out: &mut [f32],
) {
    // SAFETY: only selected after `is_x86_feature_detected!` saw avx2 and fma.
    unsafe { block_avx2(layout, scratch, weights, bias, post, out) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Layout, Rows, LANES};
    use crate::depthwise::Geometry;
    use crate::fuse::Post;

    /// Outputs of one row computed at once by [`block_rows`]: 8 accumulators, and with a 7-wide
    /// kernel at stride 2 the 21 input vectors they read, in 30 of the 32 registers.
    const RUN: usize = 8;

    /// [`super::block`] with the inputs of a run of output pixels held in registers: for each kernel
    /// row, the `stride * (R - 1) + KW` input vectors that `R` consecutive outputs of one row read are
    /// loaded once and each feeds up to `KW` multiply-adds, where the pixel-at-a-time loop loads one
    /// input (and its weight) per multiply-add and is bound by loads. The same sums in the same order
    /// (bias, then taps row-major) and the fused steps one by one with `f32::max` / `min`'s results
    /// ([`Steps`]), so the results are bit for bit [`super::block`]'s. Returns false,
    /// computing nothing, for a shape it has no instance for (dilation, a kernel width other than 3,
    /// 5 or 7, a column stride above 2).
    ///
    /// # Safety
    /// The CPU has avx512f and fma.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn block_rows(
        layout: &Layout,
        scratch: &[f32],
        weights: &[f32],
        bias: &[f32; LANES],
        post: &[Post],
        out: &mut [f32],
    ) -> bool {
        let Some(rows) = layout.rows else { return false };
        let Some(go) = instance(rows.stride, rows.kernel[1]) else { return false };
        let [oh, ow] = rows.out;
        // The bounds every unchecked access below relies on: each output's inputs lie inside the
        // padded area (`Layout::new`), which the scratch holds.
        assert!(
            scratch.len() >= layout.scratch_len()
                && weights.len() >= rows.kernel[0] * rows.kernel[1] * LANES
                && out.len() >= oh * ow * LANES
                && layout.pix.len() == oh * ow,
            "blocked rows: buffers do not match the layout"
        );
        // SAFETY: the CPU has avx512f and fma (the caller's contract); the sizes were checked above.
        unsafe { go(layout, rows, scratch, weights, bias, post, out) };
        true
    }

    /// One instance of [`rows_of`].
    type RowsFn = unsafe fn(&Layout, Rows, &[f32], &[f32], &[f32; LANES], &[Post], &mut [f32]);

    /// The instance of [`rows_of`] for a column stride and kernel width, if there is one: what
    /// [`block_rows`] runs and [`super::rows_kernel_runs`] asks about.
    pub(super) fn instance(stride: usize, kernel_width: usize) -> Option<RowsFn> {
        Some(match (stride, kernel_width) {
            (1, 3) => rows_of::<1, 3>,
            (1, 5) => rows_of::<1, 5>,
            (1, 7) => rows_of::<1, 7>,
            (2, 3) => rows_of::<2, 3>,
            (2, 5) => rows_of::<2, 5>,
            (2, 7) => rows_of::<2, 7>,
            _ => return None,
        })
    }

    /// [`block_rows`] for one column stride and kernel width: each output row in runs of up to
    /// [`RUN`] pixels.
    ///
    /// # Safety
    /// The CPU has avx512f and fma; the buffers hold what [`block_rows`] checked.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn rows_of<const SW: usize, const KW: usize>(
        layout: &Layout,
        rows: Rows,
        scratch: &[f32],
        weights: &[f32],
        bias: &[f32; LANES],
        post: &[Post],
        out: &mut [f32],
    ) {
        let [oh, ow] = rows.out;
        let ctx = RowCtx {
            scratch: scratch.as_ptr(),
            weights: weights.as_ptr(),
            kh: rows.kernel[0],
            row_step: layout.padded[1] * LANES,
            // SAFETY (both loads): the CPU has avx512f; `bias` is LANES values.
            bias: unsafe { _mm512_loadu_ps(bias.as_ptr()) },
            post: Steps::new(post),
        };
        for y in 0..oh {
            let mut x = 0;
            while x < ow {
                let at = y * ow + x;
                let first = layout.pix[at] * LANES;
                // SAFETY: output pixels at..at + r of `out` (oh * ow of them, checked by the caller).
                let o = unsafe { out.as_mut_ptr().add(at * LANES) };
                let r = (ow - x).min(RUN);
                // SAFETY: the run's inputs lie inside the padded area, the weights are kh x KW vectors.
                unsafe {
                    match r {
                        8 => run::<SW, KW, 8>(&ctx, first, o),
                        7 => run::<SW, KW, 7>(&ctx, first, o),
                        6 => run::<SW, KW, 6>(&ctx, first, o),
                        5 => run::<SW, KW, 5>(&ctx, first, o),
                        4 => run::<SW, KW, 4>(&ctx, first, o),
                        3 => run::<SW, KW, 3>(&ctx, first, o),
                        2 => run::<SW, KW, 2>(&ctx, first, o),
                        _ => run::<SW, KW, 1>(&ctx, first, o),
                    }
                }
                x += r;
            }
        }
    }

    /// The fused steps (at most 4: `DepthwiseConv::with_post`) as vectors, applied in order with
    /// `f32::max` / `f32::min`'s results (what the pixel loop's `fuse::apply` gives), NaN and signed
    /// zeros included. As one clamp, `min(max(x, lo), hi)`, a NaN became `lo` and a chain starting with
    /// Min, or a -0 through a Max, differed.
    struct Steps {
        /// `(is Max, constant)`, the first `len`.
        steps: [(bool, __m512); 4],
        len: usize,
        /// What the chain gives a NaN: `f32::max` / `min` return the other operand, so the first step
        /// makes it that step's constant, and the rest run on that (computed once, in f32).
        nan: Option<__m512>,
    }

    impl Steps {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn new(post: &[Post]) -> Steps {
            let mut steps = [(false, _mm512_setzero_ps()); 4];
            for (s, p) in steps.iter_mut().zip(post) {
                *s = match *p {
                    Post::Max(c) => (true, _mm512_set1_ps(f32::from_bits(c))),
                    Post::Min(c) => (false, _mm512_set1_ps(f32::from_bits(c))),
                };
            }
            let nan = (!post.is_empty()).then(|| {
                let mut v = [f32::NAN];
                crate::fuse::apply(post, &mut v);
                _mm512_set1_ps(v[0])
            });
            Steps { steps, len: post.len().min(4), nan }
        }

        /// The steps over `v`.
        #[target_feature(enable = "avx512f,avx2,fma")]
        #[inline]
        fn apply(&self, v: __m512) -> __m512 {
            let Some(nan) = self.nan else { return v };
            let mut r = v;
            for &(max, c) in &self.steps[..self.len] {
                // Of two zeros `maxps` / `minps` return the second operand (the value, as
                // `f32::max` / `min` do here); a NaN value is replaced below.
                r = if max { _mm512_max_ps(c, r) } else { _mm512_min_ps(c, r) };
            }
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), r, nan)
        }
    }

    /// What every run of one block reads.
    struct RowCtx {
        scratch: *const f32,
        weights: *const f32,
        kh: usize,
        /// One padded row, in values.
        row_step: usize,
        bias: __m512,
        post: Steps,
    }

    /// `R` consecutive outputs of one row, the first reading its first tap at value `first` of the
    /// scratch; stored at `o`.
    ///
    /// # Safety
    /// The CPU has avx512f and fma; the run's inputs (`kh` rows of `SW * (R - 1) + KW` vectors from
    /// `first`) lie inside the scratch, the weights are `kh * KW` vectors, `o` has room for `R`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn run<const SW: usize, const KW: usize, const R: usize>(ctx: &RowCtx, first: usize, o: *mut f32) {
        let mut acc = [ctx.bias; R];
        let mut xs = [_mm512_setzero_ps(); 24];
        for ky in 0..ctx.kh {
            // SAFETY (loads): inside the scratch and the weights (the contract above).
            let row = unsafe { ctx.scratch.add(first + ky * ctx.row_step) };
            for (j, v) in xs.iter_mut().enumerate().take(SW * (R - 1) + KW) {
                *v = unsafe { _mm512_loadu_ps(row.add(j * LANES)) };
            }
            for kx in 0..KW {
                let w = unsafe { _mm512_loadu_ps(ctx.weights.add((ky * KW + kx) * LANES)) };
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xs[i * SW + kx], w, *a);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let v = ctx.post.apply(*a);
            // SAFETY: `o` has room for R vectors.
            unsafe { _mm512_storeu_ps(o.add(i * LANES), v) };
        }
    }

    /// The permutes of [`transpose16`]'s four stages (b = 8, 4, 2, 1): `idx_lo[k]` is `k` where bit
    /// `b` of `k` is clear, else `16 + k - b`; `idx_hi[k]` is `k + b`, else `16 + k`.
    #[target_feature(enable = "avx512f,avx2")]
    fn transpose_indices() -> [(__m512i, __m512i); 4] {
        let mut out = [(_mm512_setzero_si512(), _mm512_setzero_si512()); 4];
        for (s, b) in [8usize, 4, 2, 1].into_iter().enumerate() {
            let mut lo = [0i32; 16];
            let mut hi = [0i32; 16];
            for k in 0..16 {
                (lo[k], hi[k]) =
                    if k & b == 0 { (k as i32, (k + b) as i32) } else { ((16 + k - b) as i32, (16 + k) as i32) };
            }
            // SAFETY: 16 i32s are one 512-bit load.
            out[s] = unsafe { (_mm512_loadu_si512(lo.as_ptr().cast()), _mm512_loadu_si512(hi.as_ptr().cast())) };
        }
        out
    }

    /// Transposes the 16 x 16 matrix in `r` (row i = `r[i]`): four stages, each swapping the
    /// off-diagonal `b x b` blocks (b = 8, 4, 2, 1) of every `2b x 2b` block, two permutes per pair of
    /// rows ([`transpose_indices`]).
    #[target_feature(enable = "avx512f,avx2")]
    #[inline]
    fn transpose16(r: &mut [__m512; 16], idx: &[(__m512i, __m512i); 4]) {
        macro_rules! stage {
            ($s:expr, $b:expr) => {
                for i in 0..16 {
                    if i & $b == 0 {
                        let (a, c) = (r[i], r[i + $b]);
                        r[i] = _mm512_permutex2var_ps(a, idx[$s].0, c);
                        r[i + $b] = _mm512_permutex2var_ps(a, idx[$s].1, c);
                    }
                }
            };
        }
        stage!(0, 8);
        stage!(1, 4);
        stage!(2, 2);
        stage!(3, 1);
    }

    /// The values of `rows` (at most [`LANES`] rows of `len`) column by column, 16 columns per
    /// transpose: `store(p, v)` gets column `p`, lane `l` of `v` being row `l`'s value `p` (zero past the
    /// last row). What [`fill`] and [`interleave`] share.
    #[target_feature(enable = "avx512f,avx2")]
    fn columns(rows: &[f32], len: usize, mut store: impl FnMut(usize, __m512)) {
        let n = rows.len() / len;
        assert!(n <= LANES && n * len == rows.len(), "blocked transpose: {n} rows");
        let idx = transpose_indices();
        let mut p0 = 0;
        while p0 < len {
            let k = (len - p0).min(16);
            let mask: __mmask16 = if k == 16 { 0xffff } else { (1u16 << k) - 1 };
            // Every loop below runs 16 times, whatever `n` and `k`, so that `r` stays in registers
            // (loops of `n` or `k` kept it on the stack: a store and a reload per vector); whole
            // vectors load unmasked.
            let mut r = [_mm512_setzero_ps(); 16];
            for (l, r) in r.iter_mut().enumerate() {
                if l < n {
                    // SAFETY: values p0..p0 + k of row l < n, inside `rows` (checked above); the rest
                    // masked.
                    let at = unsafe { rows.as_ptr().add(l * len + p0) };
                    *r = if k == 16 {
                        unsafe { _mm512_loadu_ps(at) }
                    } else {
                        unsafe { _mm512_maskz_loadu_ps(mask, at) }
                    };
                }
            }
            transpose16(&mut r, &idx);
            for (j, v) in r.iter().enumerate() {
                if j < k {
                    store(p0 + j, *v);
                }
            }
            p0 += k;
        }
    }

    /// [`super::fill`] by 16 x 16 transposes ([`columns`]): each pixel's vector stored at its padded
    /// position.
    ///
    /// # Safety
    /// The CPU has avx512f.
    #[target_feature(enable = "avx512f,avx2")]
    pub(super) unsafe fn fill(g: &Geometry, layout: &Layout, planes: &[f32], scratch: &mut [f32]) {
        let [h, w] = g.in_hw();
        let [pt, pl] = g.pad_before();
        let [ph, pw] = layout.padded;
        let (rows, cols) = (h.min(ph.saturating_sub(pt)), w.min(pw.saturating_sub(pl)));
        assert!(scratch.len() >= layout.scratch_len(), "blocked fill: scratch");
        // `columns` hands the pixels over in order: their row and column are counted, not divided out
        // (a division per pixel was a third of this function's time on a 7x7 plane).
        let (mut iy, mut ix) = (0, 0);
        columns(planes, h * w, |p, v| {
            debug_assert_eq!(p, iy * w + ix);
            if iy < rows && ix < cols {
                let at = ((iy + pt) * pw + ix + pl) * LANES;
                // SAFETY: inside the padded area (iy < rows, ix < cols), so inside the scratch
                // (`scratch_len`, checked above).
                unsafe { _mm512_storeu_ps(scratch.as_mut_ptr().add(at), v) };
            }
            ix += 1;
            if ix == w {
                (iy, ix) = (iy + 1, 0);
            }
        });
    }

    /// [`super::interleave`] by 16 x 16 transposes ([`columns`]).
    ///
    /// # Safety
    /// The CPU has avx512f; the sizes were checked by the caller.
    #[target_feature(enable = "avx512f,avx2")]
    pub(super) unsafe fn interleave(rows: &[f32], len: usize, out: &mut [f32]) {
        // SAFETY: value p < len of `out`'s `len x LANES` (checked by the caller).
        columns(rows, len, |p, v| unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(p * LANES), v) });
    }

    /// [`super::unfill`] by 16 x 16 transposes: 16 pixels' vectors, transposed, each plane's 16
    /// values stored at once.
    ///
    /// # Safety
    /// The CPU has avx512f; the sizes were checked by the caller.
    #[target_feature(enable = "avx512f,avx2")]
    pub(super) unsafe fn unfill(result: &[f32], planes: &mut [f32], plane: usize) {
        let n = planes.len() / plane;
        let idx = transpose_indices();
        let mut p0 = 0;
        while p0 < plane {
            let k = (plane - p0).min(16);
            let mask: __mmask16 = if k == 16 { 0xffff } else { (1u16 << k) - 1 };
            // Loops of 16, so that `r` stays in registers (see `columns`).
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, r) in r.iter_mut().enumerate() {
                if j < k {
                    // SAFETY: pixel p0 + j < plane of the result (checked by the caller).
                    *r = unsafe { _mm512_loadu_ps(result.as_ptr().add((p0 + j) * LANES)) };
                }
            }
            transpose16(&mut r, &idx);
            for (l, v) in r.iter().enumerate() {
                if l < n {
                    // SAFETY: pixels p0..p0 + k of plane l < n; lanes past k masked.
                    let at = unsafe { planes.as_mut_ptr().add(l * plane + p0) };
                    if k == 16 {
                        unsafe { _mm512_storeu_ps(at, *v) };
                    } else {
                        unsafe { _mm512_mask_storeu_ps(at, mask, *v) };
                    }
                }
            }
            p0 += k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::uniform;

    /// The AVX-512 transposes against the one-value-at-a-time loops they replace (a second code path),
    /// on every block width and on lengths around the 16-value steps (where the CPU has AVX-512; the
    /// scalar loops are what other CPUs run, and what the depthwise tests check there).
    #[test]
    fn transposes_match_the_scalar_loops() {
        let mut rnd = uniform(11);
        for n in 1..=LANES {
            for len in [1, 7, 15, 16, 17, 25, 49, 50, 196] {
                let rows: Vec<f32> = (0..n * len).map(|_| rnd()).collect();
                let (mut a, mut b) = (vec![f32::NAN; len * LANES], vec![f32::NAN; len * LANES]);
                interleave(&rows, len, &mut a);
                interleave_scalar(&rows, len, &mut b);
                assert_eq!(a, b, "interleave {n} x {len}");
                let result: Vec<f32> = (0..len * LANES).map(|_| rnd()).collect();
                let (mut a, mut b) = (vec![0.0; n * len], vec![1.0; n * len]);
                unfill(&result, &mut a, len);
                unfill_scalar(&result, &mut b, len);
                assert_eq!(a, b, "unfill {n} x {len}");
            }
        }
        transposes_match_the_scalar_fill(&mut rnd);
    }

    /// The register-row kernel against the pixel-at-a-time one it stands in for (a second code path):
    /// the same sums in the same order and the fused steps with `f32::max` / `min`'s results, so bit
    /// for bit the same, on every run length (output rows of 1 to 20 pixels: runs of 8 and every
    /// remainder), kernels 3, 5 and 7 wide (and rows of another height), row strides 1 to 3, column
    /// strides 1 and 2, with no fused step, ReLU6-like and Min-first chains; on finite inputs, on inputs
    /// with NaNs, and on zeros with a -0 bias (signed zeros through the steps); and it declines the
    /// shapes it has no instance for.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn register_rows_match_the_pixel_loop() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")) {
            return;
        }
        let mut rnd = uniform(12);
        let (zero, half) = (0f32.to_bits(), 0.5f32.to_bits());
        let posts: [&[Post]; 5] = [
            &[],
            &[Post::Max(zero), Post::Min(half)],
            &[Post::Min(half)],
            &[Post::Min(half), Post::Max(zero)],
            &[Post::Max(zero)],
        ];
        let mut checked = 0;
        for ow in 1..=20 {
            for (kh, kw) in [(3, 3), (5, 5), (7, 7), (3, 5), (1, 7)] {
                for (sh, sw) in [(1, 1), (1, 2), (2, 1), (3, 2)] {
                    let oh = 1 + ow % 4;
                    let in_hw = [(oh - 1) * sh + kh, (ow - 1) * sw + kw];
                    let g = Geometry::new(1, LANES, in_hw, [oh, ow], [kh, kw], [sh, sw], [1, 1], [0, 0]).unwrap();
                    let layout = Layout::new(&g);
                    let n = layout.scratch_len();
                    // Finite; one value in 13 NaN; all zeros under a -0 bias and negative weights.
                    for inputs in 0..3 {
                        let scratch: Vec<f32> = (0..n)
                            .map(|i| match inputs {
                                0 => rnd(),
                                1 if i % 13 == 5 => f32::NAN,
                                1 => rnd(),
                                _ => 0.0,
                            })
                            .collect();
                        let weights: Vec<f32> =
                            (0..kh * kw * LANES).map(|_| if inputs == 2 { -rnd().abs() } else { rnd() }).collect();
                        let bias: [f32; LANES] = std::array::from_fn(|_| if inputs == 2 { -0.0 } else { rnd() });
                        for post in posts {
                            let mut want = vec![f32::NAN; oh * ow * LANES];
                            block::<true>(&layout, &scratch, &weights, &bias, post, &mut want);
                            let mut got = vec![f32::NAN; oh * ow * LANES];
                            // SAFETY: the CPU has avx512f and fma (checked above).
                            let ran = unsafe { x86::block_rows(&layout, &scratch, &weights, &bias, post, &mut got) };
                            assert!(ran, "{g:?}");
                            assert!(
                                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{g:?} {post:?} inputs {inputs}: the register rows differ from the pixel loop"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 20 * 5 * 4 * 3 * 5);
        // Shapes without an instance: dilation, a 4-wide kernel, column stride 3.
        for (kernel, stride, dilation) in [([3, 3], [1, 1], [2, 2]), ([3, 4], [1, 1], [1, 1]), ([3, 3], [1, 3], [1, 1])]
        {
            let g = Geometry::new(1, LANES, [9, 12], [3, 3], kernel, stride, dilation, [0, 0]).unwrap();
            let layout = Layout::new(&g);
            let (scratch, weights) = (vec![0.0; layout.scratch_len()], vec![0.0; g.taps() * LANES]);
            let mut out = vec![0.0; 9 * LANES];
            // SAFETY: the CPU has avx512f and fma (checked above).
            assert!(!unsafe { x86::block_rows(&layout, &scratch, &weights, &[0.0; LANES], &[], &mut out) }, "{g:?}");
        }
    }

    fn transposes_match_the_scalar_fill(rnd: &mut impl FnMut() -> f32) {
        // (in, out, kernel, stride, pad_before): the blocked geometries of the Lite0 and B0, odd ones,
        // padding wider than the input.
        let cases = [
            ([7, 7], [7, 7], [5, 5], [1, 1], [2, 2]),
            ([14, 14], [7, 7], [5, 5], [2, 2], [1, 1]),
            ([7, 9], [4, 5], [3, 3], [2, 2], [1, 1]),
            ([3, 11], [5, 11], [3, 3], [1, 1], [2, 1]),
            ([20, 6], [20, 6], [3, 3], [1, 1], [1, 1]),
        ];
        for (in_hw, out_hw, kernel, stride, pad) in cases {
            let g = Geometry::new(1, LANES, in_hw, out_hw, kernel, stride, [1, 1], pad).unwrap();
            let layout = Layout::new(&g);
            for n in [1, 5, LANES] {
                let planes: Vec<f32> = (0..n * in_hw[0] * in_hw[1]).map(|_| rnd()).collect();
                let (mut a, mut b) = (vec![0.0; layout.scratch_len()], vec![0.0; layout.scratch_len()]);
                fill(&g, &layout, &planes, &mut a);
                fill_scalar(&g, &layout, &planes, &mut b);
                // Lanes past the last plane: zeros from the transposes, untouched (zero) here.
                assert_eq!(a, b, "fill {in_hw:?} -> {out_hw:?} x {n}");
            }
        }
    }
}
