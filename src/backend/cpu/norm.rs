//! LayerNorm, softmax and L2 normalisation over the last dimension.
use rayon::prelude::*;

use super::RED_CHUNK;
use crate::Float;

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

#[allow(clippy::too_many_arguments)]
pub fn layer_norm_bwd<F: Float>(
    x: &[F],
    g: &[F],
    mean: &[F],
    rstd: &[F],
    dy: &[F],
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

/// Softmax of one row in place, max-subtracted. Returns the log-sum-exp.
pub fn softmax_row<F: Float>(row: &mut [F]) -> F {
    let m = row.iter().copied().fold(F::neg_infinity(), F::max);
    if m == F::neg_infinity() {
        // Fully masked row: defined as all zeros.
        row.iter_mut().for_each(|v| *v = F::zero());
        return F::neg_infinity();
    }
    let s = F::exp_shift_sum(row, m);
    let inv = F::one() / s;
    row.iter_mut().for_each(|v| *v *= inv);
    m + s.ln()
}
