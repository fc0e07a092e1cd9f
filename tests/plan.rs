//! The launch plan (`cuda:plan`): a step recorded there launches exactly the kernels the same
//! step runs in the simulator, in the same order, each with the bytes it moves, and nothing
//! executes (reads return zeros, so the loss is 0).
#![cfg(feature = "cuda-sim")]
use sd2::bench::model::{run, BenchConfig};
use sd2::bench::plan;
use sd2::{DType, Device};

fn cfg(device: Device) -> BenchConfig {
    BenchConfig {
        preset: "tiny".into(),
        device,
        batch: 2,
        steps: 1,
        warmup: 0,
        train: true,
        dtype: DType::BF16,
        trace: None,
        seed: 3,
        recompute: false,
        grad_bucket_mb: 4.0,
    }
}

#[test]
fn plan_records_the_simulated_step_launch_for_launch() {
    let sim = run(&cfg(Device::CudaSim)).unwrap();
    let planned = run(&cfg(Device::CudaPlan)).unwrap();
    let names = |r: &sd2::bench::model::BenchResult| -> Vec<String> {
        r.profile
            .as_ref()
            .unwrap()
            .kernels
            .iter()
            .map(|k| k.name.clone())
            .collect()
    };
    let (a, b) = (names(&sim), names(&planned));
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(
        a == b,
        "sim {} launches, plan {}; first difference at {first_diff:?}: {:?} vs {:?}",
        a.len(),
        b.len(),
        first_diff.map(|i| &a[i]),
        first_diff.map(|i| &b[i])
    );
    let p = planned.profile.as_ref().unwrap();
    let no_bytes: Vec<&str> = p
        .kernels
        .iter()
        .filter(|k| k.bytes.unwrap_or(0.0) <= 0.0)
        .map(|k| k.name.as_str())
        .collect();
    assert!(no_bytes.is_empty(), "launches without bytes: {no_bytes:?}");
    assert_eq!(
        planned.text_passes.len(),
        2,
        "class phrases, then the descriptions"
    );
    let s = plan::summarize(
        &cfg(Device::CudaPlan),
        2,
        p,
        planned.peak_device_bytes,
        &planned.text_passes,
    );
    println!("{}", s.table());
    assert_eq!(s.launches, a.len());
    assert!(s.bytes > 0.0 && s.flops > 0.0, "{s:?}");
    assert!(s.images_per_s.iter().all(|v| v.is_finite() && *v > 0.0));
    assert!(planned.peak_device_bytes.unwrap_or(0) > 0);
    // No step moves less than the floor its kernel boundaries imply (a byte count or a floor
    // that broke would show here), and the tiny model is not far above it either.
    let floor = s.floor_bytes.expect("a training plan states its floor");
    println!(
        "floor {floor:.0} B, step {:.0} B: {:.2}×",
        s.bytes,
        s.bytes / floor
    );
    assert!(
        s.bytes >= floor && s.bytes < 4.0 * floor,
        "step {} B against a floor of {floor} B",
        s.bytes
    );
}
