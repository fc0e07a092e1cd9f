//! LayerNorm over the last dim with affine γ, β as one fused unit: the CPU reference, the
//! CUDA launches of `kernels/layernorm.cu` (forward saves mean and 1/σ, f32 for bf16 storage;
//! backward writes dx and per-block dγ/dβ partials reduced in a fixed order, so results do not
//! depend on scheduling) and the backward rule, which computes dγ/dβ only when asked.
use rayon::prelude::*;

use super::{cpu_float, cpu_float_bf16_via_f32, FloatFn, FusedKernel};
use crate::backend::cpu::{CpuStorage, RED_CHUNK};
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::{
    abi::{Arg, LaunchConfig},
    kernels as kn,
    storage::{same_len, CudaStorage},
};
use crate::backend::BackendStorage;
use crate::ops::{check_float, check_same_dtype, record_fn_acc};
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::DType;
use crate::{Error, Float, Result, Tensor};

impl Tensor {
    /// LayerNorm over the last dim with affine `gamma`, `beta` (\[dim\]).
    pub fn layer_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        let op = "layer_norm";
        check_float(op, self)?;
        check_same_dtype(op, self, gamma)?;
        check_same_dtype(op, self, beta)?;
        let cols = self.shape().last();
        if gamma.dims() != [cols] || beta.dims() != [cols] {
            return Err(crate::shape_err!(
                op,
                "x {:?} with gamma {:?} and beta {:?}",
                self.dims(),
                gamma.dims(),
                beta.dims()
            ));
        }
        let fwd = Forward { cols, eps };
        let [y, mean, rstd]: [_; 3] =
            super::run(&fwd, &[&self.storage(), &gamma.storage(), &beta.storage()])?
                .try_into()
                .map_err(|_| crate::Error::Msg("layer_norm: expected 3 outputs".into()))?;
        let (x, g) = (self.clone(), gamma.clone());
        let beta_shape = beta.shape().clone();
        record_fn_acc(
            op,
            y,
            self.shape().clone(),
            &[self, gamma, beta],
            move |_: &Tensor| {
                move |dy: &Tensor, needs: &[bool], acc: &mut [Option<Tensor>]| {
                    // The residual stream's gradient so far is added in the kernel (a pre-LN
                    // block's input feeds both the norm and the residual add).
                    let acc = acc[0]
                        .take_if(|a| needs[0] && a.dtype() == x.dtype() && a.shape() == x.shape());
                    let bwd = Backward {
                        cols,
                        need_x: needs[0],
                        need_params: needs[1] || needs[2],
                        acc: acc.is_some(),
                    };
                    let outs = {
                        let acc_st = acc.as_ref().map(|a| a.storage());
                        let (xs, gs, dys) = (x.storage(), g.storage(), dy.storage());
                        let mut inputs = vec![&*xs, &*gs, &mean, &rstd, &*dys];
                        inputs.extend(acc_st.as_deref());
                        super::run(&bwd, &inputs)?
                    };
                    let mut outs = outs.into_iter();
                    let dx = if bwd.need_x { outs.next() } else { None };
                    let (dg, db) = if bwd.need_params {
                        (outs.next(), outs.next())
                    } else {
                        (None, None)
                    };
                    let dx = dx
                        .map(|s| Tensor::from_storage(s, x.shape().clone()))
                        .transpose()?;
                    let dg = if needs[1] {
                        dg.map(|s| Tensor::from_storage(s, g.shape().clone()))
                            .transpose()?
                    } else {
                        None
                    };
                    let db = if needs[2] {
                        db.map(|s| Tensor::from_storage(s, beta_shape))
                            .transpose()?
                    } else {
                        None
                    };
                    Ok(vec![dx, dg, db])
                }
            },
        )
    }
}

/// (y, mean, rstd) from (x, γ, β).
pub struct Forward {
    /// Row width: the size of the normalized last dimension (and the length of γ and β).
    pub cols: usize,
    /// Added to the variance before the square root: 1/σ = 1/√(var + eps). The variance is the
    /// biased one (divided by `cols`), as in torch.
    pub eps: f64,
}

/// From (x, γ, mean, rstd, dy, \[acc\]): dx (+ acc, the gradient x already has, when `acc`)
/// when `need_x`, then dγ and dβ when `need_params`.
pub struct Backward {
    /// Row width, as in the forward.
    pub cols: usize,
    /// Compute dx (the input has a tracked path).
    pub need_x: bool,
    /// Compute dγ and dβ (column sums over all rows), which costs an extra reduction.
    pub need_params: bool,
    /// A sixth input holds the gradient x already has; it is added into dx in the same pass, so
    /// the engine needs no separate add.
    pub acc: bool,
}

fn param_lens(op: &'static str, cols: usize, lens: [usize; 2]) -> Result<()> {
    if lens.iter().any(|l| *l != cols) {
        return Err(Error::shape(
            op,
            format!("gamma/beta of {lens:?} elements for rows of {cols}"),
        ));
    }
    Ok(())
}

impl FloatFn for Forward {
    fn call<F: Float>(&self, inputs: &[&[F]]) -> Vec<Vec<F>> {
        let (y, m, r) = layer_norm(inputs[0], inputs[1], inputs[2], self.cols, self.eps);
        vec![y, m, r]
    }
}

impl FloatFn for Backward {
    fn call<F: Float>(&self, inputs: &[&[F]]) -> Vec<Vec<F>> {
        let (x, g, m, r, dy) = (inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]);
        let acc = self.acc.then(|| inputs[5]);
        let (dx, dg, db) = layer_norm_bwd(
            x,
            g,
            m,
            r,
            dy,
            acc,
            self.cols,
            self.need_x,
            self.need_params,
        );
        dx.into_iter().chain(dg).chain(db).collect()
    }
}

impl FusedKernel for Forward {
    const NAME: &'static str = "layer_norm";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        param_lens(Self::NAME, self.cols, [inputs[1].len(), inputs[2].len()])?;
        // bf16: y rounded back; the statistics stay f32.
        cpu_float(Self::NAME, self, inputs, &[true, false, false])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (x, gamma, beta) = (inputs[0], inputs[1], inputs[2]);
        param_lens(Self::NAME, self.cols, [gamma.len, beta.len])?;
        x.same_dtype(Self::NAME, gamma)?;
        x.same_dtype(Self::NAME, beta)?;
        let rows = x.len / self.cols.max(1);
        let y = x.empty(x.len, x.dtype)?;
        let (mean, rstd) = (x.empty(rows, DType::F32)?, x.empty(rows, DType::F32)?);
        let name = format!("layernorm_fwd_{}", x.sfx(Self::NAME)?);
        if rows > 0 {
            let k = kn::LayerNormFwd {
                x: x.ptr(),
                res: Arg::null(), // no residual
                gamma: gamma.ptr(),
                beta: beta.ptr(),
                sum_out: Arg::null(), // no pre-norm sum out
                y: y.ptr(),
                mean: mean.ptr(),
                rstd: rstd.ptr(),
                rows,
                n: self.cols,
                eps: self.eps as f32,
            };
            x.run_grid(&name, k)?;
        }
        Ok(vec![y, mean, rstd])
    }
}

impl FusedKernel for Backward {
    const NAME: &'static str = "layer_norm_bwd";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        if self.acc && inputs.get(5).map(|a| a.len()) != Some(inputs[0].len()) {
            return Err(Error::shape(
                Self::NAME,
                "the accumulated gradient does not match x".to_string(),
            ));
        }
        // Statistics are f32 for bf16 tensors: run in f32 and round the results.
        cpu_float_bf16_via_f32(Self::NAME, self, inputs)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (x, gamma, mean, rstd, dy) = (inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]);
        let sfx = x.sfx(Self::NAME)?;
        x.same_dtype(Self::NAME, dy)?;
        let cols = self.cols;
        let rows = x.len / cols.max(1);
        let acc = if self.acc {
            let a = inputs.get(5).copied().ok_or_else(|| {
                Error::Msg(format!(
                    "{}: the accumulated gradient is missing",
                    Self::NAME
                ))
            })?;
            same_len("layer_norm_bwd acc", a.len, x.len)?;
            x.same_dtype(Self::NAME, a)?;
            Some(a)
        } else {
            None
        };
        // dγ/dβ partials cap the grid (one partial row per block); a frozen norm has none, so
        // its grid fills the GPU.
        let blocks = kn::layernorm_bwd_blocks(rows, self.need_params);
        let dx = x.empty(x.len, x.dtype)?;
        let parts = if self.need_params {
            Some((
                x.empty(blocks * cols, DType::F32)?,
                x.empty(blocks * cols, DType::F32)?,
            ))
        } else {
            None
        };
        if rows > 0 {
            x.run(
                &format!("layernorm_bwd_{sfx}"),
                LaunchConfig::linear(blocks as u32, 256),
                kn::LayerNormBwd {
                    dy: dy.ptr(),
                    x: x.ptr(),
                    gamma: gamma.ptr(),
                    mean: mean.ptr(),
                    rstd: rstd.ptr(),
                    dsum: acc.map_or(Arg::null(), |a| a.ptr()),
                    dx: dx.ptr(),
                    dgamma_part: parts.as_ref().map_or(Arg::null(), |p| p.0.ptr()),
                    dbeta_part: parts.as_ref().map_or(Arg::null(), |p| p.1.ptr()),
                    rows,
                    n: cols,
                },
            )?;
        }
        let mut out = vec![];
        if self.need_x {
            out.push(dx);
        }
        if let Some((dgp, dbp)) = &parts {
            let (dg, db) = if rows > 0 {
                (
                    dgp.column_sum_to(blocks, cols, x.dtype)?,
                    dbp.column_sum_to(blocks, cols, x.dtype)?,
                )
            } else {
                (x.zeros_like(cols, x.dtype)?, x.zeros_like(cols, x.dtype)?)
            };
            out.push(dg);
            out.push(db);
        }
        Ok(out)
    }
}

/// Returns (y, mean, rstd) per row; statistics accumulated in F.
pub fn layer_norm<F: Float>(
    x: &[F],
    g: &[F],
    b: &[F],
    cols: usize,
    eps: f64,
) -> (Vec<F>, Vec<F>, Vec<F>) {
    let rows = x.len().checked_div(cols).unwrap_or(0);
    let mut y = vec![F::zero(); x.len()];
    let mut mean = vec![F::zero(); rows];
    let mut rstd = vec![F::zero(); rows];
    if rows == 0 {
        return (y, mean, rstd);
    }
    let n = F::from_usize(cols).unwrap_or_else(F::one);
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((y, x), (m, r))| {
            let mu = x.iter().copied().sum::<F>() / n;
            let var = x.iter().map(|v| (*v - mu) * (*v - mu)).sum::<F>() / n;
            let rs = F::one() / (var + F::from_f(eps)).sqrt();
            for i in 0..cols {
                y[i] = (x[i] - mu) * rs * g[i] + b[i];
            }
            *m = mu;
            *r = rs;
        });
    (y, mean, rstd)
}

type Grads<F> = (Option<Vec<F>>, Option<Vec<F>>, Option<Vec<F>>);

/// The CPU reference backward of [`layer_norm`]: from x, γ, the saved per-row mean and 1/σ and
/// dy (all rows of `cols`), returns (dx, dγ, dβ), each `None` unless asked for. dx is
/// `(dy·γ − mean(dy·γ) − x̂·mean(dy·γ·x̂))·(1/σ)` per row, plus `acc` when given; dγ and dβ are
/// summed over fixed chunks of rows in order, so they do not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_bwd<F: Float>(
    x: &[F],
    g: &[F],
    mean: &[F],
    rstd: &[F],
    dy: &[F],
    acc: Option<&[F]>,
    cols: usize,
    need_x: bool,
    need_params: bool,
) -> Grads<F> {
    let rows = x.len().checked_div(cols).unwrap_or(0);
    let n = F::from_usize(cols).unwrap_or_else(F::one);
    let dx = need_x.then(|| {
        let mut dx = vec![F::zero(); x.len()];
        dx.par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(r, dx)| {
                let (x, dy) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
                let (mu, rs) = (mean[r], rstd[r]);
                let mut s1 = F::zero();
                let mut s2 = F::zero();
                for i in 0..cols {
                    let xh = (x[i] - mu) * rs;
                    let dg = dy[i] * g[i];
                    s1 += dg;
                    s2 += dg * xh;
                }
                let (m1, m2) = (s1 / n, s2 / n);
                for i in 0..cols {
                    let xh = (x[i] - mu) * rs;
                    dx[i] = (dy[i] * g[i] - m1 - xh * m2) * rs;
                }
                if let Some(a) = acc {
                    let a = &a[r * cols..(r + 1) * cols];
                    dx.iter_mut().zip(a).for_each(|(d, a)| *d += *a);
                }
            });
        dx
    });
    let (dg, db) = if need_params {
        // Column sums over rows, in fixed row chunks summed in order.
        let parts: Vec<(Vec<F>, Vec<F>)> = (0..rows.div_ceil(RED_CHUNK))
            .into_par_iter()
            .map(|c| {
                let mut dg = vec![F::zero(); cols];
                let mut db = vec![F::zero(); cols];
                for r in c * RED_CHUNK..((c + 1) * RED_CHUNK).min(rows) {
                    for i in 0..cols {
                        let d = dy[r * cols + i];
                        dg[i] += d * (x[r * cols + i] - mean[r]) * rstd[r];
                        db[i] += d;
                    }
                }
                (dg, db)
            })
            .collect();
        let mut dg = vec![F::zero(); cols];
        let mut db = vec![F::zero(); cols];
        for (pg, pb) in parts {
            dg.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (Some(dg), Some(db))
    } else {
        (None, None)
    };
    (dx, dg, db)
}
