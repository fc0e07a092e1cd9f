//! `sd2 import deepfakebench`: fixture trees laid out as DeepfakeBench's preprocessing lays out
//! FaceForensics++ (compression levels between split and video) and Celeb-DF (none), with
//! real PNG frames; the manifest round-trips exactly and loads; bad JSONs are named errors.
use std::collections::BTreeMap;
use std::path::Path;

use sd2::data::{LoadOptions, Manifest};

mod common;
use common::sd2_cli as sd2;

/// `sd2 import deepfakebench --json JSON --out OUT` with `extra` flags.
fn import(json: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "import",
        "deepfakebench",
        "--json",
        json.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sd2(&args)
}

/// Writes `n` small PNG frames for `video` under `root/rel`, returning their relative paths.
fn frames(root: &Path, rel: &str, n: usize) -> Vec<String> {
    let dir = root.join(rel);
    std::fs::create_dir_all(&dir).unwrap();
    (0..n)
        .map(|i| {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                image::Rgb([(x * 9 + i as u32) as u8, (y * 7) as u8, 99])
            });
            let name = format!("{i:03}.png");
            img.save(dir.join(&name)).unwrap();
            format!("{rel}/{name}")
        })
        .collect()
}

/// The fixture: FF++ (real, Deepfakes, NeuralTextures; c23) and Celeb-DF-v2 (real, fake), two
/// videos per label and split, three frames each (train, test; val for FF++).
fn fixture(root: &Path) -> serde_json::Value {
    let mut ff = serde_json::Map::new();
    for (label, dir) in [
        ("FF-real", "original_sequences/youtube"),
        ("FF-DF", "manipulated_sequences/Deepfakes"),
        ("FF-NT", "manipulated_sequences/NeuralTextures"),
    ] {
        let mut splits = serde_json::Map::new();
        for (k, split) in ["train", "val", "test"].iter().enumerate() {
            let mut videos = serde_json::Map::new();
            for v in 0..2 {
                let id = if label == "FF-real" {
                    format!("{:03}", k * 10 + v)
                } else {
                    format!("{:03}_{:03}", k * 10 + v, k * 10 + v + 1)
                };
                let f = frames(root, &format!("FaceForensics++/{dir}/c23/frames/{id}"), 3);
                videos.insert(id, serde_json::json!({"label": label, "frames": f}));
            }
            splits.insert(split.to_string(), serde_json::json!({ "c23": videos }));
        }
        ff.insert(label.into(), serde_json::Value::Object(splits));
    }
    let mut cdf = serde_json::Map::new();
    for (label, dir) in [
        ("CelebDFv2_real", "Celeb-real"),
        ("CelebDFv2_fake", "Celeb-synthesis"),
    ] {
        let mut splits = serde_json::Map::new();
        for (k, split) in ["train", "test"].iter().enumerate() {
            let mut videos = serde_json::Map::new();
            for v in 0..2 {
                let id = format!("id{k}_{v:04}");
                let f = frames(root, &format!("Celeb-DF-v2/{dir}/frames/{id}"), 3);
                videos.insert(id, serde_json::json!({"label": label, "frames": f}));
            }
            splits.insert(split.to_string(), serde_json::Value::Object(videos));
        }
        cdf.insert(label.into(), serde_json::Value::Object(splits));
    }
    serde_json::json!({"FaceForensics++": ff, "Celeb-DF-v2": cdf})
}

#[test]
fn deepfakebench_trees_round_trip_into_a_manifest() {
    let d = std::env::temp_dir().join(format!("sd2-import-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let root = d.join("datasets");
    let json = d.join("dataset.json");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(&json, fixture(&root).to_string()).unwrap();
    let out = d.join("manifest.jsonl");
    let r = import(
        &json,
        &out,
        &["--root", root.to_str().unwrap(), "--check-files"],
    );
    println!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(r.status.success());
    let m = Manifest::load(
        &out,
        LoadOptions {
            check_images: true,
            ..Default::default()
        },
    )
    .unwrap();
    // 3 labels × 3 splits × 2 videos × 3 frames + 2 labels × 2 splits × 2 × 3.
    assert_eq!(m.items.len(), 54 + 24);
    let mut counts: BTreeMap<(String, String, &str), usize> = BTreeMap::new();
    let mut split_of: BTreeMap<String, sd2::data::Split> = BTreeMap::new();
    for it in &m.items {
        *counts
            .entry((
                it.source.clone(),
                format!("{:?}", it.split),
                sd2::sd2::CLASSES[it.label],
            ))
            .or_default() += 1;
        let v = format!("{}/{}", it.source, it.video.clone().unwrap());
        let s = *split_of.entry(v.clone()).or_insert(it.split);
        assert_eq!(s, it.split, "{v} in two splits");
    }
    let want: BTreeMap<(String, String, &str), usize> = [
        (("Celeb-DF-v2", "Test", "fs"), 6),
        (("Celeb-DF-v2", "Test", "real"), 6),
        (("Celeb-DF-v2", "Train", "fs"), 6),
        (("Celeb-DF-v2", "Train", "real"), 6),
        (("FaceForensics++", "Test", "fr"), 6),
        (("FaceForensics++", "Test", "fs"), 6),
        (("FaceForensics++", "Test", "real"), 6),
        (("FaceForensics++", "Train", "fr"), 6),
        (("FaceForensics++", "Train", "fs"), 6),
        (("FaceForensics++", "Train", "real"), 6),
        (("FaceForensics++", "Val", "fr"), 6),
        (("FaceForensics++", "Val", "fs"), 6),
        (("FaceForensics++", "Val", "real"), 6),
    ]
    .into_iter()
    .map(|((a, b, c), n)| ((a.to_string(), b.to_string(), c), n))
    .collect();
    assert_eq!(counts, want);
    assert_eq!(split_of.len(), 18 + 8, "one id per video");
    let text = std::fs::read_to_string(&out).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    println!("{first}");
    assert!(text.contains("\"compression\":\"c23\""));
    assert!(text
        .lines()
        .filter(|l| l.contains("Celeb-DF-v2"))
        .all(|l| !l.contains("compression")));

    // Overrides, and one frame per video.
    let r = import(
        &json,
        &out,
        &[
            "--root",
            root.to_str().unwrap(),
            "--map",
            "FF-NT=fe",
            "--frames-per-video",
            "1",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m = Manifest::load(&out, LoadOptions::default()).unwrap();
    assert_eq!(m.items.len(), 26);
    assert_eq!(
        m.items
            .iter()
            .filter(|i| sd2::sd2::CLASSES[i.label] == "fe")
            .count(),
        6
    );
    assert_eq!(
        m.items
            .iter()
            .filter(|i| sd2::sd2::CLASSES[i.label] == "fr")
            .count(),
        0
    );

    // Bad JSONs: each a named error, nothing written.
    let bad = |name: &str, v: serde_json::Value, says: &str, extra: &[&str]| {
        let p = d.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        let o = d.join(format!("{name}.jsonl"));
        let r = import(&p, &o, extra);
        let e = String::from_utf8_lossy(&r.stderr);
        println!("{name}: {}", e.trim());
        assert!(!r.status.success(), "{name}");
        assert!(e.contains(name) && e.contains(says), "{name}: {e}");
        assert!(!o.exists(), "{name}: nothing written");
    };
    let v = |label: &str| serde_json::json!({"label": label, "frames": ["a/000.png"]});
    bad(
        "two_splits.json",
        serde_json::json!({"D": {"DFDC_fake": {"train": {"v1": v("DFDC_fake")}, "test": {"v1": v("DFDC_fake")}}}}),
        "video `DFDC_fake/v1` is in both",
        &[],
    );
    bad(
        "unknown.json",
        serde_json::json!({"D": {"Mystery": {"train": {"v1": v("Mystery")}}}}),
        "--map Mystery=CLASS",
        &[],
    );
    bad(
        "bad_split.json",
        serde_json::json!({"D": {"D_real": {"training": {"v1": v("D_real")}}}}),
        "D/D_real/training: the split must be",
        &[],
    );
    bad(
        "missing.json",
        serde_json::json!({"D": {"D_real": {"train": {"v1": v("D_real")}}}}),
        "1 of 1 frames are not under",
        &["--check-files"],
    );
    std::fs::write(d.join("broken.json"), "{\"D\": {").unwrap();
    let r = import(&d.join("broken.json"), &d.join("b.jsonl"), &[]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("broken.json: JSON"));
    std::fs::remove_dir_all(&d).ok();
}

/// `--resplit`: a JSON without splits (label → compression → video, as a user's own
/// extraction may write it) gets them by video — each video whole in one split, a video's
/// name under two methods and two compressions in the same one — in the proportions asked,
/// the same for the same seed.
#[test]
fn resplit_makes_splits_by_video_never_by_frame() {
    let d = std::env::temp_dir().join(format!("sd2-resplit-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    let mut ds = serde_json::Map::new();
    for label in ["FF-real", "FF-DF", "FF-F2F"] {
        let mut comp = serde_json::Map::new();
        for c in ["c23", "c40"] {
            let mut videos = serde_json::Map::new();
            for v in 0..20 {
                let frames: Vec<String> = (0..4)
                    .map(|f| format!("{label}/{c}/{v:03}/{f:03}.png"))
                    .collect();
                videos.insert(
                    format!("{v:03}"),
                    serde_json::json!({"label": label, "frames": frames}),
                );
            }
            comp.insert(c.into(), serde_json::Value::Object(videos));
        }
        ds.insert(label.into(), serde_json::Value::Object(comp));
    }
    let json = d.join("nosplits.json");
    std::fs::write(&json, serde_json::json!({ "FF": ds }).to_string()).unwrap();
    // Without --resplit: the level is not a split, and the error says what to do.
    let r = import(&json, &d.join("no.jsonl"), &[]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("--resplit"), "{e}");
    let split_of = |out: &Path| {
        // Read as JSON: the fixture's frame files are not there.
        let text = std::fs::read_to_string(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3 * 2 * 20 * 4);
        // By video name: every frame of every method and compression of it together.
        let mut s: BTreeMap<String, String> = BTreeMap::new();
        for l in &lines {
            let v = l["video"].as_str().unwrap();
            let name = v.rsplit('/').next().unwrap().to_string();
            let split = l["split"].as_str().unwrap().to_string();
            let got = s.entry(name.clone()).or_insert(split.clone()).clone();
            assert_eq!(got, split, "video {name} in two splits");
        }
        s
    };
    let out = d.join("a.jsonl");
    let r = import(&json, &out, &["--resplit", "0.6,0.2,0.2", "--seed", "7"]);
    println!("{}", String::from_utf8_lossy(&r.stdout));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let a = split_of(&out);
    let n = |s: &str| a.values().filter(|x| *x == s).count();
    assert_eq!((n("train"), n("val"), n("test")), (12, 4, 4));
    // Same seed, same splits; another seed, another draw of the same sizes.
    let r = import(&json, &out, &["--resplit", "0.6,0.2,0.2", "--seed", "7"]);
    assert!(r.status.success());
    assert_eq!(split_of(&out), a);
    let r = import(&json, &out, &["--resplit", "3,1,1", "--seed", "8"]);
    assert!(r.status.success());
    let b = split_of(&out);
    assert_ne!(b, a);
    assert_eq!(b.values().filter(|x| *x == "train").count(), 12);
    for spec in ["0.5,0.5", "a,b,c", "-1,1,1", "0,0,0"] {
        let r = import(&json, &d.join("x.jsonl"), &[&format!("--resplit={spec}")]);
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && e.contains("resplit"), "{spec}: {e}");
    }
    std::fs::remove_dir_all(&d).ok();
}
