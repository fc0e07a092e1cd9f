// Elementwise and layout kernels behind the CUDA tensor storage: unary ops and their
// derivatives, affine, binary ops with numpy broadcasting, strided gathers (broadcast_to and
// permute), sum-to-shape reductions, 2-D copies. Shapes reach the kernels as up to 6 dims with
// per-operand element strides (0 on broadcast dims), in scalar arguments.
//
// The contiguous kernels (unary, unary_bwd, affine, binary_contig) move 16 bytes per load and
// store (8 bf16 or 4 f32) where every pointer is 16-byte aligned, with no index arithmetic in
// the loop, then finish the tail element by element; only binary with broadcast shapes walks
// dims and strides.
#include "sd2_common.cuh"

#define SD2_MAX_RANK 6

namespace ew {
// Unary op codes, as `backend::UnaryOp` (src/backend/cuda/storage.rs keeps them in step).
enum { NEG = 0, EXP = 1, LOG = 2, SQR = 3, SQRT = 4, QUICK_GELU = 5, SIGMOID = 6 };
enum { ADD = 0, SUB = 1, MUL = 2, DIV = 3 };

__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float apply(float x, int op) {
  switch (op) {
    case NEG: return -x;
    case EXP: return expf(x);
    case LOG: return logf(x);
    case SQR: return x * x;
    case SQRT: return sqrtf(x);
    case QUICK_GELU: return x * sigm(1.702f * x);
    default: return sigm(x);
  }
}

__device__ __forceinline__ float deriv(float x, float y, int op) {
  switch (op) {
    case NEG: return -1.0f;
    case EXP: return y;
    case LOG: return 1.0f / x;
    case SQR: return 2.0f * x;
    case SQRT: return 0.5f / y;
    case QUICK_GELU: {
      const float s = sigm(1.702f * x);
      return s + 1.702f * x * s * (1.0f - s);
    }
    default: return y * (1.0f - y);
  }
}

__device__ __forceinline__ float bin(float a, float b, int op) {
  switch (op) {
    case ADD: return a + b;
    case SUB: return a - b;
    case MUL: return a * b;
    default: return a / b;
  }
}


// Element offset of linear index i of a tensor with dims `d` under strides `s`.
__device__ __forceinline__ long long offset(long long i, int rank, const long long* d,
                                            const long long* s) {
  long long off = 0;
  for (int k = rank - 1; k >= 0; --k) {
    off += (i % d[k]) * s[k];
    i /= d[k];
  }
  return off;
}

#define SD2_GRID_STRIDE(i, n)                                                     \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ bool al16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;  // null counts as aligned
}
// 16 bytes through a uint4 register, elements out of it by memcpy (no type punning through
// pointers: the simulator's host compiler optimizes by strict aliasing).
template <typename T>
__device__ __forceinline__ void ld16(const T* __restrict__ p, float* v) {
  constexpr int V = 16 / sizeof(T);
  uint4 raw;
#ifdef SD2_SIM
  memcpy(&raw, p, 16);
#else
  raw = *reinterpret_cast<const uint4*>(p);
#endif
  T e[V];
  memcpy(e, &raw, 16);
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = to_f32(e[j]);
}
template <typename T>
__device__ __forceinline__ void st16(T* __restrict__ p, const float* v) {
  constexpr int V = 16 / sizeof(T);
  T e[V];
#pragma unroll
  for (int j = 0; j < V; ++j) e[j] = from_f32<T>(v[j]);
  uint4 raw;
  memcpy(&raw, e, 16);
#ifdef SD2_SIM
  memcpy(p, &raw, 16);
#else
  *reinterpret_cast<uint4*>(p) = raw;
#endif
}

// The contiguous pattern: `vec(c)` on 16-byte chunk c while every pointer allows it, then
// `one(i)` on the remaining elements.
template <typename T, typename Vec, typename One>
__device__ __forceinline__ void contiguous(long long n, bool aligned, Vec vec, One one) {
  constexpr int V = 16 / sizeof(T);
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long step = (long long)gridDim.x * blockDim.x;
  const long long nv = aligned ? n / V : 0;
  for (long long c = tid; c < nv; c += step) vec(c * V);
  for (long long i = nv * V + tid; i < n; i += step) one(i);
}

template <typename T>
__device__ void unary(const T* __restrict__ x, T* __restrict__ y, int op, long long n) {
  constexpr int V = 16 / sizeof(T);
  contiguous<T>(
      n, al16(x) && al16(y),
      [&](long long i) {
        float v[V];
        ld16(x + i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = apply(v[j], op);
        st16(y + i, v);
      },
      [&](long long i) { y[i] = from_f32<T>(apply(to_f32(x[i]), op)); });
}

// y may be null (ops whose derivative needs only x).
template <typename T>
__device__ void unary_bwd(const T* __restrict__ x, const T* __restrict__ y,
                          const T* __restrict__ dy, T* __restrict__ dx, int op, long long n) {
  constexpr int V = 16 / sizeof(T);
  contiguous<T>(
      n, al16(x) && al16(y) && al16(dy) && al16(dx),
      [&](long long i) {
        float xv[V], yv[V], g[V];
        ld16(x + i, xv);
        ld16(dy + i, g);
        if (y) {
          ld16(y + i, yv);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) yv[j] = 0.0f;
        }
#pragma unroll
        for (int j = 0; j < V; ++j) g[j] *= deriv(xv[j], yv[j], op);
        st16(dx + i, g);
      },
      [&](long long i) {
        const float yi = y ? to_f32(y[i]) : 0.0f;
        dx[i] = from_f32<T>(to_f32(dy[i]) * deriv(to_f32(x[i]), yi, op));
      });
}

template <typename T>
__device__ void affine(const T* __restrict__ x, T* __restrict__ y, float mul, float add,
                       long long n) {
  constexpr int V = 16 / sizeof(T);
  contiguous<T>(
      n, al16(x) && al16(y),
      [&](long long i) {
        float v[V];
        ld16(x + i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = v[j] * mul + add;
        st16(y + i, v);
      },
      [&](long long i) { y[i] = from_f32<T>(to_f32(x[i]) * mul + add); });
}

// out = a op b, all three of one shape. out may alias a (gradient accumulation in place): each
// chunk is read before the same thread writes it, so no __restrict__ here.
template <typename T>
__device__ void binary_contig(const T* a, const T* b, T* out, int op, long long n) {
  constexpr int V = 16 / sizeof(T);
  contiguous<T>(
      n, al16(a) && al16(b) && al16(out),
      [&](long long i) {
        float x[V], y[V];
        ld16(a + i, x);
        ld16(b + i, y);
#pragma unroll
        for (int j = 0; j < V; ++j) x[j] = bin(x[j], y[j], op);
        st16(out + i, x);
      },
      [&](long long i) { out[i] = from_f32<T>(bin(to_f32(a[i]), to_f32(b[i]), op)); });
}
}  // namespace ew

#define SD2_DIMS_PARAMS(p) long long p##0, long long p##1, long long p##2, long long p##3, \
                           long long p##4, long long p##5
#define SD2_DIMS_ARRAY(p) {p##0, p##1, p##2, p##3, p##4, p##5}

#define SD2_EW(T, SUF)                                                                     \
  extern "C" __global__ void unary_##SUF(const T* x, T* y, int op, long long n) {          \
    ew::unary<T>(x, y, op, n);                                                             \
  }                                                                                        \
  SD2_REGISTER_KERNEL(unary_##SUF)                                                         \
  extern "C" __global__ void unary_bwd_##SUF(const T* x, const T* y, const T* dy, T* dx,   \
                                             int op, long long n) {                        \
    ew::unary_bwd<T>(x, y, dy, dx, op, n);                                                 \
  }                                                                                        \
  SD2_REGISTER_KERNEL(unary_bwd_##SUF)                                                     \
  extern "C" __global__ void affine_##SUF(const T* x, T* y, float mul, float add,          \
                                          long long n) {                                   \
    ew::affine<T>(x, y, mul, add, n);                                                      \
  }                                                                                        \
  SD2_REGISTER_KERNEL(affine_##SUF)                                                        \
  extern "C" __global__ void binary_contig_##SUF(const T* a, const T* b, T* out, int op,   \
                                                 long long n) {                            \
    ew::binary_contig<T>(a, b, out, op, n);                                                \
  }                                                                                        \
  SD2_REGISTER_KERNEL(binary_contig_##SUF)                                                 \
  /* y = x · (*s): an upstream gradient that stays on the device (no host round trip). */   \
  extern "C" __global__ void scale_by_##SUF(const T* x, const float* s, T* y, long long n) {\
    const float f = *s;                                                                    \
    SD2_GRID_STRIDE(i, n) y[i] = from_f32<T>(to_f32(x[i]) * f);                            \
  }                                                                                        \
  SD2_REGISTER_KERNEL(scale_by_##SUF)                                                      \
  /* Inverted dropout: y = x / (1 − p) where uniform_at(seed, i) ≥ p, else 0. */            \
  extern "C" __global__ void dropout_##SUF(const T* x, T* y, long long n, float p,         \
                                           unsigned long long seed) {                      \
    const float keep = (float)(1.0 / (1.0 - (double)p)); /* the CPU's scale */                                                  \
    SD2_GRID_STRIDE(i, n)                                                                  \
    y[i] = from_f32<T>(dropout_uniform(seed, (unsigned long long)i) >= p ? to_f32(x[i]) * keep \
                                                                        : 0.0f);           \
  }                                                                                        \
  SD2_REGISTER_KERNEL(dropout_##SUF)                                                       \
  /* out[i] = a[offset_a(i)] op b[offset_b(i)] over out's dims; out may alias a (in place). */ \
  extern "C" __global__ void binary_##SUF(const T* a, const T* b, T* out, int op,          \
                                          long long n, int rank, SD2_DIMS_PARAMS(d),       \
                                          SD2_DIMS_PARAMS(sa), SD2_DIMS_PARAMS(sb)) {      \
    const long long dims[SD2_MAX_RANK] = SD2_DIMS_ARRAY(d);                                \
    const long long stra[SD2_MAX_RANK] = SD2_DIMS_ARRAY(sa);                               \
    const long long strb[SD2_MAX_RANK] = SD2_DIMS_ARRAY(sb);                               \
    SD2_GRID_STRIDE(i, n) {                                                                \
      const float x = to_f32(a[ew::offset(i, rank, dims, stra)]);                          \
      const float y = to_f32(b[ew::offset(i, rank, dims, strb)]);                          \
      out[i] = from_f32<T>(ew::bin(x, y, op));                                             \
    }                                                                                      \
  }                                                                                        \
  SD2_REGISTER_KERNEL(binary_##SUF)                                                        \
  /* dst[j] = Σ src over the reduced dims: `kd`/`ks` are dst's dims and their src strides, \
     `rd`/`rs` the reduced dims and strides. One block per dst element (grid-stride). */   \
  extern "C" __global__ void sum_to_##SUF(const T* src, T* dst, long long n_dst,           \
                                          long long n_red, int krank, SD2_DIMS_PARAMS(kd), \
                                          SD2_DIMS_PARAMS(ks), int rrank,                  \
                                          SD2_DIMS_PARAMS(rd), SD2_DIMS_PARAMS(rs)) {      \
    __shared__ float scratch[32];                                                          \
    const long long kdim[SD2_MAX_RANK] = SD2_DIMS_ARRAY(kd);                               \
    const long long kstr[SD2_MAX_RANK] = SD2_DIMS_ARRAY(ks);                               \
    const long long rdim[SD2_MAX_RANK] = SD2_DIMS_ARRAY(rd);                               \
    const long long rstr[SD2_MAX_RANK] = SD2_DIMS_ARRAY(rs);                               \
    for (long long j = blockIdx.x; j < n_dst; j += gridDim.x) {                            \
      const long long base = ew::offset(j, krank, kdim, kstr);                             \
      float s = 0.0f;                                                                      \
      for (long long r = threadIdx.x; r < n_red; r += blockDim.x)                          \
        s += to_f32(src[base + ew::offset(r, rrank, rdim, rstr)]);                         \
      s = block_sum(s, scratch);                                                           \
      if (threadIdx.x == 0) dst[j] = from_f32<T>(s);                                       \
    }                                                                                      \
  }                                                                                        \
  SD2_REGISTER_KERNEL(sum_to_##SUF)

SD2_EW(float, f32)
SD2_EW(bf16, bf16)

// Layout kernels move bytes, whatever the element type: one entry per element width.
#define SD2_LAYOUT(T, SUF)                                                                 \
  /* dst[i] = src[offset(i)] over dst's dims: broadcast_to (stride 0 on broadcast dims)    \
     and permute (src strides permuted). */                                                \
  extern "C" __global__ void gather_strided_##SUF(const T* src, T* dst, long long n,       \
                                                  int rank, SD2_DIMS_PARAMS(d),            \
                                                  SD2_DIMS_PARAMS(s)) {                    \
    const long long dims[SD2_MAX_RANK] = SD2_DIMS_ARRAY(d);                                \
    const long long str[SD2_MAX_RANK] = SD2_DIMS_ARRAY(s);                                 \
    SD2_GRID_STRIDE(i, n) dst[i] = src[ew::offset(i, rank, dims, str)];                    \
  }                                                                                        \
  SD2_REGISTER_KERNEL(gather_strided_##SUF)                                                \
  extern "C" __global__ void copy2d_##SUF(const T* src, T* dst, long long rows,            \
                                          long long cols, long long ss, long long ds,      \
                                          long long so, long long dof) {                   \
    SD2_GRID_STRIDE(i, rows * cols) {                                                      \
      const long long r = i / cols, c = i % cols;                                          \
      dst[dof + r * ds + c] = src[so + r * ss + c];                                        \
    }                                                                                      \
  }                                                                                        \
  SD2_REGISTER_KERNEL(copy2d_##SUF)

SD2_LAYOUT(unsigned short, b2)
SD2_LAYOUT(unsigned int, b4)
SD2_LAYOUT(unsigned long long, b8)
