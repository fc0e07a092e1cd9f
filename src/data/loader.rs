//! Turning manifest items into model input: parallel decode (rayon) and CLIP preprocessing,
//! with train-time augmentations deterministic per (seed, epoch, index).
use rayon::prelude::*;

use super::manifest::Item;
use crate::clip::preprocess::{decode_image, preprocess, RgbImage};
use crate::rng::{mix64, Rng};
use crate::{DType, Device, Error, Result, Tensor};

/// Train-time augmentation of one image (SD2-SPEC §5, the subset implemented so far): horizontal
/// flip (p 0.5) and brightness/contrast ±0.1 (p 0.5).
pub fn augment(img: &mut RgbImage, seed: u64, epoch: u64, index: u64) {
    let mut r = Rng::new(mix64(
        seed ^ mix64(epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index),
    ));
    let (w, h) = (img.width, img.height);
    if r.uniform() < 0.5 {
        for y in 0..h {
            for x in 0..w / 2 {
                for c in 0..3 {
                    img.data
                        .swap((y * w + x) * 3 + c, (y * w + (w - 1 - x)) * 3 + c);
                }
            }
        }
    }
    if r.uniform() < 0.5 {
        let b = (r.uniform() * 0.2 - 0.1) as f32;
        let k = 1.0 + (r.uniform() * 0.2 - 0.1) as f32;
        let mean = img.data.iter().map(|v| *v as f32).sum::<f32>() / img.data.len().max(1) as f32;
        for v in img.data.iter_mut() {
            *v = ((*v as f32 - mean) * k + mean + b * 255.0)
                .clamp(0.0, 255.0)
                .round() as u8;
        }
    }
}

/// Pixel values [N, 3, size, size] for `items`; `augment` is Some((seed, epoch)) in training.
/// A decode failure names the manifest line.
pub fn load_pixels(
    items: &[&Item],
    size: usize,
    augment_with: Option<(u64, u64)>,
    dtype: DType,
    device: Device,
) -> Result<Tensor> {
    let parts: Vec<Vec<f32>> = items
        .par_iter()
        .map(|it| {
            let mut img = decode_image(&it.path)
                .map_err(|e| Error::Msg(format!("manifest line {}: {e}", it.line)))?;
            if let Some((seed, epoch)) = augment_with {
                augment(&mut img, seed, epoch, it.line as u64);
            }
            Ok(preprocess(&img, size))
        })
        .collect::<Result<_>>()?;
    let flat: Vec<f32> = parts.into_iter().flatten().collect();
    Tensor::from_vec(flat, (items.len(), 3, size, size), Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}
