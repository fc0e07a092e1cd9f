//! Mean cross-entropy from logits (SD2's L_C) as one fused unit: the CPU reference, the CUDA
//! launches of `kernels/cross_entropy.cu` (per-row loss parts summed in a fixed order, so the
//! loss does not depend on scheduling) and the backward rule. Labels are class ids (i64 or
//! u32), checked against the class count — on a GPU by the device itself, reported at the next
//! read. The loss is a 0-d tensor in f32 (f64 for f64 logits); the saved log-sum-exp is f32 for
//! bf16 logits.
use rayon::prelude::*;

use super::{cpu_float, cpu_float_bf16_via_f32, FloatFn, FusedKernel};
use crate::backend::cpu::norm::softmax_row;
use crate::backend::cpu::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::{kernels as kn, storage::CudaStorage};
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::BackendStorage;
use crate::ops::{check_float, check_ids, record_fn};
use crate::{DType, Error, Float, Result, Tensor};

/// Mean cross-entropy of logits \[N, C\] against class ids \[N\] (i64 or u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let op = Forward::NAME;
    check_float(op, logits)?;
    check_ids(op, labels)?;
    if logits.rank() != 2 || labels.dims() != [logits.dims()[0]] {
        return Err(crate::shape_err!(
            op,
            "logits {:?} with labels {:?}",
            logits.dims(),
            labels.dims()
        ));
    }
    let (rows, cols) = (logits.dims()[0], logits.dims()[1]);
    let [loss, lse]: [_; 2] = super::run(
        &Forward { rows, cols },
        &[&logits.storage(), &labels.storage()],
    )?
    .try_into()
    .map_err(|_| Error::Msg("cross_entropy: expected 2 outputs".into()))?;
    let (z, y) = (logits.clone(), labels.clone());
    let stat = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    record_fn(
        op,
        loss,
        crate::Shape::scalar(),
        &[logits],
        move |_: &Tensor| {
            move |g: &Tensor, _: &[bool]| {
                let g = g.to_dtype(stat)?;
                let inputs = [&z.storage(), &y.storage(), &lse, &g.storage()];
                let dz = super::run_one(&Backward { rows, cols }, &inputs)?;
                Ok(vec![Some(Tensor::from_storage(dz, z.shape().clone())?)])
            }
        },
    )
}

/// (loss \[1\], lse \[rows\]) from (logits \[rows, cols\], labels \[rows\]).
pub struct Forward {
    /// Number of rows N (samples): rows of the logits and length of the labels.
    pub rows: usize,
    /// Number of classes C: columns of the logits; every label must be below it.
    pub cols: usize,
}

/// dlogits from (logits, labels, lse, dloss \[1\]).
pub struct Backward {
    /// Number of rows N, as in the forward.
    pub rows: usize,
    /// Number of classes C, as in the forward.
    pub cols: usize,
}

/// The CPU reference of the forward, on labels already checked.
struct FwdRef<'a> {
    labels: &'a [usize],
    cols: usize,
}

impl FloatFn for FwdRef<'_> {
    fn call<F: Float>(&self, x: &[&[F]]) -> Vec<Vec<F>> {
        let (loss, lse) = forward(x[0], self.labels, self.cols);
        vec![vec![F::from_f(loss)], lse]
    }
}

/// The CPU reference of the backward: the upstream gradient `g` read from its scalar.
struct BwdRef<'a> {
    labels: &'a [usize],
    g: f64,
    cols: usize,
}

impl FloatFn for BwdRef<'_> {
    fn call<F: Float>(&self, x: &[&[F]]) -> Vec<Vec<F>> {
        vec![backward(x[0], self.labels, x[1], self.g, self.cols)]
    }
}

/// The labels of a CPU launch, checked against the class count and the row count.
fn cpu_labels(
    op: &'static str,
    labels: &CpuStorage,
    rows: usize,
    cols: usize,
) -> Result<Vec<usize>> {
    let ids = labels.ids(op, cols)?;
    if ids.len() != rows {
        return Err(Error::shape(
            op,
            format!("{} labels for {rows} rows", ids.len()),
        ));
    }
    Ok(ids)
}

impl FusedKernel for Forward {
    const NAME: &'static str = "cross_entropy";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        let labels = cpu_labels(Self::NAME, inputs[1], self.rows, self.cols)?;
        let r = FwdRef {
            labels: &labels,
            cols: self.cols,
        };
        // The loss in f32 (f64 for f64) on every backend; the lse in f32 for bf16.
        cpu_float(Self::NAME, &r, &inputs[..1], &[false, false])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (z, labels) = (inputs[0], inputs[1]);
        let (rows, cols) = (self.rows, self.cols);
        let name = format!("cross_entropy_fwd_{}", z.sfx(Self::NAME)?);
        let labels = labels.ids_i64(Self::NAME, cols)?;
        if labels.len != rows {
            return Err(Error::shape(
                Self::NAME,
                format!("{} labels for {rows} rows", labels.len),
            ));
        }
        let (part, lse) = (z.empty(rows, DType::F32)?, z.empty(rows, DType::F32)?);
        if rows == 0 {
            return Ok(vec![z.zeros_like(1, DType::F32)?, lse]);
        }
        z.run_grid(
            &name,
            kn::CrossEntropyFwd {
                z: z.ptr(),
                labels: labels.ptr(),
                loss_part: part.ptr(),
                lse: lse.ptr(),
                rows,
                cols,
            },
        )?;
        Ok(vec![part.column_sum(rows, 1)?, lse])
    }
}

impl FusedKernel for Backward {
    const NAME: &'static str = "cross_entropy_bwd";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        let labels = cpu_labels(Self::NAME, inputs[1], self.rows, self.cols)?;
        let g = inputs[3].scalar(Self::NAME)?;
        let r = BwdRef {
            labels: &labels,
            g,
            cols: self.cols,
        };
        // bf16 logits with an f32 lse: computed in f32, dz rounded back.
        cpu_float_bf16_via_f32(Self::NAME, &r, &[inputs[0], inputs[2]])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (z, labels, lse, dloss) = (inputs[0], inputs[1], inputs[2], inputs[3]);
        let (rows, cols) = (self.rows, self.cols);
        let name = format!("cross_entropy_bwd_{}", z.sfx(Self::NAME)?);
        let labels = labels.ids_i64(Self::NAME, cols)?;
        let g = dloss.scalar_f32(Self::NAME)?;
        let dz = z.empty(z.len, z.dtype)?;
        if rows > 0 {
            z.run_grid(
                &name,
                kn::CrossEntropyBwd {
                    z: z.ptr(),
                    labels: labels.ptr(),
                    lse: lse.ptr(),
                    dloss: g.ptr(),
                    dz: dz.ptr(),
                    rows,
                    cols,
                },
            )?;
        }
        Ok(vec![dz])
    }
}

/// Mean cross-entropy and per-row log-sum-exp.
pub fn forward<F: Float>(z: &[F], labels: &[usize], cols: usize) -> (f64, Vec<F>) {
    let rows = labels.len();
    let per_row: Vec<(f64, F)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let mut row = z[r * cols..(r + 1) * cols].to_vec();
            let lse = softmax_row(&mut row);
            ((lse - z[r * cols + labels[r]]).f64(), lse)
        })
        .collect();
    let loss = per_row.iter().map(|p| p.0).sum::<f64>() / rows.max(1) as f64;
    (loss, per_row.into_iter().map(|p| p.1).collect())
}

/// dz = (softmax(z) − onehot(label)) · g / rows.
pub fn backward<F: Float>(z: &[F], labels: &[usize], lse: &[F], g: f64, cols: usize) -> Vec<F> {
    let rows = labels.len();
    let scale = F::from_f(g / rows.max(1) as f64);
    let mut dz = vec![F::zero(); z.len()];
    if cols == 0 {
        return dz;
    }
    dz.par_chunks_mut(cols).enumerate().for_each(|(r, d)| {
        for c in 0..cols {
            let p = (z[r * cols + c] - lse[r]).exp();
            let t = if c == labels[r] { F::one() } else { F::zero() };
            d[c] = (p - t) * scale;
        }
    });
    dz
}
