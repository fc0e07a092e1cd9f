// Row softmax over the last dimension and its backward (dx = y·(dy − ⟨y, dy⟩)). One block per
// row (grid-stride), f32 math, max-subtracted.
#include "sd2_common.cuh"

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : -INFINITY;
  t = warp_max(t);
  __syncthreads();
  return t;
}

template <typename T>
__device__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ y, int rows, int cols) {
  __shared__ float scratch[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + (size_t)r * cols;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, to_f32(xr[j]));
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += expf(to_f32(xr[j]) - m);
    const float inv = 1.0f / block_sum(s, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
      y[(size_t)r * cols + j] = from_f32<T>(expf(to_f32(xr[j]) - m) * inv);
  }
}

template <typename T>
__device__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                            int rows, int cols) {
  __shared__ float scratch[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + (size_t)r * cols;
    const T* dyr = dy + (size_t)r * cols;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dot += to_f32(yr[j]) * to_f32(dyr[j]);
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
      dx[(size_t)r * cols + j] = from_f32<T>(to_f32(yr[j]) * (to_f32(dyr[j]) - dot));
  }
}

#define SD2_SOFTMAX(T, SUF)                                                                 \
  extern "C" __global__ void softmax_fwd_##SUF(const T* x, T* y, int rows, int cols) {      \
    softmax_fwd<T>(x, y, rows, cols);                                                       \
  }                                                                                         \
  SD2_REGISTER_KERNEL(softmax_fwd_##SUF)                                                    \
  extern "C" __global__ void softmax_bwd_##SUF(const T* y, const T* dy, T* dx, int rows,    \
                                               int cols) {                                  \
    softmax_bwd<T>(y, dy, dx, rows, cols);                                                  \
  }                                                                                         \
  SD2_REGISTER_KERNEL(softmax_bwd_##SUF)

SD2_SOFTMAX(float, f32)
SD2_SOFTMAX(bf16, bf16)
