//! Detection metrics (SD2-SPEC §7), with sklearn's definitions where sklearn has one.
//!
//! Conventions: the score is the fake score (higher = more likely fake); label `true` = fake.
//! Metrics that are undefined for the input (a single class present, no samples) are `NaN`,
//! never a panic: sklearn raises there; a report shows `NaN` and the caller can test `is_nan`.

/// ROC curve as sklearn's `roc_curve(drop_intermediate=False)`: one point per distinct score
/// (descending), starting at (0, 0). Returns (fpr, tpr, thresholds).
pub fn roc_curve(scores: &[f64], fake: &[bool]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (p, n) = counts(fake);
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    let (mut fpr, mut tpr, mut thr) = (vec![0.0], vec![0.0], vec![f64::INFINITY]);
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if fake[idx[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        fpr.push(if n > 0 {
            fp as f64 / n as f64
        } else {
            f64::NAN
        });
        tpr.push(if p > 0 {
            tp as f64 / p as f64
        } else {
            f64::NAN
        });
        thr.push(s);
    }
    (fpr, tpr, thr)
}

/// Precision–recall curve as sklearn's `precision_recall_curve` (≥ 1.3, `drop_intermediate`
/// off): one point per distinct score, in increasing score order, then the (recall 0,
/// precision 1) end point. Returns (precision, recall).
/// Empty without positives.
pub fn pr_curve(scores: &[f64], fake: &[bool]) -> (Vec<f64>, Vec<f64>) {
    let (p, _) = counts(fake);
    if p == 0 {
        return (vec![], vec![]);
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    let (mut prec, mut rec) = (vec![], vec![]);
    let (mut tp, mut seen, mut i) = (0usize, 0usize, 0);
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            tp += fake[idx[i]] as usize;
            seen += 1;
            i += 1;
        }
        prec.push(tp as f64 / seen as f64);
        rec.push(tp as f64 / p as f64);
    }
    prec.reverse();
    rec.reverse();
    prec.push(1.0);
    rec.push(0.0);
    (prec, rec)
}

fn counts(fake: &[bool]) -> (usize, usize) {
    let p = fake.iter().filter(|f| **f).count();
    (p, fake.len() - p)
}

/// Area under the ROC curve (trapezoids over distinct scores: ties count one half), as
/// sklearn's `roc_auc_score`. NaN when only one class is present.
pub fn roc_auc(scores: &[f64], fake: &[bool]) -> f64 {
    let (p, n) = counts(fake);
    if p == 0 || n == 0 {
        return f64::NAN;
    }
    let (fpr, tpr, _) = roc_curve(scores, fake);
    fpr.windows(2)
        .zip(tpr.windows(2))
        .map(|(f, t)| (f[1] - f[0]) * (t[1] + t[0]) / 2.0)
        .sum()
}

/// Average precision as sklearn's `average_precision_score`: Σₙ (Rₙ − Rₙ₋₁)·Pₙ over distinct
/// thresholds. NaN without positives.
pub fn average_precision(scores: &[f64], fake: &[bool]) -> f64 {
    let (p, _) = counts(fake);
    if p == 0 {
        return f64::NAN;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    let (mut tp, mut seen, mut prev_recall, mut ap) = (0usize, 0usize, 0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            tp += fake[idx[i]] as usize;
            seen += 1;
            i += 1;
        }
        let recall = tp as f64 / p as f64;
        ap += (recall - prev_recall) * (tp as f64 / seen as f64);
        prev_recall = recall;
    }
    ap
}

/// Equal error rate: where the ROC polyline crosses FNR = FPR (1 − tpr = fpr), interpolating
/// linearly between ROC points. NaN when only one class is present.
pub fn eer(scores: &[f64], fake: &[bool]) -> f64 {
    let (p, n) = counts(fake);
    if p == 0 || n == 0 {
        return f64::NAN;
    }
    let (fpr, tpr, _) = roc_curve(scores, fake);
    for k in 1..fpr.len() {
        let g0 = 1.0 - fpr[k - 1] - tpr[k - 1];
        let g1 = 1.0 - fpr[k] - tpr[k];
        if g0 >= 0.0 && g1 <= 0.0 {
            if g0 == g1 {
                return fpr[k - 1];
            }
            let a = g0 / (g0 - g1);
            return fpr[k - 1] + a * (fpr[k] - fpr[k - 1]);
        }
    }
    f64::NAN
}

/// The highest TPR among ROC points with FPR ≤ `max_fpr`.
pub fn tpr_at_fpr(scores: &[f64], fake: &[bool], max_fpr: f64) -> f64 {
    let (p, n) = counts(fake);
    if p == 0 || n == 0 {
        return f64::NAN;
    }
    let (fpr, tpr, _) = roc_curve(scores, fake);
    fpr.iter()
        .zip(&tpr)
        .filter(|(f, _)| **f <= max_fpr + 1e-12)
        .map(|(_, t)| *t)
        .fold(0.0, f64::max)
}

/// Accuracy of "fake iff score ≥ threshold".
pub fn accuracy_at(scores: &[f64], fake: &[bool], threshold: f64) -> f64 {
    if scores.is_empty() {
        return f64::NAN;
    }
    let ok = scores
        .iter()
        .zip(fake)
        .filter(|(s, f)| (**s >= threshold) == **f)
        .count();
    ok as f64 / scores.len() as f64
}

/// The threshold (a midpoint between distinct scores, or an end) that maximizes accuracy; ties
/// go to the lowest threshold. Chosen on the validation split, applied to the test split.
pub fn best_threshold(scores: &[f64], fake: &[bool]) -> f64 {
    let mut s: Vec<f64> = scores.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.dedup();
    let mut cands = vec![s.first().map_or(0.5, |v| v - 1e-9)];
    cands.extend(s.windows(2).map(|w| (w[0] + w[1]) / 2.0));
    cands.push(s.last().map_or(0.5, |v| v + 1e-9));
    let mut best = (f64::NEG_INFINITY, 0.5);
    for c in cands {
        let a = accuracy_at(scores, fake, c);
        if a > best.0 {
            best = (a, c);
        }
    }
    best.1
}

/// Accuracy on the real and on the fake items separately at `threshold`.
pub fn real_fake_accuracy(scores: &[f64], fake: &[bool], threshold: f64) -> (f64, f64) {
    let part = |want: bool| {
        let items: Vec<f64> = scores
            .iter()
            .zip(fake)
            .filter(|(_, f)| **f == want)
            .map(|(s, _)| *s)
            .collect();
        if items.is_empty() {
            return f64::NAN;
        }
        items.iter().filter(|s| (**s >= threshold) == want).count() as f64 / items.len() as f64
    };
    (part(false), part(true))
}

/// 5×5 confusion matrix (rows truth, columns prediction) and the 5-class accuracy.
pub fn confusion(truth: &[usize], pred: &[usize], classes: usize) -> (Vec<Vec<usize>>, f64) {
    let mut m = vec![vec![0; classes]; classes];
    for (t, p) in truth.iter().zip(pred) {
        if *t < classes && *p < classes {
            m[*t][*p] += 1;
        }
    }
    let ok: usize = (0..classes).map(|c| m[c][c]).sum();
    let acc = if truth.is_empty() {
        f64::NAN
    } else {
        ok as f64 / truth.len() as f64
    };
    (m, acc)
}

/// Mean fake score and label per video id (items without a video are left out). Returns
/// (scores, fake) per video, videos in first-seen order.
pub fn per_video(scores: &[f64], fake: &[bool], video: &[Option<String>]) -> (Vec<f64>, Vec<bool>) {
    let mut order: Vec<&str> = vec![];
    let mut acc: std::collections::HashMap<&str, (f64, usize, bool)> =
        std::collections::HashMap::new();
    for ((s, f), v) in scores.iter().zip(fake).zip(video) {
        if let Some(v) = v {
            let e = acc.entry(v.as_str()).or_insert_with(|| {
                order.push(v.as_str());
                (0.0, 0, *f)
            });
            e.0 += s;
            e.1 += 1;
            e.2 |= *f;
        }
    }
    order
        .iter()
        .map(|v| {
            let (s, n, f) = acc[v];
            (s / n as f64, f)
        })
        .unzip()
}
