//! One error type for the whole crate. Messages name the op and the shapes involved.
use crate::{DType, Device};

/// Every error sd2 returns. Match on the kinds that matter to you (`Read`/`Write` with the
/// path and the `std::io::Error`, `Media` for unusable input, `Config` with its key, …); new
/// kinds may be added, so keep a `_` arm.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum Error {
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    #[error("{op}: dtype mismatch: {lhs:?} vs {rhs:?}")]
    DTypeMismatch {
        op: &'static str,
        lhs: DType,
        rhs: DType,
    },

    #[error("{op}: unsupported dtype {dtype:?}")]
    UnsupportedDType { op: &'static str, dtype: DType },

    #[error("{op}: device mismatch: {lhs:?} vs {rhs:?}")]
    DeviceMismatch {
        op: &'static str,
        lhs: Device,
        rhs: Device,
    },

    #[error("cuda:{0}: sd2 was built without CUDA support (rebuild with `--features cuda`)")]
    CudaNotCompiled(usize),

    #[error("cuda: {0}")]
    Cuda(String),

    #[error("{op}: index out of range: {msg}")]
    Index { op: &'static str, msg: String },

    #[error("autograd: {0}")]
    Autograd(String),

    /// A training step met a non-finite loss term or gradient norm (`train.on_nonfinite =
    /// "stop"`), or a model about to be saved or just loaded holds a non-finite weight.
    #[error("{context}: not finite: {what}")]
    NonFinite { context: String, what: String },

    /// A configuration value out of its range: `key` is its dotted name (`train.lr`).
    #[error("config `{key}`: {msg}")]
    Config { key: String, msg: String },

    /// Writing `path` failed — on a full disk `source.kind()` is
    /// `std::io::ErrorKind::StorageFull` — and nothing of it was left behind (the writer's
    /// temporary is removed; a previous file at `path` is untouched).
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    /// Reading `path` failed: `source.kind()` tells a missing file (`NotFound`) from a
    /// permission or device problem.
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    /// An input image or video cannot be used: unreadable, truncated, malformed, over a size
    /// limit, or in a format sd2 does not read. The message names the file (or the upload).
    #[error("{0}")]
    Media(String),

    /// At capacity: the work was refused rather than queued without bound; try again later.
    #[error("busy: {0}")]
    Busy(String),

    #[error("{0}")]
    Msg(String),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// `Error::Read` of `path`.
    pub fn read(path: &std::path::Path, source: std::io::Error) -> Error {
        Error::Read {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether this is a read of a file or folder that does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
}

/// `bail!(Shape: "op", "fmt", args)` style helper for the common shape error.
#[macro_export]
#[doc(hidden)]
macro_rules! shape_err {
    ($op:expr, $($arg:tt)*) => {
        $crate::Error::shape($op, format!($($arg)*))
    };
}
