//! The batcher behind `sd2 serve`: concurrent callers' crops scored in shared model calls,
//! each caller answered with exactly its own predictions.
use std::time::Duration;

use sd2::sd2::detector::Detector;
use sd2::serve::{BatchConfig, Batcher};
use sd2::Device;

mod common;

fn detector(dir: &std::path::Path) -> Detector {
    Detector::load(dir, None, Device::Cpu).unwrap()
}

/// Crops of a few real photos, preprocessed: (pixels of each crop, the image size).
fn crops(n: usize, size: usize) -> Vec<Vec<f32>> {
    let fixture = |name: &str| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/faces")
            .join(name)
    };
    let imgs: Vec<_> = ["astronaut.jpg", "grace_hopper.jpg", "chelsea.jpg"]
        .iter()
        .map(|n| sd2::clip::preprocess::decode_image(&fixture(n)).unwrap())
        .collect();
    (0..n)
        .map(|i| {
            let img = &imgs[i % imgs.len()];
            let s = 40 + 13 * (i % 7);
            let c = sd2::faces::crop(
                img,
                [i as f32 * 3.0, 10.0, (i * 3 + s) as f32, 10.0 + s as f32],
                1.0,
            )
            .unwrap();
            sd2::clip::preprocess::preprocess(&c, size)
        })
        .collect()
}

/// 24 threads each score their own crops at once: the batcher answers each with exactly what
/// the detector gives those crops alone (to 1e-6), in fewer model calls than requests.
#[test]
fn concurrent_requests_share_model_calls_and_get_their_own_answers() {
    let d = std::env::temp_dir().join(format!("sd2-serve-batch-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    common::tiny_checkpoint(&d);
    let direct = detector(&d);
    let size = direct.model.clip.config.vision_config.image_size;
    let all = crops(48, size);
    let dir = d.clone();
    let b = Batcher::start(
        move || Ok(detector(&dir)),
        BatchConfig {
            max_batch: 16,
            max_wait: Duration::from_millis(40),
            queue: 64,
        },
    )
    .unwrap();
    assert_eq!(b.image_size(), size);
    // Request k asks for crops [2k, 2k + 2).
    let answers: Vec<Vec<sd2::sd2::detector::Prediction>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..24)
            .map(|k| {
                let b = &b;
                let px: Vec<f32> = all[2 * k..2 * k + 2].concat();
                s.spawn(move || b.score(px, 2).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut worst = 0f64;
    for (k, got) in answers.iter().enumerate() {
        let px = sd2::Tensor::from_vec(
            all[2 * k..2 * k + 2].concat(),
            (2, 3, size, size),
            Device::Cpu,
        )
        .unwrap();
        let want = direct.detect_pixels(&px).unwrap();
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(&want) {
            for (a, e) in g.probs.iter().zip(&w.probs) {
                worst = worst.max((a - e).abs());
            }
        }
    }
    let st = b.stats();
    let (batches, crops_n, requests) = (
        st.batches.load(std::sync::atomic::Ordering::Relaxed),
        st.crops.load(std::sync::atomic::Ordering::Relaxed),
        st.requests.load(std::sync::atomic::Ordering::Relaxed),
    );
    println!("24 requests of 2 crops: {batches} model calls, {crops_n} crops; worst |Δp| {worst:e} (tolerance 1e-6)");
    assert!(worst <= 1e-6);
    assert_eq!((crops_n, requests), (48, 24));
    assert!(
        batches < 24,
        "no batching: {batches} model calls for 24 requests"
    );
    // A request larger than max_batch: split into model calls, answered whole and in order.
    let big: Vec<f32> = all[..40].concat();
    let got = b.score(big.clone(), 40).unwrap();
    let want = direct
        .detect_pixels(&sd2::Tensor::from_vec(big, (40, 3, size, size), Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(got.len(), 40);
    for (g, w) in got.iter().zip(&want) {
        assert!((g.fake_score - w.fake_score).abs() <= 1e-6);
    }
    // Wrong sizes are an error, no crops an empty answer.
    assert!(b.score(vec![0.0; 7], 1).is_err());
    assert!(b.score(vec![], 0).unwrap().is_empty());
    drop(b);
    std::fs::remove_dir_all(&d).ok();
}

/// A full queue refuses at once instead of growing; a model that fails to load is the start's
/// error.
#[test]
fn a_full_queue_refuses_and_a_failed_load_is_an_error() {
    let e = Batcher::start(
        || Err(sd2::Error::Msg("no model here".into())),
        BatchConfig::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("no model here"), "{e}");
    let d = std::env::temp_dir().join(format!("sd2-serve-full-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    common::tiny_checkpoint(&d);
    let dir = d.clone();
    let b = Batcher::start(
        move || Ok(detector(&dir)),
        BatchConfig {
            max_batch: 1,
            max_wait: Duration::from_millis(0),
            queue: 1,
        },
    )
    .unwrap();
    let size = b.image_size();
    let one = crops(1, size).remove(0);
    // Keep the model thread busy for about a second with one large request (timed first).
    let t = std::time::Instant::now();
    b.score(one.repeat(50), 50).unwrap();
    let per = t.elapsed().as_secs_f64() / 50.0;
    let n = ((1.0 / per) as usize).clamp(50, 20_000);
    let b = &b;
    std::thread::scope(|s| {
        let big = one.repeat(n);
        let blocker = s.spawn(move || b.score(big, n));
        std::thread::sleep(Duration::from_millis(100));
        // One request waits in the queue of one; the next is refused at once, not queued.
        let px = one.clone();
        let waiting = s.spawn(move || b.score(px, 1));
        std::thread::sleep(Duration::from_millis(100));
        let t = std::time::Instant::now();
        let e = b
            .score(one.clone(), 1)
            .expect_err("a full queue accepted a request");
        println!("refused in {:?}: {e}", t.elapsed());
        assert!(e.to_string().contains("busy"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "the refusal waited"
        );
        assert_eq!(blocker.join().unwrap().unwrap().len(), n);
        assert_eq!(waiting.join().unwrap().unwrap().len(), 1);
    });
    std::fs::remove_dir_all(&d).ok();
}
