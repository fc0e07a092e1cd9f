//! CLIP (HuggingFace layout) on the engine: config, both towers, weights, tokenizer and image
//! preprocessing. SD2-SPEC §2.
pub mod config;
pub mod embed;
pub mod model;
pub mod preprocess;
pub mod text_clean;
pub mod tokenizer;

pub use config::{ClipConfig, TextConfig, VisionConfig};
pub use model::{ClipModel, Fwd, Linear, LoraAdapter, TowerOptions, TowerOutput};
pub use tokenizer::ClipTokenizer;
