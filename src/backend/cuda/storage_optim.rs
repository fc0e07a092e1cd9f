//! The whole optimizer step of a training step on CUDA storage in three launches and no host
//! sync: the squared gradient norm over every trainable tensor (`sum_sq_multi_f32`), the norm
//! and torch's clipping factor on the device (`grad_clip_f32`), and one multi-tensor AdamW that
//! reads the factor through a pointer (`adamw_multi_f32`). The norm stays on the device until
//! the step's metrics are read.
use super::*;

/// One trainable tensor's buffers on CUDA storage.
pub type FusedParam<'a> = crate::backend::FusedParam<'a, CudaStorage>;

/// The chunk table of `kernels/adamw.cu` over every tensor.
fn table(params: &[FusedParam]) -> Vec<u64> {
    let mut words = vec![];
    for f in params {
        f.p.push_chunks(
            &mut words,
            f.g.buf.addr(),
            f.m.buf.addr(),
            f.v.buf.addr(),
            f.weight_decay,
        );
    }
    words
}

/// Clips the gradients of `params` to global norm `max_norm` (the factor
/// min(1, max_norm/(‖g‖+1e-6)) folded into `step.grad_scale`) and applies one AdamW update to
/// each. Returns [‖g‖ before clipping, the factor] as a two-element f32 storage on the device.
pub fn adamw_clipped(params: &[FusedParam], step: AdamWStep, max_norm: f64) -> Result<CudaStorage> {
    let first = params
        .first()
        .ok_or_else(|| Error::Msg("adamw: no parameters".into()))?
        .p;
    for (i, f) in params.iter().enumerate() {
        for (what, s) in [("parameter", f.p), ("grad", f.g), ("m", f.m), ("v", f.v)] {
            if s.dtype != DType::F32 || s.len != f.p.len || s.ordinal != first.ordinal {
                return Err(Error::Cuda(format!(
                    "fused adamw: {what} of parameter {i} is {} × {} on cuda:{}; every buffer \
                     must be f32 with the parameter's {} elements on cuda:{}",
                    s.len, s.dtype, s.ordinal, f.p.len, first.ordinal
                )));
            }
        }
    }
    let words = table(params);
    let chunks = words.len() / 7;
    if chunks == 0 {
        return first.zeros_like(2, DType::F32);
    }
    let out = first.empty(2, DType::F32)?;
    let tab = first.runner.buffer(&words)?;
    let part = first.empty(chunks, DType::F32)?;
    first.run_grid(
        "sum_sq_multi_f32",
        kn::SumSqMulti {
            chunks: Arg::U64(tab.addr()),
            num_chunks: chunks,
            part: part.ptr(),
        },
    )?;
    first.run_grid(
        "grad_clip_f32",
        kn::GradClip {
            part: part.ptr(),
            num_parts: chunks,
            max_norm: max_norm as f32,
            out: out.ptr(),
        },
    )?;
    launch_adamw(first, &tab, chunks, &step, Arg::U64(out.buf.addr() + 4))?;
    // The table and partial sums go back to the caching allocator; reuse is stream-ordered.
    Ok(out)
}

/// `adamw_multi_f32` over `chunks` pieces of `table`, gradients scaled by `step.grad_scale`
/// and by the f32 at `scale` (a device pointer, or null).
pub(super) fn launch_adamw(
    on: &CudaStorage,
    table: &Buffer,
    chunks: usize,
    step: &AdamWStep,
    scale: Arg,
) -> Result<()> {
    on.run_grid(
        "adamw_multi_f32",
        kn::AdamwMulti {
            chunks: Arg::U64(table.addr()),
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
