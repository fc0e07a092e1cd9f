//! Every kernel entry point of `kernels/*.cu`, declared once: the names it is compiled under
//! (one per dtype or variant), its parameters in order with their Rust types, and — where it
//! has one — the rule for its launch geometry. Callers (the storage, the fused ops, the tests,
//! the benchmarks) build one of these structs, naming every parameter (the compiler rejects a
//! missing one), and launch it with `CudaStorage::run`, `Runner::run` or `Runner::run_staged`;
//! sizes and counts become 32-bit parameters only through checked conversions. `TABLE` lists
//! every declaration, so a test holds each one against the C++ signature the simulator recorded
//! at registration (and finds a registered kernel nobody declared).
//!
//! Parameter kinds: `ptr` a device address (the pointer type `P`: a raw `Arg` from the storage,
//! a staged `KArg` in tests), `map` a TMA descriptor (also `P`), `int` a size or count (`usize`,
//! checked into a C++ `int`), `flag` a `bool` passed as `int`, `code` an `i32` enum code, `i32` a signed
//! 32-bit value, `len`
//! a size passed as `long long` (`usize`), `u64` a raw 64-bit value, `f32` a float, `dims` up
//! to `MAX_RANK` sizes or strides (`Vec<usize>`, padded with 1s) passed as `long long`s.
use super::abi::{Arg, LaunchConfig};
use crate::{Error, Result};

/// Most dims a shape may have in the elementwise/layout kernels (`SD2_MAX_RANK`).
pub const MAX_RANK: usize = 6;

/// One launch parameter, before it becomes a raw `Arg` or a staged `KArg`.
#[derive(Clone, Debug)]
pub enum Param<P> {
    /// Memory: a pointer or a TMA descriptor.
    Mem(P),
    /// A C++ `int`.
    I32(i32),
    /// A C++ `long long` / `unsigned long long`.
    U64(u64),
    /// A C++ `float`.
    F32(f32),
}

impl Param<Arg> {
    /// The raw launch argument.
    pub fn into_arg(self) -> Arg {
        match self {
            Param::Mem(a) => a,
            Param::I32(v) => Arg::I32(v),
            Param::U64(v) => Arg::U64(v),
            Param::F32(v) => Arg::F32(v),
        }
    }
}

/// `k`'s parameters as raw launch arguments, once `name` is checked to be one of its kernels.
pub fn raw_args<K: Kernel<Arg>>(name: &str, k: K) -> Result<Vec<Arg>> {
    K::check_name(name)?;
    // One allocation per launch: the arguments, built straight from the fields.
    let mut v = Vec::with_capacity(K::SIG.len());
    k.visit(&mut |p| v.push(p.into_arg()))?;
    Ok(v)
}

/// A declared kernel family (see the module docs), with pointer arguments of type `P`.
pub trait Kernel<P>: Sized {
    /// The declaration's name, for errors.
    const FAMILY: &'static str;
    /// The compiled entry points this declaration describes.
    const NAMES: &'static [&'static str];
    /// Their C++ signature as the simulator records it (`sim::kernel_signature`).
    const SIG: &'static str;
    /// Hands `out` the parameters in declaration order, sizes converted with checks.
    fn visit(self, out: &mut dyn FnMut(Param<P>)) -> Result<()>;
    /// The parameters in declaration order, sizes converted with checks.
    fn params(self) -> Result<Vec<Param<P>>> {
        let mut v = Vec::with_capacity(Self::SIG.len());
        self.visit(&mut |p| v.push(p))?;
        Ok(v)
    }
    /// Errors unless `name` is one of `NAMES` (a launch of the wrong declaration).
    fn check_name(name: &str) -> Result<()> {
        if Self::NAMES.contains(&name) {
            Ok(())
        } else {
            Err(Error::Cuda(format!(
                "kernel {name} is launched with the parameters of {}, which declares {}",
                Self::FAMILY,
                Self::NAMES.join(", ")
            )))
        }
    }
}

/// A kernel whose launch geometry follows from its parameters (declared with `grid`).
pub trait Grid {
    /// The grid, block and shared memory for these parameters.
    fn grid(&self) -> LaunchConfig;
}

/// One declaration, as `TABLE` lists it.
#[derive(Clone, Copy, Debug)]
pub struct Decl {
    /// The Rust type.
    pub family: &'static str,
    /// The entry points.
    pub names: &'static [&'static str],
    /// The signature every one of them must have.
    pub sig: &'static str,
}

/// A size as a C++ `int`: an error naming the parameter if it does not fit (wrapped, it would
/// index out of bounds on the device).
pub fn int(kernel: &'static str, param: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Cuda(format!(
            "kernel {kernel}: parameter {param} = {v} does not fit a 32-bit int (split the work)"
        ))
    })
}

/// Up to `MAX_RANK` sizes padded with 1s.
pub fn dims(kernel: &'static str, param: &'static str, v: &[usize]) -> Result<[u64; MAX_RANK]> {
    if v.len() > MAX_RANK {
        return Err(Error::Cuda(format!(
            "kernel {kernel}: parameter {param} has {} dims, the kernels take at most {MAX_RANK}",
            v.len()
        )));
    }
    let mut out = [1u64; MAX_RANK];
    for (o, x) in out.iter_mut().zip(v) {
        *o = *x as u64;
    }
    Ok(out)
}

/// The largest LoRA rank `LoraDown`/`LoraUpAdd` take (`lr::kMaxRank`).
pub const LORA_LOWRANK_MAX_RANK: usize = 32;

/// `lora_dsdb_part`'s split of dY [m, n]: (256-column tiles, rows per chunk, chunks) — about
/// 128 chunks of ≥ 64 rows, so both partial buffers stay a few MB.
pub fn lora_dsdb_chunks(m: usize, n: usize) -> (usize, usize, usize) {
    let rows_per_chunk = m.div_ceil(128).max(64);
    (n.div_ceil(256), rows_per_chunk, m.div_ceil(rows_per_chunk))
}

/// `lora_da_part`'s split of x's m rows: (rows per chunk, chunks) — enough chunks of ≥ 512
/// rows to fill a GPU with 32-column tiles, at most 64.
pub fn lora_da_chunks(m: usize) -> (usize, usize) {
    let rows_per_chunk = m.div_ceil(m.div_ceil(512).clamp(1, 64)).max(1);
    (rows_per_chunk, m.div_ceil(rows_per_chunk))
}

/// Rows per block of `lora_grads` (`kRows` in kernels/lora_grads.cu): one dB and one dA
/// partial per chunk of this many rows.
pub const LORA_GRADS_ROWS: usize = 256;

/// `lora_grads_r{r}_bf16`'s launch for m rows: one block of 256 per chunk, with dynamic shared
/// memory for two padded 128×136 tiles, two B tiles [128, r] and the chunk's S/dS rows
/// [256, r], in bf16.
pub fn lora_grads_config(m: usize, r: usize) -> LaunchConfig {
    LaunchConfig {
        grid: (m.div_ceil(LORA_GRADS_ROWS).max(1) as u32, 1, 1),
        block: (256, 1, 1),
        shared_mem_bytes: ((2 * 128 * 136 + 2 * 128 * r + LORA_GRADS_ROWS * r) * 2) as u32,
    }
}

/// One block per 256 elements, at most 1024 blocks (the elementwise kernels grid-stride).
pub fn ew(n: usize) -> LaunchConfig {
    LaunchConfig::linear(n.div_ceil(256).clamp(1, 1024) as u32, 256)
}

/// `ew` for the contiguous kernels, which take 16 bytes (4 f32 or 8 bf16) per thread and step.
pub fn ew_vec(n: usize) -> LaunchConfig {
    ew(n.div_ceil(4))
}

/// One block of `threads` per row, at most 4096 blocks (the row kernels grid-stride).
pub fn rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(rows.clamp(1, 4096) as u32, threads)
}

macro_rules! field_ty {
    (ptr, $P:ident) => { $P };
    (map, $P:ident) => { $P };
    (int, $P:ident) => { usize };
    (flag, $P:ident) => { bool };
    (code, $P:ident) => { i32 };
    (i32, $P:ident) => { i32 };
    (len, $P:ident) => { usize };
    (u64, $P:ident) => { u64 };
    (f32, $P:ident) => { f32 };
    (dims, $P:ident) => { Vec<usize> };
}

macro_rules! sig_of {
    (ptr) => {
        "p"
    };
    (map) => {
        "T"
    };
    (int) => {
        "i"
    };
    (flag) => {
        "i"
    };
    (code) => {
        "i"
    };
    (i32) => {
        "i"
    };
    (len) => {
        "q"
    };
    (u64) => {
        "q"
    };
    (f32) => {
        "f"
    };
    (dims) => {
        "qqqqqq"
    };
}

macro_rules! push_param {
    ($out:ident, $fam:expr, ptr, $name:expr, $v:expr) => {
        $out(Param::Mem($v))
    };
    ($out:ident, $fam:expr, map, $name:expr, $v:expr) => {
        $out(Param::Mem($v))
    };
    ($out:ident, $fam:expr, int, $name:expr, $v:expr) => {
        $out(Param::I32(int($fam, $name, $v)?))
    };
    ($out:ident, $fam:expr, flag, $name:expr, $v:expr) => {
        $out(Param::I32($v as i32))
    };
    ($out:ident, $fam:expr, code, $name:expr, $v:expr) => {
        $out(Param::I32($v))
    };
    ($out:ident, $fam:expr, i32, $name:expr, $v:expr) => {
        $out(Param::I32($v))
    };
    ($out:ident, $fam:expr, len, $name:expr, $v:expr) => {
        $out(Param::U64($v as u64))
    };
    ($out:ident, $fam:expr, u64, $name:expr, $v:expr) => {
        $out(Param::U64($v))
    };
    ($out:ident, $fam:expr, f32, $name:expr, $v:expr) => {
        $out(Param::F32($v))
    };
    ($out:ident, $fam:expr, dims, $name:expr, $v:expr) => {
        for d in dims($fam, $name, &$v)? {
            $out(Param::U64(d))
        }
    };
}

macro_rules! kernels {
    ($(
        $(#[$doc:meta])*
        $ty:ident [$($name:literal),+ $(,)?] ( $($f:ident : $kind:ident),* $(,)? )
        $(grid($k:ident) = $grid:expr)? ;
    )*) => {
        $(
            $(#[$doc])*
            #[allow(missing_docs)]
            pub struct $ty<P> { $(pub $f: field_ty!($kind, P)),* }

            impl<P> Kernel<P> for $ty<P> {
                const FAMILY: &'static str = stringify!($ty);
                const NAMES: &'static [&'static str] = &[$($name),+];
                const SIG: &'static str = concat!($(sig_of!($kind)),*);
                fn visit(self, out: &mut dyn FnMut(Param<P>)) -> Result<()> {
                    $(push_param!(out, Self::FAMILY, $kind, stringify!($f), self.$f);)*
                    Ok(())
                }
            }

            $(impl<P> Grid for $ty<P> {
                fn grid(&self) -> LaunchConfig {
                    let $k = self;
                    $grid
                }
            })?
        )*

        /// Every declaration above.
        pub const TABLE: &[Decl] = &[$(Decl {
            family: stringify!($ty),
            names: &[$($name),+],
            sig: concat!($(sig_of!($kind)),*),
        }),*];
    };
}

kernels! {
    // kernels/elementwise.cu
    /// y = op(x), `op` a `unary_code`.
    Unary["unary_f32", "unary_bf16"](x: ptr, y: ptr, op: code, n: len)
        grid(k) = ew_vec(k.n);
    /// dx from (x, y, dy) of a unary op (y may be null where the rule needs only x).
    UnaryBwd["unary_bwd_f32", "unary_bwd_bf16"](x: ptr, y: ptr, dy: ptr, dx: ptr, op: code, n: len)
        grid(k) = ew_vec(k.n);
    /// y = mul·x + add.
    Affine["affine_f32", "affine_bf16"](x: ptr, y: ptr, mul: f32, add: f32, n: len)
        grid(k) = ew_vec(k.n);
    /// out = a op b for three tensors of one shape (the broadcast-free case of `Binary`).
    BinaryContig["binary_contig_f32", "binary_contig_bf16"](a: ptr, b: ptr, out: ptr, op: code, n: len)
        grid(k) = ew_vec(k.n);
    /// y = x · s\[0\], s an f32 on the device.
    ScaleBy["scale_by_f32", "scale_by_bf16"](x: ptr, s: ptr, y: ptr, n: len)
        grid(k) = ew(k.n);
    /// Inverted dropout with the CPU's keep mask (`rng::dropout_keep`).
    Dropout["dropout_f32", "dropout_bf16"](x: ptr, y: ptr, n: len, p: f32, seed: u64)
        grid(k) = ew(k.n);
    /// out = a op b with broadcasting: `dims` of the output, element strides of a and b.
    Binary["binary_f32", "binary_bf16"](
        a: ptr, b: ptr, out: ptr, op: code, n: len, rank: int,
        dims: dims, stride_a: dims, stride_b: dims,
    ) grid(k) = ew(k.n);
    /// dst = Σ src over the reduced dims (kept dims/strides `kd`/`ks`, reduced `rd`/`rs`).
    SumTo["sum_to_f32", "sum_to_bf16"](
        src: ptr, dst: ptr, n_dst: len, n_red: len,
        krank: int, kd: dims, ks: dims, rrank: int, rd: dims, rs: dims,
    ) grid(k) = rows(k.n_dst, 256);
    /// dst = src viewed through `dims` with element `strides`, by element width.
    GatherStrided["gather_strided_b2", "gather_strided_b4", "gather_strided_b8"](
        src: ptr, dst: ptr, n: len, rank: int, dims: dims, strides: dims,
    ) grid(k) = ew(k.n);
    /// A rows × cols block copy between strided 2-D views (strides and offsets in elements).
    Copy2d["copy2d_b2", "copy2d_b4", "copy2d_b8"](
        src: ptr, dst: ptr, rows: len, cols: len,
        src_stride: len, dst_stride: len, src_offset: len, dst_offset: len,
    ) grid(k) = ew(k.rows * k.cols);

    // kernels/gather.cu
    /// f32 ↔ bf16 (round to nearest even).
    Cast["cast_f32_bf16", "cast_bf16_f32"](x: ptr, y: ptr, n: len)
        grid(k) = ew(k.n);
    /// out\[i, :\] = table\[ids\[i\], :\].
    IndexRows["index_rows_f32", "index_rows_bf16"](table: ptr, ids: ptr, out: ptr, n: int, cols: int)
        grid(k) = rows(k.n, 128);
    /// out\[ids\[i\], :\] += src\[i, :\], one thread per column in id order (deterministic).
    IndexAddRows["index_add_rows_f32", "index_add_rows_bf16"](src: ptr, ids: ptr, out: ptr, n: int, cols: int)
        grid(k) = LaunchConfig::linear(k.cols.div_ceil(128).max(1) as u32, 128);
    /// The ViT stem's im2col: [B, C, H, W] → [B, (H/p)(W/p), C·p·p].
    Patchify["patchify_f32", "patchify_bf16"](x: ptr, out: ptr, b: int, c: int, h: int, w: int, p: int)
        grid(k) = ew(k.b * k.c * k.h * k.w);
    /// Ids widened to i64 and checked against `bound`; a bad one becomes 0 and is recorded in
    /// `err` with the op `code` (`launch::ID_CHECK_OPS`).
    IdsChecked["ids_checked_i64", "ids_checked_u32"](
        ids: ptr, n: len, bound: len, op: code, out: ptr, err: ptr,
    ) grid(k) = ew(k.n);

    // kernels/layernorm.cu
    /// out\[j\] = Σ_p part\[p, j\] in order (the fixed-order second stage of the reductions).
    ColumnSum["column_sum_f32", "column_sum_bf16"](part: ptr, out: ptr, parts: int, n: int)
        grid(k) = LaunchConfig::linear(k.n.div_ceil(128).max(1) as u32, 128);
    /// LayerNorm of x (+ res, whose sum goes to `sum_out`; both optional) with f32 statistics.
    LayerNormFwd["layernorm_fwd_f32", "layernorm_fwd_bf16"](
        x: ptr, res: ptr, gamma: ptr, beta: ptr, sum_out: ptr, y: ptr, mean: ptr, rstd: ptr,
        rows: int, n: int, eps: f32,
    ) grid(k) = rows(k.rows, 256);
    /// dx (plus `dsum`, optional) and per-block dγ/dβ partials.
    LayerNormBwd["layernorm_bwd_f32", "layernorm_bwd_bf16"](
        dy: ptr, x: ptr, gamma: ptr, mean: ptr, rstd: ptr, dsum: ptr, dx: ptr,
        dgamma_part: ptr, dbeta_part: ptr, rows: int, n: int,
    ) grid(k) = LaunchConfig::linear(k.rows.clamp(1, 256) as u32, 256);

    // kernels/l2norm.cu
    /// y = x / max(‖x‖, eps) per row, with the norms.
    L2NormFwd["l2norm_fwd_f32", "l2norm_fwd_bf16"](x: ptr, y: ptr, norm: ptr, rows: int, cols: int, eps: f32)
        grid(k) = rows(k.rows, 128);
    /// dx from (y, ‖x‖, dy).
    L2NormBwd["l2norm_bwd_f32", "l2norm_bwd_bf16"](
        y: ptr, norm: ptr, dy: ptr, dx: ptr, rows: int, cols: int, eps: f32,
    ) grid(k) = rows(k.rows, 128);

    // kernels/softmax.cu
    /// Row softmax.
    SoftmaxFwd["softmax_fwd_f32", "softmax_fwd_bf16"](x: ptr, y: ptr, rows: int, cols: int)
        grid(k) = rows(k.rows, 128);
    /// dx = y ⊙ (dy − ⟨dy, y⟩).
    SoftmaxBwd["softmax_bwd_f32", "softmax_bwd_bf16"](y: ptr, dy: ptr, dx: ptr, rows: int, cols: int)
        grid(k) = rows(k.rows, 128);

    // kernels/cross_entropy.cu
    /// Per-row loss parts and log-sum-exp; four rows per block.
    CrossEntropyFwd["cross_entropy_fwd_f32", "cross_entropy_fwd_bf16"](
        z: ptr, labels: ptr, loss_part: ptr, lse: ptr, rows: int, cols: int,
    ) grid(k) = rows(k.rows.div_ceil(4), 128);
    /// dz = (softmax(z) − onehot) · dloss / rows, dloss an f32 on the device.
    CrossEntropyBwd["cross_entropy_bwd_f32", "cross_entropy_bwd_bf16"](
        z: ptr, labels: ptr, lse: ptr, dloss: ptr, dz: ptr, rows: int, cols: int,
    ) grid(k) = ew(k.rows * k.cols);

    // kernels/sigmoid_loss.cu
    /// One row i of the SigLIP loss of f [rows, dim] against d [cols, dim], positive pair
    /// (i, i + offset), the sum scaled by inv_n: ∂/∂f_i, and partials of the loss, ∂t and ∂b
    /// (t, b f32 on the device). Shared memory (1 + threads/32)·dim floats: the caller's geometry.
    SigmoidLossRows["sigmoid_loss_rows_f32", "sigmoid_loss_rows_bf16"](
        f: ptr, d: ptr, t: ptr, b: ptr, grad: ptr, loss_part: ptr, dt_part: ptr, db_part: ptr,
        rows: int, cols: int, dim: int, offset: i32, inv_n: f32,
    );

    // kernels/bias_gelu.cu
    /// y = quick_gelu(x + b), b broadcast over rows.
    BiasQuickGeluFwd["bias_quick_gelu_fwd_f32", "bias_quick_gelu_fwd_bf16"](
        x: ptr, b: ptr, y: ptr, rows: int, n: int,
    ) grid(k) = rows(k.rows, 256);
    /// dx and per-block db partials.
    BiasQuickGeluBwd["bias_quick_gelu_bwd_f32", "bias_quick_gelu_bwd_bf16"](
        x: ptr, b: ptr, dy: ptr, dx: ptr, db_part: ptr, rows: int, n: int,
    );

    // kernels/clam_attention.cu
    /// Whole-sequence attention for short sequences (CLAM's layers of CLS tokens): one block
    /// per (batch, head), everything in shared memory.
    ClamAttentionFwd["clam_attention_fwd_f32", "clam_attention_fwd_bf16"](
        q: ptr, k: ptr, v: ptr, out: ptr, lse: ptr,
        batch: int, heads: int, sq: int, skv: int, d: int, causal: flag, scale: f32,
    ) grid(k) = clam_grid(k.batch * k.heads, k.sq, k.skv, k.d, false);
    /// Its backward.
    ClamAttentionBwd["clam_attention_bwd_f32", "clam_attention_bwd_bf16"](
        q: ptr, k: ptr, v: ptr, o: ptr, lse: ptr, dout: ptr, dq: ptr, dk: ptr, dv: ptr,
        batch: int, heads: int, sq: int, skv: int, d: int, causal: flag, scale: f32,
    ) grid(k) = clam_grid(k.batch * k.heads, k.sq, k.skv, k.d, true);

    // kernels/flash_attention.cu (geometry per variant: `backend::cuda::flash`)
    /// Flash forward: variant 1 on CUDA cores at head dims 16/32/64; variants 3 and 4 on
    /// tensor cores (bf16, d 64).
    FlashFwd[
        "flash_fwd_d16_f32", "flash_fwd_d16_bf16", "flash_fwd_d32_f32", "flash_fwd_d32_bf16",
        "flash_fwd_d64_f32", "flash_fwd_d64_bf16", "flash_fwd_tc3_d64_bf16", "flash_fwd_tc4_d64_bf16",
    ](q: ptr, k: ptr, v: ptr, out: ptr, lse: ptr, heads: int, sq: int, skv: int, causal: flag, scale: f32);
    /// D_i = ⟨dO_i, O_i⟩ for the variant-1 backward.
    FlashDelta["flash_delta_f32", "flash_delta_bf16"](
        o: ptr, dout: ptr, delta: ptr, batch: int, heads: int, sq: int, d: int,
    ) grid(k) = super::flash::delta_config(k.batch * k.heads * k.sq);
    /// Variant-1 dQ.
    FlashDq[
        "flash_dq_d16_f32", "flash_dq_d16_bf16", "flash_dq_d32_f32", "flash_dq_d32_bf16",
        "flash_dq_d64_f32", "flash_dq_d64_bf16",
    ](q: ptr, k: ptr, v: ptr, lse: ptr, delta: ptr, dout: ptr, dq: ptr,
      heads: int, sq: int, skv: int, causal: flag, scale: f32);
    /// dK, dV: variant 1, and the tensor-core variants 2 and 3 (bf16), which take the same
    /// parameters.
    FlashDkdv[
        "flash_dkdv_d16_f32", "flash_dkdv_d16_bf16", "flash_dkdv_d32_f32", "flash_dkdv_d32_bf16",
        "flash_dkdv_d64_f32", "flash_dkdv_d64_bf16",
        "flash_bwd_dkdv_tc2_d16_bf16", "flash_bwd_dkdv_tc2_d32_bf16", "flash_bwd_dkdv_tc2_d64_bf16",
        "flash_bwd_dkdv_tc3_d16_bf16", "flash_bwd_dkdv_tc3_d32_bf16", "flash_bwd_dkdv_tc3_d64_bf16",
    ](q: ptr, k: ptr, v: ptr, lse: ptr, delta: ptr, dout: ptr, dk: ptr, dv: ptr,
      heads: int, sq: int, skv: int, causal: flag, scale: f32);
    /// Tensor-core dQ, writing the row deltas for `FlashDkdv` as it goes.
    FlashBwdDq[
        "flash_bwd_dq_tc2_d16_bf16", "flash_bwd_dq_tc2_d32_bf16", "flash_bwd_dq_tc2_d64_bf16",
        "flash_bwd_dq_tc3_d16_bf16", "flash_bwd_dq_tc3_d32_bf16", "flash_bwd_dq_tc3_d64_bf16",
    ](q: ptr, k: ptr, v: ptr, o: ptr, lse: ptr, dout: ptr, delta: ptr, dq: ptr,
      heads: int, sq: int, skv: int, causal: flag, scale: f32);

    // kernels/gemm.cu
    /// C = op(A)·op(B) per batch on CUDA cores (the fallback where cuBLAS is not there).
    GemmSimt["gemm_simt_f32", "gemm_simt_bf16"](
        a: ptr, b: ptr, c: ptr, m: int, n: int, k: int, trans_a: flag, trans_b: flag,
        stride_a: len, stride_b: len, stride_c: len,
    );

    // kernels/lora_gemm.cu (geometry per variant: `backend::cuda::lora_gemm`)
    /// y = epilogue(x·Wᵀ + bias + s·S·Bᵀ) (+ res when given; the pre-activation to `pre` with
    /// bias + quick_gelu): variants 1 and 2.
    LoraGemmFwd["lora_gemm_fwd_bf16", "lora_gemm2_fwd_bf16"](
        x: ptr, w: ptr, bias: ptr, s_low: ptr, lb: ptr, res: ptr, pre: ptr, y: ptr,
        m: int, n: int, k: int, r: int, scale: f32, epilogue: code,
    );
    /// The input gradient dy·W + s·(dy·B)·A of variants 1 and 2 (or, with `lds`, + the LoRA
    /// term drop′(lds·la) under dropout `lp`, `lseed`), times quick_gelu′(aux) with the gelu
    /// epilogue, plus res (the gradient the input already has) when given.
    LoraGemmBwd["lora_gemm_bwd_bf16", "lora_gemm2_bwd_bf16"](
        x: ptr, w: ptr, s_low: ptr, lb: ptr, lds: ptr, la: ptr, lr: int, lp: f32, lseed: u64,
        res: ptr, aux: ptr, y: ptr, m: int, n: int, k: int, r: int, scale: f32, epilogue: code,
    );
    /// Variant 3 (Hopper: TMA + wgmma), operands by tensor map; with W = Wᵀ also the
    /// backward's dX (epilogue terms as `LoraGemmBwd`'s: aux, lds/la/lr/lp/lseed, res).
    LoraGemm3Fwd["lora_gemm3_fwd_bf16"](
        tm_x: map, tm_w: map, tm_s: map, tm_b: map, bias: ptr, res: ptr, pre: ptr, aux: ptr,
        lds: ptr, la: ptr, lr: int, lp: f32, lseed: u64, y: ptr,
        m: int, n: int, k: int, r: int, scale: f32, epilogue: code,
    );

    // kernels/lora_lowrank.cu
    /// S[m, r] = Σ_k drop(x)[m, k]·A[r, k], the dropout mask applied in registers (p = 0: none);
    /// one warp per row, r ≤ `LORA_LOWRANK_MAX_RANK`. Up to three adapters of one x, r = groups
    /// · group: adapter g's A (a, a_b, a_c, [group, k] each), masked by its seed (seed, seed_b,
    /// seed_c), into s, s_b, s_c ([m, group] each); one adapter: group = r.
    LoraDown["lora_down_f32", "lora_down_bf16"](
        x: ptr, a: ptr, a_b: ptr, a_c: ptr, s: ptr, s_b: ptr, s_c: ptr,
        m: int, k: int, r: int, group: int, p: f32, seed: u64, seed_b: u64, seed_c: u64,
    ) grid(k) = LaunchConfig::linear(k.m.div_ceil(8).clamp(1, 4096) as u32, 256);
    /// dX[m, k] += drop′(Σ_r dS[m, r]·A[r, k]) in place: the LoRA branch's input gradient with
    /// the forward's mask; one block per row.
    LoraUpAdd["lora_up_add_f32", "lora_up_add_bf16"](
        ds: ptr, a: ptr, dx: ptr, m: int, k: int, r: int, p: f32, seed: u64,
    ) grid(k) = rows(k.m, 256);
    /// Partial sums of dA = dSᵀ·drop(x) over row chunks: part [chunks, r, k] f32, blocks of 256
    /// over (⌈k/32⌉, chunks); `column_sum_f32` adds the chunks in order.
    LoraDaPart["lora_da_part_f32", "lora_da_part_bf16"](
        ds: ptr, x: ptr, part: ptr, m: int, k: int, r: int, rows_per_chunk: int, p: f32, seed: u64,
    ) grid(k) = LaunchConfig {
        grid: (k.k.div_ceil(32).max(1) as u32, k.m.div_ceil(k.rows_per_chunk.max(1)).max(1) as u32, 1),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    /// dS and dB partials of a LoRA-linear from one pass over dY: ds_part [tile, m, r] over
    /// 256-column tiles, db_part [chunk, n, r] over row chunks (each summed by `ColumnSum`).
    LoraDsDbPart["lora_dsdb_part_f32", "lora_dsdb_part_bf16"](
        dy: ptr, b: ptr, s: ptr, ds_part: ptr, db_part: ptr,
        m: int, n: int, r: int, rows_per_chunk: int, scale: f32,
    ) grid(k) = LaunchConfig {
        grid: (k.n.div_ceil(256).max(1) as u32, k.m.div_ceil(k.rows_per_chunk.max(1)).max(1) as u32, 1),
        block: (256, 1, 1),
        shared_mem_bytes: 0,
    };

    // kernels/lora_grads.cu
    /// dS = s·dY·B (whole, rounded once), dB partials (db_part [chunk, n, r]) and dA partials
    /// (da_part [chunk, r, k], from the rounded dS and drop(x) with the forward's mask) of a
    /// LoRA-linear in one pass over dY and x, on tensor cores; chunks of
    /// `LORA_GRADS_ROWS` rows, r = 8, 16 or 32, n and k multiples of 8.
    LoraGrads["lora_grads_r8_bf16", "lora_grads_r16_bf16", "lora_grads_r32_bf16"](
        dy: ptr, b: ptr, s: ptr, x: ptr, ds: ptr, db_part: ptr, da_part: ptr,
        m: int, n: int, k: int, p: f32, seed: u64, scale: f32,
    );

    // kernels/adamw.cu
    /// Multi-tensor AdamW over a chunk table, gradients scaled by `grad_scale` · *scale_ptr.
    AdamwMulti["adamw_multi_f32"](
        chunks: ptr, num_chunks: int, lr: f32, beta1: f32, beta2: f32, eps: f32,
        bias1: f32, bias2: f32, grad_scale: f32, scale_ptr: ptr,
    ) grid(k) = LaunchConfig::linear(k.num_chunks.clamp(1, 4096) as u32, 256);
    /// Σ g² per chunk of the table.
    SumSqMulti["sum_sq_multi_f32"](chunks: ptr, num_chunks: int, part: ptr)
        grid(k) = LaunchConfig::linear(k.num_chunks.clamp(1, 4096) as u32, 256);
    /// torch's clipping factor min(1, max_norm / (‖g‖ + 1e-6)) from the partial sums.
    GradClip["grad_clip_f32"](part: ptr, num_parts: int, max_norm: f32, out: ptr)
        grid(_k) = LaunchConfig::linear(1, 256);
}

/// Blocks of `layernorm_bwd` for `rows`: one partial row of dγ/dβ per block caps the grid at
/// 256 when they are computed; a frozen norm's grid fills the GPU (rows grid-stride).
pub fn layernorm_bwd_blocks(rows: usize, params: bool) -> usize {
    rows.clamp(1, if params { 256 } else { 4096 })
}

/// Shared memory of CLAM attention: Q, K, V and the scores; the backward also holds dQ and dS.
pub fn clam_smem_bytes(sq: usize, skv: usize, d: usize, bwd: bool) -> usize {
    let floats = if bwd {
        (2 * sq + 2 * skv) * d + 2 * sq * skv
    } else {
        (sq + 2 * skv) * d + sq * skv
    };
    floats * 4
}

/// CLAM attention: one block of 128 per (batch, head) (grid-stride).
fn clam_grid(batch_heads: usize, sq: usize, skv: usize, d: usize, bwd: bool) -> LaunchConfig {
    LaunchConfig {
        grid: (batch_heads.clamp(1, 4096) as u32, 1, 1),
        block: (128, 1, 1),
        shared_mem_bytes: clam_smem_bytes(sq, skv, d, bwd) as u32,
    }
}

#[cfg(all(test, feature = "cuda-sim"))]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_declared_once_with_its_compiled_signature() {
        let mut seen = std::collections::HashMap::new();
        for d in TABLE {
            for name in d.names {
                assert!(
                    seen.insert(*name, d.family).is_none(),
                    "{name} is declared twice"
                );
                match super::super::sim::kernel_signature(name) {
                    Some(sig) => assert_eq!(
                        sig, d.sig,
                        "{}: {name} is compiled as ({sig}), declared as ({})",
                        d.family, d.sig
                    ),
                    None => panic!("{}: {name} is declared but not compiled", d.family),
                }
            }
        }
        for name in super::super::sim::kernel_names() {
            assert!(
                seen.contains_key(name.as_str()),
                "kernel {name} is compiled but not declared in backend::cuda::kernels"
            );
        }
        println!(
            "{} kernels in {} declarations match their signatures",
            seen.len(),
            TABLE.len()
        );
    }

    #[test]
    fn sizes_are_checked_and_names_matched() {
        let k = L2NormFwd::<u64> {
            x: 0,
            y: 0,
            norm: 0,
            rows: 1 << 31,
            cols: 4,
            eps: 1e-6,
        };
        let e = k.params().unwrap_err().to_string();
        assert!(e.contains("rows") && e.contains("2147483648"), "{e}");
        let e = L2NormFwd::<u64>::check_name("softmax_fwd_f32")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("L2NormFwd") && e.contains("l2norm_fwd_f32"),
            "{e}"
        );
        let e = dims("binary", "dims", &[1; 7]).unwrap_err().to_string();
        assert!(e.contains("7 dims"), "{e}");
        let p = Binary::<u64> {
            a: 1,
            b: 2,
            out: 3,
            op: 2,
            n: 6,
            rank: 2,
            dims: vec![2, 3],
            stride_a: vec![3, 1],
            stride_b: vec![0, 1],
        }
        .params()
        .unwrap();
        assert_eq!(p.len(), Binary::<u64>::SIG.len());
        assert!(matches!(p[7], Param::U64(3)) && matches!(p[8], Param::U64(1)));
    }
}
