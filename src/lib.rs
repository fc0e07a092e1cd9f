//! sd2: a Rust runtime that trains and serves SD2, a CLIP-ViT-L/14 deepfake detector (LoRA on
//! both CLIP towers, cross-layer CLS attention, type-text classification, a text-label
//! separation loss and a dual SigLIP-style contrast with face and environment descriptions).
//!
//! The detector, from a checkpoint:
//!
//! ```no_run
//! # fn main() -> sd2::Result<()> {
//! use sd2::{DType, Detector, Device, FaceConfig, FaceDetector};
//! let det = Detector::builder("runs/x/checkpoints/best")
//!     .clip("models/clip-vit-large-patch14") // not needed for a checkpoint that trained CLIP
//!     .device(Device::Cpu)
//!     .dtype(DType::F32)
//!     .batch_size(32) // larger inputs are split into model calls of 32
//!     .build()?;
//! let bytes = std::fs::read("photo.jpg")?;
//! let whole = det.detect_bytes(&bytes)?; // the image scored whole
//! println!("{} fake={}", whole.label, det.is_fake(&whole)); // at the validation threshold
//! let mut faces = FaceDetector::new(FaceConfig::default())?;
//! let img = sd2::clip::preprocess::decode_image_bytes(&bytes, "photo.jpg")?;
//! let verdict = det.detect_faces(&mut faces, &img)?; // each face cropped and scored
//! println!("{}", serde_json::to_string(&verdict).unwrap());
//! # Ok(())
//! # }
//! ```
//!
//! Errors are [`Error`]s: match on their kinds (`Read`/`Write` with the path and the
//! `std::io::Error`, `Checkpoint`, `Media`, `Parse`, `InvalidInput`, `Config`, `Mismatch`,
//! …); [`Error::is_not_found`] tells a missing file from a broken one. The library never
//! prints; the `sd2` binary does.
//!
//! Features: none are needed for the detector, training and the PEFT export
//! (`default-features = false`); `cli` (default) adds what the `sd2` command uses — config-file
//! training runs (`run`), the demo, ablations, plots; `server` (default) the HTTP server;
//! `cuda` the GPU; `cuda-sim` the kernel simulator (off by default, on in `cargo test`: the
//! devices `cuda:sim` and `cuda:plan`); `dlib` aligned face crops.
//!
//! Layers, bottom up:
//! - [`Tensor`]: contiguous, row-major, shared storage, with a shape, a [`DType`] and a [`Device`];
//! - [`backend`]: the op interface; the CPU backend is the numerical reference, `cuda` (feature)
//!   runs the kernels of `kernels/*.cu`, `cuda:sim` the same kernels on the CPU;
//! - [`ops`]: differentiable ops, including the fused ones SD2 needs (LoRA-linear, flash
//!   attention, the sigmoid contrastive loss);
//! - [`autograd`]: a reverse-mode tape with gradients keyed by tensor id;
//! - [`clip`]: CLIP (HF layout, bit-exact preprocessing); [`sd2`]: the model, its losses,
//!   training, checkpoints, the detector and the PEFT export;
//! - [`data`]: manifests, augmentations, the loader, WebDataset shards, dataset import;
//!   [`faces`], [`video`]: face crops from photos and videos; [`serve`]: the HTTP server;
//!   `run` (feature `cli`): the training loop `sd2 train` runs.
//!
//! The engine alone:
//!
//! ```
//! use sd2::ops::{self, Lora};
//! use sd2::{DType, Device, Tensor};
//!
//! # fn main() -> sd2::Result<()> {
//! let dev = Device::Cpu;
//! let x = Tensor::randn((4, 8), 1.0, DType::F32, dev, 0)?;
//! let w = Tensor::randn((16, 8), 0.1, DType::F32, dev, 1)?; // frozen
//! let a = Tensor::randn((2, 8), 0.1, DType::F32, dev, 2)?.into_trainable();
//! let b = Tensor::zeros((16, 2), DType::F32, dev)?.into_trainable();
//! let lora = Lora { a: &a, b: &b, scale: 4.0, dropout: 0.0, seed: 0 };
//! let y = ops::lora_linear(&x, &w, None, Some(lora))?;
//! let loss = y.sqr()?.mean_all()?;
//! let grads = loss.backward()?;
//! assert!(grads.get(&a).is_some() && grads.get(&b).is_some());
//! assert!(grads.get(&w).is_none()); // frozen weights get no gradient
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

#[cfg(feature = "cli")]
pub mod ablation;
pub mod autograd;
pub mod backend;
pub mod bench;
pub mod clip;
pub mod data;
#[cfg(feature = "cli")]
pub mod demo;
pub mod device;
pub mod dist;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod faces;
pub mod fs;
pub mod io;
pub mod ops;
pub mod optim;
pub mod parity;
pub mod presets;
pub mod profile;
pub mod rng;
#[cfg(feature = "cli")]
pub mod run;
pub mod sd2;
pub mod serve;
pub mod shape;
pub mod storage;
pub mod tensor;
pub mod upload;
pub mod video;

pub use autograd::{checkpoint, no_grad, GradStore};
pub use device::Device;
pub use dtype::{DType, Float, WithDType};
pub use error::{Error, Result};
pub use shape::Shape;
pub use tensor::{Tensor, TensorId};

pub use crate::sd2::detector::{
    Class, Detector, DetectorBuilder, ImageVerdict, Prediction, VideoVerdict,
};
pub use crate::sd2::export::export_peft;
pub use crate::sd2::train::{TrainConfig, Trainer};
pub use crate::sd2::{Sd2Config, Sd2Model};
pub use clip::preprocess::RgbImage;
pub use clip::ClipModel;
pub use faces::{FaceConfig, FaceDetector};
