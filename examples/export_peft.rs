//! Exporting SD2's LoRA adapters for PyTorch: a small random CLIP saved as a HuggingFace
//! folder, an SD2 model with LoRA on it, and the adapters written in PEFT's format
//! (`PeftModel.from_pretrained(CLIPModel.from_pretrained(CLIP_DIR), OUT)` loads them).
//!
//!     cargo run --release --example export_peft -- [OUT_DIR]
use sd2::{export_peft, ClipModel, DType, Device, Sd2Config, Sd2Model, Tensor};

fn main() -> sd2::Result<()> {
    let out = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/example-peft".into()),
    );
    let clip_dir = out.join("base-clip");
    std::fs::create_dir_all(&clip_dir).map_err(|e| sd2::Error::Msg(e.to_string()))?;
    let cfg_json = r#"{"projection_dim": 16,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 28, "patch_size": 14},
        "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}}"#;
    let clip = ClipModel::random(
        &sd2::clip::ClipConfig::from_json(cfg_json)?,
        DType::F32,
        Device::Cpu,
        1,
    )?;
    let named = clip.named_tensors();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sd2::io::save(&clip_dir.join("model.safetensors"), &refs, None)?;
    sd2::fs::write_atomic(&clip_dir.join("config.json"), cfg_json)?;
    // LoRA on both towers, the CLIP weights frozen: what PEFT can represent.
    let mut cfg = Sd2Config {
        clam_heads: 2,
        ..Default::default()
    };
    cfg.lora.rank = 4;
    let model = Sd2Model::new(ClipModel::load(&clip_dir, DType::F32, Device::Cpu)?, cfg, 0)?;
    let adapter = out.join("adapter");
    export_peft(&model, &adapter, &clip_dir.display().to_string())?;
    println!(
        "PEFT adapter for {} → {}",
        clip_dir.display(),
        adapter.display()
    );
    Ok(())
}
