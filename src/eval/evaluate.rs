//! `sd2 eval`: a checkpoint scored on one split of a manifest — the report (AUC, EER, AP, per
//! source, thresholds chosen on the validation split), optionally under test-time
//! perturbations, written as metrics.json and predictions.jsonl.
use std::path::PathBuf;

use crate::data::augment::Perturb;
use crate::data::loader::Transform;
use crate::data::{LoadOptions, Manifest, Split};
use crate::eval::{predict, report};
use crate::sd2::detector::{class_embeddings, Detector};
use crate::{Device, Error, Result};

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalRequest {
    /// The SD2 checkpoint folder to score (as `Detector::load` takes it).
    pub checkpoint: PathBuf,
    /// The manifest whose split is scored.
    pub manifest: PathBuf,
    /// The split to score. For `Split::Test` the accuracy threshold is chosen on the
    /// manifest's val split; without one (and for any other split) it is the checkpoint's
    /// own (`Detector::threshold`: chosen on its training run's val split, else 0.5).
    pub split: Split,
    /// The directory the report goes to.
    pub out: PathBuf,
    /// The CLIP directory, when the checkpoint does not carry the towers.
    pub clip: Option<PathBuf>,
    /// Skip (and count) bad manifest lines instead of failing.
    pub skip_bad: bool,
    /// Where the model runs.
    pub device: Device,
    /// Perturbations each evaluated again under.
    pub perturb: Vec<Perturb>,
}

/// Scores `r.split`, writes the report under `r.out` and returns it. An image that cannot be
/// read is left out of the numbers and listed in `Report::unreadable` (and in metrics.json).
pub fn run(r: &EvalRequest) -> Result<report::Report> {
    r.device.check_available()?;
    let m = Manifest::load(
        &r.manifest,
        LoadOptions {
            skip_bad: r.skip_bad,
            check_images: true,
            require_descriptions: false,
            verify_images: false,
        },
    )?;
    let det = Detector::load(&r.checkpoint, r.clip.as_deref(), r.device)?;
    let tk = crate::clip::ClipTokenizer::openai()?;
    let class_u = class_embeddings(&det.model, &tk, &crate::sd2::TypeTexts::shipped()?)?;
    let items = m.split(r.split);
    if items.is_empty() {
        return Err(Error::invalid(
            r.manifest.display().to_string(),
            format!("no {:?} items", r.split),
        ));
    }
    // A bad image is listed (and the exit status says so) rather than ending the evaluation.
    let score = |items: &[&crate::data::Item], t: &Transform| {
        predict::predict_items_skipping_bad(&det.model, &class_u, items, 64, t)
    };
    let (preds, mut unreadable) = score(&items, &Transform::None)?;
    let val = if r.split == Split::Test {
        let (val, bad) = score(&m.split(Split::Val), &Transform::None)?;
        unreadable.extend(bad);
        val
    } else {
        vec![]
    };
    let mut rep = report::report_with_default(&preds, &val, det.threshold());
    for p in &r.perturb {
        let (pp, bad) = score(&items, &Transform::Perturb(*p))?;
        // An image that decodes cleanly but fails under a perturbation is still listed.
        for b in bad {
            if !unreadable.iter().any(|u| u.path == b.path) {
                unreadable.push(b);
            }
        }
        rep.perturb.push(report::PerturbResult::from_report(
            p.name(),
            &report::report_with_default(&pp, &val, det.threshold()),
        ));
    }
    rep.unreadable = unreadable;
    report::write(&r.out, &rep, &preds)?;
    Ok(rep)
}
