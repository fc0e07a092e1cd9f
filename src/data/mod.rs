//! Data: manifests (`manifest`), loading with augmentation (`loader`, `augment`), the
//! synthetic forgery benchmark (`synth`), datasets prepared by DeepfakeBench (`import`),
//! WebDataset shards (`shards`), and zero-shot CLIP descriptions (`describe`).
pub mod augment;
pub mod describe;
pub mod import;
pub mod loader;
pub mod manifest;
pub mod shards;
pub mod synth;

pub use manifest::{Item, LoadOptions, Manifest, Record, Split};
