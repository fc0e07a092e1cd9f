//! Data-parallel training across processes: every rank holds the whole model, trains on its
//! part of each optimizer step's micro-batches, and the trainable gradients are summed over the
//! ranks once per step before AdamW — so every rank takes the same update and the weights stay
//! equal, and the run equals one process training on the same global batch.
//!
//! The collectives come from existing engines, never our own: MPI on CPUs (feature `mpi`:
//! Open MPI through the `mpi` crate; `mpirun -np 2 sd2 train …` or `srun`), NCCL on GPUs
//! (feature `nccl`: libnccl opened at run time, cudarc's declarations; launched by torchrun, `srun`,
//! `mpirun` or `sd2 train --nproc N`). [`launch`] reads where this process stands from the
//! launcher's variables; [`init`] opens the communicator for it.
//!
//! How the work is split (`docs/DISTRIBUTED.md`):
//! - a step's micro-batch `j` (in the order one process would take them) is trained by rank
//!   `j % world` ([`micro_batch_rank`]), with the dropout seed of `j`: no overlap, no gaps, and
//!   the same losses as in one process;
//! - validation items are dealt by video ([`split_by_video`]): a video's frames are scored on
//!   one rank, the scores are then summed so every rank holds all of them;
//! - L_D's negatives are the rank's own micro-batch (the default), or every rank's
//!   descriptions of the same round of micro-batches ([`gather`], `train.dual_negatives`);
//! - rank 0 writes the log and the checkpoints; every rank resumes from them.
use std::sync::Arc;

use crate::optim::Param;
use crate::{Error, GradStore, Result, Tensor};

pub mod buckets;
pub mod gather;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(feature = "nccl")]
mod nccl_lib;
pub mod rendezvous;

pub use gather::{gather_rows, gather_rows_absent};
pub use launch::{Launch, Launcher};

/// A communicator over the job's ranks. Every rank must make the same calls in the same
/// order (a collective is entered by all ranks, or it waits).
pub trait Comm: Send + Sync {
    /// This process's rank, 0..world.
    fn rank(&self) -> usize;

    /// Ranks in the job.
    fn world(&self) -> usize;

    /// Rank among the job's processes on this machine: the GPU this rank uses.
    fn local_rank(&self) -> usize {
        0
    }

    /// The engine's name (`single`, `mpi`, `nccl`), for logs and benchmarks.
    fn backend(&self) -> &'static str;

    /// Sums host values over the ranks, in place on every rank.
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;

    /// Sums `t` over the ranks; the sum has `t`'s shape, dtype and device. The default goes
    /// through the host (`all_reduce_f64`); a device engine (NCCL) sums on the GPU.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.world() == 1 {
            return Ok(t.clone());
        }
        all_reduce_sum_via_f64(self, t)
    }

    /// Starts summing `t` over the ranks and returns at once where the engine can (MPI: on
    /// its communication thread; NCCL: on its own stream, the compute stream waiting for it
    /// only in [`Pending::wait`]); the default sums before returning. Every rank must start
    /// the same collectives in the same order; a blocking collective on the same communicator
    /// runs after every one started before it.
    fn all_reduce_sum_start(&self, t: &Tensor) -> Result<Pending> {
        self.all_reduce_sum(t).map(Pending::ready)
    }

    /// Runs `read`, a host read that waits for collectives this communicator has started (a
    /// device engine's sums end on the device), under the collective timeout: a rank stuck
    /// there is stopped like one stuck in a blocking collective. The default just runs it
    /// (an engine whose started collectives are timed where they run).
    fn timed_read(&self, _what: &'static str, read: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        read()
    }

    /// Rank `root`'s bytes on every rank (`bytes` is replaced on the others).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;

    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()>;

    /// Ends the whole job from this rank, which has failed: every rank's process exits
    /// non-zero (MPI_Abort; under NCCL the rendezvous's liveness links). For the binary, after
    /// it has printed the error: a rank that just returned would leave the others waiting in
    /// their next collective.
    fn abort(&self, code: i32) -> !;
}

/// A collective in flight ([`Comm::all_reduce_sum_start`]): [`Pending::wait`] gives its
/// result.
pub struct Pending(PendingState);

enum PendingState {
    Ready(Tensor),
    Later(Box<dyn FnOnce() -> Result<Tensor> + Send>),
}

impl Pending {
    /// A collective that has completed already.
    pub fn ready(t: Tensor) -> Pending {
        Pending(PendingState::Ready(t))
    }

    /// A collective whose result `wait` gives (blocking until it completes).
    pub fn later(wait: impl FnOnce() -> Result<Tensor> + Send + 'static) -> Pending {
        Pending(PendingState::Later(Box::new(wait)))
    }

    /// Blocks until the collective completes; its result.
    pub fn wait(self) -> Result<Tensor> {
        match self.0 {
            PendingState::Ready(t) => Ok(t),
            PendingState::Later(f) => f(),
        }
    }
}

/// One process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// `t` summed through the host as f64 (`Comm::all_reduce_f64`): the default of
/// [`Comm::all_reduce_sum`], and the engines' path for what they do not reduce natively.
pub fn all_reduce_sum_via_f64<C: Comm + ?Sized>(comm: &C, t: &Tensor) -> Result<Tensor> {
    let mut v = t.to_vec_f64()?;
    comm.all_reduce_f64(&mut v)?;
    Tensor::from_f64(&v, t.shape().clone(), t.dtype(), t.device())
}

/// The communicator for `launch` on `device`: [`Single`] for one process; MPI on the CPU
/// (feature `mpi`, under an MPI launcher); NCCL on CUDA (feature `nccl`). A job whose launcher
/// or build cannot give the collective it needs is an `Error::Dist` saying what to do.
pub fn init(launch: &Launch, device: crate::Device) -> Result<Arc<dyn Comm>> {
    if !launch.is_distributed() {
        return Ok(Arc::new(Single));
    }
    init_engine(launch, device)
}

/// [`init`] without the shortcut for one process: the engine even for a world of one (how
/// `sd2 bench train --nproc 1` times NCCL's all-reduce on one GPU).
pub fn init_engine(launch: &Launch, device: crate::Device) -> Result<Arc<dyn Comm>> {
    let fail = |msg: String| Error::Dist {
        rank: launch.rank,
        msg,
    };
    match device {
        crate::Device::CudaPlan => Err(fail(
            "cuda:plan records one process's launches; it has no ranks".into(),
        )),
        // The simulator's tensors live in host memory: MPI reduces them through the host.
        crate::Device::Cpu | crate::Device::CudaSim => {
            #[cfg(feature = "mpi")]
            {
                if matches!(launch.launcher, Launcher::Torchrun) {
                    return Err(fail(
                        "training on the CPU across processes runs on MPI, which torchrun does \
                         not start: launch with `mpirun -np N sd2 train …` (or `srun`, or \
                         `sd2 train --nproc N`)"
                            .into(),
                    ));
                }
                let m = mpi::Mpi::init(launch)?;
                Ok(Arc::new(m))
            }
            #[cfg(not(feature = "mpi"))]
            Err(fail(format!(
                "{} processes on the CPU need MPI: rebuild with `--features mpi` (and Open MPI \
                 installed: Debian's libopenmpi-dev)",
                launch.world
            )))
        }
        crate::Device::Cuda(_ordinal) => {
            #[cfg(feature = "nccl")]
            {
                let n = nccl::Nccl::init(launch, device)?;
                Ok(Arc::new(n))
            }
            #[cfg(not(feature = "nccl"))]
            Err(fail(format!(
                "{} processes on GPUs need NCCL: rebuild with `--features nccl`",
                launch.world
            )))
        }
    }
}

/// The rank that trains a step's micro-batch `j` (0-based, in single-process order).
pub fn micro_batch_rank(j: usize, world: usize) -> usize {
    j % world.max(1)
}

/// The step-wide index of this rank's `k`-th micro-batch (the inverse of
/// [`micro_batch_rank`]): its dropout seed, so a rank's losses are the single process's.
pub fn micro_batch_index(k: usize, rank: usize, world: usize) -> usize {
    k * world.max(1) + rank
}

/// The indices of `keys` (one per item: its video id, or a unique key for a still) that rank
/// `rank` of `world` takes: whole videos, dealt round-robin in the order each video first
/// appears, so every item lands on exactly one rank and a video's frames stay together.
pub fn split_by_video<S: AsRef<str>>(keys: &[S], rank: usize, world: usize) -> Vec<usize> {
    let mut video_rank = std::collections::HashMap::new();
    let mut next = 0usize;
    let mut mine = vec![];
    for (i, k) in keys.iter().enumerate() {
        let r = *video_rank.entry(k.as_ref()).or_insert_with(|| {
            let r = next % world.max(1);
            next += 1;
            r
        });
        if r == rank {
            mine.push(i);
        }
    }
    mine
}

/// Sums the step's trainable gradients over the ranks (`grads` then holds the sums), after
/// backward: one bucket for all of them, one collective ([`buckets::GradSync`] does it in
/// buckets, started during backward). A parameter with no gradient on some ranks counts as
/// zero there; one with none on any rank keeps none, as in one process.
pub fn all_reduce_grads(comm: &dyn Comm, params: &[Param], grads: &mut GradStore) -> Result<()> {
    // A one-rank job on a real engine still goes through it (NCCL on one GPU is how its path
    // is checked where no second GPU is).
    if comm.backend() == "single" {
        return Ok(());
    }
    let plan = buckets::GradBuckets::new(params, 0, &Default::default());
    buckets::GradSync::new(comm, plan).finish(grads)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_are_dealt_without_overlap_or_gaps() {
        for world in 1..5 {
            for per_step in 1..9 {
                let mut seen = vec![0; per_step];
                for rank in 0..world {
                    let mut k = 0;
                    loop {
                        let j = micro_batch_index(k, rank, world);
                        if j >= per_step {
                            break;
                        }
                        assert_eq!(micro_batch_rank(j, world), rank);
                        seen[j] += 1;
                        k += 1;
                    }
                }
                assert!(seen.iter().all(|c| *c == 1), "{world} {per_step}: {seen:?}");
            }
        }
    }

    #[test]
    fn videos_stay_on_one_rank() {
        let keys = ["a", "b", "a", "c", "still1", "b", "d", "a"];
        let parts: Vec<Vec<usize>> = (0..3).map(|r| split_by_video(&keys, r, 3)).collect();
        let mut all: Vec<usize> = parts.concat();
        all.sort();
        assert_eq!(all, (0..keys.len()).collect::<Vec<_>>(), "each item once");
        for part in &parts {
            for i in part {
                for j in 0..keys.len() {
                    if keys[j] == keys[*i] {
                        assert!(part.contains(&j), "video {} split across ranks", keys[j]);
                    }
                }
            }
        }
        // Dealt in order of first appearance: a → 0, b → 1, c → 2, still1 → 0, d → 1.
        assert_eq!(parts[0], vec![0, 2, 4, 7]);
        assert_eq!(parts[1], vec![1, 5, 6]);
    }
}
