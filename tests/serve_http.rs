//! `sd2 serve` over real sockets: photos, videos and multipart uploads answered with the JSON
//! `predict` prints; every kind of bad input a 4xx with a message; slow clients timed out;
//! floods refused; concurrent clients batched; graceful shutdown; the binary on SIGTERM.
#![cfg(feature = "server")]
use std::net::SocketAddr;
use std::time::Duration;

use sd2::faces::{FaceConfig, FaceDetector};
use sd2::sd2::detector::Detector;
use sd2::serve::client::{Answer, Client};
use sd2::serve::{BatchConfig, Batcher, Server, ServerConfig};
use sd2::Device;

mod common;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/faces")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sd2-serve-http-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start(ck: &std::path::Path, batch: BatchConfig, cfg: ServerConfig) -> Server {
    let ck = ck.to_path_buf();
    let b = Batcher::start(move || Detector::load(&ck, None, Device::Cpu), batch).unwrap();
    Server::start(
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..cfg
        },
        b,
    )
    .unwrap()
}

fn client(s: &Server) -> Client {
    Client::new(s.local_addr(), Duration::from_secs(60))
}

#[track_caller]
fn expect(a: &Answer, status: u16, kind: &str, says: &str) {
    let body = String::from_utf8_lossy(&a.body);
    println!("{status} {kind}: {}", body.trim());
    assert_eq!(a.status, status, "{body}");
    let v = a.json().unwrap();
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["kind"], kind, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains(says), "`{e}` should say `{says}`");
}

fn multipart(file: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "sd2testboundary7MA4YWxk";
    let mut b = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"note\"\r\n\r\nhello\r\n\
         --{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"{file}\"\r\n\
         content-type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(bytes);
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), b)
}

/// Photos (raw and multipart), a video, a photo without a face and one scored whole: each
/// answered with what the library says for the same bytes; every bad input its 4xx; the
/// counters in /metrics; no temporary file left.
#[test]
fn detect_answers_photos_videos_and_bad_input() {
    let d = tmp("detect");
    common::tiny_checkpoint(&d);
    let videos = d.join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    let s = start(
        &d,
        BatchConfig::default(),
        ServerConfig {
            max_body: 200_000,
            max_pixels: 2_100_000,
            tmp_dir: videos.clone(),
            ..Default::default()
        },
    );
    let mut c = client(&s);
    let h = c.get("/healthz").unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.json().unwrap()["status"], "ok");
    assert_eq!(h.json().unwrap()["image_size"], 28);
    let page = c.get("/").unwrap();
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(String::from_utf8_lossy(&page.body).contains("/v1/detect"));

    // The library's verdict on the same photo.
    let det = Detector::load(&d, None, Device::Cpu).unwrap();
    let mut faces = FaceDetector::new(FaceConfig::default()).unwrap();
    let img = sd2::clip::preprocess::decode_image(&fixture("grace_hopper.jpg")).unwrap();
    let want = det.detect_faces(&mut faces, &img).unwrap();
    let a = c
        .post("/v1/detect", "image/jpeg", &read("grace_hopper.jpg"))
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let v = a.json().unwrap();
    println!("{v}");
    assert_eq!(v["path"], "upload");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["faces"].as_array().unwrap().len(), want.faces.len());
    let got = v["fake_score"].as_f64().unwrap();
    let diff = (got - want.fake_score.unwrap()).abs();
    println!("grace_hopper.jpg: fake_score {got} over HTTP, |diff| {diff:.1e} vs the library");
    assert!(diff < 1e-6);
    assert_eq!(
        v,
        sd2::sd2::detector::json_line("upload", &want),
        "the same JSON as `predict`"
    );

    let (ct, body) = multipart("group.jpg", &read("group.jpg"));
    let v = c.post("/v1/detect", &ct, &body).unwrap().json().unwrap();
    assert_eq!(v["path"], "group.jpg", "{v}");
    assert_eq!(v["faces"].as_array().unwrap().len(), 2, "{v}");

    let v = c
        .post("/v1/detect", "image/jpeg", &read("chelsea.jpg"))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["status"], "no_face");
    assert_eq!(v["faces"].as_array().unwrap().len(), 0);

    let a = c
        .post(
            "/v1/detect?face_crop=false",
            "image/jpeg",
            &read("chelsea.jpg"),
        )
        .unwrap();
    let v = a.json().unwrap();
    assert_eq!((a.status, &v["status"]), (200, &"ok".into()), "{v}");
    let p: f64 = v["probs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .sum();
    assert!((p - 1.0).abs() < 1e-6);

    let a = c
        .post("/v1/detect?frames=8", "video/mp4", &read("clip.mp4"))
        .unwrap();
    let v = a.json().unwrap();
    assert_eq!(a.status, 200, "{v}");
    assert_eq!(v["frames"].as_array().unwrap().len(), 8);
    assert_eq!(v["frames_with_faces"], 8);
    assert!(v["video_score"].as_f64().is_some());

    // Bad input.
    let jpeg = read("astronaut.jpg");
    expect(
        &c.post("/v1/detect", "image/jpeg", &[]).unwrap(),
        400,
        "bad_request",
        "empty",
    );
    expect(
        &c.post("/v1/detect", "text/plain", b"hello, world").unwrap(),
        415,
        "unsupported_media",
        "not an image",
    );
    expect(
        &c.post("/v1/detect", "image/jpeg", &jpeg[..jpeg.len() / 2])
            .unwrap(),
        422,
        "bad_media",
        "truncated JPEG",
    );
    // The photos and the 1080p clip are under 2.1 Mpx: allowed; a 1500x1500 PNG is not.
    let big = image::RgbImage::new(1500, 1500);
    let mut png = std::io::Cursor::new(vec![]);
    big.write_to(&mut png, image::ImageFormat::Png).unwrap();
    expect(
        &c.post("/v1/detect", "image/png", png.get_ref()).unwrap(),
        413,
        "too_large",
        "1500x1500",
    );
    expect(
        &c.post("/v1/detect", "image/jpeg", &vec![0xFF; 200_001])
            .unwrap(),
        413,
        "too_large",
        "limit",
    );
    expect(
        &c.post("/v1/detect?frames=0", "video/mp4", &read("clip.mp4"))
            .unwrap(),
        400,
        "bad_request",
        "frames=0",
    );
    expect(
        &c.post("/v1/detect?fram=3", "video/mp4", &read("clip.mp4"))
            .unwrap(),
        400,
        "bad_request",
        "fram",
    );
    expect(
        &c.post("/v1/detect?face_crop=false", "video/mp4", &read("clip.mp4"))
            .unwrap(),
        400,
        "bad_request",
        "video",
    );
    let mp4 = read("clip.mp4");
    let (ct, body) = multipart("cut.mp4", &mp4[..mp4.len() / 2]);
    let a = c.post("/v1/detect", &ct, &body).unwrap();
    expect(&a, 422, "bad_media", "cut.mp4");
    assert!(
        !String::from_utf8_lossy(&a.body).contains("sd2-serve-"),
        "the message names the upload, not its temporary file"
    );
    let (ct, _) = multipart("x.jpg", b"");
    expect(
        &c.post("/v1/detect", &ct, b"--nope\r\n").unwrap(),
        400,
        "bad_request",
        "multipart",
    );
    assert_eq!(c.get("/v1/detect").unwrap().status, 405);
    assert_eq!(c.get("/nope").unwrap().status, 404);

    // The server is still well, and counted it all.
    assert_eq!(c.get("/healthz").unwrap().status, 200);
    let m = String::from_utf8_lossy(&c.get("/metrics").unwrap().body).into_owned();
    for line in [
        "sd2_requests_total{route=\"/v1/detect\",code=\"200\"} 5",
        "sd2_requests_total{route=\"/v1/detect\",code=\"413\"} 2",
        "sd2_errors_total{kind=\"bad_media\"} 2",
        "sd2_errors_total{kind=\"too_large\"} 2",
        "sd2_errors_total{kind=\"unsupported_media\"} 1",
        "sd2_images_total 4",
        "sd2_videos_total 1",
        "sd2_in_flight_requests 0",
    ] {
        assert!(m.lines().any(|l| l == line), "missing `{line}` in\n{m}");
    }
    assert!(
        m.contains("sd2_request_duration_seconds_bucket{le=\"+Inf\"} 15"),
        "{m}"
    );
    assert!(m.contains("sd2_batch_size_count "), "{m}");
    s.stop().unwrap();
    let left: Vec<_> = std::fs::read_dir(&videos).unwrap().collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    std::fs::remove_dir_all(&d).ok();
}

/// A client that never finishes its header loses the connection; one that never finishes its
/// body gets 504; past `max_pending` a request gets 503 with Retry-After at once; 32 clients
/// at once are all answered, in shared model calls.
#[test]
fn slow_clients_time_out_floods_are_refused_and_load_is_batched() {
    use std::io::{Read, Write};
    let d = tmp("slow");
    common::tiny_checkpoint(&d);
    let s = start(
        &d,
        BatchConfig {
            max_batch: 32,
            max_wait: Duration::from_millis(20),
            queue: 256,
        },
        ServerConfig {
            timeout: Duration::from_millis(800),
            header_timeout: Duration::from_millis(300),
            max_pending: 40,
            ..Default::default()
        },
    );
    let addr = s.local_addr();
    // Half a header, then silence: closed after the header timeout.
    let mut t = std::net::TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    t.write_all(b"POST /v1/detect HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = vec![];
    let n = t.read_to_end(&mut buf).unwrap_or(0);
    let waited = t0.elapsed();
    println!("half a header: closed after {waited:?} ({n} bytes back)");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // A body promised, not sent: 504 once the request timeout passes.
    let mut t = std::net::TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    t.write_all(b"POST /v1/detect HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n0123")
        .unwrap();
    let mut head = [0u8; 12];
    t.read_exact(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head).into_owned();
    println!("a body never sent: `{head}`");
    assert!(head.ends_with("504"), "{head}");
    // 40 requests held (their bodies never come), so the 41st is refused at once.
    let held: Vec<_> = (0..40)
        .map(|_| {
            let mut t = std::net::TcpStream::connect(addr).unwrap();
            t.write_all(b"POST /v1/detect HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n\r\n")
                .unwrap();
            t
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = std::time::Instant::now();
    let a = client(&s)
        .post("/v1/detect", "image/jpeg", &read("grace_hopper.jpg"))
        .unwrap();
    expect(&a, 503, "busy", "in flight");
    assert_eq!(a.header("retry-after"), Some("1"));
    assert!(t0.elapsed() < Duration::from_millis(500));
    drop(held);
    std::thread::sleep(Duration::from_millis(1000));
    // 32 clients × 8 face crops each, at once.
    let crop = read("grace_hopper.jpg");
    let before = s
        .batch_stats()
        .batches
        .load(std::sync::atomic::Ordering::Relaxed);
    let ok: usize = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..32)
            .map(|_| {
                let (s, crop) = (&s, &crop);
                sc.spawn(move || {
                    let mut c = client(s);
                    (0..8)
                        .filter(|_| {
                            let a = c
                                .post("/v1/detect?face_crop=false", "image/jpeg", crop)
                                .unwrap();
                            a.status == 200
                        })
                        .count()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let calls = s
        .batch_stats()
        .batches
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    println!("256 requests from 32 clients: {ok} answered 200 in {calls} model calls");
    assert_eq!(ok, 256);
    assert!(
        calls < 128,
        "{calls} model calls for 256 crops: not batched"
    );
    s.stop().unwrap();
    std::fs::remove_dir_all(&d).ok();
}

/// A large multipart upload is read whole; stopping the server answers the request in
/// flight, then refuses connections.
#[test]
fn graceful_shutdown_answers_requests_in_flight() {
    let d = tmp("shutdown");
    common::tiny_checkpoint(&d);
    let s = start(&d, BatchConfig::default(), ServerConfig::default());
    let addr = s.local_addr();
    // A multipart upload over axum's own 2 MB default: a 1000x900 noise PNG, no face in it.
    let noise = image::RgbImage::from_fn(1000, 900, |x, y| {
        let h = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)).wrapping_mul(2246822519);
        image::Rgb([(h >> 8) as u8, (h >> 16) as u8, (h >> 24) as u8])
    });
    let mut png = std::io::Cursor::new(vec![]);
    noise.write_to(&mut png, image::ImageFormat::Png).unwrap();
    assert!(
        png.get_ref().len() > 2 << 20,
        "{} bytes",
        png.get_ref().len()
    );
    let (ct, body) = multipart("noise.png", png.get_ref());
    let a = Client::new(addr, Duration::from_secs(60))
        .post("/v1/detect", &ct, &body)
        .unwrap();
    let v = a.json().unwrap();
    assert_eq!((a.status, &v["status"]), (200, &"no_face".into()), "{v}");
    let video = read("clip.mp4");
    let inflight = std::thread::spawn(move || {
        let mut c = Client::new(addr, Duration::from_secs(60));
        c.post("/v1/detect", "video/mp4", &video).unwrap()
    });
    // The video takes about a second; stop while it is being judged.
    std::thread::sleep(Duration::from_millis(300));
    s.stop().unwrap();
    let a = inflight.join().unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json().unwrap()["frames"].as_array().unwrap().len(), 32);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening"
    );
    std::fs::remove_dir_all(&d).ok();
}

/// `sd2 serve --port 0` prints where it listens, serves, and exits 0 on SIGTERM; a bad flag
/// or a missing checkpoint exits non-zero with a message before listening.
#[test]
fn the_binary_serves_and_stops_on_sigterm() {
    use std::io::BufRead;
    let d = tmp("bin");
    common::tiny_checkpoint(&d);
    let bad = common::sd2_cli(&[
        "serve",
        "--checkpoint",
        d.to_str().unwrap(),
        "--frames",
        "0",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("serve.frames"));
    let none = common::sd2_cli(&["serve", "--checkpoint", "/nonexistent/ck", "--port", "0"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("/nonexistent/ck"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args(["serve", "--checkpoint", d.to_str().unwrap(), "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    println!("{}", line.trim());
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let mut c = Client::new(addr, Duration::from_secs(30));
    assert_eq!(c.get("/healthz").unwrap().status, 200);
    let v = c
        .post("/v1/detect", "image/jpeg", &read("astronaut.jpg"))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    let k = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(rest.contains("stopped"), "{rest}");
    std::fs::remove_dir_all(&d).ok();
}

/// `sd2 bench serve` (small): both runs complete without an error and report their batching;
/// the JSON holds what the table shows.
#[test]
fn bench_serve_reports_both_runs() {
    let out = std::env::temp_dir().join(format!("sd2-bench-serve-{}.json", std::process::id()));
    let r = common::sd2_cli(&[
        "bench",
        "serve",
        "--clients",
        "16",
        "--requests",
        "400",
        "--unbatched-requests",
        "100",
        "--json",
        out.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&r.stdout);
    println!("{text}{}", String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success());
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(
        (runs[0]["mode"].as_str(), runs[0]["requests"].as_u64()),
        (Some("unbatched"), Some(100))
    );
    assert_eq!(runs[0]["mean_batch"].as_f64(), Some(1.0));
    assert_eq!(
        (runs[1]["mode"].as_str(), runs[1]["requests"].as_u64()),
        (Some("batched"), Some(400))
    );
    assert!(runs[1]["mean_batch"].as_f64().unwrap() > 1.0, "{v}");
    for r in runs {
        assert_eq!(r["errors"].as_u64(), Some(0), "{r}");
        assert!(r["p99_ms"].as_f64().unwrap() >= r["p50_ms"].as_f64().unwrap());
    }
    assert!(text.contains("batched / unbatched images/s"));
    std::fs::remove_file(&out).ok();
}

/// A video past the request's timeout: 504, and its work stops at the next frame instead of
/// running on with a worker (the next request, waiting for that worker, is answered soon);
/// its temporary file is gone.
#[test]
fn a_request_past_its_timeout_stops_its_work() {
    let d = tmp("deadline");
    common::tiny_checkpoint(&d);
    let videos = d.join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    let s = start(
        &d,
        BatchConfig::default(),
        ServerConfig {
            timeout: Duration::from_millis(1000),
            workers: 1,
            tmp_dir: videos.clone(),
            ..Default::default()
        },
    );
    let mut c = client(&s);
    let t0 = std::time::Instant::now();
    let a = c
        .post("/v1/detect", "video/mp4", &read("clip.mp4"))
        .unwrap();
    expect(&a, 504, "timeout", "longer than");
    let a = c
        .post(
            "/v1/detect?face_crop=false",
            "image/jpeg",
            &read("astronaut.jpg"),
        )
        .unwrap();
    let took = t0.elapsed();
    println!(
        "504 for the video, then the photo answered {} after {took:?}",
        a.status
    );
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    // The photo waited for the video's worker, freed at the video's next frame after its
    // deadline: no crop of the video was scored (it would have been, all 32 at its end).
    assert!(took < Duration::from_secs(4), "{took:?}");
    let crops = s
        .batch_stats()
        .crops
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(crops, 1, "only the photo's crop was scored");
    s.stop().unwrap();
    let left: Vec<_> = std::fs::read_dir(&videos).unwrap().collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    std::fs::remove_dir_all(&d).ok();
}
