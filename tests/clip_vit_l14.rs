//! A real-size openai/clip-vit-large-patch14 folder loads and matches transformers. Ignored by
//! default (it needs a 1.7 GB checkpoint that is not in the repo):
//!
//! ```sh
//! .venv-ref/bin/python scripts/reference/make_vit_l14_random.py      # random init, HF layout
//! cargo test --release --test clip_vit_l14 -- --ignored             # or SD2_CLIP_L14_DIR=DIR
//! ```
#[path = "common/clip.rs"]
mod clip_common;

use clip_common::{compare, load_map};
use sd2::clip::{ClipConfig, ClipModel};
use sd2::{DType, Device};

#[test]
#[ignore = "needs a full-size checkpoint: see scripts/reference/make_vit_l14_random.py"]
fn full_size_vit_l14_loads_and_matches_transformers() {
    let dir = std::env::var("SD2_CLIP_L14_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/clip-vit-l14-random")
        });
    let model = ClipModel::load(&dir, DType::F32, Device::Cpu).unwrap();
    assert_eq!(
        model.config.vision_config,
        ClipConfig::vit_l14().vision_config
    );
    assert_eq!(model.config.text_config.hidden_size, 768);
    let exp = load_map(&dir.join("expected.safetensors"));
    let ie = model.image_embeds(&exp["pixel_values"]).unwrap();
    let te = model.text_embeds(&exp["input_ids"]).unwrap();
    compare("ViT-L/14 image_embeds", &ie, &exp["image_embeds"], 1e-5);
    compare("ViT-L/14 text_embeds", &te, &exp["text_embeds"], 1e-5);
    compare(
        "ViT-L/14 logits_per_image",
        &model.logits_per_image(&ie, &te).unwrap(),
        &exp["logits_per_image"],
        1e-5,
    );
    // The tokenizer agrees with the ids the reference used.
    let tk = sd2::clip::ClipTokenizer::openai().unwrap();
    let ids = tk
        .tokenize_batch(
            &[
                "a photo of a real face",
                "a photo of a Face Swapping forgery",
                "indoor, warm light, plain wall",
            ],
            77,
            Device::Cpu,
        )
        .unwrap();
    assert_eq!(
        ids.to_vec::<i64>().unwrap(),
        exp["input_ids"].to_vec::<i64>().unwrap()
    );
}
