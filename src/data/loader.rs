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
use crate::clip::preprocess::{decode_image, preprocess};
use crate::upload::Upload;
use crate::{DType, Device, Error, Result, Tensor};

/// What happens to each image between decoding and preprocessing.
#[derive(Clone, Debug, Default)]
pub enum Transform {
    #[default]
    None,
    /// Training: augmentations seeded by (seed, epoch, manifest line).
    Augment {
        cfg: AugmentConfig,
        seed: u64,
        epoch: u64,
    },
    /// Evaluation under a degradation.
    Perturb(Perturb),
}

/// Normalized pixels [N·3·size·size] (host memory) for `items`. A decode failure names the
/// manifest line.
pub fn load_host(items: &[Item], size: usize, t: &Transform) -> Result<Vec<f32>> {
    let parts: Vec<Vec<f32>> = items
        .par_iter()
        .map(|it| {
            let line = |e: Error| Error::Msg(format!("manifest line {}: {e}", it.line));
            let mut img = decode_image(&it.path).map_err(line)?;
            match t {
                Transform::None => {}
                Transform::Augment { cfg, seed, epoch } => {
                    let mut r = augment::rng_for(*seed, *epoch, it.line as u64);
                    augment::augment(&mut img, cfg, &mut r).map_err(line)?;
                }
                Transform::Perturb(p) => p.apply(&mut img).map_err(line)?,
            }
            Ok(preprocess(&img, size))
        })
        .collect::<Result<_>>()?;
    Ok(parts.into_iter().flatten().collect())
}

/// The pixels as a host tensor of `dtype` (bf16 rounded in parallel).
fn host_tensor(flat: Vec<f32>, n: usize, size: usize, dtype: DType) -> Result<Tensor> {
    let shape = (n, 3, size, size);
    match dtype {
        DType::BF16 => {
            let v: Vec<half::bf16> = flat.par_iter().map(|x| half::bf16::from_f32(*x)).collect();
            Tensor::from_vec(v, shape, Device::Cpu)
        }
        _ => Tensor::from_vec(flat, shape, Device::Cpu)?.to_dtype(dtype),
    }
}

/// One decoded batch from the prefetcher.
pub struct Loaded {
    pub items: Vec<Item>,
    pub pixels: Vec<f32>,
}

impl Loaded {
    /// The items and their pixels as a [N, 3, size, size] tensor.
    pub fn into_parts(
        self,
        size: usize,
        dtype: DType,
        device: Device,
    ) -> Result<(Vec<Item>, Tensor)> {
        let n = self.items.len();
        let t = host_tensor(self.pixels, n, size, dtype)?.to_device(device)?;
        Ok((self.items, t))
    }

    /// As `into_parts`, the copy to a GPU started on its copy stream and not waited for.
    pub fn upload(self, size: usize, dtype: DType, device: Device) -> Result<(Vec<Item>, Upload)> {
        let n = self.items.len();
        let t = host_tensor(self.pixels, n, size, dtype)?.to_device_async(device)?;
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
    failed: bool,
    ahead: usize,
    size: usize,
    dtype: DType,
    device: Device,
}

impl DeviceBatches {
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
            failed: false,
            ahead: ahead.max(1),
            size,
            dtype,
            device,
        }
    }

    /// Stages batches until the one to hand out and `ahead` more are queued (fewer at the end,
    /// none after a failure).
    fn fill(&mut self) {
        while !self.failed && self.staged.len() <= self.ahead {
            let Some(l) = self.loader.next() else { break };
            let r = l.and_then(|l| l.upload(self.size, self.dtype, self.device));
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
    pub fn new(batches: Vec<Vec<Item>>, size: usize, t: Transform, depth: usize) -> Prefetcher {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::spawn(move || {
            for items in batches {
                let r = load_host(&items, size, &t).map(|pixels| Loaded { items, pixels });
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
        self.rx.as_ref()?.recv().ok()
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
