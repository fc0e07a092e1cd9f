// Flash attention for the CLIP towers (head dim 64; vision seq 257 non-causal, text seq 77
// causal; any length): the n×n probabilities never reach global memory. Layout as the engine's
// attention op: q [B, Sq, H·D], k/v [B, Skv, H·D], out like q, lse [B, H, Sq] (f32, saved for
// the backward). Causal: query i sees keys j ≤ i + (Skv − Sq).
//
// The variants, side by side in this file (each validated against variant 1):
//   variant 1  CUDA cores in f32, one thread per query row (forward, dQ) or key row (dK/dV),
//              K/V (or Q/dO) tiles staged in shared memory, online softmax per key. Simple and
//              exact: the reference the others are checked against, and the f32 path.
//   variants 3, 4  forward on tensor cores (mma.sync bf16, head dim 64): 16-byte tile loads,
//              then (4) cp.async double buffering; see their section below.
//   backward tc2 / tc3  FlashAttention-2's backward on tensor cores (head dims 16/32/64, bf16,
//              no atomics), waiting for each tile (tc2) or double-buffered (tc3).
// Which one runs for a given dtype and shape is decided in src/backend/cuda/flash.rs.
// Variant 1's launches:
//   forward:  grid (⌈Sq/64⌉, B·H), 64 threads, smem 2·64·D floats (32 KB at D = 64)
//   delta:    D_i = ⟨dO_i, O_i⟩, one warp per row
//   dq:       grid (⌈Sq/32⌉, B·H), 32 threads, smem (2·32·(D+1) + 2·32·D) floats
//   dkdv:     grid (⌈Skv/32⌉, B·H), 32 threads, smem (2·32·(D+1) + 2·32·D + 2·32) floats
#include "sd2_common.cuh"

namespace fa {
constexpr int kBq = 64, kBk = 64;  // forward tiles
constexpr int kB = 32;             // backward tiles

template <typename T>
__device__ __forceinline__ const T* row(const T* base, int b, int s, int i, int heads, int h,
                                        int d) {
  return base + ((size_t)b * s + i) * heads * d + (size_t)h * d;
}

__device__ __forceinline__ bool visible(int i, int j, int sq, int skv, int causal) {
  return !causal || j <= i + (skv - sq);
}

// Rows [start, start + rows) of two [B, s, H·D] tensors' head h into shared memory as f32
// [rows][D], zero past the sequence end (the block cooperates).
template <typename T, int D>
__device__ __forceinline__ void load_tile2(const T* __restrict__ a, const T* __restrict__ c,
                                           float* as, float* cs, int b, int s, int start,
                                           int rows, int heads, int h) {
  for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int r = start + e / D, col = e % D;
    as[e] = r < s ? to_f32(row(a, b, s, r, heads, h, D)[col]) : 0.0f;
    cs[e] = r < s ? to_f32(row(c, b, s, r, heads, h, D)[col]) : 0.0f;
  }
}
}  // namespace fa

template <typename T, int D>
__device__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse,
                          int heads, int sq, int skv, int causal, float scale) {
  float* Ks = dynamic_smem<float>();
  float* Vs = Ks + fa::kBk * D;
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int i = blockIdx.x * fa::kBq + threadIdx.x;
  const bool valid = i < sq;
  float qr[D], acc[D];
  const T* qp = fa::row(q, b, sq, valid ? i : 0, heads, h, D);
#pragma unroll
  for (int c = 0; c < D; ++c) {
    qr[c] = valid ? to_f32(qp[c]) * scale : 0.0f;
    acc[c] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int kt = 0; kt < skv; kt += fa::kBk) {
    fa::load_tile2<T, D>(k, v, Ks, Vs, b, skv, kt, fa::kBk, heads, h);
    __syncthreads();
    const int n = min(fa::kBk, skv - kt);
    for (int jj = 0; jj < n; ++jj) {
      if (!valid || !fa::visible(i, kt + jj, sq, skv, causal)) continue;
      float s = 0.0f;
#pragma unroll
      for (int c = 0; c < D; ++c) s += qr[c] * Ks[jj * D + c];
      const float mn = fmaxf(m, s);
      const float corr = __expf(m - mn), p = __expf(s - mn);
      l = l * corr + p;
#pragma unroll
      for (int c = 0; c < D; ++c) acc[c] = acc[c] * corr + p * Vs[jj * D + c];
      m = mn;
    }
    __syncthreads();
  }
  if (valid) {
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // a row that sees no key: O = 0
    T* op = const_cast<T*>(fa::row(out, b, sq, i, heads, h, D));
#pragma unroll
    for (int c = 0; c < D; ++c) op[c] = from_f32<T>(acc[c] * inv);
    lse[(size_t)bh * sq + i] = m + __logf(l);
  }
}

// delta[b, h, i] = ⟨dO_i, O_i⟩ (f32). One warp per (b, h, i); grid-stride.
template <typename T>
__device__ void flash_delta(const T* __restrict__ o, const T* __restrict__ dout,
                            float* __restrict__ delta, int batch, int heads, int sq, int d) {
  const int lane = threadIdx.x & 31;
  const long long rows = (long long)batch * heads * sq;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  for (long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    const int i = int(r % sq), bh = int(r / sq), b = bh / heads, h = bh % heads;
    const T* op = fa::row(o, b, sq, i, heads, h, d);
    const T* dp = fa::row(dout, b, sq, i, heads, h, d);
    float s = 0.0f;
    for (int c = lane; c < d; c += 32) s += to_f32(op[c]) * to_f32(dp[c]);
    s = warp_sum(s);
    if (lane == 0) delta[r] = s;
  }
}

// dQ_i = scale Σ_j P_ij (dP_ij − D_i) K_j, P recomputed from lse.
template <typename T, int D>
__device__ void flash_dq(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const float* __restrict__ lse,
                         const float* __restrict__ delta, const T* __restrict__ dout,
                         T* __restrict__ dq, int heads, int sq, int skv, int causal,
                         float scale) {
  float* Qs = dynamic_smem<float>();            // [kB][D + 1], own rows
  float* dOs = Qs + fa::kB * (D + 1);           // [kB][D + 1]
  float* Ks = dOs + fa::kB * (D + 1);           // [kB][D]
  float* Vs = Ks + fa::kB * D;                  // [kB][D]
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int i = blockIdx.x * fa::kB + threadIdx.x;
  const bool valid = i < sq;
  float* qi = Qs + threadIdx.x * (D + 1);
  float* doi = dOs + threadIdx.x * (D + 1);
  const T* qp = fa::row(q, b, sq, valid ? i : 0, heads, h, D);
  const T* dp = fa::row(dout, b, sq, valid ? i : 0, heads, h, D);
  for (int c = 0; c < D; ++c) {
    qi[c] = valid ? to_f32(qp[c]) : 0.0f;
    doi[c] = valid ? to_f32(dp[c]) : 0.0f;
  }
  const float li = valid ? lse[(size_t)bh * sq + i] : 0.0f;
  const float di = valid ? delta[(size_t)bh * sq + i] : 0.0f;
  float acc[D];
#pragma unroll
  for (int c = 0; c < D; ++c) acc[c] = 0.0f;
  for (int kt = 0; kt < skv; kt += fa::kB) {
    __syncthreads();
    fa::load_tile2<T, D>(k, v, Ks, Vs, b, skv, kt, fa::kB, heads, h);
    __syncthreads();
    const int n = min(fa::kB, skv - kt);
    for (int jj = 0; jj < n; ++jj) {
      if (!valid || !fa::visible(i, kt + jj, sq, skv, causal)) continue;
      float s = 0.0f, dpv = 0.0f;
      for (int c = 0; c < D; ++c) {
        s += qi[c] * Ks[jj * D + c];
        dpv += doi[c] * Vs[jj * D + c];
      }
      const float ds = __expf(s * scale - li) * (dpv - di);
#pragma unroll
      for (int c = 0; c < D; ++c) acc[c] += ds * Ks[jj * D + c];
    }
  }
  if (valid) {
    T* out = const_cast<T*>(fa::row(dq, b, sq, i, heads, h, D));
#pragma unroll
    for (int c = 0; c < D; ++c) out[c] = from_f32<T>(acc[c] * scale);
  }
}

// dV_j = Σ_i P_ij dO_i;  dK_j = scale Σ_i P_ij (dP_ij − D_i) Q_i.
template <typename T, int D>
__device__ void flash_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const float* __restrict__ lse,
                           const float* __restrict__ delta, const T* __restrict__ dout,
                           T* __restrict__ dk, T* __restrict__ dv, int heads, int sq, int skv,
                           int causal, float scale) {
  float* Ksm = dynamic_smem<float>();           // [kB][D + 1], own rows
  float* Vsm = Ksm + fa::kB * (D + 1);          // [kB][D + 1]
  float* Qs = Vsm + fa::kB * (D + 1);           // [kB][D]
  float* dOs = Qs + fa::kB * D;                 // [kB][D]
  float* Ls = dOs + fa::kB * D;                 // [kB] lse
  float* Ds = Ls + fa::kB;                      // [kB] delta
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int j = blockIdx.x * fa::kB + threadIdx.x;
  const bool valid = j < skv;
  float* kj = Ksm + threadIdx.x * (D + 1);
  float* vj = Vsm + threadIdx.x * (D + 1);
  const T* kp = fa::row(k, b, skv, valid ? j : 0, heads, h, D);
  const T* vp = fa::row(v, b, skv, valid ? j : 0, heads, h, D);
  for (int c = 0; c < D; ++c) {
    kj[c] = valid ? to_f32(kp[c]) : 0.0f;
    vj[c] = valid ? to_f32(vp[c]) : 0.0f;
  }
  float gk[D], gv[D];
#pragma unroll
  for (int c = 0; c < D; ++c) {
    gk[c] = 0.0f;
    gv[c] = 0.0f;
  }
  for (int qt = 0; qt < sq; qt += fa::kB) {
    __syncthreads();
    fa::load_tile2<T, D>(q, dout, Qs, dOs, b, sq, qt, fa::kB, heads, h);
    for (int ii = threadIdx.x; ii < fa::kB; ii += blockDim.x) {
      const int i = qt + ii;
      Ls[ii] = i < sq ? lse[(size_t)bh * sq + i] : 0.0f;
      Ds[ii] = i < sq ? delta[(size_t)bh * sq + i] : 0.0f;
    }
    __syncthreads();
    const int n = min(fa::kB, sq - qt);
    for (int ii = 0; ii < n; ++ii) {
      if (!valid || !fa::visible(qt + ii, j, sq, skv, causal)) continue;
      float s = 0.0f, dpv = 0.0f;
      for (int c = 0; c < D; ++c) {
        s += Qs[ii * D + c] * kj[c];
        dpv += dOs[ii * D + c] * vj[c];
      }
      const float p = __expf(s * scale - Ls[ii]);
      const float ds = p * (dpv - Ds[ii]);
#pragma unroll
      for (int c = 0; c < D; ++c) {
        gv[c] += p * dOs[ii * D + c];
        gk[c] += ds * Qs[ii * D + c];
      }
    }
  }
  if (valid) {
    T* ko = const_cast<T*>(fa::row(dk, b, skv, j, heads, h, D));
    T* vo = const_cast<T*>(fa::row(dv, b, skv, j, heads, h, D));
#pragma unroll
    for (int c = 0; c < D; ++c) {
      ko[c] = from_f32<T>(gk[c] * scale);
      vo[c] = from_f32<T>(gv[c]);
    }
  }
}

#define SD2_FLASH(T, SUF, D)                                                                   \
  extern "C" __global__ void __launch_bounds__(64) flash_fwd_d##D##_##SUF(                     \
      const T* q, const T* k, const T* v, T* out, float* lse, int heads, int sq, int skv,      \
      int causal, float scale) {                                                               \
    flash_fwd<T, D>(q, k, v, out, lse, heads, sq, skv, causal, scale);                         \
  }                                                                                            \
  SD2_REGISTER_KERNEL(flash_fwd_d##D##_##SUF)                                                  \
  extern "C" __global__ void __launch_bounds__(32) flash_dq_d##D##_##SUF(                      \
      const T* q, const T* k, const T* v, const float* lse, const float* delta,                \
      const T* dout, T* dq, int heads, int sq, int skv, int causal, float scale) {             \
    flash_dq<T, D>(q, k, v, lse, delta, dout, dq, heads, sq, skv, causal, scale);              \
  }                                                                                            \
  SD2_REGISTER_KERNEL(flash_dq_d##D##_##SUF)                                                   \
  extern "C" __global__ void __launch_bounds__(32) flash_dkdv_d##D##_##SUF(                    \
      const T* q, const T* k, const T* v, const float* lse, const float* delta,                \
      const T* dout, T* dk, T* dv, int heads, int sq, int skv, int causal, float scale) {      \
    flash_dkdv<T, D>(q, k, v, lse, delta, dout, dk, dv, heads, sq, skv, causal, scale);        \
  }                                                                                            \
  SD2_REGISTER_KERNEL(flash_dkdv_d##D##_##SUF)

#define SD2_FLASH_DELTA(T, SUF)                                                                \
  extern "C" __global__ void flash_delta_##SUF(const T* o, const T* dout, float* delta,        \
                                               int batch, int heads, int sq, int d) {          \
    flash_delta<T>(o, dout, delta, batch, heads, sq, d);                                       \
  }                                                                                            \
  SD2_REGISTER_KERNEL(flash_delta_##SUF)

SD2_FLASH(float, f32, 64)
SD2_FLASH(bf16, bf16, 64)
// Smaller heads (test-sized and tiny models).
SD2_FLASH(float, f32, 16)
SD2_FLASH(bf16, bf16, 16)
SD2_FLASH(float, f32, 32)
SD2_FLASH(bf16, bf16, 32)
SD2_FLASH_DELTA(float, f32)
SD2_FLASH_DELTA(bf16, bf16)

// ---------------------------------------------------------------------------------------------
// Forward on tensor cores (mma.sync m16n8k16 bf16, f32 accumulate), head dim 64, bf16: the
// shared pieces of variants 3 and 4. (Variant 2, the first of them, staged tiles with 4-byte
// loads; variant 3 replaced it and it was removed — its H200 numbers are in BENCHMARKS.md.)
// FlashAttention-2's split: a block of 4 warps takes 64 query rows, 16 per warp, and walks the
// keys in tiles of 64 staged in shared memory (rows padded by 16 bytes). S = QKᵀ stays in
// registers; its accumulator fragments are exactly the A fragments of P for P·V. P is
// rounded to bf16 for the second product (as FlashAttention does); the softmax statistics and
// O accumulate in f32. Same layout, lse and causal rule as variant 1, validated against it.
//   grid (⌈Sq/64⌉, B·H), 128 threads, static shared memory.
#include "sd2_mma.cuh"

namespace fa2 {
constexpr int kRows = 64, kKeys = 64, kD = 64, kPad = 8;

__device__ __forceinline__ uint32_t load_pair(const bf16* base, int b, int s, int i, int heads,
                                              int h, int col) {
  if (i >= s) return 0u;
  return *reinterpret_cast<const uint32_t*>(fa::row(base, b, s, i, heads, h, kD) + col);
}
}  // namespace fa2


// ---------------------------------------------------------------------------------------------
// Variants 3 and 4 share everything but the tile staging: the Q fragments, one key tile's work
// for a warp's 16 rows (S = QKᵀ with ldmatrix, base-2 online softmax, O += P·V with
// ldmatrix.trans), and the normalised store.
namespace fa2 {
typedef bf16 Tile[kKeys][kD + kPad];

__device__ __forceinline__ void load_q(uint32_t (&qa)[4][4], const bf16* __restrict__ q, int b,
                                       int sq, const int (&rows)[2], int heads, int h, int t) {
#pragma unroll
  for (int kc = 0; kc < 4; ++kc)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int col = kc * 16 + half * 8 + 2 * t;
      qa[kc][half * 2 + 0] = load_pair(q, b, sq, rows[0], heads, h, col);
      qa[kc][half * 2 + 1] = load_pair(q, b, sq, rows[1], heads, h, col);
    }
}

__device__ __forceinline__ void tile_step(const Tile& Ks, const Tile& Vs,
                                          const uint32_t (&qa)[4][4], float (&o)[8][4],
                                          float (&m)[2], float (&l)[2], const int (&rows)[2],
                                          int k0, int sq, int skv, int causal, float scale2) {
  const int lane = threadIdx.x & 31, t = lane & 3;
  float s[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) s[j][i] = 0.0f;
#pragma unroll
    for (int kc2 = 0; kc2 < 2; ++kc2) {
      uint32_t kb[4];
      ldmatrix_x4(kb, &Ks[j * 8 + (lane & 7)][kc2 * 32 + (lane >> 3) * 8]);
      const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
      mma_m16n8k16_bf16(s[j], qa[2 * kc2], b0);
      mma_m16n8k16_bf16(s[j], qa[2 * kc2 + 1], b1);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = k0 + j * 8 + 2 * t + c;
        const bool ok = key < skv && fa::visible(rows[r], key, sq, skv, causal);
        const float x = ok ? s[j][r * 2 + c] * scale2 : -INFINITY;
        s[j][r * 2 + c] = x;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[r], mx);
    // All keys so far masked: nothing to add, nothing to rescale.
    const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m[r] - m_new);
    l[r] *= alpha;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      o[j][r * 2] *= alpha;
      o[j][r * 2 + 1] *= alpha;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float p = m_new == -INFINITY ? 0.0f : exp2f(s[j][r * 2 + c] - m_new);
        s[j][r * 2 + c] = p;
        l[r] += p;
      }
    }
    m[r] = m_new;
  }
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) {
    const uint32_t pa[4] = {pack_bf16x2(s[2 * kc][0], s[2 * kc][1]),
                            pack_bf16x2(s[2 * kc][2], s[2 * kc][3]),
                            pack_bf16x2(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                            pack_bf16x2(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
    for (int jd2 = 0; jd2 < 4; ++jd2) {
      uint32_t vb[4];
      const int mi = lane >> 3;
      ldmatrix_x4_trans(vb, &Vs[kc * 16 + (mi & 1) * 8 + (lane & 7)][jd2 * 16 + (mi >> 1) * 8]);
      const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
      mma_m16n8k16_bf16(o[2 * jd2], pa, b0);
      mma_m16n8k16_bf16(o[2 * jd2 + 1], pa, b1);
    }
  }
}

// O = acc / l (bf16) and lse = m·ln2 + ln l for the warp's two rows per thread (m in log2 units).
__device__ __forceinline__ void store_rows(bf16* __restrict__ out, float* __restrict__ lse,
                                           float (&o)[8][4], const float (&m)[2], float (&l)[2],
                                           const int (&rows)[2], int b, int h, int heads,
                                           int sq, int bh) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int i = rows[r];
    if (i >= sq) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    bf16* orow = out + ((size_t)b * sq + i) * heads * kD + (size_t)h * kD;
#pragma unroll
    for (int jd = 0; jd < 8; ++jd)
      *reinterpret_cast<uint32_t*>(orow + jd * 8 + 2 * t) =
          pack_bf16x2(o[jd][r * 2] * inv, o[jd][r * 2 + 1] * inv);
    if (t == 0) lse[(size_t)bh * sq + i] = m[r] * 0.6931471805599453f + logf(l[r]);
  }
}
}  // namespace fa2

// Common prologue of variants 3 and 4: block coordinates, the warp's rows, Q fragments, state.
#define SD2_FA2_PROLOGUE                                                                      \
  using namespace fa2;                                                                        \
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;                                  \
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;        \
  const int row0 = blockIdx.x * kRows + warp * 16;                                            \
  const int rows[2] = {row0 + g, row0 + g + 8};                                               \
  const float scale2 = scale * 1.4426950408889634f; /* scores in log2 units */                \
  uint32_t qa[4][4];                                                                          \
  load_q(qa, q, b, sq, rows, heads, h, t);                                                    \
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};                                   \
  float o[8][4];                                                                              \
  _Pragma("unroll") for (int j = 0; j < 8; ++j) _Pragma("unroll") for (int i = 0; i < 4; ++i) \
      o[j][i] = 0.0f;                                                                         \
  /* Keys past the last one any row of this block may see are skipped. */                     \
  const int kv_end =                                                                          \
      causal ? min(skv, int(blockIdx.x) * kRows + kRows - 1 + (skv - sq) + 1) : skv;

// ---------------------------------------------------------------------------------------------
// Variant 3: variant 2 with the tile traffic rebuilt — K and V staged with 16-byte loads, both
// kept [key][d] (no scalar transpose of V), B fragments fetched four at a time with ldmatrix
// (ldmatrix.trans for V), and the softmax in base 2 with the scale folded in (one FFMA + ex2 per
// score). Same geometry, layout and results (within bf16 rounding) as variant 2.
extern "C" __global__ void __launch_bounds__(128)
    flash_fwd_tc3_d64_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k,
                           const bf16* __restrict__ v, bf16* __restrict__ out,
                           float* __restrict__ lse, int heads, int sq, int skv, int causal,
                           float scale) {
  SD2_FA2_PROLOGUE
  __shared__ __align__(16) Tile Ks, Vs;
  for (int k0 = 0; k0 < kv_end; k0 += kKeys) {
    __syncthreads();  // the previous tile is consumed
    for (int e = threadIdx.x; e < kKeys * kD / 8; e += blockDim.x) {
      const int key = e / (kD / 8), c = (e % (kD / 8)) * 8;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (k0 + key < skv) {
        kv = *reinterpret_cast<const uint4*>(fa::row(k, b, skv, k0 + key, heads, h, kD) + c);
        vv = *reinterpret_cast<const uint4*>(fa::row(v, b, skv, k0 + key, heads, h, kD) + c);
      }
      *reinterpret_cast<uint4*>(&Ks[key][c]) = kv;
      *reinterpret_cast<uint4*>(&Vs[key][c]) = vv;
    }
    __syncthreads();
    tile_step(Ks, Vs, qa, o, m, l, rows, k0, sq, skv, causal, scale2);
  }
  store_rows(out, lse, o, m, l, rows, b, h, heads, sq, bh);
}
SD2_REGISTER_KERNEL(flash_fwd_tc3_d64_bf16)

// ---------------------------------------------------------------------------------------------
// Variant 4: variant 3 with the K/V tiles double-buffered through cp.async, so the next tile's
// loads are in flight while the tensor cores work on this one (36 KB static shared memory;
// bounds (128, 2): with the default ptxas capped it at 128 registers and spilled).
extern "C" __global__ void __launch_bounds__(128, 2)
    flash_fwd_tc4_d64_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k,
                           const bf16* __restrict__ v, bf16* __restrict__ out,
                           float* __restrict__ lse, int heads, int sq, int skv, int causal,
                           float scale) {
  SD2_FA2_PROLOGUE
  __shared__ __align__(16) Tile Ks[2], Vs[2];
  // Tile `it` goes to stage it % 2; keys past skv are zero-filled (nothing read).
  auto stage_tile = [&](int st, int k0) {
    for (int e = threadIdx.x; e < kKeys * kD / 8; e += blockDim.x) {
      const int key = e / (kD / 8), c = (e % (kD / 8)) * 8;
      const bool ok = k0 + key < skv;
      const int kr = ok ? k0 + key : 0;
      cp_async_16(&Ks[st][key][c], fa::row(k, b, skv, kr, heads, h, kD) + c, ok);
      cp_async_16(&Vs[st][key][c], fa::row(v, b, skv, kr, heads, h, kD) + c, ok);
    }
  };
  const int tiles = (kv_end + kKeys - 1) / kKeys;
  if (tiles > 0) stage_tile(0, 0);
  cp_async_commit();
  for (int it = 0; it < tiles; ++it) {
    const int st = it & 1, k0 = it * kKeys;
    // The other stage was last read in iteration it − 1, which ended at a barrier.
    if (it + 1 < tiles) stage_tile(st ^ 1, k0 + kKeys);
    cp_async_commit();
    cp_async_wait<1>();  // all but the newest group: tile `it` has landed
    __syncthreads();
    tile_step(Ks[st], Vs[st], qa, o, m, l, rows, k0, sq, skv, causal, scale2);
    __syncthreads();  // stage `st` is refilled in iteration it + 1
  }
  store_rows(out, lse, o, m, l, rows, b, h, heads, sq, bh);
}
SD2_REGISTER_KERNEL(flash_fwd_tc4_d64_bf16)

// ---------------------------------------------------------------------------------------------
// Backward on tensor cores (FlashAttention-2's algorithm, mma.sync m16n8k16 bf16, f32
// accumulate), head dims 16/32/64, bf16 storage. Deterministic: no atomics. Two kernels:
//   dq:   blocks own 64 query rows (4 warps × 16) and stream K/V tiles of 64 keys;
//         dQ = scale·dS·K accumulated in registers. Also computes D_i = ⟨dO_i, O_i⟩ for its rows
//         from the dO fragments it holds anyway, and writes it for the dkdv kernel (the separate
//         delta pass of variant 1 is folded in).
//   dkdv: blocks own 64 keys (4 warps × 16) and stream Q/dO tiles of 64 queries;
//         the warp computes Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ directly (keys as the MMA's rows), so
//         dV += Pᵀ·dO and dK += scale·dSᵀ·Q take Pᵀ and dSᵀ straight from the accumulators.
// dQ's recomputation of S and dP (two products more than an atomic dQ) is the price of results
// that do not depend on scheduling. P and dS are rounded to bf16 before they multiply (as
// FlashAttention does); the softmax uses the forward's lse, in base 2. kStages = 2
// double-buffers the streamed tiles with cp.async; kStages = 1 waits for each tile.
//   grid (⌈len/64⌉, B·H), 128 threads, static shared memory (≤ 38 KB at D = 64).
namespace fab {
constexpr int kRows = 64, kPad = 8;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
using Tile = bf16[kRows][D + kPad];

// A fragments of rows `rows` (the warp's 16 rows, two per thread) of a [B, s, H·D] tensor, head h.
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[D / 16][4], const bf16* __restrict__ x,
                                       int b, int s, const int (&rows)[2], int heads, int h,
                                       int t) {
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int col = kc * 16 + half * 8 + 2 * t;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        a[kc][half * 2 + r] = 0u;
        if (rows[r] < s)
          a[kc][half * 2 + r] = *reinterpret_cast<const uint32_t*>(
              fa::row(x, b, s, rows[r], heads, h, D) + col);
      }
    }
}

// c[8][4] (16 × 64) += A (16 × D) · Tᵀ for a tile T [64][D] (rows of T are the n index).
template <int D>
__device__ __forceinline__ void mma_abt(float (&c)[8][4], const uint32_t (&a)[D / 16][4],
                                        const Tile<D>& T) {
  const int lane = threadIdx.x & 31;
  if constexpr (D >= 32) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int kc2 = 0; kc2 < D / 32; ++kc2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, &T[j * 8 + (lane & 7)][kc2 * 32 + (lane >> 3) * 8]);
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_m16n8k16_bf16(c[j], a[2 * kc2], b0);
        mma_m16n8k16_bf16(c[j], a[2 * kc2 + 1], b1);
      }
  } else {
    // D = 16: one ldmatrix.x4 covers two n-groups of 8 rows × the 16 columns.
#pragma unroll
    for (int j2 = 0; j2 < 4; ++j2) {
      uint32_t kb[4];
      ldmatrix_x4(kb, &T[j2 * 16 + ((lane >> 4) & 1) * 8 + (lane & 7)][((lane >> 3) & 1) * 8]);
      const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
      mma_m16n8k16_bf16(c[2 * j2], a[0], b0);
      mma_m16n8k16_bf16(c[2 * j2 + 1], a[0], b1);
    }
  }
}

// c[D/8][4] (16 × D) += P (16 × 64, the f32 accumulators p[8][4], rounded to bf16) · T [64][D].
template <int D>
__device__ __forceinline__ void mma_pt(float (&c)[D / 8][4], const float (&p)[8][4],
                                       const Tile<D>& T) {
  const int lane = threadIdx.x & 31, mi = lane >> 3;
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) {
    const uint32_t pa[4] = {pack_bf16x2(p[2 * kc][0], p[2 * kc][1]),
                            pack_bf16x2(p[2 * kc][2], p[2 * kc][3]),
                            pack_bf16x2(p[2 * kc + 1][0], p[2 * kc + 1][1]),
                            pack_bf16x2(p[2 * kc + 1][2], p[2 * kc + 1][3])};
#pragma unroll
    for (int jd2 = 0; jd2 < D / 16; ++jd2) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, &T[kc * 16 + (mi & 1) * 8 + (lane & 7)][jd2 * 16 + (mi >> 1) * 8]);
      const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
      mma_m16n8k16_bf16(c[2 * jd2], pa, b0);
      mma_m16n8k16_bf16(c[2 * jd2 + 1], pa, b1);
    }
  }
}

// Rows [r0, r0 + 64) of two [B, s, H·D] tensors' head h into tiles (cp.async, zero past s).
template <int D>
__device__ __forceinline__ void stage2(Tile<D>& A, Tile<D>& C, const bf16* __restrict__ a,
                                       const bf16* __restrict__ c, int b, int s, int r0,
                                       int heads, int h) {
  for (int e = threadIdx.x; e < kRows * D / 8; e += blockDim.x) {
    const int r = e / (D / 8), col = (e % (D / 8)) * 8;
    const bool ok = r0 + r < s;
    const int rr = ok ? r0 + r : 0;
    cp_async_16(&A[r][col], fa::row(a, b, s, rr, heads, h, D) + col, ok);
    cp_async_16(&C[r][col], fa::row(c, b, s, rr, heads, h, D) + col, ok);
  }
}

// Stores acc · mul (16 × D accumulators) to rows `rows` of a [B, s, H·D] tensor, head h.
template <int D>
__device__ __forceinline__ void store_acc(bf16* __restrict__ y, const float (&acc)[D / 8][4],
                                          float mul, int b, int s, const int (&rows)[2],
                                          int heads, int h, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= s) continue;
    bf16* yr = y + ((size_t)b * s + rows[r]) * heads * D + (size_t)h * D;
#pragma unroll
    for (int jd = 0; jd < D / 8; ++jd)
      *reinterpret_cast<uint32_t*>(yr + jd * 8 + 2 * t) =
          pack_bf16x2(acc[jd][r * 2] * mul, acc[jd][r * 2 + 1] * mul);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&x)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) x[j][i] = 0.0f;
}
}  // namespace fab

template <int D, int kStages>
__device__ void flash_bwd_dq_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                const bf16* __restrict__ v, const bf16* __restrict__ o,
                                const float* __restrict__ lse, const bf16* __restrict__ dout,
                                float* __restrict__ delta, bf16* __restrict__ dq, int heads,
                                int sq, int skv, int causal, float scale) {
  using namespace fab;
  __shared__ __align__(16) Tile<D> Ks[kStages], Vs[kStages];
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int row0 = blockIdx.x * kRows + warp * 16;
  const int rows[2] = {row0 + g, row0 + g + 8};
  const float scale2 = scale * kLog2e;
  uint32_t qa[D / 16][4], da[D / 16][4], oa[D / 16][4];
  load_a<D>(qa, q, b, sq, rows, heads, h, t);
  load_a<D>(da, dout, b, sq, rows, heads, h, t);
  load_a<D>(oa, o, b, sq, rows, heads, h, t);
  // D_i from the fragments: each thread holds D/4 of its two rows' columns.
  float di[2] = {0.0f, 0.0f}, li[2];
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const uint32_t x = oa[kc][reg], y = da[kc][reg];
      di[reg & 1] += bf16x2_lo(x) * bf16x2_lo(y) + bf16x2_hi(x) * bf16x2_hi(y);
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    di[r] += __shfl_xor_sync(0xffffffffu, di[r], 1);
    di[r] += __shfl_xor_sync(0xffffffffu, di[r], 2);
    li[r] = rows[r] < sq ? lse[(size_t)bh * sq + rows[r]] * kLog2e : 0.0f;
    if (t == 0 && rows[r] < sq) delta[(size_t)bh * sq + rows[r]] = di[r];
  }
  float acc[D / 8][4];
  zero(acc);
  const int kv_end =
      causal ? min(skv, int(blockIdx.x) * kRows + kRows - 1 + (skv - sq) + 1) : skv;
  const int tiles = kv_end > 0 ? (kv_end + kRows - 1) / kRows : 0;
  if (kStages == 2 && tiles > 0) stage2<D>(Ks[0], Vs[0], k, v, b, skv, 0, heads, h);
  cp_async_commit();
  for (int it = 0; it < tiles; ++it) {
    const int st = kStages == 2 ? it & 1 : 0, k0 = it * kRows;
    if constexpr (kStages == 2) {
      // The other stage was last read in iteration it − 1, which ended at a barrier.
      if (it + 1 < tiles) stage2<D>(Ks[st ^ 1], Vs[st ^ 1], k, v, b, skv, k0 + kRows, heads, h);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      stage2<D>(Ks[0], Vs[0], k, v, b, skv, k0, heads, h);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
    float s[8][4], dp[8][4];
    zero(s);
    zero(dp);
    mma_abt<D>(s, qa, Ks[st]);
    mma_abt<D>(dp, da, Vs[st]);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = k0 + j * 8 + 2 * t + c;
          const bool ok = key < skv && rows[r] < sq && fa::visible(rows[r], key, sq, skv, causal);
          // exp2 unconditionally, then select: a predicated exp2 compiles to two MUFU paths.
          // Selected after the product, so a masked pair adds nothing even where D_i is not
          // finite.
          const float e = exp2f(s[j][r * 2 + c] * scale2 - li[r]);
          s[j][r * 2 + c] = ok ? e * (dp[j][r * 2 + c] - di[r]) : 0.0f;  // dS
        }
    mma_pt<D>(acc, s, Ks[st]);
    __syncthreads();  // this stage is refilled next
  }
  store_acc<D>(dq, acc, scale, b, sq, rows, heads, h, t);
}

template <int D, int kStages>
__device__ void flash_bwd_dkdv_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                  const bf16* __restrict__ v, const float* __restrict__ lse,
                                  const float* __restrict__ delta, const bf16* __restrict__ dout,
                                  bf16* __restrict__ dk, bf16* __restrict__ dv, int heads,
                                  int sq, int skv, int causal, float scale) {
  using namespace fab;
  __shared__ __align__(16) Tile<D> Qs[kStages], dOs[kStages];
  __shared__ float Ls[kStages][kRows], Ds[kStages][kRows];
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int key0 = blockIdx.x * kRows;
  const int keys[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
  const float scale2 = scale * kLog2e;
  uint32_t ka[D / 16][4], va[D / 16][4];
  load_a<D>(ka, k, b, skv, keys, heads, h, t);
  load_a<D>(va, v, b, skv, keys, heads, h, t);
  float gk[D / 8][4], gv[D / 8][4];
  zero(gk);
  zero(gv);
  // Queries before the first that sees this block's first key are skipped (causal).
  const int q_begin = causal ? max(0, key0 - (skv - sq)) / kRows * kRows : 0;
  const int tiles = q_begin < sq ? (sq - q_begin + kRows - 1) / kRows : 0;
  auto stage = [&](int st, int q0) {
    stage2<D>(Qs[st], dOs[st], q, dout, b, sq, q0, heads, h);
    for (int i = threadIdx.x; i < kRows; i += blockDim.x) {
      const bool ok = q0 + i < sq;
      Ls[st][i] = ok ? lse[(size_t)bh * sq + q0 + i] * kLog2e : 0.0f;
      Ds[st][i] = ok ? delta[(size_t)bh * sq + q0 + i] : 0.0f;
    }
  };
  if (kStages == 2 && tiles > 0) stage(0, q_begin);
  cp_async_commit();
  for (int it = 0; it < tiles; ++it) {
    const int st = kStages == 2 ? it & 1 : 0, q0 = q_begin + it * kRows;
    if constexpr (kStages == 2) {
      if (it + 1 < tiles) stage(st ^ 1, q0 + kRows);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      stage(0, q0);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
    // Sᵀ, then Pᵀ in place (rows = the warp's keys, columns = the tile's queries); dV first,
    // so that dPᵀ's accumulators are live only after it (fewer registers at the peak).
    float s[8][4];
    zero(s);
    mma_abt<D>(s, ka, Qs[st]);
    uint32_t vis = 0u;  // bit (j·4 + c·2 + r): the pair is visible (reused for dSᵀ below)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int iq = j * 8 + 2 * t + c, i = q0 + iq;
        const float l2 = Ls[st][iq];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const bool ok = keys[r] < skv && i < sq && fa::visible(i, keys[r], sq, skv, causal);
          vis |= uint32_t(ok) << (j * 4 + c * 2 + r);
          const float e = exp2f(s[j][r * 2 + c] * scale2 - l2);
          s[j][r * 2 + c] = ok ? e : 0.0f;
        }
      }
    mma_pt<D>(gv, s, dOs[st]);
    float dp[8][4];
    zero(dp);
    mma_abt<D>(dp, va, dOs[st]);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float dd = Ds[st][j * 8 + 2 * t + c];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          // Selected after the product: a masked pair adds nothing even where D_i is not
          // finite (a query that sees no key).
          const bool ok = (vis >> (j * 4 + c * 2 + r)) & 1u;
          dp[j][r * 2 + c] = ok ? s[j][r * 2 + c] * (dp[j][r * 2 + c] - dd) : 0.0f;
        }
      }
    mma_pt<D>(gk, dp, Qs[st]);  // dSᵀ·Q
    __syncthreads();  // this stage is refilled next
  }
  store_acc<D>(dk, gk, scale, b, skv, keys, heads, h, t);
  store_acc<D>(dv, gv, 1.0f, b, skv, keys, heads, h, t);
}

// Backward variant 2 (kStages 1) and 3 (kStages 2).
#define SD2_FLASH_BWD_TC(V, STAGES, D)                                                          \
  extern "C" __global__ void __launch_bounds__(128) flash_bwd_dq_tc##V##_d##D##_bf16(           \
      const bf16* q, const bf16* k, const bf16* v, const bf16* o, const float* lse,            \
      const bf16* dout, float* delta, bf16* dq, int heads, int sq, int skv, int causal,        \
      float scale) {                                                                           \
    flash_bwd_dq_tc<D, STAGES>(q, k, v, o, lse, dout, delta, dq, heads, sq, skv, causal,       \
                               scale);                                                         \
  }                                                                                            \
  SD2_REGISTER_KERNEL(flash_bwd_dq_tc##V##_d##D##_bf16)                                        \
  extern "C" __global__ void __launch_bounds__(128) flash_bwd_dkdv_tc##V##_d##D##_bf16(         \
      const bf16* q, const bf16* k, const bf16* v, const float* lse, const float* delta,       \
      const bf16* dout, bf16* dk, bf16* dv, int heads, int sq, int skv, int causal,            \
      float scale) {                                                                           \
    flash_bwd_dkdv_tc<D, STAGES>(q, k, v, lse, delta, dout, dk, dv, heads, sq, skv, causal,    \
                                 scale);                                                       \
  }                                                                                            \
  SD2_REGISTER_KERNEL(flash_bwd_dkdv_tc##V##_d##D##_bf16)

SD2_FLASH_BWD_TC(2, 1, 64)
SD2_FLASH_BWD_TC(3, 2, 64)
SD2_FLASH_BWD_TC(2, 1, 32)
SD2_FLASH_BWD_TC(3, 2, 32)
SD2_FLASH_BWD_TC(2, 1, 16)
SD2_FLASH_BWD_TC(3, 2, 16)
