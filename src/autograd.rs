//! Reverse-mode autograd. Ops record a `Node` on their output only when gradients are enabled
//! and some input is tracked, so inference (or `no_grad`) builds no tape at all. `backward`
//! walks the graph once in reverse topological order: each node is *taken* from its tensor,
//! its saved tensors are dropped as soon as its gradients are computed, and intermediate
//! gradients (keyed by tensor id) are freed as soon as they are consumed. Gradients of trainable
//! leaves accumulate in place in a `GradStore`, which an optimizer reads and clears.
use std::cell::Cell;
use std::collections::{HashMap, HashSet};

use crate::tensor::{GradState, TensorId};
use crate::{Error, Result, Tensor};

/// The backward half of one recorded op.
pub trait BackwardOp: Send + Sync {
    /// A short name of the op, used in the engine's error messages (e.g. a wrong number of
    /// returned gradients).
    fn name(&self) -> &'static str;
    /// Gradients for the op's inputs in recorded order, given the output's gradient. Only inputs
    /// with `needs[i]` must get one; returning `None` for them means "zero".
    fn backward(self: Box<Self>, grad: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>>;

    /// `backward`, offered the gradient already accumulated for each input (`acc[i]`, only
    /// for inputs that are op outputs and already have one). An op whose kernel can add it in
    /// its epilogue takes it (`acc[i].take()`) and returns the sum as input i's gradient —
    /// one pass instead of a separate add; whatever it leaves is added by the engine as
    /// usual. The default takes nothing.
    fn backward_acc(
        self: Box<Self>,
        grad: &Tensor,
        needs: &[bool],
        acc: &mut [Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let _ = acc;
        self.backward(grad, needs)
    }
}

pub(crate) struct Node {
    /// Tracked inputs (None for constants: no gradient is computed for them).
    pub(crate) inputs: Vec<Option<Tensor>>,
    pub(crate) op: Box<dyn BackwardOp>,
    /// When the op was recorded: backward visits nodes latest first (as PyTorch does), so a
    /// tensor's gradient from later consumers is complete when an earlier one runs.
    seq: u64,
}

static NODE_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Node {
    pub(crate) fn new(inputs: Vec<Option<Tensor>>, op: Box<dyn BackwardOp>) -> Node {
        let seq = NODE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Node { inputs, op, seq }
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

thread_local! {
    static NODES_RECORDED: Cell<usize> = const { Cell::new(0) };
}

thread_local! {
    static ACC_FUSED: Cell<usize> = const { Cell::new(0) };
}

/// How many gradient sums this thread's backward passes left to the ops' own kernels
/// (`BackwardOp::backward_acc`) instead of a separate add (tests use it to prove the fusion).
pub fn accumulations_fused() -> usize {
    ACC_FUSED.with(|n| n.get())
}

/// How many graph nodes this thread has recorded (tests use it to prove `no_grad` is free).
pub fn nodes_recorded() -> usize {
    NODES_RECORDED.with(|n| n.get())
}

pub(crate) fn note_recorded() {
    NODES_RECORDED.with(|n| n.set(n.get() + 1));
}

/// Whether ops on this thread record graph nodes now: true unless a [`no_grad`] guard is
/// alive (and always false inside a backward pass, except where it re-enables recording to
/// recompute a checkpointed segment).
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Restores the previous gradient mode when dropped.
pub struct GradModeGuard(bool);

impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

/// Disables recording on this thread until the guard is dropped.
#[must_use = "recording resumes when the guard is dropped"]
pub fn no_grad() -> GradModeGuard {
    let prev = GRAD_ENABLED.with(|g| g.replace(false));
    GradModeGuard(prev)
}

/// Enables recording on this thread until the guard is dropped (recomputation inside a
/// backward pass, which otherwise runs without recording).
#[must_use = "recording stops again when the guard is dropped"]
pub(crate) fn enable_grad() -> GradModeGuard {
    let prev = GRAD_ENABLED.with(|g| g.replace(true));
    GradModeGuard(prev)
}

/// Builds an op's output, recording `make_backward(y)` only when it is needed. The closure
/// (which clones whatever the backward saves) does not run at all in inference. `y` is a
/// constant view sharing the output's storage, for backward rules that need the output
/// (softmax, attention, …) without copying it.
pub(crate) fn record<B: BackwardOp + 'static>(
    out: crate::storage::Storage,
    shape: crate::Shape,
    inputs: &[&Tensor],
    make_backward: impl FnOnce(&Tensor) -> B,
) -> Result<Tensor> {
    let shape_ok = out.len() == shape.elem_count();
    if !shape_ok {
        return Err(Error::shape(
            "record",
            format!("{} elements for shape {shape:?}", out.len()),
        ));
    }
    record_shared(
        std::sync::Arc::new(crate::storage::StorageCell::new(out)),
        shape,
        inputs,
        make_backward,
    )
}

/// `record` of `out`, an untracked result of other ops, as one node: its storage is shared,
/// not copied (an op composed of ops and collectives whose backward is written by hand).
pub(crate) fn record_tensor<B: BackwardOp + 'static>(
    out: &Tensor,
    inputs: &[&Tensor],
    make_backward: impl FnOnce(&Tensor) -> B,
) -> Result<Tensor> {
    record_shared(
        out.0.storage.clone(),
        out.shape().clone(),
        inputs,
        make_backward,
    )
}

/// `record` over storage that already exists (shared, not copied).
fn record_shared<B: BackwardOp + 'static>(
    storage: std::sync::Arc<crate::storage::StorageCell>,
    shape: crate::Shape,
    inputs: &[&Tensor],
    make_backward: impl FnOnce(&Tensor) -> B,
) -> Result<Tensor> {
    if is_grad_enabled() && inputs.iter().any(|t| t.is_tracked()) {
        note_recorded();
        let view = Tensor::build(storage.clone(), shape.clone(), GradState::Const);
        let node = Node::new(
            inputs
                .iter()
                .map(|t| t.is_tracked().then(|| (*t).clone()))
                .collect(),
            Box::new(make_backward(&view)),
        );
        Ok(Tensor::build(
            storage,
            shape,
            GradState::Op(std::sync::Mutex::new(Some(node))),
        ))
    } else {
        Ok(Tensor::build(storage, shape, GradState::Const))
    }
}

/// The hook of [`Tensor::backward_seeded_hooked`]: the store and the id of a leaf whose
/// gradient this pass has finished.
pub type OnFinal<'a> = dyn FnMut(&GradStore, TensorId) -> Result<()> + 'a;

/// Gradients of trainable leaves, keyed by tensor id.
#[derive(Default)]
pub struct GradStore {
    grads: HashMap<TensorId, Tensor>,
}

impl GradStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The gradient of `t`, if one was accumulated (a trainable leaf reached by backward); it
    /// has `t`'s shape.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.grads.get(&t.id())
    }

    /// The gradient of the tensor with id `id`, if any.
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.grads.get(&id)
    }

    /// Takes the gradient of `t` out of the store (None if it has none).
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.grads.remove(&t.id())
    }

    /// Takes the gradient of the tensor with id `id` out of the store (None if it has none).
    pub fn remove_id(&mut self, id: TensorId) -> Option<Tensor> {
        self.grads.remove(&id)
    }

    /// Number of tensors with a gradient.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// True when no gradient is stored.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Drops every gradient (after an optimizer step, before the next accumulation).
    pub fn clear(&mut self) {
        self.grads.clear();
    }

    /// The ids of the tensors that have a gradient, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = &TensorId> {
        self.grads.keys()
    }

    /// Adds `g` to the gradient of `id`, in place when the stored buffer is not shared.
    pub fn accumulate(&mut self, id: TensorId, g: Tensor) -> Result<()> {
        accumulate(&mut self.grads, id, g)
    }
}

fn accumulate(map: &mut HashMap<TensorId, Tensor>, id: TensorId, g: Tensor) -> Result<()> {
    match map.get(&id) {
        None => {
            map.insert(id, g);
        }
        Some(prev) => {
            if prev.shape() != g.shape() {
                return Err(Error::Autograd(format!(
                    "gradient shapes differ for one tensor: {:?} vs {:?}",
                    prev.shape(),
                    g.shape()
                )));
            }
            if prev.storage_is_unique() && !prev.is_tracked() {
                let src = g.storage();
                prev.storage_mut().add_assign(&src)?;
            } else {
                let sum = prev.add(&g)?;
                map.insert(id, sum);
            }
        }
    }
    Ok(())
}

impl Tensor {
    /// Backpropagates from this tensor (seeded with ones) and returns the leaf gradients.
    pub fn backward(&self) -> Result<GradStore> {
        let mut store = GradStore::new();
        self.backward_into(&mut store)?;
        Ok(store)
    }

    /// Backpropagates and accumulates leaf gradients into `store` (micro-batch accumulation).
    /// The graph is consumed: a second backward through the same ops is an error.
    pub fn backward_into(&self, store: &mut GradStore) -> Result<()> {
        let seed = Tensor::ones(self.shape().clone(), self.dtype(), self.device())?;
        self.backward_seeded(seed, store)
    }

    /// `backward_into` from a given gradient of this tensor (its shape).
    pub fn backward_seeded(&self, seed: Tensor, store: &mut GradStore) -> Result<()> {
        self.backward_pass(seed, store, None)
    }

    /// `backward_seeded`, calling `on_final(store, id)` for every trainable leaf of the graph
    /// as soon as this pass will add nothing more to its gradient (after the last node that
    /// consumes it, whether or not a gradient reached that node): how data-parallel training
    /// starts summing a parameter's gradient over the ranks while the rest of backward runs.
    /// An error from `on_final` stops the pass.
    pub fn backward_seeded_hooked(
        &self,
        seed: Tensor,
        store: &mut GradStore,
        on_final: &mut OnFinal<'_>,
    ) -> Result<()> {
        self.backward_pass(seed, store, Some(on_final))
    }

    fn backward_pass(
        &self,
        seed: Tensor,
        store: &mut GradStore,
        mut on_final: Option<&mut OnFinal<'_>>,
    ) -> Result<()> {
        let _guard = no_grad();
        if seed.shape() != self.shape()
            || seed.dtype() != self.dtype()
            || seed.device() != self.device()
        {
            return Err(Error::Autograd(format!(
                "backward seed {:?} {} on {} for a tensor {:?} {} on {}",
                seed.shape(),
                seed.dtype(),
                seed.device(),
                self.shape(),
                self.dtype(),
                self.device()
            )));
        }
        match &self.0.grad {
            GradState::Const => {
                return Err(Error::Autograd(
                    "backward from a tensor that does not depend on any trainable tensor".into(),
                ))
            }
            GradState::Leaf => {
                store.accumulate(self.id(), seed)?;
                return match on_final {
                    Some(f) => f(store, self.id()),
                    None => Ok(()),
                };
            }
            GradState::Op(_) => {}
        }
        let mut order = topo_order(self)?;
        // With a hook: how many node inputs each leaf still has to be reached through.
        let mut uses: HashMap<TensorId, usize> = HashMap::new();
        if on_final.is_some() {
            for t in order.iter().flatten() {
                for id in leaf_inputs(t) {
                    *uses.entry(id).or_default() += 1;
                }
            }
        }
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        grads.insert(self.id(), seed);
        for slot in order.iter_mut().rev() {
            let Some(t) = slot.take() else { continue };
            let leaves = if on_final.is_some() {
                leaf_inputs(&t)
            } else {
                vec![]
            };
            Self::backward_node(&t, &mut grads, store)?;
            if let Some(f) = on_final.as_mut() {
                for id in leaves {
                    let left = uses.entry(id).or_default();
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        f(store, id)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// One node of a backward pass: takes it from `t`, turns `t`'s summed gradient into its
    /// inputs' (leaves into `store`, op outputs into `grads`).
    fn backward_node(
        t: &Tensor,
        grads: &mut HashMap<TensorId, Tensor>,
        store: &mut GradStore,
    ) -> Result<()> {
        let GradState::Op(cell) = &t.0.grad else {
            return Ok(());
        };
        let node = cell.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(node) = node else {
            return Err(Error::Autograd(
                "this graph was already consumed by an earlier backward".into(),
            ));
        };
        let Some(g) = grads.remove(&t.id()) else {
            // Not on a path to the output: nothing flows, but the node is still freed.
            return Ok(());
        };
        let needs: Vec<bool> = node.inputs.iter().map(|i| i.is_some()).collect();
        let name = node.op.name();
        // The gradients already summed for this node's op-output inputs, offered to the op
        // to add in its own kernel (each tensor once, at its first position).
        let mut acc: Vec<Option<Tensor>> = vec![None; node.inputs.len()];
        for (i, inp) in node.inputs.iter().enumerate() {
            if let Some(inp) = inp {
                if matches!(inp.0.grad, GradState::Op(_)) {
                    acc[i] = grads.remove(&inp.id());
                }
            }
        }
        let offered: Vec<bool> = acc.iter().map(Option::is_some).collect();
        let input_grads = node.op.backward_acc(&g, &needs, &mut acc)?;
        drop(g);
        for (i, (inp, a)) in node.inputs.iter().zip(acc).enumerate() {
            match (inp, a) {
                (Some(inp), Some(a)) => accumulate(grads, inp.id(), a)?,
                (Some(_), None) if offered[i] => {
                    // Taken: the op's gradient for this input now holds the sum.
                    if input_grads.get(i).is_none_or(|g| g.is_none()) {
                        return Err(Error::Autograd(format!(
                            "{name}: took input {i}'s accumulated gradient but returned none"
                        )));
                    }
                    ACC_FUSED.with(|n| n.set(n.get() + 1));
                }
                _ => {}
            }
        }
        if input_grads.len() != node.inputs.len() {
            return Err(Error::Autograd(format!(
                "{name}: backward returned {} gradients for {} inputs",
                input_grads.len(),
                node.inputs.len()
            )));
        }
        for (inp, gi) in node.inputs.into_iter().zip(input_grads) {
            let (Some(inp), Some(gi)) = (inp, gi) else {
                continue;
            };
            if gi.shape() != inp.shape() {
                return Err(Error::Autograd(format!(
                    "{name}: gradient of shape {:?} for an input of shape {:?}",
                    gi.shape(),
                    inp.shape()
                )));
            }
            match inp.0.grad {
                GradState::Leaf => store.accumulate(inp.id(), gi)?,
                GradState::Op(_) => accumulate(grads, inp.id(), gi)?,
                GradState::Const => {}
            }
        }
        Ok(())
    }
}

/// The ids of the trainable leaves among the inputs of `t`'s node (once per input slot).
fn leaf_inputs(t: &Tensor) -> Vec<TensorId> {
    let GradState::Op(cell) = &t.0.grad else {
        return vec![];
    };
    let node = cell.lock().unwrap_or_else(|e| e.into_inner());
    node.as_ref().map_or_else(Vec::new, |n| {
        n.inputs
            .iter()
            .flatten()
            .filter(|i| matches!(i.0.grad, GradState::Leaf))
            .map(|i| i.id())
            .collect()
    })
}

/// The ids of the trainable leaves `t` depends on (every leaf a backward from `t` could reach).
pub fn trainable_leaves(t: &Tensor) -> Result<HashSet<TensorId>> {
    if matches!(t.0.grad, GradState::Leaf) {
        return Ok(HashSet::from([t.id()]));
    }
    let mut out = HashSet::new();
    for node in topo_order(t)?.iter().flatten() {
        out.extend(leaf_inputs(node));
    }
    Ok(out)
}

/// Op-output tensors reachable from `root`, in recording order (inputs before the ops that
/// consume them, since an op is recorded after its inputs exist).
fn topo_order(root: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let mut found: Vec<(u64, Tensor)> = vec![];
    let mut seen = HashSet::new();
    let mut stack = vec![root.clone()];
    while let Some(t) = stack.pop() {
        if !seen.insert(t.id()) {
            continue;
        }
        let GradState::Op(cell) = &t.0.grad else {
            continue;
        };
        let (seq, children): (u64, Vec<Tensor>) = {
            let node = cell.lock().unwrap_or_else(|e| e.into_inner());
            match node.as_ref() {
                Some(n) => (n.seq, n.inputs.iter().flatten().cloned().collect()),
                None => {
                    return Err(Error::Autograd(
                        "this graph was already consumed by an earlier backward".into(),
                    ))
                }
            }
        };
        found.push((seq, t));
        for c in children {
            if !seen.contains(&c.id()) {
                stack.push(c);
            }
        }
    }
    found.sort_by_key(|(seq, _)| *seq);
    Ok(found.into_iter().map(|(_, t)| Some(t)).collect())
}

/// Activation recomputation ("gradient checkpointing"): `f(inputs)` runs without recording,
/// so none of its intermediate activations are kept; the backward pass runs `f` again with
/// recording and backpropagates through that copy. Costs one more forward of `f`; saves all
/// of `f`'s activations but its inputs. `f` must be deterministic (dropout seeded, as
/// `Fwd::dropout_seed` makes it) and `params` must list every trainable tensor `f` reads
/// besides `inputs`: their gradients come out of the recomputed graph (a trainable tensor
/// missing from the list is an error at backward, not a silently lost gradient). Besides its
/// inputs, `f` may read only constants and trainable leaves (the recomputation must not walk
/// into the outer graph).
pub fn checkpoint<F>(inputs: &[&Tensor], params: &[Tensor], f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
{
    if params.iter().any(|p| p.is_tracked() && !p.is_trainable()) {
        return Err(Error::Autograd(
            "checkpoint: `params` must be trainable leaves or constants, not op outputs (pass \
             those as inputs)"
                .into(),
        ));
    }
    let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    let tracked = owned.iter().chain(params).any(|t| t.is_tracked());
    if !is_grad_enabled() || !tracked {
        return f(&owned);
    }
    let y = {
        let _g = no_grad();
        f(&owned)?
    };
    let saved: Vec<Tensor> = owned.iter().map(|t| t.detach()).collect();
    let all: Vec<&Tensor> = inputs.iter().copied().chain(params.iter()).collect();
    record_shared(y.0.storage.clone(), y.shape().clone(), &all, |_| {
        Checkpoint {
            f: Box::new(f),
            saved,
            params: params.to_vec(),
        }
    })
}

/// The function a checkpoint recomputes.
type Recompute = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

struct Checkpoint {
    f: Recompute,
    saved: Vec<Tensor>,
    params: Vec<Tensor>,
}

impl BackwardOp for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn backward(self: Box<Self>, grad: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let _g = enable_grad();
        let n = self.saved.len();
        // Fresh leaves over the saved inputs' storage: their gradients are the inputs'.
        let leaves: Vec<Tensor> = self
            .saved
            .iter()
            .zip(needs)
            .map(|(t, need)| {
                if *need {
                    t.detach().into_trainable()
                } else {
                    t.detach()
                }
            })
            .collect();
        let y = (self.f)(&leaves)?;
        let mut store = GradStore::new();
        if y.is_tracked() {
            y.backward_seeded(grad.clone(), &mut store)?;
        }
        let mut out: Vec<Option<Tensor>> = leaves
            .iter()
            .zip(needs)
            .map(|(l, need)| if *need { store.remove(l) } else { None })
            .collect();
        for (p, need) in self.params.iter().zip(&needs[n..]) {
            let g = store.remove(p);
            out.push(if *need { g } else { None });
        }
        if !store.is_empty() {
            return Err(Error::Autograd(format!(
                "checkpoint: the recomputed function read {} trainable tensor(s) not passed as \
                 `params`; their gradients would be lost",
                store.len()
            )));
        }
        Ok(out)
    }
}
