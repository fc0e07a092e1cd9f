//! libnccl opened at run time by the file names NCCL is installed under, and the few entry
//! points sd2 calls, resolved once.
//!
//! cudarc 0.19's loader tries `libnccl.so` and `libnccl.so.<CUDA major>` (`.so.13`) but not
//! `libnccl.so.2`, the only name NVIDIA's wheels (PyTorch's `nvidia/nccl/lib`) and Debian's
//! `libnccl2` ship: through it, NCCL from PyTorch's wheels is never found (only where a
//! development symlink `libnccl.so` exists, as Debian's `libnccl-dev` or conda add). So the
//! library is opened here, with cudarc's declarations for the types and enum values. Results
//! come back as plain ints (a code newer than the bindings is then an error, not undefined
//! behaviour), with NCCL's own words for them.
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use cudarc::nccl::sys as ns;

type Code = c_int;

/// `ncclAllReduce` and `ncclBroadcast` share this C shape: send, receive, count, data type,
/// then an int that is the reduction op for the one and the root rank for the other, the
/// communicator and the stream.
pub(crate) type Collective = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ns::ncclComm_t,
    ns::cudaStream_t,
) -> Code;

/// The entry points of the loaded library.
pub(crate) struct Lib {
    /// The name or path it was opened by.
    pub file: String,
    pub get_version: unsafe extern "C" fn(*mut c_int) -> Code,
    pub get_unique_id: unsafe extern "C" fn(*mut ns::ncclUniqueId) -> Code,
    pub comm_init_rank:
        unsafe extern "C" fn(*mut ns::ncclComm_t, c_int, ns::ncclUniqueId, c_int) -> Code,
    pub all_reduce: Collective,
    pub broadcast: Collective,
    pub comm_destroy: unsafe extern "C" fn(ns::ncclComm_t) -> Code,
    pub comm_abort: unsafe extern "C" fn(ns::ncclComm_t) -> Code,
    get_error_string: unsafe extern "C" fn(Code) -> *const c_char,
    /// NCCL ≥ 2.13: the last error's details (a null communicator: the calling thread's).
    get_last_error: Option<unsafe extern "C" fn(ns::ncclComm_t) -> *const c_char>,
    // Last: the entry points above are only valid while the library is open.
    _lib: libloading::Library,
}

/// The names tried, in order: `SD2_NCCL_LIB` alone when set (a path or a file name), else the
/// versioned name NCCL's packages install and then the development symlink.
fn candidates() -> Vec<String> {
    match std::env::var("SD2_NCCL_LIB") {
        Ok(v) if !v.trim().is_empty() => vec![v.trim().to_string()],
        _ => vec!["libnccl.so.2".into(), "libnccl.so".into()],
    }
}

/// The library, opened on first use; the error says every name tried and why each failed.
pub(crate) fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(open).as_ref().map_err(Clone::clone)
}

fn open() -> Result<Lib, String> {
    let mut tried = vec![];
    for name in candidates() {
        // SAFETY: opening NCCL runs its initialisers, which only set up its own state.
        match unsafe { libloading::Library::new(&name) } {
            Ok(lib) => match resolve(lib, name.clone()) {
                Ok(lib) => return Ok(lib),
                Err(e) => tried.push(e),
            },
            Err(e) => {
                // libloading's message is "dlopen failed"; the loader's own words are its source.
                let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                tried.push(format!("{name}: {why}"));
            }
        }
    }
    Err(format!(
        "libnccl could not be opened ({}): put NCCL's lib folder on LD_LIBRARY_PATH (PyTorch's \
         wheels carry one in site-packages/nvidia/nccl/lib) or name the file in SD2_NCCL_LIB",
        tried.join("; ")
    ))
}

fn resolve(lib: libloading::Library, file: String) -> Result<Lib, String> {
    /// One entry point as the function-pointer type of the field it fills.
    fn sym<T: Copy>(lib: &libloading::Library, file: &str, name: &str) -> Result<T, String> {
        // SAFETY: each name is given the C signature NCCL's nccl.h declares for it (the
        // field's type); the pointer is used only while `lib` stays open (it is kept in Lib).
        unsafe { lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("{file} has no {name} (not NCCL 2.x?): {e}"))
    }
    Ok(Lib {
        get_version: sym(&lib, &file, "ncclGetVersion")?,
        get_unique_id: sym(&lib, &file, "ncclGetUniqueId")?,
        comm_init_rank: sym(&lib, &file, "ncclCommInitRank")?,
        all_reduce: sym(&lib, &file, "ncclAllReduce")?,
        broadcast: sym(&lib, &file, "ncclBroadcast")?,
        comm_destroy: sym(&lib, &file, "ncclCommDestroy")?,
        comm_abort: sym(&lib, &file, "ncclCommAbort")?,
        get_error_string: sym(&lib, &file, "ncclGetErrorString")?,
        get_last_error: sym(&lib, &file, "ncclGetLastError").ok(),
        file,
        _lib: lib,
    })
}

impl Lib {
    /// `Ok` for `ncclSuccess`; else `what`, NCCL's name for the code and, where NCCL has them,
    /// the details of the last error (on `comm`, or the thread's when null). `ncclInProgress`
    /// is an error too: only a non-blocking communicator returns it, and sd2 never asks for one
    /// (`NCCL_COMM_BLOCKING=0` in the environment would make one).
    pub fn check(&self, what: &str, code: Code, comm: ns::ncclComm_t) -> Result<(), String> {
        if code == ns::ncclResult_t::ncclSuccess as Code {
            return Ok(());
        }
        if code == ns::ncclResult_t::ncclInProgress as Code {
            return Err(format!(
                "{what}: ncclInProgress: sd2 needs blocking NCCL communicators (unset \
                 NCCL_COMM_BLOCKING)"
            ));
        }
        // SAFETY: both return static or per-communicator NUL-terminated strings (or null).
        let text = |p: *const c_char| {
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        let name = text(unsafe { (self.get_error_string)(code) }).unwrap_or_default();
        let last = self
            .get_last_error
            .and_then(|f| text(unsafe { f(comm) }))
            .filter(|s| !s.is_empty());
        Err(match last {
            Some(last) => format!("{what}: {name} (NCCL error {code}): {last}"),
            None => format!("{what}: {name} (NCCL error {code})"),
        })
    }

    /// The library's version: NCCL_VERSION_CODE as `major.minor.patch`.
    pub fn version(&self) -> Result<String, String> {
        let mut v: c_int = 0;
        // SAFETY: writes one int.
        self.check(
            "ncclGetVersion",
            unsafe { (self.get_version)(&mut v) },
            std::ptr::null_mut(),
        )?;
        // Since 2.9 the code is major·10000 + minor·100 + patch; before, major·1000 + ….
        let (major, rest) = if v >= 10000 {
            (v / 10000, v % 10000)
        } else {
            (v / 1000, v % 1000)
        };
        Ok(format!("{major}.{}.{}", rest / 100, rest % 100))
    }

    /// A new unique id (`ncclGetUniqueId`: rank 0 makes one for the job; no GPU is needed).
    pub fn unique_id(&self) -> Result<ns::ncclUniqueId, String> {
        let mut id = ns::ncclUniqueId { internal: [0; 128] };
        // SAFETY: writes the 128-byte id.
        let code = unsafe { (self.get_unique_id)(&mut id) };
        self.check("ncclGetUniqueId", code, std::ptr::null_mut())?;
        Ok(id)
    }
}
