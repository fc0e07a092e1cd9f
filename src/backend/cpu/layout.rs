//! Data movement: broadcast, permute, block copies and row gathers.
use rayon::prelude::*;

use super::elementwise::bcast_strides;
use crate::{Float, Shape};

pub fn broadcast_to<T: Copy + Send + Sync>(x: &[T], src: &Shape, dst: &Shape) -> Vec<T> {
    let st = bcast_strides(src, dst);
    let dims = dst.dims();
    (0..dst.elem_count())
        .into_par_iter()
        .map(|mut j| {
            let mut off = 0;
            for d in (0..dims.len()).rev() {
                off += (j % dims[d]) * st[d];
                j /= dims[d];
            }
            x[off]
        })
        .collect()
}

/// out = x.permute(perm) made contiguous; out dim i is input dim perm[i].
pub fn permute<T: Copy + Send + Sync + Default>(x: &[T], shape: &Shape, perm: &[usize]) -> Vec<T> {
    let in_st = shape.strides();
    let out_dims: Vec<usize> = perm.iter().map(|p| shape.dims()[*p]).collect();
    let st: Vec<usize> = perm.iter().map(|p| in_st[*p]).collect();
    let r = out_dims.len();
    let mut out = vec![T::default(); x.len()];
    if r == 0 || x.is_empty() {
        out.copy_from_slice(x);
        return out;
    }
    // Rows of the output's last dim, each gathered with a fixed input stride.
    let last = out_dims[r - 1];
    let last_st = st[r - 1];
    out.par_chunks_mut(last).enumerate().for_each(|(row, o)| {
        let mut idx = row;
        let mut off = 0;
        for d in (0..r - 1).rev() {
            off += (idx % out_dims[d]) * st[d];
            idx /= out_dims[d];
        }
        for (i, o) in o.iter_mut().enumerate() {
            *o = x[off + i * last_st];
        }
    });
    out
}

#[allow(clippy::too_many_arguments)]
pub fn copy2d<T: Copy>(
    s: &[T],
    d: &mut [T],
    rows: usize,
    cols: usize,
    ss: usize,
    ds: usize,
    so: usize,
    dof: usize,
) {
    for r in 0..rows {
        d[dof + r * ds..dof + r * ds + cols].copy_from_slice(&s[so + r * ss..so + r * ss + cols]);
    }
}

pub fn index_rows<T: Copy + Send + Sync + Default>(x: &[T], ids: &[usize], cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); ids.len() * cols];
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols)
        .zip(ids.par_iter())
        .for_each(|(o, id)| o.copy_from_slice(&x[id * cols..(id + 1) * cols]));
    out
}

/// out[ids[i], :] = add(out[ids[i], :], g[i, :]) in id order (the rows of a gradient added into
/// one that exists; few rows, so sequential).
pub fn index_add_rows_into<T: Copy>(
    g: &[T],
    ids: &[usize],
    out: &mut [T],
    cols: usize,
    add: impl Fn(T, T) -> T,
) {
    for (i, id) in ids.iter().enumerate() {
        let o = &mut out[id * cols..(id + 1) * cols];
        o.iter_mut()
            .zip(&g[i * cols..(i + 1) * cols])
            .for_each(|(o, v)| *o = add(*o, *v));
    }
}

/// Scatter-add of rows. Parallel over column blocks, so each output element is summed by one
/// thread in id order (deterministic).
pub fn index_add_rows<F: Float>(g: &[F], ids: &[usize], rows: usize, cols: usize) -> Vec<F> {
    let mut out = vec![F::zero(); rows * cols];
    if cols == 0 {
        return out;
    }
    const CB: usize = 64;
    let blocks = cols.div_ceil(CB);
    let parts: Vec<(usize, Vec<F>)> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let (c0, c1) = (b * CB, ((b + 1) * CB).min(cols));
            let w = c1 - c0;
            let mut acc = vec![F::zero(); rows * w];
            for (i, id) in ids.iter().enumerate() {
                let src = &g[i * cols + c0..i * cols + c1];
                acc[id * w..(id + 1) * w]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(a, v)| *a += *v);
            }
            (b, acc)
        })
        .collect();
    for (b, acc) in parts {
        let (c0, c1) = (b * CB, ((b + 1) * CB).min(cols));
        let w = c1 - c0;
        for r in 0..rows {
            out[r * cols + c0..r * cols + c1].copy_from_slice(&acc[r * w..(r + 1) * w]);
        }
    }
    out
}
