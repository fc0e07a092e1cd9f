//! CLIP (HuggingFace layout) on the engine: config, both towers, weights, tokenizer and image
//! preprocessing. SD2-SPEC §2.
pub mod text_clean;
pub mod tokenizer;

pub use tokenizer::ClipTokenizer;
