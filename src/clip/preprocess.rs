//! CLIP image preprocessing, as HuggingFace's `CLIPImageProcessor` (PIL backend) does it:
//! RGB → bicubic resize of the short side to `size` with PIL's antialiased separable filter
//! (8-bit fixed point, horizontal pass then vertical) → center crop → /255 → CLIP mean/std.
use std::path::Path;

use crate::{DType, Device, Error, Result, Tensor};

/// The spec's literals, rounded to f32 as numpy does.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// Per-channel (R, G, B) standard deviation the pixels are divided by, after scaling to [0, 1] and
/// subtracting [`CLIP_MEAN`]; the spec's literals, rounded to f32.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Largest side accepted when decoding (decompression-bomb guard).
pub const MAX_SIDE: u32 = 16_384;

/// Most pixels accepted when decoding: 8192 × 8192, checked from the header before any pixel
/// is decoded, so one hostile image costs at most a few hundred MB (decoded RGBA + its RGB copy).
pub const MAX_PIXELS: u64 = 1 << 26;

/// Largest image file read: an 8192² RGB image stored uncompressed is 201 MB, so anything
/// larger is no image this accepts; checked before reading, and the read itself stops there (a
/// file that grows, or a device node, cannot make it read more).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

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
    /// Width in pixels; at least 1 in a valid image.
    pub width: usize,
    /// Height in pixels; at least 1 in a valid image.
    pub height: usize,
    /// The pixels, top row first, each as R, G, B bytes: exactly `width × height × 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// An error unless the image has pixels and exactly `width × height × 3` bytes (its
    /// fields are public, so one can be built that lies).
    pub fn check(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 || self.data.len() != self.width * self.height * 3 {
            return Err(Error::Media(format!(
                "a {}x{} image with {} bytes has no pixels to judge",
                self.width,
                self.height,
                self.data.len()
            )));
        }
        Ok(())
    }

    /// An image from its interleaved RGB bytes. A side of 0 is an `Error::Media` (there is nothing
    /// to judge), and so is `data` of the wrong length.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        if width == 0 || height == 0 {
            return Err(Error::Media(format!(
                "a {width}x{height} image has no pixels"
            )));
        }
        if data.len() != width * height * 3 {
            return Err(Error::Media(format!(
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
/// share fits — the file's bytes plus 32 bytes per pixel (from the header) for the decoded
/// image, the decoder's buffers and what `decode_image_then`'s continuation makes of it — so
/// a folder of large images costs this much at most, however many threads decode it.
pub const DECODE_BUDGET: u64 = 1 << 30;

/// Bytes of `DECODE_BUDGET` an image of `w × h` pixels is counted for.
fn pixel_share(w: u32, h: u32) -> u64 {
    // The decoded image and the augmentations' copies and f32 planes (the blur's two: 24 B).
    (w as u64 * h as u64 * 32).max(1 << 20)
}

struct Budget {
    used: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
}

static BUDGET: Budget = Budget {
    used: std::sync::Mutex::new(0),
    freed: std::sync::Condvar::new(),
};

/// A share of `DECODE_BUDGET`, given back when dropped. Capped at the whole budget, so one
/// decode always proceeds once the others are done (a thread holds one share at a time).
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

/// The header's dimensions, checked against the size limits (`check_size`).
fn header_size<R: std::io::BufRead + std::io::Seek>(r: R, what: &str) -> Result<(u32, u32)> {
    let (w, h) = image::ImageReader::new(r)
        .with_guessed_format()
        .map_err(|e| Error::Media(format!("{what}: {e}")))?
        .into_dimensions()
        .map_err(|e| Error::Media(format!("{what}: cannot read the image header: {e}")))?;
    check_size(w, h).map_err(|e| Error::Media(format!("{what}: {e}")))?;
    Ok((w, h))
}

/// Decodes `bytes` (their header already checked as `w × h`) under the decoder's allocation
/// limit; the caller holds the budget share.
fn decode_checked(bytes: &[u8], what: &str, (w, h): (u32, u32)) -> Result<RgbImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Media(format!("{what}: {e}")))?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(Error::Media(format!(
            "{what}: truncated JPEG (no end-of-image marker after its last scan)"
        )));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // The decoded image (up to 16 bytes per pixel) and the decoder's buffers, bounded.
    limits.max_alloc = Some((w as u64 * h as u64 * 16).max(64 << 20));
    reader.limits(limits);
    let cannot = |e: image::ImageError| Error::Media(format!("{what}: cannot decode image: {e}"));
    use image::ImageDecoder;
    let mut decoder = reader.into_decoder().map_err(cannot)?;
    // A phone's photo is stored sideways with an EXIF note saying how to turn it: turned
    // here, as a viewer (and OpenCV's imread, DeepfakeBench's loader) shows it, so faces are
    // upright and boxes are where a viewer sees them. A bad note is ignored.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let img = image::DynamicImage::from_decoder(decoder).map_err(cannot)?;
    if (img.width(), img.height()) != (w, h) {
        return Err(Error::Media(format!(
            "{what}: decoded as {}x{}, but its header says {w}x{h}",
            img.width(),
            img.height()
        )));
    }
    // Already RGB8 (most photos): no copy.
    let mut img = image::DynamicImage::ImageRgb8(img.into_rgb8());
    img.apply_orientation(orientation);
    let rgb = img.into_rgb8();
    RgbImage::new(rgb.width() as usize, rgb.height() as usize, rgb.into_raw())
}

/// Decodes PNG/JPEG/WebP to RGB (alpha dropped, grey expanded, turned upright as its EXIF
/// orientation says), refusing images over the size
/// limits (`check_size`, from the header, before decoding) and truncated JPEGs; a truncated
/// PNG or WebP fails in its decoder. Every error names `what`.
pub fn decode_image_bytes(bytes: &[u8], what: &str) -> Result<RgbImage> {
    decode_image_bytes_then(bytes, what, Ok)
}

/// As `decode_image_bytes`, the image then handed to `then` while its share of
/// `DECODE_BUDGET` is still held: what `then` makes of it (an augmented copy, the resize) is
/// counted too, until it returns.
pub fn decode_image_bytes_then<T>(
    bytes: &[u8],
    what: &str,
    then: impl FnOnce(RgbImage) -> Result<T>,
) -> Result<T> {
    let size = header_size(std::io::Cursor::new(bytes), what)?;
    let _share = Share::take(pixel_share(size.0, size.1));
    then(decode_checked(bytes, what, size)?)
}

/// An encoded image's width and height, from its header alone (nothing is decoded), checked
/// against the size limits (`check_size`); errors name `what`.
pub fn image_bytes_size(bytes: &[u8], what: &str) -> Result<(u32, u32)> {
    header_size(std::io::Cursor::new(bytes), what)
}

/// The file's length, refused if over `MAX_FILE_BYTES` (nothing is read).
pub fn image_file_len(path: &Path) -> Result<u64> {
    file_len(path, &open_image_file(path)?)
}

fn open_image_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| Error::Media(format!("{}: {e}", path.display())))
}

fn file_too_big(path: &Path, n: u64) -> Error {
    Error::Media(format!(
        "{}: {} MB is over the {} MB limit for an image file",
        path.display(),
        n >> 20,
        MAX_FILE_BYTES >> 20
    ))
}

fn file_len(path: &Path, f: &std::fs::File) -> Result<u64> {
    let len = f
        .metadata()
        .map_err(|e| Error::Media(format!("{}: {e}", path.display())))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(file_too_big(path, len));
    }
    Ok(len)
}

/// The whole file from its start; the read stops past `MAX_FILE_BYTES` whatever its metadata
/// said (a file that grows, a device node).
fn read_bounded(path: &Path, mut f: &std::fs::File) -> Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let fail = |e: std::io::Error| Error::Media(format!("{}: {e}", path.display()));
    let len = file_len(path, f)?;
    f.rewind().map_err(fail)?;
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(file_too_big(path, bytes.len() as u64));
    }
    Ok(bytes)
}

/// `decode_image_bytes` of a file (at most `MAX_FILE_BYTES`); errors name the file.
pub fn decode_image(path: &Path) -> Result<RgbImage> {
    decode_image_then(path, Ok)
}

/// As `decode_image`, the image then handed to `then` under its share of `DECODE_BUDGET`
/// (`decode_image_bytes_then`). The share, taken from the header before the file is read,
/// counts the file's bytes too; they are freed before `then` runs.
pub fn decode_image_then<T>(path: &Path, then: impl FnOnce(RgbImage) -> Result<T>) -> Result<T> {
    let what = path.display().to_string();
    let f = open_image_file(path)?;
    let len = file_len(path, &f)?;
    let size = header_size(std::io::BufReader::new(&f), &what)?;
    let _share = Share::take(len + pixel_share(size.0, size.1));
    let bytes = read_bounded(path, &f)?;
    let img = decode_checked(&bytes, &what, size)?;
    drop(bytes);
    then(img)
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
/// Only outputs `range` are computed (a window of the resize).
fn coeffs(
    in_size: usize,
    out_size: usize,
    range: std::ops::Range<usize>,
) -> (usize, Vec<(usize, Vec<i32>)>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut out = Vec::with_capacity(range.len());
    for xx in range {
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
    resize_bicubic_window(img, w, h, [0, 0, w, h])
}

/// The window `[x0, y0, width, height]` (inside `w × h`) of `resize_bicubic(img, w, h)`, bit
/// for bit, computing only its pixels: each output pixel depends on its own weights alone, so
/// a crop of a very long image costs the crop, not the whole resized image.
pub fn resize_bicubic_window(
    img: &RgbImage,
    w: usize,
    h: usize,
    [x0, y0, cw, ch]: [usize; 4],
) -> RgbImage {
    let (iw, ih) = (img.width, img.height);
    let need_h = w != iw;
    let need_v = h != ih;
    let (cw, ch) = (cw.min(w.saturating_sub(x0)), ch.min(h.saturating_sub(y0)));
    if cw == 0 || ch == 0 {
        return RgbImage {
            width: cw,
            height: ch,
            data: vec![],
        };
    }
    let (_, kh) = coeffs(iw, w, x0..x0 + cw);
    let (_, kv) = coeffs(ih, h, y0..y0 + ch);
    // Rows of the input the vertical pass reads.
    let (y_first, y_last) = if need_v {
        let (lo, last) = (&kv[0], &kv[ch - 1]);
        (lo.0, last.0 + last.1.len())
    } else {
        (y0, y0 + ch)
    };
    // The input is borrowed, not copied: a full-size copy would double a large image's cost.
    let rows = y_last - y_first;
    let horizontal = if need_h {
        let mut out = vec![0u8; cw * rows * 3];
        for y in 0..rows {
            let src = &img.data[(y + y_first) * iw * 3..(y + y_first + 1) * iw * 3];
            for (xx, (xmin, k)) in kh.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, kv) in k.iter().enumerate() {
                        ss += src[(x + xmin) * 3 + c] as i64 * *kv as i64;
                    }
                    out[(y * cw + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        RgbImage {
            width: cw,
            height: rows,
            data: out,
        }
    } else {
        // Columns x0..x0+cw of rows y_first..y_last, as they are.
        let mut out = Vec::with_capacity(cw * rows * 3);
        for y in y_first..y_last {
            out.extend_from_slice(&img.data[(y * iw + x0) * 3..(y * iw + x0 + cw) * 3]);
        }
        RgbImage {
            width: cw,
            height: rows,
            data: out,
        }
    };
    if !need_v {
        return horizontal;
    }
    let src = &horizontal;
    let mut out = vec![0u8; cw * ch * 3];
    for (yy, (ymin, k)) in kv.iter().enumerate() {
        let ymin = ymin - y_first;
        for x in 0..cw * 3 {
            let mut ss: i64 = 1 << (PRECISION_BITS - 1);
            for (y, kv) in k.iter().enumerate() {
                ss += src.data[(y + ymin) * cw * 3 + x] as i64 * *kv as i64;
            }
            out[yy * cw * 3 + x] = clip8(ss);
        }
    }
    RgbImage {
        width: cw,
        height: ch,
        data: out,
    }
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
    let mut out = vec![0f32; 3 * size * size];
    preprocess_into(img, size, &mut out);
    out
}

/// The normalized value of each 8-bit level per channel, as numpy computes it: f64(u8) ·
/// (1/255) rounded to f32, then (x − mean) / std in f32.
fn normalize_table() -> &'static [[f32; 256]; 3] {
    static T: std::sync::OnceLock<[[f32; 256]; 3]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        std::array::from_fn(|c| {
            std::array::from_fn(|v| {
                let x = (v as f64 * (1.0 / 255.0)) as f32;
                (x - CLIP_MEAN[c]) / CLIP_STD[c]
            })
        })
    })
}

/// `preprocess` into `out` [3·size·size]: an image whose short side is already `size` is
/// not resized (nor copied), and the crop and normalization are one pass through a table.
pub fn preprocess_into(img: &RgbImage, size: usize, out: &mut [f32]) {
    let (w, h) = short_side_size(img.width, img.height, size);
    // HF's center crop: top/left rounded down; outside the image, zero (black) padding. Only
    // the crop's window is resized (an extreme aspect ratio would otherwise resize to a
    // gigantic image first).
    let top = (h as i64 - size as i64).div_euclid(2);
    let left = (w as i64 - size as i64).div_euclid(2);
    let resized;
    let (src, top, left) = if (w, h) == (img.width, img.height) {
        (img, top, left)
    } else {
        let (x0, y0) = (left.max(0) as usize, top.max(0) as usize);
        resized = resize_bicubic_window(img, w, h, [x0, y0, size, size]);
        (&resized, top.min(0), left.min(0))
    };
    let lut = normalize_table();
    let plane = size * size;
    for y in 0..size {
        let sy = y as i64 + top;
        for c in 0..3 {
            let row = &mut out[c * plane + y * size..c * plane + (y + 1) * size];
            if sy < 0 || sy >= src.height as i64 {
                row.fill(lut[c][0]);
                continue;
            }
            let line = &src.data[sy as usize * src.width * 3..(sy as usize + 1) * src.width * 3];
            for (x, o) in row.iter_mut().enumerate() {
                let sx = x as i64 + left;
                *o = if sx < 0 || sx >= src.width as i64 {
                    lut[c][0]
                } else {
                    lut[c][line[sx as usize * 3 + c] as usize]
                };
            }
        }
    }
}

/// A batch of preprocessed images as pixel_values [N, 3, size, size].
pub fn pixel_values(
    images: &[RgbImage],
    size: usize,
    dtype: DType,
    device: Device,
) -> Result<Tensor> {
    let mut all = Vec::with_capacity(images.len() * 3 * size * size);
    for (i, img) in images.iter().enumerate() {
        img.check()
            .map_err(|e| Error::Media(format!("image {i}: {e}")))?;
        all.extend(preprocess(img, size));
    }
    Tensor::from_vec(all, (images.len(), 3, size, size), Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass crop + table against resize, `center_crop` and the formula, value for
    /// value: already at size, larger (resized), smaller (padded), and non-square.
    #[test]
    fn preprocess_into_equals_the_plain_steps() {
        for (w, h, size) in [
            (32, 32, 32),
            (40, 29, 24),
            (20, 12, 24),
            (17, 50, 16),
            (2, 300, 16),
            (301, 3, 8),
        ] {
            let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 31 % 256) as u8).collect();
            let img = RgbImage::new(w, h, data).unwrap();
            let (rw, rh) = short_side_size(w, h, size);
            let crop = center_crop(&resize_bicubic(&img, rw, rh), size);
            let got = preprocess(&img, size);
            for c in 0..3 {
                for i in 0..size * size {
                    let x = (crop.data[i * 3 + c] as f64 * (1.0 / 255.0)) as f32;
                    let want = (x - CLIP_MEAN[c]) / CLIP_STD[c];
                    assert_eq!(
                        got[c * size * size + i].to_bits(),
                        want.to_bits(),
                        "{w}x{h}→{size} c{c} i{i}"
                    );
                }
            }
        }
    }
}
