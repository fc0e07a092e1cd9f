//! Data: manifests (`manifest`) and the synthetic forgery benchmark (`synth`).
pub mod loader;
pub mod manifest;
pub mod synth;

pub use manifest::{Item, LoadOptions, Manifest, Record, Split};
