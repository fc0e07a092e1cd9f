// The low-rank side of a LoRA-linear with dropout on its input, with the dropout mask applied
// in registers (never a materialized drop(x)): the mask is the counter hash of the element's
// index (dropout_uniform, as crate::rng::dropout_keep), so forward and backward agree bit for
// bit with the CPU's.
//   lora_down:    S[m, r] = Σ_k drop(x)[m, k] · A[r, k]           (the forward's S; up to three
//                 adapters of one input in one pass, each with its own mask)
//   lora_up_add:  dX[m, k] += drop'(Σ_r dS[m, r] · A[r, k])         (the branch's input gradient)
//   lora_da_part: part[chunk, r, k] = Σ_{m in chunk} dS[m, r] · drop(x)[m, k]
//                 (dA = Σ_chunk part, summed in order by column_sum_f32: deterministic)
//   lora_dsdb_part: one pass over dY for both of its skinny products,
//                 ds_part[tile, m, r] = s·Σ_{n in tile} dY[m, n] · B[n, r]   (dS = Σ_tile)
//                 db_part[chunk, n, r] = s·Σ_{m in chunk} dY[m, n] · S[m, r]  (dB = Σ_chunk)
// where drop(v) = v / (1 − p) if kept, else 0 (p = 0: no mask). Ranks up to kMaxRank; f32
// accumulation, one rounding at the store.
#include "sd2_common.cuh"

namespace lr {
constexpr int kMaxRank = 32;

// 1 / (1 − p) rounded once from double, as the CPU's F::from_f(1 / (1 − p)): the same scale.
__device__ __forceinline__ float inv_keep(float p) {
  return p > 0.0f ? (float)(1.0 / (1.0 - (double)p)) : 1.0f;
}

__device__ __forceinline__ float dropped(float v, float p, float keep, unsigned long long seed,
                                         unsigned long long idx) {
  if (p <= 0.0f) return v;
  return dropout_uniform(seed, idx) >= p ? v * keep : 0.0f;
}

// One warp per row of x (grid-stride over rows): lanes walk the row, each keeping r partial
// sums, then the warp reduces each (fixed order: deterministic). Up to three adapters on the
// same x at once (q, k and v read one LayerNorm output): r = groups · group; adapter g has its
// A ([group, k]: a, a_b, a_c), masks x with its own seed and writes its [m, group] S to s, s_b
// or s_c.
template <typename T>
__device__ void down(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ a_b,
                     const T* __restrict__ a_c, T* __restrict__ s, T* __restrict__ s_b,
                     T* __restrict__ s_c, int m, int k, int r, int group, float p,
                     unsigned long long seed, unsigned long long seed_b,
                     unsigned long long seed_c) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const float keep = inv_keep(p);
  const bool two = r > group, three = r > 2 * group;
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < m; row += gridDim.x * warps) {
    float acc[kMaxRank];
#pragma unroll
    for (int j = 0; j < kMaxRank; ++j) acc[j] = 0.0f;
    const size_t base = (size_t)row * k;
    for (int c = lane; c < k; c += 32) {
      const float raw = to_f32(x[base + c]);
      const float x0 = dropped(raw, p, keep, seed, base + c);
      const float x1 = two ? dropped(raw, p, keep, seed_b, base + c) : 0.0f;
      const float x2 = three ? dropped(raw, p, keep, seed_c, base + c) : 0.0f;
#pragma unroll
      for (int j = 0; j < kMaxRank; ++j)
        if (j < r) {
          const float xv = j < group ? x0 : (j < 2 * group ? x1 : x2);
          const T* ag = j < group ? a : (j < 2 * group ? a_b : a_c);
          const int jj = j < group ? j : (j < 2 * group ? j - group : j - 2 * group);
          acc[j] += xv * to_f32(ag[(size_t)jj * k + c]);
        }
    }
#pragma unroll
    for (int j = 0; j < kMaxRank; ++j) {
      if (j < r) {
        const float v = warp_sum(acc[j]);
        T* out = j < group ? s : (j < 2 * group ? s_b : s_c);
        const int jj = j < group ? j : (j < 2 * group ? j - group : j - 2 * group);
        if (lane == 0) out[(size_t)row * group + jj] = from_f32<T>(v);
      }
    }
  }
}

// One block per row of dX (grid-stride over rows), threads over its columns; the row's dS
// values are staged in shared memory once.
template <typename T>
__device__ void up_add(const T* __restrict__ ds, const T* __restrict__ a, T* __restrict__ dx,
                       int m, int k, int r, float p, unsigned long long seed) {
  __shared__ float dsr[kMaxRank];
  const float keep = inv_keep(p);
  for (int row = blockIdx.x; row < m; row += gridDim.x) {
    __syncthreads();  // the previous row's dS is consumed
    if (threadIdx.x < r) dsr[threadIdx.x] = to_f32(ds[(size_t)row * r + threadIdx.x]);
    __syncthreads();
    const size_t base = (size_t)row * k;
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
      float v = 0.0f;
      for (int j = 0; j < r; ++j) v += dsr[j] * to_f32(a[(size_t)j * k + c]);
      dx[base + c] = from_f32<T>(to_f32(dx[base + c]) + dropped(v, p, keep, seed, base + c));
    }
  }
}
// Blocks of 256 = 8 row slices × 32 columns over (column tile, row chunk): each thread keeps r
// sums for its column over its rows; the 8 slices are added in a fixed order in shared memory
// ([slice][j][column]: consecutive lanes, consecutive banks).
template <typename T>
__device__ void da_part(const T* __restrict__ ds, const T* __restrict__ x, float* __restrict__ part,
                        int m, int k, int r, int rows_per_chunk, float p,
                        unsigned long long seed) {
  __shared__ float red[8][kMaxRank][32];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + tx, chunk = blockIdx.y;
  const int m0 = chunk * rows_per_chunk, m1 = min(m, m0 + rows_per_chunk);
  const float keep = inv_keep(p);
  float acc[kMaxRank];
#pragma unroll
  for (int j = 0; j < kMaxRank; ++j) acc[j] = 0.0f;
  if (c < k) {
    for (int row = m0 + ty; row < m1; row += 8) {
      const size_t at = (size_t)row * k + c;
      const float xv = dropped(to_f32(x[at]), p, keep, seed, at);
#pragma unroll
      for (int j = 0; j < kMaxRank; ++j)
        if (j < r) acc[j] += to_f32(ds[(size_t)row * r + j]) * xv;
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxRank; ++j)
    if (j < r) red[ty][j][tx] = acc[j];
  __syncthreads();
  for (int j = ty; j < r; j += 8) {
    float s = 0.0f;
#pragma unroll
    for (int t = 0; t < 8; ++t) s += red[t][j][tx];
    if (c < k) part[((size_t)chunk * r + j) * k + c] = s;
  }
}

// Blocks of 256 threads over (256-column tile of dY, row chunk): each thread owns a column and
// walks the chunk's rows, keeping r sums of dY·S for dB; per row, the tile's dY·B sums for dS
// are reduced by warp shuffles, then over the 8 warps in shared memory (fixed orders:
// deterministic). Expects blockDim.x == 256.
template <typename T>
__device__ void dsdb_part(const T* __restrict__ dy, const T* __restrict__ b,
                          const T* __restrict__ s, float* __restrict__ ds_part,
                          float* __restrict__ db_part, int m, int n, int r, int rows_per_chunk,
                          float scale) {
  __shared__ float red[8][kMaxRank];
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = blockIdx.y, m0 = chunk * rows_per_chunk, m1 = min(m, m0 + rows_per_chunk);
  float bc[kMaxRank], acc[kMaxRank];
#pragma unroll
  for (int j = 0; j < kMaxRank; ++j) {
    bc[j] = (c < n && j < r) ? to_f32(b[(size_t)c * r + j]) : 0.0f;
    acc[j] = 0.0f;
  }
  for (int row = m0; row < m1; ++row) {
    const float d = c < n ? to_f32(dy[(size_t)row * n + c]) * scale : 0.0f;
#pragma unroll
    for (int j = 0; j < kMaxRank; ++j) {
      if (j < r) {
        acc[j] += d * to_f32(s[(size_t)row * r + j]);
        const float v = warp_sum(d * bc[j]);
        if (lane == 0) red[warp][j] = v;
      }
    }
    __syncthreads();
    if (threadIdx.x < r) {
      float t = 0.0f;
#pragma unroll
      for (int w = 0; w < 8; ++w) t += red[w][threadIdx.x];
      ds_part[((size_t)blockIdx.x * m + row) * r + threadIdx.x] = t;
    }
    __syncthreads();  // red is free for the next row
  }
  if (c < n) {
#pragma unroll
    for (int j = 0; j < kMaxRank; ++j)
      if (j < r) db_part[((size_t)chunk * n + c) * r + j] = acc[j];
  }
}
}  // namespace lr

#define SD2_LORA_LOWRANK(T, SUF)                                                                 \
  /* 2 blocks per SM: ≤ 128 registers (116, no spills) for 32 sums per thread */                 \
  extern "C" __global__ void __launch_bounds__(256, 2)                                           \
      lora_down_##SUF(const T* x, const T* a, const T* a_b, const T* a_c, T* s, T* s_b, T* s_c, \
                      int m, int k, int r, int group, float p, unsigned long long seed,          \
                      unsigned long long seed_b, unsigned long long seed_c) {                    \
    lr::down<T>(x, a, a_b, a_c, s, s_b, s_c, m, k, r, group, p, seed, seed_b, seed_c);           \
  }                                                                                              \
  SD2_REGISTER_KERNEL(lora_down_##SUF)                                                           \
  extern "C" __global__ void lora_up_add_##SUF(const T* ds, const T* a, T* dx, int m, int k,    \
                                               int r, float p, unsigned long long seed) {        \
    lr::up_add<T>(ds, a, dx, m, k, r, p, seed);                                                  \
  }                                                                                              \
  SD2_REGISTER_KERNEL(lora_up_add_##SUF)                                                         \
  extern "C" __global__ void lora_da_part_##SUF(const T* ds, const T* x, float* part, int m,     \
                                                int k, int r, int rows_per_chunk, float p,       \
                                                unsigned long long seed) {                       \
    lr::da_part<T>(ds, x, part, m, k, r, rows_per_chunk, p, seed);                               \
  }                                                                                              \
  SD2_REGISTER_KERNEL(lora_da_part_##SUF)                                                        \
  extern "C" __global__ void lora_dsdb_part_##SUF(const T* dy, const T* b, const T* s,          \
                                                  float* ds_part, float* db_part, int m, int n,  \
                                                  int r, int rows_per_chunk, float scale) {      \
    lr::dsdb_part<T>(dy, b, s, ds_part, db_part, m, n, r, rows_per_chunk, scale);                \
  }                                                                                              \
  SD2_REGISTER_KERNEL(lora_dsdb_part_##SUF)

SD2_LORA_LOWRANK(float, f32)
SD2_LORA_LOWRANK(bf16, bf16)
