//! Dynamic batching: face crops from concurrent callers scored together, so the model sees
//! full batches. One thread owns the detector; callers hand it their crops and wait. A batch
//! closes when it holds `max_batch` crops or `max_wait` has passed since its first request,
//! whichever comes first; one request's crops are never split across replies.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clip::preprocess::RgbImage;
use crate::faces::{FaceConfig, FaceDetector};
use crate::sd2::detector::{
    judge_video, Detector, ImageVerdict, Prediction, VideoLimits, VideoVerdict,
};
use crate::{Error, Result};

/// How requests are grouped.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchConfig {
    /// Most crops in one model call.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch.
    pub max_wait: Duration,
    /// Requests that may wait for the model at once; more are refused at once (a "busy"
    /// error) rather than queued without bound.
    pub queue: usize,
}

impl Default for BatchConfig {
    fn default() -> BatchConfig {
        BatchConfig {
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            queue: 256,
        }
    }
}

/// Counts since the batcher started, for `/metrics`.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Model calls made.
    pub batches: AtomicU64,
    /// Crops scored.
    pub crops: AtomicU64,
    /// Requests answered (with crops or without).
    pub requests: AtomicU64,
    /// Model calls by size: ≤ 1, ≤ 2, ≤ 4, … ≤ 512, more.
    pub batch_sizes: [AtomicU64; 11],
}

impl BatchStats {
    /// The upper bounds of `batch_sizes`' buckets (the last is unbounded).
    pub const BUCKETS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

    fn record(&self, n: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.crops.fetch_add(n as u64, Ordering::Relaxed);
        let b = Self::BUCKETS
            .iter()
            .position(|&u| n as u64 <= u)
            .unwrap_or(Self::BUCKETS.len());
        self.batch_sizes[b].fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a job's predictions go (called once, on the model thread).
type Reply = Box<dyn FnOnce(Result<Vec<Prediction>>) + Send>;

struct Job {
    /// `n` crops' normalized pixels, [n, 3, S, S] flattened.
    pixels: Vec<f32>,
    n: usize,
    reply: Reply,
}

/// A detector behind a batching queue, shared by many threads (`Batcher` is `Sync`).
pub struct Batcher {
    tx: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
    image_size: usize,
    stats: Arc<BatchStats>,
}

impl Batcher {
    /// Starts the model thread: `load` makes the detector there (a GPU context stays on the
    /// thread that uses it). Returns once it is loaded, or with its error.
    pub fn start(
        load: impl FnOnce() -> Result<Detector> + Send + 'static,
        cfg: BatchConfig,
    ) -> Result<Batcher> {
        if cfg.max_batch == 0 || cfg.queue == 0 {
            return Err(Error::Config {
                key: "serve.max_batch".into(),
                msg: "max_batch and queue must be ≥ 1".into(),
            });
        }
        let (tx, rx) = sync_channel::<Job>(cfg.queue);
        let (ready_tx, ready_rx) = sync_channel::<Result<usize>>(1);
        let stats = Arc::new(BatchStats::default());
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("sd2-batcher".into())
            .spawn(move || match load() {
                Ok(det) => {
                    let size = det.model.clip.config.vision_config.image_size;
                    if ready_tx.send(Ok(size)).is_ok() {
                        run(&det, &rx, &cfg, &thread_stats);
                    }
                }
                Err(e) => {
                    ready_tx.send(Err(e)).ok();
                }
            })
            .map_err(|e| Error::Msg(format!("cannot start the batcher thread: {e}")))?;
        let image_size = ready_rx
            .recv()
            .map_err(|_| Error::Msg("the batcher thread died while loading the model".into()))??;
        Ok(Batcher {
            tx: Some(tx),
            handle: Some(handle),
            image_size,
            stats,
        })
    }

    /// The side of the model's input crops, in pixels.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Whether the model thread still runs (it stops only if it panicked, or at shutdown).
    pub fn is_alive(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Its counters.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Scores `n` preprocessed crops ([n, 3, S, S] flattened), batched with whatever other
    /// callers send meanwhile. Fails at once (`Error::Busy`) when the queue is full.
    pub fn score(&self, pixels: Vec<f32>, n: usize) -> Result<Vec<Prediction>> {
        let (reply, answer) = sync_channel(1);
        self.submit(
            pixels,
            n,
            Box::new(move |r| {
                reply.send(r).ok();
            }),
        )?;
        answer
            .recv()
            .map_err(|_| Error::Msg("batcher: the model thread has stopped".into()))?
    }

    /// As `score`, without waiting: `reply` gets the predictions (or the model's error) on the
    /// model thread once the batch is scored — an async caller hands it a oneshot sender.
    /// Refused at once, `reply` unused, when the queue is full (`Error::Busy`) or the batcher
    /// has stopped.
    pub fn submit(
        &self,
        pixels: Vec<f32>,
        n: usize,
        reply: Box<dyn FnOnce(Result<Vec<Prediction>>) + Send>,
    ) -> Result<()> {
        let per = 3 * self.image_size * self.image_size;
        if pixels.len() != n * per {
            return Err(Error::invalid(
                "batcher",
                format!("{} values for {n} crops of {per}", pixels.len()),
            ));
        }
        if n == 0 {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            reply(Ok(vec![]));
            return Ok(());
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::Msg("batcher: shut down".into()))?;
        tx.try_send(Job { pixels, n, reply }).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => {
                Error::Busy("the batch queue is full, try again".into())
            }
            std::sync::mpsc::TrySendError::Disconnected(_) => {
                Error::Msg("batcher: the model thread has stopped".into())
            }
        })
    }

    /// An image judged by its faces (`Detector::detect_faces`), the crops scored through the
    /// batch queue. Detection and cropping run on the calling thread.
    pub fn detect_faces(&self, faces: &mut FaceDetector, img: &RgbImage) -> Result<ImageVerdict> {
        let (boxes, px) = faces.detect_and_crop(img, self.image_size)?;
        let preds = self.score(px, boxes.len())?;
        Ok(ImageVerdict::from_faces(boxes, preds))
    }

    /// A video judged by its faces (`sd2::detector::judge_video`, faces found with `faces`),
    /// its crops scored through the batch queue a chunk at a time as the video is read.
    pub fn detect_video(
        &self,
        faces: &FaceConfig,
        path: &std::path::Path,
        frames: usize,
        limits: VideoLimits,
    ) -> Result<VideoVerdict> {
        judge_video(faces, path, frames, self.image_size, limits, |px, n| {
            self.score(px, n)
        })
    }

    /// A whole image scored as one crop (for inputs that are already face crops).
    pub fn detect_whole(&self, img: &RgbImage) -> Result<Prediction> {
        let px = crate::clip::preprocess::preprocess(img, self.image_size);
        self.score(px, 1)?
            .pop()
            .ok_or_else(|| Error::Msg("batcher: no prediction for the image".into()))
    }
}

impl Drop for Batcher {
    /// Stops taking requests, lets the model thread finish the ones queued, and joins it.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            h.join().ok();
        }
    }
}

/// The model thread: batches until every sender is gone.
fn run(det: &Detector, rx: &Receiver<Job>, cfg: &BatchConfig, stats: &BatchStats) {
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + cfg.max_wait;
        let mut n = first.n;
        let mut jobs = vec![first];
        while n < cfg.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => {
                    n += j.n;
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let result = score_all(det, &jobs, n, cfg.max_batch, stats);
        match result {
            Ok(preds) => {
                let mut preds = preds.into_iter();
                for j in jobs {
                    let mine: Vec<Prediction> = preds.by_ref().take(j.n).collect();
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    (j.reply)(Ok(mine));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for j in jobs {
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    (j.reply)(Err(Error::Msg(msg.clone())));
                }
            }
        }
    }
}

/// Every job's crops in order, in model calls of at most `max_batch`.
fn score_all(
    det: &Detector,
    jobs: &[Job],
    n: usize,
    max_batch: usize,
    stats: &BatchStats,
) -> Result<Vec<Prediction>> {
    let size = det.model.clip.config.vision_config.image_size;
    let per = 3 * size * size;
    // One job (a video's chunk, or a lone request) is scored from its own pixels; several
    // are gathered into one buffer first.
    let gathered;
    let all: &[f32] = match jobs {
        [one] => &one.pixels,
        _ => {
            let mut v = Vec::with_capacity(n * per);
            for j in jobs {
                v.extend_from_slice(&j.pixels);
            }
            gathered = v;
            &gathered
        }
    };
    let mut out = Vec::with_capacity(n);
    for part in all.chunks(max_batch * per) {
        out.extend(det.detect_crops(part, max_batch)?);
        stats.record(part.len() / per);
    }
    Ok(out)
}
