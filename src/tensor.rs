//! `Tensor`: a shared, contiguous, row-major buffer with a shape, a dtype and a device, plus its
//! place in the autograd graph. Cloning a tensor is cheap (an `Arc`); `reshape` shares storage.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLockReadGuard, RwLockWriteGuard};

use crate::autograd::Node;
use crate::backend::cpu::{CpuElem, CpuStorage};
use crate::backend::BackendStorage;
use crate::rng::Rng;
use crate::storage::{Storage, StorageCell};
use crate::{DType, Device, Error, Result, Shape};

/// A process-wide unique id of a tensor handle, taken from a counter at creation. Gradients are
/// keyed by it in the `GradStore`. Views and `into_trainable`/`detach` copies get new ids even
/// though they share storage; clones of one `Tensor` keep the id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// How a tensor takes part in autograd.
pub(crate) enum GradState {
    /// Data or frozen weight: never gets a gradient.
    Const,
    /// Trainable leaf: its gradient lands in the `GradStore`.
    Leaf,
    /// Output of a recorded op; the node is taken (and its saved tensors freed) by backward.
    Op(Mutex<Option<Node>>),
}

pub(crate) struct Inner {
    pub(crate) id: TensorId,
    pub(crate) storage: Arc<StorageCell>,
    pub(crate) shape: Shape,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) grad: GradState,
}

/// An n-dimensional array: a shared, contiguous, row-major storage with a [`Shape`], a
/// [`DType`] and a [`Device`], and its role in autograd (constant, trainable leaf or the output
/// of a recorded op). Cloning is cheap (an `Arc`) and keeps the id. Ops live in `crate::ops`
/// and return new tensors; data changes in place only through explicit updates
/// (`update_storage`: optimizer steps, gradient accumulation).
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{:?}, {}, {}]",
            self.shape(),
            self.dtype(),
            self.device()
        )
    }
}

impl Tensor {
    pub(crate) fn build(storage: Arc<StorageCell>, shape: Shape, grad: GradState) -> Tensor {
        let (dtype, device) = {
            let s = storage.read();
            (s.dtype(), s.device())
        };
        Tensor(Arc::new(Inner {
            id: TensorId::next(),
            storage,
            shape,
            dtype,
            device,
            grad,
        }))
    }

    /// A constant tensor over `storage`, which must hold exactly `shape`'s elements.
    pub fn from_storage(storage: Storage, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if storage.len() != shape.elem_count() {
            return Err(Error::shape(
                "from_storage",
                format!("{} elements cannot have shape {shape:?}", storage.len()),
            ));
        }
        Ok(Tensor::build(
            Arc::new(StorageCell::new(storage)),
            shape,
            GradState::Const,
        ))
    }

    /// A constant tensor that takes `data` (host elements of type `T`, row-major) and puts it on
    /// `device` (a copy for a CUDA device). `data.len()` must equal the shape's element count.
    pub fn from_vec<T: CpuElem>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Tensor> {
        Tensor::from_storage(Storage::from_cpu(T::wrap(data), device)?, shape)
    }

    /// As [`Tensor::from_vec`], copying `data` first.
    pub fn from_slice<T: CpuElem>(
        data: &[T],
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// A tensor of `dtype` from f64 values (rounded as the dtype requires).
    pub fn from_f64(
        data: &[f64],
        shape: impl Into<Shape>,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let s = CpuStorage::F64(data.to_vec());
        let s = crate::backend::BackendStorage::cast(&s, dtype)?;
        Tensor::from_storage(Storage::from_cpu(s, device)?, shape)
    }

    /// A constant tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        let shape = shape.into();
        Tensor::from_storage(
            Storage::from_cpu(CpuStorage::zeros(shape.elem_count(), dtype), device)?,
            shape,
        )
    }

    /// A constant tensor with every element `value` (rounded to `dtype`; `as` semantics for the
    /// integer types).
    pub fn full(
        value: f64,
        shape: impl Into<Shape>,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        Tensor::from_f64(&vec![value; shape.elem_count()], shape, dtype, device)
    }

    /// A constant tensor of ones.
    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, dtype, device)
    }

    /// A 0-d tensor.
    pub fn scalar(value: f64, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(value, (), dtype, device)
    }

    /// Normal(0, std²) samples from a seeded generator.
    pub fn randn(
        shape: impl Into<Shape>,
        std: f64,
        dtype: DType,
        device: Device,
        seed: u64,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let mut rng = Rng::new(seed);
        let v: Vec<f64> = (0..shape.elem_count())
            .map(|_| rng.normal() * std)
            .collect();
        Tensor::from_f64(&v, shape, dtype, device)
    }

    /// Uniform [lo, hi) samples from a seeded generator.
    pub fn rand_uniform(
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: Device,
        seed: u64,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let mut rng = Rng::new(seed);
        let v: Vec<f64> = (0..shape.elem_count())
            .map(|_| lo + (hi - lo) * rng.uniform())
            .collect();
        Tensor::from_f64(&v, shape, dtype, device)
    }

    /// This handle's unique id (the key of its gradient in a `GradStore`).
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    /// The logical shape (the storage holds exactly its element count, row-major).
    pub fn shape(&self) -> &Shape {
        &self.0.shape
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        self.0.shape.dims()
    }

    /// Number of dimensions (0 for a scalar).
    pub fn rank(&self) -> usize {
        self.0.shape.rank()
    }

    /// Number of elements (the product of the dimensions).
    pub fn elem_count(&self) -> usize {
        self.0.shape.elem_count()
    }

    /// The element type of the storage.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    /// Where the storage lives.
    pub fn device(&self) -> Device {
        self.0.device
    }

    /// A trainable leaf over the same storage: its gradients are collected by `backward`.
    pub fn into_trainable(self) -> Tensor {
        Tensor::build(
            self.0.storage.clone(),
            self.0.shape.clone(),
            GradState::Leaf,
        )
    }

    /// A constant over the same storage, cut from the graph.
    pub fn detach(&self) -> Tensor {
        Tensor::build(
            self.0.storage.clone(),
            self.0.shape.clone(),
            GradState::Const,
        )
    }

    /// Whether this is a trainable leaf (made by [`Tensor::into_trainable`]), whose gradient
    /// `backward` returns.
    pub fn is_trainable(&self) -> bool {
        matches!(self.0.grad, GradState::Leaf)
    }

    /// Whether gradients flow to this tensor (a trainable leaf or the output of a recorded op).
    pub fn is_tracked(&self) -> bool {
        !matches!(self.0.grad, GradState::Const)
    }

    pub(crate) fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read()
    }

    /// The shared storage itself (for copies derived from it: `StorageCell::derived`).
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    pub(crate) fn storage_cell(&self) -> Arc<StorageCell> {
        self.0.storage.clone()
    }

    pub(crate) fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write()
    }

    /// Whether no other tensor shares this storage (so it may be updated in place).
    pub(crate) fn storage_is_unique(&self) -> bool {
        Arc::strong_count(&self.0) == 1 && Arc::strong_count(&self.0.storage) == 1
    }

    /// Runs `f` on the storage in place (optimizers, gradient accumulation). The caller must
    /// own the tensor's data: every tensor sharing the storage sees the change.
    pub fn update_storage<R>(&self, f: impl FnOnce(&mut Storage) -> Result<R>) -> Result<R> {
        f(&mut self.storage_mut())
    }

    /// The first element that is NaN or ±∞ (its flat index and value), or None: a host read.
    pub fn first_non_finite(&self) -> Result<Option<(usize, f64)>> {
        Ok(self
            .to_vec_f64()?
            .into_iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite()))
    }

    /// A host copy of the storage in its own dtype (a device read for CUDA tensors).
    pub fn to_cpu_storage(&self) -> Result<CpuStorage> {
        self.storage().to_cpu()
    }

    /// The elements as `T`, converting the dtype when it differs.
    pub fn to_vec<T: CpuElem>(&self) -> Result<Vec<T>> {
        let s = self.to_cpu_storage()?;
        let s = if s.dtype() == T::DTYPE {
            s
        } else {
            crate::backend::BackendStorage::cast(&s, T::DTYPE)?
        };
        Ok(s.as_slice::<T>()?.to_vec())
    }

    /// Every element widened to f64, row-major (a host read).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        Ok(self.to_cpu_storage()?.to_f64_vec())
    }

    /// The value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f64> {
        if self.elem_count() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("tensor of shape {:?} is not a scalar", self.shape()),
            ));
        }
        Ok(self.to_vec_f64()?[0])
    }

    /// A copy on `device` (a cheap clone when already there). Not differentiable.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let cpu = self.to_cpu_storage()?;
        Tensor::from_storage(Storage::from_cpu(cpu, device)?, self.shape().clone())
    }

    /// A deep copy with fresh storage (constant).
    pub fn copy(&self) -> Result<Tensor> {
        let s = self.storage().try_clone()?;
        Tensor::from_storage(s, self.shape().clone())
    }
}
