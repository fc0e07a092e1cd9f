//! GPU kernel timings (feature `cuda`): CUDA events around each launch set, warm-up first,
//! median of many runs, random bf16 inputs (never zeros), outputs poisoned before the runs and
//! checked finite after. `scripts/bench/sdpa_attention.py` times PyTorch's SDPA on the same
//! shapes for the ratio (`scripts/gpu-check.sh` runs both in one lease).
use std::sync::Arc;

use serde::Serialize;

use super::flash;
use super::gpu::{DeviceBuffer, Gpu};
use super::launch::Arg;
use crate::{Error, Result};

/// One attention shape: batch × heads sequences of `seq` tokens, head dim 64.
#[derive(Clone, Debug, Serialize)]
pub struct AttnShape {
    pub name: String,
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub causal: bool,
}

impl AttnShape {
    /// The towers' shapes at a training batch: vision (ViT-L/14, 257 tokens, 16 heads),
    /// text (77 tokens causal, 12 heads), and a long sequence for scaling.
    pub fn defaults(batch: usize) -> Vec<AttnShape> {
        let s = |name: &str, batch, heads, seq, causal| AttnShape {
            name: name.into(),
            batch,
            heads,
            seq,
            causal,
        };
        vec![
            s("vision", batch, 16, 257, false),
            s("text", batch, 12, 77, true),
            s("long", 4, 16, 2048, false),
        ]
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AttnTiming {
    pub shape: AttnShape,
    /// Variant 4 forward (variant 3 + cp.async double buffering).
    pub fwd_tc4_ms: f64,
    pub fwd_tc4_tflops: f64,
    pub fwd_tc4_rel_diff: f64,
    /// Variant 3 forward (tensor cores, ldmatrix, 16-byte staging).
    pub fwd_tc3_ms: f64,
    pub fwd_tc3_tflops: f64,
    /// max |O_v3 − O_v1| / max |O_v1|.
    pub fwd_tc3_rel_diff: f64,
    /// Variant 2 forward (tensor cores).
    pub fwd_tc_ms: f64,
    pub fwd_tc_tflops: f64,
    /// max |O_v2 − O_v1| / max |O_v1| on the timed shape (a large-size parity check).
    pub fwd_tc_rel_diff: f64,
    /// Variant 1 (CUDA cores).
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub fwd_tflops: f64,
    pub bwd_tflops: f64,
    /// Spread of the timed runs: (max − min) / median, forward.
    pub fwd_spread: f64,
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let m = v[v.len() / 2];
    (m, (v[v.len() - 1] - v[0]) / m)
}

fn random_bf16(gpu: &Arc<Gpu>, n: usize, seed: u64) -> Result<DeviceBuffer> {
    let mut r = crate::rng::Rng::new(seed);
    let v: Vec<half::bf16> = (0..n).map(|_| half::bf16::from_f64(r.normal())).collect();
    gpu.upload(bytemuck::cast_slice(&v))
}

fn finite_bf16(buf: &DeviceBuffer, what: &str) -> Result<()> {
    let mut v = vec![half::bf16::ZERO; buf.bytes() / 2];
    buf.download(bytemuck::cast_slice_mut(&mut v))?;
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::Cuda(format!(
            "{what}: element {i} is {} after the timed runs (unwritten or overflow)",
            v[i]
        ))),
        None => Ok(()),
    }
}

/// Times the bf16 flash attention kernels (forward; backward = delta + dQ + dK/dV).
pub fn flash_attention(
    gpu: &Arc<Gpu>,
    shapes: &[AttnShape],
    warmup: usize,
    iters: usize,
) -> Result<Vec<AttnTiming>> {
    let d = flash::HEAD_DIM;
    let mut out = vec![];
    for (k, s) in shapes.iter().enumerate() {
        let (bh, n) = (s.batch * s.heads, s.batch * s.seq * s.heads * d);
        let seed = 1000 * k as u64;
        let (q, kk, v, dout) = (
            random_bf16(gpu, n, seed + 1)?,
            random_bf16(gpu, n, seed + 2)?,
            random_bf16(gpu, n, seed + 3)?,
            random_bf16(gpu, n, seed + 4)?,
        );
        let (o, dq, dk, dv) = (
            gpu.alloc(2 * n)?,
            gpu.alloc(2 * n)?,
            gpu.alloc(2 * n)?,
            gpu.alloc(2 * n)?,
        );
        let (lse, delta) = (gpu.alloc(4 * bh * s.seq)?, gpu.alloc(4 * bh * s.seq)?);
        for b in [&o, &dq, &dk, &dv, &lse, &delta] {
            b.fill_bytes(0xff)?; // NaN in bf16 and f32
        }
        let scale = 1.0 / (d as f32).sqrt();
        let tail = [
            Arg::I32(s.heads as i32),
            Arg::I32(s.seq as i32),
            Arg::I32(s.seq as i32),
            Arg::I32(s.causal as i32),
            Arg::F32(scale),
        ];
        let p = |b: &DeviceBuffer| Arg::U64(b.ptr());
        let fwd = || -> Result<()> {
            let mut a = vec![p(&q), p(&kk), p(&v), p(&o), p(&lse)];
            a.extend(tail);
            // SAFETY: every buffer is sized for this shape above.
            unsafe { gpu.launch("flash_fwd_d64_bf16", flash::fwd_config(bh, s.seq, d), &a) }
        };
        let bwd = || -> Result<()> {
            unsafe {
                gpu.launch(
                    "flash_delta_bf16",
                    flash::delta_config(bh * s.seq),
                    &[
                        p(&o),
                        p(&dout),
                        p(&delta),
                        Arg::I32(s.batch as i32),
                        Arg::I32(s.heads as i32),
                        Arg::I32(s.seq as i32),
                        Arg::I32(d as i32),
                    ],
                )?;
                let mut a = vec![p(&q), p(&kk), p(&v), p(&lse), p(&delta), p(&dout), p(&dq)];
                a.extend(tail);
                gpu.launch("flash_dq_d64_bf16", flash::dq_config(bh, s.seq, d), &a)?;
                let mut a = vec![p(&q), p(&kk), p(&v), p(&lse), p(&delta), p(&dout)];
                a.extend([p(&dk), p(&dv)]);
                a.extend(tail);
                gpu.launch("flash_dkdv_d64_bf16", flash::dkdv_config(bh, s.seq, d), &a)
            }
        };
        let o2 = gpu.alloc(2 * n)?;
        let lse2 = gpu.alloc(4 * bh * s.seq)?;
        o2.fill_bytes(0xff)?;
        let fwd_tc = || -> Result<()> {
            let mut a = vec![p(&q), p(&kk), p(&v), p(&o2), p(&lse2)];
            a.extend(tail);
            // SAFETY: as above.
            unsafe { gpu.launch("flash_fwd_tc_d64_bf16", flash::fwd_tc_config(bh, s.seq), &a) }
        };
        let o3 = gpu.alloc(2 * n)?;
        o3.fill_bytes(0xff)?;
        let fwd_tc3 = || -> Result<()> {
            let mut a = vec![p(&q), p(&kk), p(&v), p(&o3), p(&lse2)];
            a.extend(tail);
            // SAFETY: as above.
            unsafe {
                gpu.launch(
                    "flash_fwd_tc3_d64_bf16",
                    flash::fwd_tc_config(bh, s.seq),
                    &a,
                )
            }
        };
        let o4 = gpu.alloc(2 * n)?;
        o4.fill_bytes(0xff)?;
        let fwd_tc4 = || -> Result<()> {
            let mut a = vec![p(&q), p(&kk), p(&v), p(&o4), p(&lse2)];
            a.extend(tail);
            // SAFETY: as above.
            unsafe {
                gpu.launch(
                    "flash_fwd_tc4_d64_bf16",
                    flash::fwd_tc_config(bh, s.seq),
                    &a,
                )
            }
        };
        for _ in 0..warmup {
            fwd()?;
            fwd_tc()?;
            fwd_tc3()?;
            fwd_tc4()?;
            bwd()?;
        }
        gpu.synchronize()?;
        let (mut tf, mut tb, mut t2, mut t3, mut t4) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..iters {
            tf.push(gpu.time_ms(fwd)? as f64);
            t2.push(gpu.time_ms(fwd_tc)? as f64);
            t3.push(gpu.time_ms(fwd_tc3)? as f64);
            t4.push(gpu.time_ms(fwd_tc4)? as f64);
            tb.push(gpu.time_ms(bwd)? as f64);
        }
        gpu.synchronize()?;
        finite_bf16(&o4, &format!("flash v4 {} out", s.name))?;
        finite_bf16(&o3, &format!("flash v3 {} out", s.name))?;
        finite_bf16(&o2, &format!("flash v2 {} out", s.name))?;
        let read = |b: &DeviceBuffer| -> Result<Vec<f32>> {
            let mut v = vec![half::bf16::ZERO; n];
            b.download(bytemuck::cast_slice_mut(&mut v))?;
            Ok(v.iter().map(|x| x.to_f32()).collect())
        };
        let x1 = read(&o)?;
        let scale = x1.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let rel = |x: &[f32]| {
            x1.iter()
                .zip(x)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
                / scale.max(1e-30)
        };
        let (fwd_tc_rel_diff, fwd_tc3_rel_diff, fwd_tc4_rel_diff) =
            (rel(&read(&o2)?), rel(&read(&o3)?), rel(&read(&o4)?));
        for (b, what) in [(&o, "out"), (&dq, "dq"), (&dk, "dk"), (&dv, "dv")] {
            finite_bf16(b, &format!("flash {} {what}", s.name))?;
        }
        let flops = flash::fwd_flops(bh, s.seq, s.seq, d, s.causal);
        let ((fwd_ms, fwd_spread), (bwd_ms, _), (fwd_tc_ms, _), (fwd_tc3_ms, _), (fwd_tc4_ms, _)) =
            (median(tf), median(tb), median(t2), median(t3), median(t4));
        out.push(AttnTiming {
            shape: s.clone(),
            fwd_tc4_ms,
            fwd_tc4_tflops: flops / (fwd_tc4_ms * 1e9),
            fwd_tc4_rel_diff,
            fwd_tc3_ms,
            fwd_tc3_tflops: flops / (fwd_tc3_ms * 1e9),
            fwd_tc3_rel_diff,
            fwd_tc_ms,
            fwd_tc_tflops: flops / (fwd_tc_ms * 1e9),
            fwd_tc_rel_diff,
            fwd_ms,
            bwd_ms,
            fwd_tflops: flops / (fwd_ms * 1e9),
            bwd_tflops: 2.5 * flops / (bwd_ms * 1e9),
            fwd_spread,
        });
    }
    Ok(out)
}

/// One plain matrix product shape: C [m, n] = A [m, k] · Wᵀ (W [n, k]), as a linear layer.
#[derive(Clone, Debug, Serialize)]
pub struct GemmShape {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl GemmShape {
    /// ViT-L/14's linear layers at a batch of `batch` images (257 tokens each).
    pub fn defaults(batch: usize) -> Vec<GemmShape> {
        let m = batch * 257;
        let s = |name: &str, n, k| GemmShape {
            name: name.into(),
            m,
            n,
            k,
        };
        vec![
            s("qkv/out proj", 1024, 1024),
            s("mlp fc1", 4096, 1024),
            s("mlp fc2", 1024, 4096),
        ]
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GemmTiming {
    pub shape: GemmShape,
    pub dtype: String,
    pub cublas_ms: Option<f64>,
    pub simt_ms: f64,
    pub cublas_tflops: Option<f64>,
    pub simt_tflops: f64,
    /// max |simt − cublas| / max |cublas| on the timed output (a large-size parity check).
    pub max_rel_diff: Option<f64>,
}

/// Times the plain GEMM paths of the CUDA storage: cuBLAS (when loadable) and the SIMT kernel.
pub fn gemm(
    gpu: &Arc<Gpu>,
    shapes: &[GemmShape],
    warmup: usize,
    iters: usize,
) -> Result<Vec<GemmTiming>> {
    use super::gpu::GemmArgs;
    let mut out = vec![];
    for (i, s) in shapes.iter().enumerate() {
        for bf in [true, false] {
            let esz = if bf { 2 } else { 4 };
            let rand = |n: usize, seed: u64| -> Result<DeviceBuffer> {
                if bf {
                    random_bf16(gpu, n, seed)
                } else {
                    let mut r = crate::rng::Rng::new(seed);
                    let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
                    gpu.upload(bytemuck::cast_slice(&v))
                }
            };
            let a = rand(s.m * s.k, 10 * i as u64 + 1)?;
            let w = rand(s.n * s.k, 10 * i as u64 + 2)?;
            let (c1, c2) = (gpu.alloc(esz * s.m * s.n)?, gpu.alloc(esz * s.m * s.n)?);
            let args = |c: &DeviceBuffer| GemmArgs {
                a: a.ptr(),
                b: w.ptr(),
                c: c.ptr(),
                batch: 1,
                m: s.m,
                n: s.n,
                k: s.k,
                trans_a: false,
                trans_b: true,
                rhs_batched: false,
                bf16: bf,
                alpha: 1.0,
                beta: 0.0,
            };
            let simt = || -> Result<()> {
                let cfg = super::launch::LaunchConfig {
                    grid: ((s.n as u32).div_ceil(64), (s.m as u32).div_ceil(64), 1),
                    block: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let p = |b: &DeviceBuffer| Arg::U64(b.ptr());
                // SAFETY: buffers sized for this product above.
                unsafe {
                    gpu.launch(
                        if bf {
                            "gemm_simt_bf16"
                        } else {
                            "gemm_simt_f32"
                        },
                        cfg,
                        &[
                            p(&a),
                            p(&w),
                            p(&c2),
                            Arg::I32(s.m as i32),
                            Arg::I32(s.n as i32),
                            Arg::I32(s.k as i32),
                            Arg::I32(0),
                            Arg::I32(1),
                            Arg::U64((s.m * s.k) as u64),
                            Arg::U64(0),
                            Arg::U64((s.m * s.n) as u64),
                        ],
                    )
                }
            };
            let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
                for _ in 0..warmup {
                    f()?;
                }
                let mut t = vec![];
                for _ in 0..iters {
                    t.push(gpu.time_ms(f)? as f64);
                }
                Ok(median(t).0)
            };
            let simt_ms = time(&simt)?;
            let has = gpu.has_cublas();
            let cublas_ms = if has {
                // SAFETY: as above.
                Some(time(&|| unsafe { gpu.gemm(args(&c1)).map(|_| ()) })?)
            } else {
                None
            };
            gpu.synchronize()?;
            let max_rel_diff = if has {
                let read = |b: &DeviceBuffer| -> Result<Vec<f32>> {
                    if bf {
                        let mut v = vec![half::bf16::ZERO; s.m * s.n];
                        b.download(bytemuck::cast_slice_mut(&mut v))?;
                        Ok(v.iter().map(|x| x.to_f32()).collect())
                    } else {
                        let mut v = vec![0f32; s.m * s.n];
                        b.download(bytemuck::cast_slice_mut(&mut v))?;
                        Ok(v)
                    }
                };
                let (x, y) = (read(&c1)?, read(&c2)?);
                let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let diff = x
                    .iter()
                    .zip(&y)
                    .fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64));
                Some(diff / scale.max(1e-30))
            } else {
                None
            };
            let flops = 2.0 * (s.m * s.n * s.k) as f64;
            out.push(GemmTiming {
                shape: s.clone(),
                dtype: if bf { "bf16" } else { "f32" }.into(),
                cublas_ms,
                simt_ms,
                cublas_tflops: cublas_ms.map(|t| flops / (t * 1e9)),
                simt_tflops: flops / (simt_ms * 1e9),
                max_rel_diff,
            });
        }
    }
    Ok(out)
}

/// One LoRA-linear shape: Y [m, n] = X [m, k]·Wᵀ + b + s·(X·Aᵀ)·Bᵀ, rank r.
#[derive(Clone, Debug, Serialize)]
pub struct LoraShape {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

impl LoraShape {
    /// The projections of ViT-L/14 (batch 128, 257 tokens) and of the text tower (batch 256,
    /// 77 tokens), SD2's rank 8 (CUDA backend II's table).
    pub fn defaults() -> Vec<LoraShape> {
        let s = |name: &str, m, n, k| LoraShape {
            name: name.into(),
            m,
            n,
            k,
            r: 8,
        };
        let (mv, mt) = (128 * 257, 256 * 77);
        vec![
            s("vit qkv", mv, 3072, 1024),
            s("vit out", mv, 1024, 1024),
            s("vit fc1", mv, 4096, 1024),
            s("vit fc2", mv, 1024, 4096),
            s("text qkv", mt, 2304, 768),
            s("text out", mt, 768, 768),
            s("text fc1", mt, 3072, 768),
            s("text fc2", mt, 768, 3072),
        ]
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LoraTiming {
    pub shape: LoraShape,
    /// sd2: S = X·Aᵀ (the same kernel, n = r) + the fused Y kernel.
    pub fused_ms: f64,
    /// cuBLAS X·Wᵀ alone (no LoRA, no bias): the floor the fused kernel is held to.
    pub cublas_plain_ms: Option<f64>,
    /// PEFT's structure on cuBLAS: S = X·Aᵀ, Y = X·Wᵀ, Y += s·S·Bᵀ (beta = 1; PEFT adds in a
    /// separate kernel, so this is a lower bound for it).
    pub cublas_3gemm_ms: Option<f64>,
    pub fused_tflops: f64,
    pub cublas_plain_tflops: Option<f64>,
    /// max |fused − 3-GEMM| / max |3-GEMM| on Y (validation before timing).
    pub max_rel_diff: Option<f64>,
}

/// Times the LoRA-linear forward: the fused kernel against cuBLAS (plain and 3-GEMM), bf16.
pub fn lora(
    gpu: &Arc<Gpu>,
    shapes: &[LoraShape],
    warmup: usize,
    iters: usize,
) -> Result<Vec<LoraTiming>> {
    use super::gpu::GemmArgs;
    let mut out = vec![];
    for (i, s) in shapes.iter().enumerate() {
        let seed = 100 * i as u64;
        let x = random_bf16(gpu, s.m * s.k, seed + 1)?;
        let w = random_bf16(gpu, s.n * s.k, seed + 2)?;
        let a = random_bf16(gpu, s.r * s.k, seed + 3)?;
        let bl = random_bf16(gpu, s.n * s.r, seed + 4)?;
        let (sl, y1, y2) = (
            gpu.alloc(2 * s.m * s.r)?,
            gpu.alloc(2 * s.m * s.n)?,
            gpu.alloc(2 * s.m * s.n)?,
        );
        let scale = 4.0f32;
        let p = |b: &DeviceBuffer| Arg::U64(b.ptr());
        let cfg = |n: usize| super::launch::LaunchConfig {
            grid: ((n as u32).div_ceil(64), (s.m as u32).div_ceil(64), 1),
            block: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let fused = || -> Result<()> {
            // SAFETY: every buffer is sized for this shape above.
            unsafe {
                gpu.launch(
                    "lora_gemm_fwd_bf16",
                    cfg(s.r),
                    &[
                        p(&x),
                        p(&a),
                        Arg::null(),
                        Arg::null(),
                        Arg::null(),
                        Arg::null(),
                        p(&sl),
                        Arg::I32(s.m as i32),
                        Arg::I32(s.r as i32),
                        Arg::I32(s.k as i32),
                        Arg::I32(0),
                        Arg::F32(1.0),
                        Arg::I32(0),
                    ],
                )?;
                gpu.launch(
                    "lora_gemm_fwd_bf16",
                    cfg(s.n),
                    &[
                        p(&x),
                        p(&w),
                        Arg::null(),
                        p(&sl),
                        p(&bl),
                        Arg::null(),
                        p(&y1),
                        Arg::I32(s.m as i32),
                        Arg::I32(s.n as i32),
                        Arg::I32(s.k as i32),
                        Arg::I32(s.r as i32),
                        Arg::F32(scale),
                        Arg::I32(0),
                    ],
                )
            }
        };
        let gemm =
            |a_: &DeviceBuffer, b_: &DeviceBuffer, c: &DeviceBuffer, n, k, alpha, beta| GemmArgs {
                a: a_.ptr(),
                b: b_.ptr(),
                c: c.ptr(),
                batch: 1,
                m: s.m,
                n,
                k,
                trans_a: false,
                trans_b: true,
                rhs_batched: false,
                bf16: true,
                alpha,
                beta,
            };
        let s2 = gpu.alloc(2 * s.m * s.r)?;
        // SAFETY (both closures): buffers sized above.
        let plain = || unsafe { gpu.gemm(gemm(&x, &w, &y2, s.n, s.k, 1.0, 0.0)).map(|_| ()) };
        let three = || -> Result<()> {
            unsafe {
                gpu.gemm(gemm(&x, &a, &s2, s.r, s.k, 1.0, 0.0))?;
                gpu.gemm(gemm(&x, &w, &y2, s.n, s.k, 1.0, 0.0))?;
                gpu.gemm(gemm(&s2, &bl, &y2, s.n, s.r, scale, 1.0))?;
            }
            Ok(())
        };
        // L2 flushed between timed repeats (a 256 MiB write, outside the events), so every
        // repeat reads X and W from HBM as a training step does.
        let flush = gpu.alloc(256 << 20)?;
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            for _ in 0..warmup {
                f()?;
            }
            let mut t = vec![];
            for i in 0..iters {
                flush.fill_bytes(i as u8)?;
                t.push(gpu.time_ms(f)? as f64);
            }
            Ok(median(t).0)
        };
        // Validate before timing: fused against the 3-GEMM result.
        fused()?;
        let has = gpu.has_cublas();
        let max_rel_diff = if has {
            three()?;
            gpu.synchronize()?;
            let read = |b: &DeviceBuffer| -> Result<Vec<f32>> {
                let mut v = vec![half::bf16::ZERO; s.m * s.n];
                b.download(bytemuck::cast_slice_mut(&mut v))?;
                Ok(v.iter().map(|x| x.to_f32()).collect())
            };
            let (f, c) = (read(&y1)?, read(&y2)?);
            let sc = c.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let d = f
                .iter()
                .zip(&c)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
            let rel = d / sc.max(1e-30);
            if rel.is_nan() || rel >= 2e-2 {
                return Err(Error::Cuda(format!(
                    "lora gemm {}: fused differs from cuBLAS by {rel:.2e} (relative to max |Y|)",
                    s.name
                )));
            }
            Some(rel)
        } else {
            None
        };
        let fused_ms = time(&fused)?;
        let (cublas_plain_ms, cublas_3gemm_ms) = if has {
            (Some(time(&plain)?), Some(time(&three)?))
        } else {
            (None, None)
        };
        let flops = 2.0 * (s.m * s.n * s.k) as f64;
        out.push(LoraTiming {
            shape: s.clone(),
            fused_ms,
            cublas_plain_ms,
            cublas_3gemm_ms,
            fused_tflops: flops / (fused_ms * 1e9),
            cublas_plain_tflops: cublas_plain_ms.map(|t| flops / (t * 1e9)),
            max_rel_diff,
        });
    }
    Ok(out)
}
