//! LayerNorm over the last dim (softmax and L2 normalisation: `ops::fused`).
use super::{check_float, check_same_dtype, record_fn};
use crate::{Result, Tensor};

impl Tensor {
    /// LayerNorm over the last dim with affine `gamma`, `beta` ([dim]).
    pub fn layer_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        let op = "layer_norm";
        check_float(op, self)?;
        check_same_dtype(op, self, gamma)?;
        check_same_dtype(op, self, beta)?;
        let cols = self.shape().last();
        if gamma.dims() != [cols] || beta.dims() != [cols] {
            return Err(crate::shape_err!(
                op,
                "x {:?} with gamma {:?} and beta {:?}",
                self.dims(),
                gamma.dims(),
                beta.dims()
            ));
        }
        let (y, mean, rstd) =
            self.storage()
                .layer_norm(&gamma.storage(), &beta.storage(), cols, eps)?;
        let (x, g) = (self.clone(), gamma.clone());
        let beta_shape = beta.shape().clone();
        record_fn(
            op,
            y,
            self.shape().clone(),
            &[self, gamma, beta],
            move |_: &Tensor| {
                move |dy: &Tensor, needs: &[bool]| {
                    let (dx, dg, db) = x.storage().layer_norm_bwd(
                        &g.storage(),
                        &mean,
                        &rstd,
                        &dy.storage(),
                        cols,
                        needs[0],
                        needs[1] || needs[2],
                    )?;
                    let dx = dx
                        .map(|s| Tensor::from_storage(s, x.shape().clone()))
                        .transpose()?;
                    let dg = if needs[1] {
                        dg.map(|s| Tensor::from_storage(s, g.shape().clone()))
                            .transpose()?
                    } else {
                        None
                    };
                    let db = if needs[2] {
                        db.map(|s| Tensor::from_storage(s, beta_shape))
                            .transpose()?
                    } else {
                        None
                    };
                    Ok(vec![dx, dg, db])
                }
            },
        )
    }
}
