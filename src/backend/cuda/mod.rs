//! The CUDA side: the GPU runtime (`gpu`, feature `cuda`), the kernel simulator (`sim`, feature
//! `cuda-sim`), one launch API over both (`launch::Runner`), the caching allocator, and the
//! compiled kernels' resource reports. Tensor storage on `Device::Cuda` (`storage`, with feature
//! `cuda` or `cuda-sim`) runs the engine's ops as launches on a GPU, the simulator or the
//! `cuda:plan` recorder (`plan`).
use crate::{Error, Result};

/// What the driver reports about one GPU.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    /// The device index, as in `cuda:N`.
    pub ordinal: usize,
    /// The device name the driver reports (for example `NVIDIA H200`).
    pub name: String,
    /// Total device memory, bytes.
    pub total_mem: usize,
}

/// Whether this build has the CUDA runtime compiled in.
pub const COMPILED: bool = cfg!(feature = "cuda");

/// Every GPU the driver sees, in ordinal order. An empty list when the driver reports none;
/// `Error::Cuda` when the driver library cannot be used or a GPU cannot be opened, including
/// one older than compute capability 8.0 (sd2's kernels need 8.0). Opens each GPU
/// (`gpu::Gpu::get`), so later calls reuse the context.
#[cfg(feature = "cuda")]
pub fn probe() -> Result<Vec<GpuInfo>> {
    let count = match gpu::Gpu::get(0) {
        Ok(_) => cudarc::driver::CudaContext::device_count()
            .map_err(|e| Error::Cuda(format!("device count: {e}")))?
            .max(0) as usize,
        Err(e) if e.to_string().contains("only 0 GPU") => return Ok(vec![]),
        // As it is: re-wrapping an Error::Cuda doubled its "cuda: " prefix.
        Err(e) => return Err(e),
    };
    (0..count)
        .map(|ordinal| {
            let g = gpu::Gpu::get(ordinal)?;
            Ok(GpuInfo {
                ordinal,
                name: g.name.clone(),
                total_mem: g
                    .context()
                    .total_mem()
                    .map_err(|e| Error::Cuda(e.to_string()))?,
            })
        })
        .collect()
}

/// Every GPU the driver sees; in this build (no feature `cuda`) always
/// `Error::CudaNotCompiled`.
#[cfg(not(feature = "cuda"))]
pub fn probe() -> Result<Vec<GpuInfo>> {
    Err(Error::CudaNotCompiled(0))
}

/// Checks that `cuda:ordinal` (or `cuda:sim`) can hold tensors in this build and machine.
pub fn check_device(ordinal: usize) -> Result<()> {
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    {
        storage::runner_for(ordinal).map(|_| ())
    }
    #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
    {
        Err(Error::CudaNotCompiled(ordinal))
    }
}

pub mod abi;
pub mod alloc;
pub mod flash;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kernels;
pub mod launch;
pub mod lora_gemm;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod plan;
#[cfg(feature = "cuda-sim")]
pub mod sim;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub mod storage;

/// Device memory of a GPU device as this process sees it: bytes in use by tensors, the peak in
/// use since the last `reset_peak`, bytes cached by the allocator, and bytes the driver has
/// free. None for the CPU, the simulator, or a build without feature `cuda`; for `cuda:plan`, its
/// virtual memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes held by live buffers, counted in allocator size classes (so a little above the
    /// tensors' own bytes); for `cuda:plan`, virtual bytes.
    pub in_use: usize,
    /// The highest `in_use` since the last `reset_peak` (or since the device was first used).
    pub peak: usize,
    /// Bytes of freed blocks the caching allocator keeps for reuse (0 for `cuda:plan`).
    pub cached: usize,
    /// Bytes the driver reports free (`cuMemGetInfo`; cached blocks are not free there); for
    /// `cuda:plan`, 141 GiB minus `in_use`.
    pub driver_free: usize,
}

impl DeviceMemory {
    /// What tensors could occupy: in use now + cached + free on the device.
    pub fn usable(&self) -> usize {
        self.in_use + self.cached + self.driver_free
    }
}

/// The memory of `device` (see [`DeviceMemory`]): for `cuda:N`, from its caching allocator and
/// the driver; for `cuda:plan`, from the plan recorder's virtual memory, sized as a 141 GiB
/// H200 so automatic batch sizing works. None for the CPU, `cuda:sim`, a GPU that cannot be
/// opened, or a build without the CUDA features.
pub fn device_memory(device: crate::Device) -> Option<DeviceMemory> {
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    if device == crate::Device::CudaPlan {
        // Sized as the H200 the plan stands for (141 GB), so automatic batch sizing works.
        let (in_use, peak) = plan::memory();
        return Some(DeviceMemory {
            in_use,
            peak,
            cached: 0,
            driver_free: (141usize << 30).saturating_sub(in_use),
        });
    }
    #[cfg(feature = "cuda")]
    if let crate::Device::Cuda(o) = device {
        let g = gpu::Gpu::get(o).ok()?;
        let s = g.alloc_stats();
        let (free, _) = g.mem_info().ok()?;
        return Some(DeviceMemory {
            in_use: s.in_use,
            peak: s.peak_in_use,
            cached: s.cached,
            driver_free: free,
        });
    }
    let _ = device;
    None
}

/// Starts a new peak measurement on a GPU device (a no-op elsewhere).
pub fn reset_peak(device: crate::Device) {
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    if device == crate::Device::CudaPlan {
        plan::reset_peak();
    }
    #[cfg(feature = "cuda")]
    if let crate::Device::Cuda(o) = device {
        if let Ok(g) = gpu::Gpu::get(o) {
            g.reset_peak();
        }
    }
    let _ = device;
}

/// Whether a usable GPU is present in this build and machine (never panics).
pub fn gpu_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        gpu::gpu_available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The compiled kernels (feature `cuda`): one fatbin per `kernels/*.cu` and its `ptxas -v`
/// report.
#[cfg(feature = "cuda")]
pub mod compiled {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// One kernel's resources as ptxas reported them for one architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelResources {
    /// The source file's stem: `layernorm` for `kernels/layernorm.cu`.
    pub file: String,
    /// The entry function's name, as launches name it (`layernorm_fwd_f32`).
    pub kernel: String,
    /// The target ptxas compiled it for (`sm_90a`; empty if the report names none).
    pub arch: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes (dynamic shared memory is set per launch and is
    /// not in the report).
    pub shared_bytes: u32,
    /// Stack frame per thread, bytes.
    pub stack_bytes: u32,
    /// Bytes per thread stored to local memory because registers ran out (0 is the goal).
    pub spill_stores: u32,
    /// Bytes per thread loaded back from those spills.
    pub spill_loads: u32,
}

/// Parses `nvcc -Xptxas -v` output (the "Compiling entry function" / "Used N registers" lines).
pub fn parse_ptxas(file: &str, report: &str) -> Vec<KernelResources> {
    let num_before = |s: &str, unit: &str| -> u32 {
        s.find(unit)
            .and_then(|i| s[..i].split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut out = vec![];
    let mut cur: Option<KernelResources> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(k) = cur.take() {
                out.push(k);
            }
            let kernel = rest.split('\'').next().unwrap_or("").to_string();
            let arch = line
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or("")
                .to_string();
            cur = Some(KernelResources {
                file: file.to_string(),
                kernel,
                arch,
                registers: 0,
                shared_bytes: 0,
                stack_bytes: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(k) = cur.as_mut() {
            if line.contains("stack frame") {
                k.stack_bytes = num_before(line, "bytes stack frame");
                k.spill_stores = num_before(line, "bytes spill stores");
                k.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = num_before(line, "registers");
                k.shared_bytes = num_before(line, "bytes smem");
            }
        }
    }
    out.extend(cur);
    out
}

/// Every compiled kernel's resources (empty without the `cuda` feature).
pub fn kernel_resources() -> Vec<KernelResources> {
    #[cfg(feature = "cuda")]
    {
        compiled::KERNELS
            .iter()
            .flat_map(|(file, _, report)| parse_ptxas(file, report))
            .collect()
    }
    #[cfg(not(feature = "cuda"))]
    {
        vec![]
    }
}

/// `sd2 kernels`: every compiled kernel's registers, shared memory, stack and spills (from
/// ptxas), and which kernels the simulator runs.
pub fn resources_table() -> String {
    use std::fmt::Write;
    let res = kernel_resources();
    #[cfg(feature = "cuda-sim")]
    let simulated = sim::kernel_names();
    #[cfg(not(feature = "cuda-sim"))]
    let simulated: Vec<String> = vec![];
    let mut out = String::new();
    if res.is_empty() {
        out.push_str("no compiled kernels in this build (build with --features cuda and nvcc 13.0: scripts/install-cuda-toolchain.sh)\n");
    } else {
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<8} {:>5} {:>7} {:>6} {:>7} {:>7} {:>4}",
            "file", "kernel", "arch", "regs", "smem B", "stack", "spill-", "spill+", "sim"
        );
        for k in &res {
            let _ = writeln!(
                out,
                "{:<16} {:<28} {:<8} {:>5} {:>7} {:>6} {:>7} {:>7} {:>4}",
                k.file,
                k.kernel,
                k.arch,
                k.registers,
                k.shared_bytes,
                k.stack_bytes,
                k.spill_stores,
                k.spill_loads,
                if simulated.contains(&k.kernel) {
                    "yes"
                } else {
                    "no"
                }
            );
        }
    }
    if !simulated.is_empty() {
        let _ = writeln!(
            out,
            "simulated on the CPU (feature cuda-sim): {}",
            simulated.join(", ")
        );
    }
    out
}

/// `sd2 info`: the version, and the backends this build and machine have.
pub fn backends_summary() -> String {
    use std::fmt::Write;
    let mut out = format!("sd2 {}\nbackends:\n", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        out,
        "  cpu   reference backend: f32/bf16/f64, gemm crate, rayon ({} threads)",
        rayon::current_num_threads()
    );
    if cfg!(feature = "cuda-sim") {
        out.push_str("  cuda:sim  CUDA tensors with every kernel run by the CPU kernel simulator (slow; tests)\n");
        out.push_str("  cuda:plan CUDA tensors whose launches are recorded, never run (`sd2 bench train --plan`)\n");
    }
    if !COMPILED {
        out.push_str("  cuda  not compiled in (rebuild with `--features cuda`)\n");
        return out;
    }
    match probe() {
        Ok(gpus) if gpus.is_empty() => out.push_str("  cuda  compiled in; no GPU visible\n"),
        Ok(gpus) => {
            out.push_str("  cuda  compiled in: f32/bf16 tensors, kernels from kernels/*.cu\n");
            for g in gpus {
                let _ = writeln!(
                    out,
                    "        cuda:{}  {}  {:.1} GiB",
                    g.ordinal,
                    g.name,
                    g.total_mem as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  cuda  compiled in; no usable GPU: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ptxas_report_is_parsed() {
        let report = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'layernorm_fwd_f32' for 'sm_90a'\n\
ptxas info    : Function properties for layernorm_fwd_f32\n\
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem\n\
ptxas info    : Compiling entry function 'column_sum_f32' for 'sm_90a'\n\
ptxas info    : Function properties for column_sum_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 12 registers, used 0 barriers\n";
        let k = super::parse_ptxas("layernorm", report);
        assert_eq!(k.len(), 2);
        assert_eq!(
            (
                k[0].kernel.as_str(),
                k[0].arch.as_str(),
                k[0].registers,
                k[0].shared_bytes
            ),
            ("layernorm_fwd_f32", "sm_90a", 40, 128)
        );
        assert_eq!(
            (k[0].stack_bytes, k[0].spill_stores, k[0].spill_loads),
            (16, 8, 4)
        );
        assert_eq!(
            (k[1].kernel.as_str(), k[1].registers, k[1].shared_bytes),
            ("column_sum_f32", 12, 0)
        );
    }
}
