//! NCCL collectives on GPUs (feature `nccl`): `libnccl.so.2` opened at run time (a build needs
//! no NCCL; PyTorch's wheels carry one: `nvidia/nccl/lib`; `SD2_NCCL_LIB` names another file),
//! with cudarc's declarations of its types ([`library`] says which was found). One GPU per
//! local rank; NCCL's unique id goes from rank 0 to the others over the TCP rendezvous
//! ([`super::rendezvous`]), whose links then stop every rank when one dies, and a watchdog stops
//! a collective that hangs.
//!
//! Every NCCL call goes on a stream of its own (the communicator's, high priority, as PyTorch's
//! ProcessGroupNCCL does), after an event on the compute stream, so that a bucket's sum started
//! inside backward runs beside backward's kernels; the compute stream waits for a sum only where
//! its result is used. One stream for all of them keeps the collectives in the order they were
//! called, the same on every rank. `SD2_NCCL_STREAM=compute` enqueues them on the compute
//! stream instead (no overlap; the way to rule the second stream out).
//!
//! Not yet run on a GPU (no GPU session since it was written); anything with two or more GPUs
//! is unverified until a multi-GPU machine runs it (docs/DISTRIBUTED.md).
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys as ds, CudaEvent, CudaStream};
use cudarc::nccl::sys as ns;

use super::nccl_lib::{lib, Lib};
use super::rendezvous::{collective_timeout, exit_on_lost, Links, OnLost, Rendezvous, Watchdog};
use super::{Comm, Launch, Pending};
use crate::backend::cuda::gpu::Gpu;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// The NCCL library this process opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NcclLibrary {
    /// The name or path it was opened by (`libnccl.so.2`, or `SD2_NCCL_LIB`).
    pub file: String,
    /// Its version, `major.minor.patch`.
    pub version: String,
}

/// Opens libnccl (once per process; no GPU needed) and says which it is. Errors
/// ([`Error::Dist`], on rank 0): every file name tried and why it failed, or a library
/// without NCCL's entry points.
pub fn library() -> Result<NcclLibrary> {
    let fail = |msg: String| Error::Dist { rank: 0, msg };
    let lib = lib().map_err(fail)?;
    Ok(NcclLibrary {
        file: lib.file.clone(),
        version: lib.version().map_err(fail)?,
    })
}

/// The stream NCCL's calls are enqueued on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NcclStream {
    /// The communicator's own stream, ordered after the compute stream's work at each call;
    /// the compute stream waits for a result only where it is used (the default).
    Own,
    /// The GPU's compute stream, between its kernels: no overlap.
    Compute,
}

impl NcclStream {
    /// `SD2_NCCL_STREAM`: `own` (or unset) or `compute`.
    pub fn from_env() -> Result<NcclStream> {
        match std::env::var("SD2_NCCL_STREAM").as_deref() {
            Err(_) | Ok("own") => Ok(NcclStream::Own),
            Ok("compute") => Ok(NcclStream::Compute),
            Ok(v) => Err(Error::Config {
                key: "SD2_NCCL_STREAM".into(),
                msg: format!("`{v}`: expected `own` (the default) or `compute`"),
            }),
        }
    }
}

/// A NCCL communicator over the job's GPUs.
pub struct Nccl {
    rank: usize,
    world: usize,
    local_rank: usize,
    gpu: Arc<Gpu>,
    /// The library the communicator came from (opened once per process, never closed).
    lib: &'static Lib,
    comm: Mutex<ns::ncclComm_t>,
    /// The communicator's stream; `None`: the compute stream (`SD2_NCCL_STREAM=compute`).
    own: Option<Arc<CudaStream>>,
    links: Links,
    watchdog: Watchdog,
}

// SAFETY: the communicator handle is used under its Mutex, one call at a time, from any thread
// (NCCL allows that for a communicator not used concurrently); its stream is used only under
// that Mutex, and the compute stream is shared that way by every launch.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Forms the job on `device` (`cuda:N`: N is this rank's GPU, normally its local rank),
    /// with the default reaction to a lost rank ([`exit_on_lost`]).
    pub fn init(launch: &Launch, device: Device) -> Result<Nccl> {
        Nccl::init_with(launch, device, exit_on_lost())
    }

    /// [`Nccl::init`] with `on_lost` called when a rank stops or a collective times out.
    pub fn init_with(launch: &Launch, device: Device, on_lost: OnLost) -> Result<Nccl> {
        Nccl::init_on(launch, device, on_lost, NcclStream::from_env()?)
    }

    /// [`Nccl::init_with`] with the collectives on `stream`.
    pub fn init_on(
        launch: &Launch,
        device: Device,
        on_lost: OnLost,
        stream: NcclStream,
    ) -> Result<Nccl> {
        let rank = launch.rank;
        let fail = |msg: String| Error::Dist { rank, msg };
        let Device::Cuda(ordinal) = device else {
            return Err(fail(format!("NCCL needs a GPU device, not {device}")));
        };
        let lib = lib().map_err(fail)?;
        let id = if rank == 0 {
            lib.unique_id()
                .map_err(fail)?
                .internal
                .map(|c| c as u8)
                .to_vec()
        } else {
            vec![]
        };
        let timeout = collective_timeout();
        let (rdzv, id) = Rendezvous::connect(launch, &id, timeout)?;
        if id.len() != 128 {
            return Err(fail(format!(
                "rank 0 sent a NCCL id of {} bytes, not 128",
                id.len()
            )));
        }
        let watchdog = Watchdog::new(rank, timeout, on_lost.clone())?;
        let links = rdzv.watch(on_lost)?;
        // From here a failure severs the links, so every rank stops now rather than at the
        // next timeout (the GPU comes after the rendezvous for that reason).
        let joined = (|| {
            let gpu = Gpu::get(ordinal).map_err(|e| match e {
                Error::Cuda(m) if !m.contains(&format!("cuda:{ordinal}")) => {
                    Error::Cuda(format!("cuda:{ordinal} (rank {rank}): {m}"))
                }
                e => e,
            })?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(&id) {
                *d = *s as std::ffi::c_char;
            }
            let uid = ns::ncclUniqueId { internal };
            let own = match stream {
                NcclStream::Own => Some(comm_stream(&gpu)?),
                NcclStream::Compute => None,
            };
            gpu.context()
                .bind_to_thread()
                .map_err(|e| Error::Cuda(format!("bind: {e:?}")))?;
            let mut comm: ns::ncclComm_t = std::ptr::null_mut();
            // Blocks until every rank has joined: timed, as a collective is.
            // SAFETY: writes the communicator; world and rank are checked by `Launch`.
            let code = watchdog.time("ncclCommInitRank", || unsafe {
                (lib.comm_init_rank)(&mut comm, launch.world as i32, uid, rank as i32)
            });
            lib.check("ncclCommInitRank", code, std::ptr::null_mut())
                .map_err(fail)?;
            Ok::<_, Error>((gpu, own, comm))
        })();
        let (gpu, own, comm) = match joined {
            Ok(j) => j,
            Err(e) => {
                links.sever();
                return Err(e);
            }
        };
        log::info!(
            "nccl: rank {rank} of {} on cuda:{ordinal} ({}), collectives on {}",
            launch.world,
            gpu.name,
            if own.is_some() {
                "their own stream"
            } else {
                "the compute stream"
            }
        );
        Ok(Nccl {
            rank,
            world: launch.world,
            local_rank: launch.local_rank,
            gpu,
            lib,
            comm: Mutex::new(comm),
            own,
            links,
            watchdog,
        })
    }

    /// Orders the compute stream after `done`, an event on the communicator's stream: its
    /// later work sees what NCCL wrote.
    /// When that fails, waits for the communicator's stream on the host instead (so the
    /// caller's buffers are never freed under NCCL) and returns the error.
    fn join_compute(&self, done: Option<CudaEvent>) -> Result<()> {
        let Some(done) = done else {
            return Ok(());
        };
        self.gpu.stream().wait(&done).map_err(|e| {
            if let Some(own) = &self.own {
                let _ = own.synchronize();
            }
            Error::Cuda(format!("cuStreamWaitEvent (after NCCL): {e:?}"))
        })
    }

    /// Runs `call` with the stream to enqueue on, under the communicator's lock: its own
    /// stream, after the compute stream's work so far (whatever produced the buffers), then
    /// an event on it that [`Nccl::join_compute`] hands to the compute stream; or the
    /// compute stream itself (no event).
    fn enqueue(
        &self,
        what: &str,
        call: impl FnOnce(&Lib, ns::ncclComm_t, ns::cudaStream_t) -> std::ffi::c_int,
    ) -> Result<Option<CudaEvent>> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let fail = |msg: String| Error::Dist {
            rank: self.rank,
            msg,
        };
        let compute = self.gpu.stream();
        let stream = match &self.own {
            Some(own) => {
                compute
                    .record_event(Some(ds::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .and_then(|e| own.wait(&e))
                    .map_err(|e| Error::Cuda(format!("NCCL stream waiting for compute: {e:?}")))?;
                own
            }
            None => compute,
        };
        let code = call(self.lib, *comm, stream.cu_stream() as _);
        self.lib.check(what, code, *comm).map_err(fail)?;
        match &self.own {
            Some(own) => own
                .record_event(Some(ds::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map(Some)
                .map_err(|e| {
                    // The caller frees its buffers on an error: not while NCCL uses them.
                    let _ = own.synchronize();
                    Error::Cuda(format!("cuEventRecord (NCCL stream): {e:?}"))
                }),
            None => Ok(None),
        }
    }

    /// Enqueues the sum of `len` elements of type `ty` at device address `send` into `recv`
    /// (`recv == send`: in place; NCCL returns before the sum is done: callers time the
    /// wait); the event its end records on the communicator's own stream.
    fn reduce(
        &self,
        send: u64,
        recv: u64,
        len: usize,
        ty: ns::ncclDataType_t,
    ) -> Result<Option<CudaEvent>> {
        // SAFETY: `send` and `recv` are live device buffers of `len` elements of `ty` on this
        // GPU, owned by the caller until the stream has run the reduction (the compute stream
        // waits for the returned event before they can be freed or read).
        self.enqueue("ncclAllReduce", |lib, comm, stream| unsafe {
            (lib.all_reduce)(
                send as *const std::ffi::c_void,
                recv as *mut std::ffi::c_void,
                len,
                ty as std::ffi::c_int,
                ns::ncclRedOp_t::ncclSum as std::ffi::c_int,
                comm,
                stream,
            )
        })
    }

    /// Starts the sum of a CUDA tensor on this GPU into a new buffer (NCCL reads `t` while it
    /// writes the sum: `t` must live until the returned event has been waited for), with the
    /// event that ends it.
    fn start_sum(&self, t: &Tensor) -> Result<(Tensor, Option<CudaEvent>)> {
        let ty = match t.dtype() {
            DType::F32 => ns::ncclDataType_t::ncclFloat32,
            DType::BF16 => ns::ncclDataType_t::ncclBfloat16,
            d => {
                return Err(Error::UnsupportedDType {
                    op: "nccl all_reduce",
                    dtype: d,
                })
            }
        };
        let (send, out) = match &*t.storage() {
            Storage::Cuda(c) => (c.addr(), c.empty(c.len, c.dtype)?),
            Storage::Cpu(_) => return Err(Error::Msg("nccl: a CUDA tensor on the host".into())),
        };
        let (recv, len) = (out.addr(), out.len);
        let out = Tensor::from_storage(Storage::Cuda(out), t.shape().clone())?;
        // Only the enqueue is timed here; a peer that never arrives stalls the stream, and the
        // first host read that waits for the sum (`timed_read`: the buckets' presence counts;
        // or a blocking collective's download) is timed to the end.
        let done = self
            .watchdog
            .time("all_reduce", || self.reduce(send, recv, len, ty))?;
        Ok((out, done))
    }

    fn on_this_gpu(&self, t: &Tensor) -> bool {
        matches!(t.device(), Device::Cuda(o) if o == self.gpu.ordinal)
    }
}

/// The communicator's stream: non-blocking, at the highest priority the GPU has, so that a
/// bucket's reduction gets its SMs among backward's kernels.
fn comm_stream(gpu: &Gpu) -> Result<Arc<CudaStream>> {
    let drv = |what: &'static str| move |e| Error::Cuda(format!("{what}: {e:?}"));
    gpu.context()
        .bind_to_thread()
        .map_err(drv("bind (NCCL stream)"))?;
    let (_least, greatest) = cudarc::driver::result::stream::get_priority_range()
        .map_err(drv("cuCtxGetStreamPriorityRange"))?;
    gpu.context()
        .new_stream_with_priority(greatest)
        .map_err(drv("cuStreamCreateWithPriority (NCCL stream)"))
}

/// A sum in flight on the communicator's stream: its input and result, held (so their memory
/// is neither freed nor reused) until the compute stream has been told to wait for it — by
/// `wait`, or, for a sum dropped unread, by `Drop`.
struct InFlight {
    out: Option<Tensor>,
    _input: Tensor,
    done: Option<CudaEvent>,
    gpu: Arc<Gpu>,
}

impl InFlight {
    /// Orders the compute stream after the sum (once; the event is kept if that fails, so
    /// `Drop` falls back to waiting on the host).
    fn join(&mut self) -> Result<()> {
        if let Some(e) = &self.done {
            self.gpu
                .stream()
                .wait(e)
                .map_err(|e| Error::Cuda(format!("cuStreamWaitEvent (bucket sum): {e:?}")))?;
            self.done = None;
        }
        Ok(())
    }

    fn result(mut self) -> Result<Tensor> {
        self.join()?;
        self.out
            .take()
            .ok_or_else(|| Error::Msg("nccl: a bucket's sum taken twice".into()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.join().is_err() {
            // The compute stream cannot be ordered after the sum: wait for it here, so the
            // buffer is not handed out again while NCCL still writes it.
            let _ = self.gpu.context().synchronize();
        }
    }
}

impl Comm for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if !self.on_this_gpu(t) {
            // Host values (and f64) go through the host path.
            return super::all_reduce_sum_via_f64(self, t);
        }
        let (out, done) = self.start_sum(t)?;
        self.join_compute(done)?;
        Ok(out)
    }
    fn all_reduce_sum_start(&self, t: &Tensor) -> Result<Pending> {
        if !self.on_this_gpu(t) {
            return self.all_reduce_sum(t).map(Pending::ready);
        }
        let (out, done) = self.start_sum(t)?;
        if done.is_none() {
            return Ok(Pending::ready(out));
        }
        let flight = InFlight {
            out: Some(out),
            _input: t.clone(),
            done,
            gpu: self.gpu.clone(),
        };
        Ok(Pending::later(move || flight.result()))
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        // Host values (counts, loss terms) in f64 through a raw device buffer.
        let buf = self.gpu.upload(bytemuck::cast_slice(values))?;
        // Timed until the values are back: the download waits for every collective enqueued
        // before it on the communicator's stream.
        self.watchdog.time("all_reduce", || {
            let done = self.reduce(
                buf.ptr(),
                buf.ptr(),
                values.len(),
                ns::ncclDataType_t::ncclFloat64,
            )?;
            self.join_compute(done)?;
            buf.download(bytemuck::cast_slice_mut(values))
        })
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let mut len = [if self.rank == root {
            bytes.len() as f64
        } else {
            0.0
        }];
        self.all_reduce_f64(&mut len)?;
        let n = len[0] as usize;
        if self.rank != root {
            *bytes = vec![0; n];
        }
        if n == 0 {
            return Ok(());
        }
        let buf = self.gpu.upload(bytes)?;
        self.watchdog.time("broadcast", || {
            // SAFETY: `buf` is a live device buffer of `n` bytes on this GPU until the download
            // below, which the compute stream runs after the broadcast.
            let done = self.enqueue("ncclBroadcast", |lib, comm, stream| unsafe {
                (lib.broadcast)(
                    buf.ptr() as *const std::ffi::c_void,
                    buf.ptr() as *mut std::ffi::c_void,
                    n,
                    ns::ncclDataType_t::ncclUint8 as std::ffi::c_int,
                    root as i32,
                    comm,
                    stream,
                )
            })?;
            self.join_compute(done)?;
            buf.download(bytes)
        })
    }
    fn timed_read(&self, what: &'static str, read: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.watchdog.time(what, read)
    }
    fn barrier(&self) -> Result<()> {
        // Its download waits for the reduction, and so for every rank.
        let mut v = [1.0];
        self.all_reduce_f64(&mut v)
    }
    fn abort(&self, code: i32) -> ! {
        self.links.sever();
        // ncclCommAbort can hang behind a stuck kernel; the peers are already stopping.
        let _ = std::thread::Builder::new().spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(5));
            std::process::exit(code)
        });
        if let Ok(comm) = self.comm.try_lock() {
            // SAFETY: the communicator is not used after this; the process exits.
            unsafe {
                (self.lib.comm_abort)(*comm);
            }
        }
        std::process::exit(code)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Nothing of the communicator's may still run when it is destroyed; a peer that
        // never joins a queued collective is caught by the watchdog while the links still
        // watch the others.
        self.watchdog.time("the last collectives", || {
            let _ = self.gpu.synchronize();
            if let Some(own) = &self.own {
                let _ = own.synchronize();
            }
        });
        self.links.close();
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the last use of the communicator.
        unsafe {
            (self.lib.comm_destroy)(*comm);
        }
    }
}
