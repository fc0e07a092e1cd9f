//! MPI collectives (feature `mpi`): Open MPI (or any MPI) through the `mpi` crate, for
//! data-parallel training on CPUs — `mpirun -np N sd2 train …`, `srun` under Slurm with PMIx.
use std::sync::Mutex;

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::rendezvous::{collective_timeout, exit_on_lost, Watchdog};
use super::{Comm, Launch};
use crate::{Error, Result};

/// The MPI world communicator, entered by every rank of the job.
pub struct Mpi {
    rank: usize,
    world: usize,
    local_rank: usize,
    inner: Mutex<Inner>,
    // MPI's collectives wait forever for a rank that hangs alive (a dead one makes mpirun
    // end the job): this ends the process instead, and mpirun the rest.
    watchdog: Watchdog,
}

struct Inner {
    comm: SimpleCommunicator,
    // Finalizes MPI when dropped: it lives exactly as long as the communicator.
    _universe: Universe,
}

// SAFETY: MPI is initialized with `Threading::Serialized` (checked in `init`): any thread may
// call it, one at a time, which the Mutex around every call guarantees. The handles are
// plain values of the MPI library, not tied to the thread that made them.
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
        let watchdog = Watchdog::new(rank, collective_timeout(), exit_on_lost())?;
        Ok(Mpi {
            watchdog,
            rank,
            world,
            local_rank: launch.local_rank,
            inner: Mutex::new(Inner {
                comm,
                _universe: universe,
            }),
        })
    }

    /// Runs the collective `f` under the lock, timed by the watchdog.
    fn with<R>(&self, what: &'static str, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.watchdog.time(what, || f(&g.comm))
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
