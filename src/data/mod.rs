//! Data: manifests (`manifest`), loading with augmentation (`loader`, `augment`), the
//! synthetic forgery benchmark (`synth`), and datasets prepared by DeepfakeBench (`import`).
pub mod augment;
pub mod import;
pub mod loader;
pub mod manifest;
pub mod synth;

pub use manifest::{Item, LoadOptions, Manifest, Record, Split};
