// The LoRA-linear GEMM: Y = X·Wᵀ (+ b) + s·S·Bᵀ with S = drop(X)·Aᵀ computed beforehand
// (M × r), bf16 in and out, f32 accumulate. The LoRA term enters the main loop as extra K: the
// block first accumulates S·Bᵀ over r (zero-padded to the k-step), scales the accumulator by s,
// then continues with X·Wᵀ over K — so Y is written once, X read once, and the sum is the same
// f32 expression the CPU reference evaluates. Epilogues CLIP needs: bias, bias + quick_gelu
// (fc1), bias + residual (out_proj, fc2).
//
// The backward's dX = dY·W + s·(dY·B)·A runs through the same body with depth-major B operands
// (`lora_gemm_bwd_bf16`, ldmatrix.trans); dA, dB stay small GEMMs (no dW: W is frozen).
//
// Variant 1 (this file): mma.sync m16n8k16 through kernels/include/sd2_mma.cuh (sm_80+, runs in
// the simulator): 64×64 block tile, 4 warps of 32×32, k-steps of 32 staged in shared memory
// (16-byte loads when the rows allow, element loads with zero fill at every tail), fragments by
// ldmatrix. Any M, N, K, r. W is [N, K] and B is [N, r], row-major (nn.Linear's layout).
//   grid (⌈N/64⌉, ⌈M/64⌉), 128 threads, 15 KB static shared memory.
#include "sd2_mma.cuh"

namespace lg {
constexpr int kBM = 64, kBN = 64, kBK = 32, kPad = 8;
enum { EPI_NONE = 0, EPI_BIAS = 1, EPI_BIAS_GELU = 2, EPI_BIAS_RESIDUAL = 3 };

// Rows [r0, r0 + 64) × columns [k0, k0 + 32) of a row-major [rows, ld] matrix into `tile`,
// zero past the matrix.
__device__ __forceinline__ void stage(bf16 (*tile)[kBK + kPad], const bf16* __restrict__ src,
                                      int rows, int ld, int r0, int k0) {
  const bool vec = (ld % 8) == 0;
  for (int e = threadIdx.x; e < kBM * kBK / 8; e += blockDim.x) {
    const int r = e / (kBK / 8), c = (e % (kBK / 8)) * 8;
    const int gr = r0 + r, gk = k0 + c;
    bf16* dst = &tile[r][c];
    if (vec && gr < rows && gk + 8 <= ld) {
      *reinterpret_cast<uint4*>(dst) =
          *reinterpret_cast<const uint4*>(src + (size_t)gr * ld + gk);
    } else {
      for (int i = 0; i < 8; ++i)
        dst[i] = (gr < rows && gk + i < ld) ? src[(size_t)gr * ld + gk + i] : __float2bfloat16(0.0f);
    }
  }
}

// Rows [k0, k0 + 32) × columns [n0, n0 + 64) of a row-major [depth, out] matrix into
// `tile` [32][64 + pad] (B operands given depth-major: the backward's W, B and A), zero past it.
__device__ __forceinline__ void stage_t(bf16 (*tile)[kBN + kPad], const bf16* __restrict__ src,
                                        int depth, int out, int k0, int n0) {
  const bool vec = (out % 8) == 0;
  for (int e = threadIdx.x; e < kBK * kBN / 8; e += blockDim.x) {
    const int r = e / (kBN / 8), c = (e % (kBN / 8)) * 8;
    const int gk = k0 + r, gn = n0 + c;
    bf16* dst = &tile[r][c];
    if (vec && gk < depth && gn + 8 <= out) {
      *reinterpret_cast<uint4*>(dst) =
          *reinterpret_cast<const uint4*>(src + (size_t)gk * out + gn);
    } else {
      for (int i = 0; i < 8; ++i)
        dst[i] = (gk < depth && gn + i < out) ? src[(size_t)gk * out + gn + i]
                                               : __float2bfloat16(0.0f);
    }
  }
}

__device__ __forceinline__ float quick_gelu(float x) { return x / (1.0f + expf(-1.702f * x)); }
}  // namespace lg

// kBT false: B operands are [out, depth] (nn.Linear: the forward's W and B).
// kBT true: B operands are [depth, out] (the backward dX = dY·W + s·(dY·B)·A).
template <bool kBT>
__device__ void lora_gemm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                          const bf16* __restrict__ bias, const bf16* __restrict__ s_low,
                          const bf16* __restrict__ lb, const bf16* __restrict__ res,
                          bf16* __restrict__ y, int M, int N, int K, int R, float scale,
                          int epilogue) {
  using namespace lg;
  __shared__ __align__(16) bf16 As[kBM][kBK + kPad];
  __shared__ __align__(16) bf16 Bs[kBN][kBK + kPad];
  __shared__ __align__(16) bf16 Bt[kBK][kBN + kPad];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wm = warp >> 1, wn = warp & 1;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  float acc[2][4][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[a][b][i] = 0.0f;

  // Two passes over one main loop: the LoRA product (A = S, B = B, depth r), then X·Wᵀ.
  for (int pass = R > 0 ? 0 : 1; pass < 2; ++pass) {
    const bf16* A = pass == 0 ? s_low : x;
    const bf16* B = pass == 0 ? lb : w;
    const int depth = pass == 0 ? R : K;
    for (int k0 = 0; k0 < depth; k0 += kBK) {
      __syncthreads();
      stage(As, A, M, depth, m0, k0);
      if (kBT)
        stage_t(Bt, B, depth, N, k0, n0);
      else
        stage(Bs, B, N, depth, n0, k0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t af[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          ldmatrix_x4(af[mi], &As[wm * 32 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8]
                                 [kk + (lane >> 4) * 8]);
#pragma unroll
        for (int nj2 = 0; nj2 < 2; ++nj2) {
          uint32_t bq[4];
          if (kBT)
            ldmatrix_x4_trans(bq, &Bt[kk + (lane & 7) + ((lane >> 3) & 1) * 8]
                                     [wn * 32 + nj2 * 16 + (lane >> 4) * 8]);
          else
            ldmatrix_x4(bq, &Bs[wn * 32 + nj2 * 16 + (lane & 7) + (lane >> 4) * 8]
                               [kk + ((lane >> 3) & 1) * 8]);
          const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma_m16n8k16_bf16(acc[mi][nj2 * 2], af[mi], b0);
            mma_m16n8k16_bf16(acc[mi][nj2 * 2 + 1], af[mi], b1);
          }
        }
      }
    }
    if (pass == 0) {
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[a][b][i] *= scale;
    }
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = m0 + wm * 32 + mi * 16 + g + (i >> 1) * 8;
        const int col = n0 + wn * 32 + nj * 8 + 2 * t + (i & 1);
        if (row >= M || col >= N) continue;
        float v = acc[mi][nj][i];
        if (epilogue != EPI_NONE) v += to_f32(bias[col]);
        if (epilogue == EPI_BIAS_GELU) v = quick_gelu(v);
        if (epilogue == EPI_BIAS_RESIDUAL) v += to_f32(res[(size_t)row * N + col]);
        y[(size_t)row * N + col] = from_f32<bf16>(v);
      }
}

extern "C" __global__ void __launch_bounds__(128)
    lora_gemm_fwd_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* s_low,
                       const bf16* lb, const bf16* res, bf16* y, int M, int N, int K, int R,
                       float scale, int epilogue) {
  lora_gemm<false>(x, w, bias, s_low, lb, res, y, M, N, K, R, scale, epilogue);
}
SD2_REGISTER_KERNEL(lora_gemm_fwd_bf16)

// The backward's products with depth-major B: dS = dY·B (x = dY, w = B [N, r], R = 0), then
// dX = dY·W + s·dS·A (x = dY, w = W [N, K], s_low = dS, lb = A [r, K]): arguments as the forward
// with "N" the output width (K of the layer) and "K" the depth (N of the layer).
extern "C" __global__ void __launch_bounds__(128)
    lora_gemm_bwd_bf16(const bf16* x, const bf16* w, const bf16* s_low, const bf16* lb,
                       bf16* y, int M, int N, int K, int R, float scale) {
  lora_gemm<true>(x, w, nullptr, s_low, lb, nullptr, y, M, N, K, R, scale, lg::EPI_NONE);
}
SD2_REGISTER_KERNEL(lora_gemm_bwd_bf16)
