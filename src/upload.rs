//! Host-to-device copies that do not wait: `Tensor::to_device_async` and its `Upload`. Here, in
//! the tensor layer, so the CUDA runtime (`backend::cuda`) needs no tensors.
/// A host tensor on its way to a device (`Tensor::to_device_async`): on a GPU the copy runs on
/// the copy stream from pinned memory while the compute stream works; elsewhere it is done.
pub struct Upload {
    inner: UploadInner,
}

enum UploadInner {
    Ready(crate::Tensor),
    #[cfg(feature = "cuda")]
    Copying {
        staged: crate::backend::cuda::gpu::Staged,
        shape: crate::Shape,
        dtype: crate::DType,
        len: usize,
    },
}

impl Upload {
    /// The tensor; later launches on its device run after the copy (the host does not wait).
    pub fn wait(self) -> crate::Result<crate::Tensor> {
        match self.inner {
            UploadInner::Ready(t) => Ok(t),
            #[cfg(feature = "cuda")]
            UploadInner::Copying {
                staged,
                shape,
                dtype,
                len,
            } => crate::Tensor::from_storage(
                crate::storage::Storage::Cuda(
                    crate::backend::cuda::storage::CudaStorage::from_device(
                        staged.finish()?,
                        dtype,
                        len,
                    ),
                ),
                shape,
            ),
        }
    }
}

impl crate::Tensor {
    /// Starts copying this tensor to `device` and returns at once on a GPU (pinned staging, the
    /// copy stream); `Upload::wait` gives the tensor. Stage batch k+1 before queuing step k so
    /// its copy overlaps step k's kernels. Elsewhere the same as `to_device`.
    pub fn to_device_async(&self, device: crate::Device) -> crate::Result<Upload> {
        #[cfg(feature = "cuda")]
        if let crate::Device::Cuda(o) = device {
            if self.device() == crate::Device::Cpu {
                use crate::backend::cpu::CpuStorage;
                use crate::storage::Storage;
                // Read in place: the pinned staging copy is the only copy.
                let guard = self.storage();
                let bytes: &[u8] = match &*guard {
                    Storage::Cpu(CpuStorage::F32(v)) => bytemuck::cast_slice(v),
                    Storage::Cpu(CpuStorage::BF16(v)) => bytemuck::cast_slice(v),
                    Storage::Cpu(CpuStorage::I64(v)) => bytemuck::cast_slice(v),
                    Storage::Cpu(CpuStorage::U32(v)) => bytemuck::cast_slice(v),
                    _ => {
                        return Err(crate::Error::UnsupportedDType {
                            op: "to cuda (f64 stays on the CPU; cast to f32 or bf16 first)",
                            dtype: self.dtype(),
                        })
                    }
                };
                let staged = crate::backend::cuda::gpu::Gpu::get(o)?.stage(bytes)?;
                return Ok(Upload {
                    inner: UploadInner::Copying {
                        staged,
                        shape: self.shape().clone(),
                        dtype: self.dtype(),
                        len: self.elem_count(),
                    },
                });
            }
        }
        Ok(Upload {
            inner: UploadInner::Ready(self.to_device(device)?),
        })
    }
}
