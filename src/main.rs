//! The `sd2` command line.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sd2",
    version,
    about = "SD2 deepfake detector: CLIP ViT-L/14 + LoRA + CLAM, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print this build's backends and whether a GPU is usable.
    Info,
}

fn info() {
    println!("sd2 {}", env!("CARGO_PKG_VERSION"));
    println!("backends:");
    println!(
        "  cpu   reference backend: f32/bf16/f64, gemm crate, rayon ({} threads)",
        rayon::current_num_threads()
    );
    if !sd2::backend::cuda::COMPILED {
        println!("  cuda  not compiled in (rebuild with `--features cuda`)");
        return;
    }
    match sd2::backend::cuda::probe() {
        Ok(gpus) if gpus.is_empty() => println!("  cuda  compiled in; no GPU visible"),
        Ok(gpus) => {
            println!("  cuda  compiled in; tensor storage not implemented yet (CUDA backend I)");
            for g in gpus {
                println!(
                    "        cuda:{}  {}  {:.1} GiB",
                    g.ordinal,
                    g.name,
                    g.total_mem as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => println!("  cuda  compiled in; no usable GPU: {e}"),
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Info => info(),
    }
}
