//! Row primitives the CPU backend shares (softmax of a row, also used by attention and the
//! losses); the fused norms themselves live in `ops::fused`.
use crate::Float;

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
