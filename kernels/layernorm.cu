// LayerNorm over the last dimension, optionally fused with the residual add that precedes it in
// every CLIP block: v = x + res; y = (v - mean)·rstd·γ + β. Saves mean and rstd (f32) for
// the backward, which recomputes x̂ from v. f32 statistics whatever the storage type.
//
// Variant 1 (this file): one block per row (grid-stride over rows), three passes over the row.
// Good enough for widths ≤ 4096; a register-resident single-pass variant is the next step.
#include "sd2_common.cuh"

template <typename T>
__device__ void layernorm_fwd(const T* __restrict__ x, const T* __restrict__ res,
                              const T* __restrict__ gamma, const T* __restrict__ beta,
                              T* __restrict__ sum_out, T* __restrict__ y, float* __restrict__ mean_out,
                              float* __restrict__ rstd_out, int rows, int n, float eps) {
  __shared__ float scratch[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + (size_t)r * n;
    const T* rr = res ? res + (size_t)r * n : nullptr;
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      float v = to_f32(xr[j]) + (rr ? to_f32(rr[j]) : 0.0f);
      if (sum_out) sum_out[(size_t)r * n + j] = from_f32<T>(v);
      s += v;
    }
    const float mean = block_sum(s, scratch) / n;
    float q = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      float d = to_f32(xr[j]) + (rr ? to_f32(rr[j]) : 0.0f) - mean;
      q += d * d;
    }
    const float rstd = rsqrtf(block_sum(q, scratch) / n + eps);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      float v = to_f32(xr[j]) + (rr ? to_f32(rr[j]) : 0.0f);
      y[(size_t)r * n + j] = from_f32<T>((v - mean) * rstd * to_f32(gamma[j]) + to_f32(beta[j]));
    }
    if (threadIdx.x == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  }
}

// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) + dsum, g = dy·γ; dsum (optional) is the gradient x
// already has from the residual path, added here instead of in a separate pass. Per-block
// partial sums of dy·x̂ and dy go to dgamma_part/dbeta_part [gridDim.x, n] (each thread owns its
// columns, so no atomics; both null when γ/β are frozen); `column_sum` reduces them in a fixed
// order (deterministic).
template <typename T>
__device__ void layernorm_bwd(const T* __restrict__ dy, const T* __restrict__ v,
                              const T* __restrict__ gamma, const float* __restrict__ mean,
                              const float* __restrict__ rstd, const T* __restrict__ dsum,
                              T* __restrict__ dx, float* __restrict__ dgamma_part,
                              float* __restrict__ dbeta_part, int rows, int n) {
  __shared__ float scratch[32];
  // Null partials: frozen γ/β, no dγ/dβ work (and the grid is not capped by the partials).
  const bool params = dgamma_part != nullptr;
  float* dg = params ? dgamma_part + (size_t)blockIdx.x * n : nullptr;
  float* db = params ? dbeta_part + (size_t)blockIdx.x * n : nullptr;
  if (params)
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      dg[j] = 0.0f;
      db[j] = 0.0f;
    }
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* dyr = dy + (size_t)r * n;
    const T* vr = v + (size_t)r * n;
    const float m = mean[r], rs = rstd[r];
    float a = 0.0f, b = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      float d = to_f32(dyr[j]);
      float xh = (to_f32(vr[j]) - m) * rs;
      float g = d * to_f32(gamma[j]);
      a += g;
      b += g * xh;
      if (params) {
        dg[j] += d * xh;
        db[j] += d;
      }
    }
    a = block_sum(a, scratch) / n;
    b = block_sum(b, scratch) / n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      float xh = (to_f32(vr[j]) - m) * rs;
      float g = to_f32(dyr[j]) * to_f32(gamma[j]);
      float out = rs * (g - a - xh * b) + (dsum ? to_f32(dsum[(size_t)r * n + j]) : 0.0f);
      dx[(size_t)r * n + j] = from_f32<T>(out);
    }
  }
}

// out[j] = Σ_p part[p, j] over `parts` rows of f32, in order; out f32 or rounded once to bf16
// (a gradient in its tensor's dtype, without a separate cast).
template <typename T>
__device__ void column_sum(const float* __restrict__ part, T* __restrict__ out, int parts,
                           int n) {
  int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float s = 0.0f;
  for (int p = 0; p < parts; ++p) s += part[(size_t)p * n + j];
  out[j] = from_f32<T>(s);
}
extern "C" __global__ void column_sum_f32(const float* part, float* out, int parts, int n) {
  column_sum<float>(part, out, parts, n);
}
SD2_REGISTER_KERNEL(column_sum_f32)
extern "C" __global__ void column_sum_bf16(const float* part, bf16* out, int parts, int n) {
  column_sum<bf16>(part, out, parts, n);
}
SD2_REGISTER_KERNEL(column_sum_bf16)

#define SD2_LN(T, SUF)                                                                            \
  extern "C" __global__ void layernorm_fwd_##SUF(const T* x, const T* res, const T* gamma,      \
                                                 const T* beta, T* sum_out, T* y, float* mean,   \
                                                 float* rstd, int rows, int n, float eps) {      \
    layernorm_fwd<T>(x, res, gamma, beta, sum_out, y, mean, rstd, rows, n, eps);                \
  }                                                                                               \
  SD2_REGISTER_KERNEL(layernorm_fwd_##SUF)                                                       \
  extern "C" __global__ void layernorm_bwd_##SUF(const T* dy, const T* v, const T* gamma,       \
                                                 const float* mean, const float* rstd,           \
                                                 const T* dsum, T* dx, float* dgamma_part,       \
                                                 float* dbeta_part, int rows, int n) {           \
    layernorm_bwd<T>(dy, v, gamma, mean, rstd, dsum, dx, dgamma_part, dbeta_part, rows, n);     \
  }                                                                                               \
  SD2_REGISTER_KERNEL(layernorm_bwd_##SUF)

SD2_LN(float, f32)
SD2_LN(bf16, bf16)
