//! The kernel profiler over the CUDA storage in the simulator: launches recorded by name with
//! the work their launchers declare, ranges nesting around them, the per-kernel table and the
//! Chrome trace.
#![cfg(feature = "cuda-sim")]
use sd2::backend::cuda::storage::runner_for;
use sd2::profile;
use sd2::{DType, Device, Tensor};

#[test]
fn profiler_records_launches_ranges_and_work() {
    let dev = Device::CUDA_SIM;
    let runner = runner_for(Device::SIM_ORDINAL).unwrap();
    let x = Tensor::from_f64(&vec![0.5; 9 * 16], (9, 16), DType::BF16, dev).unwrap();
    let w = Tensor::from_f64(&vec![0.25; 12 * 16], (12, 16), DType::BF16, dev).unwrap();
    profile::start(runner.clock()).unwrap();
    let y = {
        let _layer = profile::range("layer 0");
        let y = {
            let _mlp = profile::range("mlp");
            x.linear(&w, None).unwrap()
        };
        y.softmax_last().unwrap()
    };
    let p = profile::stop().unwrap();
    assert!(!profile::enabled());
    // The recorded values are right, and so is what was computed.
    let got = y.to_vec_f64().unwrap();
    assert!(
        (got[0] - 1.0 / 12.0).abs() < 1e-3,
        "softmax of equal logits: {}",
        got[0]
    );

    let names: Vec<&str> = p.kernels.iter().map(|k| k.name.as_str()).collect();
    println!("{names:?}\n{}", p.table(0));
    let gemm = p
        .kernels
        .iter()
        .find(|k| k.name.starts_with("lora_gemm"))
        .unwrap_or_else(|| panic!("no LoRA GEMM launch among {names:?}"));
    assert_eq!(gemm.flops, Some(2.0 * 9.0 * 12.0 * 16.0), "declared FLOPs");
    assert!(
        names.iter().any(|n| n.starts_with("softmax_fwd_bf16")),
        "{names:?}"
    );
    assert_eq!(gemm.depth, 2, "the GEMM ran inside two open ranges");

    assert_eq!(p.ranges.len(), 2);
    let (layer, mlp) = (&p.ranges[0], &p.ranges[1]);
    assert_eq!((layer.name.as_str(), layer.depth), ("layer 0", 0));
    assert_eq!((mlp.name.as_str(), mlp.depth), ("mlp", 1));
    assert!(mlp.start_ms >= layer.start_ms && mlp.dur_ms <= layer.dur_ms);
    assert!(
        gemm.start_ms >= mlp.start_ms
            && gemm.start_ms + gemm.dur_ms <= mlp.start_ms + mlp.dur_ms + 1e-6
    );

    let stats = p.by_kernel();
    let total: f64 = stats.iter().map(|s| s.share).sum();
    assert!((total - 1.0).abs() < 1e-9, "shares sum to 1: {total}");
    let g = stats.iter().find(|s| s.name == gemm.name).unwrap();
    assert_eq!(g.calls, 1);
    assert!(g.tflops.is_some() && g.gbps.is_some());
    assert!(p.table(0).contains(&gemm.name));

    let trace = p.chrome_trace();
    let ev = trace["traceEvents"].as_array().unwrap();
    let complete = ev.iter().filter(|e| e["ph"] == "X").count();
    assert_eq!(complete, p.kernels.len() + p.ranges.len());
    let dir = std::env::temp_dir().join(format!("sd2-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("step.json");
    p.write_trace(&path).unwrap();
    let back: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(back["traceEvents"].as_array().unwrap().len(), ev.len());
    std::fs::remove_dir_all(&dir).ok();

    // Off again: nothing recorded, stop without start is an error.
    let _ = x.linear(&w, None).unwrap();
    assert!(profile::stop().is_err());
}
