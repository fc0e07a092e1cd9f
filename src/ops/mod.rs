//! Differentiable ops on `Tensor`: shape checks, the backend call, and the backward rule.
//! One file per family; `fused/` holds the fused ops as whole units (CPU reference, CUDA
//! launch, backward rule): attention, LoRA-linear, the losses, the norms, softmax.
pub mod elementwise;
pub mod fused;
pub mod linear;
pub mod shape_ops;

pub use fused::attention::{attention, attention_lse, AttnOptions};
pub use fused::cross_entropy::cross_entropy;
pub use fused::lora_linear::{
    lora_linear, lora_linear_gelu, lora_linear_gelu_input, lora_linear_residual,
    lora_linears_of_one_input, GeluLinear, Lora,
};
pub use fused::sigmoid_loss::{sigmoid_loss, sigmoid_loss_offset};

use crate::{DType, Error, Result, Tensor};

pub(crate) fn check_same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            lhs: a.dtype(),
            rhs: b.dtype(),
        });
    }
    Ok(())
}

pub(crate) fn check_float(op: &'static str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op,
            dtype: t.dtype(),
        });
    }
    Ok(())
}

pub(crate) fn check_ids(op: &'static str, t: &Tensor) -> Result<()> {
    if !matches!(t.dtype(), DType::I64 | DType::U32) {
        return Err(Error::shape(
            op,
            format!("ids must be i64 or u32, got {}", t.dtype()),
        ));
    }
    Ok(())
}

/// A closure as a backward op; it may add the gradient its input already has (`acc`, see
/// `BackwardOp::backward_acc`).
pub(crate) struct FnAccBackward<F> {
    pub name: &'static str,
    pub f: F,
}

impl<F> crate::autograd::BackwardOp for FnAccBackward<F>
where
    F: FnOnce(&Tensor, &[bool], &mut [Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn backward(self: Box<Self>, grad: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut none = vec![None; needs.len()];
        (self.f)(grad, needs, &mut none)
    }
    fn backward_acc(
        self: Box<Self>,
        grad: &Tensor,
        needs: &[bool],
        acc: &mut [Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        (self.f)(grad, needs, acc)
    }
}

/// `record_fn` whose backward is offered the inputs' accumulated gradients.
pub(crate) fn record_fn_acc<F>(
    name: &'static str,
    out: crate::storage::Storage,
    shape: crate::Shape,
    inputs: &[&Tensor],
    f: impl FnOnce(&Tensor) -> F,
) -> Result<Tensor>
where
    F: FnOnce(&Tensor, &[bool], &mut [Option<Tensor>]) -> Result<Vec<Option<Tensor>>>
        + Send
        + Sync
        + 'static,
{
    crate::autograd::record(out, shape, inputs, |y| FnAccBackward { name, f: f(y) })
}

/// `record_fn` of `out`, an untracked tensor computed by other ops (shared, not copied).
pub(crate) fn record_fn_on<F>(
    name: &'static str,
    out: &Tensor,
    inputs: &[&Tensor],
    f: F,
) -> Result<Tensor>
where
    F: FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
{
    crate::autograd::record_tensor(out, inputs, |_| FnAccBackward {
        name,
        f: move |g: &Tensor, needs: &[bool], _: &mut [Option<Tensor>]| f(g, needs),
    })
}

/// Records `out` with a closure backward.
pub(crate) fn record_fn<F>(
    name: &'static str,
    out: crate::storage::Storage,
    shape: crate::Shape,
    inputs: &[&Tensor],
    f: impl FnOnce(&Tensor) -> F,
) -> Result<Tensor>
where
    F: FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
{
    record_fn_acc(name, out, shape, inputs, |y| {
        let f = f(y);
        move |g: &Tensor, needs: &[bool], _: &mut [Option<Tensor>]| f(g, needs)
    })
}
