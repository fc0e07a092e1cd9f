//! sd2: a Rust runtime that trains and serves SD2, a CLIP-ViT-L/14 deepfake detector.
//!
//! This crate is built bottom-up. Today it holds the engine everything else stands on:
//! - [`Tensor`]: contiguous, row-major, shared storage, with a shape, a [`DType`] and a [`Device`];
//! - [`backend`]: the op interface; the CPU backend is the numerical reference;
//! - [`ops`]: differentiable ops, including the fused ones SD2 needs (LoRA-linear, multi-head
//!   attention with a saved log-sum-exp, the sigmoid contrastive loss);
//! - [`autograd`]: a reverse-mode tape with gradients keyed by tensor id.
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
pub mod ablation;
pub mod autograd;
pub mod backend;
pub mod bench;
pub mod clip;
pub mod data;
pub mod demo;
pub mod device;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod faces;
pub mod fs;
pub mod io;
pub mod ops;
pub mod optim;
pub mod presets;
pub mod profile;
pub mod rng;
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
