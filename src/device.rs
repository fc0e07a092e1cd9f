//! Where a tensor lives. `Cuda` always exists so code and tests can name it; without the
//! `cuda` feature every attempt to use it is a clear error, never a panic.
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// `cuda:sim`: CUDA tensors whose kernels run in the kernel simulator on the CPU (feature
    /// `cuda-sim`) — slow, for testing the CUDA storage and kernels without a GPU.
    pub const CUDA_SIM: Device = Device::Cuda(usize::MAX);

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Checks that this device can hold tensors in this build and on this machine.
    pub fn check_available(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => crate::backend::cuda::check_device(*ordinal),
        }
    }

    /// Parses `cpu`, `cuda`, `cuda:N` or `cuda:sim`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "cuda:sim" => Ok(Device::CUDA_SIM),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Device::Cuda).map_err(|_| {
                    Error::Msg(format!("bad device `{s}`: expected cpu, cuda or cuda:N"))
                }),
                None => Err(Error::Msg(format!(
                    "bad device `{s}`: expected cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(usize::MAX) => write!(f, "cuda:sim"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
