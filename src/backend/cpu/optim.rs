//! AdamW and the squared norm used for gradient clipping.
use rayon::prelude::*;

use super::RED_CHUNK;
use crate::backend::AdamWStep;
use crate::Float;

/// Decoupled-weight-decay Adam: p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps).
pub fn adamw<F: Float>(p: &mut [F], g: &[F], m: &mut [F], v: &mut [F], s: AdamWStep) {
    let (b1, b2) = (s.beta1, s.beta2);
    p.par_chunks_mut(4096)
        .zip(g.par_chunks(4096))
        .zip(m.par_chunks_mut(4096).zip(v.par_chunks_mut(4096)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let gi = g[i].f64() * s.grad_scale;
                let mi = b1 * m[i].f64() + (1.0 - b1) * gi;
                let vi = b2 * v[i].f64() + (1.0 - b2) * gi * gi;
                let update = (mi / s.bias1) / ((vi / s.bias2).sqrt() + s.eps);
                let pi = p[i].f64() * (1.0 - s.lr * s.weight_decay) - s.lr * update;
                m[i] = F::from_f(mi);
                v[i] = F::from_f(vi);
                p[i] = F::from_f(pi);
            }
        });
}

/// Σ x² accumulated in f64 over fixed chunks (thread-count independent).
pub fn sum_sq<F: Float>(x: &[F]) -> f64 {
    let chunk = RED_CHUNK * 1024;
    let parts: Vec<f64> = x
        .par_chunks(chunk)
        .map(|c| c.iter().map(|v| v.f64() * v.f64()).sum())
        .collect();
    parts.iter().sum()
}
