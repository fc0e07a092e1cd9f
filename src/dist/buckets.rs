//! The step's trainable gradients summed over the ranks in buckets, each started as soon as
//! backward is done with its parameters (DDP's bucketed all-reduce): the sums of the last
//! layers' gradients run while backward still works on the first layers'.
//!
//! The buckets are fixed before the step, the same on every rank: the parameters in reverse
//! order (backward reaches the head first), cut every `bucket_elems` elements, and those the
//! step's class-text backward still adds to (the text tower's, [`GradBuckets::new`]'s
//! `deferred`) in buckets of their own at the end. Every rank starts them in that order — a
//! bucket waits for the ones before it — so the collectives match across ranks however each
//! rank's backward is paced. Each bucket carries, after its gradients, one count per
//! parameter of the ranks that had a gradient for it: a parameter none had keeps none, as in
//! one process.
use std::collections::{HashMap, HashSet};

use super::{Comm, Pending};
use crate::optim::Param;
use crate::{DType, Device, GradStore, Result, Shape, Tensor, TensorId};

struct Slot {
    id: TensorId,
    shape: Shape,
    dtype: DType,
}

struct Bucket {
    slots: Vec<Slot>,
    deferred: bool,
}

/// The fixed split of a step's parameters into buckets.
pub struct GradBuckets {
    buckets: Vec<Bucket>,
    /// A parameter's (bucket, slot).
    at: HashMap<TensorId, (usize, usize)>,
    acc: DType,
    device: Device,
}

impl GradBuckets {
    /// `params` (each once) in reverse order, a new bucket begun when one holds
    /// `bucket_elems` elements or more (0: a single bucket), those in `deferred` after all
    /// the others. The sums travel as f32 (f64 when any parameter is f64).
    pub fn new(params: &[Param], bucket_elems: usize, deferred: &HashSet<TensorId>) -> Self {
        let mut seen = HashSet::new();
        let unique: Vec<&Param> = params
            .iter()
            .filter(|p| seen.insert(p.tensor.id()))
            .collect();
        let acc = if unique.iter().any(|p| p.tensor.dtype() == DType::F64) {
            DType::F64
        } else {
            DType::F32
        };
        let device = unique.first().map_or(Device::Cpu, |p| p.tensor.device());
        let mut plan = GradBuckets {
            buckets: vec![],
            at: HashMap::new(),
            acc,
            device,
        };
        for late in [false, true] {
            let mut elems = 0;
            for p in unique.iter().rev() {
                if deferred.contains(&p.tensor.id()) != late {
                    continue;
                }
                let open = plan.buckets.last().is_some_and(|b| b.deferred == late)
                    && (bucket_elems == 0 || elems < bucket_elems);
                if !open {
                    plan.buckets.push(Bucket {
                        slots: vec![],
                        deferred: late,
                    });
                    elems = 0;
                }
                let b = plan.buckets.len() - 1;
                let bucket = &mut plan.buckets[b];
                plan.at.insert(p.tensor.id(), (b, bucket.slots.len()));
                bucket.slots.push(Slot {
                    id: p.tensor.id(),
                    shape: p.tensor.shape().clone(),
                    dtype: p.tensor.dtype(),
                });
                elems += p.tensor.elem_count();
            }
        }
        plan
    }

    /// How many buckets there are.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when there is no parameter.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Bucket `b` as one flat vector: every gradient (zeros where this rank has none), then
    /// one presence count per parameter.
    fn pack(&self, b: usize, grads: &GradStore) -> Result<Tensor> {
        let slots = &self.buckets[b].slots;
        let mut flat = Vec::with_capacity(slots.len() + 1);
        let mut present = Vec::with_capacity(slots.len());
        for s in slots {
            let n = s.shape.elem_count();
            let g = grads.get_id(s.id);
            present.push(f64::from(u8::from(g.is_some())));
            flat.push(match g {
                Some(g) => g.to_dtype(self.acc)?.reshape(n)?,
                None => Tensor::zeros(n, self.acc, self.device)?,
            });
        }
        flat.push(Tensor::from_f64(
            &present,
            slots.len(),
            self.acc,
            self.device,
        )?);
        let refs: Vec<&Tensor> = flat.iter().collect();
        Tensor::cat(&refs, 0)
    }

    fn elems(&self, b: usize) -> usize {
        self.buckets[b]
            .slots
            .iter()
            .map(|s| s.shape.elem_count())
            .sum()
    }
}

/// What one step's [`GradSync`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Buckets (collectives) in the step.
    pub buckets: usize,
    /// Of those, how many were started from [`GradSync::param_final`]: inside a backward
    /// pass, overlapping the rest of it.
    pub started_in_backward: usize,
}

/// One step's bucketed sum: told when parameters' gradients are final
/// ([`GradSync::param_final`], from [`Tensor::backward_seeded_hooked`]), it starts each bucket
/// once all of its parameters are, in bucket order; [`GradSync::finish`] starts the rest,
/// waits, and puts the sums into the gradient store.
pub struct GradSync<'c> {
    comm: &'c dyn Comm,
    plan: GradBuckets,
    done: Vec<Vec<bool>>,
    left: Vec<usize>,
    deferred_open: bool,
    next: usize,
    pending: Vec<Pending>,
    started_in_backward: usize,
}

impl<'c> GradSync<'c> {
    /// A step's sum over `comm` in the buckets of `plan`; nothing has started.
    pub fn new(comm: &'c dyn Comm, plan: GradBuckets) -> Self {
        let done = plan
            .buckets
            .iter()
            .map(|b| vec![false; b.slots.len()])
            .collect();
        let left = plan.buckets.iter().map(|b| b.slots.len()).collect();
        GradSync {
            comm,
            plan,
            done,
            left,
            deferred_open: false,
            next: 0,
            pending: vec![],
            started_in_backward: 0,
        }
    }

    /// The gradient of `id` in `grads` is final for the step (ignored for a tensor that is no
    /// parameter, and for a deferred one until [`GradSync::main_done`]). Starts every bucket
    /// that is now complete and whose predecessors have started.
    pub fn param_final(&mut self, grads: &GradStore, id: TensorId) -> Result<()> {
        let Some(&(b, s)) = self.plan.at.get(&id) else {
            return Ok(());
        };
        if self.plan.buckets[b].deferred && !self.deferred_open {
            return Ok(());
        }
        self.mark(b, s);
        self.start_ready(grads, true)
    }

    /// The micro-batches' backward passes are over: every parameter but the deferred ones is
    /// final; from now on a deferred parameter's [`GradSync::param_final`] counts.
    pub fn main_done(&mut self, grads: &GradStore) -> Result<()> {
        for b in 0..self.plan.buckets.len() {
            if !self.plan.buckets[b].deferred {
                for s in 0..self.done[b].len() {
                    self.mark(b, s);
                }
            }
        }
        self.deferred_open = true;
        self.start_ready(grads, false)
    }

    /// Every gradient is final: starts the buckets not started yet, waits for all of them
    /// and replaces each parameter's gradient in `grads` by its sum over the ranks.
    pub fn finish(mut self, grads: &mut GradStore) -> Result<SyncStats> {
        for b in 0..self.plan.buckets.len() {
            for s in 0..self.done[b].len() {
                self.mark(b, s);
            }
        }
        self.start_ready(grads, false)?;
        let sums: Vec<Tensor> = self
            .pending
            .into_iter()
            .map(Pending::wait)
            .collect::<Result<_>>()?;
        // Every bucket's presence counts in one read from the device — the first host wait
        // for a device engine's sums, so timed like a collective.
        let tails: Vec<Tensor> = sums
            .iter()
            .enumerate()
            .map(|(b, sum)| sum.narrow(0, self.plan.elems(b), self.plan.buckets[b].slots.len()))
            .collect::<Result<_>>()?;
        let tail_refs: Vec<&Tensor> = tails.iter().collect();
        let mut counts = vec![];
        if !tail_refs.is_empty() {
            let all = Tensor::cat(&tail_refs, 0)?;
            self.comm.timed_read("gradient sums", &mut || {
                counts = all.to_vec_f64()?;
                Ok(())
            })?;
        }
        let mut c = counts.into_iter();
        for (bucket, sum) in self.plan.buckets.iter().zip(&sums) {
            let mut at = 0;
            for s in &bucket.slots {
                let n = s.shape.elem_count();
                // None on any rank: it keeps none, as in one process.
                if c.next().unwrap_or(0.0) > 0.0 {
                    let dtype = grads.get_id(s.id).map_or(s.dtype, |g| g.dtype());
                    let g = sum
                        .narrow(0, at, n)?
                        .reshape(s.shape.clone())?
                        .to_dtype(dtype)?;
                    grads.remove_id(s.id);
                    grads.accumulate(s.id, g)?;
                }
                at += n;
            }
        }
        Ok(SyncStats {
            buckets: self.plan.buckets.len(),
            started_in_backward: self.started_in_backward,
        })
    }

    fn mark(&mut self, b: usize, s: usize) {
        if !std::mem::replace(&mut self.done[b][s], true) {
            self.left[b] -= 1;
        }
    }

    fn start_ready(&mut self, grads: &GradStore, in_backward: bool) -> Result<()> {
        while self.next < self.plan.buckets.len() && self.left[self.next] == 0 {
            let flat = self.plan.pack(self.next, grads)?;
            self.pending.push(self.comm.all_reduce_sum_start(&flat)?);
            self.started_in_backward += usize::from(in_backward);
            self.next += 1;
        }
        Ok(())
    }
}
