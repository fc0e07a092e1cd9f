//! Training runs from a config (`sd2 train --config FILE.toml [--set key=value …]`): a preset
//! gives every default, the file's tables override it, `--set` overrides both. Each epoch trains
//! over the manifest's train split (micro-batches accumulated to the effective batch), then
//! evaluates on its val split and keeps `checkpoints/best` by validation AUC.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::clip::{ClipModel, ClipTokenizer};
use crate::data::augment::AugmentConfig;
use crate::data::loader::{DeviceBatches, Prefetcher, Transform};
use crate::data::shards::{ShardIndex, ShardStream, StreamOptions};
use crate::data::{Item, LoadOptions, Manifest, Split};
use crate::dist::Comm;
use crate::eval::report;
use crate::rng::Rng;
use crate::sd2::detector::class_embeddings;
use crate::sd2::train::{MicroBatch, TrainConfig, Trainer};
use crate::sd2::{DualContrast, Sd2Config, Sd2Model, TypeTexts};
use crate::{DType, Device, Error, Result};
use std::sync::Arc;

/// A training run's whole configuration: the TOML of `sd2 train --config`, on top of a
/// preset (see [`load_config`]). Unknown keys are refused. The resolved config is saved as
/// `out/config.toml`, so `--resume` needs nothing else.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// `tiny` (random-init CLIP trained whole) or `vit-l14` (a local CLIP folder in `clip`).
    pub preset: String,
    /// What to train on: a manifest (JSON Lines), or a pack (`sd2 pack`'s folder or its
    /// `shards.json`), streamed from its shards. Its val split picks `checkpoints/best`.
    pub manifest: PathBuf,
    /// Run folder: `config.toml`, `train_log.jsonl` and `checkpoints/` (with `last` and
    /// `best`). One `sd2 train` at a time may use it (a lock file).
    pub out: PathBuf,
    /// A local CLIP folder to start from. Required by `vit-l14`; `tiny` without one starts
    /// from random weights.
    #[serde(default)]
    pub clip: Option<PathBuf>,
    /// Passes over the train split (at least 1).
    pub epochs: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, or `bf16`: bf16 activations and frozen CLIP weights with f32 masters of every
    /// trainable tensor (needs `sd2.train_base = false`).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Leave bad manifest lines and images that fail to decode out (each reported) instead of
    /// failing, in training and in validation.
    #[serde(default)]
    pub skip_bad: bool,
    /// Decode every image of the manifest in full before training (`LoadOptions::verify_images`).
    #[serde(default)]
    pub verify_images: bool,
    /// The model (`[sd2]`): LoRA, CLAM, which losses.
    pub sd2: Sd2Config,
    /// Optimization (`[train]`): learning rate and schedule, batch sizes, seed.
    pub train: TrainConfig,
    /// Train-time augmentations (SD2-SPEC §5).
    #[serde(default)]
    pub augment: AugmentConfig,
    /// When checkpoints are written besides each epoch's end.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// When `manifest` is a pack (`sd2 pack`'s folder): the shuffle buffer's capacity, in
    /// samples (shards are also read in an order shuffled per epoch).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
}

fn default_shuffle_buffer() -> usize {
    2000
}

/// `[checkpoint]`: a checkpoint every `every_steps` optimizer steps and/or every
/// `every_minutes` minutes (0 turns either off), besides the one at each epoch's end.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Optimizer steps between mid-epoch checkpoints (0: off).
    pub every_steps: usize,
    /// Minutes between mid-epoch checkpoints (0: off; default 30). Finite and ≥ 0.
    pub every_minutes: f64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_steps: 0,
            every_minutes: 30.0,
        }
    }
}

/// How `train_with` treats a run folder that already holds a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Refuse a folder that holds checkpoints or a train log.
    Fresh,
    /// Remove the previous run's checkpoints, log and config first.
    Overwrite,
    /// Continue from `checkpoints/last` (a fresh start when there is none).
    Resume,
}

/// What a checkpoint records of the run around the trainer (`run.json`): enough to continue
/// mid-epoch bit-identically.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct RunState {
    micro: usize,
    per_step: usize,
    /// The best epoch metric so far (validation AUC; the epoch index without one).
    best_metric: Option<f64>,
    /// Its validation AUC (NaN without a two-class val split).
    #[serde(default)]
    best_val: Option<f64>,
    /// What the step ↔ data mapping was made from: a resume that sees others is refused.
    #[serde(default)]
    train_len: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    /// A pack's stream: its shuffle buffer and a digest of its index (a resume replays the
    /// stream, so both must be the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shuffle_buffer: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pack: Option<String>,
}

fn default_dtype() -> String {
    "f32".into()
}

impl RunConfig {
    /// Every value in its range before anything is loaded or trained: the train, SD2 and
    /// augmentation values, the epochs, the dtype and the device name, each error naming its
    /// key.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::Config {
                key: "epochs".into(),
                msg: "must be ≥ 1 (a run of no epochs has no checkpoint to report)".into(),
            });
        }
        compute_dtype(&self.dtype).map_err(|e| Error::Config {
            key: "dtype".into(),
            msg: e.to_string(),
        })?;
        Device::parse(&self.device).map_err(|e| Error::Config {
            key: "device".into(),
            msg: e.to_string(),
        })?;
        let m = self.checkpoint.every_minutes;
        if !(m.is_finite() && m >= 0.0) {
            return Err(Error::Config {
                key: "checkpoint.every_minutes".into(),
                msg: format!("{m} must be finite and ≥ 0 (0: off)"),
            });
        }
        self.train.validate()?;
        self.sd2.validate_values()?;
        self.augment.validate()
    }
}

/// The compute dtype a run config names.
pub fn compute_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::invalid(
            format!("dtype `{other}`"),
            "expected f32 or bf16",
        )),
    }
}

/// The preset's full configuration (manifest and out still to be given).
pub fn preset(name: &str) -> Result<RunConfig> {
    let crate::presets::Preset {
        sd2,
        train,
        augment,
        ..
    } = crate::presets::get(name)?;
    Ok(RunConfig {
        preset: name.into(),
        manifest: PathBuf::new(),
        out: PathBuf::from("runs/sd2"),
        clip: None,
        epochs: 4,
        device: "cpu".into(),
        dtype: default_dtype(),
        skip_bad: false,
        verify_images: false,
        sd2,
        train,
        augment,
        checkpoint: CheckpointConfig::default(),
        shuffle_buffer: default_shuffle_buffer(),
    })
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Preset ← file ← `key=value` overrides (dotted keys; values parsed as TOML, else strings).
pub fn load_config(
    file: Option<&Path>,
    preset_name: Option<&str>,
    sets: &[String],
) -> Result<RunConfig> {
    let file_val: Option<toml::Value> = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::read(p, e))?;
            Some(toml::from_str(&text).map_err(|e| Error::parse(p.display(), e))?)
        }
        None => None,
    };
    let name = preset_name
        .map(String::from)
        .or_else(|| {
            file_val
                .as_ref()
                .and_then(|v| v.get("preset"))
                .and_then(|v| v.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| "tiny".into());
    let mut val = toml::Value::try_from(preset(&name)?)
        .map_err(|e| Error::Msg(format!("preset {name}: {e}")))?;
    if let Some(f) = file_val {
        merge(&mut val, f);
    }
    if let Some(t) = val.as_table_mut() {
        t.insert("preset".into(), toml::Value::String(name.clone()));
    }
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| Error::parse(format!("--set {s}"), "expected key=value"))?;
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|t| t.get("v").cloned())
            .unwrap_or_else(|| toml::Value::String(v.to_string()));
        let mut slot = &mut val;
        let parts: Vec<&str> = k.trim().split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let table = slot.as_table_mut().ok_or_else(|| {
                Error::invalid(
                    format!("--set {k}"),
                    format!("`{part}` is not inside a table"),
                )
            })?;
            if i + 1 == parts.len() {
                table.insert(part.to_string(), parsed.clone());
                break;
            }
            slot = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
    }
    let cfg: RunConfig = val
        .try_into()
        .map_err(|e: toml::de::Error| Error::parse("config", e))?;
    if cfg.manifest.as_os_str().is_empty() {
        return Err(Error::invalid(
            "config",
            "`manifest` is required (in the file or --set manifest=PATH)",
        ));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Where a run reports: lines of text and, optionally, every optimizer step (for a progress bar).
/// Any `FnMut(&str)` is a `Progress` that only takes lines.
pub trait Progress {
    /// Shows one line of text (no trailing newline), e.g. a warning or an epoch's result.
    fn line(&mut self, text: &str);
    /// Called after every optimizer step. Returns true when the receiver shows progress itself
    /// (a bar), so the periodic step lines are left out.
    fn step(&mut self, _s: &StepProgress) -> bool {
        false
    }
}

impl<F: FnMut(&str)> Progress for F {
    fn line(&mut self, text: &str) {
        self(text)
    }
}

/// One optimizer step's progress.
#[derive(Clone, Debug)]
pub struct StepProgress {
    /// Current epoch, 1-based.
    pub epoch: usize,
    /// Epochs in the run.
    pub epochs: usize,
    /// Step within the epoch (1-based) and steps per epoch.
    pub step: usize,
    /// Optimizer steps per epoch.
    pub steps: usize,
    /// Images trained on so far in the run, and in the whole run.
    pub images_done: usize,
    /// Images the whole run trains on (train items × epochs).
    pub images_total: usize,
    /// The step's total loss: L_C, L_S and L_D summed with their weights (`sd2.w_c`, `w_s`,
    /// `w_d`).
    pub loss: f64,
    /// The step's classification loss L_C (cross-entropy against the class texts), unweighted.
    pub l_c: f64,
    /// `images_done` divided by the seconds since this process started training.
    pub images_per_sec: f64,
    /// Estimated seconds left: the steps left times the mean seconds per step so far.
    pub eta_s: f64,
}

/// What a finished training run left behind.
pub struct TrainOutcome {
    /// `out/checkpoints/best`: the epoch with the best validation AUC (the last epoch when
    /// there is no validation AUC).
    pub best_dir: PathBuf,
    /// That checkpoint's validation AUC; NaN when undefined (no val split, or one class).
    pub best_val_auc: f64,
    /// The manifest as loaded (items and skipped lines). For a pack: an empty manifest whose
    /// `path` is the pack.
    pub manifest: Manifest,
}

/// Trains per `cfg` into a folder that holds no run yet (`train_with`, `Start::Fresh`).
pub fn train(cfg: &RunConfig, progress: &mut dyn Progress) -> Result<TrainOutcome> {
    train_with(cfg, Start::Fresh, progress)
}

/// What of a previous run `out` holds (checkpoints, a log), for the refusal message.
fn previous_run(out: &Path) -> Option<String> {
    let ck = crate::sd2::checkpoint::Checkpoints::new(out.join("checkpoints"));
    if let Some(last) = ck.last() {
        return Some(format!("checkpoint {}", last.display()));
    }
    let has_any = std::fs::read_dir(out.join("checkpoints"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if has_any {
        return Some(format!("{}", out.join("checkpoints").display()));
    }
    out.join("train_log.jsonl")
        .is_file()
        .then(|| format!("{}", out.join("train_log.jsonl").display()))
}

/// Trains per `cfg`, logging progress lines and one JSON line per optimizer step to
/// `out/train_log.jsonl`, with checkpoints in `out/checkpoints` (`sd2::checkpoint`): at each
/// epoch's end (and `best` by validation AUC) and as `cfg.checkpoint` asks. `start` says what
/// to do with a folder that already holds a run. Resumed, the run continues from
/// `checkpoints/last` — mid-epoch included — and on the CPU ends with the same weights as an
/// uninterrupted one. Returns where the best checkpoint is.
pub fn train_with(
    cfg: &RunConfig,
    start: Start,
    progress: &mut dyn Progress,
) -> Result<TrainOutcome> {
    train_dist(
        cfg,
        start,
        progress,
        &(Arc::new(crate::dist::Single) as Arc<dyn Comm>),
    )
}

/// The device rank `comm.rank()` trains on: `cuda` without an ordinal means the GPU of the
/// process's local rank in a multi-process job (`cuda:LOCAL_RANK`); anything else as written.
pub fn rank_device(name: &str, local_rank: usize) -> Result<Device> {
    if name.trim() == "cuda" {
        return Ok(Device::Cuda(local_rank));
    }
    Device::parse(name)
}

/// [`train_with`] as one rank of a data-parallel job (`crate::dist`; `comm` of one rank is a
/// plain run). Every rank loads the same data and model; a step's micro-batches are dealt to
/// the ranks (`dist::micro_batch_rank`; a pack's shards are dealt instead), gradients summed;
/// rank 0 alone locks and writes the run folder (log, config, checkpoints), and every rank
/// resumes from its checkpoints. Run on a manifest, the job ends with the weights of one
/// process training the same config (to float-summation order). A rank that fails returns its
/// error: the caller must then end the job (`Comm::abort`), or the others wait.
pub fn train_dist(
    cfg: &RunConfig,
    start: Start,
    progress: &mut dyn Progress,
    comm: &Arc<dyn Comm>,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    let (rank, world) = (comm.rank(), comm.world());
    let lead = rank == 0;
    let mut lock = None;
    let mut resume_from = None;
    if lead {
        let (l, r) = prepare_folder(cfg, start)?;
        (lock, resume_from) = (Some(l), r);
    }
    if world > 1 {
        // Rank 0 has prepared the folder: every rank resumes from the checkpoint it chose.
        let mut bytes = resume_from
            .as_ref()
            .map(|p: &PathBuf| p.to_string_lossy().into_owned().into_bytes())
            .unwrap_or_default();
        comm.broadcast_bytes(&mut bytes, 0)?;
        resume_from = (!bytes.is_empty())
            .then(|| PathBuf::from(String::from_utf8_lossy(&bytes).into_owned()));
    }
    let ckpts = crate::sd2::checkpoint::Checkpoints::new(cfg.out.join("checkpoints"));
    let outcome = train_ranked(cfg, progress, comm, resume_from, &ckpts);
    drop(lock);
    outcome
}

/// Rank 0's (or a lone process's) claim on the run folder: its lock, and the checkpoint to
/// resume from per `start`.
fn prepare_folder(cfg: &RunConfig, start: Start) -> Result<(std::fs::File, Option<PathBuf>)> {
    std::fs::create_dir_all(&cfg.out)
        .map_err(|e| Error::Msg(format!("{}: {e}", cfg.out.display())))?;
    // One run per folder at a time: a second process (a requeued job while the first is still
    // dying) would prune the first's checkpoints.
    let lock_path = cfg.out.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| Error::Msg(format!("{}: {e}", lock_path.display())))?;
    if lock.try_lock().is_err() {
        return Err(Error::Msg(format!(
            "{}: another sd2 train is running in this folder",
            cfg.out.display()
        )));
    }
    // Temporaries a killed run left beside its log and config.
    for f in ["train_log.jsonl", "config.toml"] {
        crate::fs::remove_atomic_leftovers(&cfg.out.join(f));
    }
    let ckpts = crate::sd2::checkpoint::Checkpoints::new(cfg.out.join("checkpoints"));
    let resume_from = match start {
        Start::Resume => {
            // A run killed in its last save has nothing left to save, so nothing else would
            // clear what that save left behind.
            ckpts.tidy();
            ckpts.last()
        }
        Start::Overwrite => {
            let ck = cfg.out.join("checkpoints");
            if ck.exists() {
                std::fs::remove_dir_all(&ck)
                    .map_err(|e| Error::Msg(format!("{}: {e}", ck.display())))?;
            }
            for p in [cfg.out.join("train_log.jsonl"), cfg.out.join("config.toml")] {
                std::fs::remove_file(&p).ok();
            }
            None
        }
        Start::Fresh => {
            if let Some(what) = previous_run(&cfg.out) {
                return Err(Error::invalid(
                    cfg.out.display().to_string(),
                    format!(
                        "holds a run already ({what}); pass --resume to continue it or \
                         --overwrite to start again"
                    ),
                ));
            }
            None
        }
    };
    Ok((lock, resume_from))
}

fn train_ranked(
    cfg: &RunConfig,
    progress: &mut dyn Progress,
    comm: &Arc<dyn Comm>,
    resume_from: Option<PathBuf>,
    ckpts: &crate::sd2::checkpoint::Checkpoints,
) -> Result<TrainOutcome> {
    let (rank, world) = (comm.rank(), comm.world());
    let lead = rank == 0;
    let device = rank_device(&cfg.device, comm.local_rank())?;
    device.check_available()?;
    let dtype = compute_dtype(&cfg.dtype)?;
    let opts = LoadOptions {
        skip_bad: cfg.skip_bad,
        check_images: true,
        require_descriptions: cfg.sd2.loss_dual != DualContrast::Off,
        verify_images: cfg.verify_images,
    };
    // A pack (`sd2 pack`) is streamed from its shards; a manifest's files are read one by one.
    let pack = if ShardIndex::is_pack(&cfg.manifest) {
        Some(ShardIndex::load(&cfg.manifest)?)
    } else {
        None
    };
    let manifest = match &pack {
        Some(_) => Manifest {
            path: cfg.manifest.clone(),
            items: vec![],
            skipped: vec![],
        },
        None => Manifest::load(&cfg.manifest, opts)?,
    };
    let train: Vec<&Item> = manifest.split(Split::Train);
    let val: Vec<&Item> = manifest.split(Split::Val);
    let train_len = pack
        .as_ref()
        .map_or(train.len(), |ix| ix.count(Split::Train));
    if train_len == 0 {
        return Err(Error::invalid(
            cfg.manifest.display().to_string(),
            "no train items",
        ));
    }
    if let (Some(ix), true) = (&pack, cfg.sd2.loss_dual != DualContrast::Off) {
        if !ix.described {
            return Err(Error::invalid(
                cfg.manifest.display().to_string(),
                "some samples have no face/env description, which sd2.loss_dual needs \
                 (`sd2 describe` the manifest before packing, or set sd2.loss_dual = \"off\")",
            ));
        }
    }
    if cfg.shuffle_buffer == 0 {
        return Err(Error::Config {
            key: "shuffle_buffer".into(),
            msg: "must be ≥ 1".into(),
        });
    }
    // One class only: the detector cannot learn to tell real from fake, or AUC is undefined.
    let one_class = |items: &[&Item]| {
        let fakes = items.iter().filter(|i| i.label != 0).count();
        (fakes == 0 || fakes == items.len()).then_some(if fakes == 0 { "real" } else { "fake" })
    };
    if let Some(c) = pack
        .is_none()
        .then(|| one_class(&train))
        .flatten()
        .filter(|_| lead)
    {
        progress.line(&format!(
            "warning: every train item is {c}: the detector cannot learn to tell real from fake"
        ));
    }
    if let Some(c) = (!val.is_empty() && pack.is_none() && lead)
        .then(|| one_class(&val))
        .flatten()
    {
        progress.line(&format!(
            "warning: every val item is {c}: validation AUC is undefined (NaN), so `best` is \
             the last epoch"
        ));
    }
    let clip = match (cfg.preset.as_str(), &cfg.clip) {
        ("tiny", None) => ClipModel::random(
            &crate::presets::tiny_clip_config(),
            dtype,
            device,
            cfg.train.seed,
        )?,
        (_, Some(dir)) => ClipModel::load(dir, dtype, device)?,
        (p, None) => {
            return Err(Error::Msg(format!(
            "preset {p} needs `clip` = a local CLIP folder (e.g. openai/clip-vit-large-patch14)"
        )))
        }
    };
    let size = clip.config.vision_config.image_size;
    let tokenizer = ClipTokenizer::openai()?;
    let texts = TypeTexts::shipped()?;
    let mut tcfg = cfg.train.clone();
    let (mut trainer, resumed) = match &resume_from {
        Some(dir) => {
            let run_json = dir.join("run.json");
            if !run_json.is_file() {
                return Err(Error::checkpoint(
                    dir,
                    "a checkpoint of an earlier format (no run.json) cannot be resumed; \
                     --overwrite starts again",
                ));
            }
            let run: RunState = serde_json::from_str(
                &std::fs::read_to_string(&run_json).map_err(|e| Error::read(&run_json, e))?,
            )
            .map_err(|e| Error::checkpoint(&dir.join("run.json"), e))?;
            let bad = |what: String| {
                Error::mismatch(
                    dir.join("run.json").display(),
                    format!("{what}; resume with the run's own manifest and seed, or --overwrite"),
                )
            };
            if run.micro == 0 || run.per_step == 0 {
                return Err(bad(format!(
                    "micro {} and per_step {} must be ≥ 1",
                    run.micro, run.per_step
                )));
            }
            if run.train_len.is_some_and(|n| n != train_len) {
                return Err(bad(format!(
                    "the run trained on {} items, the manifest now has {}",
                    run.train_len.unwrap_or(0),
                    train_len
                )));
            }
            if run.seed.is_some_and(|s| s != cfg.train.seed) {
                return Err(bad(format!(
                    "the run's seed was {}, the config's is {}",
                    run.seed.unwrap_or(0),
                    cfg.train.seed
                )));
            }
            let now = pack.as_ref().map(|_| cfg.shuffle_buffer);
            if pack.is_some() && run.shuffle_buffer != now {
                return Err(bad(format!(
                    "the run streamed with shuffle_buffer {:?}, the config gives {:?}",
                    run.shuffle_buffer, now
                )));
            }
            if run.pack != pack.as_ref().map(|ix| ix.digest()) {
                return Err(bad(
                    "the run trained on another pack (or not on a pack)".to_string()
                ));
            }
            let t = Trainer::resume(dir, clip, ClipTokenizer::openai()?, texts.clone())?;
            if lead {
                progress.line(&format!(
                    "resuming from {} (step {})",
                    dir.display(),
                    t.steps()
                ));
            }
            (t, Some(run))
        }
        None => {
            let model = Sd2Model::new(clip, cfg.sd2.clone(), cfg.train.seed)?;
            (
                Trainer::new(model, tcfg.clone(), ClipTokenizer::openai()?, texts.clone()),
                None,
            )
        }
    };
    // micro_batch = 0: the largest that fits the GPU's memory (the effective batch elsewhere);
    // a resumed run keeps the split it started with.
    trainer.set_comm(comm.clone());
    let mut micro = match (cfg.train.micro_batch, &resumed) {
        (_, Some(r)) => r.micro,
        (0, None) => {
            let cap = cfg.train.effective_batch.max(1);
            // DeviceBatches keeps the next step's micro-batches on the device too.
            match trainer.auto_micro_batch(size, cap, cap)? {
                Some(b) => {
                    if lead {
                        progress.line(&format!(
                            "micro-batch {b}: the largest that fits {device}'s free memory (cap {cap})"
                        ));
                    }
                    b
                }
                None => cap,
            }
        }
        (m, None) => m,
    };
    if world > 1 {
        // Every rank takes rank 0's micro-batch (GPUs may differ in free memory).
        let mut b = (micro as u64).to_le_bytes().to_vec();
        comm.broadcast_bytes(&mut b, 0)?;
        micro = b
            .try_into()
            .map(|a: [u8; 8]| u64::from_le_bytes(a) as usize)
            .map_err(|_| Error::Dist {
                rank,
                msg: "rank 0 sent a micro-batch size that is not 8 bytes".into(),
            })?;
    }
    let per_step = match &resumed {
        Some(r) => r.per_step,
        None => cfg.train.effective_batch.max(micro).div_ceil(micro),
    };
    let steps_per_epoch = train_len.div_ceil(micro * per_step);
    tcfg.micro_batch = micro;
    tcfg.total_steps = steps_per_epoch * cfg.epochs.max(1);
    trainer.cfg = tcfg.clone();
    std::fs::create_dir_all(&cfg.out)
        .map_err(|e| Error::Msg(format!("{}: {e}", cfg.out.display())))?;
    // The resolved config, so `sd2 train --resume OUT` needs nothing else — its paths made
    // absolute, so it resumes from any working directory.
    let mut saved = cfg.clone();
    for p in [
        Some(&mut saved.manifest),
        saved.clip.as_mut(),
        Some(&mut saved.out),
    ]
    .into_iter()
    .flatten()
    {
        if let Ok(a) = std::path::absolute(&*p) {
            *p = a;
        }
    }
    let toml = toml::to_string(&saved).map_err(|e| Error::Msg(format!("config: {e}")))?;
    if lead {
        crate::fs::write_atomic(&cfg.out.join("config.toml"), toml)?;
    }
    let ckpt = cfg.out.join("checkpoints");
    let log_path = cfg.out.join("train_log.jsonl");
    // Where the run stands: the steps done, and the log lines of those steps.
    let done_steps = trainer.steps() as usize;
    let mut steplog = String::new();
    if resumed.is_some() {
        for line in std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
        {
            let step = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64());
            if step.is_some_and(|s| (s as usize) < done_steps) {
                steplog.push_str(line);
                steplog.push('\n');
            }
        }
    }
    let (start_epoch, start_k) = (done_steps / steps_per_epoch, done_steps % steps_per_epoch);
    let mut best_metric = resumed.as_ref().and_then(|r| r.best_metric);
    let run_file = |best_metric: Option<f64>, best_val: f64| -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(&RunState {
            micro,
            per_step,
            best_metric,
            best_val: best_val.is_finite().then_some(best_val),
            train_len: Some(train_len),
            seed: Some(cfg.train.seed),
            shuffle_buffer: pack.as_ref().map(|_| cfg.shuffle_buffer),
            pack: pack.as_ref().map(|ix| ix.digest()),
        })
        .map_err(|e| Error::Msg(format!("run state: {e}")))
    };
    let mut order: Vec<usize> = (0..train_len).collect();
    let mut rng = Rng::new(cfg.train.seed ^ 0xde70);
    let t0 = Instant::now();
    let mut last_save = Instant::now();
    let mut best_val = resumed
        .as_ref()
        .and_then(|r| r.best_val)
        .unwrap_or(f64::NEG_INFINITY);
    let mut skipped_images = 0usize;
    // Bad validation images, each reported once (the same ones fail every epoch).
    let mut val_bad = std::collections::BTreeSet::new();
    let mut images_done = (start_epoch * train_len).min(train_len * cfg.epochs)
        + (start_k * micro * per_step).min(train_len);
    for epoch in 0..cfg.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        if epoch < start_epoch {
            continue; // done before the resume: only its shuffle is replayed
        }
        let skip = if epoch == start_epoch { start_k } else { 0 };
        // Micro-batches in step order, decoded ahead of the model on a background thread.
        let augment = Transform::Augment {
            cfg: cfg.augment.clone(),
            seed: cfg.train.seed,
            epoch: epoch as u64,
        };
        // This rank's micro-batches per step: a manifest's step-`k` micro-batch `j` goes to rank
        // `j % world`; a pack's shards are dealt to the ranks instead, and each rank takes an
        // equal share of the steps from its own (`pack_share`), so none is left over.
        let mut pack_share = per_step;
        let loader = match &pack {
            // The epoch's stream from its shards (its own shuffle), positioned after the
            // samples of the steps done before a resume.
            Some(ix) => {
                let mut o = StreamOptions {
                    split: Split::Train,
                    seed: cfg.train.seed,
                    epoch: epoch as u64,
                    buffer: cfg.shuffle_buffer,
                    rank,
                    world,
                    skip: 0,
                };
                let mine: usize = crate::data::shards::epoch_shards(ix, &o)?
                    .iter()
                    .map(|s| s.1)
                    .sum();
                if world > 1 {
                    pack_share = mine.div_ceil(steps_per_epoch * micro);
                }
                // A rank whose shards ran out before the resumed step has none left.
                o.skip = (skip * pack_share * micro).min(mine);
                let stream = ShardStream::open(ix, &o)?;
                Prefetcher::shards(stream, micro, size, augment, 2 * pack_share, cfg.skip_bad)
            }
            None => {
                let batches: Vec<Vec<Item>> = order
                    .chunks(micro)
                    .enumerate()
                    .skip(skip * per_step)
                    .filter(|(c, _)| crate::dist::micro_batch_rank(c % per_step, world) == rank)
                    .map(|(_, c)| c.iter().map(|i| train[*i].clone()).collect())
                    .collect();
                let make = if cfg.skip_bad {
                    Prefetcher::skipping_bad
                } else {
                    Prefetcher::new
                };
                make(batches, size, augment, 2 * per_step)
            }
        };
        // One step's micro-batches copying ahead: step k+1's data moves while step k computes.
        let local = if pack.is_some() {
            pack_share
        } else {
            per_step.div_ceil(world)
        };
        let mut loader = DeviceBatches::new(loader, local, size, dtype, device);
        for (k, step_items) in order.chunks(micro * per_step).enumerate().skip(skip) {
            let mut mbs = vec![];
            let take = match (&pack, world) {
                (_, 1) => step_items.chunks(micro).count(),
                (Some(_), _) => pack_share,
                (None, _) => (0..step_items.chunks(micro).count())
                    .filter(|j| crate::dist::micro_batch_rank(*j, world) == rank)
                    .count(),
            };
            for _ in 0..take {
                let next = match loader.next() {
                    // A rank's shards may end before the epoch's last step.
                    None if pack.is_some() && world > 1 => break,
                    n => n,
                };
                let (items, pixel_values) = next.ok_or_else(|| {
                    Error::Msg(format!(
                        "epoch {} step {}: the loader stopped early",
                        epoch + 1,
                        k + 1
                    ))
                })??;
                if items.is_empty() {
                    continue; // every image of this micro-batch was bad (skip_bad)
                }
                // A manifest's lines are checked for descriptions when loaded; a pack's
                // samples as they come.
                if pack.is_some() && cfg.sd2.loss_dual != DualContrast::Off {
                    if let Some(it) = items
                        .iter()
                        .find(|i| i.face.trim().is_empty() || i.env.trim().is_empty())
                    {
                        return Err(Error::invalid(
                            it.rel_path.clone(),
                            "no face/env description, which loss_dual needs (pack a \
                             described manifest, or set sd2.loss_dual = \"off\")",
                        ));
                    }
                }
                mbs.push(MicroBatch {
                    pixel_values,
                    labels: items.iter().map(|i| i.label).collect(),
                    face: items.iter().map(|i| i.face.clone()).collect(),
                    env: items.iter().map(|i| i.env.clone()).collect(),
                });
            }
            for (it, why) in loader.take_bad() {
                skipped_images += 1;
                progress.line(&format!("skipped {} (skip_bad): {why}", it.rel_path));
            }
            // In a job, a rank may have no micro-batch in a step (the step checks the total).
            if mbs.is_empty() && world == 1 {
                return Err(Error::Msg(format!(
                    "epoch {} step {}: every image of the step is bad",
                    epoch + 1,
                    k + 1
                )));
            }
            let l = match trainer.step(&mbs) {
                Ok(l) => l,
                Err(e) => {
                    // The steps since the last checkpoint stay in the log (the failing one is
                    // in the error).
                    crate::fs::write_atomic(&log_path, &steplog).ok();
                    return Err(e);
                }
            };
            steplog.push_str(&l.to_json());
            steplog.push('\n');
            images_done += step_items.len();
            let done = trainer.steps() as f64;
            let eta = (tcfg.total_steps as f64 - done) * t0.elapsed().as_secs_f64() / done.max(1.0);
            let shown = !lead
                || progress.step(&StepProgress {
                    epoch: epoch + 1,
                    epochs: cfg.epochs,
                    step: k + 1,
                    steps: steps_per_epoch,
                    images_done,
                    images_total: train_len * cfg.epochs,
                    loss: l.total,
                    l_c: l.l_c,
                    images_per_sec: images_done as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                    eta_s: eta,
                });
            if !shown && (k % 25 == 0 || k + 1 == steps_per_epoch) {
                progress.line(&format!(
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
            let every = cfg.checkpoint.every_steps;
            let due = (every > 0 && trainer.steps() % every as u64 == 0)
                || (cfg.checkpoint.every_minutes > 0.0
                    && last_save.elapsed().as_secs_f64() >= 60.0 * cfg.checkpoint.every_minutes);
            // The epoch's last step saves below, with its validation metric.
            if due && k + 1 < steps_per_epoch && lead {
                crate::fs::write_atomic(&log_path, &steplog)?;
                ckpts.save(
                    &trainer,
                    None,
                    &[("run.json", run_file(best_metric, best_val)?)],
                    false,
                )?;
                last_save = Instant::now();
            }
        }
        let has_val = match &pack {
            Some(ix) => ix.count(Split::Val) > 0,
            None => !val.is_empty(),
        };
        // In a job a manifest's val items are scored by video across the ranks and gathered;
        // a pack's val shards by rank 0 alone (the only rank that saves).
        let metric = if !has_val || (pack.is_some() && !lead) {
            f64::NAN
        } else {
            let class_u = class_embeddings(&trainer.model, &tokenizer, &texts)?;
            let (m, t, none) = (&trainer.model, &class_u, &Transform::None);
            let all_val = val.clone();
            // This rank's val items, as indices into `all_val`.
            let mine: Vec<usize> = if world > 1 && pack.is_none() {
                let keys: Vec<String> = all_val
                    .iter()
                    .map(|i| match &i.video {
                        Some(v) => format!("{}\u{1f}{v}", i.source),
                        None => format!("\u{1e}{}", i.rel_path),
                    })
                    .collect();
                crate::dist::split_by_video(&keys, rank, world)
            } else {
                (0..all_val.len()).collect()
            };
            let val: Vec<&Item> = mine.iter().map(|&i| all_val[i]).collect();
            let preds = if cfg.skip_bad || pack.is_some() {
                let (preds, bad) = match &pack {
                    Some(ix) => crate::eval::predict::predict_shards(
                        m,
                        t,
                        ix,
                        Split::Val,
                        128,
                        cfg.skip_bad,
                    )?,
                    None => {
                        crate::eval::predict::predict_items_skipping_bad(m, t, &val, 128, none)?
                    }
                };
                for b in bad {
                    if val_bad.insert(b.path.clone()) {
                        progress.line(&format!(
                            "skipped {} in validation (skip_bad): {}",
                            b.path, b.error
                        ));
                    }
                }
                preds
            } else {
                crate::eval::predict::predict_items(m, t, &val, 128, none)?
            };
            let preds = if world > 1 && pack.is_none() {
                gather_preds(comm.as_ref(), &all_val, &mine, preds)?
            } else {
                preds
            };
            if !preds.is_empty() {
                trainer.val_threshold = Some(crate::eval::metrics::best_threshold(
                    &preds.iter().map(|p| p.fake_score).collect::<Vec<_>>(),
                    &preds.iter().map(|p| p.label != 0).collect::<Vec<_>>(),
                ));
            }
            report::report(&preds, &[]).overall.auc
        };
        // Without a val split every epoch counts as the best (the last one wins).
        let m = if metric.is_nan() {
            epoch as f64
        } else {
            metric
        };
        let best = best_metric.is_none_or(|b| m > b);
        if best {
            best_metric = Some(m);
            best_val = metric;
        }
        if lead {
            crate::fs::write_atomic(&log_path, &steplog)?;
            ckpts.save(
                &trainer,
                Some(m),
                &[("run.json", run_file(best_metric, best_val)?)],
                best,
            )?;
            progress.line(&format!(
                "epoch {}: validation AUC {:.4}{}",
                epoch + 1,
                metric,
                if best { " (best so far)" } else { "" }
            ));
        }
        last_save = Instant::now();
    }
    if skipped_images > 0 {
        progress.line(&format!(
            "{skipped_images} bad images were left out of training (skip_bad)"
        ));
    }
    if !val_bad.is_empty() {
        progress.line(&format!(
            "{} bad images were left out of validation (skip_bad)",
            val_bad.len()
        ));
    }
    Ok(TrainOutcome {
        best_dir: ckpt.join("best"),
        best_val_auc: best_val,
        manifest,
    })
}

/// Every rank's predictions of its part `mine` of `all` (indices) (one per item, in `mine`'s order, bad
/// items left out), summed over the ranks into the predictions of `all` in its order.
fn gather_preds(
    comm: &dyn Comm,
    all: &[&Item],
    mine: &[usize],
    preds: Vec<crate::eval::predict::Pred>,
) -> Result<Vec<crate::eval::predict::Pred>> {
    const W: usize = 7; // present, fake score, five class probabilities
    let mut buf = vec![0.0; all.len() * W];
    let mut it = mine.iter();
    for p in &preds {
        // `preds` follows `mine`, with the bad items left out.
        let at = it
            .by_ref()
            .copied()
            .find(|&i| all[i].rel_path == p.path)
            .ok_or_else(|| Error::Msg(format!("validation: no item for prediction {}", p.path)))?
            * W;
        buf[at] = 1.0;
        buf[at + 1] = p.fake_score;
        buf[at + 2..at + W].copy_from_slice(&p.probs);
    }
    comm.all_reduce_f64(&mut buf)?;
    Ok(all
        .iter()
        .zip(buf.chunks(W))
        .filter(|(_, b)| b[0] > 0.0)
        .map(|(item, b)| crate::eval::predict::Pred {
            path: item.rel_path.clone(),
            label: item.label,
            source: item.source.clone(),
            video: item.video.clone(),
            fake_score: b[1],
            probs: [b[2], b[3], b[4], b[5], b[6]],
        })
        .collect())
}
