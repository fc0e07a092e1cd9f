//! The CUDA device runtime. Tensors on `Device::Cuda` arrive with the CUDA backend issue; this
//! module already owns the probing that must happen before cudarc is touched (cudarc panics when
//! libcuda is missing), so `sd2 info` can say whether a GPU is usable.
use crate::{Error, Result};

/// What the driver reports about one GPU.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_mem: usize,
}

/// Whether this build has the CUDA runtime compiled in.
pub const COMPILED: bool = cfg!(feature = "cuda");

#[cfg(feature = "cuda")]
pub fn probe() -> Result<Vec<GpuInfo>> {
    // SAFETY: only checks whether the shared library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "libcuda not found (no NVIDIA driver on this machine)".into(),
        ));
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::Cuda(format!("device count: {e}")))?;
    let mut out = vec![];
    for ordinal in 0..count.max(0) as usize {
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| Error::Cuda(format!("cuda:{ordinal}: {e}")))?;
        out.push(GpuInfo {
            ordinal,
            name: ctx.name().map_err(|e| Error::Cuda(e.to_string()))?,
            total_mem: ctx.total_mem().map_err(|e| Error::Cuda(e.to_string()))?,
        });
    }
    Ok(out)
}

#[cfg(not(feature = "cuda"))]
pub fn probe() -> Result<Vec<GpuInfo>> {
    Err(Error::CudaNotCompiled(0))
}

/// Checks that `cuda:ordinal` can hold tensors in this build.
pub fn check_device(ordinal: usize) -> Result<()> {
    if !COMPILED {
        return Err(Error::CudaNotCompiled(ordinal));
    }
    let gpus = probe()?;
    if ordinal >= gpus.len() {
        return Err(Error::Cuda(format!(
            "cuda:{ordinal}: only {} GPU(s) visible",
            gpus.len()
        )));
    }
    Err(Error::Cuda(format!(
        "cuda:{ordinal}: the GPU is usable, but CUDA tensor storage is not implemented yet in this build (CUDA backend I)"
    )))
}
