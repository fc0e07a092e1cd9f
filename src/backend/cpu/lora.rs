//! (LoRA-)linear: y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ. The reference of the fused LoRA GEMM kernel.
use rayon::prelude::*;

use super::gemm::{gemm_into, Mat};
use super::CpuStorage;
use crate::backend::{BackendStorage, LinearGrads, LinearNeeds, LinearSpec, LoraSpec};
use crate::rng::dropout_keep;
use crate::{Error, Float, Result, Shape};

pub fn check(
    x: &CpuStorage,
    w: &CpuStorage,
    b: Option<&CpuStorage>,
    lora: Option<(&CpuStorage, &CpuStorage, usize)>,
    s: LinearSpec,
) -> Result<()> {
    let bad = |what: &str, got: usize, want: usize| {
        Err(Error::shape(
            "lora_linear",
            format!(
                "{what} has {got} elements, expected {want} (m={}, n={}, k={})",
                s.m, s.n, s.k
            ),
        ))
    };
    if x.len() != s.m * s.k {
        return bad("x", x.len(), s.m * s.k);
    }
    if w.len() != s.n * s.k {
        return bad("weight", w.len(), s.n * s.k);
    }
    if let Some(b) = b {
        if b.len() != s.n {
            return bad("bias", b.len(), s.n);
        }
    }
    if let Some((a, bm, r)) = lora {
        if a.len() != r * s.k {
            return bad("lora_A", a.len(), r * s.k);
        }
        if bm.len() != s.n * r {
            return bad("lora_B", bm.len(), s.n * r);
        }
    }
    Ok(())
}

/// drop(x) with inverted scaling; None when dropout is off (use x itself).
fn dropped<F: Float>(x: &[F], l: &LoraSpec) -> Option<Vec<F>> {
    if l.dropout <= 0.0 {
        return None;
    }
    let keep = F::from_f(1.0 / (1.0 - l.dropout as f64));
    let mut out = vec![F::zero(); x.len()];
    out.par_chunks_mut(1 << 14).enumerate().for_each(|(c, o)| {
        let base = c << 14;
        for (i, o) in o.iter_mut().enumerate() {
            let j = base + i;
            if dropout_keep(l.seed, j as u64, l.dropout) {
                *o = x[j] * keep;
            }
        }
    });
    Some(out)
}

type Lora<'a, F> = (&'a [F], &'a [F], LoraSpec);

pub fn forward<F: Float>(
    x: &[F],
    w: &[F],
    b: Option<&[F]>,
    lora: Option<Lora<'_, F>>,
    s: LinearSpec,
) -> (Vec<F>, Option<Vec<F>>) {
    let (m, n, k) = (s.m, s.n, s.k);
    let mut y = vec![F::zero(); m * n];
    if let Some(b) = b {
        if n > 0 {
            y.par_chunks_mut(n).for_each(|r| r.copy_from_slice(b));
        }
    }
    gemm_into(
        m,
        n,
        k,
        Mat::rm(x, k, false),
        Mat::rm(w, k, true),
        &mut y,
        0,
        n,
        F::one(),
        b.is_some(),
        true,
    );
    let low = lora.map(|(a, bm, l)| {
        let r = l.rank;
        let xd = dropped(x, &l);
        let xs = xd.as_deref().unwrap_or(x);
        let mut sm = vec![F::zero(); m * r];
        gemm_into(
            m,
            r,
            k,
            Mat::rm(xs, k, false),
            Mat::rm(a, k, true),
            &mut sm,
            0,
            r,
            F::one(),
            false,
            true,
        );
        gemm_into(
            m,
            n,
            r,
            Mat::rm(&sm, r, false),
            Mat::rm(bm, r, true),
            &mut y,
            0,
            n,
            F::from_f(l.scale),
            true,
            true,
        );
        sm
    });
    (y, low)
}

type LoraSaved<'a, F> = (&'a [F], &'a [F], &'a [F], LoraSpec);

pub fn backward<F: Float>(
    x: &[F],
    w: &[F],
    lora: Option<LoraSaved<'_, F>>,
    dy: &[F],
    s: LinearSpec,
    needs: LinearNeeds,
) -> LinearGrads<Vec<F>> {
    let (m, n, k) = (s.m, s.n, s.k);
    let dym = Mat::rm(dy, n, false);
    let mut g = LinearGrads {
        x: None,
        w: None,
        b: None,
        lora_a: None,
        lora_b: None,
    };
    if needs.w {
        let mut dw = vec![F::zero(); n * k];
        gemm_into(
            n,
            k,
            m,
            dym.t(),
            Mat::rm(x, k, false),
            &mut dw,
            0,
            k,
            F::one(),
            false,
            true,
        );
        g.w = Some(dw);
    }
    if needs.b {
        g.b = Some(super::elementwise::sum_to(
            dy,
            &Shape::from([m, n]),
            &Shape::from(n),
        ));
    }
    let mut dx = needs.x.then(|| {
        let mut dx = vec![F::zero(); m * k];
        gemm_into(
            m,
            k,
            n,
            dym,
            Mat::rm(w, k, false),
            &mut dx,
            0,
            k,
            F::one(),
            false,
            true,
        );
        dx
    });
    if let Some((a, bm, sm, l)) = lora {
        let r = l.rank;
        let sc = F::from_f(l.scale);
        if needs.lora_b {
            // dB = s·dYᵀ·S, [n, r].
            let mut db = vec![F::zero(); n * r];
            gemm_into(
                n,
                r,
                m,
                dym.t(),
                Mat::rm(sm, r, false),
                &mut db,
                0,
                r,
                sc,
                false,
                true,
            );
            g.lora_b = Some(db);
        }
        if needs.lora_a || needs.x {
            // dS = s·dY·B, [m, r].
            let mut ds = vec![F::zero(); m * r];
            gemm_into(
                m,
                r,
                n,
                dym,
                Mat::rm(bm, r, false),
                &mut ds,
                0,
                r,
                sc,
                false,
                true,
            );
            if needs.lora_a {
                let xd = dropped(x, &l);
                let xs = xd.as_deref().unwrap_or(x);
                let mut da = vec![F::zero(); r * k];
                gemm_into(
                    r,
                    k,
                    m,
                    Mat::rm(&ds, r, true),
                    Mat::rm(xs, k, false),
                    &mut da,
                    0,
                    k,
                    F::one(),
                    false,
                    true,
                );
                g.lora_a = Some(da);
            }
            if let Some(dx) = dx.as_mut() {
                // dx += drop_bwd(dS·A): the same mask and scaling as the forward.
                let mut dxl = vec![F::zero(); m * k];
                gemm_into(
                    m,
                    k,
                    r,
                    Mat::rm(&ds, r, false),
                    Mat::rm(a, k, false),
                    &mut dxl,
                    0,
                    k,
                    F::one(),
                    false,
                    true,
                );
                let dxl = dropped(&dxl, &l).unwrap_or(dxl);
                dx.par_chunks_mut(1 << 14)
                    .zip(dxl.par_chunks(1 << 14))
                    .for_each(|(d, v)| d.iter_mut().zip(v).for_each(|(d, v)| *d += *v));
            }
        }
    }
    g.x = dx.take();
    g
}
