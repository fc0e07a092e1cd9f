//! `sd2 bench train|infer` end to end on the CPU with the tiny preset: the numbers it reports
//! are consistent with each other and with the FLOP count of the config.
use sd2::bench::model::{flops_per_image, run, BenchConfig};
use sd2::{DType, Device};

#[test]
fn bench_train_and_infer_report_consistent_numbers() {
    for train in [true, false] {
        let cfg = BenchConfig {
            preset: "tiny".into(),
            device: Device::Cpu,
            batch: 4,
            steps: 2,
            warmup: 1,
            train,
            dtype: DType::F32,
            trace: None,
            seed: 3,
            recompute: train,
            grad_bucket_mb: 4.0,
        };
        let r = run(&cfg).unwrap();
        println!("{}", r.report(5));
        let clip = sd2::presets::tiny_clip_config();
        let gflop = flops_per_image(&clip, train, 2, 4) / 1e9;
        assert!((r.gflop_per_image - gflop).abs() < 1e-12);
        assert!(r.step_ms > 0.0);
        assert!((r.images_per_s - 4.0 / (r.step_ms / 1e3)).abs() < 1e-6 * r.images_per_s);
        assert!((r.model_tflops - gflop * r.images_per_s / 1e3).abs() < 1e-9);
        assert!(r.mfu.is_none() && r.peak_device_bytes.is_none() && r.profile.is_none());
    }
    let train = flops_per_image(&sd2::presets::tiny_clip_config(), true, 2, 4);
    let infer = flops_per_image(&sd2::presets::tiny_clip_config(), false, 2, 4);
    assert!(
        train > 2.0 * infer,
        "a train step costs more than two forwards of the vision tower"
    );
    let bad = BenchConfig {
        preset: "vit-h".into(),
        device: Device::Cpu,
        batch: 1,
        steps: 1,
        warmup: 0,
        train: false,
        dtype: DType::F32,
        trace: None,
        seed: 0,
        recompute: false,
        grad_bucket_mb: 4.0,
    };
    let e = run(&bad).expect_err("unknown preset").to_string();
    assert!(e.contains("vit-h"), "{e}");
    // batch 0 = the largest micro-batch that fits a GPU: refused on the CPU, and for inference
    let auto = |train| BenchConfig {
        preset: "tiny".into(),
        batch: 0,
        train,
        ..bad.clone()
    };
    let e = run(&auto(true))
        .expect_err("auto batch on the CPU")
        .to_string();
    assert!(e.contains("needs a GPU"), "{e}");
    let e = run(&auto(false))
        .expect_err("auto batch for inference")
        .to_string();
    assert!(e.contains("training only"), "{e}");
}
