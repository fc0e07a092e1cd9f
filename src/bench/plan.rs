//! The launch plan of one SD2 step (`sd2 bench train|infer --plan`): the step run on
//! `cuda:plan`, where every launch is recorded with its FLOPs and bytes and nothing executes
//! (`backend::cuda::plan`), summed by op class, with a roofline bound per GPU:
//! Σ over launches of max(FLOPs / peak, bytes / bandwidth). It counts what our kernel choices
//! move — how many launches, how many bytes — between GPU runs, in seconds on any machine; it is
//! a lower bound on the step's time, never a measurement of it.
use serde::Serialize;

use super::model::{self, BenchConfig};
use crate::profile::Profile;
use crate::{Device, Result};

/// A GPU's dense bf16 peak and HBM bandwidth (SXM parts, NVIDIA's data sheets).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Gpu {
    /// The name tables print (`H100 SXM`).
    pub name: &'static str,
    /// Dense bf16 tensor-core peak, TFLOP/s (no sparsity).
    pub tflops: f64,
    /// HBM bandwidth, TB/s (10¹² bytes per second).
    pub tb_per_s: f64,
}

/// The GPUs the goals are stated on.
pub const GPUS: [Gpu; 2] = [
    Gpu {
        name: "H100 SXM",
        tflops: 989.4,
        tb_per_s: 3.35,
    },
    Gpu {
        name: "H200",
        tflops: 989.4,
        tb_per_s: 4.8,
    },
];

/// Launches of one op class.
#[derive(Clone, Debug, Serialize)]
pub struct ClassTotal {
    /// The class's name, from `class_of`.
    pub class: &'static str,
    /// Kernel launches in the class (device copies not counted).
    pub launches: usize,
    /// Bytes the class's launches read and write, as recorded.
    pub bytes: f64,
    /// FLOPs of the class's launches, as recorded.
    pub flops: f64,
    /// The roofline bound of these launches on each of `GPUS`, ms.
    pub bound_ms: Vec<f64>,
}

/// Launches of one kernel.
#[derive(Clone, Debug, Serialize)]
pub struct KernelTotal {
    /// The kernel's name (or the recorder's name for device copies).
    pub name: String,
    /// Recorded entries of this name: launches, or copies for the copy entry.
    pub launches: usize,
    /// Bytes read and written over those launches.
    pub bytes: f64,
    /// FLOPs over those launches.
    pub flops: f64,
    /// The roofline bound of these launches on the H200, ms.
    pub h200_ms: f64,
}

/// The plan of one step.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The preset planned.
    pub preset: String,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// A training step (true) or an inference forward.
    pub train: bool,
    /// Images in the step (the micro-batch chosen when `--batch 0`).
    pub batch: usize,
    /// Kernel launches in the step (device copies not counted).
    pub launches: usize,
    /// Bytes all launches and copies read and write, as recorded.
    pub bytes: f64,
    /// FLOPs of all launches, as recorded.
    pub flops: f64,
    /// Most bytes in (virtual) device memory at once during the timed step.
    pub peak_bytes: Option<usize>,
    /// The totals per op class, largest H200 bound first.
    pub classes: Vec<ClassTotal>,
    /// The kernels with the largest bound on the H200, summed over their launches.
    pub top_kernels: Vec<KernelTotal>,
    /// Training: the traffic floor of the step (`traffic_floor`), bytes.
    pub floor_bytes: Option<f64>,
    /// Per GPU of `GPUS`: the roofline bound of the step (ms) and the images/s it allows.
    pub bound_ms: Vec<f64>,
    /// Per GPU of `GPUS`: `batch` over the step's bound, images/s (an upper bound).
    pub images_per_s: Vec<f64>,
}

/// Whether a recorded entry is a device copy (listed for its bytes, not a kernel launch).
fn is_copy(name: &str) -> bool {
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    return name == crate::backend::cuda::plan::MEMCPY;
    #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
    {
        let _ = name;
        false
    }
}

/// The op class of a kernel, by its name.
pub fn class_of(kernel: &str) -> &'static str {
    const CLASSES: [(&str, &[&str]); 10] = [
        ("gemm", &["gemm_simt", "cublas"]),
        (
            "lora gemm",
            &[
                "lora_gemm",
                "lora_down",
                "lora_up",
                "lora_da",
                "lora_dsdb",
                "lora_grads",
            ],
        ),
        ("attention", &["flash_", "clam_attention"]),
        ("layernorm", &["layernorm"]),
        ("reductions", &["sum_to", "column_sum"]),
        (
            "softmax, l2norm, losses",
            &["softmax", "l2norm", "cross_entropy", "sigmoid_loss"],
        ),
        ("optimizer", &["adamw", "sum_sq", "grad_clip"]),
        (
            "elementwise",
            &[
                "unary", "binary", "affine", "scale_by", "dropout", "cast_", "bias_",
            ],
        ),
        (
            "layout, gathers, copies",
            &[
                "gather_strided",
                "copy2d",
                "index_rows",
                "index_add_rows",
                "patchify",
                "ids_checked",
                "memcpy",
            ],
        ),
        ("other", &[""]),
    ];
    CLASSES
        .iter()
        .find(|(_, prefixes)| prefixes.iter().any(|p| kernel.starts_with(p)))
        .map_or("other", |(c, _)| c)
}

/// The roofline time of one launch on `g`, ms.
fn bound_ms(g: &Gpu, flops: f64, bytes: f64) -> f64 {
    (flops / (g.tflops * 1e12)).max(bytes / (g.tb_per_s * 1e12)) * 1e3
}

/// The HBM traffic a training step cannot go below with these kernel boundaries — each GEMM,
/// attention and LayerNorm its own kernel, everything elementwise fused into them:
/// - every tensor that crosses a boundary or is saved for the backward is written once and
///   read once per consumer; per encoder block of T tokens, width d, MLP width f (element
///   size e), forward: LN1 x→n1 (2Td), one q/k/v GEMM n1→q,k,v (4Td), attention (4Td),
///   out_proj o + x→x2 (3Td), LN2 (2Td), fc1 n2→h, quick_gelu(h) (Td + 2Tf), fc2 with the
///   residual (Tf + 2Td) = 18Td + 3Tf; backward: fc2's dX with quick_gelu′(h) (Td + 2Tf), fc1's
///   dX (Tf + Td), LN2 with the residual's gradient (4Td), out_proj's dX plus its LoRA dA
///   from o (3Td), attention (8Td), q/k/v's dX plus one read of n1 for their dA (5Td), LN1
///   (4Td) = 26Td + 3Tf; 44Td + 6Tf in all, times e;
/// - every frozen weight read once forward and once backward (dX), 2·(4d² + 2df)·e per block,
///   per tower pass;
/// - LoRA factors, optimizer state, embeddings, CLAM and the losses: under 1% here, not
///   counted.
///
/// The vision tower runs `batch` images (T = batch · positions); the text tower runs each of
/// `text_passes` (texts, tokens per text) — in the SD2 step the class phrases, then the
/// micro-batch's descriptions, each tokenized to its longest.
pub fn traffic_floor(
    clip: &crate::clip::ClipConfig,
    batch: usize,
    text_passes: &[(usize, usize)],
    el: f64,
) -> f64 {
    let tower = |tokens: usize, d: usize, f: usize, layers: usize| {
        let (t, d, f) = (tokens as f64, d as f64, f as f64);
        layers as f64 * el * (44.0 * t * d + 6.0 * t * f + 2.0 * (4.0 * d * d + 2.0 * d * f))
    };
    let (v, t) = (&clip.vision_config, &clip.text_config);
    let text: f64 = text_passes
        .iter()
        .map(|&(rows, width)| {
            tower(
                rows * width,
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers,
            )
        })
        .sum();
    tower(
        batch * v.num_positions(),
        v.hidden_size,
        v.intermediate_size,
        v.num_hidden_layers,
    ) + text
}

/// The plan of a recorded step (`p`: the profile of a step on `cuda:plan`) of `batch` images,
/// `text_passes` what its text tower ran on (`BenchResult::text_passes`).
pub fn summarize(
    cfg: &BenchConfig,
    batch: usize,
    p: &Profile,
    peak: Option<usize>,
    text_passes: &[(usize, usize)],
) -> Plan {
    let mut classes: Vec<ClassTotal> = vec![];
    for k in &p.kernels {
        let (fl, by) = (k.flops.unwrap_or(0.0), k.bytes.unwrap_or(0.0));
        let class = class_of(&k.name);
        let at = match classes.iter().position(|c| c.class == class) {
            Some(i) => i,
            None => {
                classes.push(ClassTotal {
                    class,
                    launches: 0,
                    bytes: 0.0,
                    flops: 0.0,
                    bound_ms: vec![0.0; GPUS.len()],
                });
                classes.len() - 1
            }
        };
        let c = &mut classes[at];
        c.launches += !is_copy(&k.name) as usize;
        c.bytes += by;
        c.flops += fl;
        for (t, g) in c.bound_ms.iter_mut().zip(&GPUS) {
            *t += bound_ms(g, fl, by);
        }
    }
    classes.sort_by(|a, b| b.bound_ms[1].total_cmp(&a.bound_ms[1]));
    let mut per: std::collections::BTreeMap<&str, KernelTotal> = Default::default();
    for k in &p.kernels {
        let (fl, by) = (k.flops.unwrap_or(0.0), k.bytes.unwrap_or(0.0));
        let e = per.entry(&k.name).or_insert_with(|| KernelTotal {
            name: k.name.clone(),
            launches: 0,
            bytes: 0.0,
            flops: 0.0,
            h200_ms: 0.0,
        });
        e.launches += 1;
        e.bytes += by;
        e.flops += fl;
        e.h200_ms += bound_ms(&GPUS[1], fl, by);
    }
    let mut top_kernels: Vec<KernelTotal> = per.into_values().collect();
    top_kernels.sort_by(|a, b| b.h200_ms.total_cmp(&a.h200_ms));
    top_kernels.truncate(16);
    let sum = |f: &dyn Fn(&ClassTotal) -> f64| classes.iter().map(f).sum::<f64>();
    let bound: Vec<f64> = (0..GPUS.len())
        .map(|i| sum(&|c: &ClassTotal| c.bound_ms[i]))
        .collect();
    Plan {
        preset: cfg.preset.clone(),
        dtype: cfg.dtype.to_string(),
        train: cfg.train,
        batch,
        // Copies are listed for their bytes, but they are not kernel launches.
        launches: p.kernels.iter().filter(|k| !is_copy(&k.name)).count(),
        bytes: sum(&|c| c.bytes),
        flops: sum(&|c| c.flops),
        peak_bytes: peak,
        floor_bytes: if cfg.train {
            crate::presets::get(&cfg.preset).ok().map(|p| {
                traffic_floor(
                    &p.clip,
                    batch,
                    text_passes,
                    cfg.dtype.size_in_bytes() as f64,
                )
            })
        } else {
            None
        },
        top_kernels,
        images_per_s: bound.iter().map(|ms| batch as f64 / (ms / 1e3)).collect(),
        bound_ms: bound,
        classes,
    }
}

/// Runs one warm-up step and one recorded step of `cfg` on `cuda:plan` (the device in `cfg`
/// is ignored) and returns its plan.
pub fn run(cfg: &BenchConfig) -> Result<Plan> {
    let cfg = BenchConfig {
        device: Device::CudaPlan,
        steps: 1,
        warmup: cfg.warmup.min(1),
        trace: None,
        ..cfg.clone()
    };
    let r = model::run(&cfg)?;
    let p = r.profile.as_ref().ok_or_else(|| {
        crate::Error::Msg("bench --plan: the recorded step has no profile".into())
    })?;
    Ok(summarize(
        &cfg,
        r.batch,
        p,
        r.peak_device_bytes,
        &r.text_passes,
    ))
}

impl Plan {
    /// The plan as the table `sd2 bench … --plan` prints.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "launch plan of one {} — preset {}, {}, batch {} (recorded on cuda:plan: counted, not run)",
            if self.train { "training step" } else { "forward" },
            self.preset,
            self.dtype,
            self.batch
        );
        let _ = writeln!(
            s,
            "{:<24} {:>9} {:>10} {:>10} {:>12} {:>12}",
            "class", "launches", "GB", "TFLOP", "H100 ms", "H200 ms"
        );
        for c in &self.classes {
            let _ = writeln!(
                s,
                "{:<24} {:>9} {:>10.2} {:>10.2} {:>12.2} {:>12.2}",
                c.class,
                c.launches,
                c.bytes / 1e9,
                c.flops / 1e12,
                c.bound_ms[0],
                c.bound_ms[1]
            );
        }
        let _ = writeln!(
            s,
            "{:<24} {:>9} {:>10.2} {:>10.2} {:>12.2} {:>12.2}",
            "total",
            self.launches,
            self.bytes / 1e9,
            self.flops / 1e12,
            self.bound_ms[0],
            self.bound_ms[1]
        );
        if let Some(f) = self.floor_bytes {
            let _ = writeln!(
                s,
                "traffic floor for these kernel boundaries: {:.2} GB; this step moves {:.2}× it",
                f / 1e9,
                self.bytes / f
            );
        }
        for (g, ips) in GPUS.iter().zip(&self.images_per_s) {
            let _ = writeln!(
                s,
                "roofline bound on {} ({:.0} TFLOP/s bf16, {:.2} TB/s): {:.0} images/s",
                g.name, g.tflops, g.tb_per_s, ips
            );
        }
        let _ = writeln!(
            s,
            "\n{:<32} {:>9} {:>10} {:>10} {:>12}",
            "kernel", "launches", "GB", "TFLOP", "H200 ms"
        );
        for k in &self.top_kernels {
            let _ = writeln!(
                s,
                "{:<32} {:>9} {:>10.2} {:>10.2} {:>12.2}",
                k.name,
                k.launches,
                k.bytes / 1e9,
                k.flops / 1e12,
                k.h200_ms
            );
        }
        if let Some(b) = self.peak_bytes {
            let _ = writeln!(
                s,
                "peak device memory (virtual): {:.2} GiB",
                b as f64 / (1u64 << 30) as f64
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_fall_into_their_classes() {
        assert_eq!(class_of("flash_bwd_dq_tc3_d64_bf16"), "attention");
        assert_eq!(class_of("lora_gemm3_fwd_bf16"), "lora gemm");
        assert_eq!(class_of("lora_dsdb_part_bf16"), "lora gemm");
        assert_eq!(class_of("lora_grads_r8_bf16"), "lora gemm");
        assert_eq!(class_of("gemm_simt_bf16"), "gemm");
        assert_eq!(class_of("binary_bf16"), "elementwise");
        assert_eq!(class_of("copy2d_b2"), "layout, gathers, copies");
        assert_eq!(class_of("adamw_multi_f32"), "optimizer");
        assert_eq!(class_of("something_new"), "other");
        // 1 GFLOP and 1 GB on an H200: the memory side bounds it.
        let t = bound_ms(&GPUS[1], 1e9, 1e9);
        assert!((t - 1e3 / 4.8e3).abs() < 1e-9, "{t}");
    }
}
