//! Multi-head scaled dot-product attention, the CPU reference of the flash-attention kernel:
//! the forward saves only the per-row log-sum-exp, and the backward recomputes the
//! probabilities from it. One rayon task per (batch, head); the products go through gemm with
//! strided views, so heads are never copied out of the [batch, len, heads·head_dim] layout.
use rayon::prelude::*;

use super::gemm::{gemm_into, Mat};
use super::norm::softmax_row;
use crate::backend::AttnSpec;
use crate::Float;

struct Head<'a, F> {
    q: Mat<'a, F>,
    k: Mat<'a, F>,
    v: Mat<'a, F>,
}

fn head<'a, F>(q: &'a [F], k: &'a [F], v: &'a [F], s: &AttnSpec, bh: usize) -> Head<'a, F> {
    let (b, h) = (bh / s.heads, bh % s.heads);
    let hd = s.heads * s.head_dim;
    let qo = b * s.q_len * hd + h * s.head_dim;
    let ko = b * s.kv_len * hd + h * s.head_dim;
    let m = |d: &'a [F], off| Mat {
        data: d,
        off,
        rs: hd,
        cs: 1,
    };
    Head {
        q: m(q, qo),
        k: m(k, ko),
        v: m(v, ko),
    }
}

/// Is key j hidden from query i?
#[inline]
fn masked(s: &AttnSpec, i: usize, j: usize) -> bool {
    s.causal && j + s.q_len > i + s.kv_len
}

/// scale·Q·Kᵀ with the causal mask applied, [q_len, kv_len].
fn scores<F: Float>(hd: &Head<'_, F>, s: &AttnSpec) -> Vec<F> {
    let (n, m) = (s.q_len, s.kv_len);
    let mut sc = vec![F::zero(); n * m];
    gemm_into(
        n,
        m,
        s.head_dim,
        hd.q,
        hd.k.t(),
        &mut sc,
        0,
        m,
        F::from_f(s.scale),
        false,
        false,
    );
    if s.causal {
        for i in 0..n {
            for j in 0..m {
                if masked(s, i, j) {
                    sc[i * m + j] = F::neg_infinity();
                }
            }
        }
    }
    sc
}

/// Writes a head-local [len, head_dim] block back into the [batch, len, heads·head_dim] layout.
fn scatter<F: Float>(dst: &mut [F], blocks: Vec<Vec<F>>, len: usize, s: &AttnSpec) {
    let hd = s.heads * s.head_dim;
    for (bh, blk) in blocks.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for i in 0..len {
            let o = b * len * hd + i * hd + h * s.head_dim;
            dst[o..o + s.head_dim].copy_from_slice(&blk[i * s.head_dim..(i + 1) * s.head_dim]);
        }
    }
}

pub fn forward<F: Float>(q: &[F], k: &[F], v: &[F], s: AttnSpec) -> (Vec<F>, Vec<F>) {
    let (n, m, d) = (s.q_len, s.kv_len, s.head_dim);
    let per_head: Vec<(Vec<F>, Vec<F>)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let hd = head(q, k, v, &s, bh);
            let mut p = scores(&hd, &s);
            let lse: Vec<F> = p
                .chunks_mut(m.max(1))
                .take(n)
                .map(|r| softmax_row(r))
                .collect();
            let mut o = vec![F::zero(); n * d];
            gemm_into(
                n,
                d,
                m,
                Mat::rm(&p, m, false),
                hd.v,
                &mut o,
                0,
                d,
                F::one(),
                false,
                false,
            );
            (o, lse)
        })
        .collect();
    let mut out = vec![F::zero(); q.len()];
    let mut lse = Vec::with_capacity(s.batch * s.heads * n);
    let mut blocks = Vec::with_capacity(per_head.len());
    for (o, l) in per_head {
        blocks.push(o);
        lse.extend(l);
    }
    scatter(&mut out, blocks, n, &s);
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
pub fn backward<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    o: &[F],
    lse: &[F],
    d_o: &[F],
    s: AttnSpec,
) -> (Vec<F>, Vec<F>, Vec<F>) {
    let (n, m, d) = (s.q_len, s.kv_len, s.head_dim);
    let hdim = s.heads * d;
    let per_head: Vec<(Vec<F>, Vec<F>, Vec<F>)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let hd = head(q, k, v, &s, bh);
            let od = Mat {
                data: d_o,
                off: hd.q.off,
                rs: hdim,
                cs: 1,
            };
            // P recomputed from the saved log-sum-exp.
            let mut p = scores(&hd, &s);
            for i in 0..n {
                let l = lse[bh * n + i];
                let row = &mut p[i * m..(i + 1) * m];
                if l == F::neg_infinity() {
                    row.iter_mut().for_each(|x| *x = F::zero());
                } else {
                    F::exp_shift_sum(row, l);
                }
            }
            let mut dv = vec![F::zero(); m * d];
            gemm_into(
                m,
                d,
                n,
                Mat::rm(&p, m, true),
                od,
                &mut dv,
                0,
                d,
                F::one(),
                false,
                false,
            );
            let mut dp = vec![F::zero(); n * m];
            gemm_into(n, m, d, od, hd.v.t(), &mut dp, 0, m, F::one(), false, false);
            // dS = P ∘ (dP − rowsum(dO ∘ O)).
            for i in 0..n {
                let off = hd.q.off + i * hdim;
                let di: F = (0..d).map(|c| d_o[off + c] * o[off + c]).sum();
                for j in 0..m {
                    dp[i * m + j] = p[i * m + j] * (dp[i * m + j] - di);
                }
            }
            let sc = F::from_f(s.scale);
            let mut dq = vec![F::zero(); n * d];
            gemm_into(
                n,
                d,
                m,
                Mat::rm(&dp, m, false),
                hd.k,
                &mut dq,
                0,
                d,
                sc,
                false,
                false,
            );
            let mut dk = vec![F::zero(); m * d];
            gemm_into(
                m,
                d,
                n,
                Mat::rm(&dp, m, true),
                hd.q,
                &mut dk,
                0,
                d,
                sc,
                false,
                false,
            );
            (dq, dk, dv)
        })
        .collect();
    let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
    for (a, b, c) in per_head {
        dqs.push(a);
        dks.push(b);
        dvs.push(c);
    }
    let mut dq = vec![F::zero(); q.len()];
    let mut dk = vec![F::zero(); k.len()];
    let mut dv = vec![F::zero(); v.len()];
    scatter(&mut dq, dqs, n, &s);
    scatter(&mut dk, dks, m, &s);
    scatter(&mut dv, dvs, m, &s);
    (dq, dk, dv)
}
