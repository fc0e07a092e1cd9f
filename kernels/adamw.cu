// Multi-tensor AdamW over fp32 master weights, and the squared gradient norm for clipping.
// A launch covers many tensors: `chunks` lists (tensor, element range) pieces of at most a
// block's worth of work each, one block per piece, so one launch updates every trainable tensor.
//   p ← p·(1 − lr·wd) − lr·(m/bias1)/(√(v/bias2) + eps),  m, v the usual moments of g·grad_scale
#include "sd2_common.cuh"

struct AdamwChunk {
  float* p;
  const float* g;
  float* m;
  float* v;
  long long begin, end;  // element range of this piece
  float weight_decay;
  float pad_;
};

extern "C" __global__ void adamw_multi_f32(const AdamwChunk* __restrict__ chunks, int num_chunks,
                                           float lr, float beta1, float beta2, float eps,
                                           float bias1, float bias2, float grad_scale,
                                           const float* __restrict__ scale_ptr) {
  // scale_ptr (nullable): a factor computed on the device (`grad_clip_f32`'s coefficient), so
  // clipping needs no host round trip. A non-finite factor (the gradients' norm was not finite)
  // skips the update: parameters and moments stay as they were, as AMP's scaler does.
  if (scale_ptr != nullptr) {
    const float f = *scale_ptr;
    if (!isfinite(f)) return;
    grad_scale *= f;
  }
  for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const AdamwChunk k = chunks[c];
    for (long long i = k.begin + threadIdx.x; i < k.end; i += blockDim.x) {
      const float g = k.g[i] * grad_scale;
      const float m = beta1 * k.m[i] + (1.0f - beta1) * g;
      const float v = beta2 * k.v[i] + (1.0f - beta2) * g * g;
      const float update = (m / bias1) / (sqrtf(v / bias2) + eps);
      k.m[i] = m;
      k.v[i] = v;
      k.p[i] = k.p[i] * (1.0f - lr * k.weight_decay) - lr * update;
    }
  }
}
SD2_REGISTER_KERNEL(adamw_multi_f32)

// part[c] = Σ g² over piece c (the `g` and range of each chunk); `column_sum_f32` (or the host,
// in f64) adds the parts in order.
extern "C" __global__ void sum_sq_multi_f32(const AdamwChunk* __restrict__ chunks, int num_chunks,
                                            float* __restrict__ part) {
  __shared__ float scratch[32];
  for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const AdamwChunk k = chunks[c];
    float s = 0.0f;
    for (long long i = k.begin + threadIdx.x; i < k.end; i += blockDim.x) s += k.g[i] * k.g[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) part[c] = s;
  }
}
SD2_REGISTER_KERNEL(sum_sq_multi_f32)

// One block: out[0] = ‖g‖ = √(Σ part) (summed in double, in order per thread), out[1] = torch's
// clip_grad_norm_ factor min(1, max_norm / (‖g‖ + 1e-6)) — NaN when ‖g‖ is not finite, which
// makes adamw_multi_f32 skip the step.
extern "C" __global__ void grad_clip_f32(const float* __restrict__ part, int num_parts,
                                         float max_norm, float* __restrict__ out) {
  __shared__ double scratch[1024];
  double s = 0.0;
  for (int i = threadIdx.x; i < num_parts; i += blockDim.x) s += (double)part[i];
  scratch[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int i = 0; i < (int)blockDim.x; ++i) t += scratch[i];
    const double norm = sqrt(t);
    out[0] = (float)norm;
    // Finite as the f32 the host reads (a norm past FLT_MAX reads as inf there: skipped too).
    out[1] = isfinite((float)norm) ? (float)fmin(1.0, (double)max_norm / (norm + 1e-6)) : NAN;
  }
}
SD2_REGISTER_KERNEL(grad_clip_f32)
