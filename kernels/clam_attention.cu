// Attention for short sequences held whole in one block's shared memory: CLAM's cross-layer
// attention (24 CLS tokens × 8 heads of 128 for ViT-L/14), and any q_len, kv_len ≤ 64 with
// head_dim ≤ 256. One block per (sample, head). Layout as the engine's attention op:
// q [B, Sq, H·D], k/v [B, Skv, H·D], out [B, Sq, H·D], lse [B, H, Sq] (f32). Causal: query i
// sees keys j ≤ i + (Skv − Sq).
// Dynamic shared memory (floats): forward (Sq + 2·Skv)·D + Sq·Skv; backward
// (2·Sq + 2·Skv)·D + 2·Sq·Skv — 49 KB in f32 for CLAM's backward, so the runtime raises the
// kernel's dynamic shared-memory limit above the 48 KB default.
#include "sd2_common.cuh"

template <typename T>
__device__ void load_head(const T* __restrict__ src, float* dst, int b, int h, int s, int heads,
                          int d) {
  const int width = heads * d;
  for (int e = threadIdx.x; e < s * d; e += blockDim.x) {
    const int i = e / d, c = e % d;
    dst[e] = to_f32(src[((size_t)b * s + i) * width + (size_t)h * d + c]);
  }
}

__device__ __forceinline__ bool masked(int i, int j, int sq, int skv, int causal) {
  return causal && j > i + (skv - sq);
}

template <typename T>
__device__ void clam_attention_fwd(const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, T* __restrict__ out,
                                   float* __restrict__ lse, int batch, int heads, int sq, int skv,
                                   int d, int causal, float scale) {
  float* Q = dynamic_smem<float>();
  float* K = Q + sq * d;
  float* V = K + skv * d;
  float* P = V + skv * d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int bh = blockIdx.x; bh < batch * heads; bh += gridDim.x) {
    const int b = bh / heads, h = bh % heads;
    load_head(q, Q, b, h, sq, heads, d);
    load_head(k, K, b, h, skv, heads, d);
    load_head(v, V, b, h, skv, heads, d);
    __syncthreads();
    for (int e = threadIdx.x; e < sq * skv; e += blockDim.x) {
      const int i = e / skv, j = e % skv;
      float s = 0.0f;
      for (int c = 0; c < d; ++c) s += Q[i * d + c] * K[j * d + c];
      P[e] = masked(i, j, sq, skv, causal) ? -INFINITY : s * scale;
    }
    __syncthreads();
    // Softmax: one warp per query row.
    for (int i = warp; i < sq; i += warps) {
      float m = -INFINITY;
      for (int j = lane; j < skv; j += 32) m = fmaxf(m, P[i * skv + j]);
      m = warp_max(m);
      float sum = 0.0f;
      for (int j = lane; j < skv; j += 32) sum += __expf(P[i * skv + j] - m);
      sum = warp_sum(sum);
      const float inv = 1.0f / sum;
      for (int j = lane; j < skv; j += 32) P[i * skv + j] = __expf(P[i * skv + j] - m) * inv;
      if (lane == 0) lse[((size_t)b * heads + h) * sq + i] = m + __logf(sum);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < sq * d; e += blockDim.x) {
      const int i = e / d, c = e % d;
      float o = 0.0f;
      for (int j = 0; j < skv; ++j) o += P[i * skv + j] * V[j * d + c];
      out[((size_t)b * sq + i) * heads * d + (size_t)h * d + c] = from_f32<T>(o);
    }
    __syncthreads();
  }
}

// P is recomputed from the saved lse; D_i = ⟨dO_i, O_i⟩ from global memory.
template <typename T>
__device__ void clam_attention_bwd(const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const T* __restrict__ o,
                                   const float* __restrict__ lse, const T* __restrict__ dout,
                                   T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv,
                                   int batch, int heads, int sq, int skv, int d, int causal,
                                   float scale) {
  float* Q = dynamic_smem<float>();
  float* K = Q + sq * d;
  float* V = K + skv * d;
  float* dO = V + skv * d;
  float* P = dO + sq * d;
  float* dS = P + sq * skv;
  const int width = heads * d;
  for (int bh = blockIdx.x; bh < batch * heads; bh += gridDim.x) {
    const int b = bh / heads, h = bh % heads;
    load_head(q, Q, b, h, sq, heads, d);
    load_head(k, K, b, h, skv, heads, d);
    load_head(v, V, b, h, skv, heads, d);
    load_head(dout, dO, b, h, sq, heads, d);
    __syncthreads();
    for (int e = threadIdx.x; e < sq * skv; e += blockDim.x) {
      const int i = e / skv, j = e % skv;
      float s = 0.0f, dp = 0.0f;
      for (int c = 0; c < d; ++c) {
        s += Q[i * d + c] * K[j * d + c];
        dp += dO[i * d + c] * V[j * d + c];
      }
      const float p = masked(i, j, sq, skv, causal)
                          ? 0.0f
                          : __expf(s * scale - lse[((size_t)b * heads + h) * sq + i]);
      P[e] = p;
      dS[e] = dp;  // dP for now
    }
    __syncthreads();
    for (int e = threadIdx.x; e < sq * skv; e += blockDim.x) {
      const int i = e / skv;
      float di = 0.0f;
      for (int c = 0; c < d; ++c)
        di += dO[i * d + c] * to_f32(o[((size_t)b * sq + i) * width + (size_t)h * d + c]);
      dS[e] = P[e] * (dS[e] - di);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < sq * d; e += blockDim.x) {
      const int i = e / d, c = e % d;
      float g = 0.0f;
      for (int j = 0; j < skv; ++j) g += dS[i * skv + j] * K[j * d + c];
      dq[((size_t)b * sq + i) * width + (size_t)h * d + c] = from_f32<T>(g * scale);
    }
    for (int e = threadIdx.x; e < skv * d; e += blockDim.x) {
      const int j = e / d, c = e % d;
      float gk = 0.0f, gv = 0.0f;
      for (int i = 0; i < sq; ++i) {
        gk += dS[i * skv + j] * Q[i * d + c];
        gv += P[i * skv + j] * dO[i * d + c];
      }
      dk[((size_t)b * skv + j) * width + (size_t)h * d + c] = from_f32<T>(gk * scale);
      dv[((size_t)b * skv + j) * width + (size_t)h * d + c] = from_f32<T>(gv);
    }
    __syncthreads();
  }
}

#define SD2_CLAM(T, SUF)                                                                       \
  extern "C" __global__ void clam_attention_fwd_##SUF(                                         \
      const T* q, const T* k, const T* v, T* out, float* lse, int batch, int heads, int sq,    \
      int skv, int d, int causal, float scale) {                                               \
    clam_attention_fwd<T>(q, k, v, out, lse, batch, heads, sq, skv, d, causal, scale);         \
  }                                                                                            \
  SD2_REGISTER_KERNEL(clam_attention_fwd_##SUF)                                                \
  extern "C" __global__ void clam_attention_bwd_##SUF(                                         \
      const T* q, const T* k, const T* v, const T* o, const float* lse, const T* dout, T* dq,  \
      T* dk, T* dv, int batch, int heads, int sq, int skv, int d, int causal, float scale) {   \
    clam_attention_bwd<T>(q, k, v, o, lse, dout, dq, dk, dv, batch, heads, sq, skv, d, causal, \
                          scale);                                                              \
  }                                                                                            \
  SD2_REGISTER_KERNEL(clam_attention_bwd_##SUF)

SD2_CLAM(float, f32)
SD2_CLAM(bf16, bf16)
