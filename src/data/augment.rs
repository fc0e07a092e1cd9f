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
    /// Probability of a left-right mirror.
    pub flip_p: f64,
    /// Rotation by a uniform angle in ±`rotate_deg`, with probability `rotate_p`.
    pub rotate_p: f64,
    /// Largest rotation angle, in degrees ([0, 180]).
    pub rotate_deg: f64,
    /// Isotropic resize by a uniform factor in [min, max], then a random crop back to size
    /// (always applied; (1, 1) turns it off).
    pub scale: (f64, f64),
    /// Probability of the brightness/contrast jitter.
    pub color_p: f64,
    /// Brightness shift and contrast factor deviation, each uniform in ±`color`.
    pub color: f64,
    /// Probability of a Gaussian blur.
    pub blur_p: f64,
    /// Range (min, max) the blur's σ is drawn from uniformly, in pixels (max ≤ 50).
    pub blur_sigma: (f64, f64),
    /// Probability of a JPEG re-encode (compression artifacts).
    pub jpeg_p: f64,
    /// Range (min, max) of the JPEG quality, drawn uniformly as an integer in 1..=100.
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

/// Mirror left-right, in place.
pub fn hflip(img: &mut RgbImage) {
    let w = img.width;
    for row in img.data.chunks_exact_mut(w * 3) {
        let (mut a, mut b) = (0, w.saturating_sub(1));
        while a < b {
            for c in 0..3 {
                row.swap(a * 3 + c, b * 3 + c);
            }
            a += 1;
            b -= 1;
        }
    }
}

/// Contrast `k` about the image mean, then brightness `b` (in units of full scale). The map
/// of one value depends only on the value, so it is a 256-entry table.
pub fn brightness_contrast(img: &mut RgbImage, b: f32, k: f32) {
    let sum: u64 = img.data.iter().map(|v| *v as u64).sum();
    let mean = (sum as f64 / img.data.len().max(1) as f64) as f32;
    let lut: [u8; 256] = std::array::from_fn(|v| contrast_value(v as u8, mean, b, k));
    for v in img.data.iter_mut() {
        *v = lut[*v as usize];
    }
}

#[inline]
fn contrast_value(v: u8, mean: f32, b: f32, k: f32) -> u8 {
    ((v as f32 - mean) * k + mean + b * 255.0)
        .clamp(0.0, 255.0)
        .round() as u8
}

/// Rotation by `angle` (radians) and isotropic scale `s` about the centre, shifted by (tx, ty)
/// pixels, bilinear, same output size; outside the source the border pixel is repeated (a
/// constant fill would itself be a cue).
pub fn affine(img: &RgbImage, angle: f64, s: f64, tx: f64, ty: f64) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut out = vec![0u8; w * h * 3];
    affine_into(img, angle, s, tx, ty, &mut out);
    RgbImage {
        width: w,
        height: h,
        data: out,
    }
}

/// `affine` into `out` [h·w·3]. The inverse map is linear along a row, so source positions
/// are stepped in 16.16 fixed point and the taps weighted in integers (11-bit weights): no
/// float work and no libm call per pixel. Only pixels whose taps leave the image take the
/// clamped path.
fn affine_into(img: &RgbImage, angle: f64, s: f64, tx: f64, ty: f64, out: &mut [u8]) {
    const FRAC: u32 = 16;
    const WBITS: u32 = 11;
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return;
    }
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let (cos, sin) = (angle.cos(), angle.sin());
    let one = (1i64 << FRAC) as f64;
    // sx = ax·x + bx(y), sy = ay·x + by(y): the inverse map (output → source) of pixel
    // centres.
    let (ax, ay) = (
        (cos / s * one).round() as i64,
        (-sin / s * one).round() as i64,
    );
    let src = &img.data;
    // Past the border every tap repeats the edge, so clamping the position changes nothing.
    let (xmax, ymax) = (((w - 1) as i64) << FRAC, ((h - 1) as i64) << FRAC);
    let lo = -(1i64 << FRAC);
    let row_bytes = w * 3;
    for (y, row) in out.chunks_exact_mut(row_bytes).enumerate() {
        let dx0 = 0.5 - cx - tx;
        let dy = y as f64 + 0.5 - cy - ty;
        let bx = (((cos * dx0 + sin * dy) / s + cx - 0.5) * one).round() as i64;
        let by = (((-sin * dx0 + cos * dy) / s + cy - 0.5) * one).round() as i64;
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let sx = bx
                .saturating_add(ax.saturating_mul(x as i64))
                .clamp(lo, xmax);
            let sy = by
                .saturating_add(ay.saturating_mul(x as i64))
                .clamp(lo, ymax);
            let (x0, y0) = (sx >> FRAC, sy >> FRAC);
            let wx = ((sx >> (FRAC - WBITS)) & ((1 << WBITS) - 1)) as i32;
            let wy = ((sy >> (FRAC - WBITS)) & ((1 << WBITS) - 1)) as i32;
            let (i00, i01, i10, i11) =
                if x0 >= 0 && y0 >= 0 && x0 < xmax >> FRAC && y0 < ymax >> FRAC {
                    let i = (y0 as usize * w + x0 as usize) * 3;
                    (i, i + 3, i + row_bytes, i + row_bytes + 3)
                } else {
                    let cxl = |v: i64| v.clamp(0, w as i64 - 1) as usize;
                    let cyl = |v: i64| v.clamp(0, h as i64 - 1) as usize;
                    let (xa, xb, ya, yb) = (cxl(x0), cxl(x0 + 1), cyl(y0), cyl(y0 + 1));
                    (
                        (ya * w + xa) * 3,
                        (ya * w + xb) * 3,
                        (yb * w + xa) * 3,
                        (yb * w + xb) * 3,
                    )
                };
            for c in 0..3 {
                let (p00, p01) = (src[i00 + c] as i32, src[i01 + c] as i32);
                let (p10, p11) = (src[i10 + c] as i32, src[i11 + c] as i32);
                let top = (p00 << WBITS) + (p01 - p00) * wx;
                let bot = (p10 << WBITS) + (p11 - p10) * wx;
                let v = (top << WBITS) + (bot - top) * wy;
                px[c] = ((v + (1 << (2 * WBITS - 1))) >> (2 * WBITS)) as u8;
            }
        }
    }
}

thread_local! {
    /// The blur's f32 planes, kept per decode thread: no allocation per image.
    static BLUR_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Separable Gaussian blur (radius ⌈3σ⌉, border repeated), in f32. σ above 50 is taken as
/// 50 (the kernel would outgrow any image).
pub fn gaussian_blur(img: &mut RgbImage, sigma: f64) {
    if sigma.is_nan() || sigma <= 0.0 || img.data.is_empty() {
        return;
    }
    let sigma = sigma.min(50.0);
    let k = blur_kernel(sigma);
    let (w, h) = (img.width, img.height);
    BLUR_SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (src, tmp) = &mut *guard;
        src.clear();
        src.extend(img.data.iter().map(|v| *v as f32));
        tmp.clear();
        tmp.resize(src.len(), 0.0);
        for (s, d) in src.chunks_exact(w * 3).zip(tmp.chunks_exact_mut(w * 3)) {
            blur_row(s, d, &k);
        }
        // Vertically, whole rows at a time: out row y = Σ k[j] · tmp row clamp(y + j − r).
        let r = (k.len() / 2) as isize;
        let acc = src; // the source plane is no longer needed
        for (y, (out, acc)) in img
            .data
            .chunks_exact_mut(w * 3)
            .zip(acc.chunks_exact_mut(w * 3))
            .enumerate()
        {
            acc.fill(0.0);
            for (j, kv) in k.iter().enumerate() {
                let sy = (y as isize + j as isize - r).clamp(0, h as isize - 1) as usize;
                let t = &tmp[sy * w * 3..(sy + 1) * w * 3];
                for (a, t) in acc.iter_mut().zip(t) {
                    *a += kv * *t;
                }
            }
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                *o = (a.clamp(0.0, 255.0) + 0.5) as u8;
            }
        }
        // A huge image's planes are not kept for the life of the thread.
        if acc.capacity() > 1 << 24 {
            *acc = Vec::new();
            *tmp = Vec::new();
        }
    });
}

/// The normalized Gaussian taps for `sigma`, radius ⌈3σ⌉.
fn blur_kernel(sigma: f64) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as isize;
    let mut k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    k
}

/// One row [w·3] of the horizontal pass: interior pixels as shifted whole-slice multiply-adds
/// (a stride-3 convolution of the interleaved row), the borders clamped.
fn blur_row(src: &[f32], dst: &mut [f32], k: &[f32]) {
    let w = src.len() / 3;
    let r = k.len() / 2;
    let clamped = |x: usize, dst: &mut [f32]| {
        for c in 0..3 {
            let mut acc = 0.0f32;
            for (j, kv) in k.iter().enumerate() {
                let t = (x as isize + j as isize - r as isize).clamp(0, w as isize - 1) as usize;
                acc += kv * src[t * 3 + c];
            }
            dst[x * 3 + c] = acc;
        }
    };
    if w <= 2 * r {
        for x in 0..w {
            clamped(x, dst);
        }
        return;
    }
    let (lo, hi) = (r * 3, (w - r) * 3);
    let inner = &mut dst[lo..hi];
    inner.fill(0.0);
    for (j, kv) in k.iter().enumerate() {
        for (d, s) in inner.iter_mut().zip(&src[j * 3..j * 3 + (hi - lo)]) {
            *d += kv * *s;
        }
    }
    for x in (0..r).chain(w - r..w) {
        clamped(x, dst);
    }
}

/// JPEG encode at `quality` (1–100, 4:2:0 chroma as libjpeg's default) and decode again.
pub fn jpeg(img: &mut RgbImage, quality: u8) -> Result<()> {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return Ok(());
    }
    let (Ok(w16), Ok(h16)) = (u16::try_from(w), u16::try_from(h)) else {
        return Err(Error::Media(format!(
            "jpeg re-encode: {w}x{h} is over JPEG's 65535 px side"
        )));
    };
    let mut buf = Vec::with_capacity(w * h / 2);
    let mut enc = jpeg_encoder::Encoder::new(&mut buf, quality.clamp(1, 100));
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    enc.encode(&img.data, w16, h16, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| Error::Media(format!("jpeg re-encode: {e}")))?;
    let opts = zune_jpeg::zune_core::options::DecoderOptions::default()
        .jpeg_set_out_colorspace(zune_jpeg::zune_core::colorspace::ColorSpace::RGB);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(
        zune_jpeg::zune_core::bytestream::ZCursor::new(&buf[..]),
        opts,
    );
    dec.decode_into(&mut img.data)
        .map_err(|e| Error::Media(format!("jpeg re-encode: {e:?}")))?;
    Ok(())
}

/// One degradation of `sd2 eval --perturb`, applied to real and fake alike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Perturb {
    /// JPEG re-encode at this quality (1–100).
    Jpeg(u8),
    /// Gaussian blur with this σ, in pixels (`parse_list` accepts (0, 50]; `gaussian_blur`
    /// treats σ ≤ 0 as no blur and caps σ at 50).
    Blur(f64),
}

impl Perturb {
    /// Degrades `img` in place. Fails with `Error::Media` only when the JPEG round trip
    /// fails (e.g. a side over 65535 px).
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
            Error::parse(
                format!("--perturb {spec}"),
                format!(
                    "{why} (expected jpeg:Q[,Q…] with Q in 1..=100, or blur:SIGMA[,SIGMA…] with SIGMA > 0)"
                ),
            )
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
                    if !(s > 0.0 && s <= 50.0) {
                        return Err(bad(&format!("sigma {l} must be in (0, 50]")));
                    }
                    Perturb::Blur(s)
                }
                other => return Err(bad(&format!("unknown degradation `{other}`"))),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    //! Each fast augmentation against a plain f64 reference (the formulas as written, no
    //! shortcuts), on a textured image with hard edges.
    use super::*;

    fn texture(w: usize, h: usize) -> RgbImage {
        let mut d = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let v = ((x * 37 + y * 11) % 256) as u8;
                let e = if (x / 7 + y / 5) % 2 == 0 { 30 } else { 220 };
                d.extend([v, e, ((x * y) % 251) as u8]);
            }
        }
        RgbImage::new(w, h, d).unwrap()
    }

    fn reference_affine(img: &RgbImage, angle: f64, s: f64, tx: f64, ty: f64) -> Vec<u8> {
        let (w, h) = (img.width, img.height);
        let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
        let (cos, sin) = (angle.cos(), angle.sin());
        let at = |xx: f64, yy: f64, c: usize| {
            let xx = (xx as isize).clamp(0, w as isize - 1) as usize;
            let yy = (yy as isize).clamp(0, h as isize - 1) as usize;
            img.data[(yy * w + xx) * 3 + c] as f64
        };
        let mut out = vec![];
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f64 + 0.5 - cx - tx, y as f64 + 0.5 - cy - ty);
                let sx = (cos * dx + sin * dy) / s + cx - 0.5;
                let sy = (-sin * dx + cos * dy) / s + cy - 0.5;
                let (x0, y0) = (sx.floor(), sy.floor());
                let (fx, fy) = (sx - x0, sy - y0);
                for c in 0..3 {
                    let top = at(x0, y0, c) * (1.0 - fx) + at(x0 + 1.0, y0, c) * fx;
                    let bot = at(x0, y0 + 1.0, c) * (1.0 - fx) + at(x0 + 1.0, y0 + 1.0, c) * fx;
                    out.push((top * (1.0 - fy) + bot * fy).round().clamp(0.0, 255.0) as u8);
                }
            }
        }
        out
    }

    fn reference_blur(img: &RgbImage, sigma: f64) -> Vec<u8> {
        let (w, h) = (img.width as isize, img.height as isize);
        let r = (3.0 * sigma).ceil() as isize;
        let k: Vec<f64> = (-r..=r)
            .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
            .collect();
        let sum: f64 = k.iter().sum();
        let px = |x: isize, y: isize, c: usize| {
            img.data[((y.clamp(0, h - 1) * w + x.clamp(0, w - 1)) * 3) as usize + c] as f64
        };
        let mut tmp = vec![0f64; img.data.len()];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    tmp[((y * w + x) * 3) as usize + c] = (-r..=r)
                        .map(|j| k[(j + r) as usize] * px(x + j, y, c))
                        .sum::<f64>()
                        / sum;
                }
            }
        }
        let mut out = vec![0u8; img.data.len()];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let v: f64 = (-r..=r)
                        .map(|j| {
                            let yy = (y + j).clamp(0, h - 1);
                            k[(j + r) as usize] * tmp[((yy * w + x) * 3) as usize + c]
                        })
                        .sum::<f64>()
                        / sum;
                    out[((y * w + x) * 3) as usize + c] = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        out
    }

    /// Worst |a − b| (grey levels), where, and the share of values that differ at all.
    fn compare(name: &str, got: &[u8], want: &[u8], tol: u8, share: f64) {
        assert_eq!(got.len(), want.len());
        let (mut worst, mut at, mut differ) = (0u8, 0, 0usize);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let d = a.abs_diff(*b);
            differ += (d > 0) as usize;
            if d > worst {
                (worst, at) = (d, i);
            }
        }
        let frac = differ as f64 / got.len() as f64;
        println!("{name}: worst |err| {worst} at {at} (tol {tol}), {frac:.5} of values differ (tol {share})");
        assert!(worst <= tol && frac <= share, "{name}");
    }

    #[test]
    fn affine_matches_the_f64_reference() {
        let img = texture(61, 47);
        for (angle, s, tx, ty) in [
            (0.0, 1.0, 0.0, 0.0),
            (0.13, 1.0, 0.0, 0.0),
            (-0.17, 0.8, 3.5, -2.25),
            (0.05, 1.2, -4.0, 6.0),
            (std::f64::consts::PI, 1.0, 0.0, 0.0),
        ] {
            let got = affine(&img, angle, s, tx, ty);
            let want = reference_affine(&img, angle, s, tx, ty);
            // Fixed-point positions and 11-bit weights: a value within ~0.1 of a rounding tie
            // (this texture's steep gradients make many) may go the other way.
            compare(
                &format!("affine({angle}, {s}, {tx}, {ty})"),
                &got.data,
                &want,
                1,
                0.05,
            );
        }
        // The identity is exact.
        assert_eq!(affine(&img, 0.0, 1.0, 0.0, 0.0).data, img.data);
    }

    #[test]
    fn blur_matches_the_f64_reference() {
        for (w, h) in [(40, 33), (5, 9)] {
            let img = texture(w, h);
            for sigma in [0.1, 0.7, 2.0, 3.3] {
                let mut got = img.clone();
                gaussian_blur(&mut got, sigma);
                compare(
                    &format!("blur {w}x{h} σ={sigma}"),
                    &got.data,
                    &reference_blur(&img, sigma),
                    1,
                    0.01,
                );
            }
        }
    }

    #[test]
    fn flip_and_contrast_are_exact() {
        let img = texture(7, 3);
        let mut f = img.clone();
        hflip(&mut f);
        for y in 0..3 {
            for x in 0..7 {
                let (a, b) = ((y * 7 + x) * 3, (y * 7 + 6 - x) * 3);
                assert_eq!(f.data[a..a + 3], img.data[b..b + 3]);
            }
        }
        let mut c = img.clone();
        brightness_contrast(&mut c, 0.05, 1.08);
        let mean = img.data.iter().map(|v| *v as f64).sum::<f64>() / img.data.len() as f64;
        for (got, v) in c.data.iter().zip(&img.data) {
            let want = ((*v as f64 - mean) * 1.08 + mean + 0.05 * 255.0)
                .clamp(0.0, 255.0)
                .round();
            assert!(
                (*got as f64 - want).abs() <= 1.0,
                "{v} → {got}, want {want}"
            );
        }
    }

    #[test]
    fn jpeg_round_trip_degrades_as_asked() {
        // A photo-like image: smooth shading and one hard edge.
        let d = (0..48)
            .flat_map(|y| {
                (0..64).flat_map(move |x| {
                    let e = if x > 40 { 60 } else { 0 };
                    [(x * 3 + e) as u8, (y * 4) as u8, (128 + x - y) as u8]
                })
            })
            .collect();
        let img = RgbImage::new(64, 48, d).unwrap();
        let err = |q: u8| {
            let mut j = img.clone();
            jpeg(&mut j, q).unwrap();
            assert_eq!((j.width, j.height, j.data.len()), (64, 48, img.data.len()));
            j.data
                .iter()
                .zip(&img.data)
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .sum::<f64>()
                / img.data.len() as f64
        };
        let (q95, q40) = (err(95), err(40));
        println!("mean |err|: q95 {q95:.2}, q40 {q40:.2}");
        assert!(q95 < q40 && q95 < 2.0 && q40 > 0.5, "{q95} {q40}");
    }
}
