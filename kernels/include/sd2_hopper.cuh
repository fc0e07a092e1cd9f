// Hopper (sm_90a) primitives, one wrapper per instruction, as sd2_mma.cuh does for mma.sync:
// mbarriers, TMA tile loads (cp.async.bulk.tensor), wgmma with shared-memory descriptors,
// setmaxnreg. Inline PTX on the GPU; in the simulator an emulation of the documented behaviour,
// so a kernel's pipeline (phases, stage ring, tails) and indexing are checked on every CI run.
// What the simulator cannot check is that our reading of the hardware layouts is right — the
// GPU parity test does that.
//
// Layout conventions used throughout (and emulated below):
//   tiles are K-major bf16 with rows of 64 elements = 128 bytes, 1024-byte aligned, stored with
//   the 128-byte swizzle: the 16-byte chunk c of row r lands at chunk c ^ (r % 8) — for any
//   shared-memory offset o, swizzled(o) = o ^ ((o >> 3) & 0x70) (bits 4–6 ^= bits 7–9);
//   wgmma descriptors: start address >> 4 in bits 0–13, leading byte offset >> 4 in 16–29
//   (unused for swizzled K-major), stride byte offset (8 rows = 1024 B) >> 4 in 32–45,
//   layout 1 (128-byte swizzle) in bits 62–63; a k-step of 16 elements moves the start by 32 B.
//   wgmma m64nNk16 accumulators: warp q of the warpgroup owns rows 16q + g and 16q + g + 8,
//   d[4j + e] = D[16q + g + 8(e/2)][8j + 2t + e%2] (g = lane / 4, t = lane % 4).
#pragma once
#include "sd2_mma.cuh"

// Kernels guard their Hopper bodies with this (the compute_80 PTX pass has no wgmma).
#if defined(SD2_SIM) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define SD2_HOPPER 1
#endif

// A TMA descriptor, passed by value as a `const __grid_constant__` kernel parameter: on the GPU
// the 128 opaque bytes of cuTensorMapEncodeTiled; in the simulator our own fields
// (src/backend/cuda/launch.rs `TensorMap`): [0] global address, [1] columns, [2] rows, [3] row
// stride in bytes, [4] box columns, [5] box rows.
struct alignas(128) TmaDesc {  // CUDA 13 aligns CUtensorMap to 128 bytes
  unsigned long long opaque[16];
};

// The shared-memory address of a generic pointer into shared memory (the simulator: the offset
// from the 1024-aligned dynamic shared memory).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#ifdef SD2_SIM
  return uint32_t(static_cast<const unsigned char*>(p) - sim::dynamic_smem);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

#ifdef SD2_SIM
namespace simh {
// An mbarrier's 8 bytes in the simulator.
struct Bar {
  uint8_t expected, phase;
  uint16_t pending;
  int32_t tx;
};
static_assert(sizeof(Bar) == 8, "mbarrier is 8 bytes");
inline Bar* bar(uint64_t* b) { return reinterpret_cast<Bar*>(b); }
inline void settle(Bar* b) {
  if (b->pending == 0 && b->tx == 0) {
    b->phase ^= 1;
    b->pending = b->expected;
  }
}
inline uint32_t swz(uint32_t o) { return o ^ ((o >> 3) & 0x70u); }
inline float smem_bf16(uint32_t o) {
  uint16_t h;
  std::memcpy(&h, sim::dynamic_smem + swz(o), 2);
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace simh
#endif

__device__ __forceinline__ void mbar_init(uint64_t* b, int count) {
#ifdef SD2_SIM
  *simh::bar(b) = simh::Bar{uint8_t(count), 0, uint16_t(count), 0};
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
#endif
}

// Makes the initialized barriers visible to the async proxy (TMA) before the block barrier.
__device__ __forceinline__ void fence_barrier_init() {
#ifndef SD2_SIM
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* b, int bytes) {
#ifdef SD2_SIM
  simh::Bar* s = simh::bar(b);
  s->tx += bytes;
  s->pending -= 1;
  simh::settle(s);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)),
               "r"(bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
#ifdef SD2_SIM
  simh::Bar* s = simh::bar(b);
  s->pending -= 1;
  simh::settle(s);
#else
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
#endif
}

// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* b, int parity) {
#ifdef SD2_SIM
  while (simh::bar(b)->phase == uint8_t(parity)) sim::yield();
#else
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(b)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// TMA: the box at (col, row) of a 2-D bf16 tensor map into `dst` (1024-aligned, 128-byte swizzle,
// zeros past the tensor), completing `bytes` = the whole box on barrier `b`.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc* map, int col, int row,
                                            uint64_t* b) {
#ifdef SD2_SIM
  const unsigned long long* f = map->opaque;
  const unsigned char* g = reinterpret_cast<const unsigned char*>(f[0]);
  const long long cols = f[1], rows = f[2], stride = f[3], bc = f[4], br = f[5];
  const uint32_t o0 = smem_u32(dst);
  for (long long r = 0; r < br; ++r)
    for (long long c = 0; c < bc; ++c) {
      uint16_t v = 0;
      if (row + r < rows && col + c < cols)
        std::memcpy(&v, g + (row + r) * stride + (col + c) * 2, 2);
      std::memcpy(sim::dynamic_smem + simh::swz(o0 + uint32_t(r * bc * 2 + c * 2)), &v, 2);
    }
  simh::Bar* s = simh::bar(b);
  s->tx -= int32_t(br * bc * 2);
  simh::settle(s);
#else
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(smem_u32(b))
      : "memory");
#endif
}

// The descriptor of a K-major, 128-byte-swizzled bf16 tile starting at `p` (8-row groups 1024 B
// apart).
__device__ __forceinline__ uint64_t wgmma_desc(const void* p) {
  return uint64_t((smem_u32(p) & 0x3FFFF) >> 4) | (uint64_t(1) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#ifndef SD2_SIM
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifndef SD2_SIM
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most kPending committed wgmma groups are in flight (the simulator runs each
// wgmma at issue).
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifndef SD2_SIM
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Pins the accumulator registers in program order around wgmma issue and wait: wait_group
// names no registers, so without this the compiler could move an accumulator read or write
// (the LoRA scaling, the epilogue) across it. (CUTLASS's warpgroup_fence_operand.)
template <int kN>
__device__ __forceinline__ void wgmma_fence_acc(float (&d)[kN]) {
#ifndef SD2_SIM
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifndef SD2_SIM
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifndef SD2_SIM
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// D (64 × 256, f32, in the 128 registers of each thread of the warpgroup) = A·Bᵀ (+ D when
// scale_d), A [64 × 16] and B [256 × 16] K-major in shared memory through their descriptors.
__device__ __forceinline__ void wgmma_m64n256k16_bf16(float (&d)[128], uint64_t desc_a,
                                                      uint64_t desc_b, int scale_d) {
#ifdef SD2_SIM
  const uint32_t sa = uint32_t(desc_a & 0x3FFF) << 4, sb = uint32_t(desc_b & 0x3FFF) << 4;
  const uint32_t strA = uint32_t((desc_a >> 32) & 0x3FFF) << 4;
  const uint32_t strB = uint32_t((desc_b >> 32) & 0x3FFF) << 4;
  auto at = [](uint32_t start, uint32_t stride, int row, int k) {
    return start + uint32_t(row >> 3) * stride + uint32_t(row & 7) * 128 + uint32_t(k) * 2;
  };
  const int lin = int(sim::current->linear), q = (lin >> 5) & 3, l = lin & 31, g = l >> 2,
            t = l & 3;
  float a[2][16];
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 16; ++k) a[h][k] = simh::smem_bf16(at(sa, strA, 16 * q + g + 8 * h, k));
  for (int j = 0; j < 32; ++j)
    for (int e = 0; e < 2; ++e) {
      float bcol[16];
      for (int k = 0; k < 16; ++k) bcol[k] = simh::smem_bf16(at(sb, strB, 8 * j + 2 * t + e, k));
      for (int h = 0; h < 2; ++h) {
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s += a[h][k] * bcol[k];
        float& out = d[4 * j + 2 * h + e];
        out = (scale_d ? out : 0.0f) + s;
      }
    }
#else
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}
