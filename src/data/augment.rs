//! Train-time augmentations (SD2-SPEC §5) and the degradations of `sd2 eval --perturb`, on 8-bit
//! RGB images before CLIP preprocessing. Every random choice comes from one generator seeded by
//! (seed, epoch, index), so an epoch's inputs are reproducible whatever the thread count.
use serde::{Deserialize, Serialize};

use crate::clip::preprocess::RgbImage;
use crate::rng::{mix64, Rng};
use crate::{Error, Result};

/// Which augmentations run and how likely each is (the spec's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    pub flip_p: f64,
    /// Rotation by a uniform angle in ±`rotate_deg`, with probability `rotate_p`.
    pub rotate_p: f64,
    pub rotate_deg: f64,
    /// Isotropic resize by a uniform factor in [min, max], then a random crop back to size
    /// (always applied; (1, 1) turns it off).
    pub scale: (f64, f64),
    pub color_p: f64,
    /// Brightness shift and contrast factor deviation, each uniform in ±`color`.
    pub color: f64,
    pub blur_p: f64,
    pub blur_sigma: (f64, f64),
    pub jpeg_p: f64,
    pub jpeg_quality: (u8, u8),
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            flip_p: 0.5,
            rotate_p: 0.5,
            rotate_deg: 10.0,
            scale: (0.8, 1.2),
            color_p: 0.5,
            color: 0.1,
            blur_p: 0.2,
            blur_sigma: (0.1, 2.0),
            jpeg_p: 0.5,
            jpeg_quality: (40, 100),
        }
    }
}

impl AugmentConfig {
    /// Every value in its range (probabilities in [0, 1], ranges ordered and bounded); the first
    /// that is not is named by its key (`augment.flip_p`).
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |key: &str, msg: String| {
            Err(crate::Error::Config {
                key: format!("augment.{key}"),
                msg,
            })
        };
        for (key, p) in [
            ("flip_p", self.flip_p),
            ("rotate_p", self.rotate_p),
            ("color_p", self.color_p),
            ("blur_p", self.blur_p),
            ("jpeg_p", self.jpeg_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, format!("{p} is a probability: it must be in [0, 1]"));
            }
        }
        if !(0.0..=180.0).contains(&self.rotate_deg) {
            return bad(
                "rotate_deg",
                format!("{} must be in [0, 180]", self.rotate_deg),
            );
        }
        if !(0.0..=1.0).contains(&self.color) {
            return bad("color", format!("{} must be in [0, 1]", self.color));
        }
        let (lo, hi) = self.scale;
        if !(lo > 0.0 && lo <= hi && hi <= 10.0) {
            return bad(
                "scale",
                format!("({lo}, {hi}) must satisfy 0 < min ≤ max ≤ 10"),
            );
        }
        let (lo, hi) = self.blur_sigma;
        if !(lo >= 0.0 && lo <= hi && hi <= 50.0) {
            return bad(
                "blur_sigma",
                format!("({lo}, {hi}) must satisfy 0 ≤ min ≤ max ≤ 50"),
            );
        }
        let (lo, hi) = self.jpeg_quality;
        if !(1 <= lo && lo <= hi && hi <= 100) {
            return bad(
                "jpeg_quality",
                format!("({lo}, {hi}) must satisfy 1 ≤ min ≤ max ≤ 100"),
            );
        }
        Ok(())
    }

    /// Only the flip and the brightness/contrast jitter: the pixel-exact, content-preserving
    /// subset (for runs that must not blur away fine traces).
    pub fn light() -> AugmentConfig {
        AugmentConfig {
            rotate_p: 0.0,
            scale: (1.0, 1.0),
            blur_p: 0.0,
            jpeg_p: 0.0,
            ..Default::default()
        }
    }
}

/// The generator for image `index` in `epoch`.
pub fn rng_for(seed: u64, epoch: u64, index: u64) -> Rng {
    Rng::new(mix64(
        seed ^ mix64(epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index),
    ))
}

/// Applies `cfg` to `img` in the spec's order: flip, rotation + resize/crop (one resampling),
/// brightness/contrast, blur, JPEG.
pub fn augment(img: &mut RgbImage, cfg: &AugmentConfig, r: &mut Rng) -> Result<()> {
    if r.uniform() < cfg.flip_p {
        hflip(img);
    }
    let angle = if r.uniform() < cfg.rotate_p {
        (r.uniform() * 2.0 - 1.0) * cfg.rotate_deg
    } else {
        0.0
    };
    let s = cfg.scale.0 + r.uniform() * (cfg.scale.1 - cfg.scale.0);
    // The crop window's offset, as a fraction of the slack between the two sizes.
    let (ox, oy) = (r.uniform() * 2.0 - 1.0, r.uniform() * 2.0 - 1.0);
    if angle != 0.0 || (s - 1.0).abs() > 1e-9 {
        let slack = (s - 1.0).abs() / 2.0;
        let (tx, ty) = (
            ox * slack * img.width as f64,
            oy * slack * img.height as f64,
        );
        *img = affine(img, angle.to_radians(), s, tx, ty);
    }
    if r.uniform() < cfg.color_p {
        let b = (r.uniform() * 2.0 - 1.0) * cfg.color;
        let k = 1.0 + (r.uniform() * 2.0 - 1.0) * cfg.color;
        brightness_contrast(img, b as f32, k as f32);
    }
    if r.uniform() < cfg.blur_p {
        let sigma = cfg.blur_sigma.0 + r.uniform() * (cfg.blur_sigma.1 - cfg.blur_sigma.0);
        gaussian_blur(img, sigma);
    }
    if r.uniform() < cfg.jpeg_p {
        let (lo, hi) = cfg.jpeg_quality;
        let q = lo as usize + r.below(hi.saturating_sub(lo) as usize + 1);
        jpeg(img, q.min(100) as u8)?;
    }
    Ok(())
}

pub fn hflip(img: &mut RgbImage) {
    let (w, h) = (img.width, img.height);
    for y in 0..h {
        let row = &mut img.data[y * w * 3..(y + 1) * w * 3];
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// Contrast `k` about the image mean, then brightness `b` (in units of full scale).
pub fn brightness_contrast(img: &mut RgbImage, b: f32, k: f32) {
    let mean = img.data.iter().map(|v| *v as f32).sum::<f32>() / img.data.len().max(1) as f32;
    for v in img.data.iter_mut() {
        *v = ((*v as f32 - mean) * k + mean + b * 255.0)
            .clamp(0.0, 255.0)
            .round() as u8;
    }
}

/// Rotation by `angle` (radians) and isotropic scale `s` about the centre, shifted by (tx, ty)
/// pixels, bilinear, same output size; outside the source the border pixel is repeated (a
/// constant fill would itself be a cue).
pub fn affine(img: &RgbImage, angle: f64, s: f64, tx: f64, ty: f64) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let (cos, sin) = (angle.cos(), angle.sin());
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            // Inverse map: output → source.
            let (dx, dy) = (x as f64 + 0.5 - cx - tx, y as f64 + 0.5 - cy - ty);
            let sx = (cos * dx + sin * dy) / s + cx - 0.5;
            let sy = (-sin * dx + cos * dy) / s + cy - 0.5;
            let px = bilinear(img, sx, sy);
            out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&px);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data: out,
    }
}

fn bilinear(img: &RgbImage, x: f64, y: f64) -> [u8; 3] {
    let (w, h) = (img.width as isize, img.height as isize);
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let at = |xx: isize, yy: isize, c: usize| -> f64 {
        let (xx, yy) = (xx.clamp(0, w - 1) as usize, yy.clamp(0, h - 1) as usize);
        img.data[(yy * img.width + xx) * 3 + c] as f64
    };
    let (x0, y0) = (x0 as isize, y0 as isize);
    let mut px = [0u8; 3];
    for (c, p) in px.iter_mut().enumerate() {
        let top = at(x0, y0, c) * (1.0 - fx) + at(x0 + 1, y0, c) * fx;
        let bot = at(x0, y0 + 1, c) * (1.0 - fx) + at(x0 + 1, y0 + 1, c) * fx;
        *p = (top * (1.0 - fy) + bot * fy).round().clamp(0.0, 255.0) as u8;
    }
    px
}

/// Separable Gaussian blur (radius ⌈3σ⌉, border repeated).
pub fn gaussian_blur(img: &mut RgbImage, sigma: f64) {
    if sigma <= 0.0 {
        return;
    }
    let r = (3.0 * sigma).ceil() as isize;
    let mut k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    let (w, h) = (img.width, img.height);
    let src: Vec<f32> = img.data.iter().map(|v| *v as f32).collect();
    let mut tmp = vec![0f32; src.len()];
    blur_pass(&src, &mut tmp, &k, [w, h], true);
    let mut out = vec![0f32; src.len()];
    blur_pass(&tmp, &mut out, &k, [w, h], false);
    for (d, v) in img.data.iter_mut().zip(out) {
        *d = v.round().clamp(0.0, 255.0) as u8;
    }
}

/// One 1-D pass of the separable blur over an RGB image [h, w, 3] (border repeated): along x
/// when `horizontal`, along y otherwise.
fn blur_pass(src: &[f32], dst: &mut [f32], k: &[f32], [w, h]: [usize; 2], horizontal: bool) {
    let r = (k.len() / 2) as isize;
    let (len, stride) = if horizontal { (w, 3) } else { (h, 3 * w) };
    for y in 0..h {
        for x in 0..w {
            let pos = if horizontal { x } else { y } as isize;
            let base = (y * w + x) * 3 - pos as usize * stride;
            for c in 0..3 {
                let mut acc = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    let t = (pos + j as isize - r).clamp(0, len as isize - 1) as usize;
                    acc += kv * src[base + t * stride + c];
                }
                dst[(y * w + x) * 3 + c] = acc;
            }
        }
    }
}

/// JPEG encode at `quality` (1–100) and decode again.
pub fn jpeg(img: &mut RgbImage, quality: u8) -> Result<()> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality.clamp(1, 100))
        .encode(
            &img.data,
            img.width as u32,
            img.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Msg(format!("jpeg re-encode: {e}")))?;
    let dec = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
        .map_err(|e| Error::Msg(format!("jpeg re-encode: {e}")))?;
    img.data = dec.to_rgb8().into_raw();
    Ok(())
}

/// One degradation of `sd2 eval --perturb`, applied to real and fake alike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Perturb {
    Jpeg(u8),
    Blur(f64),
}

impl Perturb {
    pub fn apply(&self, img: &mut RgbImage) -> Result<()> {
        match *self {
            Perturb::Jpeg(q) => jpeg(img, q),
            Perturb::Blur(s) => {
                gaussian_blur(img, s);
                Ok(())
            }
        }
    }

    /// The name used in reports: `jpeg:70`, `blur:2`.
    pub fn name(&self) -> String {
        match self {
            Perturb::Jpeg(q) => format!("jpeg:{q}"),
            Perturb::Blur(s) => format!("blur:{s}"),
        }
    }

    /// Parses `jpeg:90,70,50` or `blur:1,2,3` into one degradation per level.
    pub fn parse_list(spec: &str) -> Result<Vec<Perturb>> {
        let bad = |why: &str| {
            Error::Msg(format!(
                "--perturb {spec}: {why} (expected jpeg:Q[,Q…] with Q in 1..=100, or blur:SIGMA[,SIGMA…] with SIGMA > 0)"
            ))
        };
        let (kind, levels) = spec.split_once(':').ok_or_else(|| bad("no `:`"))?;
        let mut out = vec![];
        for l in levels.split(',') {
            let l = l.trim();
            out.push(match kind.trim() {
                "jpeg" => {
                    let q: u8 = l
                        .parse()
                        .map_err(|_| bad(&format!("`{l}` is not a quality")))?;
                    if !(1..=100).contains(&q) {
                        return Err(bad(&format!("quality {q} out of range")));
                    }
                    Perturb::Jpeg(q)
                }
                "blur" => {
                    let s: f64 = l
                        .parse()
                        .map_err(|_| bad(&format!("`{l}` is not a sigma")))?;
                    if !(s > 0.0 && s.is_finite()) {
                        return Err(bad(&format!("sigma {l} must be > 0")));
                    }
                    Perturb::Blur(s)
                }
                other => return Err(bad(&format!("unknown degradation `{other}`"))),
            });
        }
        Ok(out)
    }
}
