//! The named presets — `tiny` (the demo's random-init CLIP, trained whole) and `vit-l14`
//! (SD2's recipe on CLIP ViT-L/14) — in one place, so `sd2 train`, `sd2 demo`, `sd2 bench` and
//! the tests build the same models.
use crate::clip::ClipConfig;
use crate::data::augment::AugmentConfig;
use crate::sd2::train::TrainConfig;
use crate::sd2::Sd2Config;
use crate::{Error, Result};

/// The preset names, for messages and command-line help.
pub const NAMES: [&str; 2] = ["tiny", "vit-l14"];

/// Everything a preset fixes: the CLIP architecture, SD2's options, the optimizer settings and
/// the training augmentations.
#[derive(Clone, Debug)]
pub struct Preset {
    /// The CLIP architecture (towers, widths, image size, context length).
    pub clip: ClipConfig,
    /// SD2's own options (CLAM heads, loss weights, whether CLIP trains too).
    pub sd2: Sd2Config,
    /// Optimizer and batch settings for `sd2 train`.
    pub train: TrainConfig,
    /// The training augmentations.
    pub augment: AugmentConfig,
}

/// The preset called `name`; an unknown name is an error listing the known ones.
pub fn get(name: &str) -> Result<Preset> {
    match name {
        "tiny" => Ok(Preset {
            clip: tiny_clip_config(),
            sd2: tiny_sd2_config(),
            train: tiny_train_config(),
            augment: tiny_augment_config(),
        }),
        "vit-l14" => Ok(Preset {
            clip: ClipConfig::vit_l14(),
            sd2: Sd2Config::default(),
            train: TrainConfig::default(),
            augment: AugmentConfig::default(),
        }),
        other => Err(Error::Msg(format!(
            "unknown preset `{other}` (known: {})",
            NAMES.join(", ")
        ))),
    }
}

/// The `tiny` preset's CLIP: 64 px images, 8 px patches, 4 + 2 layers of width 64, 32-token texts.
pub fn tiny_clip_config() -> ClipConfig {
    ClipConfig::from_json(
        r#"{"projection_dim": 64,
            "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4, "image_size": 64, "patch_size": 8},
            "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 32}}"#,
    )
    .expect("tiny preset config")
}

/// The `tiny` preset's SD2 options: 4 CLAM heads, and every CLIP weight trained too
/// (`train_base`: LoRA alone has nothing to adapt on a randomly initialized CLIP).
pub fn tiny_sd2_config() -> Sd2Config {
    Sd2Config {
        clam_heads: 4,
        train_base: true,
        ..Default::default()
    }
}

/// The `tiny` preset's optimizer settings: a from-scratch model needs a far larger learning rate
/// than LoRA on a pretrained CLIP, and the fixed class phrasing (a random text tower knows no
/// paraphrases; drawing from ≥ 9 per class kept L_C at ln 5 for whole runs).
pub fn tiny_train_config() -> TrainConfig {
    TrainConfig {
        lr: 1e-3,
        micro_batch: 32,
        effective_batch: 32,
        sample_type_texts: false,
        ..Default::default()
    }
}

/// The `tiny` preset's augmentations: flip and brightness/contrast only. At 64 px the spec's
/// resampling augmentations (rotation, resize, blur, JPEG) smear the few-pixel forgery traces
/// the tiny model has to find within the demo's budget; they stay on for `vit-l14`.
pub fn tiny_augment_config() -> AugmentConfig {
    AugmentConfig::light()
}
