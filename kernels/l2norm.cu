// Row-wise L2 normalization, y = x / max(‖x‖, eps), saving ‖x‖ (f32) for the backward:
// dx = (dy − y·⟨y, dy⟩) / ‖x‖, or dy / eps on the clamped branch. One block per row
// (grid-stride), block_sum for the two reductions.
#include "sd2_common.cuh"

template <typename T>
__device__ void l2norm_fwd(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ norm,
                           int rows, int cols, float eps) {
  __shared__ float scratch[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + (size_t)r * cols;
    float s = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
      float v = to_f32(xr[j]);
      s += v * v;
    }
    const float nr = sqrtf(block_sum(s, scratch));
    const float inv = 1.0f / fmaxf(nr, eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
      y[(size_t)r * cols + j] = from_f32<T>(to_f32(xr[j]) * inv);
    if (threadIdx.x == 0) norm[r] = nr;
  }
}

template <typename T>
__device__ void l2norm_bwd(const T* __restrict__ y, const float* __restrict__ norm,
                           const T* __restrict__ dy, T* __restrict__ dx, int rows, int cols,
                           float eps) {
  __shared__ float scratch[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + (size_t)r * cols;
    const T* dyr = dy + (size_t)r * cols;
    const float nr = norm[r];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dot += to_f32(yr[j]) * to_f32(dyr[j]);
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
      float g = nr > eps ? (to_f32(dyr[j]) - to_f32(yr[j]) * dot) / nr : to_f32(dyr[j]) / eps;
      dx[(size_t)r * cols + j] = from_f32<T>(g);
    }
  }
}

#define SD2_L2(T, SUF)                                                                        \
  extern "C" __global__ void l2norm_fwd_##SUF(const T* x, T* y, float* norm, int rows,       \
                                              int cols, float eps) {                          \
    l2norm_fwd<T>(x, y, norm, rows, cols, eps);                                               \
  }                                                                                           \
  SD2_REGISTER_KERNEL(l2norm_fwd_##SUF)                                                       \
  extern "C" __global__ void l2norm_bwd_##SUF(const T* y, const float* norm, const T* dy,    \
                                              T* dx, int rows, int cols, float eps) {         \
    l2norm_bwd<T>(y, norm, dy, dx, rows, cols, eps);                                          \
  }                                                                                           \
  SD2_REGISTER_KERNEL(l2norm_bwd_##SUF)

SD2_L2(float, f32)
SD2_L2(bf16, bf16)
