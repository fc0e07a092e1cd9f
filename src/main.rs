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
    /// Tokenize texts (one per line, empty lines included) with OpenAI CLIP's BPE; prints one
    /// JSON array of ids per line.
    Tokenize {
        #[arg(long)]
        texts_file: std::path::PathBuf,
        #[arg(long, default_value_t = 77)]
        context: usize,
        /// A HuggingFace tokenizer.json to use instead of the built-in OpenAI BPE.
        #[arg(long)]
        tokenizer: Option<std::path::PathBuf>,
    },
    /// The main job: synthetic data → train → evaluate (an engine demo until SD2 lands).
    Demo {
        /// Optimizer steps.
        #[arg(long, default_value_t = 400)]
        steps: usize,
        /// Micro-batch size.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
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

fn demo(steps: usize, batch: usize, seed: u64, device: &str) -> sd2::Result<()> {
    let device = sd2::Device::parse(device)?;
    device.check_available()?;
    let cfg = sd2::demo::DemoConfig {
        steps,
        batch,
        seed,
        device,
        ..Default::default()
    };
    println!(
        "sd2 demo (engine): tiny LoRA transformer, synthetic 5-class traces, {steps} steps × {batch}, {device}"
    );
    let r = sd2::demo::run(&cfg, |line| println!("{line}"))?;
    println!(
        "loss {:.4} → {:.4}; test accuracy {:.1}% ({} samples, chance 20%); {:.1}s",
        r.first_loss,
        r.final_loss,
        100.0 * r.test_accuracy,
        cfg.test_size,
        r.seconds
    );
    println!(
        "confusion (rows = truth, cols = predicted): {}",
        sd2::demo::CLASSES.join(" ")
    );
    for (c, row) in r.confusion.iter().enumerate() {
        println!("  {:>4} {:?}", sd2::demo::CLASSES[c], row);
    }
    Ok(())
}

fn read_lines(path: &std::path::Path) -> sd2::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| sd2::Error::Msg(format!("{}: {e}", path.display())))?;
    Ok(text.lines().map(String::from).collect())
}

fn tokenize(
    texts_file: &std::path::Path,
    context: usize,
    tokenizer: Option<&std::path::Path>,
) -> sd2::Result<()> {
    let tk = match tokenizer {
        Some(p) => sd2::clip::ClipTokenizer::from_file(p)?,
        None => sd2::clip::ClipTokenizer::openai()?,
    };
    let mut out = String::new();
    for line in read_lines(texts_file)? {
        let ids = tk.tokenize(&line, context)?;
        let body: Vec<String> = ids.iter().map(|v| v.to_string()).collect();
        out.push('[');
        out.push_str(&body.join(", "));
        out.push_str("]\n");
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Info => {
            info();
            Ok(())
        }
        Cmd::Tokenize {
            texts_file,
            context,
            tokenizer,
        } => tokenize(&texts_file, context, tokenizer.as_deref()),
        Cmd::Demo {
            steps,
            batch,
            seed,
            device,
        } => demo(steps, batch, seed, &device),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
