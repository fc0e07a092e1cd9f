//! Softmax over the last dim as one fused unit: the CPU reference, the CUDA launch of
//! `kernels/softmax.cu` (one block per row) and the backward rule dx = y ∘ (dy − ⟨dy, y⟩).
//! A fully masked row (all −∞) is defined as zeros.
use rayon::prelude::*;

use super::{cpu_float, FloatFn, FusedKernel};
use crate::backend::cpu::norm::softmax_row;
use crate::backend::cpu::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::{kernels as kn, storage::CudaStorage};
use crate::ops::{check_float, record_fn};
use crate::{Float, Result, Tensor};

impl Tensor {
    /// Softmax over the last dim.
    pub fn softmax_last(&self) -> Result<Tensor> {
        check_float(Forward::NAME, self)?;
        let cols = self.shape().last();
        let out = super::run_one(&Forward { cols }, &[&self.storage()])?;
        record_fn(
            Forward::NAME,
            out,
            self.shape().clone(),
            &[self],
            move |y: &Tensor| {
                let y = y.clone();
                move |dy: &Tensor, _: &[bool]| {
                    let dx = super::run_one(&Backward { cols }, &[&y.storage(), &dy.storage()])?;
                    Ok(vec![Some(Tensor::from_storage(dx, y.shape().clone())?)])
                }
            },
        )
    }
}

/// y = softmax(x) per row of `cols`.
pub struct Forward {
    /// Row width: the size of the last dimension, over which each row is normalized.
    pub cols: usize,
}

/// dx from (y, dy).
pub struct Backward {
    /// Row width, as in the forward.
    pub cols: usize,
}

impl FloatFn for Forward {
    fn call<F: Float>(&self, inputs: &[&[F]]) -> Vec<Vec<F>> {
        let mut y = inputs[0].to_vec();
        if self.cols > 0 {
            y.par_chunks_mut(self.cols).for_each(|r| {
                softmax_row(r);
            });
        }
        vec![y]
    }
}

impl FloatFn for Backward {
    fn call<F: Float>(&self, inputs: &[&[F]]) -> Vec<Vec<F>> {
        let (y, dy, cols) = (inputs[0], inputs[1], self.cols);
        let mut dx = vec![F::zero(); y.len()];
        if cols == 0 {
            return vec![dx];
        }
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
            let (y, dy) = (&y[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
            let dot: F = y.iter().zip(dy).map(|(a, b)| *a * *b).sum();
            for i in 0..cols {
                dx[i] = y[i] * (dy[i] - dot);
            }
        });
        vec![dx]
    }
}

impl FusedKernel for Forward {
    const NAME: &'static str = "softmax";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        cpu_float(Self::NAME, self, inputs, &[])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let x = inputs[0];
        let rows = x.len / self.cols.max(1);
        let y = x.empty(x.len, x.dtype)?;
        let name = format!("softmax_fwd_{}", x.sfx(Self::NAME)?);
        if rows > 0 {
            let k = kn::SoftmaxFwd {
                x: x.ptr(),
                y: y.ptr(),
                rows,
                cols: self.cols,
            };
            x.run_grid(&name, k)?;
        }
        Ok(vec![y])
    }
}

impl FusedKernel for Backward {
    const NAME: &'static str = "softmax_bwd";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        cpu_float(Self::NAME, self, inputs, &[])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (y, dy) = (inputs[0], inputs[1]);
        y.same_dtype(Self::NAME, dy)?;
        let rows = y.len / self.cols.max(1);
        let dx = y.empty(y.len, y.dtype)?;
        let name = format!("softmax_bwd_{}", y.sfx(Self::NAME)?);
        if rows > 0 {
            let k = kn::SoftmaxBwd {
                y: y.ptr(),
                dy: dy.ptr(),
                dx: dx.ptr(),
                rows,
                cols: self.cols,
            };
            y.run_grid(&name, k)?;
        }
        Ok(vec![dx])
    }
}
