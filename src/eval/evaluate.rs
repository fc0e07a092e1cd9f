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
    pub checkpoint: PathBuf,
    pub manifest: PathBuf,
    pub split: Split,
    /// The directory the report goes to.
    pub out: PathBuf,
    /// The CLIP directory, when the checkpoint does not carry the towers.
    pub clip: Option<PathBuf>,
    /// Skip (and count) bad manifest lines instead of failing.
    pub skip_bad: bool,
    pub device: Device,
    /// Perturbations each evaluated again under.
    pub perturb: Vec<Perturb>,
}

/// Scores `r.split`, writes the report under `r.out` and returns it.
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
        return Err(Error::Msg(format!(
            "{}: no {:?} items",
            r.manifest.display(),
            r.split
        )));
    }
    let preds = predict::predict_items(&det.model, &class_u, &items, 64, &Transform::None)?;
    let val = if r.split == Split::Test {
        predict::predict_items(
            &det.model,
            &class_u,
            &m.split(Split::Val),
            64,
            &Transform::None,
        )?
    } else {
        vec![]
    };
    let mut rep = report::report(&preds, &val);
    for p in &r.perturb {
        let pp = predict::predict_items(&det.model, &class_u, &items, 64, &Transform::Perturb(*p))?;
        rep.perturb.push(report::PerturbResult::from_report(
            p.name(),
            &report::report(&pp, &val),
        ));
    }
    report::write(&r.out, &rep, &preds)?;
    Ok(rep)
}
