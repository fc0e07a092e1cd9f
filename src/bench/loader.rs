//! The data loader's throughput (`sd2 bench loader`): decode + CLIP preprocessing, then the same
//! with SD2's training augmentations, through the prefetching loader as training uses it.
use std::path::Path;

use crate::data::augment::AugmentConfig;
use crate::data::loader::{Prefetcher, Transform};
use crate::data::{Item, Manifest};
use crate::{Error, Result};

/// One case's measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoaderTiming {
    pub case: String,
    pub images: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// Times up to `limit` images of `manifest` at `size` px in batches of `batch`.
pub fn run(manifest: &Path, size: usize, batch: usize, limit: usize) -> Result<Vec<LoaderTiming>> {
    if !(1..=4096).contains(&size) || batch == 0 {
        return Err(crate::Error::Msg(format!(
            "bench loader: size {size} must be in 1..=4096 and batch {batch} ≥ 1"
        )));
    }
    let m = Manifest::load(manifest, Default::default())?;
    let items: Vec<Item> = m.items.iter().take(limit).cloned().collect();
    if items.is_empty() {
        return Err(Error::Msg(format!("{}: no items", manifest.display())));
    }
    let cases = [
        ("decode + preprocess", Transform::None),
        (
            "+ train augmentations",
            Transform::Augment {
                cfg: AugmentConfig::default(),
                seed: 0,
                epoch: 0,
            },
        ),
    ];
    let mut out = vec![];
    for (name, t) in cases {
        let batches: Vec<Vec<Item>> = items.chunks(batch.max(1)).map(|c| c.to_vec()).collect();
        let t0 = std::time::Instant::now();
        let mut n = 0;
        for b in Prefetcher::new(batches, size, t, 2) {
            n += b?.items.len();
        }
        let s = t0.elapsed().as_secs_f64();
        out.push(LoaderTiming {
            case: name.into(),
            images: n,
            seconds: s,
            images_per_s: n as f64 / s,
        });
    }
    Ok(out)
}

/// The timings as a table.
pub fn table(t: &[LoaderTiming]) -> String {
    t.iter()
        .map(|r| {
            format!(
                "{:<24} {:>8.0} images/s ({} in {:.2}s)\n",
                r.case, r.images_per_s, r.images, r.seconds
            )
        })
        .collect()
}
