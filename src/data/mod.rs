//! Data: manifests (`manifest`), loading with augmentation (`loader`, `augment`) and the
//! synthetic forgery benchmark (`synth`).
pub mod augment;
pub mod loader;
pub mod manifest;
pub mod synth;

pub use manifest::{Item, LoadOptions, Manifest, Record, Split};
