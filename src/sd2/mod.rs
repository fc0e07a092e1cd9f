//! SD2 on top of CLIP (SD2-SPEC §3–5): LoRA on both towers (`lora`), the cross-layer CLS
//! attention module and adapter (`clam`), type texts (`type_texts`), the model and its three
//! losses (`model`), configuration (`config`), training (`train`) and its crash-safe
//! checkpoints (`checkpoint`).
pub mod checkpoint;
pub mod clam;
pub mod config;
pub mod detector;
pub mod export;
pub mod lora;
pub mod model;
pub mod train;
pub mod type_texts;

pub use config::{DualContrast, LoraConfig, Sd2Config};
pub use model::{Losses, Sd2Batch, Sd2Model};
pub use type_texts::{TypeTexts, CLASSES};
