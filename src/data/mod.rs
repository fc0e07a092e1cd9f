//! Data: manifests (`manifest`) and the synthetic forgery benchmark (`synth`).
pub mod manifest;

pub use manifest::{Item, LoadOptions, Manifest, Record, Split};
