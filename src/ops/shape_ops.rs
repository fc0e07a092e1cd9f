//! Shape and data-movement ops: reshape (shares storage), permute/transpose, narrow, concat,
//! row gathers (embeddings, CLS/EOS extraction), patchify for the ViT stem, dtype casts.
use std::sync::Arc;

use super::{check_ids, record_fn, record_fn_acc};
use crate::tensor::GradState;
use crate::{DType, Error, Result, Shape, Tensor};

impl Tensor {
    /// Same elements, new shape; the storage is shared, not copied.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != self.elem_count() {
            return Err(crate::shape_err!(
                "reshape",
                "cannot reshape {:?} to {:?}",
                self.shape(),
                shape
            ));
        }
        if shape == *self.shape() {
            return Ok(self.clone());
        }
        let tracked = crate::autograd::is_grad_enabled() && self.is_tracked();
        if !tracked {
            return Ok(Tensor::build(
                self.0.storage.clone(),
                shape,
                GradState::Const,
            ));
        }
        let src = self.shape().clone();
        crate::autograd::note_recorded();
        let node = crate::autograd::Node::new(
            vec![Some(self.clone())],
            Box::new(super::FnAccBackward {
                name: "reshape",
                f: move |g: &Tensor, _: &[bool], _: &mut [Option<Tensor>]| {
                    Ok(vec![Some(g.reshape(src)?)])
                },
            }),
        );
        Ok(Tensor::build(
            Arc::clone(&self.0.storage),
            shape,
            GradState::Op(std::sync::Mutex::new(Some(node))),
        ))
    }

    /// Flattens dims `from..` into one.
    pub fn flatten_from(&self, from: usize) -> Result<Tensor> {
        let d = self.dims();
        if from >= d.len() {
            return Err(crate::shape_err!(
                "flatten_from",
                "dim {from} out of range for {:?}",
                d
            ));
        }
        let mut nd = d[..from].to_vec();
        nd.push(d[from..].iter().product());
        self.reshape(nd)
    }

    /// Output dim i is input dim `perm[i]`; the result is a contiguous copy.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if perm.len() != r
            || perm
                .iter()
                .any(|p| *p >= r || std::mem::replace(&mut seen[*p], true))
        {
            return Err(crate::shape_err!(
                "permute",
                "{:?} is not a permutation of the dims of {:?}",
                perm,
                self.dims()
            ));
        }
        let od: Vec<usize> = perm.iter().map(|p| self.dims()[*p]).collect();
        let out = self.storage().permute(self.shape(), perm)?;
        let mut inv = vec![0; r];
        for (i, p) in perm.iter().enumerate() {
            inv[*p] = i;
        }
        record_fn(
            "permute",
            out,
            Shape::new(od),
            &[self],
            move |_: &Tensor| move |g: &Tensor, _: &[bool]| Ok(vec![Some(g.permute(&inv)?)]),
        )
    }

    /// Swaps dimensions `d0` and `d1` (negative counts from the end), as a contiguous copy
    /// (a [`Tensor::permute`]); differentiable.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let a = self.shape().resolve_dim("transpose", d0)?;
        let b = self.shape().resolve_dim("transpose", d1)?;
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Elements `start..start+len` of `dim` (a copy).
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = self.shape().resolve_dim("narrow", dim)?;
        let size = self.dims()[d];
        if start + len > size {
            return Err(crate::shape_err!(
                "narrow",
                "{start}..{} is outside dim {d} of {:?}",
                start + len,
                self.dims()
            ));
        }
        let outer: usize = self.dims()[..d].iter().product();
        let inner: usize = self.dims()[d + 1..].iter().product();
        let mut od = self.dims().to_vec();
        od[d] = len;
        let mut out = self
            .storage()
            .zeros_like(outer * len * inner, self.dtype())?;
        self.storage().copy2d(
            &mut out,
            outer,
            len * inner,
            size * inner,
            len * inner,
            start * inner,
            0,
        )?;
        let src = self.shape().clone();
        record_fn("narrow", out, Shape::new(od), &[self], move |_: &Tensor| {
            move |g: &Tensor, _: &[bool]| {
                // Scatter back into zeros of the input's shape.
                let mut dx = g.storage().zeros_like(src.elem_count(), g.dtype())?;
                g.storage().copy2d(
                    &mut dx,
                    outer,
                    len * inner,
                    len * inner,
                    size * inner,
                    0,
                    start * inner,
                )?;
                Ok(vec![Some(Tensor::from_storage(dx, src)?)])
            }
        })
    }

    /// Joins tensors along `dim`; every other dim must match.
    pub fn cat(ts: &[&Tensor], dim: isize) -> Result<Tensor> {
        let first = ts
            .first()
            .ok_or_else(|| Error::shape("cat", "no tensors"))?;
        let d = first.shape().resolve_dim("cat", dim)?;
        for t in ts {
            super::check_same_dtype("cat", first, t)?;
            let ok = t.rank() == first.rank()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(i, (a, b))| i == d || a == b);
            if !ok {
                return Err(crate::shape_err!(
                    "cat",
                    "cannot join {:?} and {:?} along dim {d}",
                    first.dims(),
                    t.dims()
                ));
            }
        }
        let outer: usize = first.dims()[..d].iter().product();
        let inner: usize = first.dims()[d + 1..].iter().product();
        let sizes: Vec<usize> = ts.iter().map(|t| t.dims()[d]).collect();
        let total: usize = sizes.iter().sum();
        let mut od = first.dims().to_vec();
        od[d] = total;
        let mut out = first
            .storage()
            .zeros_like(outer * total * inner, first.dtype())?;
        let mut at = 0;
        for (t, s) in ts.iter().zip(&sizes) {
            t.storage().copy2d(
                &mut out,
                outer,
                s * inner,
                s * inner,
                total * inner,
                0,
                at * inner,
            )?;
            at += s;
        }
        record_fn("cat", out, Shape::new(od), ts, move |_: &Tensor| {
            move |g: &Tensor, needs: &[bool]| {
                let mut at = 0;
                let mut res = vec![];
                for (i, s) in sizes.iter().enumerate() {
                    res.push(if needs[i] {
                        Some(g.narrow(d as isize, at, *s)?)
                    } else {
                        None
                    });
                    at += s;
                }
                Ok(res)
            }
        })
    }

    /// Rows of `self` viewed as \[dims\[0\], rest\]: out\[i\] = self\[ids\[i\]\]. `ids` (i64/u32) may
    /// have any shape; the output is ids.shape + self.dims[1..]. Backward scatter-adds.
    pub fn index_rows(&self, ids: &Tensor) -> Result<Tensor> {
        check_ids("index_rows", ids)?;
        if self.rank() == 0 {
            return Err(crate::shape_err!(
                "index_rows",
                "cannot index rows of a scalar"
            ));
        }
        let rows = self.dims()[0];
        let cols: usize = self.dims()[1..].iter().product();
        let mut od = ids.dims().to_vec();
        od.extend_from_slice(&self.dims()[1..]);
        self.gather_rows(ids, rows, cols, od, false)
    }

    /// out[i] = row ids[i] of `self` viewed as [rows, cols], of shape `out`. With `unique` ids
    /// the backward adds its rows straight into the gradient `self` already has (when it has
    /// one nobody else holds): a few rows written instead of a whole zero tensor and an add.
    fn gather_rows(
        &self,
        ids: &Tensor,
        rows: usize,
        cols: usize,
        out: Vec<usize>,
        unique: bool,
    ) -> Result<Tensor> {
        let y = self.storage().index_rows(&ids.storage(), rows, cols)?;
        let (ids_c, src, dtype) = (ids.clone(), self.shape().clone(), self.dtype());
        record_fn_acc(
            "index_rows",
            y,
            Shape::new(out),
            &[self],
            move |_: &Tensor| {
                move |g: &Tensor, _: &[bool], acc: &mut [Option<Tensor>]| {
                    let into = acc[0].take_if(|a| {
                        unique
                            && a.dtype() == dtype
                            && a.shape() == &src
                            && !a.is_tracked()
                            && a.storage_is_unique()
                    });
                    if let Some(a) = into {
                        g.storage().index_add_rows_into(
                            &ids_c.storage(),
                            &mut a.storage_mut(),
                            rows,
                            cols,
                        )?;
                        return Ok(vec![Some(a)]);
                    }
                    let dx = g.storage().index_add_rows(&ids_c.storage(), rows, cols)?;
                    Ok(vec![Some(Tensor::from_storage(dx, src)?)])
                }
            },
        )
    }

    /// Embedding lookup: table [vocab, dim], ids [...] → [..., dim].
    pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        if table.rank() != 2 {
            return Err(crate::shape_err!(
                "embedding",
                "table must be [vocab, dim], got {:?}",
                table.dims()
            ));
        }
        table.index_rows(ids)
    }

    /// Per batch b, row `idx[b]` of `self` [B, S, D] → [B, D] (CLS and EOS pooling).
    pub fn select_rows_per_batch(&self, idx: &[usize]) -> Result<Tensor> {
        if self.rank() != 3 || idx.len() != self.dims()[0] {
            return Err(crate::shape_err!(
                "select_rows_per_batch",
                "x {:?} with {} indices",
                self.dims(),
                idx.len()
            ));
        }
        let (b, s, d) = (self.dims()[0], self.dims()[1], self.dims()[2]);
        let mut flat = Vec::with_capacity(b);
        for (bi, &i) in idx.iter().enumerate() {
            if i >= s {
                return Err(Error::Index {
                    op: "select_rows_per_batch",
                    msg: format!("row {i} of batch {bi} outside 0..{s}"),
                });
            }
            flat.push((bi * s + i) as u32);
        }
        let ids = Tensor::from_vec(flat, b, self.device())?;
        // One row per batch: the ids are distinct.
        self.gather_rows(&ids, b * s, d, vec![b, d], true)
    }

    /// Non-overlapping p×p patches of [B, C, H, W] as [B, (H/p)·(W/p), C·p·p], flattened in
    /// (c, ky, kx) order — PyTorch's Conv2d weight order. Trailing pixels that do not fill a
    /// patch are dropped, as a stride-p convolution does.
    pub fn patchify(&self, p: usize) -> Result<Tensor> {
        if self.rank() != 4 || p == 0 {
            return Err(crate::shape_err!(
                "patchify",
                "expected [B, C, H, W] and p > 0, got {:?}, p={p}",
                self.dims()
            ));
        }
        let (b, c, h, w) = (
            self.dims()[0],
            self.dims()[1],
            self.dims()[2],
            self.dims()[3],
        );
        let (gh, gw) = (h / p, w / p);
        let mut x = self.clone();
        if gh * p != h {
            x = x.narrow(2, 0, gh * p)?;
        }
        if gw * p != w {
            x = x.narrow(3, 0, gw * p)?;
        }
        x.reshape(vec![b, c, gh, p, gw, p])?
            .permute(&[0, 2, 4, 1, 3, 5])?
            .reshape((b, gh * gw, c * p * p))
    }

    /// The ViT stem: Conv2d(C→D, kernel p, stride p, no bias) with weight [D, C, p, p], as
    /// patchify + matmul. Returns [B, patches, D].
    pub fn patch_conv(&self, weight: &Tensor) -> Result<Tensor> {
        if weight.rank() != 4 || weight.dims()[2] != weight.dims()[3] {
            return Err(crate::shape_err!(
                "patch_conv",
                "weight must be [D, C, p, p], got {:?}",
                weight.dims()
            ));
        }
        let (d, c, p) = (weight.dims()[0], weight.dims()[1], weight.dims()[2]);
        if self.rank() != 4 || self.dims()[1] != c {
            return Err(crate::shape_err!(
                "patch_conv",
                "input {:?} does not have {c} channels",
                self.dims()
            ));
        }
        self.patchify(p)?
            .linear(&weight.reshape((d, c * p * p))?, None)
    }

    /// Converts the dtype (gradients are converted back).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let out = self.storage().cast(dtype)?;
        let src = self.dtype();
        record_fn(
            "to_dtype",
            out,
            self.shape().clone(),
            &[self],
            move |_: &Tensor| move |g: &Tensor, _: &[bool]| Ok(vec![Some(g.to_dtype(src)?)]),
        )
    }
}
