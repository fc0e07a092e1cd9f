//! CLIP's two towers, exactly as HuggingFace's `CLIPModel` computes them (SD2-SPEC §2):
//! pre-LN blocks with quick_gelu MLPs; vision = patch conv → [CLS; patches] + positions →
//! `pre_layrnorm` → blocks → `post_layernorm` on CLS → `visual_projection`; text = tokens +
//! positions → causal blocks → `final_layer_norm` → hidden state at the first EOS (first argmax
//! of the ids) → `text_projection`.
use std::path::Path;

use super::config::{ClipConfig, TextConfig, VisionConfig};
use crate::io::WeightStore;
use crate::ops::{self, Lora};
use crate::rng::mix64;
use crate::{DType, Device, Error, Result, Tensor};

/// What a tensor is, for random initialisation (loading ignores it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// A linear or patch-convolution weight: normal(0, 0.02).
    Weight,
    /// A linear bias: zeros.
    Bias,
    /// A LayerNorm scale: ones.
    NormWeight,
    /// A LayerNorm shift: zeros.
    NormBias,
    /// A class, position or token embedding: normal(0, 0.02).
    Embedding,
    /// Every element set to one value, given as the bits of an `f32` (`f32::to_bits`, which keeps
    /// `Init` `Eq`). The initial `logit_scale` uses it.
    Scalar(u32),
}

/// Source of named weights: a safetensors store or a random initialiser.
pub trait WeightSource {
    /// The tensor named `name` (its HuggingFace key, e.g. `vision_model.pre_layrnorm.weight`) with
    /// shape `shape`. A store fails when the name is missing or its shape differs; a random source
    /// uses `init` to choose the values.
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor>;
}

/// Loads from safetensors, converting to `dtype` on `device`.
pub struct StoreSource<'a> {
    /// The safetensors file(s) to read. The store records which names were taken, so a caller can
    /// list the unused ones afterwards (`WeightStore::unused`).
    pub store: &'a mut WeightStore,
    /// Dtype every loaded tensor is converted to.
    pub dtype: DType,
    /// Device every loaded tensor is placed on.
    pub device: Device,
}

impl WeightSource for StoreSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        self.store.get(name, shape, self.dtype, self.device)
    }
}

/// Random weights (normal 0.02, LayerNorm ones/zeros), for benchmarks and tests.
pub struct RandomSource {
    /// Dtype of the generated tensors.
    pub dtype: DType,
    /// Device of the generated tensors.
    pub device: Device,
    /// Base seed. Each tensor draws from `mix64(seed ^ site_id(name))`, so its values depend on the
    /// seed and its name only, not on the order of loading.
    pub seed: u64,
}

impl WeightSource for RandomSource {
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let seed = mix64(self.seed ^ site_id(name));
        match init {
            Init::Weight | Init::Embedding => {
                Tensor::randn(shape, 0.02, self.dtype, self.device, seed)
            }
            Init::Bias | Init::NormBias => Tensor::zeros(shape, self.dtype, self.device),
            Init::NormWeight => Tensor::ones(shape, self.dtype, self.device),
            Init::Scalar(bits) => {
                Tensor::full(f32::from_bits(bits) as f64, shape, self.dtype, self.device)
            }
        }
    }
}

/// A stable 64-bit id of a weight name (FNV-1a): dropout streams and random init per site.
pub fn site_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A LoRA adapter on a linear layer (SD2-SPEC §3): `s·(drop(x)·Aᵀ)·Bᵀ`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// Down-projection A, [rank, in]. Kaiming-uniform when attached; trainable.
    pub a: Tensor,
    /// Up-projection B, [out, rank]. Zero when attached, so a fresh adapter adds nothing.
    pub b: Tensor,
    /// Multiplier s of the low-rank branch: `alpha / rank` (`LoraConfig::scale`).
    pub scale: f64,
    /// Dropout probability on the adapter's input, in [0, 1). It applies only to a forward with a
    /// dropout seed (training); inference runs without dropout.
    pub dropout: f32,
}

/// Training-time context of a forward pass: `Some(seed)` turns LoRA dropout on;
/// `recompute` keeps only each encoder block's input for backward and runs the block again
/// there (activation recomputation: about a third more compute, a fraction of the memory).
#[derive(Clone, Copy, Debug, Default)]
pub struct Fwd {
    /// Seed of this pass's LoRA dropout masks; `None` (inference) turns dropout off. Each linear
    /// mixes it with its own `site`, so every layer gets a different mask.
    pub dropout_seed: Option<u64>,
    /// Keep only each encoder block's input and run the block again in backward (less memory,
    /// about a third more compute).
    pub recompute: bool,
}

/// A linear layer `y = x·Wᵀ + b` with an optional LoRA adapter added to its output. Its forwards
/// are fused ops (`ops::lora_linear` and its variants): the bias, the adapter's branch, a residual
/// add or quick_gelu are computed with the GEMM. Under mixed precision the weight, bias and adapter
/// are cast to the input's dtype on each forward.
#[derive(Clone, Debug)]
pub struct Linear {
    /// W, [out, in] as HuggingFace stores it. Frozen unless the run trains the base (`train_base`).
    pub weight: Tensor,
    /// b, `[out]`; `None` for the bias-free projections (`visual_projection`, `text_projection`).
    pub bias: Option<Tensor>,
    /// The LoRA adapter, when one is attached (`sd2::lora::attach`); `None` for a plain linear.
    pub lora: Option<LoraAdapter>,
    /// Distinguishes this layer's dropout stream from every other layer's.
    pub site: u64,
}

impl Linear {
    /// Loads `{name}.weight` as [out, inp] and, when `bias`, `{name}.bias` as `[out]`, with no
    /// adapter. Its dropout site is `site_id(name)`.
    pub fn load(
        src: &mut dyn WeightSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        Ok(Linear {
            weight: src.get(&format!("{name}.weight"), &[out, inp], Init::Weight)?,
            bias: if bias {
                Some(src.get(&format!("{name}.bias"), &[out], Init::Bias)?)
            } else {
                None
            },
            lora: None,
            site: site_id(name),
        })
    }

    /// `x·Wᵀ + b`, plus the adapter's branch when there is one: x [..., in] → [..., out]. LoRA
    /// dropout is on when `fwd.dropout_seed` is set.
    pub fn forward(&self, x: &Tensor, fwd: Fwd) -> Result<Tensor> {
        self.forward_with(x, None, Act::None, fwd).map(|o| o.y)
    }

    /// `residual + self.forward(x)` as one op (the add in the GEMM's epilogue where it can).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor, fwd: Fwd) -> Result<Tensor> {
        self.forward_with(x, Some(residual), Act::None, fwd)
            .map(|o| o.y)
    }

    /// `quick_gelu(self.forward(x))` for the next linear (`forward_gelu_input`): CLIP's fc1,
    /// the activation in the GEMM's epilogue.
    pub fn forward_gelu(&self, x: &Tensor, fwd: Fwd) -> Result<ops::GeluLinear> {
        self.forward_with(x, None, Act::Out, fwd)?
            .gelu
            .ok_or_else(|| crate::Error::Msg("linear: no gelu output".into()))
    }

    /// `residual + self.forward(quick_gelu(h))` for `h` from `forward_gelu` (CLIP's fc2):
    /// quick_gelu′ rides in the dX GEMM's epilogue.
    pub fn forward_gelu_input(
        &self,
        h: &ops::GeluLinear,
        residual: &Tensor,
        fwd: Fwd,
    ) -> Result<Tensor> {
        self.forward_with(h.act(), Some(residual), Act::In(h), fwd)
            .map(|o| o.y)
    }

    fn forward_with(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: Act<'_>,
        fwd: Fwd,
    ) -> Result<LinearOut> {
        let p = self.parts(x.dtype(), fwd)?;
        let (weight, bias, lora) = (&p.weight, p.bias.as_ref(), p.lora());
        let b = bias;
        Ok(match (act, residual) {
            (Act::Out, _) => LinearOut {
                y: x.clone(),
                gelu: Some(ops::lora_linear_gelu(x, weight, b, lora)?),
            },
            (Act::In(h), r) => LinearOut {
                y: ops::lora_linear_gelu_input(h, weight, b, lora, r)?,
                gelu: None,
            },
            (Act::None, Some(r)) => LinearOut {
                y: ops::lora_linear_residual(x, weight, b, lora, r)?,
                gelu: None,
            },
            (Act::None, None) => LinearOut {
                y: ops::lora_linear(x, weight, b, lora)?,
                gelu: None,
            },
        })
    }
}

/// A linear's tensors for one forward, in the activations' dtype. Mixed precision: trainable
/// tensors are f32 masters, cast here (the cast's backward returns their gradients in f32); a
/// no-op otherwise.
struct LinearParts {
    weight: Tensor,
    bias: Option<Tensor>,
    low: Option<(Tensor, Tensor)>,
    scale: f64,
    dropout: f32,
    seed: u64,
}

impl LinearParts {
    fn lora(&self) -> Option<Lora<'_>> {
        self.low.as_ref().map(|(a, b)| Lora {
            a,
            b,
            scale: self.scale,
            dropout: self.dropout,
            seed: self.seed,
        })
    }
}

impl Linear {
    fn parts(&self, dt: crate::DType, fwd: Fwd) -> Result<LinearParts> {
        Ok(LinearParts {
            weight: self.weight.to_dtype(dt)?,
            bias: self.bias.as_ref().map(|b| b.to_dtype(dt)).transpose()?,
            low: self
                .lora
                .as_ref()
                .map(|l| Ok::<_, crate::Error>((l.a.to_dtype(dt)?, l.b.to_dtype(dt)?)))
                .transpose()?,
            scale: self.lora.as_ref().map_or(0.0, |l| l.scale),
            dropout: match (&self.lora, fwd.dropout_seed) {
                (Some(l), Some(_)) => l.dropout,
                _ => 0.0,
            },
            seed: mix64(fwd.dropout_seed.unwrap_or(0) ^ self.site),
        })
    }
}

/// `Linear::forward` of several linears on one input (a block's q, k, v), with their LoRA
/// down-projections in one pass over it where the kernel can.
pub fn forward_of_one_input(layers: &[&Linear], x: &Tensor, fwd: Fwd) -> Result<Vec<Tensor>> {
    let parts: Vec<LinearParts> = layers
        .iter()
        .map(|l| l.parts(x.dtype(), fwd))
        .collect::<Result<_>>()?;
    let specs: Vec<_> = parts
        .iter()
        .map(|p| (&p.weight, p.bias.as_ref(), p.lora()))
        .collect();
    ops::lora_linears_of_one_input(x, &specs)
}

/// How a linear's activation is fused (see `Linear::forward_gelu`).
#[derive(Clone, Copy)]
enum Act<'a> {
    None,
    Out,
    In(&'a ops::GeluLinear),
}

struct LinearOut {
    y: Tensor,
    gelu: Option<ops::GeluLinear>,
}

/// A LayerNorm over the last dimension, with a learned scale and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale γ, `[dim]`.
    pub weight: Tensor,
    /// Shift β, `[dim]`.
    pub bias: Tensor,
    /// Added to the variance before the square root (the config's `layer_norm_eps`).
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `{name}.weight` and `{name}.bias`, both `[dim]`.
    pub fn load(src: &mut dyn WeightSource, name: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: src.get(&format!("{name}.weight"), &[dim], Init::NormWeight)?,
            bias: src.get(&format!("{name}.bias"), &[dim], Init::NormBias)?,
            eps,
        })
    }

    /// Normalizes each row of x [..., dim] to zero mean and unit variance, then scales and shifts
    /// it. Same shape out.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(&self.weight, &self.bias, self.eps)
    }
}

/// One pre-LN transformer block.
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    /// Query projection, [D, D] with bias.
    pub q_proj: Linear,
    /// Key projection, [D, D] with bias.
    pub k_proj: Linear,
    /// Value projection, [D, D] with bias.
    pub v_proj: Linear,
    /// Projection of the attention output, [D, D] with bias; its forward adds the residual.
    pub out_proj: Linear,
    /// LayerNorm before attention.
    pub layer_norm1: LayerNorm,
    /// LayerNorm before the MLP.
    pub layer_norm2: LayerNorm,
    /// MLP up-projection, [intermediate, D]; quick_gelu is applied with its GEMM.
    pub fc1: Linear,
    /// MLP down-projection, [D, intermediate]; its forward adds the residual.
    pub fc2: Linear,
    /// Attention heads; each head is D / heads wide.
    pub heads: usize,
}

impl EncoderLayer {
    fn load(
        src: &mut dyn WeightSource,
        p: &str,
        d: usize,
        inter: usize,
        heads: usize,
        eps: f64,
    ) -> Result<EncoderLayer> {
        let lin = |src: &mut dyn WeightSource, n: &str, o, i| {
            Linear::load(src, &format!("{p}.{n}"), o, i, true)
        };
        Ok(EncoderLayer {
            q_proj: lin(src, "self_attn.q_proj", d, d)?,
            k_proj: lin(src, "self_attn.k_proj", d, d)?,
            v_proj: lin(src, "self_attn.v_proj", d, d)?,
            out_proj: lin(src, "self_attn.out_proj", d, d)?,
            layer_norm1: LayerNorm::load(src, &format!("{p}.layer_norm1"), d, eps)?,
            layer_norm2: LayerNorm::load(src, &format!("{p}.layer_norm2"), d, eps)?,
            fc1: lin(src, "mlp.fc1", inter, d)?,
            fc2: lin(src, "mlp.fc2", d, inter)?,
            heads,
        })
    }

    /// The `n` blocks `{tower}.encoder.layers.{i}` of one tower.
    #[allow(clippy::too_many_arguments)]
    fn load_stack(
        src: &mut dyn WeightSource,
        tower: &str,
        n: usize,
        d: usize,
        inter: usize,
        heads: usize,
        eps: f64,
    ) -> Result<Vec<EncoderLayer>> {
        (0..n)
            .map(|i| {
                EncoderLayer::load(
                    src,
                    &format!("{tower}.encoder.layers.{i}"),
                    d,
                    inter,
                    heads,
                    eps,
                )
            })
            .collect()
    }

    /// One block on x [B, T, D] → [B, T, D]: `x + attn(ln1(x))`, then `h + mlp(ln2(h))`. `causal`
    /// masks attention to later tokens (the text tower). q, k and v are computed in one pass over
    /// the LayerNorm's output.
    pub fn forward(&self, x: &Tensor, causal: bool, fwd: Fwd) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let [q, k, v]: [Tensor; 3] =
            forward_of_one_input(&[&self.q_proj, &self.k_proj, &self.v_proj], &h, fwd)?
                .try_into()
                .map_err(|_| crate::Error::Msg("encoder layer: q, k, v expected".into()))?;
        let a = ops::attention(&q, &k, &v, self.heads, causal)?;
        let x = self.out_proj.forward_residual(&a, x, fwd)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.fc1.forward_gelu(&h, fwd)?;
        self.fc2.forward_gelu_input(&h, &x, fwd)
    }

    /// The block's trainable tensors (LoRA factors; every weight with `train_base`).
    pub fn trainables(&self) -> Vec<Tensor> {
        let lin = [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.out_proj,
            &self.fc1,
            &self.fc2,
        ];
        let mut v: Vec<Tensor> = vec![];
        for l in lin {
            v.push(l.weight.clone());
            v.extend(l.bias.iter().cloned());
            if let Some(a) = &l.lora {
                v.extend([a.a.clone(), a.b.clone()]);
            }
        }
        for n in [&self.layer_norm1, &self.layer_norm2] {
            v.extend([n.weight.clone(), n.bias.clone()]);
        }
        v.retain(|t| t.is_trainable());
        v
    }

    /// `forward`, recomputed in backward when `fwd.recompute` (only `x` is kept).
    pub fn forward_maybe_recomputed(&self, x: &Tensor, causal: bool, fwd: Fwd) -> Result<Tensor> {
        if !fwd.recompute {
            return self.forward(x, causal, fwd);
        }
        let layer = self.clone();
        crate::autograd::checkpoint(&[x], &self.trainables(), move |xs| {
            layer.forward(&xs[0], causal, fwd)
        })
    }

    /// Every linear layer of the block, by its HF name suffix.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 6] {
        [
            ("q_proj", &mut self.q_proj),
            ("k_proj", &mut self.k_proj),
            ("v_proj", &mut self.v_proj),
            ("out_proj", &mut self.out_proj),
            ("fc1", &mut self.fc1),
            ("fc2", &mut self.fc2),
        ]
    }
}

/// Runs a stack of blocks, keeping the hidden states (input first) and each block's row-0 (CLS)
/// token when `opts` asks for them.
fn run_blocks(
    layers: &[EncoderLayer],
    mut x: Tensor,
    causal: bool,
    opts: TowerOptions,
    fwd: Fwd,
) -> Result<(Tensor, Vec<Tensor>, Vec<Tensor>)> {
    let b = x.dims().first().copied().unwrap_or(0);
    let mut hidden = vec![];
    let mut layer_cls = vec![];
    if opts.hidden_states {
        hidden.push(x.clone());
    }
    for (i, layer) in layers.iter().enumerate() {
        let _r = crate::profile::range_with(|| {
            format!("{} layer {i}", if causal { "text" } else { "vision" })
        });
        x = layer.forward_maybe_recomputed(&x, causal, fwd)?;
        if opts.hidden_states {
            hidden.push(x.clone());
        }
        if opts.layer_cls {
            layer_cls.push(x.select_rows_per_batch(&vec![0; b])?);
        }
    }
    Ok((x, hidden, layer_cls))
}

/// What a tower returns besides its pooled output.
#[derive(Clone, Copy, Debug, Default)]
pub struct TowerOptions {
    /// HF's `hidden_states`: the encoder input, then every block's output.
    pub hidden_states: bool,
    /// The CLS token of every block's output (CLAM's input); vision only.
    pub layer_cls: bool,
}

/// What a tower's forward returns: its pooled output and, when [`TowerOptions`] asks for them, the
/// hidden states and each block's CLS token.
pub struct TowerOutput {
    /// Last block's output (vision) or after `final_layer_norm` (text), when hidden states are
    /// asked for; otherwise None.
    pub last_hidden_state: Option<Tensor>,
    /// Post-LN CLS (vision) or final-LN EOS state (text): [B, D].
    pub pooled: Tensor,
    /// With `hidden_states`: the encoder input, then every block's output, each [B, T, D]
    /// (`num_hidden_layers + 1` tensors). The vision input is after `pre_layrnorm`; text states are
    /// before `final_layer_norm`. Empty otherwise.
    pub hidden_states: Vec<Tensor>,
    /// With `layer_cls` (vision only): each block's CLS token, [B, D] per block, without any
    /// LayerNorm (CLAM applies `post_layernorm` itself). Empty otherwise.
    pub layer_cls: Vec<Tensor>,
}

/// CLIP's vision transformer (HF `vision_model`): patch embedding, CLS token and positions,
/// `pre_layrnorm`, the encoder blocks, and `post_layernorm` on the CLS token. Its pooled output is
/// not yet projected; [`ClipModel::visual_projection`] does that.
#[derive(Clone, Debug)]
pub struct VisionTower {
    /// The tower's shape; `forward` checks its input against it.
    pub cfg: VisionConfig,
    /// The learned CLS token, `[D]`, put before the patches.
    pub class_embedding: Tensor,
    /// Weight of the patch convolution, [D, C, p, p] (stride p, no bias).
    pub patch_embedding: Tensor,
    /// Learned positions, [grid² + 1, D], added to [CLS; patches].
    pub position_embedding: Tensor,
    /// LayerNorm on the embeddings before the first block (HuggingFace's spelling).
    pub pre_layrnorm: LayerNorm,
    /// The `num_hidden_layers` encoder blocks (no causal mask).
    pub layers: Vec<EncoderLayer>,
    /// LayerNorm on the last block's CLS token. CLAM applies it to every block's CLS token too.
    pub post_layernorm: LayerNorm,
}

impl VisionTower {
    /// Loads the tower's weights (`vision_model.*`) from `src` with the shapes `cfg` gives.
    pub fn load(src: &mut dyn WeightSource, cfg: &VisionConfig) -> Result<VisionTower> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let e = "vision_model.embeddings";
        let layers = EncoderLayer::load_stack(
            src,
            "vision_model",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.layer_norm_eps,
        )?;
        Ok(VisionTower {
            cfg: cfg.clone(),
            class_embedding: src.get(&format!("{e}.class_embedding"), &[d], Init::Embedding)?,
            patch_embedding: src.get(
                &format!("{e}.patch_embedding.weight"),
                &[d, c, p, p],
                Init::Weight,
            )?,
            position_embedding: src.get(
                &format!("{e}.position_embedding.weight"),
                &[cfg.num_positions(), d],
                Init::Embedding,
            )?,
            pre_layrnorm: LayerNorm::load(src, "vision_model.pre_layrnorm", d, cfg.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::load(
                src,
                "vision_model.post_layernorm",
                d,
                cfg.layer_norm_eps,
            )?,
        })
    }

    /// pixel_values [B, C, H, W] (normalized) → pooled [B, D] (+ what `opts` asks for).
    pub fn forward(&self, pixels: &Tensor, opts: TowerOptions, fwd: Fwd) -> Result<TowerOutput> {
        let c = &self.cfg;
        let want = [
            pixels.dims().first().copied().unwrap_or(0),
            c.num_channels,
            c.image_size,
            c.image_size,
        ];
        if pixels.dims() != want {
            return Err(Error::shape(
                "clip vision",
                format!(
                    "pixel_values {:?}, expected [B, {}, {}, {}]",
                    pixels.dims(),
                    c.num_channels,
                    c.image_size,
                    c.image_size
                ),
            ));
        }
        let b = want[0];
        let d = c.hidden_size;
        let patches = pixels.patch_conv(&self.patch_embedding)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as(&crate::Shape::from([b, 1, d]))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.add(&self.position_embedding)?;
        let x = self.pre_layrnorm.forward(&x)?;
        let (x, hidden, layer_cls) = run_blocks(&self.layers, x, false, opts, fwd)?;
        let cls = x.select_rows_per_batch(&vec![0; b])?;
        Ok(TowerOutput {
            last_hidden_state: opts.hidden_states.then_some(x),
            pooled: self.post_layernorm.forward(&cls)?,
            hidden_states: hidden,
            layer_cls,
        })
    }
}

/// CLIP's text transformer (HF `text_model`): token and position embeddings, causal encoder blocks,
/// `final_layer_norm`, pooled at each row's first EOS token. Its pooled output is not yet
/// projected; [`ClipModel::text_projection`] does that.
#[derive(Clone, Debug)]
pub struct TextTower {
    /// The tower's shape; `forward` checks ids against its positions and vocabulary.
    pub cfg: TextConfig,
    /// Token embedding, [vocab_size, D].
    pub token_embedding: Tensor,
    /// Learned positions, [max_position_embeddings, D]; a text of S tokens uses the first S rows.
    pub position_embedding: Tensor,
    /// The `num_hidden_layers` encoder blocks, all causal.
    pub layers: Vec<EncoderLayer>,
    /// LayerNorm after the last block.
    pub final_layer_norm: LayerNorm,
}

/// Per row, the first position holding the largest id (the first EOS, 49407 being the largest).
pub fn eos_positions(ids: &[i64], rows: usize, len: usize) -> Vec<usize> {
    (0..rows)
        .map(|r| {
            let row = &ids[r * len..(r + 1) * len];
            (0..len).fold(0, |best, j| if row[j] > row[best] { j } else { best })
        })
        .collect()
}

impl TextTower {
    /// Loads the tower's weights (`text_model.*`) from `src` with the shapes `cfg` gives.
    pub fn load(src: &mut dyn WeightSource, cfg: &TextConfig) -> Result<TextTower> {
        let d = cfg.hidden_size;
        let layers = EncoderLayer::load_stack(
            src,
            "text_model",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.layer_norm_eps,
        )?;
        Ok(TextTower {
            cfg: cfg.clone(),
            token_embedding: src.get(
                "text_model.embeddings.token_embedding.weight",
                &[cfg.vocab_size, d],
                Init::Embedding,
            )?,
            position_embedding: src.get(
                "text_model.embeddings.position_embedding.weight",
                &[cfg.max_position_embeddings, d],
                Init::Embedding,
            )?,
            layers,
            final_layer_norm: LayerNorm::load(
                src,
                "text_model.final_layer_norm",
                d,
                cfg.layer_norm_eps,
            )?,
        })
    }

    /// input_ids [M, S] (i64/u32, S ≤ max positions) → pooled [M, D] at the first EOS.
    pub fn forward(&self, ids: &Tensor, opts: TowerOptions, fwd: Fwd) -> Result<TowerOutput> {
        self.forward_with_host(ids, None, opts, fwd)
    }

    /// `forward` with the ids' host copy when the caller has one (it tokenized them): the
    /// vocabulary check and the EOS positions then need no read-back from the device, which
    /// would wait for every queued kernel.
    pub fn forward_with_host(
        &self,
        ids: &Tensor,
        host: Option<&[i64]>,
        opts: TowerOptions,
        fwd: Fwd,
    ) -> Result<TowerOutput> {
        if ids.rank() != 2 || ids.dims()[1] > self.cfg.max_position_embeddings || ids.dims()[1] == 0
        {
            return Err(Error::shape(
                "clip text",
                format!(
                    "input_ids {:?}, expected [M, S] with 0 < S ≤ {}",
                    ids.dims(),
                    self.cfg.max_position_embeddings
                ),
            ));
        }
        let (m, s) = (ids.dims()[0], ids.dims()[1]);
        let read;
        let host: &[i64] = match host {
            Some(h) if h.len() == m * s => h,
            Some(h) => {
                return Err(Error::shape(
                    "clip text",
                    format!("{} host ids for input_ids {:?}", h.len(), ids.dims()),
                ))
            }
            None => {
                read = ids.to_vec::<i64>()?;
                &read
            }
        };
        if let Some(bad) = host
            .iter()
            .find(|v| **v < 0 || **v as usize >= self.cfg.vocab_size)
        {
            return Err(Error::Index {
                op: "clip text",
                msg: format!(
                    "token id {bad} outside the vocabulary 0..{}",
                    self.cfg.vocab_size
                ),
            });
        }
        let x = Tensor::embedding(&self.token_embedding, ids)?;
        let x = x.add(&self.position_embedding.narrow(0, 0, s)?)?;
        let opts = TowerOptions {
            layer_cls: false,
            ..opts
        };
        let (x, hidden, _) = run_blocks(&self.layers, x, true, opts, fwd)?;
        let eos = eos_positions(host, m, s);
        // LayerNorm is per token, so only the pooled rows need it unless all are asked for.
        let (last, pooled) = if opts.hidden_states {
            let last = self.final_layer_norm.forward(&x)?;
            let pooled = last.select_rows_per_batch(&eos)?;
            (Some(last), pooled)
        } else {
            (
                None,
                self.final_layer_norm
                    .forward(&x.select_rows_per_batch(&eos)?)?,
            )
        };
        Ok(TowerOutput {
            last_hidden_state: last,
            pooled,
            hidden_states: hidden,
            layer_cls: vec![],
        })
    }
}

/// A CLIP model with HuggingFace's weight names: both towers, their projections into the shared
/// P-wide space, and the logit scale. Load one with [`ClipModel::load`]; [`ClipModel::random`] is
/// for tests and benchmarks. SD2 wraps it (`Sd2Model`).
#[derive(Clone, Debug)]
pub struct ClipModel {
    /// The configuration it was built from (validated).
    pub config: ClipConfig,
    /// The vision tower.
    pub vision: VisionTower,
    /// The text tower.
    pub text: TextTower,
    /// Vision pooled output → shared space: [P, D_vision], no bias.
    pub visual_projection: Linear,
    /// Text pooled output → shared space: [P, D_text], no bias.
    pub text_projection: Linear,
    /// ln of CLIP's logit scale (HF stores the log).
    pub logit_scale: Tensor,
}

/// Stored tensors that are buffers, not weights.
pub fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}

impl ClipModel {
    /// Builds the model from `src`, after validating `config`. Each tensor is requested by its
    /// HuggingFace name and the shape the config gives, so a store checks every shape as it loads.
    /// A random source starts `logit_scale` at `config.logit_scale_init_value`.
    pub fn from_source(config: &ClipConfig, src: &mut dyn WeightSource) -> Result<ClipModel> {
        config.validate()?;
        let p = config.projection_dim;
        Ok(ClipModel {
            config: config.clone(),
            vision: VisionTower::load(src, &config.vision_config)?,
            text: TextTower::load(src, &config.text_config)?,
            visual_projection: Linear::load(
                src,
                "visual_projection",
                p,
                config.vision_config.hidden_size,
                false,
            )?,
            text_projection: Linear::load(
                src,
                "text_projection",
                p,
                config.text_config.hidden_size,
                false,
            )?,
            logit_scale: src.get(
                "logit_scale",
                &[],
                Init::Scalar((config.logit_scale_init_value as f32).to_bits()),
            )?,
        })
    }

    /// Loads a HuggingFace CLIP folder (`config.json` + `model.safetensors` or shards). Tensors
    /// the model does not use are an error (except `position_ids` buffers).
    pub fn load(dir: &Path, dtype: DType, device: Device) -> Result<ClipModel> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let mut store = WeightStore::open(dir)?;
        let model = Self::from_source(
            &config,
            &mut StoreSource {
                store: &mut store,
                dtype,
                device,
            },
        )?;
        let extra = store.unused(is_ignored_buffer);
        if !extra.is_empty() {
            let shown: Vec<&str> = extra.iter().take(8).map(|s| s.as_str()).collect();
            return Err(Error::checkpoint(
                dir,
                format!(
                    "{} unexpected tensor(s) for a CLIP model: {}{}",
                    extra.len(),
                    shown.join(", "),
                    if extra.len() > 8 { ", …" } else { "" }
                ),
            ));
        }
        Ok(model)
    }

    /// A model with random weights ([`RandomSource`]: normal(0, 0.02), LayerNorm ones and zeros),
    /// the same for the same `seed`. For tests and benchmarks.
    pub fn random(
        config: &ClipConfig,
        dtype: DType,
        device: Device,
        seed: u64,
    ) -> Result<ClipModel> {
        Self::from_source(
            config,
            &mut RandomSource {
                dtype,
                device,
                seed,
            },
        )
    }

    /// Calls `f` on every weight with its HuggingFace name, allowing replacement (e.g. making
    /// the base weights trainable for a from-scratch run).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        fn lin(
            f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
            n: &str,
            l: &mut Linear,
        ) -> Result<()> {
            f(&format!("{n}.weight"), &mut l.weight)?;
            if let Some(b) = l.bias.as_mut() {
                f(&format!("{n}.bias"), b)?;
            }
            Ok(())
        }
        fn ln(
            f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
            n: &str,
            l: &mut LayerNorm,
        ) -> Result<()> {
            f(&format!("{n}.weight"), &mut l.weight)?;
            f(&format!("{n}.bias"), &mut l.bias)
        }
        fn layers(
            f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
            p: &str,
            ls: &mut [EncoderLayer],
        ) -> Result<()> {
            for (i, l) in ls.iter_mut().enumerate() {
                let p = format!("{p}.encoder.layers.{i}");
                for (n, x) in [
                    ("self_attn.q_proj", &mut l.q_proj),
                    ("self_attn.k_proj", &mut l.k_proj),
                    ("self_attn.v_proj", &mut l.v_proj),
                    ("self_attn.out_proj", &mut l.out_proj),
                    ("mlp.fc1", &mut l.fc1),
                    ("mlp.fc2", &mut l.fc2),
                ] {
                    lin(f, &format!("{p}.{n}"), x)?;
                }
                ln(f, &format!("{p}.layer_norm1"), &mut l.layer_norm1)?;
                ln(f, &format!("{p}.layer_norm2"), &mut l.layer_norm2)?;
            }
            Ok(())
        }
        let v = &mut self.vision;
        f(
            "vision_model.embeddings.class_embedding",
            &mut v.class_embedding,
        )?;
        f(
            "vision_model.embeddings.patch_embedding.weight",
            &mut v.patch_embedding,
        )?;
        f(
            "vision_model.embeddings.position_embedding.weight",
            &mut v.position_embedding,
        )?;
        ln(f, "vision_model.pre_layrnorm", &mut v.pre_layrnorm)?;
        layers(f, "vision_model", &mut v.layers)?;
        ln(f, "vision_model.post_layernorm", &mut v.post_layernorm)?;
        let t = &mut self.text;
        f(
            "text_model.embeddings.token_embedding.weight",
            &mut t.token_embedding,
        )?;
        f(
            "text_model.embeddings.position_embedding.weight",
            &mut t.position_embedding,
        )?;
        layers(f, "text_model", &mut t.layers)?;
        ln(f, "text_model.final_layer_norm", &mut t.final_layer_norm)?;
        lin(f, "visual_projection", &mut self.visual_projection)?;
        lin(f, "text_projection", &mut self.text_projection)
    }

    /// Every weight under its HuggingFace name (for saving in the HF layout).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        // Visiting a clone only clones tensor handles, not data.
        let visited = self.clone().visit_mut(&mut |name, t| {
            out.push((name.to_string(), t.clone()));
            Ok(())
        });
        debug_assert!(visited.is_ok());
        out.push(("logit_scale".into(), self.logit_scale.clone()));
        out
    }

    /// Projected image embeddings [B, P] (not normalized).
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        let out = self
            .vision
            .forward(pixels, TowerOptions::default(), Fwd::default())?;
        self.visual_projection.forward(&out.pooled, Fwd::default())
    }

    /// Projected text embeddings [M, P] (not normalized).
    pub fn text_embeds(&self, ids: &Tensor) -> Result<Tensor> {
        let out = self
            .text
            .forward(ids, TowerOptions::default(), Fwd::default())?;
        self.text_projection.forward(&out.pooled, Fwd::default())
    }

    /// `exp(logit_scale)·⟨img, txt⟩` of the normalized embeddings: [B, M].
    pub fn logits_per_image(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let i = image_embeds.l2_normalize()?;
        let t = text_embeds.l2_normalize()?;
        i.matmul_t(&t, false, true)?.mul(&self.logit_scale.exp()?)
    }
}
