//! Faces in photos and frames: found by SeetaFace's frontal detector (the pure-Rust `rustface`
//! port; its model ships inside sd2, `seeta_fd_frontal_v1.0.bin`, BSD-2-Clause, see
//! `SEETAFACE-LICENSE`), then cut as the square crops SD2 was trained on: the box's longer
//! side times a margin (1.3, as DeepfakeBench's and FF++'s preprocessing), centred on the box
//! and moved inside the image.
//!
//! Large inputs are searched downscaled (`FaceConfig::detect_max_side`): the boxes are mapped
//! back to the input's pixels and the crops come from the full-resolution image.
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::clip::preprocess::{preprocess, resize_bicubic, RgbImage};
use crate::{Error, Result};

pub mod align;
#[cfg(feature = "dlib")]
pub mod dlib;

const SEETA_MODEL: &[u8] = include_bytes!("seeta_fd_frontal_v1.0.bin");

/// The shipped model, parsed once per process (detectors clone it).
fn model() -> Result<&'static rustface::Model> {
    static MODEL: OnceLock<std::result::Result<rustface::Model, String>> = OnceLock::new();
    MODEL
        .get_or_init(|| rustface::read_model(SEETA_MODEL).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Msg(format!("the shipped face model cannot be read: {e}")))
}

/// How faces are found and cropped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaceConfig {
    /// Smallest face reported: its box's side in the input's pixels (≥ 20).
    pub min_face: u32,
    /// A crop's side as a multiple of the box's longer side (1.3: DeepfakeBench, FF++).
    pub margin: f32,
    /// SeetaFace's score threshold: lower finds more faces and more false ones (its authors
    /// name 0.95, 2.8 and 4.5 as typical). 4.5: a false face makes a photo look fake (the image
    /// is as fake as its most fake face), and clear faces score far above it (about 20).
    pub score_threshold: f64,
    /// Inputs whose longer side is larger are searched at this size (the crops still come
    /// from the full image): detection time grows with the pixels searched.
    pub detect_max_side: u32,
    /// Most faces reported per image, the largest first.
    pub max_faces: usize,
    /// Crop each face aligned on dlib's landmarks instead of square around its box
    /// (DeepfakeBench's protocol, `align`: five points onto ArcFace's template in a 256-px
    /// crop, `margin` around it). Needs sd2 built with the `dlib` feature.
    pub align: bool,
}

impl Default for FaceConfig {
    fn default() -> FaceConfig {
        FaceConfig {
            min_face: 40,
            margin: 1.3,
            score_threshold: 4.5,
            detect_max_side: 1280,
            max_faces: 16,
            align: false,
        }
    }
}

impl FaceConfig {
    /// Each value in its range; the first that is not is named by its key (`faces.margin`).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::Config {
                key: format!("faces.{key}"),
                msg,
            })
        };
        if !(20..=1 << 14).contains(&self.min_face) {
            return bad(
                "min_face",
                format!("{} must be in [20, 16384] px", self.min_face),
            );
        }
        if !(self.margin.is_finite() && (1.0..=4.0).contains(&self.margin)) {
            return bad("margin", format!("{} must be in [1, 4]", self.margin));
        }
        if !(self.score_threshold.is_finite() && self.score_threshold > 0.0) {
            return bad(
                "score_threshold",
                format!("{} must be finite and > 0", self.score_threshold),
            );
        }
        if !(64..=1 << 14).contains(&self.detect_max_side) {
            return bad(
                "detect_max_side",
                format!("{} must be in [64, 16384] px", self.detect_max_side),
            );
        }
        if self.align && !cfg!(feature = "dlib") {
            return bad(
                "align",
                "aligned crops need dlib's landmarks: build sd2 with `--features dlib` \
                 (Debian/Ubuntu: `apt install libdlib-dev libdlib-data`)"
                    .into(),
            );
        }
        if !(1..=1024).contains(&self.max_faces) {
            return bad(
                "max_faces",
                format!("{} must be in [1, 1024]", self.max_faces),
            );
        }
        Ok(())
    }
}

/// A face found in an image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaceBox {
    /// [x0, y0, x1, y1] in the input's pixels (x1, y1 exclusive).
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// The detector's confidence (SeetaFace's score; higher is surer).
    pub detection_score: f64,
    /// With aligned crops: the five landmarks the crop was aligned on (left eye, right eye,
    /// nose tip, left and right mouth corner), in the input's pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub landmarks: Option<[[f32; 2]; 5]>,
}

impl FaceBox {
    /// The longer side of the box, in pixels.
    pub fn side(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]).max(self.bbox[3] - self.bbox[1])
    }
}

/// A face detector with its settings. Holds its own copy of the model: one per thread.
pub struct FaceDetector {
    inner: Box<dyn rustface::Detector>,
    cfg: FaceConfig,
    #[cfg(feature = "dlib")]
    landmarker: Option<std::sync::Arc<dlib::Landmarker>>,
}

impl FaceDetector {
    /// A detector with `cfg` (validated).
    pub fn new(cfg: FaceConfig) -> Result<FaceDetector> {
        cfg.validate()?;
        let mut inner = rustface::create_detector_with_model(model()?.clone());
        inner.set_score_thresh(cfg.score_threshold);
        inner.set_pyramid_scale_factor(0.8);
        inner.set_slide_window_step(4, 4);
        Ok(FaceDetector {
            inner,
            #[cfg(feature = "dlib")]
            landmarker: if cfg.align {
                Some(dlib::Landmarker::shared()?)
            } else {
                None
            },
            cfg,
        })
    }

    /// Its settings.
    pub fn config(&self) -> &FaceConfig {
        &self.cfg
    }

    /// The faces in `img`, the largest first (at most `max_faces`, none smaller than
    /// `min_face`); none is an empty list, not an error.
    pub fn detect(&mut self, img: &RgbImage) -> Result<Vec<FaceBox>> {
        let (w, h) = (img.width, img.height);
        let cfg = &self.cfg;
        if w.min(h) < cfg.min_face as usize {
            return Ok(vec![]);
        }
        let long = w.max(h) as f32;
        let scale = (cfg.detect_max_side as f32 / long).min(1.0);
        let (sw, sh) = (
            ((w as f32 * scale).round() as usize).max(1),
            ((h as f32 * scale).round() as usize).max(1),
        );
        let searched;
        let src = if scale < 1.0 {
            searched = resize_bicubic(img, sw, sh);
            &searched
        } else {
            img
        };
        // ITU-R BT.601 luma, as SeetaFace's grey input.
        let grey: Vec<u8> = src
            .data
            .chunks_exact(3)
            .map(|p| ((77 * p[0] as u32 + 150 * p[1] as u32 + 29 * p[2] as u32 + 128) >> 8) as u8)
            .collect();
        let min_det = ((cfg.min_face as f32 * scale).round() as u32).max(20);
        if (sw.min(sh) as u32) < min_det {
            return Ok(vec![]);
        }
        self.inner.set_min_face_size(min_det);
        let inner = &mut self.inner;
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            inner.detect(&rustface::ImageData::new(&grey, sw as u32, sh as u32))
        }))
        .map_err(|_| Error::Msg(format!("face detection failed on a {w}x{h} image")))?;
        let mut faces: Vec<FaceBox> = found
            .iter()
            .map(|f| {
                let b = f.bbox();
                let (x0, y0) = (b.x() as f32 / scale, b.y() as f32 / scale);
                let (x1, y1) = (
                    (b.x() as f32 + b.width() as f32) / scale,
                    (b.y() as f32 + b.height() as f32) / scale,
                );
                FaceBox {
                    bbox: [
                        x0.clamp(0.0, w as f32),
                        y0.clamp(0.0, h as f32),
                        x1.clamp(0.0, w as f32),
                        y1.clamp(0.0, h as f32),
                    ],
                    detection_score: f.score(),
                    landmarks: None,
                }
            })
            .filter(|f| f.side() >= cfg.min_face as f32)
            .collect();
        faces.sort_by(|a, b| b.side().total_cmp(&a.side()));
        faces.truncate(cfg.max_faces);
        Ok(faces)
    }
}

impl FaceDetector {
    /// The faces of `img` (`detect`) and their crops (`crop`, this detector's margin)
    /// preprocessed as model input of side `size`: [faces, 3, size, size] flattened.
    pub fn detect_and_crop(
        &mut self,
        img: &RgbImage,
        size: usize,
    ) -> Result<(Vec<FaceBox>, Vec<f32>)> {
        let mut boxes = self.detect(img)?;
        let mut px = Vec::with_capacity(boxes.len() * 3 * size * size);
        for b in &mut boxes {
            let c = self.crop_of(img, b)?;
            px.extend(preprocess(&c, size));
        }
        Ok((boxes, px))
    }

    /// The largest face's crop (as `detect_and_crop` cuts it, before preprocessing), or None
    /// when no face is found.
    pub fn largest_crop(&mut self, img: &RgbImage) -> Result<Option<RgbImage>> {
        let mut boxes = self.detect(img)?;
        match boxes.first_mut() {
            Some(b) => self.crop_of(img, b).map(Some),
            None => Ok(None),
        }
    }

    /// The crop of face `b`: square around its box, or aligned on its landmarks (which are
    /// then set in `b`).
    fn crop_of(&self, img: &RgbImage, b: &mut FaceBox) -> Result<RgbImage> {
        #[cfg(feature = "dlib")]
        if let Some(l) = &self.landmarker {
            let five = align::five_points(&l.landmarks(img, b.bbox)?);
            b.landmarks = Some(five);
            return align::align_crop(img, &five, align::ALIGNED_SIZE, self.cfg.margin as f64);
        }
        crop(img, b.bbox, self.cfg.margin)
    }
}

/// The square crop around `bbox`: side = `margin` × the box's longer side, centred on the
/// box, moved (and if need be shrunk) to lie inside a `w × h` image. (x0, y0, side) in pixels.
pub fn crop_square(w: usize, h: usize, bbox: [f32; 4], margin: f32) -> (usize, usize, usize) {
    let side = ((bbox[2] - bbox[0]).max(bbox[3] - bbox[1]) * margin).round() as usize;
    let side = side.clamp(1, w.min(h).max(1));
    let (cx, cy) = ((bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0);
    let place = |c: f32, len: usize| -> usize {
        let start = (c - side as f32 / 2.0).round();
        (start.max(0.0) as usize).min(len.saturating_sub(side))
    };
    (place(cx, w), place(cy, h), side)
}

/// The crop `crop_square` places around `bbox`, as an image.
pub fn crop(img: &RgbImage, bbox: [f32; 4], margin: f32) -> Result<RgbImage> {
    let (x0, y0, side) = crop_square(img.width, img.height, bbox, margin);
    let mut data = Vec::with_capacity(side * side * 3);
    for y in y0..(y0 + side).min(img.height) {
        let row = (y * img.width + x0) * 3;
        data.extend_from_slice(&img.data[row..row + side.min(img.width - x0) * 3]);
    }
    RgbImage::new(side, side, data)
}
