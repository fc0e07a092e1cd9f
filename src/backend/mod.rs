//! The backend interface. Every op of the engine is one method here, with the tensor-level shape
//! logic already done by the caller (`crate::ops`), so a backend only sees contiguous buffers and
//! plain sizes. The CPU backend (`cpu`) is the numerical reference; the CUDA backend implements
//! the same trait with kernels from `kernels/*.cu` and is tested against it.
use crate::{DType, Device, Result, Shape};

pub mod cpu;
pub mod cuda;

/// An elementwise map of one float tensor, with its derivative in `BackendStorage::unary_bwd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    /// `-x`.
    Neg,
    /// `eˣ`.
    Exp,
    /// Natural logarithm `ln x` (NaN below 0, −∞ at 0).
    Log,
    /// `x²`.
    Sqr,
    /// `√x`; its derivative reads the output (`0.5 / y`).
    Sqrt,
    /// `x·σ(1.702x)`, CLIP's activation.
    QuickGelu,
    /// `σ(x) = 1 / (1 + e⁻ˣ)`; its derivative reads the output (`y·(1 − y)`).
    Sigmoid,
}

impl UnaryOp {
    /// The op's lower-case name (`"quick_gelu"`, …), used in error messages and in kernel names.
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

/// An elementwise op of two float tensors of one dtype, with numpy-style broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a − b`.
    Sub,
    /// `a · b`.
    Mul,
    /// `a / b` (IEEE: division by zero gives ±∞ or NaN, no error).
    Div,
}

impl BinaryOp {
    /// The op's lower-case name (`"add"`, `"sub"`, `"mul"`, `"div"`), used in errors and kernel
    /// names.
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
    /// Number of independent products (1 for a plain matrix product).
    pub batch: usize,
    /// Rows of each `op(A)` and of C.
    pub m: usize,
    /// Columns of each `op(B)` and of C.
    pub n: usize,
    /// The contracted size: columns of `op(A)`, rows of `op(B)`.
    pub k: usize,
    /// A is stored as [batch, k, m] and used transposed.
    pub trans_a: bool,
    /// B is stored as [n, k] per batch (PyTorch's `Linear` weight layout) and used transposed.
    pub trans_b: bool,
    /// B has its own matrix per batch; when false one B is shared by every batch.
    pub rhs_batched: bool,
}

/// Multi-head attention on the layout linear layers produce: q is [batch, q_len, heads·head_dim],
/// k and v are [batch, kv_len, heads·head_dim]. The log-sum-exp saved per row is [batch, heads, q_len].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    /// Number of sequences.
    pub batch: usize,
    /// Number of attention heads; q, k and v have `heads·head_dim` columns.
    pub heads: usize,
    /// Query positions per sequence.
    pub q_len: usize,
    /// Key and value positions per sequence.
    pub kv_len: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Query i sees keys j ≤ i (+ kv_len − q_len, so a longer key set is aligned at the end).
    pub causal: bool,
    /// Factor applied to q·kᵀ before the softmax, usually `1/√head_dim`.
    pub scale: f64,
}

/// Sizes of a (LoRA-)linear layer: x is [m, k], W is [n, k], y is [m, n].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    /// Rows of x and y (tokens across the batch).
    pub m: usize,
    /// Output features: rows of W, columns of y.
    pub n: usize,
    /// Input features: columns of x and W.
    pub k: usize,
}

/// The low-rank branch of a LoRA-linear: `s·(drop(x)·Aᵀ)·Bᵀ`, A is [rank, k], B is [n, rank].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraSpec {
    /// LoRA rank r: rows of A, columns of B.
    pub rank: usize,
    /// The factor s on the branch (`alpha / rank` in PEFT terms).
    pub scale: f64,
    /// Dropout probability on the LoRA input (0 at inference).
    pub dropout: f32,
    /// Seed of the counter-based dropout mask (see `crate::rng::dropout_keep`).
    pub seed: u64,
}

/// Which gradients a backward pass must produce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearNeeds {
    /// Produce the input gradient dx ([m, k]).
    pub x: bool,
    /// Produce the weight gradient dW ([n, k]); only a trainable W asks for it.
    pub w: bool,
    /// Produce the bias gradient db (\[n\]).
    pub b: bool,
    /// Produce the LoRA down-projection's gradient dA ([rank, k]).
    pub lora_a: bool,
    /// Produce the LoRA up-projection's gradient dB ([n, rank]).
    pub lora_b: bool,
}

/// Gradients of a LoRA-linear (those not asked for are `None`).
pub struct LinearGrads<S> {
    /// dx, [m, k], if asked for.
    pub x: Option<S>,
    /// dW, [n, k], if asked for.
    pub w: Option<S>,
    /// db, \[n\], if asked for.
    pub b: Option<S>,
    /// dA, [rank, k], if asked for.
    pub lora_a: Option<S>,
    /// dB, [n, rank], if asked for.
    pub lora_b: Option<S>,
}

/// One AdamW update (decoupled weight decay), with the bias corrections precomputed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step (after any schedule).
    pub lr: f64,
    /// Decay of the first moment m (β₁).
    pub beta1: f64,
    /// Decay of the second moment v (β₂).
    pub beta2: f64,
    /// Added to √v̂ in the denominator.
    pub eps: f64,
    /// Decoupled weight decay: the parameter is first multiplied by `1 − lr·weight_decay`. The
    /// fused multi-tensor step ignores it and takes each tensor's `FusedParam::weight_decay`.
    pub weight_decay: f64,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bias1: f64,
    /// 1 − β₂ᵗ (see `bias1`).
    pub bias2: f64,
    /// Multiplies the gradient first (1/accumulated micro-batches, clipping factor).
    pub grad_scale: f64,
}

/// One tensor of a fused multi-tensor optimizer step over storage `S`: parameter, gradient,
/// first and second moments (f32, same length, one device) and its weight decay.
pub struct FusedParam<'a, S> {
    /// The parameter, updated in place.
    pub p: &'a S,
    /// Its gradient (read only).
    pub g: &'a S,
    /// First moment, updated in place.
    pub m: &'a S,
    /// Second moment, updated in place.
    pub v: &'a S,
    /// Decoupled weight decay for this tensor (0 for tensors excluded from decay).
    pub weight_decay: f32,
}

/// A buffer on one device with one dtype, and every op the engine runs on it.
pub trait BackendStorage: Sized + Send + Sync {
    /// The element type of the buffer.
    fn dtype(&self) -> DType;
    /// The device the buffer lives on.
    fn device(&self) -> Device;
    /// Number of elements (not bytes).
    fn len(&self) -> usize;
    /// True when the buffer has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A host copy of the data (a GPU backend reads the device buffer, which synchronizes).
    fn to_cpu(&self) -> Result<cpu::CpuStorage>;
    /// A zero-filled buffer on the same device.
    fn zeros_like(&self, len: usize, dtype: DType) -> Result<Self>;
    /// A copy of the buffer into new memory on the same device.
    fn try_clone(&self) -> Result<Self>;
    /// The data converted to `dtype` (a copy even when the dtype is the same). The CPU converts
    /// between any two types (floats round to nearest, `as` semantics otherwise); CUDA has only
    /// f32 ↔ bf16 and returns an error for other pairs.
    fn cast(&self, dtype: DType) -> Result<Self>;

    // Elementwise.
    /// `op` applied to every element; float dtypes only. bf16 is computed in f32 and rounded.
    fn unary(&self, op: UnaryOp) -> Result<Self>;
    /// dx from x, y = op(x) and dy.
    fn unary_bwd(&self, y: &Self, dy: &Self, op: UnaryOp) -> Result<Self>;
    /// `x·mul + add` per element, with `mul` and `add` converted to the compute type first.
    fn affine(&self, mul: f64, add: f64) -> Result<Self>;
    /// `op(self, rhs)` with broadcasting: `self` has shape `lhs`, `rhs` has `rhs_shape`, and the
    /// result has the broadcast shape `out` (computed by the caller, e.g. with `Shape::broadcast`).
    /// Both operands must have the same float dtype.
    fn binary(
        &self,
        rhs: &Self,
        op: BinaryOp,
        lhs: &Shape,
        rhs_shape: &Shape,
        out: &Shape,
    ) -> Result<Self>;
    /// `self += rhs` in place, element by element; same length and dtype (bf16 rounds each sum).
    fn add_assign(&mut self, rhs: &Self) -> Result<()>;
    /// Sums `src` (of shape `src`) down to the broadcast-compatible shape `dst`.
    fn sum_to(&self, src: &Shape, dst: &Shape) -> Result<Self>;
    /// The data of shape `src` repeated to the broadcast-compatible shape `dst`, made contiguous.
    /// Works for every dtype.
    fn broadcast_to(&self, src: &Shape, dst: &Shape) -> Result<Self>;

    // Layout.
    /// The batched product `spec` describes (see [`MatmulSpec`]); both operands of one float
    /// dtype.
    /// Accumulates in f32 (f64 for f64) and rounds bf16 results once.
    fn matmul(&self, rhs: &Self, spec: MatmulSpec) -> Result<Self>;
    /// The data of shape `shape` with its dimensions reordered and made contiguous: output
    /// dimension `i` is input dimension `perm[i]`. Works for every dtype.
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
    /// out\[i, :\] = self\[ids\[i\], :\] for self viewed as \[rows, cols\].
    fn index_rows(&self, ids: &Self, rows: usize, cols: usize) -> Result<Self>;
    /// out = zeros(\[rows, cols\]); out\[ids\[i\], :\] += self\[i, :\].
    fn index_add_rows(&self, ids: &Self, rows: usize, cols: usize) -> Result<Self>;
    /// out\[ids\[i\], :\] += self\[i, :\] in place (out is \[rows, cols\] of self's dtype), in id
    /// order, each add rounded to the dtype: a gradient added into the rows of one that exists.
    fn index_add_rows_into(
        &self,
        ids: &Self,
        out: &mut Self,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
}
