//! Launch geometry of `kernels/flash_attention.cu` (variant 1), in one place for the tests, the
//! benchmark and the ops: q [B, Sq, H·D], k/v [B, Skv, H·D], lse/delta [B, H, Sq] f32.
use super::abi::LaunchConfig;

/// The head dimension of the CLIP towers (the timed flash kernels).
pub const HEAD_DIM: usize = 64;

/// Head dimensions with compiled flash kernels (`flash_*_d{D}_*`).
pub const HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// Forward: one thread per query row, 64-row tiles, K/V tiles of 64 rows in f32 smem.
pub fn fwd_config(batch_heads: usize, sq: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid: ((sq as u32).div_ceil(64), batch_heads as u32, 1),
        block: (64, 1, 1),
        shared_mem_bytes: (2 * 64 * d * 4) as u32,
    }
}

/// D_i = ⟨dO_i, O_i⟩: one warp per row, grid-stride.
pub fn delta_config(rows: usize) -> LaunchConfig {
    LaunchConfig::linear((rows as u32).div_ceil(8).clamp(1, 65_535), 256)
}

/// dQ: one thread per query row, 32-row tiles.
pub fn dq_config(batch_heads: usize, sq: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid: ((sq as u32).div_ceil(32), batch_heads as u32, 1),
        block: (32, 1, 1),
        shared_mem_bytes: ((2 * 32 * (d + 1) + 2 * 32 * d) * 4) as u32,
    }
}

/// dK, dV: one thread per key row, 32-row tiles.
pub fn dkdv_config(batch_heads: usize, skv: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid: ((skv as u32).div_ceil(32), batch_heads as u32, 1),
        block: (32, 1, 1),
        shared_mem_bytes: ((2 * 32 * (d + 1) + 2 * 32 * d + 2 * 32) * 4) as u32,
    }
}

/// Matrix-multiply FLOPs of attention's forward (QKᵀ and PV, 2 flops per multiply-add), with
/// only the visible (i, j) pairs counted when causal; the backward is 2.5× (FlashAttention's
/// convention: five products, one of them the recomputed QKᵀ).
pub fn fwd_flops(batch_heads: usize, sq: usize, skv: usize, d: usize, causal: bool) -> f64 {
    let pairs: f64 = if causal {
        (0..sq)
            .map(|i| (i + 1 + skv.saturating_sub(sq)).min(skv) as f64)
            .sum()
    } else {
        (sq * skv) as f64
    };
    4.0 * batch_heads as f64 * pairs * d as f64
}

/// Variant 2 forward (tensor cores, bf16, head dim 64): 4 warps × 16 query rows per block,
/// static shared memory.
pub fn fwd_tc_config(batch_heads: usize, sq: usize) -> LaunchConfig {
    LaunchConfig {
        grid: ((sq as u32).div_ceil(64), batch_heads as u32, 1),
        block: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Head dimensions of the tensor-core backward (`flash_bwd_{dq,dkdv}_tc{V}_d{D}_bf16`).
pub const BWD_TC_HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// Numbered variants of the tensor-core backward: 2 waits for each streamed tile, 3
/// double-buffers them with `cp.async` (variant 1 is the CUDA-core `flash_dq`/`flash_dkdv`).
pub const BWD_TC_VARIANTS: [u32; 2] = [2, 3];

/// The (dQ + row-delta, dK/dV) kernel names of tensor-core backward `variant` at head dim `d`.
///
/// The dQ kernel takes `(q, k, v, o, lse, dout, delta_out, dq, heads, sq, skv, causal, scale)`
/// and writes D_i = ⟨dO_i, O_i⟩ for the dK/dV kernel, which takes variant 1's arguments
/// `(q, k, v, lse, delta, dout, dk, dv, heads, sq, skv, causal, scale)`; run them in that order.
pub fn bwd_tc_kernels(variant: u32, d: usize) -> (String, String) {
    (
        format!("flash_bwd_dq_tc{variant}_d{d}_bf16"),
        format!("flash_bwd_dkdv_tc{variant}_d{d}_bf16"),
    )
}

/// The tensor-core backward variant the CUDA storage runs for `len` streamed rows (keys for dQ,
/// queries for dK/dV): double buffering where there are several tiles to overlap, as in the
/// forward (v4 above 128 keys); to be settled by `sd2 bench flash` on a GPU.
pub fn bwd_tc_variant(len: usize) -> u32 {
    if len > 128 {
        3
    } else {
        2
    }
}

/// `SD2_FLASH_BWD`, read once per process: `auto` (default: tensor cores for bf16 at head
/// dims 16/32/64, variant by `bwd_tc_variant`), `v1` (the CUDA-core kernels everywhere: the
/// reference, and the fallback if a GPU check finds the tensor-core backward wrong), `v2`, `v3`.
/// `Ok(None)` = auto, `Ok(Some(v))` = variant v.
pub fn bwd_policy() -> crate::Result<Option<u32>> {
    static P: std::sync::OnceLock<std::result::Result<Option<u32>, String>> =
        std::sync::OnceLock::new();
    P.get_or_init(
        || match std::env::var("SD2_FLASH_BWD").as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("auto") => Ok(None),
            Ok("v1") => Ok(Some(1)),
            Ok("v2") => Ok(Some(2)),
            Ok("v3") => Ok(Some(3)),
            Ok(other) => Err(format!(
                "SD2_FLASH_BWD={other}: expected auto, v1, v2 or v3"
            )),
        },
    )
    .clone()
    .map_err(crate::Error::Msg)
}

/// Tensor-core backward: 4 warps × 16 rows (queries for dQ, keys for dK/dV) per block,
/// static shared memory; `rows` is the length the block owns (sq for dQ, skv for dK/dV).
pub fn bwd_tc_config(batch_heads: usize, rows: usize) -> LaunchConfig {
    fwd_tc_config(batch_heads, rows)
}
