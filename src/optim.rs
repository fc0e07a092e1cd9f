//! AdamW over trainable leaves, reading gradients from a `GradStore`. The update itself is the
//! fused unit `ops::fused::adamw` (per tensor, or every tensor at once on CUDA), so parameters
//! and moments stay on their device.
use std::collections::HashMap;

use crate::backend::AdamWStep;
use crate::ops::fused::adamw;
use crate::{Error, GradStore, Result, Tensor, TensorId};

/// The hyper-parameters of [`AdamW`] that stay fixed over a run (the learning rate is given per
/// step). Defaults: β₁ 0.9, β₂ 0.999, eps 1e-8, weight decay 0.01.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Decay rate of the first moment (mean of gradients), β₁.
    pub beta1: f64,
    /// Decay rate of the second moment (mean of squared gradients), β₂.
    pub beta2: f64,
    /// Added to √v̂ in the update's denominator, for stability.
    pub eps: f64,
    /// Decoupled weight decay per unit of learning rate: each step multiplies a decayed parameter
    /// by `1 − lr·weight_decay`. Applies only to params with `decay` set.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// A trainable tensor and whether weight decay applies to it (not to biases, norms, scales).
#[derive(Clone, Debug)]
pub struct Param {
    /// The tensor's key: checkpoints save it and its moments under it (`m.NAME`, `v.NAME`), and
    /// errors name it. Unique within a parameter list.
    pub name: String,
    /// The trainable leaf (see `Tensor::into_trainable`); updated in place by the optimizer.
    pub tensor: Tensor,
    /// Whether weight decay applies to this tensor.
    pub decay: bool,
}

impl Param {
    /// A parameter named `name` over the trainable tensor `tensor`, decayed when `decay`.
    pub fn new(name: impl Into<String>, tensor: Tensor, decay: bool) -> Param {
        Param {
            name: name.into(),
            tensor,
            decay,
        }
    }
}

/// AdamW with decoupled weight decay (Loshchilov & Hutter) over a list of [`Param`]s. It keeps
/// the step count (for bias correction) and, per parameter id, the moments m and v, created
/// as zeros on a parameter's first update with its shape and device (its dtype on the
/// per-tensor path, f32 on the fused CUDA path).
pub struct AdamW {
    /// The hyper-parameters; may be changed between steps.
    pub cfg: AdamWConfig,
    steps: u64,
    moments: HashMap<TensorId, (Tensor, Tensor)>,
}

impl AdamW {
    /// An optimizer with no steps taken and no moments yet.
    pub fn new(cfg: AdamWConfig) -> AdamW {
        AdamW {
            cfg,
            steps: 0,
            moments: HashMap::new(),
        }
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The first and second moments of `param` (None before its first update).
    pub fn moments(&self, param: &Tensor) -> Option<(&Tensor, &Tensor)> {
        self.moments.get(&param.id()).map(|(m, v)| (m, v))
    }

    /// Restores the step count and the moments of `param` (checkpoint resume).
    pub fn restore(&mut self, steps: u64, param: &Tensor, m: Tensor, v: Tensor) -> Result<()> {
        if m.dims() != param.dims() || v.dims() != param.dims() {
            return Err(Error::mismatch(
                "adamw",
                format!(
                    "moments {:?}/{:?} do not fit a parameter of shape {:?}",
                    m.dims(),
                    v.dims(),
                    param.dims()
                ),
            ));
        }
        let conv = |t: Tensor| -> Result<Tensor> {
            t.to_dtype(param.dtype())?.to_device(param.device())?.copy()
        };
        self.moments.insert(param.id(), (conv(m)?, conv(v)?));
        self.steps = steps;
        Ok(())
    }

    /// Sets the step count that the next bias correction continues from (checkpoint resume, or
    /// taking back a step whose gradient norm was not finite). Moments are not touched.
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// One update of every parameter that has a gradient, each gradient multiplied by
    /// `grad_scale` first (1/micro-batches, a clipping factor).
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for p in params {
            if !p.tensor.is_trainable() {
                return Err(Error::invalid(
                    "adamw",
                    format!("parameter `{}` is not a trainable tensor", p.name),
                ));
            }
            let Some(g) = grads.get(&p.tensor) else {
                continue;
            };
            let step = AdamWStep {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if p.decay { self.cfg.weight_decay } else { 0.0 },
                bias1: 1.0 - self.cfg.beta1.powi(t),
                bias2: 1.0 - self.cfg.beta2.powi(t),
                grad_scale,
            };
            let (m, v) = match self.moments.entry(p.tensor.id()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let z = || {
                        Tensor::zeros(
                            p.tensor.dims().to_vec(),
                            p.tensor.dtype(),
                            p.tensor.device(),
                        )
                    };
                    e.insert((z()?, z()?))
                }
            };
            let gs = g.storage();
            let (mut ms, mut vs) = (m.storage_mut(), v.storage_mut());
            p.tensor
                .update_storage(|ps| adamw::step(ps, &gs, &mut ms, &mut vs, step))?;
        }
        Ok(())
    }
}

/// The global gradient norm of a step, where it was computed.
pub enum GradNorm {
    /// The norm computed on the host (the per-tensor path); the update was skipped when it is
    /// not finite.
    Host(f64),
    /// [‖g‖, clipping factor] (f32) on the device: read it with the step's other metrics, so
    /// the step itself never waits for the device.
    Device(Tensor),
}

impl AdamW {
    /// Clips the gradients to global norm `max_norm` (torch's `clip_grad_norm_` factor) and
    /// updates every parameter that has a gradient. When every such parameter and gradient is
    /// f32 on one CUDA device this is three launches (norm, factor, one multi-tensor AdamW) and
    /// no host sync; elsewhere the norm is computed on the host first. When the norm is not
    /// finite nothing is updated (parameters and moments keep their values) but the step count
    /// advances all the same (on the device nothing is known until the norm is read): a caller
    /// that finds the norm non-finite takes it back with `set_steps(steps() − 1)`.
    pub fn step_clipped(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        lr: f64,
        max_norm: f64,
    ) -> Result<GradNorm> {
        #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
        if let Some(n) = self.step_fused(params, grads, lr, max_norm)? {
            return Ok(GradNorm::Device(n));
        }
        let norm = grad_norm(params, grads)?;
        // A non-finite norm skips the update (the fused step does the same on the device); the
        // step is counted either way.
        if norm.is_finite() {
            self.step(params, grads, lr, clip_coefficient(norm, max_norm))?;
        } else {
            self.steps += 1;
        }
        Ok(GradNorm::Host(norm))
    }

    /// `step_clipped` on one CUDA device; None (nothing done) when the parameters are not all
    /// f32 CUDA tensors there.
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn step_fused(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        lr: f64,
        max_norm: f64,
    ) -> Result<Option<Tensor>> {
        use adamw::FusedParam;
        let mut with = vec![];
        let mut seen = std::collections::HashSet::new();
        for p in params {
            if !seen.insert(p.tensor.id()) {
                return Err(Error::invalid(
                    "adamw",
                    format!("parameter `{}` is listed twice", p.name),
                ));
            }
            if !p.tensor.is_trainable() {
                return Err(Error::invalid(
                    "adamw",
                    format!("parameter `{}` is not a trainable tensor", p.name),
                ));
            }
            if let Some(g) = grads.get(&p.tensor) {
                with.push((p, g));
            }
        }
        let Some(device) = with.first().map(|(p, _)| p.tensor.device()) else {
            return Ok(None);
        };
        let fits = |t: &Tensor| t.device() == device && t.dtype() == crate::DType::F32;
        if !device.is_cuda() || !with.iter().all(|(p, g)| fits(&p.tensor) && fits(g)) {
            return Ok(None);
        }
        for (p, _) in &with {
            if let std::collections::hash_map::Entry::Vacant(e) = self.moments.entry(p.tensor.id())
            {
                let z = || Tensor::zeros(p.tensor.dims().to_vec(), crate::DType::F32, device);
                e.insert((z()?, z()?));
            }
        }
        let t = (self.steps + 1) as i32;
        let step = AdamWStep {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: 0.0,
            bias1: 1.0 - self.cfg.beta1.powi(t),
            bias2: 1.0 - self.cfg.beta2.powi(t),
            grad_scale: 1.0,
        };
        // Write guards on what the kernels update, read guards on the gradients.
        let mut guards = vec![];
        for (p, g) in &with {
            let (m, v) = &self.moments[&p.tensor.id()];
            guards.push((
                p.tensor.storage_mut(),
                g.storage(),
                m.storage_mut(),
                v.storage_mut(),
                if p.decay { self.cfg.weight_decay } else { 0.0 },
            ));
        }
        let fused: Vec<FusedParam<crate::storage::Storage>> = guards
            .iter()
            .map(|(p, g, m, v, wd)| FusedParam {
                p: &**p,
                g: &**g,
                m: &**m,
                v: &**v,
                weight_decay: *wd as f32,
            })
            .collect();
        let out = adamw::step_clipped(&fused, step, max_norm)?;
        drop(fused);
        drop(guards);
        self.steps += 1;
        Ok(Some(Tensor::from_storage(out, 2usize)?))
    }
}

/// Global L2 norm of the gradients of `params`.
pub fn grad_norm(params: &[Param], grads: &GradStore) -> Result<f64> {
    let mut s = 0.0;
    for p in params {
        if let Some(g) = grads.get(&p.tensor) {
            s += adamw::sum_sq(&g.storage())?;
        }
    }
    Ok(s.sqrt())
}

/// torch's `clip_grad_norm_` factor: min(1, max_norm / (norm + 1e-6)).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}
