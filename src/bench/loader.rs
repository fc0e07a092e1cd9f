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
    /// What was timed (`decode + preprocess`, `shards: read only`, …).
    pub case: String,
    /// Images (or samples) that came out of the loader.
    pub images: usize,
    /// Wall time for all of them, seconds.
    pub seconds: f64,
    /// Throughput, `images / seconds`; the clock starts before the loader does, so its
    /// start-up counts.
    pub images_per_s: f64,
    /// Shard bytes read per second (shard cases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mb_per_s: Option<f64>,
}

impl LoaderTiming {
    fn new(case: &str, images: usize, seconds: f64, mb_per_s: Option<f64>) -> LoaderTiming {
        LoaderTiming {
            case: case.into(),
            images,
            seconds,
            images_per_s: images as f64 / seconds,
            mb_per_s,
        }
    }
}

/// The two loader cases: plain, and with the default train augmentations.
fn cases(prefix: &str) -> [(String, Transform); 2] {
    [
        (format!("{prefix}decode + preprocess"), Transform::None),
        (
            format!("{prefix}+ train augmentations"),
            Transform::Augment {
                cfg: AugmentConfig::default(),
                seed: 0,
                epoch: 0,
            },
        ),
    ]
}

/// Times up to `limit` images of `manifest` at `size` px in batches of `batch`.
pub fn run(manifest: &Path, size: usize, batch: usize, limit: usize) -> Result<Vec<LoaderTiming>> {
    if !(1..=4096).contains(&size) || batch == 0 {
        return Err(Error::invalid(
            "bench loader",
            format!("size {size} must be in 1..=4096 and batch {batch} ≥ 1"),
        ));
    }
    let m = Manifest::load(manifest, Default::default())?;
    let items: Vec<Item> = m.items.iter().take(limit).cloned().collect();
    if items.is_empty() {
        return Err(Error::invalid(manifest.display().to_string(), "no items"));
    }
    let mut out = vec![];
    for (name, t) in cases("") {
        let batches: Vec<Vec<Item>> = items.chunks(batch.max(1)).map(|c| c.to_vec()).collect();
        let t0 = std::time::Instant::now();
        let mut n = 0;
        for b in Prefetcher::new(batches, size, t, 2) {
            n += b?.items.len();
        }
        out.push(LoaderTiming::new(
            &name,
            n,
            t0.elapsed().as_secs_f64(),
            None,
        ));
    }
    Ok(out)
}

/// The train split of pack `dir` as training streams it (shuffle buffer of 1,000), up to
/// `limit` samples: read alone (MB/s), then decoded + preprocessed, then with the train
/// augmentations.
pub fn run_shards(
    dir: &Path,
    size: usize,
    batch: usize,
    limit: usize,
) -> Result<Vec<LoaderTiming>> {
    use crate::data::shards::{ShardIndex, ShardStream, StreamOptions};
    use crate::data::Split;
    let ix = ShardIndex::load(dir)?;
    let o = StreamOptions {
        buffer: 1000,
        ..StreamOptions::sequential(Split::Train)
    };
    let mut out = vec![];
    // Read alone: tar parsing and the shuffle buffer, no decoding.
    let t0 = std::time::Instant::now();
    let (mut n, mut bytes) = (0usize, 0u64);
    for s in ShardStream::open(&ix, &o)?.take(limit) {
        let s = s?;
        n += 1;
        bytes += s.image.len() as u64 + 1024;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mb = bytes as f64 / 1e6 / secs;
    out.push(LoaderTiming::new("shards: read only", n, secs, Some(mb)));
    let shard_mb =
        ix.bytes(Split::Train) as f64 / 1e6 * n as f64 / ix.count(Split::Train).max(1) as f64;
    for (name, t) in cases("shards: ") {
        let stream = ShardStream::open(&ix, &o)?;
        let t0 = std::time::Instant::now();
        let mut got = 0;
        let p = Prefetcher::shards(stream, batch, size, t, 2, false);
        for b in p {
            got += b?.items.len();
            if got >= limit {
                break;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let mb = shard_mb * got as f64 / n.max(1) as f64 / secs;
        out.push(LoaderTiming::new(&name, got, secs, Some(mb)));
    }
    Ok(out)
}

/// One stage's cost per image, on one thread.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageTiming {
    /// The stage's name (`read + decode`, `flip`, `CLIP preprocess`, …).
    pub stage: String,
    /// Milliseconds per image when the stage runs.
    pub ms: f64,
    /// How often the default augmentations run it (1 for decode and preprocessing).
    pub p: f64,
}

type Stage = dyn Fn(&mut crate::clip::preprocess::RgbImage) -> Result<()>;

/// The profile: each stage alone on up to `limit` images on this thread — read + decode,
/// each augmentation forced on (with mid-range parameters), CLIP preprocessing — and how
/// often training runs it, so `ms × p` summed is one augmented image's cost.
pub fn stages(manifest: &Path, size: usize, limit: usize) -> Result<Vec<StageTiming>> {
    use crate::clip::preprocess::{decode_image, preprocess_into};
    use crate::data::augment;
    let m = Manifest::load(manifest, Default::default())?;
    let items: Vec<&Item> = m.items.iter().take(limit.max(1)).collect();
    if items.is_empty() {
        return Err(Error::invalid(manifest.display().to_string(), "no items"));
    }
    let t0 = std::time::Instant::now();
    let imgs: Vec<_> = items
        .iter()
        .map(|it| decode_image(&it.path))
        .collect::<Result<_>>()?;
    let n = imgs.len() as f64;
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3 / n;
    let cfg = AugmentConfig::default();
    let time = |f: &Stage| -> Result<f64> {
        let mut copies: Vec<_> = imgs.to_vec();
        let t = std::time::Instant::now();
        for img in &mut copies {
            f(img)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / n)
    };
    let mut out = vec![StageTiming {
        stage: "read + decode".into(),
        ms: decode_ms,
        p: 1.0,
    }];
    let mut buf = vec![0f32; 3 * size * size];
    let stages: [(&str, f64, &Stage); 5] = [
        ("flip", cfg.flip_p, &|i| {
            augment::hflip(i);
            Ok(())
        }),
        ("rotate + scale + crop", 1.0, &|i| {
            *i = augment::affine(i, 5f64.to_radians(), 1.1, 3.0, -2.0);
            Ok(())
        }),
        ("brightness/contrast", cfg.color_p, &|i| {
            augment::brightness_contrast(i, 0.05, 1.05);
            Ok(())
        }),
        ("gaussian blur σ≈1", cfg.blur_p, &|i| {
            augment::gaussian_blur(i, 1.05);
            Ok(())
        }),
        ("jpeg round trip q70", cfg.jpeg_p, &|i| augment::jpeg(i, 70)),
    ];
    for (name, p, f) in stages {
        out.push(StageTiming {
            stage: name.into(),
            ms: time(f)?,
            p,
        });
    }
    let t = std::time::Instant::now();
    for img in &imgs {
        preprocess_into(img, size, &mut buf);
    }
    out.push(StageTiming {
        stage: "CLIP preprocess".into(),
        ms: t.elapsed().as_secs_f64() * 1e3 / n,
        p: 1.0,
    });
    Ok(out)
}

/// The profile as a table, with the expected total per augmented image.
pub fn stage_table(t: &[StageTiming]) -> String {
    let mut s = format!(
        "{:<24} {:>9} {:>6} {:>10}\n",
        "stage (1 thread)", "ms/image", "p", "ms × p"
    );
    for r in t {
        s += &format!(
            "{:<24} {:>9.3} {:>6.2} {:>10.3}\n",
            r.stage,
            r.ms,
            r.p,
            r.ms * r.p
        );
    }
    let total: f64 = t.iter().map(|r| r.ms * r.p).sum();
    s += &format!(
        "{:<24} {:>9} {:>6} {:>10.3}  (≈ {:.0} augmented images/s per core)\n",
        "expected per image",
        "",
        "",
        total,
        1e3 / total
    );
    s
}

/// The timings as a table.
pub fn table(t: &[LoaderTiming]) -> String {
    t.iter()
        .map(|r| {
            format!(
                "{:<30} {:>8.0} images/s ({} in {:.2}s){}\n",
                r.case,
                r.images_per_s,
                r.images,
                r.seconds,
                r.mb_per_s
                    .map(|m| format!(", {m:.0} MB/s"))
                    .unwrap_or_default()
            )
        })
        .collect()
}
