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

/// `src` rounded to bf16 (as `half::bf16::from_f32`), written as little-endian bytes into
/// `dst` [2·len], in parallel: the form a batch takes in pinned memory.
pub fn bf16_bytes_into(src: &[f32], dst: &mut [u8]) {
    use rayon::prelude::*;
    dst.par_chunks_exact_mut(2)
        .zip(src.par_iter())
        .for_each(|(d, x)| d.copy_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes()));
}

/// Starts copying f32 host values `pixels` (of `shape`) to `device` as `dtype`: on a GPU the
/// values are written (bf16: converted) straight into pinned staging memory, with no host
/// tensor in between; elsewhere a host tensor is made and moved as `to_device` does.
pub fn upload_f32(
    pixels: Vec<f32>,
    shape: impl Into<crate::Shape>,
    dtype: crate::DType,
    device: crate::Device,
) -> crate::Result<Upload> {
    let shape: crate::Shape = shape.into();
    #[cfg(feature = "cuda")]
    if let (crate::Device::Cuda(o), crate::DType::F32 | crate::DType::BF16) = (device, dtype) {
        if shape.elem_count() != pixels.len() {
            return Err(crate::Error::invalid(
                "upload",
                format!("{} values for shape {shape:?}", pixels.len()),
            ));
        }
        let gpu = crate::backend::cuda::gpu::Gpu::get(o)?;
        let staged = if dtype == crate::DType::BF16 {
            gpu.stage_with(pixels.len() * 2, &mut |dst| bf16_bytes_into(&pixels, dst))?
        } else {
            gpu.stage(bytemuck::cast_slice(&pixels))?
        };
        let len = pixels.len();
        return Ok(Upload {
            inner: UploadInner::Copying {
                staged,
                shape,
                dtype,
                len,
            },
        });
    }
    let t = match dtype {
        crate::DType::BF16 => {
            use rayon::prelude::*;
            let v: Vec<half::bf16> = pixels
                .par_iter()
                .map(|x| half::bf16::from_f32(*x))
                .collect();
            crate::Tensor::from_vec(v, shape, crate::Device::Cpu)?
        }
        _ => crate::Tensor::from_vec(pixels, shape, crate::Device::Cpu)?.to_dtype(dtype)?,
    };
    t.to_device_async(device)
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

#[cfg(test)]
mod tests {
    #[test]
    fn bf16_bytes_are_half_s_rounding() {
        let src: Vec<f32> = (0..1000)
            .map(|i| (i as f32 - 500.0) * 0.0137 + if i == 7 { f32::NAN } else { 0.0 })
            .chain([f32::INFINITY, -0.0, 1e-40, 3.4e38])
            .collect();
        let mut dst = vec![0u8; src.len() * 2];
        super::bf16_bytes_into(&src, &mut dst);
        for (i, x) in src.iter().enumerate() {
            let got = u16::from_le_bytes([dst[2 * i], dst[2 * i + 1]]);
            assert_eq!(got, half::bf16::from_f32(*x).to_bits(), "value {i}: {x}");
        }
    }
}
