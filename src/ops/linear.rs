//! Matrix products: batched matmul with transposes (the (LoRA-)linear layer is a fused unit:
//! `ops::fused::lora_linear`).
use super::{check_float, check_same_dtype, record_fn};
use crate::backend::MatmulSpec;
use crate::{Result, Shape, Tensor};

impl Tensor {
    /// `self · rhs` over the last two dims; leading (batch) dims must match, or `rhs` is 2-D
    /// and shared by every batch.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_t(rhs, false, false)
    }

    /// `op(self) · op(rhs)` where `op` transposes the last two dims when asked, without copying.
    pub fn matmul_t(&self, rhs: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        let op = "matmul";
        check_same_dtype(op, self, rhs)?;
        check_float(op, self)?;
        let (ad, bd) = (self.dims(), rhs.dims());
        if ad.len() < 2 || bd.len() < 2 {
            return Err(crate::shape_err!(
                op,
                "operands must have rank ≥ 2: {:?} and {:?}",
                ad,
                bd
            ));
        }
        let (ar, ac) = (ad[ad.len() - 2], ad[ad.len() - 1]);
        let (br, bc) = (bd[bd.len() - 2], bd[bd.len() - 1]);
        let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if trans_b { (bc, br) } else { (br, bc) };
        let a_batch = &ad[..ad.len() - 2];
        let b_batch = &bd[..bd.len() - 2];
        let rhs_batched = !b_batch.is_empty();
        if k != k2 || (rhs_batched && a_batch != b_batch) {
            return Err(crate::shape_err!(
                op,
                "cannot multiply {:?}{} by {:?}{}",
                ad,
                if trans_a { "ᵀ" } else { "" },
                bd,
                if trans_b { "ᵀ" } else { "" }
            ));
        }
        let batch: usize = a_batch.iter().product();
        let spec = MatmulSpec {
            batch,
            m,
            n,
            k,
            trans_a,
            trans_b,
            rhs_batched,
        };
        let out = self.storage().matmul(&rhs.storage(), spec)?;
        let mut od = a_batch.to_vec();
        od.extend([m, n]);
        let (a, b) = (self.clone(), rhs.clone());
        let nbd = a_batch.len();
        let a_batch_v = a_batch.to_vec();
        record_fn(
            "matmul",
            out,
            Shape::new(od),
            &[self, rhs],
            move |_: &Tensor| {
                move |g: &Tensor, needs: &[bool]| {
                    let ga = if needs[0] {
                        Some(if trans_a {
                            // dA (stored [k, m]) = op(B)·dCᵀ; a shared B is repeated per batch first.
                            let bb = if rhs_batched || nbd == 0 {
                                b.clone()
                            } else {
                                b.broadcast_as(&Shape::new(
                                    [a_batch_v.as_slice(), b.dims()].concat(),
                                ))?
                            };
                            bb.matmul_t(g, trans_b, true)?
                        } else {
                            g.matmul_t(&b, false, !trans_b)?
                        })
                    } else {
                        None
                    };
                    let gb = if needs[1] {
                        Some(if rhs_batched {
                            if trans_b {
                                g.matmul_t(&a, true, trans_a)?
                            } else {
                                a.matmul_t(g, !trans_a, false)?
                            }
                        } else if !trans_a {
                            // Shared rhs: fold the batch into rows, one product sums over it.
                            let a2 = a.reshape((batch * m, k))?;
                            let g2 = g.reshape((batch * m, n))?;
                            if trans_b {
                                g2.matmul_t(&a2, true, false)?
                            } else {
                                a2.matmul_t(&g2, true, false)?
                            }
                        } else {
                            let per = if trans_b {
                                g.matmul_t(&a, true, true)?
                            } else {
                                a.matmul_t(g, false, false)?
                            };
                            per.sum_to(&Shape::new([vec![1; nbd], b.dims().to_vec()].concat()))?
                                .reshape(b.shape().clone())?
                        })
                    } else {
                        None
                    };
                    Ok(vec![ga, gb])
                }
            },
        )
    }

    /// `self·Wᵀ + b`, W is [out, in] (PyTorch's layout).
    pub fn linear(&self, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        super::fused::lora_linear::lora_linear(self, w, b, None)
    }
}
