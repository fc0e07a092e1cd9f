//! The kernel simulator's launcher (feature `cuda-sim`): runs a kernel of `kernels/*.cu`,
//! compiled as host C++ against `kernels/sim/cuda_sim.h`, on the CPU — by name, with the grid,
//! block, dynamic shared memory and arguments of the real launch. A block's threads are fibers
//! with real `__syncthreads`/warp-shuffle semantics; blocks run one after another; launches are
//! serialized (a kernel's `__shared__` arrays are process-wide statics in the simulation).
use std::ffi::{c_char, c_int, c_void, CStr, CString};

use crate::{Error, Result};

extern "C" {
    fn sd2_sim_launch(
        name: *const c_char,
        gx: u32,
        gy: u32,
        gz: u32,
        bx: u32,
        by: u32,
        bz: u32,
        smem: usize,
        args: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn sd2_sim_kernel_count() -> c_int;
    fn sd2_sim_kernel_name(i: c_int) -> *const c_char;
}

/// Grid, block and dynamic shared memory of a launch (as cudarc's `LaunchConfig`).
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// One kernel argument, passed by value as in `cuLaunchKernel`.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(*mut c_void),
    I32(i32),
    F32(f32),
    U64(u64),
}

impl Arg {
    pub fn ptr<T>(p: *const T) -> Arg {
        Arg::Ptr(p as *mut c_void)
    }
    pub fn mut_ptr<T>(p: *mut T) -> Arg {
        Arg::Ptr(p as *mut c_void)
    }
    /// A null pointer (an optional input the kernel skips).
    pub fn null() -> Arg {
        Arg::Ptr(std::ptr::null_mut())
    }
}

#[repr(C)]
union Slot {
    p: *mut c_void,
    i: i32,
    f: f32,
    u: u64,
}

/// Runs kernel `name` in the simulator.
///
/// # Safety
/// Every pointer argument must point to host memory at least as large as the kernel reads or
/// writes for this launch, as for a real launch; the simulator does not check bounds.
pub unsafe fn launch(name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let mut slots: Vec<Slot> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(p) => Slot { p },
            Arg::I32(i) => {
                let mut s = Slot { u: 0 };
                s.i = i;
                s
            }
            Arg::F32(f) => {
                let mut s = Slot { u: 0 };
                s.f = f;
                s
            }
            Arg::U64(u) => Slot { u },
        })
        .collect();
    let mut ptrs: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| s as *mut Slot as *mut c_void)
        .collect();
    let cname = CString::new(name).map_err(|_| Error::Msg(format!("kernel name {name:?}")))?;
    let mut err = vec![0u8; 512];
    let rc = sd2_sim_launch(
        cname.as_ptr(),
        cfg.grid.0,
        cfg.grid.1,
        cfg.grid.2,
        cfg.block.0,
        cfg.block.1,
        cfg.block.2,
        cfg.shared_mem_bytes as usize,
        ptrs.as_mut_ptr(),
        err.as_mut_ptr() as *mut c_char,
        err.len(),
    );
    if rc != 0 {
        let msg = CStr::from_bytes_until_nul(&err)
            .map(|c| c.to_string_lossy().to_string())
            .unwrap_or_default();
        return Err(Error::Msg(format!("simulated launch: {msg}")));
    }
    Ok(())
}

/// Names of every kernel the simulator has (all `extern "C" __global__` entry points).
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the runtime returns pointers to its registry's own strings, valid for the process.
    unsafe {
        (0..sd2_sim_kernel_count())
            .filter_map(|i| {
                let p = sd2_sim_kernel_name(i);
                (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().to_string())
            })
            .collect()
    }
}
