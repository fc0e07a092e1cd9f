//! Dataset manifests (SD2-SPEC §6): JSON Lines, one image per line,
//! `{"path", "label": real|fs|fr|efs|fe, "source", "split": train|val|test, "face", "env", "video"?}`,
//! paths relative to the manifest's folder. Everything is validated up front; a bad line is an
//! error naming the file and line, or — with `skip_bad` — a counted warning listed in `skipped`.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clip::preprocess::check_size;
use crate::sd2::type_texts::{class_id, CLASSES};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "val" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// One line of a manifest as written on disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub path: String,
    pub label: String,
    pub source: String,
    pub split: String,
    #[serde(default)]
    pub face: String,
    #[serde(default)]
    pub env: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<String>,
    /// The source video's compression level, when the dataset has several (FF++: `c23`,
    /// `c40`, `raw`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
}

/// A validated manifest entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Resolved against the manifest's folder.
    pub path: PathBuf,
    /// As written in the manifest (for reports).
    pub rel_path: String,
    pub label: usize,
    pub source: String,
    pub split: Split,
    pub face: String,
    pub env: String,
    pub video: Option<String>,
    /// The source's compression level (`c23`), when the manifest gives one.
    pub compression: Option<String>,
    /// 1-based line in the manifest.
    pub line: usize,
}

impl Item {
    pub fn is_fake(&self) -> bool {
        self.label != 0
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Skip bad lines with a warning instead of failing.
    pub skip_bad: bool,
    /// Open every image's header (format, size limits) while validating.
    pub check_images: bool,
    /// Training items must have face and env descriptions (L_D is on).
    pub require_descriptions: bool,
    /// Decode every image in full while validating (with `check_images`): a truncated or
    /// corrupt file is found up front instead of by the loader.
    pub verify_images: bool,
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub path: PathBuf,
    pub items: Vec<Item>,
    /// (line, reason) of every skipped line (with `skip_bad`).
    pub skipped: Vec<(usize, String)>,
}

impl Manifest {
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut items = vec![];
        let mut skipped = vec![];
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            match parse_line(raw, dir, line, opts) {
                Ok(item) => items.push(item),
                Err(reason) if opts.skip_bad => skipped.push((line, reason)),
                Err(reason) => {
                    return Err(Error::Msg(format!("{}:{line}: {reason}", path.display())))
                }
            }
        }
        for (line, reason) in &skipped {
            log::warn!("{}:{line}: skipped: {reason}", path.display());
        }
        if !skipped.is_empty() {
            log::warn!("{}: skipped {} bad line(s)", path.display(), skipped.len());
        }
        Ok(Manifest {
            path: path.to_path_buf(),
            items,
            skipped,
        })
    }

    pub fn split(&self, split: Split) -> Vec<&Item> {
        self.items.iter().filter(|i| i.split == split).collect()
    }

    /// Writes records as JSON Lines, atomically.
    pub fn write(path: &Path, records: &[Record]) -> Result<()> {
        let mut out = String::new();
        for r in records {
            out.push_str(&serde_json::to_string(r).map_err(|e| Error::Msg(e.to_string()))?);
            out.push('\n');
        }
        crate::fs::write_atomic(path, out)
    }
}

fn parse_line(
    raw: &str,
    dir: &Path,
    line: usize,
    opts: LoadOptions,
) -> std::result::Result<Item, String> {
    let v: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))?;
    for field in ["path", "label", "source", "split"] {
        match v.get(field) {
            None => return Err(format!("missing field `{field}`")),
            Some(x) if !x.is_string() => return Err(format!("field `{field}` must be a string")),
            _ => {}
        }
    }
    let r: Record = serde_json::from_value(v).map_err(|e| format!("bad record: {e}"))?;
    let label = class_id(&r.label).ok_or_else(|| {
        format!(
            "unknown label `{}` (expected {})",
            r.label,
            CLASSES.join("|")
        )
    })?;
    let split = Split::parse(&r.split)
        .ok_or_else(|| format!("unknown split `{}` (expected train|val|test)", r.split))?;
    let path = dir.join(&r.path);
    if !path.is_file() {
        return Err(format!("image `{}` not found", r.path));
    }
    if opts.check_images {
        crate::clip::preprocess::image_file_len(&path).map_err(|e| e.to_string())?;
        let (w, h) = image::ImageReader::open(&path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| format!("image `{}`: {e}", r.path))?
            .into_dimensions()
            .map_err(|e| format!("image `{}` cannot be decoded: {e}", r.path))?;
        check_size(w, h).map_err(|e| format!("image `{}`: {e}", r.path))?;
        if opts.verify_images {
            // The whole file decoded once: a truncated or corrupt image is found here, not
            // mid-epoch.
            crate::clip::preprocess::decode_image(&path).map_err(|e| e.to_string())?;
        }
    }
    if opts.require_descriptions
        && split == Split::Train
        && (r.face.trim().is_empty() || r.env.trim().is_empty())
    {
        return Err("empty `face` or `env` description (needed by the dual contrast loss)".into());
    }
    Ok(Item {
        path,
        rel_path: r.path,
        label,
        source: r.source,
        split,
        face: r.face,
        env: r.env,
        video: r.video,
        compression: r.compression,
        line,
    })
}
