//! The sigmoid (SigLIP) contrastive loss of SD2's dual vision-language contrast (L_D) as one
//! fused unit: `L = −(1/n) Σ_i Σ_j log σ(z_ij·(t·⟨f_i, d_j⟩ + b))` over f's n rows and d's m
//! rows, z_ij = +1 for the positive pair j = offset + i and −1 otherwise. One process pairs n
//! images with their n descriptions (m = n, offset 0: [`sigmoid_loss`]); with L_D's negatives
//! gathered over the ranks d holds every rank's descriptions and this rank's start at `offset`
//! ([`sigmoid_loss_offset`]). The CPU reference (f64 inside, `log σ(x) = −softplus(−x)`: no
//! overflow for extreme logits), the CUDA launches of `kernels/sigmoid_loss.cu` (one block per
//! row; the backward runs it once per side) and the backward rule, with gradients to f, d, t
//! and b.
use rayon::prelude::*;

use super::{cpu_float, FloatFn, FusedKernel};
use crate::backend::cpu::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::{kernels as kn, launch::LaunchConfig, storage::CudaStorage};
use crate::backend::BackendStorage;
use crate::ops::{check_float, check_same_dtype, record_fn};
use crate::storage::Storage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::{DType, Shape};
use crate::{Error, Float, Result, Tensor};

/// The loss for f, d \[n, dim\] (normalise them first), f_i paired with d_i, and scalars t, b
/// (0-d or \[1\]).
pub fn sigmoid_loss(f: &Tensor, d: &Tensor, t: &Tensor, b: &Tensor) -> Result<Tensor> {
    if f.dims() != d.dims() {
        return Err(crate::shape_err!(
            Forward::NAME,
            "f {:?} and d {:?} differ",
            f.dims(),
            d.dims()
        ));
    }
    sigmoid_loss_offset(f, d, 0, t, b)
}

/// The loss for f \[n, dim\] against d \[m, dim\] (normalise them first), f_i paired with
/// d_{offset+i} (`offset + n ≤ m`) and every other row of d a negative, scaled by 1/n; t, b
/// scalars (0-d or \[1\]).
pub fn sigmoid_loss_offset(
    f: &Tensor,
    d: &Tensor,
    offset: usize,
    t: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    let op = Forward::NAME;
    check_float(op, f)?;
    check_same_dtype(op, f, d)?;
    let fits = f.rank() == 2
        && d.rank() == 2
        && f.dims()[1] == d.dims()[1]
        && offset + f.dims()[0] <= d.dims()[0];
    if !fits || t.elem_count() != 1 || b.elem_count() != 1 {
        return Err(crate::shape_err!(
            op,
            "f {:?}, d {:?} (positives from row {offset}), t {:?}, b {:?}",
            f.dims(),
            d.dims(),
            t.dims(),
            b.dims()
        ));
    }
    let geo = Geometry {
        rows: f.dims()[0],
        cols: d.dims()[0],
        dim: f.dims()[1],
        offset,
    };
    let inputs: [&Storage; 4] = [&f.storage(), &d.storage(), &t.storage(), &b.storage()];
    let loss = super::run_one(&Forward(geo), &inputs)?;
    let (fc, dc, tc, bc) = (f.clone(), d.clone(), t.clone(), b.clone());
    record_fn(
        op,
        loss,
        crate::Shape::scalar(),
        &[f, d, t, b],
        move |_: &Tensor| {
            move |g: &Tensor, needs: &[bool]| {
                let inputs: [&Storage; 5] = [
                    &fc.storage(),
                    &dc.storage(),
                    &tc.storage(),
                    &bc.storage(),
                    &g.storage(),
                ];
                let grads = super::run(&Backward(geo), &inputs)?;
                grads
                    .into_iter()
                    .zip([&fc, &dc, &tc, &bc])
                    .zip(needs)
                    .map(|((s, like), need)| {
                        need.then(|| Tensor::from_storage(s, like.shape().clone()))
                            .transpose()
                    })
                    .collect()
            }
        },
    )
}

/// The loss's sizes: f \[rows, dim\] against d \[cols, dim\], f_i's positive d_{offset+i}.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Rows of f (n: the loss is scaled by 1/n).
    pub rows: usize,
    /// Rows of d (m ≥ offset + n).
    pub cols: usize,
    /// Embedding width: columns of f and d.
    pub dim: usize,
    /// The row of d paired with f's first row.
    pub offset: usize,
}

/// loss \[1\] from (f, d, t, b).
pub struct Forward(pub Geometry);

/// (df, dd, dt, db) from (f, d, t, b, dloss); dt and db in t's and b's dtypes.
pub struct Backward(pub Geometry);

/// The CPU reference, the scalars read.
struct Ref {
    t: f64,
    b: f64,
    g: f64,
    geo: Geometry,
}

struct FwdRef(Ref);
/// The backward reference; ∂t and ∂b stay f64 (`scalars`) until cast to t's and b's dtypes.
struct BwdRef(Ref, std::cell::Cell<(f64, f64)>);

impl FloatFn for FwdRef {
    fn call<F: Float>(&self, x: &[&[F]]) -> Vec<Vec<F>> {
        let r = &self.0;
        vec![vec![F::from_f(forward(x[0], x[1], r.t, r.b, r.geo))]]
    }
}

impl FloatFn for BwdRef {
    fn call<F: Float>(&self, x: &[&[F]]) -> Vec<Vec<F>> {
        let r = &self.0;
        let (df, dd, dt, db) = backward(x[0], x[1], r.t, r.b, r.g, r.geo);
        self.1.set((dt, db));
        vec![df, dd]
    }
}

fn lens(op: &'static str, f: usize, d: usize, g: Geometry) -> Result<()> {
    if f != g.rows * g.dim || d != g.cols * g.dim || g.offset + g.rows > g.cols {
        return Err(Error::shape(
            op,
            format!("f has {f} and d {d} elements, expected {g:?}"),
        ));
    }
    Ok(())
}

impl FusedKernel for Forward {
    const NAME: &'static str = "sigmoid_loss";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        lens(Self::NAME, inputs[0].len(), inputs[1].len(), self.0)?;
        let r = FwdRef(Ref {
            t: inputs[2].scalar(Self::NAME)?,
            b: inputs[3].scalar(Self::NAME)?,
            g: 1.0,
            geo: self.0,
        });
        // The loss in f32 (f64 for f64), as on every backend.
        cpu_float(Self::NAME, &r, &inputs[..2], &[false])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (f, d, t, b) = (inputs[0], inputs[1], inputs[2], inputs[3]);
        let (loss, _, _, _) = rows(f, d, t, b, self.0, false)?;
        Ok(vec![loss])
    }
}

impl FusedKernel for Backward {
    const NAME: &'static str = "sigmoid_loss_bwd";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        lens(Self::NAME, inputs[0].len(), inputs[1].len(), self.0)?;
        let (tdt, bdt) = (inputs[2].dtype(), inputs[3].dtype());
        let r = BwdRef(
            Ref {
                t: inputs[2].scalar(Self::NAME)?,
                b: inputs[3].scalar(Self::NAME)?,
                g: inputs[4].scalar(Self::NAME)?,
                geo: self.0,
            },
            std::cell::Cell::new((0.0, 0.0)),
        );
        let out = cpu_float(Self::NAME, &r, &inputs[..2], &[true, true])?;
        let [df, dd]: [CpuStorage; 2] = out
            .try_into()
            .map_err(|_| Error::Msg("sigmoid_loss_bwd: expected 2 outputs".into()))?;
        let (dt, db) = r.1.get();
        Ok(vec![
            df,
            dd,
            CpuStorage::F64(vec![dt]).cast(tdt)?,
            CpuStorage::F64(vec![db]).cast(bdt)?,
        ])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (f, d, t, b, dloss) = (inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]);
        // ∂f from (f, d), ∂d from the same kernel with the inputs swapped; both carry the
        // upstream gradient 1, so scale by dloss afterwards.
        let (_, df, dt, db) = rows(f, d, t, b, self.0, false)?;
        let (_, dd, _, _) = rows(d, f, t, b, self.0, true)?;
        let g = dloss.scalar_f32(Self::NAME)?;
        let (dt, db) = (dt.scale_by(&g)?, db.scale_by(&g)?);
        Ok(vec![
            df.scale_by(&g)?,
            dd.scale_by(&g)?,
            dt.into_dtype(t.dtype)?,
            db.into_dtype(b.dtype)?,
        ])
    }
}

/// The fused SigLIP kernel on (f, d) of `geo`: (loss [1], ∂f, ∂t [1], ∂b [1]) for upstream
/// gradient 1; `swapped` when f is the loss's d and d its f (the backward's ∂d: rows and
/// columns trade places and the offset is negated).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn rows(
    f: &CudaStorage,
    d: &CudaStorage,
    t: &CudaStorage,
    b: &CudaStorage,
    geo: Geometry,
    swapped: bool,
) -> Result<(CudaStorage, CudaStorage, CudaStorage, CudaStorage)> {
    let op = Forward::NAME;
    let name = format!("sigmoid_loss_rows_{}", f.sfx(op)?);
    f.same_dtype(op, d)?;
    let (n, cols, dim) = if swapped {
        lens(op, d.len, f.len, geo)?;
        (geo.cols, geo.rows, geo.dim)
    } else {
        lens(op, f.len, d.len, geo)?;
        (geo.rows, geo.cols, geo.dim)
    };
    let offset = i32::try_from(geo.offset)
        .map_err(|_| Error::shape(op, format!("offset {} exceeds i32", geo.offset)))?;
    let offset = if swapped { -offset } else { offset };
    let inv_n = 1.0 / geo.rows.max(1) as f32;
    let (tf, bf) = (t.scalar_f32(op)?, b.scalar_f32(op)?);
    let grad = f.empty(n * dim, f.dtype)?;
    let parts = f.empty(3 * n, DType::F32)?;
    let threads = 128usize;
    if n > 0 {
        // One block per row; shared memory holds d's column sums per warp and the block's.
        let cfg = LaunchConfig {
            grid: (n.min(4096) as u32, 1, 1),
            block: (threads as u32, 1, 1),
            shared_mem_bytes: ((1 + threads / 32) * dim * 4) as u32,
        };
        let args = kn::SigmoidLossRows {
            f: f.ptr(),
            d: d.ptr(),
            t: tf.ptr(),
            b: bf.ptr(),
            grad: grad.ptr(),
            loss_part: parts.ptr_at(0),
            dt_part: parts.ptr_at(n),
            db_part: parts.ptr_at(2 * n),
            rows: n,
            cols,
            dim,
            offset,
            inv_n,
        };
        f.run(&name, cfg, args)?;
    }
    // [3, n] partials → per-quantity sums.
    let sums = parts.sum_to(&Shape::from(vec![3, n]), &Shape::from(vec![3, 1]))?;
    let pick = |k: usize| -> Result<CudaStorage> {
        let mut o = f.empty(1, DType::F32)?;
        sums.copy2d(&mut o, 1, 1, 1, 1, k, 0)?;
        Ok(o)
    };
    // Keep `tf`/`bf` alive until the launch is ordered before their release (stream order).
    let _ = (&tf, &bf);
    Ok((pick(0)?, grad, pick(1)?, pick(2)?))
}

/// log(1 + e^x) without overflow.
#[inline]
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Pairwise dot products ⟨f_i, d_j⟩ as a [rows, cols] matrix (f64 accumulation).
fn dots<F: Float>(f: &[F], d: &[F], g: Geometry) -> Vec<f64> {
    let (cols, dim) = (g.cols, g.dim);
    (0..g.rows * cols)
        .into_par_iter()
        .map(|ij| {
            let (i, j) = (ij / cols, ij % cols);
            f[i * dim..(i + 1) * dim]
                .iter()
                .zip(&d[j * dim..(j + 1) * dim])
                .map(|(a, b)| a.f64() * b.f64())
                .sum()
        })
        .collect()
}

/// z_ij: +1 for the positive pair (i, offset + i), −1 for the others.
fn sign(g: Geometry, ij: usize) -> f64 {
    if ij % g.cols == g.offset + ij / g.cols {
        1.0
    } else {
        -1.0
    }
}

/// L = −(1/n) Σ_ij log σ(z_ij (t⟨f_i, d_j⟩ + b)) over f's n rows and d's m.
pub fn forward<F: Float>(f: &[F], d: &[F], t: f64, b: f64, g: Geometry) -> f64 {
    let s = dots(f, d, g);
    let total: f64 = s
        .iter()
        .enumerate()
        .map(|(ij, s)| softplus(-sign(g, ij) * (t * s + b)))
        .sum();
    total / g.rows.max(1) as f64
}

/// Returns (df, dd, dt, db) scaled by the upstream gradient `up`.
pub fn backward<F: Float>(
    f: &[F],
    d: &[F],
    t: f64,
    b: f64,
    up: f64,
    g: Geometry,
) -> (Vec<F>, Vec<F>, f64, f64) {
    let (n, m, dim) = (g.rows, g.cols, g.dim);
    let s = dots(f, d, g);
    // dL/dx_ij = −z σ(−z x) / n; σ(−zx) = 1/(1 + e^{zx}) saturates to 0 or 1 without NaN.
    let gx: Vec<f64> = (0..n * m)
        .map(|ij| {
            let z = sign(g, ij);
            let x = t * s[ij] + b;
            -z / (1.0 + (z * x).exp()) * up / n.max(1) as f64
        })
        .collect();
    let dt: f64 = gx.iter().zip(&s).map(|(a, b)| a * b).sum();
    let db: f64 = gx.iter().sum();
    let mut df = vec![F::zero(); n * dim];
    let mut dd = vec![F::zero(); m * dim];
    df.par_chunks_mut(dim.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            for (k, v) in row.iter_mut().enumerate() {
                *v = F::from_f(
                    t * (0..m)
                        .map(|j| gx[i * m + j] * d[j * dim + k].f64())
                        .sum::<f64>(),
                );
            }
        });
    dd.par_chunks_mut(dim.max(1))
        .enumerate()
        .for_each(|(j, row)| {
            for (k, v) in row.iter_mut().enumerate() {
                *v = F::from_f(
                    t * (0..n)
                        .map(|i| gx[i * m + j] * f[i * dim + k].f64())
                        .sum::<f64>(),
                );
            }
        });
    (df, dd, dt, db)
}
