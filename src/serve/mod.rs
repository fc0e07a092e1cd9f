//! Serving SD2: `batcher` groups face crops from concurrent requests into full model batches
//! (usable without HTTP).
pub mod batcher;

pub use batcher::{BatchConfig, BatchStats, Batcher};
