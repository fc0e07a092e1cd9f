//! `Storage`: a buffer on some backend. Each method dispatches to the backend that holds the
//! operands; operands on different devices are an error naming the op. The CUDA backend adds
//! its variant here and one arm per method.
use crate::backend::cpu::CpuStorage;
use crate::backend::AdamWStep;
use crate::backend::{
    AttnSpec, BackendStorage, BinaryOp, LinearGrads, LinearNeeds, LinearSpec, LoraSpec, MatmulSpec,
    UnaryOp,
};
use crate::{DType, Device, Error, Result, Shape};

#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
}

/// Unwraps operands that must share a backend, or errors with the op name.
macro_rules! cpu_all {
    ($op:expr, $($s:ident),+) => {
        $(let $s = match $s { Storage::Cpu(s) => s, };)+
    };
}

fn check_same(op: &'static str, xs: &[&Storage]) -> Result<()> {
    let d0 = xs[0].device();
    for x in &xs[1..] {
        if x.device() != d0 {
            return Err(Error::DeviceMismatch {
                op,
                lhs: d0,
                rhs: x.device(),
            });
        }
    }
    Ok(())
}

impl Storage {
    pub fn from_cpu(s: CpuStorage, device: Device) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(s)),
            Device::Cuda(i) => {
                Device::Cuda(i).check_available()?;
                Err(Error::CudaNotCompiled(i))
            }
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(s) => s.device(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_cpu(&self) -> Result<CpuStorage> {
        match self {
            Storage::Cpu(s) => s.to_cpu(),
        }
    }

    pub fn zeros_like(&self, len: usize, dtype: DType) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.zeros_like(len, dtype)?)),
        }
    }

    pub fn try_clone(&self) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.try_clone()?)),
        }
    }

    pub fn cast(&self, dtype: DType) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.cast(dtype)?)),
        }
    }

    pub fn unary(&self, op: UnaryOp) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.unary(op)?)),
        }
    }

    pub fn unary_bwd(&self, y: &Storage, dy: &Storage, op: UnaryOp) -> Result<Storage> {
        check_same(op.name(), &[self, y, dy])?;
        let x = self;
        cpu_all!(op.name(), x, y, dy);
        Ok(Storage::Cpu(x.unary_bwd(y, dy, op)?))
    }

    pub fn affine(&self, mul: f64, add: f64) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.affine(mul, add)?)),
        }
    }

    pub fn binary(
        &self,
        rhs: &Storage,
        op: BinaryOp,
        ls: &Shape,
        rs: &Shape,
        os: &Shape,
    ) -> Result<Storage> {
        check_same(op.name(), &[self, rhs])?;
        let a = self;
        cpu_all!(op.name(), a, rhs);
        Ok(Storage::Cpu(a.binary(rhs, op, ls, rs, os)?))
    }

    pub fn add_assign(&mut self, rhs: &Storage) -> Result<()> {
        check_same("add_assign", &[self, rhs])?;
        let a = self;
        cpu_all!("add_assign", a, rhs);
        a.add_assign(rhs)
    }

    pub fn sum_to(&self, src: &Shape, dst: &Shape) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.sum_to(src, dst)?)),
        }
    }

    pub fn broadcast_to(&self, src: &Shape, dst: &Shape) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.broadcast_to(src, dst)?)),
        }
    }

    pub fn matmul(&self, rhs: &Storage, spec: MatmulSpec) -> Result<Storage> {
        check_same("matmul", &[self, rhs])?;
        let a = self;
        cpu_all!("matmul", a, rhs);
        Ok(Storage::Cpu(a.matmul(rhs, spec)?))
    }

    pub fn permute(&self, shape: &Shape, perm: &[usize]) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.permute(shape, perm)?)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy2d(
        &self,
        dst: &mut Storage,
        rows: usize,
        cols: usize,
        ss: usize,
        ds: usize,
        so: usize,
        dof: usize,
    ) -> Result<()> {
        check_same("copy2d", &[self, dst])?;
        let src = self;
        cpu_all!("copy2d", src, dst);
        src.copy2d(dst, rows, cols, ss, ds, so, dof)
    }

    pub fn index_rows(&self, ids: &Storage, rows: usize, cols: usize) -> Result<Storage> {
        check_same("index_rows", &[self, ids])?;
        let x = self;
        cpu_all!("index_rows", x, ids);
        Ok(Storage::Cpu(x.index_rows(ids, rows, cols)?))
    }

    pub fn index_add_rows(&self, ids: &Storage, rows: usize, cols: usize) -> Result<Storage> {
        check_same("index_add_rows", &[self, ids])?;
        let g = self;
        cpu_all!("index_add_rows", g, ids);
        Ok(Storage::Cpu(g.index_add_rows(ids, rows, cols)?))
    }

    pub fn layer_norm(
        &self,
        gamma: &Storage,
        beta: &Storage,
        cols: usize,
        eps: f64,
    ) -> Result<(Storage, Storage, Storage)> {
        check_same("layer_norm", &[self, gamma, beta])?;
        let x = self;
        cpu_all!("layer_norm", x, gamma, beta);
        let (y, m, r) = x.layer_norm(gamma, beta, cols, eps)?;
        Ok((Storage::Cpu(y), Storage::Cpu(m), Storage::Cpu(r)))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_bwd(
        &self,
        gamma: &Storage,
        mean: &Storage,
        rstd: &Storage,
        dy: &Storage,
        cols: usize,
        need_x: bool,
        need_params: bool,
    ) -> Result<(Option<Storage>, Option<Storage>, Option<Storage>)> {
        check_same("layer_norm_bwd", &[self, gamma, mean, rstd, dy])?;
        let x = self;
        cpu_all!("layer_norm_bwd", x, gamma, mean, rstd, dy);
        let (a, b, c) = x.layer_norm_bwd(gamma, mean, rstd, dy, cols, need_x, need_params)?;
        Ok((
            a.map(Storage::Cpu),
            b.map(Storage::Cpu),
            c.map(Storage::Cpu),
        ))
    }

    pub fn softmax_last(&self, cols: usize) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.softmax_last(cols)?)),
        }
    }

    pub fn softmax_last_bwd(&self, dy: &Storage, cols: usize) -> Result<Storage> {
        check_same("softmax_bwd", &[self, dy])?;
        let y = self;
        cpu_all!("softmax_bwd", y, dy);
        Ok(Storage::Cpu(y.softmax_last_bwd(dy, cols)?))
    }

    pub fn l2_normalize(&self, cols: usize, eps: f64) -> Result<(Storage, Storage)> {
        match self {
            Storage::Cpu(s) => {
                let (y, n) = s.l2_normalize(cols, eps)?;
                Ok((Storage::Cpu(y), Storage::Cpu(n)))
            }
        }
    }

    pub fn l2_normalize_bwd(
        &self,
        norm: &Storage,
        dy: &Storage,
        cols: usize,
        eps: f64,
    ) -> Result<Storage> {
        check_same("l2_normalize_bwd", &[self, norm, dy])?;
        let y = self;
        cpu_all!("l2_normalize_bwd", y, norm, dy);
        Ok(Storage::Cpu(y.l2_normalize_bwd(norm, dy, cols, eps)?))
    }

    pub fn attention(
        &self,
        k: &Storage,
        v: &Storage,
        spec: AttnSpec,
    ) -> Result<(Storage, Storage)> {
        check_same("attention", &[self, k, v])?;
        let q = self;
        cpu_all!("attention", q, k, v);
        let (o, l) = q.attention(k, v, spec)?;
        Ok((Storage::Cpu(o), Storage::Cpu(l)))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        k: &Storage,
        v: &Storage,
        o: &Storage,
        lse: &Storage,
        d_o: &Storage,
        spec: AttnSpec,
    ) -> Result<(Storage, Storage, Storage)> {
        check_same("attention_bwd", &[self, k, v, o, lse, d_o])?;
        let q = self;
        cpu_all!("attention_bwd", q, k, v, o, lse, d_o);
        let (a, b, c) = q.attention_bwd(k, v, o, lse, d_o, spec)?;
        Ok((Storage::Cpu(a), Storage::Cpu(b), Storage::Cpu(c)))
    }

    pub fn cross_entropy(
        &self,
        labels: &Storage,
        rows: usize,
        cols: usize,
    ) -> Result<(Storage, Storage)> {
        check_same("cross_entropy", &[self, labels])?;
        let z = self;
        cpu_all!("cross_entropy", z, labels);
        let (l, s) = z.cross_entropy(labels, rows, cols)?;
        Ok((Storage::Cpu(l), Storage::Cpu(s)))
    }

    pub fn cross_entropy_bwd(
        &self,
        labels: &Storage,
        lse: &Storage,
        dloss: &Storage,
        rows: usize,
        cols: usize,
    ) -> Result<Storage> {
        check_same("cross_entropy_bwd", &[self, labels, lse, dloss])?;
        let z = self;
        cpu_all!("cross_entropy_bwd", z, labels, lse, dloss);
        Ok(Storage::Cpu(
            z.cross_entropy_bwd(labels, lse, dloss, rows, cols)?,
        ))
    }

    pub fn sigmoid_loss(
        &self,
        d: &Storage,
        t: &Storage,
        b: &Storage,
        n: usize,
        dim: usize,
    ) -> Result<Storage> {
        check_same("sigmoid_loss", &[self, d, t, b])?;
        let f = self;
        cpu_all!("sigmoid_loss", f, d, t, b);
        Ok(Storage::Cpu(f.sigmoid_loss(d, t, b, n, dim)?))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sigmoid_loss_bwd(
        &self,
        d: &Storage,
        t: &Storage,
        b: &Storage,
        dloss: &Storage,
        n: usize,
        dim: usize,
    ) -> Result<(Storage, Storage, Storage, Storage)> {
        check_same("sigmoid_loss_bwd", &[self, d, t, b, dloss])?;
        let f = self;
        cpu_all!("sigmoid_loss_bwd", f, d, t, b, dloss);
        let (a, bb, c, e) = f.sigmoid_loss_bwd(d, t, b, dloss, n, dim)?;
        Ok((
            Storage::Cpu(a),
            Storage::Cpu(bb),
            Storage::Cpu(c),
            Storage::Cpu(e),
        ))
    }

    pub fn lora_linear(
        &self,
        w: &Storage,
        b: Option<&Storage>,
        lora: Option<(&Storage, &Storage, LoraSpec)>,
        spec: LinearSpec,
    ) -> Result<(Storage, Option<Storage>)> {
        let mut all = vec![self, w];
        all.extend(b);
        if let Some((a, bm, _)) = lora {
            all.extend([a, bm]);
        }
        check_same("lora_linear", &all)?;
        let (x, w) = (self, w);
        cpu_all!("lora_linear", x, w);
        let b = b.map(|b| match b {
            Storage::Cpu(b) => b,
        });
        let lora = lora.map(|(a, bm, s)| match (a, bm) {
            (Storage::Cpu(a), Storage::Cpu(bm)) => (a, bm, s),
        });
        let (y, s) = x.lora_linear(w, b, lora, spec)?;
        Ok((Storage::Cpu(y), s.map(Storage::Cpu)))
    }

    pub fn lora_linear_bwd(
        &self,
        w: &Storage,
        lora: Option<(&Storage, &Storage, &Storage, LoraSpec)>,
        dy: &Storage,
        spec: LinearSpec,
        needs: LinearNeeds,
    ) -> Result<LinearGrads<Storage>> {
        let mut all = vec![self, w, dy];
        if let Some((a, bm, s, _)) = lora {
            all.extend([a, bm, s]);
        }
        check_same("lora_linear_bwd", &all)?;
        let (x, w, dy) = (self, w, dy);
        cpu_all!("lora_linear_bwd", x, w, dy);
        let lora = lora.map(|(a, bm, s, sp)| match (a, bm, s) {
            (Storage::Cpu(a), Storage::Cpu(bm), Storage::Cpu(s)) => (a, bm, s, sp),
        });
        let g = x.lora_linear_bwd(w, lora, dy, spec, needs)?;
        Ok(LinearGrads {
            x: g.x.map(Storage::Cpu),
            w: g.w.map(Storage::Cpu),
            b: g.b.map(Storage::Cpu),
            lora_a: g.lora_a.map(Storage::Cpu),
            lora_b: g.lora_b.map(Storage::Cpu),
        })
    }

    pub fn adamw_step(
        &mut self,
        grad: &Storage,
        m: &mut Storage,
        v: &mut Storage,
        step: AdamWStep,
    ) -> Result<()> {
        check_same("adamw_step", &[self, grad, m, v])?;
        let p = self;
        cpu_all!("adamw_step", p, grad, m, v);
        p.adamw_step(grad, m, v, step)
    }

    pub fn sum_sq(&self) -> Result<f64> {
        match self {
            Storage::Cpu(s) => s.sum_sq(),
        }
    }
}
