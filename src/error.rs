//! One error type for the whole crate. Messages name the op and the shapes involved.
use crate::{DType, Device};

/// Every error sd2 returns. Match on the kinds that matter to you (`Read`/`Write` with the
/// path and the `std::io::Error`, `Media` for unusable input, `Config` with its key, …); new
/// kinds may be added, so keep a `_` arm.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum Error {
    /// Tensor shapes that do not fit the op (`op` names it; `msg` gives the shapes).
    #[error("{op}: shape mismatch: {msg}")]
    Shape {
        /// The op that refused its inputs (`matmul`, `lora_linear`, …).
        op: &'static str,
        /// The shapes involved and what was expected of them.
        msg: String,
    },

    /// Two operands of one op with different dtypes (ops do not promote implicitly).
    #[error("{op}: dtype mismatch: {lhs:?} vs {rhs:?}")]
    DTypeMismatch {
        /// The op.
        op: &'static str,
        /// The first operand's dtype.
        lhs: DType,
        /// The second operand's dtype.
        rhs: DType,
    },

    /// An op that has no implementation for this dtype (e.g. a bf16-only kernel given f64).
    #[error("{op}: unsupported dtype {dtype:?}")]
    UnsupportedDType {
        /// The op.
        op: &'static str,
        /// The dtype it was given.
        dtype: DType,
    },

    /// Operands of one op on different devices (copy one with `Tensor::to_device` first).
    #[error("{op}: device mismatch: {lhs:?} vs {rhs:?}")]
    DeviceMismatch {
        /// The op.
        op: &'static str,
        /// The first operand's device.
        lhs: Device,
        /// The second operand's device.
        rhs: Device,
    },

    /// A `cuda:N` device asked of a build without the `cuda` feature (N is the ordinal;
    /// `Device::SIM_ORDINAL` / `Device::PLAN_ORDINAL` for `cuda:sim` / `cuda:plan`, which need
    /// `cuda-sim` or `cuda`).
    #[error("{}", not_compiled(*.0))]
    CudaNotCompiled(usize),

    /// The CUDA driver, a launch, an allocation or a copy failed (the driver's message), or
    /// no usable GPU was found.
    #[error("cuda: {0}")]
    Cuda(String),

    /// An index outside its tensor (a gather, a token id past the vocabulary, a narrow past
    /// the end).
    #[error("{op}: index out of range: {msg}")]
    Index {
        /// The op.
        op: &'static str,
        /// The index and the bound it broke.
        msg: String,
    },

    /// Misuse of the tape: `backward` of a non-scalar, of a tensor that does not require a
    /// gradient, or a gradient of the wrong shape.
    #[error("autograd: {0}")]
    Autograd(String),

    /// A training step met a non-finite loss term or gradient norm (`train.on_nonfinite =
    /// "stop"`), or a model about to be saved or just loaded holds a non-finite weight.
    #[error("{context}: not finite: {what}")]
    NonFinite {
        /// Where: the step, the checkpoint, the file.
        context: String,
        /// What was not finite: the loss term, the tensor and its element.
        what: String,
    },

    /// A configuration value out of its range: `key` is its dotted name (`train.lr`).
    #[error("config `{key}`: {msg}")]
    Config {
        /// The value's dotted name as a config file or `--set` spells it.
        key: String,
        /// What is wrong with it and what is accepted.
        msg: String,
    },

    /// Two things that must agree do not: a checkpoint and the CLIP folder given with it, a
    /// resumed run and its saved config or data, a reference dump and the model.
    #[error("{what}: {msg}")]
    Mismatch {
        /// The files or objects compared.
        what: String,
        /// What differs.
        msg: String,
    },

    /// A checkpoint, weights file or model folder that cannot be used: an unknown format, a
    /// tensor missing or of the wrong shape or dtype, sizes its own file does not hold, a
    /// config that does not validate. `path` names the file (or folder).
    #[error("{}: {msg}", path.display())]
    Checkpoint {
        /// The file or folder.
        path: std::path::PathBuf,
        /// What is wrong, naming the tensor or key.
        msg: String,
    },

    /// Text that does not parse: a JSON, TOML or safetensors header, a manifest line, a form
    /// field. `what` names the file and line (or the field).
    #[error("{what}: {msg}")]
    Parse {
        /// The file (with `:line` where there is one) or the field.
        what: String,
        /// The parser's message.
        msg: String,
    },

    /// An argument outside what the function accepts (pixel values that are not whole
    /// crops, an empty batch where one is needed, a class name that does not exist).
    #[error("{op}: {msg}")]
    InvalidInput {
        /// The function or command that refused it.
        op: String,
        /// What was given and what is accepted.
        msg: String,
    },

    /// Writing `path` failed — on a full disk `source.kind()` is
    /// `std::io::ErrorKind::StorageFull` — and nothing of it was left behind (the writer's
    /// temporary is removed; a previous file at `path` is untouched).
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The file that was being written.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// Reading `path` failed: `source.kind()` tells a missing file (`NotFound`) from a
    /// permission or device problem.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file or folder that was being read.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// An input image or video cannot be used: unreadable, truncated, malformed, over a size
    /// limit, or in a format sd2 does not read. The message names the file (or the upload).
    #[error("{0}")]
    Media(String),

    /// At capacity: the work was refused rather than queued without bound; try again later.
    #[error("busy: {0}")]
    Busy(String),

    /// A multi-process job that cannot form or went wrong: a launcher's variables that do not
    /// fit, a build without the collective the device needs, a rank that did not join or
    /// stopped. `rank` is this process's.
    #[error("rank {rank}: {msg}")]
    Dist {
        /// This process's rank.
        rank: usize,
        /// What went wrong and what to do.
        msg: String,
    },

    /// Anything else, as a message (a worker thread that died, an internal invariant broken).
    #[error("{0}")]
    Msg(String),

    /// An I/O error without a path (a socket, a pipe, stdin).
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

    /// `Error::Checkpoint` of `path`.
    pub fn checkpoint(path: &std::path::Path, msg: impl std::fmt::Display) -> Error {
        Error::Checkpoint {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        }
    }

    /// `Error::Parse` of `what` (a file, `file:line`, or a field).
    pub fn parse(what: impl std::fmt::Display, msg: impl std::fmt::Display) -> Error {
        Error::Parse {
            what: what.to_string(),
            msg: msg.to_string(),
        }
    }

    /// `Error::InvalidInput` from `op`.
    pub fn invalid(op: impl Into<String>, msg: impl std::fmt::Display) -> Error {
        Error::InvalidInput {
            op: op.into(),
            msg: msg.to_string(),
        }
    }

    /// `Error::Mismatch` between the things `what` names.
    pub fn mismatch(what: impl std::fmt::Display, msg: impl std::fmt::Display) -> Error {
        Error::Mismatch {
            what: what.to_string(),
            msg: msg.to_string(),
        }
    }

    /// Whether this is a read of a file or folder that does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The crate's result type.
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

// Errors cross threads (the loader's workers, the server's batcher): keep them Send + Sync.
const _: fn() = || {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Error>();
};

fn not_compiled(ordinal: usize) -> String {
    match ordinal {
        crate::Device::SIM_ORDINAL | crate::Device::PLAN_ORDINAL => {
            format!(
            "{}: sd2 was built without the kernel simulator (rebuild with `--features cuda-sim`)",
            if ordinal == crate::Device::SIM_ORDINAL { "cuda:sim" } else { "cuda:plan" }
        )
        }
        n => {
            format!("cuda:{n}: sd2 was built without CUDA support (rebuild with `--features cuda`)")
        }
    }
}
