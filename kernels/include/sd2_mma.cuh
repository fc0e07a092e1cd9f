// Tensor-core primitives, one wrapper per instruction: inline PTX on the GPU, an emulation with
// the documented per-lane fragment layouts in the simulator (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"). Kernels call tensor cores only through these.
//   lane = 32·warp + l, g = l / 4 (group), t = l % 4 (thread in group)
//   A 16×16 bf16 (row): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//                       a[3] = A[g+8][2t+8..]   (each .b32 holds two bf16, lower column low)
//   B 16×8 bf16 (col):  b[0] = B[2t..2t+1][g],  b[1] = B[2t+8..2t+9][g]
//   C/D 16×8 f32:       d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]
#pragma once
#include "sd2_common.cuh"

__device__ __forceinline__ unsigned short bf16_bits(bf16 h) {
#ifdef SD2_SIM
  return h.bits;
#else
  return __bfloat16_as_ushort(h);
#endif
}

// Two floats rounded to bf16 and packed (lo in the low half), as a .b32 fragment register.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return uint32_t(bf16_bits(__float2bfloat16(lo))) |
         (uint32_t(bf16_bits(__float2bfloat16(hi))) << 16);
}

// The two bf16 halves of a .b32 fragment register, widened to f32 (exact).
__device__ __forceinline__ float bf16x2_lo(uint32_t r) {
#ifdef SD2_SIM
  const uint32_t u = r << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(r << 16);
#endif
}
__device__ __forceinline__ float bf16x2_hi(uint32_t r) {
#ifdef SD2_SIM
  const uint32_t u = r & 0xffff0000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(r & 0xffff0000u);
#endif
}

// d += A·B for one warp: m16n8k16, bf16 inputs, f32 accumulate.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
#ifdef SD2_SIM
  auto lo = [](uint32_t r) {
    uint32_t u = r << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  auto hi = [](uint32_t r) {
    uint32_t u = r & 0xffff0000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  // Every lane posts its fragments, the warp meets, each lane reads all 32 (one exchange per
  // instruction instead of one shuffle per register; the block's warps use separate rows).
  static uint32_t post[32][32][6];
  const unsigned lin = sim::current->linear, w = lin >> 5, me = lin & 31u;
  for (int r = 0; r < 4; ++r) post[w][me][r] = a[r];
  for (int r = 0; r < 2; ++r) post[w][me][4 + r] = b[r];
  __syncwarp();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* ra = post[w][l];
    const uint32_t* rb = post[w][l] + 4;
    const int g = l >> 2, t = l & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
      A[row][col] = lo(ra[r]);
      A[row][col + 1] = hi(ra[r]);
    }
    for (int r = 0; r < 2; ++r) {
      B[2 * t + r * 8][g] = lo(rb[r]);
      B[2 * t + r * 8 + 1][g] = hi(rb[r]);
    }
  }
  __syncwarp();  // all have read before anyone posts again
  const int l = int(sim_lane_()), g = l >> 2, t = l & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >> 1) * 8, col = 2 * t + (i & 1);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[i] += s;
  }
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: four 8×8 bf16 matrices from shared memory.
// Lane i passes the address of row i % 8 of matrix i / 8 (16 contiguous bytes). Without .trans,
// r[j] of lane l holds matrix j's [l/4][2(l%4) .. +1]; with .trans, [2(l%4)][l/4] and
// [2(l%4)+1][l/4] (the fragment of the transposed matrix).
#ifdef SD2_SIM
template <bool kTrans>
__device__ __forceinline__ void sim_ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  static const unsigned short* post[32][32];
  const unsigned lin = sim::current->linear, w = lin >> 5, me = lin & 31u;
  post[w][me] = static_cast<const unsigned short*>(row);
  __syncwarp();
  const int g = int(me) >> 2, t = int(me) & 3;
  for (int j = 0; j < 4; ++j) {
    unsigned short e0, e1;
    if (kTrans) {
      e0 = post[w][j * 8 + 2 * t][g];
      e1 = post[w][j * 8 + 2 * t + 1][g];
    } else {
      e0 = post[w][j * 8 + g][2 * t];
      e1 = post[w][j * 8 + g][2 * t + 1];
    }
    r[j] = uint32_t(e0) | (uint32_t(e1) << 16);
  }
  __syncwarp();
}
#endif

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef SD2_SIM
  sim_ldmatrix_x4<false>(r, row);
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#ifdef SD2_SIM
  sim_ldmatrix_x4<true>(r, row);
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// cp.async: 16 bytes global → shared without passing through registers, completed in groups.
// `valid` false fills the 16 bytes with zeros (src-size 0) and reads nothing. In the simulator
// the copy happens at once, so commit/wait are no-ops (and a missing wait cannot show there:
// compute-sanitizer racecheck on the GPU covers it).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef SD2_SIM
  if (valid) {
    std::memcpy(smem, gmem, 16);
  } else {
    std::memset(smem, 0, 16);
  }
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef SD2_SIM
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifndef SD2_SIM
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}
