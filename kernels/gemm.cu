// Plain batched matrix product for the CUDA tensor storage, C[b] = op(A[b])·op(B[b]) row-major,
// f32 accumulation: a SIMT tiled kernel (64×64 tiles, k-steps of 16, 256 threads × 4×4 outputs)
// so the storage is complete and runs in the simulator. The tensor-core fused LoRA GEMM (issue
// "CUDA backend II") replaces it on the hot paths.
//   A: [m, k] (trans_a: [k, m]); B: [k, n] (trans_b: [n, k]); stride_b = 0 shares one B.
//   grid (⌈n/64⌉, ⌈m/64⌉, batch), 256 threads.
#include "sd2_common.cuh"

namespace mm {
constexpr int kT = 64, kK = 16;
}

template <typename T>
__device__ void gemm_simt(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c,
                          int m, int n, int k, int trans_a, int trans_b, long long stride_a,
                          long long stride_b, long long stride_c) {
  __shared__ float As[mm::kK][mm::kT + 1];
  __shared__ float Bs[mm::kK][mm::kT + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int m0 = blockIdx.y * mm::kT, n0 = blockIdx.x * mm::kT;
  a += blockIdx.z * stride_a;
  b += blockIdx.z * stride_b;
  c += blockIdx.z * stride_c;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < k; k0 += mm::kK) {
    for (int e = tid; e < mm::kT * mm::kK; e += blockDim.x) {
      // A tile element (row i of C, step kk); B tile element (step kk, column j of C).
      const int i = e / mm::kK, kk = e % mm::kK;
      const int gi = m0 + i, gk = k0 + kk;
      float av = 0.0f;
      if (gi < m && gk < k) av = to_f32(trans_a ? a[(size_t)gk * m + gi] : a[(size_t)gi * k + gk]);
      As[kk][i] = av;
      const int j = e % mm::kT, kb = e / mm::kT;
      const int gj = n0 + j, gkb = k0 + kb;
      float bv = 0.0f;
      if (gj < n && gkb < k)
        bv = to_f32(trans_b ? b[(size_t)gj * k + gkb] : b[(size_t)gkb * n + gj]);
      Bs[kb][j] = bv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < mm::kK; ++kk) {
      float ar[4], br[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) ar[r] = As[kk][ty + 16 * r];
#pragma unroll
      for (int q = 0; q < 4; ++q) br[q] = Bs[kk][tx + 16 * q];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] += ar[r] * br[q];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int gi = m0 + ty + 16 * r, gj = n0 + tx + 16 * q;
      if (gi < m && gj < n) c[(size_t)gi * n + gj] = from_f32<T>(acc[r][q]);
    }
}

#define SD2_GEMM(T, SUF)                                                                       \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      gemm_simt_##SUF(const T* a, const T* b, T* c, int m, int n, int k, int trans_a,          \
                      int trans_b, long long stride_a, long long stride_b, long long stride_c) { \
    gemm_simt<T>(a, b, c, m, n, k, trans_a, trans_b, stride_a, stride_b, stride_c);            \
  }                                                                                            \
  SD2_REGISTER_KERNEL(gemm_simt_##SUF)

SD2_GEMM(float, f32)
SD2_GEMM(bf16, bf16)
