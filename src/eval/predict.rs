//! Scoring manifest items with a model, batch by batch, with decoding prefetched.
use crate::data::loader::{DeviceBatches, Prefetcher, Transform};
use crate::data::Item;
use crate::sd2::detector::predict_pixels;
use crate::sd2::type_texts::CLASSES;
use crate::sd2::Sd2Model;
use crate::{Result, Tensor};
use serde::Serialize;

/// One evaluated image.
#[derive(Clone, Debug, Serialize)]
pub struct Pred {
    pub path: String,
    #[serde(serialize_with = "label_name")]
    pub label: usize,
    pub source: String,
    pub video: Option<String>,
    pub fake_score: f64,
    /// REAL, FS, FR, EFS, FE.
    pub probs: [f64; 5],
}

fn label_name<S: serde::Serializer>(l: &usize, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(CLASSES.get(*l).copied().unwrap_or("?"))
}

impl Pred {
    /// The most probable class.
    pub fn argmax(&self) -> usize {
        (0..5).fold(0, |b, j| if self.probs[j] > self.probs[b] { j } else { b })
    }
}

/// `items` decoded batch by batch (through `transform`) on the prefetch thread, in order, and
/// on the model's device (the next batch copying while this one computes).
fn batches(model: &Sd2Model, items: &[&Item], batch: usize, transform: Transform) -> DeviceBatches {
    let size = model.clip.config.vision_config.image_size;
    let batches: Vec<Vec<Item>> = items
        .chunks(batch.max(1))
        .map(|c| c.iter().map(|i| (*i).clone()).collect())
        .collect();
    DeviceBatches::new(
        Prefetcher::new(batches, size, transform, 2),
        1,
        size,
        model.dtype(),
        model.clip.logit_scale.device(),
    )
}

/// Predictions for `items` (in order) against class embeddings `class_u`, each image first
/// passed through `transform` (`Transform::Perturb` for degraded evaluation).
pub fn predict_items(
    model: &Sd2Model,
    class_u: &Tensor,
    items: &[&Item],
    batch: usize,
    transform: &Transform,
) -> Result<Vec<Pred>> {
    let mut out = Vec::with_capacity(items.len());
    for loaded in batches(model, items, batch, transform.clone()) {
        let (chunk, px) = loaded?;
        for (it, p) in chunk.iter().zip(predict_pixels(model, class_u, &px)?) {
            out.push(Pred {
                path: it.rel_path.clone(),
                label: it.label,
                source: it.source.clone(),
                video: it.video.clone(),
                fake_score: p.fake_score,
                probs: p.probs,
            });
        }
    }
    Ok(out)
}

/// L2-normalized SD2 image features (the vector compared with the class texts) of `items`.
pub fn features_items(model: &Sd2Model, items: &[&Item], batch: usize) -> Result<Vec<Vec<f64>>> {
    let _g = crate::no_grad();
    let mut out = Vec::with_capacity(items.len());
    for loaded in batches(model, items, batch, Transform::None) {
        let (chunk, px) = loaded?;
        let f = model
            .image_features(&px, crate::clip::model::Fwd::default())?
            .l2_normalize()?;
        let p = f.dims()[1];
        let host = f.to_dtype(crate::DType::F64)?.to_vec::<f64>()?;
        out.extend(host.chunks(p).take(chunk.len()).map(|r| r.to_vec()));
    }
    Ok(out)
}
