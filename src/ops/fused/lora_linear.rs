//! The (LoRA-)linear layer `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ` as one fused unit: the shape
//! checks and backward rule on `Tensor`, the CPU reference (the definition the fused LoRA GEMM
//! kernels are tested against), and the CUDA side — PEFT's structure on cuBLAS for f32, and for
//! bf16 the path `backend::cuda::storage_lora` chose for the shape (cuBLAS, or a kernel of
//! `kernels/lora_gemm.cu` with the low-rank term and bias fused into the GEMM).
use rayon::prelude::*;

use super::{cpu_float, FloatFn, FusedKernel};
use crate::autograd::{record, BackwardOp};
use crate::backend::cpu::elementwise;
use crate::backend::cpu::gemm::{gemm_into, Mat};
use crate::backend::cpu::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::abi::Arg;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::kernels as kn;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::storage::{same_len, CudaStorage, DropLow, LoraKey, LoraPath};
use crate::backend::{BackendStorage, LinearGrads, LinearNeeds, LinearSpec, LoraSpec, UnaryOp};
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::{BinaryOp, MatmulSpec};
use crate::ops::{check_float, check_same_dtype};
use crate::rng::dropout_keep;
use crate::storage::Storage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::DType;
use crate::{Error, Float, Result, Shape, Tensor};

/// The low-rank branch of a LoRA-linear: `scale·(drop(x)·Aᵀ)·Bᵀ` with A [rank, in], B [out, rank].
#[derive(Clone)]
pub struct Lora<'a> {
    /// The down-projection A, [rank, in]; same dtype and device as x.
    pub a: &'a Tensor,
    /// The up-projection B, [out, rank]; SD2 initializes it to zeros, so the branch starts at 0.
    pub b: &'a Tensor,
    /// The factor s on the branch (SD2: `alpha / rank`).
    pub scale: f64,
    /// Dropout probability on the LoRA input; 0 at inference.
    pub dropout: f32,
    /// Seed of the dropout mask (a counter-based hash: backward regenerates it).
    pub seed: u64,
}

/// `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ` as one op: x is \[..., in\], W \[out, in\], b \[out\].
/// Gradients flow to x, A, B (and to W, b only if they are trainable).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: Option<Lora<'_>>,
) -> Result<Tensor> {
    linear_impl(x, w, b, lora, None, Act::None, None).map(|(y, _)| y)
}

/// `residual + lora_linear(x, w, b, lora)` as one op — a pre-LN block's `x + out_proj(·)` and
/// `x + fc2(·)`: the add happens in the GEMM's epilogue where the fused kernel runs, so the
/// sum is written once. `residual` has y's shape and gets y's gradient.
pub fn lora_linear_residual(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: Option<Lora<'_>>,
    residual: &Tensor,
) -> Result<Tensor> {
    linear_impl(x, w, b, lora, Some(residual), Act::None, None).map(|(y, _)| y)
}

/// A LoRA-linear followed by quick_gelu — CLIP's fc1 — as the next linear takes it: the
/// pre-activation h and quick_gelu(h), both written by the GEMM's epilogue where the fused
/// kernel runs (no separate activation pass, forward or backward).
pub struct GeluLinear {
    pre: Option<Tensor>,
    act: Tensor,
}

impl GeluLinear {
    /// h = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ, tracked: gradients flow back through the linear. None
    /// when no gradient can flow back through it (inference): then h is never written.
    pub fn pre(&self) -> Option<&Tensor> {
        self.pre.as_ref()
    }

    /// quick_gelu(h) as a value. It carries no gradient of its own: `lora_linear_gelu_input`
    /// routes the next linear's input gradient to `pre`, times quick_gelu′(h).
    pub fn act(&self) -> &Tensor {
        &self.act
    }
}

/// `quick_gelu(lora_linear(x, w, b, lora))` as a `GeluLinear`.
pub fn lora_linear_gelu(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: Option<Lora<'_>>,
) -> Result<GeluLinear> {
    let (y, act) = linear_impl(x, w, b, lora, None, Act::Out, None)?;
    Ok(match act {
        Some(act) => GeluLinear { pre: Some(y), act },
        // Nothing tracked: y is already quick_gelu(h), h was not kept.
        None => GeluLinear { pre: None, act: y },
    })
}

/// `lora_linear(quick_gelu(h), w, b, lora)` (+ `residual`) for `input` from
/// `lora_linear_gelu` — CLIP's fc2: its input gradient goes to h with quick_gelu′ applied in
/// the dX GEMM's epilogue where the fused kernel runs.
pub fn lora_linear_gelu_input(
    input: &GeluLinear,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: Option<Lora<'_>>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let act = match &input.pre {
        Some(pre) => Act::In(pre),
        None => Act::None,
    };
    linear_impl(&input.act, w, b, lora, residual, act, None).map(|(y, _)| y)
}

/// Whether the linear's output goes through quick_gelu (`Out`) or its input came out of one
/// (`In(h)`, the input being quick_gelu(h)).
#[derive(Clone, Copy)]
enum Act<'a> {
    None,
    Out,
    In(&'a Tensor),
}

/// One LoRA-linear of x per entry of `layers` (W, bias, LoRA) — a block's q, k and v of its
/// LayerNorm output — exactly as separate `lora_linear` calls, but with the adapters'
/// S = drop(x)·Aᵀ computed in one pass over x where the kernel can (CUDA; two or three
/// adapters of equal rank and dropout, total rank ≤ 32).
pub fn lora_linears_of_one_input(
    x: &Tensor,
    layers: &[(&Tensor, Option<&Tensor>, Option<Lora<'_>>)],
) -> Result<Vec<Tensor>> {
    let shared = shared_down(x, layers)?;
    layers
        .iter()
        .enumerate()
        .map(|(i, (w, b, lora))| {
            let s = shared.as_ref().map(|v| &v[i]);
            linear_impl(x, w, *b, lora.clone(), None, Act::None, s).map(|(y, _)| y)
        })
        .collect()
}

/// The adapters' S of one input in one pass (`kernels/lora_lowrank.cu` lora_down, up to three
/// groups with their own masks), or None where each op is better left to compute its own.
fn shared_down(
    x: &Tensor,
    layers: &[(&Tensor, Option<&Tensor>, Option<Lora<'_>>)],
) -> Result<Option<Vec<Tensor>>> {
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    {
        let loras: Vec<&Lora> = layers.iter().filter_map(|l| l.2.as_ref()).collect();
        let r = loras
            .first()
            .map_or(0, |l| l.a.dims().first().copied().unwrap_or(0));
        let k = x.shape().last();
        let fits = (2..=3).contains(&layers.len())
            && loras.len() == layers.len()
            && loras.iter().all(|l| {
                l.a.dims() == [r, k]
                    && l.a.dtype() == x.dtype()
                    && l.dropout == loras[0].dropout
                    && (0.0..1.0).contains(&l.dropout)
            })
            && r > 0
            && r * loras.len() <= kn::LORA_LOWRANK_MAX_RANK
            && x.rank() >= 1;
        if !fits {
            return Ok(None);
        }
        let xs = x.storage();
        let guards: Vec<_> = loras.iter().map(|l| l.a.storage()).collect();
        let Storage::Cuda(xc) = &*xs else {
            return Ok(None);
        };
        let mut acs = vec![];
        for g in &guards {
            let Storage::Cuda(ac) = &**g else {
                return Ok(None);
            };
            acs.push(ac);
        }
        let m = x.shape().rows();
        let outs: Vec<CudaStorage> = (0..loras.len())
            .map(|_| xc.empty(m * r, xc.dtype))
            .collect::<Result<_>>()?;
        let seeds: Vec<u64> = loras.iter().map(|l| l.seed).collect();
        let out_refs: Vec<&CudaStorage> = outs.iter().collect();
        launch_down(xc, &acs, &out_refs, (m, k, r), loras[0].dropout, &seeds)?;
        let t = outs
            .into_iter()
            .map(|s| Tensor::from_storage(Storage::Cuda(s), Shape::from(vec![m, r])))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(t))
    }
    #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
    {
        let _ = (x, layers);
        Ok(None)
    }
}

#[allow(clippy::too_many_arguments)]
fn linear_impl(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: Option<Lora<'_>>,
    residual: Option<&Tensor>,
    act: Act<'_>,
    given_s: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let op = Forward::NAME;
    check_float(op, x)?;
    check_same_dtype(op, x, w)?;
    if w.rank() != 2 || x.rank() == 0 {
        return Err(crate::shape_err!(
            op,
            "x {:?} · W {:?}: W must be [out, in]",
            x.dims(),
            w.dims()
        ));
    }
    let (n, k) = (w.dims()[0], w.dims()[1]);
    if x.shape().last() != k {
        return Err(crate::shape_err!(
            op,
            "x {:?} has last dim {} but W {:?} expects {k}",
            x.dims(),
            x.shape().last(),
            w.dims()
        ));
    }
    if let Some(b) = b {
        check_same_dtype(op, x, b)?;
        if b.dims() != [n] {
            return Err(crate::shape_err!(
                op,
                "bias {:?} does not match W {:?}",
                b.dims(),
                w.dims()
            ));
        }
    }
    let spec = LinearSpec {
        m: x.shape().rows(),
        n,
        k,
    };
    let lspec = match &lora {
        None => None,
        Some(l) => {
            check_same_dtype(op, x, l.a)?;
            check_same_dtype(op, x, l.b)?;
            let r = l.a.dims().first().copied().unwrap_or(0);
            if l.a.dims() != [r, k] || l.b.dims() != [n, r] {
                return Err(crate::shape_err!(
                    op,
                    "LoRA A {:?} / B {:?} do not fit W {:?}",
                    l.a.dims(),
                    l.b.dims(),
                    w.dims()
                ));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return Err(Error::invalid(
                    op,
                    format!("dropout {} must be in [0, 1)", l.dropout),
                ));
            }
            Some(LoraSpec {
                rank: r,
                scale: l.scale,
                dropout: l.dropout,
                seed: l.seed,
            })
        }
    };
    let gelu_pre = match act {
        Act::In(pre) => {
            check_same_dtype(op, x, pre)?;
            if pre.dims() != x.dims() {
                return Err(crate::shape_err!(
                    op,
                    "pre-activation {:?} does not match the input {:?}",
                    pre.dims(),
                    x.dims()
                ));
            }
            Some(pre)
        }
        _ => None,
    };
    let gelu_out = matches!(act, Act::Out);
    if gelu_out && residual.is_some() {
        return Err(Error::invalid(op, "a quick_gelu output takes no residual"));
    }
    // The GEMM reads x; the gradient of input 0 goes to h when x = quick_gelu(h).
    let mut inputs = vec![gelu_pre.unwrap_or(x), w];
    if let Some(b) = b {
        inputs.push(b);
    }
    // fc1 keeps h only for a backward that will need it.
    let keep_pre = gelu_out
        && crate::autograd::is_grad_enabled()
        && inputs
            .iter()
            .copied()
            .chain(lora.as_ref().map(|l| l.a))
            .chain(lora.as_ref().map(|l| l.b))
            .any(|t| t.is_tracked());
    if let Some(l) = &lora {
        inputs.push(l.a);
        inputs.push(l.b);
    }
    let mut od = x.dims().to_vec();
    *od.last_mut().expect("rank ≥ 1") = n;
    if let Some(r) = residual {
        check_same_dtype(op, x, r)?;
        if r.dims() != od.as_slice() {
            return Err(crate::shape_err!(
                op,
                "residual {:?} does not match the output {:?}",
                r.dims(),
                od
            ));
        }
        inputs.push(r);
    }
    let fwd = Forward {
        spec,
        bias: b.is_some(),
        lora: lspec,
        residual: residual.is_some(),
        gelu: gelu_out,
        keep_pre,
        given_s: given_s.is_some() && lspec.is_some(),
    };
    let mut outs = {
        let mut guards: Vec<_> = inputs.iter().map(|t| t.storage()).collect();
        if gelu_pre.is_some() {
            guards[0] = x.storage(); // the GEMM's input is quick_gelu(h)
        }
        if fwd.given_s {
            guards.extend(given_s.map(|s| s.storage()));
        }
        let st: Vec<&Storage> = guards.iter().map(|g| &**g).collect();
        super::run(&fwd, &st)?.into_iter()
    };
    let y = outs
        .next()
        .ok_or_else(|| Error::Msg("lora_linear: no output".into()))?;
    let s = match (lspec, given_s) {
        (None, _) => None,
        (Some(_), Some(s)) => Some(s.clone()),
        (Some(sp), None) => {
            let st = outs
                .next()
                .ok_or_else(|| Error::Msg("lora_linear: no S output".into()))?;
            Some(Tensor::from_storage(
                st,
                Shape::from(vec![spec.m, sp.rank]),
            )?)
        }
    };
    let act_out = if keep_pre {
        let a = outs
            .next()
            .ok_or_else(|| Error::Msg("lora_linear: no activation output".into()))?;
        Some(Tensor::from_storage(a, Shape::new(od.clone()))?)
    } else {
        None
    };
    let has_bias = b.is_some();
    let has_residual = residual.is_some();
    let y = record(y, Shape::new(od), &inputs, |_| LinearBackward {
        x: x.clone(),
        w: w.clone(),
        lora: lora
            .as_ref()
            .zip(lspec)
            .zip(s)
            .map(|((l, sp), s)| (l.a.clone(), l.b.clone(), s, sp)),
        gelu_pre: gelu_pre.cloned(),
        has_bias,
        has_residual,
        spec,
    })?;
    Ok((y, act_out))
}

struct LinearBackward {
    x: Tensor,
    w: Tensor,
    /// (A, B, S = drop(x)·Aᵀ, spec).
    lora: Option<(Tensor, Tensor, Tensor, LoraSpec)>,
    /// h when x = quick_gelu(h): input 0 is h, and its gradient is dX·quick_gelu′(h).
    gelu_pre: Option<Tensor>,
    has_bias: bool,
    has_residual: bool,
    spec: LinearSpec,
}

impl BackwardOp for LinearBackward {
    fn name(&self) -> &'static str {
        Forward::NAME
    }

    fn backward(self: Box<Self>, g: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut none = vec![None; needs.len()];
        self.backward_acc(g, needs, &mut none)
    }

    fn backward_acc(
        self: Box<Self>,
        g: &Tensor,
        needs: &[bool],
        acc: &mut [Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        // Input 0's gradient so far (q/k/v share theirs) is added in the dX epilogue.
        let in_shape = self.gelu_pre.as_ref().map_or(self.x.shape(), |p| p.shape());
        let acc0 = acc.first_mut().and_then(|a| {
            a.take_if(|a| {
                needs.first() == Some(&true) && a.dtype() == self.x.dtype() && a.shape() == in_shape
            })
        });
        let bi = if self.has_bias { Some(2) } else { None };
        let li = if self.has_bias { 3 } else { 2 };
        let need = |i: usize| needs.get(i).copied().unwrap_or(false);
        let wants = LinearNeeds {
            x: need(0),
            w: need(1),
            b: bi.map(need).unwrap_or(false),
            lora_a: self.lora.is_some() && need(li),
            lora_b: self.lora.is_some() && need(li + 1),
        };
        let bwd = Backward {
            spec: self.spec,
            lora: self.lora.as_ref().map(|l| l.3),
            needs: wants,
            gelu: self.gelu_pre.is_some(),
            acc: acc0.is_some(),
            // Trainable weights change every step: a kept transpose would only cost memory.
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            w_cell: (!self.w.is_tracked()).then(|| self.w.storage_cell()),
        };
        let mut grads = {
            let (xs, ws, gs) = (self.x.storage(), self.w.storage(), g.storage());
            let la = self
                .lora
                .as_ref()
                .map(|(a, b, s, _)| (a.storage(), b.storage(), s.storage()));
            let pre = self.gelu_pre.as_ref().map(|p| p.storage());
            let acc = acc0.as_ref().map(|a| a.storage());
            let mut st: Vec<&Storage> = vec![&xs, &ws, &gs];
            if let Some((a, b, s)) = &la {
                st.extend([&**a, &**b, &**s]);
            }
            st.extend(pre.as_deref());
            st.extend(acc.as_deref());
            super::run(&bwd, &st)?.into_iter()
        };
        // The outputs come in LinearGrads order, only those asked for.
        let mut take = |wanted: bool, shape: &Shape| -> Result<Option<Tensor>> {
            if !wanted {
                return Ok(None);
            }
            let s = grads
                .next()
                .ok_or_else(|| Error::Msg("lora_linear_bwd: missing gradient".into()))?;
            Ok(Some(Tensor::from_storage(s, shape.clone())?))
        };
        let mut out = vec![take(wants.x, in_shape)?, take(wants.w, self.w.shape())?];
        if self.has_bias {
            out.push(take(wants.b, &Shape::from(self.spec.n))?);
        }
        if let Some((a, b, _, _)) = &self.lora {
            out.push(take(wants.lora_a, a.shape())?);
            out.push(take(wants.lora_b, b.shape())?);
        }
        if self.has_residual {
            // d(residual) = dy, shared (no copy).
            let ri = li + 2 * self.lora.is_some() as usize;
            out.push(need(ri).then(|| g.clone()));
        }
        Ok(out)
    }
}

/// (y, [S = drop(x)·Aᵀ] with a LoRA branch, [quick_gelu(y)] with `gelu` and `keep_pre`) from
/// (x, W, \[b\], \[A, B\], \[residual\]): y = x·Wᵀ + b + s·S·Bᵀ (+ residual, added in the GEMM's
/// epilogue where the kernel can).
pub struct Forward {
    /// Sizes: x [m, k], W [n, k], y [m, n].
    pub spec: LinearSpec,
    /// A bias b \[n\] is the third input.
    pub bias: bool,
    /// The low-rank branch, when A and B follow (after the bias, if any).
    pub lora: Option<LoraSpec>,
    /// A residual [m, n] follows the other inputs and is added to y.
    pub residual: bool,
    /// Also produce quick_gelu(y) (CLIP's MLP fc1); see `keep_pre`.
    pub gelu: bool,
    /// With `gelu`: y stays the pre-activation and quick_gelu(y) comes last; without, y is
    /// quick_gelu of it (nothing will differentiate through h: it is never written).
    pub keep_pre: bool,
    /// S comes as the last input (computed for several adapters of x at once) and is not an
    /// output.
    pub given_s: bool,
}

/// The gradients asked for by `needs`, in `LinearGrads` order (x, W, b, A, B), from
/// (x, W, dy, \[A, B, S\], \[h\], \[acc\]): with `gelu` (x = quick_gelu(h)) the input gradient is
/// dX·quick_gelu′(h); with `acc` it has the input's gradient so far added.
pub struct Backward {
    /// Sizes, as in the forward.
    pub spec: LinearSpec,
    /// The forward's low-rank branch, when A, B and the saved S are inputs.
    pub lora: Option<LoraSpec>,
    /// Which of dx, dW, db, dA, dB to compute; only those are returned.
    pub needs: LinearNeeds,
    /// The layer's input is quick_gelu(h) and h is an input: dx is multiplied by quick_gelu′(h).
    pub gelu: bool,
    /// The input's gradient so far is the last input and is added into dx.
    pub acc: bool,
    /// A frozen W's storage, where a dX kernel that wants Wᵀ may keep it (CUDA's V3).
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    pub(crate) w_cell: Option<std::sync::Arc<crate::storage::StorageCell>>,
}

impl FloatFn for Forward {
    fn call<F: Float>(&self, x: &[&[F]]) -> Vec<Vec<F>> {
        let b = self.bias.then(|| x[2]);
        let li = 2 + self.bias as usize;
        let low = self.lora.map(|l| (x[li], x[li + 1], l));
        let (mut y, s) = forward(x[0], x[1], b, low, self.spec);
        if self.residual {
            let res = x[li + 2 * self.lora.is_some() as usize];
            y.par_iter_mut().zip(res).for_each(|(y, r)| *y += *r);
        }
        let mut act = self
            .gelu
            .then(|| elementwise::unary(&y, UnaryOp::QuickGelu));
        if !self.keep_pre {
            if let Some(a) = act.take() {
                y = a;
            }
        }
        // A given S is the same drop(x)·Aᵀ (the CPU computes its own and drops it).
        let s = s.filter(|_| !self.given_s);
        std::iter::once(y).chain(s).chain(act).collect()
    }
}

impl FloatFn for Backward {
    fn call<F: Float>(&self, x: &[&[F]]) -> Vec<Vec<F>> {
        let low = self.lora.map(|l| (x[3], x[4], x[5], l));
        let mut at = 3 + 3 * self.lora.is_some() as usize;
        let pre = self.gelu.then(|| {
            at += 1;
            x[at - 1]
        });
        let acc = self.acc.then(|| x[at]);
        let mut g = backward(x[0], x[1], low, x[2], self.spec, self.needs);
        if let Some(dx) = g.x.as_mut() {
            if let Some(h) = pre {
                *dx = elementwise::unary_bwd(h, h, dx, UnaryOp::QuickGelu);
            }
            if let Some(a) = acc {
                dx.par_iter_mut().zip(a).for_each(|(d, a)| *d += *a);
            }
        }
        flatten(g)
    }
}

/// The gradients present, in field order.
fn flatten<S>(g: LinearGrads<S>) -> Vec<S> {
    [g.x, g.w, g.b, g.lora_a, g.lora_b]
        .into_iter()
        .flatten()
        .collect()
}

impl FusedKernel for Forward {
    const NAME: &'static str = "lora_linear";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        let b = self.bias.then(|| inputs[2]);
        let li = 2 + self.bias as usize;
        let low = self.lora.map(|l| (inputs[li], inputs[li + 1], l.rank));
        check(inputs[0], inputs[1], b, low, self.spec)?;
        if self.residual {
            let res = inputs[li + 2 * self.lora.is_some() as usize];
            if res.len() != self.spec.m * self.spec.n {
                return Err(Error::shape(
                    Self::NAME,
                    format!(
                        "residual has {} elements, y {}",
                        res.len(),
                        self.spec.m * self.spec.n
                    ),
                ));
            }
        }
        cpu_float(Self::NAME, self, inputs, &[])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let b = self.bias.then(|| inputs[2]);
        let li = 2 + self.bias as usize;
        let low = self.lora.map(|l| (inputs[li], inputs[li + 1], l));
        let res = self
            .residual
            .then(|| inputs[li + 2 * self.lora.is_some() as usize]);
        let gelu = self.gelu.then_some(self.keep_pre);
        let given = self.given_s.then(|| inputs[inputs.len() - 1]);
        let (y, s, act) = cuda_forward(inputs[0], inputs[1], b, low, res, given, gelu, self.spec)?;
        Ok(std::iter::once(y).chain(s).chain(act).collect())
    }
}

impl FusedKernel for Backward {
    const NAME: &'static str = "lora_linear_bwd";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        let want = self.spec.m * self.spec.n;
        if inputs[2].len() != want {
            return Err(Error::shape(
                Self::NAME,
                format!("dy has {} elements, expected {want}", inputs[2].len()),
            ));
        }
        // h and the accumulated gradient come after (x, W, dy, [A, B, S]), each x's size.
        let tail = 3 + 3 * self.lora.is_some() as usize;
        let count = tail + self.gelu as usize + self.acc as usize;
        let xlen = self.spec.m * self.spec.k;
        if inputs.len() != count || inputs[tail..].iter().any(|t| t.len() != xlen) {
            return Err(Error::shape(
                Self::NAME,
                format!(
                    "{} inputs for {count} (gelu {}, acc {}), or an epilogue operand not of x's \
                     {xlen} elements",
                    inputs.len(),
                    self.gelu,
                    self.acc
                ),
            ));
        }
        cpu_float(Self::NAME, self, inputs, &[])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let low = self.lora.map(|l| (inputs[3], inputs[4], inputs[5], l));
        let mut at = 3 + 3 * self.lora.is_some() as usize;
        let mut next = |on: bool| -> Result<Option<&CudaStorage>> {
            if !on {
                return Ok(None);
            }
            at += 1;
            inputs.get(at - 1).copied().map(Some).ok_or_else(|| {
                Error::Msg(format!("{}: an epilogue operand is missing", Self::NAME))
            })
        };
        let epi = DxEpilogue {
            gelu_pre: next(self.gelu)?,
            acc: next(self.acc)?,
        };
        let g = cuda_backward(
            inputs[0],
            inputs[1],
            low,
            inputs[2],
            epi,
            self.spec,
            self.needs,
            self.w_cell.as_deref(),
        )?;
        Ok(flatten(g))
    }
}

/// The low-rank kernels hold up to `LORA_LOWRANK_MAX_RANK` sums per thread.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn lowrank_rank(r: usize) -> Result<()> {
    if r > kn::LORA_LOWRANK_MAX_RANK {
        return Err(Error::Cuda(format!(
            "lora low-rank kernels: rank {r} > {}",
            kn::LORA_LOWRANK_MAX_RANK
        )));
    }
    Ok(())
}

/// S = drop(x)·Aᵀ [m, r] (`kernels/lora_lowrank.cu`).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn lora_down(
    x: &CudaStorage,
    a: &CudaStorage,
    ls: LoraSpec,
    m: usize,
    k: usize,
) -> Result<CudaStorage> {
    x.same_dtype("lora_linear A", a)?;
    lowrank_rank(ls.rank)?;
    let s = x.empty(m * ls.rank, x.dtype)?;
    launch_down(x, &[a], &[&s], (m, k, ls.rank), ls.dropout, &[ls.seed])?;
    Ok(s)
}

/// One `lora_down` launch for up to three adapters of x: A's `a`, outputs `s` ([m, group]
/// each), masks of dropout `p` and `seeds`.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn launch_down(
    x: &CudaStorage,
    a: &[&CudaStorage],
    s: &[&CudaStorage],
    (m, k, group): (usize, usize, usize),
    p: f32,
    seeds: &[u64],
) -> Result<()> {
    if m == 0 {
        return Ok(());
    }
    let rt = group * a.len();
    let ptr = |v: &[&CudaStorage], i: usize| v.get(i).map_or(Arg::null(), |t| t.ptr());
    let seed = |i: usize| seeds.get(i).copied().unwrap_or(0);
    crate::profile::set_work(
        2.0 * (m * k * rt) as f64,
        (x.dtype.size_in_bytes() * (m * k + rt * k + m * rt)) as f64,
    );
    x.run_grid(
        &format!("lora_down_{}", x.sfx("lora_linear")?),
        kn::LoraDown {
            x: x.ptr(),
            a: ptr(a, 0),
            a_b: ptr(a, 1),
            a_c: ptr(a, 2),
            s: ptr(s, 0),
            s_b: ptr(s, 1),
            s_c: ptr(s, 2),
            m,
            k,
            r: rt,
            group,
            p,
            seed: seed(0),
            seed_b: seed(1),
            seed_c: seed(2),
        },
    )
}

/// dx [m, k] += drop′(dS·A) in place (`kernels/lora_lowrank.cu`).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn lora_up_add(
    ds: &CudaStorage,
    a: &CudaStorage,
    dx: &CudaStorage,
    ls: LoraSpec,
    m: usize,
    k: usize,
) -> Result<()> {
    ds.same_dtype("lora_linear_bwd A", a)?;
    ds.same_dtype("lora_linear_bwd dx", dx)?;
    lowrank_rank(ls.rank)?;
    if m == 0 {
        return Ok(());
    }
    let name = format!("lora_up_add_{}", dx.sfx("lora_linear_bwd")?);
    let r = ls.rank;
    crate::profile::set_work(
        2.0 * (m * k * r) as f64,
        (dx.dtype.size_in_bytes() * (2 * m * k + r * k + m * r)) as f64,
    );
    dx.run_grid(
        &name,
        kn::LoraUpAdd {
            ds: ds.ptr(),
            a: a.ptr(),
            dx: dx.ptr(),
            m,
            k,
            r,
            p: ls.dropout,
            seed: ls.seed,
        },
    )
}

/// dA = dSᵀ·drop(x) [r, k] (`kernels/lora_lowrank.cu`: per-chunk partials, then an in-order
/// sum), in x's dtype.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn lora_da(
    ds: &CudaStorage,
    x: &CudaStorage,
    ls: LoraSpec,
    m: usize,
    k: usize,
) -> Result<CudaStorage> {
    ds.same_dtype("lora_linear_bwd x", x)?;
    lowrank_rank(ls.rank)?;
    let r = ls.rank;
    if m == 0 || r * k == 0 {
        return x.zeros_like(r * k, x.dtype);
    }
    let (rows_per_chunk, chunks) = kn::lora_da_chunks(m);
    let part = x.empty(chunks * r * k, DType::F32)?;
    let name = format!("lora_da_part_{}", x.sfx("lora_linear_bwd")?);
    crate::profile::set_work(
        2.0 * (m * k * r) as f64,
        (x.dtype.size_in_bytes() * (m * k + m * r) + 4 * chunks * r * k) as f64,
    );
    x.run_grid(
        &name,
        kn::LoraDaPart {
            ds: ds.ptr(),
            x: x.ptr(),
            part: part.ptr(),
            m,
            k,
            r,
            rows_per_chunk,
            p: ls.dropout,
            seed: ls.seed,
        },
    )?;
    part.column_sum_to(chunks, r * k, x.dtype)
}

/// Whether `lora_grads` takes this LoRA-linear: bf16, r = 8, 16 or 32, rows of 16-byte chunks.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn grads_fit(ops: &[&CudaStorage], ls: LoraSpec, n: usize, k: usize) -> bool {
    matches!(ls.rank, 8 | 16 | 32)
        && n.is_multiple_of(8)
        && k.is_multiple_of(8)
        && (0.0..1.0).contains(&ls.dropout)
        && ops
            .iter()
            .all(|s| s.dtype == DType::BF16 && s.is_aligned(16))
}

/// (dS [m, r], dB [n, r], dA [r, k]) of a LoRA-linear from one pass over dY and x on tensor
/// cores (`kernels/lora_grads.cu`; `grads_fit` must hold): dS whole from the kernel, dB and dA
/// summed from its per-chunk f32 partials in a fixed order and rounded once.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
#[allow(clippy::too_many_arguments)]
fn lora_grads(
    dy: &CudaStorage,
    lb: &CudaStorage,
    s: &CudaStorage,
    x: &CudaStorage,
    ls: LoraSpec,
    m: usize,
    n: usize,
    k: usize,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let r = ls.rank;
    same_len("lora_linear_bwd B", lb.len, n * r)?;
    same_len("lora_linear_bwd S", s.len, m * r)?;
    same_len("lora_linear_bwd x", x.len, m * k)?;
    if m == 0 || n == 0 || k == 0 {
        return Ok((
            dy.zeros_like(m * r, dy.dtype)?,
            dy.zeros_like(n * r, dy.dtype)?,
            dy.zeros_like(r * k, dy.dtype)?,
        ));
    }
    let cfg = kn::lora_grads_config(m, r);
    let chunks = cfg.grid.0 as usize;
    let ds = dy.empty(m * r, dy.dtype)?;
    let db_part = dy.empty(chunks * n * r, DType::F32)?;
    let da_part = dy.empty(chunks * r * k, DType::F32)?;
    crate::profile::set_work(
        2.0 * (2 * m * n * r + m * k * r) as f64,
        (2 * (m * n + m * k + n * r + 2 * m * r) + 4 * chunks * (n * r + r * k)) as f64,
    );
    dy.run(
        &format!("lora_grads_r{r}_bf16"),
        cfg,
        kn::LoraGrads {
            dy: dy.ptr(),
            b: lb.ptr(),
            s: s.ptr(),
            x: x.ptr(),
            ds: ds.ptr(),
            db_part: db_part.ptr(),
            da_part: da_part.ptr(),
            m,
            n,
            k,
            p: ls.dropout,
            seed: ls.seed,
            scale: ls.scale as f32,
        },
    )?;
    Ok((
        ds,
        db_part.column_sum_to(chunks, n * r, dy.dtype)?,
        da_part.column_sum_to(chunks, r * k, dy.dtype)?,
    ))
}

// The CUDA side.

/// (dS = s·dY·B [m, r], dB = s·dYᵀ·S [n, r]) from one pass over dY
/// (`kernels/lora_lowrank.cu`), each summed from f32 partials in a fixed order and rounded once.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn lora_ds_db(
    dy: &CudaStorage,
    lb: &CudaStorage,
    s: &CudaStorage,
    ls: LoraSpec,
    m: usize,
    n: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    dy.same_dtype("lora_linear_bwd B", lb)?;
    dy.same_dtype("lora_linear_bwd S", s)?;
    lowrank_rank(ls.rank)?;
    let r = ls.rank;
    same_len("lora_linear_bwd B", lb.len, n * r)?;
    same_len("lora_linear_bwd S", s.len, m * r)?;
    if m == 0 || n == 0 || r == 0 {
        return Ok((
            dy.zeros_like(m * r, dy.dtype)?,
            dy.zeros_like(n * r, dy.dtype)?,
        ));
    }
    let (tiles, rows_per_chunk, chunks) = kn::lora_dsdb_chunks(m, n);
    let ds_part = dy.empty(tiles * m * r, DType::F32)?;
    let db_part = dy.empty(chunks * n * r, DType::F32)?;
    let name = format!("lora_dsdb_part_{}", dy.sfx("lora_linear_bwd")?);
    crate::profile::set_work(
        4.0 * (m * n * r) as f64,
        (dy.dtype.size_in_bytes() * (m * n + n * r + m * r) + 4 * (tiles * m * r + chunks * n * r))
            as f64,
    );
    dy.run_grid(
        &name,
        kn::LoraDsDbPart {
            dy: dy.ptr(),
            b: lb.ptr(),
            s: s.ptr(),
            ds_part: ds_part.ptr(),
            db_part: db_part.ptr(),
            m,
            n,
            r,
            rows_per_chunk,
            scale: ls.scale as f32,
        },
    )?;
    Ok((
        ds_part.column_sum_to(tiles, m * r, dy.dtype)?,
        db_part.column_sum_to(chunks, n * r, dy.dtype)?,
    ))
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
#[allow(clippy::too_many_arguments)]
fn cuda_forward(
    x: &CudaStorage,
    w: &CudaStorage,
    b: Option<&CudaStorage>,
    lora: Option<(&CudaStorage, &CudaStorage, LoraSpec)>,
    res: Option<&CudaStorage>,
    given_s: Option<&CudaStorage>,
    gelu: Option<bool>,
    spec: LinearSpec,
) -> Result<(CudaStorage, Option<CudaStorage>, Option<CudaStorage>)> {
    // gelu: Some(keep_pre) — quick_gelu(h) out, and h too when kept.
    let keep_pre = gelu == Some(true);
    let gelu = gelu.is_some();
    let LinearSpec { m, n, k } = spec;
    same_len("lora_linear x", x.len, m * k)?;
    same_len("lora_linear W", w.len, n * k)?;
    if let Some(r) = res {
        same_len("lora_linear residual", r.len, m * n)?;
        x.same_dtype("lora_linear residual", r)?;
    }
    let mmspec = |m, n, k, trans_b| MatmulSpec {
        batch: 1,
        m,
        n,
        k,
        trans_a: false,
        trans_b,
        rhs_batched: false,
    };
    if let Some(b) = b {
        same_len("lora_linear bias", b.len, n)?;
    }
    let mut s_low = None;
    if let (Some(s), Some((_, _, ls))) = (given_s, lora) {
        same_len("lora_linear S", s.len, m * ls.rank)?;
        x.same_dtype("lora_linear S", s)?;
    }
    if let (Some((la, lb, ls)), None) = (lora, given_s) {
        same_len("lora_linear A", la.len, ls.rank * k)?;
        same_len("lora_linear B", lb.len, n * ls.rank)?;
        s_low = Some(
            if ls.dropout > 0.0 && ls.rank <= kn::LORA_LOWRANK_MAX_RANK {
                // The mask in registers: x is read once, drop(x) never written.
                lora_down(x, la, ls, m, k)?
            } else {
                let xd = x.dropped(&ls)?;
                xd.as_ref()
                    .unwrap_or(x)
                    .mm(la, mmspec(m, ls.rank, k, true))?
            },
        );
    }
    let low = lora
        .zip(given_s.or(s_low.as_ref()))
        .map(|((_, lb, ls), s)| (s, lb, ls));
    let ys = Shape::from(vec![m, n]);
    // PEFT's structure on cuBLAS: X·Wᵀ, + b, + s·S·Bᵀ (each rounded to the storage type).
    type Low<'a> = Option<(&'a CudaStorage, &'a CudaStorage, LoraSpec)>;
    let cublas = |x: &CudaStorage,
                  w: &CudaStorage,
                  low: Low,
                  res: Option<&CudaStorage>|
     -> Result<CudaStorage> {
        let y = x.mm(w, mmspec(m, n, k, true))?;
        if let Some(b) = b {
            y.elementwise_binary(
                b,
                BinaryOp::Add,
                &y.alias(),
                &ys,
                &Shape::from(vec![n]),
                &ys,
            )?;
        }
        if let Some((s, lb, ls)) = low {
            let lowy = s
                .mm(lb, mmspec(m, n, ls.rank, true))?
                .affine(ls.scale, 0.0)?;
            y.elementwise_binary(&lowy, BinaryOp::Add, &y.alias(), &ys, &ys, &ys)?;
        }
        if let Some(r) = res {
            y.elementwise_binary(r, BinaryOp::Add, &y.alias(), &ys, &ys, &ys)?;
        }
        Ok(y)
    };
    let y = if x.dtype == DType::BF16 {
        let r = low.map_or(0, |l| l.2.rank);
        let key = LoraKey {
            forward: true,
            m,
            n,
            k,
            r,
            bias: b.is_some(),
            residual: res.is_some(),
            gelu,
            dropout: false,
        };
        // ops = [x, W, (S, B)]: the call's own, or random ones of the same shapes while
        // the path for the shape is being chosen.
        // ops = [x, W, (S, B), (residual)]: all randomized while a path is screened, so a
        // large residual cannot hide a wrong product.
        // Outputs [y] or, with gelu, [quick_gelu(h)] + [h] when kept (the fused kernel's order).
        let run = |p: LoraPath, ops: &[&CudaStorage]| -> Result<Vec<CudaStorage>> {
            let low = low.map(|(_, _, ls)| (ops[2], ops[3], ls));
            let res = res.map(|_| ops[ops.len() - 1]);
            match p {
                LoraPath::Cublas => {
                    let h = cublas(ops[0], ops[1], low, res)?;
                    Ok(match (gelu, keep_pre) {
                        (true, true) => vec![h.unary(UnaryOp::QuickGelu)?, h],
                        (true, false) => vec![h.unary(UnaryOp::QuickGelu)?],
                        _ => vec![h],
                    })
                }
                p => {
                    // The residual add and gelu ride in the epilogue (which needs the bias).
                    let fused_res = res.filter(|_| b.is_some());
                    let fused_gelu = gelu && b.is_some();
                    let mut outs = ops[0].lora_fused_fwd(
                        p,
                        ops[1],
                        b,
                        low.map(|(s, lb, _)| (s, lb)),
                        fused_res,
                        fused_gelu,
                        keep_pre,
                        low.map_or(1.0, |l| l.2.scale as f32),
                        (m, n, k, r),
                    )?;
                    if let (Some(r), None) = (res, fused_res) {
                        let y = &outs[0];
                        y.elementwise_binary(r, BinaryOp::Add, &y.alias(), &ys, &ys, &ys)?;
                    }
                    if gelu && !fused_gelu {
                        let h = outs.remove(0);
                        outs = vec![h.unary(UnaryOp::QuickGelu)?];
                        if keep_pre {
                            outs.push(h);
                        }
                    }
                    Ok(outs)
                }
            }
        };
        let mut ops = vec![x, w];
        if let Some((s, lb, _)) = low {
            ops.extend([s, lb]);
        }
        ops.extend(res);
        let mut outs = run(x.lora_choose(key, &ops, &run)?, &ops)?.into_iter();
        let first = outs
            .next()
            .ok_or_else(|| Error::Msg("lora_linear: no output".into()))?;
        return Ok(match (gelu && keep_pre, outs.next()) {
            // [quick_gelu(h), h] → (h, S, quick_gelu(h)).
            (true, Some(h)) => (h, s_low, Some(first)),
            (true, None) => {
                return Err(Error::Msg(
                    "lora_linear: the gelu path lost the pre-activation".into(),
                ))
            }
            // [y] or [quick_gelu(h)] alone.
            (false, _) => (first, s_low, None),
        });
    } else {
        cublas(x, w, low, res)?
    };
    Ok(match (gelu, keep_pre) {
        (true, true) => {
            let act = y.unary(UnaryOp::QuickGelu)?;
            (y, s_low, Some(act))
        }
        (true, false) => (y.unary(UnaryOp::QuickGelu)?, s_low, None),
        _ => (y, s_low, None),
    })
}

/// What follows dX = dY·W (+ the low-rank term): quick_gelu′ of fc1's pre-activation, then the
/// gradient the input already has — in the dX GEMM's epilogue where the fused kernel runs.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
#[derive(Clone, Copy)]
struct DxEpilogue<'a> {
    gelu_pre: Option<&'a CudaStorage>,
    acc: Option<&'a CudaStorage>,
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
#[allow(clippy::too_many_arguments)]
fn cuda_backward(
    x: &CudaStorage,
    w: &CudaStorage,
    lora: Option<(&CudaStorage, &CudaStorage, &CudaStorage, LoraSpec)>,
    dy: &CudaStorage,
    epi: DxEpilogue<'_>,
    spec: LinearSpec,
    needs: LinearNeeds,
    w_cell: Option<&crate::storage::StorageCell>,
) -> Result<LinearGrads<CudaStorage>> {
    let LinearSpec { m, n, k } = spec;
    let mm = |a: &CudaStorage, b: &CudaStorage, m, n, k, ta, tb| {
        a.mm(
            b,
            MatmulSpec {
                batch: 1,
                m,
                n,
                k,
                trans_a: ta,
                trans_b: tb,
                rhs_batched: false,
            },
        )
    };
    let xs = Shape::from(vec![m, k]);
    // The epilogue as separate passes (cuBLAS, or after a low-rank add).
    let finish = |gx: CudaStorage,
                  pre: Option<&CudaStorage>,
                  acc: Option<&CudaStorage>|
     -> Result<CudaStorage> {
        let gx = match pre {
            Some(h) => h.unary_bwd(h, &gx, UnaryOp::QuickGelu)?,
            None => gx,
        };
        if let Some(a) = acc {
            gx.elementwise_binary(a, BinaryOp::Add, &gx.alias(), &xs, &xs, &xs)?;
        }
        Ok(gx)
    };
    let ds_of = |(lb, ls): (&CudaStorage, LoraSpec)| -> Result<CudaStorage> {
        mm(dy, lb, m, ls.rank, n, false, false)?.affine(ls.scale, 0.0)
    };
    // Our low-rank kernels, unless SD2_LORA_GEMM=cublas asks for PEFT's GEMMs throughout.
    let kernels = !crate::backend::cuda::storage::cublas_only();
    // dS and dB from one pass over dY when both are wanted (they are in training).
    let one_pass = |l: &(&CudaStorage, &CudaStorage, &CudaStorage, LoraSpec)| {
        kernels
            && needs.lora_b
            && (needs.x || needs.lora_a)
            && l.3.rank <= kn::LORA_LOWRANK_MAX_RANK
    };
    // All three LoRA gradients from one pass over dY and x where the tensor-core kernel fits.
    let all_three = |&(_, lb, s, ls): &(&CudaStorage, &CudaStorage, &CudaStorage, LoraSpec)| {
        kernels && needs.lora_a && needs.lora_b && grads_fit(&[dy, lb, s, x], ls, n, k)
    };
    let (ds, mut db_one_pass, mut da_one_pass) = match lora {
        Some(l @ (_, lb, s, ls)) if all_three(&l) => {
            let (ds, db, da) = lora_grads(dy, lb, s, x, ls, m, n, k)?;
            (Some(ds), Some(db), Some(da))
        }
        Some(l @ (_, lb, s, ls)) if one_pass(&l) => {
            let (ds, db) = lora_ds_db(dy, lb, s, ls, m, n)?;
            (Some(ds), Some(db), None)
        }
        Some((_, lb, _, ls)) => (Some(ds_of((lb, ls))?), None, None),
        None => (None, None, None),
    };
    // dX = dY·W + s·dS·A by the path chosen for the shape (storage_lora). In bf16 the low-rank
    // term rides in the dX GEMM — as extra depth without dropout, in the epilogue with its
    // mask under dropout (rank ≤ LORA_LOWRANK_MAX_RANK) — and so do gelu′ and the accumulated
    // gradient; otherwise (f32, larger ranks) it is added after the GEMM, and so is gelu′
    // (the accumulated gradient can still ride: additions commute).
    let bf16 = dy.dtype == DType::BF16;
    let depth_low = lora.filter(|l| bf16 && l.3.dropout <= 0.0);
    let epi_low =
        lora.filter(|l| bf16 && l.3.dropout > 0.0 && l.3.rank <= kn::LORA_LOWRANK_MAX_RANK);
    let add_low_to_gx = lora.is_some() && depth_low.is_none() && epi_low.is_none();
    let gelu_in_gemm = bf16 && !add_low_to_gx;
    let acc_in_gemm = bf16 && (gelu_in_gemm || epi.gelu_pre.is_none());
    let mut gx = if !needs.x {
        None
    } else if bf16 {
        let low = depth_low
            .zip(ds.as_ref())
            .map(|((la, _, _, ls), ds)| (ds, la, ls));
        let dlow = epi_low
            .zip(ds.as_ref())
            .map(|((la, _, _, ls), ds)| (ds, la, ls));
        let r = low.or(dlow).map_or(0, |l| l.2.rank);
        let acc = epi.acc.filter(|_| acc_in_gemm);
        let pre = epi.gelu_pre.filter(|_| gelu_in_gemm);
        let key = LoraKey {
            forward: false,
            m,
            n,
            k,
            r,
            bias: false,
            residual: acc.is_some(),
            gelu: pre.is_some(),
            dropout: dlow.is_some(),
        };
        // ops = [dY, W, (dS, A), (acc), (h)], as in the forward.
        let run = |p: LoraPath, ops: &[&CudaStorage]| -> Result<Vec<CudaStorage>> {
            let mut at = 2 + 2 * low.or(dlow).is_some() as usize;
            let low = low.map(|(_, _, ls)| (ops[2], ops[3], ls));
            let dlow = dlow.map(|(_, _, ls)| (ops[2], ops[3], ls));
            let acc = acc.map(|_| {
                at += 1;
                ops[at - 1]
            });
            let pre = pre.map(|_| ops[at]);
            let (dy, w) = (ops[0], ops[1]);
            Ok(vec![match p {
                LoraPath::Cublas => {
                    let gx = mm(dy, w, m, k, n, false, false)?;
                    if let Some((ds, la, ls)) = low.or(dlow) {
                        let extra = mm(ds, la, m, k, ls.rank, false, false)?;
                        let extra = extra.dropped(&ls)?.unwrap_or(extra);
                        gx.elementwise_binary(&extra, BinaryOp::Add, &gx.alias(), &xs, &xs, &xs)?;
                    }
                    finish(gx, pre, acc)?
                }
                p => dy.lora_fused_dx(
                    p,
                    w,
                    w_cell,
                    low.map(|(ds, la, _)| (ds, la)),
                    dlow.map(|(ds, a, ls)| DropLow {
                        ds,
                        a,
                        rank: ls.rank,
                        p: ls.dropout,
                        seed: ls.seed,
                    }),
                    acc,
                    pre,
                    1.0,
                    (m, n, k, r),
                )?,
            }])
        };
        let mut ops = vec![dy, w];
        if let Some((ds, la, _)) = low.or(dlow) {
            ops.extend([ds, la]);
        }
        ops.extend(acc);
        ops.extend(pre);
        let path = dy.lora_choose(key, &ops, &run)?;
        if let (Some(cell), false) = (w_cell, path == LoraPath::V3) {
            // Measuring V3 kept a Wᵀ that the chosen path does not read.
            cell.forget(crate::backend::cuda::storage::wt_key(n, k));
        }
        let mut outs = run(path, &ops)?;
        Some(
            outs.pop()
                .ok_or_else(|| Error::Msg("lora_linear_bwd: no dX".into()))?,
        )
    } else {
        Some(mm(dy, w, m, k, n, false, false)?)
    };
    let gw = if needs.w {
        Some(mm(dy, x, n, k, m, true, false)?)
    } else {
        None
    };
    let gb = if needs.b {
        Some(dy.sum_to(&Shape::from(vec![m, n]), &Shape::from(vec![n]))?)
    } else {
        None
    };
    let (mut ga, mut gbm) = (None, None);
    if let (Some((la, _, s, ls)), Some(ds)) = (lora, ds.as_ref()) {
        let r = ls.rank;
        if needs.lora_b {
            gbm = Some(match db_one_pass.take() {
                Some(db) => db,
                None => mm(dy, s, n, r, m, true, false)?.affine(ls.scale, 0.0)?,
            });
        }
        if needs.lora_a {
            ga = Some(if let Some(da) = da_one_pass.take() {
                da
            } else if kernels && ls.dropout > 0.0 && r <= kn::LORA_LOWRANK_MAX_RANK {
                // dSᵀ·drop(x) with the mask in registers: x read once, drop(x) never written.
                lora_da(ds, x, ls, m, k)?
            } else {
                let xd = x.dropped(&ls)?;
                mm(ds, xd.as_ref().unwrap_or(x), r, k, m, true, false)?
            });
        }
        if let (Some(gx), true) = (gx.as_ref(), add_low_to_gx && r <= kn::LORA_LOWRANK_MAX_RANK) {
            // dx += drop_bwd(dS·A) in one pass over dx, the mask in registers.
            lora_up_add(ds, la, gx, ls, m, k)?;
        } else if let (Some(gx), true) = (gx.as_mut(), add_low_to_gx) {
            // dx += drop_bwd(dS·A): the same mask and scaling as the forward.
            let extra = mm(ds, la, m, k, r, false, false)?;
            let extra = extra.dropped(&ls)?.unwrap_or(extra);
            let xs = Shape::from(vec![m, k]);
            gx.elementwise_binary(&extra, BinaryOp::Add, &gx.alias(), &xs, &xs, &xs)?;
        }
    }
    // What the GEMM's epilogue did not apply.
    let pre_left = epi.gelu_pre.filter(|_| !gelu_in_gemm);
    let acc_left = epi.acc.filter(|_| !acc_in_gemm);
    if pre_left.is_some() || acc_left.is_some() {
        gx = gx.map(|g| finish(g, pre_left, acc_left)).transpose()?;
    }
    Ok(LinearGrads {
        x: gx,
        w: gw,
        b: gb,
        lora_a: ga,
        lora_b: gbm,
    })
}

// The CPU reference.

fn check(
    x: &CpuStorage,
    w: &CpuStorage,
    b: Option<&CpuStorage>,
    lora: Option<(&CpuStorage, &CpuStorage, usize)>,
    s: LinearSpec,
) -> Result<()> {
    let bad = |what: &str, got: usize, want: usize| {
        Err(Error::shape(
            "lora_linear",
            format!(
                "{what} has {got} elements, expected {want} (m={}, n={}, k={})",
                s.m, s.n, s.k
            ),
        ))
    };
    if x.len() != s.m * s.k {
        return bad("x", x.len(), s.m * s.k);
    }
    if w.len() != s.n * s.k {
        return bad("weight", w.len(), s.n * s.k);
    }
    if let Some(b) = b {
        if b.len() != s.n {
            return bad("bias", b.len(), s.n);
        }
    }
    if let Some((a, bm, r)) = lora {
        if a.len() != r * s.k {
            return bad("lora_A", a.len(), r * s.k);
        }
        if bm.len() != s.n * r {
            return bad("lora_B", bm.len(), s.n * r);
        }
    }
    Ok(())
}

/// drop(x) with inverted scaling; None when dropout is off (use x itself).
fn dropped<F: Float>(x: &[F], l: &LoraSpec) -> Option<Vec<F>> {
    if l.dropout <= 0.0 {
        return None;
    }
    let keep = F::from_f(1.0 / (1.0 - l.dropout as f64));
    let mut out = vec![F::zero(); x.len()];
    out.par_chunks_mut(1 << 14).enumerate().for_each(|(c, o)| {
        let base = c << 14;
        for (i, o) in o.iter_mut().enumerate() {
            let j = base + i;
            if dropout_keep(l.seed, j as u64, l.dropout) {
                *o = x[j] * keep;
            }
        }
    });
    Some(out)
}

type LowRank<'a, F> = (&'a [F], &'a [F], LoraSpec);

/// The CPU reference forward: `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ` for x [m, k], W [n, k],
/// b \[n\], A \[rank, k\], B \[n, rank\]. Returns y \[m, n\] and, with a LoRA branch, S = drop(x)·Aᵀ
/// [m, rank], which the backward reuses. Dropout uses `rng::dropout_keep(seed, index)` per
/// element of x with inverted scaling 1/(1 − p), so the backward regenerates the same mask.
pub fn forward<F: Float>(
    x: &[F],
    w: &[F],
    b: Option<&[F]>,
    lora: Option<LowRank<'_, F>>,
    s: LinearSpec,
) -> (Vec<F>, Option<Vec<F>>) {
    let (m, n, k) = (s.m, s.n, s.k);
    let mut y = vec![F::zero(); m * n];
    if let Some(b) = b {
        if n > 0 {
            y.par_chunks_mut(n).for_each(|r| r.copy_from_slice(b));
        }
    }
    gemm_into(
        m,
        n,
        k,
        Mat::rm(x, k, false),
        Mat::rm(w, k, true),
        &mut y,
        0,
        n,
        F::one(),
        b.is_some(),
        true,
    );
    let low = lora.map(|(a, bm, l)| {
        let r = l.rank;
        let xd = dropped(x, &l);
        let xs = xd.as_deref().unwrap_or(x);
        let mut sm = vec![F::zero(); m * r];
        gemm_into(
            m,
            r,
            k,
            Mat::rm(xs, k, false),
            Mat::rm(a, k, true),
            &mut sm,
            0,
            r,
            F::one(),
            false,
            true,
        );
        gemm_into(
            m,
            n,
            r,
            Mat::rm(&sm, r, false),
            Mat::rm(bm, r, true),
            &mut y,
            0,
            n,
            F::from_f(l.scale),
            true,
            true,
        );
        sm
    });
    (y, low)
}

type LoraSaved<'a, F> = (&'a [F], &'a [F], &'a [F], LoraSpec);

/// The CPU reference backward from x, W, the saved (A, B, S, spec) and dy [m, n]: the
/// gradients `needs` asks for. dW = dyᵀ·x, db = Σ rows of dy, dB = s·dyᵀ·S, dS = s·dy·B,
/// dA = dSᵀ·drop(x), and dx = dy·W plus the LoRA term dS·A through the same dropout mask.
pub fn backward<F: Float>(
    x: &[F],
    w: &[F],
    lora: Option<LoraSaved<'_, F>>,
    dy: &[F],
    s: LinearSpec,
    needs: LinearNeeds,
) -> LinearGrads<Vec<F>> {
    let (m, n, k) = (s.m, s.n, s.k);
    let dym = Mat::rm(dy, n, false);
    let mut g = LinearGrads {
        x: None,
        w: None,
        b: None,
        lora_a: None,
        lora_b: None,
    };
    if needs.w {
        let mut dw = vec![F::zero(); n * k];
        gemm_into(
            n,
            k,
            m,
            dym.t(),
            Mat::rm(x, k, false),
            &mut dw,
            0,
            k,
            F::one(),
            false,
            true,
        );
        g.w = Some(dw);
    }
    if needs.b {
        g.b = Some(crate::backend::cpu::elementwise::sum_to(
            dy,
            &Shape::from([m, n]),
            &Shape::from(n),
        ));
    }
    let mut dx = needs.x.then(|| {
        let mut dx = vec![F::zero(); m * k];
        gemm_into(
            m,
            k,
            n,
            dym,
            Mat::rm(w, k, false),
            &mut dx,
            0,
            k,
            F::one(),
            false,
            true,
        );
        dx
    });
    if let Some((a, bm, sm, l)) = lora {
        let r = l.rank;
        let sc = F::from_f(l.scale);
        if needs.lora_b {
            // dB = s·dYᵀ·S, [n, r].
            let mut db = vec![F::zero(); n * r];
            gemm_into(
                n,
                r,
                m,
                dym.t(),
                Mat::rm(sm, r, false),
                &mut db,
                0,
                r,
                sc,
                false,
                true,
            );
            g.lora_b = Some(db);
        }
        if needs.lora_a || needs.x {
            // dS = s·dY·B, [m, r].
            let mut ds = vec![F::zero(); m * r];
            gemm_into(
                m,
                r,
                n,
                dym,
                Mat::rm(bm, r, false),
                &mut ds,
                0,
                r,
                sc,
                false,
                true,
            );
            if needs.lora_a {
                let xd = dropped(x, &l);
                let xs = xd.as_deref().unwrap_or(x);
                let mut da = vec![F::zero(); r * k];
                gemm_into(
                    r,
                    k,
                    m,
                    Mat::rm(&ds, r, true),
                    Mat::rm(xs, k, false),
                    &mut da,
                    0,
                    k,
                    F::one(),
                    false,
                    true,
                );
                g.lora_a = Some(da);
            }
            if let Some(dx) = dx.as_mut() {
                // dx += drop_bwd(dS·A): the same mask and scaling as the forward.
                let mut dxl = vec![F::zero(); m * k];
                gemm_into(
                    m,
                    k,
                    r,
                    Mat::rm(&ds, r, false),
                    Mat::rm(a, k, false),
                    &mut dxl,
                    0,
                    k,
                    F::one(),
                    false,
                    true,
                );
                let dxl = dropped(&dxl, &l).unwrap_or(dxl);
                dx.par_chunks_mut(1 << 14)
                    .zip(dxl.par_chunks(1 << 14))
                    .for_each(|(d, v)| d.iter_mut().zip(v).for_each(|(d, v)| *d += *v));
            }
        }
    }
    g.x = dx.take();
    g
}
