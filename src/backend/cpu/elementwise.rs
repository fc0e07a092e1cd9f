//! Elementwise maps, broadcasting binary ops and broadcast reductions.
use rayon::prelude::*;

use super::RED_CHUNK;
use crate::backend::{BinaryOp, UnaryOp};
use crate::{Float, Shape};

/// Elements per rayon task for elementwise maps.
const EW_CHUNK: usize = 1 << 14;

#[inline]
fn sigmoid<F: Float>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

#[inline]
fn apply<F: Float>(x: F, op: UnaryOp) -> F {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqr => x * x,
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::QuickGelu => x * sigmoid(F::from_f(1.702) * x),
        UnaryOp::Sigmoid => sigmoid(x),
    }
}

pub fn unary<F: Float>(x: &[F], op: UnaryOp) -> Vec<F> {
    let mut out = vec![F::zero(); x.len()];
    out.par_chunks_mut(EW_CHUNK)
        .zip(x.par_chunks(EW_CHUNK))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o = apply(*x, op)));
    out
}

#[inline]
fn deriv<F: Float>(x: F, y: F, op: UnaryOp) -> F {
    match op {
        UnaryOp::Neg => -F::one(),
        UnaryOp::Exp => y,
        UnaryOp::Log => F::one() / x,
        UnaryOp::Sqr => F::from_f(2.0) * x,
        UnaryOp::Sqrt => F::from_f(0.5) / y,
        UnaryOp::QuickGelu => {
            let a = F::from_f(1.702);
            let s = sigmoid(a * x);
            s + a * x * s * (F::one() - s)
        }
        UnaryOp::Sigmoid => y * (F::one() - y),
    }
}

pub fn unary_bwd<F: Float>(x: &[F], y: &[F], dy: &[F], op: UnaryOp) -> Vec<F> {
    let mut out = vec![F::zero(); x.len()];
    out.par_chunks_mut(EW_CHUNK).enumerate().for_each(|(c, o)| {
        let base = c * EW_CHUNK;
        for (i, o) in o.iter_mut().enumerate() {
            let j = base + i;
            // Ops whose derivative does not need y accept an empty y.
            let yj = if y.is_empty() { F::zero() } else { y[j] };
            *o = dy[j] * deriv(x[j], yj, op);
        }
    });
    out
}

pub fn affine<F: Float>(x: &[F], mul: f64, add: f64) -> Vec<F> {
    let (m, a) = (F::from_f(mul), F::from_f(add));
    let mut out = vec![F::zero(); x.len()];
    out.par_chunks_mut(EW_CHUNK)
        .zip(x.par_chunks(EW_CHUNK))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o = *x * m + a));
    out
}

#[inline]
fn bin<F: Float>(a: F, b: F, op: BinaryOp) -> F {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
    }
}

/// Strides of `s` right-aligned into rank `r`, 0 on broadcast dims.
pub(crate) fn bcast_strides(s: &Shape, out: &Shape) -> Vec<usize> {
    let r = out.rank();
    let st = s.strides();
    let mut res = vec![0; r];
    for (i, (d, stride)) in s.dims().iter().zip(&st).enumerate() {
        let oi = i + r - s.rank();
        if *d == out.dims()[oi] && *d != 1 {
            res[oi] = *stride;
        }
    }
    res
}

/// How `s` maps into `out`: the identity, a repeated suffix (bias, positions), or general.
enum Bcast {
    Same,
    Suffix(usize),
    General(Vec<usize>),
}

fn classify(s: &Shape, out: &Shape) -> Bcast {
    let n = s.elem_count();
    if n == out.elem_count() {
        return Bcast::Same;
    }
    // `s` (minus leading ones) equals the trailing dims of `out`.
    let sd: Vec<usize> = s.dims().iter().copied().skip_while(|d| *d == 1).collect();
    let od = out.dims();
    if sd.len() <= od.len() && od[od.len() - sd.len()..] == sd[..] && n > 0 {
        return Bcast::Suffix(n);
    }
    Bcast::General(bcast_strides(s, out))
}

#[inline]
fn offset(mut idx: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for d in (0..dims.len()).rev() {
        off += (idx % dims[d]) * strides[d];
        idx /= dims[d];
    }
    off
}

pub fn binary<F: Float>(
    a: &[F],
    b: &[F],
    op: BinaryOp,
    ls: &Shape,
    rs: &Shape,
    os: &Shape,
) -> Vec<F> {
    let n = os.elem_count();
    let mut out = vec![F::zero(); n];
    let (ca, cb) = (classify(ls, os), classify(rs, os));
    let dims = os.dims();
    out.par_chunks_mut(EW_CHUNK).enumerate().for_each(|(c, o)| {
        let base = c * EW_CHUNK;
        for (i, o) in o.iter_mut().enumerate() {
            let j = base + i;
            let x = match &ca {
                Bcast::Same => a[j],
                Bcast::Suffix(m) => a[j % m],
                Bcast::General(st) => a[offset(j, dims, st)],
            };
            let y = match &cb {
                Bcast::Same => b[j],
                Bcast::Suffix(m) => b[j % m],
                Bcast::General(st) => b[offset(j, dims, st)],
            };
            *o = bin(x, y, op);
        }
    });
    out
}

pub fn add_assign<F: Float>(a: &mut [F], b: &[F]) {
    a.par_chunks_mut(EW_CHUNK)
        .zip(b.par_chunks(EW_CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += *b));
}

/// Sums `x` (shape `src`) over the dims where `dst` is broadcast, giving `dst`'s elements.
pub fn sum_to<F: Float>(x: &[F], src: &Shape, dst: &Shape) -> Vec<F> {
    let n = dst.elem_count();
    match classify(dst, src) {
        Bcast::Same => x.to_vec(),
        Bcast::Suffix(m) => {
            // Leading dims reduced (bias, positions): fixed chunks of rows, partials summed in order.
            let rows = x.len() / m;
            let chunk = RED_CHUNK.max(1);
            let partials: Vec<Vec<F>> = (0..rows.div_ceil(chunk))
                .into_par_iter()
                .map(|c| {
                    let mut acc = vec![F::zero(); m];
                    for r in c * chunk..((c + 1) * chunk).min(rows) {
                        acc.iter_mut()
                            .zip(&x[r * m..(r + 1) * m])
                            .for_each(|(a, v)| *a += *v);
                    }
                    acc
                })
                .collect();
            let mut out = vec![F::zero(); m];
            for p in partials {
                out.iter_mut().zip(p).for_each(|(o, p)| *o += p);
            }
            out
        }
        Bcast::General(st) => {
            let mut out = vec![F::zero(); n];
            let dims = src.dims();
            for (j, v) in x.iter().enumerate() {
                out[offset(j, dims, &st)] += *v;
            }
            out
        }
    }
}
