//! `sd2 serve`: the detector over HTTP (axum on hyper, on tokio).
//!
//! - `POST /v1/detect`: the image or video bytes as the body (or a `multipart/form-data` file
//!   field); the answer is the JSON line `sd2 predict` prints for that input. Query:
//!   `frames=N` (a video's sampled frames), `face_crop=false` (score the image whole).
//! - `GET /healthz`, `GET /metrics` (Prometheus text), `GET /` (a page to drop a file on).
//!
//! Work is bounded at every stage, so a flood or a hostile upload costs a refusal, not the
//! process: connections (`max_connections`), requests admitted (`max_pending`, then 503),
//! body bytes held at once (`body_budget`), the body's size (`max_body`, 413) and pixels
//! (`max_pixels`, 413, from the header before decoding), decoders running at once (`workers`),
//! each request's time (`timeout`, 504) and a request header's (`header_timeout`). Crops from
//! concurrent requests are scored together by the `Batcher`.
use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::metrics::{resident_bytes, Metrics};
use super::Batcher;
use crate::clip::preprocess::{decode_image_bytes, image_bytes_size, preprocess};
use crate::faces::{FaceBox, FaceConfig, FaceDetector};
use crate::sd2::detector::{json_line, prediction_json, ImageVerdict, Prediction, VideoLimits};
use crate::{Error, Result};

/// The page served at `/`.
const INDEX_HTML: &str = include_str!("index.html");

/// How the server listens and what it accepts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (port 0: any free port; `Server::local_addr` says which).
    pub addr: SocketAddr,
    /// Largest request body, in bytes (a 10 s 1080p H.264 clip is about 5–20 MB).
    pub max_body: usize,
    /// Most pixels of an uploaded image, read from its header before it is decoded.
    pub max_pixels: u64,
    /// Body bytes held by all requests at once; a request waits until its body fits.
    pub body_budget: usize,
    /// Connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// `/v1/detect` requests admitted at once (reading, waiting or working); more get 503.
    pub max_pending: usize,
    /// Uploads decoded and searched for faces at once.
    pub workers: usize,
    /// Longest a `/v1/detect` request may take, body upload included (then 504).
    pub timeout: Duration,
    /// Longest a client may take to send a request's header (then the connection is closed).
    pub header_timeout: Duration,
    /// Frames sampled from a video when the request does not say; at most `max_frames`.
    pub frames: usize,
    /// Most frames a request may ask for.
    pub max_frames: usize,
    /// How faces are found and cropped.
    pub faces: FaceConfig,
    /// Longest graceful shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Stop on SIGINT or SIGTERM (the binary); off, only `Server::stop` stops it.
    pub stop_on_signals: bool,
    /// Where uploaded videos are written while they are decoded (removed after).
    pub tmp_dir: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body: 64 << 20,
            max_pixels: 40_000_000,
            body_budget: 1 << 30,
            max_connections: 1024,
            max_pending: 256,
            workers: cores,
            timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            frames: 32,
            max_frames: 256,
            faces: FaceConfig::default(),
            shutdown_grace: Duration::from_secs(30),
            stop_on_signals: false,
            tmp_dir: std::env::temp_dir(),
        }
    }
}

impl ServerConfig {
    /// Each value in its range; the first that is not is named by its key (`serve.workers`).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: &str| {
            Err(Error::Config {
                key: format!("serve.{key}"),
                msg: msg.into(),
            })
        };
        if self.max_body == 0 {
            return bad("max_body", "must be ≥ 1 byte");
        }
        if self.body_budget < self.max_body {
            return bad("body_budget", "must be at least max_body");
        }
        if self.max_pixels == 0 {
            return bad("max_pixels", "must be ≥ 1");
        }
        if self.max_connections == 0 || self.max_pending == 0 || self.workers == 0 {
            return bad(
                "workers",
                "workers, max_pending and max_connections must be ≥ 1",
            );
        }
        if self.frames == 0 || self.frames > self.max_frames {
            return bad("frames", "must be in 1..=max_frames");
        }
        if self.timeout.is_zero() || self.header_timeout.is_zero() {
            return bad("timeout", "timeouts must be > 0");
        }
        self.faces.validate()
    }
}

/// What every request handler shares.
struct Shared {
    cfg: ServerConfig,
    batcher: Batcher,
    metrics: Metrics,
    workers: Arc<Semaphore>,
    /// `body_budget` in KiB.
    bodies: Arc<Semaphore>,
    next_tmp: AtomicU64,
    started: Instant,
}

/// A running server: `start` returns once it listens; `stop` (or dropping it) shuts it down
/// gracefully — no new connections, requests in flight answered (up to `shutdown_grace`),
/// then the batcher's queue drained.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// Binds `cfg.addr` and serves `batcher` on a thread of its own.
    pub fn start(cfg: ServerConfig, batcher: Batcher) -> Result<Server> {
        cfg.validate()?;
        let listener = std::net::TcpListener::bind(cfg.addr)
            .map_err(|e| Error::Msg(format!("cannot listen on {}: {e}", cfg.addr)))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let kib = (cfg.body_budget >> 10).clamp(1, Semaphore::MAX_PERMITS);
        let shared = Arc::new(Shared {
            workers: Arc::new(Semaphore::new(cfg.workers)),
            bodies: Arc::new(Semaphore::new(kib)),
            cfg,
            batcher,
            metrics: Metrics::default(),
            next_tmp: AtomicU64::new(0),
            started: Instant::now(),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(shared.cfg.workers.clamp(1, 4))
            .max_blocking_threads(shared.cfg.workers + 4)
            .thread_name("sd2-serve")
            .enable_all()
            .build()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sd2-serve-main".into())
            .spawn(move || -> Result<()> {
                let r = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let on_signals = s.cfg.stop_on_signals;
                    let stop = async move {
                        tokio::select! {
                            _ = stop_rx => {}
                            _ = signal(on_signals) => {}
                        }
                    };
                    serve_loop(listener, s, stop).await;
                    Ok::<(), Error>(())
                });
                // The grace period was spent waiting for the connections; work abandoned at a
                // timeout may still run, and is not waited for long.
                rt.shutdown_timeout(Duration::from_secs(1));
                r
            })
            .map_err(|e| Error::Msg(format!("cannot start the server thread: {e}")))?;
        Ok(Server {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters (what `/metrics` shows).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The batcher's counters.
    pub fn batch_stats(&self) -> &super::BatchStats {
        self.shared.batcher.stats()
    }

    /// `/metrics`' text now.
    pub fn metrics_text(&self) -> String {
        self.shared
            .metrics
            .render(self.shared.batcher.stats(), resident_bytes())
    }

    /// Shuts down gracefully and waits for it.
    pub fn stop(mut self) -> Result<()> {
        self.stop.take().map(|s| s.send(()));
        self.join()
    }

    /// Waits until the server stops (on a signal, with `stop_on_signals`).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::Msg("the server thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.take().map(|s| s.send(()));
        self.join().ok();
    }
}

/// Resolves on SIGINT or SIGTERM when `on`; never otherwise.
async fn signal(on: bool) {
    if !on {
        return std::future::pending().await;
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    tokio::signal::ctrl_c().await.ok();
}

/// Accepts connections until `stop`, then lets the open ones finish (up to the grace period).
async fn serve_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: impl std::future::Future<Output = ()>,
) {
    let app = router(shared.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let conns = Arc::new(Semaphore::new(shared.cfg.max_connections));
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    log::warn!("serve: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        stream.set_nodelay(true).ok();
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(shared.cfg.header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("serve: connection: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(shared.cfg.shutdown_grace) => {
            log::warn!("serve: requests still in flight after the grace period were dropped");
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    // The body is read (bounded) by `detect_inner` itself; the limit axum's extractors apply
    // (2 MB unless told) must not be the smaller one for a multipart upload.
    let limit = axum::extract::DefaultBodyLimit::max(shared.cfg.max_body);
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/detect", post(detect))
        .layer(limit)
        .with_state(shared)
}

async fn index(State(s): State<Arc<Shared>>) -> Response {
    s.metrics.record("/", 200, None);
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response()
}

async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    if !s.batcher.is_alive() {
        s.metrics.record("/healthz", 503, None);
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "error", "error": "the model thread has stopped"}),
        );
    }
    s.metrics.record("/healthz", 200, None);
    json(
        StatusCode::OK,
        &serde_json::json!({
            "status": "ok",
            "max_body": s.cfg.max_body,
            "max_pixels": s.cfg.max_pixels,
            "image_size": s.batcher.image_size(),
            "uptime_s": s.started.elapsed().as_secs_f64(),
            "in_flight": s.metrics.in_flight.load(Ordering::Relaxed),
        }),
    )
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    s.metrics.record("/metrics", 200, None);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(s.batcher.stats(), resident_bytes()),
    )
        .into_response()
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{v}\n"),
    )
        .into_response()
}

/// A request's failure: its status, a kind for `/metrics`, and the message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    msg: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            msg: msg.into(),
        }
    }

    /// The status an error of the library deserves: the input's fault, capacity, or ours.
    fn from_error(e: Error) -> ApiError {
        let msg = e.to_string();
        match e {
            Error::Media(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_media", msg),
            Error::Busy(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", msg),
            Error::Config { .. } => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }

    fn into_response(self, name: &str) -> Response {
        let mut r = json(
            self.status,
            &serde_json::json!({"path": name, "status": "error", "kind": self.kind, "error": self.msg}),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// `/v1/detect`'s query.
struct DetectQuery {
    frames: usize,
    face_crop: bool,
}

fn parse_query(q: Option<&str>, cfg: &ServerConfig) -> std::result::Result<DetectQuery, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    let mut out = DetectQuery {
        frames: cfg.frames,
        face_crop: true,
    };
    for kv in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "frames" => {
                out.frames = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=cfg.max_frames).contains(n))
                    .ok_or_else(|| {
                        bad(format!(
                            "frames={v}: give a number of frames in 1..={}",
                            cfg.max_frames
                        ))
                    })?
            }
            "face_crop" => {
                out.face_crop = match v {
                    "1" | "true" | "yes" => true,
                    "0" | "false" | "no" => false,
                    _ => return Err(bad(format!("face_crop={v}: give true or false"))),
                }
            }
            _ => {
                return Err(bad(format!(
                    "unknown query parameter `{k}` (known: frames, face_crop)"
                )))
            }
        }
    }
    Ok(out)
}

/// What an upload is, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Image,
    /// A video, with the file extension to store it under.
    Video(&'static str),
}

fn sniff(b: &[u8]) -> Option<Kind> {
    use image::ImageFormat as F;
    match image::guess_format(b) {
        Ok(F::Png | F::Jpeg | F::WebP) => return Some(Kind::Image),
        Ok(_) => return None,
        Err(_) => {}
    }
    if b.get(4..8) == Some(b"ftyp") {
        // HEIF/AVIF photos are ISO boxes too; sd2 does not decode them.
        let brand = b.get(8..12).unwrap_or(b"");
        if [
            &b"heic"[..],
            b"heix",
            b"hevc",
            b"mif1",
            b"msf1",
            b"avif",
            b"avis",
        ]
        .contains(&brand)
        {
            return None;
        }
        return Some(Kind::Video("mp4"));
    }
    if b.get(4..8) == Some(b"moov") {
        return Some(Kind::Video("mp4"));
    }
    if b.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        return Some(Kind::Video("mkv"));
    }
    if b.starts_with(b"RIFF") && b.get(8..12) == Some(b"AVI ") {
        return Some(Kind::Video("avi"));
    }
    None
}

/// Counts a request in flight while it lives.
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn detect(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let t0 = Instant::now();
    let admitted = s.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let guard = InFlight(&s.metrics);
    let mut name = "upload".to_string();
    let r = if admitted >= s.cfg.max_pending as u64 {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{} requests are in flight already, try again", admitted),
        ))
    } else {
        let deadline = t0 + s.cfg.timeout;
        match tokio::time::timeout(s.cfg.timeout, detect_inner(&s, req, &mut name, deadline)).await
        {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("the request took longer than {:?}", s.cfg.timeout),
            )),
        }
    };
    drop(guard);
    s.metrics.observe(t0.elapsed());
    match r {
        Ok(v) => {
            s.metrics.record("/v1/detect", 200, None);
            json(StatusCode::OK, &v)
        }
        Err(e) => {
            s.metrics
                .record("/v1/detect", e.status.as_u16(), Some(e.kind));
            e.into_response(&name)
        }
    }
}

async fn detect_inner(
    s: &Arc<Shared>,
    req: Request,
    name: &mut String,
    deadline: Instant,
) -> std::result::Result<serde_json::Value, ApiError> {
    let q = parse_query(req.uri().query(), &s.cfg)?;
    let too_large = |n: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{n} is over the {} byte limit", s.cfg.max_body),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        if n > s.cfg.max_body as u64 {
            return Err(too_large(format!("a {n} byte body")));
        }
    }
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    // The body's share of the byte budget, held until the answer (a video's temporary file
    // counts too); without a length, the most it may be.
    let kib = (declared.unwrap_or(s.cfg.max_body as u64) as usize)
        .div_ceil(1024)
        .max(1);
    let kib = kib.min(s.cfg.body_budget >> 10).max(1) as u32;
    let share = s
        .bodies
        .clone()
        .acquire_many_owned(kib)
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "shutting down"))?;
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::Limited::new(body, s.cfg.max_body)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(too_large("the body".into()))
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("cannot read the request body: {e}"),
            ))
        }
    };
    let bytes = if multipart {
        let req = Request::from_parts(parts, Body::from(bytes));
        let (file, data) = multipart_file(req).await?;
        if let Some(f) = file {
            *name = f;
        }
        data
    } else {
        bytes
    };
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body is empty: send the image or video bytes (or a multipart file field)",
        ));
    }
    let kind = sniff(&bytes).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media",
            "not an image (PNG, JPEG, WebP) or a video (MP4/MOV, MKV/WebM, AVI); HEIC, AVIF \
             and GIF are not read",
        )
    })?;
    if kind == Kind::Image {
        let (w, h) = image_bytes_size(&bytes, name).map_err(ApiError::from_error)?;
        if w as u64 * h as u64 > s.cfg.max_pixels {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "{name}: {w}x{h} is over this server's {} pixel limit",
                    s.cfg.max_pixels
                ),
            ));
        }
    }
    if !q.face_crop && kind != Kind::Image {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a video is judged by its faces: drop face_crop=false",
        ));
    }
    let worker = s
        .workers
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "shutting down"))?;
    let (s2, n2) = (s.clone(), name.clone());
    // The worker and the body's share are released when the work ends, not when the request
    // does: a request abandoned at its timeout still counts until its decode stops, so the
    // limits hold.
    let prepared = tokio::task::spawn_blocking(move || {
        let r = prepare(&s2, &bytes, &n2, kind, &q, deadline);
        drop((worker, share));
        r
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request's worker failed: {e}"),
        )
    })??;
    // The crops wait for their batch without holding a worker, so a batch can gather crops
    // from more requests than there are workers.
    match prepared {
        Prepared::Done(v) => Ok(v),
        Prepared::Whole(px) => {
            let p = score(s, px, 1).await?.pop().ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "no prediction",
                )
            })?;
            Ok(prediction_json(name, &p))
        }
        Prepared::Faces(boxes, px) => {
            let n = boxes.len();
            let preds = score(s, px, n).await?;
            s.metrics.faces.fetch_add(n as u64, Ordering::Relaxed);
            Ok(json_line(name, &ImageVerdict::from_faces(boxes, preds)))
        }
    }
}

/// `n` crops scored through the batch queue, awaited without blocking a thread.
async fn score(
    s: &Shared,
    px: Vec<f32>,
    n: usize,
) -> std::result::Result<Vec<Prediction>, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.batcher
        .submit(
            px,
            n,
            Box::new(move |r| {
                tx.send(r).ok();
            }),
        )
        .map_err(ApiError::from_error)?;
    rx.await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the model thread stopped",
            )
        })?
        .map_err(ApiError::from_error)
}

/// The first file field of a multipart body: its file name and bytes.
async fn multipart_file(req: Request) -> std::result::Result<(Option<String>, Bytes), ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    let mut mp = Multipart::from_request(req, &())
        .await
        .map_err(|e| bad(format!("bad multipart body: {e}")))?;
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| bad(format!("bad multipart body: {e}")))?
    {
        let is_file = field.file_name().is_some() || field.name() == Some("file");
        if !is_file {
            continue;
        }
        let file = field.file_name().map(|f| f.to_string());
        let data = field
            .bytes()
            .await
            .map_err(|e| bad(format!("bad multipart body: {e}")))?;
        return Ok((file, data));
    }
    Err(bad("the multipart body has no file field".into()))
}

thread_local! {
    /// Each worker thread's face detector (SeetaFace's is not `Send`), made once.
    static FACES: RefCell<Option<FaceDetector>> = const { RefCell::new(None) };
}

fn with_faces<T>(cfg: &FaceConfig, f: impl FnOnce(&mut FaceDetector) -> Result<T>) -> Result<T> {
    FACES.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|d| d.config() != cfg) {
            *cell = Some(FaceDetector::new(cfg.clone())?);
        }
        match cell.as_mut() {
            Some(d) => f(d),
            None => Err(Error::Msg("no face detector".into())),
        }
    })
}

/// Removes a file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

/// What a worker made of an upload: an image's crops to score, or a video's whole answer.
enum Prepared {
    /// Faces found and their crops' pixels.
    Faces(Vec<FaceBox>, Vec<f32>),
    /// The image as one crop (`face_crop=false`).
    Whole(Vec<f32>),
    /// A video, judged (its frames' crops went through the batcher as one request).
    Done(serde_json::Value),
}

/// The upload decoded and searched for faces (on a blocking thread).
fn prepare(
    s: &Shared,
    bytes: &[u8],
    name: &str,
    kind: Kind,
    q: &DetectQuery,
    deadline: Instant,
) -> std::result::Result<Prepared, ApiError> {
    let size = s.batcher.image_size();
    match kind {
        Kind::Image => {
            let img = decode_image_bytes(bytes, name).map_err(ApiError::from_error)?;
            s.metrics.images.fetch_add(1, Ordering::Relaxed);
            if !q.face_crop {
                return Ok(Prepared::Whole(preprocess(&img, size)));
            }
            let (boxes, px) = with_faces(&s.cfg.faces, |faces| faces.detect_and_crop(&img, size))
                .map_err(ApiError::from_error)?;
            Ok(Prepared::Faces(boxes, px))
        }
        Kind::Video(ext) => {
            let tmp = temp_file(s, ext, bytes).map_err(ApiError::from_error)?;
            let limits = VideoLimits {
                deadline: Some(deadline),
                max_pixels: Some(s.cfg.max_pixels),
            };
            let v = s
                .batcher
                .detect_video(&s.cfg.faces, &tmp.0, q.frames, limits)
                .map_err(|e| {
                    // Messages name the upload, not where it was stored.
                    let mut a = ApiError::from_error(e);
                    a.msg = a.msg.replace(&tmp.0.display().to_string(), name);
                    a
                })?;
            s.metrics.videos.fetch_add(1, Ordering::Relaxed);
            let faces: usize = v.frames.iter().map(|f| f.verdict.faces.len()).sum();
            s.metrics.faces.fetch_add(faces as u64, Ordering::Relaxed);
            Ok(Prepared::Done(json_line(name, &v)))
        }
    }
}

/// `bytes` in a new file of the server's temporary folder, named so that no other server (in
/// a container every server may be pid 1) and no earlier run's leftover takes its name.
fn temp_file(s: &Shared, ext: &str, bytes: &[u8]) -> Result<TempFile> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut last = None;
    for _ in 0..8 {
        let k = s.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = s.cfg.tmp_dir.join(format!(
            "sd2-serve-{}-{stamp:x}-{k}.{ext}",
            std::process::id()
        ));
        match write_new(&path, bytes) {
            Ok(()) => return Ok(TempFile(path)),
            Err(Error::Write { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                last = Some(path)
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Msg(format!(
        "cannot find a free temporary name (last tried {})",
        last.map(|p| p.display().to_string()).unwrap_or_default()
    )))
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let w = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        f.write_all(bytes)
    };
    w().map_err(|source| {
        if source.kind() != std::io::ErrorKind::AlreadyExists {
            std::fs::remove_file(path).ok();
        }
        Error::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_told_apart_by_their_first_bytes() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(sniff(png), Some(Kind::Image));
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0\0\x10JFIF"), Some(Kind::Image));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Kind::Image));
        assert_eq!(sniff(b"\0\0\0\x20ftypisom"), Some(Kind::Video("mp4")));
        assert_eq!(sniff(b"\0\0\0\x18ftypheic\0\0\0\0"), None);
        assert_eq!(sniff(b"\x1A\x45\xDF\xA3\x9f"), Some(Kind::Video("mkv")));
        assert_eq!(sniff(b"RIFF\0\0\0\0AVI LIST"), Some(Kind::Video("avi")));
        assert_eq!(sniff(b"GIF89a\x01\0\x01\0"), None);
        assert_eq!(sniff(b"hello"), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn the_query_is_checked() {
        let cfg = ServerConfig::default();
        let q = parse_query(Some("frames=8&face_crop=false"), &cfg).unwrap();
        assert_eq!((q.frames, q.face_crop), (8, false));
        let q = parse_query(None, &cfg).unwrap();
        assert_eq!((q.frames, q.face_crop), (32, true));
        for bad in [
            "frames=0",
            "frames=257",
            "frames=x",
            "face_crop=maybe",
            "frame=3",
        ] {
            let e = parse_query(Some(bad), &cfg).err().unwrap();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(
                e.msg.contains(bad.split('=').next().unwrap()),
                "{bad}: {}",
                e.msg
            );
        }
    }
}
