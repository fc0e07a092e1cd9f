//! `sd2 demo`: the main job on a fresh machine. Synthesizes a small forgery benchmark, trains the
//! `tiny` preset on its training sources, picks the best epoch on the validation split, and
//! evaluates on the out-of-domain test sources. No pretrained CLIP can be downloaded here, so
//! the tiny CLIP starts from random weights and is trained whole (`train_base`); LoRA, CLAM and
//! the three losses are all on.
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::clip::{ClipConfig, ClipTokenizer};
use crate::data::loader::load_pixels;
use crate::data::{Item, Split};
use crate::eval::report::{self, Pred, Report};
use crate::sd2::detector::{class_embeddings, predict_pixels};
use crate::sd2::{Sd2Config, Sd2Model, TypeTexts};
use crate::{Device, Result};

/// The `tiny` preset's CLIP: 64 px images, 8 px patches, 4 + 2 layers of width 64, 32-token texts.
pub fn tiny_clip_config() -> ClipConfig {
    ClipConfig::from_json(
        r#"{"projection_dim": 64,
            "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4, "image_size": 64, "patch_size": 8},
            "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 32}}"#,
    )
    .expect("tiny preset config")
}

pub fn tiny_sd2_config() -> Sd2Config {
    Sd2Config {
        clam_heads: 4,
        train_base: true,
        ..Default::default()
    }
}

#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub out: PathBuf,
    pub images: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub device: Device,
    /// Strength of the training sources' background shortcut (see `data::synth`).
    pub shortcut: f64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            out: PathBuf::from("sd2-demo"),
            images: 4000,
            epochs: 4,
            batch: 32,
            lr: 1e-3,
            seed: 0,
            device: Device::Cpu,
            shortcut: crate::data::synth::DEFAULT_SHORTCUT,
        }
    }
}

/// Predictions for `items` in batches.
pub fn predict_items(
    model: &Sd2Model,
    class_u: &crate::Tensor,
    items: &[&Item],
    batch: usize,
) -> Result<Vec<Pred>> {
    let size = model.clip.config.vision_config.image_size;
    let mut out = vec![];
    for chunk in items.chunks(batch.max(1)) {
        let px = load_pixels(
            chunk,
            size,
            None,
            model.dtype(),
            model.clip.logit_scale.device(),
        )?;
        for (it, p) in chunk.iter().zip(predict_pixels(model, class_u, &px)?) {
            out.push(Pred {
                path: it.rel_path.clone(),
                label: it.label,
                source: it.source.clone(),
                video: it.video.clone(),
                fake_score: p.fake_score,
                probs: p.probs,
            });
        }
    }
    Ok(out)
}

pub struct DemoResult {
    pub report: Report,
    pub eval_dir: PathBuf,
    pub seconds: f64,
}

pub fn run(cfg: &DemoConfig, mut log: impl FnMut(&str)) -> Result<DemoResult> {
    let t0 = Instant::now();
    let data = cfg.out.join("data");
    let manifest =
        crate::data::synth::generate_with(&data, cfg.images, 64, cfg.seed, cfg.shortcut)?;
    log(&format!(
        "synthesized {} images into {} ({:.1}s)",
        manifest.items.len(),
        data.display(),
        t0.elapsed().as_secs_f64()
    ));
    let mut rc = crate::run::preset("tiny")?;
    rc.manifest = manifest.path.clone();
    rc.out = cfg.out.clone();
    rc.epochs = cfg.epochs;
    rc.device = cfg.device.to_string();
    rc.train.lr = cfg.lr;
    rc.train.micro_batch = cfg.batch;
    rc.train.effective_batch = cfg.batch;
    rc.train.seed = cfg.seed;
    let outcome = crate::run::train(&rc, &mut log)?;
    // Evaluate the best epoch on the out-of-domain test split.
    let best = crate::sd2::detector::Detector::load(&outcome.best_dir, None, cfg.device)?;
    let class_u = class_embeddings(
        &best.model,
        &ClipTokenizer::openai()?,
        &TypeTexts::shipped()?,
    )?;
    let m = &outcome.manifest;
    let vp = predict_items(&best.model, &class_u, &m.split(Split::Val), 128)?;
    let tp = predict_items(&best.model, &class_u, &m.split(Split::Test), 128)?;
    let rep = report::report(&tp, &vp);
    let eval_dir = cfg.out.join("eval");
    report::write(&eval_dir, &rep, &tp)?;
    Ok(DemoResult {
        report: rep,
        eval_dir,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// For `sd2 demo --out`: the manifest written by the demo.
pub fn manifest_path(out: &Path) -> PathBuf {
    out.join("data").join("manifest.jsonl")
}
