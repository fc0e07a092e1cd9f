//! NCCL collectives on GPUs (feature `nccl`): cudarc's bindings, `libnccl.so.2` loaded at run
//! time (a build needs no NCCL; PyTorch's wheels carry one: `nvidia/nccl/lib`). One GPU per
//! local rank; NCCL's unique id goes from rank 0 to the others over the TCP rendezvous
//! ([`super::rendezvous`]), whose links then stop every rank when one dies, and a watchdog stops
//! a collective that hangs. Gradients are reduced in place on the GPU, on the compute stream.
//!
//! Verified on one GPU with one rank; anything with two or more GPUs is unverified until a
//! multi-GPU machine runs it (docs/DISTRIBUTED.md).
use std::sync::{Arc, Mutex};

use cudarc::nccl::{result as nr, sys as ns};

use super::rendezvous::{collective_timeout, exit_on_lost, Links, OnLost, Rendezvous, Watchdog};
use super::{Comm, Launch};
use crate::backend::cuda::gpu::Gpu;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// A NCCL communicator over the job's GPUs.
pub struct Nccl {
    rank: usize,
    world: usize,
    local_rank: usize,
    gpu: Arc<Gpu>,
    comm: Mutex<ns::ncclComm_t>,
    links: Links,
    watchdog: Watchdog,
}

// SAFETY: the communicator handle is used under its Mutex, one call at a time, from any thread
// (NCCL allows that for a communicator not used concurrently); the stream it enqueues on is the
// GPU's compute stream, itself shared that way by every launch.
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
        let rank = launch.rank;
        let fail = |msg: String| Error::Dist { rank, msg };
        let Device::Cuda(ordinal) = device else {
            return Err(fail(format!("NCCL needs a GPU device, not {device}")));
        };
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { ns::is_culib_present() } {
            return Err(fail(
                "libnccl.so.2 was not found: put NCCL's lib folder on LD_LIBRARY_PATH (PyTorch's \
                 wheels carry one in site-packages/nvidia/nccl/lib)"
                    .into(),
            ));
        }
        let gpu = Gpu::get(ordinal)?;
        let id = if rank == 0 {
            let id = nr::get_uniqueid().map_err(|e| fail(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal.iter().map(|c| *c as u8).collect::<Vec<u8>>()
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
        let links = rdzv.watch(on_lost.clone())?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&id) {
            *d = *s as std::ffi::c_char;
        }
        let uid = ns::ncclUniqueId { internal };
        gpu.context()
            .bind_to_thread()
            .map_err(|e| Error::Cuda(format!("bind: {e:?}")))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by ncclCommInitRank before it is read; world and rank are
        // checked by `Launch`.
        let comm = unsafe {
            nr::comm_init_rank(comm.as_mut_ptr(), launch.world as i32, uid, rank as i32)
                .map_err(|e| fail(format!("ncclCommInitRank: {e:?}")))?;
            comm.assume_init()
        };
        let watchdog = Watchdog::new(rank, timeout, on_lost)?;
        log::info!(
            "nccl: rank {rank} of {} on cuda:{ordinal} ({})",
            launch.world,
            gpu.name
        );
        Ok(Nccl {
            rank,
            world: launch.world,
            local_rank: launch.local_rank,
            gpu,
            comm: Mutex::new(comm),
            links,
            watchdog,
        })
    }

    /// Enqueues the in-place sum of `len` elements of type `ty` at device address `addr` on
    /// the compute stream (NCCL returns before the sum is done: callers time the wait).
    fn reduce_in_place(&self, addr: u64, len: usize, ty: ns::ncclDataType_t) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let stream = self.gpu.stream().cu_stream();
        // SAFETY: `addr` is a live device buffer of `len` elements of `dtype` on this GPU,
        // owned by the caller until the stream has run the reduction.
        unsafe {
            nr::all_reduce(
                addr as *const std::ffi::c_void,
                addr as *mut std::ffi::c_void,
                len,
                ty,
                ns::ncclRedOp_t::ncclSum,
                *comm,
                stream as _,
            )
            .map(|_| ())
            .map_err(|e| Error::Dist {
                rank: self.rank,
                msg: format!("ncclAllReduce: {e:?}"),
            })
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
        if !matches!(t.device(), Device::Cuda(o) if o == self.gpu.ordinal) {
            // Host values (and f64) go through the host path.
            return super::all_reduce_sum_via_f64(self, t);
        }
        let out = t.copy()?;
        let (addr, len, dtype) = out.update_storage(|s| match s {
            Storage::Cuda(c) => Ok((c.addr(), c.len, c.dtype)),
            Storage::Cpu(_) => Err(Error::Msg("nccl: a CUDA tensor on the host".into())),
        })?;
        let ty = match dtype {
            DType::F32 => ns::ncclDataType_t::ncclFloat32,
            DType::BF16 => ns::ncclDataType_t::ncclBfloat16,
            d => {
                return Err(Error::UnsupportedDType {
                    op: "nccl all_reduce",
                    dtype: d,
                })
            }
        };
        // Only the enqueue is timed here; a peer that never arrives stalls the stream, and the
        // step's next read (its loss sums, through `all_reduce_f64`) is timed to the end.
        self.watchdog
            .time("all_reduce", || self.reduce_in_place(addr, len, ty))?;
        Ok(out)
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        // Host values (counts, loss terms) in f64 through a raw device buffer.
        let buf = self.gpu.upload(bytemuck::cast_slice(values))?;
        // Timed until the values are back: the download waits for every collective enqueued
        // before it on the stream.
        self.watchdog.time("all_reduce", || {
            self.reduce_in_place(buf.ptr(), values.len(), ns::ncclDataType_t::ncclFloat64)?;
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
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let stream = self.gpu.stream().cu_stream();
        // SAFETY: `buf` is a live device buffer of `n` bytes on this GPU until the download
        // below, which waits for the stream.
        self.watchdog.time("broadcast", || {
            // SAFETY: as above.
            unsafe {
                nr::broadcast(
                    buf.ptr() as *const std::ffi::c_void,
                    buf.ptr() as *mut std::ffi::c_void,
                    n,
                    ns::ncclDataType_t::ncclUint8,
                    root as i32,
                    *comm,
                    stream as _,
                )
                .map(|_| ())
                .map_err(|e| Error::Dist {
                    rank: self.rank,
                    msg: format!("ncclBroadcast: {e:?}"),
                })
            }?;
            buf.download(bytes)
        })?;
        drop(comm);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        // Its download waits for the reduction, and so for every rank.
        let mut v = [1.0];
        self.all_reduce_f64(&mut v)
    }
    fn abort(&self, code: i32) -> ! {
        self.links.sever();
        if let Ok(comm) = self.comm.try_lock() {
            // SAFETY: the communicator is not used after this; the process exits.
            unsafe {
                nr::comm_abort(*comm).ok();
            }
        }
        std::process::exit(code)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        self.links.close();
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the last use of the communicator.
        unsafe {
            nr::comm_destroy(*comm).ok();
        }
    }
}
