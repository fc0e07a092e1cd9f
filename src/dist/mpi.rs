//! MPI collectives (feature `mpi`): Open MPI (or any MPI) through the `mpi` crate, for
//! data-parallel training on CPUs — `mpirun -np N sd2 train …`, `srun` under Slurm with PMIx.
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::rendezvous::{collective_timeout, exit_on_lost, Watchdog};
use super::{Comm, Launch, Pending};
use crate::{Error, Result};

/// The MPI world communicator, entered by every rank of the job. Collectives started with
/// [`Comm::all_reduce_sum_start`] run, in order, on a communication thread of its own; a
/// blocking one waits until those have run, so every rank's collectives keep one order.
pub struct Mpi {
    rank: usize,
    world: usize,
    local_rank: usize,
    shared: Arc<Shared>,
    worker: Mutex<Option<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)>>,
    // Finalizes MPI when dropped: after the communication thread has stopped.
    _universe: Universe,
}

/// A collective for the communication thread.
type Job = Box<dyn FnOnce(&SimpleCommunicator) + Send>;

struct Shared {
    comm: Mutex<Handle>,
    /// Jobs sent to the communication thread and not yet run.
    queued: Mutex<usize>,
    drained: Condvar,
    // MPI's collectives wait forever for a rank that hangs alive (a dead one makes mpirun
    // end the job): this ends the process instead, and mpirun the rest.
    watchdog: Watchdog,
}

struct Handle(SimpleCommunicator);

// SAFETY: MPI is initialized with `Threading::Serialized` (checked in `init`): any thread may
// call it, one at a time, which the Mutex around every call (`Shared::comm`, taken by the
// calling thread and by the communication thread alike) guarantees. The handles are plain
// values of the MPI library, not tied to the thread that made them.
unsafe impl Send for Handle {}
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initializes MPI (once per process) and checks that its world is the one the launcher's
    /// variables describe (an `Error::Dist` otherwise: a process started without `mpirun`
    /// sees a world of one).
    pub fn init(launch: &Launch) -> Result<Mpi> {
        let fail = |msg: String| Error::Dist {
            rank: launch.rank,
            msg,
        };
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| fail("MPI was initialized already in this process".into()))?;
        if !matches!(threading, Threading::Serialized | Threading::Multiple) {
            return Err(fail(format!(
                "the MPI library gives only {threading:?} threading; sd2 needs Serialized"
            )));
        }
        let comm = universe.world();
        let (rank, world) = (comm.rank() as usize, comm.size() as usize);
        if (rank, world) != (launch.rank, launch.world) {
            return Err(fail(format!(
                "MPI sees rank {rank} of {world}, the launcher's variables ({:?}) rank {} of {}: \
                 start the job with mpirun or srun (MPI cannot join processes torchrun started)",
                launch.launcher, launch.rank, launch.world
            )));
        }
        log::info!("mpi: rank {rank} of {world}");
        let shared = Arc::new(Shared {
            comm: Mutex::new(Handle(comm)),
            queued: Mutex::new(0),
            drained: Condvar::new(),
            watchdog: Watchdog::new(rank, collective_timeout(), exit_on_lost())?,
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("sd2-mpi-comm".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    {
                        let c = s.comm.lock().unwrap_or_else(|e| e.into_inner());
                        s.watchdog.time("MPI all-reduce (started)", || job(&c.0));
                    }
                    let mut q = s.queued.lock().unwrap_or_else(|e| e.into_inner());
                    *q = q.saturating_sub(1);
                    s.drained.notify_all();
                }
            })?;
        Ok(Mpi {
            rank,
            world,
            local_rank: launch.local_rank,
            shared,
            worker: Mutex::new(Some((tx, handle))),
            _universe: universe,
        })
    }

    /// Runs the collective `f` on this thread, after every started one, under the lock, timed
    /// by the watchdog.
    fn with<R>(&self, what: &'static str, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
        let mut q = self.shared.queued.lock().unwrap_or_else(|e| e.into_inner());
        while *q > 0 {
            q = self
                .shared
                .drained
                .wait(q)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(q);
        let g = self.shared.comm.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.watchdog.time(what, || f(&g.0))
    }

    /// Queues `job` for the communication thread.
    fn submit(&self, job: Job) -> Result<()> {
        let worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let Some((tx, _)) = worker.as_ref() else {
            return Err(self.stopped());
        };
        *self.shared.queued.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        tx.send(job).map_err(|_| {
            *self.shared.queued.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            self.stopped()
        })
    }

    fn stopped(&self) -> Error {
        Error::Dist {
            rank: self.rank,
            msg: "the MPI communication thread has stopped".into(),
        }
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // The thread ends when its queue closes; it must be gone before MPI is finalized.
        let worker = self
            .worker
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((tx, handle)) = worker {
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl Comm for Mpi {
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
        "mpi"
    }
    fn all_reduce_sum(&self, t: &crate::Tensor) -> Result<crate::Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        if t.dtype() != crate::DType::F32 {
            return super::all_reduce_sum_via_f64(self, t);
        }
        // f32 stays f32 on the wire (the gradients: half the bytes, no conversions).
        let send: Vec<f32> = t.to_vec()?;
        if send.is_empty() {
            return Ok(t.clone());
        }
        let mut recv = vec![0f32; send.len()];
        self.with("MPI all-reduce", |c| {
            c.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum())
        });
        crate::Tensor::from_vec(recv, t.shape().clone(), t.device())
    }
    fn all_reduce_sum_start(&self, t: &crate::Tensor) -> Result<Pending> {
        if self.world == 1 || t.dtype() != crate::DType::F32 {
            return self.all_reduce_sum(t).map(Pending::ready);
        }
        let send: Vec<f32> = t.to_vec()?;
        if send.is_empty() {
            return Ok(Pending::ready(t.clone()));
        }
        let (shape, device, rank) = (t.shape().clone(), t.device(), self.rank);
        let (tx, rx) = mpsc::channel();
        self.submit(Box::new(move |c| {
            let mut recv = vec![0f32; send.len()];
            c.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
            let _ = tx.send(recv);
        }))?;
        Ok(Pending::later(move || {
            let recv = rx.recv().map_err(|_| Error::Dist {
                rank,
                msg: "the MPI communication thread stopped before an all-reduce completed".into(),
            })?;
            crate::Tensor::from_vec(recv, shape, device)
        }))
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let send = values.to_vec();
        // MPI's default error handler aborts the job on failure: there is no error to return.
        self.with("MPI all-reduce", |c| {
            c.all_reduce_into(&send[..], values, SystemOperation::sum())
        });
        Ok(())
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::Dist {
                rank: self.rank,
                msg: format!("broadcast from rank {root} of {}", self.world),
            });
        }
        self.with("MPI broadcast", |c| {
            let r = c.process_at_rank(root as i32);
            let mut len = bytes.len() as u64;
            r.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            // An empty slice's dangling pointer is 0x1, which Open MPI reads as MPI_IN_PLACE
            // and refuses (MPI_ERR_ARG): nothing to send, so no call.
            if len > 0 {
                r.broadcast_into(&mut bytes[..]);
            }
        });
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.with("MPI barrier", |c| c.barrier());
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        // Not under the lock: another thread may hold it inside a collective that will
        // never complete.
        let world = SimpleCommunicator::world();
        world.abort(code)
    }
}
