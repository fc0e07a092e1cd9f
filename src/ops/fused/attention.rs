//! Multi-head scaled dot-product attention as one fused unit, with the flash-attention
//! contract: the forward returns the output and keeps only the per-row log-sum-exp, the
//! backward recomputes the probabilities from it. The CPU reference (one rayon task per
//! (batch, head), products through gemm on strided views, so heads are never copied out of the
//! [batch, len, heads·head_dim] layout); the CUDA launches of `kernels/flash_attention.cu`
//! (head dims 16/32/64; tensor cores for bf16) and `kernels/clam_attention.cu` (short key sets
//! of other head dims); and the backward rule.
use rayon::prelude::*;

use super::{cpu_float, cpu_float_bf16_via_f32, FloatFn, FusedKernel};
use crate::backend::cpu::gemm::{gemm_into, Mat};
use crate::backend::cpu::norm::softmax_row;
use crate::backend::cpu::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::{flash, kernels as kn, storage::CudaStorage};
pub use crate::backend::AttnSpec;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::BackendStorage;
use crate::ops::{check_float, check_same_dtype, record_fn};
use crate::storage::Storage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::{profile, DType, Error};
use crate::{Float, Result, Tensor};

/// Options of `attention`.
#[derive(Clone, Copy, Debug)]
pub struct AttnOptions {
    /// Number of heads; the last dimension of q, k and v must be a multiple of it.
    pub heads: usize,
    /// Query i attends only to keys j ≤ i + kv_len − q_len (keys aligned at the end).
    pub causal: bool,
    /// Scale of q·k; `None` means head_dim^-0.5.
    pub scale: Option<f64>,
}

/// q [B, Sq, H·D], k and v [B, Sk, H·D] → out [B, Sq, H·D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let o = AttnOptions {
        heads,
        causal,
        scale: None,
    };
    Ok(attention_lse(q, k, v, o)?.0)
}

/// Like `attention`, also returning the log-sum-exp [B, H, Sq] (f32; f64 for f64 inputs).
pub fn attention_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: AttnOptions,
) -> Result<(Tensor, Tensor)> {
    let op = Forward::NAME;
    check_float(op, q)?;
    check_same_dtype(op, q, k)?;
    check_same_dtype(op, q, v)?;
    let (qd, kd) = (q.dims(), k.dims());
    let ok = q.rank() == 3
        && k.rank() == 3
        && k.dims() == v.dims()
        && qd[0] == kd[0]
        && qd[2] == kd[2]
        && o.heads > 0
        && qd[2] % o.heads == 0;
    if !ok {
        return Err(crate::shape_err!(
            op,
            "q {:?}, k {:?}, v {:?} with {} heads",
            qd,
            kd,
            v.dims(),
            o.heads
        ));
    }
    let head_dim = qd[2] / o.heads;
    let spec = AttnSpec {
        batch: qd[0],
        heads: o.heads,
        q_len: qd[1],
        kv_len: kd[1],
        head_dim,
        causal: o.causal,
        scale: o.scale.unwrap_or(1.0 / (head_dim as f64).sqrt()),
    };
    let [out, lse]: [_; 2] = super::run(
        &Forward { spec },
        &[&q.storage(), &k.storage(), &v.storage()],
    )?
    .try_into()
    .map_err(|_| crate::Error::Msg("attention: expected 2 outputs".into()))?;
    let lse_t = Tensor::from_storage(lse, (spec.batch, spec.heads, spec.q_len))?;
    let (qc, kc, vc, lc) = (q.clone(), k.clone(), v.clone(), lse_t.clone());
    let y = record_fn(op, out, q.shape().clone(), &[q, k, v], move |y: &Tensor| {
        let o = y.clone();
        move |g: &Tensor, needs: &[bool]| {
            let inputs: [&Storage; 6] = [
                &qc.storage(),
                &kc.storage(),
                &vc.storage(),
                &o.storage(),
                &lc.storage(),
                &g.storage(),
            ];
            let grads = super::run(&Backward { spec }, &inputs)?;
            grads
                .into_iter()
                .zip([&qc, &kc, &vc])
                .zip(needs)
                .map(|((s, like), need)| {
                    need.then(|| Tensor::from_storage(s, like.shape().clone()))
                        .transpose()
                })
                .collect()
        }
    })?;
    Ok((y, lse_t))
}

/// (out, lse) from (q, k, v).
pub struct Forward {
    /// The shapes, mask and scale of the call.
    pub spec: AttnSpec,
}

/// (dq, dk, dv) from (q, k, v, out, lse, d_out).
pub struct Backward {
    /// The shapes, mask and scale of the forward this backward belongs to.
    pub spec: AttnSpec,
}

impl FloatFn for Forward {
    fn call<F: Float>(&self, x: &[&[F]]) -> Vec<Vec<F>> {
        let (o, lse) = forward(x[0], x[1], x[2], self.spec);
        vec![o, lse]
    }
}

impl FloatFn for Backward {
    fn call<F: Float>(&self, x: &[&[F]]) -> Vec<Vec<F>> {
        let (dq, dk, dv) = backward(x[0], x[1], x[2], x[3], x[4], x[5], self.spec);
        vec![dq, dk, dv]
    }
}

impl FusedKernel for Forward {
    const NAME: &'static str = "attention";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        // bf16: the output rounded back, the lse kept in f32.
        cpu_float(Self::NAME, self, inputs, &[true, false])
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
        let sfx = q.sfx(Self::NAME)?;
        q.same_dtype(Self::NAME, k)?;
        q.same_dtype(Self::NAME, v)?;
        let AttnSpec {
            batch: b,
            heads: h,
            q_len: sq,
            kv_len: skv,
            head_dim: d,
            causal,
            scale,
        } = self.spec;
        let out = q.empty(b * sq * h * d, q.dtype)?;
        let lse = q.empty(b * h * sq, DType::F32)?;
        if b * h * sq == 0 {
            return Ok(vec![out, lse]);
        }
        let kind = attn_kind(self.spec)?;
        if profile::enabled() {
            // fwd_flops walks the causal rows: only when someone is profiling
            let el = q.dtype.size_in_bytes() as f64;
            let qo = (b * h * sq * d) as f64;
            profile::set_work(
                flash::fwd_flops(b * h, sq, skv, d, causal),
                el * (2.0 * qo + 2.0 * (b * h * skv * d) as f64) + 4.0 * (b * h * sq) as f64,
            );
        }
        let scale = scale as f32;
        match kind {
            AttnKind::Flash => {
                let args = kn::FlashFwd {
                    q: q.ptr(),
                    k: k.ptr(),
                    v: v.ptr(),
                    out: out.ptr(),
                    lse: lse.ptr(),
                    heads: h,
                    sq,
                    skv,
                    causal,
                    scale,
                };
                if sfx == "bf16" && d == flash::HEAD_DIM {
                    // Tensor cores (the towers' shape, bf16): v4's double buffering pays from
                    // a few key tiles on (H200: vision 257 keys 0.210 vs 0.239 ms), v3 is
                    // faster on the text tower's 77 (0.031 vs 0.034 ms); BENCHMARKS.md.
                    let kernel = if skv > 128 {
                        "flash_fwd_tc4_d64_bf16"
                    } else {
                        "flash_fwd_tc3_d64_bf16"
                    };
                    q.run(kernel, flash::fwd_tc_config(b * h, sq), args)?;
                } else {
                    let cfg = flash::fwd_config(b * h, sq, d);
                    q.run(&format!("flash_fwd_d{d}_{sfx}"), cfg, args)?;
                }
            }
            AttnKind::Whole => q.run_grid(
                &format!("clam_attention_fwd_{sfx}"),
                kn::ClamAttentionFwd {
                    q: q.ptr(),
                    k: k.ptr(),
                    v: v.ptr(),
                    out: out.ptr(),
                    lse: lse.ptr(),
                    batch: b,
                    heads: h,
                    sq,
                    skv,
                    d,
                    causal,
                    scale,
                },
            )?,
        }
        Ok(vec![out, lse])
    }
}

impl FusedKernel for Backward {
    const NAME: &'static str = "attention_bwd";

    fn cpu(&self, inputs: &[&CpuStorage]) -> Result<Vec<CpuStorage>> {
        // bf16 tensors with an f32 lse: computed in f32, the gradients rounded back.
        cpu_float_bf16_via_f32(Self::NAME, self, inputs)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    fn cuda(&self, inputs: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
        let [q, k, v, o, lse, d_o]: [&CudaStorage; 6] = inputs
            .try_into()
            .map_err(|_| Error::Msg("attention_bwd: expected 6 inputs".into()))?;
        let sfx = q.sfx(Self::NAME)?;
        for t in [k, v, o, d_o] {
            q.same_dtype(Self::NAME, t)?;
        }
        let AttnSpec {
            batch: b,
            heads: h,
            q_len: sq,
            kv_len: skv,
            head_dim: d,
            causal,
            scale,
        } = self.spec;
        let dq = q.empty(b * sq * h * d, q.dtype)?;
        let (dk, dv) = (
            q.empty(b * skv * h * d, q.dtype)?,
            q.empty(b * skv * h * d, q.dtype)?,
        );
        if b * h * sq == 0 {
            return Ok(vec![dq, dk, dv]);
        }
        if skv == 0 {
            // No keys: nothing depends on Q (and no grid of key blocks to launch).
            return Ok(vec![q.zeros_like(b * sq * h * d, q.dtype)?, dk, dv]);
        }
        let scale = scale as f32;
        let dkdv = |delta: &CudaStorage| kn::FlashDkdv {
            q: q.ptr(),
            k: k.ptr(),
            v: v.ptr(),
            lse: lse.ptr(),
            delta: delta.ptr(),
            dout: d_o.ptr(),
            dk: dk.ptr(),
            dv: dv.ptr(),
            heads: h,
            sq,
            skv,
            causal,
            scale,
        };
        match attn_kind(self.spec)? {
            AttnKind::Flash
                if sfx == "bf16"
                    && flash::BWD_TC_HEAD_DIMS.contains(&d)
                    && flash::bwd_policy()? != Some(1) =>
            {
                // Tensor cores: dQ (which also writes the row deltas) then dK/dV, no atomics.
                let pick =
                    |len| flash::bwd_policy().map(|p| p.unwrap_or(flash::bwd_tc_variant(len)));
                let delta = q.empty(b * h * sq, DType::F32)?;
                // Work per kernel for the profiler: dQ recomputes S and dP and forms dS·K (3
                // products), dK/dV recomputes S and dP and forms Pᵀ·dO and dSᵀ·Q (4); a product
                // is half the forward's FLOPs.
                let (fwd_fl, el) = if profile::enabled() {
                    (
                        flash::fwd_flops(b * h, sq, skv, d, causal),
                        q.dtype.size_in_bytes() as f64,
                    )
                } else {
                    (0.0, 0.0)
                };
                let (qo, kv, rows) = (
                    (b * h * sq * d) as f64,
                    (b * h * skv * d) as f64,
                    (b * h * sq) as f64,
                );
                profile::set_work(1.5 * fwd_fl, el * (4.0 * qo + 2.0 * kv) + 8.0 * rows);
                let (dq_kernel, _) = flash::bwd_tc_kernels(pick(skv)?, d);
                let args = kn::FlashBwdDq {
                    q: q.ptr(),
                    k: k.ptr(),
                    v: v.ptr(),
                    o: o.ptr(),
                    lse: lse.ptr(),
                    dout: d_o.ptr(),
                    delta: delta.ptr(),
                    dq: dq.ptr(),
                    heads: h,
                    sq,
                    skv,
                    causal,
                    scale,
                };
                q.run(&dq_kernel, flash::bwd_tc_config(b * h, sq), args)?;
                profile::set_work(2.0 * fwd_fl, el * (2.0 * qo + 4.0 * kv) + 8.0 * rows);
                let (_, dkdv_kernel) = flash::bwd_tc_kernels(pick(sq)?, d);
                q.run(&dkdv_kernel, flash::bwd_tc_config(b * h, skv), dkdv(&delta))?;
            }
            AttnKind::Flash => {
                let delta = q.empty(b * h * sq, DType::F32)?;
                q.run_grid(
                    &format!("flash_delta_{sfx}"),
                    kn::FlashDelta {
                        o: o.ptr(),
                        dout: d_o.ptr(),
                        delta: delta.ptr(),
                        batch: b,
                        heads: h,
                        sq,
                        d,
                    },
                )?;
                let args = kn::FlashDq {
                    q: q.ptr(),
                    k: k.ptr(),
                    v: v.ptr(),
                    lse: lse.ptr(),
                    delta: delta.ptr(),
                    dout: d_o.ptr(),
                    dq: dq.ptr(),
                    heads: h,
                    sq,
                    skv,
                    causal,
                    scale,
                };
                q.run(
                    &format!("flash_dq_d{d}_{sfx}"),
                    flash::dq_config(b * h, sq, d),
                    args,
                )?;
                q.run(
                    &format!("flash_dkdv_d{d}_{sfx}"),
                    flash::dkdv_config(b * h, skv, d),
                    dkdv(&delta),
                )?;
            }
            AttnKind::Whole => q.run_grid(
                &format!("clam_attention_bwd_{sfx}"),
                kn::ClamAttentionBwd {
                    q: q.ptr(),
                    k: k.ptr(),
                    v: v.ptr(),
                    o: o.ptr(),
                    lse: lse.ptr(),
                    dout: d_o.ptr(),
                    dq: dq.ptr(),
                    dk: dk.ptr(),
                    dv: dv.ptr(),
                    batch: b,
                    heads: h,
                    sq,
                    skv,
                    d,
                    causal,
                    scale,
                },
            )?,
        }
        Ok(vec![dq, dk, dv])
    }
}

/// Which CUDA kernels run an attention.
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttnKind {
    /// Flash attention (head dims 16, 32, 64).
    Flash,
    /// The whole sequence in shared memory (`clam_attention_*`: few keys, any head dim).
    Whole,
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
fn attn_kind(spec: AttnSpec) -> Result<AttnKind> {
    if flash::HEAD_DIMS.contains(&spec.head_dim) {
        return Ok(AttnKind::Flash);
    }
    // The backward holds more than the forward: both must fit.
    let smem = kn::clam_smem_bytes(spec.q_len, spec.kv_len, spec.head_dim, true);
    if spec.kv_len <= 64 && smem <= 227 * 1024 {
        return Ok(AttnKind::Whole);
    }
    Err(Error::Cuda(format!(
        "attention with head dim {} and {} keys has no CUDA kernel (flash: head dim 16, 32 or 64; whole-sequence: ≤ 64 keys)",
        spec.head_dim, spec.kv_len
    )))
}

// The CPU reference.

struct Head<'a, F> {
    q: Mat<'a, F>,
    k: Mat<'a, F>,
    v: Mat<'a, F>,
}

fn head<'a, F>(q: &'a [F], k: &'a [F], v: &'a [F], s: &AttnSpec, bh: usize) -> Head<'a, F> {
    let (b, h) = (bh / s.heads, bh % s.heads);
    let hd = s.heads * s.head_dim;
    let qo = b * s.q_len * hd + h * s.head_dim;
    let ko = b * s.kv_len * hd + h * s.head_dim;
    let m = |d: &'a [F], off| Mat {
        data: d,
        off,
        rs: hd,
        cs: 1,
    };
    Head {
        q: m(q, qo),
        k: m(k, ko),
        v: m(v, ko),
    }
}

/// Is key j hidden from query i?
#[inline]
fn masked(s: &AttnSpec, i: usize, j: usize) -> bool {
    s.causal && j + s.q_len > i + s.kv_len
}

/// scale·Q·Kᵀ with the causal mask applied, [q_len, kv_len].
fn scores<F: Float>(hd: &Head<'_, F>, s: &AttnSpec) -> Vec<F> {
    let (n, m) = (s.q_len, s.kv_len);
    let mut sc = vec![F::zero(); n * m];
    gemm_into(
        n,
        m,
        s.head_dim,
        hd.q,
        hd.k.t(),
        &mut sc,
        0,
        m,
        F::from_f(s.scale),
        false,
        false,
    );
    if s.causal {
        for i in 0..n {
            for j in 0..m {
                if masked(s, i, j) {
                    sc[i * m + j] = F::neg_infinity();
                }
            }
        }
    }
    sc
}

/// Writes a head-local [len, head_dim] block back into the [batch, len, heads·head_dim] layout.
fn scatter<F: Float>(dst: &mut [F], blocks: Vec<Vec<F>>, len: usize, s: &AttnSpec) {
    let hd = s.heads * s.head_dim;
    for (bh, blk) in blocks.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for i in 0..len {
            let o = b * len * hd + i * hd + h * s.head_dim;
            dst[o..o + s.head_dim].copy_from_slice(&blk[i * s.head_dim..(i + 1) * s.head_dim]);
        }
    }
}

/// The CPU reference forward. q is [batch, q_len, heads·head_dim], k and v are
/// [batch, kv_len, heads·head_dim], all row-major; returns (out in q's layout, lse
/// [batch, heads, q_len]). `lse` is the natural log of each row's sum of exp(scores); a row
/// whose keys are all masked has output 0 and lse −∞. One rayon task per (batch, head).
pub fn forward<F: Float>(q: &[F], k: &[F], v: &[F], s: AttnSpec) -> (Vec<F>, Vec<F>) {
    let (n, m, d) = (s.q_len, s.kv_len, s.head_dim);
    let per_head: Vec<(Vec<F>, Vec<F>)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let hd = head(q, k, v, &s, bh);
            let mut p = scores(&hd, &s);
            let lse: Vec<F> = p
                .chunks_mut(m.max(1))
                .take(n)
                .map(|r| softmax_row(r))
                .collect();
            let mut o = vec![F::zero(); n * d];
            gemm_into(
                n,
                d,
                m,
                Mat::rm(&p, m, false),
                hd.v,
                &mut o,
                0,
                d,
                F::one(),
                false,
                false,
            );
            (o, lse)
        })
        .collect();
    let mut out = vec![F::zero(); q.len()];
    let mut lse = Vec::with_capacity(s.batch * s.heads * n);
    let mut blocks = Vec::with_capacity(per_head.len());
    for (o, l) in per_head {
        blocks.push(o);
        lse.extend(l);
    }
    scatter(&mut out, blocks, n, &s);
    (out, lse)
}

/// The CPU reference backward: (dq, dk, dv) in the layouts of q, k and v, from the forward's
/// inputs, its output `o`, its `lse` and the output gradient `d_o`. The probabilities are
/// recomputed from `lse` (never stored): dS = P ∘ (dP − rowsum(dO ∘ O)).
#[allow(clippy::too_many_arguments)]
pub fn backward<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    o: &[F],
    lse: &[F],
    d_o: &[F],
    s: AttnSpec,
) -> (Vec<F>, Vec<F>, Vec<F>) {
    let (n, m, d) = (s.q_len, s.kv_len, s.head_dim);
    let hdim = s.heads * d;
    let per_head: Vec<(Vec<F>, Vec<F>, Vec<F>)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let hd = head(q, k, v, &s, bh);
            let od = Mat {
                data: d_o,
                off: hd.q.off,
                rs: hdim,
                cs: 1,
            };
            // P recomputed from the saved log-sum-exp.
            let mut p = scores(&hd, &s);
            for i in 0..n {
                let l = lse[bh * n + i];
                let row = &mut p[i * m..(i + 1) * m];
                if l == F::neg_infinity() {
                    row.iter_mut().for_each(|x| *x = F::zero());
                } else {
                    F::exp_shift_sum(row, l);
                }
            }
            let mut dv = vec![F::zero(); m * d];
            gemm_into(
                m,
                d,
                n,
                Mat::rm(&p, m, true),
                od,
                &mut dv,
                0,
                d,
                F::one(),
                false,
                false,
            );
            let mut dp = vec![F::zero(); n * m];
            gemm_into(n, m, d, od, hd.v.t(), &mut dp, 0, m, F::one(), false, false);
            // dS = P ∘ (dP − rowsum(dO ∘ O)).
            for i in 0..n {
                let off = hd.q.off + i * hdim;
                let di: F = (0..d).map(|c| d_o[off + c] * o[off + c]).sum();
                for j in 0..m {
                    dp[i * m + j] = p[i * m + j] * (dp[i * m + j] - di);
                }
            }
            let sc = F::from_f(s.scale);
            let mut dq = vec![F::zero(); n * d];
            gemm_into(
                n,
                d,
                m,
                Mat::rm(&dp, m, false),
                hd.k,
                &mut dq,
                0,
                d,
                sc,
                false,
                false,
            );
            let mut dk = vec![F::zero(); m * d];
            gemm_into(
                m,
                d,
                n,
                Mat::rm(&dp, m, true),
                hd.q,
                &mut dk,
                0,
                d,
                sc,
                false,
                false,
            );
            (dq, dk, dv)
        })
        .collect();
    let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
    for (a, b, c) in per_head {
        dqs.push(a);
        dks.push(b);
        dvs.push(c);
    }
    let mut dq = vec![F::zero(); q.len()];
    let mut dk = vec![F::zero(); k.len()];
    let mut dv = vec![F::zero(); v.len()];
    scatter(&mut dq, dqs, n, &s);
    scatter(&mut dk, dks, m, &s);
    scatter(&mut dv, dvs, m, &s);
    (dq, dk, dv)
}
