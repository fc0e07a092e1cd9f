//! The SD2 trainer (SD2-SPEC §5): AdamW with decoupled weight decay (none on biases, norms,
//! `logit_scale`, t', b), linear warmup then cosine, gradient accumulation of micro-batches into
//! one optimizer step, global-norm clipping, and one seed that makes a CPU run bit-reproducible —
//! across a checkpoint and resume too.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::model::{Sd2Batch, Sd2Model};
use super::type_texts::TypeTexts;
use super::DualContrast;
use crate::clip::model::Fwd;
use crate::clip::{ClipConfig, ClipModel, ClipTokenizer};
use crate::optim::{AdamW, AdamWConfig, GradNorm};
use crate::rng::{mix64, Rng};
use crate::{Error, GradStore, Result, Tensor};

/// The optimization side of an SD2 run (SD2-SPEC §5): AdamW, the learning-rate schedule, batch
/// sizes, the seed and what a non-finite step does. Saved in every checkpoint's `state.json`;
/// unknown keys are an error. [`TrainConfig::validate`] checks the ranges.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate, reached at the end of warmup (5e-7); the schedule is
    /// [`TrainConfig::lr_at`].
    pub lr: f64,
    /// Fraction of `total_steps` spent in linear warmup.
    pub warmup_frac: f64,
    /// Optimizer steps of the whole run (the cosine reaches 0 there).
    pub total_steps: usize,
    /// Images per optimizer step, reached by accumulating micro-batches.
    pub effective_batch: usize,
    /// Images per forward and backward pass (32). `sd2 train` cuts each step's images into
    /// micro-batches of this size, and 0 there means the largest that fits the GPU's memory
    /// ([`Trainer::auto_micro_batch`]). [`Trainer::step`] takes whatever micro-batches it is given.
    pub micro_batch: usize,
    /// AdamW's first-moment decay (0.9), in [0, 1).
    pub beta1: f64,
    /// AdamW's second-moment decay (0.999), in [0, 1).
    pub beta2: f64,
    /// AdamW's epsilon, added to the denominator (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (0.01) of the parameters flagged for it: weights, not biases, norms,
    /// embeddings, `logit_scale`, t' or b. `lr · weight_decay` must be below 1.
    pub weight_decay: f64,
    /// Global gradient-norm limit (1.0): when the L2 norm over all gradients exceeds it, they are
    /// scaled down to it. `inf` turns clipping off.
    pub clip_norm: f64,
    /// Seed of the run. The trainer derives its type-text draws and dropout masks from it (with the
    /// step); `sd2 train` also uses it for the model's initialisation, the shuffles and the
    /// augmentations. The same seed and data give a bit-identical CPU run.
    pub seed: u64,
    /// Draw one of each class's training phrasings per step (SD2); false uses the fixed test
    /// phrase throughout — for a text tower trained from scratch (the `tiny` preset), which has
    /// no paraphrase knowledge to start from.
    pub sample_type_texts: bool,
    /// Recompute each encoder block's activations in backward instead of keeping them: about
    /// a third more compute for a fraction of the activation memory (a larger micro-batch).
    pub recompute: bool,
    /// What a step with a non-finite loss term or gradient norm does (the update is skipped
    /// whenever the norm is not finite): `stop` (the default) fails naming the step and the
    /// terms; `skip` goes on and counts it (`Trainer::skipped_steps`, `skipped` in the log).
    pub on_nonfinite: OnNonFinite,
    /// Under `on_nonfinite = "skip"`, this many skipped steps in a row stop the run (a model
    /// that no longer trains): 0 never stops.
    pub max_skips_in_a_row: usize,
    /// Where L_D's negatives come from on several ranks: `rank` (the default: each rank's own
    /// micro-batch, the paper's micro-batch negatives) or `all_ranks` (every rank's
    /// descriptions of the same round of micro-batches — world × micro-batch negatives, the
    /// loss of one process training on the round as one micro-batch). One process: the same.
    pub dual_negatives: DualNegatives,
    /// Across processes: the trainable gradients are summed in buckets of about this many
    /// MB (f32), each started as soon as backward is done with it, so the sums overlap the
    /// rest of backward ([`crate::dist::buckets`]); 0 sums them all in one collective after
    /// backward. Gathered L_D negatives (collectives inside backward) always sum after it.
    pub grad_bucket_mb: f64,
}

/// `TrainConfig::dual_negatives`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DualNegatives {
    /// Each rank's own micro-batch.
    #[default]
    Rank,
    /// Every rank's micro-batch of the same round, gathered with their gradient
    /// ([`crate::dist::gather_rows`]).
    AllRanks,
}

/// `TrainConfig::on_nonfinite`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Fail the step with `Error::NonFinite`.
    #[default]
    Stop,
    /// Skip the update, count the step and go on (AMP's loss scaler does the same).
    Skip,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 5e-7,
            warmup_frac: 0.05,
            total_steps: 1000,
            effective_batch: 1024,
            micro_batch: 32,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            clip_norm: 1.0,
            seed: 0,
            sample_type_texts: true,
            recompute: false,
            on_nonfinite: OnNonFinite::Stop,
            max_skips_in_a_row: 20,
            dual_negatives: DualNegatives::Rank,
            grad_bucket_mb: 4.0,
        }
    }
}

fn out_of_range(key: &str, msg: String) -> Error {
    Error::Config {
        key: key.into(),
        msg,
    }
}

impl TrainConfig {
    /// Every value in its range, the first that is not named by its key (`train.lr`).
    pub fn validate(&self) -> Result<()> {
        let k = |name: &str| format!("train.{name}");
        if !(self.grad_bucket_mb.is_finite() && self.grad_bucket_mb >= 0.0) {
            return Err(out_of_range(
                &k("grad_bucket_mb"),
                format!("{} must be finite and ≥ 0", self.grad_bucket_mb),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(out_of_range(
                &k("lr"),
                format!("{} must be finite and > 0", self.lr),
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_frac) {
            return Err(out_of_range(
                &k("warmup_frac"),
                format!("{} must be in [0, 1]", self.warmup_frac),
            ));
        }
        if self.effective_batch == 0 {
            return Err(out_of_range(&k("effective_batch"), "must be ≥ 1".into()));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(out_of_range(&k(name), format!("{b} must be in [0, 1)")));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(out_of_range(
                &k("eps"),
                format!("{} must be finite and > 0", self.eps),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(out_of_range(
                &k("weight_decay"),
                format!("{} must be finite and ≥ 0", self.weight_decay),
            ));
        }
        if self.lr * self.weight_decay >= 1.0 {
            return Err(out_of_range(
                &k("weight_decay"),
                format!(
                    "lr · weight_decay = {} ≥ 1 would flip or zero every decayed weight each step",
                    self.lr * self.weight_decay
                ),
            ));
        }
        if self.clip_norm.is_nan() || self.clip_norm <= 0.0 {
            return Err(out_of_range(
                &k("clip_norm"),
                format!("{} must be > 0 (inf: no clipping)", self.clip_norm),
            ));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let total = self.total_steps.max(1) as f64;
        let warm = (self.warmup_frac * total).ceil().max(1.0);
        let s = step as f64;
        if s < warm {
            self.lr * (s + 1.0) / warm
        } else {
            let p = ((s - warm) / (total - warm).max(1.0)).min(1.0);
            self.lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }
}

/// One micro-batch of training data: normalized pixels, class ids, descriptions.
pub struct MicroBatch {
    /// Normalized pixels [n, 3, H, W] on the model's device; cast to the model's dtype.
    pub pixel_values: Tensor,
    /// Class id of each image, 0..5 in `CLASSES` order.
    pub labels: Vec<usize>,
    /// One face description per image, in image order; read only when `loss_dual` is not `Off`.
    pub face: Vec<String>,
    /// One environment description per image, in image order; read only under `FaceEnv`.
    pub env: Vec<String>,
}

/// What one optimizer step did (one JSON line per step).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepLog {
    /// Index of the step, from 0 (the count before this step).
    pub step: u64,
    /// L_C, averaged over the step's images (each micro-batch weighted by its share of them),
    /// without its weight `w_c`.
    pub l_c: f64,
    /// L_S, averaged the same way, when `loss_separation` is on.
    pub l_s: Option<f64>,
    /// L_D, averaged the same way, when `loss_dual` is not `Off`.
    pub l_d: Option<f64>,
    /// The weighted total loss, averaged the same way.
    pub total: f64,
    /// Learning rate of this step ([`TrainConfig::lr_at`]).
    pub lr: f64,
    /// Global L2 norm of the step's gradients, before clipping.
    pub grad_norm: f64,
    /// The step's images divided by its wall-clock time, measured on the host up to the read of the
    /// loss terms (so the device's work is included).
    pub images_per_sec: f64,
    /// A non-finite loss term or norm under `on_nonfinite = "skip"` (the update was skipped
    /// when the norm was the non-finite one).
    pub skipped: bool,
}

impl StepLog {
    /// The record as one line of JSON (the per-step log line). Should serialization fail, a JSON
    /// object with an `error` key.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// Trains an [`Sd2Model`]: one optimizer step per call of [`Trainer::step`], and checkpoints
/// written by [`Trainer::write_files`] and read back by [`Trainer::resume`]. It holds the AdamW
/// state, the RNG of the type-text draws, the tokenizer, the type texts and the step count, so a
/// resumed run goes on exactly as an uninterrupted one.
pub struct Trainer {
    /// The model being trained; AdamW updates its `params()`.
    pub model: Sd2Model,
    /// The training configuration. `sd2 train` rewrites it after `new` (the resolved micro-batch
    /// and total steps); AdamW's betas, eps and weight decay are read once, in `new`.
    pub cfg: TrainConfig,
    opt: AdamW,
    rng: Rng,
    tokenizer: ClipTokenizer,
    type_texts: TypeTexts,
    step: u64,
    /// Steps met with a non-finite loss or norm under `on_nonfinite = "skip"`.
    skipped: u64,
    /// Of those, how many in a row up to the last step.
    skipped_in_a_row: u64,
    /// (texts, tokens per text) of each text-tower pass of the last step (the class phrases,
    /// then each micro-batch's descriptions): for the launch plan's traffic floor.
    text_passes: std::sync::Mutex<Vec<(usize, usize)>>,
    /// The fake-score threshold chosen on validation data at the last evaluation (the
    /// accuracy-maximizing one); saved in `state.json` as `threshold`, where
    /// `Detector::threshold` reads it.
    pub val_threshold: Option<f64>,
    /// The data-parallel job this trainer is one rank of ([`crate::dist::Single`] alone).
    comm: std::sync::Arc<dyn crate::dist::Comm>,
    /// What the last step's bucketed gradient sum did (None in one process).
    last_sync: Option<crate::dist::buckets::SyncStats>,
}

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    step: u64,
    rng_state: u64,
    sd2: super::Sd2Config,
    train: TrainConfig,
    clip: ClipConfig,
    /// Validation metric of this checkpoint, when one was given.
    metric: Option<f64>,
    /// Steps skipped for non-finite values so far.
    #[serde(default)]
    skipped: u64,
    /// AdamW's update count (its bias correction): `step` less the updates skipped for a
    /// non-finite norm. Absent in older checkpoints, which had no skips.
    #[serde(default)]
    opt_steps: Option<u64>,
    /// The fake-score threshold chosen on validation data, when the run had a val split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    threshold: Option<f64>,
}

/// A checkpoint file or folder that cannot be used.
fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::checkpoint(path, e)
}

/// A failed filesystem operation while saving (its text has no room for `Error::Write`'s).
fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}: {e}", path.display()))
}

impl Trainer {
    /// A trainer at step 0 with empty AdamW state, its RNG seeded from `cfg.seed`. `cfg` is not
    /// validated here ([`TrainConfig::validate`]).
    pub fn new(
        model: Sd2Model,
        cfg: TrainConfig,
        tokenizer: ClipTokenizer,
        type_texts: TypeTexts,
    ) -> Trainer {
        let opt = AdamW::new(AdamWConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        });
        let rng = Rng::new(mix64(cfg.seed ^ 0x7472_6169_6e00));
        Trainer {
            model,
            cfg,
            opt,
            rng,
            tokenizer,
            type_texts,
            step: 0,
            skipped: 0,
            skipped_in_a_row: 0,
            text_passes: Default::default(),
            val_threshold: None,
            comm: std::sync::Arc::new(crate::dist::Single),
            last_sync: None,
        }
    }

    /// Makes this trainer one rank of a data-parallel job (`crate::dist`): each
    /// [`Trainer::step`] then takes this rank's micro-batches of the step — its `k`-th being the
    /// step's micro-batch `k · world + rank` (`dist::micro_batch_index`) — sums the gradients and
    /// loss terms over the ranks and takes the same update on every rank. Every rank must start
    /// from the same weights and seed (the same `Sd2Model::new` seed, or the same checkpoint).
    pub fn set_comm(&mut self, comm: std::sync::Arc<dyn crate::dist::Comm>) {
        self.comm = comm;
    }

    /// The job this trainer is a rank of.
    pub fn comm(&self) -> &dyn crate::dist::Comm {
        self.comm.as_ref()
    }

    /// How the last step summed its gradients over the ranks: buckets, and how many of them
    /// started during backward (None in one process, or before the first step).
    pub fn last_grad_sync(&self) -> Option<crate::dist::buckets::SyncStats> {
        self.last_sync
    }

    /// (texts, tokens per text) of each pass through the text tower in the last step — the
    /// class phrases, then each micro-batch's descriptions, each tokenized to its longest.
    pub fn last_text_passes(&self) -> Vec<(usize, usize)> {
        self.text_passes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note_text_pass(&self, rows: usize, width: usize) {
        self.text_passes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((rows, width));
    }

    /// Steps met with a non-finite loss term or norm under `on_nonfinite = "skip"`.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Optimizer steps taken (skipped ones included).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The model's batch for a micro-batch: class phrases and the descriptions the losses use
    /// tokenized together on the host (one width, one upload; the model then needs no padding,
    /// which would read ids back).
    fn sd2_batch(&self, mb: &MicroBatch, phrases: &[&str]) -> Result<Sd2Batch> {
        self.batch_with(mb, phrases, None)
    }

    /// Class ids [5, S] (and their host copy) of one phrasing per class.
    fn class_ids(&self, phrases: &[&str]) -> Result<(Tensor, Vec<i64>)> {
        let ctx = self.model.clip.config.text_config.max_position_embeddings;
        let (host, width) = self.tokenizer.tokenize_batch_longest_host(phrases, ctx)?;
        self.note_text_pass(phrases.len(), width);
        let device = self.model.clip.logit_scale.device();
        Ok((
            Tensor::from_vec(host.clone(), (phrases.len(), width), device)?,
            host,
        ))
    }

    /// `sd2_batch` with `phrases` tokenized in front of the descriptions, or (`type_ids`
    /// given, `phrases` empty) the descriptions alone for `Sd2Model::losses_given_classes`.
    fn batch_with(
        &self,
        mb: &MicroBatch,
        phrases: &[&str],
        type_ids: Option<&Tensor>,
    ) -> Result<Sd2Batch> {
        let (n, dual) = (mb.labels.len(), self.model.cfg.loss_dual);
        let device = self.model.clip.logit_scale.device();
        let (face, env) = (dual != DualContrast::Off, dual == DualContrast::FaceEnv);
        let mut texts: Vec<&str> = phrases.to_vec();
        for (v, what, used) in [(&mb.face, "face", face), (&mb.env, "env", env)] {
            if !used {
                continue;
            }
            if v.len() != n {
                return Err(Error::invalid(
                    "train step",
                    format!("{} {what} descriptions for {n} images", v.len()),
                ));
            }
            texts.extend(v.iter().map(|s| s.as_str()));
        }
        let ctx = self.model.clip.config.text_config.max_position_embeddings;
        let (host_ids, ids) = if texts.is_empty() {
            (None, None)
        } else {
            let (host, width) = self.tokenizer.tokenize_batch_longest_host(&texts, ctx)?;
            self.note_text_pass(texts.len(), width);
            let ids = Tensor::from_vec(host.clone(), (texts.len(), width), device)?;
            (Some(host), Some(ids))
        };
        let ids = || {
            ids.clone()
                .ok_or_else(|| Error::Msg("train step: no texts to tokenize".into()))
        };
        let p = phrases.len();
        Ok(Sd2Batch {
            pixel_values: mb.pixel_values.clone(),
            labels: Tensor::from_vec(
                mb.labels.iter().map(|l| *l as i64).collect::<Vec<_>>(),
                n,
                device,
            )?,
            type_ids: match type_ids {
                Some(t) => t.clone(),
                None => ids()?.narrow(0, 0, p)?,
            },
            face_ids: face.then(|| ids()?.narrow(0, p, n)).transpose()?,
            env_ids: env.then(|| ids()?.narrow(0, p + n, n)).transpose()?,
            host_ids,
        })
    }

    /// The largest micro-batch that fits the device's memory (GPU; None elsewhere), at most
    /// `max`: forward + backward (no optimizer step, nothing changes) at 2 and 4 random
    /// images of `size` px with descriptions, a linear fit of the peak bytes, 90% of what
    /// tensors could occupy; rounded down to a multiple of 8 from 8 on. `staged` images' pixels
    /// beyond the micro-batch also live on the device meanwhile (`DeviceBatches` copying the
    /// next step: about one effective batch plus one micro-batch), so they are set aside.
    pub fn auto_micro_batch(
        &self,
        size: usize,
        max: usize,
        staged: usize,
    ) -> Result<Option<usize>> {
        let device = self.model.clip.logit_scale.device();
        let Some(mem) = crate::backend::cuda::device_memory(device) else {
            return Ok(None);
        };
        let usable = mem.usable();
        let probe = |b: usize| -> Result<usize> {
            let mut rng = Rng::new(0x9e37 + b as u64);
            let px: Vec<f64> = (0..b * 3 * size * size).map(|_| rng.normal()).collect();
            let descriptions: Vec<String> = (0..b)
                .map(|i| format!("a face and a room, photo {i}"))
                .collect();
            let mb = MicroBatch {
                pixel_values: Tensor::from_f64(
                    &px,
                    (b, 3, size, size),
                    self.model.dtype(),
                    device,
                )?,
                labels: (0..b).map(|i| i % 5).collect(),
                face: descriptions.clone(),
                env: descriptions,
            };
            crate::backend::cuda::reset_peak(device);
            let batch = self.sd2_batch(&mb, &self.type_texts.test_phrases())?;
            let losses = self.model.losses(
                &batch,
                Fwd {
                    dropout_seed: Some(1),
                    recompute: self.cfg.recompute,
                },
            )?;
            let grads = losses.total.backward()?;
            drop(grads);
            losses.total.to_scalar()?; // waits for the device
            Ok(crate::backend::cuda::device_memory(device).map_or(0, |m| m.peak))
        };
        let (p2, p4) = (probe(2)?, probe(4)?);
        // The staged copy of the next step: `staged` images plus one more micro-batch, which
        // the per-image slope covers by counting each image's pixels twice.
        let image = 3 * size * size * self.model.dtype().size_in_bytes();
        Ok(Some(fit_micro_batch(
            (2, p2 + 2 * image),
            (4, p4 + 4 * image),
            (usable * 9 / 10).saturating_sub(staged * image),
            max,
        )))
    }

    /// One optimizer step over `micro` (accumulated; each micro-batch's loss weighted by its
    /// share of the images), one type-text phrasing per class for the whole step.
    pub fn step(&mut self, micro: &[MicroBatch]) -> Result<StepLog> {
        let t0 = Instant::now();
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let local_images: usize = micro.iter().map(|m| m.labels.len()).sum();
        let dual = self.model.cfg.loss_dual;
        let gathered = world > 1
            && dual != DualContrast::Off
            && self.cfg.dual_negatives == DualNegatives::AllRanks;
        // Each micro-batch's loss is weighted by its share of the whole step's images, over
        // every rank: the summed gradient is then the one-process gradient. Gathered
        // negatives also need every rank's micro-batch count.
        let mut all = vec![0.0; if gathered { 1 + world } else { 1 }];
        all[0] = local_images as f64;
        if gathered {
            all[1 + rank] = micro.len() as f64;
        }
        self.comm.all_reduce_f64(&mut all)?;
        let total_images = all[0] as usize;
        if total_images == 0 {
            return Err(Error::invalid("train step", "no images"));
        }
        // Gathered: `rounds` rounds of one micro-batch per rank; rows[r][k] is rank r's k-th
        // micro-batch's size (0 past its last).
        let (rounds, rows) = if gathered {
            let rounds = all[1..].iter().fold(0.0f64, |a, &b| a.max(b)) as usize;
            let mut sizes = vec![0.0; world * rounds];
            for (k, m) in micro.iter().enumerate() {
                sizes[rank * rounds + k] = m.labels.len() as f64;
            }
            self.comm.all_reduce_f64(&mut sizes)?;
            let rows: Vec<Vec<usize>> = (0..world)
                .map(|r| {
                    (0..rounds)
                        .map(|k| sizes[r * rounds + k] as usize)
                        .collect()
                })
                .collect();
            (rounds, rows)
        } else {
            (micro.len(), vec![])
        };
        let round_counts = |k: usize| -> Vec<usize> { rows.iter().map(|r| r[k]).collect() };
        self.text_passes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let phrases = if self.cfg.sample_type_texts {
            self.type_texts.sample(&mut self.rng)
        } else {
            self.type_texts.test_phrases()
        };
        let device = self.model.clip.logit_scale.device();
        let mut grads = GradStore::new();
        // Weighted loss terms stay on the device ([total, L_C, L_S, L_D] per micro-batch) and
        // are read once, after the last backward: no host round trip inside the step.
        let mut terms: Vec<Tensor> = vec![];
        // The five class phrases go through the text tower once per step: each micro-batch
        // sees a fresh leaf over û, and the summed gradient flows back through the tower once.
        let class_range = crate::profile::range("class texts");
        let (class_ids, class_host) = self.class_ids(&phrases)?;
        let u = self.model.class_features(
            &class_ids,
            Some(&class_host),
            Fwd {
                dropout_seed: Some(mix64(self.cfg.seed ^ mix64(self.step) ^ 0x636c_6173)),
                recompute: self.cfg.recompute,
            },
        )?;
        drop(class_range);
        // Across processes, the gradients' sum over the ranks in buckets started as backward
        // finishes with them: during this rank's last micro-batch's backward, and the text
        // tower's (which the class texts' backward still adds to) during that one. Not with
        // gathered negatives: their collectives run inside backward, and the buckets' would
        // interleave with them in a different order on each rank.
        let comm = self.comm.clone();
        let mut sync = if comm.backend() == "single" {
            None
        } else {
            let early = !gathered && self.cfg.grad_bucket_mb > 0.0;
            let bucket_elems = if early {
                ((self.cfg.grad_bucket_mb * 1e6 / 4.0) as usize).max(1)
            } else {
                0
            };
            let deferred = if early && u.is_tracked() {
                crate::autograd::trainable_leaves(&u)?
            } else {
                Default::default()
            };
            let plan = crate::dist::buckets::GradBuckets::new(
                self.model.params(),
                bucket_elems,
                &deferred,
            );
            Some((
                crate::dist::buckets::GradSync::new(comm.as_ref(), plan),
                early,
            ))
        };
        let mut du: Option<Tensor> = None;
        for k in 0..rounds {
            let Some(mb) = micro.get(k) else {
                // Gathered negatives, a round in which this rank has no micro-batch: it still
                // takes part in the others' gathers (forward and, when the descriptions carry
                // gradients, backward).
                let width = self.model.clip.config.projection_dim
                    * if dual == DualContrast::FaceEnv { 2 } else { 1 };
                crate::dist::gather_rows_absent(
                    self.comm.as_ref(),
                    &round_counts(k),
                    width,
                    self.model.master_dtype(),
                    device,
                    u.is_tracked(),
                )?;
                continue;
            };
            let n = mb.labels.len();
            let w = n as f64 / total_images as f64;
            let batch = self.batch_with(mb, &[], Some(&class_ids))?;
            // The step-wide index of the micro-batch: its dropout is the one-process run's.
            let j = crate::dist::micro_batch_index(k, rank, world) as u64;
            let seed = mix64(self.cfg.seed ^ mix64(self.step) ^ j.wrapping_mul(0x9e37_79b9));
            let fwd_range = crate::profile::range_with(|| format!("forward {k}"));
            // A leaf only when gradients can flow on into the text tower.
            let u_leaf = if u.is_tracked() {
                u.detach().into_trainable()
            } else {
                u.clone()
            };
            let fwd = Fwd {
                dropout_seed: Some(seed),
                recompute: self.cfg.recompute,
            };
            let losses = if gathered {
                let counts = round_counts(k);
                let comm = &self.comm;
                let gather = |x: &Tensor| crate::dist::gather_rows(comm, x, &counts);
                self.model
                    .losses_with_negatives(&batch, &u_leaf, fwd, &gather)?
            } else {
                self.model.losses_given_classes(&batch, &u_leaf, fwd)?
            };
            let zero = || Tensor::zeros((), losses.total.dtype(), device);
            let row = [
                losses.total.detach(),
                losses.l_c.detach(),
                losses.l_s.as_ref().map_or_else(zero, |t| Ok(t.detach()))?,
                losses.l_d.as_ref().map_or_else(zero, |t| Ok(t.detach()))?,
            ];
            for t in row {
                terms.push(
                    t.to_dtype(losses.total.dtype())?
                        .scale(w)?
                        .reshape(1usize)?,
                );
            }
            drop(fwd_range);
            let _bwd = crate::profile::range_with(|| format!("backward {k}"));
            let out = losses.total.scale(w)?;
            let seed = Tensor::ones(out.shape().clone(), out.dtype(), out.device())?;
            match sync.as_mut() {
                Some((s, true)) if k + 1 == micro.len() => {
                    out.backward_seeded_hooked(seed, &mut grads, &mut |g, id| s.param_final(g, id))?
                }
                _ => out.backward_seeded(seed, &mut grads)?,
            }
            if let Some(g) = u_leaf
                .is_trainable()
                .then(|| grads.remove(&u_leaf))
                .flatten()
            {
                du = Some(match du {
                    None => g,
                    Some(d) => d.add(&g)?,
                });
            }
        }
        if let Some((s, true)) = sync.as_mut() {
            s.main_done(&grads)?;
        }
        if let (Some(du), true) = (du, u.is_tracked()) {
            let _r = crate::profile::range("backward class texts");
            match sync.as_mut() {
                Some((s, true)) => {
                    u.backward_seeded_hooked(du, &mut grads, &mut |g, id| s.param_final(g, id))?
                }
                _ => u.backward_seeded(du, &mut grads)?,
            }
        }
        if let Some((s, _)) = sync {
            // On a device engine the sums run on their own stream: this range is the wait for
            // what backward did not hide, not the sums' whole time.
            let _r = crate::profile::range("all-reduce gradients (wait)");
            self.last_sync = Some(s.finish(&mut grads)?);
        }
        let opt_range = crate::profile::range("grad norm + AdamW");
        let lr = self.cfg.lr_at(self.step);
        let norm = self
            .opt
            .step_clipped(self.model.params(), &grads, lr, self.cfg.clip_norm)?;
        drop(opt_range);
        drop(grads);
        // The step's one read from the device: the loss terms (and the norm when the device
        // computed it).
        // A rank with no micro-batch in this step has no terms: only the norm, read as f32.
        let dt = terms.first().map_or(crate::DType::F32, |t| t.dtype());
        if let GradNorm::Device(n) = &norm {
            terms.push(n.narrow(0, 0, 1)?.to_dtype(dt)?);
        }
        let refs: Vec<&Tensor> = terms.iter().collect();
        let host = if refs.is_empty() {
            vec![] // a rank with no micro-batch in this step
        } else {
            Tensor::cat(&refs, 0)?.to_vec_f64()?
        };
        let sum = |j: usize| {
            host.iter()
                .take(4 * micro.len())
                .skip(j)
                .step_by(4)
                .sum::<f64>()
        };
        let mut sums = [sum(0), sum(1), sum(2), sum(3)];
        self.comm.all_reduce_f64(&mut sums)?;
        let [total, l_c, l_s, l_d] = sums;
        let norm = match norm {
            GradNorm::Host(n) => n,
            GradNorm::Device(_) => host[4 * micro.len()],
        };
        let mut log = StepLog {
            step: self.step,
            l_c,
            l_s: self.model.cfg.loss_separation.then_some(l_s),
            l_d: (dual != DualContrast::Off).then_some(l_d),
            total,
            lr,
            grad_norm: norm,
            images_per_sec: total_images as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            skipped: false,
        };
        let bad: Vec<String> = [
            ("L_C", Some(l_c)),
            ("L_S", log.l_s),
            ("L_D", log.l_d),
            ("the loss", Some(total)),
            ("the gradient norm", Some(norm)),
        ]
        .iter()
        .filter_map(|(name, v)| {
            v.filter(|v| !v.is_finite())
                .map(|v| format!("{name} = {v}"))
        })
        .collect();
        if !bad.is_empty() {
            if !norm.is_finite() {
                // AdamW skipped the update but counted the step: take the count back.
                self.opt.set_steps(self.opt.steps().saturating_sub(1));
            }
            match self.cfg.on_nonfinite {
                OnNonFinite::Stop => {
                    return Err(Error::NonFinite {
                        context: format!(
                            "training step {}{}",
                            self.step,
                            if norm.is_finite() {
                                ""
                            } else {
                                " (update skipped; train.on_nonfinite = \"skip\" goes on past such steps)"
                            }
                        ),
                        what: bad.join(", "),
                    })
                }
                OnNonFinite::Skip => {
                    self.skipped += 1;
                    self.skipped_in_a_row += 1;
                    log.skipped = true;
                    let limit = self.cfg.max_skips_in_a_row as u64;
                    if limit > 0 && self.skipped_in_a_row >= limit {
                        return Err(Error::NonFinite {
                            context: format!(
                                "training step {}: {} steps in a row skipped \
                                 (train.max_skips_in_a_row), the model no longer trains",
                                self.step, self.skipped_in_a_row
                            ),
                            what: bad.join(", "),
                        });
                    }
                }
            }
        } else {
            self.skipped_in_a_row = 0;
        }
        self.step += 1;
        Ok(log)
    }

    /// Writes a checkpoint folder atomically (a temporary folder renamed into place):
    /// `trainable.safetensors`, `optimizer.safetensors` (AdamW moments) and `state.json`
    /// (step, RNG state, SD2/train/CLIP configs, optional metric). Replacing an existing folder
    /// takes two renames; a run's checkpoints go through `checkpoint::Checkpoints`, which a kill
    /// at any point leaves recoverable.
    pub fn save(&self, dir: &Path, metric: Option<f64>) -> Result<()> {
        let tmp = PathBuf::from(format!("{}.tmp-{}", dir.display(), std::process::id()));
        std::fs::remove_dir_all(&tmp).ok();
        let written = (|| {
            std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
            self.write_files(&tmp, metric)
        })();
        if let Err(e) = written {
            std::fs::remove_dir_all(&tmp).ok();
            return Err(e);
        }
        let old = PathBuf::from(format!("{}.old-{}", dir.display(), std::process::id()));
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| io_err(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
        std::fs::remove_dir_all(&old).ok();
        Ok(())
    }

    /// Writes the checkpoint's three files into the existing folder `dir`, each flushed to the
    /// disk, `state.json` last. A model with a non-finite weight is refused before anything is
    /// written: loaded, it would be a detector that answers anything.
    pub fn write_files(&self, dir: &Path, metric: Option<f64>) -> Result<()> {
        use crate::fs::{fsync, write_synced};
        for p in self.model.params() {
            if let Some((i, v)) = p.tensor.first_non_finite()? {
                return Err(Error::NonFinite {
                    context: format!("checkpoint {} (not saved)", dir.display()),
                    what: format!("trainable tensor `{}` element {i} = {v}", p.name),
                });
            }
        }
        let params = self.model.params();
        let named: Vec<(&str, &Tensor)> = params
            .iter()
            .map(|p| (p.name.as_str(), &p.tensor))
            .collect();
        let file = dir.join("trainable.safetensors");
        crate::io::save(&file, &named, None)?;
        fsync(&file)?;
        let mut moments: Vec<(String, Tensor)> = vec![];
        for p in params {
            if let Some((m, v)) = self.opt.moments(&p.tensor) {
                moments.push((format!("m.{}", p.name), m.clone()));
                moments.push((format!("v.{}", p.name), v.clone()));
            }
        }
        for (name, t) in &moments {
            if let Some((i, v)) = t.first_non_finite()? {
                return Err(Error::NonFinite {
                    context: format!("checkpoint {} (not saved)", dir.display()),
                    what: format!("AdamW moment `{name}` element {i} = {v}"),
                });
            }
        }
        let refs: Vec<(&str, &Tensor)> = moments.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let file = dir.join("optimizer.safetensors");
        crate::io::save(&file, &refs, None)?;
        fsync(&file)?;
        let state = State {
            format: 1,
            step: self.step,
            rng_state: self.rng.state(),
            sd2: self.model.cfg.clone(),
            train: self.cfg.clone(),
            clip: self.model.clip.config.clone(),
            metric,
            skipped: self.skipped,
            opt_steps: Some(self.opt.steps()),
            threshold: self.val_threshold.filter(|t| t.is_finite()),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|e| io_err(dir, e))?;
        write_synced(&dir.join("state.json"), json.as_bytes())?;
        fsync(dir)
    }

    /// Rebuilds a trainer from a checkpoint and the CLIP model it was trained on.
    pub fn resume(
        dir: &Path,
        clip: ClipModel,
        tokenizer: ClipTokenizer,
        type_texts: TypeTexts,
    ) -> Result<Trainer> {
        let state = read_state(dir)?;
        if state.clip != clip.config {
            return Err(Error::mismatch(
                dir.display(),
                "the checkpoint was trained on a CLIP model with a different config than the one \
                 given",
            ));
        }
        let opt_steps = state.opt_steps.unwrap_or(state.step);
        let trainable = dir.join("trainable.safetensors");
        state
            .sd2
            .validate(&clip.config)
            .map_err(|e| err(&dir.join("state.json"), e))?;
        check_trainable_header(&trainable, &state.sd2)?;
        let model = Sd2Model::new(clip, state.sd2.clone(), state.train.seed)?;
        load_trainable(&model, &trainable)?;
        let mut t = Trainer::new(model, state.train.clone(), tokenizer, type_texts);
        let moments: std::collections::HashMap<String, Tensor> =
            crate::io::load(&dir.join("optimizer.safetensors"), crate::Device::Cpu)?
                .into_iter()
                .collect();
        for p in t.model.params() {
            match (
                moments.get(&format!("m.{}", p.name)),
                moments.get(&format!("v.{}", p.name)),
            ) {
                (Some(m), Some(v)) => t.opt.restore(opt_steps, &p.tensor, m.clone(), v.clone())?,
                (None, None) => {}
                _ => {
                    return Err(err(
                        &dir.join("optimizer.safetensors"),
                        format!("moments of `{}` are incomplete", p.name),
                    ))
                }
            }
        }
        t.opt.set_steps(opt_steps);
        t.step = state.step;
        t.val_threshold = state.threshold;
        t.skipped = state.skipped;
        t.rng = Rng::from_state(state.rng_state);
        Ok(t)
    }
}

/// The metric a checkpoint was saved with, if it has one and can be read.
pub(crate) fn checkpoint_metric(dir: &Path) -> Option<f64> {
    read_state(dir).ok().and_then(|s| s.metric)
}

fn read_state(dir: &Path) -> Result<State> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::read(&p, e))?;
    let s: State = serde_json::from_str(&text)
        .map_err(|e| err(&p, format!("invalid checkpoint state: {e}")))?;
    if s.format != 1 {
        return Err(err(&p, format!("unknown checkpoint format {}", s.format)));
    }
    // Sizes from a file: bounded before a model is built from them.
    s.clip.validate().map_err(|e| err(&p, e))?;
    Ok(s)
}

/// Checks a checkpoint's SD2 config against the shapes its `trainable.safetensors` header
/// holds, before a model is built from it (only the header is read): the LoRA rank sizes every
/// adapter, so a `state.json` that disagrees with its own weights is refused up front.
pub fn check_trainable_header(path: &Path, cfg: &super::Sd2Config) -> Result<()> {
    let store = crate::io::WeightStore::open(path)?;
    let first_a = store
        .names()
        .find(|n| n.ends_with(".lora_A.weight"))
        .cloned();
    if let Some(name) = first_a {
        let shape = store.shape(&name)?;
        if shape.first() != Some(&cfg.lora.rank) {
            return Err(err(
                path,
                format!(
                    "tensor `{name}` has shape {shape:?} (rank {}), but the checkpoint's \
                     state.json says sd2.lora.rank = {}",
                    shape.first().copied().unwrap_or(0),
                    cfg.lora.rank
                ),
            ));
        }
    }
    Ok(())
}

/// Loads every trainable tensor of `model` from a safetensors file: each must be present with
/// its shape; names the model does not have are an error too.
pub fn load_trainable(model: &Sd2Model, path: &Path) -> Result<()> {
    let mut store = crate::io::WeightStore::open(path)?;
    let mut values = vec![];
    for p in model.params() {
        if !store.contains(&p.name) {
            return Err(err(path, format!("missing trainable tensor `{}`", p.name)));
        }
        let t = store.get(
            &p.name,
            p.tensor.dims(),
            p.tensor.dtype(),
            p.tensor.device(),
        )?;
        if let Some((i, v)) = t.first_non_finite()? {
            return Err(Error::NonFinite {
                context: format!("{} (refused)", path.display()),
                what: format!("trainable tensor `{}` element {i} = {v}", p.name),
            });
        }
        values.push((p.name.clone(), t));
    }
    let extra = store.unused(|_| false);
    if !extra.is_empty() {
        return Err(err(
            path,
            format!("tensors this SD2 model does not have: {}", extra.join(", ")),
        ));
    }
    model.set_params(&values)
}

/// The micro-batch whose peak memory, on the line through two probes (batch, peak bytes),
/// stays within `budget`; clamped to 1..=max, and a multiple of 8 from 8 on.
pub fn fit_micro_batch(a: (usize, usize), b: (usize, usize), budget: usize, max: usize) -> usize {
    let max = max.max(1);
    let per = (b.1 as f64 - a.1 as f64) / (b.0 as f64 - a.0 as f64).max(1.0);
    if per <= 0.0 {
        return max;
    }
    let base = a.1 as f64 - per * a.0 as f64;
    let n = ((budget as f64 - base) / per).floor();
    let n = if n.is_finite() && n >= 1.0 {
        n as usize
    } else {
        1
    };
    let n = n.min(max);
    if n >= 8 {
        n / 8 * 8
    } else {
        n
    }
}

#[cfg(test)]
mod micro_batch_tests {
    use super::fit_micro_batch;

    #[test]
    fn fits_the_line_through_two_probes() {
        const G: usize = 1 << 30;
        // 10 GiB of weights, 0.5 GiB per image, a 70 GiB budget: 120 images.
        let (p2, p4) = (10 * G + G, 10 * G + 2 * G);
        assert_eq!(fit_micro_batch((2, p2), (4, p4), 70 * G, 1024), 120);
        // capped by the effective batch, rounded to a multiple of 8
        assert_eq!(fit_micro_batch((2, p2), (4, p4), 70 * G, 100), 96);
        assert_eq!(fit_micro_batch((2, p2), (4, p4), 70 * G, 5), 5);
        // nothing fits beyond the probes' base: 1
        assert_eq!(fit_micro_batch((2, p2), (4, p4), 10 * G, 64), 1);
        // flat measurements (memory does not grow): the cap
        assert_eq!(fit_micro_batch((2, p2), (4, p2), 70 * G, 64), 64);
    }
}
