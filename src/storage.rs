//! `Storage`: a buffer on some backend. Each method dispatches to the backend that holds the
//! operands (`on_backend!`: the same body for every backend); operands on different devices are
//! an error naming the op.
use crate::backend::cpu::CpuStorage;
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
use crate::backend::cuda::storage::CudaStorage;
use crate::backend::{BackendStorage, BinaryOp, MatmulSpec, UnaryOp};
use crate::{DType, Device, Error, Result, Shape};

/// A flat buffer on one backend: the data of a tensor, without shape. Operations on several
/// storages require them on one device (`Error::DeviceMismatch` naming the op otherwise).
#[derive(Debug)]
pub enum Storage {
    /// Host memory, run by the CPU backend.
    Cpu(CpuStorage),
    /// Device memory (a GPU, the simulator or the launch-plan recorder), run by the CUDA backend.
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    Cuda(CudaStorage),
}

/// A tensor's data (shared by its views) with a count of the in-place writes made to it and the
/// copies derived from it — a frozen weight's transpose for a kernel that wants it K-major — each
/// valid while the count is the one it was made at. A derived copy lives as long as the data.
pub(crate) struct StorageCell {
    data: std::sync::RwLock<Storage>,
    writes: std::sync::atomic::AtomicU64,
    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    derived: std::sync::Mutex<Vec<Derived>>,
}

#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
struct Derived {
    key: DerivedKey,
    writes: u64,
    storage: std::sync::Arc<Storage>,
}

/// What a derived copy is: a name and the shape it was derived for (views of one storage may
/// have different shapes).
#[cfg(any(feature = "cuda", feature = "cuda-sim"))]
pub(crate) type DerivedKey = (&'static str, usize, usize);

impl StorageCell {
    pub(crate) fn new(data: Storage) -> StorageCell {
        StorageCell {
            data: std::sync::RwLock::new(data),
            writes: std::sync::atomic::AtomicU64::new(0),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            derived: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, Storage> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The data for writing; counted once the lock is held, so a reader that holds the read
    /// lock sees a count no write is in the middle of.
    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Storage> {
        let g = self.data.write().unwrap_or_else(|e| e.into_inner());
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        g
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    /// The copy `key` derived from the data by `make`, made now if there is none for the
    /// current data. The caller holds `read()` (which keeps the count still) and passes the
    /// data to `make`; a stale copy of the same key is replaced, others are kept.
    pub(crate) fn derived(
        &self,
        key: DerivedKey,
        make: impl FnOnce() -> Result<Storage>,
    ) -> Result<std::sync::Arc<Storage>> {
        let writes = self.writes.load(std::sync::atomic::Ordering::Acquire);
        let mut d = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = d.iter().find(|e| e.key == key && e.writes == writes) {
            return Ok(e.storage.clone());
        }
        let storage = std::sync::Arc::new(make()?);
        d.retain(|e| e.key != key);
        d.push(Derived {
            key,
            writes,
            storage: storage.clone(),
        });
        Ok(storage)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
    /// Drops the copy `key` (its user chose a path that does not need it).
    pub(crate) fn forget(&self, key: DerivedKey) {
        let mut d = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        d.retain(|e| e.key != key);
    }

    /// How many derived copies are held (tests).
    #[cfg(all(test, any(feature = "cuda", feature = "cuda-sim")))]
    pub(crate) fn derived_count(&self) -> usize {
        self.derived.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
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

fn mismatch(op: &'static str, a: &Storage, b: &Storage) -> Error {
    Error::DeviceMismatch {
        op,
        lhs: a.device(),
        rhs: b.device(),
    }
}

/// Runs `$body` with every named operand (`&Storage`, or `?name` for `Option<&Storage>`)
/// rebound to the backend storage of the first operand's backend, and `$W` the constructor that
/// wraps that backend's results back into a `Storage`.
macro_rules! on_backend {
    ($op:expr, $first:ident, [$($s:ident),*], [$(?$o:ident),*], |$W:ident| $body:expr) => {{
        #[allow(unreachable_patterns)]
        match $first {
            Storage::Cpu(inner) => {
                let $W = Storage::Cpu;
                let _ = &$W;
                $(let $s = match $s { Storage::Cpu(x) => x, other => return Err(mismatch($op, $first, other)) };)*
                $(let $o = match $o { None => None, Some(Storage::Cpu(x)) => Some(x), Some(other) => return Err(mismatch($op, $first, other)) };)*
                let $first = inner;
                $body
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Storage::Cuda(inner) => {
                let $W = Storage::Cuda;
                let _ = &$W;
                $(let $s = match $s { Storage::Cuda(x) => x, other => return Err(mismatch($op, $first, other)) };)*
                $(let $o = match $o { None => None, Some(Storage::Cuda(x)) => Some(x), Some(other) => return Err(mismatch($op, $first, other)) };)*
                let $first = inner;
                $body
            }
        }
    }};
}

impl Storage {
    /// Puts a host buffer on `device`: moved as-is for the CPU, copied for a CUDA device. Without
    /// a CUDA feature a CUDA device gives `Error::CudaNotCompiled` (or the availability error).
    pub fn from_cpu(s: CpuStorage, device: Device) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(s)),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Device::Cuda(_) | Device::CudaSim | Device::CudaPlan => {
                let o = device.cuda_ordinal().unwrap_or(Device::SIM_ORDINAL);
                Ok(Storage::Cuda(CudaStorage::from_cpu(&s, o)?))
            }
            #[cfg(not(any(feature = "cuda", feature = "cuda-sim")))]
            Device::Cuda(_) | Device::CudaSim | Device::CudaPlan => {
                device.check_available()?;
                Err(Error::CudaNotCompiled(
                    device.cuda_ordinal().unwrap_or(Device::SIM_ORDINAL),
                ))
            }
        }
    }

    /// The device that holds the buffer.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(s) => s.device(),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Storage::Cuda(s) => s.device(),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            Storage::Cuda(s) => s.len(),
        }
    }

    /// True when the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A host copy of the data (for a CUDA buffer, a device-to-host read that synchronizes).
    pub fn to_cpu(&self) -> Result<CpuStorage> {
        let x = self;
        on_backend!("to_cpu", x, [], [], |_w| x.to_cpu())
    }

    /// A new zero-filled buffer of `len` elements of `dtype` on the same device as `self`
    /// (`self`'s own length and dtype do not matter).
    pub fn zeros_like(&self, len: usize, dtype: DType) -> Result<Storage> {
        let x = self;
        on_backend!("zeros", x, [], [], |w| Ok(w(x.zeros_like(len, dtype)?)))
    }

    /// A copy into new memory on the same device.
    pub fn try_clone(&self) -> Result<Storage> {
        let x = self;
        on_backend!("clone", x, [], [], |w| Ok(w(x.try_clone()?)))
    }

    /// The data converted to `dtype`; see `BackendStorage::cast` for which pairs each backend has.
    pub fn cast(&self, dtype: DType) -> Result<Storage> {
        let x = self;
        on_backend!("cast", x, [], [], |w| Ok(w(x.cast(dtype)?)))
    }

    /// `op` applied to every element (float dtypes).
    pub fn unary(&self, op: UnaryOp) -> Result<Storage> {
        let x = self;
        on_backend!(op.name(), x, [], [], |w| Ok(w(x.unary(op)?)))
    }

    /// The input gradient of `op`: `dy · op′(x)` with `self` as x, `y = op(x)` and `dy` of the
    /// same length. Ops whose derivative does not read y (all but exp, sqrt and sigmoid)
    /// accept an empty `y`.
    pub fn unary_bwd(&self, y: &Storage, dy: &Storage, op: UnaryOp) -> Result<Storage> {
        check_same(op.name(), &[self, y, dy])?;
        let x = self;
        on_backend!(op.name(), x, [y, dy], [], |w| Ok(
            w(x.unary_bwd(y, dy, op)?)
        ))
    }

    /// `x·mul + add` per element.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Storage> {
        let x = self;
        on_backend!("affine", x, [], [], |w| Ok(w(x.affine(mul, add)?)))
    }

    /// `op(self, rhs)` broadcast from shapes `ls` and `rs` to the output shape `os`; one float
    /// dtype, one device.
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
        on_backend!(op.name(), a, [rhs], [], |w| Ok(w(
            a.binary(rhs, op, ls, rs, os)?
        )))
    }

    /// `self += rhs` in place; same device, dtype and length.
    pub fn add_assign(&mut self, rhs: &Storage) -> Result<()> {
        check_same("add_assign", &[self, rhs])?;
        match (self, rhs) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a.add_assign(b),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            (Storage::Cuda(a), Storage::Cuda(b)) => a.add_assign(b),
            #[allow(unreachable_patterns)]
            (a, b) => Err(mismatch("add_assign", a, b)),
        }
    }

    /// The data of shape `src` summed over the broadcast dimensions down to `dst` (the reverse of
    /// [`Storage::broadcast_to`]; the gradient of a broadcast).
    pub fn sum_to(&self, src: &Shape, dst: &Shape) -> Result<Storage> {
        let x = self;
        on_backend!("sum_to", x, [], [], |w| Ok(w(x.sum_to(src, dst)?)))
    }

    /// The data of shape `src` repeated to the broadcast-compatible shape `dst`, made contiguous.
    pub fn broadcast_to(&self, src: &Shape, dst: &Shape) -> Result<Storage> {
        let x = self;
        on_backend!("broadcast_to", x, [], [], |w| Ok(w(
            x.broadcast_to(src, dst)?
        )))
    }

    /// The batched matrix product described by `spec`; both operands on one device, one dtype.
    pub fn matmul(&self, rhs: &Storage, spec: MatmulSpec) -> Result<Storage> {
        check_same("matmul", &[self, rhs])?;
        let a = self;
        on_backend!("matmul", a, [rhs], [], |w| Ok(w(a.matmul(rhs, spec)?)))
    }

    /// The data of shape `shape` with dimensions reordered (output dim `i` is input dim
    /// `perm[i]`), made contiguous.
    pub fn permute(&self, shape: &Shape, perm: &[usize]) -> Result<Storage> {
        let x = self;
        on_backend!("permute", x, [], [], |w| Ok(w(x.permute(shape, perm)?)))
    }

    /// Copies a `rows × cols` block into `dst`: `dst[dof + r·ds + c] = self[so + r·ss + c]`.
    /// `ss`/`ds` are the source and destination row strides and `so`/`dof` their offsets, all in
    /// elements. A block that does not fit either buffer is an `Error::Shape`; dtypes must match.
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
        match (self, dst) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a.copy2d(b, rows, cols, ss, ds, so, dof),
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            (Storage::Cuda(a), Storage::Cuda(b)) => a.copy2d(b, rows, cols, ss, ds, so, dof),
            #[allow(unreachable_patterns)]
            (a, b) => Err(mismatch("copy2d", a, b)),
        }
    }

    /// Gathers rows: `out[i, :] = self[ids[i], :]` with `self` viewed as [rows, cols]; `ids` is
    /// i64 or u32. An id outside `0..rows` is an `Error::Index` (on CUDA it is reported at the
    /// next read from the device, so the check costs no sync).
    pub fn index_rows(&self, ids: &Storage, rows: usize, cols: usize) -> Result<Storage> {
        check_same("index_rows", &[self, ids])?;
        let x = self;
        on_backend!("index_rows", x, [ids], [], |w| Ok(w(
            x.index_rows(ids, rows, cols)?
        )))
    }

    /// Scatter-adds in place: `out[ids[i], :] += self[i, :]`, `out` being [rows, cols] of
    /// `self`'s dtype, in id order with each add rounded to the dtype (used to add a gradient
    /// into the rows of one that already exists).
    pub fn index_add_rows_into(
        &self,
        ids: &Storage,
        out: &mut Storage,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        check_same("index_add_rows", &[self, ids, &*out])?;
        match (self, ids, out) {
            (Storage::Cpu(g), Storage::Cpu(i), Storage::Cpu(o)) => {
                g.index_add_rows_into(i, o, rows, cols)
            }
            #[cfg(any(feature = "cuda", feature = "cuda-sim"))]
            (Storage::Cuda(g), Storage::Cuda(i), Storage::Cuda(o)) => {
                g.index_add_rows_into(i, o, rows, cols)
            }
            #[allow(unreachable_patterns)]
            (a, _, b) => Err(mismatch("index_add_rows", a, b)),
        }
    }

    /// Scatter-add into a new buffer: `out = zeros([rows, cols]); out[ids[i], :] += self[i, :]`
    /// (the gradient of [`Storage::index_rows`]). Deterministic: each row sums in id order.
    pub fn index_add_rows(&self, ids: &Storage, rows: usize, cols: usize) -> Result<Storage> {
        check_same("index_add_rows", &[self, ids])?;
        let g = self;
        on_backend!("index_add_rows", g, [ids], [], |w| Ok(w(
            g.index_add_rows(ids, rows, cols)?
        )))
    }
}
