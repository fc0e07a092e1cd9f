//! The synthetic benchmark: deterministic from its seed, a valid manifest with every class,
//! descriptions, video groups, and out-of-domain test sources.
use sd2::data::{synth, LoadOptions, Manifest, Split};

fn gen(tag: &str, seed: u64) -> (std::path::PathBuf, Manifest) {
    let d = std::env::temp_dir().join(format!("sd2-synth-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = synth::generate(&d, 120, 32, seed).unwrap();
    (d, m)
}

#[test]
fn deterministic_valid_and_out_of_domain() {
    let (a, ma) = gen("a", 7);
    let (b, mb) = gen("b", 7);
    assert_eq!(ma.items.len(), 120);
    for (x, y) in ma.items.iter().zip(&mb.items) {
        assert_eq!(
            (x.label, &x.source, x.split, &x.face, &x.env, &x.video),
            (y.label, &y.source, y.split, &y.face, &y.env, &y.video)
        );
        assert_eq!(
            std::fs::read(&x.path).unwrap(),
            std::fs::read(&y.path).unwrap(),
            "same seed, different pixels: {}",
            x.rel_path
        );
    }
    let (c, mc) = gen("c", 8);
    assert!(ma
        .items
        .iter()
        .zip(&mc.items)
        .any(|(x, y)| std::fs::read(&x.path).unwrap() != std::fs::read(&y.path).unwrap()));
    // Valid under the strictest loader settings.
    let strict = Manifest::load(
        &ma.path,
        LoadOptions {
            check_images: true,
            require_descriptions: true,
            verify_images: false,
            skip_bad: false,
        },
    )
    .unwrap();
    assert_eq!(strict.items.len(), 120);
    for l in 0..5 {
        assert!(ma.items.iter().any(|i| i.label == l), "class {l} missing");
    }
    assert!(ma
        .items
        .iter()
        .all(|i| !i.face.is_empty() && !i.env.is_empty()));
    // Test sources never appear in train/val, and frames of a video share label and source.
    let test_sources: std::collections::HashSet<&str> = ma
        .items
        .iter()
        .filter(|i| i.split == Split::Test)
        .map(|i| i.source.as_str())
        .collect();
    assert!(!test_sources.is_empty());
    assert!(ma
        .items
        .iter()
        .filter(|i| i.split != Split::Test)
        .all(|i| !test_sources.contains(i.source.as_str())));
    for w in ma.items.chunks(4) {
        assert!(w
            .iter()
            .all(|i| i.video == w[0].video && i.label == w[0].label && i.source == w[0].source));
    }
    let img = sd2::clip::preprocess::decode_image(&ma.items[0].path).unwrap();
    assert_eq!((img.width, img.height), (32, 32));
    for d in [a, b, c] {
        std::fs::remove_dir_all(d).ok();
    }
}
