//! Faces on real photos (public-domain fixtures, `scripts/reference/face_fixtures.py`): the
//! shipped detector against MediaPipe's boxes on the same JPEGs, the crop geometry, and
//! `sd2 predict` judging images by their faces.
use sd2::clip::preprocess::decode_image;
use sd2::faces::{crop, crop_square, FaceBox, FaceConfig, FaceDetector};

mod common;
use common::sd2_cli as sd2;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/faces")
        .join(name)
}

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("reference.json")).unwrap()).unwrap()
}

fn boxes(v: &serde_json::Value) -> Vec<[f32; 4]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let b = f["box"].as_array().unwrap();
            [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap() as f32)
        })
        .collect()
}

/// How far `got` is from `want`, as fractions of `want`'s side: (centre offset, side ratio − 1).
fn box_error(got: [f32; 4], want: [f32; 4]) -> (f32, f32) {
    let side = |b: [f32; 4]| ((b[2] - b[0]) + (b[3] - b[1])) / 2.0;
    let centre = |b: [f32; 4]| ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
    let (g, w) = (centre(got), centre(want));
    let off = ((g.0 - w.0).powi(2) + (g.1 - w.1).powi(2)).sqrt() / side(want);
    (off, side(got) / side(want) - 1.0)
}

/// Every face MediaPipe finds (its full-range model, the reference) is found, nothing else is,
/// and each box is within 15% of MediaPipe's: centre offset and side, as fractions of
/// MediaPipe's side. A cat photo has no face.
#[test]
fn faces_on_real_photos_match_the_reference_detector() {
    let r = reference();
    let mut det = FaceDetector::new(FaceConfig::default()).unwrap();
    for name in [
        "astronaut.jpg",
        "grace_hopper.jpg",
        "group.jpg",
        "chelsea.jpg",
    ] {
        let img = decode_image(&fixture(name)).unwrap();
        let t = std::time::Instant::now();
        let got = det.detect(&img).unwrap();
        let want = boxes(&r["images"][name]["mediapipe_full_range"]);
        println!(
            "{name} ({}x{}): {} faces in {:.0} ms, MediaPipe {}",
            img.width,
            img.height,
            got.len(),
            t.elapsed().as_secs_f64() * 1e3,
            want.len()
        );
        assert_eq!(got.len(), want.len(), "{name}: {got:?} vs {want:?}");
        for w in &want {
            let (g, (off, size)) = got
                .iter()
                .map(|g| (g, box_error(g.bbox, *w)))
                .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                .unwrap();
            println!(
                "  ours {:?} (score {:.1}) vs MediaPipe {w:?}: centre off {:.1}%, side {:+.1}%",
                g.bbox,
                g.detection_score,
                off * 100.0,
                size * 100.0
            );
            assert!(
                off <= 0.15 && size.abs() <= 0.15,
                "{name}: {:?} vs {w:?}",
                g.bbox
            );
        }
    }
}

/// A crop is square, margin × the box's longer side, centred on the box, and moved (or shrunk)
/// to stay inside the image; its pixels are the image's.
#[test]
fn crops_are_square_centred_and_inside_the_image() {
    // Centred: a 100 px box → a 130 px crop around the same centre.
    assert_eq!(
        crop_square(1000, 800, [400.0, 300.0, 500.0, 400.0], 1.3),
        (385, 285, 130)
    );
    // The longer side counts.
    assert_eq!(
        crop_square(1000, 800, [400.0, 300.0, 500.0, 360.0], 1.0).2,
        100
    );
    // At the corner: moved inside.
    assert_eq!(
        crop_square(1000, 800, [0.0, 0.0, 100.0, 100.0], 1.3),
        (0, 0, 130)
    );
    assert_eq!(
        crop_square(1000, 800, [950.0, 750.0, 1000.0, 800.0], 2.0),
        (900, 700, 100)
    );
    // Larger than the image: shrunk to its shorter side.
    assert_eq!(
        crop_square(300, 200, [0.0, 0.0, 300.0, 200.0], 1.3),
        (50, 0, 200)
    );
    let img = decode_image(&fixture("astronaut.jpg")).unwrap();
    let c = crop(&img, [100.0, 50.0, 200.0, 150.0], 1.3).unwrap();
    assert_eq!((c.width, c.height), (130, 130));
    let (x0, y0, _) = crop_square(img.width, img.height, [100.0, 50.0, 200.0, 150.0], 1.3);
    for (y, x) in [(0, 0), (129, 129), (64, 17)] {
        let at = |im: &sd2::clip::preprocess::RgbImage, x: usize, y: usize| {
            im.data[(y * im.width + x) * 3..(y * im.width + x) * 3 + 3].to_vec()
        };
        assert_eq!(at(&c, x, y), at(&img, x0 + x, y0 + y));
    }
}

/// Settings out of range are refused naming the key; images too small for the smallest face
/// have no faces (not an error).
#[test]
fn face_settings_are_checked_and_tiny_images_have_no_faces() {
    for (cfg, key) in [
        (
            FaceConfig {
                margin: 0.5,
                ..Default::default()
            },
            "faces.margin",
        ),
        (
            FaceConfig {
                min_face: 10,
                ..Default::default()
            },
            "faces.min_face",
        ),
        (
            FaceConfig {
                score_threshold: f64::NAN,
                ..Default::default()
            },
            "faces.score_threshold",
        ),
    ] {
        let e = FaceDetector::new(cfg).err().expect("accepted").to_string();
        assert!(e.contains(key), "{e}");
    }
    let mut det = FaceDetector::new(FaceConfig::default()).unwrap();
    for (w, h) in [(1, 1), (39, 500), (500, 39)] {
        let img = sd2::clip::preprocess::RgbImage::new(w, h, vec![128; w * h * 3]).unwrap();
        assert_eq!(det.detect(&img).unwrap(), Vec::<FaceBox>::new());
    }
}

/// `sd2 predict` finds, crops and scores each face: one JSON line per image with its boxes (in
/// the input's pixels), each face's score and the image's (its most fake face's); a photo
/// without a face says `"status": "no_face"` and is not an error; `--no-face-crop` scores the
/// whole input.
#[test]
fn predict_judges_photos_by_their_faces() {
    let ck = std::env::temp_dir().join(format!("sd2-faces-predict-{}", std::process::id()));
    std::fs::remove_dir_all(&ck).ok();
    common::tiny_checkpoint(&ck);
    let names = ["astronaut.jpg", "group.jpg", "chelsea.jpg"];
    let mut args = vec!["predict", "--checkpoint", ck.to_str().unwrap()];
    let paths: Vec<String> = names
        .iter()
        .map(|n| fixture(n).display().to_string())
        .collect();
    args.extend(paths.iter().map(String::as_str));
    let r = sd2(&args);
    let out = String::from_utf8_lossy(&r.stdout);
    println!("{out}{}", String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success());
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let r = reference();
    for (line, name) in lines.iter().zip(names) {
        assert_eq!(line["path"].as_str(), Some(fixture(name).to_str().unwrap()));
        let faces = line["faces"].as_array().unwrap();
        let want = boxes(&r["images"][name]["mediapipe_full_range"]);
        assert_eq!(faces.len(), want.len(), "{line}");
        if want.is_empty() {
            assert_eq!(line["status"], "no_face");
            assert!(line.get("fake_score").is_none(), "{line}");
            continue;
        }
        assert_eq!(line["status"], "ok");
        let scores: Vec<f64> = faces
            .iter()
            .map(|f| f["fake_score"].as_f64().unwrap())
            .collect();
        let top = scores.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(
            line["fake_score"].as_f64(),
            Some(top),
            "the image's score is its top face's"
        );
        for f in faces {
            let probs: Vec<f64> = f["probs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_f64().unwrap())
                .collect();
            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{f}");
            assert!((f["fake_score"].as_f64().unwrap() - (1.0 - probs[0])).abs() < 1e-12);
            let b = f["box"].as_array().unwrap();
            let b = [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap() as f32);
            assert!(
                want.iter().any(|w| box_error(b, *w).0 <= 0.15),
                "{name}: a box far from every reference face: {f}"
            );
        }
    }
    let r = sd2(&[
        "predict",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--no-face-crop",
        &paths[2],
    ]);
    assert!(r.status.success());
    let line: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    println!("--no-face-crop: {line}");
    assert_eq!(line["status"], "ok");
    assert!(line["fake_score"].as_f64().is_some() && line.get("faces").is_none());
    std::fs::remove_dir_all(&ck).ok();
}

/// 32 frames sampled uniformly from a 1080p H.264 MP4, each face found within 15% of where the
/// clip drew it and kept on one track; the video's score is the mean of its frames'. A VP9
/// WebM is a clear error line naming what to do, and the exit status says so.
#[test]
fn predict_samples_a_video_and_tracks_its_face() {
    let ck = std::env::temp_dir().join(format!("sd2-faces-video-{}", std::process::id()));
    std::fs::remove_dir_all(&ck).ok();
    common::tiny_checkpoint(&ck);
    let mp4 = fixture("clip.mp4");
    let t = std::time::Instant::now();
    let r = sd2(&[
        "predict",
        "--checkpoint",
        ck.to_str().unwrap(),
        mp4.to_str().unwrap(),
    ]);
    let took = t.elapsed();
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let truth = &reference()["video"]["clip.mp4"];
    let want: Vec<[f32; 4]> = truth["face_box_per_frame"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap() as f32))
        .collect();
    let frames = v["frames"].as_array().unwrap();
    println!(
        "{} frames of a {}x{} clip judged in {:.2}s (whole command): video_score {}",
        frames.len(),
        v["video"]["width"],
        v["video"]["height"],
        took.as_secs_f64(),
        v["video_score"]
    );
    assert_eq!(v["status"], "ok");
    assert_eq!(v["video"]["frames"].as_u64(), Some(48));
    assert_eq!(frames.len(), 32);
    assert_eq!(v["frames_with_faces"].as_u64(), Some(32));
    let (mut worst_off, mut worst_size) = (0f32, 0f32);
    let mut sum = 0.0;
    for (k, f) in frames.iter().enumerate() {
        let index = f["index"].as_u64().unwrap() as usize;
        assert_eq!(index, k * 47 / 31, "uniform sampling");
        let faces = f["faces"].as_array().unwrap();
        assert_eq!(faces.len(), 1, "frame {index}: {f}");
        assert_eq!(
            faces[0]["track"].as_u64(),
            Some(0),
            "frame {index}: one face, one track"
        );
        let b = faces[0]["box"].as_array().unwrap();
        let b = [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap() as f32);
        let (off, size) = box_error(b, want[index]);
        worst_off = worst_off.max(off);
        worst_size = worst_size.max(size.abs());
        assert!(
            off <= 0.15 && size.abs() <= 0.15,
            "frame {index}: {b:?} vs {:?}",
            want[index]
        );
        sum += f["fake_score"].as_f64().unwrap();
    }
    println!(
        "worst centre offset {:.1}%, worst side error {:.1}% (of the drawn face's side)",
        worst_off * 100.0,
        worst_size * 100.0
    );
    let mean = sum / 32.0;
    assert!((v["video_score"].as_f64().unwrap() - mean).abs() < 1e-12);
    // Other containers and codecs go through ffmpeg: without it, an error saying so.
    let webm = fixture("clip.webm");
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args([
            "predict",
            "--checkpoint",
            ck.to_str().unwrap(),
            webm.to_str().unwrap(),
        ])
        .env("SD2_FFMPEG", "/nonexistent/ffmpeg")
        .env("SD2_FFPROBE", "/nonexistent/ffprobe")
        .output()
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    println!("{line}");
    assert!(!r.status.success());
    assert_eq!(line["status"], "error");
    let e = line["error"].as_str().unwrap();
    assert!(
        e.contains("clip.webm") && e.contains("H.264") && e.contains("apt install ffmpeg"),
        "{e}"
    );
    // With ffmpeg: the VP9 copy of the clip's first 12 frames judged as the H.264 one (every
    // frame sampled, the face where the drawn one is).
    let have_ffmpeg = ["ffmpeg", "ffprobe"].iter().all(|p| {
        std::process::Command::new(p)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if have_ffmpeg {
        let r = sd2(&[
            "predict",
            "--checkpoint",
            ck.to_str().unwrap(),
            webm.to_str().unwrap(),
        ]);
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(
            r.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&r.stderr)
        );
        let w: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(w["status"], "ok");
        assert_eq!(w["video"]["frames"].as_u64(), Some(12));
        let wf = w["frames"].as_array().unwrap();
        assert_eq!(wf.len(), 12);
        let mut worst = 0f32;
        for (k, f) in wf.iter().enumerate() {
            let index = f["index"].as_u64().unwrap() as usize;
            assert_eq!(index, k, "fewer frames than asked: all of them");
            let faces = f["faces"].as_array().unwrap();
            assert_eq!(faces.len(), 1, "webm frame {index}: {f}");
            let b = faces[0]["box"].as_array().unwrap();
            let b = [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap() as f32);
            let (off, size) = box_error(b, want[index]);
            worst = worst.max(off).max(size.abs());
            assert!(
                off <= 0.15 && size.abs() <= 0.15,
                "webm frame {index}: {b:?} vs {:?}",
                want[index]
            );
        }
        println!(
            "clip.webm through ffmpeg: 12 frames, worst box error {:.1}%",
            worst * 100.0
        );
        // An FFmpeg older than 5.1 (no -fps_mode; a stand-in that refuses it as 4.x does):
        // the same frames through -vsync.
        let old = ck.join("old-ffmpeg");
        std::fs::write(
            &old,
            "#!/bin/sh\nfor a in \"$@\"; do if [ \"$a\" = -fps_mode ]; then \
             echo \"Unrecognized option 'fps_mode'.\" >&2; exit 1; fi; done\nexec ffmpeg \"$@\"\n",
        )
        .unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&old)
            .status()
            .unwrap();
        let r = std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
            .args([
                "predict",
                "--checkpoint",
                ck.to_str().unwrap(),
                webm.to_str().unwrap(),
            ])
            .env("SD2_FFMPEG", &old)
            .env("SD2_FFPROBE", "ffprobe")
            .output()
            .unwrap();
        let o: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert!(r.status.success(), "{o}");
        assert_eq!(o["frames"], w["frames"], "the same answer through -vsync");
    } else {
        assert!(
            std::env::var_os("SD2_REQUIRE_FFMPEG").is_none(),
            "SD2_REQUIRE_FFMPEG is set but ffmpeg/ffprobe cannot run"
        );
        println!("skipped: the ffmpeg path (ffmpeg and ffprobe are not installed)");
    }
    // Hostile videos: each its own error line, the good one still judged.
    let d = ck.join("videos");
    std::fs::create_dir_all(&d).unwrap();
    let bytes = std::fs::read(&mp4).unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("empty.mp4", vec![]),
        (
            "noise.mp4",
            (0..5000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("cut_in_frames.mp4", bytes[..bytes.len() * 6 / 10].to_vec()),
        ("cut_in_header.mp4", bytes[..600].to_vec()),
    ];
    let mut args = vec![
        "predict".to_string(),
        "--checkpoint".into(),
        ck.display().to_string(),
    ];
    for (name, b) in &cases {
        std::fs::write(d.join(name), b).unwrap();
        args.push(d.join(name).display().to_string());
    }
    args.push(mp4.display().to_string());
    let r = sd2(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = String::from_utf8_lossy(&r.stdout);
    println!("{out}{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(r.status.code(), Some(1), "a clean failure, not a crash");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for (l, (name, _)) in lines.iter().zip(&cases) {
        assert_eq!(l["status"], "error", "{name}: {l}");
        assert!(l["error"].as_str().unwrap().contains(name), "{l}");
    }
    assert_eq!(lines[4]["status"], "ok");
    // A media header whose timescale is 0 (the mp4 crate's frame rate divides by it): judged,
    // its rate unknown, not a crash.
    let mut zero = bytes.clone();
    let at = zero.windows(4).position(|w| w == b"mdhd").unwrap();
    let ts = if zero[at + 4] == 1 { at + 24 } else { at + 16 };
    zero[ts..ts + 4].copy_from_slice(&[0, 0, 0, 0]);
    std::fs::write(d.join("zero_timescale.mp4"), &zero).unwrap();
    let r = sd2(&[
        "predict",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--frames",
        "4",
        d.join("zero_timescale.mp4").to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["video"]["fps"].as_f64()),
        (Some("ok"), Some(0.0)),
        "{v}"
    );
    std::fs::remove_dir_all(&ck).ok();
}

/// `--annotate DIR` writes each photo with a face, and each sampled video frame with one, with
/// the boxes drawn (green: real) where the JSON says they are; the JSON line says where.
#[test]
fn annotate_draws_the_boxes_the_json_reports() {
    let ck = std::env::temp_dir().join(format!("sd2-faces-annotate-{}", std::process::id()));
    std::fs::remove_dir_all(&ck).ok();
    common::tiny_checkpoint(&ck);
    let out = ck.join("annotated");
    let (group, cat, mp4) = (
        fixture("group.jpg"),
        fixture("chelsea.jpg"),
        fixture("clip.mp4"),
    );
    let r = sd2(&[
        "predict",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--annotate",
        out.to_str().unwrap(),
        "--frames",
        "3",
        group.to_str().unwrap(),
        cat.to_str().unwrap(),
        mp4.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at = std::path::PathBuf::from(lines[0]["annotated"].as_str().unwrap());
    assert_eq!(at, out.join("group.jpg"));
    assert!(
        lines[1].get("annotated").is_none(),
        "no face, nothing drawn"
    );
    let frames: Vec<&str> = lines[2]["annotated"]
        .as_str()
        .unwrap()
        .split(", ")
        .collect();
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert!(frames[1].ends_with("clip.f00023.jpg"), "{frames:?}");
    let drawn = decode_image(&at).unwrap();
    let img = decode_image(&group).unwrap();
    assert_eq!((drawn.width, drawn.height), (img.width, img.height));
    let px = |im: &sd2::clip::preprocess::RgbImage, x: usize, y: usize| {
        let i = (y * im.width + x) * 3;
        (
            im.data[i] as i32,
            im.data[i + 1] as i32,
            im.data[i + 2] as i32,
        )
    };
    for f in lines[0]["faces"].as_array().unwrap() {
        let b = f["box"].as_array().unwrap();
        let (x0, y0, y1) = (
            b[0].as_f64().unwrap() as usize,
            b[1].as_f64().unwrap() as usize,
            b[3].as_f64().unwrap() as usize,
        );
        let (r, g, bl) = px(&drawn, x0, (y0 + y1) / 2);
        assert!(
            g > r + 60 && g > bl + 60,
            "the box's left edge is not green: {r} {g} {bl}"
        );
        // Away from every box the photo is unchanged (up to JPEG's rounding).
        let (a, b2) = (px(&drawn, 5, 5), px(&img, 5, 5));
        assert!(
            (a.0 - b2.0).abs() < 12 && (a.1 - b2.1).abs() < 12,
            "{a:?} vs {b2:?}"
        );
    }
    std::fs::remove_dir_all(&ck).ok();
}

/// A phone photo stored sideways with an EXIF orientation note is turned upright when
/// decoded: its face is found where it is in the upright photo.
#[test]
fn a_sideways_photo_with_an_exif_orientation_is_turned_upright() {
    let upright = decode_image(&fixture("grace_hopper.jpg")).unwrap();
    let (w, h) = (upright.width, upright.height);
    // Stored turned 90° counter-clockwise; EXIF orientation 6 says "turn 90° clockwise".
    let img = image::RgbImage::from_raw(w as u32, h as u32, upright.data.clone()).unwrap();
    let stored = image::imageops::rotate270(&img);
    let mut jpeg = std::io::Cursor::new(vec![]);
    stored
        .write_to(&mut jpeg, image::ImageFormat::Jpeg)
        .unwrap();
    let jpeg = jpeg.into_inner();
    let tiff: &[u8] = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00";
    let mut app1 = vec![0xFF, 0xE1, 0, (2 + 6 + tiff.len()) as u8];
    app1.extend_from_slice(b"Exif\0\0");
    app1.extend_from_slice(tiff);
    let mut with_exif = jpeg[..2].to_vec();
    with_exif.extend_from_slice(&app1);
    with_exif.extend_from_slice(&jpeg[2..]);
    let plain = sd2::clip::preprocess::decode_image_bytes(&jpeg, "sideways.jpg").unwrap();
    assert_eq!((plain.width, plain.height), (h, w), "no note: as stored");
    let turned = sd2::clip::preprocess::decode_image_bytes(&with_exif, "phone.jpg").unwrap();
    assert_eq!((turned.width, turned.height), (w, h), "turned upright");
    let mut det = FaceDetector::new(FaceConfig::default()).unwrap();
    let want = det.detect(&upright).unwrap();
    let got = det.detect(&turned).unwrap();
    println!(
        "upright {:?}, from the sideways file {:?}",
        want[0].bbox,
        got.first().map(|f| f.bbox)
    );
    assert_eq!((want.len(), got.len()), (1, 1));
    let (off, size) = box_error(got[0].bbox, want[0].bbox);
    assert!(off < 0.05 && size.abs() < 0.05, "{off} {size}");
}
