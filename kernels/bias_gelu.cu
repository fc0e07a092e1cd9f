// Bias + quick_gelu, CLIP's MLP activation: y = h·σ(1.702·h), h = x + b (b broadcast over
// rows). The backward recomputes h from x and b (nothing saved) and gives dx; db is the column
// sum of dx (per-block partials, then `column_sum_f32`, as in layernorm.cu).
#include "sd2_common.cuh"

__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + __expf(-z)); }

template <typename T>
__device__ void bias_quick_gelu_fwd(const T* __restrict__ x, const T* __restrict__ b,
                                    T* __restrict__ y, int rows, int n) {
  const size_t total = (size_t)rows * n;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    float h = to_f32(x[i]) + (b ? to_f32(b[i % n]) : 0.0f);
    y[i] = from_f32<T>(h * sigmoid_f(1.702f * h));
  }
}

// One block per group of rows; thread j-columns as in layernorm_bwd.
template <typename T>
__device__ void bias_quick_gelu_bwd(const T* __restrict__ x, const T* __restrict__ b,
                                    const T* __restrict__ dy, T* __restrict__ dx,
                                    float* __restrict__ db_part, int rows, int n) {
  float* dbp = db_part ? db_part + (size_t)blockIdx.x * n : nullptr;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float acc = 0.0f;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
      size_t i = (size_t)r * n + j;
      float h = to_f32(x[i]) + (b ? to_f32(b[j]) : 0.0f);
      float s = sigmoid_f(1.702f * h);
      float g = to_f32(dy[i]) * (s + 1.702f * h * s * (1.0f - s));
      dx[i] = from_f32<T>(g);
      acc += g;
    }
    if (dbp) dbp[j] = acc;
  }
}

#define SD2_BG(T, SUF)                                                                         \
  extern "C" __global__ void bias_quick_gelu_fwd_##SUF(const T* x, const T* b, T* y, int rows, \
                                                       int n) {                                \
    bias_quick_gelu_fwd<T>(x, b, y, rows, n);                                                  \
  }                                                                                            \
  SD2_REGISTER_KERNEL(bias_quick_gelu_fwd_##SUF)                                               \
  extern "C" __global__ void bias_quick_gelu_bwd_##SUF(const T* x, const T* b, const T* dy,    \
                                                       T* dx, float* db_part, int rows, int n) { \
    bias_quick_gelu_bwd<T>(x, b, dy, dx, db_part, rows, n);                                    \
  }                                                                                            \
  SD2_REGISTER_KERNEL(bias_quick_gelu_bwd_##SUF)

SD2_BG(float, f32)
SD2_BG(bf16, bf16)
