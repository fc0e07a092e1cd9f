// Softmax cross-entropy over rows of logits z [rows, cols] against class ids (i64), in f32:
// loss_part[r] = (lse_r − z[r, label_r]) / rows (summed by `column_sum_f32`), lse saved; the
// backward gives dz = (softmax(z) − onehot)·dloss/rows. One warp per row: SD2's logits have 5
// columns (the type texts), CLIP-style ones a few thousand at most.
#include "sd2_common.cuh"

template <typename T>
__device__ void cross_entropy_fwd(const T* __restrict__ z, const int64_t* __restrict__ labels,
                                  float* __restrict__ loss_part, float* __restrict__ lse,
                                  int rows, int cols) {
  const int lane = threadIdx.x & 31;
  const int warps_total = gridDim.x * (blockDim.x >> 5);
  for (int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps_total) {
    const T* zr = z + (size_t)r * cols;
    float m = -INFINITY;
    for (int c = lane; c < cols; c += 32) m = fmaxf(m, to_f32(zr[c]));
    m = warp_max(m);
    float s = 0.0f;
    for (int c = lane; c < cols; c += 32) s += __expf(to_f32(zr[c]) - m);
    s = warp_sum(s);
    const float l = m + __logf(s);
    if (lane == 0) {
      lse[r] = l;
      loss_part[r] = (l - to_f32(zr[labels[r]])) / rows;
    }
  }
}

template <typename T>
__device__ void cross_entropy_bwd(const T* __restrict__ z, const int64_t* __restrict__ labels,
                                  const float* __restrict__ lse, const float* __restrict__ dloss,
                                  T* __restrict__ dz, int rows, int cols) {
  const float scale = *dloss / rows;
  const size_t total = (size_t)rows * cols;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    const int r = int(i / cols), c = int(i % cols);
    const float p = __expf(to_f32(z[i]) - lse[r]);
    dz[i] = from_f32<T>((p - (labels[r] == c ? 1.0f : 0.0f)) * scale);
  }
}

#define SD2_CE(T, SUF)                                                                         \
  extern "C" __global__ void cross_entropy_fwd_##SUF(const T* z, const int64_t* labels,       \
                                                     float* loss_part, float* lse, int rows,   \
                                                     int cols) {                               \
    cross_entropy_fwd<T>(z, labels, loss_part, lse, rows, cols);                               \
  }                                                                                            \
  SD2_REGISTER_KERNEL(cross_entropy_fwd_##SUF)                                                 \
  extern "C" __global__ void cross_entropy_bwd_##SUF(const T* z, const int64_t* labels,       \
                                                     const float* lse, const float* dloss,     \
                                                     T* dz, int rows, int cols) {              \
    cross_entropy_bwd<T>(z, labels, lse, dloss, dz, rows, cols);                               \
  }                                                                                            \
  SD2_REGISTER_KERNEL(cross_entropy_bwd_##SUF)

SD2_CE(float, f32)
SD2_CE(bf16, bf16)
