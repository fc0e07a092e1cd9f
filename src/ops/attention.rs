//! Multi-head attention as one op, with the flash-attention contract: the forward returns the
//! output and keeps only the per-row log-sum-exp; the backward recomputes the probabilities.
use super::{check_float, check_same_dtype};
use crate::autograd::{record, BackwardOp};
use crate::backend::AttnSpec;
use crate::storage::Storage;
use crate::{Result, Shape, Tensor};

/// Options of `attention`.
#[derive(Clone, Copy, Debug)]
pub struct AttnOptions {
    pub heads: usize,
    pub causal: bool,
    /// Scale of q·k; `None` means head_dim^-0.5.
    pub scale: Option<f64>,
}

/// q [B, Sq, H·D], k and v [B, Sk, H·D] → out [B, Sq, H·D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    Ok(attention_lse(
        q,
        k,
        v,
        AttnOptions {
            heads,
            causal,
            scale: None,
        },
    )?
    .0)
}

/// Like `attention`, also returning the log-sum-exp [B, H, Sq] (f32; f64 for f64 inputs).
pub fn attention_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: AttnOptions,
) -> Result<(Tensor, Tensor)> {
    let op = "attention";
    check_float(op, q)?;
    check_same_dtype(op, q, k)?;
    check_same_dtype(op, q, v)?;
    let (qd, kd) = (q.dims(), k.dims());
    let ok = q.rank() == 3
        && k.rank() == 3
        && k.dims() == v.dims()
        && qd[0] == kd[0]
        && qd[2] == kd[2]
        && o.heads > 0
        && qd[2] % o.heads == 0;
    if !ok {
        return Err(crate::shape_err!(
            op,
            "q {:?}, k {:?}, v {:?} with {} heads",
            qd,
            kd,
            v.dims(),
            o.heads
        ));
    }
    let head_dim = qd[2] / o.heads;
    let spec = AttnSpec {
        batch: qd[0],
        heads: o.heads,
        q_len: qd[1],
        kv_len: kd[1],
        head_dim,
        causal: o.causal,
        scale: o.scale.unwrap_or(1.0 / (head_dim as f64).sqrt()),
    };
    let (out, lse) = q.storage().attention(&k.storage(), &v.storage(), spec)?;
    let lse_t = Tensor::from_storage(lse, (spec.batch, spec.heads, spec.q_len))?;
    let y = record(out, q.shape().clone(), &[q, k, v], |y| AttnBackward {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        o: y.clone(),
        lse: lse_t.clone(),
        spec,
    })?;
    Ok((y, lse_t))
}

struct AttnBackward {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    spec: AttnSpec,
}

impl BackwardOp for AttnBackward {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn backward(self: Box<Self>, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (dq, dk, dv) = self.q.storage().attention_bwd(
            &self.k.storage(),
            &self.v.storage(),
            &self.o.storage(),
            &self.lse.storage(),
            &g.storage(),
            self.spec,
        )?;
        let t = |s: Storage, sh: &Shape, need: bool| -> Result<Option<Tensor>> {
            if need {
                Ok(Some(Tensor::from_storage(s, sh.clone())?))
            } else {
                Ok(None)
            }
        };
        Ok(vec![
            t(dq, self.q.shape(), needs[0])?,
            t(dk, self.k.shape(), needs[1])?,
            t(dv, self.v.shape(), needs[2])?,
        ])
    }
}
