//! A synthetic forgery benchmark with known truth (`sd2 synth`). Real images are procedurally
//! drawn faces on backgrounds, "captured" by a camera (lighting, colour cast, sensor noise) and
//! JPEG-compressed. Forgeries are made the way real pipelines make them: the captured image is
//! manipulated afterwards, so the manipulated pixels lack the camera's noise, are resampled when
//! put in place and do not quite match the surrounding light:
//! - FS: the inner face of another identity (own skin tone and lighting) blended in with a
//!   feathered seam;
//! - FR: the same identity with the mouth/eye region re-rendered, locally warped and resampled;
//! - EFS: the whole image from a "generator": half resolution, checkerboard upsampling,
//!   over-smooth, no sensor noise;
//! - FE: one attribute (hair colour, glasses, lip colour) re-synthesized at half resolution
//!   inside a soft mask.
//!
//! Every image gets a face and an environment description written from its parameters. Sources
//! differ in background, camera (noise, colour cast) and JPEG quality; three quarters of the
//! videos come from the three training sources, where the forgery type correlates with the
//! background style (a shortcut); the two test sources break that. Frames come in "videos" of 4
//! sharing identity and scene. Deterministic from the seed.
// Pixel code indexes the three channels side by side.
#![allow(clippy::needless_range_loop)]

use std::io::Cursor;
use std::path::Path;

use image::ImageEncoder;
use rayon::prelude::*;

use super::manifest::{Manifest, Record};
use crate::rng::{mix64, Rng};
use crate::sd2::type_texts::CLASSES;
use crate::{Error, Result};

/// (name, split pool, noise σ, JPEG quality range, colour cast).
struct Source {
    name: &'static str,
    test: bool,
    noise: f32,
    jpeg: (u8, u8),
    cast: [f32; 3],
}

const SOURCES: [Source; 5] = [
    Source {
        name: "studio-cam",
        test: false,
        noise: 0.015,
        jpeg: (85, 98),
        cast: [1.0, 1.0, 1.0],
    },
    Source {
        name: "phone-cam",
        test: false,
        noise: 0.035,
        jpeg: (60, 90),
        cast: [1.04, 1.0, 0.95],
    },
    Source {
        name: "webcam",
        test: false,
        noise: 0.05,
        jpeg: (50, 80),
        cast: [0.96, 1.0, 1.05],
    },
    Source {
        name: "broadcast",
        test: true,
        noise: 0.025,
        jpeg: (40, 75),
        cast: [1.02, 0.98, 1.0],
    },
    Source {
        name: "social",
        test: true,
        noise: 0.04,
        jpeg: (35, 70),
        cast: [0.98, 1.03, 0.97],
    },
];

const BACKGROUNDS: [&str; 5] = [
    "plain wall",
    "office",
    "outdoor park",
    "street",
    "studio backdrop",
];
const SKIN: [[f32; 3]; 6] = [
    [0.95, 0.80, 0.69],
    [0.87, 0.68, 0.55],
    [0.76, 0.57, 0.42],
    [0.60, 0.43, 0.30],
    [0.45, 0.31, 0.22],
    [0.98, 0.87, 0.78],
];
const HAIR: [(&str, [f32; 3]); 6] = [
    ("black", [0.08, 0.07, 0.06]),
    ("brown", [0.35, 0.22, 0.12]),
    ("blonde", [0.85, 0.72, 0.40]),
    ("red", [0.60, 0.22, 0.10]),
    ("grey", [0.62, 0.62, 0.62]),
    ("blue", [0.15, 0.30, 0.75]),
];

#[derive(Clone, Debug)]
struct Face {
    skin: [f32; 3],
    hair: usize,
    hair_long: bool,
    glasses: bool,
    aspect: f32,
    eye_gap: f32,
    smile: f32,
    old: bool,
    lip: [f32; 3],
}

impl Face {
    fn random(r: &mut Rng) -> Face {
        Face {
            skin: SKIN[r.below(SKIN.len())],
            hair: r.below(5),
            hair_long: r.uniform() < 0.5,
            glasses: r.uniform() < 0.25,
            aspect: 1.15 + 0.25 * r.uniform() as f32,
            eye_gap: 0.16 + 0.06 * r.uniform() as f32,
            smile: (r.uniform() as f32 - 0.3) * 0.08,
            old: r.uniform() < 0.3,
            lip: [0.70 + 0.2 * r.uniform() as f32, 0.30, 0.32],
        }
    }

    fn describe(&self) -> String {
        let age = if self.old {
            "an older person"
        } else {
            "a young adult"
        };
        let hair = format!(
            "{} {} hair",
            if self.hair_long { "long" } else { "short" },
            HAIR[self.hair].0
        );
        let glasses = if self.glasses {
            ", wearing glasses"
        } else {
            ""
        };
        let mood = if self.smile > 0.02 {
            "smiling"
        } else if self.smile < -0.01 {
            "frowning"
        } else {
            "neutral expression"
        };
        format!("{age} with {hair}{glasses}, {mood}")
    }
}

/// A float RGB canvas in [0, 1].
struct Canvas {
    s: usize,
    px: Vec<[f32; 3]>,
}

impl Canvas {
    fn new(s: usize, c: [f32; 3]) -> Canvas {
        Canvas {
            s,
            px: vec![c; s * s],
        }
    }

    /// Blends `c` inside an ellipse (centre, radii in [0, 1] units) with a soft edge.
    fn ellipse(&mut self, cx: f32, cy: f32, rx: f32, ry: f32, c: [f32; 3], alpha: f32) {
        let s = self.s as f32;
        let soft = 1.5 / s;
        for y in 0..self.s {
            for x in 0..self.s {
                let (u, v) = ((x as f32 + 0.5) / s - cx, (y as f32 + 0.5) / s - cy);
                let d = ((u / rx).powi(2) + (v / ry).powi(2)).sqrt();
                let a = alpha * ((1.0 - d) * rx.min(ry) / soft + 0.5).clamp(0.0, 1.0);
                if a > 0.0 {
                    let p = &mut self.px[y * self.s + x];
                    for k in 0..3 {
                        p[k] = p[k] * (1.0 - a) + c[k] * a;
                    }
                }
            }
        }
    }

    fn rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, c: [f32; 3], alpha: f32) {
        let s = self.s as f32;
        for y in (y0 * s) as usize..((y1 * s) as usize).min(self.s) {
            for x in (x0 * s) as usize..((x1 * s) as usize).min(self.s) {
                let p = &mut self.px[y * self.s + x];
                for k in 0..3 {
                    p[k] = p[k] * (1.0 - alpha) + c[k] * alpha;
                }
            }
        }
    }

    fn blur_region(&mut self, mask: &[f32], radius: usize) {
        let s = self.s;
        let src = self.px.clone();
        for y in 0..s {
            for x in 0..s {
                let m = mask[y * s + x];
                if m <= 0.0 {
                    continue;
                }
                let mut acc = [0.0f32; 3];
                let mut n = 0.0;
                for dy in -(radius as i64)..=radius as i64 {
                    for dx in -(radius as i64)..=radius as i64 {
                        let (yy, xx) = (
                            (y as i64 + dy).clamp(0, s as i64 - 1) as usize,
                            (x as i64 + dx).clamp(0, s as i64 - 1) as usize,
                        );
                        let p = src[yy * s + xx];
                        for k in 0..3 {
                            acc[k] += p[k];
                        }
                        n += 1.0;
                    }
                }
                let p = &mut self.px[y * s + x];
                for k in 0..3 {
                    p[k] = p[k] * (1.0 - m) + acc[k] / n * m;
                }
            }
        }
    }

    fn to_rgb8(&self) -> Vec<u8> {
        self.px
            .iter()
            .flat_map(|p| p.map(|v| (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8))
            .collect()
    }
}

/// The colour/brightness mismatch of a re-rendered region with its surroundings: a gain of
/// 1 ± (0.04–0.10) shared by the channels, plus a per-channel tint of up to ±0.02.
fn mismatch(r: &mut Rng) -> [f32; 3] {
    let g = 0.04 + 0.06 * r.uniform() as f32;
    let g = if r.uniform() < 0.5 { 1.0 - g } else { 1.0 + g };
    [0, 1, 2].map(|_| g + 0.04 * (r.uniform() as f32 - 0.5))
}

/// Applies a `mismatch` gain, with an offset of the same sign so dark regions shift too.
fn tint(c: &mut Canvas, t: [f32; 3]) {
    for p in c.px.iter_mut() {
        for k in 0..3 {
            p[k] = p[k] * t[k] + 0.3 * (t[k] - 1.0);
        }
    }
}

/// An editor working at half resolution: 2×2 blocks averaged, then smoothed back up.
fn half_res(c: &mut Canvas) {
    let s = c.s;
    for y in (0..s).step_by(2) {
        for x in (0..s).step_by(2) {
            let cells: Vec<usize> = [(0, 0), (0, 1), (1, 0), (1, 1)]
                .iter()
                .filter(|(dy, dx)| y + dy < s && x + dx < s)
                .map(|(dy, dx)| (y + dy) * s + x + dx)
                .collect();
            let mut m = [0.0f32; 3];
            for &i in &cells {
                for k in 0..3 {
                    m[k] += c.px[i][k] / cells.len() as f32;
                }
            }
            for &i in &cells {
                c.px[i] = m;
            }
        }
    }
    c.blur_region(&vec![1.0; s * s], 1);
}

/// A soft elliptical mask.
fn ellipse_mask(s: usize, cx: f32, cy: f32, rx: f32, ry: f32, feather: f32) -> Vec<f32> {
    let sf = s as f32;
    (0..s * s)
        .map(|i| {
            let (x, y) = ((i % s) as f32 + 0.5, (i / s) as f32 + 0.5);
            let d = (((x / sf - cx) / rx).powi(2) + ((y / sf - cy) / ry).powi(2)).sqrt();
            ((1.0 - d) / feather + 0.5).clamp(0.0, 1.0)
        })
        .collect()
}

fn background(c: &mut Canvas, style: usize, r: &mut Rng) {
    let s = c.s;
    let base = [
        0.3 + 0.5 * r.uniform() as f32,
        0.3 + 0.5 * r.uniform() as f32,
        0.3 + 0.5 * r.uniform() as f32,
    ];
    for y in 0..s {
        for x in 0..s {
            let (u, v) = (x as f32 / s as f32, y as f32 / s as f32);
            c.px[y * s + x] = match style {
                0 => base,
                1 => {
                    let stripe = if ((u * 6.0) as usize).is_multiple_of(2) {
                        0.9
                    } else {
                        1.05
                    };
                    base.map(|b| b * stripe)
                }
                2 => {
                    let sky = [0.45 + 0.3 * (1.0 - v), 0.65 + 0.2 * (1.0 - v), 0.95];
                    if v > 0.6 {
                        [0.25, 0.55 + 0.1 * (u * 20.0).sin(), 0.2]
                    } else {
                        sky
                    }
                }
                3 => {
                    let g = 0.35 + 0.25 * (((u * 9.0) as usize + (v * 5.0) as usize) % 2) as f32;
                    [g, g * 0.95, g * 0.9]
                }
                _ => {
                    let d = ((u - 0.5).powi(2) + (v - 0.4).powi(2)).sqrt();
                    base.map(|b| b * (1.1 - 0.6 * d))
                }
            };
        }
    }
    if style == 1 {
        c.rect(0.05, 0.55, 0.3, 1.0, [0.4, 0.3, 0.2], 1.0);
    }
}

fn draw_face(c: &mut Canvas, f: &Face, expression: f32) {
    let hair = HAIR[f.hair].1;
    if f.hair_long {
        c.ellipse(0.5, 0.55, 0.30, 0.38, hair, 1.0);
    }
    c.ellipse(0.5, 0.5, 0.22, 0.22 * f.aspect, f.skin, 1.0);
    c.ellipse(0.5, 0.33, 0.23, 0.12, hair, 1.0);
    draw_inner(c, f, expression);
    if f.glasses {
        for sx in [-1.0, 1.0] {
            c.ellipse(
                0.5 + sx * f.eye_gap,
                0.47,
                0.075,
                0.055,
                [0.1, 0.1, 0.1],
                0.9,
            );
            c.ellipse(0.5 + sx * f.eye_gap, 0.47, 0.06, 0.042, f.skin, 0.85);
        }
    }
}

/// Eyes, brows, nose and mouth: the "inner face".
fn draw_inner(c: &mut Canvas, f: &Face, expression: f32) {
    let brow = HAIR[f.hair].1;
    for sx in [-1.0, 1.0] {
        let ex = 0.5 + sx * f.eye_gap;
        c.ellipse(ex, 0.47, 0.045, 0.022, [0.97, 0.97, 0.97], 1.0);
        c.ellipse(ex, 0.47, 0.018, 0.018, [0.2, 0.3, 0.45], 1.0);
        c.ellipse(ex, 0.42 - expression * 0.5, 0.05, 0.009, brow, 1.0);
        if f.old {
            c.ellipse(
                ex + sx * 0.06,
                0.47,
                0.02,
                0.003,
                f.skin.map(|v| v * 0.8),
                1.0,
            );
        }
    }
    c.ellipse(0.5, 0.56, 0.02, 0.05, f.skin.map(|v| v * 0.88), 1.0);
    let mouth_h = 0.015 + expression.abs();
    c.ellipse(
        0.5,
        0.66 + expression * 0.3,
        0.08 + expression * 0.6,
        mouth_h,
        f.lip,
        1.0,
    );
}

fn jpeg_roundtrip(rgb: &[u8], s: usize, q: u8) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, q)
        .encode(rgb, s as u32, s as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Msg(format!("synth: jpeg encode: {e}")))?;
    let img = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
        .map_err(|e| Error::Msg(format!("synth: jpeg decode: {e}")))?;
    Ok(img.to_rgb8().into_raw())
}

/// One image: (RGB bytes, record without path).
fn render(seed: u64, index: usize, size: usize, shortcut: f64) -> Result<(Vec<u8>, Record)> {
    let video = index / 4;
    let mut vr = Rng::new(mix64(
        seed ^ (video as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    ));
    let mut fr = Rng::new(mix64(
        seed ^ 0xf00d ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03),
    ));
    // Three quarters of the videos come from the training sources, a quarter from the test ones.
    let src = if vr.uniform() < 0.75 {
        &SOURCES[vr.below(3)]
    } else {
        &SOURCES[3 + vr.below(2)]
    };
    let label = vr.below(5);
    // Shortcut in the training sources: background style follows the class (`shortcut`, 50% by
    // default; otherwise uniform, so 60% of training images share their class's background).
    let style = if !src.test && vr.uniform() < shortcut {
        label
    } else {
        vr.below(BACKGROUNDS.len())
    };
    let face = Face::random(&mut vr);
    let expr = face.smile + (fr.uniform() as f32 - 0.5) * 0.01;
    let mut c = Canvas::new(size, [0.5; 3]);
    let mut bg_rng = Rng::new(vr.next_u64());
    background(&mut c, style, &mut bg_rng);
    let mut described = face.clone();
    // The camera: lighting gradient and colour cast, then sensor noise. Real images and the
    // untouched parts of FS/FR/FE are captured; the manipulated pixels are rendered afterwards by
    // a "generator" that imitates the lighting but carries no sensor noise, and are resampled
    // when put in place — the noise inconsistency real face-forgery pipelines leave behind.
    let light = 0.85 + 0.3 * vr.uniform() as f32;
    let dir = vr.uniform() as f32 - 0.5;
    let lit = |c: &mut Canvas| {
        let n = c.s;
        for y in 0..n {
            for x in 0..n {
                let l = light * (1.0 + dir * 0.3 * (x as f32 / n as f32 - 0.5));
                let p = &mut c.px[y * n + x];
                for k in 0..3 {
                    p[k] *= l * src.cast[k];
                }
            }
        }
    };
    let capture = |c: &mut Canvas, r: &mut Rng| {
        lit(c);
        for p in c.px.iter_mut() {
            for v in p.iter_mut() {
                *v += src.noise * r.normal() as f32;
            }
        }
    };
    let blend = |c: &mut Canvas, other: &Canvas, mask: &[f32]| {
        for (i, m) in mask.iter().enumerate() {
            let p = &mut c.px[i];
            for k in 0..3 {
                p[k] = p[k] * (1.0 - m) + other.px[i][k] * m;
            }
        }
    };
    let all = vec![1.0; size * size];
    match label {
        0 => {
            draw_face(&mut c, &face, expr);
            capture(&mut c, &mut fr);
        }
        1 => {
            // FS: another identity's inner face with its own skin tone and lighting, resampled
            // into place and feathered in, slightly offset.
            draw_face(&mut c, &face, expr);
            let mut other = Face::random(&mut vr);
            other.hair = face.hair;
            let mut donor = Canvas::new(size, face.skin);
            donor.ellipse(0.5, 0.52, 0.2, 0.25, other.skin.map(|v| v * 1.15), 1.0);
            draw_inner(&mut donor, &other, other.smile);
            capture(&mut c, &mut fr);
            lit(&mut donor);
            let tone = 0.92 + 0.16 * vr.uniform() as f32;
            for p in donor.px.iter_mut() {
                *p = p.map(|v| v * tone);
            }
            donor.blur_region(&all, 1);
            let dx = (vr.uniform() as f32 - 0.5) * 0.02;
            let mask = ellipse_mask(size, 0.5 + dx, 0.53, 0.17, 0.21, 0.12);
            blend(&mut c, &donor, &mask);
            described.skin = other.skin;
        }
        2 => {
            // FR: same identity, expression re-rendered in the mouth/eye region, warped and
            // resampled.
            draw_face(&mut c, &face, expr);
            let new_expr = -face.smile + (vr.uniform() as f32 - 0.5) * 0.06;
            let mut re = Canvas {
                s: size,
                px: c.px.clone(),
            };
            draw_inner(&mut re, &face, new_expr);
            capture(&mut c, &mut fr);
            lit(&mut re);
            tint(&mut re, mismatch(&mut vr));
            let s = size as f32;
            let mut warped = Canvas {
                s: size,
                px: re.px.clone(),
            };
            for y in 0..size {
                for x in 0..size {
                    let wx =
                        (x as f32 + 1.2 * (y as f32 / s * 25.0).sin()).clamp(0.0, s - 1.0) as usize;
                    warped.px[y * size + x] = re.px[y * size + wx];
                }
            }
            warped.blur_region(&all, 1);
            let mask = ellipse_mask(size, 0.5, 0.56, 0.24, 0.2, 0.3);
            blend(&mut c, &warped, &mask);
            described.smile = new_expr;
        }
        3 => {
            // EFS: the whole image from a generator: half resolution, checkerboard upsampling,
            // over-smooth, no sensor noise.
            let half = (size / 2).max(1);
            let mut g = Canvas::new(half, [0.5; 3]);
            let mut bg2 = Rng::new(bg_rng.next_u64());
            background(&mut g, style, &mut bg2);
            draw_face(&mut g, &face, expr);
            g.blur_region(&vec![1.0; half * half], 1);
            for y in 0..size {
                for x in 0..size {
                    let p = g.px[(y / 2).min(half - 1) * half + (x / 2).min(half - 1)];
                    let cb = if (x + y) % 2 == 0 { 1.08 } else { 0.92 };
                    c.px[y * size + x] = p.map(|v| v * cb);
                }
            }
            lit(&mut c);
        }
        _ => {
            // FE: one attribute re-synthesized inside a soft mask.
            draw_face(&mut c, &face, expr);
            capture(&mut c, &mut fr);
            let edit = vr.below(3);
            let mut edited = face.clone();
            let mask = match edit {
                0 => {
                    edited.hair = (face.hair + 1 + vr.below(4)) % HAIR.len();
                    ellipse_mask(size, 0.5, 0.34, 0.34, 0.22, 0.3)
                }
                1 => {
                    edited.glasses = !face.glasses;
                    ellipse_mask(size, 0.5, 0.47, 0.34, 0.15, 0.3)
                }
                _ => {
                    edited.lip = [0.85, 0.1 + 0.3 * vr.uniform() as f32, 0.5];
                    ellipse_mask(size, 0.5, 0.65, 0.22, 0.13, 0.4)
                }
            };
            let mut e = Canvas::new(size, [0.5; 3]);
            let mut bg3 = Rng::new(mix64(bg_rng.state()));
            background(&mut e, style, &mut bg3);
            draw_face(&mut e, &edited, expr);
            lit(&mut e);
            tint(&mut e, mismatch(&mut vr));
            half_res(&mut e);
            blend(&mut c, &e, &mask);
            described = edited;
        }
    }
    let q = src.jpeg.0 + (fr.uniform() * (src.jpeg.1 - src.jpeg.0) as f64) as u8;
    let rgb = jpeg_roundtrip(&c.to_rgb8(), size, q)?;
    let lighting = if light > 1.05 {
        "bright"
    } else if light < 0.95 {
        "dim"
    } else {
        "soft"
    };
    let place = if style == 2 || style == 3 {
        "outdoor"
    } else {
        "indoor"
    };
    let split = if src.test {
        "test"
    } else if mix64(seed ^ video as u64 ^ 0x5a17).is_multiple_of(5) {
        "val"
    } else {
        "train"
    };
    let rec = Record {
        path: String::new(),
        label: CLASSES[label].to_string(),
        source: src.name.to_string(),
        split: split.to_string(),
        face: described.describe(),
        env: format!("{place}, {lighting} light, {}", BACKGROUNDS[style]),
        video: Some(format!("v{video:05}")),
        compression: None,
    };
    Ok((rgb, rec))
}

/// Probability that a training-source image's background follows its class.
pub const DEFAULT_SHORTCUT: f64 = 0.5;

/// Writes `n` images (`images/NNNNNN.png`) and `manifest.jsonl` into `out`.
pub fn generate(out: &Path, n: usize, size: usize, seed: u64) -> Result<Manifest> {
    generate_with(out, n, size, seed, DEFAULT_SHORTCUT)
}

/// `generate` with the shortcut strength chosen (0: backgrounds independent of the class).
pub fn generate_with(
    out: &Path,
    n: usize,
    size: usize,
    seed: u64,
    shortcut: f64,
) -> Result<Manifest> {
    generate_as(out, n, size, seed, shortcut, None)
}

/// `generate_with`, the images written as JPEG at `jpeg` quality (`images/NNNNNN.jpg`) when
/// given, as a photo collection or a frame extraction stores them, instead of PNG.
pub fn generate_as(
    out: &Path,
    n: usize,
    size: usize,
    seed: u64,
    shortcut: f64,
    jpeg: Option<u8>,
) -> Result<Manifest> {
    if let Some(q) = jpeg {
        if !(1..=100).contains(&q) {
            return Err(Error::Config {
                key: "jpeg".into(),
                msg: format!("quality {q} must be in 1..=100"),
            });
        }
    }
    if size < 16 {
        return Err(Error::invalid(
            "synth",
            format!("size {size} is too small (≥ 16)"),
        ));
    }
    if !(0.0..=1.0).contains(&shortcut) {
        return Err(Error::Config {
            key: "shortcut".into(),
            msg: format!("{shortcut} is a probability: it must be in [0, 1]"),
        });
    }
    let img_dir = out.join("images");
    std::fs::create_dir_all(&img_dir)
        .map_err(|e| Error::Msg(format!("{}: {e}", img_dir.display())))?;
    let records: Vec<Record> = (0..n)
        .into_par_iter()
        .map(|i| {
            let (rgb, mut rec) = render(seed, i, size, shortcut)?;
            let mut buf = Vec::new();
            let (w, h, rgb8) = (size as u32, size as u32, image::ExtendedColorType::Rgb8);
            let r = if let Some(q) = jpeg {
                rec.path = format!("images/{i:06}.jpg");
                image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut buf), q)
                    .write_image(&rgb, w, h, rgb8)
            } else {
                rec.path = format!("images/{i:06}.png");
                image::codecs::png::PngEncoder::new_with_quality(
                    Cursor::new(&mut buf),
                    image::codecs::png::CompressionType::Fast,
                    image::codecs::png::FilterType::Sub,
                )
                .write_image(&rgb, w, h, rgb8)
            };
            r.map_err(|e| Error::Msg(format!("synth: {}: {e}", rec.path)))?;
            let p = out.join(&rec.path);
            std::fs::write(&p, buf).map_err(|e| Error::Msg(format!("{}: {e}", p.display())))?;
            Ok(rec)
        })
        .collect::<Result<_>>()?;
    let mpath = out.join("manifest.jsonl");
    Manifest::write(&mpath, &records)?;
    Manifest::load(&mpath, Default::default())
}
