//! L_D's negatives gathered over the ranks (`train.dual_negatives = "all_ranks"`, open_clip's
//! `gather_with_grad` idea): in each round of micro-batches (micro-batch `k` of every rank) each
//! rank's images meet every rank's descriptions, so the contrast sees world × micro-batch
//! negatives — the same loss as one process training on the round's images as one micro-batch.
//!
//! The gather is an all-reduce of a zero-padded stack (each rank writes its rows at its offset;
//! adding zeros is exact), so it runs on whatever engine the job has, with no collective of our
//! own. Its gradient: every rank's loss depends on every rank's descriptions, so the stack's
//! gradient is summed over the ranks and each rank keeps its own rows. Both directions are
//! collectives, so every rank must take part in every round — a rank with fewer micro-batches
//! than the others calls [`gather_rows_absent`] for the rounds it has none.
use std::sync::Arc;

use super::Comm;
use crate::{DType, Device, Error, Result, Tensor};

/// Every rank's rows of `x` \[n, k\], stacked in rank order \[N, k\] (N = Σ `counts`), and the row
/// this rank's start at (Σ of the counts before it). `counts[r]` is rank r's n in this round
/// (the same list on every rank; 0 for a rank that calls [`gather_rows_absent`]). Autograd: the
/// stack's gradient is summed over the ranks (a collective inside backward) and this rank's
/// rows are `x`'s gradient. Errors: `counts` not one per rank, or not giving this rank `n`.
pub fn gather_rows(comm: &Arc<dyn Comm>, x: &Tensor, counts: &[usize]) -> Result<(Tensor, usize)> {
    let (rank, world) = (comm.rank(), comm.world());
    let n = x.dims().first().copied().unwrap_or(0);
    if x.rank() != 2 || counts.len() != world || counts[rank] != n {
        return Err(Error::shape(
            "gather rows",
            format!(
                "x {:?} on rank {rank} with counts {counts:?} for {world} ranks",
                x.dims()
            ),
        ));
    }
    if world == 1 {
        return Ok((x.clone(), 0));
    }
    let offset: usize = counts[..rank].iter().sum();
    let total: usize = counts.iter().sum();
    let k = x.dims()[1];
    let zeros = |rows: usize| Tensor::zeros((rows, k), x.dtype(), x.device());
    let (before, after) = (zeros(offset)?, zeros(total - offset - n)?);
    let own = x.detach();
    let parts: Vec<&Tensor> = [&before, &own, &after]
        .into_iter()
        .filter(|t| t.elem_count() > 0)
        .collect();
    let stack = comm.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
    let comm = comm.clone();
    crate::ops::record_fn_on(
        "gather_rows",
        &stack,
        &[x],
        move |g: &Tensor, _: &[bool]| {
            let summed = comm.all_reduce_sum(g)?;
            Ok(vec![Some(summed.narrow(0, offset, n)?)])
        },
    )
    .map(|t| (t, offset))
}

/// This rank's part in a round of [`gather_rows`] where it has no micro-batch: the forward's
/// all-reduce of a \[Σ counts, width\] stack of `dtype` on `device`, contributing zeros, and —
/// when `backward` (the others' descriptions are tracked: their backward reduces too) — the
/// backward's, contributing a zero gradient.
pub fn gather_rows_absent(
    comm: &dyn Comm,
    counts: &[usize],
    width: usize,
    dtype: DType,
    device: Device,
    backward: bool,
) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let zeros = Tensor::zeros((counts.iter().sum::<usize>(), width), dtype, device)?;
    comm.all_reduce_sum(&zeros)?;
    if backward {
        comm.all_reduce_sum(&zeros)?;
    }
    Ok(())
}
