//! L2 normalisation over the last dim, `x / max(‖x‖₂, eps)` (torch's `F.normalize`), as one
//! fused unit: the CPU reference, the CUDA launch of `kernels/l2norm.cu` and the backward rule.
//! The forward saves the per-row norm (f32 for bf16 storage); the backward uses it and the
//! output, and takes the clamped branch (y = x / eps, linear) where the norm is below eps.
use rayon::prelude::*;

use super::{cpu_float, cpu_float_bf16_via_f32, FloatFn, FusedKernel};
use crate::backend::cpu::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::{kernels as kn, storage::CudaStorage};
use crate::ops::{check_float, record_fn};
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::DType;
use crate::{Float, Result, Tensor};

/// The clamp of `l2_normalize`, as torch's `F.normalize`.
pub const L2_EPS: f64 = 1e-12;

impl Tensor {
    /// `x / max(‖x‖₂, 1e-12)` over the last dim.
    pub fn l2_normalize(&self) -> Result<Tensor> {
        check_float(Forward::NAME, self)?;
        let cols = self.shape().last();
        let fwd = Forward { cols, eps: L2_EPS };
        let [out, norms]: [_; 2] = super::run(&fwd, &[&self.storage()])?
            .try_into()
            .map_err(|_| crate::Error::Msg("l2_normalize: expected 2 outputs".into()))?;
        record_fn(
            Forward::NAME,
            out,
            self.shape().clone(),
            &[self],
            move |y: &Tensor| {
                let y = y.clone();
                move |dy: &Tensor, _: &[bool]| {
                    let bwd = Backward { cols, eps: L2_EPS };
                    let dx = super::run_one(&bwd, &[&y.storage(), &norms, &dy.storage()])?;
                    Ok(vec![Some(Tensor::from_storage(dx, y.shape().clone())?)])
                }
            },
        )
    }
}

/// (y, ‖x‖ per row) from x [rows, cols].
pub struct Forward {
    /// Row width: the size of the last dimension, over which each row is normalized.
    pub cols: usize,
    /// Lower clamp of the norm (`L2_EPS`, 1e-12, in `Tensor::l2_normalize`).
    pub eps: f64,
}

/// dx from (y, ‖x‖, dy).
pub struct Backward {
    /// Row width, as in the forward.
    pub cols: usize,
    /// The forward's clamp: rows whose saved norm is below it take the linear branch y = x / eps.
    pub eps: f64,
}

impl FloatFn for Forward {
    fn call<F: Float>(&self, inputs: &[&[F]]) -> Vec<Vec<F>> {
        let (x, cols) = (inputs[0], self.cols);
        let rows = x.len().checked_div(cols).unwrap_or(0);
        let mut y = vec![F::zero(); x.len()];
        let mut norms = vec![F::zero(); rows];
        if rows > 0 {
            y.par_chunks_mut(cols)
                .zip(x.par_chunks(cols))
                .zip(norms.par_iter_mut())
                .for_each(|((y, x), n)| {
                    let nr = x.iter().map(|v| *v * *v).sum::<F>().sqrt();
                    let inv = F::one() / nr.max(F::from_f(self.eps));
                    y.iter_mut().zip(x).for_each(|(y, x)| *y = *x * inv);
                    *n = nr;
                });
        }
        vec![y, norms]
    }
}

impl FloatFn for Backward {
    fn call<F: Float>(&self, inputs: &[&[F]]) -> Vec<Vec<F>> {
        let (y, norms, dy, cols) = (inputs[0], inputs[1], inputs[2], self.cols);
        let mut dx = vec![F::zero(); y.len()];
        if cols == 0 {
            return vec![dx];
        }
        let e = F::from_f(self.eps);
        dx.par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
            let (y, dy) = (&y[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
            let n = norms[r];
            if n > e {
                let dot: F = y.iter().zip(dy).map(|(a, b)| *a * *b).sum();
                for i in 0..cols {
                    dx[i] = (dy[i] - y[i] * dot) / n;
                }
            } else {
                // Clamped branch: y = x / eps is linear in x.
                for i in 0..cols {
                    dx[i] = dy[i] / e;
                }
            }
        });
        vec![dx]
    }
}

impl FusedKernel for Forward {
    const NAME: &'static str = "l2_normalize";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        // bf16: y rounded back, the norms kept in f32.
        cpu_float(Self::NAME, self, inputs, &[true, false])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let x = inputs[0];
        let rows = x.len / self.cols.max(1);
        let y = x.empty(x.len, x.dtype)?;
        let norm = x.empty(rows, DType::F32)?;
        let name = format!("l2norm_fwd_{}", x.sfx(Self::NAME)?);
        if rows > 0 {
            let k = kn::L2NormFwd {
                x: x.ptr(),
                y: y.ptr(),
                norm: norm.ptr(),
                rows,
                cols: self.cols,
                eps: self.eps as f32,
            };
            x.run_grid(&name, k)?;
        }
        Ok(vec![y, norm])
    }
}

impl FusedKernel for Backward {
    const NAME: &'static str = "l2_normalize_bwd";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        // bf16 y and dy with f32 norms: computed in f32, dx rounded back to bf16.
        cpu_float_bf16_via_f32(Self::NAME, self, inputs)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (y, norm, dy) = (inputs[0], inputs[1], inputs[2]);
        y.same_dtype(Self::NAME, dy)?;
        let rows = y.len / self.cols.max(1);
        let dx = y.empty(y.len, y.dtype)?;
        let name = format!("l2norm_bwd_{}", y.sfx(Self::NAME)?);
        if rows > 0 {
            let k = kn::L2NormBwd {
                y: y.ptr(),
                norm: norm.ptr(),
                dy: dy.ptr(),
                dx: dx.ptr(),
                rows,
                cols: self.cols,
                eps: self.eps as f32,
            };
            y.run_grid(&name, k)?;
        }
        Ok(vec![dx])
    }
}
