//! Inference: `Detector::load(checkpoint, clip_dir)` → `detect(&images)` → five class
//! probabilities, the class, and `fake_score = 1 − p(REAL)` (SD2-SPEC §1). The class embeddings
//! of the fixed test phrases are computed once and cached; LoRA can be merged into the base
//! weights (`W + s·B·A`) so inference runs plain linear layers.
use std::path::Path;

use super::model::Sd2Model;
use super::train::{check_trainable_header, load_trainable};
use super::type_texts::{TypeTexts, CLASSES};
use crate::clip::model::{Fwd, Init, WeightSource};
use crate::clip::preprocess::{pixel_values, RgbImage};
use crate::clip::{ClipModel, ClipTokenizer};
use crate::faces::{FaceBox, FaceConfig, FaceDetector};
use crate::io::WeightStore;
use crate::{no_grad, DType, Device, Error, Result, Tensor};
use serde::Serialize;

/// SD2's five classes: real, and the four forgery types. Serializes as its short name
/// (`"real"`, `"fs"`, `"fr"`, `"efs"`, `"fe"`), the names [`crate::sd2::CLASSES`] lists in the
/// same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// A real face.
    Real,
    /// Face swapping: the identity replaced (DeepFakes, FaceSwap, …).
    Fs,
    /// Face reenactment: the expression or pose driven by another video (Face2Face, …).
    Fr,
    /// Entire face synthesis: a face generated from nothing (GANs, diffusion).
    Efs,
    /// Face editing: attributes of a real face changed (age, hair, glasses, …).
    Fe,
}

impl Class {
    /// Every class, in the model's output order.
    pub const ALL: [Class; 5] = [Class::Real, Class::Fs, Class::Fr, Class::Efs, Class::Fe];

    /// The class at `index` of the model's output (None past 4).
    pub fn from_index(index: usize) -> Option<Class> {
        Class::ALL.get(index).copied()
    }

    /// Its index in the model's output (and in [`crate::sd2::CLASSES`]).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its short name: `real`, `fs`, `fr`, `efs` or `fe`.
    pub fn name(self) -> &'static str {
        CLASSES[self.index()]
    }

    /// Whether it is one of the four forgery types.
    pub fn is_fake(self) -> bool {
        self != Class::Real
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One image's (or crop's) scores: serializes as `{"probs", "class", "label", "fake_score"}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// softmax over REAL, FS, FR, EFS, FE.
    pub probs: [f64; 5],
    /// The most probable class's index in [`crate::sd2::CLASSES`].
    pub class: usize,
    /// That class (serialized as its name: `real`, `fs`, `fr`, `efs`, `fe`).
    pub label: Class,
    /// 1 − p(REAL).
    pub fake_score: f64,
}

impl Prediction {
    /// Whether the fake score reaches `threshold` (0.5 is the arg-max-free default; a
    /// threshold chosen on validation data is better).
    pub fn is_fake(&self, threshold: f64) -> bool {
        self.fake_score >= threshold
    }
}

/// One face of an image, scored.
#[derive(Clone, Debug, Serialize)]
pub struct FaceScore {
    /// Where it is and how sure the face detector was.
    #[serde(flatten)]
    pub face: FaceBox,
    /// 1 − p(REAL) of its crop.
    pub fake_score: f64,
    /// The most probable class of its crop (`real`, `fs`, `fr`, `efs`, `fe`).
    pub class: Class,
    /// softmax over REAL, FS, FR, EFS, FE.
    pub probs: [f64; 5],
    /// In a video: the face's track, the same number from frame to frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track: Option<usize>,
}

/// One sampled frame of a video, judged by its faces.
#[derive(Clone, Debug, Serialize)]
pub struct FrameVerdict {
    /// The frame's index in display order, from 0.
    pub index: usize,
    /// Its time from the start, in seconds.
    pub time_s: f64,
    /// The frame judged as a photo (its fields appear at the frame's level in JSON).
    #[serde(flatten)]
    pub verdict: ImageVerdict,
}

/// A video judged by its sampled frames: its score is the mean of the scores of the frames
/// with a face (DeepfakeBench's video-level protocol).
#[derive(Clone, Debug, Serialize)]
pub struct VideoVerdict {
    /// `"ok"`, or `"no_face"` when no sampled frame has a face.
    pub status: &'static str,
    /// The mean of the frames' `fake_score`s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_score: Option<f64>,
    /// The same as `video_score`, under the name images use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fake_score: Option<f64>,
    /// The most probable class of the frames' mean probabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    /// The video's size, length and rate.
    pub video: crate::video::VideoInfo,
    /// Sampled frames with at least one face.
    pub frames_with_faces: usize,
    /// Every sampled frame, in order.
    pub frames: Vec<FrameVerdict>,
}

/// The JSON line `sd2 predict` prints, and `sd2 serve` answers, for input `path` judged
/// `verdict` (an `ImageVerdict` or `VideoVerdict`): `{"path": …}` then the verdict's fields.
pub fn json_line(path: &str, verdict: &impl Serialize) -> serde_json::Value {
    let mut line = serde_json::Map::new();
    line.insert("path".into(), path.into());
    match serde_json::to_value(verdict) {
        Ok(serde_json::Value::Object(v)) => line.extend(v),
        Ok(other) => {
            line.insert("verdict".into(), other);
        }
        Err(e) => {
            line.insert("status".into(), "error".into());
            line.insert("error".into(), e.to_string().into());
        }
    }
    serde_json::Value::Object(line)
}

/// The JSON line for input `path` scored whole (`--no-face-crop`, `face_crop=false`).
pub fn prediction_json(path: &str, p: &Prediction) -> serde_json::Value {
    serde_json::json!({"path": path, "status": "ok", "class": p.label, "fake_score": p.fake_score, "probs": p.probs})
}

/// Intersection over union of two boxes.
fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: [f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let inter = w * h;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Gives each face of each frame a track number: the track of the previous frame's face it
/// overlaps most (IoU > 0.3, each taken once, larger faces first), or a new one.
fn assign_tracks(frames: &mut [FrameVerdict]) {
    let mut prev: Vec<([f32; 4], usize)> = vec![];
    let mut next_id = 0;
    for f in frames {
        let mut now = vec![];
        for face in &mut f.verdict.faces {
            let best = prev
                .iter()
                .enumerate()
                .map(|(i, (b, _))| (i, iou(*b, face.face.bbox)))
                .filter(|(_, v)| *v > 0.3)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let id = match best {
                Some((i, _)) => prev.remove(i).1,
                None => {
                    next_id += 1;
                    next_id - 1
                }
            };
            face.track = Some(id);
            now.push((face.face.bbox, id));
        }
        // A frame without faces keeps the last boxes: a face missed once keeps its track.
        if !now.is_empty() {
            prev = now;
        }
    }
}

/// An image judged by its faces: the image is as fake as its most fake face.
#[derive(Clone, Debug, Serialize)]
pub struct ImageVerdict {
    /// `"ok"`, or `"no_face"` when no face was found (then nothing is scored).
    pub status: &'static str,
    /// The largest `fake_score` of its faces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fake_score: Option<f64>,
    /// The class of that face.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    /// Every face found, the largest first.
    pub faces: Vec<FaceScore>,
}

impl ImageVerdict {
    /// The verdict of faces `boxes` scored `preds` (in the same order).
    pub fn from_faces(boxes: Vec<FaceBox>, preds: Vec<Prediction>) -> ImageVerdict {
        let faces: Vec<FaceScore> = boxes
            .into_iter()
            .zip(preds)
            .map(|(face, p)| FaceScore {
                face,
                fake_score: p.fake_score,
                class: p.label,
                probs: p.probs,
                track: None,
            })
            .collect();
        let worst = faces
            .iter()
            .max_by(|a, b| a.fake_score.total_cmp(&b.fake_score));
        ImageVerdict {
            status: if faces.is_empty() { "no_face" } else { "ok" },
            fake_score: worst.map(|f| f.fake_score),
            class: worst.map(|f| f.class),
            faces,
        }
    }
}

/// A trained SD2 model ready to score images: load one with [`Detector::builder`] (or
/// [`Detector::load`]), then [`Detector::detect_bytes`], [`Detector::detect_image`],
/// [`Detector::detect`] or, judging by faces, [`Detector::detect_faces`]. `Send + Sync`: one
/// detector can serve many threads.
pub struct Detector {
    /// The model (CLIP towers with their LoRA adapters, CLAM, the adapter, t' and b).
    pub model: Sd2Model,
    /// Normalized class embeddings [5, P] of the test phrases.
    class_embeds: Tensor,
    /// Images per model call; larger inputs are split.
    batch_size: usize,
    /// Where the model's CPU work runs (None: rayon's global pool).
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    /// The fake-score threshold chosen on validation data, when the checkpoint has one.
    threshold: Option<f64>,
}

/// Images per model call unless [`DetectorBuilder::batch_size`] says otherwise: ViT-L/14's
/// activations for 32 images at 224 px are about 0.6 GB in f32.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// How to load a [`Detector`]: `Detector::builder(checkpoint)`, options, then
/// [`DetectorBuilder::build`].
///
/// ```no_run
/// # fn main() -> sd2::Result<()> {
/// use sd2::{DType, Detector, Device};
/// let det = Detector::builder("runs/x/checkpoints/best")
///     .clip("models/clip-vit-large-patch14")
///     .device(Device::Cuda(0))
///     .dtype(DType::BF16)
///     .batch_size(64)
///     .merge_lora(true)
///     .build()?;
/// let p = det.detect_bytes(&std::fs::read("photo.jpg")?)?;
/// println!("{} {:.3} fake: {}", p.label, p.fake_score, det.is_fake(&p));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct DetectorBuilder {
    checkpoint: std::path::PathBuf,
    clip: Option<std::path::PathBuf>,
    device: Device,
    dtype: DType,
    batch_size: usize,
    threads: Option<usize>,
    merge_lora: bool,
}

impl DetectorBuilder {
    /// The CLIP folder (Hugging Face layout) the checkpoint was trained on. Needed unless the
    /// checkpoint trained every CLIP weight (`train_base`, e.g. the `tiny` preset), in which
    /// case it carries the towers itself.
    pub fn clip(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.clip = Some(dir.into());
        self
    }

    /// The device the model runs on (default: the CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The dtype of the CLIP weights and activations: `F32` (default, the reference) or
    /// `BF16` (half the memory; the trained tensors stay f32 masters, features and logits are
    /// f32). A `train_base` checkpoint, whose CLIP weights are trained tensors, runs in f32 or
    /// f64 only (`Sd2Model::new` refuses the others).
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Images per model call (default [`DEFAULT_BATCH_SIZE`]); larger inputs are split, so
    /// peak memory does not grow with the number of images.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Runs the model's CPU work on a pool of `n` threads of its own instead of rayon's
    /// global pool (which has one per core).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }

    /// Folds each LoRA adapter into its base weight (`W + s·B·A`) so inference runs plain
    /// linear layers (default off; on, scores move by rounding only).
    pub fn merge_lora(mut self, merge: bool) -> Self {
        self.merge_lora = merge;
        self
    }

    /// Loads the checkpoint: its format, configs and every tensor's shape are checked
    /// against each other and against the CLIP folder before weights are read.
    pub fn build(self) -> Result<Detector> {
        if self.batch_size == 0 {
            return Err(Error::Config {
                key: "batch_size".into(),
                msg: "must be at least 1".into(),
            });
        }
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F64) {
            return Err(Error::Config {
                key: "dtype".into(),
                msg: format!("{:?}: a detector runs in f32, bf16 or f64", self.dtype),
            });
        }
        let pool = match self.threads {
            None => None,
            Some(0) => {
                return Err(Error::Config {
                    key: "threads".into(),
                    msg: "must be at least 1".into(),
                })
            }
            Some(n) => Some(std::sync::Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("sd2-detector-{i}"))
                    .build()
                    .map_err(|e| Error::Msg(format!("detector thread pool: {e}")))?,
            )),
        };
        let run = || {
            Detector::load_with(
                &self.checkpoint,
                self.clip.as_deref(),
                self.device,
                self.dtype,
            )
        };
        let mut det = match &pool {
            Some(p) => p.install(run)?,
            None => run()?,
        };
        det.batch_size = self.batch_size;
        det.pool = pool;
        if self.merge_lora {
            det.merge_lora()?;
        }
        Ok(det)
    }
}

/// Normalized embeddings [5, P] of the fixed test phrase of each class.
pub fn class_embeddings(
    model: &Sd2Model,
    tokenizer: &ClipTokenizer,
    texts: &TypeTexts,
) -> Result<Tensor> {
    let _g = no_grad();
    let ctx = model.clip.config.text_config.max_position_embeddings;
    let ids = tokenizer.tokenize_batch_longest(
        &texts.test_phrases(),
        ctx,
        model.clip.logit_scale.device(),
    )?;
    model
        .text_features(&ids, Fwd::default())?
        .to_dtype(model.master_dtype())?
        .l2_normalize()
}

/// Predictions of `model` for normalized pixels [N, 3, S, S] against class embeddings.
pub fn predict_pixels(
    model: &Sd2Model,
    class_embeds: &Tensor,
    pixels: &Tensor,
) -> Result<Vec<Prediction>> {
    let _g = no_grad();
    let f = model
        .image_features(&pixels.to_dtype(model.dtype())?, Fwd::default())?
        .to_dtype(model.master_dtype())?
        .l2_normalize()?;
    let p = model
        .logits(&f, class_embeds)?
        .softmax_last()?
        .to_vec_f64()?;
    Ok(p.chunks(5)
        .map(|row| {
            let probs = [row[0], row[1], row[2], row[3], row[4]];
            let class = (0..5).fold(0, |b, j| if probs[j] > probs[b] { j } else { b });
            Prediction {
                probs,
                class,
                label: Class::ALL[class],
                fake_score: 1.0 - probs[0],
            }
        })
        .collect())
}

/// The CLIP weights a `train_base` checkpoint carries, under SD2's parameter names
/// (`clip.<HuggingFace name>`; the logit scale is SD2's own `logit_scale`).
struct CheckpointTowers<'a> {
    store: &'a mut WeightStore,
    dtype: DType,
    device: Device,
}

impl WeightSource for CheckpointTowers<'_> {
    fn get(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        let key = if name == "logit_scale" {
            name.to_string()
        } else {
            format!("clip.{name}")
        };
        self.store.get(&key, shape, self.dtype, self.device)
    }
}

impl Detector {
    /// Wraps a model (e.g. straight from a trainer), encoding the class phrases once.
    pub fn from_model(
        model: Sd2Model,
        tokenizer: &ClipTokenizer,
        texts: &TypeTexts,
    ) -> Result<Detector> {
        let class_embeds = class_embeddings(&model, tokenizer, texts)?;
        Ok(Detector {
            model,
            class_embeds,
            batch_size: DEFAULT_BATCH_SIZE,
            pool: None,
            threshold: None,
        })
    }

    /// Options for loading the checkpoint folder `checkpoint` (written by the trainer).
    pub fn builder(checkpoint: impl Into<std::path::PathBuf>) -> DetectorBuilder {
        DetectorBuilder {
            checkpoint: checkpoint.into(),
            clip: None,
            device: Device::Cpu,
            dtype: DType::F32,
            batch_size: DEFAULT_BATCH_SIZE,
            threads: None,
            merge_lora: false,
        }
    }

    /// A checkpoint folder written by the trainer, and the CLIP folder it was trained on (None
    /// for a checkpoint that trained every CLIP weight, e.g. the `tiny` preset), in f32 with
    /// the default options (`Detector::builder` for the others).
    pub fn load(checkpoint: &Path, clip_dir: Option<&Path>, device: Device) -> Result<Detector> {
        Self::load_with(checkpoint, clip_dir, device, DType::F32)
    }

    fn load_with(
        checkpoint: &Path,
        clip_dir: Option<&Path>,
        device: Device,
        dtype: DType,
    ) -> Result<Detector> {
        let state_path = checkpoint.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::read(&state_path, e))?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::parse(state_path.display(), e))?;
        // As the trainer's own reader: a format this build does not know is refused.
        match state.get("format").and_then(|f| f.as_u64()) {
            Some(1) => {}
            f => {
                return Err(Error::checkpoint(
                    &state_path,
                    format_args!(
                        "unknown checkpoint format {} (this build reads format 1)",
                        f.map_or("(none)".to_string(), |f| f.to_string())
                    ),
                ))
            }
        }
        let cfg: super::Sd2Config = serde_json::from_value(state["sd2"].clone())
            .map_err(|e| Error::checkpoint(&state_path, format_args!("sd2 config: {e}")))?;
        let clip_cfg: crate::clip::ClipConfig = serde_json::from_value(state["clip"].clone())
            .map_err(|e| Error::checkpoint(&state_path, format_args!("clip config: {e}")))?;
        clip_cfg
            .validate()
            .map_err(|e| Error::checkpoint(&state_path, e))?;
        let threshold = match state.get("threshold") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(t) if (0.0..=1.0).contains(&t) => Some(t),
                _ => {
                    return Err(Error::checkpoint(
                        &state_path,
                        format_args!("threshold {v}: expected a number in [0, 1]"),
                    ))
                }
            },
        };
        let trainable = checkpoint.join("trainable.safetensors");
        cfg.validate(&clip_cfg)
            .map_err(|e| Error::checkpoint(&state_path, e))?;
        check_trainable_header(&trainable, &cfg)?;
        let clip = match clip_dir {
            Some(dir) => {
                let clip = ClipModel::load(dir, dtype, device)?;
                if clip.config != clip_cfg {
                    return Err(Error::mismatch(
                        format_args!("{} and {}", checkpoint.display(), dir.display()),
                        "the checkpoint does not match this CLIP model (it was trained on another config)",
                    ));
                }
                clip
            }
            // The towers are in the checkpoint: built from it, each tensor's shape checked
            // against the file before it is read, so state.json's sizes allocate nothing the
            // weights do not hold.
            None if cfg.train_base => {
                let mut store = WeightStore::open(&trainable)?;
                ClipModel::from_source(
                    &clip_cfg,
                    &mut CheckpointTowers {
                        store: &mut store,
                        dtype,
                        device,
                    },
                )?
            }
            None => {
                return Err(Error::invalid(
                    "Detector::load",
                    format_args!(
                        "{}: this checkpoint needs the CLIP folder it was trained on",
                        checkpoint.display()
                    ),
                ))
            }
        };
        let model = Sd2Model::new(clip, cfg, 0)?;
        load_trainable(&model, &trainable)?;
        let mut det = Self::from_model(model, &ClipTokenizer::openai()?, &TypeTexts::shipped()?)?;
        det.threshold = threshold;
        Ok(det)
    }

    /// The fake-score threshold: the one chosen on validation data when training saved it in
    /// the checkpoint (`state.json`'s `threshold`), else 0.5.
    pub fn threshold(&self) -> f64 {
        self.threshold.unwrap_or(0.5)
    }

    /// Whether the checkpoint carries a threshold chosen on validation data.
    pub fn has_validation_threshold(&self) -> bool {
        self.threshold.is_some()
    }

    /// Whether `p` is fake at this detector's [`threshold`](Detector::threshold).
    pub fn is_fake(&self, p: &Prediction) -> bool {
        p.is_fake(self.threshold())
    }

    /// Images per model call.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Runs `f` on the detector's own thread pool, if it has one.
    fn in_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Folds every LoRA adapter into its base weight: W ← W + s·B·A.
    pub fn merge_lora(&mut self) -> Result<()> {
        let _g = no_grad();
        for layer in self
            .model
            .clip
            .vision
            .layers
            .iter_mut()
            .chain(self.model.clip.text.layers.iter_mut())
        {
            for (_, lin) in layer.linears_mut() {
                if let Some(l) = lin.lora.take() {
                    let delta = l.b.matmul(&l.a)?.scale(l.scale)?;
                    lin.weight = lin
                        .weight
                        .add(&delta.to_dtype(lin.weight.dtype())?)?
                        .detach();
                }
            }
        }
        Ok(())
    }

    /// Predictions for normalized pixel values [N, 3, S, S], in model calls of at most
    /// `batch_size` images.
    pub fn detect_pixels(&self, pixels: &Tensor) -> Result<Vec<Prediction>> {
        let n = pixels.dims().first().copied().unwrap_or(0);
        if n <= self.batch_size {
            return self.in_pool(|| predict_pixels(&self.model, &self.class_embeds, pixels));
        }
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(self.batch_size) {
            let part = pixels.narrow(0, start, self.batch_size.min(n - start))?;
            out.extend(self.in_pool(|| predict_pixels(&self.model, &self.class_embeds, &part))?);
        }
        Ok(out)
    }

    /// Predictions for preprocessed crops (`clip::preprocess::preprocess` of each, concatenated
    /// in host memory: [n, 3, S, S] flattened), in model calls of at most `chunk` crops. The one
    /// place host pixels become model input.
    pub fn detect_crops(&self, pixels: &[f32], chunk: usize) -> Result<Vec<Prediction>> {
        let size = self.model.clip.config.vision_config.image_size;
        let per = 3 * size * size;
        if !pixels.len().is_multiple_of(per) {
            return Err(Error::invalid(
                "detect_crops",
                format_args!("{} values are not whole {size}x{size} crops", pixels.len()),
            ));
        }
        let mut out = Vec::with_capacity(pixels.len() / per);
        let chunk = chunk.min(self.batch_size).clamp(1, usize::MAX / per);
        for part in pixels.chunks(chunk * per) {
            let px = Tensor::from_vec(
                part.to_vec(),
                (part.len() / per, 3, size, size),
                Device::Cpu,
            )?
            .to_dtype(self.model.dtype())?
            .to_device(self.model.clip.logit_scale.device())?;
            out.extend(self.detect_pixels(&px)?);
        }
        Ok(out)
    }

    /// Predictions for decoded RGB images (preprocessed as CLIP's image processor does), in
    /// model calls of at most `batch_size` images; an empty image is `Error::Media`.
    pub fn detect(&self, images: &[RgbImage]) -> Result<Vec<Prediction>> {
        let size = self.model.clip.config.vision_config.image_size;
        let mut out = Vec::with_capacity(images.len());
        for part in images.chunks(self.batch_size) {
            let px = pixel_values(
                part,
                size,
                self.model.dtype(),
                self.model.clip.logit_scale.device(),
            )?;
            out.extend(self.detect_pixels(&px)?);
        }
        Ok(out)
    }

    /// The prediction for one decoded image, scored whole (no face crop).
    pub fn detect_image(&self, image: &RgbImage) -> Result<Prediction> {
        self.detect(std::slice::from_ref(image))?
            .pop()
            .ok_or_else(|| Error::Msg("detect_image: the model returned no prediction".into()))
    }

    /// The prediction for one encoded image (JPEG, PNG or WebP bytes), scored whole. Bytes
    /// that do not decode, or claim a size over the decoder's limits, are `Error::Media`.
    pub fn detect_bytes(&self, bytes: &[u8]) -> Result<Prediction> {
        let img = crate::clip::preprocess::decode_image_bytes(bytes, "image bytes")?;
        self.detect_image(&img)
    }

    /// An image judged by its faces: each face `faces` finds is cropped (`faces::crop`) and
    /// scored; no face is the status `"no_face"`, not an error.
    pub fn detect_faces(&self, faces: &mut FaceDetector, img: &RgbImage) -> Result<ImageVerdict> {
        img.check()?;
        let size = self.model.clip.config.vision_config.image_size;
        let (boxes, px) = faces.detect_and_crop(img, size)?;
        Ok(ImageVerdict::from_faces(
            boxes,
            self.detect_crops(&px, usize::MAX)?,
        ))
    }

    /// A video judged by its faces: `frames` frames sampled uniformly (`video::sample_frames`),
    /// each judged as an image (`detect_faces`), faces tracked from frame to frame, crops
    /// scored `chunk` at a time.
    pub fn detect_video(
        &self,
        faces: &mut FaceDetector,
        path: &Path,
        frames: usize,
        chunk: usize,
    ) -> Result<VideoVerdict> {
        let size = self.model.clip.config.vision_config.image_size;
        judge_video(
            faces.config(),
            path,
            frames,
            size,
            VideoLimits::default(),
            |px, _| self.detect_crops(&px, chunk),
        )
    }

    /// `detect_faces` over image files, in order: `each` gets every path with its verdict or
    /// the error that names it (the others are judged all the same). Crops of consecutive
    /// images are scored together, about `chunk` at a time; one decoded image is in memory at
    /// once. Returns how many files failed.
    pub fn detect_files_faces(
        &self,
        paths: &[std::path::PathBuf],
        chunk: usize,
        faces: &mut FaceDetector,
        mut each: impl FnMut(&Path, Result<ImageVerdict>),
    ) -> Result<usize> {
        use crate::clip::preprocess::decode_image_then;
        let size = self.model.clip.config.vision_config.image_size;
        let mut failed = 0;
        // Images whose crops wait in `pixels` to be scored, in order.
        let mut pending: Vec<(&Path, Result<Vec<FaceBox>>)> = vec![];
        let mut pixels: Vec<f32> = vec![];
        let mut flush = |pending: &mut Vec<(&Path, Result<Vec<FaceBox>>)>,
                         pixels: &mut Vec<f32>|
         -> Result<()> {
            let mut preds = self.detect_crops(pixels, usize::MAX)?.into_iter();
            pixels.clear();
            for (p, r) in pending.drain(..) {
                match r {
                    Ok(boxes) => {
                        let mine: Vec<Prediction> = preds.by_ref().take(boxes.len()).collect();
                        if mine.len() != boxes.len() {
                            return Err(Error::Msg(
                                "detect_files_faces: the model returned fewer predictions than \
                                 faces"
                                    .into(),
                            ));
                        }
                        each(p, Ok(ImageVerdict::from_faces(boxes, mine)));
                    }
                    Err(e) => {
                        failed += 1;
                        each(p, Err(e));
                    }
                }
            }
            Ok(())
        };
        for p in paths {
            let r = decode_image_then(p, |img| faces.detect_and_crop(&img, size));
            match r {
                Ok((boxes, px)) => {
                    pixels.extend(px);
                    pending.push((p, Ok(boxes)));
                }
                Err(e) => pending.push((p, Err(e))),
            }
            if pixels.len() >= chunk.max(1) * 3 * size * size {
                flush(&mut pending, &mut pixels)?;
            }
        }
        flush(&mut pending, &mut pixels)?;
        Ok(failed)
    }

    /// Predictions for image files, scored `chunk` at a time; `each` gets every path in order
    /// with its prediction, or with the error that names it when the file cannot be read or
    /// decoded (the others are scored all the same). Each image is preprocessed as soon as it
    /// is decoded, so memory holds one decoded image and a chunk of model inputs. Returns how
    /// many files failed.
    pub fn detect_files(
        &self,
        paths: &[std::path::PathBuf],
        chunk: usize,
        mut each: impl FnMut(&Path, Result<Prediction>),
    ) -> Result<usize> {
        use crate::clip::preprocess::{decode_image_then, preprocess};
        let size = self.model.clip.config.vision_config.image_size;
        let mut failed = 0;
        for group in paths.chunks(chunk.max(1)) {
            // One full-size image at a time: memory does not grow with the chunk.
            let mut pixels = Vec::with_capacity(group.len() * 3 * size * size);
            let mut errors: Vec<Option<Error>> = Vec::with_capacity(group.len());
            for p in group {
                match decode_image_then(p, |img| Ok(preprocess(&img, size))) {
                    Ok(px) => {
                        pixels.extend(px);
                        errors.push(None);
                    }
                    Err(e) => errors.push(Some(e)),
                }
            }
            let mut preds = self.detect_crops(&pixels, usize::MAX)?.into_iter();
            for (p, e) in group.iter().zip(errors) {
                match e {
                    Some(e) => {
                        failed += 1;
                        each(p, Err(e));
                    }
                    None => {
                        let pred = preds.next().ok_or_else(|| {
                            Error::Msg("detect_files: fewer predictions than images".into())
                        })?;
                        each(p, Ok(pred));
                    }
                }
            }
        }
        Ok(failed)
    }
}

/// Bounds on judging one video (a server's; the library's own calls set none).
#[derive(Clone, Copy, Debug, Default)]
pub struct VideoLimits {
    /// Give up (an error) once this has passed.
    pub deadline: Option<std::time::Instant>,
    /// Refuse videos whose frames hold more pixels (`Error::Media`).
    pub max_pixels: Option<u64>,
}

/// Crops scored together while a video is read: memory holds at most this many crops (plus
/// one frame's) and the few frames in flight, whatever the video's length.
const VIDEO_CHUNK: usize = 64;

/// A video judged by its faces, the crops scored by `score` (given crops' pixels, [n, 3,
/// size, size] flattened, and n; it answers n predictions in order; called once per chunk of
/// about `VIDEO_CHUNK` crops as the video is read): `frames` frames sampled uniformly
/// (`video::sample_frames`), faces found in each (`FaceDetector` with `cfg`, on a few
/// threads), tracked from frame to frame; the video's score is the mean of its frames' (those
/// with a face).
pub fn judge_video(
    cfg: &FaceConfig,
    path: &Path,
    frames: usize,
    size: usize,
    limits: VideoLimits,
    mut score: impl FnMut(Vec<f32>, usize) -> Result<Vec<Prediction>>,
) -> Result<VideoVerdict> {
    let cfg = cfg.clone();
    // Frames are decoded in order on this thread and searched for faces on `workers`
    // others (each with its own detector); at most `workers` frames wait in between, so
    // memory holds a few frames, not the video. Their crops come back here and are scored a
    // chunk at a time.
    let workers = rayon::current_num_threads().clamp(1, 8);
    type Found = (usize, f64, Vec<FaceBox>, Vec<f32>);
    let mut done: Vec<(usize, f64, Vec<FaceBox>, Vec<Prediction>)> = vec![];
    let mut pending: Vec<Found> = vec![];
    let mut flush = |pending: &mut Vec<Found>,
                     done: &mut Vec<(usize, f64, Vec<FaceBox>, Vec<Prediction>)>|
     -> Result<()> {
        let n: usize = pending.iter().map(|f| f.2.len()).sum();
        let mut px = Vec::with_capacity(n * 3 * size * size);
        for f in pending.iter_mut() {
            px.append(&mut f.3);
        }
        let mut preds = if n > 0 { score(px, n)? } else { vec![] }.into_iter();
        for (index, time_s, boxes, _) in pending.drain(..) {
            let mine: Vec<Prediction> = preds.by_ref().take(boxes.len()).collect();
            done.push((index, time_s, boxes, mine));
        }
        Ok(())
    };
    let info = std::thread::scope(|s| -> Result<_> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<crate::video::Frame>(workers);
        let (found_tx, found_rx) = std::sync::mpsc::channel::<Found>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (rx, cfg, found_tx) = (rx.clone(), cfg.clone(), found_tx.clone());
                s.spawn(move || -> Result<()> {
                    let mut det = FaceDetector::new(cfg)?;
                    loop {
                        let next = rx
                            .lock()
                            .map_err(|_| Error::Msg("a face worker died".into()))?
                            .recv();
                        let Ok(frame) = next else { return Ok(()) };
                        let (boxes, px) = det.detect_and_crop(&frame.image, size)?;
                        if found_tx
                            .send((frame.index, frame.time_s, boxes, px))
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                })
            })
            .collect();
        drop(found_tx);
        let take = |pending: &mut Vec<Found>, f: Found| {
            pending.push(f);
            pending.iter().map(|f| f.2.len()).sum::<usize>() >= VIDEO_CHUNK
        };
        let info = crate::video::sample_frames(path, frames, |info, frame| {
            if let Some(max) = limits.max_pixels {
                if info.width as u64 * info.height as u64 > max {
                    return Err(Error::Media(format!(
                        "{}: its {}x{} frames are over the {max} pixel limit",
                        path.display(),
                        info.width,
                        info.height
                    )));
                }
            }
            if limits
                .deadline
                .is_some_and(|d| std::time::Instant::now() > d)
            {
                return Err(Error::Msg(format!(
                    "{}: out of time at frame {}",
                    path.display(),
                    frame.index
                )));
            }
            tx.send(frame)
                .map_err(|_| Error::Msg("face detection stopped early".into()))?;
            while let Ok(f) = found_rx.try_recv() {
                if take(&mut pending, f) {
                    flush(&mut pending, &mut done)?;
                }
            }
            Ok(())
        });
        drop(tx);
        let mut failed = None;
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => failed = failed.or(Some(Error::Msg("a face worker panicked".into()))),
            }
        }
        // A worker's error says more than the reader's "stopped early".
        if let Some(e) = failed {
            return Err(e);
        }
        let info = info?;
        while let Ok(f) = found_rx.try_recv() {
            take(&mut pending, f);
        }
        flush(&mut pending, &mut done)?;
        Ok(info)
    })?;
    done.sort_by_key(|f| f.0);
    let mut frames: Vec<FrameVerdict> = done
        .into_iter()
        .map(|(index, time_s, boxes, preds)| FrameVerdict {
            index,
            time_s,
            verdict: ImageVerdict::from_faces(boxes, preds),
        })
        .collect();
    assign_tracks(&mut frames);
    let scored: Vec<&FaceScore> = frames
        .iter()
        .filter_map(|f| {
            f.verdict
                .faces
                .iter()
                .max_by(|a, b| a.fake_score.total_cmp(&b.fake_score))
        })
        .collect();
    let n = scored.len();
    let (score, class) = if n == 0 {
        (None, None)
    } else {
        let score = scored.iter().map(|f| f.fake_score).sum::<f64>() / n as f64;
        let mut mean = [0.0; 5];
        for f in &scored {
            for (m, p) in mean.iter_mut().zip(f.probs) {
                *m += p / n as f64;
            }
        }
        let c = (0..5).fold(0, |b, j| if mean[j] > mean[b] { j } else { b });
        (Some(score), Some(Class::ALL[c]))
    };
    Ok(VideoVerdict {
        status: if n == 0 { "no_face" } else { "ok" },
        video_score: score,
        fake_score: score,
        class,
        video: info,
        frames_with_faces: n,
        frames,
    })
}
