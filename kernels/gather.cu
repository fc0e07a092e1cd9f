// Row gathers and their deterministic scatter-add (token embeddings and their gradient), the
// patchify (im2col) of the ViT stem, and dtype casts.
#include "sd2_common.cuh"

// out[i, :] = table[ids[i], :]
template <typename T>
__device__ void index_rows(const T* __restrict__ table, const int64_t* __restrict__ ids,
                           T* __restrict__ out, int n, int cols) {
  const size_t total = (size_t)n * cols;
  for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (size_t)gridDim.x * blockDim.x) {
    const size_t i = e / cols, c = e % cols;
    out[e] = table[(size_t)ids[i] * cols + c];
  }
}

// out[ids[i], :] += src[i, :] (out zeroed by the caller). Each thread owns one column and walks
// the ids in order: no atomics, the same sums in the same order on every run. Each add is
// rounded to T (f32 for a fresh gradient; T when adding into one that already exists).
template <typename T>
__device__ void index_add_rows(const T* __restrict__ src, const int64_t* __restrict__ ids,
                               T* __restrict__ out, int n, int cols) {
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
    for (int i = 0; i < n; ++i) {
      T* o = out + (size_t)ids[i] * cols + c;
      *o = from_f32<T>(to_f32(*o) + to_f32(src[(size_t)i * cols + c]));
    }
}

// [B, C, H, W] → [B, (H/p)·(W/p), C·p·p] in (c, ky, kx) order (the Conv2d weight's); trailing
// pixels that do not fill a patch are dropped, as a stride-p convolution does.
template <typename T>
__device__ void patchify(const T* __restrict__ x, T* __restrict__ out, int b, int c, int h, int w,
                         int p) {
  const int gh = h / p, gw = w / p, k = c * p * p;
  const size_t total = (size_t)b * gh * gw * k;
  for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (size_t)gridDim.x * blockDim.x) {
    const int col = int(e % k);
    const size_t row = e / k;
    const int px = int(row % gw), py = int((row / gw) % gh), bi = int(row / ((size_t)gw * gh));
    const int ci = col / (p * p), ky = (col / p) % p, kx = col % p;
    out[e] = x[(((size_t)bi * c + ci) * h + (size_t)py * p + ky) * w + (size_t)px * p + kx];
  }
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y,
                                         long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16(x[i]);
}
SD2_REGISTER_KERNEL(cast_f32_bf16)

extern "C" __global__ void cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y,
                                         long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    y[i] = __bfloat162float(x[i]);
}
SD2_REGISTER_KERNEL(cast_bf16_f32)


#define SD2_GATHER(T, SUF)                                                                     \
  extern "C" __global__ void index_rows_##SUF(const T* table, const int64_t* ids, T* out,     \
                                              int n, int cols) {                               \
    index_rows<T>(table, ids, out, n, cols);                                                   \
  }                                                                                            \
  SD2_REGISTER_KERNEL(index_rows_##SUF)                                                        \
  extern "C" __global__ void index_add_rows_##SUF(const T* src, const int64_t* ids, T* out,   \
                                                  int n, int cols) {                           \
    index_add_rows<T>(src, ids, out, n, cols);                                                 \
  }                                                                                            \
  SD2_REGISTER_KERNEL(index_add_rows_##SUF)                                                    \
  extern "C" __global__ void patchify_##SUF(const T* x, T* out, int b, int c, int h, int w,    \
                                            int p) {                                           \
    patchify<T>(x, out, b, c, h, w, p);                                                        \
  }                                                                                            \
  SD2_REGISTER_KERNEL(patchify_##SUF)

SD2_GATHER(float, f32)
SD2_GATHER(bf16, bf16)

// ids (i64 or u32) → i64 for the index kernels, checked against [0, bound) on the device so
// the host never waits to check them: a bad id becomes 0 (never an illegal address) and the
// first one is recorded in err = [count, op, position, id, bound]; the host reports it at its
// next read from the device.
template <typename T>
__device__ void ids_checked(const T* __restrict__ ids, long long n, long long bound, int op,
                            int64_t* __restrict__ out, unsigned long long* __restrict__ err) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    long long v = (long long)ids[i];
    if (v < 0 || v >= bound) {
      if (atomicAdd(&err[0], 1ULL) == 0ULL) {
        err[1] = (unsigned long long)op;
        err[2] = (unsigned long long)i;
        err[3] = (unsigned long long)v;
        err[4] = (unsigned long long)bound;
      }
      v = 0;
    }
    out[i] = v;
  }
}
#define SD2_IDS_CHECKED(SUF, T)                                                                  \
  extern "C" __global__ void ids_checked_##SUF(const T* ids, long long n, long long bound,      \
                                               int op, int64_t* out, unsigned long long* err) { \
    ids_checked<T>(ids, n, bound, op, out, err);                                                 \
  }                                                                                              \
  SD2_REGISTER_KERNEL(ids_checked_##SUF)
SD2_IDS_CHECKED(i64, int64_t)
SD2_IDS_CHECKED(u32, uint32_t)
