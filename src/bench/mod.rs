//! Every benchmark of sd2 in one place, each validated against a reference on the same inputs
//! before it is timed:
//! - `kernels` (feature `cuda`): the GPU kernel families with their numbered variants — flash
//!   attention, the plain GEMMs, the LoRA-linear GEMM — beside cuBLAS on the same shapes (CUDA
//!   events, median, L2 flushed where it matters); PyTorch's side comes from `scripts/`.
//! - `model`: SD2 train steps and inference at a preset's size on any device, with FLOPs per
//!   image, MFU, peak memory and a profiled step.
//! - `loader`: the data loader's images/s, decode and augmentations.
//! - `serve` (feature `server`): `sd2 serve` under load from concurrent clients, unbatched
//!   against dynamic batching.
//! - `plan`: the launch plan of one step (launches, bytes, FLOPs by op class, roofline bound)
//!   recorded on `cuda:plan` without a GPU.
//!
//! The `sd2 bench …` commands print their tables; `benches/` holds the CPU comparisons with
//! PyTorch and a `cargo bench` entry for the LoRA table.
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod loader;
pub mod model;
pub mod plan;
#[cfg(feature = "server")]
pub mod serve;
