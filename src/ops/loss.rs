//! Losses computed in one op each: cross-entropy from logits (L_C) and the sigmoid contrastive
//! loss of SD2's dual vision-language contrast (L_D, SD2-SPEC §4). Results are 0-d tensors in
//! fp32 (f64 for f64 inputs).
use super::{check_float, check_ids, check_same_dtype, record_fn};
use crate::{DType, Result, Tensor};

fn stat_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Mean cross-entropy of logits [N, C] against class ids [N] (i64 or u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let op = "cross_entropy";
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
    let (loss, lse) = logits
        .storage()
        .cross_entropy(&labels.storage(), rows, cols)?;
    let (z, y) = (logits.clone(), labels.clone());
    let sd = stat_dtype(logits);
    record_fn(
        op,
        loss,
        crate::Shape::scalar(),
        &[logits],
        move |_: &Tensor| {
            move |g: &Tensor, _: &[bool]| {
                let g = g.to_dtype(sd)?;
                let dz =
                    z.storage()
                        .cross_entropy_bwd(&y.storage(), &lse, &g.storage(), rows, cols)?;
                Ok(vec![Some(Tensor::from_storage(dz, z.shape().clone())?)])
            }
        },
    )
}

/// `L = −(1/n) Σ_i Σ_j log σ(z_ij·(t·⟨f_i, d_j⟩ + b))`, z_ii = +1, z_ij = −1 otherwise, for
/// f, d [n, dim] (normalise them first) and scalar t, b (0-d or [1]). Computed in f64 inside
/// with `log σ(x) = −softplus(−x)`: no overflow for extreme logits. Gradients to f, d, t, b.
pub fn sigmoid_loss(f: &Tensor, d: &Tensor, t: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = "sigmoid_loss";
    check_float(op, f)?;
    check_same_dtype(op, f, d)?;
    if f.rank() != 2 || f.dims() != d.dims() || t.elem_count() != 1 || b.elem_count() != 1 {
        return Err(crate::shape_err!(
            op,
            "f {:?}, d {:?}, t {:?}, b {:?}",
            f.dims(),
            d.dims(),
            t.dims(),
            b.dims()
        ));
    }
    let (n, dim) = (f.dims()[0], f.dims()[1]);
    let loss = f
        .storage()
        .sigmoid_loss(&d.storage(), &t.storage(), &b.storage(), n, dim)?;
    let (fc, dc, tc, bc) = (f.clone(), d.clone(), t.clone(), b.clone());
    record_fn(
        op,
        loss,
        crate::Shape::scalar(),
        &[f, d, t, b],
        move |_: &Tensor| {
            move |g: &Tensor, needs: &[bool]| {
                let (df, dd, dt, db) = fc.storage().sigmoid_loss_bwd(
                    &dc.storage(),
                    &tc.storage(),
                    &bc.storage(),
                    &g.storage(),
                    n,
                    dim,
                )?;
                let w = |s, like: &Tensor, need: bool| -> Result<Option<Tensor>> {
                    if need {
                        Ok(Some(Tensor::from_storage(s, like.shape().clone())?))
                    } else {
                        Ok(None)
                    }
                };
                Ok(vec![
                    w(df, &fc, needs[0])?,
                    w(dd, &dc, needs[1])?,
                    w(dt, &tc, needs[2])?,
                    w(db, &bc, needs[3])?,
                ])
            }
        },
    )
}
