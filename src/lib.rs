//! sd2: a Rust runtime that trains and serves SD2, a CLIP-ViT-L/14 deepfake detector.
//!
//! This crate is built bottom-up. Today it holds the engine everything else stands on:
//! - [`Tensor`]: contiguous, row-major, shared storage, with a shape, a [`DType`] and a [`Device`];
//! - [`backend`]: the op interface; the CPU backend is the numerical reference;
//! - [`ops`]: differentiable ops, including the fused ones SD2 needs (LoRA-linear, multi-head
//!   attention with a saved log-sum-exp, the sigmoid contrastive loss);
//! - [`autograd`]: a reverse-mode tape with gradients keyed by tensor id.
pub mod autograd;
pub mod backend;
pub mod device;
pub mod dtype;
pub mod error;
pub mod ops;
pub mod rng;
pub mod shape;
pub mod storage;
pub mod tensor;

pub use autograd::{no_grad, GradStore};
pub use device::Device;
pub use dtype::{DType, Float, WithDType};
pub use error::{Error, Result};
pub use shape::Shape;
pub use tensor::{Tensor, TensorId};
