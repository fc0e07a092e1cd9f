//! Launch geometry of `kernels/lora_gemm.cu`, in one place for the tests, the benchmark and the
//! storage: the LoRA-linear GEMM variants and their epilogue codes.
use super::abi::LaunchConfig;

/// Fused epilogue after `X·Wᵀ + s·S·Bᵀ` (the kernels' `epilogue` argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// The product as is. (Under every code a non-null `res` [M, N] is added last.)
    None = 0,
    /// + bias (one value per output column, length N).
    Bias = 1,
    /// bias, then quick_gelu (CLIP's fc1)
    BiasGelu = 2,
    /// bias, then + a residual [M, N] (out_proj, fc2)
    BiasResidual = 3,
    /// the backward's dX times quick_gelu′ of fc1's pre-activation (fc2's input gradient)
    GeluBwd = 4,
}

/// One `mma.sync` variant: its kernels and block geometry (same arguments for every variant).
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    /// The label in tables and reports (`v1 mma 64x64`); its first word names the variant.
    pub name: &'static str,
    /// The forward kernel: `(x, w, bias, s_low, lb, res, pre, y, M, N, K, R, scale, epilogue)`
    /// (`kernels::LoraGemmFwd`)
    pub fwd: &'static str,
    /// The backward dX kernel, depth-major B operands: `(x, w, s_low, lb, lds, la, lr, lp,
    /// lseed, res, aux, y, M, N, K, R, scale, epilogue)` (`kernels::LoraGemmBwd`)
    pub bwd: &'static str,
    /// Output rows per block (grid y = ⌈M / tile_m⌉).
    pub tile_m: u32,
    /// Output columns per block (grid x = ⌈N / tile_n⌉).
    pub tile_n: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory per launch, bytes (0: the tiles are static shared memory).
    pub smem: u32,
}

impl Variant {
    /// The launch for an output of `m` rows × `n` columns.
    pub fn config(&self, m: usize, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid: (
                (n as u32).div_ceil(self.tile_n),
                (m as u32).div_ceil(self.tile_m),
                1,
            ),
            block: (self.threads, 1, 1),
            shared_mem_bytes: self.smem,
        }
    }
}

/// v1: 64×64 tiles, 4 warps, one shared-memory stage (the readable reference).
pub const V1: Variant = Variant {
    name: "v1 mma 64x64",
    fwd: "lora_gemm_fwd_bf16",
    bwd: "lora_gemm_bwd_bf16",
    tile_m: 64,
    tile_n: 64,
    threads: 128,
    smem: 0,
};

/// v2: 128×128 tiles, 8 warps, a 4-stage cp.async ring (the default off Hopper).
pub const V2: Variant = Variant {
    name: "v2 mma 128x128 cp.async x4",
    fwd: "lora_gemm2_fwd_bf16",
    bwd: "lora_gemm2_bwd_bf16",
    tile_m: 128,
    tile_n: 128,
    threads: 256,
    smem: 4 * (128 * 40 + 128 * 40) * 2,
};

/// The `mma.sync` variants, oldest first.
pub const VARIANTS: [Variant; 2] = [V1, V2];

/// v3 (Hopper, sm_90a): wgmma fed by TMA, one producer and two consumer warpgroups, 128×256
/// tiles, a 4-stage ring of 48 KB. Arguments `(map X, map W, map S, map B, bias, res, pre, aux,
/// lds, la, lr, lp, lseed, y, M, N, K, R, scale, epilogue)` (`kernels::LoraGemm3Fwd`), the maps
/// from `maps`. The forward's kernel, and the backward's dX too, with Wᵀ (transposed by the
/// host) as the W operand.
pub mod hopper {
    use super::super::abi::{LaunchConfig, TileMap};

    /// The label in tables and reports, as `Variant::name`.
    pub const NAME: &str = "v3 wgmma+TMA 128x256 x4";
    /// The kernel's name in `kernels/lora_gemm.cu`.
    pub const KERNEL: &str = "lora_gemm3_fwd_bf16";
    /// Output rows per block.
    pub const TILE_M: usize = 128;
    /// Output columns per block.
    pub const TILE_N: usize = 256;
    const STAGES: u32 = 4;
    const STAGE_BYTES: u32 = ((TILE_M + TILE_N) * 64 * 2) as u32;
    /// Dynamic shared memory per launch, bytes: 4 stages of X and W k-tiles (64 columns of
    /// bf16, 48 KiB a stage), a full and an empty mbarrier per stage, and 1024 bytes to align
    /// the ring for the 128-byte swizzle. 197,696 bytes in all.
    pub const SMEM: u32 = STAGES * STAGE_BYTES + 2 * STAGES * 8 + 1024;

    /// The launch for an output of `m` rows × `n` columns: grid (⌈n / 256⌉, ⌈m / 128⌉), 384
    /// threads (three warpgroups), `SMEM` bytes of dynamic shared memory.
    pub fn config(m: usize, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid: (n.div_ceil(TILE_N) as u32, m.div_ceil(TILE_M) as u32, 1),
            block: (384, 1, 1),
            shared_mem_bytes: SMEM,
        }
    }

    /// Whether the shape fits TMA's rules (16-byte row strides) and the single LoRA k-step
    /// (the rank padded to 16).
    pub fn supports(k: usize, r: usize) -> bool {
        k.is_multiple_of(8) && k > 0 && matches!(r, 0 | 8 | 16)
    }

    /// The tile maps of X [m, k], W [n, k], S [m, r], B [n, r] (S, B: those of X, W when r = 0,
    /// never read then).
    pub fn maps(m: usize, n: usize, k: usize, r: usize) -> [TileMap; 4] {
        let map = |rows, cols, box_rows| TileMap {
            rows,
            cols,
            box_rows,
            box_cols: 64,
        };
        let (x, w) = (map(m, k, TILE_M), map(n, k, TILE_N));
        if r == 0 {
            [x, w, x, w]
        } else {
            [x, w, map(m, r, TILE_M), map(n, r, TILE_N)]
        }
    }
}
