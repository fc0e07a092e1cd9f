//! Small file-system helpers with no dependency on the rest of the crate (the runtime, the
//! profiler, checkpoints and reports all write through them).
use std::path::Path;

use crate::{Error, Result};

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}: {e}", path.display()))
}

/// `Error::Write` for `path`.
pub(crate) fn write_err(path: &Path, source: std::io::Error) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, then a rename, so a reader
/// never sees a half-written file. On any failure (`Error::Write`, naming `path`) the
/// temporary is removed and a previous file at `path` is untouched.
pub fn write_atomic(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // Flushed before the rename, so after a power loss the file is the old or the new one.
    if let Err(e) = write_synced_io(&tmp, bytes.as_ref()) {
        std::fs::remove_file(&tmp).ok();
        return Err(write_err(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        write_err(path, e)
    })
}

/// Removes the temporaries `write_atomic(path, …)` calls killed before their rename left
/// beside `path` (any process's).
pub fn remove_atomic_leftovers(path: &Path) {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) else {
        return;
    };
    let prefix = format!("{}.tmp", stem.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) && e.path().is_file() {
            std::fs::remove_file(e.path()).ok();
        }
    }
}

/// The lines of a UTF-8 text file (a texts file, a list of paths).
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
    Ok(text.lines().map(String::from).collect())
}

/// The image files (png, jpg, jpeg, webp by extension, any case) directly in `dir`, sorted.
pub fn image_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::read(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                ["png", "jpg", "jpeg", "webp"].contains(&x.to_ascii_lowercase().as_str())
            })
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Flushes a file or a folder to the disk (a folder: its entries, so renames in it persist).
pub fn fsync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, format!("fsync: {e}")))
}

/// Writes `bytes` to `path` and flushes it to the disk. A failure can leave part of the file:
/// write into a temporary place (as checkpoints do) or use `write_atomic`.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    write_synced_io(path, bytes).map_err(|e| write_err(path, e))
}

fn write_synced_io(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
