//! `sd2 demo`: the main job on a fresh machine. Synthesizes a small forgery benchmark, trains the
//! `tiny` preset on its training sources, picks the best epoch on the validation split, and
//! evaluates on the out-of-domain test sources. No pretrained CLIP can be downloaded here, so
//! the tiny CLIP starts from random weights and is trained whole (`train_base`); LoRA, CLAM and
//! the three losses are all on.
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::clip::{ClipConfig, ClipModel, ClipTokenizer};
use crate::data::loader::load_pixels;
use crate::data::{Item, Split};
use crate::eval::report::{self, Pred, Report};
use crate::rng::Rng;
use crate::sd2::detector::{class_embeddings, predict_pixels};
use crate::sd2::train::{MicroBatch, TrainConfig, Trainer};
use crate::sd2::{Sd2Config, Sd2Model, TypeTexts};
use crate::{DType, Device, Result};

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
    let train: Vec<&Item> = manifest.split(Split::Train);
    let val: Vec<&Item> = manifest.split(Split::Val);
    let test: Vec<&Item> = manifest.split(Split::Test);
    let steps_per_epoch = train.len().div_ceil(cfg.batch);
    let tcfg = TrainConfig {
        lr: cfg.lr,
        total_steps: steps_per_epoch * cfg.epochs,
        micro_batch: cfg.batch,
        effective_batch: cfg.batch,
        seed: cfg.seed,
        ..Default::default()
    };
    let clip = ClipModel::random(&tiny_clip_config(), DType::F32, cfg.device, cfg.seed)?;
    let model = Sd2Model::new(clip, tiny_sd2_config(), cfg.seed)?;
    let tokenizer = ClipTokenizer::openai()?;
    let texts = TypeTexts::shipped()?;
    let mut trainer = Trainer::new(model, tcfg.clone(), ClipTokenizer::openai()?, texts.clone());
    let ckpt = cfg.out.join("checkpoints");
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = Rng::new(cfg.seed ^ 0xde70);
    let t_train = Instant::now();
    for epoch in 0..cfg.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for (k, chunk) in order.chunks(cfg.batch).enumerate() {
            let items: Vec<&Item> = chunk.iter().map(|i| train[*i]).collect();
            let px = load_pixels(
                &items,
                64,
                Some((cfg.seed, epoch as u64)),
                DType::F32,
                cfg.device,
            )?;
            let mb = MicroBatch {
                pixel_values: px,
                labels: items.iter().map(|i| i.label).collect(),
                face: items.iter().map(|i| i.face.clone()).collect(),
                env: items.iter().map(|i| i.env.clone()).collect(),
            };
            let l = trainer.step(&[mb])?;
            let done = trainer.steps() as f64;
            if k % 25 == 0 || k + 1 == steps_per_epoch {
                let rate = done / t_train.elapsed().as_secs_f64().max(1e-9);
                let eta = (tcfg.total_steps as f64 - done) / rate.max(1e-9);
                log(&format!(
                    "epoch {}/{} step {}/{}: loss {:.4} (L_C {:.4}), {:.0} img/s, ETA {:.0}s",
                    epoch + 1,
                    cfg.epochs,
                    k + 1,
                    steps_per_epoch,
                    l.total,
                    l.l_c,
                    l.images_per_sec,
                    eta
                ));
            }
        }
        let class_u = class_embeddings(&trainer.model, &tokenizer, &texts)?;
        let vp = predict_items(&trainer.model, &class_u, &val, 128)?;
        let vr = report::report(&vp, &[]);
        let best = trainer.save_with_best(&ckpt, vr.overall.auc)?;
        log(&format!(
            "epoch {}: validation AUC {:.4}{}",
            epoch + 1,
            vr.overall.auc,
            if best { " (best so far)" } else { "" }
        ));
    }
    // Evaluate the best epoch on the out-of-domain test split.
    let best = crate::sd2::detector::Detector::load(&ckpt.join("best"), None, cfg.device)?;
    let class_u = class_embeddings(&best.model, &tokenizer, &texts)?;
    let vp = predict_items(&best.model, &class_u, &val, 128)?;
    let tp = predict_items(&best.model, &class_u, &test, 128)?;
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
