//! Aligned face crops (DeepfakeBench's protocol): the similarity transform and the warp against
//! scikit-image + OpenCV on the same five points (`scripts/reference/align_reference.py`);
//! with the `dlib` feature, dlib's landmarks on a real photo and `predict --align`.
use sd2::clip::preprocess::decode_image;
use sd2::faces::align::{align_crop, similarity, template, ALIGNED_SIZE};

mod common;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/faces")
        .join(name)
}

fn points(v: &serde_json::Value) -> Vec<[f64; 2]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()])
        .collect()
}

#[test]
fn aligned_crop_matches_deepfakebench_on_the_same_points() {
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("align_reference.json")).unwrap()).unwrap();
    let src = points(&r["points"]);
    let t = template(ALIGNED_SIZE, 1.3);
    let mut worst = 0f64;
    for (a, b) in t.iter().zip(points(&r["template"])) {
        worst = worst.max((a[0] - b[0]).abs()).max((a[1] - b[1]).abs());
    }
    println!("template: worst |err| {worst:.2e} px (OpenCV's side in f32)");
    assert!(worst < 1e-4);
    let m = similarity(&src, &t).unwrap();
    let want = &r["matrix"];
    let mut worst = 0f64;
    for i in 0..2 {
        for j in 0..3 {
            worst = worst.max((m[i][j] - want[i][j].as_f64().unwrap()).abs());
        }
    }
    println!("similarity matrix: worst |err| {worst:.2e} vs scikit-image");
    assert!(worst < 1e-4, "{m:?} vs {want}");
    // The warp, on the photo each side decoded itself (libjpeg vs zune-jpeg differ by a level
    // or two here and there).
    let img = decode_image(&fixture("astronaut.jpg")).unwrap();
    let five: [[f32; 2]; 5] = std::array::from_fn(|i| [src[i][0] as f32, src[i][1] as f32]);
    let got = align_crop(&img, &five, ALIGNED_SIZE, 1.3).unwrap();
    let want = decode_image(&fixture("aligned_astronaut.png")).unwrap();
    assert_eq!((got.width, got.height), (want.width, want.height));
    let mut diffs: Vec<u8> = got
        .data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    let at = diffs
        .iter()
        .enumerate()
        .max_by_key(|(_, d)| **d)
        .map(|(i, _)| i)
        .unwrap();
    let max = diffs[at];
    diffs.sort_unstable();
    let p99 = diffs[diffs.len() * 99 / 100];
    println!(
        "aligned crop vs OpenCV: mean |err| {mean:.3}, p99 {p99}, worst {max} at pixel {} channel {}",
        at / 3,
        at % 3
    );
    assert!(mean < 1.0 && p99 <= 6, "mean {mean}, p99 {p99}");
}

/// Without the `dlib` feature, asking for aligned crops is a clear error naming the feature.
#[cfg(not(feature = "dlib"))]
#[test]
fn aligned_crops_without_dlib_say_what_to_build() {
    let cfg = sd2::faces::FaceConfig {
        align: true,
        ..Default::default()
    };
    let e = sd2::faces::FaceDetector::new(cfg)
        .err()
        .unwrap()
        .to_string();
    println!("{e}");
    assert!(
        e.contains("faces.align") && e.contains("--features dlib"),
        "{e}"
    );
    let d = std::env::temp_dir().join(format!("sd2-align-nodlib-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    common::tiny_checkpoint(&d);
    let r = common::sd2_cli(&[
        "predict",
        "--checkpoint",
        d.to_str().unwrap(),
        "--align",
        fixture("astronaut.jpg").to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--features dlib"));
    std::fs::remove_dir_all(&d).ok();
}

/// dlib's landmarks on the astronaut: the five points where a face has them, the crop aligned
/// on them, and landmarks found again on that crop landing on the template (the crop is
/// what DeepfakeBench's preprocessing makes); `predict --align` reports the points.
#[cfg(feature = "dlib")]
#[test]
fn dlib_landmarks_align_a_real_face() {
    use sd2::faces::{FaceConfig, FaceDetector};
    if !sd2::faces::dlib::model_path().is_file() {
        assert!(
            std::env::var_os("SD2_REQUIRE_DLIB").is_none(),
            "SD2_REQUIRE_DLIB is set but {} is missing",
            sd2::faces::dlib::model_path().display()
        );
        println!("skipped: dlib's landmark model is not installed (apt install libdlib-data)");
        return;
    }
    let img = decode_image(&fixture("astronaut.jpg")).unwrap();
    let cfg = FaceConfig {
        align: true,
        ..Default::default()
    };
    let mut det = FaceDetector::new(cfg.clone()).unwrap();
    let (boxes, px) = det.detect_and_crop(&img, 32).unwrap();
    assert_eq!(boxes.len(), 1);
    assert_eq!(px.len(), 3 * 32 * 32);
    let b = boxes[0].bbox;
    let five = boxes[0].landmarks.unwrap();
    println!("box {b:?}, five points {five:?}");
    for p in five {
        assert!(
            p[0] > b[0] && p[0] < b[2] && p[1] > b[1] && p[1] < b[3],
            "{p:?} outside {b:?}"
        );
    }
    let [le, re, nose, lm, rm] = five;
    assert!(le[0] < re[0] && lm[0] < rm[0], "left before right");
    assert!(
        le[1] < nose[1] && nose[1] < lm[1],
        "eyes above the nose above the mouth"
    );
    // Landmarks again on the aligned crop: on the template.
    let aligned = align_crop(&img, &five, ALIGNED_SIZE, 1.3).unwrap();
    let mut plain = FaceDetector::new(FaceConfig::default()).unwrap();
    let found = plain.detect(&aligned).unwrap();
    assert_eq!(found.len(), 1, "a face in the aligned crop");
    let l = sd2::faces::dlib::Landmarker::shared().unwrap();
    let again = sd2::faces::align::five_points(&l.landmarks(&aligned, found[0].bbox).unwrap());
    let t = template(ALIGNED_SIZE, 1.3);
    let mean = again
        .iter()
        .zip(&t)
        .map(|(p, q)| ((p[0] as f64 - q[0]).powi(2) + (p[1] as f64 - q[1]).powi(2)).sqrt())
        .sum::<f64>()
        / 5.0;
    println!(
        "landmarks on the aligned crop: {again:?}; mean distance to the template {mean:.1} px"
    );
    assert!(mean < 8.0, "{mean}");
    let d = std::env::temp_dir().join(format!("sd2-align-dlib-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    common::tiny_checkpoint(&d);
    let r = common::sd2_cli(&[
        "predict",
        "--checkpoint",
        d.to_str().unwrap(),
        "--align",
        fixture("group.jpg").to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let faces = v["faces"].as_array().unwrap();
    assert_eq!(faces.len(), 2, "{v}");
    for f in faces {
        assert_eq!(f["landmarks"].as_array().map(|a| a.len()), Some(5), "{f}");
    }
    std::fs::remove_dir_all(&d).ok();
}
