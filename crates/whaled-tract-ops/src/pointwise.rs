//! A pointwise (1x1, stride 1) 2-D convolution op for tract, substituted into a model at load time.
//!
//! Why: after the depthwise op ([`crate::depthwise`]), `whaled bench --profile` showed the 1x1
//! convolutions taking two thirds of an EfficientNet-Lite0 inference on x86_64 (11.8 ms of matrix
//! products at about 30 GMAC/s, plus 1.3 ms re-packing the activations before every one of them), where
//! onnxruntime runs the whole network in 9 ms. A 1x1 convolution in NCHW is the matrix product
//! `out[co, p] = bias[co] + sum over ci of w[co, ci] * x[ci, p]` over the `p` pixels of the plane, and
//! the activation rows `x[ci, ..]` are already contiguous: no packing is needed on that side.
//!
//! What: [`substitute`] replaces every float NCHW (or CHW) `Conv` with a 1x1 kernel, unit strides, no
//! padding, one group, constant weights and bias, and a multiple of [`BLOCK`] output channels (every
//! EfficientNet and ResNet width is one) by [`PointwiseConv`], fusing a following ReLU / ReLU6 like the
//! depthwise op does, and a squeeze-excitation product before it (`x * s`, one factor per input
//! channel: every EfficientNet block's projection) where the plane is at least as large as the output
//! channels: the op then multiplies the `cin x cout` weights by the factors on each run, instead of
//! tract multiplying the whole `cin x plane` activation (B4 at 512: 5 ms of 6 of those products).
//! The weights are packed once, at substitution, as `[cout / BLOCK, cin, BLOCK]`.
//! The op computes tiles of `BLOCK` output rows by up to `lanes * max_vectors` pixels, accumulating in
//! registers over every input channel (AVX-512: 8 x 48, 24 registers; AVX2 + FMA: two passes of
//! 4 x 16; NEON: 8 x 12 with lane-indexed multiply-adds), reading the activation rows in place; a
//! plane's last, partial tile reads a zero-padded copy of its columns. Output-channel blocks are split
//! across tract's intra-op thread pool (column ranges first where the activation outweighs the
//! weights, so each thread reads only its part of it); within a thread, one pixel tile is run against
//! all of its blocks before the next (the tile's activation columns stay in cache).
//!
//! Numerics: every output is `bias + sum over ci of w * x`, in input-channel order, in f32 with fused
//! multiply-adds where the CPU has them: the sum tract and onnxruntime compute in some order (with a
//! folded squeeze-excitation, `(w * s) * x` for their `w * (x * s)`: one more rounding, on either side).
//! tests/pointwise.rs checks the op against both on the shapes of the shipped and generated models and
//! random ones.
//!
//! Where it is not used: armv7 (tract's own kernels stay), quantized or non-float convolutions, NHWC
//! graphs, strided or padded 1x1 convolutions (ResNet's downsampling shortcut), grouped ones.

use std::cell::RefCell;

use tract_core::axes::AxesMapping;
use tract_core::internal::*;
use tract_core::ops::einsum::EinSum;

use crate::fuse::{as_clamp, fusable_successors, Post};

/// Whether this build substitutes pointwise convolutions (see the module docs for where it does not).
pub const ENABLED: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Output channels per block: a substituted conv has a multiple of this many.
pub const BLOCK: usize = 8;

/// Pointwise convolution, f32. Inputs: data `[N, Cin, H, W]` (or `[Cin, H, W]`), the weights packed by
/// [`pack_weights`] (`[Cout / BLOCK, Cin, BLOCK]`), bias `[Cout]`; output `[N, Cout, H, W]` (or
/// `[Cout, H, W]`: tract's declutter drops a batch axis of 1 on either side). Private fields: built only
/// by [`PointwiseConv::new`], which checks the sizes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PointwiseConv {
    batch: usize,
    cin: usize,
    cout: usize,
    hw: [usize; 2],
    /// Whether data and output carry the batch axis.
    batch_axis: [bool; 2],
    /// Element-wise max/min with constants applied to every output (a fused ReLU or ReLU6).
    post: Vec<Post>,
    /// Whether the data comes multiplied by one factor per input channel, given as a fourth input
    /// (a squeeze-excitation's gate, fused by [`substitute`]): the op multiplies the weights instead.
    scaled: bool,
}

impl PointwiseConv {
    /// Checks that no size is zero, that `cout` is a multiple of [`BLOCK`], and that a side without a
    /// batch axis has batch 1. `batch_axis` is for the data and the output.
    pub fn new(
        batch: usize,
        cin: usize,
        cout: usize,
        hw: [usize; 2],
        batch_axis: [bool; 2],
    ) -> TractResult<PointwiseConv> {
        ensure!([batch, cin, cout, hw[0], hw[1]].iter().all(|&v| v > 0), "pointwise conv with an empty dimension");
        ensure!(cout.is_multiple_of(BLOCK), "pointwise conv with {cout} output channels, not a multiple of {BLOCK}");
        ensure!(batch_axis == [true, true] || batch == 1, "a pointwise conv without a batch axis has batch 1");
        Ok(PointwiseConv { batch, cin, cout, hw, batch_axis, post: Vec::new(), scaled: false })
    }

    /// The same convolution of the data multiplied by a fourth input, `cin` factors, one per input
    /// channel (`x[ci, p] * s[ci]`): for one image (the factors are per image).
    pub fn with_input_scale(mut self) -> TractResult<PointwiseConv> {
        ensure!(self.batch == 1, "a per-channel input scale is for one image");
        self.scaled = true;
        Ok(self)
    }

    /// How many inputs the op takes: data, packed weights, bias, and the per-channel factors if scaled.
    fn inputs(&self) -> usize {
        3 + usize::from(self.scaled)
    }

    /// The same convolution followed by `post` (at most 4 steps).
    pub fn with_post(mut self, post: Vec<Post>) -> TractResult<PointwiseConv> {
        ensure!(post.len() <= 4, "at most 4 fused steps");
        self.post = post;
        Ok(self)
    }

    fn plane(&self) -> usize {
        self.hw[0] * self.hw[1]
    }

    /// The data's shape (`side` 0) or the output's (`side` 1).
    fn shape(&self, side: usize) -> TVec<usize> {
        nchw([self.cin, self.cout][side], self.batch, self.hw, self.batch_axis[side])
    }
}

/// A 1x1 conv's data or output shape: `[batch, channels, h, w]`, or `[channels, h, w]` without the
/// batch axis (tract's declutter drops a batch of 1).
pub(crate) fn nchw(channels: usize, batch: usize, hw: [usize; 2], batch_axis: bool) -> TVec<usize> {
    if batch_axis {
        tvec![batch, channels, hw[0], hw[1]]
    } else {
        tvec![channels, hw[0], hw[1]]
    }
}

/// Packs `[cout, cin]` weights (row-major) as the op reads them: `[cout / BLOCK, cin, BLOCK]`, each
/// block's `BLOCK` weights for one input channel side by side.
pub fn pack_weights(w: &[f32], cout: usize, cin: usize) -> TractResult<Tensor> {
    ensure!(
        cout.is_multiple_of(BLOCK) && w.len() == cout * cin,
        "pointwise weights: {} values for {cout} x {cin}",
        w.len()
    );
    let mut packed = Vec::with_capacity(w.len());
    for block in 0..cout / BLOCK {
        for ci in 0..cin {
            for r in 0..BLOCK {
                packed.push(w[(block * BLOCK + r) * cin + ci]);
            }
        }
    }
    Tensor::from_shape(&[cout / BLOCK, cin, BLOCK], &packed)
}

/// Packed weights ([`pack_weights`]) with input channel `ci`'s multiplied by `s[ci]`.
fn scale_packed(w: &[f32], s: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for (dst, src) in out.chunks_exact_mut(s.len() * BLOCK).zip(w.chunks_exact(s.len() * BLOCK)) {
        for ((d, w), &f) in dst.chunks_exact_mut(BLOCK).zip(src.chunks_exact(BLOCK)).zip(s) {
            for (d, &w) in d.iter_mut().zip(w) {
                *d = w * f;
            }
        }
    }
    out
}

impl Op for PointwiseConv {
    fn name(&self) -> StaticName {
        "WhaledPointwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} -> {} channels, {:?} x {}, kernel {}, {}then {:?}",
            self.cin,
            self.cout,
            self.hw,
            self.batch,
            kernel_name(),
            if self.scaled { "input scaled per channel, " } else { "" },
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

impl EvalOp for PointwiseConv {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.compute(inputs)?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.compute(inputs)
    }
}

impl TypedOp for PointwiseConv {
    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == self.inputs(), "WhaledPointwiseConv takes data, packed weights, bias [and scale]");
        let want = self.shape(0);
        if self.scaled {
            ensure!(
                inputs[3].datum_type == f32::datum_type()
                    && inputs[3].shape.as_concrete().is_some_and(|s| s.iter().product::<usize>() == self.cin),
                "WhaledPointwiseConv expects {} f32 input factors, got {:?}",
                self.cin,
                inputs[3]
            );
        }
        ensure!(
            inputs[0].datum_type == f32::datum_type() && inputs[0].shape.as_concrete() == Some(&want[..]),
            "WhaledPointwiseConv expects f32 {want:?}, got {:?}",
            inputs[0]
        );
        Ok(tvec!(f32::fact(self.shape(1))))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let macs = self.batch * self.cout * self.cin * self.plane();
        Ok(tvec!((Cost::FMA(f32::datum_type()), macs.into())))
    }
}

thread_local! {
    /// Per thread: the zero-padded copy of a plane's last, partial column tile.
    static TAIL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The output tensor's elements, shared by the work items that fill it. Items write disjoint
/// rectangles (output-channel blocks x column ranges, see [`Split`]) through it, so no `&mut` to the
/// whole output exists while they run; every write is bounds-checked against `len` ([`Tile::check`],
/// or the writer's own assert: the stem op's direct path).
#[derive(Clone, Copy)]
pub(crate) struct Out<T> {
    pub(crate) ptr: *mut T,
    pub(crate) len: usize,
}

// SAFETY: `Out` is only used inside a conv op's compute (`compute_with` here and in `qpointwise`, the
// stem op's direct path), while the tensor it points into is alive and not otherwise borrowed, by
// items that write disjoint elements (see `Split`); nothing reads the output until every item has
// returned.
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

/// Where each input row of a tile starts, for an activation that is not `cin` rows one stride apart:
/// the stem op's rows are its input channels' taps, each a shifted view of one zero-padded scratch
/// plane ([`crate::stem`]). Private fields: built only by [`RowTable::new`], which records the furthest
/// start, so a tile's bounds check is one comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RowTable {
    starts: Vec<usize>,
    furthest: usize,
}

impl RowTable {
    pub(crate) fn new(starts: Vec<usize>) -> RowTable {
        let furthest = starts.iter().copied().max().unwrap_or(0);
        RowTable { starts, furthest }
    }

    pub(crate) fn len(&self) -> usize {
        self.starts.len()
    }
}

/// One tile's inputs. `x` holds `cin` rows, `x_stride` apart or where `rows` says, each with at least
/// `vectors * lanes` readable columns; `w` the block's packed weights (`cin * BLOCK`); `bias` the
/// block's `BLOCK` biases. The kernel writes `n` columns of `BLOCK` rows, `out_stride` apart, from
/// `out_at` on.
struct Tile<'a> {
    x: &'a [f32],
    x_stride: usize,
    rows: Option<&'a RowTable>,
    cin: usize,
    w: &'a [f32],
    bias: &'a [f32],
    clamp: Option<(f32, f32)>,
    out: Out<f32>,
    out_at: usize,
    out_stride: usize,
    n: usize,
}

impl Tile<'_> {
    /// The bounds every kernel relies on before it reads and writes through raw pointers. A failure
    /// is a bug in this module (the op checks its inputs' sizes), never bad input. Returns where the
    /// tile's first output goes.
    fn check(&self, vectors: usize, lanes: usize, max_vectors: usize) -> *mut f32 {
        let furthest = match self.rows {
            Some(rows) => {
                assert!(rows.len() == self.cin, "pointwise tile row table of {} rows for {}", rows.len(), self.cin);
                rows.furthest
            }
            None => (self.cin.max(1) - 1) * self.x_stride,
        };
        assert!(
            self.cin >= 1
                && (1..=max_vectors).contains(&vectors)
                && self.n >= 1
                && self.n <= vectors * lanes
                && self.x.len() >= furthest + vectors * lanes
                && self.w.len() >= self.cin * BLOCK
                && self.bias.len() >= BLOCK
                && self.out.len >= self.out_at + (BLOCK - 1) * self.out_stride + self.n,
            "pointwise tile out of bounds"
        );
        // SAFETY: in bounds of the output allocation (checked above).
        unsafe { self.out.ptr.add(self.out_at) }
    }

    /// Where input row `c` starts in `x`: from the row table where `TABLE` and the tile has one, else
    /// `c * x_stride`. Inlined into each kernel, monomorphised on `TABLE`, so the strided kernels are
    /// unchanged.
    ///
    /// # Safety
    /// `c < cin`, and the tile passed [`Tile::check`] (which holds a table's length to `cin`).
    #[inline(always)]
    unsafe fn row<const TABLE: bool>(&self, c: usize) -> usize {
        match (TABLE, self.rows) {
            // SAFETY: c < cin == starts.len() (the caller's contract).
            (true, Some(rows)) => unsafe { *rows.starts.get_unchecked(c) },
            _ => c * self.x_stride,
        }
    }
}

/// A tile kernel: computes one [`Tile`] of `vectors` vectors of columns.
type TileFn = fn(&Tile, usize);

/// How the output is cut into work items for the thread pool: `block_groups` contiguous ranges of
/// output-channel blocks (over all images) times `column_groups` ranges of whole column tiles. The
/// items partition the output: no element belongs to two. Splitting columns too keeps two threads
/// busy on layers with few blocks (24 output channels are 3 blocks).
pub(crate) struct Split {
    blocks: usize,
    tiles: usize,
    block_groups: usize,
    column_groups: usize,
}

impl Split {
    /// About `items` items (at most one per block and tile).
    pub(crate) fn new(blocks: usize, tiles: usize, items: usize) -> Split {
        let block_groups = items.clamp(1, blocks);
        let column_groups = items.div_ceil(block_groups).clamp(1, tiles);
        Split { blocks, tiles, block_groups, column_groups }
    }

    /// About `items` items, split over the column tiles first (then over blocks if there are fewer
    /// tiles than items).
    pub(crate) fn columns_first(blocks: usize, tiles: usize, items: usize) -> Split {
        let column_groups = items.clamp(1, tiles);
        let block_groups = items.div_ceil(column_groups).clamp(1, blocks);
        Split { blocks, tiles, block_groups, column_groups }
    }

    pub(crate) fn items(&self) -> usize {
        self.block_groups * self.column_groups
    }

    /// Item `i`'s blocks and column tiles.
    pub(crate) fn item(&self, i: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let (bg, cg) = (i / self.column_groups, i % self.column_groups);
        let part = |k: usize, n: usize, of: usize| k * n / of..(k + 1) * n / of;
        (part(bg, self.blocks, self.block_groups), part(cg, self.tiles, self.column_groups))
    }
}

/// A kernel and its tile width.
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    name: &'static str,
    lanes: usize,
    max_vectors: usize,
    tile: TileFn,
    /// A kernel for a plane's last `n <= lanes` columns (`lanes`, the tile; it reads exactly `n`):
    /// AVX-512 would otherwise run a 7x7 plane's 49th column (Lite0's and B0's last stage) as a whole
    /// 16-lane tile.
    narrow: Option<(usize, TileFn)>,
}

impl Kernel {
    /// Columns of one tile (48 with AVX-512).
    pub(crate) fn width(&self) -> usize {
        self.lanes * self.max_vectors
    }

    /// Columns of one vector (16 with AVX-512).
    pub(crate) fn lanes(&self) -> usize {
        self.lanes
    }
}

impl PointwiseConv {
    pub(crate) fn compute(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.compute_with(inputs, select_kernel())
    }

    fn compute_with(&self, inputs: TVec<TValue>, kernel: Kernel) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == self.inputs(), "WhaledPointwiseConv takes data, packed weights, bias [and scale]");
        let x = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let w = inputs[1].try_as_plain_ram()?.as_slice::<f32>()?;
        // `sum over ci of w * (x * s)` as `sum over ci of (w * s) * x`: cin x cout multiplications here
        // instead of a pass over the whole activation (substituted only where the plane is the larger).
        let scaled_w: Vec<f32>;
        let w = if self.scaled {
            let s = inputs[3].try_as_plain_ram()?.as_slice::<f32>()?;
            ensure!(s.len() == self.cin, "WhaledPointwiseConv: {} input factors for {} channels", s.len(), self.cin);
            scaled_w = scale_packed(w, s);
            &scaled_w[..]
        } else {
            w
        };
        let b = inputs[2].try_as_plain_ram()?.as_slice::<f32>()?;
        let (cin, cout, plane) = (self.cin, self.cout, self.plane());
        ensure!(
            x.len() == self.batch * cin * plane && w.len() == cout * cin && b.len() == cout,
            "WhaledPointwiseConv: inputs do not match {self:?}"
        );
        // SAFETY: f32 has no invalid bit patterns, and every element is written before the tensor is
        // returned: the work items partition the output into blocks x column ranges (`Split`), and
        // each item writes every element of its rectangle (`run_blocks`).
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.shape(1))? };
        let clamp = as_clamp(&self.post);
        let full = kernel.width();
        let blocks_per_image = cout / BLOCK;
        let macs = self.batch * cout * cin * plane;
        let pool = Pool::for_work(macs);
        let (blocks, tiles, items) = (self.batch * blocks_per_image, plane.div_ceil(full), pool.items());
        // Threads split what is larger: where the activation (`cin x plane`) outweighs the weights
        // (`cin x cout`: the B4's and Lite0's early, large planes) each reads part of the columns and all
        // weights, instead of all of the activation for part of the blocks. 2 threads: B4 -2 to -5 %, Lite0
        // and the gate -2 to -4 % (docs/BENCHMARKS.md).
        let split = if pool.threads() > 1 && plane > cout {
            Split::columns_first(blocks, tiles, items)
        } else {
            Split::new(blocks, tiles, items)
        };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            let out = Out { ptr: out.as_mut_ptr(), len: out.len() };
            let item = |i: usize| {
                let (blocks, tiles) = split.item(i);
                let columns = tiles.start * full..(tiles.end * full).min(plane);
                TAIL.with(|tail| {
                    let tail = &mut *tail.borrow_mut();
                    // The item's blocks, one image at a time.
                    let mut block = blocks.start;
                    while block < blocks.end {
                        let (image, in_image) = (block / blocks_per_image, block % blocks_per_image);
                        let count = (blocks_per_image - in_image).min(blocks.end - block);
                        let x = &x[image * cin * plane..][..cin * plane];
                        let at = block * BLOCK * plane;
                        self.run_blocks(
                            kernel,
                            x,
                            w,
                            b,
                            in_image..in_image + count,
                            columns.clone(),
                            clamp,
                            out,
                            at,
                            tail,
                        );
                        block += count;
                    }
                });
            };
            pool.run(split.items(), item);
        }
        Ok(tvec!(out.into_tvalue()))
    }

    /// Output blocks `blocks` of one image (`x` is its `[cin, plane]` data; their rows start at
    /// element `at` of `out`), over the plane's columns `columns`, in chunks of whole tiles whose
    /// activation columns fit [`CHUNK_BYTES`]: within a chunk every block runs over all of its tiles
    /// before the next block. A small `cin` makes long chunks, so each block writes its 8 output rows
    /// as long runs (8 write streams instead of `cout`: the 24 -> 144 channel layer of the B4 at 512
    /// writes 38 MB), while the chunk's activation stays in cache across the blocks; a large `cin` makes
    /// one-tile chunks, the tile-by-tile order.
    #[allow(clippy::too_many_arguments)]
    fn run_blocks(
        &self,
        kernel: Kernel,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        blocks: std::ops::Range<usize>,
        columns: std::ops::Range<usize>,
        clamp: Option<(f32, f32)>,
        out: Out<f32>,
        at: usize,
        tail: &mut Vec<f32>,
    ) {
        let (cin, plane) = (self.cin, self.plane());
        let full = kernel.width();
        let chunk = (CHUNK_BYTES / (cin * full * 4)).max(1) * full;
        let mut c0 = columns.start;
        while c0 < columns.end {
            let c1 = (c0 + chunk).min(columns.end);
            // The chunk's last tile may be a plane's partial last one: its zero-padded copy, once.
            let last = c0 + (c1 - c0 - 1) / full * full;
            let n_last = c1 - last;
            let (tile_last, lanes_last) = match kernel.narrow {
                Some((most, tile)) if n_last <= most => (tile, n_last),
                _ => (kernel.tile, kernel.lanes),
            };
            let width_last = n_last.div_ceil(lanes_last) * lanes_last;
            if n_last != width_last {
                tail.clear();
                tail.resize(cin * width_last, 0.0);
                for (dst, row) in tail.chunks_exact_mut(width_last).zip(x.chunks_exact(plane)) {
                    dst[..n_last].copy_from_slice(&row[last..last + n_last]);
                }
            }
            for (j, block) in blocks.clone().enumerate() {
                let mut p0 = c0;
                while p0 < c1 {
                    let n = full.min(c1 - p0);
                    let (tile, lanes) = if p0 == last { (tile_last, lanes_last) } else { (kernel.tile, kernel.lanes) };
                    let vectors = n.div_ceil(lanes);
                    // Whole vectors read the rows in place (a column range ends at the plane's end or
                    // at a whole tile); a partial last one reads the zero-padded copy.
                    let (src, stride): (&[f32], usize) =
                        if n == vectors * lanes { (&x[p0..], plane) } else { (&tail[..], vectors * lanes) };
                    let t = Tile {
                        x: src,
                        x_stride: stride,
                        rows: None,
                        cin,
                        w: &w[block * cin * BLOCK..][..cin * BLOCK],
                        bias: &b[block * BLOCK..][..BLOCK],
                        clamp,
                        out,
                        out_at: at + j * BLOCK * plane + p0,
                        out_stride: plane,
                        n,
                    };
                    tile(&t, vectors);
                    p0 += n;
                }
            }
            c0 = c1;
        }
    }
}

impl PointwiseConv {
    /// Output blocks `blocks` of a one-image, unscaled conv over the whole plane, into `out`
    /// (`blocks.len() * BLOCK` rows of the plane), on this thread: the expand step of [`crate::expand`].
    /// `x`, `w` and `b` are the op's three inputs.
    pub(crate) fn run_rows(&self, x: &[f32], w: &[f32], b: &[f32], blocks: std::ops::Range<usize>, out: &mut [f32]) {
        let plane = self.plane();
        assert!(
            self.single_image()
                && x.len() == self.cin * plane
                && w.len() == self.cout * self.cin
                && b.len() == self.cout
                && blocks.end <= self.cout / BLOCK
                && out.len() == blocks.len() * BLOCK * plane,
            "pointwise rows do not match {self:?}"
        );
        let out = Out { ptr: out.as_mut_ptr(), len: out.len() };
        let clamp = as_clamp(&self.post);
        // Taken out of the thread's slot, not borrowed (put back at the end).
        let mut tail = TAIL.with(|t| std::mem::take(&mut *t.borrow_mut()));
        self.run_blocks(select_kernel(), x, w, b, blocks, 0..plane, clamp, out, 0, &mut tail);
        TAIL.with(|t| *t.borrow_mut() = tail);
    }

    /// Output blocks `blocks` over the column tiles `tiles` (of `kernel`'s [`Kernel::width`] columns)
    /// of an activation of `span` columns whose row `k` starts at `x[rows[k]..]` (the stem op's taps;
    /// one image, unscaled), on this thread. Each tile's `BLOCK` rows (fused steps applied) go to
    /// `emit(block, first column, columns, values)`, `values` row-major, a tile's width apart. The last
    /// tile reads whole vectors past `span` (their outputs are not emitted): `x` has a tile's width of
    /// slack after the furthest row's `span` columns. `kernel` is [`select_kernel`]'s (the unit tests
    /// run every one).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_table(
        &self,
        kernel: Kernel,
        x: &[f32],
        rows: &RowTable,
        w: &[f32],
        b: &[f32],
        span: usize,
        blocks: std::ops::Range<usize>,
        tiles: std::ops::Range<usize>,
        mut emit: impl FnMut(usize, usize, usize, &[f32]),
    ) {
        let full = kernel.width();
        assert!(
            self.single_image()
                && rows.len() == self.cin
                && w.len() == self.cout * self.cin
                && b.len() == self.cout
                && blocks.end <= self.cout / BLOCK
                && tiles.end <= span.div_ceil(full),
            "pointwise table run does not match {self:?}"
        );
        let clamp = as_clamp(&self.post);
        let mut values = vec![0f32; BLOCK * full];
        for tile_index in tiles {
            let p0 = tile_index * full;
            let n = full.min(span - p0);
            let vectors = n.div_ceil(kernel.lanes);
            for block in blocks.clone() {
                let t = Tile {
                    x: &x[p0..],
                    x_stride: 0,
                    rows: Some(rows),
                    cin: self.cin,
                    w: &w[block * self.cin * BLOCK..][..self.cin * BLOCK],
                    bias: &b[block * BLOCK..][..BLOCK],
                    clamp,
                    out: Out { ptr: values.as_mut_ptr(), len: values.len() },
                    out_at: 0,
                    out_stride: full,
                    n,
                };
                (kernel.tile)(&t, vectors);
                emit(block, p0, n, &values);
            }
        }
    }

    /// Whether the op convolves one image without a per-channel input scale.
    pub(crate) fn single_image(&self) -> bool {
        self.batch == 1 && !self.scaled
    }

    pub(crate) fn cin(&self) -> usize {
        self.cin
    }

    pub(crate) fn cout(&self) -> usize {
        self.cout
    }

    /// The data's shape.
    pub(crate) fn input_shape(&self) -> TVec<usize> {
        self.shape(0)
    }
}

/// How many bytes of activation columns one chunk of [`PointwiseConv::run_blocks`] holds: half of a
/// 512 KB - 1 MB L2, so the chunk stays in L2 while every output block runs over it.
const CHUNK_BYTES: usize = 256 * 1024;

/// tract's intra-op pool as this op uses it: its threads, or none when there is no pool or the work
/// (`macs` multiply-adds) is under tract's threading threshold (the same gate as tract's own ops).
pub(crate) enum Pool {
    Inline,
    Private(std::sync::Arc<rayon::ThreadPool>),
    Global,
}

impl Pool {
    pub(crate) fn for_work(macs: usize) -> Pool {
        use tract_linalg::multithread::{current_threading_element_threshold, current_tract_executor, Executor};
        if macs < current_threading_element_threshold() {
            return Pool::Inline;
        }
        match current_tract_executor() {
            Executor::MultiThread(pool) if pool.current_num_threads() > 1 => Pool::Private(pool),
            Executor::RayonGlobal if rayon::current_num_threads() > 1 => Pool::Global,
            _ => Pool::Inline,
        }
    }

    /// How many work items to cut an op into: one on one thread (a split there only changes the order
    /// of the work, and splitting a large plane's output blocks made each block stream the whole
    /// activation: B4 at 512 -2 %), else 4 per thread (a thread that finishes early takes more).
    pub(crate) fn items(&self) -> usize {
        match self.threads() {
            1 => 1,
            n => 4 * n,
        }
    }

    pub(crate) fn threads(&self) -> usize {
        match self {
            Pool::Inline => 1,
            Pool::Private(pool) => pool.current_num_threads(),
            Pool::Global => rayon::current_num_threads(),
        }
    }

    /// Runs `item(0..items)`, spread over the pool's threads.
    pub(crate) fn run(&self, items: usize, item: impl Fn(usize) + Sync + Send) {
        use rayon::prelude::*;
        match self {
            Pool::Private(pool) if items > 1 => pool.install(|| (0..items).into_par_iter().for_each(item)),
            Pool::Global if items > 1 => (0..items).into_par_iter().for_each(item),
            _ => (0..items).for_each(item),
        }
    }
}

/// `acc + x * w`, fused where `FMA` (see the depthwise module: it must inline into its caller).
#[inline(always)]
fn madd<const FMA: bool>(acc: f32, x: f32, w: f32) -> f32 {
    if FMA {
        x.mul_add(w, acc)
    } else {
        acc + x * w
    }
}

/// The portable kernel: 8 columns, 4 rows at a time, in arrays the compiler vectorises (SSE2 on an
/// x86_64 without AVX2; also the reference the tests hold the others to).
fn tile_portable(t: &Tile, vectors: usize) {
    const LANES: usize = 8;
    let out = t.check(vectors, LANES, 1);
    for half in 0..BLOCK / 4 {
        let mut acc = [[0f32; LANES]; 4];
        for (r, row) in acc.iter_mut().enumerate() {
            *row = [t.bias[half * 4 + r]; LANES];
        }
        for c in 0..t.cin {
            // SAFETY: c < cin, and `check` passed above.
            let xs = &t.x[unsafe { t.row::<true>(c) }..][..LANES];
            let ws = &t.w[c * BLOCK + half * 4..][..4];
            for (row, &w) in acc.iter_mut().zip(ws) {
                for (a, &x) in row.iter_mut().zip(xs) {
                    *a = madd::<false>(*a, x, w);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().take(t.n).enumerate() {
                let v = match t.clamp {
                    Some((lo, hi)) => v.max(lo).min(hi),
                    None => v,
                };
                // SAFETY: row half * 4 + r of the tile has n writable columns (checked).
                unsafe { *out.add((half * 4 + r) * t.out_stride + j) = v };
            }
        }
    }
}

// Index loops over the accumulators on purpose (see `x86::avx512`): iterators borrowing the array made
// the compiler keep it in memory.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, BLOCK};
    use std::arch::x86_64::*;

    /// AVX-512: `BLOCK` rows x `V` vectors of 16 columns, all accumulated in registers (24 at V = 3).
    ///
    /// # Safety
    /// The CPU has avx512f, and `t.check(V, 16, 3)` passed and returned `out_ptr`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512<const V: usize, const TABLE: bool>(t: &Tile, out_ptr: *mut f32) {
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); V]; BLOCK];
        for (r, row) in acc.iter_mut().enumerate() {
            *row = [_mm512_set1_ps(t.bias[r]); V];
        }
        for c in 0..t.cin {
            // SAFETY: row c has V * 16 readable columns and the block cin * BLOCK weights (checked).
            let xp = unsafe { x.add(t.row::<TABLE>(c)) }; // row: c < cin, checked
            let mut xv = [_mm512_setzero_ps(); V];
            for (v, xv) in xv.iter_mut().enumerate() {
                *xv = unsafe { _mm512_loadu_ps(xp.add(16 * v)) };
            }
            let wp = unsafe { w.add(c * BLOCK) };
            for (r, row) in acc.iter_mut().enumerate() {
                let wr = _mm512_set1_ps(unsafe { *wp.add(r) });
                for (a, &xv) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wr, xv, *a);
                }
            }
        }
        // Index loops with constant bounds (fully unrolled), not iterators over `acc`: borrowing the
        // array as a whole made the compiler keep a copy of all 24 accumulators on the stack, written
        // back on every iteration of the loop above (2.3x slower).
        let (lo, hi) = t.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (lo, hi, clamp) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi), t.clamp.is_some());
        let full = t.n == V * 16;
        for r in 0..BLOCK {
            // SAFETY: row r of the output has n writable columns (checked).
            let dst = unsafe { out_ptr.add(r * t.out_stride) };
            let mut tmp = [0f32; 48];
            for v in 0..V {
                let mut a = acc[r][v];
                if clamp {
                    a = _mm512_min_ps(_mm512_max_ps(a, lo), hi);
                }
                let to = if full { unsafe { dst.add(16 * v) } } else { unsafe { tmp.as_mut_ptr().add(16 * v) } };
                unsafe { _mm512_storeu_ps(to, a) };
            }
            if !full {
                unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, t.n) };
            }
        }
    }

    pub(super) fn tile_avx512(t: &Tile, vectors: usize) {
        let out = t.check(vectors, 16, 3);
        // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx512f, avx2
        // and fma; the bounds were checked above.
        unsafe {
            match (vectors, t.rows.is_some()) {
                (1, false) => avx512::<1, false>(t, out),
                (2, false) => avx512::<2, false>(t, out),
                (_, false) => avx512::<3, false>(t, out),
                (1, true) => avx512::<1, true>(t, out),
                (2, true) => avx512::<2, true>(t, out),
                (_, true) => avx512::<3, true>(t, out),
            }
        }
    }

    /// AVX2 + FMA: two passes of 4 rows x `V` vectors of 8 columns (8 accumulators of 16 registers).
    ///
    /// # Safety
    /// The CPU has avx2 and fma, and `t.check(V, 8, 2)` passed and returned `out_ptr`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const V: usize, const TABLE: bool>(t: &Tile, out_ptr: *mut f32) {
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr());
        for half in 0..BLOCK / 4 {
            let mut acc = [[_mm256_setzero_ps(); V]; 4];
            for (r, row) in acc.iter_mut().enumerate() {
                *row = [_mm256_set1_ps(t.bias[half * 4 + r]); V];
            }
            for c in 0..t.cin {
                // SAFETY: as in `avx512`.
                let xp = unsafe { x.add(t.row::<TABLE>(c)) }; // row: c < cin, checked
                let mut xv = [_mm256_setzero_ps(); V];
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = unsafe { _mm256_loadu_ps(xp.add(8 * v)) };
                }
                let wp = unsafe { w.add(c * BLOCK + half * 4) };
                for (r, row) in acc.iter_mut().enumerate() {
                    let wr = _mm256_set1_ps(unsafe { *wp.add(r) });
                    for (a, &xv) in row.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(wr, xv, *a);
                    }
                }
            }
            // Index loops, as in `avx512`.
            let (lo, hi) = t.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
            let (lo, hi, clamp) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi), t.clamp.is_some());
            let full = t.n == V * 8;
            for r in 0..4 {
                let dst = unsafe { out_ptr.add((half * 4 + r) * t.out_stride) };
                let mut tmp = [0f32; 16];
                for v in 0..V {
                    let mut a = acc[r][v];
                    if clamp {
                        a = _mm256_min_ps(_mm256_max_ps(a, lo), hi);
                    }
                    let to = if full { unsafe { dst.add(8 * v) } } else { unsafe { tmp.as_mut_ptr().add(8 * v) } };
                    unsafe { _mm256_storeu_ps(to, a) };
                }
                if !full {
                    unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, t.n) };
                }
            }
        }
    }

    /// AVX2 + FMA, for a plane's last few columns (`N <= 8`): vectorised over the block's 8 output
    /// channels instead of over columns (one register holds column j's 8 outputs; the packed weights of
    /// an input channel are one load), so a 7x7 plane's 49th column costs 8 lanes of work, not 16.
    /// The input channels are split over `SPLIT` partial sums, so that one or two columns still keep
    /// several multiply-adds in flight.
    ///
    /// # Safety
    /// The CPU has avx2 and fma, and `t.check(1, N, 1)` passed and returned `out_ptr`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns<const N: usize, const SPLIT: usize>(t: &Tile, out_ptr: *mut f32) {
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); N]; SPLIT];
        let mut c = 0;
        while c + SPLIT <= t.cin {
            for s in 0..SPLIT {
                // SAFETY: input channel c + s < cin: its weights and its row's first N columns are in bounds.
                let wv = unsafe { _mm256_loadu_ps(w.add((c + s) * BLOCK)) };
                let xp = unsafe { x.add((c + s) * t.x_stride) };
                for j in 0..N {
                    acc[s][j] = _mm256_fmadd_ps(wv, _mm256_set1_ps(unsafe { *xp.add(j) }), acc[s][j]);
                }
            }
            c += SPLIT;
        }
        while c < t.cin {
            let wv = unsafe { _mm256_loadu_ps(w.add(c * BLOCK)) };
            let xp = unsafe { x.add(c * t.x_stride) };
            for j in 0..N {
                acc[0][j] = _mm256_fmadd_ps(wv, _mm256_set1_ps(unsafe { *xp.add(j) }), acc[0][j]);
            }
            c += 1;
        }
        let bias = unsafe { _mm256_loadu_ps(t.bias.as_ptr()) };
        let (lo, hi) = t.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (lo, hi, clamp) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi), t.clamp.is_some());
        for j in 0..N.min(t.n) {
            let mut a = bias;
            for part in acc.iter() {
                a = _mm256_add_ps(a, part[j]);
            }
            if clamp {
                a = _mm256_min_ps(_mm256_max_ps(a, lo), hi);
            }
            let mut rows = [0f32; BLOCK];
            unsafe { _mm256_storeu_ps(rows.as_mut_ptr(), a) };
            for (r, &v) in rows.iter().enumerate() {
                // SAFETY: row r of the output has n > j writable columns (checked).
                unsafe { *out_ptr.add(r * t.out_stride + j) = v };
            }
        }
    }

    /// The columns kernel for `t.n` (1 to 8) columns; `vectors` is 1 (a vector here is `t.n` columns).
    pub(super) fn tile_columns(t: &Tile, vectors: usize) {
        assert!(t.rows.is_none(), "the columns kernel reads strided rows only");
        let out = t.check(vectors, t.n, 1);
        // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx2 and fma;
        // the bounds were checked above (`n` columns readable in every row).
        unsafe {
            match t.n {
                1 => columns::<1, 4>(t, out),
                2 => columns::<2, 2>(t, out),
                3 => columns::<3, 2>(t, out),
                4 => columns::<4, 2>(t, out),
                5 => columns::<5, 1>(t, out),
                6 => columns::<6, 1>(t, out),
                7 => columns::<7, 1>(t, out),
                _ => columns::<8, 1>(t, out),
            }
        }
    }

    pub(super) fn tile_avx2(t: &Tile, vectors: usize) {
        let out = t.check(vectors, 8, 2);
        // SAFETY: only selected by `select_kernel` after `is_x86_feature_detected!` saw avx2 and fma;
        // the bounds were checked above.
        unsafe {
            match (vectors, t.rows.is_some()) {
                (1, false) => avx2::<1, false>(t, out),
                (_, false) => avx2::<2, false>(t, out),
                (1, true) => avx2::<1, true>(t, out),
                (_, true) => avx2::<2, true>(t, out),
            }
        }
    }
}

// Index loops over the accumulators on purpose, as in `x86`.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Tile, BLOCK};
    use std::arch::aarch64::*;

    /// NEON: `BLOCK` rows x `V` vectors of 4 columns (24 accumulators at V = 3), the 8 weights of an
    /// input channel in two registers, multiplied by lane.
    ///
    /// # Safety
    /// `t.check(V, 4, 3)` passed and returned `out_ptr` (NEON is baseline on aarch64).
    unsafe fn tile<const V: usize, const TABLE: bool>(t: &Tile, out_ptr: *mut f32) {
        let (x, w) = (t.x.as_ptr(), t.w.as_ptr());
        let mut acc = [[vdupq_n_f32(0.0); V]; BLOCK];
        for (r, row) in acc.iter_mut().enumerate() {
            *row = [vdupq_n_f32(t.bias[r]); V];
        }
        for c in 0..t.cin {
            // SAFETY: row c has V * 4 readable columns and the block cin * BLOCK weights (checked).
            let xp = unsafe { x.add(t.row::<TABLE>(c)) }; // row: c < cin, checked
            let mut xv = [vdupq_n_f32(0.0); V];
            for (v, xv) in xv.iter_mut().enumerate() {
                *xv = unsafe { vld1q_f32(xp.add(4 * v)) };
            }
            let wp = unsafe { w.add(c * BLOCK) };
            let (w0, w1) = unsafe { (vld1q_f32(wp), vld1q_f32(wp.add(4))) };
            for (v, &xv) in xv.iter().enumerate() {
                acc[0][v] = vfmaq_laneq_f32::<0>(acc[0][v], xv, w0);
                acc[1][v] = vfmaq_laneq_f32::<1>(acc[1][v], xv, w0);
                acc[2][v] = vfmaq_laneq_f32::<2>(acc[2][v], xv, w0);
                acc[3][v] = vfmaq_laneq_f32::<3>(acc[3][v], xv, w0);
                acc[4][v] = vfmaq_laneq_f32::<0>(acc[4][v], xv, w1);
                acc[5][v] = vfmaq_laneq_f32::<1>(acc[5][v], xv, w1);
                acc[6][v] = vfmaq_laneq_f32::<2>(acc[6][v], xv, w1);
                acc[7][v] = vfmaq_laneq_f32::<3>(acc[7][v], xv, w1);
            }
        }
        // Index loops, as in the x86 kernels.
        let (lo, hi) = t.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (lo, hi, clamp) = (vdupq_n_f32(lo), vdupq_n_f32(hi), t.clamp.is_some());
        let full = t.n == V * 4;
        for r in 0..BLOCK {
            // SAFETY: row r of the output has n writable columns (checked).
            let dst = unsafe { out_ptr.add(r * t.out_stride) };
            let mut tmp = [0f32; 12];
            for v in 0..V {
                let mut a = acc[r][v];
                if clamp {
                    a = vminq_f32(vmaxq_f32(a, lo), hi);
                }
                let to = if full { unsafe { dst.add(4 * v) } } else { unsafe { tmp.as_mut_ptr().add(4 * v) } };
                unsafe { vst1q_f32(to, a) };
            }
            if !full {
                unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, t.n) };
            }
        }
    }

    pub(super) fn tile_neon(t: &Tile, vectors: usize) {
        let out = t.check(vectors, 4, 3);
        // SAFETY: the bounds were checked above.
        unsafe {
            match (vectors, t.rows.is_some()) {
                (1, false) => tile::<1, false>(t, out),
                (2, false) => tile::<2, false>(t, out),
                (_, false) => tile::<3, false>(t, out),
                (1, true) => tile::<1, true>(t, out),
                (2, true) => tile::<2, true>(t, out),
                (_, true) => tile::<3, true>(t, out),
            }
        }
    }
}

const PORTABLE: Kernel = Kernel { name: "portable", lanes: 8, max_vectors: 1, tile: tile_portable, narrow: None };
#[cfg(target_arch = "x86_64")]
const AVX2: Kernel = Kernel {
    name: "avx2+fma 4x16",
    lanes: 8,
    max_vectors: 2,
    tile: x86::tile_avx2,
    narrow: Some((4, x86::tile_columns)),
};
#[cfg(target_arch = "x86_64")]
const AVX512: Kernel = Kernel {
    name: "avx512f+fma 8x48",
    lanes: 16,
    max_vectors: 3,
    tile: x86::tile_avx512,
    narrow: Some((8, x86::tile_columns)),
};

/// The widest kernel this CPU runs.
pub(crate) fn select_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if fma && is_x86_feature_detected!("avx512f") {
            return AVX512;
        }
        if fma {
            return AVX2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return Kernel { name: "neon 8x12", lanes: 4, max_vectors: 3, tile: neon::tile_neon, narrow: None };
    }
    #[allow(unreachable_code)]
    PORTABLE
}

/// Which kernel this CPU runs (for logs and `whaled bench --profile`).
pub fn kernel_name() -> &'static str {
    select_kernel().name
}

/// Replaces every eligible pointwise convolution of a decluttered model by [`PointwiseConv`] and
/// returns how many it replaced. tract's declutter has already turned each 1x1, stride-1, unpadded,
/// ungrouped `Conv` into an `EinSum` (`[N,] I, H, W` by a constant `O, I`), followed by an `Add` of the
/// bias unless the bias is zero: that pair (and a ReLU / ReLU6 after it) becomes one op. Other einsums
/// (the matrix products of a ViT or Swin) and ineligible convolutions are left to tract, untouched.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(einsum) = node.op_as::<EinSum>() else { continue };
        let Some((op, weights, bias, conv_end)) = eligible(model, node, einsum)? else { continue };
        let (post, last) = fusable_successors(model, conv_end)?;
        let mut patch = TypedModelPatch::new(format!("whaled pointwise {}", node.name));
        let w = patch.add_const(format!("{}.whaled_packed_weights", node.name), weights)?;
        let b = patch.add_const(format!("{}.whaled_bias", node.name), bias)?;
        let (op, inputs) = match channel_scale(model, node, &op)? {
            Some((data, scale)) => {
                let (x, s) = (patch.tap_model(model, data)?, patch.tap_model(model, scale)?);
                (op.with_input_scale()?, vec![x, w, b, s])
            }
            None => (op, vec![patch.tap_model(model, node.inputs[0])?, w, b]),
        };
        let out = patch.wire_node(&node.name, op.with_post(post)?, &inputs)?;
        patch.shunt_outside(model, last.into(), out[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// The data and the factors of a squeeze-excitation product feeding the 1x1 conv `node` (`op`): when
/// its data is `Mul(x, s)`, the conv its only consumer, with `x` of the data's shape and `s` one f32
/// factor per input channel (`[1, cin, 1, 1]` or `[cin, 1, 1]`), for one image, and the plane at least
/// as large as the output channels (so multiplying `cin x cout` weights per inference costs less than
/// the `cin x plane` product it replaces): `(x, s)`. Else `None`.
fn channel_scale(
    model: &TypedModel,
    node: &TypedNode,
    op: &PointwiseConv,
) -> TractResult<Option<(OutletId, OutletId)>> {
    use tract_core::ops::binary::TypedBinOp;
    let data = node.inputs[0];
    if op.batch != 1 || op.plane() < op.cout {
        return Ok(None);
    }
    let mul = model.node(data.node);
    let Some(bin) = mul.op_as::<TypedBinOp>() else { return Ok(None) };
    if bin.0.name() != "Mul"
        || mul.inputs.len() != 2
        || mul.outputs.len() != 1
        || model.outlet_successors(data).len() != 1
        || model.output_outlets()?.contains(&data)
    {
        return Ok(None);
    }
    let data_fact = model.outlet_fact(data)?;
    let per_channel = |f: &TypedFact| {
        f.datum_type == f32::datum_type()
            && f.shape.as_concrete().is_some_and(|s| {
                let n = s.len();
                n >= 3 && n <= data_fact.rank() && s[n - 3..] == [op.cin, 1, 1] && s[..n - 3].iter().all(|&d| d == 1)
            })
    };
    for (a, b) in [(0, 1), (1, 0)] {
        let (x, s) = (model.outlet_fact(mul.inputs[a])?, model.outlet_fact(mul.inputs[b])?);
        if x.datum_type == f32::datum_type() && x.shape == data_fact.shape && per_channel(s) {
            return Ok(Some((mul.inputs[a], mul.inputs[b])));
        }
    }
    Ok(None)
}

/// Whether an einsum's axes are a 1x1 convolution's: data `[n] i h w`, weights `o i`, output
/// `[n] o h w` (a batch axis may be on both sides, on the data only, or on neither). Returns whether
/// the data and the output have the batch axis.
pub(crate) fn conv_axes(axes: &AxesMapping) -> Option<[bool; 2]> {
    let (inputs, outputs) = axes.to_strs();
    let [data, weights] = &inputs[..] else { return None };
    let [output] = &outputs[..] else { return None };
    let (data, weights, output): (Vec<char>, Vec<char>, Vec<char>) =
        (data.chars().collect(), weights.chars().collect(), output.chars().collect());
    let &[o, i] = &weights[..] else { return None };
    let (batch_in, rest_in) = match data.len() {
        4 => (Some(data[0]), &data[1..]),
        3 => (None, &data[..]),
        _ => return None,
    };
    let &[i2, h, w] = rest_in else { return None };
    // The output may have a batch axis the data has not (a graph output declared `[N, C, H, W]` after
    // tract dropped the data's batch of 1): the op then writes batch 1 (its constructor requires it,
    // and the caller checks the output's shape).
    let (batch_out, new_batch) = match (&output[..], batch_in) {
        (&[n, o2, h2, w2], Some(b)) if n == b && (o2, h2, w2) == (o, h, w) => (true, None),
        (&[n, o2, h2, w2], None) if (o2, h2, w2) == (o, h, w) => (true, Some(n)),
        (&[o2, h2, w2], _) if (o2, h2, w2) == (o, h, w) => (false, None),
        _ => return None,
    };
    let distinct = [Some(o), Some(i), Some(h), Some(w), batch_in.or(new_batch)];
    let all_distinct = distinct.iter().enumerate().all(|(a, x)| x.is_none() || !distinct[a + 1..].contains(x));
    (i2 == i && all_distinct).then_some([batch_in.is_some(), batch_out])
}

/// A float einsum that is a 1x1 convolution over a constant `[cout, cin]` weight matrix: its sizes and
/// weights, as [`conv_1x1`] finds them (shared by this op and [`crate::qpointwise`], whose data is a
/// dequantized tensor of the same shape).
pub(crate) struct Conv1x1 {
    pub(crate) batch: usize,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) hw: [usize; 2],
    /// Whether the data and the output have the batch axis.
    pub(crate) batch_axis: [bool; 2],
    /// Row-major `[cout, cin]`.
    pub(crate) weights: Vec<f32>,
}

/// The [`Conv1x1`] of an einsum node, or `None` when it is not one: f32 without quantization
/// parameters, axes of a 1x1 conv ([`conv_axes`]), constant rank-2 f32 weights, concrete shapes that
/// agree (data `cin` channels, output `[n] cout h w`).
pub(crate) fn conv_1x1(model: &TypedModel, node: &TypedNode, einsum: &EinSum) -> TractResult<Option<Conv1x1>> {
    if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return Ok(None);
    }
    let Some(batch_axis) = conv_axes(&einsum.axes) else { return Ok(None) };
    let fact = model.outlet_fact(node.inputs[0])?;
    let out_fact = model.outlet_fact(node.id.into())?;
    let Some(weights) = model.outlet_fact(node.inputs[1])?.konst.clone() else { return Ok(None) };
    let (Some(shape), Some(out_shape)) = (fact.shape.as_concrete(), out_fact.shape.as_concrete()) else {
        return Ok(None);
    };
    if fact.datum_type != f32::datum_type() || weights.datum_type() != f32::datum_type() || weights.rank() != 2 {
        return Ok(None);
    }
    let (cout, cin) = (weights.shape()[0], weights.shape()[1]);
    let (batch, data_chw) = if batch_axis[0] { (shape[0], &shape[1..]) } else { (1, shape) };
    let &[c, h, w] = data_chw else { return Ok(None) };
    if c != cin || out_shape != &nchw(cout, batch, [h, w], batch_axis[1])[..] {
        return Ok(None);
    }
    let Ok(weights) = weights.try_as_plain_ram().and_then(|w| w.as_slice::<f32>().map(<[f32]>::to_vec)) else {
        return Ok(None);
    };
    Ok(Some(Conv1x1 { batch, cin, cout, hw: [h, w], batch_axis, weights }))
}

/// The op, packed weights, `[Cout]` bias and the node whose output the op replaces (before any fused
/// activation: the einsum, or the bias `Add` after it) for an einsum this op can run, or `None`.
fn eligible(
    model: &TypedModel,
    node: &TypedNode,
    einsum: &EinSum,
) -> TractResult<Option<(PointwiseConv, Tensor, Tensor, usize)>> {
    let Some(conv) = conv_1x1(model, node, einsum)? else { return Ok(None) };
    let Conv1x1 { batch, cin, cout, hw, batch_axis, weights } = conv;
    let Ok(op) = PointwiseConv::new(batch, cin, cout, hw, batch_axis) else { return Ok(None) };
    let (bias, conv_end) = match bias_after(model, node.id, cout)? {
        Some((bias, add)) => (bias, add),
        None => (vec![0f32; cout], node.id),
    };
    Ok(Some((op, pack_weights(&weights, cout, cin)?, tensor1(&bias), conv_end)))
}

/// The `[cout]` bias of the `Add` of a constant broadcast along the channel axis that is the only
/// consumer of node `id` (not a model output), and that node; `None` when there is none.
pub(crate) fn bias_after(model: &TypedModel, id: usize, cout: usize) -> TractResult<Option<(Vec<f32>, usize)>> {
    use tract_core::ops::binary::TypedBinOp;
    let outlet = OutletId::new(id, 0);
    let succ = model.outlet_successors(outlet);
    if succ.len() != 1 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    let add = model.node(succ[0].node);
    let Some(bin) = add.op_as::<TypedBinOp>() else { return Ok(None) };
    if bin.0.name() != "Add" || add.inputs.len() != 2 || add.outputs.len() != 1 {
        return Ok(None);
    }
    let out_shape = model.outlet_fact(outlet)?.shape.clone();
    let add_fact = model.outlet_fact(add.id.into())?;
    if add_fact.shape != out_shape || add_fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let Some(k) = model.outlet_fact(add.inputs[1 - succ[0].slot])?.konst.clone() else { return Ok(None) };
    if k.datum_type() != f32::datum_type() || k.rank() > out_shape.rank() {
        return Ok(None);
    }
    // Broadcast along the channel axis only: right-aligned with the output `[n] o h w`, the channel
    // axis is the constant's third from last (if it has one); every other axis is 1.
    let channel_axis = k.rank().checked_sub(3);
    let per_channel = k.shape().iter().enumerate().all(|(a, &d)| d == 1 || (Some(a) == channel_axis && d == cout));
    if !per_channel {
        return Ok(None);
    }
    let Ok(values) = k.try_as_plain_ram().and_then(|k| k.as_slice::<f32>().map(<[f32]>::to_vec)) else {
        return Ok(None);
    };
    let bias = if values.len() == cout { values } else { vec![values[0]; cout] };
    Ok(Some((bias, add.id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, uniform};

    /// Every kernel this CPU can run, not only the one `select_kernel` picks.
    fn available_kernels() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut kernels = vec![PORTABLE, select_kernel()];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(AVX2);
                // AVX-512 without its narrow tail kernel: every tail through the wide one.
                if is_x86_feature_detected!("avx512f") {
                    kernels.push(Kernel { narrow: None, ..AVX512 });
                }
            }
        }
        kernels
    }

    /// `run_table` on every kernel against the definition: rows starting anywhere in the buffer, out of
    /// order and overlapping, the furthest one ending a tile's width before the buffer's end; spans
    /// around the tile widths; with and without a clamp.
    #[test]
    fn table_rows_match_the_definition() {
        let mut rnd = uniform(11);
        for (cin, cout, span) in [(1, 8, 1), (27, 32, 113), (5, 16, 48), (64, 8, 97), (9, 24, 16 * 7 + 3)] {
            let starts: Vec<usize> = (0..cin).map(|_| ((rnd() + 1.0) * 150.0) as usize).collect();
            let furthest = *starts.iter().max().unwrap();
            let x: Vec<f32> = (0..furthest + span + 48).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..cout * cin).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..cout).map(|_| rnd()).collect();
            let rows = RowTable::new(starts.clone());
            let packed = pack_weights(&w, cout, cin).unwrap();
            let packed = packed.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
            for post in [vec![], vec![Post::Max(0f32.to_bits()), Post::Min(0.5f32.to_bits())]] {
                let clamp = as_clamp(&post);
                let op = PointwiseConv::new(1, cin, cout, [1, span], [true; 2]).unwrap().with_post(post).unwrap();
                for kernel in available_kernels() {
                    let full = kernel.width();
                    let mut got = vec![f32::NAN; cout * span];
                    op.run_table(
                        kernel,
                        &x,
                        &rows,
                        &packed,
                        &b,
                        span,
                        0..cout / BLOCK,
                        0..span.div_ceil(full),
                        |block, p0, n, values| {
                            for r in 0..BLOCK {
                                got[(block * BLOCK + r) * span + p0..][..n].copy_from_slice(&values[r * full..][..n]);
                            }
                        },
                    );
                    for co in 0..cout {
                        for p in 0..span {
                            let want = (0..cin)
                                .fold(b[co] as f64, |a, k| a + w[co * cin + k] as f64 * x[starts[k] + p] as f64)
                                as f32;
                            let want = clamp.map_or(want, |(lo, hi)| want.max(lo).min(hi));
                            let have = got[co * span + p];
                            assert!(
                                (have - want).abs() < 1e-5,
                                "{} {cin}->{cout} span {span}: [{co}, {p}] {have} vs {want}",
                                kernel.name
                            );
                        }
                    }
                }
            }
        }
    }

    /// `bias + w x`, f64, straight from the definition (unpacked weights `[cout, cin]`).
    fn reference(batch: usize, cin: usize, cout: usize, plane: usize, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(batch * cout * plane);
        for n in 0..batch {
            for co in 0..cout {
                for p in 0..plane {
                    let mut s = b[co] as f64;
                    for ci in 0..cin {
                        s += w[co * cin + ci] as f64 * x[(n * cin + ci) * plane + p] as f64;
                    }
                    out.push(s as f32);
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_odd_shapes() {
        tract_linalg::multithread::set_threading_element_threshold(0);
        let mut rnd = uniform(7);
        // (batch, cin, cout, hw): planes around every tile width and its tail, one channel in.
        let cases = [
            (1, 1, 8, [1, 1]),
            (1, 3, 16, [7, 7]),
            (2, 5, 8, [4, 12]),
            (1, 16, 24, [1, 47]),
            (1, 17, 8, [6, 8]),
            (3, 9, 32, [13, 11]),
            (1, 40, 40, [2, 50]),
            (2, 2, 16, [97, 1]),
            // Enough input channels that a plane spans several chunks (`CHUNK_BYTES`): 4 tiles per
            // chunk and a partial tile in the last; one tile per chunk.
            (1, 300, 16, [13, 37]),
            (1, 700, 8, [7, 15]),
        ];
        for (batch, cin, cout, hw) in cases {
            let plane = hw[0] * hw[1];
            let x: Vec<f32> = (0..batch * cin * plane).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..cout * cin).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..cout).map(|_| rnd()).collect();
            let want = reference(batch, cin, cout, plane, &x, &w, &b);
            for post in [vec![], vec![Post::Max(0f32.to_bits()), Post::Min(0.5f32.to_bits())]] {
                let clamp = as_clamp(&post);
                let want: Vec<f32> = want.iter().map(|&v| clamp.map_or(v, |(lo, hi)| v.max(lo).min(hi))).collect();
                let op = PointwiseConv::new(batch, cin, cout, hw, [true; 2]).unwrap().with_post(post.clone()).unwrap();
                let inputs = tvec![
                    Tensor::from_shape(&[batch, cin, hw[0], hw[1]], &x).unwrap().into_tvalue(),
                    pack_weights(&w, cout, cin).unwrap().into_tvalue(),
                    tensor1(&b).into_tvalue(),
                ];
                for (kernel, threads) in available_kernels().into_iter().flat_map(|k| [(k, 1), (k, 3)]) {
                    // Three threads split even these small outputs (the threshold is 0 below) into
                    // blocks x column ranges.
                    let pool = tract_linalg::multithread::Executor::multithread(threads);
                    let got = tract_linalg::multithread::multithread_tract_scope(pool, || {
                        op.compute_with(inputs.clone(), kernel)
                    })
                    .unwrap();
                    let got = got[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                    assert_eq!(got.len(), want.len());
                    let diff = max_diff(&got, &want);
                    // f32 sums of up to 700 terms: relative to the largest output beyond 1e-5.
                    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(
                        diff < 1e-5f32.max(4e-6 * scale),
                        "{} x{threads} {batch}x{cin}->{cout} {hw:?} {post:?}: max diff {diff}",
                        kernel.name
                    );
                }
            }
        }
    }

    #[test]
    fn work_items_partition_the_output() {
        for (blocks, tiles, items) in
            [(1, 1, 8), (3, 262, 8), (160, 2, 8), (3, 1, 8), (2, 5, 4), (7, 7, 1), (5, 3, 16), (24, 1, 8)]
        {
            for split in [Split::new(blocks, tiles, items), Split::columns_first(blocks, tiles, items)] {
                let mut seen = vec![0u8; blocks * tiles];
                for i in 0..split.items() {
                    let (bs, ts) = split.item(i);
                    assert!(!bs.is_empty() && !ts.is_empty(), "{blocks} x {tiles} / {items}: item {i} is empty");
                    for b in bs {
                        for t in ts.clone() {
                            seen[b * tiles + t] += 1;
                        }
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "{blocks} x {tiles} / {items}: {seen:?}");
                assert!(
                    split.items() >= items.min(blocks * tiles),
                    "{blocks} x {tiles} / {items}: only {} items",
                    split.items()
                );
            }
        }
    }

    #[test]
    fn refuses_sizes_it_cannot_run() {
        assert!(PointwiseConv::new(1, 4, 12, [2, 2], [true; 2]).is_err());
        assert!(PointwiseConv::new(1, 0, 8, [2, 2], [true; 2]).is_err());
        assert!(PointwiseConv::new(2, 4, 8, [2, 2], [true, false]).is_err());
        assert!(pack_weights(&[0.0; 7], 8, 1).is_err());
    }
}
