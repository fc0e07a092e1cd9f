//! dlib's 68-point face landmarks (feature `dlib`: the system's dlib, Debian's `libdlib-dev`,
//! and its model, `libdlib-data`'s `/usr/share/dlib/shape_predictor_68_face_landmarks.dat`, or
//! the file `SD2_DLIB_LANDMARKS` names), for DeepfakeBench's aligned crops (`faces::align`).
use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::clip::preprocess::RgbImage;
use crate::{Error, Result};

extern "C" {
    fn sd2_dlib_load(path: *const c_char, err: *mut c_char, err_len: usize) -> *mut c_void;
    fn sd2_dlib_free(sp: *mut c_void);
    #[allow(clippy::too_many_arguments)]
    fn sd2_dlib_landmarks(
        sp: *const c_void,
        rgb: *const u8,
        w: std::ffi::c_long,
        h: std::ffi::c_long,
        x0: std::ffi::c_long,
        y0: std::ffi::c_long,
        x1: std::ffi::c_long,
        y1: std::ffi::c_long,
        out: *mut f32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Where the model is looked for when `SD2_DLIB_LANDMARKS` is not set.
pub const DEFAULT_MODEL: &str = "/usr/share/dlib/shape_predictor_68_face_landmarks.dat";

/// A loaded shape predictor (read-only once loaded: shared by threads).
pub struct Landmarker {
    ptr: *mut c_void,
}

// dlib's shape_predictor::operator() is const and keeps no state between calls.
unsafe impl Send for Landmarker {}
unsafe impl Sync for Landmarker {}

impl Drop for Landmarker {
    fn drop(&mut self) {
        unsafe { sd2_dlib_free(self.ptr) }
    }
}

fn message(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The model's path: `SD2_DLIB_LANDMARKS`, else `DEFAULT_MODEL`.
pub fn model_path() -> PathBuf {
    std::env::var_os("SD2_DLIB_LANDMARKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_MODEL.into())
}

impl Landmarker {
    /// Reads a 68-point shape predictor (about a second for dlib's 100 MB file).
    pub fn load(path: &Path) -> Result<Landmarker> {
        let fail = |m: String| Error::Config {
            key: "faces.align".into(),
            msg: format!(
                "{}: {m} (Debian/Ubuntu: `apt install libdlib-data`; or set SD2_DLIB_LANDMARKS)",
                path.display()
            ),
        };
        if !path.is_file() {
            return Err(fail("no such file".into()));
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| fail("the path holds a NUL byte".into()))?;
        let mut err = [0 as c_char; 512];
        let ptr = unsafe { sd2_dlib_load(c.as_ptr(), err.as_mut_ptr(), err.len()) };
        if ptr.is_null() {
            return Err(fail(format!("dlib cannot read it: {}", message(&err))));
        }
        Ok(Landmarker { ptr })
    }

    /// The landmarker of `model_path()`, loaded once per process and path.
    pub fn shared() -> Result<Arc<Landmarker>> {
        type Loaded = Vec<(PathBuf, Arc<Landmarker>)>;
        static CACHE: OnceLock<Mutex<Loaded>> = OnceLock::new();
        let path = model_path();
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, l)) = cache.iter().find(|(p, _)| *p == path) {
            return Ok(l.clone());
        }
        let l = Arc::new(Landmarker::load(&path)?);
        cache.push((path, l.clone()));
        Ok(l)
    }

    /// The 68 landmarks of the face in `bbox` ([x0, y0, x1, y1], input pixels).
    pub fn landmarks(&self, img: &RgbImage, bbox: [f32; 4]) -> Result<[[f32; 2]; 68]> {
        let mut out = [0f32; 136];
        let mut err = [0 as c_char; 512];
        let r = bbox.map(|v| v.round() as std::ffi::c_long);
        let rc = unsafe {
            sd2_dlib_landmarks(
                self.ptr,
                img.data.as_ptr(),
                img.width as std::ffi::c_long,
                img.height as std::ffi::c_long,
                r[0],
                r[1],
                r[2],
                r[3],
                out.as_mut_ptr(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            return Err(Error::Msg(format!("dlib landmarks: {}", message(&err))));
        }
        Ok(std::array::from_fn(|i| [out[2 * i], out[2 * i + 1]]))
    }
}
