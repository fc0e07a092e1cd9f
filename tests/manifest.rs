//! Manifest validation: every bad line is an error naming the file and line, or a counted
//! warning with `skip_bad`.
use sd2::data::{LoadOptions, Manifest, Split};

fn setup(lines: &[&str]) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sd2-manifest-{}-{}",
        std::process::id(),
        lines.len()
    ));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(d.join("imgs")).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/clip_images/small_97x150.png"
        ),
        d.join("imgs/ok.png"),
    )
    .unwrap();
    std::fs::write(d.join("imgs/broken.png"), b"not an image").unwrap();
    std::fs::write(d.join("manifest.jsonl"), lines.join("\n") + "\n").unwrap();
    d
}

const GOOD: &str = r#"{"path": "imgs/ok.png", "label": "fs", "source": "A", "split": "train", "face": "a face", "env": "indoor", "video": "v1"}"#;

#[test]
fn good_manifest_loads() {
    let d = setup(&[
        GOOD,
        "",
        r#"{"path": "imgs/ok.png", "label": "real", "source": "B", "split": "test"}"#,
    ]);
    let m = Manifest::load(
        &d.join("manifest.jsonl"),
        LoadOptions {
            check_images: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(m.items.len(), 2);
    assert_eq!(
        (
            m.items[0].label,
            m.items[0].line,
            m.items[0].video.as_deref()
        ),
        (1, 1, Some("v1"))
    );
    assert_eq!(
        (m.items[1].label, m.items[1].split, m.items[1].line),
        (0, Split::Test, 3)
    );
    assert!(m.items[0].path.ends_with("imgs/ok.png") && m.items[0].path.is_file());
    assert_eq!(m.split(Split::Train).len(), 1);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_lines_are_named() {
    let cases = [
        (
            r#"{"path": "imgs/ok.png", "label": "deepfake", "source": "A", "split": "train"}"#,
            "unknown label `deepfake`",
        ),
        (
            r#"{"path": "imgs/ok.png", "source": "A", "split": "train"}"#,
            "missing field `label`",
        ),
        (
            r#"{"path": "imgs/missing.png", "label": "fs", "source": "A", "split": "train"}"#,
            "`imgs/missing.png` not found",
        ),
        (
            r#"{"path": "imgs/broken.png", "label": "fs", "source": "A", "split": "train"}"#,
            "cannot be decoded",
        ),
        (
            r#"{"path": "imgs/ok.png", "label": "fs", "source": "A", "split": "dev"}"#,
            "unknown split `dev`",
        ),
        (
            r#"{"path": "imgs/ok.png", "label": "fs", "source": "A", "split": "train""#,
            "invalid JSON",
        ),
        (
            r#"{"path": "imgs/ok.png", "label": "fs", "source": "A", "split": "train", "face": ""}"#,
            "empty `face` or `env`",
        ),
    ];
    for (bad, want) in cases {
        let d = setup(&[GOOD, bad]);
        let opts = LoadOptions {
            check_images: true,
            require_descriptions: true,
            verify_images: false,
            skip_bad: false,
        };
        let e = Manifest::load(&d.join("manifest.jsonl"), opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("manifest.jsonl:2:") && e.contains(want), "{e}");
        let m = Manifest::load(
            &d.join("manifest.jsonl"),
            LoadOptions {
                skip_bad: true,
                ..opts
            },
        )
        .unwrap();
        assert_eq!(m.items.len(), 1);
        assert_eq!(m.skipped.len(), 1);
        assert_eq!(m.skipped[0].0, 2);
        std::fs::remove_dir_all(&d).ok();
    }
}
