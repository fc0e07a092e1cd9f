//! Launching a kernel of `kernels/*.cu` by name, on the GPU or in the kernel simulator, with one
//! argument list. `Arg` is the raw form (pointers already in the right memory); `Runner` +
//! `KArg` stage host slices for you, so a test or a profiling script is written once and runs on
//! every kernel backend this build and machine have.

use bytemuck::Pod;

pub use super::abi::{
    host_syncs, match_signature, note_host_sync, Arg, LaunchConfig, TensorMap, TileMap,
};
pub use super::kernels::{Grid, Kernel, Param};
#[allow(unused_imports)] // Result: only the runner (a cuda feature) returns one
use crate::{Error, Result};

/// A kernel argument for `Runner::launch`: host slices are copied to the runner's memory before
/// the launch (`In`, `Out`) and back after it (`Out`), so outputs poisoned on the host arrive
/// poisoned on the device.
pub enum KArg<'a> {
    /// Host bytes the kernel reads: copied into the runner's memory for the launch (the
    /// simulator reads them in place).
    In(&'a [u8]),
    /// Host bytes the kernel writes: staged like `In` (so poison set on the host is there on the
    /// device), then copied back after the launch.
    Out(&'a mut [u8]),
    /// A buffer already in the runner's memory.
    Buf(&'a Buffer),
    /// A 4-byte `int` parameter.
    I32(i32),
    /// A `float` parameter.
    F32(f32),
    /// An 8-byte parameter: an address in the runner's memory, or an integer such as a seed.
    U64(u64),
    /// A null pointer (an optional input the kernel skips).
    Null,
    /// A host matrix staged like `In` and passed as a TMA descriptor of it (made by the GPU's
    /// encoder, or the simulator's fields).
    Tma(&'a [u8], TileMap),
}

impl<'a> KArg<'a> {
    /// An input slice of any plain-data type, as its bytes (`In`).
    pub fn input<T: Pod>(v: &'a [T]) -> KArg<'a> {
        KArg::In(bytemuck::cast_slice(v))
    }
    /// An output slice of any plain-data type, as its bytes (`Out`): filled after the launch.
    pub fn output<T: Pod>(v: &'a mut [T]) -> KArg<'a> {
        KArg::Out(bytemuck::cast_slice_mut(v))
    }
    /// A scalar the kernel reads through a pointer.
    pub fn scalar<T: Pod>(v: &'a T) -> KArg<'a> {
        KArg::In(bytemuck::bytes_of(v))
    }
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

/// Memory owned by a runner: host words for the simulator, a device allocation on the GPU; or
/// a non-owning view of another buffer's memory (an in-place output).
pub enum Buffer {
    /// The simulator's memory: 16-byte words (so every element is as aligned as on a GPU) and
    /// the length in bytes.
    Host(Vec<u128>, usize),
    /// A GPU allocation from the caching allocator, returned to it on drop.
    #[cfg(feature = "cuda")]
    Device(super::gpu::DeviceBuffer),
    /// A view of memory another buffer owns: its address and length in bytes. Frees nothing;
    /// it must not outlive the owner.
    Alias(u64, usize),
    /// Virtual memory of the launch-plan recorder (`Runner::Plan`).
    #[cfg(any(feature = "cuda-sim", feature = "cuda"))]
    Virtual(super::plan::VirtualBuffer),
}

impl Buffer {
    /// The address a kernel (or a pointer table passed to one) uses.
    pub fn addr(&self) -> u64 {
        match self {
            Buffer::Host(v, _) => v.as_ptr() as u64,
            #[cfg(feature = "cuda")]
            Buffer::Device(d) => d.ptr(),
            Buffer::Alias(a, _) => *a,
            #[cfg(any(feature = "cuda-sim", feature = "cuda"))]
            Buffer::Virtual(v) => v.addr(),
        }
    }
    /// The length in bytes, as asked for (an allocation underneath may be larger).
    pub fn bytes(&self) -> usize {
        match self {
            Buffer::Host(_, n) => *n,
            #[cfg(feature = "cuda")]
            Buffer::Device(d) => d.bytes(),
            Buffer::Alias(_, n) => *n,
            #[cfg(any(feature = "cuda-sim", feature = "cuda"))]
            Buffer::Virtual(v) => v.bytes(),
        }
    }
}

/// A kernel backend: the simulator (feature `cuda-sim`) or a GPU (feature `cuda`).
#[cfg(any(feature = "cuda-sim", feature = "cuda"))]
#[derive(Clone)]
pub enum Runner {
    /// The CPU kernel simulator (`cuda:sim`): each launch runs to completion inside the call.
    #[cfg(feature = "cuda-sim")]
    Sim,
    /// A GPU (`cuda:N`): launches are queued on its compute stream.
    #[cfg(feature = "cuda")]
    Gpu(std::sync::Arc<super::gpu::Gpu>),
    /// The launch-plan recorder (`cuda:plan`, `backend::cuda::plan`): records, runs nothing.
    Plan,
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
    /// The backend's short name for messages: `sim` or `gpu` (the names `SD2_KERNEL_BACKENDS`
    /// takes), or `plan`.
    pub fn name(&self) -> &'static str {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => "sim",
            #[cfg(feature = "cuda")]
            Runner::Gpu(_) => "gpu",
            Runner::Plan => "plan",
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
            Runner::Plan => Ok(Buffer::Virtual(super::plan::VirtualBuffer::new(
                bytes.len(),
            ))),
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
        if matches!(self, Runner::Plan) {
            // Nothing ran: zeros (a GPU would wait here).
            note_host_sync();
            return Ok(out);
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
            #[cfg(any(feature = "cuda-sim", feature = "cuda"))]
            (Buffer::Virtual(_), _) | (_, Runner::Plan) => {}
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
            // Nothing runs, so nothing writes it: any address will do.
            Runner::Plan => Ok(0),
        }
    }

    /// This runner's bit in `ID_CHECK_PENDING`: one for the simulator, one per GPU ordinal
    /// (ordinals from 61 up share one), one for the plan recorder.
    fn pending_bit(&self) -> u64 {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => 1,
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => 2u64 << g.ordinal.min(61),
            Runner::Plan => 1 << 63,
        }
    }

    /// Reports (and clears) a bad id the device found since the last check. Called after
    /// every read, when the device has caught up anyway.
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
            Runner::Plan => [0; 5],
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
            Runner::Plan => Ok(Buffer::Virtual(super::plan::VirtualBuffer::new(bytes))),
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
            Runner::Plan => {
                let out = super::plan::VirtualBuffer::new(buf.bytes());
                let args = [Arg::U64(buf.addr()), Arg::U64(out.addr())];
                crate::profile::set_work(0.0, 2.0 * buf.bytes() as f64);
                // A copy, not a kernel: listed for its bytes (bench::plan does not count it
                // as a launch).
                record(super::plan::MEMCPY, &args)?;
                Ok(Buffer::Virtual(out))
            }
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
            Runner::Plan => {
                #[cfg(feature = "cuda-sim")]
                super::sim::check_signature(name, args)?;
                let _ = cfg;
                record(name, args)
            }
        }
    }

    /// The clock the profiler times this runner's launches by: a GPU's CUDA events; `None`
    /// (the host's wall clock) for the simulator, which runs launches synchronously.
    pub fn clock(&self) -> Option<std::sync::Arc<dyn crate::profile::DeviceClock>> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => None,
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => Some(g.clock()),
            Runner::Plan => None,
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
            // Plans are for the Hopper GPUs we measure on.
            Runner::Plan => true,
        }
    }

    /// A TMA descriptor of the bf16 matrix at `addr` (in this runner's memory).
    pub fn tensor_map(&self, addr: u64, map: TileMap) -> Result<TensorMap> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => TensorMap::sim_2d(addr, map),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.tensor_map(addr, map),
            Runner::Plan => TensorMap::sim_2d(addr, map),
        }
    }

    /// Waits for queued work (a no-op in the simulator, which runs launches synchronously).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            #[cfg(feature = "cuda-sim")]
            Runner::Sim => note_host_sync(),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.synchronize()?,
            Runner::Plan => note_host_sync(),
        }
        self.check_ids()
    }

    /// Launches declared kernel `name` (one of `K::NAMES`) with raw arguments; asynchronous
    /// on the GPU.
    ///
    /// # Safety
    /// As `launch_raw`: every buffer must be as large as the kernel reads or writes.
    pub unsafe fn run<K: Kernel<Arg>>(&self, name: &str, cfg: LaunchConfig, k: K) -> Result<()> {
        let args = super::kernels::raw_args(name, k)?;
        self.launch_raw(name, cfg, &args)
    }

    /// Launches declared kernel `name` with host slices staged as `launch` does, and waits.
    ///
    /// # Safety
    /// As `launch`.
    pub unsafe fn run_staged<'a, K: Kernel<KArg<'a>>>(
        &self,
        name: &str,
        cfg: LaunchConfig,
        k: K,
    ) -> Result<()> {
        K::check_name(name)?;
        let mut args: Vec<KArg<'a>> = k
            .params()?
            .into_iter()
            .map(|p| match p {
                Param::Mem(a) => a,
                Param::I32(v) => KArg::I32(v),
                Param::U64(v) => KArg::U64(v),
                Param::F32(v) => KArg::F32(v),
            })
            .collect();
        self.launch(name, cfg, &mut args)
    }

    /// Launches kernel `name`, staging `In`/`Out` slices through this runner's memory, and
    /// waits for it (errors the kernel raised surface here, naming the kernel).
    ///
    /// # Safety
    /// As for a real launch: every slice and buffer must be as large as the kernel reads or
    /// writes for this grid, and the argument list must match the kernel's parameters.
    pub unsafe fn launch(&self, name: &str, cfg: LaunchConfig, args: &mut [KArg]) -> Result<()> {
        match self {
            Runner::Plan => Err(Error::Cuda(format!(
                "kernel {name}: the launch-plan recorder runs nothing, so it cannot stage host slices"
            ))),
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

/// Records a launch on the plan runner with the profiler: its declared work, or else the bytes
/// of the allocations its arguments point into.
#[cfg(any(feature = "cuda-sim", feature = "cuda"))]
fn record(name: &str, args: &[Arg]) -> Result<()> {
    #[cfg(feature = "cuda-sim")]
    let sig = super::sim::kernel_signature(name);
    #[cfg(not(feature = "cuda-sim"))]
    let sig = None;
    crate::profile::launch(name, || {
        crate::profile::set_default_work(0.0, super::plan::bytes_touched(args, sig));
        Ok(())
    })
}
