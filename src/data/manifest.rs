//! Dataset manifests (SD2-SPEC §6): JSON Lines, one image per line,
//! `{"path", "label": real|fs|fr|efs|fe, "source", "split": train|val|test, "face", "env", "video"?}`,
//! paths relative to the manifest's folder. Everything is validated up front; a bad line is an
//! error naming the file and line, or — with `skip_bad` — a counted warning listed in `skipped`.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clip::preprocess::check_size;
use crate::sd2::type_texts::{class_id, CLASSES};
use crate::{Error, Result};

/// Which part of a dataset an item belongs to. Serialized lowercase (`train`, `val`,
/// `test`), as in a manifest's `split` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Trained on.
    Train,
    /// Scored after every training epoch to pick `checkpoints/best`; `sd2 eval` of the test
    /// split also chooses its accuracy threshold here.
    Val,
    /// Held out: scored only by the final evaluation (`sd2 eval`, the demo's report).
    Test,
}

impl Split {
    /// The split a manifest's `split` string names (`train`, `val` or `test`, lowercase
    /// only); `None` for anything else.
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
    /// Image path, relative to the manifest's folder (an absolute path is used as is).
    pub path: String,
    /// Class name: `real`, `fs`, `fr`, `efs` or `fe` (one of [`CLASSES`]).
    pub label: String,
    /// Dataset or generator the image comes from; reports break results down by source and
    /// mAUC averages over sources.
    pub source: String,
    /// `train`, `val` or `test` (see [`Split::parse`]).
    pub split: String,
    /// Text description of the face, for the dual contrast loss L_D. May be empty (the
    /// default) unless L_D is on, when every train line needs one.
    #[serde(default)]
    pub face: String,
    /// Text description of the surroundings (setting, lighting, background), for L_D. Same
    /// rule as `face`.
    #[serde(default)]
    pub env: String,
    /// Id of the video the frame was taken from; frames with the same id are averaged for
    /// the video-level AUC. Absent for still images.
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
    /// Class id, an index into [`CLASSES`]: 0 real, 1 FS, 2 FR, 3 EFS, 4 FE.
    pub label: usize,
    /// Dataset or generator the image comes from (`Record::source`).
    pub source: String,
    /// The split the line assigns the image to.
    pub split: Split,
    /// Face description for L_D (may be empty; see `LoadOptions::require_descriptions`).
    pub face: String,
    /// Environment description for L_D (may be empty; see
    /// `LoadOptions::require_descriptions`).
    pub env: String,
    /// Id of the source video, for per-video scores; `None` for still images.
    pub video: Option<String>,
    /// The source's compression level (`c23`), when the manifest gives one.
    pub compression: Option<String>,
    /// 1-based line in the manifest.
    pub line: usize,
}

impl Item {
    /// Whether the label is a forgery class (anything but 0, real).
    pub fn is_fake(&self) -> bool {
        self.label != 0
    }
}

/// How [`Manifest::load`] validates lines. The default checks the JSON, the required
/// fields, label, split and that each image file exists, and fails on the first bad line.
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

/// A loaded manifest: its valid items and, with `skip_bad`, the lines it left out.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The manifest file it was read from. (`sd2 train` on a pack builds an empty
    /// `Manifest` whose path is the pack folder.)
    pub path: PathBuf,
    /// Every valid line, in file order (blank lines are ignored).
    pub items: Vec<Item>,
    /// (line, reason) of every skipped line (with `skip_bad`).
    pub skipped: Vec<(usize, String)>,
}

impl Manifest {
    /// Reads and validates every non-blank line of `path` as `opts` asks. Image paths resolve
    /// against the manifest's folder.
    ///
    /// Errors: `Error::Read` when the file cannot be read; otherwise the first bad line as
    /// `Error::Parse` (`FILE:LINE: reason`). With `opts.skip_bad` bad lines are instead listed in
    /// `skipped` and logged as warnings.
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
                    return Err(Error::parse(format!("{}:{line}", path.display()), reason))
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

    /// The items of one split, in manifest order.
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
