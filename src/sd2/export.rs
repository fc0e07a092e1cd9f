//! Export of the LoRA adapters in peft's format (`adapter_config.json` +
//! `adapter_model.safetensors` with peft's key names), so a PyTorch user can load them into
//! transformers' `CLIPModel` with `PeftModel.from_pretrained`. CLAM, the adapter and the loss
//! scalars are not part of a peft LoRA; they stay in sd2's own checkpoint.
use std::path::Path;

use super::model::Sd2Model;
use crate::{Error, Result, Tensor};

/// Writes the model's LoRA adapters to `dir` in peft's format: `adapter_config.json` (rank, alpha,
/// dropout, target modules, and `base_model` as `base_model_name_or_path`) and
/// `adapter_model.safetensors` (every A and B factor in f32, under peft's key names). With adapters
/// on both towers the targets are the list of layer names; on one tower, a regex that only matches
/// that tower's blocks.
///
/// Errors: `Error::Config` for a `train_base` model (its CLIP weights are not the base an adapter
/// would be applied to), `Error::InvalidInput` for a model without adapters, and write errors.
pub fn export_peft(model: &Sd2Model, dir: &Path, base_model: &str) -> Result<()> {
    // An adapter applied to the released base would not give this model's outputs.
    if model.cfg.train_base {
        return Err(Error::Config {
            key: "sd2.train_base".into(),
            msg: "the model's CLIP weights were trained too (train_base = true): a PEFT \
                  adapter on the original base would not reproduce it"
                .into(),
        });
    }
    let l = &model.cfg.lora;
    let lora: Vec<(&str, &Tensor)> = model
        .params()
        .iter()
        .filter(|p| p.name.contains(".lora_"))
        .map(|p| (p.name.as_str(), &p.tensor))
        .collect();
    if lora.is_empty() {
        return Err(Error::invalid(
            "peft export",
            "the model has no LoRA adapters",
        ));
    }
    // Both towers: a list matches by module-name suffix; one tower: a regex peft full-matches.
    let targets = if l.vision && l.text {
        serde_json::json!(l.targets)
    } else {
        let tower = if l.vision {
            "vision_model"
        } else {
            "text_model"
        };
        serde_json::json!(format!(
            r".*{tower}\.encoder\.layers\.\d+\..*\.({})",
            l.targets.join("|")
        ))
    };
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base_model,
        "r": l.rank,
        "lora_alpha": l.alpha,
        "lora_dropout": l.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
    crate::fs::write_atomic(&dir.join("adapter_config.json"), text)?;
    let f32s: Vec<(&str, Tensor)> = lora
        .iter()
        .map(|(n, t)| Ok((*n, t.to_dtype(crate::DType::F32)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &Tensor)> = f32s.iter().map(|(n, t)| (*n, t)).collect();
    crate::io::save(&dir.join("adapter_model.safetensors"), &refs, None)
}
