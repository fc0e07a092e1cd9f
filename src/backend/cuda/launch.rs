//! Launching a kernel of `kernels/*.cu` by name, on the GPU or in the kernel simulator, with one
//! argument list. `Arg` is the raw form (pointers already in the right memory); `Runner` +
//! `KArg` stage host slices for you, so a test or a profiling script is written once and runs on
//! every kernel backend this build and machine have.
use std::ffi::c_void;

use bytemuck::Pod;

use crate::{Error, Result};

/// Grid, block and dynamic shared memory of a launch (as cudarc's `LaunchConfig`).
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
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

/// One argument's storage in the parameter array: every kernel parameter we use is ≤ 8 bytes,
/// and the callee reads only its own size from the front (little-endian).
#[repr(C)]
pub(crate) union Slot {
    p: *mut c_void,
    u: u64,
}

pub(crate) fn marshal(args: &[Arg]) -> Vec<Slot> {
    args.iter()
        .map(|a| match *a {
            Arg::Ptr(p) => Slot { p },
            Arg::I32(i) => Slot { u: i as u32 as u64 },
            Arg::F32(f) => Slot {
                u: f.to_bits() as u64,
            },
            Arg::U64(u) => Slot { u },
        })
        .collect()
}

pub(crate) fn param_ptrs(slots: &mut [Slot]) -> Vec<*mut c_void> {
    slots
        .iter_mut()
        .map(|s| s as *mut Slot as *mut c_void)
        .collect()
}

/// A kernel argument for `Runner::launch`: host slices are copied to the runner's memory before
/// the launch (`In`, `Out`) and back after it (`Out`), so outputs poisoned on the host arrive
/// poisoned on the device.
pub enum KArg<'a> {
    In(&'a [u8]),
    Out(&'a mut [u8]),
    /// A buffer already in the runner's memory.
    Buf(&'a Buffer),
    I32(i32),
    F32(f32),
    U64(u64),
    Null,
}

impl<'a> KArg<'a> {
    pub fn input<T: Pod>(v: &'a [T]) -> KArg<'a> {
        KArg::In(bytemuck::cast_slice(v))
    }
    pub fn output<T: Pod>(v: &'a mut [T]) -> KArg<'a> {
        KArg::Out(bytemuck::cast_slice_mut(v))
    }
    /// A scalar the kernel reads through a pointer.
    pub fn scalar<T: Pod>(v: &'a T) -> KArg<'a> {
        KArg::In(bytemuck::bytes_of(v))
    }
}

/// Memory owned by a runner: host words for the simulator, a device allocation on the GPU; or
/// a non-owning view of another buffer's memory (an in-place output).
pub enum Buffer {
    Host(Vec<u128>, usize),
    #[cfg(feature = "cuda")]
    Device(super::gpu::DeviceBuffer),
    Alias(u64, usize),
}

impl Buffer {
    /// The address a kernel (or a pointer table passed to one) uses.
    pub fn addr(&self) -> u64 {
        match self {
            Buffer::Host(v, _) => v.as_ptr() as u64,
            #[cfg(feature = "cuda")]
            Buffer::Device(d) => d.ptr(),
            Buffer::Alias(a, _) => *a,
        }
    }
    pub fn bytes(&self) -> usize {
        match self {
            Buffer::Host(_, n) => *n,
            #[cfg(feature = "cuda")]
            Buffer::Device(d) => d.bytes(),
            Buffer::Alias(_, n) => *n,
        }
    }
}

/// A kernel backend: the simulator (feature `cuda-sim`) or a GPU (feature `cuda`).
#[cfg(any(feature = "cuda-sim", feature = "cuda"))]
#[derive(Clone)]
pub enum Runner {
    #[cfg(feature = "cuda-sim")]
    Sim,
    #[cfg(feature = "cuda")]
    Gpu(std::sync::Arc<super::gpu::Gpu>),
}

#[cfg(any(feature = "cuda-sim", feature = "cuda"))]
impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(any(feature = "cuda-sim", feature = "cuda"))]
/// The backends `SD2_KERNEL_BACKENDS` (comma-separated `sim`, `gpu`; default both) asks for.
fn wanted(which: &str) -> bool {
    match std::env::var("SD2_KERNEL_BACKENDS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|s| s.trim() == which),
        _ => true,
    }
}

#[cfg(any(feature = "cuda-sim", feature = "cuda"))]
impl Runner {
    pub fn name(&self) -> &'static str {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => "sim",
            #[cfg(feature = "cuda")]
            Runner::Gpu(_) => "gpu",
        }
    }

    /// Every kernel backend available here, with a reason for each one skipped. When
    /// `SD2_KERNEL_BACKENDS` names a backend explicitly, its absence is an error instead.
    pub fn available() -> Result<(Vec<Runner>, Vec<String>)> {
        let explicit = std::env::var("SD2_KERNEL_BACKENDS").is_ok_and(|v| !v.trim().is_empty());
        let (mut run, mut skipped) = (vec![], vec![]);
        let mut skip = |name: &str, why: String| -> Result<()> {
            if explicit && wanted(name) {
                return Err(Error::Cuda(format!(
                    "SD2_KERNEL_BACKENDS asks for `{name}`, but {why}"
                )));
            }
            skipped.push(format!("{name}: {why}"));
            Ok(())
        };
        if cfg!(feature = "cuda-sim") && wanted("sim") {
            #[cfg(feature = "cuda-sim")]
            run.push(Runner::Sim);
        } else if !cfg!(feature = "cuda-sim") {
            skip("sim", "built without feature `cuda-sim`".into())?;
        }
        if wanted("gpu") {
            #[cfg(feature = "cuda")]
            match super::gpu::Gpu::global() {
                Ok(g) => run.push(Runner::Gpu(g)),
                Err(e) => skip("gpu", e.to_string())?,
            }
            #[cfg(not(feature = "cuda"))]
            skip("gpu", "built without feature `cuda`".into())?;
        }
        Ok((run, skipped))
    }

    /// Copies `host` into this runner's memory.
    pub fn buffer<T: Pod>(&self, host: &[T]) -> Result<Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(host);
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => {
                let mut words = vec![0u128; bytes.len().div_ceil(16)];
                bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..bytes.len()]
                    .copy_from_slice(bytes);
                Ok(Buffer::Host(words, bytes.len()))
            }
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => Ok(Buffer::Device(g.upload(bytes)?)),
        }
    }

    /// Copies a buffer back to the host as `T`s.
    pub fn read<T: Pod>(&self, buf: &Buffer) -> Result<Vec<T>> {
        let n = buf.bytes() / std::mem::size_of::<T>();
        let mut out = vec![T::zeroed(); n];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        match (buf, self) {
            (Buffer::Host(words, len), _) => {
                dst.copy_from_slice(&bytemuck::cast_slice::<u128, u8>(words)[..*len])
            }
            #[cfg(feature = "cuda")]
            (Buffer::Device(d), _) => d.download(dst)?,
            #[cfg(feature = "cuda-sim")]
            (Buffer::Alias(a, len), Runner::Sim) => {
                // SAFETY: an alias of a live host buffer of `len` bytes of this runner.
                dst.copy_from_slice(unsafe { std::slice::from_raw_parts(*a as *const u8, *len) })
            }
            #[cfg(feature = "cuda")]
            (Buffer::Alias(a, _), Runner::Gpu(g)) => g.download_ptr(*a, dst)?,
        }
        Ok(out)
    }

    /// `bytes` of memory: uninitialized on the GPU, zeroed in the simulator.
    pub fn alloc(&self, bytes: usize) -> Result<Buffer> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => Ok(Buffer::Host(vec![0u128; bytes.div_ceil(16)], bytes)),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => Ok(Buffer::Device(g.alloc(bytes)?)),
        }
    }

    /// `bytes` of zeroed memory.
    pub fn zeros(&self, bytes: usize) -> Result<Buffer> {
        let b = self.alloc(bytes)?;
        #[cfg(feature = "cuda")]
        if let Buffer::Device(d) = &b {
            d.fill_bytes(0)?;
        }
        Ok(b)
    }

    /// A copy of `buf` in this runner's memory (stream-ordered on the GPU).
    pub fn copy(&self, buf: &Buffer) -> Result<Buffer> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => {
                let v: Vec<u8> = self.read(buf)?;
                self.buffer(&v)
            }
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => Ok(Buffer::Device(g.copy(buf.addr(), buf.bytes())?)),
        }
    }

    /// Launches with raw arguments (addresses already in this runner's memory); asynchronous
    /// on the GPU.
    ///
    /// # Safety
    /// As `gpu::Gpu::launch` / `sim::launch`.
    pub unsafe fn launch_raw(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => super::sim::launch(name, cfg, args),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.launch(name, cfg, args),
        }
    }

    /// Waits for queued work (a no-op in the simulator, which runs launches synchronously).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => Ok(()),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.synchronize(),
        }
    }

    /// Launches kernel `name`, staging `In`/`Out` slices through this runner's memory, and
    /// waits for it (errors the kernel raised surface here, naming the kernel).
    ///
    /// # Safety
    /// As for a real launch: every slice and buffer must be as large as the kernel reads or
    /// writes for this grid, and the argument list must match the kernel's parameters.
    pub unsafe fn launch(&self, name: &str, cfg: LaunchConfig, args: &mut [KArg]) -> Result<()> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => {
                let raw: Vec<Arg> = args
                    .iter_mut()
                    .map(|a| match a {
                        KArg::In(s) => Arg::ptr(s.as_ptr()),
                        KArg::Out(s) => Arg::mut_ptr(s.as_mut_ptr()),
                        KArg::Buf(b) => Arg::U64(b.addr()),
                        KArg::I32(v) => Arg::I32(*v),
                        KArg::F32(v) => Arg::F32(*v),
                        KArg::U64(v) => Arg::U64(*v),
                        KArg::Null => Arg::null(),
                    })
                    .collect();
                super::sim::launch(name, cfg, &raw)
            }
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => {
                let mut staged = Vec::new();
                let mut raw = Vec::with_capacity(args.len());
                for a in args.iter() {
                    raw.push(match a {
                        KArg::In(s) => {
                            staged.push(g.upload(s)?);
                            Arg::U64(staged[staged.len() - 1].ptr())
                        }
                        KArg::Out(s) => {
                            staged.push(g.upload(s)?);
                            Arg::U64(staged[staged.len() - 1].ptr())
                        }
                        KArg::Buf(b) => Arg::U64(b.addr()),
                        KArg::I32(v) => Arg::I32(*v),
                        KArg::F32(v) => Arg::F32(*v),
                        KArg::U64(v) => Arg::U64(*v),
                        KArg::Null => Arg::null(),
                    });
                }
                g.launch(name, cfg, &raw)?;
                g.synchronize()
                    .map_err(|e| Error::Cuda(format!("kernel {name}: {e}")))?;
                let mut k = 0;
                for a in args.iter_mut() {
                    match a {
                        KArg::In(_) => k += 1,
                        KArg::Out(s) => {
                            staged[k].download(s)?;
                            k += 1;
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        }
    }
}
