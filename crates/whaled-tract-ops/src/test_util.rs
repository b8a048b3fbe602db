//! What the ops' unit tests share: a seeded generator of inputs in [-1, 1) and the comparison.

/// A linear congruential generator: the same values on every target, no dependency.
pub(crate) fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}

/// The largest |a - b|; NaN counts as the largest difference (f32::max would skip it).
pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
}
