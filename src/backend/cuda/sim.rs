//! The kernel simulator's launcher (feature `cuda-sim`): runs a kernel of `kernels/*.cu`,
//! compiled as host C++ against `kernels/sim/cuda_sim.h`, on the CPU — by name, with the grid,
//! block, dynamic shared memory and arguments of the real launch. A block's threads are fibers
//! with real `__syncthreads`/warp-shuffle semantics; blocks run one after another; launches are
//! serialized (a kernel's `__shared__` arrays are process-wide statics in the simulation).
use std::ffi::{c_char, c_int, c_void, CStr, CString};

pub use super::abi::{Arg, LaunchConfig};
use crate::{Error, Result};

mod units {
    include!(concat!(env!("OUT_DIR"), "/sim_units.rs"));
}

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
    fn sd2_sim_kernel_signature(name: *const c_char) -> *const c_char;
    fn sd2_sim_kernel_count() -> c_int;
    fn sd2_sim_kernel_name(i: c_int) -> *const c_char;
}

/// Runs kernel `name` in the simulator.
///
/// # Safety
/// Every pointer argument must point to host memory at least as large as the kernel reads or
/// writes for this launch, as for a real launch; the simulator does not check bounds.
pub unsafe fn launch(name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    units::link_units();
    check_signature(name, args)?;
    let mut slots = super::abi::marshal(args);
    let mut ptrs = super::abi::param_ptrs(&mut slots);
    let cname = CString::new(name).map_err(|_| Error::Msg(format!("kernel name {name:?}")))?;
    let mut err = vec![0u8; 512];
    crate::profile::launch(name, || {
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
    })
}

/// Names of every kernel the simulator has (all `extern "C" __global__` entry points).
pub fn kernel_names() -> Vec<String> {
    units::link_units();
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

/// The parameter signature kernel `name` was compiled with: one character per parameter (p
/// pointer, i 4-byte integer, q 8-byte integer, f float, d double, T a struct by value such as a
/// TMA descriptor, ? other), from the C++ declaration itself; `None` for an unknown name.
pub fn kernel_signature(name: &str) -> Option<&'static str> {
    units::link_units();
    let cname = CString::new(name).ok()?;
    // SAFETY: the runtime returns null or a pointer to a static, NUL-terminated ASCII string
    // of the registry, which lives as long as the process.
    unsafe {
        let p = sd2_sim_kernel_signature(cname.as_ptr());
        (!p.is_null())
            .then(|| CStr::from_ptr(p).to_str().ok())
            .flatten()
    }
}

/// Checks a launch's arguments against the kernel's C++ parameter list (count and kind of each,
/// recorded by the simulator's registration from the declaration itself): a wrong count or
/// order is an error naming the kernel and the parameter, never memory corruption. Runs for
/// simulated launches; a GPU looks the signature up once per kernel (`Gpu::launch`) whenever the
/// build has `cuda-sim` (as every test build does). A kernel
/// the simulator does not know is not checked.
pub fn check_signature(name: &str, args: &[Arg]) -> Result<()> {
    match kernel_signature(name) {
        Some(sig) => super::abi::match_signature(name, sig, args),
        None => Ok(()),
    }
}
