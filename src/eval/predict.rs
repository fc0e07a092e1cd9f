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
    /// The image's path as the manifest wrote it (`Item::rel_path`; for a pack,
    /// `SHARD:KEY`).
    pub path: String,
    /// True class id (0 real, 1 FS, 2 FR, 3 EFS, 4 FE); serialized as its name (`real`, …).
    #[serde(serialize_with = "label_name")]
    pub label: usize,
    /// The item's source, for per-source summaries.
    pub source: String,
    /// The item's video id, for the per-video AUC (`None` for stills).
    pub video: Option<String>,
    /// `1 − p(REAL)`, in [0, 1]: higher means more likely fake.
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

/// An image that could not be scored (unreadable, undecodable, truncated, too large), with why.
#[derive(Clone, Debug, Serialize)]
pub struct Unreadable {
    /// The image's path as the manifest wrote it (`Item::rel_path`).
    pub path: String,
    /// Why it could not be scored (the loader's error message).
    pub error: String,
}

/// `items` decoded batch by batch (through `transform`) on the prefetch thread, in order, and
/// on the model's device (the next batch copying while this one computes). With `skip_bad` an
/// image that fails is left out of its batch (`DeviceBatches::take_bad`) instead of ending the
/// stream.
fn batches(
    model: &Sd2Model,
    items: &[&Item],
    batch: usize,
    transform: Transform,
    skip_bad: bool,
) -> DeviceBatches {
    let size = model.clip.config.vision_config.image_size;
    let batches: Vec<Vec<Item>> = items
        .chunks(batch.max(1))
        .map(|c| c.iter().map(|i| (*i).clone()).collect())
        .collect();
    let loader = if skip_bad {
        Prefetcher::skipping_bad(batches, size, transform, 2)
    } else {
        Prefetcher::new(batches, size, transform, 2)
    };
    DeviceBatches::new(
        loader,
        1,
        size,
        model.dtype(),
        model.clip.logit_scale.device(),
    )
}

/// Predictions for `items` (in order) against class embeddings `class_u`, each image first
/// passed through `transform` (`Transform::Perturb` for degraded evaluation). The first image
/// that cannot be read fails the call, naming its manifest line.
pub fn predict_items(
    model: &Sd2Model,
    class_u: &Tensor,
    items: &[&Item],
    batch: usize,
    transform: &Transform,
) -> Result<Vec<Pred>> {
    predict_loaded(
        model,
        class_u,
        batches(model, items, batch, transform.clone(), false),
    )
    .map(|(preds, _)| preds)
}

/// As `predict_items`, but an image that cannot be read is left out and listed with its
/// error, the others scored: (predictions in order, the unreadable images in order).
pub fn predict_items_skipping_bad(
    model: &Sd2Model,
    class_u: &Tensor,
    items: &[&Item],
    batch: usize,
    transform: &Transform,
) -> Result<(Vec<Pred>, Vec<Unreadable>)> {
    predict_loaded(
        model,
        class_u,
        batches(model, items, batch, transform.clone(), true),
    )
}

/// Predictions for split `split` of pack `ix`, read in stored order in batches of `batch`;
/// with `skip_bad` an undecodable sample is left out and listed, else it fails the call.
pub fn predict_shards(
    model: &Sd2Model,
    class_u: &Tensor,
    ix: &crate::data::shards::ShardIndex,
    split: crate::data::Split,
    batch: usize,
    skip_bad: bool,
) -> Result<(Vec<Pred>, Vec<Unreadable>)> {
    use crate::data::shards::{ShardStream, StreamOptions};
    let size = model.clip.config.vision_config.image_size;
    let stream = ShardStream::open(ix, &StreamOptions::sequential(split))?;
    let loader = Prefetcher::shards(stream, batch.max(1), size, Transform::None, 2, skip_bad);
    predict_loaded(
        model,
        class_u,
        DeviceBatches::new(
            loader,
            1,
            size,
            model.dtype(),
            model.clip.logit_scale.device(),
        ),
    )
}

fn predict_loaded(
    model: &Sd2Model,
    class_u: &Tensor,
    mut loaded: DeviceBatches,
) -> Result<(Vec<Pred>, Vec<Unreadable>)> {
    let (mut out, mut bad) = (vec![], vec![]);
    while let Some(next) = loaded.next() {
        let (chunk, px) = next?;
        bad.extend(loaded.take_bad().into_iter().map(|(it, error)| Unreadable {
            path: it.rel_path,
            error,
        }));
        if chunk.is_empty() {
            continue;
        }
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
    bad.extend(loaded.take_bad().into_iter().map(|(it, error)| Unreadable {
        path: it.rel_path,
        error,
    }));
    Ok((out, bad))
}

/// L2-normalized SD2 image features (the vector compared with the class texts) of `items`.
pub fn features_items(model: &Sd2Model, items: &[&Item], batch: usize) -> Result<Vec<Vec<f64>>> {
    let _g = crate::no_grad();
    let mut out = Vec::with_capacity(items.len());
    for loaded in batches(model, items, batch, Transform::None, false) {
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
