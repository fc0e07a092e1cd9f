//! LoRA on both CLIP towers (SD2-SPEC §3): an adapter `s·(drop(x)·Aᵀ)·Bᵀ` on each target
//! projection of every block, A Kaiming-uniform (as peft: bound 1/√fan_in), B zero — so training
//! starts exactly at CLIP. Parameter names are peft's saved names, so export is a rename-free copy.
use super::config::LoraConfig;
use crate::clip::model::{site_id, LoraAdapter};
use crate::clip::ClipModel;
use crate::optim::Param;
use crate::rng::mix64;
use crate::{Result, Tensor};

/// HF path of a block's linear layer.
fn layer_path(tower: &str, i: usize, name: &str) -> String {
    let group = if name.ends_with("_proj") {
        "self_attn"
    } else {
        "mlp"
    };
    format!("{tower}.encoder.layers.{i}.{group}.{name}")
}

/// peft's key for a LoRA matrix ("A" or "B") of a layer path.
pub fn peft_key(path: &str, which: &str) -> String {
    format!("base_model.model.{path}.lora_{which}.weight")
}

/// Attaches fresh adapters and returns them as trainable parameters (A then B per layer).
pub fn attach(
    clip: &mut ClipModel,
    cfg: &LoraConfig,
    seed: u64,
    dtype: crate::DType,
) -> Result<Vec<Param>> {
    let mut params = vec![];
    let device = clip.logit_scale.device();
    let towers = [
        ("vision_model", cfg.vision, &mut clip.vision.layers),
        ("text_model", cfg.text, &mut clip.text.layers),
    ];
    for (tower, on, layers) in towers {
        if !on {
            continue;
        }
        for (i, layer) in layers.iter_mut().enumerate() {
            for (name, lin) in layer.linears_mut() {
                if !cfg.targets.iter().any(|t| t == name) {
                    continue;
                }
                let path = layer_path(tower, i, name);
                let (out, inp) = (lin.weight.dims()[0], lin.weight.dims()[1]);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = Tensor::rand_uniform(
                    (cfg.rank, inp),
                    -bound,
                    bound,
                    dtype,
                    device,
                    mix64(seed ^ site_id(&path)),
                )?
                .into_trainable();
                let b = Tensor::zeros((out, cfg.rank), dtype, device)?.into_trainable();
                params.push(Param::new(peft_key(&path, "A"), a.clone(), true));
                params.push(Param::new(peft_key(&path, "B"), b.clone(), true));
                lin.lora = Some(LoraAdapter {
                    a,
                    b,
                    scale: cfg.scale(),
                    dropout: cfg.dropout,
                });
            }
        }
    }
    Ok(params)
}
