//! Cross-entropy from logits and the sigmoid (SigLIP) contrastive loss, in the float type of the
//! inputs with f64 scalar results.
use rayon::prelude::*;

use super::norm::softmax_row;
use crate::Float;

/// Mean cross-entropy and per-row log-sum-exp.
pub fn cross_entropy<F: Float>(z: &[F], labels: &[usize], cols: usize) -> (f64, Vec<F>) {
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

pub fn cross_entropy_bwd<F: Float>(
    z: &[F],
    labels: &[usize],
    lse: &[F],
    g: f64,
    cols: usize,
) -> Vec<F> {
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

/// log(1 + e^x) without overflow.
#[inline]
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Pairwise dot products ⟨f_i, d_j⟩ as an [n, n] matrix (f64 accumulation).
fn dots<F: Float>(f: &[F], d: &[F], n: usize, dim: usize) -> Vec<f64> {
    (0..n * n)
        .into_par_iter()
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            f[i * dim..(i + 1) * dim]
                .iter()
                .zip(&d[j * dim..(j + 1) * dim])
                .map(|(a, b)| a.f64() * b.f64())
                .sum()
        })
        .collect()
}

/// L = −(1/n) Σ_ij log σ(z_ij (t⟨f_i, d_j⟩ + b)), z_ii = 1, z_ij = −1 (i ≠ j).
pub fn sigmoid_loss<F: Float>(f: &[F], d: &[F], t: f64, b: f64, n: usize, dim: usize) -> f64 {
    let s = dots(f, d, n, dim);
    let mut total = 0.0;
    for i in 0..n {
        for j in 0..n {
            let z = if i == j { 1.0 } else { -1.0 };
            total += softplus(-z * (t * s[i * n + j] + b));
        }
    }
    total / n.max(1) as f64
}

/// Returns (df, dd, dt, db) scaled by the upstream gradient g.
pub fn sigmoid_loss_bwd<F: Float>(
    f: &[F],
    d: &[F],
    t: f64,
    b: f64,
    g: f64,
    n: usize,
    dim: usize,
) -> (Vec<F>, Vec<F>, f64, f64) {
    let s = dots(f, d, n, dim);
    // dL/dx_ij = −z σ(−z x) / n; σ(−zx) = 1/(1 + e^{zx}) saturates to 0 or 1 without NaN.
    let gx: Vec<f64> = (0..n * n)
        .map(|ij| {
            let z = if ij / n == ij % n { 1.0 } else { -1.0 };
            let x = t * s[ij] + b;
            -z / (1.0 + (z * x).exp()) * g / n.max(1) as f64
        })
        .collect();
    let dt: f64 = gx.iter().zip(&s).map(|(a, b)| a * b).sum();
    let db: f64 = gx.iter().sum();
    let mut df = vec![F::zero(); n * dim];
    let mut dd = vec![F::zero(); n * dim];
    df.par_chunks_mut(dim.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            for (k, v) in row.iter_mut().enumerate() {
                *v = F::from_f(
                    t * (0..n)
                        .map(|j| gx[i * n + j] * d[j * dim + k].f64())
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
                        .map(|i| gx[i * n + j] * f[i * dim + k].f64())
                        .sum::<f64>(),
                );
            }
        });
    (df, dd, dt, db)
}
