//! Fused ops as units. Each file here is one fused op, whole: its CPU reference, its CUDA
//! launch and its autograd rule, so adding one means copying a file (`l2_normalize.rs` is the
//! pattern), writing its kernel in `kernels/` and its tests — the backend trait, the storage
//! dispatch and the CPU backend stay as they are. `run` dispatches a `FusedKernel` on the
//! storage its inputs live on.
pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod l2_normalize;
pub mod layer_norm;
pub mod lora_linear;
pub mod sigmoid_loss;
pub mod softmax;

use crate::backend::cpu::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::storage::CudaStorage;
use crate::backend::BackendStorage;
use crate::storage::Storage;
use crate::{DType, Error, Float, Result};

/// One direction (forward or backward) of a fused op: the same computation on each backend.
pub trait FusedKernel {
    /// The op's name, for errors.
    const NAME: &'static str;
    /// The CPU reference: plain, deterministic; the definition the CUDA side is tested against.
    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>>;
    /// The CUDA side: launches of the op's kernels on the inputs' device.
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>>;
}

/// Runs `k` on the backend that holds `inputs` (all on one device).
pub fn run<K: FusedKernel>(k: &K, inputs: &[&Storage]) -> Result<Vec<Storage>> {
    let Some(first) = inputs.first() else {
        return Err(Error::invalid(K::NAME, "no inputs"));
    };
    let device = first.device();
    if let Some(other) = inputs.iter().find(|s| s.device() != device) {
        return Err(Error::DeviceMismatch {
            op: K::NAME,
            lhs: device,
            rhs: other.device(),
        });
    }
    #[allow(unreachable_patterns)]
    match first {
        Storage::Cpu(_) => {
            let xs: Vec<&CpuStorage> = inputs
                .iter()
                .filter_map(|s| match s {
                    Storage::Cpu(c) => Some(c),
                    _ => None,
                })
                .collect();
            Ok(k.cpu(&xs)?.into_iter().map(Storage::Cpu).collect())
        }
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        Storage::Cuda(_) => {
            let xs: Vec<&CudaStorage> = inputs
                .iter()
                .filter_map(|s| match s {
                    Storage::Cuda(c) => Some(c),
                    _ => None,
                })
                .collect();
            Ok(k.cuda(&xs)?.into_iter().map(Storage::Cuda).collect())
        }
    }
}

/// `run` for a kernel with one output.
pub fn run_one<K: FusedKernel>(k: &K, inputs: &[&Storage]) -> Result<Storage> {
    run(k, inputs)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Msg(format!("{}: no output", K::NAME)))
}

/// `cpu_float` for a backward whose bf16 tensors come with f32 statistics: bf16 inputs are
/// computed in f32 and every output is rounded back to bf16 (f32 and f64 run as they are).
pub fn cpu_float_bf16_via_f32(
    name: &'static str,
    f: &impl FloatFn,
    inputs: &[&CpuStorage],
) -> Result<Vec<CpuStorage>> {
    if inputs.first().map(|s| s.dtype()) != Some(DType::BF16) {
        return cpu_float(name, f, inputs, &[]);
    }
    let wide: Vec<CpuStorage> = inputs
        .iter()
        .map(|s| s.cast(DType::F32))
        .collect::<Result<_>>()?;
    let refs: Vec<&CpuStorage> = wide.iter().collect();
    cpu_float(name, f, &refs, &[])?
        .iter()
        .map(|s| s.cast(DType::BF16))
        .collect()
}

/// A CPU reference written once for every float type (`Float`: f32 and f64).
pub trait FloatFn {
    /// Outputs from inputs viewed as `&[F]`.
    fn call<F: Float>(&self, inputs: &[&[F]]) -> Vec<Vec<F>>;
}

/// Runs `f` on same-dtype float inputs: f32 and f64 as they are; bf16 widened to f32, with the
/// outputs listed in `round` rounded back to bf16 (the others stay f32, as saved statistics do).
pub fn cpu_float(
    name: &'static str,
    f: &impl FloatFn,
    inputs: &[&CpuStorage],
    round: &[bool],
) -> Result<Vec<CpuStorage>> {
    let dt = inputs.first().map_or(DType::F32, |s| s.dtype());
    if let Some(bad) = inputs.iter().find(|s| s.dtype() != dt) {
        return Err(Error::DTypeMismatch {
            op: name,
            lhs: dt,
            rhs: bad.dtype(),
        });
    }
    match dt {
        DType::F32 => {
            let xs: Vec<&[f32]> = inputs.iter().map(|s| s.as_slice()).collect::<Result<_>>()?;
            Ok(f.call(&xs).into_iter().map(CpuStorage::F32).collect())
        }
        DType::F64 => {
            let xs: Vec<&[f64]> = inputs.iter().map(|s| s.as_slice()).collect::<Result<_>>()?;
            Ok(f.call(&xs).into_iter().map(CpuStorage::F64).collect())
        }
        DType::BF16 => {
            let wide: Vec<Vec<f32>> = inputs
                .iter()
                .map(|s| s.as_slice::<half::bf16>().map(crate::backend::cpu::widen))
                .collect::<Result<_>>()?;
            let xs: Vec<&[f32]> = wide.iter().map(|v| v.as_slice()).collect();
            Ok(f.call(&xs)
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    if round.get(i).copied().unwrap_or(true) {
                        CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect())
                    } else {
                        CpuStorage::F32(v)
                    }
                })
                .collect())
        }
        d => Err(Error::UnsupportedDType { op: name, dtype: d }),
    }
}
