//! What crosses into a kernel launch, for every kernel backend: the launch geometry, the
//! arguments as `cuLaunchKernel` takes them, TMA descriptors, the check of arguments against a
//! kernel's declared signature, and the host-sync counter. A leaf: the GPU runtime (`gpu`), the
//! simulator (`sim`) and the launcher (`launch`) all build on it.
use std::ffi::c_void;

use crate::{Error, Result};

/// Grid, block and dynamic shared memory of a launch (as cudarc's `LaunchConfig`).
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    /// Blocks in x, y, z (`gridDim`).
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z (`blockDim`).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, bytes. Above the default 48 KiB the GPU runtime opts
    /// the kernel in, up to the device's limit.
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch of `blocks` × `threads`, no dynamic shared memory.
    pub fn linear(blocks: u32, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A TMA descriptor passed by value (`const __grid_constant__ TmaDesc` in
/// `kernels/include/sd2_hopper.cuh`): on the GPU the 128 bytes `cuTensorMapEncodeTiled` writes,
/// in the simulator the fields the simulator's TMA reads (see `TensorMap::sim_2d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(128))]
pub struct TensorMap(pub [u64; 16]);

/// A 2-D bf16 tile map: row-major [rows, cols] at an address, boxes of `box_rows` × `box_cols`
/// (box_cols · 2 = 128 bytes: the 128-byte swizzle span), zeros past the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileMap {
    /// Rows of the matrix (the outer dimension; at most 2³¹).
    pub rows: usize,
    /// Columns: bf16 elements per row, contiguous. `cols · 2` bytes must be a multiple of 16.
    pub cols: usize,
    /// Rows of one box (one TMA copy), 1..=256: the kernel's tile height.
    pub box_rows: usize,
    /// Columns of one box: must be 64 (64 · 2 bytes = the 128-byte swizzle span).
    pub box_cols: usize,
}

impl TileMap {
    /// What TMA accepts (CUDA driver API, cuTensorMapEncodeTiled): a 16-byte aligned address,
    /// a row stride that is a multiple of 16 bytes, boxes of 1..=256 per dimension whose inner
    /// extent is the 128-byte swizzle span.
    pub fn check(&self, addr: u64) -> Result<()> {
        let TileMap {
            rows,
            cols,
            box_rows,
            box_cols,
        } = *self;
        if !addr.is_multiple_of(16)
            || cols == 0
            || rows == 0
            || (cols * 2) % 16 != 0
            || box_cols * 2 != 128
            || !(1..=256).contains(&box_rows)
            || rows > (1 << 31)
        {
            return Err(Error::Cuda(format!(
                "tensor map of a [{rows}, {cols}] bf16 matrix at {addr:#x}, box {box_rows}×{box_cols}: \
                 TMA needs a 16-byte aligned address, rows of a multiple of 16 bytes and 64-column boxes"
            )));
        }
        Ok(())
    }
}

impl TensorMap {
    /// The simulator's descriptor: [address, cols, rows, row stride bytes, box cols, box rows].
    pub fn sim_2d(addr: u64, m: TileMap) -> Result<TensorMap> {
        m.check(addr)?;
        let mut w = [0u64; 16];
        w[..6].copy_from_slice(&[
            addr,
            m.cols as u64,
            m.rows as u64,
            2 * m.cols as u64,
            m.box_cols as u64,
            m.box_rows as u64,
        ]);
        Ok(TensorMap(w))
    }
}

/// One kernel argument, passed by value as in `cuLaunchKernel`.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// An address: device memory on a GPU, host memory in the simulator.
    Ptr(*mut c_void),
    /// A 4-byte `int` parameter ([`Arg::int`] builds one with a range check).
    I32(i32),
    /// A `float` parameter.
    F32(f32),
    /// An 8-byte parameter: an address held as an integer (a buffer's `addr()`), or an
    /// `unsigned long long` such as a seed. Matches a pointer or an 8-byte integer parameter.
    U64(u64),
    /// A TMA descriptor passed by value (a `__grid_constant__` struct parameter).
    Map(TensorMap),
}

impl Arg {
    /// A pointer argument from a const pointer (an input the kernel reads).
    pub fn ptr<T>(p: *const T) -> Arg {
        Arg::Ptr(p as *mut c_void)
    }
    /// A pointer argument from a mutable pointer (an output the kernel writes).
    pub fn mut_ptr<T>(p: *mut T) -> Arg {
        Arg::Ptr(p as *mut c_void)
    }
    /// A 4-byte integer parameter from a size, count or flag, checked: a value that does not
    /// fit in an `i32` is an error (wrapped, it would index out of bounds on the device).
    pub fn int<T>(v: T) -> Result<Arg>
    where
        T: TryInto<i32> + Copy + std::fmt::Display,
    {
        v.try_into().map(Arg::I32).map_err(|_| {
            Error::Cuda(format!(
                "launch argument {v} does not fit a 32-bit kernel parameter (split the work)"
            ))
        })
    }
    /// A null pointer (an optional input the kernel skips).
    pub fn null() -> Arg {
        Arg::Ptr(std::ptr::null_mut())
    }
}

/// One argument's storage in the parameter array: a scalar or pointer (the callee reads only
/// its own size from the front, little-endian) or a 128-byte TMA descriptor.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
#[repr(C, align(128))]
pub(crate) union Slot {
    p: *mut c_void,
    u: u64,
    map: [u64; 16],
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub(crate) fn marshal(args: &[Arg]) -> Vec<Slot> {
    args.iter()
        .map(|a| match *a {
            Arg::Ptr(p) => Slot { p },
            Arg::I32(i) => Slot { u: i as u32 as u64 },
            Arg::F32(f) => Slot {
                u: f.to_bits() as u64,
            },
            Arg::U64(u) => Slot { u },
            Arg::Map(m) => Slot { map: m.0 },
        })
        .collect()
}

/// `args` against signature `sig` (see `sim::kernel_signature`): `Ptr` takes a pointer, `U64` a
/// pointer or an 8-byte integer, `I32` a 4-byte integer, `F32` a float, `Map` a struct.
pub fn match_signature(name: &str, sig: &str, args: &[Arg]) -> Result<()> {
    let kind = |a: &Arg| match a {
        Arg::Ptr(_) => ("pointer", "p"),
        Arg::U64(_) => ("u64", "pq"),
        Arg::I32(_) => ("i32", "i"),
        Arg::F32(_) => ("f32", "f"),
        Arg::Map(_) => ("tensor map", "T"),
    };
    let want = |c: char| match c {
        'p' => "a pointer",
        'i' => "a 4-byte integer",
        'q' => "an 8-byte integer",
        'f' => "a float",
        'd' => "a double",
        'T' => "a struct",
        _ => "an unsupported type",
    };
    if sig.len() != args.len() {
        return Err(Error::Cuda(format!(
            "kernel {name}: launched with {} arguments, declared with {} ({sig})",
            args.len(),
            sig.len()
        )));
    }
    for (i, (c, a)) in sig.chars().zip(args).enumerate() {
        let (got, fits) = kind(a);
        if !fits.contains(c) {
            return Err(Error::Cuda(format!(
                "kernel {name}: argument {i} is {got}, parameter {i} is {} (signature {sig})",
                want(c)
            )));
        }
    }
    Ok(())
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub(crate) fn param_ptrs(slots: &mut [Slot]) -> Vec<*mut c_void> {
    slots
        .iter_mut()
        .map(|s| s as *mut Slot as *mut c_void)
        .collect()
}

thread_local! {
    static HOST_SYNCS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts a point where the host waits for a kernel backend (a read-back or a stream
/// synchronize), on any runner, for the calling thread: the simulator counts what a GPU would wait for, so tests can
/// assert how often a training step syncs.
/// `SD2_TRACE_SYNCS=1` prints a backtrace at each one (finding a sync in a hot loop).
pub fn note_host_sync() {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *TRACE.get_or_init(|| std::env::var_os("SD2_TRACE_SYNCS").is_some()) {
        log::warn!(
            "host sync at {}",
            std::backtrace::Backtrace::force_capture()
        );
    }
    HOST_SYNCS.with(|n| n.set(n.get() + 1));
}

/// Host syncs so far on this thread (`note_host_sync`; per thread, so tests running side by
/// side do not count each other's).
pub fn host_syncs() -> usize {
    HOST_SYNCS.with(|n| n.get())
}
