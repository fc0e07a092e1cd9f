//! The server under load (`sd2 bench serve`): `clients` threads on localhost, each with one
//! kept-alive connection, send `requests` uploads in all to an `sd2 serve` started in this
//! process, first unbatched (one crop per model call) then with dynamic batching, on the same
//! model and payload. Reported per run: images/s, latency percentiles, errors, the batch
//! sizes the model saw, and resident memory after warm-up, half-way and at the end (flat
//! memory: the second half of the requests does not grow it).
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::sd2::detector::Detector;
use crate::serve::client::Client;
use crate::serve::metrics::resident_bytes;
use crate::serve::{BatchConfig, Batcher, Server, ServerConfig};
use crate::{Error, Result};

/// One load test's settings.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Concurrent clients.
    pub clients: usize,
    /// Requests in all (after `warmup`).
    pub requests: usize,
    /// Requests sent first and not counted.
    pub warmup: usize,
    /// The upload.
    pub payload: Vec<u8>,
    /// Its content type.
    pub content_type: String,
    /// The request path and query (`/v1/detect?face_crop=false`).
    pub path: String,
}

/// What one run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadReport {
    /// `unbatched` or `batched`.
    pub mode: String,
    /// The batcher's settings.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch, ms.
    pub max_wait_ms: f64,
    /// Concurrent clients, as configured.
    pub clients: usize,
    /// Requests timed (warm-up not included).
    pub requests: usize,
    /// Answers other than 200, and requests that got no answer.
    pub errors: usize,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Wall time of the timed requests, seconds.
    pub seconds: f64,
    /// Requests answered 200 per second (one upload each).
    pub images_per_s: f64,
    /// Median latency of the 200 answers, ms (request sent to answer read).
    pub p50_ms: f64,
    /// 90th-percentile latency of the 200 answers, ms.
    pub p90_ms: f64,
    /// 99th-percentile latency of the 200 answers, ms.
    pub p99_ms: f64,
    /// Slowest 200 answer, ms.
    pub max_ms: f64,
    /// Crops per model call, on average.
    pub mean_batch: f64,
    /// Resident memory after the warm-up, half-way and at the end, MiB.
    pub rss_after_warmup_mib: f64,
    /// Resident memory after the first half of the requests, MiB.
    pub rss_half_mib: f64,
    /// Resident memory after the last request, MiB.
    pub rss_end_mib: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `n` requests spread over `clients` threads; (latencies in ms of the 200s, errors, first
/// error).
fn drive(addr: SocketAddr, cfg: &LoadConfig, n: usize) -> (Vec<f64>, usize, Option<String>) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(Vec<f64>, usize, Option<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..cfg.clients)
            .map(|_| {
                let next = &next;
                s.spawn(move || {
                    let mut c = Client::new(addr, Duration::from_secs(120));
                    let (mut lat, mut errors, mut first) = (vec![], 0, None);
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                        let t = Instant::now();
                        match c.post(&cfg.path, &cfg.content_type, &cfg.payload) {
                            Ok(a) if a.status == 200 => lat.push(t.elapsed().as_secs_f64() * 1e3),
                            Ok(a) => {
                                errors += 1;
                                first.get_or_insert_with(|| {
                                    format!("{}: {}", a.status, String::from_utf8_lossy(&a.body))
                                });
                            }
                            Err(e) => {
                                errors += 1;
                                first.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                    (lat, errors, first)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (vec![], 1, Some("a client panicked".into())))
            })
            .collect()
    });
    let mut lat = vec![];
    let (mut errors, mut first) = (0, None);
    for (l, e, f) in results {
        lat.extend(l);
        errors += e;
        if first.is_none() {
            first = f;
        }
    }
    (lat, errors, first)
}

/// One run: a server set as `server` (on a free localhost port, admitting every client) with
/// `batch` over the detector `load` makes, loaded with `cfg`.
pub fn run(
    mode: &str,
    load: impl FnOnce() -> Result<Detector> + Send + 'static,
    batch: BatchConfig,
    server: ServerConfig,
    cfg: &LoadConfig,
) -> Result<LoadReport> {
    if cfg.clients == 0 || cfg.requests == 0 {
        return Err(Error::invalid(
            "bench serve",
            "clients and requests must be ≥ 1",
        ));
    }
    let batcher = Batcher::start(load, batch.clone())?;
    let server = Server::start(
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_pending: server.max_pending.max(cfg.clients * 2),
            ..server
        },
        batcher,
    )?;
    let addr = server.local_addr();
    let (_, werr, wfirst) = drive(addr, cfg, cfg.warmup);
    if werr > 0 {
        return Err(Error::Msg(format!(
            "bench serve: the warm-up failed: {}",
            wfirst.unwrap_or_default()
        )));
    }
    let rss0 = resident_bytes().unwrap_or(0);
    let stats0 = batch_counts(&server);
    // In two halves, memory read between them: flat memory is the second half not growing it.
    let t = Instant::now();
    let half = cfg.requests / 2;
    let (mut lat, mut errors, mut first_error) = drive(addr, cfg, half);
    let rss_mid = resident_bytes().unwrap_or(0);
    let (lat2, errors2, first2) = drive(addr, cfg, cfg.requests - half);
    let seconds = t.elapsed().as_secs_f64();
    let rss1 = resident_bytes().unwrap_or(0);
    lat.extend(lat2);
    errors += errors2;
    first_error = first_error.or(first2);
    let (b1, c1) = batch_counts(&server);
    let (batches, crops) = (b1 - stats0.0, c1 - stats0.1);
    server.stop()?;
    lat.sort_by(f64::total_cmp);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(LoadReport {
        mode: mode.into(),
        max_batch: batch.max_batch,
        max_wait_ms: batch.max_wait.as_secs_f64() * 1e3,
        clients: cfg.clients,
        requests: cfg.requests,
        errors,
        first_error,
        seconds,
        images_per_s: lat.len() as f64 / seconds,
        p50_ms: percentile(&lat, 0.5),
        p90_ms: percentile(&lat, 0.9),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        mean_batch: if batches > 0 {
            crops as f64 / batches as f64
        } else {
            0.0
        },
        rss_after_warmup_mib: mib(rss0),
        rss_half_mib: mib(rss_mid),
        rss_end_mib: mib(rss1),
    })
}

/// (model calls, crops scored) so far.
fn batch_counts(server: &Server) -> (u64, u64) {
    let st = server.batch_stats();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    (get(&st.batches), get(&st.crops))
}

/// The table `sd2 bench serve` prints.
pub fn table(reports: &[LoadReport]) -> String {
    let mut o = String::from(
        "mode        max_batch  clients  requests  errors  images/s   p50 ms   p90 ms   p99 ms   max ms  mean batch  RSS MiB (warm → half → end)\n",
    );
    for r in reports {
        o.push_str(&format!(
            "{:<10}  {:>9}  {:>7}  {:>8}  {:>6}  {:>8.1}  {:>7.2}  {:>7.2}  {:>7.2}  {:>7.1}  {:>10.2}  {:.1} → {:.1} → {:.1}\n",
            r.mode,
            r.max_batch,
            r.clients,
            r.requests,
            r.errors,
            r.images_per_s,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            r.mean_batch,
            r.rss_after_warmup_mib,
            r.rss_half_mib,
            r.rss_end_mib
        ));
    }
    o
}
