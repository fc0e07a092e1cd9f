//! Where a tensor lives. `Cuda` always exists so code and tests can name it; without the
//! `cuda` feature every attempt to use it is a clear error, never a panic.
use crate::{Error, Result};

/// Where a tensor's storage lives and which backend runs its ops. Parsed from and printed as
/// `cpu`, `cuda:N`, `cuda:sim`, `cuda:plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory; ops run on the CPU backend, the deterministic numerical reference.
    Cpu,
    /// GPU `N` (`cuda:N`).
    Cuda(usize),
    /// `cuda:sim`: CUDA tensors whose kernels run in the kernel simulator on the CPU (feature
    /// `cuda-sim`) — slow, for testing the CUDA storage and kernels without a GPU.
    CudaSim,
    /// `cuda:plan`: CUDA tensors whose kernels are recorded, never run — memory is virtual and
    /// reads return zeros. A step on it lists the launches a GPU would run, with their bytes
    /// and FLOPs (the launch plan, `sd2 bench train --plan`); its numbers mean nothing.
    CudaPlan,
}

impl Device {
    /// The simulator device (`Device::CudaSim`), under its older name.
    pub const CUDA_SIM: Device = Device::CudaSim;

    /// The CUDA runtime's ordinal for the simulator: its storages carry one like a GPU's.
    pub const SIM_ORDINAL: usize = usize::MAX;

    /// The CUDA runtime's ordinal for the launch-plan recorder (`Device::CudaPlan`).
    pub const PLAN_ORDINAL: usize = usize::MAX - 1;

    /// The CUDA runtime's ordinal: N for `cuda:N`, `SIM_ORDINAL` for `cuda:sim`, None for the
    /// CPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match self {
            Device::Cpu => None,
            Device::Cuda(n) => Some(*n),
            Device::CudaSim => Some(Device::SIM_ORDINAL),
            Device::CudaPlan => Some(Device::PLAN_ORDINAL),
        }
    }

    /// The device of a CUDA storage with runtime ordinal `o`.
    pub fn from_cuda_ordinal(o: usize) -> Device {
        if o == Device::SIM_ORDINAL {
            Device::CudaSim
        } else if o == Device::PLAN_ORDINAL {
            Device::CudaPlan
        } else {
            Device::Cuda(o)
        }
    }

    /// True only for [`Device::Cpu`].
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// True for every CUDA-storage device: a GPU, the simulator and the launch-plan recorder.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_) | Device::CudaSim | Device::CudaPlan)
    }

    /// Checks that this device can hold tensors in this build and on this machine.
    pub fn check_available(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => crate::backend::cuda::check_device(*ordinal),
            Device::CudaSim => crate::backend::cuda::check_device(Device::SIM_ORDINAL),
            Device::CudaPlan => crate::backend::cuda::check_device(Device::PLAN_ORDINAL),
        }
    }

    /// Parses `cpu`, `cuda`, `cuda:N`, `cuda:sim` or `cuda:plan`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "cuda:sim" => Ok(Device::CUDA_SIM),
            "cuda:plan" => Ok(Device::CudaPlan),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .ok()
                    .filter(|n| *n < Device::PLAN_ORDINAL)
                    .map(Device::Cuda)
                    .ok_or_else(|| {
                        Error::parse(
                            format!("bad device `{s}`"),
                            "expected cpu, cuda, cuda:N, cuda:sim or cuda:plan",
                        )
                    }),
                None => Err(Error::parse(
                    format!("bad device `{s}`"),
                    "expected cpu, cuda, cuda:N, cuda:sim or cuda:plan",
                )),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::CudaSim => write!(f, "cuda:sim"),
            Device::CudaPlan => write!(f, "cuda:plan"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
