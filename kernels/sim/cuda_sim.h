// The CUDA subset our kernels use, for compiling them as host C++ and running them on the CPU
// (feature `cuda-sim`), the way CUDA's old device-emulation mode did. Included first (`-include`)
// when build.rs compiles a kernels/*.cu file with the host compiler; never seen by nvcc.
//
// Model: a launch runs its blocks one after another. A block's threads are fibers (ucontext) on
// the launching OS thread, switched at every __syncthreads and warp primitive, so a block runs
// with real barrier semantics and `__shared__` (a function-local static here) is shared by the
// block's threads. Launches are serialized by the runtime (statics are process-wide).
// Out-of-bounds accesses are not caught here; the sanitizer on the GPU covers those.
#pragma once
#ifndef SD2_SIM
#define SD2_SIM 1
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace sim {
// Per simulated thread: its indices and its slot in warp exchanges.
struct ThreadState {
  dim3 tid;
  unsigned linear;  // x + y*bx + z*bx*by
};
struct BlockState {
  dim3 bid, bdim, gdim;
  unsigned nthreads;
};
extern ThreadState* current;
extern BlockState block;
extern unsigned char* dynamic_smem;
// Barrier of the whole block / of the calling thread's warp. Every participating thread must
// call it (the runtime reports a deadlock otherwise).
void syncthreads();
void syncwarp();
// Gives the other threads of the block a turn (a spin-wait on an mbarrier); the runtime reports
// a deadlock when every live thread only spins for millions of rounds.
void yield();
// Warp exchange: every lane of the warp publishes 8 bytes, then reads lane `src`'s.
uint64_t warp_exchange(uint64_t mine, unsigned src_lane);
bool warp_vote_any(bool p);
bool warp_vote_all(bool p);
unsigned warp_ballot(bool p);
}  // namespace sim

#define threadIdx (sim::current->tid)
#define blockIdx (sim::block.bid)
#define blockDim (sim::block.bdim)
#define gridDim (sim::block.gdim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__ static const
#define __grid_constant__


inline void __syncthreads() { sim::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { sim::syncwarp(); }

// --- warp shuffles and votes (full-warp masks only: our kernels never use partial ones) ---
template <typename T>
inline T sim_shfl_(T v, unsigned src) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  uint64_t got = sim::warp_exchange(bits, src & 31u);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
inline unsigned sim_lane_() { return sim::current->linear & 31u; }
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  unsigned lane = sim_lane_();
  unsigned base = lane & ~unsigned(width - 1);
  return sim_shfl_(v, base + (unsigned(src) & unsigned(width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int m, int width = 32) {
  unsigned lane = sim_lane_();
  unsigned src = lane ^ unsigned(m);
  if ((src & ~unsigned(width - 1)) != (lane & ~unsigned(width - 1))) src = lane;
  return sim_shfl_(v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
  unsigned lane = sim_lane_();
  unsigned in_seg = lane & unsigned(width - 1);
  unsigned src = in_seg + d < unsigned(width) ? lane + d : lane;
  return sim_shfl_(v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
  unsigned lane = sim_lane_();
  unsigned in_seg = lane & unsigned(width - 1);
  unsigned src = in_seg >= d ? lane - d : lane;
  return sim_shfl_(v, src);
}
inline int __any_sync(unsigned, int p) { return sim::warp_vote_any(p != 0); }
inline int __all_sync(unsigned, int p) { return sim::warp_vote_all(p != 0); }
inline unsigned __ballot_sync(unsigned, int p) { return sim::warp_ballot(p != 0); }

// --- atomics: fibers never preempt each other, so plain read-modify-write is atomic ---
template <typename T>
inline T atomicAdd(T* a, T v) {
  T old = *a;
  *a = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* a, T v) {
  T old = *a;
  *a = std::max(old, v);
  return old;
}
template <typename T>
inline T atomicExch(T* a, T v) {
  T old = *a;
  *a = v;
  return old;
}
inline unsigned atomicCAS(unsigned* a, unsigned cmp, unsigned v) {
  unsigned old = *a;
  if (old == cmp) *a = v;
  return old;
}

// --- math intrinsics ---
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }
using std::isfinite;  // CUDA's device isfinite, for float and double

// --- vector types used for 16-byte accesses ---
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// --- bf16 and half: storage types with the CUDA conversion functions (round to nearest even) ---
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    h.bits = uint16_t(u >> 16);
  }
  return h;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
float sim_half_to_float(uint16_t h);
uint16_t sim_float_to_half(float f);
inline float __half2float(__half h) { return sim_half_to_float(h.bits); }
inline __half __float2half(float f) {
  __half h;
  h.bits = sim_float_to_half(f);
  return h;
}

// --- registration: the runtime finds a kernel by name and unpacks cuLaunchKernel-style args ---
namespace sim {
using Trampoline = void (*)(void** args);
// `sig`: one character per parameter — p pointer, i 4-byte integer, q 8-byte integer, f float,
// d double, T a struct by value (a TMA descriptor), ? anything else — checked against every
// launch's arguments (src/backend/cuda/launch.rs, check_signature).
void register_kernel(const char* name, Trampoline t, const char* sig);
template <typename T>
constexpr char sig_char() {
  using U = typename std::remove_cv<T>::type;
  if (std::is_pointer<U>::value) return 'p';
  if (std::is_same<U, float>::value) return 'f';
  if (std::is_same<U, double>::value) return 'd';
  if (std::is_integral<U>::value && sizeof(U) == 4) return 'i';
  if (std::is_integral<U>::value && sizeof(U) == 8) return 'q';
  if (std::is_class<U>::value) return 'T';
  return '?';
}
template <typename... A>
inline const char* signature(void (*)(A...)) {
  static const char s[] = {sig_char<A>()..., '\0'};
  return s;
}
template <typename... A, std::size_t... I>
inline void call_unpacked(void (*k)(A...), void** args, std::index_sequence<I...>) {
  k(*static_cast<typename std::remove_reference<A>::type*>(args[I])...);
}
template <typename... A>
inline void call(void (*k)(A...), void** args) {
  call_unpacked(k, args, std::index_sequence_for<A...>{});
}
struct Registrar {
  Registrar(const char* name, Trampoline t, const char* sig) { register_kernel(name, t, sig); }
};
}  // namespace sim

#define SD2_SIM_CAT2(a, b) a##b
#define SD2_SIM_CAT(a, b) SD2_SIM_CAT2(a, b)
// Registers `kernel` under its own name (an extern "C" kernel, as cudarc loads them by name).
#define SD2_REGISTER_KERNEL(kernel)                                                  \
  static sim::Registrar SD2_SIM_CAT(sd2_sim_reg_, kernel)(                         \
      #kernel, [](void** a) { sim::call(&kernel, a); }, sim::signature(&kernel));
