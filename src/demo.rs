//! `sd2 demo`: the main job on a fresh machine. Synthesizes a small forgery benchmark, trains the
//! `tiny` preset on its training sources, picks the best epoch on the validation split, and
//! evaluates on the out-of-domain test sources. No pretrained CLIP can be downloaded here, so
//! the tiny CLIP starts from random weights and is trained whole (`train_base`); LoRA, CLAM and
//! the three losses are all on.
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::clip::ClipTokenizer;
use crate::data::loader::Transform;
use crate::data::Split;
use crate::eval::predict::predict_items;
use crate::eval::report::{self, Report};
use crate::run::{Progress, RunConfig};
use crate::sd2::detector::class_embeddings;
use crate::sd2::TypeTexts;
use crate::{Device, Result};

/// Settings of `sd2 demo` (and of each `sd2 ablation` row). The default is the CLI's.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Folder the demo owns: the benchmark goes to `out/data`, the run (checkpoints, log) to
    /// `out`, the report to `out/eval`. A rerun overwrites the previous run.
    pub out: PathBuf,
    /// Synthetic images to generate (64 px, all splits together).
    pub images: usize,
    /// Training epochs.
    pub epochs: usize,
    /// Images per optimizer step (also the micro-batch: no accumulation).
    pub batch: usize,
    /// Peak learning rate (linear warmup, then cosine decay).
    pub lr: f64,
    /// Seed of the benchmark and of training: the same seed reproduces the same run on the
    /// CPU.
    pub seed: u64,
    /// Where training and evaluation run.
    pub device: Device,
    /// Strength of the training sources' background shortcut (see `data::synth`).
    pub shortcut: f64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            out: PathBuf::from("sd2-demo"),
            images: 12000,
            epochs: 6,
            batch: 32,
            lr: 1e-3,
            seed: 0,
            device: Device::Cpu,
            shortcut: crate::data::synth::DEFAULT_SHORTCUT,
        }
    }
}

/// What [`run`] produced.
pub struct DemoResult {
    /// The best epoch's report on the out-of-domain test split (threshold from the val split).
    pub report: Report,
    /// Where the report was written (`out/eval`: metrics, predictions, figures).
    pub eval_dir: PathBuf,
    /// Wall-clock seconds of the whole demo, synthesis included.
    pub seconds: f64,
}

/// `sd2 demo`: synthesizes the benchmark ([`synthesize`]), trains the tiny preset and
/// evaluates its best epoch on the test split ([`train_eval`]), all under `cfg.out`.
pub fn run(cfg: &DemoConfig, progress: &mut dyn Progress) -> Result<DemoResult> {
    let t0 = Instant::now();
    let manifest = synthesize(cfg, progress)?;
    let (report, eval_dir) = train_eval(cfg, &manifest, &cfg.out, |_| {}, progress)?;
    Ok(DemoResult {
        report,
        eval_dir,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The demo's benchmark: `cfg.images` synthetic 64 px images in `cfg.out/data`.
pub fn synthesize(cfg: &DemoConfig, progress: &mut dyn Progress) -> Result<PathBuf> {
    let t0 = Instant::now();
    let data = cfg.out.join("data");
    let manifest =
        crate::data::synth::generate_with(&data, cfg.images, 64, cfg.seed, cfg.shortcut)?;
    progress.line(&format!(
        "synthesized {} images into {} ({:.1}s)",
        manifest.items.len(),
        data.display(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(manifest.path)
}

/// Trains the tiny preset (as `adjust` changes it) on `manifest` into `out`, picks the best
/// epoch by validation AUC and evaluates it on the test split (report in `out/eval`).
pub fn train_eval(
    cfg: &DemoConfig,
    manifest: &Path,
    out: &Path,
    adjust: impl FnOnce(&mut RunConfig),
    progress: &mut dyn Progress,
) -> Result<(Report, PathBuf)> {
    let mut rc = crate::run::preset("tiny")?;
    rc.manifest = manifest.to_path_buf();
    rc.out = out.to_path_buf();
    rc.epochs = cfg.epochs;
    rc.device = cfg.device.to_string();
    rc.train.lr = cfg.lr;
    rc.train.micro_batch = cfg.batch;
    rc.train.effective_batch = cfg.batch;
    rc.train.seed = cfg.seed;
    adjust(&mut rc);
    // The demo owns its folder: a rerun starts again.
    let outcome = crate::run::train_with(&rc, crate::run::Start::Overwrite, progress)?;
    let best = crate::sd2::detector::Detector::load(&outcome.best_dir, None, cfg.device)?;
    let class_u = class_embeddings(
        &best.model,
        &ClipTokenizer::openai()?,
        &TypeTexts::shipped()?,
    )?;
    let m = &outcome.manifest;
    let vp = predict_items(
        &best.model,
        &class_u,
        &m.split(Split::Val),
        128,
        &Transform::None,
    )?;
    let tp = predict_items(
        &best.model,
        &class_u,
        &m.split(Split::Test),
        128,
        &Transform::None,
    )?;
    let rep = report::report(&tp, &vp);
    let eval_dir = out.join("eval");
    report::write(&eval_dir, &rep, &tp)?;
    Ok((rep, eval_dir))
}

/// For `sd2 demo --out`: the manifest written by the demo.
pub fn manifest_path(out: &Path) -> PathBuf {
    out.join("data").join("manifest.jsonl")
}
