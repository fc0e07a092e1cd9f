//! The page at `/` in a real browser: Debian's headless Chromium, driven over WebDriver by its
//! chromedriver (W3C protocol, spoken with sd2's own small HTTP client), uploads a photo and a
//! video through the page's file input and checks what the page renders: the verdict, one
//! row per face, the boxes drawn on the canvas where the JSON puts them; then a file that is
//! not an image, which must show the server's error. Skipped (and said so) without
//! `chromium` and `chromedriver`, unless `SD2_REQUIRE_BROWSER` is set (CI sets it).
#![cfg(feature = "server")]
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sd2::sd2::detector::Detector;
use sd2::serve::client::Client;
use sd2::serve::{BatchConfig, Batcher, Server, ServerConfig};
use sd2::Device;
use serde_json::{json, Value};

mod common;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/faces")
        .join(name)
}

fn find(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(p.into());
    }
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// A WebDriver session.
struct Browser {
    driver: std::process::Child,
    http: Client,
    session: String,
}

impl Browser {
    fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let path = format!("/session/{}{path}", self.session);
        let a = self
            .http
            .request(
                method,
                &path,
                &[("content-type", "application/json")],
                body.as_bytes(),
            )
            .unwrap();
        let v = a.json().unwrap();
        assert_eq!(a.status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn script(&mut self, js: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    }

    /// Waits for the page's status to leave `working` (up to 60 s); its text.
    fn wait_done(&mut self) -> String {
        let t = Instant::now();
        loop {
            let st = self.script("return document.getElementById('status').dataset.state || ''");
            if st == "done" || st == "error" {
                return self
                    .script("return document.getElementById('status').textContent")
                    .as_str()
                    .unwrap_or("")
                    .to_string();
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the page never finished"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn upload(&mut self, file: &Path) -> String {
        // A fresh page each time, so the state checked is this upload's.
        let url = self.script("return location.href");
        self.call("POST", "/url", Some(json!({"url": url})));
        let el = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": "#file"})),
        );
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap()
            .to_string();
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": file.display().to_string()})),
        );
        self.wait_done()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        self.http.request("DELETE", &path, &[], &[]).ok();
        self.driver.kill().ok();
        self.driver.wait().ok();
    }
}

#[test]
fn the_page_uploads_a_photo_and_a_video_and_shows_boxes_and_scores() {
    let chromium = find(
        "SD2_CHROMIUM",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    );
    let driver = find("SD2_CHROMEDRIVER", &["/usr/bin/chromedriver"]);
    let (Some(chromium), Some(driver)) = (chromium, driver) else {
        assert!(
            std::env::var_os("SD2_REQUIRE_BROWSER").is_none(),
            "SD2_REQUIRE_BROWSER is set but chromium/chromedriver are not installed"
        );
        println!("skipped: chromium and chromedriver are not installed (apt install chromium chromium-driver)");
        return;
    };
    let d = std::env::temp_dir().join(format!("sd2-serve-browser-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    common::tiny_checkpoint(&d);
    let ck = d.clone();
    let batcher = Batcher::start(
        move || Detector::load(&ck, None, Device::Cpu),
        BatchConfig::default(),
    )
    .unwrap();
    let server = Server::start(
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Default::default()
        },
        batcher,
    )
    .unwrap();
    // chromedriver on a free port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(&driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let daddr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut http = Client::new(daddr, Duration::from_secs(60));
    let t = Instant::now();
    while http.get("/status").is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let profile = d.join("profile");
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium.display().to_string(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                     format!("--user-data-dir={}", profile.display())]
        }
    }}});
    let a = http
        .request(
            "POST",
            "/session",
            &[("content-type", "application/json")],
            caps.to_string().as_bytes(),
        )
        .unwrap();
    let v = a.json().unwrap();
    assert_eq!(a.status, 200, "new session: {v}");
    let session = v["value"]["sessionId"].as_str().unwrap().to_string();
    let mut b = Browser {
        driver: child,
        http,
        session,
    };
    let page = format!("http://{}/", server.local_addr());
    b.call("POST", "/url", Some(json!({ "url": page })));
    assert_eq!(
        b.script("return document.title"),
        "sd2 — is this face forged?"
    );

    // Two people: two rows, and on the canvas a box drawn along each face's box.
    let text = b.upload(&fixture("group.jpg"));
    println!("group.jpg → {text}");
    assert!(
        text.contains("fake_score") && text.contains("2 faces"),
        "{text}"
    );
    let rows = b.script("return document.querySelectorAll('#faces tbody tr.face').length");
    assert_eq!(rows, 2);
    // The boxes the server answered, and the colours the canvas holds on their edges.
    let seen = b.script(
        "const cv = document.getElementById('view');
         const g = cv.getContext('2d');
         const rows = [...document.querySelectorAll('#faces tbody tr.face')];
         return { w: cv.width, h: cv.height, hidden: cv.hidden,
                  edges: rows.map(r => {
                    const [x0, y0, x1, y1] = r.children[1].textContent.split(',').map(Number);
                    const p = g.getImageData(x0, Math.round((y0 + y1) / 2), 1, 1).data;
                    return [p[0], p[1], p[2]];
                  }) };",
    );
    println!("canvas: {seen}");
    let img = sd2::clip::preprocess::decode_image(&fixture("group.jpg")).unwrap();
    assert_eq!(seen["w"].as_u64(), Some(img.width as u64));
    assert_eq!(seen["h"].as_u64(), Some(img.height as u64));
    assert_eq!(seen["hidden"], false);
    for e in seen["edges"].as_array().unwrap() {
        let [r, g, bl] = [0, 1, 2].map(|i| e[i].as_u64().unwrap());
        // Red (fake) or green (real), not the photo.
        let red = r > 200 && g < 60 && bl < 60;
        let green = g > 160 && r < 60 && bl < 60;
        assert!(red || green, "box edge colour {e}");
    }
    let shot = b.call("GET", "/screenshot", None);
    if let Some(png) = shot.as_str() {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-page-group.b64");
        std::fs::write(&out, png).ok();
        println!("screenshot (base64 PNG) at {}", out.display());
    }

    // A video: its score and one row per sampled frame.
    let text = b.upload(&fixture("clip.mp4"));
    println!("clip.mp4 → {text}");
    assert!(
        text.contains("video_score") && text.contains("32 of 32"),
        "{text}"
    );
    let rows = b.script("return document.querySelectorAll('#frames tbody tr.frame').length");
    assert_eq!(rows, 32);

    // Not an image: the server's message on the page.
    let bad = d.join("notes.txt");
    std::fs::write(&bad, "not a photo").unwrap();
    let text = b.upload(&bad);
    println!("notes.txt → {text}");
    assert!(
        text.starts_with("Error:") && text.contains("not an image"),
        "{text}"
    );
    assert_eq!(
        b.script("return document.getElementById('status').className"),
        "error"
    );
    drop(b);
    server.stop().unwrap();
    std::fs::remove_dir_all(&d).ok();
}
