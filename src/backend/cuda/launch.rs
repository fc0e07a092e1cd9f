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
    pub rows: usize,
    pub cols: usize,
    pub box_rows: usize,
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
        if addr % 16 != 0
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
    Ptr(*mut c_void),
    I32(i32),
    F32(f32),
    U64(u64),
    Map(TensorMap),
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

/// Checks a launch's arguments against the kernel's C++ parameter list (count and kind of each,
/// recorded by the simulator's registration from the declaration itself): a wrong count or
/// order is an error naming the kernel and the parameter, never memory corruption. Runs for
/// simulated and GPU launches alike whenever the build has `cuda-sim` (the default); a kernel
/// the simulator does not know is not checked.
pub fn check_signature(name: &str, args: &[Arg]) -> Result<()> {
    #[cfg(feature = "cuda-sim")]
    if let Some(sig) = super::sim::kernel_signature(name) {
        return match_signature(name, &sig, args);
    }
    let _ = (name, args);
    Ok(())
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
    /// A host matrix staged like `In` and passed as a TMA descriptor of it (made by the GPU's
    /// encoder, or the simulator's fields).
    Tma(&'a [u8], TileMap),
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
        eprintln!(
            "host sync at {}",
            std::backtrace::Backtrace::force_capture()
        );
    }
    HOST_SYNCS.with(|n| n.set(n.get() + 1));
}

/// The ops whose ids `ids_checked_*` checks on the device, by the code the kernel records.
pub const ID_CHECK_OPS: [&str; 4] = [
    "index_rows",
    "index_add_rows",
    "cross_entropy",
    "cross_entropy_bwd",
];

#[cfg(feature = "cuda-sim")]
thread_local! {
    /// The simulator's id-error record (`ids_checked_*`'s `err`), one per thread: simulated
    /// launches finish inside the launching call, so a bad id is reported to the thread whose
    /// op had it, even with tests running side by side. (A GPU has one record per device.)
    static SIM_ID_ERRORS: [std::sync::atomic::AtomicU64; 5] =
        const { [const { std::sync::atomic::AtomicU64::new(0) }; 5] };
}

thread_local! {
    /// Per runner (`Runner::pending_bit`): whether this thread launched an id check there
    /// since its last look at the record; reads with none in between skip the (on a GPU,
    /// second) read of the record.
    static ID_CHECK_PENDING: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The error an id-error record [count, op, position, id, bound] stands for (None if clean).
pub fn id_error(rec: [u64; 5]) -> Option<Error> {
    if rec[0] == 0 {
        return None;
    }
    Some(Error::Index {
        op: ID_CHECK_OPS.get(rec[1] as usize).copied().unwrap_or("ids"),
        msg: format!(
            "id {} at position {} is outside 0..{} ({} bad id{} in all; found on the device)",
            rec[3] as i64,
            rec[2],
            rec[4],
            rec[0],
            if rec[0] == 1 { "" } else { "s" }
        ),
    })
}

/// Host syncs so far on this thread (`note_host_sync`; per thread, so tests running side by
/// side do not count each other's).
pub fn host_syncs() -> usize {
    HOST_SYNCS.with(|n| n.get())
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
        #[cfg(feature = "cuda-sim")]
        if matches!(self, Runner::Sim) {
            note_host_sync();
        }
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
        self.check_ids()?;
        Ok(out)
    }

    /// The address of this runner's id-error record (zeroed; made on first use).
    pub fn id_errors(&self) -> Result<u64> {
        let bit = self.pending_bit();
        ID_CHECK_PENDING.with(|p| p.set(p.get() | bit));
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => Ok(SIM_ID_ERRORS.with(|r| r.as_ptr() as u64)),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.id_errors(),
        }
    }

    /// Reports (and clears) a bad id the device found since the last check. Called after
    /// every read, when the device has caught up anyway.
    fn pending_bit(&self) -> u64 {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => 1,
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => 2u64 << g.ordinal.min(62),
        }
    }

    fn check_ids(&self) -> Result<()> {
        let bit = self.pending_bit();
        if ID_CHECK_PENDING.with(|p| p.replace(p.get() & !bit)) & bit == 0 {
            return Ok(());
        }
        let rec: [u64; 5] = match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => SIM_ID_ERRORS.with(|r| {
                use std::sync::atomic::Ordering::Relaxed;
                if r[0].load(Relaxed) == 0 {
                    [0; 5]
                } else {
                    std::array::from_fn(|i| r[i].swap(0, Relaxed))
                }
            }),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.take_id_errors()?,
        };
        id_error(rec).map_or(Ok(()), Err)
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

    /// Whether this runner runs the Hopper (sm_90a) kernels: the simulator does, and a GPU of
    /// compute capability 9.0 (the cubins are built for sm_90a exactly).
    pub fn has_hopper(&self) -> bool {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => true,
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.compute_capability == (9, 0),
        }
    }

    /// A TMA descriptor of the bf16 matrix at `addr` (in this runner's memory).
    pub fn tensor_map(&self, addr: u64, map: TileMap) -> Result<TensorMap> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => TensorMap::sim_2d(addr, map),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.tensor_map(addr, map),
        }
    }

    /// Waits for queued work (a no-op in the simulator, which runs launches synchronously).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => note_host_sync(),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.synchronize()?,
        }
        self.check_ids()
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
                let mut raw = Vec::with_capacity(args.len());
                for a in args.iter_mut() {
                    raw.push(match a {
                        KArg::In(s) => Arg::ptr(s.as_ptr()),
                        KArg::Out(s) => Arg::mut_ptr(s.as_mut_ptr()),
                        KArg::Buf(b) => Arg::U64(b.addr()),
                        KArg::I32(v) => Arg::I32(*v),
                        KArg::F32(v) => Arg::F32(*v),
                        KArg::U64(v) => Arg::U64(*v),
                        KArg::Null => Arg::null(),
                        KArg::Tma(s, m) => Arg::Map(TensorMap::sim_2d(s.as_ptr() as u64, *m)?),
                    });
                }
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
                        KArg::Tma(s, m) => {
                            staged.push(g.upload(s)?);
                            Arg::Map(g.tensor_map(staged[staged.len() - 1].ptr(), *m)?)
                        }
                    });
                }
                g.launch(name, cfg, &raw)?;
                g.synchronize()
                    .map_err(|e| Error::Cuda(format!("kernel {name}: {e}")))?;
                let mut k = 0;
                for a in args.iter_mut() {
                    match a {
                        KArg::In(_) | KArg::Tma(..) => k += 1,
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
