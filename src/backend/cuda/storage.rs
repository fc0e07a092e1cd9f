//! Tensor storage on `Device::Cuda`: a buffer in a kernel backend's memory (a GPU, or the kernel
//! simulator for `cuda:sim`, so CI runs the engine's own tests through every kernel) and
//! each engine op as launches of `kernels/*.cu`. f32 and bf16 compute (f32 math inside every
//! kernel); i64/u32 hold ids and labels; f64 stays on the CPU. Launches are asynchronous on the
//! GPU's stream: errors a kernel raises surface at the next copy to the host.
use super::kernels as kn;
use super::launch::{Arg, Buffer, Grid, Kernel, LaunchConfig, Runner};
use crate::backend::cpu::CpuStorage;
use crate::backend::{BackendStorage, BinaryOp, LoraSpec, MatmulSpec, UnaryOp};
use crate::profile;
use crate::{DType, Device, Error, Result, Shape};

/// Most dims a shape may have in the elementwise/layout kernels.
const MAX_RANK: usize = kn::MAX_RANK;

/// A tensor's elements on `Device::Cuda`: one flat buffer of `len` elements of `dtype` (f32,
/// bf16, i64 or u32) in the memory of a kernel backend (a GPU, `cuda:sim` or `cuda:plan`);
/// shape and strides live in the tensor. Ops on it are kernel launches, asynchronous on a GPU;
/// `to_cpu` waits for them and surfaces any error a kernel raised.
pub struct CudaStorage {
    buf: Buffer,
    pub(crate) dtype: DType,
    pub(crate) len: usize,
    runner: Runner,
    ordinal: usize,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage(cuda:{} via {}, {} × {})",
            self.ordinal,
            self.runner.name(),
            self.len,
            self.dtype
        )
    }
}

/// The kernel backend behind `cuda:ordinal`: the simulator for `Device::CUDA_SIM`
/// (`cuda:sim`, a testing aid: slow), else the GPU.
pub fn runner_for(ordinal: usize) -> Result<Runner> {
    if ordinal == Device::PLAN_ORDINAL {
        return Ok(Runner::Plan);
    }
    if ordinal == Device::SIM_ORDINAL {
        #[cfg(feature = "cuda-sim")]
        return Ok(Runner::Sim);
        #[cfg(not(feature = "cuda-sim"))]
        return Err(Error::Cuda(
            "cuda:sim needs the kernel simulator (feature `cuda-sim`)".into(),
        ));
    }
    #[cfg(feature = "cuda")]
    {
        Ok(Runner::Gpu(super::gpu::Gpu::get(ordinal)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::CudaNotCompiled(ordinal))
    }
}

fn rank_ok(op: &'static str, s: &Shape) -> Result<()> {
    if s.rank() > MAX_RANK {
        return Err(Error::shape(
            op,
            format!("{s:?} has more than {MAX_RANK} dims (the CUDA kernels' limit)"),
        ));
    }
    Ok(())
}

pub(crate) fn same_len(op: &'static str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::shape(op, format!("lengths {a} and {b} differ")));
    }
    Ok(())
}

impl CudaStorage {
    /// A copy of host storage `s` on `cuda:ordinal` (`Device::SIM_ORDINAL`: the simulator;
    /// `Device::PLAN_ORDINAL`: the plan recorder, which keeps sizes, not data). On a GPU the
    /// copy is queued and the host does not wait. f64 is an `UnsupportedDType` error (cast to
    /// f32 or bf16 first); an ordinal this build or machine cannot serve is an error too.
    pub fn from_cpu(s: &CpuStorage, ordinal: usize) -> Result<CudaStorage> {
        let runner = runner_for(ordinal)?;
        let (buf, dtype, len) = match s {
            CpuStorage::F32(v) => (runner.buffer(v)?, DType::F32, v.len()),
            CpuStorage::BF16(v) => (runner.buffer(v)?, DType::BF16, v.len()),
            CpuStorage::I64(v) => (runner.buffer(v)?, DType::I64, v.len()),
            CpuStorage::U32(v) => (runner.buffer(v)?, DType::U32, v.len()),
            CpuStorage::F64(_) => {
                return Err(Error::UnsupportedDType {
                    op: "to cuda (f64 stays on the CPU; cast to f32 or bf16 first)",
                    dtype: DType::F64,
                })
            }
        };
        Ok(CudaStorage {
            buf,
            dtype,
            len,
            runner,
            ordinal,
        })
    }

    /// The kernel backend holding this storage: for launches and for buffers beside it.
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// A storage over a GPU buffer already holding `len` elements of `dtype`.
    #[cfg(feature = "cuda")]
    pub(crate) fn from_device(
        buf: super::gpu::DeviceBuffer,
        dtype: DType,
        len: usize,
    ) -> CudaStorage {
        let gpu = buf.gpu().clone();
        CudaStorage {
            ordinal: gpu.ordinal,
            runner: Runner::Gpu(gpu),
            buf: Buffer::Device(buf),
            dtype,
            len,
        }
    }

    pub(crate) fn ptr(&self) -> Arg {
        Arg::U64(self.buf.addr())
    }

    /// The device address of the first element.
    pub(crate) fn addr(&self) -> u64 {
        self.buf.addr()
    }

    /// Whether the buffer starts on a multiple of `bytes` (16-byte cp.async, TMA).
    pub(crate) fn is_aligned(&self, bytes: u64) -> bool {
        self.buf.addr().is_multiple_of(bytes)
    }

    /// The address of element `offset` (in elements of this storage's dtype).
    pub(crate) fn ptr_at(&self, offset: usize) -> Arg {
        Arg::U64(self.buf.addr() + (offset * self.dtype.size_in_bytes()) as u64)
    }

    /// An uninitialized buffer (zeroed in the simulator) on the same device.
    pub(crate) fn empty(&self, len: usize, dtype: DType) -> Result<CudaStorage> {
        Ok(CudaStorage {
            buf: self.runner.alloc(len * dtype.size_in_bytes())?,
            dtype,
            len,
            runner: self.runner.clone(),
            ordinal: self.ordinal,
        })
    }

    /// Launches declared kernel `name` (`backend::cuda::kernels`) on this storage's device.
    pub(crate) fn run<K: Kernel<Arg>>(&self, name: &str, cfg: LaunchConfig, k: K) -> Result<()> {
        // SAFETY: every caller sizes its buffers for the launch from the same lengths it passes.
        unsafe { self.runner.run(name, cfg, k) }
    }

    /// `run` with the geometry the declaration gives.
    pub(crate) fn run_grid<K: Kernel<Arg> + Grid>(&self, name: &str, k: K) -> Result<()> {
        let cfg = k.grid();
        self.run(name, cfg, k)
    }

    /// "f32" or "bf16": the kernel suffix for a float storage.
    pub(crate) fn sfx(&self, op: &'static str) -> Result<&'static str> {
        match self.dtype {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            dtype => Err(Error::UnsupportedDType { op, dtype }),
        }
    }

    pub(crate) fn same_dtype(&self, op: &'static str, other: &CudaStorage) -> Result<()> {
        if self.dtype != other.dtype {
            return Err(Error::DTypeMismatch {
                op,
                lhs: self.dtype,
                rhs: other.dtype,
            });
        }
        Ok(())
    }

    /// A one-element f32 view for kernels that read scalars through a pointer.
    pub(crate) fn scalar_f32(&self, op: &'static str) -> Result<CudaStorage> {
        if self.len != 1 {
            return Err(Error::shape(
                op,
                format!("expected one element, got {}", self.len),
            ));
        }
        self.as_f32()
    }

    /// This storage converted to `dtype`, consuming it (no copy when it already is).
    pub(crate) fn into_dtype(self, dtype: DType) -> Result<CudaStorage> {
        if self.dtype == dtype {
            Ok(self)
        } else {
            self.cast(dtype)
        }
    }

    /// This storage as f32: a non-owning view when it already is (no copy), else a cast.
    pub(crate) fn as_f32(&self) -> Result<CudaStorage> {
        if self.dtype == DType::F32 {
            Ok(self.alias())
        } else {
            self.cast(DType::F32)
        }
    }

    /// x · g for a one-element f32 `g` on the device.
    pub(crate) fn scale_by(&self, g: &CudaStorage) -> Result<CudaStorage> {
        let sfx = self.sfx("scale")?;
        let out = self.empty(self.len, self.dtype)?;
        if self.len > 0 {
            self.run_grid(
                &format!("scale_by_{sfx}"),
                kn::ScaleBy {
                    x: self.ptr(),
                    s: g.ptr(),
                    y: out.ptr(),
                    n: self.len,
                },
            )?;
        }
        Ok(out)
    }

    /// Ids as i64 on the device, bounds-checked there (`ids_checked_*`): a bad id is replaced
    /// by 0 and reported as an error naming `op` at the next read from the device, so the
    /// check never makes the host wait.
    pub(crate) fn ids_i64(&self, op: &'static str, bound: usize) -> Result<CudaStorage> {
        let code = super::launch::ID_CHECK_OPS
            .iter()
            .position(|o| *o == op)
            .ok_or_else(|| Error::Cuda(format!("ids_i64: unknown op {op}")))?;
        let sfx = match self.dtype {
            DType::I64 => "i64",
            DType::U32 => "u32",
            dtype => return Err(Error::UnsupportedDType { op, dtype }),
        };
        if bound == 0 && self.len > 0 {
            // Nothing to clamp a bad id to: every id is bad.
            return Err(Error::Index {
                op,
                msg: format!("{} ids into an empty range 0..0", self.len),
            });
        }
        let out = self.empty(self.len, DType::I64)?;
        if self.len > 0 {
            let err = self.runner.id_errors()?;
            self.run_grid(
                &format!("ids_checked_{sfx}"),
                kn::IdsChecked {
                    ids: self.ptr(),
                    n: self.len,
                    bound,
                    op: code as i32,
                    out: out.ptr(),
                    err: Arg::U64(err),
                },
            )?;
        }
        Ok(out)
    }

    /// Sums per-block partials [parts, n] → [n] (f32) in a fixed order.
    pub(crate) fn column_sum(&self, parts: usize, n: usize) -> Result<CudaStorage> {
        self.column_sum_to(parts, n, DType::F32)
    }

    /// `column_sum` of f32 partials, the sums rounded once to `dtype` (f32 or bf16).
    pub(crate) fn column_sum_to(
        &self,
        parts: usize,
        n: usize,
        dtype: DType,
    ) -> Result<CudaStorage> {
        let out = self.empty(n, dtype)?;
        self.run_grid(
            &format!("column_sum_{}", out.sfx("column_sum")?),
            kn::ColumnSum {
                part: self.ptr(),
                out: out.ptr(),
                parts,
                n,
            },
        )?;
        Ok(out)
    }

    fn gather_strided(&self, dims: &[usize], strides: &[usize]) -> Result<CudaStorage> {
        let n: usize = dims.iter().product();
        let out = self.empty(n, self.dtype)?;
        let w = match self.dtype.size_in_bytes() {
            2 => "b2",
            4 => "b4",
            _ => "b8",
        };
        if n > 0 {
            self.run_grid(
                &format!("gather_strided_{w}"),
                kn::GatherStrided {
                    src: self.ptr(),
                    dst: out.ptr(),
                    n,
                    rank: dims.len(),
                    dims: dims.to_vec(),
                    strides: strides.to_vec(),
                },
            )?;
        }
        Ok(out)
    }

    fn matmul_raw(
        &self,
        rhs: &CudaStorage,
        spec: MatmulSpec,
        out: &CudaStorage,
        sfx: &str,
    ) -> Result<()> {
        let MatmulSpec { batch, m, n, k, .. } = spec;
        if batch > 65_535 {
            return Err(Error::shape(
                "matmul",
                format!("batch {batch} > 65535 (grid z)"),
            ));
        }
        if batch * m * n == 0 {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Runner::Gpu(g) = &self.runner {
            let args = super::gpu::GemmArgs {
                a: self.buf.addr(),
                b: rhs.buf.addr(),
                c: out.buf.addr(),
                batch,
                m,
                n,
                k,
                trans_a: spec.trans_a,
                trans_b: spec.trans_b,
                rhs_batched: spec.rhs_batched,
                bf16: self.dtype == DType::BF16,
                alpha: 1.0,
                beta: 0.0,
            };
            // SAFETY: the three buffers are sized for this product by the caller.
            if unsafe { g.gemm(args)? } {
                return Ok(());
            }
        }
        let el = self.dtype.size_in_bytes() as f64;
        let (bm, nf, kf) = ((batch * m) as f64, n as f64, k as f64);
        let b_elems = if spec.rhs_batched { batch as f64 } else { 1.0 } * kf * nf;
        profile::set_work(2.0 * bm * nf * kf, el * (bm * kf + b_elems + bm * nf));
        self.run(
            &format!("gemm_simt_{sfx}"),
            LaunchConfig {
                grid: (
                    (n as u32).div_ceil(64),
                    (m as u32).div_ceil(64),
                    batch as u32,
                ),
                block: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            kn::GemmSimt {
                a: self.ptr(),
                b: rhs.ptr(),
                c: out.ptr(),
                m,
                n,
                k,
                trans_a: spec.trans_a,
                trans_b: spec.trans_b,
                stride_a: m * k,
                stride_b: if spec.rhs_batched { k * n } else { 0 },
                stride_c: m * n,
            },
        )
    }

    pub(crate) fn mm(&self, rhs: &CudaStorage, spec: MatmulSpec) -> Result<CudaStorage> {
        let sfx = self.sfx("matmul")?;
        self.same_dtype("matmul", rhs)?;
        let out = self.empty(spec.batch * spec.m * spec.n, self.dtype)?;
        if spec.k == 0 {
            return self.zeros_like(out.len, self.dtype);
        }
        self.matmul_raw(rhs, spec, &out, sfx)?;
        Ok(out)
    }

    pub(crate) fn elementwise_binary(
        &self,
        rhs: &CudaStorage,
        op: BinaryOp,
        out: &CudaStorage,
        ls: &Shape,
        rs: &Shape,
        os: &Shape,
    ) -> Result<()> {
        let sfx = self.sfx(op.name())?;
        self.same_dtype(op.name(), rhs)?;
        for s in [ls, rs, os] {
            rank_ok(op.name(), s)?;
        }
        use crate::backend::cpu::elementwise::bcast_strides;
        let n = os.elem_count();
        if n == 0 {
            return Ok(());
        }
        let code = match op {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
        };
        if ls == os && rs == os {
            // Nothing broadcasts: the vectorized kernel, no index arithmetic.
            return self.run_grid(
                &format!("binary_contig_{sfx}"),
                kn::BinaryContig {
                    a: self.ptr(),
                    b: rhs.ptr(),
                    out: out.ptr(),
                    op: code,
                    n,
                },
            );
        }
        self.run_grid(
            &format!("binary_{sfx}"),
            kn::Binary {
                a: self.ptr(),
                b: rhs.ptr(),
                out: out.ptr(),
                op: code,
                n,
                rank: os.rank(),
                dims: os.dims().to_vec(),
                stride_a: bcast_strides(ls, os),
                stride_b: bcast_strides(rs, os),
            },
        )
    }
}

fn unary_code(op: UnaryOp) -> i32 {
    match op {
        UnaryOp::Neg => 0,
        UnaryOp::Exp => 1,
        UnaryOp::Log => 2,
        UnaryOp::Sqr => 3,
        UnaryOp::Sqrt => 4,
        UnaryOp::QuickGelu => 5,
        UnaryOp::Sigmoid => 6,
    }
}

impl BackendStorage for CudaStorage {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> Device {
        Device::from_cuda_ordinal(self.ordinal)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn to_cpu(&self) -> Result<CpuStorage> {
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(self.runner.read(&self.buf)?[..self.len].to_vec()),
            DType::BF16 => CpuStorage::BF16(self.runner.read(&self.buf)?[..self.len].to_vec()),
            DType::I64 => CpuStorage::I64(self.runner.read(&self.buf)?[..self.len].to_vec()),
            DType::U32 => CpuStorage::U32(self.runner.read(&self.buf)?[..self.len].to_vec()),
            DType::F64 => {
                return Err(Error::UnsupportedDType {
                    op: "to_cpu",
                    dtype: DType::F64,
                })
            }
        })
    }

    fn zeros_like(&self, len: usize, dtype: DType) -> Result<Self> {
        if dtype == DType::F64 {
            return Err(Error::UnsupportedDType {
                op: "zeros on cuda",
                dtype,
            });
        }
        Ok(CudaStorage {
            buf: self.runner.zeros(len * dtype.size_in_bytes())?,
            dtype,
            len,
            runner: self.runner.clone(),
            ordinal: self.ordinal,
        })
    }

    fn try_clone(&self) -> Result<Self> {
        Ok(CudaStorage {
            buf: self.runner.copy(&self.buf)?,
            dtype: self.dtype,
            len: self.len,
            runner: self.runner.clone(),
            ordinal: self.ordinal,
        })
    }

    fn cast(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype {
            return self.try_clone();
        }
        let name = match (self.dtype, dtype) {
            (DType::F32, DType::BF16) => "cast_f32_bf16",
            (DType::BF16, DType::F32) => "cast_bf16_f32",
            (from, to) => {
                return Err(Error::Cuda(format!(
                    "cast {from} → {to} has no CUDA kernel (f32 ↔ bf16 only)"
                )))
            }
        };
        let out = self.empty(self.len, dtype)?;
        if self.len > 0 {
            self.run_grid(
                name,
                kn::Cast {
                    x: self.ptr(),
                    y: out.ptr(),
                    n: self.len,
                },
            )?;
        }
        Ok(out)
    }

    fn unary(&self, op: UnaryOp) -> Result<Self> {
        let sfx = self.sfx(op.name())?;
        let out = self.empty(self.len, self.dtype)?;
        if self.len > 0 {
            self.run_grid(
                &format!("unary_{sfx}"),
                kn::Unary {
                    x: self.ptr(),
                    y: out.ptr(),
                    op: unary_code(op),
                    n: self.len,
                },
            )?;
        }
        Ok(out)
    }

    fn unary_bwd(&self, y: &Self, dy: &Self, op: UnaryOp) -> Result<Self> {
        let sfx = self.sfx(op.name())?;
        self.same_dtype(op.name(), dy)?;
        same_len(op.name(), self.len, dy.len)?;
        let out = self.empty(self.len, self.dtype)?;
        let y_arg = if y.len == self.len {
            self.same_dtype(op.name(), y)?;
            y.ptr()
        } else {
            Arg::null()
        };
        if self.len > 0 {
            self.run_grid(
                &format!("unary_bwd_{sfx}"),
                kn::UnaryBwd {
                    x: self.ptr(),
                    y: y_arg,
                    dy: dy.ptr(),
                    dx: out.ptr(),
                    op: unary_code(op),
                    n: self.len,
                },
            )?;
        }
        Ok(out)
    }

    fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        let sfx = self.sfx("affine")?;
        let out = self.empty(self.len, self.dtype)?;
        if self.len > 0 {
            self.run_grid(
                &format!("affine_{sfx}"),
                kn::Affine {
                    x: self.ptr(),
                    y: out.ptr(),
                    mul: mul as f32,
                    add: add as f32,
                    n: self.len,
                },
            )?;
        }
        Ok(out)
    }

    fn binary(&self, rhs: &Self, op: BinaryOp, ls: &Shape, rs: &Shape, os: &Shape) -> Result<Self> {
        let out = self.empty(os.elem_count(), self.dtype)?;
        self.elementwise_binary(rhs, op, &out, ls, rs, os)?;
        Ok(out)
    }

    fn add_assign(&mut self, rhs: &Self) -> Result<()> {
        same_len("add_assign", self.len, rhs.len)?;
        let s = Shape::from(vec![self.len]);
        // In place: each element is read before it is written, by the same thread.
        let out = CudaStorage {
            buf: Buffer::Alias(self.buf.addr(), self.buf.bytes()),
            dtype: self.dtype,
            len: self.len,
            runner: self.runner.clone(),
            ordinal: self.ordinal,
        };
        self.elementwise_binary(rhs, BinaryOp::Add, &out, &s, &s, &s)
    }

    fn sum_to(&self, src: &Shape, dst: &Shape) -> Result<Self> {
        let sfx = self.sfx("sum_to")?;
        rank_ok("sum_to", src)?;
        let (r, dr) = (src.rank(), dst.rank());
        if dr > r {
            return Err(Error::shape("sum_to", format!("{src:?} → {dst:?}")));
        }
        let st = src.strides();
        let (mut kd, mut ks, mut rd, mut rs) = (vec![], vec![], vec![], vec![]);
        for (k, (&d, &stride)) in src.dims().iter().zip(&st).enumerate() {
            let kept = k >= r - dr && dst.dims()[k - (r - dr)] == d;
            if kept {
                kd.push(d);
                ks.push(stride);
            } else {
                if k >= r - dr && dst.dims()[k - (r - dr)] != 1 {
                    return Err(Error::shape("sum_to", format!("{src:?} → {dst:?}")));
                }
                rd.push(d);
                rs.push(stride);
            }
        }
        let (n_dst, n_red) = (dst.elem_count(), rd.iter().product::<usize>());
        if kd.iter().product::<usize>() != n_dst {
            return Err(Error::shape("sum_to", format!("{src:?} → {dst:?}")));
        }
        let out = self.empty(n_dst, self.dtype)?;
        if n_dst == 0 {
            return Ok(out);
        }
        self.run_grid(
            &format!("sum_to_{sfx}"),
            kn::SumTo {
                src: self.ptr(),
                dst: out.ptr(),
                n_dst,
                n_red,
                krank: kd.len(),
                kd,
                ks,
                rrank: rd.len(),
                rd,
                rs,
            },
        )?;
        Ok(out)
    }

    fn broadcast_to(&self, src: &Shape, dst: &Shape) -> Result<Self> {
        rank_ok("broadcast_to", dst)?;
        let strides = crate::backend::cpu::elementwise::bcast_strides(src, dst);
        self.gather_strided(dst.dims(), &strides)
    }

    fn matmul(&self, rhs: &Self, spec: MatmulSpec) -> Result<Self> {
        self.mm(rhs, spec)
    }

    fn permute(&self, shape: &Shape, perm: &[usize]) -> Result<Self> {
        rank_ok("permute", shape)?;
        let st = shape.strides();
        let dims: Vec<usize> = perm.iter().map(|&p| shape.dims()[p]).collect();
        let strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        self.gather_strided(&dims, &strides)
    }

    fn copy2d(
        &self,
        dst: &mut Self,
        rows: usize,
        cols: usize,
        ss: usize,
        ds: usize,
        so: usize,
        dof: usize,
    ) -> Result<()> {
        if self.dtype != dst.dtype {
            return Err(Error::DTypeMismatch {
                op: "copy2d",
                lhs: self.dtype,
                rhs: dst.dtype,
            });
        }
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let last = |off: usize, stride: usize| off + (rows - 1) * stride + cols;
        if last(so, ss) > self.len || last(dof, ds) > dst.len {
            return Err(Error::shape(
                "copy2d",
                format!("{rows}×{cols} block out of bounds"),
            ));
        }
        let w = match self.dtype.size_in_bytes() {
            2 => "b2",
            4 => "b4",
            _ => "b8",
        };
        self.run_grid(
            &format!("copy2d_{w}"),
            kn::Copy2d {
                src: self.ptr(),
                dst: dst.ptr(),
                rows,
                cols,
                src_stride: ss,
                dst_stride: ds,
                src_offset: so,
                dst_offset: dof,
            },
        )
    }

    fn index_rows(&self, ids: &Self, rows: usize, cols: usize) -> Result<Self> {
        let sfx = self.sfx("index_rows")?;
        same_len("index_rows", self.len, rows * cols)?;
        let ids = ids.ids_i64("index_rows", rows)?;
        let out = self.empty(ids.len * cols, self.dtype)?;
        if ids.len > 0 {
            // Only the rows named are read, not the whole table.
            let el = self.dtype.size_in_bytes() as f64;
            profile::set_work(
                0.0,
                (ids.len * cols) as f64 * 2.0 * el + 8.0 * ids.len as f64,
            );
            self.run_grid(
                &format!("index_rows_{sfx}"),
                kn::IndexRows {
                    table: self.ptr(),
                    ids: ids.ptr(),
                    out: out.ptr(),
                    n: ids.len,
                    cols,
                },
            )?;
        }
        Ok(out)
    }

    fn index_add_rows(&self, ids: &Self, rows: usize, cols: usize) -> Result<Self> {
        // Sums in f32 (repeated ids accumulate there), rounded once to the gradient's dtype.
        let mut out = self.zeros_like(rows * cols, DType::F32)?;
        self.as_f32()?
            .index_add_rows_into(ids, &mut out, rows, cols)?;
        out.into_dtype(self.dtype)
    }

    fn index_add_rows_into(
        &self,
        ids: &Self,
        out: &mut Self,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let sfx = self.sfx("index_add_rows")?;
        self.same_dtype("index_add_rows", out)?;
        let ids = ids.ids_i64("index_add_rows", rows)?;
        same_len("index_add_rows", self.len, ids.len * cols)?;
        same_len("index_add_rows", out.len, rows * cols)?;
        if ids.len > 0 && cols > 0 {
            let el = self.dtype.size_in_bytes() as f64;
            profile::set_work(
                0.0,
                (ids.len * cols) as f64 * 3.0 * el + 8.0 * ids.len as f64,
            );
            self.run_grid(
                &format!("index_add_rows_{sfx}"),
                kn::IndexAddRows {
                    src: self.ptr(),
                    ids: ids.ptr(),
                    out: out.ptr(),
                    n: ids.len,
                    cols,
                },
            )?;
        }
        Ok(())
    }
}

impl CudaStorage {
    /// drop(x) with inverted scaling (the CPU's mask: `crate::rng::dropout_keep`); None when
    /// dropout is off.
    pub(crate) fn dropped(&self, l: &LoraSpec) -> Result<Option<CudaStorage>> {
        if l.dropout <= 0.0 {
            return Ok(None);
        }
        let sfx = self.sfx("lora dropout")?;
        let out = self.empty(self.len, self.dtype)?;
        if self.len > 0 {
            self.run_grid(
                &format!("dropout_{sfx}"),
                kn::Dropout {
                    x: self.ptr(),
                    y: out.ptr(),
                    n: self.len,
                    p: l.dropout,
                    seed: l.seed,
                },
            )?;
        }
        Ok(Some(out))
    }

    /// A non-owning view of the same memory (an in-place output).
    pub(crate) fn alias(&self) -> CudaStorage {
        CudaStorage {
            buf: Buffer::Alias(self.buf.addr(), self.buf.bytes()),
            dtype: self.dtype,
            len: self.len,
            runner: self.runner.clone(),
            ordinal: self.ordinal,
        }
    }
}

#[path = "storage_lora.rs"]
mod storage_lora;
pub(crate) use storage_lora::{cublas_only, wt_key, DropLow, LoraKey};
pub use storage_lora::{lora_choices, LoraPath};
