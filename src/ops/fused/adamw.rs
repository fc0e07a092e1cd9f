//! AdamW (decoupled weight decay) and the squared gradient norm of clipping, as one unit: the
//! CPU reference, the per-tensor step, and the multi-tensor step of a CUDA training step —
//! three launches of `kernels/adamw.cu` and no host sync: Σg² over every tensor
//! (`sum_sq_multi_f32`), the norm and torch's clipping factor on the device (`grad_clip_f32`),
//! and one AdamW over every tensor that reads the factor through a pointer (`adamw_multi_f32`).
//! The optimizer (`crate::optim`) decides which to run. Unlike the other fused ops this one
//! updates its operands in place, so it is three functions instead of a `FusedKernel`.
use rayon::prelude::*;

use crate::backend::cpu::{CpuStorage, RED_CHUNK};
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::{kernels as kn, launch::Arg, storage::CudaStorage};
use crate::backend::BackendStorage;
pub use crate::backend::{AdamWStep, FusedParam};
use crate::storage::Storage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::DType;
use crate::{Error, Float, Result};

/// One AdamW update of parameter `p` with gradient `g` and moments `m`, `v` (same length,
/// dtype and device; f32 or f64 on the CPU, f32 on CUDA).
pub fn step(
    p: &mut Storage,
    g: &Storage,
    m: &mut Storage,
    v: &mut Storage,
    s: AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let dev = p.device();
    for other in [g.device(), m.device(), v.device()] {
        if other != dev {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: dev,
                rhs: other,
            });
        }
    }
    for (what, len) in [("grad", g.len()), ("m", m.len()), ("v", v.len())] {
        if len != p.len() {
            return Err(Error::shape(
                OP,
                format!("{what} has {len} elements, the parameter {}", p.len()),
            ));
        }
    }
    match (p, g, m, v) {
        (Storage::Cpu(p), Storage::Cpu(g), Storage::Cpu(m), Storage::Cpu(v)) => {
            cpu_step(p, g, m, v, s)
        }
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        (Storage::Cuda(p), Storage::Cuda(g), Storage::Cuda(m), Storage::Cuda(v)) => {
            cuda_step(p, g, m, v, s)
        }
        #[allow(unreachable_patterns)]
        (p, ..) => Err(Error::invalid(
            OP,
            format!("mixed storage on {}", p.device()),
        )),
    }
}

/// Σ x² in f64 (the gradient norm of clipping).
pub fn sum_sq(x: &Storage) -> Result<f64> {
    match x {
        Storage::Cpu(c) => cpu_sum_sq(c),
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        Storage::Cuda(c) => cuda_sum_sq(c),
    }
}

/// Clips the gradients of `params` to global norm `max_norm` (the factor
/// min(1, max_norm/(‖g‖+1e-6)) folded into `step.grad_scale`) and applies one AdamW update to
/// each, as one device-side sequence (no host sync). Returns [‖g‖ before clipping, the
/// factor] as a two-element f32 storage on the device. Every tensor must be f32 on one CUDA
/// device (the CPU steps tensor by tensor with `step`).
pub fn step_clipped(
    params: &[FusedParam<Storage>],
    s: AdamWStep,
    max_norm: f64,
) -> Result<Storage> {
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    {
        let mut fused = vec![];
        for f in params {
            let (Storage::Cuda(p), Storage::Cuda(g), Storage::Cuda(m), Storage::Cuda(v)) =
                (f.p, f.g, f.m, f.v)
            else {
                return Err(Error::invalid(
                    "adamw",
                    "the fused step needs every tensor on one CUDA device",
                ));
            };
            fused.push(FusedParam {
                p,
                g,
                m,
                v,
                weight_decay: f.weight_decay,
            });
        }
        Ok(Storage::Cuda(cuda_step_clipped(&fused, s, max_norm)?))
    }
    #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
    {
        let _ = (params, s, max_norm);
        Err(Error::invalid(
            "adamw",
            "the fused step runs on CUDA storage (this build has none)",
        ))
    }
}

// The CPU reference.

fn cpu_step(
    p: &mut CpuStorage,
    g: &CpuStorage,
    m: &mut CpuStorage,
    v: &mut CpuStorage,
    s: AdamWStep,
) -> Result<()> {
    match (p, g, m, v) {
        (CpuStorage::F32(p), CpuStorage::F32(g), CpuStorage::F32(m), CpuStorage::F32(v)) => {
            adamw(p, g, m, v, s)
        }
        (CpuStorage::F64(p), CpuStorage::F64(g), CpuStorage::F64(m), CpuStorage::F64(v)) => {
            adamw(p, g, m, v, s)
        }
        (p, g, _, _) => {
            return Err(Error::DTypeMismatch {
                op: "adamw_step (f32 or f64 master weights)",
                lhs: p.dtype(),
                rhs: g.dtype(),
            })
        }
    }
    Ok(())
}

fn cpu_sum_sq(x: &CpuStorage) -> Result<f64> {
    match x {
        CpuStorage::F32(v) => Ok(sum_sq_ref(v)),
        CpuStorage::F64(v) => Ok(sum_sq_ref(v)),
        CpuStorage::BF16(v) => Ok(sum_sq_ref(&crate::backend::cpu::widen(v))),
        other => Err(Error::UnsupportedDType {
            op: "sum_sq",
            dtype: other.dtype(),
        }),
    }
}

/// Decoupled-weight-decay Adam: p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps).
pub fn adamw<F: Float>(p: &mut [F], g: &[F], m: &mut [F], v: &mut [F], s: AdamWStep) {
    let (b1, b2) = (s.beta1, s.beta2);
    p.par_chunks_mut(4096)
        .zip(g.par_chunks(4096))
        .zip(m.par_chunks_mut(4096).zip(v.par_chunks_mut(4096)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let gi = g[i].f64() * s.grad_scale;
                let mi = b1 * m[i].f64() + (1.0 - b1) * gi;
                let vi = b2 * v[i].f64() + (1.0 - b2) * gi * gi;
                let update = (mi / s.bias1) / ((vi / s.bias2).sqrt() + s.eps);
                let pi = p[i].f64() * (1.0 - s.lr * s.weight_decay) - s.lr * update;
                m[i] = F::from_f(mi);
                v[i] = F::from_f(vi);
                p[i] = F::from_f(pi);
            }
        });
}

/// Σ x² accumulated in f64 over fixed chunks (thread-count independent).
pub fn sum_sq_ref<F: Float>(x: &[F]) -> f64 {
    let chunk = RED_CHUNK * 1024;
    let parts: Vec<f64> = x
        .par_chunks(chunk)
        .map(|c| c.iter().map(|v| v.f64() * v.f64()).sum())
        .collect();
    parts.iter().sum()
}

// The CUDA side.

/// Elements per row of the chunk table (one block each).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
const PIECE: usize = 1 << 16;

/// Appends `p`'s rows of `kernels/adamw.cu`'s chunk table (`AdamwChunk`: p, g, m, v, begin,
/// end, weight decay; pieces of 64 Ki elements).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn push_chunks(words: &mut Vec<u64>, p: &CudaStorage, g: u64, m: u64, v: u64, wd: f32) {
    let mut begin = 0;
    while begin < p.len {
        let end = (begin + PIECE).min(p.len);
        words.extend([
            p.addr(),
            g,
            m,
            v,
            begin as u64,
            end as u64,
            wd.to_bits() as u64,
        ]);
        begin = end;
    }
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn f32_like(op: &'static str, what: &str, s: &CudaStorage, p: &CudaStorage) -> Result<()> {
    if s.dtype != DType::F32 || s.len != p.len || s.device() != p.device() {
        return Err(Error::Cuda(format!(
            "{op}: {what} is {} × {} on {}; every buffer must be f32 with the parameter's {} \
             elements on {}",
            s.len,
            s.dtype,
            s.device(),
            p.len,
            p.device()
        )));
    }
    Ok(())
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn cuda_step(
    p: &mut CudaStorage,
    g: &CudaStorage,
    m: &mut CudaStorage,
    v: &mut CudaStorage,
    s: AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw_step on cuda (f32 master weights)";
    f32_like(OP, "the parameter", p, p)?;
    for (what, t) in [("grad", g), ("m", &*m), ("v", &*v)] {
        f32_like(OP, what, t, p)?;
    }
    let mut words = vec![];
    push_chunks(
        &mut words,
        p,
        g.addr(),
        m.addr(),
        v.addr(),
        s.weight_decay as f32,
    );
    let chunks = words.len() / 7;
    if chunks == 0 {
        return Ok(());
    }
    let table = p.runner().buffer(&words)?;
    // Reads p, g, m, v and writes p, m, v (f32).
    crate::profile::set_work(0.0, 28.0 * p.len as f64);
    // The table goes back to the caching allocator; any reuse is ordered after this launch on
    // the same stream, so no wait is needed.
    launch_adamw(p, Arg::U64(table.addr()), chunks, &s, Arg::null())
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn cuda_sum_sq(x: &CudaStorage) -> Result<f64> {
    let x = x.as_f32()?;
    // sum_sq_multi reads the gradient slot of each chunk.
    let mut words = vec![];
    push_chunks(&mut words, &x, x.addr(), 0, 0, 0.0);
    let chunks = words.len() / 7;
    if chunks == 0 {
        return Ok(0.0);
    }
    let table = x.runner().buffer(&words)?;
    crate::profile::set_work(0.0, 4.0 * x.len as f64);
    let part = sum_sq_parts(&x, Arg::U64(table.addr()), chunks)?;
    Ok(part.to_cpu()?.to_f64_vec().iter().sum())
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn cuda_step_clipped(
    params: &[FusedParam<CudaStorage>],
    s: AdamWStep,
    max_norm: f64,
) -> Result<CudaStorage> {
    const OP: &str = "fused adamw";
    let first = params
        .first()
        .ok_or_else(|| Error::invalid("adamw", "no parameters"))?
        .p;
    let mut words = vec![];
    for (i, f) in params.iter().enumerate() {
        for (what, t) in [("parameter", f.p), ("grad", f.g), ("m", f.m), ("v", f.v)] {
            f32_like(OP, &format!("{what} of parameter {i}"), t, f.p)?;
        }
        if f.p.device() != first.device() {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: first.device(),
                rhs: f.p.device(),
            });
        }
        push_chunks(
            &mut words,
            f.p,
            f.g.addr(),
            f.m.addr(),
            f.v.addr(),
            f.weight_decay,
        );
    }
    let chunks = words.len() / 7;
    if chunks == 0 {
        return first.zeros_like(2, DType::F32);
    }
    let out = first.empty(2, DType::F32)?;
    let table = first.runner().buffer(&words)?;
    let elems: usize = params.iter().map(|f| f.p.len).sum();
    crate::profile::set_work(0.0, 4.0 * elems as f64);
    let part = sum_sq_parts(first, Arg::U64(table.addr()), chunks)?;
    first.run_grid(
        "grad_clip_f32",
        kn::GradClip {
            part: part.ptr(),
            num_parts: chunks,
            max_norm: max_norm as f32,
            out: out.ptr(),
        },
    )?;
    crate::profile::set_work(0.0, 28.0 * elems as f64);
    launch_adamw(first, Arg::U64(table.addr()), chunks, &s, out.ptr_at(1))?;
    // The table and partial sums go back to the caching allocator; reuse is stream-ordered.
    Ok(out)
}

/// Σg² of each of the `chunks` rows of `table` (f32, on `on`'s device).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn sum_sq_parts(on: &CudaStorage, table: Arg, chunks: usize) -> Result<CudaStorage> {
    let part = on.empty(chunks, DType::F32)?;
    on.run_grid(
        "sum_sq_multi_f32",
        kn::SumSqMulti {
            chunks: table,
            num_chunks: chunks,
            part: part.ptr(),
        },
    )?;
    Ok(part)
}

/// `adamw_multi_f32` over `chunks` rows of `table`, gradients scaled by `step.grad_scale` and
/// by the f32 at `scale` (a device pointer, or null).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn launch_adamw(
    on: &CudaStorage,
    table: Arg,
    chunks: usize,
    step: &AdamWStep,
    scale: Arg,
) -> Result<()> {
    on.run_grid(
        "adamw_multi_f32",
        kn::AdamwMulti {
            chunks: table,
            num_chunks: chunks,
            lr: step.lr as f32,
            beta1: step.beta1 as f32,
            beta2: step.beta2 as f32,
            eps: step.eps as f32,
            bias1: step.bias1 as f32,
            bias2: step.bias2 as f32,
            grad_scale: step.grad_scale as f32,
            scale_ptr: scale,
        },
    )
}
