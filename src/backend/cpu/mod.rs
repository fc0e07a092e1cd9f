//! The CPU backend: the numerical reference of the project. Plain, readable kernels generic over
//! f32/f64 (bf16 is widened to f32, computed, and rounded back, which is what the GPU kernels do
//! with fp32 accumulation), rayon over rows/heads, and the `gemm` crate for every matrix product.
//! Every reduction runs over fixed-size chunks summed in order, so results do not depend on the
//! number of threads (bit-reproducible CPU training).
use half::bf16;

use super::{BackendStorage, BinaryOp, MatmulSpec, UnaryOp};
use crate::{DType, Device, Error, Result, Shape, WithDType};

pub(crate) mod elementwise;
pub mod gemm;
mod layout;
pub(crate) mod norm;

/// Rows per chunk of a deterministic parallel reduction.
pub(crate) const RED_CHUNK: usize = 64;

/// A host buffer: one `Vec` of the element type the variant names. The CPU backend's
/// `BackendStorage` and the staging form every device copies through.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements; kernels widen them to f32 and round results back.
    BF16(Vec<bf16>),
    /// f64 elements (CPU only; gradient checks).
    F64(Vec<f64>),
    /// i64 elements: ids and labels.
    I64(Vec<i64>),
    /// u32 elements: ids and labels.
    U32(Vec<u32>),
}

/// Element types a `CpuStorage` can be built from and viewed as.
pub trait CpuElem: WithDType {
    /// Moves a vector of this type into the matching `CpuStorage` variant.
    fn wrap(v: Vec<Self>) -> CpuStorage;
    /// The elements as a slice if `s` holds this type, else `None`.
    fn view(s: &CpuStorage) -> Option<&[Self]>;
    /// The elements as a mutable slice if `s` holds this type, else `None`.
    fn view_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! cpu_elem {
    ($t:ty, $v:ident) => {
        impl CpuElem for $t {
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$v(v)
            }
            fn view(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
            fn view_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
cpu_elem!(f32, F32);
cpu_elem!(bf16, BF16);
cpu_elem!(f64, F64);
cpu_elem!(i64, I64);
cpu_elem!(u32, U32);

/// The float element types kernels produce: wraps a result, rounding to bf16 when asked.
pub(crate) trait FloatOut: crate::Float {
    fn out(v: Vec<Self>, bf: bool) -> CpuStorage;
}
impl FloatOut for f32 {
    fn out(v: Vec<f32>, bf: bool) -> CpuStorage {
        if bf {
            CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect())
        } else {
            CpuStorage::F32(v)
        }
    }
}
impl FloatOut for f64 {
    fn out(v: Vec<f64>, _bf: bool) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

pub(crate) fn widen(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Runs `$body` with every listed storage viewed as `&[F]` for the one float type they share.
/// bf16 inputs are widened to f32; `$bf` tells the body to round its outputs back with `out`.
/// Optional inputs are written `?name = expr` and bound as `Option<&[F]>`.
macro_rules! with_float {
    ($op:expr, [$($inp:expr => $v:ident),+ $(; $(?$ov:ident = $opt:expr),+)?], $bf:ident, $body:block) => {{
        let dts = [$($inp.dtype()),+];
        if let Some(bad) = dts.iter().find(|d| **d != dts[0]) {
            return Err(Error::DTypeMismatch { op: $op, lhs: dts[0], rhs: *bad });
        }
        $($(if let Some(s) = $opt {
            let s: &CpuStorage = s;
            if s.dtype() != dts[0] {
                return Err(Error::DTypeMismatch { op: $op, lhs: dts[0], rhs: s.dtype() });
            }
        })+)?
        match dts[0] {
            DType::F32 => {
                #[allow(unused_variables)]
                let $bf = false;
                $(let $v: &[f32] = <f32 as CpuElem>::view($inp).expect("dtype checked");)+
                $($(let $ov: Option<&[f32]> = $opt.map(|s| <f32 as CpuElem>::view(s).expect("dtype checked"));)+)?
                $body
            }
            DType::F64 => {
                #[allow(unused_variables)]
                let $bf = false;
                $(let $v: &[f64] = <f64 as CpuElem>::view($inp).expect("dtype checked");)+
                $($(let $ov: Option<&[f64]> = $opt.map(|s| <f64 as CpuElem>::view(s).expect("dtype checked"));)+)?
                $body
            }
            DType::BF16 => {
                #[allow(unused_variables)]
                let $bf = true;
                $(let $v = widen(<bf16 as CpuElem>::view($inp).expect("dtype checked")); let $v: &[f32] = &$v;)+
                $($(let $ov: Option<Vec<f32>> = $opt.map(|s| widen(<bf16 as CpuElem>::view(s).expect("dtype checked")));
                    let $ov: Option<&[f32]> = $ov.as_deref();)+)?
                $body
            }
            d => Err(Error::UnsupportedDType { op: $op, dtype: d }),
        }
    }};
}

/// Applies a dtype-generic data-movement function to whatever the storage holds.
macro_rules! any_dtype {
    ($s:expr, $v:ident => $e:expr) => {
        match $s {
            CpuStorage::F32($v) => CpuStorage::F32($e),
            CpuStorage::BF16($v) => CpuStorage::BF16($e),
            CpuStorage::F64($v) => CpuStorage::F64($e),
            CpuStorage::I64($v) => CpuStorage::I64($e),
            CpuStorage::U32($v) => CpuStorage::U32($e),
        }
    };
}

impl CpuStorage {
    /// The elements as `&[T]`; `Error::DTypeMismatch` if the buffer holds another type (no
    /// conversion is made).
    pub fn as_slice<T: CpuElem>(&self) -> Result<&[T]> {
        T::view(self).ok_or(Error::DTypeMismatch {
            op: "as_slice",
            lhs: self.dtype(),
            rhs: T::DTYPE,
        })
    }

    /// The elements as `&mut [T]`; `Error::DTypeMismatch` if the buffer holds another type.
    pub fn as_mut_slice<T: CpuElem>(&mut self) -> Result<&mut [T]> {
        let dt = self.dtype();
        T::view_mut(self).ok_or(Error::DTypeMismatch {
            op: "as_mut_slice",
            lhs: dt,
            rhs: T::DTYPE,
        })
    }

    /// A buffer of `len` zeros of `dtype`.
    pub fn zeros(len: usize, dtype: DType) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::F64 => CpuStorage::F64(vec![0.0; len]),
            DType::I64 => CpuStorage::I64(vec![0; len]),
            DType::U32 => CpuStorage::U32(vec![0; len]),
        }
    }

    /// Every element as f64 (for tests, printing and ids).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            CpuStorage::F32(v) => v.iter().map(|x| *x as f64).collect(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            CpuStorage::F64(v) => v.clone(),
            CpuStorage::I64(v) => v.iter().map(|x| *x as f64).collect(),
            CpuStorage::U32(v) => v.iter().map(|x| *x as f64).collect(),
        }
    }

    /// Class or row ids as usize, checked against `bound`.
    pub(crate) fn ids(&self, op: &'static str, bound: usize) -> Result<Vec<usize>> {
        let raw: Vec<i64> = match self {
            CpuStorage::I64(v) => v.clone(),
            CpuStorage::U32(v) => v.iter().map(|x| *x as i64).collect(),
            other => {
                return Err(Error::UnsupportedDType {
                    op,
                    dtype: other.dtype(),
                })
            }
        };
        raw.into_iter()
            .enumerate()
            .map(|(i, id)| {
                if id < 0 || id as usize >= bound {
                    Err(Error::Index {
                        op,
                        msg: format!("id {id} at position {i} is outside 0..{bound}"),
                    })
                } else {
                    Ok(id as usize)
                }
            })
            .collect()
    }
}

fn same_len(op: &'static str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::shape(
            op,
            format!("buffer lengths differ: {a} vs {b}"),
        ));
    }
    Ok(())
}

impl CpuStorage {
    /// The value of a one-element buffer of any dtype (a loss scalar, an upstream gradient).
    pub(crate) fn scalar(&self, op: &'static str) -> Result<f64> {
        if self.len() != 1 {
            return Err(Error::shape(
                op,
                format!("expected one element, got {}", self.len()),
            ));
        }
        Ok(self.to_f64_vec()[0])
    }
}

impl BackendStorage for CpuStorage {
    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U32(_) => DType::U32,
        }
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
        }
    }

    fn to_cpu(&self) -> Result<CpuStorage> {
        Ok(self.clone())
    }

    fn zeros_like(&self, len: usize, dtype: DType) -> Result<Self> {
        Ok(CpuStorage::zeros(len, dtype))
    }

    fn try_clone(&self) -> Result<Self> {
        Ok(self.clone())
    }

    fn cast(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        Ok(match (self, dtype) {
            (CpuStorage::F32(v), DType::BF16) => {
                CpuStorage::BF16(v.iter().map(|x| bf16::from_f32(*x)).collect())
            }
            (CpuStorage::BF16(v), DType::F32) => CpuStorage::F32(widen(v)),
            (CpuStorage::F32(v), DType::F64) => {
                CpuStorage::F64(v.iter().map(|x| *x as f64).collect())
            }
            (CpuStorage::F64(v), DType::F32) => {
                CpuStorage::F32(v.iter().map(|x| *x as f32).collect())
            }
            (CpuStorage::BF16(v), DType::F64) => {
                CpuStorage::F64(v.iter().map(|x| x.to_f64()).collect())
            }
            (CpuStorage::F64(v), DType::BF16) => {
                CpuStorage::BF16(v.iter().map(|x| bf16::from_f64(*x)).collect())
            }
            (CpuStorage::I64(v), DType::U32) => {
                CpuStorage::U32(v.iter().map(|x| *x as u32).collect())
            }
            (CpuStorage::U32(v), DType::I64) => {
                CpuStorage::I64(v.iter().map(|x| *x as i64).collect())
            }
            (s, d) => {
                let f = s.to_f64_vec();
                match d {
                    DType::F32 => CpuStorage::F32(f.iter().map(|x| *x as f32).collect()),
                    DType::F64 => CpuStorage::F64(f),
                    DType::BF16 => CpuStorage::BF16(f.iter().map(|x| bf16::from_f64(*x)).collect()),
                    DType::I64 => CpuStorage::I64(f.iter().map(|x| *x as i64).collect()),
                    DType::U32 => CpuStorage::U32(f.iter().map(|x| *x as u32).collect()),
                }
            }
        })
    }

    fn unary(&self, op: UnaryOp) -> Result<Self> {
        with_float!(op.name(), [self => x], bf, { Ok(FloatOut::out(elementwise::unary(x, op), bf)) })
    }

    fn unary_bwd(&self, y: &Self, dy: &Self, op: UnaryOp) -> Result<Self> {
        same_len(op.name(), self.len(), dy.len())?;
        with_float!(op.name(), [self => x, y => y, dy => dy], bf, {
            Ok(FloatOut::out(elementwise::unary_bwd(x, y, dy, op), bf))
        })
    }

    fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        with_float!("affine", [self => x], bf, { Ok(FloatOut::out(elementwise::affine(x, mul, add), bf)) })
    }

    fn binary(&self, rhs: &Self, op: BinaryOp, ls: &Shape, rs: &Shape, os: &Shape) -> Result<Self> {
        with_float!(op.name(), [self => a, rhs => b], bf, {
            Ok(FloatOut::out(elementwise::binary(a, b, op, ls, rs, os), bf))
        })
    }

    fn add_assign(&mut self, rhs: &Self) -> Result<()> {
        same_len("add_assign", self.len(), rhs.len())?;
        match (self, rhs) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => elementwise::add_assign(a, b),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => elementwise::add_assign(a, b),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => a
                .iter_mut()
                .zip(b)
                .for_each(|(x, y)| *x = bf16::from_f32(x.to_f32() + y.to_f32())),
            (a, b) => {
                return Err(Error::DTypeMismatch {
                    op: "add_assign",
                    lhs: a.dtype(),
                    rhs: b.dtype(),
                })
            }
        }
        Ok(())
    }

    fn sum_to(&self, src: &Shape, dst: &Shape) -> Result<Self> {
        with_float!("sum_to", [self => x], bf, { Ok(FloatOut::out(elementwise::sum_to(x, src, dst), bf)) })
    }

    fn broadcast_to(&self, src: &Shape, dst: &Shape) -> Result<Self> {
        Ok(any_dtype!(self, v => layout::broadcast_to(v, src, dst)))
    }

    fn matmul(&self, rhs: &Self, spec: MatmulSpec) -> Result<Self> {
        with_float!("matmul", [self => a, rhs => b], bf, { Ok(FloatOut::out(gemm::matmul(a, b, spec), bf)) })
    }

    fn permute(&self, shape: &Shape, perm: &[usize]) -> Result<Self> {
        Ok(any_dtype!(self, v => layout::permute(v, shape, perm)))
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
        let (sl, dl) = (self.len(), dst.len());
        let need = |off: usize, stride: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                off + (rows - 1) * stride + cols
            }
        };
        if need(so, ss) > sl || need(dof, ds) > dl {
            return Err(Error::shape(
                "copy2d",
                format!("{rows}x{cols} block out of bounds (src {sl}, dst {dl})"),
            ));
        }
        match (self, dst) {
            (CpuStorage::F32(s), CpuStorage::F32(d)) => {
                layout::copy2d(s, d, rows, cols, ss, ds, so, dof)
            }
            (CpuStorage::BF16(s), CpuStorage::BF16(d)) => {
                layout::copy2d(s, d, rows, cols, ss, ds, so, dof)
            }
            (CpuStorage::F64(s), CpuStorage::F64(d)) => {
                layout::copy2d(s, d, rows, cols, ss, ds, so, dof)
            }
            (CpuStorage::I64(s), CpuStorage::I64(d)) => {
                layout::copy2d(s, d, rows, cols, ss, ds, so, dof)
            }
            (CpuStorage::U32(s), CpuStorage::U32(d)) => {
                layout::copy2d(s, d, rows, cols, ss, ds, so, dof)
            }
            (s, d) => {
                return Err(Error::DTypeMismatch {
                    op: "copy2d",
                    lhs: s.dtype(),
                    rhs: d.dtype(),
                })
            }
        }
        Ok(())
    }

    fn index_rows(&self, ids: &Self, rows: usize, cols: usize) -> Result<Self> {
        let ids = ids.ids("index_rows", rows)?;
        Ok(any_dtype!(self, v => layout::index_rows(v, &ids, cols)))
    }

    fn index_add_rows(&self, ids: &Self, rows: usize, cols: usize) -> Result<Self> {
        let ids = ids.ids("index_add_rows", rows)?;
        same_len("index_add_rows", self.len(), ids.len() * cols)?;
        with_float!("index_add_rows", [self => g], bf, {
            Ok(FloatOut::out(layout::index_add_rows(g, &ids, rows, cols), bf))
        })
    }

    fn index_add_rows_into(
        &self,
        ids: &Self,
        out: &mut Self,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let ids = ids.ids("index_add_rows", rows)?;
        same_len("index_add_rows", self.len(), ids.len() * cols)?;
        same_len("index_add_rows", out.len(), rows * cols)?;
        match (self, out) {
            (CpuStorage::F32(g), CpuStorage::F32(o)) => {
                layout::index_add_rows_into(g, &ids, o, cols, |a, b| a + b)
            }
            (CpuStorage::F64(g), CpuStorage::F64(o)) => {
                layout::index_add_rows_into(g, &ids, o, cols, |a, b| a + b)
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(o)) => {
                layout::index_add_rows_into(g, &ids, o, cols, |a, b| {
                    bf16::from_f32(a.to_f32() + b.to_f32())
                })
            }
            (g, o) => {
                return Err(Error::DTypeMismatch {
                    op: "index_add_rows",
                    lhs: g.dtype(),
                    rhs: o.dtype(),
                })
            }
        }
        Ok(())
    }
}
