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
//! the block's last channel compute on stale values and are never stored.
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
}

impl Layout {
    pub(crate) fn new(g: &Geometry) -> Layout {
        let ([oh, ow], [kh, kw], [sh, sw], [dh, dw]) = (g.out_hw(), g.kernel(), g.stride(), g.dilation());
        let padded = [(oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1];
        let pix = (0..oh).flat_map(|y| (0..ow).map(move |x| y * sh * padded[1] + x * sw)).collect();
        let taps = (0..kh).flat_map(|ky| (0..kw).map(move |kx| ky * dh * padded[1] + kx * dw)).collect();
        Layout { padded, pix, taps }
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
        if s.zeroed_for.as_ref() != Some(g) {
            s.input.clear();
            s.input.resize(layout.scratch_len(), 0.0);
            s.weights.resize(g.taps() * LANES, 0.0);
            s.out.resize(g.out_plane() * LANES, 0.0);
            s.zeroed_for = Some(g.clone());
        }
        f(&mut s.input, &mut s.weights, &mut s.out)
    })
}

/// Writes `planes` (consecutive input planes of one image, at most [`LANES`]) interleaved into
/// `scratch`, lane `l` of padded pixel `(y, x)` at `(y * padded[1] + x) * LANES + l`. Writes only the
/// positions inside the input: the caller zeroes the scratch once per geometry.
pub(crate) fn fill(g: &Geometry, layout: &Layout, planes: &[f32], scratch: &mut [f32]) {
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
    block::<true>(layout, scratch, weights, bias, post, out)
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
