//! Matrix products: batched matmul with transposes, and the (LoRA-)linear layer as one op.
use super::{check_float, check_same_dtype, record_fn};
use crate::autograd::{record, BackwardOp};
use crate::backend::{LinearNeeds, LinearSpec, LoraSpec, MatmulSpec};
use crate::storage::Storage;
use crate::{Error, Result, Shape, Tensor};

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
        lora_linear(self, w, b, None)
    }
}

/// The low-rank branch of a LoRA-linear: `scale·(drop(x)·Aᵀ)·Bᵀ` with A [rank, in], B [out, rank].
#[derive(Clone)]
pub struct Lora<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    /// Dropout probability on the LoRA input; 0 at inference.
    pub dropout: f32,
    /// Seed of the dropout mask (a counter-based hash: backward regenerates it).
    pub seed: u64,
}

/// `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ` as one op: x is [..., in], W [out, in], b [out].
/// Gradients flow to x, A, B (and to W, b only if they are trainable).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: Option<Lora<'_>>,
) -> Result<Tensor> {
    let op = "lora_linear";
    check_float(op, x)?;
    check_same_dtype(op, x, w)?;
    if w.rank() != 2 || x.rank() == 0 {
        return Err(crate::shape_err!(
            op,
            "x {:?} · W {:?}: W must be [out, in]",
            x.dims(),
            w.dims()
        ));
    }
    let (n, k) = (w.dims()[0], w.dims()[1]);
    if x.shape().last() != k {
        return Err(crate::shape_err!(
            op,
            "x {:?} has last dim {} but W {:?} expects {k}",
            x.dims(),
            x.shape().last(),
            w.dims()
        ));
    }
    if let Some(b) = b {
        check_same_dtype(op, x, b)?;
        if b.dims() != [n] {
            return Err(crate::shape_err!(
                op,
                "bias {:?} does not match W {:?}",
                b.dims(),
                w.dims()
            ));
        }
    }
    let spec = LinearSpec {
        m: x.shape().rows(),
        n,
        k,
    };
    let lspec = match &lora {
        None => None,
        Some(l) => {
            check_same_dtype(op, x, l.a)?;
            check_same_dtype(op, x, l.b)?;
            let r = l.a.dims().first().copied().unwrap_or(0);
            if l.a.dims() != [r, k] || l.b.dims() != [n, r] {
                return Err(crate::shape_err!(
                    op,
                    "LoRA A {:?} / B {:?} do not fit W {:?}",
                    l.a.dims(),
                    l.b.dims(),
                    w.dims()
                ));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return Err(Error::Msg(format!(
                    "{op}: dropout {} must be in [0, 1)",
                    l.dropout
                )));
            }
            Some(LoraSpec {
                rank: r,
                scale: l.scale,
                dropout: l.dropout,
                seed: l.seed,
            })
        }
    };
    let (y, s) = {
        let xs = x.storage();
        let ws = w.storage();
        let bs = b.map(|b| b.storage());
        let la = lora.as_ref().map(|l| (l.a.storage(), l.b.storage()));
        let low = match (&la, lspec) {
            (Some((a, bm)), Some(sp)) => Some((&**a, &**bm, sp)),
            _ => None,
        };
        xs.lora_linear(&ws, bs.as_deref(), low, spec)?
    };
    let mut od = x.dims().to_vec();
    *od.last_mut().expect("rank ≥ 1") = n;
    let mut inputs = vec![x, w];
    if let Some(b) = b {
        inputs.push(b);
    }
    if let Some(l) = &lora {
        inputs.push(l.a);
        inputs.push(l.b);
    }
    let has_bias = b.is_some();
    record(y, Shape::new(od), &inputs, |_| LinearBackward {
        x: x.clone(),
        w: w.clone(),
        lora: lora
            .as_ref()
            .zip(lspec)
            .zip(s)
            .map(|((l, sp), s)| (l.a.clone(), l.b.clone(), s, sp)),
        has_bias,
        spec,
    })
}

struct LinearBackward {
    x: Tensor,
    w: Tensor,
    /// (A, B, S = drop(x)·Aᵀ, spec).
    lora: Option<(Tensor, Tensor, Storage, LoraSpec)>,
    has_bias: bool,
    spec: LinearSpec,
}

impl BackwardOp for LinearBackward {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn backward(self: Box<Self>, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let bi = if self.has_bias { Some(2) } else { None };
        let li = if self.has_bias { 3 } else { 2 };
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        let wants = LinearNeeds {
            x: need(0),
            w: need(1),
            b: bi.map(need).unwrap_or(false),
            lora_a: self.lora.is_some() && need(li),
            lora_b: self.lora.is_some() && need(li + 1),
        };
        let grads = {
            let xs = self.x.storage();
            let ws = self.w.storage();
            let la = self
                .lora
                .as_ref()
                .map(|(a, b, s, sp)| (a.storage(), b.storage(), s, *sp));
            let low = la.as_ref().map(|(a, b, s, sp)| (&**a, &**b, *s, *sp));
            xs.lora_linear_bwd(&ws, low, &g.storage(), self.spec, wants)?
        };
        let t = |s: Option<Storage>, like: &Tensor| {
            s.map(|s| Tensor::from_storage(s, like.shape().clone()))
                .transpose()
        };
        let mut out = vec![t(grads.x, &self.x)?, t(grads.w, &self.w)?];
        if self.has_bias {
            out.push(
                grads
                    .b
                    .map(|s| Tensor::from_storage(s, self.spec.n))
                    .transpose()?,
            );
        }
        if let Some((a, b, _, _)) = &self.lora {
            out.push(t(grads.lora_a, a)?);
            out.push(t(grads.lora_b, b)?);
        }
        Ok(out)
    }
}
