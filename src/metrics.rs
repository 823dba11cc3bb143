//! Multi-label metrics (docs/MODEL.md#metrics), in percent, on probabilities (sigmoid of the
//! logits).
//!
//! - AP per class, VOC all-point: precision made monotone from the right, summed over recall
//!   steps; and the non-interpolated AP (sum of recall step x precision, which is the mean of
//!   the precision at each positive when scores have no ties, and equals scikit-learn's
//!   `average_precision_score` in every case). Tied scores form one step of the curve (a
//!   threshold cannot split them), so the result never depends on the input order.
//!   mAP is the mean over classes with at least one positive.
//! - At a threshold (positive when `score >= threshold`): per class Ng positives, Np predicted,
//!   Nc correct. CP = mean over all classes of Nc/Np (Np = 0 counts 0), CR = mean of Nc/Ng over
//!   classes with Ng > 0, OP = sum Nc / sum Np, OR = sum Nc / sum Ng, F1 the harmonic means.
//!   Every zero denominator gives 0, never NaN.
//! - Top-3 variants: an image predicts a class when the class is among its 3 highest scores
//!   (ties to the lower index) and also reaches the threshold, as ML-GCN's evaluation code does.
//!
//! NaN scores (a diverged model) rank below every number and are never predicted positive.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::io::{read_matrix, InputError, Values};

/// Precision, recall and F1 in percent.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl Prf {
    /// From fractions in [0, 1]; F1 of two zeros is 0.
    fn from_fractions(p: f64, r: f64) -> Self {
        Self {
            precision: 100.0 * p,
            recall: 100.0 * r,
            f1: 100.0 * ratio(2.0 * p * r, p + r),
        }
    }
}

/// Everything `evaluate` measures. Percent throughout.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// VOC all-point mAP over classes with positives.
    pub map: f64,
    /// Non-interpolated mAP over classes with positives.
    pub map_noninterp: f64,
    /// CP, CR, CF1 at the threshold.
    pub class: Prf,
    /// OP, OR, OF1 at the threshold.
    pub overall: Prf,
    pub top3_class: Prf,
    pub top3_overall: Prf,
    /// VOC all-point AP per class; None when the class has no positives.
    pub ap: Vec<Option<f64>>,
    /// Non-interpolated AP per class; None when the class has no positives.
    pub ap_noninterp: Vec<Option<f64>>,
    pub n_images: usize,
    pub n_classes: usize,
    pub threshold: f32,
    /// Row indices (0-based) of images without any positive label.
    pub images_without_labels: Vec<usize>,
    /// Class indices never predicted at the threshold (they count 0 in CP).
    pub classes_never_predicted: Vec<usize>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

/// NaN ranks below everything.
fn rank_key(s: f64) -> f64 {
    if s.is_nan() {
        f64::NEG_INFINITY
    } else {
        s
    }
}

/// (VOC all-point AP, non-interpolated AP) of one class as fractions in [0, 1], or None when no
/// element is positive. `scores` and `positive` have one entry per image.
pub fn average_precision(scores: &[f64], positive: &[bool]) -> Option<(f64, f64)> {
    assert_eq!(scores.len(), positive.len(), "average_precision: lengths differ");
    let npos = positive.iter().filter(|&&p| p).count();
    if npos == 0 {
        return None;
    }
    let mut order: Vec<(f64, bool)> = scores.iter().map(|&s| rank_key(s)).zip(positive.iter().copied()).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    // One (recall, precision) point per distinct score, after all items with that score.
    let mut points: Vec<(f64, f64)> = Vec::new();
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let s = order[i].0;
        while i < order.len() && order[i].0 == s {
            if order[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        points.push((tp as f64 / npos as f64, tp as f64 / (tp + fp) as f64));
    }
    let mut noninterp = 0.0;
    let mut prev_r = 0.0;
    for &(r, p) in &points {
        noninterp += (r - prev_r) * p;
        prev_r = r;
    }
    // Precision made monotone from the right: the best precision at any recall >= r.
    let mut voc = 0.0;
    let mut best = 0.0f64;
    for j in (0..points.len()).rev() {
        best = best.max(points[j].1);
        let r_before = if j == 0 { 0.0 } else { points[j - 1].0 };
        voc += (points[j].0 - r_before) * best;
    }
    Some((voc, noninterp))
}

/// Per-class counts at a threshold: (Ng, Np, Nc).
struct Counts {
    ng: Vec<u64>,
    np: Vec<u64>,
    nc: Vec<u64>,
}

impl Counts {
    fn new(k: usize) -> Self {
        Self {
            ng: vec![0; k],
            np: vec![0; k],
            nc: vec![0; k],
        }
    }

    /// (class-averaged, overall) precision/recall/F1.
    fn prf(&self) -> (Prf, Prf) {
        let k = self.ng.len();
        let cp = ratio((0..k).map(|j| ratio(self.nc[j] as f64, self.np[j] as f64)).sum(), k as f64);
        let with_pos: Vec<usize> = (0..k).filter(|&j| self.ng[j] > 0).collect();
        let cr = ratio(
            with_pos.iter().map(|&j| self.nc[j] as f64 / self.ng[j] as f64).sum(),
            with_pos.len() as f64,
        );
        let (snc, snp, sng) = (sum(&self.nc), sum(&self.np), sum(&self.ng));
        (Prf::from_fractions(cp, cr), Prf::from_fractions(ratio(snc, snp), ratio(snc, sng)))
    }
}

fn sum(v: &[u64]) -> f64 {
    v.iter().sum::<u64>() as f64
}

fn mean_some(v: &[Option<f64>]) -> f64 {
    let present: Vec<f64> = v.iter().flatten().copied().collect();
    ratio(present.iter().sum(), present.len() as f64)
}

/// Computes every metric of docs/MODEL.md#metrics. `scores` are probabilities and `targets`
/// 0/1 (a value above 0.5 counts as positive), both row-major `n x k`. Panics if the lengths
/// are not `n*k` (callers check shapes; the CLI reports them as errors).
pub fn evaluate(scores: &[f32], targets: &[f32], n: usize, k: usize, threshold: f32) -> Metrics {
    assert_eq!(scores.len(), n * k, "evaluate: scores length is not n*k");
    assert_eq!(targets.len(), n * k, "evaluate: targets length is not n*k");
    let pos = |i: usize, j: usize| targets[i * k + j] > 0.5;

    let aps: Vec<Option<(f64, f64)>> = (0..k)
        .into_par_iter()
        .map(|j| {
            let col: Vec<f64> = (0..n).map(|i| scores[i * k + j] as f64).collect();
            let lab: Vec<bool> = (0..n).map(|i| pos(i, j)).collect();
            average_precision(&col, &lab)
        })
        .collect();
    let ap: Vec<Option<f64>> = aps.iter().map(|a| a.map(|(v, _)| 100.0 * v)).collect();
    let ap_noninterp: Vec<Option<f64>> = aps.iter().map(|a| a.map(|(_, v)| 100.0 * v)).collect();

    let mut all = Counts::new(k);
    let mut top = Counts::new(k);
    let mut images_without_labels = Vec::new();
    let mut order: Vec<usize> = Vec::with_capacity(k);
    for i in 0..n {
        let row = &scores[i * k..(i + 1) * k];
        order.clear();
        order.extend(0..k);
        // Stable sort: equal scores keep the lower class index first.
        order.sort_by(|&a, &b| rank_key(row[b] as f64).total_cmp(&rank_key(row[a] as f64)));
        let mut top3 = [usize::MAX; 3];
        for (slot, &j) in top3.iter_mut().zip(&order) {
            *slot = j;
        }
        let mut any = false;
        for (j, &score) in row.iter().enumerate() {
            let g = pos(i, j);
            let p = score >= threshold;
            let pt = p && top3.contains(&j);
            any |= g;
            for (c, pred) in [(&mut all, p), (&mut top, pt)] {
                c.ng[j] += g as u64;
                c.np[j] += pred as u64;
                c.nc[j] += (g && pred) as u64;
            }
        }
        if !any {
            images_without_labels.push(i);
        }
    }
    let (class, overall) = all.prf();
    let (top3_class, top3_overall) = top.prf();
    let classes_never_predicted = (0..k).filter(|&j| all.np[j] == 0).collect();
    Metrics {
        map: mean_some(&ap),
        map_noninterp: mean_some(&ap_noninterp),
        class,
        overall,
        top3_class,
        top3_overall,
        ap,
        ap_noninterp,
        n_images: n,
        n_classes: k,
        threshold,
        images_without_labels,
        classes_never_predicted,
    }
}

/// `class_0`, `class_1`, ... for files without a header.
pub fn default_class_names(k: usize) -> Vec<String> {
    (0..k).map(|j| format!("class_{j}")).collect()
}

fn name(names: &[String], j: usize) -> String {
    names.get(j).cloned().unwrap_or_else(|| format!("class_{j}"))
}

/// Lists at most 20 names, then how many more.
fn name_list(names: &[String], idx: &[usize]) -> String {
    let mut s: Vec<String> = idx.iter().take(20).map(|&j| name(names, j)).collect();
    if idx.len() > 20 {
        s.push(format!("... ({} more)", idx.len() - 20));
    }
    s.join(", ")
}

impl Metrics {
    /// Class indices without positives (left out of mAP and CR).
    pub fn classes_without_positives(&self) -> Vec<usize> {
        (0..self.n_classes).filter(|&j| self.ap[j].is_none()).collect()
    }

    /// One JSON object: `mAP, mAP_noninterp, CP, CR, CF1, OP, OR, OF1` (percent), their
    /// `_top3` variants, `AP` and `AP_noninterp` by class name (null for a class without
    /// positives), counts and the lists behind the warnings. Missing names become `class_<j>`.
    pub fn to_json(&self, class_names: &[String]) -> Value {
        let per_class = |v: &[Option<f64>]| -> Value {
            let mut m = Map::new();
            for (j, a) in v.iter().enumerate() {
                m.insert(name(class_names, j), a.map_or(Value::Null, |x| json!(x)));
            }
            Value::Object(m)
        };
        let names_of = |idx: &[usize]| -> Vec<String> { idx.iter().map(|&j| name(class_names, j)).collect() };
        json!({
            "mAP": self.map,
            "mAP_noninterp": self.map_noninterp,
            "CP": self.class.precision, "CR": self.class.recall, "CF1": self.class.f1,
            "OP": self.overall.precision, "OR": self.overall.recall, "OF1": self.overall.f1,
            "CP_top3": self.top3_class.precision, "CR_top3": self.top3_class.recall, "CF1_top3": self.top3_class.f1,
            "OP_top3": self.top3_overall.precision, "OR_top3": self.top3_overall.recall, "OF1_top3": self.top3_overall.f1,
            "AP": per_class(&self.ap),
            "AP_noninterp": per_class(&self.ap_noninterp),
            // The f32's shortest decimal (0.35, not 0.3499999940395355).
            "threshold": self.threshold.to_string().parse::<f64>().unwrap_or(self.threshold as f64),
            "n_images": self.n_images,
            "n_classes": self.n_classes,
            "classes_without_positives": names_of(&self.classes_without_positives()),
            "classes_never_predicted": names_of(&self.classes_never_predicted),
            "images_without_labels": self.images_without_labels.len(),
        })
    }

    /// A readable table (2 decimals) of the summary and the per-class AP.
    pub fn to_table(&self, class_names: &[String]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} images, {} classes, threshold {}",
            self.n_images, self.n_classes, self.threshold
        );
        let _ = writeln!(s, "mAP {:6.2}   mAP (non-interpolated) {:6.2}", self.map, self.map_noninterp);
        let _ = writeln!(s, "{:<16}{:>8}{:>8}{:>8}", "", "P", "R", "F1");
        for (label, m) in [
            ("per class (C)", &self.class),
            ("overall (O)", &self.overall),
            ("C top-3", &self.top3_class),
            ("O top-3", &self.top3_overall),
        ] {
            let _ = writeln!(s, "{label:<16}{:>8.2}{:>8.2}{:>8.2}", m.precision, m.recall, m.f1);
        }
        let width = (0..self.n_classes)
            .map(|j| name(class_names, j).chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let _ = writeln!(s, "\n{:<width$}  {:>7}  {:>17}", "class", "AP", "AP non-interp.");
        for j in 0..self.n_classes {
            let n = name(class_names, j);
            match (self.ap[j], self.ap_noninterp[j]) {
                (Some(a), Some(b)) => {
                    let _ = writeln!(s, "{n:<width$}  {a:>7.2}  {b:>17.2}");
                }
                _ => {
                    let _ = writeln!(s, "{n:<width$}  {:>7}  {:>17}", "-", "(no positives)");
                }
            }
        }
        s
    }

    /// Warnings for a person reading the result (the CLI prints them on stderr).
    pub fn warnings(&self, class_names: &[String]) -> Vec<String> {
        let mut w = Vec::new();
        let none = self.classes_without_positives();
        if !none.is_empty() {
            let (n, verb) = if none.len() == 1 { ("1 class has", "is") } else { ("", "are") };
            let head = if n.is_empty() {
                format!("{} classes have", none.len())
            } else {
                n.to_string()
            };
            w.push(format!(
                "{head} no positives and {verb} left out of mAP and CR: {}",
                name_list(class_names, &none)
            ));
        }
        if !self.images_without_labels.is_empty() {
            let c = self.images_without_labels.len();
            w.push(format!(
                "{c} image{} no positive labels (their predictions count only in precision)",
                if c == 1 { " has" } else { "s have" }
            ));
        }
        w
    }
}

/// Scores and targets read from files and checked against each other.
#[derive(Debug, Clone)]
pub struct EvalInputs {
    pub scores: Vec<f32>,
    pub targets: Vec<f32>,
    pub n: usize,
    pub k: usize,
    /// From the header of either file, else `class_0`...
    pub class_names: Vec<String>,
    /// 1-based line in the targets file of each image (to name images in messages).
    pub target_lines: Vec<usize>,
}

/// Why a pair of score/target files cannot be evaluated.
#[derive(Debug, thiserror::Error)]
pub enum EvalInputError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("shapes differ: scores {scores} has {sr} rows x {sc} columns, targets {targets} has {tr} rows x {tc} columns")]
    Shape {
        scores: PathBuf,
        sr: usize,
        sc: usize,
        targets: PathBuf,
        tr: usize,
        tc: usize,
    },
    #[error("class names differ in column {column}: scores {scores} has {s:?}, targets {targets} has {t:?} (line 1 of both)")]
    Header {
        scores: PathBuf,
        targets: PathBuf,
        column: usize,
        s: String,
        t: String,
    },
}

/// Reads a score file (probabilities) and a target file (0/1) and checks that they fit.
pub fn read_eval_inputs(scores: &Path, targets: &Path) -> Result<EvalInputs, EvalInputError> {
    let t = read_matrix(targets, Values::Binary)?;
    let s = read_matrix(scores, Values::Probability)?;
    if (s.rows, s.cols) != (t.rows, t.cols) {
        return Err(EvalInputError::Shape {
            scores: scores.to_path_buf(),
            sr: s.rows,
            sc: s.cols,
            targets: targets.to_path_buf(),
            tr: t.rows,
            tc: t.cols,
        });
    }
    if let (Some(hs), Some(ht)) = (&s.header, &t.header) {
        if let Some(j) = (0..hs.len()).find(|&j| hs[j] != ht[j]) {
            return Err(EvalInputError::Header {
                scores: scores.to_path_buf(),
                targets: targets.to_path_buf(),
                column: j + 1,
                s: hs[j].clone(),
                t: ht[j].clone(),
            });
        }
    }
    let class_names = t
        .header
        .clone()
        .or_else(|| s.header.clone())
        .unwrap_or_else(|| default_class_names(t.cols));
    Ok(EvalInputs {
        scores: s.data.iter().map(|&v| v as f32).collect(),
        targets: t.data.iter().map(|&v| v as f32).collect(),
        n: t.rows,
        k: t.cols,
        class_names,
        target_lines: t.lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ap_interpolation_differs_when_precision_rises() {
        // Ranks + - - + +: precision at the positives 1, 2/4, 3/5.
        // Non-interpolated: (1 + 0.5 + 0.6) / 3 = 0.7; VOC lifts 2/4 to 3/5: (1 + 0.6 + 0.6) / 3.
        let (voc, non) = average_precision(&[0.9, 0.8, 0.7, 0.6, 0.5], &[true, false, false, true, true]).unwrap();
        assert!((non - 0.7).abs() < 1e-12 && (voc - 2.2 / 3.0).abs() < 1e-12, "{voc} {non}");
        assert!(average_precision(&[0.1, 0.2], &[false, false]).is_none());
    }

    #[test]
    fn nan_scores_rank_last() {
        // NaN on the only negative: the positive ranks first, AP = 1.
        let (voc, non) = average_precision(&[f64::NAN, 0.1], &[false, true]).unwrap();
        assert_eq!((voc, non), (1.0, 1.0));
    }
}
