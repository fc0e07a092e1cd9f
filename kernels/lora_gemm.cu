// The LoRA-linear GEMM: Y = X·Wᵀ (+ b) + s·S·Bᵀ with S = drop(X)·Aᵀ computed beforehand
// (M × r), bf16 in and out, f32 accumulate. The LoRA term enters the main loop as extra K: the
// block first accumulates S·Bᵀ over r (zero-padded to the k-step), scales the accumulator by s,
// then continues with X·Wᵀ over K — so Y is written once, X read once, and the sum is the same
// f32 expression the CPU reference evaluates. Epilogues CLIP needs: bias, bias + quick_gelu
// (fc1, which also writes the pre-activation its backward needs), bias + residual (out_proj,
// fc2); in the backward, quick_gelu′ of fc1's pre-activation (fc2's dX is fc1's output
// gradient) and the gradient the input already has (q/k/v share theirs).
//
// The backward's dX = dY·W + s·(dY·B)·A runs through the same body with depth-major B operands
// (`lora_gemm_bwd_bf16`, ldmatrix.trans); dA, dB stay small GEMMs (no dW: W is frozen).
//
// Variant 1 (this file): mma.sync m16n8k16 through kernels/include/sd2_mma.cuh (sm_80+, runs in
// the simulator): 64×64 block tile, 4 warps of 32×32, k-steps of 32 staged in shared memory
// (16-byte loads when the rows allow, element loads with zero fill at every tail), fragments by
// ldmatrix. Any M, N, K, r. W is [N, K] and B is [N, r], row-major (nn.Linear's layout).
//   grid (⌈N/64⌉, ⌈M/64⌉), 128 threads, 15 KB static shared memory.
#include "sd2_hopper.cuh"

namespace lg {
constexpr int kBM = 64, kBN = 64, kBK = 32, kPad = 8;
// Epilogue codes (`backend::cuda::lora_gemm::Epilogue`). `res`, when given, is added last.
enum { EPI_NONE = 0, EPI_BIAS = 1, EPI_BIAS_GELU = 2, EPI_BIAS_RESIDUAL = 3, EPI_GELU_BWD = 4 };

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
__device__ __forceinline__ float quick_gelu_grad(float x) {
  const float s = 1.0f / (1.0f + expf(-1.702f * x));
  return s + 1.702f * x * s * (1.0f - s);
}

// What follows the product: bias and pre/aux by column/element, `res` added last (the forward's
// residual, or in the backward the gradient the input already has). In the backward, with `lds`,
// first the LoRA branch's input gradient with its dropout mask: + drop′(Σ_j lds[row, j] ·
// la[j, col]) — lora_lowrank.cu's lora_up_add, without its pass over dX.
struct Epi {
  const bf16* bias;  // [N] (EPI_BIAS, EPI_BIAS_GELU, EPI_BIAS_RESIDUAL)
  const bf16* res;   // [M, N] or null
  const bf16* aux;   // [M, N]: fc1's pre-activation (EPI_GELU_BWD)
  bf16* pre;         // [M, N]: the pre-activation out (EPI_BIAS_GELU), or null
  int code;
  const bf16* lds = nullptr;  // [M, lr]: dS (scaled), or null
  const bf16* la = nullptr;   // [lr, N]: A
  int lr = 0;
  float lp = 0.0f;  // dropout probability of the LoRA input
  unsigned long long lseed = 0;
};

// 1 / (1 − p) rounded once from double, as the CPU's and lora_lowrank.cu's.
__device__ __forceinline__ float inv_keep(float p) {
  return p > 0.0f ? (float)(1.0 / (1.0 - (double)p)) : 1.0f;
}

__device__ __forceinline__ void store2(bf16* p, float a, float b, bool pair, bool two) {
  if (pair) {
    *reinterpret_cast<uint32_t*>(p) = pack_bf16x2(a, b);
  } else {
    p[0] = from_f32<bf16>(a);
    if (two) p[1] = from_f32<bf16>(b);
  }
}

// Y[row, col..col+2) from the f32 accumulators v (col + 1 may be past N). `pair`: 4-byte
// aligned pair stores are allowed (N even, y and pre 4-byte aligned).
__device__ __forceinline__ void epilogue2(const Epi& e, bf16* __restrict__ y, int row, int col,
                                          int N, float v[2], bool pair) {
  const size_t i = (size_t)row * N + col;
  const bool two = col + 1 < N;
  float h[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j == 1 && !two) continue;  // no break: the loop unrolls, v and h stay in registers
    float x = v[j];
    if (e.lds) {
      float low = 0.0f;
#pragma unroll 1
      for (int q = 0; q < e.lr; ++q)
        low += to_f32(e.lds[(size_t)row * e.lr + q]) * to_f32(e.la[(size_t)q * N + col + j]);
      if (e.lp <= 0.0f || dropout_uniform(e.lseed, i + j) >= e.lp) x += low * inv_keep(e.lp);
    }
    if (e.code == EPI_BIAS || e.code == EPI_BIAS_GELU || e.code == EPI_BIAS_RESIDUAL)
      x += to_f32(e.bias[col + j]);
    h[j] = x;
    if (e.code == EPI_BIAS_GELU) x = quick_gelu(x);
    if (e.code == EPI_GELU_BWD) x *= quick_gelu_grad(to_f32(e.aux[i + j]));
    if (e.res) x += to_f32(e.res[i + j]);
    v[j] = x;
  }
  if (e.code == EPI_BIAS_GELU && e.pre) store2(e.pre + i, h[0], h[1], pair, two);
  store2(y + i, v[0], v[1], pair, two);
}

__device__ __forceinline__ bool pair_ok(const Epi& e, const bf16* y, int N) {
  return (N % 2) == 0 && (reinterpret_cast<uintptr_t>(y) & 3) == 0 &&
         (reinterpret_cast<uintptr_t>(e.pre) & 3) == 0;
}
}  // namespace lg

// kBT false: B operands are [out, depth] (nn.Linear: the forward's W and B).
// kBT true: B operands are [depth, out] (the backward dX = dY·W + s·(dY·B)·A).
template <bool kBT>
__device__ void lora_gemm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                          const bf16* __restrict__ s_low, const bf16* __restrict__ lb,
                          bf16* __restrict__ y, int M, int N, int K, int R, float scale,
                          const lg::Epi e) {
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

  const bool pair = pair_ok(e, y, N);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * 32 + mi * 16 + g + h * 8;
        const int col = n0 + wn * 32 + nj * 8 + 2 * t;
        if (row >= M || col >= N) continue;
        float v[2] = {acc[mi][nj][2 * h], acc[mi][nj][2 * h + 1]};
        epilogue2(e, y, row, col, N, v, pair);
      }
}

extern "C" __global__ void __launch_bounds__(128)
    lora_gemm_fwd_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* s_low,
                       const bf16* lb, const bf16* res, bf16* pre, bf16* y, int M, int N, int K,
                       int R, float scale, int epilogue) {
  lora_gemm<false>(x, w, s_low, lb, y, M, N, K, R, scale,
                   lg::Epi{bias, res, nullptr, pre, epilogue});
}
SD2_REGISTER_KERNEL(lora_gemm_fwd_bf16)

// The backward's products with depth-major B: dS = dY·B (x = dY, w = B [N, r], R = 0), then
// dX = dY·W + s·dS·A (x = dY, w = W [N, K], s_low = dS, lb = A [r, K]): arguments as the forward
// with "N" the output width (K of the layer) and "K" the depth (N of the layer). The epilogue:
// + drop′(lds·la) when lds is given (the LoRA term under dropout, which cannot ride as extra
// depth), × quick_gelu′(aux) with EPI_GELU_BWD, + res when given.
extern "C" __global__ void __launch_bounds__(128)
    lora_gemm_bwd_bf16(const bf16* x, const bf16* w, const bf16* s_low, const bf16* lb,
                       const bf16* lds, const bf16* la, int lr, float lp,
                       unsigned long long lseed, const bf16* res, const bf16* aux, bf16* y,
                       int M, int N, int K, int R, float scale, int epilogue) {
  lora_gemm<true>(x, w, s_low, lb, y, M, N, K, R, scale,
                  lg::Epi{nullptr, res, aux, nullptr, epilogue, lds, la, lr, lp, lseed});
}
SD2_REGISTER_KERNEL(lora_gemm_bwd_bf16)

// ---------------------------------------------------------------------------------------------
// Variant 2: the same product, shaped for throughput. 128×128 block tile, 8 warps of 64×32,
// k-steps of 32 in a 4-stage cp.async ring (the loads of tile t+3 fly while tile t is
// multiplied), one barrier per k-step. The LoRA tiles and the X·Wᵀ tiles form one sequence of
// k-tiles, so the pipeline does not drain between them; the accumulator is scaled by s after
// the last LoRA tile. Operands whose rows are not 16-byte multiples (depth % 8 ≠ 0) take plain
// element loads into the same ring (correct, slower). Rows padded by 16 bytes: ldmatrix and the
// 16-byte stores hit 8 distinct bank groups.
//   grid (⌈N/128⌉, ⌈M/128⌉), 256 threads, 81920 bytes of dynamic shared memory.
namespace lg2 {
constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kPad = 8;
constexpr int kRowA = kBK + kPad;         // [rows][k] tiles: X/S, and W/B for the forward
constexpr int kRowT = kBN + kPad;         // [k][cols] tiles: depth-major B for the backward
constexpr int kTileA = kBM * kRowA;       // elements per stage
constexpr int kTileB = kBN * kRowA;       // ≥ kBK * kRowT (4352 ≤ 5120)
static_assert(kBK * kRowT <= kTileB, "depth-major tile must fit the B stage");

// cp.async needs 16-byte aligned sources (a tensor view may start mid-allocation). The
// simulator copies with memcpy, so it always takes the cp.async path.
__device__ __forceinline__ bool aligned16(const void* p) {
#ifdef SD2_SIM
  (void)p;
  return true;
#else
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
#endif
}

// One 16-byte chunk (8 elements) of a row-major [rows, ld] matrix: cp.async when the row allows,
// element loads otherwise; zero past the matrix.
__device__ __forceinline__ void chunk(bf16* dst, const bf16* __restrict__ src, int rows, int ld,
                                      int r, int c, bool vec) {
  if (vec) {
    const bool ok = r < rows && c < ld;  // ld % 8 == 0: a chunk is all in or all out
    cp_async_16(dst, ok ? src + (size_t)r * ld + c : src, ok);
  } else {
    for (int i = 0; i < 8; ++i)
      dst[i] = (r < rows && c + i < ld) ? src[(size_t)r * ld + c + i] : __float2bfloat16(0.0f);
  }
}
}  // namespace lg2

template <bool kBT>
__device__ void lora_gemm2(const bf16* __restrict__ x, const bf16* __restrict__ w,
                           const bf16* __restrict__ s_low, const bf16* __restrict__ lb,
                           bf16* __restrict__ y, int M, int N, int K, int R, float scale,
                           const lg::Epi e) {
  using namespace lg2;
  bf16* smem = dynamic_smem<bf16>();
  bf16* As = smem;                         // [kStages][kBM][kRowA]
  bf16* Bs = smem + kStages * kTileA;      // [kStages][kBN][kRowA] or [kStages][kBK][kRowT]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // 2 × 4 warps, 64 × 32 each
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int n_low = R > 0 ? (R + kBK - 1) / kBK : 0;
  const int n_tiles = n_low + (K + kBK - 1) / kBK;
  const bool vec_low = (R % 8) == 0 && (kBT ? (N % 8) == 0 : true) && aligned16(s_low) &&
                       aligned16(lb);
  const bool vec_main = (K % 8) == 0 && (kBT ? (N % 8) == 0 : true) && aligned16(x) &&
                        aligned16(w);

  // Issues the loads of k-tile `kt` into stage `st`.
  auto load = [&](int kt, int st) {
    const bool low = kt < n_low;
    const bf16* A = low ? s_low : x;
    const bf16* B = low ? lb : w;
    const int depth = low ? R : K;
    const int k0 = (low ? kt : kt - n_low) * kBK;
    const bool vec = low ? vec_low : vec_main;
    bf16* a = As + st * kTileA;
    bf16* b = Bs + st * kTileB;
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 128 rows × 4 chunks = 512 chunks, 2 per thread
      const int e = tid + i * 256, r = e >> 2, c = (e & 3) * 8;
      chunk(a + r * kRowA + c, A, M, depth, m0 + r, k0 + c, vec);
      if (kBT) {
        // [kBK][kBN]: 32 rows × 16 chunks
        const int kr = e >> 4, nc = (e & 15) * 8;
        chunk(b + kr * kRowT + nc, B, depth, N, k0 + kr, n0 + nc, vec);
      } else {
        chunk(b + r * kRowA + c, B, N, depth, n0 + r, k0 + c, vec);
      }
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[a][b][i] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < n_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt landed for everyone; stage (kt-1) % kStages is free
    if (kt + kStages - 1 < n_tiles) load(kt + kStages - 1, (kt + kStages - 1) % kStages);
    cp_async_commit();
    const bf16* a = As + (kt % kStages) * kTileA;
    const bf16* b = Bs + (kt % kStages) * kTileB;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(af[mi], a + (wm * 64 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kRowA +
                                kk + (lane >> 4) * 8);
#pragma unroll
      for (int nj2 = 0; nj2 < 2; ++nj2) {
        uint32_t bq[4];
        if (kBT)
          ldmatrix_x4_trans(bq, b + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * kRowT + wn * 32 +
                                    nj2 * 16 + (lane >> 4) * 8);
        else
          ldmatrix_x4(bq, b + (wn * 32 + nj2 * 16 + (lane & 7) + (lane >> 4) * 8) * kRowA + kk +
                              ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          mma_m16n8k16_bf16(acc[mi][nj2 * 2], af[mi], b0);
          mma_m16n8k16_bf16(acc[mi][nj2 * 2 + 1], af[mi], b1);
        }
      }
    }
    if (kt == n_low - 1) {
#pragma unroll
      for (int a2 = 0; a2 < 4; ++a2)
#pragma unroll
        for (int b2 = 0; b2 < 4; ++b2)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[a2][b2][i] *= scale;
    }
  }
  cp_async_wait<0>();

  const bool pair = lg::pair_ok(e, y, N);
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * 64 + mi * 16 + g + h * 8;
        const int col = n0 + wn * 32 + nj * 8 + 2 * t;
        if (row >= M || col >= N) continue;
        float v[2] = {acc[mi][nj][2 * h], acc[mi][nj][2 * h + 1]};
        lg::epilogue2(e, y, row, col, N, v, pair);
      }
}

extern "C" __global__ void __launch_bounds__(256)
    lora_gemm2_fwd_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* s_low,
                        const bf16* lb, const bf16* res, bf16* pre, bf16* y, int M, int N, int K,
                        int R, float scale, int epilogue) {
  lora_gemm2<false>(x, w, s_low, lb, y, M, N, K, R, scale,
                    lg::Epi{bias, res, nullptr, pre, epilogue});
}
SD2_REGISTER_KERNEL(lora_gemm2_fwd_bf16)

extern "C" __global__ void __launch_bounds__(256)
    lora_gemm2_bwd_bf16(const bf16* x, const bf16* w, const bf16* s_low, const bf16* lb,
                        const bf16* lds, const bf16* la, int lr, float lp,
                        unsigned long long lseed, const bf16* res, const bf16* aux, bf16* y,
                        int M, int N, int K, int R, float scale, int epilogue) {
  lora_gemm2<true>(x, w, s_low, lb, y, M, N, K, R, scale,
                   lg::Epi{nullptr, res, aux, nullptr, epilogue, lds, la, lr, lp, lseed});
}
SD2_REGISTER_KERNEL(lora_gemm2_bwd_bf16)

// ---------------------------------------------------------------------------------------------
// Variant 3 (Hopper, sm_90a): wgmma fed by TMA, warp-specialized. 384 threads = 3 warpgroups:
// warpgroup 0 is the producer (one thread issues the TMA loads of each k-tile into a 4-stage
// ring and waits for a stage to be released before refilling it; the warpgroup gives its
// registers away with setmaxnreg), warpgroups 1 and 2 are consumers, each computing 64 rows ×
// 256 columns with wgmma m64n256k16 (128 f32 accumulators per thread), one wgmma group kept in
// flight while the next stage is issued. Block tile 128 × 256, k-tiles of 64 (128-byte rows,
// 128-byte swizzle), 48 KB per stage.
//
// LoRA: the first k-tile is (S, B) — TMA zero-fills columns r..63 — of which one k-step (r ≤ 16,
// the rank padded to 16) is issued, so rank 8 costs 1/64 of a K = 1024 GEMM; the accumulator is
// scaled by s before the X·Wᵀ tiles. No wgmma sits under a data-dependent branch inside a
// k-tile (an `if (kk < steps)` there made ptxas serialize every wgmma: info C7520); the LoRA
// tile is its own block under the kernel-uniform `if (R > 0)`, which ptxas accepts. Tails in M, N, K are TMA's zero fill plus a
// bounds-checked epilogue. Needs (checked by the host): K % 8 == 0, r ∈ {0, 8, 16} (16-byte row
// strides for TMA), 16-byte aligned X, W, S, B.
//
// The same kernel is the backward's dX on tensor cores: dX = dY·W is dY·(Wᵀ)ᵀ, so with X = dY,
// W = Wᵀ (transposed once per call by the host), S = dS and B = Aᵀ it is this product, and the
// epilogue takes the backward's terms (`lg::Epi`: drop′(lds·la), quick_gelu′(aux), + res).
//   grid (⌈N/256⌉, ⌈M/128⌉), 384 threads, 197696 bytes of dynamic shared memory.
namespace lg3 {
constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 4;
constexpr int kTileA = kBM * kBK * 2, kTileB = kBN * kBK * 2, kStageBytes = kTileA + kTileB;
// dynamic shared memory: kStages · kStageBytes + the 2·kStages barriers + 1024 for alignment
constexpr int kConsumerWarps = 8;
}  // namespace lg3

extern "C" __global__ void __launch_bounds__(384, 1)
    lora_gemm3_fwd_bf16(const __grid_constant__ TmaDesc tm_x, const __grid_constant__ TmaDesc tm_w,
                        const __grid_constant__ TmaDesc tm_s, const __grid_constant__ TmaDesc tm_b,
                        const bf16* bias, const bf16* res, bf16* pre, const bf16* aux,
                        const bf16* lds, const bf16* la, int lr, float lp,
                        unsigned long long lseed, bf16* y, int M, int N, int K, int R,
                        float scale, int epilogue) {
#ifdef SD2_HOPPER
  using namespace lg3;
  unsigned char* raw = dynamic_smem<unsigned char>();
  unsigned char* base = raw + ((1024 - (smem_u32(raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(base + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int n_low = R > 0 ? 1 : 0;
  const int n_tiles = n_low + (K + kBK - 1) / kBK;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerWarps);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (tid == 0) {
      for (int kt = 0; kt < n_tiles; ++kt) {
        const int st = kt % kStages, round = kt / kStages;
        if (round > 0) mbar_wait(&empty[st], (round - 1) & 1);
        unsigned char* a = base + st * kStageBytes;
        mbar_arrive_expect_tx(&full[st], kStageBytes);
        if (kt < n_low) {
          tma_load_2d(a, &tm_s, 0, m0, &full[st]);
          tma_load_2d(a + kTileA, &tm_b, 0, n0, &full[st]);
        } else {
          const int k0 = (kt - n_low) * kBK;
          tma_load_2d(a, &tm_x, k0, m0, &full[st]);
          tma_load_2d(a + kTileA, &tm_w, k0, n0, &full[st]);
        }
      }
    }
  } else {
    setmaxnreg_inc<232>();
    const int cw = wg - 1;  // rows m0 + 64·cw …
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    int kt = 0;
    if (n_low) {
      // The LoRA tile: one k-step (r ≤ 16), complete before the accumulator is scaled by s.
      mbar_wait(&full[0], 0);
      const unsigned char* a = base + cw * 64 * 128;
      wgmma_fence_acc(acc);
      wgmma_fence();
      wgmma_m64n256k16_bf16(acc, wgmma_desc(a), wgmma_desc(base + kTileA), 0);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_acc(acc);
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] *= scale;
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[0]);
      kt = 1;
    }
    int prev = -1;  // the stage whose wgmma group may still be in flight
    for (; kt < n_tiles; ++kt) {
      const int st = kt % kStages;
      mbar_wait(&full[st], (kt / kStages) & 1);
      const unsigned char* a = base + st * kStageBytes + cw * 64 * 128;
      const unsigned char* b = base + st * kStageBytes + kTileA;
      wgmma_fence_acc(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk)
        wgmma_m64n256k16_bf16(acc, wgmma_desc(a + kk * 32), wgmma_desc(b + kk * 32), 1);
      wgmma_commit();
      wgmma_wait<1>();  // the group of tile kt - 1 is done: its stage can be refilled
      wgmma_fence_acc(acc);
      if (prev >= 0) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[prev]);
      }
      prev = st;
    }
    wgmma_wait<0>();
    wgmma_fence_acc(acc);

    const int q = (tid >> 5) & 3, g = lane >> 2, t = lane & 3;
    const lg::Epi e{bias, res, aux, pre, epilogue, lds, la, lr, lp, lseed};
    const bool pair = lg::pair_ok(e, y, N);
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + cw * 64 + q * 16 + g + h * 8;
        const int col = n0 + 8 * j + 2 * t;
        if (row >= M || col >= N) continue;
        float v[2] = {acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]};
        lg::epilogue2(e, y, row, col, N, v, pair);
      }
  }
#endif
}
SD2_REGISTER_KERNEL(lora_gemm3_fwd_bf16)
