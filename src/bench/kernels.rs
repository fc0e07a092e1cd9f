//! GPU kernel timings (feature `cuda`): CUDA events around each launch set, warm-up first,
//! median of many runs, random bf16 inputs (never zeros), outputs poisoned before the runs and
//! checked finite after. `scripts/bench/sdpa_attention.py` times PyTorch's SDPA on the same
//! shapes for the ratio (`scripts/gpu-check.sh` runs both in one lease).
use std::sync::Arc;

use serde::Serialize;

use crate::backend::cuda::flash;
use crate::backend::cuda::gpu::{DeviceBuffer, Gpu};
use crate::backend::cuda::kernels as kn;
use crate::backend::cuda::launch::Arg;
use crate::{Error, Result};

/// One attention shape: batch × heads sequences of `seq` tokens, head dim 64.
#[derive(Clone, Debug, Serialize)]
pub struct AttnShape {
    /// The label in tables (`vision`, `text`, `long`).
    pub name: String,
    /// Sequences in the batch.
    pub batch: usize,
    /// Attention heads per sequence.
    pub heads: usize,
    /// Tokens per sequence, for queries and keys alike.
    pub seq: usize,
    /// Whether each query sees only keys at or before its position (the text tower).
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

/// One attention shape's timings (median ms of the timed runs; TFLOP/s from
/// `flash::fwd_flops`, which counts only the unmasked pairs of a causal shape).
#[derive(Clone, Debug, Serialize)]
pub struct AttnTiming {
    /// The shape timed.
    pub shape: AttnShape,
    /// Variant 4 forward (variant 3 + cp.async double buffering).
    pub fwd_tc4_ms: f64,
    /// Variant 4 forward, TFLOP/s.
    pub fwd_tc4_tflops: f64,
    /// max |O_v4 − O_v1| / max |O_v1| on the timed shape.
    pub fwd_tc4_rel_diff: f64,
    /// Variant 3 forward (tensor cores, ldmatrix, 16-byte staging).
    pub fwd_tc3_ms: f64,
    /// Variant 3 forward, TFLOP/s.
    pub fwd_tc3_tflops: f64,
    /// max |O_v3 − O_v1| / max |O_v1| on the timed shape (a large-size parity check).
    pub fwd_tc3_rel_diff: f64,
    /// Tensor-core backward variants 2 and 3 (dQ + deltas, then dK/dV): ms, TFLOP/s (2.5×
    /// the forward's FLOPs, the same convention as variant 1 and SDPA), and
    /// max |dX_v − dX_v1| / max |dX_v1| over dQ, dK, dV.
    pub bwd_tc2_ms: f64,
    /// Backward variant 2, TFLOP/s.
    pub bwd_tc2_tflops: f64,
    /// Backward variant 2's worst relative difference from variant 1 over dQ, dK, dV.
    pub bwd_tc2_rel_diff: f64,
    /// Backward variant 3, ms.
    pub bwd_tc3_ms: f64,
    /// Backward variant 3, TFLOP/s.
    pub bwd_tc3_tflops: f64,
    /// Backward variant 3's worst relative difference from variant 1 over dQ, dK, dV.
    pub bwd_tc3_rel_diff: f64,
    /// Variant 1 (CUDA cores).
    pub fwd_ms: f64,
    /// Variant 1 backward (delta, dQ, then dK/dV), ms.
    pub bwd_ms: f64,
    /// Variant 1 forward, TFLOP/s.
    pub fwd_tflops: f64,
    /// Variant 1 backward, TFLOP/s (2.5× the forward's FLOPs).
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

/// Times the bf16 flash attention kernels: forward variants 1, 3 and 4, backward variant 1 (delta +
/// dQ + dK/dV) and the tensor-core backward variants 2 and 3 (dQ with deltas + dK/dV).
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
        let p = |b: &DeviceBuffer| Arg::U64(b.ptr());
        let (heads, sq, skv, causal) = (s.heads, s.seq, s.seq, s.causal);
        let fwd = || -> Result<()> {
            let k = kn::FlashFwd {
                q: p(&q),
                k: p(&kk),
                v: p(&v),
                out: p(&o),
                lse: p(&lse),
                heads,
                sq,
                skv,
                causal,
                scale,
            };
            // SAFETY: every buffer is sized for this shape above.
            unsafe { gpu.run("flash_fwd_d64_bf16", flash::fwd_config(bh, s.seq, d), k) }
        };
        // dK/dV take the same arguments in every backward variant: only delta and the outputs
        // differ.
        let (pq, pk, pv, plse, pdout) = (p(&q), p(&kk), p(&v), p(&lse), p(&dout));
        let dkdv_args = move |delta: Arg, dk: Arg, dv: Arg| kn::FlashDkdv {
            q: pq,
            k: pk,
            v: pv,
            lse: plse,
            delta,
            dout: pdout,
            dk,
            dv,
            heads,
            sq,
            skv,
            causal,
            scale,
        };
        let bwd = || -> Result<()> {
            let delta_k = kn::FlashDelta {
                o: p(&o),
                dout: p(&dout),
                delta: p(&delta),
                batch: s.batch,
                heads,
                sq,
                d,
            };
            let dq_k = kn::FlashDq {
                q: p(&q),
                k: p(&kk),
                v: p(&v),
                lse: p(&lse),
                delta: p(&delta),
                dout: p(&dout),
                dq: p(&dq),
                heads,
                sq,
                skv,
                causal,
                scale,
            };
            let dkdv_k = dkdv_args(p(&delta), p(&dk), p(&dv));
            // SAFETY: as above.
            unsafe {
                gpu.run("flash_delta_bf16", flash::delta_config(bh * s.seq), delta_k)?;
                gpu.run("flash_dq_d64_bf16", flash::dq_config(bh, s.seq, d), dq_k)?;
                gpu.run(
                    "flash_dkdv_d64_bf16",
                    flash::dkdv_config(bh, s.seq, d),
                    dkdv_k,
                )
            }
        };
        // Tensor-core backward variants, on variant 1's O and lse; each writes its own outputs
        // [delta, dq, dk, dv].
        let bwd_bufs = |_: u32| -> Result<[DeviceBuffer; 4]> {
            let b = [
                gpu.alloc(4 * bh * s.seq)?,
                gpu.alloc(2 * n)?,
                gpu.alloc(2 * n)?,
                gpu.alloc(2 * n)?,
            ];
            for x in &b {
                x.fill_bytes(0xff)?;
            }
            Ok(b)
        };
        let (g2, g3) = (bwd_bufs(2)?, bwd_bufs(3)?);
        let bwd_tc = |variant: u32, g: &[DeviceBuffer; 4]| {
            let (dq_kernel, dkdv_kernel) = flash::bwd_tc_kernels(variant, d);
            let (delta, dq, dk, dv) = (p(&g[0]), p(&g[1]), p(&g[2]), p(&g[3]));
            let (q, kk, v, o, lse, dout) = (p(&q), p(&kk), p(&v), p(&o), p(&lse), p(&dout));
            move || -> Result<()> {
                let dq_k = kn::FlashBwdDq {
                    q,
                    k: kk,
                    v,
                    o,
                    lse,
                    dout,
                    delta,
                    dq,
                    heads,
                    sq,
                    skv,
                    causal,
                    scale,
                };
                let dkdv_k = dkdv_args(delta, dk, dv);
                // SAFETY: every buffer is sized for this shape above.
                unsafe {
                    gpu.run(&dq_kernel, flash::bwd_tc_config(bh, s.seq), dq_k)?;
                    gpu.run(&dkdv_kernel, flash::bwd_tc_config(bh, s.seq), dkdv_k)
                }
            }
        };
        let (bwd_tc2, bwd_tc3) = (bwd_tc(2, &g2), bwd_tc(3, &g3));
        let lse2 = gpu.alloc(4 * bh * s.seq)?;
        // Forward variants 3 and 4 (tensor cores) share arguments; each writes its own output.
        let tc = |kernel: &'static str, out: &DeviceBuffer| {
            let (q, kk, v, out, lse) = (p(&q), p(&kk), p(&v), p(out), p(&lse2));
            move || {
                let k = kn::FlashFwd {
                    q,
                    k: kk,
                    v,
                    out,
                    lse,
                    heads,
                    sq,
                    skv,
                    causal,
                    scale,
                };
                // SAFETY: as above.
                unsafe { gpu.run(kernel, flash::fwd_tc_config(bh, s.seq), k) }
            }
        };
        let o3 = gpu.alloc(2 * n)?;
        o3.fill_bytes(0xff)?;
        let fwd_tc3 = tc("flash_fwd_tc3_d64_bf16", &o3);
        let o4 = gpu.alloc(2 * n)?;
        o4.fill_bytes(0xff)?;
        let fwd_tc4 = tc("flash_fwd_tc4_d64_bf16", &o4);
        for _ in 0..warmup {
            fwd()?;
            fwd_tc3()?;
            fwd_tc4()?;
            bwd()?;
            bwd_tc2()?;
            bwd_tc3()?;
        }
        gpu.synchronize()?;
        let (mut tf, mut tb, mut t3, mut t4) = (vec![], vec![], vec![], vec![]);
        let (mut tb2, mut tb3) = (vec![], vec![]);
        for _ in 0..iters {
            tf.push(gpu.time_ms(fwd)? as f64);
            t3.push(gpu.time_ms(fwd_tc3)? as f64);
            t4.push(gpu.time_ms(fwd_tc4)? as f64);
            tb.push(gpu.time_ms(bwd)? as f64);
            tb2.push(gpu.time_ms(&bwd_tc2)? as f64);
            tb3.push(gpu.time_ms(&bwd_tc3)? as f64);
        }
        gpu.synchronize()?;
        finite_bf16(&o4, &format!("flash v4 {} out", s.name))?;
        finite_bf16(&o3, &format!("flash v3 {} out", s.name))?;
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
        let (fwd_tc3_rel_diff, fwd_tc4_rel_diff) = (rel(&read(&o3)?), rel(&read(&o4)?));
        for (b, what) in [(&o, "out"), (&dq, "dq"), (&dk, "dk"), (&dv, "dv")] {
            finite_bf16(b, &format!("flash {} {what}", s.name))?;
        }
        // Backward parity at the timed size: worst over dQ, dK, dV against variant 1.
        let (v1_grads, v1_max) = {
            let g = [read(&dq)?, read(&dk)?, read(&dv)?];
            let m = g.iter().flatten().fold(0f32, |m, v| m.max(v.abs())) as f64;
            (g, m.max(1e-30))
        };
        let bwd_rel = |g: &[DeviceBuffer; 4], what: &str| -> Result<f64> {
            let mut worst = 0f64;
            for (i, b) in g[1..].iter().enumerate() {
                finite_bf16(b, &format!("flash {what} {}", s.name))?;
                let x = read(b)?;
                let e = v1_grads[i]
                    .iter()
                    .zip(&x)
                    .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
                worst = worst.max(e / v1_max);
            }
            Ok(worst)
        };
        let (bwd_tc2_rel_diff, bwd_tc3_rel_diff) =
            (bwd_rel(&g2, "bwd v2")?, bwd_rel(&g3, "bwd v3")?);
        let ((bwd_tc2_ms, _), (bwd_tc3_ms, _)) = (median(tb2), median(tb3));
        let flops = flash::fwd_flops(bh, s.seq, s.seq, d, s.causal);
        let ((fwd_ms, fwd_spread), (bwd_ms, _), (fwd_tc3_ms, _), (fwd_tc4_ms, _)) =
            (median(tf), median(tb), median(t3), median(t4));
        out.push(AttnTiming {
            shape: s.clone(),
            fwd_tc4_ms,
            fwd_tc4_tflops: flops / (fwd_tc4_ms * 1e9),
            fwd_tc4_rel_diff,
            fwd_tc3_ms,
            fwd_tc3_tflops: flops / (fwd_tc3_ms * 1e9),
            fwd_tc3_rel_diff,
            bwd_tc2_ms,
            bwd_tc2_tflops: 2.5 * flops / (bwd_tc2_ms * 1e9),
            bwd_tc2_rel_diff,
            bwd_tc3_ms,
            bwd_tc3_tflops: 2.5 * flops / (bwd_tc3_ms * 1e9),
            bwd_tc3_rel_diff,
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
    /// The label in tables (`mlp fc1`).
    pub name: String,
    /// Rows of A and C: tokens in the batch.
    pub m: usize,
    /// Columns of C: the layer's output width (rows of W).
    pub n: usize,
    /// The contraction length: the layer's input width.
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

/// One GEMM shape's timings in one dtype (median ms; TFLOP/s count 2·m·n·k).
#[derive(Clone, Debug, Serialize)]
pub struct GemmTiming {
    /// The shape timed.
    pub shape: GemmShape,
    /// `bf16` or `f32`: the element type of A, W and C.
    pub dtype: String,
    /// cuBLAS, ms; None when libcublas cannot be loaded.
    pub cublas_ms: Option<f64>,
    /// The SIMT GEMM kernel (`gemm_simt_*`), ms.
    pub simt_ms: f64,
    /// cuBLAS, TFLOP/s; None without cuBLAS.
    pub cublas_tflops: Option<f64>,
    /// The SIMT kernel, TFLOP/s.
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
    use crate::backend::cuda::gpu::GemmArgs;
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
                let cfg = crate::backend::cuda::launch::LaunchConfig {
                    grid: ((s.n as u32).div_ceil(64), (s.m as u32).div_ceil(64), 1),
                    block: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let p = |b: &DeviceBuffer| Arg::U64(b.ptr());
                // SAFETY: buffers sized for this product above.
                unsafe {
                    gpu.run(
                        if bf {
                            "gemm_simt_bf16"
                        } else {
                            "gemm_simt_f32"
                        },
                        cfg,
                        kn::GemmSimt {
                            a: p(&a),
                            b: p(&w),
                            c: p(&c2),
                            m: s.m,
                            n: s.n,
                            k: s.k,
                            trans_a: false,
                            trans_b: true,
                            stride_a: s.m * s.k,
                            stride_b: 0,
                            stride_c: s.m * s.n,
                        },
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
    /// The label in tables (`vit fc1`).
    pub name: String,
    /// Rows of X and Y: tokens in the batch.
    pub m: usize,
    /// The layer's output width (rows of W and of B).
    pub n: usize,
    /// The layer's input width (columns of W and of A).
    pub k: usize,
    /// The LoRA rank: columns of S = X·Aᵀ, rows of A, columns of B.
    pub r: usize,
}

impl LoraShape {
    /// The projections of ViT-L/14 (batch 128 and 256, 257 tokens) and of the text tower
    /// (batch 256, 77 tokens), SD2's rank 8 (CUDA backend II's table).
    pub fn defaults() -> Vec<LoraShape> {
        let s = |name: &str, m, n, k| LoraShape {
            name: name.into(),
            m,
            n,
            k,
            r: 8,
        };
        let (mv, mv2, mt) = (128 * 257, 256 * 257, 256 * 77);
        vec![
            s("vit qkv", mv, 3072, 1024),
            s("vit out", mv, 1024, 1024),
            s("vit fc1", mv, 4096, 1024),
            s("vit fc2", mv, 1024, 4096),
            s("v256 qkv", mv2, 3072, 1024),
            s("v256 out", mv2, 1024, 1024),
            s("v256 fc1", mv2, 4096, 1024),
            s("v256 fc2", mv2, 1024, 4096),
            s("text qkv", mt, 2304, 768),
            s("text out", mt, 768, 768),
            s("text fc1", mt, 3072, 768),
            s("text fc2", mt, 768, 3072),
        ]
    }
}

/// One fused kernel's forward on a shape (Y only, S given).
#[derive(Clone, Debug, Serialize)]
pub struct VariantTiming {
    /// The variant's label (`lora_gemm::Variant::name`, `hopper::NAME`).
    pub variant: String,
    /// None when the variant does not support the shape or this GPU, or failed validation.
    pub ms: Option<f64>,
    /// 2·m·n·k over `ms` (the LoRA term not counted), TFLOP/s; None when not timed.
    pub tflops: Option<f64>,
    /// max |Y − Y_cuBLAS 3-GEMM| / max |Y_cuBLAS 3-GEMM|, validated before timing.
    pub rel_diff: Option<f64>,
    /// Why it was not timed.
    pub note: Option<String>,
}

/// One LoRA-linear shape's timings, bf16 (median ms, the L2 flushed before each timed run;
/// TFLOP/s count 2·m·n·k for every path, so they compare times).
#[derive(Clone, Debug, Serialize)]
pub struct LoraTiming {
    /// The shape timed.
    pub shape: LoraShape,
    /// The fused Y kernels alone (S = X·Aᵀ given).
    pub variants: Vec<VariantTiming>,
    /// sd2's forward: S = X·Aᵀ (cuBLAS, n = r) + the fastest valid fused kernel.
    pub fused_variant: Option<String>,
    /// sd2's forward (S, then that kernel), ms; None when no fused variant passed validation.
    pub fused_ms: Option<f64>,
    /// sd2's forward, TFLOP/s.
    pub fused_tflops: Option<f64>,
    /// cuBLAS X·Wᵀ alone (no LoRA, no bias): the floor the fused kernel is held to.
    pub cublas_plain_ms: Option<f64>,
    /// cuBLAS X·Wᵀ alone, TFLOP/s.
    pub cublas_plain_tflops: Option<f64>,
    /// PEFT's structure on cuBLAS: S = X·Aᵀ, Y = X·Wᵀ, Y += s·S·Bᵀ (beta = 1; PEFT adds in a
    /// separate kernel, so this is a lower bound for it).
    pub cublas_3gemm_ms: Option<f64>,
    /// PEFT's three GEMMs, TFLOP/s.
    pub cublas_3gemm_tflops: Option<f64>,
    /// Backward dX = dY·W + s·(dY·B)·A: sd2 = dS on cuBLAS + the fused v2 kernel; cuBLAS plain
    /// dY·W; PEFT's three GEMMs (dS, dY·W, += dS·A).
    pub dx_fused_ms: Option<f64>,
    /// cuBLAS dY·W alone, ms.
    pub dx_cublas_plain_ms: Option<f64>,
    /// PEFT's three GEMMs for dX, ms.
    pub dx_cublas_3gemm_ms: Option<f64>,
    /// max |dX_sd2 − dX_3-GEMM| / max |dX_3-GEMM|; `dx_fused_ms` is None when it is 2·10⁻² or
    /// more (or NaN).
    pub dx_rel_diff: Option<f64>,
    /// The LoRA factors' gradients (dS = s·dY·B, dB = s·dYᵀ·S, dA = dSᵀ·drop(x), dropout 0.1):
    /// sd2's one tensor-core pass (`lora_grads` + the two partial sums), the split kernels
    /// (`lora_dsdb_part`, `lora_da_part` and three sums), PEFT's three cuBLAS GEMMs (without
    /// the dropout PEFT would also materialize: a lower bound for it). None where `lora_grads`
    /// does not take the rank.
    pub grads_fused_ms: Option<f64>,
    /// The split kernels and their three sums, ms.
    pub grads_split_ms: Option<f64>,
    /// PEFT's three cuBLAS GEMMs, ms.
    pub grads_cublas_ms: Option<f64>,
    /// max relative difference of sd2's (dS, dB, dA) from cuBLAS's at dropout 0, checked before
    /// timing.
    pub grads_rel_diff: Option<f64>,
}

/// Times the LoRA-linear forward (every fused variant, sd2's path, cuBLAS plain and 3-GEMM)
/// and the backward dX, bf16, each validated against cuBLAS before it is timed.
pub fn lora(
    gpu: &Arc<Gpu>,
    shapes: &[LoraShape],
    warmup: usize,
    iters: usize,
) -> Result<Vec<LoraTiming>> {
    use crate::backend::cuda::gpu::GemmArgs;
    use crate::backend::cuda::lora_gemm::{hopper, V1, V2};
    if !gpu.has_cublas() {
        return Err(Error::Cuda(
            "sd2 bench lora compares against cuBLAS, which is not loadable here".into(),
        ));
    }
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
    let read = |b: &DeviceBuffer| -> Result<Vec<f32>> {
        let mut v = vec![half::bf16::ZERO; b.bytes() / 2];
        gpu.synchronize()?;
        b.download(bytemuck::cast_slice_mut(&mut v))?;
        Ok(v.iter().map(|x| x.to_f32()).collect())
    };
    let rel = |got: &[f32], want: &[f32]| -> f64 {
        let sc = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let d = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
        if d.is_nan() {
            f64::NAN
        } else {
            d / sc.max(1e-30)
        }
    };
    let mut out = vec![];
    for (i, s) in shapes.iter().enumerate() {
        let seed = 100 * i as u64;
        let (m, n, k, r) = (s.m, s.n, s.k, s.r);
        let x = random_bf16(gpu, m * k, seed + 1)?;
        let w = random_bf16(gpu, n * k, seed + 2)?;
        let a = random_bf16(gpu, r * k, seed + 3)?;
        let bl = random_bf16(gpu, n * r, seed + 4)?;
        let dy = random_bf16(gpu, m * n, seed + 5)?;
        let (sl, ds) = (gpu.alloc(2 * m * r)?, gpu.alloc(2 * m * r)?);
        let (y1, y2) = (gpu.alloc(2 * m * n)?, gpu.alloc(2 * m * n)?);
        let (dx1, dx2) = (gpu.alloc(2 * m * k)?, gpu.alloc(2 * m * k)?);
        let scale = 4.0f32;
        let p = |b: &DeviceBuffer| Arg::U64(b.ptr());
        #[allow(clippy::too_many_arguments)]
        let gemm =
            |a_: &DeviceBuffer, b_: &DeviceBuffer, c: &DeviceBuffer, n, k, trans_b, alpha, beta| {
                GemmArgs {
                    a: a_.ptr(),
                    b: b_.ptr(),
                    c: c.ptr(),
                    batch: 1,
                    m,
                    n,
                    k,
                    trans_a: false,
                    trans_b,
                    rhs_batched: false,
                    bf16: true,
                    alpha,
                    beta,
                }
            };
        // SAFETY (every closure below): the buffers are sized for this shape above.
        let s_of_x = || unsafe { gpu.gemm(gemm(&x, &a, &sl, r, k, true, 1.0, 0.0)).map(drop) };
        let plain = || unsafe { gpu.gemm(gemm(&x, &w, &y2, n, k, true, 1.0, 0.0)).map(drop) };
        let three = || -> Result<()> {
            unsafe {
                gpu.gemm(gemm(&x, &a, &sl, r, k, true, 1.0, 0.0))?;
                gpu.gemm(gemm(&x, &w, &y2, n, k, true, 1.0, 0.0))?;
                gpu.gemm(gemm(&sl, &bl, &y2, n, r, true, scale, 1.0))?;
            }
            Ok(())
        };
        let (px, pw, psl, pbl, py1) = (p(&x), p(&w), p(&sl), p(&bl), p(&y1));
        let mma = |v: crate::backend::cuda::lora_gemm::Variant| {
            move || unsafe {
                gpu.run(
                    v.fwd,
                    v.config(m, n),
                    kn::LoraGemmFwd {
                        x: px,
                        w: pw,
                        bias: Arg::null(),
                        s_low: psl,
                        lb: pbl,
                        res: Arg::null(),
                        pre: Arg::null(),
                        y: py1,
                        m,
                        n,
                        k,
                        r,
                        scale,
                        epilogue: 0,
                    },
                )
            }
        };
        let hopper_ok = gpu.compute_capability == (9, 0) && hopper::supports(k, r);
        let maps = hopper::maps(m, n, k, r);
        let tm = |b: &DeviceBuffer, i: usize| -> Result<Arg> {
            Ok(Arg::Map(gpu.tensor_map(b.ptr(), maps[i])?))
        };
        let hopper_maps = if hopper_ok {
            Some([tm(&x, 0)?, tm(&w, 1)?, tm(&sl, 2)?, tm(&bl, 3)?])
        } else {
            None
        };
        let wg = || -> Result<()> {
            let Some([tm_x, tm_w, tm_s, tm_b]) = hopper_maps else {
                return Err(Error::Cuda("no Hopper kernel here".into()));
            };
            let k3 = kn::LoraGemm3Fwd {
                tm_x,
                tm_w,
                tm_s,
                tm_b,
                bias: Arg::null(),
                res: Arg::null(),
                pre: Arg::null(),
                aux: Arg::null(),
                lds: Arg::null(),
                la: Arg::null(),
                lr: 0,
                lp: 0.0,
                lseed: 0,
                y: p(&y1),
                m,
                n,
                k,
                r,
                scale,
                epilogue: 0,
            };
            unsafe { gpu.run(hopper::KERNEL, hopper::config(m, n), k3) }
        };
        // The reference: cuBLAS 3-GEMM (also leaves S in `sl` for the fused kernels).
        three()?;
        let want = read(&y2)?;
        let mut variants = vec![];
        let (v1, v2) = (mma(V1), mma(V2));
        type Launch<'a> = &'a dyn Fn() -> Result<()>;
        let kernels: [(&str, Launch, Option<&str>); 3] = [
            (V1.name, &v1, None),
            (V2.name, &v2, None),
            (
                hopper::NAME,
                &wg,
                (!hopper_ok).then_some("needs compute capability 9.0, K % 8 = 0, r ∈ {0, 8, 16}"),
            ),
        ];
        let mut best: Option<(usize, f64)> = None;
        for (vi, (name, f, skip)) in kernels.iter().enumerate() {
            let mut t = VariantTiming {
                variant: name.to_string(),
                ms: None,
                tflops: None,
                rel_diff: None,
                note: skip.map(str::to_string),
            };
            if skip.is_none() {
                y1.fill_bytes(0xff)?; // NaN: an unwritten element fails validation
                f()?;
                let d = rel(&read(&y1)?, &want);
                t.rel_diff = Some(d);
                if d.is_nan() || d >= 2e-2 {
                    t.note = Some(format!("differs from cuBLAS by {d:.2e}: not timed"));
                } else {
                    let ms = time(*f)?;
                    t.ms = Some(ms);
                    t.tflops = Some(2.0 * (m * n * k) as f64 / (ms * 1e9));
                    if best.is_none_or(|(_, b)| ms < b) {
                        best = Some((vi, ms));
                    }
                }
            }
            variants.push(t);
        }
        let fused_variant = best.map(|(vi, _)| kernels[vi].0.to_string());
        let fused_ms = match best {
            Some((vi, _)) => {
                let f = kernels[vi].1;
                Some(time(&|| {
                    s_of_x()?;
                    f()
                })?)
            }
            None => None,
        };
        let cublas_plain_ms = time(&plain)?;
        let cublas_3gemm_ms = time(&three)?;

        // Backward dX, dS = s·dY·B on cuBLAS for both sides.
        let dsg = || unsafe {
            gpu.gemm(gemm(&dy, &bl, &ds, r, n, false, scale, 0.0))
                .map(drop)
        };
        let dx_fused = || -> Result<()> {
            dsg()?;
            unsafe {
                // The output is [m, k] and the contraction runs over n.
                gpu.run(
                    V2.bwd,
                    V2.config(m, k),
                    kn::LoraGemmBwd {
                        x: p(&dy),
                        w: p(&w),
                        s_low: p(&ds),
                        lb: p(&a),
                        lds: Arg::null(),
                        la: Arg::null(),
                        lr: 0,
                        lp: 0.0,
                        lseed: 0,
                        res: Arg::null(),
                        aux: Arg::null(),
                        y: p(&dx1),
                        m,
                        n: k,
                        k: n,
                        r,
                        scale: 1.0,
                        epilogue: 0,
                    },
                )
            }
        };
        let dx_plain = || unsafe {
            gpu.gemm(gemm(&dy, &w, &dx2, k, n, false, 1.0, 0.0))
                .map(drop)
        };
        let dx_three = || -> Result<()> {
            dsg()?;
            unsafe {
                gpu.gemm(gemm(&dy, &w, &dx2, k, n, false, 1.0, 0.0))?;
                gpu.gemm(gemm(&ds, &a, &dx2, k, r, false, 1.0, 1.0))?;
            }
            Ok(())
        };
        dx_three()?;
        let want_dx = read(&dx2)?;
        dx1.fill_bytes(0xff)?;
        dx_fused()?;
        let dx_rel_diff = rel(&read(&dx1)?, &want_dx);
        let dx_fused_ms = if dx_rel_diff < 2e-2 {
            Some(time(&dx_fused)?)
        } else {
            None
        };
        let grads = lora_grads_timing(gpu, (m, n, k, r), (&dy, &bl, &sl, &x), &time, &read, &rel)?;
        let flops = 2.0 * (m * n * k) as f64;
        out.push(LoraTiming {
            shape: s.clone(),
            variants,
            fused_variant,
            fused_ms,
            fused_tflops: fused_ms.map(|t| flops / (t * 1e9)),
            cublas_plain_ms: Some(cublas_plain_ms),
            cublas_plain_tflops: Some(flops / (cublas_plain_ms * 1e9)),
            cublas_3gemm_ms: Some(cublas_3gemm_ms),
            cublas_3gemm_tflops: Some(flops / (cublas_3gemm_ms * 1e9)),
            dx_fused_ms,
            dx_cublas_plain_ms: Some(time(&dx_plain)?),
            dx_cublas_3gemm_ms: Some(time(&dx_three)?),
            dx_rel_diff: Some(dx_rel_diff),
            grads_fused_ms: grads.map(|g| g.0),
            grads_split_ms: grads.map(|g| g.1),
            grads_cublas_ms: grads.map(|g| g.2),
            grads_rel_diff: grads.map(|g| g.3),
        });
    }
    Ok(out)
}

/// (fused, split, cuBLAS ms, fused's difference from cuBLAS) of the LoRA factors' gradients on
/// one shape, or None where `lora_grads` does not take it (`lora`'s operands: dY, B, S, x).
#[allow(clippy::type_complexity)]
fn lora_grads_timing(
    gpu: &Arc<Gpu>,
    (m, n, k, r): (usize, usize, usize, usize),
    (dy, bl, sl, x): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    time: &dyn Fn(&dyn Fn() -> Result<()>) -> Result<f64>,
    read: &dyn Fn(&DeviceBuffer) -> Result<Vec<f32>>,
    rel: &dyn Fn(&[f32], &[f32]) -> f64,
) -> Result<Option<(f64, f64, f64, f64)>> {
    use crate::backend::cuda::gpu::GemmArgs;
    use crate::backend::cuda::kernels::Grid;
    if !matches!(r, 8 | 16 | 32) || n % 8 != 0 || k % 8 != 0 {
        return Ok(None);
    }
    let p = |b: &DeviceBuffer| Arg::U64(b.ptr());
    let cfg = kn::lora_grads_config(m, r);
    let chunks = cfg.grid.0 as usize;
    let (ds, db, da) = (
        gpu.alloc(2 * m * r)?,
        gpu.alloc(2 * n * r)?,
        gpu.alloc(2 * r * k)?,
    );
    let (db_part, da_part) = (
        gpu.alloc(4 * chunks * n * r)?,
        gpu.alloc(4 * chunks * r * k)?,
    );
    let (dsw, dbw, daw) = (
        gpu.alloc(2 * m * r)?,
        gpu.alloc(2 * n * r)?,
        gpu.alloc(2 * r * k)?,
    );
    let scale = 4.0f32;
    let sum = |part: &DeviceBuffer, out: &DeviceBuffer, parts: usize, len: usize| {
        let c = kn::ColumnSum {
            part: p(part),
            out: p(out),
            parts,
            n: len,
        };
        // SAFETY: part holds parts × len f32, out len bf16.
        unsafe { gpu.run("column_sum_bf16", c.grid(), c) }
    };
    let fused = |drop: f32| -> Result<()> {
        let g = kn::LoraGrads {
            dy: p(dy),
            b: p(bl),
            s: p(sl),
            x: p(x),
            ds: p(&ds),
            db_part: p(&db_part),
            da_part: p(&da_part),
            m,
            n,
            k,
            p: drop,
            seed: 7,
            scale,
        };
        // SAFETY: every buffer is sized for (m, n, k, r) and the chunks of `cfg`.
        unsafe { gpu.run(&format!("lora_grads_r{r}_bf16"), cfg, g)? };
        sum(&db_part, &db, chunks, n * r)?;
        sum(&da_part, &da, chunks, r * k)
    };
    // The split kernels, as the CUDA storage runs them for other shapes.
    let (tiles, rows_per_chunk, dchunks) = kn::lora_dsdb_chunks(m, n);
    let (da_rows, da_chunks) = kn::lora_da_chunks(m);
    let ds_part = gpu.alloc(4 * tiles * m * r)?;
    let db_part2 = gpu.alloc(4 * dchunks * n * r)?;
    let da_part2 = gpu.alloc(4 * da_chunks * r * k)?;
    let split = || -> Result<()> {
        let a = kn::LoraDsDbPart {
            dy: p(dy),
            b: p(bl),
            s: p(sl),
            ds_part: p(&ds_part),
            db_part: p(&db_part2),
            m,
            n,
            r,
            rows_per_chunk,
            scale,
        };
        // SAFETY: the partial buffers are sized for these tiles and chunks.
        unsafe { gpu.run("lora_dsdb_part_bf16", a.grid(), a)? };
        sum(&ds_part, &ds, tiles, m * r)?;
        sum(&db_part2, &db, dchunks, n * r)?;
        let d = kn::LoraDaPart {
            ds: p(&ds),
            x: p(x),
            part: p(&da_part2),
            m,
            k,
            r,
            rows_per_chunk: da_rows,
            p: 0.1,
            seed: 7,
        };
        // SAFETY: as above.
        unsafe { gpu.run("lora_da_part_bf16", d.grid(), d)? };
        sum(&da_part2, &da, da_chunks, r * k)
    };
    #[allow(clippy::too_many_arguments)]
    let gemm = |a, b, c, (mm, nn, kk), ta, tb, alpha| GemmArgs {
        a,
        b,
        c,
        batch: 1,
        m: mm,
        n: nn,
        k: kk,
        trans_a: ta,
        trans_b: tb,
        rhs_batched: false,
        bf16: true,
        alpha,
        beta: 0.0,
    };
    let cublas = || -> Result<()> {
        // SAFETY: dsw [m, r], dbw [n, r], daw [r, k], from dY [m, n], B [n, r], S [m, r], x [m, k].
        unsafe {
            gpu.gemm(gemm(
                dy.ptr(),
                bl.ptr(),
                dsw.ptr(),
                (m, r, n),
                false,
                false,
                scale,
            ))?;
            gpu.gemm(gemm(
                dy.ptr(),
                sl.ptr(),
                dbw.ptr(),
                (n, r, m),
                true,
                false,
                scale,
            ))?;
            gpu.gemm(gemm(
                dsw.ptr(),
                x.ptr(),
                daw.ptr(),
                (r, k, m),
                true,
                false,
                1.0,
            ))?;
        }
        Ok(())
    };
    cublas()?;
    for b in [&ds, &db, &da] {
        b.fill_bytes(0xff)?;
    }
    fused(0.0)?;
    let d = [(&ds, &dsw), (&db, &dbw), (&da, &daw)]
        .iter()
        .map(|(got, want)| Ok(rel(&read(got)?, &read(want)?)))
        .collect::<Result<Vec<f64>>>()?
        .into_iter()
        .fold(0f64, |a, v| if v.is_nan() { f64::NAN } else { a.max(v) });
    if d.is_nan() || d >= 2e-2 {
        return Err(Error::Cuda(format!(
            "lora_grads m{m} n{n} k{k} r{r} differs from cuBLAS by {d:.2e}"
        )));
    }
    Ok(Some((
        time(&|| fused(0.1))?,
        time(&split)?,
        time(&cublas)?,
        d,
    )))
}

/// The LoRA table as printed by `sd2 bench lora` and `cargo bench --bench lora_gemm`.
pub fn lora_table(device: &str, t: &[LoraTiming]) -> String {
    use std::fmt::Write;
    let o = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| o(a.zip(b).map(|(a, b)| a / b), 2);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "LoRA-linear, bf16, on {device}: TFLOP/s of the fused Y kernels (S given), then sd2's \
         forward (S + fastest kernel) against cuBLAS; backward dX"
    );
    let names: Vec<String> = t
        .first()
        .map(|r| r.variants.iter().map(|v| v.variant.clone()).collect())
        .unwrap_or_default();
    let _ = write!(s, "{:<9} {:>6} {:>5} {:>5}", "shape", "m", "n", "k");
    for n in &names {
        let _ = write!(s, " {:>8}", n.split_whitespace().next().unwrap_or(""));
    }
    let _ = writeln!(
        s,
        " {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>8} {:>6} {:>6} | {:>8} {:>8} {:>8} {:>6} {:>6}",
        "cuBLAS",
        "sd2",
        "3-gemm",
        "fused ms",
        "plain ms",
        "3g ms",
        "fastest",
        "f/pl",
        "3g/f",
        "dX ms",
        "dY·W ms",
        "3g ms",
        "f/pl",
        "3g/f"
    );
    for r in t {
        let sh = &r.shape;
        let _ = write!(s, "{:<9} {:>6} {:>5} {:>5}", sh.name, sh.m, sh.n, sh.k);
        for v in &r.variants {
            let _ = write!(s, " {:>8}", o(v.tflops, 1));
        }
        let _ = writeln!(
            s,
            " {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>8} {:>6} {:>6} | {:>8} {:>8} {:>8} {:>6} {:>6}",
            o(r.cublas_plain_tflops, 1),
            o(r.fused_tflops, 1),
            o(r.cublas_3gemm_tflops, 1),
            o(r.fused_ms, 3),
            o(r.cublas_plain_ms, 3),
            o(r.cublas_3gemm_ms, 3),
            r.fused_variant
                .as_deref()
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or("-"),
            ratio(r.fused_ms, r.cublas_plain_ms),
            ratio(r.cublas_3gemm_ms, r.fused_ms),
            o(r.dx_fused_ms, 3),
            o(r.dx_cublas_plain_ms, 3),
            o(r.dx_cublas_3gemm_ms, 3),
            ratio(r.dx_fused_ms, r.dx_cublas_plain_ms),
            ratio(r.dx_cublas_3gemm_ms, r.dx_fused_ms),
        );
        for v in &r.variants {
            if let Some(n) = &v.note {
                let _ = writeln!(s, "    {}: {n}", v.variant);
            }
        }
    }
    let _ = writeln!(
        s,
        "f/pl = sd2 time / cuBLAS plain GEMM time (goal ≤ 1.05); 3g/f = PEFT 3-GEMM time / sd2 \
         time (goal ≥ 1.3); TFLOP/s columns (2·m·n·k): each fused kernel alone, cuBLAS plain, \
         sd2's forward (S + kernel), PEFT's 3 GEMMs"
    );
    let _ = writeln!(
        s,
        "\nLoRA factors' gradients (dS, dB, dA; dropout 0.1): sd2's one pass (lora_grads + 2 \
         sums), the split kernels (lora_dsdb_part, lora_da_part + 3 sums), cuBLAS's 3 GEMMs \
         (no dropout)"
    );
    let _ = writeln!(
        s,
        "{:<9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "shape", "sd2 ms", "split ms", "3g ms", "split/f", "3g/f", "rel diff"
    );
    for r in t {
        let _ = writeln!(
            s,
            "{:<9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
            r.shape.name,
            o(r.grads_fused_ms, 3),
            o(r.grads_split_ms, 3),
            o(r.grads_cublas_ms, 3),
            ratio(r.grads_split_ms, r.grads_fused_ms),
            ratio(r.grads_cublas_ms, r.grads_fused_ms),
            r.grads_rel_diff.map_or("-".into(), |d| format!("{d:.1e}")),
        );
    }
    s
}

/// `flash_attention`'s timings as a table (ms; TFLOP/s and the gradient difference of backward
/// variant 3).
pub fn flash_table(t: &[AttnTiming]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:>5} {:>5} {:>6} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8}",
        "shape",
        "batch",
        "heads",
        "seq",
        "causal",
        "fwd v1",
        "fwd v3",
        "fwd v4",
        "bwd v1",
        "bwd v2",
        "bwd v3",
        "TFLOP/s",
        "diff v3"
    );
    for r in t {
        let s = &r.shape;
        let _ = writeln!(out,
            "{:<8} {:>6} {:>5} {:>5} {:>6} | {:>8.3} {:>8.3} {:>8.3} | {:>8.3} {:>8.3} {:>8.3} {:>8.1} {:>8.1e}",
            s.name,
            s.batch,
            s.heads,
            s.seq,
            s.causal,
            r.fwd_ms,
            r.fwd_tc3_ms,
            r.fwd_tc4_ms,
            r.bwd_ms,
            r.bwd_tc2_ms,
            r.bwd_tc3_ms,
            r.bwd_tc3_tflops,
            r.bwd_tc3_rel_diff
        );
    }
    let _ = writeln!(
        out,
        "(ms; TFLOP/s and diff = max |dX_v3 − dX_v1| / max |dX_v1| of backward variant 3)"
    );
    out
}

/// `gemm`'s timings as a table.
pub fn gemm_table(t: &[GemmTiming]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>6} {:>5} {:>5} {:>5} {:>10} {:>8} {:>9} {:>8} {:>10}",
        "shape", "m", "n", "k", "dtype", "cublas ms", "TFLOP/s", "simt ms", "TFLOP/s", "rel diff"
    );
    for r in t {
        let s = &r.shape;
        let o = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
        let _ = writeln!(
            out,
            "{:<14} {:>6} {:>5} {:>5} {:>5} {:>10} {:>8} {:>9.3} {:>8.1} {:>10}",
            s.name,
            s.m,
            s.n,
            s.k,
            r.dtype,
            o(r.cublas_ms, 3),
            o(r.cublas_tflops, 1),
            r.simt_ms,
            r.simt_tflops,
            r.max_rel_diff.map_or("-".into(), |v| format!("{v:.1e}"))
        );
    }
    out
}
