//! Shapes of contiguous row-major tensors.
use crate::{Error, Result};

/// The dimensions of a tensor, outermost first; a tensor's data is contiguous and row-major in
/// this order. An empty list is a scalar (one element). Any dimension may be 0.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// Wraps a list of dimensions, outermost first. No check is made; zero sizes are allowed.
    pub fn new(dims: Vec<usize>) -> Self {
        Shape(dims)
    }

    /// The rank-0 shape: no dimensions, one element.
    pub fn scalar() -> Self {
        Shape(vec![])
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions (0 for a scalar).
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements: the product of the dimensions (1 for a scalar, 0 if any dimension is 0).
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// Row-major strides in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut s = vec![1; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.0[i + 1];
        }
        s
    }

    /// Size of dimension `d` (counted from the outermost, not negative); an `Error::Shape` if `d`
    /// is not below the rank.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.0
            .get(d)
            .copied()
            .ok_or_else(|| Error::shape("dim", format!("dim {d} out of range for shape {self:?}")))
    }

    /// The last dimension (1 for a scalar).
    pub fn last(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }

    /// Number of rows when viewed as [elem_count / last, last].
    pub fn rows(&self) -> usize {
        self.elem_count().checked_div(self.last()).unwrap_or(0)
    }

    /// Resolves a possibly negative dim index.
    pub fn resolve_dim(&self, op: &'static str, dim: isize) -> Result<usize> {
        let r = self.rank() as isize;
        let d = if dim < 0 { dim + r } else { dim };
        if d < 0 || d >= r {
            return Err(Error::shape(
                op,
                format!("dim {dim} out of range for shape {self:?}"),
            ));
        }
        Ok(d as usize)
    }

    /// Numpy-style broadcast of two shapes (right-aligned).
    pub fn broadcast(op: &'static str, a: &Shape, b: &Shape) -> Result<Shape> {
        let r = a.rank().max(b.rank());
        let mut out = vec![0; r];
        for (i, o) in out.iter_mut().enumerate() {
            let da = if i + a.rank() >= r {
                a.0[i + a.rank() - r]
            } else {
                1
            };
            let db = if i + b.rank() >= r {
                b.0[i + b.rank() - r]
            } else {
                1
            };
            *o = if da == db || db == 1 {
                da
            } else if da == 1 {
                db
            } else {
                return Err(Error::shape(
                    op,
                    format!("cannot broadcast {a:?} with {b:?}"),
                ));
            };
        }
        Ok(Shape(out))
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}
impl From<&Shape> for Shape {
    fn from(v: &Shape) -> Self {
        v.clone()
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}
impl From<usize> for Shape {
    fn from(v: usize) -> Self {
        Shape(vec![v])
    }
}
impl From<(usize, usize)> for Shape {
    fn from(v: (usize, usize)) -> Self {
        Shape(vec![v.0, v.1])
    }
}
impl From<(usize, usize, usize)> for Shape {
    fn from(v: (usize, usize, usize)) -> Self {
        Shape(vec![v.0, v.1, v.2])
    }
}
impl From<(usize, usize, usize, usize)> for Shape {
    fn from(v: (usize, usize, usize, usize)) -> Self {
        Shape(vec![v.0, v.1, v.2, v.3])
    }
}
