// The LoRA branch's three gradients in one pass over dY and x, on tensor cores (mma.sync):
//   dS = s·dY·B [m, r]                  (complete: written once, rounded once)
//   dB = s·dYᵀ·S [n, r]                 (db_part [chunk, n, r] f32, summed by column_sum)
//   dA = dSᵀ·drop(x) [r, k]             (da_part [chunk, r, k] f32, summed by column_sum)
// with drop(x) the forward's dropout mask regenerated in shared memory (dropout_uniform of the
// element index, as lora_lowrank.cu; p = 0: none). One block of 8 warps per chunk of kRows
// rows: phase 1 streams the chunk's dY in 128×128 tiles (column tile outer, row tile inner), each
// tile feeding both products — dS (warp w: rows 16w.. of the row tile, over the tile's columns)
// and dB (warp w: columns 16w.. of the column tile, over the tile's rows) — so dS is whole when
// the pass ends; phase 2 streams the chunk's x the same way for dA from the rounded dS (the dS
// the dX GEMM reads). Tiles come by cp.async, two stages; a 16-byte chunk beyond m, n or k is
// zero-filled. Needs r = 8·kRT (kRT ≤ 4) and n, k multiples of 8 (16-byte rows).
#include "sd2_mma.cuh"

namespace lgr {
constexpr int kTile = 128;         // rows and columns of a dY or x tile
constexpr int kRows = 2 * kTile;   // rows per chunk (two row tiles)
constexpr int kPitch = kTile + 8;  // padded row: ldmatrix rows fall in distinct banks

__device__ __forceinline__ float inv_keep(float p) {
  return p > 0.0f ? (float)(1.0 / (1.0 - (double)p)) : 1.0f;
}

// Rows [row0, row0 + kTile) × columns [col0, col0 + kTile) of a [rows, cols] matrix into a
// padded tile: 2048 chunks of 16 bytes, 8 per thread (the thread later masks the same ones).
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, int rows, int cols,
                                          int row0, int col0) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int c = threadIdx.x + i * 256, r = c >> 4, cc = (c & 15) * 8;
    const int gr = row0 + r, gc = col0 + cc;
    const bool ok = gr < rows && gc < cols;
    cp_async_16(dst + r * kPitch + cc, ok ? src + (size_t)gr * cols + gc : src, ok);
  }
}

// `count` rows of a [rows, r] matrix from row0 (B's or S's rows: r·2 bytes each) into a dense
// [count, r] block.
template <int kRT>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, int rows, int row0,
                                          int count) {
  constexpr int kChunks = kRT;  // 16-byte chunks per row (r = 8·kRT)
  for (int c = threadIdx.x; c < count * kChunks; c += 256) {
    const int r = c / kChunks, gr = row0 + r;
    const bool ok = gr < rows;
    cp_async_16(dst + c * 8, ok ? src + ((size_t)gr * kChunks + c % kChunks) * 8 : src, ok);
  }
}

// The chunks a thread loaded, masked in place: drop(v) = v / (1 − p) if kept, else 0, rounded
// to bf16 (the tensor cores' operand).
__device__ __forceinline__ void mask_tile(bf16* t, int rows, int cols, int row0, int col0,
                                          float p, float keep, unsigned long long seed) {
#pragma unroll 1
  for (int i = 0; i < 8; ++i) {
    const int c = threadIdx.x + i * 256, r = c >> 4, cc = (c & 15) * 8;
    const int gr = row0 + r, gc = col0 + cc;
    if (gr >= rows || gc >= cols) continue;
    const unsigned long long base = (unsigned long long)gr * cols + gc;
    bf16* e = t + r * kPitch + cc;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float v = to_f32(e[j]);
      e[j] = from_f32<bf16>(dropout_uniform(seed, base + j) >= p ? v * keep : 0.0f);
    }
  }
}

// B fragments (m16n8k16 "col") of a dense [rows, r] block for two k-steps at once: rows
// k0..k0+31, columns 8·nt..: b[0..1] for rows k0.., b[2..3] for rows k0 + 16...
template <int kRT>
__device__ __forceinline__ void frag_b2(uint32_t (&b)[4], const bf16* blk, int k0, int nt) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(b, blk + (k0 + (lane & 7) + (lane >> 3) * 8) * (8 * kRT) + nt * 8);
}

template <int kRT>
__device__ void grads(const bf16* __restrict__ dy, const bf16* __restrict__ b,
                      const bf16* __restrict__ s, const bf16* __restrict__ x,
                      bf16* __restrict__ ds, float* __restrict__ db_part,
                      float* __restrict__ da_part, int m, int n, int k, float p,
                      unsigned long long seed, float scale) {
  constexpr int kR = 8 * kRT;
  bf16* smem = dynamic_smem<bf16>();
  // Stage st's tile and B tile (pointer arithmetic, not arrays: no local memory).
  auto tile_at = [&](int st) { return smem + st * (kTile * kPitch); };
  auto bt_at = [&](int st) { return smem + 2 * kTile * kPitch + st * (kTile * kR); };
  bf16* rows_blk = smem + 2 * kTile * kPitch + 2 * kTile * kR;  // S, then the rounded dS
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * kRows;
  const int nt1 = (n + kTile - 1) / kTile, nt2 = (k + kTile - 1) / kTile;
  const int total = 2 * (nt1 + nt2);  // tiles: phase 1's (column tile, row tile), then phase 2's
  const float keep = inv_keep(p);

  auto issue = [&](int i) {
    const int st = i & 1;
    if (i < 2 * nt1) {
      const int ct = i >> 1, rt = i & 1;
      load_tile(tile_at(st), dy, m, n, m0 + rt * kTile, ct * kTile);
      load_rows<kRT>(bt_at(st), b, n, ct * kTile, kTile);
    } else {
      const int j = i - 2 * nt1, ct = j >> 1, rt = j & 1;
      load_tile(tile_at(st), x, m, k, m0 + rt * kTile, ct * kTile);
    }
  };

  float dsacc[2][kRT][4], acc[kRT][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int j = 0; j < kRT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dsacc[a][j][e] = 0.0f;
#pragma unroll
  for (int j = 0; j < kRT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

  load_rows<kRT>(rows_blk, s, m, m0, kRows);
  issue(0);
  cp_async_commit();
  for (int i = 0; i < total; ++i) {
    if (i + 1 < total) {
      issue(i + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    const bool one = i < 2 * nt1;
    const int j = one ? i : i - 2 * nt1, ct = j >> 1, rt = j & 1;
    bf16* tile = tile_at(i & 1);
    if (!one && p > 0.0f)
      mask_tile(tile, m, k, m0 + rt * kTile, ct * kTile, p, keep, seed);
    __syncthreads();
    if (one) {
      // dS rows 16·warp.. of this row tile, over the tile's 128 columns (`a == rt` keeps the
      // accumulators' index static: registers, not local memory).
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        if (a != rt) continue;
#pragma unroll
        for (int kk = 0; kk < kTile; kk += 32) {
          uint32_t a0[4], a1[4];
          ldmatrix_x4(a0, tile + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + kk +
                              (lane >> 4) * 8);
          ldmatrix_x4(a1, tile + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + kk +
                              16 + (lane >> 4) * 8);
#pragma unroll
          for (int nt = 0; nt < kRT; ++nt) {
            uint32_t bq[4];
            frag_b2<kRT>(bq, bt_at(i & 1), kk, nt);
            const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
            mma_m16n8k16_bf16(dsacc[a][nt], a0, b0);
            mma_m16n8k16_bf16(dsacc[a][nt], a1, b1);
          }
        }
      }
    }
    // Phase 1's dB = dYᵀ·S and phase 2's dAᵀ = xᵀ·dS are one product: the tile transposed
    // (`ldmatrix.trans`) times the chunk's rows block; warp w owns the tile's columns 16w...
#pragma unroll
    for (int mk = 0; mk < kTile; mk += 32) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4_trans(a0, tile + (mk + (lane & 7) + (lane >> 4) * 8) * kPitch + warp * 16 +
                                ((lane >> 3) & 1) * 8);
      ldmatrix_x4_trans(a1, tile + (mk + 16 + (lane & 7) + (lane >> 4) * 8) * kPitch +
                                warp * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int nt = 0; nt < kRT; ++nt) {
        uint32_t bq[4];
        frag_b2<kRT>(bq, rows_blk, rt * kTile + mk, nt);
        const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
        mma_m16n8k16_bf16(acc[nt], a0, b0);
        mma_m16n8k16_bf16(acc[nt], a1, b1);
      }
    }
    __syncthreads();  // the stage is free for tile i + 2; S is free once phase 1 is done
    if (rt == 1) {
      // A column tile done: this warp's 16 rows of dB (phase 1) or of dAᵀ (phase 2).
      const int c0 = ct * kTile + warp * 16 + g;
      const int cols = one ? n : k;
#pragma unroll
      for (int nt = 0; nt < kRT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = c0 + (e >> 1) * 8, jr = nt * 8 + 2 * t + (e & 1);
          if (c < cols) {
            if (one)
              db_part[((size_t)blockIdx.x * n + c) * kR + jr] = acc[nt][e] * scale;
            else
              da_part[((size_t)blockIdx.x * kR + jr) * k + c] = acc[nt][e];
          }
          acc[nt][e] = 0.0f;
        }
    }
    if (i == 2 * nt1 - 1) {
      // dS is whole: write it, and keep its bf16 rounding (what the dX GEMM reads) for dA.
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int nt = 0; nt < kRT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int lr = a * kTile + warp * 16 + g + (e >> 1) * 8, jr = nt * 8 + 2 * t + (e & 1);
            const bf16 v = from_f32<bf16>(dsacc[a][nt][e] * scale);
            rows_blk[lr * kR + jr] = v;
            if (m0 + lr < m) ds[(size_t)(m0 + lr) * kR + jr] = v;
          }
      __syncthreads();
    }
  }
}
}  // namespace lgr

// Dynamic shared memory: two tiles, two B tiles and the chunk's S/dS rows
// ((2·128·136 + 2·128·r + 256·r)·2 bytes).
#define SD2_LORA_GRADS(RT)                                                                     \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      lora_grads_r##RT##_bf16(const bf16* dy, const bf16* b, const bf16* s, const bf16* x,     \
                              bf16* ds, float* db_part, float* da_part, int m, int n, int k,   \
                              float p, unsigned long long seed, float scale) {                 \
    lgr::grads<RT / 8>(dy, b, s, x, ds, db_part, da_part, m, n, k, p, seed, scale);            \
  }                                                                                            \
  SD2_REGISTER_KERNEL(lora_grads_r##RT##_bf16)

SD2_LORA_GRADS(8)
SD2_LORA_GRADS(16)
SD2_LORA_GRADS(32)
