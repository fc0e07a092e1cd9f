//! safetensors in and out. Reading memory-maps the file(s), accepts f32/f16/bf16 (and f64, i64,
//! i32, u32, u8) on disk and converts to the dtype asked for; a directory may hold one
//! `model.safetensors` or shards listed by `model.safetensors.index.json`. Every error names the
//! file and the tensor. Writing goes to a temporary file that is renamed into place.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};

use crate::backend::cpu::CpuStorage;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Tensor};

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::checkpoint(path, e)
}

struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl MappedFile {
    fn open(path: &Path) -> Result<MappedFile> {
        let f = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
        // SAFETY: the file is only read; a concurrent writer would be a user error, and the
        // weights are copied out before use.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io_err(path, e))?;
        SafeTensors::deserialize(&map)
            .map_err(|e| io_err(path, format!("not a valid safetensors file: {e}")))?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
        })
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|e| io_err(&self.path, e))
    }
}

/// The string metadata (`__metadata__`) of one safetensors file; empty when it has none. Reads
/// the header only.
pub fn metadata(path: &Path) -> Result<HashMap<String, String>> {
    let f = MappedFile::open(path)?;
    let (_, meta) = SafeTensors::read_metadata(&f.map).map_err(|e| io_err(path, e))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Named tensors from one safetensors file or a sharded set, read on demand. Tracks which
/// names were taken so a loader can report what it did not expect.
pub struct WeightStore {
    files: Vec<MappedFile>,
    index: BTreeMap<String, usize>,
    used: HashSet<String>,
}

impl WeightStore {
    /// `path` is a `.safetensors` file, an `.index.json`, or a directory holding
    /// `model.safetensors` or `model.safetensors.index.json`.
    pub fn open(path: &Path) -> Result<WeightStore> {
        let path = if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if single.exists() {
                single
            } else if index.exists() {
                index
            } else {
                return Err(Error::Msg(format!(
                    "{}: no model.safetensors or model.safetensors.index.json in this directory",
                    path.display()
                )));
            }
        } else {
            path.to_path_buf()
        };
        if path.to_string_lossy().ends_with(".json") {
            return Self::open_index(&path);
        }
        let f = MappedFile::open(&path)?;
        let index = f
            .tensors()?
            .names()
            .into_iter()
            .map(|n| (n.to_string(), 0))
            .collect();
        Ok(WeightStore {
            files: vec![f],
            index,
            used: HashSet::new(),
        })
    }

    fn open_index(path: &Path) -> Result<WeightStore> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| io_err(path, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| io_err(path, "no \"weight_map\" object"))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<MappedFile> = vec![];
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut index = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                io_err(path, format!("weight_map[{tensor:?}] is not a file name"))
            })?;
            let fi = match by_name.get(file) {
                Some(i) => *i,
                None => {
                    files.push(MappedFile::open(&dir.join(file))?);
                    by_name.insert(file.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            if !files[fi].tensors()?.names().iter().any(|n| *n == tensor) {
                return Err(io_err(
                    &files[fi].path,
                    format!(
                        "tensor `{tensor}` listed in {} is not in this shard",
                        path.display()
                    ),
                ));
            }
            index.insert(tensor.clone(), fi);
        }
        Ok(WeightStore {
            files,
            index,
            used: HashSet::new(),
        })
    }

    /// Every tensor name in the store (across all shards), in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// Whether a tensor of this name is stored. Does not mark it as used.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Shape of a stored tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let fi = *self.index.get(name).ok_or_else(|| self.missing(name))?;
        let st = self.files[fi].tensors()?;
        let v = st
            .tensor(name)
            .map_err(|e| io_err(&self.files[fi].path, format!("{name}: {e}")))?;
        Ok(v.shape().to_vec())
    }

    fn missing(&self, name: &str) -> Error {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        Error::Msg(format!("missing tensor `{name}` in {}", files.join(", ")))
    }

    /// Takes `name`, checks its shape, converts it to `dtype` on `device`.
    pub fn get(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let fi = *self.index.get(name).ok_or_else(|| self.missing(name))?;
        let f = &self.files[fi];
        let st = f.tensors()?;
        let v = st
            .tensor(name)
            .map_err(|e| io_err(&f.path, format!("{name}: {e}")))?;
        if v.shape() != shape {
            return Err(io_err(
                &f.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    v.shape()
                ),
            ));
        }
        let cpu = decode(v.dtype(), v.data())
            .map_err(|e| io_err(&f.path, format!("tensor `{name}`: {e}")))?;
        if dtype.is_float() != crate::backend::BackendStorage::dtype(&cpu).is_float() {
            return Err(io_err(
                &f.path,
                format!(
                    "tensor `{name}` has dtype {:?} on disk, expected {}",
                    v.dtype(),
                    if dtype.is_float() {
                        "a float dtype"
                    } else {
                        "an integer dtype"
                    }
                ),
            ));
        }
        let cpu = crate::backend::BackendStorage::cast(&cpu, dtype)?;
        self.used.insert(name.to_string());
        Tensor::from_storage(Storage::from_cpu(cpu, device)?, shape)
    }

    /// Names never taken with `get`, minus those `ignore` accepts.
    pub fn unused(&self, ignore: impl Fn(&str) -> bool) -> Vec<String> {
        self.index
            .keys()
            .filter(|n| !self.used.contains(*n) && !ignore(n))
            .cloned()
            .collect()
    }
}

fn le_chunks<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| f(c.try_into().expect("exact chunk")))
        .collect()
}

/// Little-endian bytes of a safetensors dtype → a CPU buffer (f16 widens to f32).
fn decode(dt: StDtype, data: &[u8]) -> std::result::Result<CpuStorage, String> {
    Ok(match dt {
        StDtype::F32 => CpuStorage::F32(le_chunks(data, f32::from_le_bytes)),
        StDtype::F64 => CpuStorage::F64(le_chunks(data, f64::from_le_bytes)),
        StDtype::BF16 => {
            CpuStorage::BF16(le_chunks(data, |b| bf16::from_bits(u16::from_le_bytes(b))))
        }
        StDtype::F16 => CpuStorage::F32(le_chunks(data, |b| {
            f16::from_bits(u16::from_le_bytes(b)).to_f32()
        })),
        StDtype::I64 => CpuStorage::I64(le_chunks(data, i64::from_le_bytes)),
        StDtype::I32 => CpuStorage::I64(le_chunks(data, |b| i32::from_le_bytes(b) as i64)),
        StDtype::U32 => CpuStorage::U32(le_chunks(data, u32::from_le_bytes)),
        StDtype::U8 => CpuStorage::U32(data.iter().map(|b| *b as u32).collect()),
        other => return Err(format!("unsupported dtype {other:?} on disk")),
    })
}

/// Every tensor of a safetensors file, in its stored dtype (f16 as f32).
pub fn load(path: &Path, device: Device) -> Result<Vec<(String, Tensor)>> {
    let mut store = WeightStore::open(path)?;
    let names: Vec<String> = store.names().cloned().collect();
    let mut out = vec![];
    for n in names {
        let fi = store.index[&n];
        let st = store.files[fi].tensors()?;
        let v = st
            .tensor(&n)
            .map_err(|e| io_err(path, format!("{n}: {e}")))?;
        let cpu =
            decode(v.dtype(), v.data()).map_err(|e| io_err(path, format!("tensor `{n}`: {e}")))?;
        let shape = v.shape().to_vec();
        store.used.insert(n.clone());
        out.push((
            n,
            Tensor::from_storage(Storage::from_cpu(cpu, device)?, shape)?,
        ));
    }
    Ok(out)
}

struct Owned {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn encode(t: &Tensor) -> Result<Owned> {
    let s = t.to_cpu_storage()?;
    let (dtype, data): (StDtype, Vec<u8>) = match &s {
        CpuStorage::F32(v) => (
            StDtype::F32,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        CpuStorage::F64(v) => (
            StDtype::F64,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        CpuStorage::BF16(v) => (
            StDtype::BF16,
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        ),
        CpuStorage::I64(v) => (
            StDtype::I64,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        CpuStorage::U32(v) => (
            StDtype::U32,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    };
    Ok(Owned {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// Writes named tensors (with optional string metadata) atomically: temp file, then rename.
pub fn save(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let owned: Vec<(String, Owned)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.to_string(), encode(t)?)))
        .collect::<Result<_>>()?;
    let views: Vec<(String, &Owned)> = owned.iter().map(|(n, o)| (n.clone(), o)).collect();
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    safetensors::serialize_to_file(views, metadata, &tmp).map_err(|e| {
        std::fs::remove_file(&tmp).ok(); // a full disk leaves no partial file behind
        match e {
            safetensors::SafeTensorError::IoError(e) => crate::fs::write_err(path, e),
            e => io_err(path, e),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        crate::fs::write_err(path, e)
    })
}

/// Writes f16 copies of f32 tensors (for tests of f16 checkpoints).
pub fn save_f16(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let owned: Vec<(String, Owned)> = tensors
        .iter()
        .map(|(n, t)| {
            let v = t.to_vec::<f32>()?;
            let data = v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
                .collect();
            Ok((
                n.to_string(),
                Owned {
                    dtype: StDtype::F16,
                    shape: t.dims().to_vec(),
                    data,
                },
            ))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, &Owned)> = owned.iter().map(|(n, o)| (n.clone(), o)).collect();
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}
