// SD2's sigmoid contrastive loss (SigLIP) and its gradients in one pass, from the
// L2-normalized embeddings f [rows, dim] and d [cols, dim] and the scalars t, b:
//   x_ij = t·⟨f_i, d_j⟩ + b,  z_ij = +1 if j = i + offset else −1,
//   L = inv_n Σ_ij softplus(−z_ij x_ij),  g_ij = ∂L/∂x_ij = −z_ij σ(−z_ij x_ij) · inv_n,
//   ∂L/∂f_i = t Σ_j g_ij d_j,  ∂L/∂t = Σ_ij g_ij ⟨f_i, d_j⟩,  ∂L/∂b = Σ_ij g_ij.
// The logits are recomputed tile by tile and never stored: no n×n matrix in global memory.
// The gradients are computed with an upstream gradient of 1 (the loss is linear in it, so the
// caller scales them in the backward). ∂L/∂d comes from the same kernel with f and d swapped
// and the offset negated (the problem is symmetric under (f, i) ↔ (d, j)). One process has
// rows = cols = n, offset 0, inv_n = 1/n; with negatives gathered over the ranks, d holds every
// rank's descriptions and this rank's positives start at `offset`.
//
// Variant 1: one block per row i; warp w takes columns j ≡ w (mod warps); lanes split dim.
// Dynamic shared memory: (1 + warps)·dim floats (f_i, then one gradient accumulator per warp).
// Per-row partials of L, ∂L/∂t, ∂L/∂b are reduced by `column_sum_f32` (deterministic).
#include "sd2_common.cuh"

__device__ __forceinline__ float softplus_f(float x) {
  // log(1 + e^x) without overflow.
  return x > 0.0f ? x + log1pf(__expf(-x)) : log1pf(__expf(x));
}

template <typename T>
__device__ void sigmoid_loss_rows(const T* __restrict__ f, const T* __restrict__ d,
                                  const float* __restrict__ t_ptr,
                                  const float* __restrict__ b_ptr, T* __restrict__ grad,
                                  float* __restrict__ loss_part, float* __restrict__ dt_part,
                                  float* __restrict__ db_part, int rows, int cols, int dim,
                                  int offset, float inv_n) {
  float* fi = dynamic_smem<float>();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float* acc = fi + dim + (size_t)warp * dim;
  const float t = *t_ptr, b = *b_ptr;
  for (int i = blockIdx.x; i < rows; i += gridDim.x) {
    for (int k = threadIdx.x; k < dim; k += blockDim.x) fi[k] = to_f32(f[(size_t)i * dim + k]);
    for (int k = lane; k < dim; k += 32) acc[k] = 0.0f;
    __syncthreads();
    float l = 0.0f, dt = 0.0f, db = 0.0f;
    for (int j = warp; j < cols; j += warps) {
      const T* dj = d + (size_t)j * dim;
      float s = 0.0f;
      for (int k = lane; k < dim; k += 32) s += fi[k] * to_f32(dj[k]);
      s = warp_sum(s);
      const float z = j == i + offset ? 1.0f : -1.0f;
      const float x = t * s + b;
      // σ(−z x) = 1 / (1 + e^{z x}) saturates to 0 or 1 without NaN.
      const float g = -z / (1.0f + __expf(z * x)) * inv_n;
      l += softplus_f(-z * x) * inv_n;
      dt += g * s;
      db += g;
      for (int k = lane; k < dim; k += 32) acc[k] += t * g * to_f32(dj[k]);
    }
    __syncthreads();
    // Gradient row: the warps' accumulators summed in warp order.
    for (int k = threadIdx.x; k < dim; k += blockDim.x) {
      float v = 0.0f;
      for (int w = 0; w < warps; ++w) v += fi[dim + (size_t)w * dim + k];
      grad[(size_t)i * dim + k] = from_f32<T>(v);
    }
    // Every lane of a warp holds the same l/dt/db; lane 0 of each warp publishes.
    __shared__ float part[3][32];
    if (lane == 0) {
      part[0][warp] = l;
      part[1][warp] = dt;
      part[2][warp] = db;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float a = 0.0f, c = 0.0f, e = 0.0f;
      for (int w = 0; w < warps; ++w) {
        a += part[0][w];
        c += part[1][w];
        e += part[2][w];
      }
      loss_part[i] = a;
      dt_part[i] = c;
      db_part[i] = e;
    }
    __syncthreads();
  }
}

#define SD2_SIGLIP(T, SUF)                                                                      \
  extern "C" __global__ void sigmoid_loss_rows_##SUF(const T* f, const T* d, const float* t,   \
                                                     const float* b, T* grad, float* loss_part, \
                                                     float* dt_part, float* db_part, int rows,  \
                                                     int cols, int dim, int offset,             \
                                                     float inv_n) {                             \
    sigmoid_loss_rows<T>(f, d, t, b, grad, loss_part, dt_part, db_part, rows, cols, dim, offset, \
                         inv_n);                                                                \
  }                                                                                             \
  SD2_REGISTER_KERNEL(sigmoid_loss_rows_##SUF)

SD2_SIGLIP(float, f32)
SD2_SIGLIP(bf16, bf16)
