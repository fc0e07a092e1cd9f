//! An evaluation report from per-image predictions (SD2-SPEC §7): overall and per-source
//! summaries, per-type AUC (real ∪ that type), mAUC over sources, the 5-class confusion matrix;
//! written as `metrics.json` and `predictions.jsonl`, and printed as a table.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::metrics::*;
use super::predict::{Pred, Unreadable};
use crate::fs::write_atomic;
use crate::sd2::type_texts::CLASSES;
use crate::{Error, Result};

/// Detection numbers for one set of predictions (all of them, or one source). Scores are
/// `fake_score`, fake is the positive class; rates and accuracies are fractions in [0, 1].
/// A metric undefined for the set (one class only, no items) is NaN.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Images in the set.
    pub n: usize,
    /// ROC AUC, fake against real.
    pub auc: f64,
    /// Average precision (area under the precision–recall curve).
    pub ap: f64,
    /// Equal error rate: the error rate where the false-positive and false-negative rates meet.
    pub eer: f64,
    /// Real/fake accuracy of the 5-class argmax: right when "argmax is a forgery class"
    /// matches "is fake".
    pub acc_argmax: f64,
    /// Real/fake accuracy of `fake_score ≥ threshold`.
    pub acc_threshold: f64,
    /// The fake-score threshold of the threshold accuracies (chosen on the val split; 0.5
    /// without one).
    pub threshold: f64,
    /// The highest true-positive rate at a false-positive rate of at most 1%.
    pub tpr_at_fpr_1pct: f64,
    /// Fraction of the real images below the threshold.
    pub real_acc: f64,
    /// Fraction of the fake images at or above the threshold.
    pub fake_acc: f64,
    /// ROC AUC over videos, each scored by its frames' mean `fake_score`; `None` when no
    /// item has a video id.
    pub video_auc: Option<f64>,
    /// 5-class accuracy of the argmax: the exact class (real or forgery type) right.
    pub acc_5class: f64,
}

/// An evaluation report (`metrics.json`): see the module docs. Built by [`report()`].
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Every evaluated image together.
    pub overall: Summary,
    /// One summary per source, sorted by source name.
    pub per_source: BTreeMap<String, Summary>,
    /// ROC AUC of each forgery type (`fs`, `fr`, `efs`, `fe`) against the real images alone;
    /// NaN for a type with no images (or no reals).
    pub per_type: BTreeMap<String, f64>,
    /// Mean of the per-source AUCs that are defined (a source with one class is left out):
    /// the paper's mAUC. NaN when none is.
    pub mauc: f64,
    /// 5×5 counts, row the true class and column the argmax class, in label order (real,
    /// FS, FR, EFS, FE).
    pub confusion: Vec<Vec<usize>>,
    /// `sd2 eval --perturb`: the same test set under each degradation, in the order given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub perturb: Vec<PerturbResult>,
    /// Images that could not be read (of the evaluated split and of the validation split the
    /// threshold comes from), each once: the numbers above leave them out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<Unreadable>,
}

/// The headline numbers under one degradation (the threshold is still the clean validation one).
#[derive(Clone, Debug, Serialize)]
pub struct PerturbResult {
    /// `jpeg:70`, `blur:2`, …
    pub name: String,
    /// Overall ROC AUC under the degradation.
    pub auc: f64,
    /// Overall average precision under the degradation.
    pub ap: f64,
    /// Mean per-source AUC under the degradation.
    pub mauc: f64,
    /// Overall threshold accuracy under the degradation (clean validation threshold).
    pub acc_threshold: f64,
}

impl PerturbResult {
    /// The headline numbers of `r`, the report on the degraded images, named `name`.
    pub fn from_report(name: String, r: &Report) -> PerturbResult {
        PerturbResult {
            name,
            auc: r.overall.auc,
            ap: r.overall.ap,
            mauc: r.mauc,
            acc_threshold: r.overall.acc_threshold,
        }
    }
}

/// The [`Summary`] of predictions `p`, with the threshold accuracies taken at `threshold`.
/// An empty `p` gives `n` = 0, NaN metrics and no `video_auc`.
pub fn summarize(p: &[&Pred], threshold: f64) -> Summary {
    let s: Vec<f64> = p.iter().map(|x| x.fake_score).collect();
    let f: Vec<bool> = p.iter().map(|x| x.label != 0).collect();
    let (real_acc, fake_acc) = real_fake_accuracy(&s, &f, threshold);
    let arg_ok = p
        .iter()
        .filter(|x| (x.argmax() != 0) == (x.label != 0))
        .count();
    let vids: Vec<Option<String>> = p.iter().map(|x| x.video.clone()).collect();
    let (vs, vf) = per_video(&s, &f, &vids);
    let (_, acc5) = confusion(
        &p.iter().map(|x| x.label).collect::<Vec<_>>(),
        &p.iter().map(|x| x.argmax()).collect::<Vec<_>>(),
        5,
    );
    Summary {
        n: p.len(),
        auc: roc_auc(&s, &f),
        ap: average_precision(&s, &f),
        eer: eer(&s, &f),
        acc_argmax: if p.is_empty() {
            f64::NAN
        } else {
            arg_ok as f64 / p.len() as f64
        },
        acc_threshold: accuracy_at(&s, &f, threshold),
        threshold,
        tpr_at_fpr_1pct: tpr_at_fpr(&s, &f, 0.01),
        real_acc,
        fake_acc,
        video_auc: (!vs.is_empty()).then(|| roc_auc(&vs, &vf)),
        acc_5class: acc5,
    }
}

/// The report on `test`, with the accuracy threshold chosen on `val` (0.5 without a val split).
pub fn report(test: &[Pred], val: &[Pred]) -> Report {
    report_with_default(test, val, 0.5)
}

/// As [`report()`], with `default` as the threshold when `val` is empty (a checkpoint's own,
/// chosen on its training run's val split).
pub fn report_with_default(test: &[Pred], val: &[Pred], default: f64) -> Report {
    let threshold = if val.is_empty() {
        default
    } else {
        best_threshold(
            &val.iter().map(|x| x.fake_score).collect::<Vec<_>>(),
            &val.iter().map(|x| x.label != 0).collect::<Vec<_>>(),
        )
    };
    let all: Vec<&Pred> = test.iter().collect();
    let mut per_source = BTreeMap::new();
    let mut sources: Vec<&str> = test.iter().map(|x| x.source.as_str()).collect();
    sources.sort();
    sources.dedup();
    for s in &sources {
        let sub: Vec<&Pred> = test.iter().filter(|x| x.source == *s).collect();
        per_source.insert(s.to_string(), summarize(&sub, threshold));
    }
    let aucs: Vec<f64> = per_source
        .values()
        .map(|s| s.auc)
        .filter(|a| !a.is_nan())
        .collect();
    let mauc = if aucs.is_empty() {
        f64::NAN
    } else {
        aucs.iter().sum::<f64>() / aucs.len() as f64
    };
    let mut per_type = BTreeMap::new();
    for (c, name) in CLASSES.iter().enumerate().skip(1) {
        let sub: Vec<&Pred> = test
            .iter()
            .filter(|x| x.label == 0 || x.label == c)
            .collect();
        let s: Vec<f64> = sub.iter().map(|x| x.fake_score).collect();
        let f: Vec<bool> = sub.iter().map(|x| x.label != 0).collect();
        per_type.insert(name.to_string(), roc_auc(&s, &f));
    }
    let (conf, _) = confusion(
        &test.iter().map(|x| x.label).collect::<Vec<_>>(),
        &test.iter().map(|x| x.argmax()).collect::<Vec<_>>(),
        5,
    );
    Report {
        overall: summarize(&all, threshold),
        per_source,
        per_type,
        mauc,
        confusion: conf,
        perturb: vec![],
        unreadable: vec![],
    }
}

/// `dir/metrics.json`, `dir/predictions.jsonl` and, with the `cli` feature (plotters), the
/// figures `roc.png`, `pr.png`, `confusion.png`.
pub fn write(dir: &Path, report: &Report, preds: &[Pred]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&dir.join("metrics.json"), &json)?;
    let mut lines = String::new();
    for p in preds {
        lines.push_str(&serde_json::to_string(p).map_err(|e| Error::Msg(e.to_string()))?);
        lines.push('\n');
    }
    write_atomic(&dir.join("predictions.jsonl"), &lines)?;
    #[cfg(feature = "cli")]
    {
        super::plot::roc_png(&dir.join("roc.png"), preds)?;
        super::plot::pr_png(&dir.join("pr.png"), preds)?;
        super::plot::confusion_png(&dir.join("confusion.png"), &report.confusion)?;
    }
    Ok(())
}

/// A console table: one row per source, then the overall row and mAUC.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{:<14} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9}\n",
        "source", "n", "AUC", "AP", "EER", "ACC@arg", "ACC@thr", "TPR@1%"
    );
    let row = |name: &str, s: &Summary| {
        format!(
            "{:<14} {:>6} {:>7.4} {:>7.4} {:>7.4} {:>8.4} {:>8.4} {:>9.4}\n",
            name, s.n, s.auc, s.ap, s.eer, s.acc_argmax, s.acc_threshold, s.tpr_at_fpr_1pct
        )
    };
    for (k, s) in &r.per_source {
        out.push_str(&row(k, s));
    }
    out.push_str(&row("overall", &r.overall));
    let types: Vec<String> = r
        .per_type
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    out.push_str(&format!(
        "mAUC {:.4}; per-type AUC: {}; 5-class accuracy {:.4}\n",
        r.mauc,
        types.join(", "),
        r.overall.acc_5class
    ));
    if !r.perturb.is_empty() {
        out.push_str(&format!(
            "{:<14} {:>7} {:>7} {:>7} {:>8}\n",
            "perturbation", "AUC", "AP", "mAUC", "ACC@thr"
        ));
        for p in &r.perturb {
            out.push_str(&format!(
                "{:<14} {:>7.4} {:>7.4} {:>7.4} {:>8.4}\n",
                p.name, p.auc, p.ap, p.mauc, p.acc_threshold
            ));
        }
    }
    out
}
