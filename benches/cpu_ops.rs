//! CPU benchmark of the reference backend at CLIP ViT-L/14 and text-tower shapes: matmul
//! (linear layers), the LoRA-linear op against the plain linear, and multi-head attention
//! forward/backward. Prints GFLOP/s (median of repeats after warm-up) and, with
//! `--json FILE`, writes the results for `scripts/reference/torch_cpu_bench.py`, which times the
//! same shapes in PyTorch and prints the ratio.
//!
//! `cargo bench --bench cpu_ops -- [--json FILE] [--quick]`
use std::time::Instant;

use sd2::ops::{self, Lora};
use sd2::{no_grad, DType, Device, Tensor};

struct Row {
    name: String,
    gflop: f64,
    secs: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.5, DType::F32, Device::Cpu, seed).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let quick = args.iter().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 10 };
    let mut rows = vec![];

    // Linear layers: x [M, K] · Wᵀ [K, N]. M = 2 images × 257 tokens; text M = 8 × 77.
    let linear_shapes: &[(&str, usize, usize, usize)] = &[
        ("vit qkv/out 1024x1024", 514, 1024, 1024),
        ("vit fc1 4096x1024", 514, 4096, 1024),
        ("vit fc2 1024x4096", 514, 1024, 4096),
        ("text q/k/v/out 768x768", 616, 768, 768),
        ("text fc1 3072x768", 616, 3072, 768),
        ("text fc2 768x3072", 616, 768, 3072),
    ];
    for &(name, m, n, k) in linear_shapes {
        let x = rand(&[m, k], 1);
        let w = rand(&[n, k], 2);
        let secs = time(reps, || {
            let _g = no_grad();
            x.linear(&w, None).unwrap();
        });
        rows.push(Row {
            name: format!("matmul {name} M={m}"),
            gflop: 2.0 * (m * n * k) as f64 / 1e9,
            secs,
        });
    }

    // LoRA-linear (rank 8, dropout off) against the plain linear of the same shape.
    let (m, n, k, r) = (514, 1024, 1024, 8);
    let x = rand(&[m, k], 3);
    let w = rand(&[n, k], 4);
    let a = rand(&[r, k], 5);
    let b = rand(&[n, r], 6);
    let secs = time(reps, || {
        let _g = no_grad();
        ops::lora_linear(
            &x,
            &w,
            None,
            Some(Lora {
                a: &a,
                b: &b,
                scale: 4.0,
                dropout: 0.0,
                seed: 0,
            }),
        )
        .unwrap();
    });
    rows.push(Row {
        name: format!("lora_linear r=8 1024x1024 M={m}"),
        gflop: 2.0 * (m * n * k + m * r * k + m * n * r) as f64 / 1e9,
        secs,
    });

    // Attention: vision B=2, 16 heads, 257 tokens, head_dim 64; text B=8, 12 heads, 77, causal.
    for &(name, bsz, heads, seq, hd, causal) in &[
        ("vit", 2usize, 16usize, 257usize, 64usize, false),
        ("text causal", 8, 12, 77, 64, true),
    ] {
        let q = rand(&[bsz, seq, heads * hd], 7);
        let k = rand(&[bsz, seq, heads * hd], 8);
        let v = rand(&[bsz, seq, heads * hd], 9);
        // Counted as dense work (the causal half is computed then masked on the CPU).
        let fwd_flop = 4.0 * (bsz * heads * seq * seq * hd) as f64 / 1e9;
        let secs = time(reps, || {
            let _g = no_grad();
            ops::attention(&q, &k, &v, heads, causal).unwrap();
        });
        rows.push(Row {
            name: format!("attention fwd {name} B={bsz} H={heads} S={seq} D={hd}"),
            gflop: fwd_flop,
            secs,
        });
        let (qt, kt, vt) = (
            q.clone().into_trainable(),
            k.clone().into_trainable(),
            v.clone().into_trainable(),
        );
        let dy = rand(&[bsz, seq, heads * hd], 10);
        let secs = time(reps, || {
            let o = ops::attention(&qt, &kt, &vt, heads, causal).unwrap();
            o.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
        });
        // Forward (2 products) + backward (5 products: recomputed scores, dV, dP, dQ, dK).
        rows.push(Row {
            name: format!("attention fwd+bwd {name} B={bsz} H={heads} S={seq} D={hd}"),
            gflop: fwd_flop * 3.5,
            secs,
        });
    }

    println!(
        "sd2 CPU reference backend, {} rayon threads, f32",
        rayon::current_num_threads()
    );
    println!("{:<58} {:>10} {:>10}", "op", "ms", "GFLOP/s");
    for r in &rows {
        println!(
            "{:<58} {:>10.2} {:>10.1}",
            r.name,
            r.secs * 1e3,
            r.gflop / r.secs
        );
    }
    if let Some(path) = json {
        let body: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "  {{\"name\": \"{}\", \"gflop\": {}, \"secs\": {}}}",
                    r.name, r.gflop, r.secs
                )
            })
            .collect();
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, format!("[\n{}\n]\n", body.join(",\n"))).expect("write json");
        std::fs::rename(&tmp, &path).expect("rename json");
        println!("wrote {path}");
    }
}
