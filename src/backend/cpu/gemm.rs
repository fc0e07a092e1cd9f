//! Matrix products on the CPU through the `gemm` crate (packed, SIMD, rayon-parallel). Strides
//! express transposes and head slices directly, so no operand is ever copied to transpose it.
use rayon::prelude::*;

use crate::backend::MatmulSpec;
use crate::Float;

/// A read-only matrix view: element (i, j) is at `data[off + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, F> {
    /// The buffer the matrix lies in (may hold other data before and after it).
    pub data: &'a [F],
    /// Index in `data` of element (0, 0).
    pub off: usize,
    /// Row stride in elements: distance between (i, j) and (i + 1, j).
    pub rs: usize,
    /// Column stride in elements: distance between (i, j) and (i, j + 1).
    pub cs: usize,
}

impl<'a, F> Mat<'a, F> {
    /// A row-major [rows, cols] matrix (`trans` views it transposed).
    pub fn rm(data: &'a [F], cols: usize, trans: bool) -> Self {
        if trans {
            Mat {
                data,
                off: 0,
                rs: 1,
                cs: cols,
            }
        } else {
            Mat {
                data,
                off: 0,
                rs: cols,
                cs: 1,
            }
        }
    }

    /// The same view with its origin moved `off` elements further into `data` (the next matrix of
    /// a batch, a head's columns).
    pub fn at(self, off: usize) -> Self {
        Mat {
            off: self.off + off,
            ..self
        }
    }

    /// The transposed view: row and column strides swapped, no data moved.
    pub fn t(self) -> Self {
        Mat {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `C = alpha·A·B (+ C when accumulate)` with A [m, k], B [k, n]; C row stride `c_rs`, starting
/// at `c[c_off]`. `parallel` lets the gemm crate split the work over rayon threads.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into<F: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_, F>,
    b: Mat<'_, F>,
    c: &mut [F],
    c_off: usize,
    c_rs: usize,
    alpha: F,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c_off + (m - 1) * c_rs + n <= c.len(),
        "gemm_into: C out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[c_off + i * c_rs..c_off + i * c_rs + n].fill(F::zero());
            }
        }
        return;
    }
    let last = |x: Mat<'_, F>, r: usize, cl: usize| x.off + (r - 1) * x.rs + (cl - 1) * x.cs;
    assert!(last(a, m, k) < a.data.len(), "gemm_into: A out of bounds");
    assert!(last(b, k, n) < b.data.len(), "gemm_into: B out of bounds");
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every accessed element inside the slices; C is borrowed
    // mutably and does not alias A or B.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(c_off),
            1,
            c_rs as isize,
            accumulate,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            F::one(),
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Work (m·n·k) below which a product runs on one thread.
const SMALL: usize = 1 << 18;

/// Batched `C[b] = op(A[b])·op(B[b])` as described by `MatmulSpec`.
pub fn matmul<F: Float>(a: &[F], b: &[F], s: MatmulSpec) -> Vec<F> {
    let mut c = vec![F::zero(); s.batch * s.m * s.n];
    let am = Mat::rm(a, if s.trans_a { s.m } else { s.k }, s.trans_a);
    let bm = Mat::rm(b, if s.trans_b { s.k } else { s.n }, s.trans_b);
    let b_step = if s.rhs_batched { s.k * s.n } else { 0 };
    let one = |bi: usize, c: &mut [F], par: bool| {
        gemm_into(
            s.m,
            s.n,
            s.k,
            am.at(bi * s.m * s.k),
            bm.at(bi * b_step),
            c,
            0,
            s.n,
            F::one(),
            false,
            par,
        )
    };
    if s.batch > 1 && s.m * s.n * s.k < SMALL {
        c.par_chunks_mut((s.m * s.n).max(1))
            .enumerate()
            .for_each(|(bi, c)| one(bi, c, false));
    } else {
        for (bi, c) in c.chunks_mut((s.m * s.n).max(1)).enumerate() {
            one(bi, c, true);
        }
    }
    c
}
