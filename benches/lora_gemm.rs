//! The LoRA-linear GEMM on the GPU (`cargo bench --features cuda --bench lora_gemm`): the same
//! measurement as `sd2 bench lora` — every fused kernel variant validated against cuBLAS, then
//! timed (CUDA events, L2 flushed between repeats, median), beside cuBLAS's plain GEMM and
//! PEFT's 3-GEMM structure, forward and backward dX, at the CLIP ViT-L/14 and text-tower
//! projection shapes. Without feature `cuda` or a GPU it says so and exits 0.
//! Env: SD2_BENCH_ITERS (default 20), SD2_BENCH_WARMUP (default 3), SD2_BENCH_JSON (a path).

#[cfg(feature = "cuda")]
fn run() -> sd2::Result<()> {
    use sd2::backend::cuda::gpu::Gpu;
    use sd2::bench::kernels as bench;
    if !sd2::backend::cuda::gpu_available() {
        println!("lora_gemm: no GPU here (skipped)");
        return Ok(());
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let gpu = Gpu::global()?;
    let t = bench::lora(
        &gpu,
        &bench::LoraShape::defaults(),
        env("SD2_BENCH_WARMUP", 3),
        env("SD2_BENCH_ITERS", 20).max(1),
    )?;
    print!("{}", bench::lora_table(&gpu.name, &t));
    if let Ok(p) = std::env::var("SD2_BENCH_JSON") {
        let body = serde_json::json!({ "device": gpu.name, "timings": t });
        let tmp = format!("{p}.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(&body).unwrap_or_default(),
        )?;
        std::fs::rename(&tmp, &p)?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run() -> sd2::Result<()> {
    println!("lora_gemm: built without feature `cuda` (skipped): cargo bench --features cuda --bench lora_gemm");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("lora_gemm: {e}");
        std::process::exit(1);
    }
}
