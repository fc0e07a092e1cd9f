//! Turning manifest items into model input: parallel decode (rayon), train-time augmentation
//! (deterministic per seed, epoch and manifest line) and CLIP preprocessing, with a bounded
//! prefetch queue so the next batches are decoded while the model trains on this one, and
//! (`DeviceBatches`) copied to the GPU while it computes.
use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use rayon::prelude::*;

use super::augment::{self, AugmentConfig, Perturb};
use super::manifest::Item;
use super::shards::{Sample, ShardStream};
use crate::clip::preprocess::{
    decode_image_bytes_then, decode_image_then, preprocess_into, RgbImage,
};
use crate::upload::Upload;
use crate::{DType, Device, Error, Result, Tensor};

/// What happens to each image between decoding and preprocessing.
#[derive(Clone, Debug, Default)]
pub enum Transform {
    /// Decode and preprocess only (evaluation, prediction).
    #[default]
    None,
    /// Training: augmentations seeded by (seed, epoch, manifest line).
    Augment {
        /// Which augmentations run, and how likely each is.
        cfg: AugmentConfig,
        /// The run's seed (`train.seed`).
        seed: u64,
        /// 0-based epoch index: each epoch draws fresh augmentations for the same image.
        epoch: u64,
    },
    /// Evaluation under a degradation.
    Perturb(Perturb),
}

/// One item's normalized pixels, written into `out` [3·size·size]; an error names its
/// manifest line. The full-size image and its augmented copies are counted against the
/// decode budget until they are preprocessed, so the decode threads together hold at most
/// the budget.
fn load_into(it: &Item, size: usize, t: &Transform, out: &mut [f32]) -> Result<()> {
    let line = |e: Error| Error::Msg(format!("manifest line {}: {e}", it.line));
    decode_image_then(&it.path, |img| transform_into(img, it, size, t, out)).map_err(line)
}

/// `t` applied to `img` (augmentations seeded by the item's manifest line), then
/// preprocessing into `out`.
fn transform_into(
    mut img: RgbImage,
    it: &Item,
    size: usize,
    t: &Transform,
    out: &mut [f32],
) -> Result<()> {
    match t {
        Transform::None => {}
        Transform::Augment { cfg, seed, epoch } => {
            let mut r = augment::rng_for(*seed, *epoch, it.line as u64);
            augment::augment(&mut img, cfg, &mut r)?;
        }
        Transform::Perturb(p) => p.apply(&mut img)?,
    }
    preprocess_into(&img, size, out);
    Ok(())
}

/// A batch of shard samples decoded in parallel into one buffer: (items kept, pixels, items
/// left out with why) — a bad sample fails the batch unless `skip_bad`.
fn load_samples(
    samples: Vec<Sample>,
    size: usize,
    t: &Transform,
    skip_bad: bool,
) -> Result<Loaded> {
    let per = 3 * size * size;
    let mut pixels = vec![0f32; samples.len() * per];
    let results: Vec<Result<()>> = pixels
        .par_chunks_mut(per.max(1))
        .zip(samples.par_iter())
        .map(|(out, s)| {
            decode_image_bytes_then(&s.image, &s.item.rel_path, |img| {
                transform_into(img, &s.item, size, t, out)
            })
        })
        .collect();
    let items = samples.into_iter().map(|s| s.item);
    let (items, bad) = compact(&mut pixels, per, items.zip(results));
    let mut bad = bad.into_iter();
    if !skip_bad {
        if let Some((_, e)) = bad.next() {
            return Err(e);
        }
    }
    let bad = bad.map(|(it, e)| (it, e.to_string())).collect();
    Ok(Loaded { items, pixels, bad })
}

/// Per item, its pixels decoded in parallel straight into the batch buffer (no per-image
/// copy), and whether it loaded.
fn load_batch(items: &[Item], size: usize, t: &Transform) -> (Vec<f32>, Vec<Result<()>>) {
    let per = 3 * size * size;
    let mut pixels = vec![0f32; items.len() * per];
    let results = pixels
        .par_chunks_mut(per.max(1))
        .zip(items.par_iter())
        .map(|(out, it)| load_into(it, size, t, out))
        .collect();
    (pixels, results)
}

/// Normalized pixels [N·3·size·size] (host memory) for `items`. A decode failure names the
/// manifest line.
pub fn load_host(items: &[Item], size: usize, t: &Transform) -> Result<Vec<f32>> {
    let (pixels, results) = load_batch(items, size, t);
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(pixels)
}

/// As `load_host`, but an item that fails (unreadable, undecodable, truncated) is left out of
/// the batch and reported with its error instead of failing it: (the items kept, their pixels,
/// the items left out with why).
pub fn load_host_skipping_bad(
    items: &[Item],
    size: usize,
    t: &Transform,
) -> (Vec<Item>, Vec<f32>, Vec<(Item, String)>) {
    let (mut pixels, results) = load_batch(items, size, t);
    let (kept, bad) = compact(
        &mut pixels,
        3 * size * size,
        items.iter().cloned().zip(results),
    );
    let bad = bad.into_iter().map(|(it, e)| (it, e.to_string())).collect();
    (kept, pixels, bad)
}

/// The entries that loaded, their pixels (`per` values each) moved down over those of the
/// ones that failed, and the failed ones with their errors.
fn compact<T>(
    pixels: &mut Vec<f32>,
    per: usize,
    entries: impl Iterator<Item = (T, Result<()>)>,
) -> (Vec<T>, Vec<(T, Error)>) {
    let (mut kept, mut bad) = (vec![], vec![]);
    for (i, (x, r)) in entries.enumerate() {
        match r {
            Ok(()) => {
                let k = kept.len();
                if k != i {
                    pixels.copy_within(i * per..(i + 1) * per, k * per);
                }
                kept.push(x);
            }
            Err(e) => bad.push((x, e)),
        }
    }
    pixels.truncate(kept.len() * per);
    (kept, bad)
}

/// One decoded batch from the prefetcher.
pub struct Loaded {
    /// The batch's items that loaded, in order; row i of `pixels` is item i.
    pub items: Vec<Item>,
    /// CLIP-normalized pixels of `items`, f32, `[N, 3, size, size]` flattened row-major
    /// (N = `items.len()`).
    pub pixels: Vec<f32>,
    /// Items left out of the batch (a prefetcher made `skipping_bad`), with why.
    pub bad: Vec<(Item, String)>,
}

impl Loaded {
    /// The items and their pixels as a [N, 3, size, size] tensor.
    pub fn into_parts(
        self,
        size: usize,
        dtype: DType,
        device: Device,
    ) -> Result<(Vec<Item>, Tensor)> {
        let (items, up) = self.upload(size, dtype, device)?;
        Ok((items, up.wait()?))
    }

    /// As `into_parts`, the copy to a GPU started on its copy stream and not waited for.
    /// On a GPU the pixels go (as bf16, converted on the way) straight into pinned staging
    /// memory: no host tensor is made.
    pub fn upload(self, size: usize, dtype: DType, device: Device) -> Result<(Vec<Item>, Upload)> {
        let n = self.items.len();
        let t = crate::upload::upload_f32(self.pixels, (n, 3, size, size), dtype, device)?;
        Ok((self.items, t))
    }
}

/// Batches from a `Prefetcher` as device tensors, `ahead` batches already copying: when a
/// batch is handed out, the ones after it have been staged (pinned memory, the GPU's copy
/// stream), so their copies overlap the kernels the caller queues for this one. A training
/// step of k micro-batches uses `ahead = k`: the next step's data moves during this step.
pub struct DeviceBatches {
    loader: Prefetcher,
    /// Batches in order; a failure takes its batch's place and ends the filling.
    staged: VecDeque<Result<(Vec<Item>, Upload)>>,
    /// Items the prefetcher left out (`Prefetcher::skipping_bad`), until `take_bad`.
    bad: Vec<(Item, String)>,
    failed: bool,
    ahead: usize,
    size: usize,
    dtype: DType,
    device: Device,
}

impl DeviceBatches {
    /// Wraps `loader`, whose batches become `[N, 3, size, size]` tensors of `dtype` on `device`.
    /// `ahead` (at least 1) is how many batches stay staged beyond the one handed out; nothing
    /// is staged until the first `next`.
    pub fn new(
        loader: Prefetcher,
        ahead: usize,
        size: usize,
        dtype: DType,
        device: Device,
    ) -> DeviceBatches {
        DeviceBatches {
            loader,
            staged: VecDeque::new(),
            bad: vec![],
            failed: false,
            ahead: ahead.max(1),
            size,
            dtype,
            device,
        }
    }

    /// The items left out of the batches staged so far, with why (each returned once).
    pub fn take_bad(&mut self) -> Vec<(Item, String)> {
        std::mem::take(&mut self.bad)
    }

    /// Stages batches until the one to hand out and `ahead` more are queued (fewer at the end,
    /// none after a failure).
    fn fill(&mut self) {
        while !self.failed && self.staged.len() <= self.ahead {
            let Some(l) = self.loader.next() else { break };
            let (size, dtype, device) = (self.size, self.dtype, self.device);
            let bad = &mut self.bad;
            let r = l.and_then(|mut l| {
                bad.append(&mut l.bad);
                l.upload(size, dtype, device)
            });
            self.failed = r.is_err();
            self.staged.push_back(r);
        }
    }
}

impl Iterator for DeviceBatches {
    type Item = Result<(Vec<Item>, Tensor)>;
    fn next(&mut self) -> Option<Self::Item> {
        self.fill();
        // An error comes out in its batch's place, after every batch before it.
        Some(
            self.staged
                .pop_front()?
                .and_then(|(items, up)| up.wait().map(|t| (items, t))),
        )
    }
}

/// Decodes a fixed sequence of batches on a background thread, at most `depth` batches ahead.
/// Dropping it stops the thread after the batch in progress.
pub struct Prefetcher {
    rx: Option<Receiver<Result<Loaded>>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// A bad image fails its batch (and ends the stream).
    pub fn new(batches: Vec<Vec<Item>>, size: usize, t: Transform, depth: usize) -> Prefetcher {
        Prefetcher::start(batches, size, t, depth, false)
    }

    /// A bad image is left out of its batch and listed in `Loaded::bad`.
    pub fn skipping_bad(
        batches: Vec<Vec<Item>>,
        size: usize,
        t: Transform,
        depth: usize,
    ) -> Prefetcher {
        Prefetcher::start(batches, size, t, depth, true)
    }

    /// Batches of `batch` samples from a shard stream, decoded in parallel at most `depth`
    /// batches ahead (the last batch may be short). A bad sample fails its batch (and ends
    /// the stream) unless `skip_bad`, which leaves it out and lists it in `Loaded::bad`.
    pub fn shards(
        stream: ShardStream,
        batch: usize,
        size: usize,
        t: Transform,
        depth: usize,
        skip_bad: bool,
    ) -> Prefetcher {
        let mut stream = stream;
        let batches = std::iter::from_fn(move || {
            let mut samples = Vec::with_capacity(batch.max(1));
            for s in stream.by_ref() {
                match s {
                    Ok(s) => samples.push(s),
                    Err(e) => return Some(Err(e)),
                }
                if samples.len() == batch.max(1) {
                    break;
                }
            }
            (!samples.is_empty()).then(|| load_samples(samples, size, &t, skip_bad))
        });
        Prefetcher::spawn(depth, batches)
    }

    fn start(
        batches: Vec<Vec<Item>>,
        size: usize,
        t: Transform,
        depth: usize,
        skip_bad: bool,
    ) -> Prefetcher {
        let loaded = batches.into_iter().map(move |items| {
            if skip_bad {
                let (items, pixels, bad) = load_host_skipping_bad(&items, size, &t);
                Ok(Loaded { items, pixels, bad })
            } else {
                load_host(&items, size, &t).map(|pixels| Loaded {
                    items,
                    pixels,
                    bad: vec![],
                })
            }
        });
        Prefetcher::spawn(depth, loaded)
    }

    /// Runs `batches` on a background thread, at most `depth` ahead; the first error ends it.
    fn spawn(
        depth: usize,
        batches: impl Iterator<Item = Result<Loaded>> + Send + 'static,
    ) -> Prefetcher {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::spawn(move || {
            for r in batches {
                let failed = r.is_err();
                // A closed channel means the consumer is gone: stop quietly.
                if tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        Prefetcher {
            rx: Some(rx),
            handle: Some(handle),
        }
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Loaded>;
    fn next(&mut self) -> Option<Result<Loaded>> {
        match self.rx.as_ref()?.recv() {
            Ok(r) => Some(r),
            // The producer is done — or died: a panic is an error, not a short stream.
            Err(_) => match self.handle.take().map(|h| h.join()) {
                Some(Err(p)) => {
                    let why = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Some(Err(Error::Msg(format!(
                        "the image loader thread panicked: {why}"
                    ))))
                }
                _ => None,
            },
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the receiver makes the producer's next send fail, so it exits.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
