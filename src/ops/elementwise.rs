//! Elementwise ops with numpy broadcasting, and reductions.
use super::{check_float, check_same_dtype, record_fn};
use crate::backend::{BinaryOp, UnaryOp};
use crate::{Result, Shape, Tensor};

impl Tensor {
    fn binary_op(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let name = op.name();
        check_same_dtype(name, self, rhs)?;
        check_float(name, self)?;
        let os = Shape::broadcast(name, self.shape(), rhs.shape())?;
        let out = self
            .storage()
            .binary(&rhs.storage(), op, self.shape(), rhs.shape(), &os)?;
        let (a, b) = (self.clone(), rhs.clone());
        record_fn(name, out, os, &[self, rhs], move |_: &Tensor| {
            move |g: &Tensor, needs: &[bool]| {
                let (ls, rs) = (a.shape().clone(), b.shape().clone());
                let ga = if needs[0] {
                    Some(match op {
                        BinaryOp::Add | BinaryOp::Sub => g.sum_to(&ls)?,
                        BinaryOp::Mul => g.mul(&b)?.sum_to(&ls)?,
                        BinaryOp::Div => g.div(&b)?.sum_to(&ls)?,
                    })
                } else {
                    None
                };
                let gb = if needs[1] {
                    Some(match op {
                        BinaryOp::Add => g.sum_to(&rs)?,
                        BinaryOp::Sub => g.sum_to(&rs)?.neg()?,
                        BinaryOp::Mul => g.mul(&a)?.sum_to(&rs)?,
                        BinaryOp::Div => g.mul(&a)?.div(&b.sqr()?)?.sum_to(&rs)?.neg()?,
                    })
                } else {
                    None
                };
                Ok(vec![ga, gb])
            }
        })
    }

    /// `self + rhs` with broadcasting (bias, positions).
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_op(rhs, BinaryOp::Add)
    }

    /// `self − rhs` with numpy broadcasting; same float dtype and device. Differentiable in both.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_op(rhs, BinaryOp::Sub)
    }

    /// `self · rhs` elementwise with numpy broadcasting (masks, scales); differentiable in both.
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_op(rhs, BinaryOp::Mul)
    }

    /// `self / rhs` elementwise with numpy broadcasting; differentiable in both
    /// (d/drhs = −self/rhs²). Division by zero follows IEEE (±∞, NaN).
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_op(rhs, BinaryOp::Div)
    }

    fn unary_op(&self, op: UnaryOp) -> Result<Tensor> {
        check_float(op.name(), self)?;
        let out = self.storage().unary(op)?;
        let shape = self.shape().clone();
        let x = self.clone();
        // exp/sqrt/sigmoid derive fastest from the output y (a view, not a copy).
        let needs_y = matches!(op, UnaryOp::Exp | UnaryOp::Sqrt | UnaryOp::Sigmoid);
        record_fn(op.name(), out, shape, &[self], move |y: &Tensor| {
            let y = needs_y.then(|| y.clone());
            move |g: &Tensor, _: &[bool]| {
                let empty;
                let ys = match &y {
                    Some(y) => y.storage(),
                    None => {
                        empty = Tensor::zeros(0, x.dtype(), x.device())?;
                        empty.storage()
                    }
                };
                let dx = x.storage().unary_bwd(&ys, &g.storage(), op)?;
                Ok(vec![Some(Tensor::from_storage(dx, x.shape().clone())?)])
            }
        })
    }

    /// `−x` elementwise.
    pub fn neg(&self) -> Result<Tensor> {
        self.unary_op(UnaryOp::Neg)
    }
    /// `eˣ` elementwise; backward reuses the output.
    pub fn exp(&self) -> Result<Tensor> {
        self.unary_op(UnaryOp::Exp)
    }
    /// Natural logarithm elementwise (NaN below 0, −∞ at 0); gradient `1/x`.
    pub fn log(&self) -> Result<Tensor> {
        self.unary_op(UnaryOp::Log)
    }
    /// `x²` elementwise; gradient `2x`.
    pub fn sqr(&self) -> Result<Tensor> {
        self.unary_op(UnaryOp::Sqr)
    }
    /// `√x` elementwise; gradient `0.5/√x` from the output (∞ at 0).
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary_op(UnaryOp::Sqrt)
    }
    /// CLIP's `x·σ(1.702x)`.
    pub fn quick_gelu(&self) -> Result<Tensor> {
        self.unary_op(UnaryOp::QuickGelu)
    }
    /// The logistic function `1/(1 + e⁻ˣ)` elementwise; gradient `y·(1 − y)` from the output.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary_op(UnaryOp::Sigmoid)
    }

    /// `self·mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        check_float("affine", self)?;
        let out = self.storage().affine(mul, add)?;
        record_fn(
            "affine",
            out,
            self.shape().clone(),
            &[self],
            move |_: &Tensor| move |g: &Tensor, _: &[bool]| Ok(vec![Some(g.affine(mul, 0.0)?)]),
        )
    }

    /// `self · s` (an [`Tensor::affine`] with no offset).
    pub fn scale(&self, s: f64) -> Result<Tensor> {
        self.affine(s, 0.0)
    }

    /// Sums over the dims where `shape` is broadcast against `self` (the inverse of `broadcast_as`).
    pub fn sum_to(&self, shape: &Shape) -> Result<Tensor> {
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let b = Shape::broadcast("sum_to", shape, self.shape())?;
        if &b != self.shape() {
            return Err(crate::shape_err!(
                "sum_to",
                "{:?} does not broadcast to {:?}",
                shape,
                self.shape()
            ));
        }
        let out = self.storage().sum_to(self.shape(), shape)?;
        let src = self.shape().clone();
        record_fn("sum_to", out, shape.clone(), &[self], move |_: &Tensor| {
            move |g: &Tensor, _: &[bool]| Ok(vec![Some(g.broadcast_as(&src)?)])
        })
    }

    /// Repeats `self` along broadcast dims to `shape`.
    pub fn broadcast_as(&self, shape: &Shape) -> Result<Tensor> {
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let b = Shape::broadcast("broadcast_as", self.shape(), shape)?;
        if &b != shape {
            return Err(crate::shape_err!(
                "broadcast_as",
                "{:?} does not broadcast to {:?}",
                self.shape(),
                shape
            ));
        }
        let out = self.storage().broadcast_to(self.shape(), shape)?;
        let src = self.shape().clone();
        record_fn(
            "broadcast_as",
            out,
            shape.clone(),
            &[self],
            move |_: &Tensor| move |g: &Tensor, _: &[bool]| Ok(vec![Some(g.sum_to(&src)?)]),
        )
    }

    /// Sum of every element, as a 0-d tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let ones = Shape::new(vec![1; self.rank()]);
        self.sum_to(&ones)?.reshape(())
    }

    /// Mean of every element, as a 0-d tensor (the sum divided by the element count; 0 for an
    /// empty tensor).
    pub fn mean_all(&self) -> Result<Tensor> {
        let n = self.elem_count().max(1) as f64;
        self.sum_all()?.scale(1.0 / n)
    }

    /// Sum over `dim`; the dim is kept with size 1 when `keepdim`.
    pub fn sum_dim(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = self.shape().resolve_dim("sum_dim", dim)?;
        let mut dims = self.dims().to_vec();
        dims[d] = 1;
        let s = self.sum_to(&Shape::new(dims.clone()))?;
        if keepdim {
            Ok(s)
        } else {
            dims.remove(d);
            s.reshape(dims)
        }
    }

    /// Mean over `dim` (negative counts from the end); the dim is kept with size 1 when `keepdim`.
    pub fn mean_dim(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = self.shape().resolve_dim("mean_dim", dim)?;
        let n = self.dims()[d].max(1) as f64;
        self.sum_dim(dim, keepdim)?.scale(1.0 / n)
    }
}
