//! The backend interface. Every op of the engine is one method here, with the tensor-level shape
//! logic already done by the caller (`crate::ops`), so a backend only sees contiguous buffers and
//! plain sizes. The CPU backend (`cpu`) is the numerical reference; the CUDA backend implements
//! the same trait with kernels from `kernels/*.cu` and is tested against it.
use crate::{DType, Device, Result, Shape};

pub mod cpu;
pub mod cuda;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqr,
    Sqrt,
    /// `x·σ(1.702x)`, CLIP's activation.
    QuickGelu,
    Sigmoid,
}

impl UnaryOp {
    pub fn name(&self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqr => "sqr",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::QuickGelu => "quick_gelu",
            UnaryOp::Sigmoid => "sigmoid",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub fn name(&self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

/// `C[b] = op(A[b]) · op(B[b])`, C is [batch, m, n] row-major.
/// A is [batch, m, k] (or [batch, k, m] when `trans_a`); B is [batch, k, n] (or [batch, n, k]
/// when `trans_b`); when `rhs_batched` is false B is one matrix shared by every batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulSpec {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub rhs_batched: bool,
}

/// Multi-head attention on the layout linear layers produce: q is [batch, q_len, heads·head_dim],
/// k and v are [batch, kv_len, heads·head_dim]. The log-sum-exp saved per row is [batch, heads, q_len].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    /// Query i sees keys j ≤ i (+ kv_len − q_len, so a longer key set is aligned at the end).
    pub causal: bool,
    pub scale: f64,
}

/// Sizes of a (LoRA-)linear layer: x is [m, k], W is [n, k], y is [m, n].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// The low-rank branch of a LoRA-linear: `s·(drop(x)·Aᵀ)·Bᵀ`, A is [rank, k], B is [n, rank].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub scale: f64,
    /// Dropout probability on the LoRA input (0 at inference).
    pub dropout: f32,
    /// Seed of the counter-based dropout mask (see `crate::rng::dropout_keep`).
    pub seed: u64,
}

/// Which gradients a backward pass must produce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearNeeds {
    pub x: bool,
    pub w: bool,
    pub b: bool,
    pub lora_a: bool,
    pub lora_b: bool,
}

/// Gradients of a LoRA-linear (those not asked for are `None`).
pub struct LinearGrads<S> {
    pub x: Option<S>,
    pub w: Option<S>,
    pub b: Option<S>,
    pub lora_a: Option<S>,
    pub lora_b: Option<S>,
}

/// One AdamW update (decoupled weight decay), with the bias corrections precomputed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bias1: f64,
    pub bias2: f64,
    /// Multiplies the gradient first (1/accumulated micro-batches, clipping factor).
    pub grad_scale: f64,
}

/// One tensor of a fused multi-tensor optimizer step over storage `S`: parameter, gradient,
/// first and second moments (f32, same length, one device) and its weight decay.
pub struct FusedParam<'a, S> {
    pub p: &'a S,
    pub g: &'a S,
    pub m: &'a S,
    pub v: &'a S,
    pub weight_decay: f32,
}

/// A buffer on one device with one dtype, and every op the engine runs on it.
pub trait BackendStorage: Sized + Send + Sync {
    fn dtype(&self) -> DType;
    fn device(&self) -> Device;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn to_cpu(&self) -> Result<cpu::CpuStorage>;
    /// A zero-filled buffer on the same device.
    fn zeros_like(&self, len: usize, dtype: DType) -> Result<Self>;
    fn try_clone(&self) -> Result<Self>;
    fn cast(&self, dtype: DType) -> Result<Self>;

    // Elementwise.
    fn unary(&self, op: UnaryOp) -> Result<Self>;
    /// dx from x, y = op(x) and dy.
    fn unary_bwd(&self, y: &Self, dy: &Self, op: UnaryOp) -> Result<Self>;
    fn affine(&self, mul: f64, add: f64) -> Result<Self>;
    fn binary(
        &self,
        rhs: &Self,
        op: BinaryOp,
        lhs: &Shape,
        rhs_shape: &Shape,
        out: &Shape,
    ) -> Result<Self>;
    fn add_assign(&mut self, rhs: &Self) -> Result<()>;
    /// Sums `src` (of shape `src`) down to the broadcast-compatible shape `dst`.
    fn sum_to(&self, src: &Shape, dst: &Shape) -> Result<Self>;
    fn broadcast_to(&self, src: &Shape, dst: &Shape) -> Result<Self>;

    // Layout.
    fn matmul(&self, rhs: &Self, spec: MatmulSpec) -> Result<Self>;
    fn permute(&self, shape: &Shape, perm: &[usize]) -> Result<Self>;
    /// Copies `rows × cols` elements: dst[dst_off + r·dst_stride + c] = src[src_off + r·src_stride + c].
    #[allow(clippy::too_many_arguments)]
    fn copy2d(
        &self,
        dst: &mut Self,
        rows: usize,
        cols: usize,
        src_stride: usize,
        dst_stride: usize,
        src_off: usize,
        dst_off: usize,
    ) -> Result<()>;
    /// out[i, :] = self[ids[i], :] for self viewed as [rows, cols].
    fn index_rows(&self, ids: &Self, rows: usize, cols: usize) -> Result<Self>;
    /// out = zeros([rows, cols]); out[ids[i], :] += self[i, :].
    fn index_add_rows(&self, ids: &Self, rows: usize, cols: usize) -> Result<Self>;
    /// out[ids[i], :] += self[i, :] in place (out is [rows, cols] of self's dtype), in id
    /// order, each add rounded to the dtype: a gradient added into the rows of one that exists.
    fn index_add_rows_into(
        &self,
        ids: &Self,
        out: &mut Self,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
}
