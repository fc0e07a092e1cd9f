//! CLIP image preprocessing, as HuggingFace's `CLIPImageProcessor` (PIL backend) does it:
//! RGB → bicubic resize of the short side to `size` with PIL's antialiased separable filter
//! (8-bit fixed point, horizontal pass then vertical) → center crop → /255 → CLIP mean/std.
use std::path::Path;

use crate::{DType, Device, Error, Result, Tensor};

/// The spec's literals, rounded to f32 as numpy does.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Largest side accepted when decoding (decompression-bomb guard).
pub const MAX_SIDE: u32 = 16_384;

/// Most pixels accepted when decoding: 8192 × 8192, checked from the header before any pixel
/// is decoded, so one hostile image costs at most a few hundred MB (decoded RGBA + its RGB copy).
pub const MAX_PIXELS: u64 = 1 << 26;

/// Whether an image of `w × h` pixels is within `MAX_SIDE` and `MAX_PIXELS`; the error says
/// which limit it breaks.
pub fn check_size(w: u32, h: u32) -> std::result::Result<(), String> {
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(format!(
            "{w}x{h} is larger than the {MAX_SIDE} px side limit"
        ));
    }
    if w as u64 * h as u64 > MAX_PIXELS {
        return Err(format!(
            "{w}x{h} is {} Mpx, over the {} Mpx limit",
            w as u64 * h as u64 / 1_000_000,
            MAX_PIXELS / 1_000_000
        ));
    }
    Ok(())
}

/// Whether a JPEG's bytes hold an end-of-image marker after the start of their last scan: a
/// truncated file has none (the decoder would fill the missing part with grey, silently).
/// Markers cannot occur inside entropy-coded data (0xFF there is stuffed as FF 00), and data
/// after the end marker (some cameras append some) is allowed.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(at) => bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

/// An 8-bit RGB image, rows of `width` pixels, channels interleaved.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        if data.len() != width * height * 3 {
            return Err(Error::Msg(format!(
                "RGB image {width}x{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }
}

/// Bytes that image decodes may hold at once across all threads: a decode waits until its
/// share (16 bytes per pixel, from the header) fits, so a folder of large images costs this
/// much at most, however many threads decode it.
pub const DECODE_BUDGET: u64 = 1 << 30;

struct Budget {
    used: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
}

static BUDGET: Budget = Budget {
    used: std::sync::Mutex::new(0),
    freed: std::sync::Condvar::new(),
};

/// A share of `DECODE_BUDGET`, given back when dropped.
struct Share(u64);

impl Share {
    fn take(bytes: u64) -> Share {
        let bytes = bytes.min(DECODE_BUDGET);
        let mut used = BUDGET.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + bytes > DECODE_BUDGET {
            used = BUDGET.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += bytes;
        Share(bytes)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut used = BUDGET.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(self.0);
        BUDGET.freed.notify_all();
    }
}

/// Decodes PNG/JPEG/WebP to RGB (alpha dropped, grey expanded), refusing images over the size
/// limits (`check_size`, from the header, before decoding) and truncated JPEGs; a truncated
/// PNG or WebP fails in its decoder. Every error names `what`.
pub fn decode_image_bytes(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::Msg(format!("{what}: {e}")))
    };
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| Error::Msg(format!("{what}: cannot read the image header: {e}")))?;
    check_size(w, h).map_err(|e| Error::Msg(format!("{what}: {e}")))?;
    let mut reader = reader()?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(Error::Msg(format!(
            "{what}: truncated JPEG (no end-of-image marker after its last scan)"
        )));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // The decoded image (up to 16 bytes per pixel) and the decoder's buffers, bounded, and
    // counted against the process's decode budget while they live.
    let cost = (w as u64 * h as u64 * 16).max(64 << 20);
    limits.max_alloc = Some(cost);
    reader.limits(limits);
    let _share = Share::take(cost);
    let img = reader
        .decode()
        .map_err(|e| Error::Msg(format!("{what}: cannot decode image: {e}")))?;
    let rgb = img.to_rgb8();
    RgbImage::new(rgb.width() as usize, rgb.height() as usize, rgb.into_raw())
}

pub fn decode_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    decode_image_bytes(&bytes, &path.display().to_string())
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel, the first input
/// index and fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> (usize, Vec<(usize, Vec<i32>)>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut out = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut k: Vec<f64> = (0..xmax)
            .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|v| *v /= ww);
        }
        let fixed = k
            .iter()
            .map(|v| {
                let s = v * (1u32 << PRECISION_BITS) as f64;
                if *v < 0.0 {
                    (-0.5 + s) as i32
                } else {
                    (0.5 + s) as i32
                }
            })
            .collect();
        out.push((xmin, fixed));
    }
    (ksize, out)
}

#[inline]
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// PIL's `Image.resize((w, h), BICUBIC)` for 8-bit RGB, bit for bit.
pub fn resize_bicubic(img: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (iw, ih) = (img.width, img.height);
    let need_h = w != iw;
    let need_v = h != ih;
    let (_, kh) = coeffs(iw, w);
    let (_, kv) = coeffs(ih, h);
    // Rows of the input the vertical pass reads.
    let (y_first, y_last) = if need_v {
        let (lo, last) = (&kv[0], &kv[h - 1]);
        (lo.0, last.0 + last.1.len())
    } else {
        (0, ih)
    };
    let mut cur = img.clone();
    if need_h {
        let rows = y_last - y_first;
        let mut out = vec![0u8; w * rows * 3];
        for y in 0..rows {
            let src = &img.data[(y + y_first) * iw * 3..(y + y_first + 1) * iw * 3];
            for (xx, (xmin, k)) in kh.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, kv) in k.iter().enumerate() {
                        ss += src[(x + xmin) * 3 + c] as i64 * *kv as i64;
                    }
                    out[(y * w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        cur = RgbImage {
            width: w,
            height: rows,
            data: out,
        };
    }
    if need_v {
        let off = if need_h { y_first } else { 0 };
        let cw = cur.width;
        let mut out = vec![0u8; cw * h * 3];
        for (yy, (ymin, k)) in kv.iter().enumerate() {
            let ymin = ymin - off;
            for x in 0..cw * 3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (y, kv) in k.iter().enumerate() {
                    ss += cur.data[(y + ymin) * cw * 3 + x] as i64 * *kv as i64;
                }
                out[yy * cw * 3 + x] = clip8(ss);
            }
        }
        cur = RgbImage {
            width: cw,
            height: h,
            data: out,
        };
    }
    cur
}

/// HF's `get_resize_output_image_size(default_to_square=False)`: (width, height) with the
/// short side `size` and the long side scaled, truncated.
pub fn short_side_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// HF's center crop (top/left rounded down; a too-small image is zero-padded around).
pub fn center_crop(img: &RgbImage, size: usize) -> RgbImage {
    let mut out = vec![0u8; size * size * 3];
    let top = (img.height as i64 - size as i64).div_euclid(2);
    let left = (img.width as i64 - size as i64).div_euclid(2);
    for y in 0..size {
        let sy = y as i64 + top;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..size {
            let sx = x as i64 + left;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let s = (sy as usize * img.width + sx as usize) * 3;
            out[(y * size + x) * 3..(y * size + x) * 3 + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width: size,
        height: size,
        data: out,
    }
}

/// Resize short side to `size`, center crop `size`, scale and normalize: [3, size, size] CHW.
pub fn preprocess(img: &RgbImage, size: usize) -> Vec<f32> {
    let (w, h) = short_side_size(img.width, img.height, size);
    let resized = resize_bicubic(img, w, h);
    let crop = center_crop(&resized, size);
    let mut out = vec![0f32; 3 * size * size];
    for c in 0..3 {
        for i in 0..size * size {
            // As numpy: (f64(u8) · (1/255)) rounded to f32, then (x − mean) / std in f32.
            let x = (crop.data[i * 3 + c] as f64 * (1.0 / 255.0)) as f32;
            out[c * size * size + i] = (x - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

/// A batch of preprocessed images as pixel_values [N, 3, size, size].
pub fn pixel_values(
    images: &[RgbImage],
    size: usize,
    dtype: DType,
    device: Device,
) -> Result<Tensor> {
    let mut all = Vec::with_capacity(images.len() * 3 * size * size);
    for img in images {
        all.extend(preprocess(img, size));
    }
    Tensor::from_vec(all, (images.len(), 3, size, size), Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}
