//! `sd2 clip embed`: CLIP image and text embeddings of files, written to a safetensors file —
//! the parity check against Hugging Face's `CLIPModel` (`get_image_features`,
//! `get_text_features`) runs on these.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::clip::{preprocess, ClipModel, ClipTokenizer};
use crate::{DType, Device, Error, Result, Tensor};

/// What to embed and where to write it.
#[derive(Clone, Debug)]
pub struct EmbedRequest {
    /// A CLIP checkpoint directory (config.json + model.safetensors).
    pub model: PathBuf,
    /// Image files, decoded and preprocessed as CLIP's image processor does.
    pub images: Vec<PathBuf>,
    /// A safetensors file with `pixel_values` [N, 3, H, W] (already preprocessed).
    pub pixel_values: Option<PathBuf>,
    /// A text file, one text per line.
    pub texts_file: Option<PathBuf>,
    /// The safetensors file to write (`image_embeds`, `text_embeds`).
    pub out: PathBuf,
    /// Device the model runs on; checked to be available before the model is loaded.
    pub device: Device,
    /// Images per forward pass.
    pub batch: usize,
}

/// Embeds what `r` names and writes `r.out`; returns each written tensor's name and shape.
pub fn run(r: &EmbedRequest) -> Result<Vec<(String, Vec<usize>)>> {
    r.device.check_available()?;
    if r.images.is_empty() && r.pixel_values.is_none() && r.texts_file.is_none() {
        return Err(Error::invalid(
            "clip embed",
            "give --images, --pixel-values and/or --texts-file",
        ));
    }
    let clip = ClipModel::load(&r.model, DType::F32, r.device)?;
    let _g = crate::no_grad();
    let batch = r.batch.max(1);
    let mut outputs: Vec<(&str, Tensor)> = vec![];
    let size = clip.config.vision_config.image_size;
    let mut image_embeds = vec![];
    if let Some(pv) = &r.pixel_values {
        image_embeds.extend(pixel_file_embeds(&clip, pv, batch, r.device)?);
    }
    for chunk in r.images.chunks(batch) {
        // Preprocessed one at a time: one full-size image in memory, not a chunk of them.
        let mut all = Vec::with_capacity(chunk.len() * 3 * size * size);
        for p in chunk {
            all.extend(preprocess::decode_image_then(p, |img| {
                Ok(preprocess::preprocess(&img, size))
            })?);
        }
        let px = Tensor::from_vec(all, (chunk.len(), 3, size, size), Device::Cpu)?
            .to_device(r.device)?;
        image_embeds.push(clip.image_embeds(&px)?);
    }
    if !image_embeds.is_empty() {
        let refs: Vec<&Tensor> = image_embeds.iter().collect();
        outputs.push(("image_embeds", Tensor::cat(&refs, 0)?));
    }
    if let Some(tf) = &r.texts_file {
        let lines = crate::fs::read_lines(tf)?;
        let tk = ClipTokenizer::openai()?;
        let ctx = clip.config.text_config.max_position_embeddings;
        let mut parts = vec![];
        for chunk in lines.chunks(batch.max(64)) {
            let texts: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
            parts.push(clip.text_embeds(&tk.tokenize_batch_longest(&texts, ctx, r.device)?)?);
        }
        if !parts.is_empty() {
            let refs: Vec<&Tensor> = parts.iter().collect();
            outputs.push(("text_embeds", Tensor::cat(&refs, 0)?));
        }
    }
    let refs: Vec<(&str, &Tensor)> = outputs.iter().map(|(n, t)| (*n, t)).collect();
    crate::io::save(&r.out, &refs, None)?;
    Ok(outputs
        .iter()
        .map(|(n, t)| (n.to_string(), t.dims().to_vec()))
        .collect())
}

/// Image embeddings of the `pixel_values` tensor of a safetensors file, `batch` at a time.
fn pixel_file_embeds(
    clip: &ClipModel,
    pv: &Path,
    batch: usize,
    device: Device,
) -> Result<Vec<Tensor>> {
    let mut m: HashMap<String, Tensor> = crate::io::load(pv, Device::Cpu)?.into_iter().collect();
    let px = m
        .remove("pixel_values")
        .ok_or_else(|| Error::invalid(pv.display().to_string(), "no tensor `pixel_values`"))?;
    if px.rank() != 4 {
        return Err(Error::invalid(
            pv.display().to_string(),
            format!(
                "pixel_values has shape {:?}, expected [N, 3, H, W]",
                px.dims()
            ),
        ));
    }
    let px = px.to_dtype(DType::F32)?;
    let n = px.dims()[0];
    let mut out = vec![];
    for start in (0..n).step_by(batch) {
        let chunk = px
            .narrow(0, start, batch.min(n - start))?
            .to_device(device)?;
        out.push(clip.image_embeds(&chunk)?);
    }
    Ok(out)
}
