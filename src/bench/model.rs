//! `sd2 bench train|infer`: SD2 training steps or inference batches with random weights on
//! any device — images/s, model FLOP utilisation (FLOPs counted from the config), peak device
//! memory, and, for one extra step, the per-kernel table and a Chrome trace (GPU and
//! simulator: `backend::cuda::profile`). In a job (`run_with` and a communicator) every rank
//! times its own steps, gradients all-reduced as in training, and the all-reduce alone.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::clip::{ClipConfig, ClipModel, ClipTokenizer};
use crate::dist::{Comm, Single};
use crate::profile::{self, Profile};
use crate::sd2::detector::{class_embeddings, predict_pixels};
use crate::sd2::train::{MicroBatch, TrainConfig, Trainer};
use crate::sd2::{Sd2Config, Sd2Model, TypeTexts};
use crate::{DType, Device, Error, Result, Tensor};

/// What `sd2 bench train|infer` runs: preset, device, batch, step counts.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `tiny` or `vit-l14` (random weights).
    pub preset: String,
    /// Where the model runs (`cpu`, `cuda:N`, `cuda:sim`, `cuda:plan`).
    pub device: Device,
    /// Training: one micro-batch per step; inference: images per forward.
    pub batch: usize,
    /// Timed steps (or forwards); at least 1. The median is reported.
    pub steps: usize,
    /// Untimed steps run first; the peak-memory measurement starts after them.
    pub warmup: usize,
    /// true: training steps (forward, backward, optimizer); false: inference forwards.
    pub train: bool,
    /// Activations and frozen weights: f32, or bf16 (trainable tensors stay f32 masters).
    pub dtype: DType,
    /// Write a Chrome/Perfetto trace of one extra step here (CUDA devices).
    pub trace: Option<PathBuf>,
    /// Seed of the random weights and pixels.
    pub seed: u64,
    /// Training: recompute each encoder block's activations in backward (`TrainConfig::recompute`;
    /// MFU still counts model FLOPs only).
    pub recompute: bool,
    /// Training across processes: gradient bucket size (`TrainConfig::grad_bucket_mb`; 0:
    /// one all-reduce after backward).
    pub grad_bucket_mb: f64,
}

/// What one benchmark run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// The preset benchmarked.
    pub preset: String,
    /// The device: the profiler's name for it where a step was profiled (a GPU's name),
    /// else as `Device` prints it.
    pub device: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// Whether training steps (true) or inference forwards were timed.
    pub train: bool,
    /// The micro-batch or inference batch used (the chosen one when `--batch 0`).
    pub batch: usize,
    /// Timed steps (warm-up and the profiled step not included).
    pub steps: usize,
    /// Median wall time of a step (train) or forward (infer), device work included.
    pub step_ms: f64,
    /// `batch` over the median step time.
    pub images_per_s: f64,
    /// Model FLOPs per image (`flops_per_image`, two descriptions per image), GFLOP.
    pub gflop_per_image: f64,
    /// Model FLOPs per second achieved (TFLOP/s).
    pub model_tflops: f64,
    /// model_tflops / the device's dense peak for the dtype, where known.
    pub mfu: Option<f64>,
    /// Peak bytes in use on the device's caching allocator during the timed steps (GPU).
    pub peak_device_bytes: Option<usize>,
    /// The profiled extra step (CUDA devices).
    pub profile: Option<Profile>,
    /// Training: (texts, tokens per text) of each text-tower pass of the last step.
    pub text_passes: Vec<(usize, usize)>,
    /// Processes in the job (1 without a communicator).
    pub world: usize,
    /// The collective engine (`single`, `mpi`, `nccl`).
    pub backend: String,
    /// Training in a job: the gradient all-reduce alone, timed as the step runs it (one flat
    /// buffer of every trainable parameter, f32).
    pub all_reduce: Option<AllReduceTiming>,
}

/// The median time of one gradient all-reduce.
#[derive(Clone, Debug, Serialize)]
pub struct AllReduceTiming {
    /// Bytes reduced (the trainable parameters, as f32).
    pub bytes: usize,
    /// Median wall time, device work included.
    pub ms: f64,
}

/// FLOPs of one tower forward per sequence, as (linear layers, attention, patch embedding):
/// 2·in·out per token for every linear layer, 4·S·d per token for QKᵀ and PV (all key
/// positions — causal masking not subtracted).
fn tower_flops(
    d: usize,
    inter: usize,
    layers: usize,
    tokens: usize,
    patch_in: usize,
) -> (f64, f64, f64) {
    let lt = (layers * tokens) as f64;
    (
        lt * 2.0 * (4 * d * d + 2 * d * inter) as f64,
        lt * 4.0 * (tokens * d) as f64,
        2.0 * (tokens.saturating_sub(1) * patch_in * d) as f64,
    )
}

/// Model FLOPs per image: inference = the vision tower + projection (class texts are cached);
/// a training step adds the text tower for `descriptions` texts per image and the five class
/// texts shared by the batch. Backward: frozen weights need only dX (1× the linear layers'
/// forward; LoRA's dA, dB are ~1% more), attention 2× its forward (dQ, dK, dV, dP), the patch
/// embedding none (pixels need no gradient).
pub fn flops_per_image(clip: &ClipConfig, train: bool, descriptions: usize, batch: usize) -> f64 {
    let v = &clip.vision_config;
    let t = &clip.text_config;
    let (vl, va, vp) = tower_flops(
        v.hidden_size,
        v.intermediate_size,
        v.num_hidden_layers,
        v.num_positions(),
        3 * v.patch_size * v.patch_size,
    );
    let vproj = 2.0 * (v.hidden_size * clip.projection_dim) as f64;
    if !train {
        return vl + va + vp + vproj;
    }
    let (tl, ta, _) = tower_flops(
        t.hidden_size,
        t.intermediate_size,
        t.num_hidden_layers,
        t.max_position_embeddings,
        0,
    );
    let tproj = 2.0 * (t.hidden_size * clip.projection_dim) as f64;
    let texts = descriptions as f64 + 5.0 / batch.max(1) as f64;
    let step = |lin: f64, attn: f64| 2.0 * lin + 3.0 * attn;
    step(vl + vproj, va) + vp + texts * step(tl + tproj, ta)
}

/// Dense peak TFLOP/s of the GPUs we measure on (SXM parts; NVIDIA's data sheets, no sparsity).
fn peak_tflops(device_name: &str, dtype: DType) -> Option<f64> {
    let hopper = device_name.contains("H100") || device_name.contains("H200");
    match (hopper, dtype) {
        (true, DType::BF16) => Some(989.4),
        (true, DType::F32) => Some(66.9),
        _ => None,
    }
}

fn clip_config(preset: &str) -> Result<(ClipConfig, Sd2Config)> {
    let p = crate::presets::get(preset)?;
    Ok((p.clip, p.sd2))
}

/// Waits for the device (a read of one element: every backend's queue drains before it).
fn sync(t: &Tensor) -> Result<()> {
    t.to_vec_f64().map(drop)
}

/// Random pixels [batch, 3, size, size].
fn random_pixels(
    batch: usize,
    size: usize,
    dtype: DType,
    device: Device,
    seed: u64,
) -> Result<Tensor> {
    let mut rng = crate::rng::Rng::new(seed ^ 0xbe7c);
    let v: Vec<f64> = (0..batch * 3 * size * size).map(|_| rng.normal()).collect();
    Tensor::from_f64(&v, (batch, 3, size, size), dtype, device)
}

/// Runs the benchmark. Training with `batch` 0 takes the largest micro-batch that fits the
/// GPU's free memory (`Trainer::auto_micro_batch`).
pub fn run(cfg: &BenchConfig) -> Result<BenchResult> {
    run_with(cfg, Arc::new(Single))
}

/// [`run`] as one rank of a job: training steps all-reduce their gradients over `comm` (each
/// rank its own micro-batch of `batch` images: weak scaling), then the all-reduce is timed
/// alone. Inference ignores `comm`.
pub fn run_with(cfg: &BenchConfig, comm: Arc<dyn Comm>) -> Result<BenchResult> {
    if cfg.steps == 0 || (cfg.batch == 0 && !cfg.train) {
        return Err(Error::invalid(
            "bench",
            "--steps must be ≥ 1, and --batch ≥ 1 (0 = automatic, training only)",
        ));
    }
    cfg.device.check_available()?;
    let (clip_cfg, sd2_cfg) = clip_config(&cfg.preset)?;
    let dtype = cfg.dtype;
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::invalid(
            "bench",
            format!("dtype {dtype} (f32 or bf16)"),
        ));
    }
    let mut sd2_cfg = sd2_cfg;
    if dtype == DType::BF16 {
        // bf16 trains the adapters on a frozen CLIP (the tiny preset trains CLIP whole in f32).
        sd2_cfg.train_base = false;
    }
    let clip = ClipModel::random(&clip_cfg, dtype, cfg.device, cfg.seed)?;
    let model = Sd2Model::new(clip, sd2_cfg, cfg.seed)?;
    let size = clip_cfg.vision_config.image_size;
    let tokenizer = ClipTokenizer::openai()?;
    let texts = TypeTexts::shipped()?;
    let peak = || crate::backend::cuda::device_memory(cfg.device).map(|m| m.peak);
    let profiling = cfg.device.is_cuda();
    let start_profile = || -> Result<()> {
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        return profile::start(
            crate::backend::cuda::storage::runner_for(cuda_ordinal(cfg.device))?.clock(),
        );
        #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
        profile::start(None)
    };
    let mut times = vec![];
    let mut profiled = None;
    if cfg.train {
        let mut tcfg = TrainConfig {
            micro_batch: cfg.batch.max(1),
            effective_batch: cfg.batch.max(1),
            total_steps: cfg.warmup + cfg.steps + 1,
            seed: cfg.seed,
            recompute: cfg.recompute,
            grad_bucket_mb: cfg.grad_bucket_mb,
            ..Default::default()
        };
        let mut trainer = Trainer::new(model, tcfg.clone(), tokenizer, texts);
        trainer.set_comm(comm.clone());
        let batch = match cfg.batch {
            // The bench reuses one device batch: nothing is staged.
            0 => trainer.auto_micro_batch(size, 4096, 0)?.ok_or_else(|| {
                Error::invalid(
                    "bench",
                    format!("--batch 0 needs a GPU device, not {}", cfg.device),
                )
            })?,
            b => b,
        };
        tcfg.micro_batch = batch;
        tcfg.effective_batch = batch;
        trainer.cfg = tcfg;
        let face = |i: usize| {
            format!(
                "a face with {} skin and short hair, photo {i}",
                ["pale", "dark", "tan"][i % 3]
            )
        };
        let env = |i: usize| {
            format!(
                "an indoor scene with {} light, photo {i}",
                ["warm", "cold"][i % 2]
            )
        };
        let mb = MicroBatch {
            pixel_values: random_pixels(
                batch,
                size,
                dtype,
                cfg.device,
                cfg.seed ^ comm.rank() as u64,
            )?,
            labels: (0..batch).map(|i| i % 5).collect(),
            face: (0..batch).map(face).collect(),
            env: (0..batch).map(env).collect(),
        };
        for i in 0..cfg.warmup + cfg.steps {
            if i == cfg.warmup {
                crate::backend::cuda::reset_peak(cfg.device);
            }
            let t0 = Instant::now();
            trainer.step(std::slice::from_ref(&mb))?;
            sync(&trainer.model.clip.logit_scale)?;
            if i >= cfg.warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let peak_bytes = peak();
        if profiling {
            start_profile()?;
            let r = trainer.step(std::slice::from_ref(&mb));
            let p = profile::stop();
            r?;
            profiled = Some(p?);
        }
        let all_reduce = if comm.backend() == "single" {
            None
        } else {
            Some(time_all_reduce(comm.as_ref(), trainer.model.params(), cfg)?)
        };
        let mut r = finish(cfg, batch, &clip_cfg, dtype, times, peak_bytes, profiled)?;
        r.text_passes = trainer.last_text_passes();
        r.world = comm.world();
        r.backend = comm.backend().to_string();
        r.all_reduce = all_reduce;
        return Ok(r);
    }
    let pixels = random_pixels(cfg.batch, size, dtype, cfg.device, cfg.seed)?;
    let class_u = class_embeddings(&model, &tokenizer, &texts)?;
    for i in 0..cfg.warmup + cfg.steps {
        if i == cfg.warmup {
            crate::backend::cuda::reset_peak(cfg.device);
        }
        let t0 = Instant::now();
        predict_pixels(&model, &class_u, &pixels)?; // reads the probabilities: synchronizes
        if i >= cfg.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let peak_bytes = peak();
    if profiling {
        start_profile()?;
        let r = predict_pixels(&model, &class_u, &pixels);
        let p = profile::stop();
        r?;
        profiled = Some(p?);
    }
    finish(
        cfg, cfg.batch, &clip_cfg, dtype, times, peak_bytes, profiled,
    )
}

/// The gradient all-reduce of a step on its own: one f32 buffer of every trainable element,
/// `warmup` + `steps` times, the median of the timed ones.
fn time_all_reduce(
    comm: &dyn Comm,
    params: &[crate::optim::Param],
    cfg: &BenchConfig,
) -> Result<AllReduceTiming> {
    let n: usize = params.iter().map(|p| p.tensor.elem_count()).sum();
    let buf = Tensor::zeros(n, DType::F32, cfg.device)?;
    let mut times = vec![];
    for i in 0..cfg.warmup + cfg.steps {
        comm.barrier()?;
        let t0 = Instant::now();
        let s = comm.all_reduce_sum(&buf)?;
        sync(&s.narrow(0, 0, 1)?)?;
        if i >= cfg.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(AllReduceTiming {
        bytes: 4 * n,
        ms: times[times.len() / 2],
    })
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn cuda_ordinal(d: Device) -> usize {
    d.cuda_ordinal().unwrap_or(0)
}

fn finish(
    cfg: &BenchConfig,
    batch: usize,
    clip: &ClipConfig,
    dtype: DType,
    mut times: Vec<f64>,
    peak_device_bytes: Option<usize>,
    profile: Option<Profile>,
) -> Result<BenchResult> {
    times.sort_by(f64::total_cmp);
    let step_ms = times[times.len() / 2];
    let images_per_s = batch as f64 / (step_ms / 1e3);
    let gflop = flops_per_image(clip, cfg.train, 2, batch) / 1e9;
    let model_tflops = gflop * images_per_s / 1e3;
    let device = match (&profile, cfg.device) {
        (Some(p), _) => p.device.clone(),
        (None, d) => d.to_string(),
    };
    if let (Some(p), Some(path)) = (&profile, &cfg.trace) {
        p.write_trace(path)?;
    }
    Ok(BenchResult {
        preset: cfg.preset.clone(),
        mfu: peak_tflops(&device, dtype).map(|pk| model_tflops / pk),
        device,
        dtype: dtype.to_string(),
        train: cfg.train,
        batch,
        steps: cfg.steps,
        step_ms,
        images_per_s,
        gflop_per_image: gflop,
        model_tflops,
        peak_device_bytes,
        profile,
        text_passes: vec![],
        world: 1,
        backend: "single".into(),
        all_reduce: None,
    })
}

impl BenchResult {
    /// The report `sd2 bench train|infer` prints: throughput, then the top kernels.
    pub fn report(&self, top: usize) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "sd2 bench {} — preset {}, {} on {}, batch {}, median of {} {}",
            if self.train { "train" } else { "infer" },
            self.preset,
            self.dtype,
            self.device,
            self.batch,
            self.steps,
            if self.train { "steps" } else { "batches" }
        );
        let _ = writeln!(
            s,
            "{:.2} ms per {} = {:.1} images/s; {:.4} GFLOP/image → {:.3} TFLOP/s model{}",
            self.step_ms,
            if self.train { "step" } else { "batch" },
            self.images_per_s,
            self.gflop_per_image,
            self.model_tflops,
            self.mfu
                .map_or(String::new(), |m| format!(", MFU {:.1}%", 100.0 * m))
        );
        if let Some(b) = self.peak_device_bytes {
            let _ = writeln!(
                s,
                "peak device memory: {:.2} GiB",
                b as f64 / (1u64 << 30) as f64
            );
        }
        if let Some(a) = &self.all_reduce {
            let _ = writeln!(
                s,
                "gradient all-reduce over {} ranks ({}): {:.2} MB in {:.3} ms ({:.1}% of a step)",
                self.world,
                self.backend,
                a.bytes as f64 / 1e6,
                a.ms,
                100.0 * a.ms / self.step_ms
            );
        }
        if let Some(p) = &self.profile {
            let _ = writeln!(
                s,
                "one profiled {}:",
                if self.train { "step" } else { "batch" }
            );
            s.push_str(&p.table(top));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_l14_flops_match_the_issue_estimates() {
        // Issue "SD2 end to end on the GPU": ≈ 162 GFLOP per image for inference, ≈ 393 for a
        // train step with two descriptions.
        let c = ClipConfig::vit_l14();
        let inf = flops_per_image(&c, false, 2, 128) / 1e9;
        assert!((inf - 162.0).abs() < 2.0, "inference {inf:.1} GFLOP");
        let train = flops_per_image(&c, true, 2, 128) / 1e9;
        assert!(
            (train - 393.0).abs() / 393.0 < 0.05,
            "train {train:.1} GFLOP"
        );
        println!("vit-l14: inference {inf:.1}, train step {train:.1} GFLOP per image");
    }
}
