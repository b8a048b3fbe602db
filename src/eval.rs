//! `whaled eval`: measure the pre-filter (and identification, where ids are known) on a labelled set.
//!
//! The manifest is the `../shared/data` CSV format (`relpath,label,individual_id,species,...`, paths
//! relative to the CSV, label `cetacean` or `non_cetacean`). Metrics are pure functions over
//! (score, label) pairs so they are tested on their own; the report is printed as a table or as JSON.
//! Rates are also broken down per category (a `category` column, else the first folder of `relpath`)
//! and per species (the `species` column), because one overall TNR hides which negatives pass.
//! With a multi-class pre-filter (its manifest names the classes) the report adds the confusion between
//! the manifest's categories and what the gate said: its cetacean label for a frame it passed, else the
//! most probable other category.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::identify::{Identifier, Workspace};

/// One labelled image of an evaluation manifest.
#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    pub positive: bool,
    pub individual_id: Option<String>,
    /// The `category` column, else the first folder of `relpath` (`sharks/x.jpg` -> `sharks`).
    pub category: Option<String>,
    /// The `species` column, where present and not empty.
    pub species: Option<String>,
    /// Where the animal is, `[x, y, w, h]` in pixels (columns `x`, `y`, `w`, `h`; a row leaves all four
    /// empty when it has no box).
    pub bbox: Option<[u32; 4]>,
}

/// Reads an evaluation manifest CSV.
pub fn read_manifest(csv_path: &Path) -> Result<Vec<Sample>> {
    let err = |msg: String| Error::Input(format!("{}: {msg}", csv_path.display()));
    let dir = csv_path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::Reader::from_path(csv_path).map_err(|e| err(e.to_string()))?;
    let headers = reader.headers().map_err(|e| err(e.to_string()))?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let (Some(path_col), Some(label_col)) = (col("relpath"), col("label")) else {
        return Err(err(format!("needs columns relpath and label; it has {:?}", headers.iter().collect::<Vec<_>>())));
    };
    let id_col = col("individual_id");
    let (category_col, species_col) = (col("category"), col("species"));
    let box_cols = [col("x"), col("y"), col("w"), col("h")];
    if box_cols.iter().any(Option::is_some) && box_cols.iter().any(Option::is_none) {
        return Err(err("boxes need all four columns x, y, w and h".into()));
    }
    let cell = |row: &csv::StringRecord, c: Option<usize>| {
        c.and_then(|c| row.get(c)).filter(|s| !s.is_empty()).map(str::to_string)
    };
    let mut out = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| err(e.to_string()))?;
        let rel = row.get(path_col).unwrap_or("");
        let positive = match row.get(label_col).unwrap_or("") {
            "cetacean" => true,
            "non_cetacean" => false,
            other => {
                return Err(err(format!("line {line}: label must be `cetacean` or `non_cetacean`, got `{other}`")));
            }
        };
        if rel.is_empty() {
            return Err(err(format!("line {line}: empty relpath")));
        }
        let individual_id = cell(&row, id_col);
        let category = cell(&row, category_col).or_else(|| match rel.split_once('/') {
            Some((first, _)) if !first.is_empty() => Some(first.to_string()),
            _ => None,
        });
        let species = cell(&row, species_col);
        let no_box = box_cols.iter().all(|c| c.and_then(|c| row.get(c)).is_none_or(|t| t.trim().is_empty()));
        let bbox = match box_cols {
            _ if no_box => None,
            [Some(x), Some(y), Some(w), Some(h)] => {
                let mut v = [0u32; 4];
                for (slot, (c, name)) in v.iter_mut().zip([(x, "x"), (y, "y"), (w, "w"), (h, "h")]) {
                    let text = row.get(c).unwrap_or("");
                    *slot = text.trim().parse().map_err(|_| {
                        err(format!("line {line}: {name} must be a whole number of pixels, got `{text}`"))
                    })?;
                }
                if v[2] == 0 || v[3] == 0 {
                    return Err(err(format!("line {line}: an empty box ({}x{})", v[2], v[3])));
                }
                Some(v)
            }
            _ => None,
        };
        out.push(Sample { path: dir.join(rel), positive, individual_id, category, species, bbox });
    }
    if out.is_empty() {
        return Err(err("has no rows".into()));
    }
    Ok(out)
}

/// Confusion-matrix rates at one threshold (`score >= threshold` passes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    pub threshold: f64,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub tpr: f64,
    pub tnr: f64,
    pub precision: f64,
    pub f1: f64,
}

/// Rates of `scored` (score, is_positive) at `threshold`.
pub fn rates(scored: &[(f64, bool)], threshold: f64) -> Rates {
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for &(s, pos) in scored {
        match (s >= threshold, pos) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let tpr = div(tp, tp + fn_);
    let precision = div(tp, tp + fp);
    let f1 = if precision + tpr == 0.0 { 0.0 } else { 2.0 * precision * tpr / (precision + tpr) };
    Rates { threshold, tp, fp, tn, fn_, tpr, tnr: div(tn, tn + fp), precision, f1 }
}

/// ROC AUC: the probability that a random positive scores above a random negative (ties count half).
pub fn roc_auc(scored: &[(f64, bool)]) -> Option<f64> {
    let pos: Vec<f64> = scored.iter().filter(|s| s.1).map(|s| s.0).collect();
    let neg: Vec<f64> = scored.iter().filter(|s| !s.1).map(|s| s.0).collect();
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for p in &pos {
        for n in &neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    Some(wins / (pos.len() * neg.len()) as f64)
}

/// The ROC curve: (FPR, TPR) at every distinct score, from the strictest threshold down.
pub fn roc_curve(scored: &[(f64, bool)]) -> Vec<(f64, f64)> {
    let mut thresholds: Vec<f64> = scored.iter().map(|s| s.0).collect();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    let mut pts = vec![(0.0, 0.0)];
    pts.extend(thresholds.iter().map(|&t| {
        let r = rates(scored, t);
        (1.0 - r.tnr, r.tpr)
    }));
    pts
}

/// Upstream's calibration rule: the smallest threshold (among the observed scores) with
/// TNR >= 0.90 while TPR >= 0.85; `None` if no threshold satisfies both.
pub fn upstream_calibration(scored: &[(f64, bool)]) -> Option<f64> {
    let mut thresholds: Vec<f64> = scored.iter().map(|s| s.0).collect();
    thresholds.sort_by(f64::total_cmp);
    thresholds.dedup();
    thresholds.into_iter().find(|&t| {
        let r = rates(scored, t);
        r.tnr >= 0.90 && r.tpr >= 0.85
    })
}

/// The threshold that maximises min(TPR, TNR), placed halfway (in log space) between the two observed
/// scores that bound it, so it does not sit on a training example.
pub fn balanced_threshold(scored: &[(f64, bool)]) -> Option<f64> {
    let mut s: Vec<f64> = scored.iter().map(|s| s.0).collect();
    s.sort_by(f64::total_cmp);
    s.dedup();
    let mut best: Option<(f64, usize)> = None;
    for (i, &t) in s.iter().enumerate() {
        let r = rates(scored, t);
        let v = r.tpr.min(r.tnr);
        if best.is_none_or(|(b, _)| v > b) {
            best = Some((v, i));
        }
    }
    let (_, i) = best?;
    let hi = s[i];
    let lo = if i == 0 { return Some(hi) } else { s[i - 1] };
    Some(if lo > 0.0 { (lo * hi).sqrt() } else { (lo + hi) / 2.0 })
}

/// The confusion counts of one group of samples (a category or a species) at one threshold; a rate is
/// `None` where the group has no sample of that label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupRates {
    pub name: String,
    pub positives: usize,
    pub negatives: usize,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub tpr: Option<f64>,
    pub tnr: Option<f64>,
}

/// Rates per group at `threshold` (`score >= threshold` passes), groups sorted by name; samples
/// without a group (`None`) are left out.
pub fn group_rates<'a>(
    scored: impl IntoIterator<Item = (f64, bool, Option<&'a str>)>,
    threshold: f64,
) -> Vec<GroupRates> {
    let mut groups: std::collections::BTreeMap<&str, [usize; 4]> = std::collections::BTreeMap::new();
    for (score, positive, group) in scored {
        let Some(g) = group else { continue };
        let c = groups.entry(g).or_default();
        let i = match (score >= threshold, positive) {
            (true, true) => 0,
            (true, false) => 1,
            (false, false) => 2,
            (false, true) => 3,
        };
        c[i] += 1;
    }
    let rate = |a: usize, b: usize| (a + b > 0).then(|| a as f64 / (a + b) as f64);
    groups
        .into_iter()
        .map(|(name, [tp, fp, tn, fn_])| GroupRates {
            name: name.to_string(),
            positives: tp + fn_,
            negatives: tn + fp,
            tp,
            fp,
            tn,
            fn_,
            tpr: rate(tp, fn_),
            tnr: rate(tn, fp),
        })
        .collect()
}

/// Manifest category (rows) against what a multi-class gate said (columns, the model's labels in
/// order: the positive label for a passed frame, else the most probable other category).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Confusion {
    pub columns: Vec<String>,
    /// (manifest category, counts per column), sorted by category.
    pub rows: Vec<(String, Vec<usize>)>,
}

/// Counts (category, predicted label) pairs into a [`Confusion`] over `columns`; samples without a
/// category, or with a label not in `columns`, are left out.
pub fn confusion<'a>(pairs: impl IntoIterator<Item = (Option<&'a str>, &'a str)>, columns: &[String]) -> Confusion {
    let mut rows: std::collections::BTreeMap<&str, Vec<usize>> = std::collections::BTreeMap::new();
    for (category, predicted) in pairs {
        let (Some(c), Some(j)) = (category, columns.iter().position(|l| l == predicted)) else { continue };
        rows.entry(c).or_insert_with(|| vec![0; columns.len()])[j] += 1;
    }
    Confusion { columns: columns.to_vec(), rows: rows.into_iter().map(|(c, v)| (c.to_string(), v)).collect() }
}

impl Confusion {
    /// The confusion as a text table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let width = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max("category \\ gate".len());
        let cols: Vec<usize> = self.columns.iter().map(|c| c.len().max(4)).collect();
        let mut s = format!("{:<width$}", "category \\ gate");
        for (c, w) in self.columns.iter().zip(&cols) {
            let _ = write!(s, " {c:>w$}");
        }
        s.push('\n');
        for (name, counts) in &self.rows {
            let _ = write!(s, "{name:<width$}");
            for (n, w) in counts.iter().zip(&cols) {
                let _ = write!(s, " {n:>w$}");
            }
            s.push('\n');
        }
        s
    }
}

/// One image that could not be scored.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub path: PathBuf,
    pub error: String,
}

/// Identification accuracy over positives with a known individual id (a pre-filter miss counts as wrong).
#[derive(Debug, Clone, Serialize)]
pub struct IdAccuracy {
    pub n: usize,
    pub top1: f64,
    pub top5: f64,
    pub random_weights: bool,
}

/// How well the reported boxes cover the manifest's (samples with a box that could be scored).
#[derive(Debug, Clone, Serialize)]
pub struct Localisation {
    pub n: usize,
    /// Share of boxes the Detection's `bbox` overlaps with IoU >= 0.5.
    pub iou_at_least_half: f64,
    pub median_iou: f64,
}

/// Intersection over union of two `[x, y, w, h]` boxes.
pub fn iou(a: [u32; 4], b: [u32; 4]) -> f64 {
    // In u64: a manifest's x + w may not fit a u32.
    let span = |p0: u32, l0: u32, p1: u32, l1: u32| {
        let end = (u64::from(p0) + u64::from(l0)).min(u64::from(p1) + u64::from(l1));
        end.saturating_sub(u64::from(p0.max(p1))) as f64
    };
    let inter = span(a[0], a[2], b[0], b[2]) * span(a[1], a[3], b[1], b[3]);
    let area = |r: [u32; 4]| f64::from(r[2]) * f64::from(r[3]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

fn localisation(ious: &mut [f64]) -> Option<Localisation> {
    if ious.is_empty() {
        return None;
    }
    ious.sort_by(f64::total_cmp);
    let n = ious.len();
    let median = if n % 2 == 1 { ious[n / 2] } else { (ious[n / 2 - 1] + ious[n / 2]) / 2.0 };
    Some(Localisation {
        n,
        iou_at_least_half: ious.iter().filter(|&&v| v >= 0.5).count() as f64 / n as f64,
        median_iou: median,
    })
}

/// The evaluation report (`--json` prints it as is).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub manifest: PathBuf,
    pub model: String,
    pub variant: String,
    pub backend: String,
    pub random_weights: bool,
    pub positives: usize,
    pub negatives: usize,
    pub at_threshold: Rates,
    pub roc_auc: Option<f64>,
    pub upstream_calibration_threshold: Option<f64>,
    pub at_upstream_calibration: Option<Rates>,
    pub balanced_threshold: Option<f64>,
    pub at_balanced: Option<Rates>,
    /// Per category at the configured threshold.
    pub by_category: Vec<GroupRates>,
    /// Per species at the configured threshold.
    pub by_species: Vec<GroupRates>,
    /// A multi-class pre-filter's confusion between the manifest's categories and what it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion: Option<Confusion>,
    pub identification: Option<IdAccuracy>,
    /// Where the manifest carries boxes: how the Detection's `bbox` overlaps them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub localisation: Option<Localisation>,
    pub failures: Vec<Failure>,
    pub mean_ms_per_image: f64,
    #[serde(skip)]
    pub roc: Vec<(f64, f64)>,
}

/// Scores every sample; `progress` is called after each one.
pub fn evaluate(identifier: &Identifier, csv: &Path, samples: &[Sample], mut progress: impl FnMut()) -> Result<Report> {
    let mut ws: Workspace = identifier.workspace();
    let mut scored = Vec::with_capacity(samples.len());
    let mut scored_samples: Vec<&Sample> = Vec::with_capacity(samples.len());
    // What a multi-class gate said of each scored sample (its labels, at the configured threshold).
    let labels = identifier.prefilter().manifest().output.labels.clone();
    let passed_label = identifier.passed_label().map(str::to_string);
    let mut said: Vec<Option<String>> = Vec::with_capacity(samples.len());
    let mut failures = Vec::new();
    let (mut id_n, mut id_top1, mut id_top5) = (0usize, 0usize, 0usize);
    let mut total_ms = 0.0;
    let mut ious = Vec::new();
    for s in samples {
        let name = s.path.display().to_string();
        let result =
            crate::source::FrameData::read_file(&s.path).and_then(|frame| identifier.assess(&mut ws, &frame, &name));
        progress();
        let a = match result {
            Ok(a) => a,
            Err(e) => {
                failures.push(Failure { path: s.path.clone(), error: e.to_string() });
                continue;
            }
        };
        total_ms += a.timings.total_ms;
        if let Some(want) = s.bbox {
            ious.push(iou(a.bbox(), want));
        }
        scored.push((a.prefilter_score, s.positive));
        scored_samples.push(s);
        // A frame the zero-shot stage rejected first never reached the pre-filter: it said nothing.
        said.push(if !a.prefilter_ran {
            None
        } else if a.prefilter_score >= a.threshold {
            passed_label.clone()
        } else {
            a.prefilter_seen.as_ref().map(|seen| seen.category.clone())
        });
        if let (true, Some(want), true) = (s.positive, &s.individual_id, identifier.has_identification()) {
            id_n += 1;
            if let Some(found) = &a.identified {
                let pos = found.ranked.iter().position(|c| &c.class_animal == want);
                id_top1 += usize::from(pos == Some(0));
                id_top5 += usize::from(pos.is_some_and(|p| p < 5));
            }
        }
    }
    if scored.is_empty() {
        return Err(Error::Input(format!("{}: no image could be scored ({} failures)", csv.display(), failures.len())));
    }
    let m = identifier.prefilter();
    let upstream = upstream_calibration(&scored);
    let balanced = balanced_threshold(&scored);
    let threshold = identifier.threshold();
    let by = |key: fn(&Sample) -> Option<&str>| {
        group_rates(scored.iter().zip(&scored_samples).map(|(&(score, pos), s)| (score, pos, key(s))), threshold)
    };
    Ok(Report {
        manifest: csv.to_path_buf(),
        model: m.manifest().name.clone(),
        variant: m.variant().name.clone(),
        backend: m.backend_kind().name().to_string(),
        random_weights: m.manifest().random_weights,
        positives: scored.iter().filter(|s| s.1).count(),
        negatives: scored.iter().filter(|s| !s.1).count(),
        at_threshold: rates(&scored, threshold),
        roc_auc: roc_auc(&scored),
        upstream_calibration_threshold: upstream,
        at_upstream_calibration: upstream.map(|t| rates(&scored, t)),
        balanced_threshold: balanced,
        at_balanced: balanced.map(|t| rates(&scored, t)),
        by_category: by(|s| s.category.as_deref()),
        by_species: by(|s| s.species.as_deref()),
        confusion: labels.map(|columns| {
            let pairs =
                scored_samples.iter().zip(&said).filter_map(|(s, p)| p.as_deref().map(|p| (s.category.as_deref(), p)));
            confusion(pairs, &columns)
        }),
        identification: (id_n > 0).then(|| IdAccuracy {
            n: id_n,
            top1: id_top1 as f64 / id_n as f64,
            top5: id_top5 as f64 / id_n as f64,
            random_weights: identifier.identification_random_weights(),
        }),
        localisation: localisation(&mut ious),
        failures,
        mean_ms_per_image: total_ms / scored.len() as f64,
        roc: roc_curve(&scored),
    })
}

/// Per-group table: counts, confusion and the rates that apply (`-` where a group has no such sample).
fn group_table(title: &str, threshold: f64, groups: &[GroupRates]) -> String {
    use std::fmt::Write;
    let width = groups.iter().map(|g| g.name.len()).max().unwrap_or(0).max(title.len() + 4);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<width$} {:>4} {:>4}   {:>3} {:>3} {:>3} {:>3} {:>6} {:>6}   (threshold {threshold:.4})",
        format!("per {title}"),
        "pos",
        "neg",
        "TP",
        "FP",
        "TN",
        "FN",
        "TPR",
        "TNR"
    );
    let fmt = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
    for g in groups {
        let _ = writeln!(
            s,
            "{:<width$} {:>4} {:>4}   {:>3} {:>3} {:>3} {:>3} {:>6} {:>6}",
            g.name,
            g.positives,
            g.negatives,
            g.tp,
            g.fp,
            g.tn,
            g.fn_,
            fmt(g.tpr),
            fmt(g.tnr)
        );
    }
    s
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "pre-filter {} ({}, {}){} on {}",
            self.model,
            self.variant,
            self.backend,
            if self.random_weights { " -- RANDOM WEIGHTS" } else { "" },
            self.manifest.display()
        );
        let _ = writeln!(
            s,
            "{} positives, {} negatives, {} unreadable; {:.1} ms/image\n",
            self.positives,
            self.negatives,
            self.failures.len(),
            self.mean_ms_per_image
        );
        let _ = writeln!(
            s,
            "{:<26} {:>9} {:>6} {:>6} {:>9} {:>6}   {:>3} {:>3} {:>3} {:>3}",
            "", "threshold", "TPR", "TNR", "precision", "F1", "TP", "FP", "TN", "FN"
        );
        let mut row = |name: &str, r: &Rates| {
            let _ = writeln!(
                s,
                "{:<26} {:>9.4} {:>6.3} {:>6.3} {:>9.3} {:>6.3}   {:>3} {:>3} {:>3} {:>3}",
                name, r.threshold, r.tpr, r.tnr, r.precision, r.f1, r.tp, r.fp, r.tn, r.fn_
            );
        };
        row("configured threshold", &self.at_threshold);
        if let Some(r) = &self.at_upstream_calibration {
            row("upstream calibration rule", r);
        }
        if let Some(r) = &self.at_balanced {
            row("balanced (max min TPR,TNR)", r);
        }
        let _ = writeln!(s);
        match self.roc_auc {
            Some(a) => {
                let _ = writeln!(s, "ROC AUC {a:.4}");
            }
            None => {
                let _ = writeln!(s, "ROC AUC n/a (needs positives and negatives)");
            }
        }
        if self.upstream_calibration_threshold.is_none() {
            let _ = writeln!(s, "upstream calibration rule (TNR >= 0.90 with TPR >= 0.85): no threshold qualifies");
        }
        for (title, groups) in [("category", &self.by_category), ("species", &self.by_species)] {
            if !groups.is_empty() {
                let _ = writeln!(s);
                s.push_str(&group_table(title, self.at_threshold.threshold, groups));
            }
        }
        if let Some(c) = &self.confusion {
            let _ = writeln!(s, "\nconfusion: manifest category (rows) vs what the gate said (columns)");
            s.push_str(&c.table());
        }
        if let Some(id) = &self.identification {
            let _ = writeln!(
                s,
                "identification: top-1 {:.3}, top-5 {:.3} over {} positives with known ids{}",
                id.top1,
                id.top5,
                id.n,
                if id.random_weights { " (RANDOM WEIGHTS: expect ~0)" } else { "" }
            );
        }
        if let Some(l) = &self.localisation {
            let _ = writeln!(
                s,
                "localisation: the Detection's bbox against {} boxes: IoU >= 0.5 on {:.1} %, median IoU {:.3}",
                l.n,
                100.0 * l.iou_at_least_half,
                l.median_iou
            );
        }
        for f in &self.failures {
            let _ = writeln!(s, "unreadable: {}: {}", f.path.display(), f.error);
        }
        s
    }

    /// The ROC curve as a small standalone SVG.
    pub fn roc_svg(&self) -> String {
        let pts: Vec<String> =
            self.roc.iter().map(|(x, y)| format!("{:.1},{:.1}", 40.0 + x * 300.0, 330.0 - y * 300.0)).collect();
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="360" height="370" font-family="sans-serif" font-size="12">
<rect x="40" y="30" width="300" height="300" fill="none" stroke="#888"/>
<line x1="40" y1="330" x2="340" y2="30" stroke="#ccc" stroke-dasharray="4"/>
<polyline points="{}" fill="none" stroke="#1565c0" stroke-width="2"/>
<text x="190" y="362" text-anchor="middle">false positive rate</text>
<text x="12" y="180" transform="rotate(-90 12 180)" text-anchor="middle">true positive rate</text>
<text x="190" y="20" text-anchor="middle">{} ROC (AUC {})</text>
</svg>
"##,
            pts.join(" "),
            self.model,
            self.roc_auc.map_or("n/a".into(), |a| format!("{a:.4}"))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Vec<(f64, bool)> {
        // 4 positives, 4 negatives; one negative outscores one positive.
        vec![
            (0.9, true),
            (0.8, true),
            (0.3, true),
            (0.6, true),
            (0.1, false),
            (0.2, false),
            (0.4, false),
            (0.05, false),
        ]
    }

    #[test]
    fn rates_at_threshold() {
        let r = rates(&set(), 0.35);
        assert_eq!((r.tp, r.fp, r.tn, r.fn_), (3, 1, 3, 1));
        assert_eq!((r.tpr, r.tnr, r.precision), (0.75, 0.75, 0.75));
        assert!((r.f1 - 0.75).abs() < 1e-12);
    }

    #[test]
    fn auc_counts_pairs() {
        // 16 pairs; only (0.3 pos, 0.4 neg) is misordered.
        assert_eq!(roc_auc(&set()), Some(15.0 / 16.0));
        assert_eq!(roc_auc(&[(0.5, true), (0.5, false)]), Some(0.5));
        assert_eq!(roc_auc(&[(0.5, true)]), None);
    }

    #[test]
    fn upstream_rule_picks_smallest_qualifying_threshold() {
        // Thresholds ascending: 0.05 (TNR 0) ... 0.3 (TPR 1, TNR .75) ... 0.6 (TPR .75, TNR 1) qualifies first? no:
        // TPR >= .85 needs all 4 positives (t <= 0.3), where TNR <= .75 -> nothing qualifies.
        assert_eq!(upstream_calibration(&set()), None);
        let easy = vec![(0.9, true), (0.7, true), (0.2, false), (0.1, false)];
        // t = 0.7 is the first with TNR 1.0 and TPR 1.0.
        assert_eq!(upstream_calibration(&easy), Some(0.7));
    }

    #[test]
    fn balanced_threshold_sits_between_scores() {
        let easy = vec![(0.9, true), (0.4, true), (0.1, false), (0.2, false)];
        let t = balanced_threshold(&easy).unwrap();
        assert!((t - (0.2f64 * 0.4).sqrt()).abs() < 1e-12, "{t}");
        let r = rates(&easy, t);
        assert_eq!((r.tpr, r.tnr), (1.0, 1.0));
    }

    /// Each case: manifest CSV text, then per row the expected (category, species).
    #[test]
    fn manifest_categories_and_species() {
        type Want = &'static [(Option<&'static str>, Option<&'static str>)];
        let cases: &[(&str, Want)] = &[
            (
                // No category column: the first folder of relpath; a file at the top level has none.
                "relpath,label,individual_id,species\n\
                 sharks/a.jpg,non_cetacean,,great_white_shark\n\
                 positives/b.jpg,cetacean,abc,beluga\n\
                 c.jpg,non_cetacean,,\n",
                &[(Some("sharks"), Some("great_white_shark")), (Some("positives"), Some("beluga")), (None, None)],
            ),
            (
                // A category column wins over the folder; an empty cell falls back to the folder.
                "relpath,label,category\n\
                 x/a.jpg,non_cetacean,boats\n\
                 x/b.jpg,cetacean,\n",
                &[(Some("boats"), None), (Some("x"), None)],
            ),
        ];
        for (csv_text, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("manifest.csv");
            std::fs::write(&path, csv_text).unwrap();
            let samples = read_manifest(&path).unwrap();
            let got: Vec<_> = samples.iter().map(|s| (s.category.as_deref(), s.species.as_deref())).collect();
            assert_eq!(&got, want, "{csv_text}");
        }
    }

    /// (score, positive, group) rows -> per-group (name, tp, fp, tn, fn, tpr, tnr) at threshold 0.5.
    /// Worked examples, computed by hand.
    #[test]
    fn iou_and_boxes_in_manifests() {
        assert_eq!(iou([0, 0, 10, 10], [0, 0, 10, 10]), 1.0);
        assert_eq!(iou([0, 0, 10, 10], [10, 0, 10, 10]), 0.0, "touching edges share nothing");
        assert!((iou([0, 0, 10, 10], [5, 0, 10, 10]) - 50.0 / 150.0).abs() < 1e-12);
        assert!((iou([0, 0, 100, 50], [20, 10, 30, 20]) - 600.0 / 5000.0).abs() < 1e-12, "one inside the other");
        assert_eq!(iou([u32::MAX, 0, u32::MAX, 10], [0, 0, 10, 10]), 0.0, "no overflow on hostile boxes");
        let l = localisation(&mut [0.9, 0.2, 0.5, 0.4]).unwrap();
        assert_eq!((l.n, l.iou_at_least_half, l.median_iou), (4, 0.5, 0.45));
        assert!(localisation(&mut []).is_none());

        let dir = tempfile::tempdir().unwrap();
        let read = |text: &str| {
            let p = dir.path().join("m.csv");
            std::fs::write(&p, text).unwrap();
            read_manifest(&p)
        };
        let s = read("relpath,label,x,y,w,h\na.jpg,cetacean,1,2,30,40\nb.jpg,non_cetacean,,,,\n");
        let s = s.unwrap();
        assert_eq!((s[0].bbox, s[1].bbox), (Some([1, 2, 30, 40]), None), "a row without a box has none");
        for (text, want) in [
            ("relpath,label,x,y,w\na.jpg,cetacean,1,2,3\n", "boxes need all four columns x, y, w and h"),
            (
                "relpath,label,x,y,w,h\na.jpg,cetacean,1,2,-3,4\n",
                "line 2: w must be a whole number of pixels, got `-3`",
            ),
            ("relpath,label,x,y,w,h\na.jpg,cetacean,1,2,0,4\n", "line 2: an empty box (0x4)"),
        ] {
            let e = read(text).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn group_rates_per_group() {
        let rows = [
            (0.9, true, Some("positives")),
            (0.2, true, Some("positives")),
            (0.6, false, Some("sharks")),
            (0.1, false, Some("sharks")),
            (0.3, false, Some("sharks")),
            (0.5, false, Some("boats")), // exactly at the threshold: passes
            (0.9, true, None),           // no group: left out
        ];
        type Row<'a> = (&'a str, usize, usize, usize, usize, Option<f64>, Option<f64>);
        let want: &[Row] = &[
            ("boats", 0, 1, 0, 0, None, Some(0.0)),
            ("positives", 1, 0, 0, 1, Some(0.5), None),
            ("sharks", 0, 1, 2, 0, None, Some(2.0 / 3.0)),
        ];
        let groups = group_rates(rows, 0.5);
        let got: Vec<Row> = groups.iter().map(|g| (g.name.as_str(), g.tp, g.fp, g.tn, g.fn_, g.tpr, g.tnr)).collect();
        assert_eq!(got, want);
        let g = &group_rates(rows, 0.5)[2];
        assert_eq!((g.positives, g.negatives), (0, 3));
        let table = group_table("category", 0.5, &group_rates(rows, 0.5));
        assert!(table.lines().nth(3).unwrap().ends_with("-  0.667"), "{table}");
        let json = serde_json::to_value(&group_rates(rows, 0.5)[1]).unwrap();
        assert_eq!(json["fn"], 1);
        assert_eq!(json["tnr"], serde_json::Value::Null);
    }

    #[test]
    fn confusion_counts_category_against_label() {
        let cols: Vec<String> = ["cetacean", "seabird", "ocean"].iter().map(|s| s.to_string()).collect();
        let pairs = [
            (Some("positives"), "cetacean"),
            (Some("positives"), "ocean"),
            (Some("seabirds"), "seabird"),
            (Some("seabirds"), "seabird"),
            (Some("seabirds"), "cetacean"),
            (None, "ocean"),
            (Some("boats"), "boat"),
        ];
        let c = confusion(pairs, &cols);
        assert_eq!(c.rows, vec![("positives".to_string(), vec![1, 0, 1]), ("seabirds".to_string(), vec![1, 2, 0])]);
        let t = c.table();
        assert!(t.contains("cetacean seabird ocean"), "{t}");
        assert!(t.lines().nth(2).is_some_and(|l| l.starts_with("seabirds")), "{t}");
    }

    #[test]
    fn roc_curve_runs_from_origin_to_corner() {
        let c = roc_curve(&set());
        assert_eq!(c.first(), Some(&(0.0, 0.0)));
        assert_eq!(c.last(), Some(&(1.0, 1.0)));
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
