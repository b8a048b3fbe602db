//! Validated scalar types shared by the config file and the model manifests.
//!
//! Each type checks its invariant inside `Deserialize`, so a bad value is reported by the TOML parser
//! with the file's line, column and the offending key, and code downstream never re-checks it.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A number in [0, 1]: thresholds and confidences.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Probability(f64);

impl Probability {
    /// `None` when `v` is outside [0, 1] or NaN.
    pub fn new(v: f64) -> Option<Self> {
        (0.0..=1.0).contains(&v).then_some(Probability(v))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Probability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

struct NumberVisitor(&'static str);

impl Visitor<'_> for NumberVisitor {
    type Value = f64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }
}

impl<'de> Deserialize<'de> for Probability {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const WHAT: &str = "a probability between 0 and 1";
        let v = d.deserialize_any(NumberVisitor(WHAT))?;
        Probability::new(v).ok_or_else(|| de::Error::custom(format!("expected {WHAT}, got {v}")))
    }
}

/// A finite number greater than zero: scales, standard deviations, crop fractions.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Positive(f64);

impl Positive {
    pub fn new(v: f64) -> Option<Self> {
        (v.is_finite() && v > 0.0).then_some(Positive(v))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const WHAT: &str = "a finite number greater than 0";
        let v = d.deserialize_any(NumberVisitor(WHAT))?;
        Positive::new(v).ok_or_else(|| de::Error::custom(format!("expected {WHAT}, got {v}")))
    }
}

/// A whole number of at least 1: thread counts, top-k, dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Count(usize);

impl Count {
    pub fn new(v: usize) -> Option<Self> {
        (v >= 1).then_some(Count(v))
    }

    pub fn get(self) -> usize {
        self.0
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        match usize::try_from(v).ok().and_then(Count::new) {
            Some(c) => Ok(c),
            // Positive, yet no usize: beyond this target's word size (armv7: 32 bits).
            None if v > 0 => {
                Err(de::Error::custom(format!("{v} is more than this machine can count (at most {})", usize::MAX)))
            }
            None => Err(de::Error::custom(format!("expected a whole number of at least 1, got {v}"))),
        }
    }
}

/// A positive duration written for humans: "250ms", "5s", "1m 30s".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interval(std::time::Duration);

impl Interval {
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match humantime::parse_duration(&s) {
            Ok(v) if !v.is_zero() => Ok(Interval(v)),
            Ok(_) => Err(de::Error::custom(format!("expected a duration greater than 0, got \"{s}\""))),
            Err(e) => Err(de::Error::custom(format!(
                "expected a duration such as \"500ms\", \"30s\" or \"5m\", got \"{s}\" ({e})"
            ))),
        }
    }
}

/// Locates a byte offset of a TOML source as `line:column` (1-based), for errors found after parsing.
pub(crate) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)] // only deserialised: the test is whether parsing succeeds
    struct T {
        p: Option<Probability>,
        s: Option<Positive>,
        c: Option<Count>,
        d: Option<Interval>,
    }

    #[test]
    fn values_accept_and_reject() {
        let cases: &[(&str, Option<&str>)] = &[
            ("p = 0.5", None),
            ("p = 1", None),
            ("p = 0", None),
            ("p = 1.5", Some("expected a probability between 0 and 1, got 1.5")),
            ("p = -0.1", Some("expected a probability between 0 and 1, got -0.1")),
            ("p = nan", Some("expected a probability between 0 and 1, got NaN")),
            ("p = \"0.5\"", Some("a probability between 0 and 1")),
            ("s = 30", None),
            ("s = 0", Some("expected a finite number greater than 0, got 0")),
            ("s = inf", Some("expected a finite number greater than 0, got inf")),
            ("c = 5", None),
            ("c = 0", Some("expected a whole number of at least 1, got 0")),
            ("c = -3", Some("expected a whole number of at least 1, got -3")),
            ("d = \"1m 30s\"", None),
            ("d = \"250ms\"", None),
            ("d = \"0s\"", Some("expected a duration greater than 0")),
            ("d = \"5 parsecs\"", Some("expected a duration such as \"500ms\"")),
            ("d = 5", Some("invalid type: integer `5`, expected a string")),
        ];
        for (src, want) in cases {
            let got = toml::from_str::<T>(src);
            match (want, got) {
                (None, Ok(_)) => {}
                (Some(w), Err(e)) => assert!(e.to_string().contains(w), "{src}: {e}"),
                (w, g) => panic!("{src}: wanted error {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 11), (2, 6));
    }
}
