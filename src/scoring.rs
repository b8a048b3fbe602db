//! The upstream scoring rules, as pure functions: pre-filter score, ArcFace softmax top-k, the
//! low-confidence rule and 4-decimal rounding. No I/O, no models: what the upstream Python service
//! computes from the same numbers, so a unit test can pin it against a worked example.

use crate::manifest::OutputKind;

/// One ranked identification candidate: an active head slot and its softmax probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    pub slot: usize,
    pub probability: f64,
}

/// Softmax of `values` (in f64, max-subtracted for stability).
pub fn softmax(values: impl Iterator<Item = f64> + Clone) -> Vec<f64> {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = values.map(|v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Class probabilities of a classifier's output (softmax first if the model emits logits).
pub fn probabilities(output: &[f32], kind: OutputKind) -> Vec<f64> {
    match kind {
        OutputKind::Logits { .. } => softmax(output.iter().map(|&v| f64::from(v))),
        OutputKind::Probabilities { .. } | OutputKind::Embedding { .. } | OutputKind::FeatureMap { .. } => {
            output.iter().map(|&v| f64::from(v)).collect()
        }
    }
}

/// Pre-filter score: the probability mass of the positive classes (softmax first if the model emits logits).
pub fn prefilter_score(output: &[f32], kind: OutputKind, positive_classes: &[usize]) -> f64 {
    let probs = probabilities(output, kind);
    positive_classes.iter().filter_map(|&c| probs.get(c)).sum()
}

/// The most probable class that is not a positive one, with its probability (what a multi-class
/// pre-filter saw instead of a cetacean); `None` when every class is positive. Ties: lower class first.
pub fn top_negative_class(output: &[f32], kind: OutputKind, positive_classes: &[usize]) -> Option<(usize, f64)> {
    probabilities(output, kind).into_iter().enumerate().filter(|(c, _)| !positive_classes.contains(c)).fold(
        None,
        |best: Option<(usize, f64)>, (c, p)| match best {
            Some((_, bp)) if bp >= p => best,
            _ => Some((c, p)),
        },
    )
}

/// Upstream identification: softmax(scale x cosine) over the active slots, the `k` most probable first
/// (ties: lower slot first).
pub fn rank(cosines: &[f32], scale: f64, k: usize) -> Vec<Ranked> {
    let probs = softmax(cosines.iter().map(|&c| scale * f64::from(c)));
    let mut order: Vec<usize> = (0..probs.len()).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    let by_prob = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    order.select_nth_unstable_by(k - 1, by_prob);
    order.truncate(k);
    order.sort_by(by_prob);
    order.into_iter().map(|slot| Ranked { slot, probability: probs[slot] }).collect()
}

/// The upstream zero-shot (CLIP) gate score: with the image embedding and every text row L2-normalised,
/// softmax over all prompts of `scale` x cosine, summed over the first `positives` prompts. `text` is
/// `prompts x image.len()`, rows already L2-normalised.
pub fn zero_shot_score(image: &[f32], text: &[f32], positives: usize, scale: f64) -> f64 {
    let dim = image.len();
    if dim == 0 {
        return 0.0;
    }
    let norm = image.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return 0.0;
    }
    let cos = text
        .chunks_exact(dim)
        .map(|row| row.iter().zip(image).map(|(&t, &x)| f64::from(t) * f64::from(x)).sum::<f64>() / norm * scale);
    softmax(cos).iter().take(positives).sum()
}

/// L2-normalises `v` in place (a zero vector stays zero).
pub fn l2_normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Python's `round(x, 4)`: correctly rounded on the exact binary value, ties to even.
pub fn round4(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.4}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worked example computed independently with numpy:
    /// cos = [0.62, 0.55, 0.10, -0.20, 0.58, 0.30], z = 30*cos, p = exp(z - max) / sum.
    #[test]
    fn rank_matches_numpy_worked_example() {
        let cos = [0.62f32, 0.55, 0.10, -0.20, 0.58, 0.30];
        let top = rank(&cos, 30.0, 5);
        let want = [
            (0, 0.7023860223412006),
            (4, 0.2115546044572037),
            (1, 0.08601168355072246),
            (5, 4.757171782200611e-05),
            (2, 1.1791849909905544e-07),
        ];
        assert_eq!(top.len(), 5);
        for (got, (slot, p)) in top.iter().zip(want) {
            assert_eq!(got.slot, slot);
            // f32 cosines carry ~1e-8 relative error into z = 30 * cos.
            assert!((got.probability - p).abs() < 1e-6 * p.max(1e-3), "slot {slot}: {} vs {p}", got.probability);
        }
        let rounded: Vec<f64> = top.iter().map(|r| round4(r.probability)).collect();
        assert_eq!(rounded, vec![0.7024, 0.2116, 0.086, 0.0, 0.0]);
    }

    #[test]
    fn rank_handles_short_and_tied_inputs() {
        assert!(rank(&[], 30.0, 5).is_empty());
        let r = rank(&[0.5, 0.5, 0.1], 30.0, 5);
        assert_eq!(r.iter().map(|r| r.slot).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    /// numpy: softmax([2, .5, -1, 3, 0])[[1, 3]].sum() = 0.7128044373566016.
    #[test]
    fn prefilter_score_sums_positive_classes() {
        let logits = [2.0f32, 0.5, -1.0, 3.0, 0.0];
        let s = prefilter_score(&logits, OutputKind::Logits { classes: 5 }, &[1, 3]);
        assert!((s - 0.7128044373566016).abs() < 1e-12, "{s}");
        let probs = [0.1f32, 0.2, 0.7];
        let s = prefilter_score(&probs, OutputKind::Probabilities { classes: 3 }, &[0, 2]);
        assert!((s - 0.8).abs() < 1e-6);
    }

    /// The best class outside the positives: class 0 of the logits above (numpy 0.24233410352490534); none
    /// when every class is positive; a tie goes to the lower class.
    #[test]
    fn top_negative_class_is_the_best_non_positive() {
        let logits = [2.0f32, 0.5, -1.0, 3.0, 0.0];
        let (c, p) = top_negative_class(&logits, OutputKind::Logits { classes: 5 }, &[1, 3]).unwrap();
        assert_eq!(c, 0);
        assert!((p - 0.24233410352490534).abs() < 1e-12, "{p}");
        assert_eq!(top_negative_class(&[0.5, 0.5], OutputKind::Probabilities { classes: 2 }, &[0, 1]), None);
        let tie = top_negative_class(&[0.2, 0.4, 0.4], OutputKind::Probabilities { classes: 3 }, &[0]).unwrap();
        assert_eq!(tie.0, 1);
    }

    /// The upstream CLIP gate rule on known vectors; expected values from numpy in float64:
    /// i = img/|img|, t = T/|T| per row, p = softmax(scale * t @ i), score = p[:positives].sum().
    #[test]
    fn zero_shot_score_matches_numpy() {
        let img = [0.3f32, -1.2, 0.8, 2.0];
        let raw: [[f32; 4]; 5] = [
            [1.0, 0.0, 0.0, 1.0],
            [0.5, -2.0, 0.0, 1.0],
            [0.0, 0.0, 1.0, 0.0],
            [-1.0, 1.0, 0.0, 0.0],
            [0.2, 0.1, -0.3, 0.9],
        ];
        let text: Vec<f32> = raw
            .iter()
            .flat_map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                r.map(|v| v / n)
            })
            .collect();
        for (positives, scale, want) in
            [(2, 100.0, 0.9999999845877949), (2, 10.0, 0.8765633518699008), (3, 1.0, 0.6877199383907927)]
        {
            let got = zero_shot_score(&img, &text, positives, scale);
            assert!((got - want).abs() < 1e-6, "positives {positives}, scale {scale}: {got} vs {want}");
        }
        // Nearly equal cosines (0.9847, 0.9847, 0.9918, 0.9928, 0.9526): the scale decides (numpy, float64).
        let img_b = [1.0f32, 1.0, 0.0, -0.5];
        let raw_b: [[f32; 4]; 5] = [
            [3.0, 2.5, 0.5, -1.0],
            [1.0, 1.2, -0.2, -0.4],
            [0.9, 1.1, 0.1, -0.6],
            [2.0, 2.0, 0.3, -0.8],
            [0.5, 0.4, 0.2, -0.3],
        ];
        let text_b: Vec<f32> = raw_b
            .iter()
            .flat_map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                r.map(|v| v / n)
            })
            .collect();
        for (scale, want) in [(10.0, 0.409630288126218), (100.0, 0.316914959243628)] {
            let got = zero_shot_score(&img_b, &text_b, 2, scale);
            assert!((got - want).abs() < 1e-5, "case B, scale {scale}: {got} vs {want}");
        }
        // The image embedding's own norm does not matter; a zero embedding scores 0.
        let scaled: Vec<f32> = img.iter().map(|v| v * 7.5).collect();
        assert!((zero_shot_score(&scaled, &text, 2, 10.0) - 0.8765633518699008).abs() < 1e-6);
        assert_eq!(zero_shot_score(&[0.0; 4], &text, 2, 10.0), 0.0);
    }

    /// Expected values are Python's own `round(x, 4)` outputs.
    #[test]
    fn round4_matches_python() {
        let cases = [
            (0.00005, 0.0001),
            (0.00015, 0.0001),
            (0.12345, 0.1235),
            (0.123456, 0.1235),
            (2.675e-4, 0.0003),
            (0.99995, 1.0),
            (0.5, 0.5),
            (0.0, 0.0),
        ];
        for (x, want) in cases {
            assert_eq!(round4(x), want, "round4({x})");
        }
    }
}
