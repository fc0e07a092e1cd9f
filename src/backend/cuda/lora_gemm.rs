//! Launch geometry of `kernels/lora_gemm.cu`, in one place for the tests, the benchmark and the
//! storage: the LoRA-linear GEMM variants and their epilogue codes.
use super::abi::LaunchConfig;

/// Fused epilogue after `X·Wᵀ + s·S·Bᵀ` (the kernels' `epilogue` argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    None = 0,
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
    pub name: &'static str,
    /// `(x, w, bias, s_low, lb, res, y, M, N, K, R, scale, epilogue)`
    pub fwd: &'static str,
    /// `(x, w, s_low, lb, y, M, N, K, R, scale)`, depth-major B operands
    pub bwd: &'static str,
    pub tile_m: u32,
    pub tile_n: u32,
    pub threads: u32,
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
/// tiles, a 4-stage ring of 48 KB. Arguments `(map X, map W, map S, map B, bias, res, y, M, N,
/// K, R, scale, epilogue)`, the maps from [`hopper_maps`]; forward only.
pub mod hopper {
    use super::super::abi::{LaunchConfig, TileMap};

    pub const NAME: &str = "v3 wgmma+TMA 128x256 x4";
    pub const KERNEL: &str = "lora_gemm3_fwd_bf16";
    pub const TILE_M: usize = 128;
    pub const TILE_N: usize = 256;
    const STAGES: u32 = 4;
    const STAGE_BYTES: u32 = ((TILE_M + TILE_N) * 64 * 2) as u32;
    pub const SMEM: u32 = STAGES * STAGE_BYTES + 2 * STAGES * 8 + 1024;

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
