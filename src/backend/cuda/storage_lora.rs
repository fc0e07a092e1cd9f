//! The LoRA-linear on CUDA storage: which GEMM path computes it — the fused kernels of
//! `kernels/lora_gemm.cu` or cuBLAS (PEFT's three GEMMs and adds) — chosen per shape at run
//! time, and the fused kernels' launches.
//!
//! `SD2_LORA_GEMM` picks the policy: `auto` (default), `cublas` (PEFT's structure throughout,
//! the LoRA factors' gradients included: the fallback when our kernels fail on a GPU), `fused` (the best fused
//! variant for the shape), `v1`, `v2`, `v3` (that variant where it supports the shape, else the
//! next fused one). Under `auto` on a GPU, the first call of each shape runs every candidate
//! once, drops any whose output differs from cuBLAS's (printing why: a kernel not yet verified
//! on this GPU stays harmless), times the rest (CUDA events, median of 5) and keeps the fastest
//! for the process. The simulator (`cuda:sim`) always runs the fused kernels, so every engine
//! test exercises them.
use std::collections::HashMap;
use std::sync::Mutex;

use super::super::lora_gemm::{self, hopper, Epilogue};
use super::*;
use crate::backend::cpu::CpuStorage;
use crate::storage::{Storage, StorageCell};

/// One way to compute a LoRA-linear product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraPath {
    /// PEFT's structure: x·Wᵀ and s·S·Bᵀ (in the backward dY·W and dS·A) as separate plain
    /// GEMMs (cuBLAS, or the SIMT kernel where cuBLAS cannot load), then adds. The reference
    /// the fused paths are checked against.
    Cublas,
    /// `lora_gemm::V1`: mma.sync, 64×64 tiles, any shape.
    V1,
    /// `lora_gemm::V2`: mma.sync, 128×128 tiles, a 4-stage cp.async ring.
    V2,
    /// Hopper (sm_90a): the forward, and dX through it with Wᵀ.
    V3,
}

impl LoraPath {
    /// The label in reports (`lora_choices`, warnings): `cuBLAS`, or the kernel variant's name.
    pub fn name(self) -> &'static str {
        match self {
            LoraPath::Cublas => "cuBLAS",
            LoraPath::V1 => lora_gemm::V1.name,
            LoraPath::V2 => lora_gemm::V2.name,
            LoraPath::V3 => hopper::NAME,
        }
    }
    fn variant(self) -> Option<lora_gemm::Variant> {
        match self {
            LoraPath::V1 => Some(lora_gemm::V1),
            LoraPath::V2 => Some(lora_gemm::V2),
            _ => None,
        }
    }
}

/// The shape a choice is cached under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LoraKey {
    pub forward: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
    pub bias: bool,
    /// A residual added in the epilogue (in the backward: the gradient dX already has).
    pub residual: bool,
    /// Forward: bias + quick_gelu with the pre-activation written too (fc1); backward: dX
    /// times quick_gelu′ of it (fc2's input gradient is fc1's output gradient).
    pub gelu: bool,
    /// Backward: the LoRA term under dropout added in the epilogue (`DropLow`).
    pub dropout: bool,
}

/// The LoRA branch's input gradient under dropout, drop′(dS·A), added in the dX GEMM's
/// epilogue: dS [m, rank] (scaled), A [rank, k], the mask of (p, seed) by element index.
#[derive(Clone, Copy)]
pub(crate) struct DropLow<'a> {
    pub ds: &'a CudaStorage,
    pub a: &'a CudaStorage,
    pub rank: usize,
    pub p: f32,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Auto,
    Only(LoraPath),
    Fused,
}

/// `SD2_LORA_GEMM`, read once per process (every linear layer asks).
fn policy() -> Result<Policy> {
    static P: std::sync::OnceLock<std::result::Result<Policy, String>> = std::sync::OnceLock::new();
    P.get_or_init(|| read_policy().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::Msg)
}

/// Whether `SD2_LORA_GEMM=cublas` asks for PEFT's structure throughout: then the LoRA factors'
/// gradients also come from cuBLAS GEMMs, not from `lora_grads` or the split low-rank kernels.
pub(crate) fn cublas_only() -> bool {
    matches!(policy(), Ok(Policy::Only(LoraPath::Cublas)))
}

fn read_policy() -> Result<Policy> {
    match std::env::var("SD2_LORA_GEMM").as_deref().map(str::trim) {
        Err(_) | Ok("") | Ok("auto") => Ok(Policy::Auto),
        Ok("cublas") => Ok(Policy::Only(LoraPath::Cublas)),
        Ok("fused") => Ok(Policy::Fused),
        Ok("v1") => Ok(Policy::Only(LoraPath::V1)),
        Ok("v2") => Ok(Policy::Only(LoraPath::V2)),
        Ok("v3") => Ok(Policy::Only(LoraPath::V3)),
        Ok(other) => Err(Error::Msg(format!(
            "SD2_LORA_GEMM={other}: expected auto, cublas, fused, v1, v2 or v3"
        ))),
    }
}

type Choices = HashMap<(usize, LoraKey), LoraPath>;
static CHOICES: Mutex<Option<Choices>> = Mutex::new(None);

/// The paths chosen so far in this process: ((ordinal, shape), path), for reports.
pub fn lora_choices() -> Vec<(usize, String, &'static str)> {
    let g = CHOICES.lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<_> = g
        .iter()
        .flatten()
        .map(|((o, k), p)| {
            (
                *o,
                format!(
                    "{} m{} n{} k{} r{}{}{}{}{}",
                    if k.forward { "fwd" } else { "bwd dX" },
                    k.m,
                    k.n,
                    k.k,
                    k.r,
                    if k.bias { " +bias" } else { "" },
                    if k.residual { " +residual" } else { "" },
                    if k.gelu { " +gelu" } else { "" },
                    if k.dropout { " +dropout" } else { "" }
                ),
                p.name(),
            )
        })
        .collect();
    v.sort();
    v
}

impl CudaStorage {
    /// The fused candidates for a shape, fastest-expected first.
    fn lora_candidates(&self, key: &LoraKey, operands: &[&CudaStorage]) -> Vec<LoraPath> {
        let mut c = vec![];
        // The forward's depth is k; dX's is n (with Wᵀ [k, n] and, without dropout, the LoRA
        // term as depth r; under dropout it rides in the epilogue instead).
        let (depth, r) = if key.forward {
            (key.k, key.r)
        } else {
            (key.n, if key.dropout { 0 } else { key.r })
        };
        let v3 = self.runner.has_hopper()
            && hopper::supports(depth, r)
            && operands.iter().all(|s| s.is_aligned(16));
        if v3 && key.forward {
            c.push(LoraPath::V3);
        }
        c.extend([LoraPath::V2, LoraPath::V1]);
        // dX on V3 transposes W for every call (2·|W| more traffic than V2): a candidate the GPU
        // measures, not the simulator's or the plan's default.
        if v3 && !key.forward {
            c.push(LoraPath::V3);
        }
        c
    }

    /// The path for `key`: forced by `SD2_LORA_GEMM`, cached, or measured now with `run`
    /// (which computes the product by the given path on the given operands — in the order of
    /// `operands`: x or dY, W, then S and B or dS and A — and returns it).
    pub(crate) fn lora_choose(
        &self,
        key: LoraKey,
        operands: &[&CudaStorage],
        run: &LoraRun,
    ) -> Result<LoraPath> {
        let cands = self.lora_candidates(&key, operands);
        match policy()? {
            Policy::Only(LoraPath::Cublas) => return Ok(LoraPath::Cublas),
            Policy::Only(p) => {
                let at = cands.iter().position(|c| *c == p).unwrap_or(0);
                return Ok(cands[at]);
            }
            Policy::Fused => return Ok(cands[0]),
            Policy::Auto => {}
        }
        #[cfg(feature = "cuda")]
        if let Runner::Gpu(g) = &self.runner {
            let ck = (self.ordinal, key);
            if let Some(p) = CHOICES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashMap::new)
                .get(&ck)
            {
                // The shape's choice, unless this call's operands rule it out (v3 needs 16-byte
                // aligned operands; a view of the same shape may not be): then cuBLAS.
                if *p == LoraPath::Cublas || cands.contains(p) {
                    return Ok(*p);
                }
                return Ok(LoraPath::Cublas);
            }
            let p = measure(g, &key, &cands, operands, run)?;
            CHOICES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(HashMap::new)
                .insert(ck, p);
            return Ok(p);
        }
        // The simulator: the fused kernels, always.
        let _ = run;
        Ok(cands[0])
    }

    /// y = x·Wᵀ (+ b) + scale·S·Bᵀ (+ res) by a fused kernel (`low` = (S [m, r], B [n, r])):
    /// [y], or with `gelu` (which needs the bias) [quick_gelu(h)] and, with `keep_pre` (a
    /// backward will need it), h too: [quick_gelu(h), h] for h = x·Wᵀ + b + ….
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lora_fused_fwd(
        &self,
        path: LoraPath,
        w: &CudaStorage,
        bias: Option<&CudaStorage>,
        low: Option<(&CudaStorage, &CudaStorage)>,
        res: Option<&CudaStorage>,
        gelu: bool,
        keep_pre: bool,
        scale: f32,
        (m, n, k, r): (usize, usize, usize, usize),
    ) -> Result<Vec<CudaStorage>> {
        let y = self.empty(m * n, DType::BF16)?;
        let pre = if gelu && keep_pre {
            Some(self.empty(m * n, DType::BF16)?)
        } else {
            None
        };
        let epi = match (bias.is_some(), gelu) {
            (true, true) => Epilogue::BiasGelu,
            (true, false) if res.is_some() => Epilogue::BiasResidual,
            (true, false) => Epilogue::Bias,
            (false, false) => Epilogue::None,
            (false, true) => {
                return Err(Error::Cuda(
                    "lora gemm: the gelu epilogue needs a bias".into(),
                ))
            }
        } as i32;
        if gelu && res.is_some() {
            return Err(Error::Cuda(
                "lora gemm: gelu and a residual in one epilogue".into(),
            ));
        }
        let outs = |y: CudaStorage, pre: Option<CudaStorage>| -> Vec<CudaStorage> {
            std::iter::once(y).chain(pre).collect()
        };
        if m * n == 0 {
            return Ok(outs(y, pre));
        }
        let r = if low.is_some() { r } else { 0 };
        let opt = |s: Option<&CudaStorage>| s.map_or(Arg::null(), |s| s.ptr());
        let (mf, nf, kf, rf) = (m as f64, n as f64, k as f64, r as f64);
        let extra = res.is_some() as u8 as f64 + pre.is_some() as u8 as f64;
        crate::profile::set_work(
            2.0 * mf * nf * (kf + rf),
            2.0 * (mf * kf + nf * kf + mf * rf + nf * rf + mf * nf * (1.0 + extra)),
        );
        if path == LoraPath::V3 {
            let [mx, mw, ms, mb] = hopper::maps(m, n, k, r);
            let (s, b) = low.unwrap_or((self, w));
            let tm = |st: &CudaStorage, map| -> Result<Arg> {
                Ok(Arg::Map(self.runner.tensor_map(st.buf.addr(), map)?))
            };
            let args = kn::LoraGemm3Fwd {
                tm_x: tm(self, mx)?,
                tm_w: tm(w, mw)?,
                tm_s: tm(s, ms)?,
                tm_b: tm(b, mb)?,
                bias: opt(bias),
                res: opt(res),
                pre: opt(pre.as_ref()),
                aux: Arg::null(),
                lds: Arg::null(),
                la: Arg::null(),
                lr: 0,
                lp: 0.0,
                lseed: 0,
                y: y.ptr(),
                m,
                n,
                k,
                r,
                scale,
                epilogue: epi,
            };
            self.run(hopper::KERNEL, hopper::config(m, n), args)?;
            return Ok(outs(y, pre));
        }
        let v = path.variant().ok_or_else(|| {
            Error::Cuda(format!("lora gemm: {} is not a fused path", path.name()))
        })?;
        let args = kn::LoraGemmFwd {
            x: self.ptr(),
            w: w.ptr(),
            bias: opt(bias),
            s_low: opt(low.map(|l| l.0)),
            lb: opt(low.map(|l| l.1)),
            res: opt(res),
            pre: opt(pre.as_ref()),
            y: y.ptr(),
            m,
            n,
            k,
            r,
            scale,
            epilogue: epi,
        };
        self.run(v.fwd, v.config(m, n), args)?;
        Ok(outs(y, pre))
    }

    /// dX = dY·W + scale·dS·A by a fused kernel (self = dY [m, n], W [n, k], dS [m, r],
    /// A [r, k]); without `low`, dX = dY·W. Then, in the epilogue, + drop′(dS·A) for
    /// `drop_low`, times quick_gelu′(pre) for `gelu_pre` [m, k] and + `acc` [m, k] (the
    /// gradient the input already has). V3 wants Wᵀ: with `w_cell` (W's storage, whose read
    /// lock the caller holds: a frozen weight) it is derived once and kept beside W until W is
    /// written; without, it is transposed for this call.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lora_fused_dx(
        &self,
        path: LoraPath,
        w: &CudaStorage,
        w_cell: Option<&StorageCell>,
        low: Option<(&CudaStorage, &CudaStorage)>,
        drop_low: Option<DropLow<'_>>,
        acc: Option<&CudaStorage>,
        gelu_pre: Option<&CudaStorage>,
        scale: f32,
        (m, n, k, r): (usize, usize, usize, usize),
    ) -> Result<CudaStorage> {
        let v = path.variant();
        if v.is_none() && path != LoraPath::V3 {
            return Err(Error::Cuda(format!(
                "lora gemm backward: {} has no dX kernel",
                path.name()
            )));
        }
        let dx = self.empty(m * k, DType::BF16)?;
        if m * k == 0 {
            return Ok(dx);
        }
        let opt = |s: Option<&CudaStorage>| s.map_or(Arg::null(), |s| s.ptr());
        for (what, t) in [
            ("accumulated gradient", acc),
            ("gelu pre-activation", gelu_pre),
        ] {
            if let Some(t) = t {
                same_len(what, t.len, m * k)?;
                self.same_dtype(what, t)?;
            }
        }
        if let Some(d) = &drop_low {
            if d.rank > kn::LORA_LOWRANK_MAX_RANK {
                return Err(Error::Cuda(format!(
                    "lora gemm backward: the dropout epilogue takes rank ≤ {}, not {}",
                    kn::LORA_LOWRANK_MAX_RANK,
                    d.rank
                )));
            }
            same_len("lora gemm backward dS", d.ds.len, m * d.rank)?;
            same_len("lora gemm backward A", d.a.len, d.rank * k)?;
        }
        let (mf, nf, kf) = (m as f64, n as f64, k as f64);
        let rf = (if low.is_some() { r } else { 0 }) as f64;
        let dr = drop_low.as_ref().map_or(0.0, |d| d.rank as f64);
        let extra = acc.is_some() as u8 as f64 + gelu_pre.is_some() as u8 as f64;
        // Attached to the next launch: called right before the GEMM's own.
        let work = || {
            crate::profile::set_work(
                2.0 * mf * kf * (nf + rf + dr),
                2.0 * (mf * nf + nf * kf + (mf + kf) * (rf + dr) + mf * kf * (1.0 + extra)),
            )
        };
        let epilogue = if gelu_pre.is_some() {
            Epilogue::GeluBwd
        } else {
            Epilogue::None
        } as i32;
        let Some(v) = v else {
            // V3: dX = dY·(Wᵀ)ᵀ through the forward's wgmma kernel, with Wᵀ [k, n] (and the
            // LoRA depth term's Aᵀ [k, r]) transposed here: K-major operands for TMA.
            let r = if low.is_some() { r } else { 0 };
            let transpose = || w.permute(&Shape::from(vec![n, k]), &[1, 0]);
            let (kept, own);
            let wt =
                match w_cell {
                    Some(cell) => {
                        kept = cell.derived(wt_key(n, k), || Ok(Storage::Cuda(transpose()?)))?;
                        match &*kept {
                            Storage::Cuda(c) if c.len == n * k => c,
                            _ => return Err(Error::Cuda(
                                "lora gemm backward: a kept Wᵀ is not W's transpose on this device"
                                    .into(),
                            )),
                        }
                    }
                    None => {
                        own = transpose()?;
                        &own
                    }
                };
            let at = low
                .map(|(_, a)| a.permute(&Shape::from(vec![r, k]), &[1, 0]))
                .transpose()?;
            let [mx, mw, ms, mb] = hopper::maps(m, k, n, r);
            let (s, b) = match (low, at.as_ref()) {
                (Some((ds, _)), Some(at)) => (ds, at),
                _ => (self, wt),
            };
            let tm = |st: &CudaStorage, map| -> Result<Arg> {
                Ok(Arg::Map(self.runner.tensor_map(st.buf.addr(), map)?))
            };
            let args = kn::LoraGemm3Fwd {
                tm_x: tm(self, mx)?,
                tm_w: tm(wt, mw)?,
                tm_s: tm(s, ms)?,
                tm_b: tm(b, mb)?,
                bias: Arg::null(),
                res: opt(acc),
                pre: Arg::null(),
                aux: opt(gelu_pre),
                lds: opt(drop_low.map(|d| d.ds)),
                la: opt(drop_low.map(|d| d.a)),
                lr: drop_low.map_or(0, |d| d.rank),
                lp: drop_low.map_or(0.0, |d| d.p),
                lseed: drop_low.map_or(0, |d| d.seed),
                y: dx.ptr(),
                m,
                n: k,
                k: n,
                r,
                scale,
                epilogue,
            };
            work();
            self.run(hopper::KERNEL, hopper::config(m, k), args)?;
            return Ok(dx);
        };
        // The output is [m, k] and the contraction runs over n.
        work();
        self.run(
            v.bwd,
            v.config(m, k),
            kn::LoraGemmBwd {
                x: self.ptr(),
                w: w.ptr(),
                s_low: opt(low.map(|l| l.0)),
                lb: opt(low.map(|l| l.1)),
                lds: opt(drop_low.map(|d| d.ds)),
                la: opt(drop_low.map(|d| d.a)),
                lr: drop_low.map_or(0, |d| d.rank),
                lp: drop_low.map_or(0.0, |d| d.p),
                lseed: drop_low.map_or(0, |d| d.seed),
                res: opt(acc),
                aux: opt(gelu_pre),
                y: dx.ptr(),
                m,
                n: k,
                k: n,
                r: if low.is_some() { r } else { 0 },
                scale,
                epilogue,
            },
        )?;
        Ok(dx)
    }
}

/// The key of W's kept transpose (`StorageCell::derived`) for W [n, k].
pub(crate) fn wt_key(n: usize, k: usize) -> crate::storage::DerivedKey {
    ("lora dX Wᵀ", n, k)
}

/// Computes a LoRA-linear product by a path on operands given in `lora_choose`'s order: its
/// outputs (y, and fc1's pre-activation with the gelu epilogue).
pub(super) type LoraRun<'a> = dyn Fn(LoraPath, &[&CudaStorage]) -> Result<Vec<CudaStorage>> + 'a;

/// Random operands of the same shapes and dtypes as `operands` (x or dY, W, then S and B or dS
/// and A), scaled so that the main and the low-rank terms are of similar size: a fused kernel
/// that gets either wrong differs from cuBLAS by a good fraction of max |Y|. The call's own
/// operands cannot serve — LoRA B is zero until the first optimizer step, which would hide a
/// wrong low-rank tile.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // measure (GPU) and the tests
pub(super) fn probe_operands(key: &LoraKey, operands: &[&CudaStorage]) -> Result<Vec<CudaStorage>> {
    let depth = if key.forward { key.k } else { key.n };
    operands
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let gain = match i {
                1 => 1.0 / (depth.max(1) as f32).sqrt(),
                2 => 1.0 / (key.r.max(1) as f32).sqrt(),
                _ => 1.0,
            };
            // splitmix64 of the index: uniform in [-1, 1), fast enough for 30 M elements.
            let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1);
            let val = |j: usize| {
                let mut z = seed.wrapping_add((j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * gain
            };
            let host = match op.dtype {
                DType::BF16 => {
                    CpuStorage::BF16((0..op.len).map(|j| half::bf16::from_f32(val(j))).collect())
                }
                DType::F32 => CpuStorage::F32((0..op.len).map(val).collect()),
                other => {
                    return Err(Error::Cuda(format!(
                        "lora gemm check: operand {i} has dtype {other}"
                    )))
                }
            };
            CudaStorage::from_cpu(&host, op.ordinal)
        })
        .collect()
}

/// Each candidate's verdict on random operands (`probe_operands`) against the cuBLAS path:
/// `Ok(())` when its result agrees to 2e-2 of max |Y|, else why not — a launch or encode error
/// included (a candidate that cannot run is not used; it never fails the product).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn screen(
    key: &LoraKey,
    cands: &[LoraPath],
    operands: &[&CudaStorage],
    run: &LoraRun,
) -> Result<Vec<(LoraPath, std::result::Result<(), String>)>> {
    let probe = probe_operands(key, operands)?;
    let probe: Vec<&CudaStorage> = probe.iter().collect();
    // Every output, one after the other.
    let read = |outs: &[CudaStorage]| -> Result<Vec<f32>> {
        let mut all = vec![];
        for s in outs {
            match s.to_cpu()? {
                CpuStorage::BF16(v) => all.extend(v.iter().map(|x| x.to_f32())),
                CpuStorage::F32(v) => all.extend(v),
                other => {
                    return Err(Error::Cuda(format!(
                        "lora gemm check: unexpected {}",
                        other.dtype()
                    )))
                }
            }
        }
        Ok(all)
    };
    let want = read(&run(LoraPath::Cublas, &probe)?)?;
    let peak = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    Ok(cands
        .iter()
        .map(|&p| {
            let verdict = match run(p, &probe).and_then(|y| read(&y)) {
                Err(e) => Err(format!("failed to run ({e})")),
                Ok(got) if got.len() != want.len() => {
                    Err(format!("{} outputs, cuBLAS {}", got.len(), want.len()))
                }
                Ok(got) => {
                    let diff = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    let rel = diff / peak;
                    if rel.is_nan() || rel >= 2e-2 {
                        Err(format!(
                            "differs from cuBLAS by {rel:.2e} (relative to max |Y|) on random operands"
                        ))
                    } else {
                        Ok(())
                    }
                }
            };
            (p, verdict)
        })
        .collect())
}

/// Screens the candidates on random operands (`screen`), times cuBLAS and those that pass
/// (CUDA events, median of 5) and returns the fastest. A candidate that fails to run or to
/// agree is reported and not used.
#[cfg(feature = "cuda")]
fn measure(
    g: &std::sync::Arc<super::super::gpu::Gpu>,
    key: &LoraKey,
    cands: &[LoraPath],
    operands: &[&CudaStorage],
    run: &LoraRun,
) -> Result<LoraPath> {
    if !g.has_cublas() {
        // Without cuBLAS the "cuBLAS" path is the SIMT GEMM: the fused kernels win.
        return Ok(cands[0]);
    }
    let verdicts = screen(key, cands, operands, run)?;
    let time = |p: LoraPath| -> Result<f64> {
        run(p, operands)?; // warm-up
        let mut t = vec![];
        for _ in 0..5 {
            t.push(g.time_ms(|| run(p, operands).map(drop))? as f64);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[2])
    };
    let mut best = (LoraPath::Cublas, time(LoraPath::Cublas)?);
    for (p, verdict) in verdicts {
        let t = verdict.and_then(|()| time(p).map_err(|e| format!("failed to run ({e})")));
        match t {
            Ok(t) if t < best.1 => best = (p, t),
            Ok(_) => {}
            Err(why) => log::warn!(
                "lora gemm {} {why} at {key:?} on {}: not used",
                p.name(),
                g.name
            ),
        }
    }
    Ok(best.0)
}

#[cfg(all(test, feature = "cuda-sim"))]
mod tests {
    use super::*;
    use crate::backend::MatmulSpec;

    fn sim(v: &[f32]) -> CudaStorage {
        let h = v.iter().map(|x| half::bf16::from_f32(*x)).collect();
        CudaStorage::from_cpu(&CpuStorage::BF16(h), Device::SIM_ORDINAL).unwrap()
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    fn host(s: &CudaStorage) -> Vec<f32> {
        match s.to_cpu().unwrap() {
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            other => panic!("unexpected {}", other.dtype()),
        }
    }

    /// The step-0 blind spot: with B = 0 (a fresh adapter) a kernel that drops the low-rank
    /// term agrees with cuBLAS on the call's operands; the screen runs random operands, so it
    /// is rejected there. A candidate that fails to launch is "not used", not an error.
    /// dX on tensor cores: V3 (the forward's wgmma kernel on Wᵀ) gives V2's dX — with the LoRA
    /// term as depth, under dropout in the epilogue, with quick_gelu′ and the accumulated
    /// gradient — to bf16 rounding (V2 itself is held to an f64 reference in
    /// tests/sim_kernels.rs). Shapes with tails in every dimension.
    #[test]
    fn v3_dx_matches_v2() {
        for &(m, n, k, r, drop, epi) in &[
            (70usize, 40usize, 72usize, 8usize, false, false),
            (70, 40, 72, 8, false, true),
            (37, 48, 300, 8, true, true),
            (33, 64, 40, 0, false, true),
        ] {
            let dy = sim(&values(m * n, 1));
            let w = sim(&values(n * k, 2).iter().map(|v| v * 0.3).collect::<Vec<_>>());
            let ds = sim(&values(m * r.max(1), 3));
            let a = sim(&values(r.max(1) * k, 4)
                .iter()
                .map(|v| v * 0.3)
                .collect::<Vec<_>>());
            let acc = sim(&values(m * k, 5));
            let h = sim(&values(m * k, 6).iter().map(|v| v * 2.0).collect::<Vec<_>>());
            let low = (r > 0 && !drop).then_some((&ds, &a));
            let dl = (r > 0 && drop).then_some(DropLow {
                ds: &ds,
                a: &a,
                rank: r,
                p: 0.3,
                seed: 77,
            });
            let (acc, h) = if epi {
                (Some(&acc), Some(&h))
            } else {
                (None, None)
            };
            let run = |p: LoraPath| {
                host(
                    &dy.lora_fused_dx(p, &w, None, low, dl, acc, h, 2.0, (m, n, k, r))
                        .unwrap(),
                )
            };
            let (v2, v3) = (run(LoraPath::V2), run(LoraPath::V3));
            let peak = v2.iter().fold(0f32, |p, v| p.max(v.abs()));
            let worst = v2
                .iter()
                .zip(&v3)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("v3 dX m{m} n{n} k{k} r{r} drop {drop} epi {epi}: worst |v3 − v2| {worst:e} of {peak}");
            assert!(
                worst <= 1e-2 * peak,
                "v3 dX differs from v2 by {worst} (peak {peak})"
            );
        }
    }

    /// V3's dX on a kept Wᵀ: one copy made and reused, remade once W is written, forgotten on
    /// request; each result equal to the per-call transpose's.
    #[test]
    fn v3_dx_keeps_w_transpose_until_w_is_written() {
        let (m, n, k) = (33usize, 40usize, 48usize);
        let dy = sim(&values(m * n, 1));
        let w_vals = |seed| {
            values(n * k, seed)
                .iter()
                .map(|v| v * 0.3)
                .collect::<Vec<_>>()
        };
        let cell = StorageCell::new(Storage::Cuda(sim(&w_vals(2))));
        // dX by V3 on W, with W's cell where Wᵀ may be kept (or none: a per-call transpose).
        let v3 = |w: &CudaStorage, cell: Option<&StorageCell>| {
            host(
                &dy.lora_fused_dx(
                    LoraPath::V3,
                    w,
                    cell,
                    None,
                    None,
                    None,
                    None,
                    1.0,
                    (m, n, k, 0),
                )
                .unwrap(),
            )
        };
        // dX on the cell's W, through the cell.
        let dx = |cell: &StorageCell| {
            let g = cell.read();
            let Storage::Cuda(w) = &*g else {
                unreachable!()
            };
            v3(w, Some(cell))
        };
        let plain = v3(&sim(&w_vals(2)), None);
        assert_eq!(dx(&cell), plain);
        assert_eq!(cell.derived_count(), 1);
        let kept = {
            let _g = cell.read();
            cell.derived(wt_key(n, k), || panic!("the kept Wᵀ was remade"))
                .unwrap()
        };
        assert_eq!(dx(&cell), plain, "the kept Wᵀ, reused");
        // A write makes the kept copy stale: the next call derives it from the new W.
        *cell.write() = Storage::Cuda(sim(&w_vals(9)));
        let after = dx(&cell);
        let g = cell.read();
        let Storage::Cuda(w9) = &*g else {
            unreachable!()
        };
        let want = v3(w9, None);
        drop(g);
        assert_eq!(after, want);
        assert_ne!(after, plain);
        assert_eq!(
            cell.derived_count(),
            1,
            "the stale copy was replaced, not kept beside"
        );
        drop(kept);
        cell.forget(wt_key(n, k));
        assert_eq!(cell.derived_count(), 0);
    }

    #[test]
    fn screen_uses_random_operands_and_drops_wrong_or_failing_candidates() {
        let (m, n, k, r, scale) = (37, 24, 40, 8, 4.0f32);
        let key = LoraKey {
            forward: true,
            m,
            n,
            k,
            r,
            bias: false,
            residual: false,
            gelu: false,
            dropout: false,
        };
        let (x, w, s) = (
            sim(&values(m * k, 1)),
            sim(&values(n * k, 2)),
            sim(&values(m * r, 3)),
        );
        let b = sim(&vec![0.0; n * r]);
        let spec = |n, k| MatmulSpec {
            batch: 1,
            m,
            n,
            k,
            trans_a: false,
            trans_b: true,
            rhs_batched: false,
        };
        let run = |p: LoraPath, ops: &[&CudaStorage]| -> Result<Vec<CudaStorage>> {
            match p {
                // PEFT's structure: X·Wᵀ + s·(S·Bᵀ).
                LoraPath::Cublas => {
                    let y = ops[0].mm(ops[1], spec(n, k))?;
                    let low = ops[2].mm(ops[3], spec(n, r))?.affine(scale as f64, 0.0)?;
                    let ys = Shape::from(vec![m, n]);
                    Ok(vec![y.binary(&low, BinaryOp::Add, &ys, &ys, &ys)?])
                }
                LoraPath::V2 => ops[0].lora_fused_fwd(
                    LoraPath::V2,
                    ops[1],
                    None,
                    Some((ops[2], ops[3])),
                    None,
                    false,
                    false,
                    scale,
                    (m, n, k, r),
                ),
                // A kernel with a broken low-rank tile: it leaves the LoRA term out.
                LoraPath::V1 => ops[0].lora_fused_fwd(
                    LoraPath::V1,
                    ops[1],
                    None,
                    None,
                    None,
                    false,
                    false,
                    scale,
                    (m, n, k, r),
                ),
                LoraPath::V3 => Err(Error::Cuda("tensor map encode failed (test)".into())),
            }
        };
        let call = [&x, &w, &s, &b];
        let (y_ref, y_bad) = (
            host(&run(LoraPath::Cublas, &call).unwrap()[0]),
            host(&run(LoraPath::V1, &call).unwrap()[0]),
        );
        let worst = y_ref
            .iter()
            .zip(&y_bad)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        assert!(
            worst < 1e-2,
            "B = 0 should hide the broken tile on the call's operands: {worst}"
        );
        let cands = [LoraPath::V3, LoraPath::V2, LoraPath::V1];
        let verdicts = screen(&key, &cands, &call, &run).unwrap();
        for (p, v) in &verdicts {
            println!("{}: {v:?}", p.name());
        }
        assert_eq!(verdicts.len(), 3);
        assert!(matches!(&verdicts[0], (LoraPath::V3, Err(e)) if e.contains("failed to run")));
        assert!(matches!(&verdicts[1], (LoraPath::V2, Ok(()))));
        assert!(matches!(&verdicts[2], (LoraPath::V1, Err(e)) if e.contains("differs")));
        // The probe operands are non-zero where the call's B is zero.
        let probe = probe_operands(&key, &call).unwrap();
        let pb = host(&probe[3]);
        assert_eq!(pb.len(), n * r);
        assert!(pb.iter().filter(|v| **v != 0.0).count() > n * r / 2);
    }
}
