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
        for _ in 0..warmup {
            fwd()?;
            bwd()?;
        }
        gpu.synchronize()?;
        let mut tf = vec![];
        let mut tb = vec![];
        for _ in 0..iters {
            tf.push(gpu.time_ms(fwd)? as f64);
            tb.push(gpu.time_ms(bwd)? as f64);
        }
        gpu.synchronize()?;
        for (b, what) in [(&o, "out"), (&dq, "dq"), (&dk, "dk"), (&dv, "dv")] {
            finite_bf16(b, &format!("flash {} {what}", s.name))?;
        }
        let flops = flash::fwd_flops(bh, s.seq, s.seq, d, s.causal);
        let ((fwd_ms, fwd_spread), (bwd_ms, _)) = (median(tf), median(tb));
        out.push(AttnTiming {
            shape: s.clone(),
            fwd_ms,
            bwd_ms,
            fwd_tflops: flops / (fwd_ms * 1e9),
            bwd_tflops: 2.5 * flops / (bwd_ms * 1e9),
            fwd_spread,
        });
    }
    Ok(out)
}
