//! Pillow's resize, pixel for pixel: the resampler of models whose manifests say `resampler = "pillow"`.
//!
//! The upstream service resizes with Pillow (`transforms.Resize((512, 512))` on a PIL image), and an
//! ArcFace softmax at scale 30 turns the +-1 level differences of any other antialiased resize (10-20 %
//! of the values with `fast_image_resize`) into probability differences of several hundredths. This is
//! Pillow's `ImagingResample` for 8-bit RGB (libImaging/Resample.c) written again: the same separable
//! filters and supports, coefficients computed in `f64` in the same order, normalised by their sum,
//! rounded to 22-bit fixed point the same way, two passes each rounding to 8 bits with the same bias
//! and clip, in the order Pillow picks (since 10.1: the vertical pass first when the height shrinks by
//! more than twice as many pixels as the width, which changes the bytes). Integer sums are exact, so the
//! order of the additions within a pass is free: the vertical pass runs tap by tap over whole rows,
//! which vectorises.
//!
//! A centre crop is taken the way torchvision does it after `Resize(int)`: the coefficients are those
//! of resizing the whole frame, and only the output pixels inside the crop are computed, which gives
//! the same bytes as resizing everything and cropping afterwards. Coefficients are cached per input
//! size, so a camera's frames after the first cost no allocation.

use crate::manifest::Interpolation;

/// Fixed-point fraction bits of the coefficients (Pillow's `PRECISION_BITS`, 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// A resampling filter of Pillow's: its kernel and its support at scale 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (triangle, support 1).
    Bilinear,
    /// `Image.BICUBIC` (Keys cubic with a = -0.5, support 2).
    Bicubic,
    /// `Image.LANCZOS` (sinc windowed by sinc, support 3).
    Lanczos3,
}

impl Filter {
    /// The filter Pillow uses for a manifest's interpolation; `None` for nearest neighbour, which
    /// Pillow computes by an affine transform rather than by this resampler.
    pub fn of(interpolation: Interpolation) -> Option<Filter> {
        match interpolation {
            Interpolation::Nearest => None,
            Interpolation::Bilinear => Some(Filter::Bilinear),
            Interpolation::Bicubic => Some(Filter::Bicubic),
            Interpolation::Lanczos3 => Some(Filter::Lanczos3),
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos3 => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos3 => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// One axis's coefficients: for each output index kept, the first input index and its taps.
#[derive(Debug, Default)]
struct Axis {
    /// `(first input index, number of taps)` per kept output index.
    bounds: Vec<(usize, usize)>,
    /// `taps` fixed-point coefficients per kept output index (only the first `n` of each are used).
    coeffs: Vec<i32>,
    taps: usize,
}

impl Axis {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for `in_size -> out_size` over the whole
    /// input, keeping the output indices `keep` (a crop of the output).
    fn new(filter: Filter, in_size: usize, out_size: usize, keep: std::ops::Range<usize>) -> Axis {
        // Pillow takes the box edges as C floats: (in1 - in0) is computed in f32, then widened.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let taps = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(keep.len());
        let mut coeffs = vec![0i32; keep.len() * taps];
        let mut k = vec![0f64; taps];
        for (i, xx) in keep.enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize - xmin;
            let n = xmax.min(taps);
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(n) {
                let w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut coeffs[i * taps..i * taps + n];
            for (c, &w) in row.iter_mut().zip(&k[..n]) {
                let w = if ww != 0.0 { w / ww } else { w };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                *c = if w < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
            }
            bounds.push((xmin, n));
        }
        Axis { bounds, coeffs, taps }
    }

    fn taps_of(&self, i: usize) -> (usize, &[i32]) {
        let (first, n) = self.bounds[i];
        (first, &self.coeffs[i * self.taps..i * self.taps + n])
    }
}

/// Pillow's rounding back to 8 bits: the sum started at half a unit, so this is round-half-up.
#[inline]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// What to produce from a `width x height` frame: the whole frame resized to `resized`, of which the
/// `crop` rectangle (left, top, width, height, inside `resized`) is the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub resized: (usize, usize),
    pub crop: (usize, usize, usize, usize),
}

impl Geometry {
    /// `Resize((height, width))`: the whole frame stretched to the output.
    pub fn stretch(width: usize, height: usize) -> Geometry {
        Geometry { resized: (width, height), crop: (0, 0, width, height) }
    }

    /// torchvision's `Resize(short)` then `CenterCrop(size)` (timm's eval transform) on a
    /// `width x height` frame: the shorter side to `short`, the longer to `int(short * long / short_in)`,
    /// then the centre `size x size`, its offset rounded half to even like Python's `round`. `None`
    /// when the resized frame is smaller than the crop (torchvision would pad).
    pub fn center_crop(width: usize, height: usize, short: usize, size: usize) -> Option<Geometry> {
        if width == 0 || height == 0 {
            return None;
        }
        let (s, l) = if width <= height { (width, height) } else { (height, width) };
        // int(short * long / short_in): Python's true division of integers, then truncation.
        let long = (short as f64 * l as f64 / s as f64) as usize;
        let (rw, rh) = if width <= height { (short, long) } else { (long, short) };
        if rw < size || rh < size {
            return None;
        }
        let offset = |d: usize| {
            let half = d / 2;
            if d % 2 == 1 && half % 2 == 1 {
                half + 1
            } else {
                half
            }
        };
        Some(Geometry { resized: (rw, rh), crop: (offset(rw - size), offset(rh - size), size, size) })
    }
}

/// A reusable Pillow-exact resampler for 8-bit RGB: coefficients are computed once per input size
/// and geometry, buffers are kept between frames.
#[derive(Debug)]
pub struct PillowResizer {
    filter: Filter,
    key: Option<((usize, usize), Geometry)>,
    plan: Plan,
    /// The first pass's 8-bit output.
    temp: Vec<u8>,
    /// The vertical pass's accumulators, one row.
    sums: Vec<i32>,
    /// The horizontal pass's kernel and buffers.
    rows: RowScratch,
}

/// The passes for one input size and geometry.
#[derive(Debug, Default)]
struct Plan {
    /// `None` when the width does not change (Pillow skips that pass).
    horizontal: Option<Axis>,
    /// `None` when the height does not change.
    vertical: Option<Axis>,
    /// Pillow 10.1+'s order: the vertical pass first when the height shrinks by more than twice as many
    /// pixels as the width does (the order changes the bytes, since each pass rounds to 8 bits).
    vertical_first: bool,
    /// Input rows the output needs: `rows.0..rows.1`.
    rows: (usize, usize),
    /// Input columns the output needs: `cols.0..cols.1`.
    cols: (usize, usize),
}

fn span(axis: &Axis) -> (usize, usize) {
    let first = axis.bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let last = axis.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(first);
    (first, last)
}

/// The horizontal pass over `n` rows: `row(i)` holds input columns from `base` on, `out` gets `n` rows
/// of `stride` bytes: the kept outputs or, without a pass, the input columns `left..`. Rows go two at a
/// time, each tap one multiply-add of both rows' RGBx lanes (8 x i32: one AVX2 instruction).
fn horizontal<'a>(
    axis: Option<&Axis>,
    row: impl Fn(usize) -> &'a [u8],
    n: usize,
    base: usize,
    left: usize,
    out: &mut [u8],
    scratch: &mut RowScratch,
) {
    let RowScratch { lanes, wide, spare } = scratch;
    let stride = out.len() / n.max(1);
    let Some(h) = axis else {
        for (i, dst) in out.chunks_exact_mut(stride).enumerate() {
            let from = (left - base) * 3;
            dst.copy_from_slice(&row(i)[from..from + stride]);
        }
        return;
    };
    spare.resize(stride, 0);
    for (pair, dst) in out.chunks_mut(2 * stride).enumerate() {
        let i = 2 * pair;
        let (d0, d1) = if dst.len() == 2 * stride { dst.split_at_mut(stride) } else { (dst, &mut spare[..]) };
        let (a, b) = (row(i), row((i + 1).min(n - 1)));
        match lanes {
            // SAFETY: `Lanes::Avx2` / `Sse41` exist only where `Lanes::detect` saw the CPU feature; the
            // functions are safe code compiled with it.
            #[cfg(target_arch = "x86_64")]
            Lanes::Avx2 => unsafe { taps_avx2(h, a, b, base, d0, d1, wide) },
            #[cfg(target_arch = "x86_64")]
            Lanes::Sse41 => unsafe { taps_sse41(h, a, b, base, d0, d1, wide) },
            Lanes::Portable => taps(h, a, b, base, d0, d1, wide),
        }
    }
}

/// The widest 32-bit lane multiply of this CPU, found once per resizer (not per row).
#[derive(Debug, Clone, Copy)]
enum Lanes {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Sse41,
    /// Whatever the target's baseline gives the compiler (NEON on aarch64).
    Portable,
}

impl Lanes {
    fn detect() -> Lanes {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                return Lanes::Avx2;
            }
            if std::arch::is_x86_feature_detected!("sse4.1") {
                return Lanes::Sse41;
            }
        }
        Lanes::Portable
    }
}

/// The horizontal pass's kernel choice and buffers, kept between frames.
#[derive(Debug)]
struct RowScratch {
    lanes: Lanes,
    /// Two input rows interleaved as RGBx RGBx.
    wide: Vec<[u8; 8]>,
    /// The output of an odd row count's missing partner.
    spare: Vec<u8>,
}

/// [`taps`] compiled with AVX2: the 8-lane multiply-add is one `vpmulld` + `vpaddd` (x86-64's baseline
/// SSE2 has no 32-bit lane multiply, and the loop stays scalar there).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn taps_avx2(h: &Axis, a: &[u8], b: &[u8], base: usize, d0: &mut [u8], d1: &mut [u8], wide: &mut Vec<[u8; 8]>) {
    taps(h, a, b, base, d0, d1, wide);
}

/// [`taps`] compiled with SSE4.1 (`pmulld`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn taps_sse41(h: &Axis, a: &[u8], b: &[u8], base: usize, d0: &mut [u8], d1: &mut [u8], wide: &mut Vec<[u8; 8]>) {
    taps(h, a, b, base, d0, d1, wide);
}

/// Two rows `a` and `b` interleaved pixel by pixel as RGBx RGBx, then every kept output of both.
#[inline(always)]
fn taps(h: &Axis, a: &[u8], b: &[u8], base: usize, d0: &mut [u8], d1: &mut [u8], wide: &mut Vec<[u8; 8]>) {
    wide.resize(a.len() / 3, [0; 8]);
    for ((w, p), q) in wide.iter_mut().zip(a.chunks_exact(3)).zip(b.chunks_exact(3)) {
        *w = [p[0], p[1], p[2], 0, q[0], q[1], q[2], 0];
    }
    for (x, (p0, p1)) in d0.chunks_exact_mut(3).zip(d1.chunks_exact_mut(3)).enumerate() {
        let (first, k) = h.taps_of(x);
        let mut s = [1i32 << (PRECISION_BITS - 1); 8];
        for (p, &c) in wide[first - base..first - base + k.len()].iter().zip(k) {
            for (sj, &pj) in s.iter_mut().zip(p) {
                *sj += i32::from(pj) * c;
            }
        }
        p0.copy_from_slice(&[clip8(s[0]), clip8(s[1]), clip8(s[2])]);
        p1.copy_from_slice(&[clip8(s[4]), clip8(s[5]), clip8(s[6])]);
    }
}

/// One vertical pass for output row `y`: `row(r)` is input row `r` (the same columns as `dst`).
/// Tap by tap over whole rows, into `sums`.
fn vertical<'a>(axis: &Axis, y: usize, row: impl Fn(usize) -> &'a [u8], sums: &mut Vec<i32>, dst: &mut [u8]) {
    let (first, k) = axis.taps_of(y);
    sums.clear();
    sums.resize(dst.len(), 1i32 << (PRECISION_BITS - 1));
    for (t, &c) in k.iter().enumerate() {
        for (s, &p) in sums.iter_mut().zip(row(first + t)) {
            *s += i32::from(p) * c;
        }
    }
    for (o, &s) in dst.iter_mut().zip(sums.iter()) {
        *o = clip8(s);
    }
}

impl PillowResizer {
    pub fn new(filter: Filter) -> PillowResizer {
        PillowResizer {
            filter,
            key: None,
            plan: Plan::default(),
            temp: Vec::new(),
            sums: Vec::new(),
            rows: RowScratch { lanes: Lanes::detect(), wide: Vec::new(), spare: Vec::new() },
        }
    }

    fn prepare(&mut self, width: usize, height: usize, g: Geometry) {
        if self.key == Some(((width, height), g)) {
            return;
        }
        let (rw, rh) = g.resized;
        let (left, top, cw, ch) = g.crop;
        let horizontal = (rw != width).then(|| Axis::new(self.filter, width, rw, left..left + cw));
        let vertical = (rh != height).then(|| Axis::new(self.filter, height, rh, top..top + ch));
        // Resample.c: horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2),
        // in signed arithmetic over the whole resized frame.
        let (dw, dh) = (width as i64 - rw as i64, height as i64 - rh as i64);
        let vertical_first = dh > 0 && dh > dw * 2;
        let rows = vertical.as_ref().map_or((top, top + ch), span);
        let cols = horizontal.as_ref().map_or((left, left + cw), span);
        self.plan = Plan { horizontal, vertical, vertical_first, rows, cols };
        self.key = Some(((width, height), g));
    }

    /// Resizes the RGB `src` (`width x height`, rows packed) to `g`'s crop, written to `out` as packed
    /// RGB rows (`out` is exactly the crop: width x height x 3 bytes). The caller checks the sizes:
    /// `src.len() == width * height * 3`, the crop inside `g.resized`, and no dimension zero.
    pub fn resize(&mut self, src: &[u8], width: usize, height: usize, g: Geometry, out: &mut [u8]) {
        self.prepare(width, height, g);
        let (left, top, cw, ch) = g.crop;
        let p = &self.plan;
        let stride = cw * 3;
        assert_eq!(out.len(), ch * stride, "the output buffer is not the crop's size");
        let input_row = |r: usize| &src[r * width * 3..(r + 1) * width * 3];
        if p.vertical_first {
            // Vertical pass over the columns the horizontal pass reads, then the horizontal pass.
            let (c0, c1) = p.cols;
            let tstride = (c1 - c0) * 3;
            self.temp.resize(ch * tstride, 0);
            for (y, dst) in self.temp.chunks_exact_mut(tstride).enumerate() {
                match &p.vertical {
                    Some(v) => vertical(v, y, |r| &input_row(r)[c0 * 3..c1 * 3], &mut self.sums, dst),
                    None => dst.copy_from_slice(&input_row(top + y)[c0 * 3..c1 * 3]),
                }
            }
            let temp = &self.temp;
            let row = |i: usize| &temp[i * tstride..(i + 1) * tstride];
            horizontal(p.horizontal.as_ref(), row, ch, c0, left, out, &mut self.rows);
        } else {
            // Horizontal pass over the rows the vertical pass reads, then the vertical pass.
            let (r0, r1) = p.rows;
            self.temp.resize((r1 - r0) * stride, 0);
            let row = |i: usize| input_row(r0 + i);
            horizontal(p.horizontal.as_ref(), row, r1 - r0, 0, left, &mut self.temp, &mut self.rows);
            let temp = &self.temp;
            for (y, dst) in out.chunks_exact_mut(stride).enumerate() {
                match &p.vertical {
                    Some(v) => vertical(v, y, |r| &temp[(r - r0) * stride..(r - r0 + 1) * stride], &mut self.sums, dst),
                    None => dst.copy_from_slice(&temp[(top + y - r0) * stride..(top + y - r0 + 1) * stride]),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `r.resize` into a buffer of the crop's size.
    fn resized(r: &mut PillowResizer, src: &[u8], w: usize, h: usize, g: Geometry) -> Vec<u8> {
        let mut out = vec![0; g.crop.2 * g.crop.3 * 3];
        r.resize(src, w, h, g, &mut out);
        out
    }

    /// Every filter's coefficients of every output sum to one unit (+- rounding of each tap), for
    /// shrinking and enlarging.
    #[test]
    fn coefficients_are_normalised() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
            for (inn, out) in [(4000, 512), (300, 512), (513, 512), (7, 3), (3, 7), (1, 5)] {
                let a = Axis::new(filter, inn, out, 0..out);
                for i in 0..out {
                    let (first, k) = a.taps_of(i);
                    assert!(first + k.len() <= inn, "{filter:?} {inn}->{out} #{i}");
                    let sum: i64 = k.iter().map(|&c| i64::from(c)).sum();
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                        "{filter:?} {inn}->{out} #{i}: {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_uniform_frame_stays_uniform() {
        let src: Vec<u8> = [200u8, 7, 99].repeat(37 * 23);
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
            let mut r = PillowResizer::new(filter);
            for g in
                [Geometry::stretch(16, 16), Geometry::stretch(64, 50), Geometry::center_crop(37, 23, 20, 20).unwrap()]
            {
                let out = resized(&mut r, &src, 37, 23, g);
                assert_eq!(out.len(), g.crop.2 * g.crop.3 * 3);
                assert!(out.chunks_exact(3).all(|p| p == [200, 7, 99]), "{filter:?} {g:?}");
            }
        }
    }

    #[test]
    fn same_size_is_the_identity_and_a_crop_a_crop() {
        let src: Vec<u8> = (0..20 * 10 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let mut r = PillowResizer::new(Filter::Bicubic);
        let out = resized(&mut r, &src, 20, 10, Geometry::stretch(20, 10));
        assert_eq!(out, src);
        // Resize(10) of 20x10 is the identity; CenterCrop(10) takes columns 5..15.
        let g = Geometry::center_crop(20, 10, 10, 10).unwrap();
        assert_eq!(g, Geometry { resized: (20, 10), crop: (5, 0, 10, 10) });
        let out = resized(&mut r, &src, 20, 10, g);
        let want: Vec<u8> = src.chunks_exact(60).flat_map(|row| row[15..45].to_vec()).collect();
        assert_eq!(out, want);
    }

    /// Pillow's two passes written the plain way (one output value at a time, whole intermediate image,
    /// then the crop), against the resizer's paired rows, widened lanes, SIMD dispatch, row spans and
    /// odd row counts, on noise, for both pass orders and crops.
    #[test]
    fn the_fast_loops_equal_the_plain_definition() {
        fn plain(src: &[u8], w: usize, h: usize, g: Geometry, filter: Filter) -> Vec<u8> {
            let (rw, rh) = g.resized;
            let pass = |data: &[u8], dw: usize, dh: usize, horizontal: bool| -> (Vec<u8>, usize, usize) {
                let (inn, out) = if horizontal { (dw, rw) } else { (dh, rh) };
                if inn == out {
                    return (data.to_vec(), dw, dh);
                }
                let axis = Axis::new(filter, inn, out, 0..out);
                let (ow, oh) = if horizontal { (out, dh) } else { (dw, out) };
                let mut res = vec![0u8; ow * oh * 3];
                for y in 0..oh {
                    for x in 0..ow {
                        let (first, k) = axis.taps_of(if horizontal { x } else { y });
                        for c in 0..3 {
                            let mut sum = 1i32 << (PRECISION_BITS - 1);
                            for (t, &kt) in k.iter().enumerate() {
                                let (sx, sy) = if horizontal { (first + t, y) } else { (x, first + t) };
                                sum += i32::from(data[(sy * dw + sx) * 3 + c]) * kt;
                            }
                            res[(y * ow + x) * 3 + c] = clip8(sum);
                        }
                    }
                }
                (res, ow, oh)
            };
            let (dw, dh) = (w as i64 - rw as i64, h as i64 - rh as i64);
            let vertical_first = dh > 0 && dh > dw * 2;
            let (a, aw, ah) = pass(src, w, h, !vertical_first);
            let (b, bw, _) = pass(&a, aw, ah, vertical_first);
            let (l, t, cw, ch) = g.crop;
            (t..t + ch).flat_map(|y| b[(y * bw + l) * 3..(y * bw + l + cw) * 3].to_vec()).collect()
        }
        let mut seed = 12345u32;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed >> 24) as u8
                })
                .collect()
        };
        let cases = [
            (97, 61, Geometry::stretch(40, 23)),
            (61, 97, Geometry::stretch(57, 30)),
            (61, 97, Geometry::stretch(61, 31)),
            (33, 45, Geometry::stretch(70, 51)),
            (120, 80, Geometry::center_crop(120, 80, 37, 33).unwrap()),
            (50, 140, Geometry::center_crop(50, 140, 29, 27).unwrap()),
            (7, 9, Geometry::stretch(7, 4)),
            (1, 1, Geometry::stretch(3, 5)),
        ];
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
            let mut r = PillowResizer::new(filter);
            for (w, h, g) in cases {
                let src = noise(w * h * 3);
                let out = resized(&mut r, &src, w, h, g);
                assert_eq!(out, plain(&src, w, h, g, filter), "{filter:?} {w}x{h} {g:?}");
            }
        }
    }

    /// torchvision's geometry: int(short * long / short_in), offsets rounded half to even.
    #[test]
    fn centre_crop_geometry_matches_torchvision() {
        // 256 * 640 / 480 = 341.33 -> 341; (341 - 224) / 2 = 58.5 -> 58; (256 - 224) / 2 = 16.
        assert_eq!(Geometry::center_crop(640, 480, 256, 224).unwrap().crop, (58, 16, 224, 224));
        assert_eq!(Geometry::center_crop(640, 480, 256, 224).unwrap().resized, (341, 256));
        // (227 - 224) / 2 = 1.5 -> 2 (half to even).
        assert_eq!(Geometry::center_crop(227, 1000, 227, 224).unwrap().crop.0, 2);
        // Portrait.
        assert_eq!(Geometry::center_crop(480, 640, 256, 224).unwrap().resized, (256, 341));
        assert!(Geometry::center_crop(640, 480, 200, 224).is_none());
    }
}
