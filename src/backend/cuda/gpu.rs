//! The GPU runtime (feature `cuda`): one context and stream per device, the embedded fatbins
//! loaded on first use (`cuModuleLoadData`, so the driver picks the sm_90a cubin or JIT-compiles
//! the compute_80 PTX), kernels launched by name, device memory through the caching allocator,
//! CUDA-event timing. Host→device copies go through pinned staging buffers and never wait for
//! the stream (`upload`); `stage` copies on a second stream so a batch uploads while the
//! previous step computes. Every driver failure becomes an `Error::Cuda` naming what was attempted;
//! nothing here panics when there is no GPU or no driver.
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

use super::abi::{marshal, param_ptrs, Arg, LaunchConfig};
use super::alloc::{AllocStats, CachingAllocator, StreamAlloc};
use crate::{Error, Result};

/// Shared memory a block may use without opting in (`cuFuncSetAttribute`).
const DEFAULT_SMEM: u32 = 48 * 1024;

struct Function {
    f: sys::CUfunction,
    /// The dynamic shared memory limit set on it so far.
    smem_limit: u32,
    /// Its C++ parameter kinds (from the simulator's registry; none without `cuda-sim`),
    /// looked up once so every launch is checked without a lookup.
    sig: Option<&'static str>,
}

/// Pinned host memory the staging ring may hold in all; beyond it an upload waits for an older
/// copy to finish (or, for one larger than every slot, copies from pageable memory and waits).
const PINNED_LIMIT: usize = 1 << 30;

/// A page-locked host buffer that a stream copies from; `done` is recorded after its last copy,
/// so the slot is rewritten only once that copy has finished.
struct PinnedSlot {
    ptr: *mut u8,
    cap: usize,
    done: CudaEvent,
}

impl Drop for PinnedSlot {
    fn drop(&mut self) {
        // The copy must not read freed memory.
        let _ = self.done.synchronize();
        // SAFETY: allocated by cuMemHostAlloc, freed once.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

thread_local! {
    /// Per thread, per GPU ordinal: the address of `ids_checked_*`'s error record.
    static ID_ERRORS: std::cell::RefCell<HashMap<usize, u64>> = Default::default();
}

/// One GPU: context, stream, loaded modules, allocator.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Host→device copies of prefetched batches (`stage`), beside the compute stream.
    copy_stream: Arc<CudaStream>,
    pinned: Mutex<Vec<PinnedSlot>>,
    alloc: Mutex<CachingAllocator<StreamAlloc>>,
    modules: Mutex<HashMap<usize, sys::CUmodule>>,
    functions: Mutex<HashMap<String, Function>>,
    /// Kernel name → index into `compiled::KERNELS`.
    kernel_file: HashMap<String, usize>,
    cublas: Mutex<Option<Cublas>>,
    cublas_failed: std::sync::atomic::AtomicBool,
    /// The device index (`cuda:N`).
    pub ordinal: usize,
    /// The device name the driver reports (for example `NVIDIA H200`).
    pub name: String,
    /// (major, minor). At least (8, 0): `get` refuses older GPUs. (9, 0) runs the Hopper
    /// (sm_90a) kernels.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors (SMs) on the device.
    pub multiprocessors: u32,
    /// The most dynamic shared memory one block may use after opting in, bytes; `launch`
    /// rejects a launch that asks for more.
    pub smem_optin: u32,
}

// SAFETY: the raw module/function handles are plain driver handles, valid in any thread once
// the context is bound (every method binds it); the maps holding them are behind mutexes.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

fn drv(what: impl std::fmt::Display) -> impl FnOnce(result::DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gpu {
    /// The GPU `cuda:ordinal`, created once per process.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let map = GPUS.get_or_init(Default::default);
        let mut map = lock(map);
        if let Some(g) = map.get(&ordinal) {
            return Ok(g.clone());
        }
        // cudarc panics on a missing or incomplete driver library; nothing may panic here.
        let g = std::panic::catch_unwind(|| Gpu::new(ordinal)).map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Error::Cuda(format!("cuda:{ordinal}: driver library failed: {msg}"))
        })??;
        let g = Arc::new(g);
        map.insert(ordinal, g.clone());
        Ok(g)
    }

    /// `cuda:0`.
    pub fn global() -> Result<Arc<Gpu>> {
        Gpu::get(0)
    }

    fn new(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only checks whether the shared library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcuda not found (no NVIDIA driver on this machine)".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "cuda:{ordinal}: only {count} GPU(s) visible"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv(format!("cuda:{ordinal}: context")))?;
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let copy_stream = ctx
            .new_stream()
            .map_err(drv("cuStreamCreate (copy stream)"))?;
        let attr = |a| ctx.attribute(a).map_err(drv("cuDeviceGetAttribute"));
        use sys::CUdevice_attribute as A;
        let compute_capability = ctx
            .compute_capability()
            .map_err(drv("compute capability"))?;
        let name = ctx.name().map_err(drv("device name"))?;
        if compute_capability.0 < 8 {
            return Err(Error::Cuda(format!(
                "cuda:{ordinal} ({name}) has compute capability {}.{}; sd2's kernels need 8.0 or newer",
                compute_capability.0, compute_capability.1
            )));
        }
        let mut kernel_file = HashMap::new();
        for (i, (file, _, report)) in super::compiled::KERNELS.iter().enumerate() {
            for k in super::parse_ptxas(file, report) {
                kernel_file.insert(k.kernel, i);
            }
        }
        Ok(Gpu {
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            smem_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32,
            alloc: Mutex::new(CachingAllocator::new(StreamAlloc {
                ctx: ctx.clone(),
                stream: stream.clone(),
            })),
            ctx,
            stream,
            copy_stream,
            pinned: Mutex::new(vec![]),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            kernel_file,
            cublas: Mutex::new(None),
            cublas_failed: Default::default(),
            ordinal,
            name,
            compute_capability,
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv("bind context"))
    }

    /// This GPU's driver context (cudarc's), for driver calls this type does not wrap.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream: launches, uploads, read-backs and the caching allocator's blocks
    /// are ordered on it (`stage` copies on a second stream until `Staged::finish`).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Names of every kernel compiled into this build.
    pub fn kernel_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.kernel_file.keys().cloned().collect();
        v.sort();
        v
    }

    /// Loads (once) the module holding `name` and returns the function with its current
    /// dynamic shared-memory limit.
    fn function(&self, name: &str) -> Result<(sys::CUfunction, u32, Option<&'static str>)> {
        if let Some(f) = lock(&self.functions).get(name) {
            return Ok((f.f, f.smem_limit, f.sig));
        }
        let file = *self.kernel_file.get(name).ok_or_else(|| {
            Error::Cuda(format!(
                "no kernel named `{name}` in this build's kernels/*.cu"
            ))
        })?;
        self.bind()?;
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(&file) {
                Some(m) => *m,
                None => {
                    let (fname, image, _) = super::compiled::KERNELS[file];
                    // The driver reads the fatbin in place; it must outlive the call only.
                    let m = unsafe { result::module::load_data(image.as_ptr().cast()) }
                        .map_err(drv(format!("load module kernels/{fname}.cu")))?;
                    modules.insert(file, m);
                    m
                }
            }
        };
        let cname = CString::new(name).map_err(|_| Error::Cuda(format!("kernel name {name:?}")))?;
        // SAFETY: the module is loaded and never unloaded while the process runs.
        let f = unsafe { result::module::get_function(module, cname) }
            .map_err(drv(format!("cuModuleGetFunction({name})")))?;
        lock(&self.functions).insert(
            name.to_string(),
            Function {
                f,
                smem_limit: DEFAULT_SMEM,
                sig: signature(name),
            },
        );
        Ok((f, DEFAULT_SMEM, signature(name)))
    }

    /// Launches declared kernel `name` (`backend::cuda::kernels`) on this GPU's stream.
    ///
    /// # Safety
    /// As `launch`.
    pub unsafe fn run<K: super::kernels::Kernel<Arg>>(
        &self,
        name: &str,
        cfg: LaunchConfig,
        k: K,
    ) -> Result<()> {
        let args = super::kernels::raw_args(name, k)?;
        self.launch(name, cfg, &args)
    }

    /// Launches kernel `name` on this GPU's stream (asynchronously). Raises the kernel's
    /// dynamic shared-memory limit when the launch needs more than the default 48 KB.
    ///
    /// # Safety
    /// Pointer arguments must be device addresses of allocations large enough for what the
    /// kernel reads and writes with this grid; the argument list must match the kernel.
    pub unsafe fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let (f, limit, sig) = self.function(name)?;
        if let Some(sig) = sig {
            super::abi::match_signature(name, sig, args)?;
        }
        self.bind()?;
        if cfg.shared_mem_bytes > limit {
            if cfg.shared_mem_bytes > self.smem_optin {
                return Err(Error::Cuda(format!(
                    "kernel {name}: {} bytes of dynamic shared memory asked, {} ({}) allows at most {}",
                    cfg.shared_mem_bytes, self.name, self.ordinal, self.smem_optin
                )));
            }
            result::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_mem_bytes as i32,
            )
            .map_err(drv(format!("kernel {name}: raise dynamic shared memory")))?;
            if let Some(e) = lock(&self.functions).get_mut(name) {
                e.smem_limit = cfg.shared_mem_bytes;
            }
        }
        let mut slots = marshal(args);
        let mut ptrs = param_ptrs(&mut slots);
        crate::profile::launch(name, || {
            result::launch_kernel(
                f,
                cfg.grid,
                cfg.block,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                &mut ptrs,
            )
            .map_err(drv(format!(
                "launch {name} grid {:?} block {:?} smem {}",
                cfg.grid, cfg.block, cfg.shared_mem_bytes
            )))
        })
    }

    /// This GPU's clock for the profiler (`crate::profile::start`).
    pub fn clock(self: &Arc<Self>) -> Arc<dyn crate::profile::DeviceClock> {
        Arc::new(GpuClock(self.clone()))
    }

    /// A CUDA event recorded on this GPU's stream now (the profiler's marks).
    pub fn event(&self) -> Result<cudarc::driver::CudaEvent> {
        let e = self
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv("cuEventCreate"))?;
        e.record(&self.stream).map_err(drv("cuEventRecord"))?;
        Ok(e)
    }

    /// A TMA descriptor (`cuTensorMapEncodeTiled`) of the row-major bf16 matrix at `addr`:
    /// 128-byte swizzle, zeros past the tensor, L2 promotion of 256 bytes.
    pub fn tensor_map(&self, addr: u64, m: super::abi::TileMap) -> Result<super::abi::TensorMap> {
        m.check(addr)?;
        self.bind()?;
        let dims = [m.cols as u64, m.rows as u64];
        let strides = [2 * m.cols as u64];
        let boxes = [m.box_cols as u32, m.box_rows as u32];
        let elem = [1u32, 1];
        let mut out = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        // SAFETY: every array has the rank's length (2; strides rank − 1), `out` is a writable
        // CUtensorMap; the address was checked for alignment above.
        let rc = unsafe {
            sys::cuTensorMapEncodeTiled(
                out.as_mut_ptr(),
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                2,
                addr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Cuda(format!(
                "cuTensorMapEncodeTiled [{}, {}] box {}×{}: {rc:?}",
                m.rows, m.cols, m.box_rows, m.box_cols
            )));
        }
        // SAFETY: zero-initialized above, then written by the driver.
        Ok(super::abi::TensorMap(unsafe { out.assume_init() }.opaque))
    }

    /// The address of this thread's id-error record of `ids_checked_*` on this GPU (zeroed
    /// on first use, never freed): one per thread, so a bad id is reported to the thread whose
    /// op had it, as in the simulator.
    pub fn id_errors(&self) -> Result<u64> {
        if let Some(a) = ID_ERRORS.with(|m| m.borrow().get(&self.ordinal).copied()) {
            return Ok(a);
        }
        let a = lock(&self.alloc).alloc(40)?;
        self.bind()?;
        // SAFETY: a fresh 40-byte allocation.
        unsafe { result::memset_d8_async(a, 0, 40, self.stream.cu_stream()) }
            .map_err(drv("cuMemsetD8Async"))?;
        ID_ERRORS.with(|m| m.borrow_mut().insert(self.ordinal, a));
        Ok(a)
    }

    /// Reads and clears this thread's id-error record (after the stream has caught up: a
    /// read).
    pub fn take_id_errors(&self) -> Result<[u64; 5]> {
        let Some(a) = ID_ERRORS.with(|m| m.borrow().get(&self.ordinal).copied()) else {
            return Ok([0; 5]);
        };
        let mut rec = [0u64; 5];
        self.bind()?;
        // SAFETY: the record holds 40 bytes; the copy is waited for below.
        unsafe { result::memcpy_dtoh_async(&mut rec, a, self.stream.cu_stream()) }
            .map_err(drv("read the id-error record"))?;
        self.stream
            .synchronize()
            .map_err(drv("stream synchronize"))?;
        if rec[0] != 0 {
            // SAFETY: as above.
            unsafe { result::memset_d8_async(a, 0, 40, self.stream.cu_stream()) }
                .map_err(drv("cuMemsetD8Async"))?;
        }
        Ok(rec)
    }

    /// Waits for all work on this GPU's stream; asynchronous kernel faults surface here.
    pub fn synchronize(&self) -> Result<()> {
        super::abi::note_host_sync();
        self.stream.synchronize().map_err(drv("stream synchronize"))
    }

    /// `bytes` of uninitialized device memory from the caching allocator.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        let ptr = lock(&self.alloc).alloc(bytes.max(1))?;
        Ok(DeviceBuffer {
            gpu: self.clone(),
            ptr,
            bytes,
        })
    }

    fn new_event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(drv("cuEventCreate"))
    }

    /// A pinned slot of at least `len` bytes whose last copy has finished, out of the ring
    /// (returned with `put_slot`). None when the ring is full and no slot is that large.
    fn take_slot(&self, len: usize) -> Result<Option<PinnedSlot>> {
        let mut ring = lock(&self.pinned);
        let fits = |s: &PinnedSlot| s.cap >= len;
        // The smallest free slot that fits; else wait for the smallest busy one that fits
        // when a new one would pass the limit.
        let mut best: Option<usize> = None;
        for (i, s) in ring.iter().enumerate() {
            if fits(s) && s.done.is_complete() && best.is_none_or(|b| ring[b].cap > s.cap) {
                best = Some(i);
            }
        }
        if let Some(i) = best {
            return Ok(Some(ring.swap_remove(i)));
        }
        let cap = len.next_power_of_two().max(1 << 16);
        let held: usize = ring.iter().map(|s| s.cap).sum();
        if held + cap > PINNED_LIMIT {
            let Some(i) = (0..ring.len())
                .filter(|i| fits(&ring[*i]))
                .min_by_key(|i| ring[*i].cap)
            else {
                return Ok(None);
            };
            let slot = ring.swap_remove(i);
            drop(ring);
            super::abi::note_host_sync();
            if let Err(e) = slot.done.synchronize() {
                // Never hand out a slot a copy may still read.
                std::mem::forget(slot);
                return Err(drv("wait for a staging copy")(e));
            }
            return Ok(Some(slot));
        }
        drop(ring);
        self.bind()?;
        // SAFETY: a plain page-locked allocation; freed by PinnedSlot::drop.
        let ptr = unsafe { result::malloc_host(cap, 0) }
            .map_err(drv(format!("cuMemHostAlloc({cap} bytes)")))?;
        Ok(Some(PinnedSlot {
            ptr: ptr.cast(),
            cap,
            done: self.new_event()?,
        }))
    }

    fn put_slot(&self, slot: PinnedSlot) {
        lock(&self.pinned).push(slot);
    }

    /// Copies `host` into `dst` on `stream` through a pinned slot: the host may reuse `host`
    /// as soon as this returns, and nothing waits for the stream. Falls back to a pageable copy
    /// that waits (counted as a host sync) when no pinned slot can be had.
    fn copy_in(&self, dst: u64, host: &[u8], stream: &CudaStream) -> Result<()> {
        self.copy_in_with(
            dst,
            host.len(),
            &mut |pinned| pinned.copy_from_slice(host),
            stream,
        )
    }

    /// As `copy_in`, the `len` bytes written by `fill` straight into the pinned slot (no
    /// intermediate host buffer; into a pageable one only in the fallback).
    fn copy_in_with(
        &self,
        dst: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
        stream: &CudaStream,
    ) -> Result<()> {
        let what = || format!("copy {len} bytes to the GPU");
        self.bind()?;
        let Some(slot) = self.take_slot(len)? else {
            let mut host = vec![0u8; len];
            fill(&mut host);
            // SAFETY: `dst` holds len bytes; synchronized before `host` can go.
            unsafe { result::memcpy_htod_async(dst, &host[..], stream.cu_stream()) }
                .map_err(drv(what()))?;
            super::abi::note_host_sync();
            return stream.synchronize().map_err(drv(what()));
        };
        // SAFETY: the slot holds cap ≥ len bytes and no copy reads it any more.
        let pinned = unsafe { std::slice::from_raw_parts_mut(slot.ptr, len) };
        fill(pinned);
        // SAFETY: `dst` holds len bytes; the slot stays untouched until `done`.
        unsafe { result::memcpy_htod_async(dst, &*pinned, stream.cu_stream()) }
            .map_err(drv(what()))?;
        if let Err(e) = slot.done.record(stream) {
            // The queued copy still reads the slot: wait for it before the slot can be reused.
            let _ = stream.synchronize();
            self.put_slot(slot);
            return Err(drv("cuEventRecord")(e));
        }
        self.put_slot(slot);
        Ok(())
    }

    /// A device copy of `host`, ordered on the compute stream before any later launch; the
    /// host does not wait for it.
    pub fn upload(self: &Arc<Self>, host: &[u8]) -> Result<DeviceBuffer> {
        let buf = self.alloc(host.len())?;
        if !host.is_empty() {
            self.copy_in(buf.ptr, host, &self.stream)?;
        }
        Ok(buf)
    }

    /// Starts copying `host` to the GPU on the copy stream, overlapping whatever the compute
    /// stream runs meanwhile; `Staged::finish` orders the compute stream after the copy.
    /// The copy itself waits for the compute work queued so far (the memory may be a block
    /// that queued work still reads), so stage batch k+1 before queuing step k.
    pub fn stage(self: &Arc<Self>, host: &[u8]) -> Result<Staged> {
        self.stage_with(host.len(), &mut |pinned| pinned.copy_from_slice(host))
    }

    /// As `stage`, the `len` bytes written by `fill` straight into pinned memory (a batch
    /// converted to bf16 there, not into a host buffer first).
    pub fn stage_with(
        self: &Arc<Self>,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Staged> {
        let ready = self.new_event()?;
        // Built first: on any error below its Drop keeps the block from the pool until the
        // copy stream is done with it.
        let staged = Staged {
            buf: Some(self.alloc(len)?),
            ready,
        };
        let ptr = staged.buf.as_ref().map_or(0, |b| b.ptr);
        if len > 0 {
            let fence = self.new_event()?;
            fence.record(&self.stream).map_err(drv("cuEventRecord"))?;
            self.copy_stream
                .wait(&fence)
                .map_err(drv("cuStreamWaitEvent"))?;
            self.copy_in_with(ptr, len, fill, &self.copy_stream)?;
        }
        staged
            .ready
            .record(&self.copy_stream)
            .map_err(drv("cuEventRecord"))?;
        Ok(staged)
    }

    /// A device copy of `bytes` bytes at `src` (stream-ordered).
    pub fn copy(self: &Arc<Self>, src: u64, bytes: usize) -> Result<DeviceBuffer> {
        let buf = self.alloc(bytes)?;
        if bytes > 0 {
            self.bind()?;
            // SAFETY: both ranges are live allocations of at least `bytes`.
            unsafe { result::memcpy_dtod_async(buf.ptr, src, bytes, self.stream.cu_stream()) }
                .map_err(drv(format!("copy {bytes} bytes on the GPU")))?;
        }
        Ok(buf)
    }

    /// Copies `dst.len()` bytes from device address `src` after all queued work.
    pub fn download_ptr(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller passes a live allocation of at least dst.len() bytes.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(drv(format!("copy {} bytes from the GPU", dst.len())))?;
        self.synchronize()
    }

    /// The caching allocator's counters: bytes in use, their peak, bytes cached, driver calls.
    pub fn alloc_stats(&self) -> AllocStats {
        lock(&self.alloc).stats()
    }

    /// (free, total) device memory as the driver reports it (the caching allocator's cached
    /// blocks are not free there).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        result::mem_get_info().map_err(drv("cuMemGetInfo"))
    }

    /// Starts a new peak-memory measurement (`alloc_stats().peak_in_use`).
    pub fn reset_peak(&self) {
        lock(&self.alloc).reset_peak();
    }

    /// Returns cached blocks to the driver.
    pub fn empty_cache(&self) {
        lock(&self.alloc).empty_cache();
    }

    /// Milliseconds of GPU time `f`'s launches take on this stream (CUDA events around it).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        use sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = self
            .ctx
            .new_event(Some(CU_EVENT_DEFAULT))
            .map_err(drv("cuEventCreate"))?;
        let end = self
            .ctx
            .new_event(Some(CU_EVENT_DEFAULT))
            .map_err(drv("cuEventCreate"))?;
        start.record(&self.stream).map_err(drv("cuEventRecord"))?;
        f()?;
        end.record(&self.stream).map_err(drv("cuEventRecord"))?;
        start.elapsed_ms(&end).map_err(drv("cuEventElapsedTime"))
    }
}

/// A buffer being filled on the copy stream (`Gpu::stage`).
pub struct Staged {
    buf: Option<DeviceBuffer>,
    ready: CudaEvent,
}

impl Staged {
    /// The buffer, with the compute stream ordered after its copy (the host does not wait).
    pub fn finish(mut self) -> Result<DeviceBuffer> {
        let gpu = self
            .buf
            .as_ref()
            .map(|b| b.gpu.clone())
            .ok_or_else(|| Error::Cuda("staged upload finished twice".into()))?;
        // On failure `self` drops with the buffer still inside: Drop orders or waits.
        gpu.stream
            .wait(&self.ready)
            .map_err(drv("cuStreamWaitEvent"))?;
        self.buf
            .take()
            .ok_or_else(|| Error::Cuda("staged upload finished twice".into()))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // An unfinished copy must end before its memory goes back to the compute stream's pool.
        if let Some(b) = &self.buf {
            if b.gpu.stream.wait(&self.ready).is_err() {
                let _ = b.gpu.copy_stream.synchronize();
            }
        }
    }
}

/// Device memory from a GPU's caching allocator, returned to it on drop.
pub struct DeviceBuffer {
    gpu: Arc<Gpu>,
    ptr: u64,
    bytes: usize,
}

impl DeviceBuffer {
    /// The device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// The size asked for, bytes (the block underneath is rounded up to its size class).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The GPU that owns the memory; the buffer returns to its allocator on drop.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Copies the first `dst.len()` bytes to the host, after all queued work on the stream.
    pub fn download(&self, dst: &mut [u8]) -> Result<()> {
        if dst.len() > self.bytes {
            return Err(Error::Cuda(format!(
                "download of {} bytes from a {}-byte buffer",
                dst.len(),
                self.bytes
            )));
        }
        self.gpu.download_ptr(self.ptr, dst)
    }

    /// Overwrites the whole buffer with `byte` (stream-ordered).
    pub fn fill_bytes(&self, byte: u8) -> Result<()> {
        self.gpu.bind()?;
        // SAFETY: within the allocation.
        unsafe { result::memset_d8_async(self.ptr, byte, self.bytes, self.gpu.stream.cu_stream()) }
            .map_err(drv("cuMemsetD8Async"))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // Stream-ordered reuse: later work on the same stream runs after earlier readers.
        let _ = lock(&self.gpu.alloc).free(self.ptr);
    }
}

/// Whether a usable GPU is present (never panics).
pub fn gpu_available() -> bool {
    Gpu::global().is_ok()
}

/// cuBLAS on this GPU's stream, for plain matrix products (until the tensor-core GEMM of
/// "CUDA backend II"). Loaded on first use; absent (None) when libcublas cannot be loaded —
/// the SIMT GEMM kernel then serves, so nothing depends on it being installed.
pub struct Cublas {
    handle: cudarc::cublas::sys::cublasHandle_t,
}

// SAFETY: the handle is used only under the GPU's bound context, one call at a time (calls go
// through `Gpu::gemm`, which holds the handle's mutex).
unsafe impl Send for Cublas {}

/// Row-major `C[b] = op(A[b])·op(B[b])` for `Gpu::gemm` (dtype: f32 or bf16; f32 accumulate).
#[derive(Clone, Copy, Debug)]
pub struct GemmArgs {
    /// Device address of A: [batch, m, k], or [batch, k, m] with `trans_a`.
    pub a: u64,
    /// Device address of B: [k, n], or [n, k] with `trans_b`; with `rhs_batched`, one such
    /// matrix per batch entry.
    pub b: u64,
    /// Device address of C, [batch, m, n]; read as well as written when `beta` ≠ 0.
    pub c: u64,
    /// Products in the batch (A and C step by m·k and m·n elements).
    pub batch: usize,
    /// Rows of op(A) and of C.
    pub m: usize,
    /// Columns of op(B) and of C.
    pub n: usize,
    /// The contraction length: columns of op(A), rows of op(B).
    pub k: usize,
    /// A is stored as [k, m]: op(A) = Aᵀ.
    pub trans_a: bool,
    /// B is stored as [n, k] (a linear layer's weight): op(B) = Bᵀ.
    pub trans_b: bool,
    /// false: one B for every batch.
    pub rhs_batched: bool,
    /// Element type of A, B and C: bf16 when true, else f32 (f32 accumulation either way).
    pub bf16: bool,
    /// C = alpha·op(A)·op(B) + beta·C (1 and 0 for a plain product).
    pub alpha: f32,
    /// The factor on the C already there (0: C is only written).
    pub beta: f32,
}

impl Gpu {
    /// The cuBLAS handle, created on first use; None (with the reason, once, on stderr) when
    /// the library is missing or `SD2_GEMM=simt` asks for the SIMT kernel.
    fn cublas(&self) -> Option<std::sync::MutexGuard<'_, Option<Cublas>>> {
        static WARNED: std::sync::Once = std::sync::Once::new();
        if std::env::var("SD2_GEMM").is_ok_and(|v| v == "simt") {
            return None;
        }
        let mut g = lock(&self.cublas);
        if g.is_none()
            && !self
                .cublas_failed
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            let made = std::panic::catch_unwind(|| -> std::result::Result<Cublas, String> {
                // SAFETY: only checks whether the shared library can be loaded.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return Err("libcublas not found".into());
                }
                self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
                let handle =
                    cudarc::cublas::result::create_handle().map_err(|e| format!("{e:?}"))?;
                // SAFETY: a fresh handle and this GPU's live stream.
                unsafe {
                    cudarc::cublas::result::set_stream(handle, self.stream.cu_stream() as _)
                        .map_err(|e| format!("{e:?}"))?;
                }
                Ok(Cublas { handle })
            })
            .unwrap_or_else(|_| Err("cuBLAS library failed to load".into()));
            match made {
                Ok(c) => *g = Some(c),
                Err(e) => {
                    self.cublas_failed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    WARNED.call_once(|| {
                        log::warn!(
                            "cuBLAS unavailable ({e}); plain matmuls use the SIMT GEMM kernel"
                        )
                    });
                }
            }
        }
        g.is_some().then_some(g)
    }

    /// Whether plain matmuls go through cuBLAS here.
    pub fn has_cublas(&self) -> bool {
        self.cublas().is_some()
    }

    /// A row-major batched GEMM through cuBLAS; Ok(false) when cuBLAS is unavailable (the caller
    /// runs the SIMT kernel). Pure f32 compute (no TF32), for parity with the CPU reference.
    ///
    /// # Safety
    /// The addresses must be device allocations sized for the product.
    pub unsafe fn gemm(&self, g: GemmArgs) -> Result<bool> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t as Op, cudaDataType,
        };
        let Some(guard) = self.cublas() else {
            return Ok(false);
        };
        let Some(h) = guard.as_ref() else {
            return Ok(false);
        };
        self.bind()?;
        let ty = if g.bf16 {
            cudaDataType::CUDA_R_16BF
        } else {
            cudaDataType::CUDA_R_32F
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands.
        let (op_b, ldb_) = if g.trans_b {
            (Op::CUBLAS_OP_T, g.k)
        } else {
            (Op::CUBLAS_OP_N, g.n)
        };
        let (op_a, lda_) = if g.trans_a {
            (Op::CUBLAS_OP_T, g.m)
        } else {
            (Op::CUBLAS_OP_N, g.k)
        };
        let (alpha, beta) = (g.alpha, g.beta);
        let el = if g.bf16 { 2.0 } else { 4.0 };
        let (bm, n, k) = ((g.batch * g.m) as f64, g.n as f64, g.k as f64);
        let b_elems = if g.rhs_batched { g.batch as f64 } else { 1.0 } * k * n;
        crate::profile::set_work(2.0 * bm * n * k, el * (bm * k + b_elems + bm * n));
        let name = if g.bf16 {
            "cublas_gemm_bf16"
        } else {
            "cublas_gemm_f32"
        };
        crate::profile::launch(name, || {
            cudarc::cublas::result::gemm_strided_batched_ex(
                h.handle,
                op_b,
                op_a,
                g.n as i32,
                g.m as i32,
                g.k as i32,
                &alpha as *const f32 as *const _,
                g.b as *const _,
                ty,
                ldb_ as i32,
                if g.rhs_batched { (g.k * g.n) as i64 } else { 0 },
                g.a as *const _,
                ty,
                lda_ as i32,
                (g.m * g.k) as i64,
                &beta as *const f32 as *const _,
                g.c as *mut _,
                ty,
                g.n as i32,
                (g.m * g.n) as i64,
                g.batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
            .map_err(|e| Error::Cuda(format!("cublasGemmStridedBatchedEx {g:?}: {e:?}")))
        })?;
        Ok(true)
    }
}

/// Kernel `name`'s parameter kinds, where the build has the simulator's registry.
fn signature(name: &str) -> Option<&'static str> {
    #[cfg(feature = "cuda-sim")]
    return super::sim::kernel_signature(name);
    #[cfg(not(feature = "cuda-sim"))]
    {
        let _ = name;
        None
    }
}

/// A GPU's compute stream as the profiler's clock: marks are CUDA events on it.
struct GpuClock(Arc<Gpu>);

struct GpuMark(cudarc::driver::CudaEvent);

impl crate::profile::DeviceClock for GpuClock {
    fn mark(&self) -> Result<Box<dyn crate::profile::DeviceMark>> {
        Ok(Box::new(GpuMark(self.0.event()?)))
    }
    fn synchronize(&self) -> Result<()> {
        self.0.synchronize()
    }
    fn device_name(&self) -> String {
        self.0.name.clone()
    }
}

impl crate::profile::DeviceMark for GpuMark {
    fn ms_since(&self, earlier: &dyn crate::profile::DeviceMark) -> Result<f64> {
        let e = earlier
            .as_any()
            .downcast_ref::<GpuMark>()
            .ok_or_else(|| Error::Msg("profiler: marks from two clocks".into()))?;
        Ok(e.0
            .elapsed_ms(&self.0)
            .map_err(|e| Error::Cuda(format!("profiler: event time: {e}")))? as f64)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
