//! CPU forward of CLIP towers with random weights at batch 8: ViT-B/16-sized and ViT-L/14-sized
//! vision towers (224 px) and their text towers (77 tokens). Prints images (texts) per second
//! and GFLOP/s; `--json FILE` writes results for scripts/reference/torch_clip_bench.py.
//!
//! `cargo bench --bench clip_forward -- [--json FILE] [--reps N] [--only vit-b16|vit-l14]`
use std::time::Instant;

use sd2::clip::{ClipConfig, ClipModel, ClipTokenizer};
use sd2::{no_grad, DType, Device, Tensor};

/// (tower, GFLOP per call, the timed call).
type Case<'a> = (&'static str, f64, Box<dyn Fn() + 'a>);

/// Multiply-adds ×2 of a tower: per token 2·(4d² + 2·d·inter) per layer, plus attention
/// 4·S·d per token per layer.
fn tower_gflop(layers: usize, d: usize, inter: usize, tokens: usize) -> f64 {
    let per_token =
        layers as f64 * (2.0 * (4 * d * d + 2 * d * inter) as f64 + 4.0 * (tokens * d) as f64);
    per_token * tokens as f64 / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let json = arg("--json");
    let reps: usize = arg("--reps").and_then(|v| v.parse().ok()).unwrap_or(3);
    let only = arg("--only");
    let batch = 8;
    let mut rows: Vec<String> = vec![];
    println!(
        "sd2 CLIP forward, CPU, f32, {} rayon threads, batch {batch}",
        rayon::current_num_threads()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "tower", "ms", "items/s", "GFLOP/s"
    );
    let tk = ClipTokenizer::openai().expect("tokenizer");
    for (name, cfg) in [
        ("vit-b16", ClipConfig::vit_b16()),
        ("vit-l14", ClipConfig::vit_l14()),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let model = ClipModel::random(&cfg, DType::F32, Device::Cpu, 0).expect("model");
        let v = &cfg.vision_config;
        let px = Tensor::randn(
            (batch, 3, v.image_size, v.image_size),
            1.0,
            DType::F32,
            Device::Cpu,
            1,
        )
        .expect("pixels");
        let texts: Vec<String> = (0..batch)
            .map(|i| format!("a photo of a face, number {i}, with some description of the scene"))
            .collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let ids = tk.tokenize_batch(&refs, 77, Device::Cpu).expect("ids");
        let t = &cfg.text_config;
        let cases: [Case; 2] = [
            (
                "vision",
                batch as f64
                    * tower_gflop(
                        v.num_hidden_layers,
                        v.hidden_size,
                        v.intermediate_size,
                        v.num_positions(),
                    ),
                Box::new(|| {
                    let _g = no_grad();
                    model.image_embeds(&px).expect("vision");
                }),
            ),
            (
                "text",
                batch as f64
                    * tower_gflop(t.num_hidden_layers, t.hidden_size, t.intermediate_size, 77),
                Box::new(|| {
                    let _g = no_grad();
                    model.text_embeds(&ids).expect("text");
                }),
            ),
        ];
        for (tower, gflop, f) in cases.iter() {
            f();
            let mut ts: Vec<f64> = (0..reps)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64()
                })
                .collect();
            ts.sort_by(|a, b| a.total_cmp(b));
            let secs = ts[ts.len() / 2];
            let label = format!("{name} {tower} b={batch}");
            println!(
                "{label:<28} {:>10.1} {:>10.2} {:>10.1}",
                secs * 1e3,
                batch as f64 / secs,
                gflop / secs
            );
            rows.push(format!(
                "  {{\"name\": \"{label}\", \"gflop\": {gflop}, \"secs\": {secs}}}"
            ));
        }
    }
    if let Some(path) = json {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, format!("[\n{}\n]\n", rows.join(",\n"))).expect("write json");
        std::fs::rename(&tmp, &path).expect("rename json");
        println!("wrote {path}");
    }
}
