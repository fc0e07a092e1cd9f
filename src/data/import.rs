//! Datasets prepared by DeepfakeBench (and DF40, which uses its layout) as sd2 manifests.
//!
//! DeepfakeBench's preprocessing writes one JSON per dataset:
//! `{dataset: {label: {split: {[compression:] {video: {"label", "frames": [paths]}}}}}}` —
//! FaceForensics++ has the compression level (`c23`, `c40`, `raw`) between split and video,
//! Celeb-DF, DFDC and the others do not. Each frame becomes a manifest line: its class from the
//! label (`LabelMap`: FF++'s Deepfakes/FaceSwap/FaceShifter → fs, Face2Face/NeuralTextures → fr,
//! DF40's families as they are, Celeb-DF/DFDC/UADFV fakes → fs; any label can be remapped),
//! `source` = the dataset, `video` = label/video (one id per video, whatever its frames),
//! the split as the JSON has it, the compression level kept.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::manifest::Record;
use crate::sd2::type_texts::{class_id, CLASSES};
use crate::{Error, Result};

/// Largest dataset JSON read (FF++'s, every frame of every method, is well under this).
pub const MAX_JSON_BYTES: u64 = 2 << 30;

/// DeepfakeBench's and DF40's labels (lower case, `_fake`/`-fake` suffixes dropped) and the
/// class each maps to. Labels with "real" in them are `real`.
pub const DEFAULT_MAP: &[(&str, &str)] = &[
    // FaceForensics++ and DeepFakeDetection.
    ("ff-df", "fs"),
    ("ff-fs", "fs"),
    ("ff-fh", "fs"),
    ("ff-f2f", "fr"),
    ("ff-nt", "fr"),
    ("dfd", "fs"),
    // Other video datasets: face swaps.
    ("celebdfv1", "fs"),
    ("celebdfv2", "fs"),
    ("celebdfv3", "fs"),
    ("dfdc", "fs"),
    ("dfdcp_fakea", "fs"),
    ("dfdcp_fakeb", "fs"),
    ("dfdcp", "fs"),
    ("uadfv", "fs"),
    ("fakeavceleb", "fs"),
    ("deeperforensics-1.0", "fs"),
    ("deeperforensics", "fs"),
    ("wilddeepfake", "fs"),
    // DF40: face swapping.
    ("blendface", "fs"),
    ("e4s", "fs"),
    ("facedancer", "fs"),
    ("faceswap", "fs"),
    ("fsgan", "fs"),
    ("inswap", "fs"),
    ("mobileswap", "fs"),
    ("simswap", "fs"),
    ("uniface", "fs"),
    // DF40: face reenactment.
    ("danet", "fr"),
    ("facevid2vid", "fr"),
    ("fomm", "fr"),
    ("hyperreenact", "fr"),
    ("lia", "fr"),
    ("mcnet", "fr"),
    ("mraa", "fr"),
    ("one_shot_free", "fr"),
    ("pirender", "fr"),
    ("sadtalker", "fr"),
    ("tpsm", "fr"),
    ("wav2lip", "fr"),
    // DF40: entire face synthesis.
    ("ddim", "efs"),
    ("dit", "efs"),
    ("pixart", "efs"),
    ("rddm", "efs"),
    ("sd2.1", "efs"),
    ("sit", "efs"),
    ("stylegan2", "efs"),
    ("stylegan3", "efs"),
    ("styleganxl", "efs"),
    ("vqgan", "efs"),
    ("whichfaceisreal", "efs"),
    // DF40: face editing.
    ("collabdiff", "fe"),
    ("e4e", "fe"),
    ("stargan", "fe"),
    ("starganv2", "fe"),
    ("styleclip", "fe"),
];

/// Labels to classes: `DEFAULT_MAP` with the user's entries over it.
#[derive(Clone, Debug)]
pub struct LabelMap {
    map: HashMap<String, usize>,
}

fn key(label: &str) -> String {
    let l = label.trim().to_ascii_lowercase();
    for suffix in ["_fake", "-fake", "_fakes"] {
        if let Some(s) = l.strip_suffix(suffix) {
            return s.to_string();
        }
    }
    l
}

impl Default for LabelMap {
    fn default() -> LabelMap {
        let map = DEFAULT_MAP
            .iter()
            .filter_map(|(l, c)| Some((l.to_string(), class_id(c)?)))
            .collect();
        LabelMap { map }
    }
}

impl LabelMap {
    /// Adds `LABEL=CLASS` entries (`--map FF-NT=fe`); a bad one is an error naming it.
    pub fn with(mut self, entries: &[String]) -> Result<LabelMap> {
        for e in entries {
            let (l, c) = e.split_once('=').ok_or_else(|| Error::Config {
                key: "import.map".into(),
                msg: format!("`{e}`: give LABEL=CLASS"),
            })?;
            let c = class_id(c.trim()).ok_or_else(|| Error::Config {
                key: "import.map".into(),
                msg: format!("`{e}`: the class must be one of {}", CLASSES.join("|")),
            })?;
            self.map.insert(key(l), c);
        }
        Ok(self)
    }

    /// The class of DeepfakeBench label `label`, or None when the map does not know it.
    pub fn class(&self, label: &str) -> Option<usize> {
        let k = key(label);
        if let Some(&c) = self.map.get(&k) {
            return Some(c);
        }
        if k.contains("real") {
            return Some(0);
        }
        None
    }
}

/// What an import made.
#[derive(Clone, Debug, Default)]
pub struct Imported {
    /// One per frame, in the JSON's order.
    pub records: Vec<Record>,
    /// Frames per (source, split, class).
    pub counts: BTreeMap<(String, String, String), usize>,
    /// Videos per split.
    pub videos: BTreeMap<String, usize>,
    /// Frames whose file is not there (with `check_files`).
    pub missing: usize,
}

/// How to import.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Relative frame paths are under this folder (DeepfakeBench's `rgb_dir`).
    pub root: PathBuf,
    /// Labels to classes.
    pub map: LabelMap,
    /// At most this many frames per video, spread evenly (None: all).
    pub frames_per_video: Option<usize>,
    /// Count frames whose file is missing (`Imported::missing`).
    pub check_files: bool,
    /// Make the splits by video instead of keeping the JSON's (which may then have none).
    pub resplit: Option<Resplit>,
}

/// Splits made by video: each video (by dataset and name, whatever its method or compression
/// level) goes whole to train, val or test, in the given proportions, in an order fixed by
/// a hash of its name and `seed` — never frame by frame. Videos are grouped by name, not by
/// the people in them: FF++'s real `000` and its fake `000_003` may land in different splits
/// (FF++'s own split pairs them; keep its JSON's splits for comparable numbers).
#[derive(Clone, Debug, PartialEq)]
pub struct Resplit {
    /// Fractions of the videos for train, val and test (they sum to 1).
    pub fractions: [f64; 3],
    /// Seed of the video order: the same seed and video names give the same splits.
    pub seed: u64,
}

impl Resplit {
    /// `0.8,0.1,0.1` (train, val, test; normalized to sum 1).
    pub fn parse(spec: &str, seed: u64) -> Result<Resplit> {
        let bad = |msg: String| Error::Config {
            key: "import.resplit".into(),
            msg: format!("`{spec}`: {msg} (give TRAIN,VAL,TEST fractions, e.g. 0.8,0.1,0.1)"),
        };
        let v: Vec<f64> = spec
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let [a, b, c] = v[..] else {
            return Err(bad(format!("{} numbers, not 3", v.len())));
        };
        let sum = a + b + c;
        if [a, b, c].iter().any(|x| !(x.is_finite() && *x >= 0.0)) || sum <= 0.0 {
            return Err(bad("each must be ≥ 0 and their sum > 0".into()));
        }
        Ok(Resplit {
            fractions: [a / sum, b / sum, c / sum],
            seed,
        })
    }

    /// Sets each record's split from its video key (`group[i]` for record i).
    fn assign(&self, records: &mut [Record], group: &[String]) {
        let mut keys: Vec<&str> = group.iter().map(|s| s.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let h = |k: &str| {
            // FNV-1a, then mixed with the seed: an order unrelated to the names.
            let mut x: u64 = 0xcbf2_9ce4_8422_2325;
            for b in k.bytes() {
                x = (x ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
            crate::rng::mix64(x ^ crate::rng::mix64(self.seed))
        };
        keys.sort_by_key(|k| (h(k), *k));
        let n = keys.len();
        let n_train = (self.fractions[0] * n as f64).round() as usize;
        let n_val = ((self.fractions[0] + self.fractions[1]) * n as f64).round() as usize;
        let split: HashMap<&str, &str> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let s = if i < n_train {
                    "train"
                } else if i < n_val.max(n_train) {
                    "val"
                } else {
                    "test"
                };
                (*k, s)
            })
            .collect();
        for (r, g) in records.iter_mut().zip(group) {
            r.split = split
                .get(g.as_str())
                .copied()
                .unwrap_or("train")
                .to_string();
        }
    }
}

fn bad(path: &Path, at: &str, msg: impl std::fmt::Display) -> Error {
    Error::parse(path.display(), format!("{at}: {msg}"))
}

/// The manifest records of DeepfakeBench dataset JSON `json`.
pub fn deepfakebench(json: &Path, opts: &ImportOptions) -> Result<Imported> {
    let len = std::fs::metadata(json)
        .map_err(|e| Error::read(json, e))?
        .len();
    if len > MAX_JSON_BYTES {
        return Err(bad(
            json,
            "file",
            format!("{len} bytes is over the {MAX_JSON_BYTES} byte limit"),
        ));
    }
    let text = std::fs::read_to_string(json).map_err(|e| Error::read(json, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(json, "JSON", e))?;
    let obj =
        |v: &serde_json::Value, at: &str| -> Result<serde_json::Map<String, serde_json::Value>> {
            v.as_object()
                .cloned()
                .ok_or_else(|| bad(json, at, "expected an object"))
        };
    let mut out = Imported::default();
    // A video in two splits would leak test frames into training.
    let mut split_of: HashMap<String, String> = HashMap::new();
    // Per record, the key its video is split by (`--resplit`): dataset/video name, so the
    // same video under several compressions or methods lands in one split.
    let mut group: Vec<String> = vec![];
    for (dataset, labels) in obj(&v, "top level")? {
        for (label_key, splits) in obj(&labels, &dataset)? {
            let at = format!("{dataset}/{label_key}");
            let splits = obj(&splits, &at)?;
            let is_split = |k: &String| matches!(k.as_str(), "train" | "val" | "test");
            // With --resplit, a JSON may have no split level at all.
            let by_split: Vec<(String, serde_json::Value)> = if splits.keys().all(is_split) {
                splits.into_iter().collect()
            } else if opts.resplit.is_some() {
                vec![(String::new(), serde_json::Value::Object(splits))]
            } else {
                let k = splits.keys().find(|k| !is_split(k)).cloned();
                return Err(bad(
                    json,
                    &format!("{at}/{}", k.unwrap_or_default()),
                    "the split must be train, val or test (for a JSON without splits, \
                     give --resplit to make them by video)",
                ));
            };
            for (split, node) in by_split {
                let at = if split.is_empty() {
                    at.clone()
                } else {
                    format!("{at}/{split}")
                };
                let node = obj(&node, &at)?;
                // Videos directly, or compression levels holding videos.
                let is_video = |v: &serde_json::Value| v.get("frames").is_some();
                let groups: Vec<(Option<String>, serde_json::Map<String, serde_json::Value>)> =
                    if node.values().all(is_video) {
                        vec![(None, node)]
                    } else {
                        node.into_iter()
                            .map(|(c, v)| Ok((Some(c.clone()), obj(&v, &format!("{at}/{c}"))?)))
                            .collect::<Result<_>>()?
                    };
                for (compression, videos) in groups {
                    for (video, entry) in videos {
                        let at = match &compression {
                            Some(c) => format!("{at}/{c}/{video}"),
                            None => format!("{at}/{video}"),
                        };
                        let label = entry
                            .get("label")
                            .and_then(|l| l.as_str())
                            .unwrap_or(&label_key)
                            .to_string();
                        let class = opts.map.class(&label).ok_or_else(|| {
                            bad(
                                json,
                                &at,
                                format!(
                                    "label `{label}` is not in the map; give its class with \
                                     --map {label}=CLASS ({})",
                                    CLASSES.join("|")
                                ),
                            )
                        })?;
                        let frames = entry
                            .get("frames")
                            .and_then(|f| f.as_array())
                            .ok_or_else(|| bad(json, &at, "`frames` must be a list of paths"))?;
                        let mut paths = Vec::with_capacity(frames.len());
                        for f in frames {
                            paths.push(
                                f.as_str().ok_or_else(|| {
                                    bad(json, &at, "a frame path is not a string")
                                })?,
                            );
                        }
                        // Frame files are numbered: in order, whatever order the JSON lists.
                        paths.sort_unstable();
                        if let Some(n) = opts.frames_per_video {
                            paths = crate::video::uniform_indices(paths.len(), n)
                                .into_iter()
                                .map(|i| paths[i])
                                .collect();
                        }
                        let id = format!("{label_key}/{video}");
                        let key = format!("{dataset}/{id}");
                        if opts.resplit.is_none() {
                            match split_of.get(&key) {
                                Some(s) if *s != split => {
                                    return Err(bad(
                                        json,
                                        &at,
                                        format!("video `{id}` is in both {s} and {split}"),
                                    ))
                                }
                                Some(_) => {}
                                None => {
                                    split_of.insert(key, split.clone());
                                }
                            }
                        }
                        for p in paths {
                            let full = opts.root.join(p);
                            if opts.check_files && !full.is_file() {
                                out.missing += 1;
                            }
                            group.push(format!("{dataset}/{video}"));
                            out.records.push(Record {
                                path: full.display().to_string(),
                                label: CLASSES[class].to_string(),
                                source: dataset.clone(),
                                split: split.clone(),
                                face: String::new(),
                                env: String::new(),
                                video: Some(id.clone()),
                                compression: compression.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    if let Some(r) = &opts.resplit {
        r.assign(&mut out.records, &group);
    }
    // Counts after the splits are final.
    let mut seen = std::collections::HashSet::new();
    for rec in &out.records {
        *out.counts
            .entry((rec.source.clone(), rec.split.clone(), rec.label.clone()))
            .or_default() += 1;
        let id = (rec.source.as_str(), rec.video.as_deref().unwrap_or(""));
        if seen.insert(id) {
            *out.videos.entry(rec.split.clone()).or_default() += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_map_to_classes_and_can_be_overridden() {
        let m = LabelMap::default();
        let c = |l: &str| m.class(l).map(|c| CLASSES[c]);
        assert_eq!(c("FF-real"), Some("real"));
        assert_eq!(c("CelebDFv2_real"), Some("real"));
        assert_eq!(c("FF-DF"), Some("fs"));
        assert_eq!(c("FF-NT"), Some("fr"));
        assert_eq!(c("CelebDFv1_fake"), Some("fs"));
        assert_eq!(c("simswap_Fake"), Some("fs"));
        assert_eq!(c("StyleGAN3"), Some("efs"));
        assert_eq!(c("e4e"), Some("fe"));
        assert_eq!(c("mystery_method"), None);
        let m = m
            .with(&["FF-NT=fe".into(), "mystery_method=efs".into()])
            .unwrap();
        assert_eq!(m.class("ff-nt").map(|c| CLASSES[c]), Some("fe"));
        assert_eq!(m.class("mystery_method").map(|c| CLASSES[c]), Some("efs"));
        assert!(LabelMap::default().with(&["x".into()]).is_err());
        assert!(LabelMap::default().with(&["x=nope".into()]).is_err());
    }
}
