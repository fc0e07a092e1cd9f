//! CLAM, the cross-layer CLS attention module (SD2-SPEC §3): the CLS token of each of the L
//! vision blocks, through the vision `post_layernorm`, plus a learned per-layer embedding; one
//! multi-head self-attention over those L tokens; mean-pooled into `f_sat`. Then the adapter
//! `f = f_final + W2·quick_gelu(W1·[f_sat; f_final])` with W2 zero, so training starts at CLIP.
use crate::clip::model::{Fwd, LayerNorm, Linear};
use crate::ops;
use crate::optim::Param;
use crate::rng::mix64;
use crate::{DType, Device, Result, Tensor};

#[allow(clippy::too_many_arguments)]
fn trainable_linear(
    name: &str,
    out: usize,
    inp: usize,
    bound: f64,
    dtype: DType,
    device: Device,
    seed: u64,
    params: &mut Vec<Param>,
) -> Result<Linear> {
    let w = if bound > 0.0 {
        Tensor::rand_uniform(
            (out, inp),
            -bound,
            bound,
            dtype,
            device,
            mix64(seed ^ crate::clip::model::site_id(name)),
        )?
    } else {
        Tensor::zeros((out, inp), dtype, device)?
    }
    .into_trainable();
    let b = Tensor::zeros(out, dtype, device)?.into_trainable();
    params.push(Param::new(format!("{name}.weight"), w.clone(), true));
    params.push(Param::new(format!("{name}.bias"), b.clone(), false));
    Ok(Linear {
        weight: w,
        bias: Some(b),
        lora: None,
        site: crate::clip::model::site_id(name),
    })
}

/// The activations' dtype (the layer embedding is an f32 master under mixed precision).
fn layer_cls_dtype(layer_cls: &[Tensor]) -> DType {
    layer_cls.first().map_or(DType::F32, |t| t.dtype())
}

/// CLAM, the cross-layer CLS attention module: multi-head self-attention over the L per-block CLS
/// tokens of the vision tower, mean-pooled into f_sat [B, D] (D: the vision width). Every tensor is
/// trainable; its projections carry no LoRA.
#[derive(Clone, Debug)]
pub struct Clam {
    /// [L, D], one learned embedding per vision block.
    pub layer_embedding: Tensor,
    /// Query projection, [D, D] with bias.
    pub q_proj: Linear,
    /// Key projection, [D, D] with bias.
    pub k_proj: Linear,
    /// Value projection, [D, D] with bias.
    pub v_proj: Linear,
    /// Projection of the attention output, [D, D] with bias.
    pub out_proj: Linear,
    /// Attention heads (`Sd2Config::clam_heads`, 8 by default); must divide D.
    pub heads: usize,
}

impl Clam {
    /// Fresh weights: projections Xavier-uniform with zero biases (as torch's MultiheadAttention),
    /// layer embeddings normal(0, 0.02).
    pub fn new(
        layers: usize,
        d: usize,
        heads: usize,
        dtype: DType,
        device: Device,
        seed: u64,
    ) -> Result<(Clam, Vec<Param>)> {
        let mut params = vec![];
        let emb = Tensor::randn((layers, d), 0.02, dtype, device, mix64(seed ^ 0x636c_616d))?
            .into_trainable();
        params.push(Param::new("clam.layer_embedding", emb.clone(), false));
        let xavier = (6.0 / (2 * d) as f64).sqrt();
        let mut lin = |n: &str| {
            trainable_linear(
                &format!("clam.{n}"),
                d,
                d,
                xavier,
                dtype,
                device,
                seed,
                &mut params,
            )
        };
        let (q, k, v, o) = (
            lin("q_proj")?,
            lin("k_proj")?,
            lin("v_proj")?,
            lin("out_proj")?,
        );
        Ok((
            Clam {
                layer_embedding: emb,
                q_proj: q,
                k_proj: k,
                v_proj: v,
                out_proj: o,
                heads,
            },
            params,
        ))
    }

    /// `layer_cls`: L tensors [B, D] → f_sat [B, D].
    pub fn forward(&self, layer_cls: &[Tensor], post_layernorm: &LayerNorm) -> Result<Tensor> {
        let b = layer_cls.first().map(|t| t.dims()[0]).unwrap_or(0);
        let rows: Vec<Tensor> = layer_cls
            .iter()
            .map(|t| t.reshape((b, 1, t.dims()[1])))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = rows.iter().collect();
        let x = post_layernorm
            .forward(&Tensor::cat(&refs, 1)?)?
            .add(&self.layer_embedding.to_dtype(layer_cls_dtype(layer_cls))?)?;
        let f = Fwd::default();
        let (q, k, v) = (
            self.q_proj.forward(&x, f)?,
            self.k_proj.forward(&x, f)?,
            self.v_proj.forward(&x, f)?,
        );
        let a = self
            .out_proj
            .forward(&ops::attention(&q, &k, &v, self.heads, false)?, f)?;
        a.mean_dim(1, false)
    }

    /// Every tensor under its parameter name: `clam.layer_embedding`, then
    /// `clam.{q,k,v,out}_proj.{weight,bias}`, the names `Clam::new` gives its parameters.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "clam.layer_embedding".to_string(),
            self.layer_embedding.clone(),
        )];
        for (n, l) in [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("out_proj", &self.out_proj),
        ] {
            out.push((format!("clam.{n}.weight"), l.weight.clone()));
            out.push((
                format!("clam.{n}.bias"),
                l.bias.clone().expect("CLAM projections have biases"),
            ));
        }
        out
    }
}

/// The adapter that adds CLAM's f_sat to CLIP's projected image embedding f_final:
/// `f = f_final + W2·quick_gelu(W1·[f_sat; f_final])`. W2 starts at zero, so f starts as CLIP's
/// own embedding.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// W1, [P, D + P] with bias: the concatenation [f_sat; f_final] to the projection width P.
    pub w1: Linear,
    /// W2, [P, P] with bias, both zero at the start.
    pub w2: Linear,
}

impl Adapter {
    /// W1 [(D + P) → P] as torch's Linear default (uniform ±1/√fan_in), W2 [P → P] zero.
    pub fn new(
        d: usize,
        p: usize,
        dtype: DType,
        device: Device,
        seed: u64,
    ) -> Result<(Adapter, Vec<Param>)> {
        let mut params = vec![];
        let w1 = trainable_linear(
            "adapter.w1",
            p,
            d + p,
            1.0 / ((d + p) as f64).sqrt(),
            dtype,
            device,
            seed,
            &mut params,
        )?;
        let w2 = trainable_linear("adapter.w2", p, p, 0.0, dtype, device, seed, &mut params)?;
        Ok((Adapter { w1, w2 }, params))
    }

    /// f_sat [B, D] and f_final [B, P] → the image feature f [B, P] (not normalized).
    pub fn forward(&self, f_sat: &Tensor, f_final: &Tensor) -> Result<Tensor> {
        let f = Fwd::default();
        let h = self
            .w1
            .forward(&Tensor::cat(&[f_sat, f_final], 1)?, f)?
            .quick_gelu()?;
        f_final.add(&self.w2.forward(&h, f)?)
    }
}
