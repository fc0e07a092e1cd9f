// Shared by every kernel: element types (f32 and bf16 storage, f32 math), warp and block
// reductions, dynamic shared memory, and kernel registration for the simulator. Everything here
// compiles both with nvcc and, under SD2_SIM, as host C++ (kernels/sim/cuda_sim.h).
#pragma once

#ifndef SD2_SIM
#include <cuda_bf16.h>
#include <cstdint>
#define SD2_REGISTER_KERNEL(kernel)
#endif

typedef __nv_bfloat16 bf16;

// Loads/stores that widen to and narrow from f32, so one kernel body serves both types.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// crate::rng::uniform_at: SplitMix64's finalizer over (seed, index), 24 bits → [0, 1). A
// dropout mask is a function of (seed, element index) alone, so the backward regenerates it
// (kept where the value is ≥ p, as crate::rng::dropout_keep).
__device__ __forceinline__ float dropout_uniform(unsigned long long seed, unsigned long long idx) {
  unsigned long long z = seed ^ (idx * 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (float)(z >> 40) * (1.0f / 16777216.0f);
}

// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the call ends with a barrier, so it can be reused.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : 0.0f;
  t = warp_sum(t);
  __syncthreads();
  return t;
}

// The kernel's dynamic shared memory (the launch's `shared_mem_bytes`).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef SD2_SIM
  return reinterpret_cast<T*>(sim::dynamic_smem);
#else
  extern __shared__ __align__(16) unsigned char sd2_dynamic_smem[];
  return reinterpret_cast<T*>(sd2_dynamic_smem);
#endif
}
