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
    /// CLIP commands.
    Clip {
        #[command(subcommand)]
        cmd: ClipCmd,
    },
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
    /// Train SD2 from a TOML config (preset ← file ← --set key=value).
    Train {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// tiny (random-init CLIP trained whole) or vit-l14 (needs clip = a local CLIP folder).
        #[arg(long)]
        preset: Option<String>,
        /// Overrides, dotted keys: --set train.lr=1e-4 --set sd2.loss_dual=\"face\" --set epochs=2
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Print the resolved config as TOML and exit.
        #[arg(long)]
        print_config: bool,
        /// Continue the run in DIR (its config.toml, then --set) from checkpoints/last — or,
        /// without DIR, the run the config's `out` holds.
        #[arg(long, num_args = 0..=1, value_name = "DIR")]
        resume: Option<Option<std::path::PathBuf>>,
        /// Start again in an `out` that holds a run (its checkpoints and log are removed).
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Train data-parallel on N processes of this machine: on the CPU through
        /// `mpirun -np N` (feature `mpi`), on GPUs one process per GPU over NCCL (feature
        /// `nccl`), as torchrun would start them. Under torchrun, srun or mpirun, leave it out:
        /// their variables say the rank.
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Evaluate a checkpoint on a manifest split: metrics.json, predictions.jsonl, a table.
    Eval {
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        #[arg(long)]
        manifest: std::path::PathBuf,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long)]
        out: std::path::PathBuf,
        /// The CLIP folder the checkpoint was trained on (not needed for the tiny preset).
        #[arg(long)]
        clip: Option<std::path::PathBuf>,
        /// Skip bad manifest lines with a warning instead of failing.
        #[arg(long)]
        skip_bad: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Also evaluate under degradations, e.g. `jpeg:90,70,50,30` or `blur:1,2,3`
        /// (repeatable; applied to real and fake alike).
        #[arg(long)]
        perturb: Vec<String>,
    },
    /// Judge photos and videos by their faces: one JSON line per input (its fake_score and
    /// class, each face with its box and scores; a video also per sampled frame).
    Predict {
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        images: Vec<std::path::PathBuf>,
        /// Every image file in this folder (png, jpg, jpeg, webp).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        #[arg(long)]
        clip: Option<std::path::PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Score each input whole: for inputs that are already face crops (what manifests
        /// hold). By default faces are found, cropped and each scored.
        #[arg(long)]
        no_face_crop: bool,
        #[command(flatten)]
        faces: FaceArgs,
        /// Frames sampled uniformly from each video (DeepfakeBench: 32).
        #[arg(long, default_value_t = 32)]
        frames: usize,
        /// Also write each input with its faces' boxes and scores drawn, as JPEGs in this
        /// folder (a video: each sampled frame with a face, `NAME.fINDEX.jpg`).
        #[arg(long)]
        annotate: Option<std::path::PathBuf>,
    },
    /// Serve the detector over HTTP: POST /v1/detect (an image or video as the body, or a
    /// multipart file; the answer is the JSON line `predict` prints), GET /healthz, GET
    /// /metrics (Prometheus), and a page at / to drop a file on. Crops of concurrent requests
    /// are scored in shared batches. Stops gracefully on Ctrl-C or SIGTERM.
    #[cfg(feature = "server")]
    Serve {
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        #[arg(long)]
        clip: Option<std::path::PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Address to listen on (0.0.0.0: every interface).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port (0: any free one; the first line printed says which).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[command(flatten)]
        s: ServeArgs,
    },
    /// Datasets prepared by other tools, as an sd2 manifest.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Face and environment descriptions for a manifest's images that lack them, by zero-shot
    /// CLIP attribute selection from a fixed vocabulary (our substitute for the paper's VLM:
    /// docs/ARCHITECTURE.md); each described line also gets the chosen options' scores.
    Describe {
        /// A HuggingFace CLIP folder (e.g. openai/clip-vit-large-patch14).
        #[arg(long)]
        clip: std::path::PathBuf,
        #[arg(long)]
        manifest: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Describe every line, replacing descriptions it has.
        #[arg(long)]
        all: bool,
        /// Leave lines whose image is unreadable as they are (listed) instead of failing.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Export a checkpoint's LoRA adapters in PEFT's format (`adapter_config.json` +
    /// `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained` loads onto the base
    /// CLIP. Refused for a checkpoint whose CLIP base was trained (`train_base`).
    Export {
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        /// The output folder.
        #[arg(long)]
        peft: std::path::PathBuf,
        /// The CLIP folder the checkpoint was trained on.
        #[arg(long)]
        clip: std::path::PathBuf,
        /// `base_model_name_or_path` written into the adapter config (default: --clip).
        #[arg(long)]
        base: Option<String>,
    },
    /// Compare sd2's forward with a PyTorch reference dump of the same model
    /// (`scripts/reference/dump_reference.py`): every hidden state, the pooled and projected
    /// embeddings, CLAM, the logits; per tensor the worst absolute and relative error, where,
    /// and pass/fail against the tolerance of the dtype. Exits non-zero when anything fails.
    Parity {
        /// The Hugging Face CLIP folder the dump was made from.
        #[arg(long)]
        model: std::path::PathBuf,
        /// The SD2 checkpoint the dump was made with (its `sd2.*` tensors).
        #[arg(long)]
        checkpoint: Option<std::path::PathBuf>,
        /// The dump (`dump_reference.py --out`).
        #[arg(long)]
        reference: std::path::PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, bf16 or f64 (default: the dump's dtype).
        #[arg(long)]
        dtype: Option<String>,
        /// The bound's absolute part, in units of each reference tensor's RMS (default: by dtype).
        #[arg(long)]
        atol: Option<f64>,
        /// The bound's relative part (default: by dtype).
        #[arg(long)]
        rtol: Option<f64>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Pack a manifest's images into WebDataset `.tar` shards (KEY.jpg + KEY.json per sample,
    /// one set per split, `shards.json` last), optionally face-cropped and resized; `sd2
    /// train` reads the folder in place of a manifest.
    Pack {
        #[arg(long)]
        manifest: std::path::PathBuf,
        /// A new or empty folder.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Largest shard: 1GB, 256MiB, …
        #[arg(long, default_value = "1GB")]
        shard_size: String,
        /// Resize the short side (of the face crop, with --face-crop) to this many pixels.
        #[arg(long)]
        size: Option<usize>,
        /// Store the largest face's crop (images without a face are left out and counted).
        #[arg(long)]
        face_crop: bool,
        #[command(flatten)]
        faces: FaceArgs,
        /// keep (the source bytes when unchanged), jpg or png.
        #[arg(long, default_value = "keep")]
        format: String,
        /// JPEG quality when re-encoding.
        #[arg(long, default_value_t = 95)]
        quality: u8,
        /// Leave undecodable images out (listed) instead of failing.
        #[arg(long)]
        skip_bad: bool,
        /// Keep the manifest's order in the shards (by default each split is written
        /// shuffled, so a shard is not one class and a few videos).
        #[arg(long)]
        keep_order: bool,
        /// Seed of the write order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a synthetic forgery benchmark (images + manifest.jsonl) to --out.
    Synth {
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long)]
        n: usize,
        #[arg(long, default_value_t = 224)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// How often a training image's background follows its class (0 removes the shortcut).
        #[arg(long, default_value_t = sd2::data::synth::DEFAULT_SHORTCUT)]
        shortcut: f64,
        /// Write JPEG at this quality (1–100) instead of PNG.
        #[arg(long)]
        jpeg: Option<u8>,
    },
    /// The main job: synthesize a benchmark, train the tiny preset, evaluate out of domain.
    Demo {
        /// Where the data, checkpoints and report go.
        #[arg(long, default_value = "sd2-demo")]
        out: std::path::PathBuf,
        #[command(flatten)]
        run: DemoArgs,
    },
    /// The paper's GenImage protocol: a logistic-regression probe on frozen image features of a
    /// binary real/fake manifest (train split), accuracy per source on the test split.
    Probe {
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        #[arg(long)]
        manifest: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        /// Inverse L2 strength, as sklearn's `LogisticRegression(C=…)`.
        #[arg(long, default_value_t = 1.0)]
        c: f64,
        #[arg(long)]
        clip: Option<std::path::PathBuf>,
        #[arg(long)]
        skip_bad: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The paper's four ablation rows on the synthetic benchmark, mAUC per row.
    Ablation {
        #[arg(long, default_value = "sd2-ablation")]
        out: std::path::PathBuf,
        #[command(flatten)]
        run: DemoArgs,
    },
    /// The CUDA kernels in this build: per kernel and architecture, registers, shared memory,
    /// stack and spills from ptxas (feature `cuda`), and which run in the simulator (`cuda-sim`).
    Kernels,
    /// Benchmarks: `sd2 bench loader --manifest M` (decode + augment + preprocess, images/s);
    /// `sd2 bench flash` (flash attention on the GPU); `sd2 bench gemm` (cuBLAS vs SIMT GEMM, then
    /// the fused LoRA GEMM vs cuBLAS); `sd2 bench lora` (the LoRA table alone).
    #[command(subcommand)]
    Bench(BenchCmd),
}

/// The server's limits and batching, shared by `sd2 serve` and `sd2 bench serve`.
#[cfg(feature = "server")]
#[derive(clap::Args)]
struct ServeArgs {
    /// Most face crops in one model call.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Longest a request waits for others to fill its batch, in ms.
    #[arg(long, default_value_t = 5.0)]
    max_wait_ms: f64,
    /// Largest upload, in MB.
    #[arg(long, default_value_t = 64)]
    max_body_mb: usize,
    /// Most pixels of an uploaded image, in millions.
    #[arg(long, default_value_t = 40.0)]
    max_megapixels: f64,
    /// Longest a request may take, upload included, in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Uploads decoded and searched for faces at once (default: the CPU's cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Requests admitted at once; more are answered 503 at once.
    #[arg(long, default_value_t = 256)]
    max_pending: usize,
    /// Frames sampled from a video when the request does not say (`?frames=N`).
    #[arg(long, default_value_t = 32)]
    frames: usize,
    #[command(flatten)]
    faces: FaceArgs,
}

#[derive(Subcommand)]
enum ImportCmd {
    /// A dataset JSON written by DeepfakeBench's preprocessing (also DF40's): one manifest line
    /// per frame, its class from the label (see `--map`), source = dataset, video = its id,
    /// the JSON's split and compression level kept.
    Deepfakebench {
        /// The dataset JSON (e.g. `preprocessing/dataset_json/FaceForensics++.json`).
        #[arg(long)]
        json: std::path::PathBuf,
        /// Where relative frame paths start (DeepfakeBench's `rgb_dir`).
        #[arg(long, default_value = ".")]
        root: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        /// LABEL=CLASS, overriding the built-in table (repeatable): `--map FF-NT=fe`.
        #[arg(long)]
        map: Vec<String>,
        /// At most this many frames per video, spread evenly (DeepfakeBench trains on 32).
        #[arg(long)]
        frames_per_video: Option<usize>,
        /// Also count frames whose file is missing under --root (fails if any is).
        #[arg(long)]
        check_files: bool,
        /// Make the splits by video, TRAIN,VAL,TEST fractions (`0.8,0.1,0.1`), instead of
        /// keeping the JSON's (for a JSON without splits, or to re-split one).
        #[arg(long)]
        resplit: Option<String>,
        /// Seed of the --resplit order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// How faces are found and cropped, shared by `sd2 predict` and `sd2 serve`.
#[derive(clap::Args)]
struct FaceArgs {
    /// Smallest face scored (its box's side, in pixels).
    #[arg(long, default_value_t = 40)]
    min_face: u32,
    /// A crop's side as a multiple of the face box's longer side.
    #[arg(long, default_value_t = 1.3)]
    face_margin: f32,
    /// Align each crop on dlib's landmarks (DeepfakeBench's crops; feature `dlib`).
    #[arg(long)]
    align: bool,
}

impl FaceArgs {
    fn config(&self) -> sd2::faces::FaceConfig {
        sd2::faces::FaceConfig {
            min_face: self.min_face,
            margin: self.face_margin,
            align: self.align,
            ..Default::default()
        }
    }
}

#[cfg(feature = "server")]
impl ServeArgs {
    fn configs(
        &self,
        addr: std::net::SocketAddr,
    ) -> sd2::Result<(sd2::serve::BatchConfig, sd2::serve::ServerConfig)> {
        let secs = |key: &str, v: f64| {
            if (0.0..1e7).contains(&v) {
                Ok(std::time::Duration::from_secs_f64(v))
            } else {
                Err(sd2::Error::Config {
                    key: key.into(),
                    msg: format!("{v} is not a duration"),
                })
            }
        };
        let batch = sd2::serve::BatchConfig {
            max_batch: self.max_batch,
            max_wait: secs("--max-wait-ms", self.max_wait_ms / 1e3)?,
            queue: self.max_pending.max(1),
        };
        let d = sd2::serve::ServerConfig::default();
        let server = sd2::serve::ServerConfig {
            addr,
            max_body: self.max_body_mb.saturating_mul(1 << 20),
            body_budget: d.body_budget.max(self.max_body_mb.saturating_mul(1 << 20)),
            max_pixels: if self.max_megapixels.is_finite() && self.max_megapixels > 0.0 {
                (self.max_megapixels * 1e6) as u64
            } else {
                0
            },
            timeout: secs("--timeout-s", self.timeout_s)?,
            workers: self.workers.unwrap_or(d.workers),
            max_pending: self.max_pending,
            frames: self.frames,
            faces: self.faces.config(),
            ..d
        };
        server.validate()?;
        Ok((batch, server))
    }
}

/// The synthetic benchmark and training settings shared by `sd2 demo` and `sd2 ablation`.
#[derive(clap::Args)]
struct DemoArgs {
    /// Images to synthesize (train/val/test together).
    #[arg(long, default_value_t = sd2::demo::DemoConfig::default().images)]
    images: usize,
    #[arg(long, default_value_t = sd2::demo::DemoConfig::default().epochs)]
    epochs: usize,
    /// How often a training image's background follows its class (0 removes the shortcut).
    #[arg(long, default_value_t = sd2::data::synth::DEFAULT_SHORTCUT)]
    shortcut: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
struct ModelBenchArgs {
    /// tiny or vit-l14.
    #[arg(long, default_value = "vit-l14")]
    preset: String,
    /// cpu, cuda, cuda:N or cuda:sim (see --plan for cuda:plan).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Images per step (train; 0 = the largest that fits the GPU) or per forward (infer).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// f32, or bf16 (bf16 activations and frozen CLIP weights, f32 trainable masters).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Chrome/Perfetto trace of one profiled step (CUDA devices).
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
    /// Kernels in the table (0 = all).
    #[arg(long, default_value_t = 15)]
    top: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Training: recompute each encoder block in backward (less memory, ~1/3 more compute).
    #[arg(long)]
    recompute: bool,
    /// Training with --nproc: gradient buckets of this many MB, each summed over the ranks as
    /// soon as backward is done with it (`train.grad_bucket_mb`; 0 = one sum after backward).
    #[arg(long, default_value_t = 4.0)]
    grad_bucket_mb: f64,
    /// Record one step on `cuda:plan` instead of timing it: launches, bytes and FLOPs by op
    /// class and the roofline bound on an H100/H200 (no GPU needed; --device is ignored).
    #[arg(long)]
    plan: bool,
    /// Training: time one process, then N processes of this machine as `sd2 train --nproc`
    /// starts them (one GPU each over NCCL; MPI on the CPU), each with its own micro-batch of
    /// --batch: images/s per rank against the one process, the scaling efficiency, and the
    /// gradient all-reduce alone. Under torchrun/srun/mpirun leave it out (no baseline then).
    #[arg(long)]
    nproc: Option<usize>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// `sd2 serve` under load: CLIENTS concurrent clients on localhost send REQUESTS uploads,
    /// first unbatched (--max-batch 1), then batched; images/s, p50/p99 latency, errors, batch
    /// sizes and resident memory per run.
    #[cfg(feature = "server")]
    Serve {
        /// A checkpoint to serve (default: the tiny preset with random weights).
        #[arg(long)]
        checkpoint: Option<std::path::PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value_t = 32)]
        clients: usize,
        #[arg(long, default_value_t = 10_000)]
        requests: usize,
        /// Requests of the unbatched run (it is the slow one).
        #[arg(long, default_value_t = 2_000)]
        unbatched_requests: usize,
        /// The upload (default: a synthetic 160x160 JPEG, sent with face_crop=false, as a
        /// face crop from a manifest would be).
        #[arg(long)]
        image: Option<std::path::PathBuf>,
        /// Find faces in the upload (give --image a photo with faces).
        #[arg(long)]
        face_crop: bool,
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        #[command(flatten)]
        s: ServeArgs,
    },
    /// The data loader alone: images/s for plain decoding and with the train augmentations.
    Loader {
        #[arg(long)]
        manifest: std::path::PathBuf,
        /// Model input size (CLIP preprocessing target).
        #[arg(long, default_value_t = 224)]
        size: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// At most this many images per pass.
        #[arg(long, default_value_t = 2048)]
        limit: usize,
        /// Also time each stage alone on one thread (decode, each augmentation, preprocess).
        #[arg(long)]
        stages: bool,
        /// Also stream the train split of this pack (`sd2 pack`) as training reads it.
        #[arg(long)]
        shards: Option<std::path::PathBuf>,
        /// Write the timings here as JSON.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Flash attention kernels on the GPU (bf16, head dim 64): ms and TFLOP/s, forward and
    /// backward, at the vision/text tower shapes and one long sequence (feature `cuda`).
    Flash {
        /// Sequences per tower shape (the long shape uses 4).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 30)]
        iters: usize,
        /// Also write the timings as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// The fused LoRA-linear GEMM on the GPU (bf16, rank 8) against cuBLAS plain and PEFT's
    /// 3-GEMM structure on cuBLAS, at the CLIP towers' projection shapes (feature `cuda`).
    Lora {
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// SD2 training steps with random weights (one micro-batch per step, two descriptions per
    /// image): images/s, model FLOP utilisation, peak device memory, and on CUDA devices the
    /// per-kernel table of one profiled step (`--trace` writes it as a Chrome/Perfetto trace).
    Train {
        #[command(flatten)]
        m: ModelBenchArgs,
    },
    /// SD2 inference with random weights (class texts encoded once): as `train`, per batch.
    Infer {
        #[command(flatten)]
        m: ModelBenchArgs,
    },
    /// GEMMs on the GPU: plain GEMMs at ViT-L/14's linear-layer shapes (cuBLAS vs the SIMT
    /// kernel, bf16 and f32), then the LoRA-linear table of `sd2 bench lora` (feature `cuda`).
    Gemm {
        /// Images per batch of the plain table (m = batch × 257 tokens).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Only the plain-GEMM table.
        #[arg(long)]
        plain_only: bool,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClipCmd {
    /// Projected (not normalized) CLIP embeddings of images and/or texts, as f32 safetensors
    /// `image_embeds` [N, P] and `text_embeds` [M, P].
    Embed {
        /// A HuggingFace CLIP folder (config.json + model.safetensors or shards).
        #[arg(long)]
        model: std::path::PathBuf,
        /// Image files (PNG/JPEG/WebP), preprocessed as CLIPImageProcessor does.
        #[arg(long, num_args = 1.., conflicts_with = "pixel_values")]
        images: Vec<std::path::PathBuf>,
        /// A safetensors file with one f32 tensor `pixel_values` [N, 3, H, W], already normalized.
        #[arg(long)]
        pixel_values: Option<std::path::PathBuf>,
        /// Texts, one per line.
        #[arg(long)]
        texts_file: Option<std::path::PathBuf>,
        #[arg(long)]
        out: std::path::PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Images per forward pass.
        #[arg(long, default_value_t = 16)]
        batch: usize,
    },
}

#[allow(clippy::too_many_arguments)]
fn clip_embed(r: sd2::clip::embed::EmbedRequest) -> sd2::Result<()> {
    for (name, dims) in sd2::clip::embed::run(&r)? {
        println!("{name} {dims:?}");
    }
    println!("wrote {}", r.out.display());
    Ok(())
}

fn info() {
    print!("{}", sd2::backend::cuda::backends_summary());
    #[cfg(feature = "nccl")]
    match sd2::dist::nccl::library() {
        Ok(l) => println!("collectives:\n  nccl  {} ({})", l.version, l.file),
        Err(sd2::Error::Dist { msg, .. }) => {
            println!("collectives:\n  nccl  compiled in; not loadable: {msg}")
        }
        Err(e) => println!("collectives:\n  nccl  compiled in; not loadable: {e}"),
    }
}

/// The demo's (and the ablation's) settings from the command line, on a checked device.
fn demo_config(out: &std::path::Path, a: &DemoArgs) -> sd2::Result<sd2::demo::DemoConfig> {
    let device = sd2::Device::parse(&a.device)?;
    device.check_available()?;
    Ok(sd2::demo::DemoConfig {
        out: out.to_path_buf(),
        images: a.images,
        epochs: a.epochs,
        seed: a.seed,
        device,
        shortcut: a.shortcut,
        ..Default::default()
    })
}

fn demo(out: &std::path::Path, args: &DemoArgs) -> sd2::Result<()> {
    let cfg = demo_config(out, args)?;
    let device = cfg.device;
    println!("sd2 demo: synthetic benchmark → tiny SD2 (random-init CLIP, trained whole) → out-of-domain test ({device})");
    let r = sd2::demo::run(&cfg, &mut CliProgress::new())?;
    print!("{}", sd2::eval::report::table(&r.report));
    println!(
        "test AUC {:.4}, mAUC {:.4}; {:.0}s in all; report in {}",
        r.report.overall.auc,
        r.report.mauc,
        r.seconds,
        r.eval_dir.display()
    );
    Ok(())
}

fn probe(r: sd2::eval::probe::ProbeRequest) -> sd2::Result<()> {
    let run = sd2::eval::probe::run(&r)?;
    print!("{}", run.report.table());
    println!(
        "wrote {} ({:.1}s, {} Newton iterations)",
        run.path.display(),
        run.seconds,
        run.iterations
    );
    Ok(())
}

fn ablation(out: &std::path::Path, args: &DemoArgs) -> sd2::Result<()> {
    let cfg = demo_config(out, args)?;
    let ab = sd2::ablation::run(&cfg, &mut CliProgress::new())?;
    print!("{}", ab.table());
    println!("wrote {}", out.join("ablation.json").display());
    Ok(())
}

fn bench_loader(
    manifest: &std::path::Path,
    size: usize,
    batch: usize,
    limit: usize,
    stages: bool,
    shards: Option<&std::path::Path>,
    json: Option<&std::path::Path>,
) -> sd2::Result<()> {
    use sd2::bench::loader;
    println!(
        "loader: up to {limit} images from {}, {size} px input, batch {batch}, {} rayon threads",
        manifest.display(),
        rayon::current_num_threads()
    );
    let mut t = loader::run(manifest, size, batch, limit)?;
    if let Some(dir) = shards {
        t.extend(loader::run_shards(dir, size, batch, limit)?);
    }
    print!("{}", loader::table(&t));
    let st = if stages {
        let st = loader::stages(manifest, size, limit.min(512))?;
        print!("{}", loader::stage_table(&st));
        st
    } else {
        vec![]
    };
    if let Some(p) = json {
        write_json(
            p,
            &serde_json::json!({
                "threads": rayon::current_num_threads(),
                "size": size,
                "batch": batch,
                "timings": t,
                "stages": st,
            }),
        )?;
    }
    Ok(())
}

/// A benchmark's results as pretty JSON, written atomically.
fn write_json(path: &std::path::Path, body: &serde_json::Value) -> sd2::Result<()> {
    let bytes = serde_json::to_vec_pretty(body).map_err(|e| sd2::Error::Msg(e.to_string()))?;
    sd2::fs::write_atomic(path, bytes)
}

#[cfg(feature = "cuda")]
fn bench_flash(
    batch: usize,
    warmup: usize,
    iters: usize,
    json: Option<&std::path::Path>,
) -> sd2::Result<()> {
    use sd2::backend::cuda::gpu::Gpu;
    use sd2::bench::kernels as bench;
    let gpu = Gpu::global()?;
    println!(
        "flash attention (bf16, d 64) on {} ({} SMs), median of {iters} after {warmup} warm-up",
        gpu.name, gpu.multiprocessors
    );
    let t = bench::flash_attention(&gpu, &bench::AttnShape::defaults(batch), warmup, iters)?;
    print!("{}", bench::flash_table(&t));
    if let Some(p) = json {
        let body = serde_json::json!({ "device": gpu.name, "kernel": "sd2 flash v1 (CUDA cores), v3-v4 forward and v2-v3 backward (tensor cores)", "timings": t });
        write_json(p, &body)?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn bench_gemm(
    batch: usize,
    plain_only: bool,
    warmup: usize,
    iters: usize,
    json: Option<&std::path::Path>,
) -> sd2::Result<()> {
    use sd2::backend::cuda::gpu::Gpu;
    use sd2::bench::kernels as bench;
    let gpu = Gpu::global()?;
    println!(
        "plain GEMM, C = A·Wᵀ, on {}: cuBLAS {} vs the SIMT kernel, median of {iters}",
        gpu.name,
        if gpu.has_cublas() {
            "(loaded)"
        } else {
            "(not loadable here)"
        }
    );
    let t = bench::gemm(&gpu, &bench::GemmShape::defaults(batch), warmup, iters)?;
    print!("{}", bench::gemm_table(&t));
    let lora = if plain_only {
        vec![]
    } else {
        println!();
        let l = bench::lora(&gpu, &bench::LoraShape::defaults(), warmup, iters)?;
        print!("{}", bench::lora_table(&gpu.name, &l));
        l
    };
    if let Some(p) = json {
        let body = serde_json::json!({ "device": gpu.name, "timings": t, "lora": lora });
        write_json(p, &body)?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn bench_lora(warmup: usize, iters: usize, json: Option<&std::path::Path>) -> sd2::Result<()> {
    use sd2::backend::cuda::gpu::Gpu;
    use sd2::bench::kernels as bench;
    let gpu = Gpu::global()?;
    println!(
        "LoRA-linear forward, bf16, rank 8, on {}: sd2 fused vs cuBLAS, median of {iters}",
        gpu.name
    );
    let t = bench::lora(&gpu, &bench::LoraShape::defaults(), warmup, iters)?;
    print!("{}", bench::lora_table(&gpu.name, &t));
    if let Some(p) = json {
        let body = serde_json::json!({ "device": gpu.name, "timings": t });
        write_json(p, &body)?;
    }
    Ok(())
}

fn bench_model(m: ModelBenchArgs, train: bool) -> sd2::Result<()> {
    let device = if m.plan {
        sd2::Device::CudaPlan
    } else {
        sd2::Device::parse(&m.device)?
    };
    let cfg = sd2::bench::model::BenchConfig {
        preset: m.preset.clone(),
        device,
        batch: m.batch,
        steps: m.steps.max(1),
        warmup: m.warmup,
        train,
        dtype: match m.dtype.as_str() {
            "f32" => sd2::DType::F32,
            "bf16" => sd2::DType::BF16,
            other => {
                return Err(sd2::Error::Msg(format!(
                    "--dtype {other}: expected f32 or bf16"
                )))
            }
        },
        trace: m.trace.clone(),
        seed: 0,
        recompute: m.recompute,
        grad_bucket_mb: m.grad_bucket_mb,
    };
    let launch = sd2::dist::Launch::from_env()?;
    // A rank of a job: several processes, or the one `--nproc 1` started (which times the
    // engine on one device).
    let ranked = launch.is_distributed()
        || (launch.launcher != sd2::dist::Launcher::None
            && std::env::var_os("SD2_BENCH_BASELINE_IPS").is_some());
    if (m.nproc.is_some() || ranked) && (!train || m.plan) {
        return Err(sd2::Error::invalid(
            "bench",
            "only `sd2 bench train` (not --plan) runs across processes",
        ));
    }
    if let Some(n) = m.nproc {
        let base = sd2::bench::model::run(&cfg)?;
        print!("{}", base.report(m.top));
        println!(
            "one process: {:.1} images/s; now {n} processes",
            base.images_per_s
        );
        let ips = format!("{}", base.images_per_s);
        return launch_local(n, &m.device, &[("SD2_BENCH_BASELINE_IPS", ips)]);
    }
    if ranked {
        return bench_train_ranked(cfg, &m, &launch);
    }
    if m.plan {
        let p = sd2::bench::plan::run(&cfg)?;
        print!("{}", p.table());
        if let Some(path) = m.json {
            let body = serde_json::to_value(&p).map_err(|e| sd2::Error::Msg(e.to_string()))?;
            write_json(&path, &body)?;
        }
        return Ok(());
    }
    let r = sd2::bench::model::run(&cfg)?;
    print!("{}", r.report(m.top));
    if let Some(p) = &m.trace {
        if r.profile.is_some() {
            println!("trace: {}", p.display());
        }
    }
    if let Some(p) = m.json {
        let body = serde_json::to_value(&r).map_err(|e| sd2::Error::Msg(e.to_string()))?;
        write_json(&p, &body)?;
    }
    Ok(())
}

/// One rank of `sd2 bench train` in a job: every rank times its steps; rank 0 prints its
/// report, each rank's images/s and, against the one-process baseline `--nproc` measured
/// first, the scaling efficiency (images/s per rank over one process's).
fn bench_train_ranked(
    mut cfg: sd2::bench::model::BenchConfig,
    m: &ModelBenchArgs,
    launch: &sd2::dist::Launch,
) -> sd2::Result<()> {
    let rank = launch.rank;
    cfg.device = sd2::run::rank_device(&m.device, launch.local_rank)?;
    let comm = sd2::dist::init_engine(launch, cfg.device)?;
    abort_on_panic(rank);
    let r = match sd2::bench::model::run_with(&cfg, comm.clone()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: rank {rank} of {}: {e}", launch.world);
            comm.abort(1)
        }
    };
    let w = comm.world();
    let mut ips = vec![0.0; w];
    ips[rank] = r.images_per_s;
    comm.all_reduce_f64(&mut ips)?;
    if rank == 0 {
        print!("{}", r.report(m.top));
        let per_rank = ips.iter().sum::<f64>() / w as f64;
        let baseline = std::env::var("SD2_BENCH_BASELINE_IPS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok());
        println!(
            "{w} ranks ({}): {:.1} images/s in all, {per_rank:.1} per rank (slowest {:.1}){}",
            comm.backend(),
            ips.iter().sum::<f64>(),
            ips.iter().copied().fold(f64::INFINITY, f64::min),
            match baseline {
                Some(b) => format!(
                    "; one process {b:.1}: scaling efficiency {:.1}%",
                    100.0 * per_rank / b
                ),
                None => "; no one-process baseline in this run (--nproc measures one)".into(),
            }
        );
        if let Some(p) = &m.json {
            let mut body = serde_json::to_value(&r).map_err(|e| sd2::Error::Msg(e.to_string()))?;
            body["ranks_images_per_s"] = serde_json::json!(ips);
            body["baseline_images_per_s"] = serde_json::json!(baseline);
            body["scaling_efficiency"] = serde_json::json!(baseline.map(|b| per_rank / b));
            write_json(p, &body)?;
        }
    }
    comm.barrier()
}

#[cfg(not(feature = "cuda"))]
fn bench_lora(_warmup: usize, _iters: usize, _json: Option<&std::path::Path>) -> sd2::Result<()> {
    Err(sd2::Error::CudaNotCompiled(0))
}

#[cfg(not(feature = "cuda"))]
fn bench_gemm(
    _batch: usize,
    _plain_only: bool,
    _warmup: usize,
    _iters: usize,
    _json: Option<&std::path::Path>,
) -> sd2::Result<()> {
    Err(sd2::Error::CudaNotCompiled(0))
}

#[cfg(not(feature = "cuda"))]
fn bench_flash(
    _batch: usize,
    _warmup: usize,
    _iters: usize,
    _json: Option<&std::path::Path>,
) -> sd2::Result<()> {
    Err(sd2::Error::CudaNotCompiled(0))
}

/// Training progress on the terminal: a bar (images/s, ETA, loss) when stderr is a terminal,
/// plain periodic lines otherwise (logs, CI, pipes).
struct CliProgress {
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
}

impl CliProgress {
    fn new() -> CliProgress {
        CliProgress {
            bar: None,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

impl sd2::run::Progress for CliProgress {
    fn line(&mut self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => println!("{text}"),
        }
    }

    fn step(&mut self, s: &sd2::run::StepProgress) -> bool {
        if !self.tty {
            return false;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(s.images_total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} images, {per_sec}, ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        // A new run (the ablation trains several) starts a new bar.
        if (s.images_done as u64) < bar.position() {
            bar.reset();
            bar.set_length(s.images_total as u64);
        }
        bar.set_position(s.images_done as u64);
        bar.set_message(format!(
            "epoch {}/{} loss {:.3} (L_C {:.3})",
            s.epoch, s.epochs, s.loss, s.l_c
        ));
        if s.images_done >= s.images_total {
            bar.finish_and_clear();
            self.bar = None;
        }
        true
    }
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
    let out = tk.ids_lines(&sd2::fs::read_lines(texts_file)?, context)?;
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn synth(
    out: &std::path::Path,
    n: usize,
    size: usize,
    seed: u64,
    shortcut: f64,
    jpeg: Option<u8>,
) -> sd2::Result<()> {
    let t = std::time::Instant::now();
    let m = sd2::data::synth::generate_as(out, n, size, seed, shortcut, jpeg)?;
    let count = |s| m.items.iter().filter(|i| i.split == s).count();
    println!(
        "wrote {n} images ({size} px) and {} in {:.1}s: train {}, val {}, test {}",
        m.path.display(),
        t.elapsed().as_secs_f64(),
        count(sd2::data::Split::Train),
        count(sd2::data::Split::Val),
        count(sd2::data::Split::Test)
    );
    Ok(())
}

fn eval(r: sd2::eval::evaluate::EvalRequest) -> sd2::Result<()> {
    let rep = sd2::eval::evaluate::run(&r)?;
    // Each error names its manifest line and file.
    for u in &rep.unreadable {
        eprintln!("{}", u.error);
    }
    print!("{}", sd2::eval::report::table(&rep));
    println!(
        "wrote {} and {}",
        r.out.join("metrics.json").display(),
        r.out.join("predictions.jsonl").display()
    );
    if !rep.unreadable.is_empty() {
        return Err(sd2::Error::Msg(format!(
            "eval: {} images could not be read and are left out of the numbers (listed above \
             and in metrics.json)",
            rep.unreadable.len()
        )));
    }
    Ok(())
}

/// `sd2 eval`'s arguments checked (perturbations and the split parsed before any work, so a
/// typo fails fast).
#[allow(clippy::too_many_arguments)]
fn eval_request(
    checkpoint: std::path::PathBuf,
    manifest: std::path::PathBuf,
    split: &str,
    out: std::path::PathBuf,
    clip: Option<std::path::PathBuf>,
    skip_bad: bool,
    device: &str,
    perturb: &[String],
) -> sd2::Result<sd2::eval::evaluate::EvalRequest> {
    let mut perturbs = vec![];
    for p in perturb {
        perturbs.extend(sd2::data::augment::Perturb::parse_list(p)?);
    }
    let split = sd2::data::Split::parse(split)
        .ok_or_else(|| sd2::Error::Msg(format!("--split {split}: expected train, val or test")))?;
    Ok(sd2::eval::evaluate::EvalRequest {
        checkpoint,
        manifest,
        split,
        out,
        clip,
        skip_bad,
        device: sd2::Device::parse(device)?,
        perturb: perturbs,
    })
}

#[cfg(feature = "server")]
fn serve(
    checkpoint: &std::path::Path,
    clip: Option<std::path::PathBuf>,
    device: &str,
    addr: std::net::SocketAddr,
    args: &ServeArgs,
) -> sd2::Result<()> {
    let (batch, mut cfg) = args.configs(addr)?;
    cfg.stop_on_signals = true;
    let device = sd2::Device::parse(device)?;
    device.check_available()?;
    let ckpt = checkpoint.to_path_buf();
    let batcher = sd2::serve::Batcher::start(
        move || sd2::sd2::detector::Detector::load(&ckpt, clip.as_deref(), device),
        batch,
    )?;
    let server = sd2::serve::Server::start(cfg, batcher)?;
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        writeln!(
            out,
            "sd2 serve: listening on http://{} (checkpoint {})",
            server.local_addr(),
            checkpoint.display()
        )?;
        out.flush()?;
    }
    server.wait()?;
    println!("sd2 serve: stopped");
    Ok(())
}

#[cfg(feature = "server")]
#[allow(clippy::too_many_arguments)]
fn bench_serve(
    checkpoint: Option<std::path::PathBuf>,
    device: &str,
    clients: usize,
    requests: usize,
    unbatched_requests: usize,
    image: Option<&std::path::Path>,
    face_crop: bool,
    json: Option<&std::path::Path>,
    args: &ServeArgs,
) -> sd2::Result<()> {
    use sd2::bench::serve::{run, table, LoadConfig};
    let device = sd2::Device::parse(device)?;
    device.check_available()?;
    let (batched, server) = args.configs(([127, 0, 0, 1], 0).into())?;
    let payload = match image {
        Some(p) => {
            std::fs::read(p).map_err(|e| sd2::Error::Msg(format!("{}: {e}", p.display())))?
        }
        None => {
            let img = image::RgbImage::from_fn(160, 160, |x, y| {
                image::Rgb([
                    (x * 3 % 256) as u8,
                    (y * 5 % 256) as u8,
                    ((x + y) % 256) as u8,
                ])
            });
            let mut buf = std::io::Cursor::new(vec![]);
            img.write_to(&mut buf, image::ImageFormat::Jpeg)
                .map_err(|e| sd2::Error::Msg(format!("encoding the payload: {e}")))?;
            buf.into_inner()
        }
    };
    let load = move || -> sd2::Result<sd2::sd2::detector::Detector> {
        match &checkpoint {
            Some(c) => sd2::sd2::detector::Detector::load(c, None, device),
            None => {
                let p = sd2::presets::get("tiny")?;
                let clip = sd2::clip::ClipModel::random(&p.clip, sd2::DType::F32, device, 0)?;
                let model = sd2::sd2::Sd2Model::new(clip, p.sd2, 1)?;
                sd2::sd2::detector::Detector::from_model(
                    model,
                    &sd2::clip::ClipTokenizer::openai()?,
                    &sd2::sd2::TypeTexts::shipped()?,
                )
            }
        }
    };
    let base = LoadConfig {
        clients,
        requests,
        warmup: (clients * 4).min(requests),
        payload,
        content_type: "image/jpeg".into(),
        path: if face_crop {
            "/v1/detect".into()
        } else {
            "/v1/detect?face_crop=false".into()
        },
    };
    let unbatched = sd2::serve::BatchConfig {
        max_batch: 1,
        max_wait: std::time::Duration::ZERO,
        ..batched.clone()
    };
    let mut reports = vec![];
    let one = LoadConfig {
        requests: unbatched_requests,
        ..base.clone()
    };
    reports.push(run(
        "unbatched",
        load.clone(),
        unbatched,
        server.clone(),
        &one,
    )?);
    reports.push(run("batched", load, batched, server, &base)?);
    print!("{}", table(&reports));
    let speedup = reports[1].images_per_s / reports[0].images_per_s.max(1e-9);
    println!("batched / unbatched images/s: {speedup:.2}x");
    if let Some(p) = json {
        let v = serde_json::json!({"runs": reports, "speedup": speedup});
        std::fs::write(p, format!("{v:#}\n"))
            .map_err(|e| sd2::Error::Msg(format!("{}: {e}", p.display())))?;
    }
    let errors: usize = reports.iter().map(|r| r.errors).sum();
    if errors > 0 {
        return Err(sd2::Error::Msg(format!(
            "bench serve: {errors} requests failed (first: {})",
            reports
                .iter()
                .find_map(|r| r.first_error.clone())
                .unwrap_or_default()
        )));
    }
    Ok(())
}

fn pack(
    manifest: &std::path::Path,
    out: &std::path::Path,
    o: &sd2::data::shards::PackOptions,
) -> sd2::Result<()> {
    if let Some(f) = &o.faces {
        f.validate()?;
    }
    let opts = sd2::data::LoadOptions {
        skip_bad: o.skip_bad,
        ..Default::default()
    };
    let m = sd2::data::Manifest::load(manifest, opts)?;
    for (line, why) in m.skipped.iter().take(20) {
        eprintln!("skipped line {line}: {why}");
    }
    let t = std::time::Instant::now();
    let p = sd2::data::shards::pack(&m, out, o)?;
    for (line, why) in p.skipped.iter().take(20) {
        eprintln!("skipped line {line}: {why}");
    }
    if !p.no_face.is_empty() {
        eprintln!(
            "{} images without a face left out (lines {}{})",
            p.no_face.len(),
            p.no_face
                .iter()
                .take(10)
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if p.no_face.len() > 10 { ", …" } else { "" }
        );
    }
    use sd2::data::Split;
    for split in [Split::Train, Split::Val, Split::Test] {
        let n = p.index.shards.iter().filter(|s| s.split == split).count();
        if n > 0 {
            println!(
                "{:<5} {:>8} samples in {n} shards, {:.1} MB",
                format!("{split:?}").to_lowercase(),
                p.index.count(split),
                p.index.bytes(split) as f64 / 1e6
            );
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{} samples ({:.1} MB of images, {} skipped) → {} in {secs:.1}s",
        p.index.shards.iter().map(|s| s.samples).sum::<usize>(),
        p.image_bytes as f64 / 1e6,
        p.skipped.len() + p.no_face.len(),
        out.join(sd2::data::shards::INDEX).display()
    );
    Ok(())
}

fn import_deepfakebench(
    json: &std::path::Path,
    root: std::path::PathBuf,
    out: &std::path::Path,
    map: &[String],
    frames_per_video: Option<usize>,
    check_files: bool,
    resplit: Option<(&str, u64)>,
) -> sd2::Result<()> {
    use sd2::data::import::{deepfakebench, ImportOptions, LabelMap, Resplit};
    if frames_per_video == Some(0) {
        return Err(sd2::Error::Config {
            key: "--frames-per-video".into(),
            msg: "must be ≥ 1".into(),
        });
    }
    let opts = ImportOptions {
        root,
        map: LabelMap::default().with(map)?,
        frames_per_video,
        check_files,
        resplit: resplit
            .map(|(spec, seed)| Resplit::parse(spec, seed))
            .transpose()?,
    };
    let got = deepfakebench(json, &opts)?;
    if got.records.is_empty() {
        return Err(sd2::Error::Msg(format!(
            "{}: no frames in it",
            json.display()
        )));
    }
    if check_files && got.missing > 0 {
        return Err(sd2::Error::Msg(format!(
            "{}: {} of {} frames are not under {}",
            json.display(),
            got.missing,
            got.records.len(),
            opts.root.display()
        )));
    }
    sd2::data::Manifest::write(out, &got.records)?;
    println!(
        "{:<24} {:<6} {:<5} {:>9}",
        "source", "split", "class", "frames"
    );
    for ((source, split, class), n) in &got.counts {
        println!("{source:<24} {split:<6} {class:<5} {n:>9}");
    }
    let videos: Vec<String> = got.videos.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!(
        "{} frames of {} videos ({}) → {}",
        got.records.len(),
        got.videos.values().sum::<usize>(),
        videos.join(", "),
        out.display()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn predict(
    checkpoint: &std::path::Path,
    images: &[std::path::PathBuf],
    dir: Option<&std::path::Path>,
    clip: Option<&std::path::Path>,
    device: &str,
    faces: Option<sd2::faces::FaceConfig>,
    frames: usize,
    annotate: Option<&std::path::Path>,
) -> sd2::Result<()> {
    if let Some(d) = annotate {
        std::fs::create_dir_all(d)
            .map_err(|e| sd2::Error::Msg(format!("--annotate {}: {e}", d.display())))?;
    }
    // Annotated copies: `DIR/STEM[SUFFIX].jpg`, a number added when two inputs share a stem.
    let used = std::cell::RefCell::new(std::collections::HashSet::new());
    let out_name = |input: &std::path::Path, suffix: &str| {
        let dir = annotate?;
        let stem = input.file_stem()?.to_string_lossy().into_owned();
        let mut used = used.borrow_mut();
        let mut k = 1;
        loop {
            let n = if k == 1 {
                format!("{stem}{suffix}.jpg")
            } else {
                format!("{stem}-{k}{suffix}.jpg")
            };
            if used.insert(n.clone()) {
                return Some(dir.join(n));
            }
            k += 1;
        }
    };
    // Where an input's annotated copy went, or why it did not; None without --annotate.
    let annotate_image = |p: &std::path::Path, faces: &[sd2::sd2::detector::FaceScore]| {
        let out = out_name(p, "")?;
        let r = sd2::clip::preprocess::decode_image(p)
            .and_then(|img| sd2::eval::plot::write_annotated(&out, &img, faces));
        Some(
            r.map(|()| out.display().to_string())
                .map_err(|e| e.to_string()),
        )
    };
    let annotate_video = |p: &std::path::Path, v: &sd2::sd2::detector::VideoVerdict| {
        annotate?;
        let mut written = vec![];
        let r = sd2::video::sample_frames(p, frames, |_, frame| {
            let Some(f) = v.frames.iter().find(|f| f.index == frame.index) else {
                return Ok(());
            };
            if f.verdict.faces.is_empty() {
                return Ok(());
            }
            if let Some(out) = out_name(p, &format!(".f{:05}", frame.index)) {
                sd2::eval::plot::write_annotated(&out, &frame.image, &f.verdict.faces)?;
                written.push(out.display().to_string());
            }
            Ok(())
        });
        Some(r.map(|_| written.join(", ")).map_err(|e| e.to_string()))
    };
    let note = |line: &mut serde_json::Value, r: Option<Result<String, String>>| {
        if let Some(o) = line.as_object_mut() {
            match r {
                Some(Ok(at)) => {
                    o.insert("annotated".into(), at.into());
                }
                Some(Err(e)) => {
                    o.insert("annotate_error".into(), e.into());
                }
                None => {}
            }
        }
    };
    let device = sd2::Device::parse(device)?;
    device.check_available()?;
    // Checked before the model loads: a bad flag fails fast.
    let mut faces = faces.map(sd2::faces::FaceDetector::new).transpose()?;
    let mut paths = images.to_vec();
    if let Some(d) = dir {
        paths.extend(sd2::fs::image_files(d)?);
    }
    if paths.is_empty() {
        return Err(sd2::Error::Msg(
            "predict: give image or video paths, or --dir".into(),
        ));
    }
    let det = sd2::sd2::detector::Detector::load(checkpoint, clip, device)?;
    // One JSON line per input, a bad file's line holding its error; the exit status says
    // whether any failed.
    let error_line = |p: &std::path::Path, e: sd2::Error| serde_json::json!({"path": p.display().to_string(), "status": "error", "error": e.to_string()});
    let mut failed = 0;
    // Inputs in order: runs of images scored together, each video on its own.
    let mut rest: &[std::path::PathBuf] = &paths;
    while let Some(first) = rest.first() {
        if sd2::video::is_video(first) {
            let line = match faces.as_mut() {
                Some(faces) => match det.detect_video(faces, first, frames, 32) {
                    Ok(v) => {
                        let mut line =
                            sd2::sd2::detector::json_line(&first.display().to_string(), &v);
                        note(&mut line, annotate_video(first, &v));
                        line
                    }
                    Err(e) => {
                        failed += 1;
                        error_line(first, e)
                    }
                },
                None => {
                    failed += 1;
                    error_line(
                        first,
                        sd2::Error::Msg(
                            "a video is judged by its faces: drop --no-face-crop".into(),
                        ),
                    )
                }
            };
            println!("{line}");
            rest = &rest[1..];
            continue;
        }
        let n = rest
            .iter()
            .position(|p| sd2::video::is_video(p))
            .unwrap_or(rest.len());
        let (images, after) = rest.split_at(n);
        rest = after;
        failed += match faces.as_mut() {
            Some(faces) => det.detect_files_faces(images, 32, faces, |p, v| {
                let line = match v {
                    Ok(v) => {
                        let mut line = sd2::sd2::detector::json_line(&p.display().to_string(), &v);
                        if !v.faces.is_empty() {
                            note(&mut line, annotate_image(p, &v.faces));
                        }
                        line
                    }
                    Err(e) => error_line(p, e),
                };
                println!("{line}");
            })?,
            None => det.detect_files(images, 32, |p, pred| {
                let line = match pred {
                    Ok(pred) => {
                        sd2::sd2::detector::prediction_json(&p.display().to_string(), &pred)
                    }
                    Err(e) => error_line(p, e),
                };
                println!("{line}");
            })?,
        };
    }
    if failed > 0 {
        return Err(sd2::Error::Msg(format!(
            "predict: {failed} of {} inputs could not be read (their lines hold the errors)",
            paths.len()
        )));
    }
    Ok(())
}

fn train(
    config: Option<&std::path::Path>,
    preset: Option<&str>,
    sets: &[String],
    print_config: bool,
    nproc: Option<usize>,
    resume: Option<Option<std::path::PathBuf>>,
    overwrite: bool,
) -> sd2::Result<()> {
    use sd2::run::Start;
    let cfg = match &resume {
        // The run folder's own config, then the overrides; `out` is that folder.
        Some(Some(dir)) => {
            if config.is_some() {
                return Err(sd2::Error::Msg(
                    "--resume DIR takes DIR's own config.toml: give --config with a bare \
                     --resume (its `out` is the run), or --set to override"
                        .into(),
                ));
            }
            let file = dir.join("config.toml");
            if !file.is_file() {
                return Err(sd2::Error::Msg(format!(
                    "--resume {}: no config.toml there (not a run folder)",
                    dir.display()
                )));
            }
            let mut sets = sets.to_vec();
            sets.push(format!(
                "out={}",
                toml::Value::String(dir.display().to_string())
            ));
            sd2::run::load_config(Some(&file), preset, &sets)?
        }
        _ => sd2::run::load_config(config, preset, sets)?,
    };
    let start = match (resume.is_some(), overwrite) {
        (true, _) => Start::Resume,
        (false, true) => Start::Overwrite,
        (false, false) => Start::Fresh,
    };
    if print_config {
        print!(
            "{}",
            toml::to_string(&cfg).map_err(|e| sd2::Error::Msg(e.to_string()))?
        );
        return Ok(());
    }
    if let Some(n) = nproc {
        return launch_local(n, &cfg.device, &[]);
    }
    let launch = sd2::dist::Launch::from_env()?;
    if !launch.is_distributed() {
        let o = sd2::run::train_with(&cfg, start, &mut CliProgress::new())?;
        println!(
            "best validation AUC {:.4}; checkpoint {}",
            o.best_val_auc,
            o.best_dir.display()
        );
        return Ok(());
    }
    let device = sd2::run::rank_device(&cfg.device, launch.local_rank)?;
    let comm = sd2::dist::init(&launch, device)?;
    let rank = launch.rank;
    abort_on_panic(rank);
    let res = if rank == 0 {
        sd2::run::train_dist(&cfg, start, &mut CliProgress::new(), &comm)
    } else {
        sd2::run::train_dist(&cfg, start, &mut RankProgress(rank), &comm)
    };
    match res {
        Ok(o) => {
            comm.barrier()?;
            if rank == 0 {
                println!(
                    "best validation AUC {:.4}; checkpoint {} ({} ranks, {})",
                    o.best_val_auc,
                    o.best_dir.display(),
                    launch.world,
                    comm.backend()
                );
            }
            Ok(())
        }
        Err(e) => {
            // The other ranks would wait for this one in their next collective: end the job.
            eprintln!("error: rank {rank} of {}: {e}", launch.world);
            comm.abort(1)
        }
    }
}

/// A panic unwinding into MPI_Finalize (or NCCL's destroy) would wait forever for the ranks
/// still in a collective: a panicking rank ends its process at once, which ends the job
/// (mpirun, srun and torchrun stop the rest; our rendezvous links do too).
fn abort_on_panic(rank: usize) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("error: rank {rank}: a panic ends the job");
        std::process::abort();
    }));
}

/// Progress of a rank other than 0: its own lines (a skipped image), prefixed; no bar.
struct RankProgress(usize);

impl sd2::run::Progress for RankProgress {
    fn line(&mut self, text: &str) {
        println!("[rank {}] {text}", self.0);
    }
}

/// `sd2 train --nproc N`: this same command as N ranks of one machine — under `mpirun` on the
/// CPU, or as N children with torchrun's variables (one GPU each) on CUDA, supervised: the first
/// to fail stops the others, and the exit status is the first failure's.
fn launch_local(n: usize, device: &str, env: &[(&str, String)]) -> sd2::Result<()> {
    if n == 0 {
        return Err(sd2::Error::invalid("--nproc", "must be ≥ 1"));
    }
    if std::env::var_os("RANK").is_some() || std::env::var_os("OMPI_COMM_WORLD_RANK").is_some() {
        return Err(sd2::Error::invalid(
            "--nproc",
            "this process was started by a launcher already (RANK or OMPI_COMM_WORLD_RANK is set)",
        ));
    }
    let exe = std::env::current_exe()?;
    // The same arguments less --nproc.
    let mut args: Vec<String> = vec![];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--nproc" {
            it.next();
        } else if !a.starts_with("--nproc=") {
            args.push(a);
        }
    }
    let on_cpu = matches!(sd2::Device::parse(device)?, sd2::Device::Cpu);
    if on_cpu {
        let mut cmd = std::process::Command::new("mpirun");
        cmd.arg("-np").arg(n.to_string()).arg("--oversubscribe");
        // Open MPI refuses root unless told (containers, CI).
        if std::env::var("USER").as_deref() == Ok("root")
            || std::fs::metadata("/proc/self")
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
                .unwrap_or(false)
        {
            cmd.arg("--allow-run-as-root");
        }
        for (k, v) in env {
            cmd.env(k, v).arg("-x").arg(k);
        }
        let status = cmd.arg(&exe).args(&args).status().map_err(|e| {
            sd2::Error::invalid(
                "--nproc",
                format!(
                    "cannot run mpirun ({e}): training on the CPU across processes needs Open MPI"
                ),
            )
        })?;
        return match status.code() {
            Some(0) => Ok(()),
            c => Err(sd2::Error::Msg(format!("mpirun -np {n} exited with {c:?}"))),
        };
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut children = vec![];
    for rank in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .spawn()?;
        children.push(child);
    }
    let mut failed: Option<(usize, Option<i32>)> = None;
    let mut running = n;
    while running > 0 {
        running = 0;
        for (rank, c) in children.iter_mut().enumerate() {
            match c.try_wait()? {
                None => running += 1,
                Some(st) if !st.success() && failed.is_none() => failed = Some((rank, st.code())),
                Some(_) => {}
            }
        }
        if failed.is_some() {
            for c in children.iter_mut() {
                c.kill().ok();
            }
            for c in children.iter_mut() {
                c.wait().ok();
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match failed {
        None => Ok(()),
        Some((rank, code)) => Err(sd2::Error::Msg(format!(
            "rank {rank} of {n} failed (exit status {code:?}); the other ranks were stopped"
        ))),
    }
}

/// The library's `log` records on stderr, at the level `SD2_LOG` names (default `warn`).
struct StderrLog(log::LevelFilter);

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("sd2: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn init_log() -> Result<(), String> {
    let level = match std::env::var("SD2_LOG") {
        Ok(v) => v
            .parse::<log::LevelFilter>()
            .map_err(|_| format!("SD2_LOG={v}: expected off, error, warn, info, debug or trace"))?,
        Err(_) => log::LevelFilter::Warn,
    };
    log::set_max_level(level);
    log::set_logger(Box::leak(Box::new(StderrLog(level)))).map_err(|e| e.to_string())
}

/// The process's peak resident memory (VmHWM), where the OS reports it (Linux).
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    Some(kb.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()? * 1024)
}

fn main() {
    if let Err(e) = init_log() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Info => {
            info();
            Ok(())
        }
        Cmd::Clip {
            cmd:
                ClipCmd::Embed {
                    model,
                    images,
                    pixel_values,
                    texts_file,
                    out,
                    device,
                    batch,
                },
        } => sd2::Device::parse(&device).and_then(|device| {
            clip_embed(sd2::clip::embed::EmbedRequest {
                model,
                images,
                pixel_values,
                texts_file,
                out,
                device,
                batch,
            })
        }),
        Cmd::Describe {
            clip,
            manifest,
            out,
            device,
            batch,
            all,
            skip_bad,
        } => (|| {
            let device = sd2::Device::parse(&device)?;
            device.check_available()?;
            let model = sd2::clip::ClipModel::load(&clip, sd2::DType::F32, device)?;
            let d = sd2::data::describe::Describer::new(model)?;
            let t = std::time::Instant::now();
            let r = sd2::data::describe::describe_manifest(
                &d, &manifest, &out, device, batch, all, skip_bad,
            )?;
            for (line, why) in r.bad.iter().take(20) {
                eprintln!("line {line} left as it was: {why}");
            }
            println!(
                "{} lines described, {} kept as they were, {} unreadable → {} in {:.1}s",
                r.described,
                r.kept,
                r.bad.len(),
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        })(),
        Cmd::Export {
            checkpoint,
            peft,
            clip,
            base,
        } => sd2::sd2::detector::Detector::load(&checkpoint, Some(&clip), sd2::Device::Cpu)
            .and_then(|det| {
                let base = base.unwrap_or_else(|| clip.display().to_string());
                sd2::sd2::export::export_peft(&det.model, &peft, &base)?;
                println!(
                    "PEFT adapter of {} → {}",
                    checkpoint.display(),
                    peft.display()
                );
                Ok(())
            }),
        Cmd::Parity {
            model,
            checkpoint,
            reference,
            device,
            dtype,
            atol,
            rtol,
            json,
        } => (|| {
            let dtype = match dtype.as_deref() {
                None => None,
                Some("f32") => Some(sd2::DType::F32),
                Some("bf16") => Some(sd2::DType::BF16),
                Some("f64") => Some(sd2::DType::F64),
                Some(other) => {
                    return Err(sd2::Error::invalid(
                        "--dtype",
                        format!("`{other}`: expected f32, bf16 or f64"),
                    ))
                }
            };
            let tolerance = match (atol, rtol) {
                (None, None) => None,
                (a, r) => {
                    let d = sd2::parity::Tolerance::for_dtype(dtype.unwrap_or(sd2::DType::F32));
                    Some(sd2::parity::Tolerance {
                        atol: a.unwrap_or(d.atol),
                        rtol: r.unwrap_or(d.rtol),
                    })
                }
            };
            let report = sd2::parity::run(&sd2::parity::ParityRequest {
                model,
                checkpoint,
                reference,
                device: sd2::Device::parse(&device)?,
                dtype,
                tolerance,
            })?;
            print!("{}", sd2::parity::format_report(&report));
            if let Some(j) = json {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| sd2::Error::parse("parity report", e))?;
                sd2::fs::write_atomic(&j, text.as_bytes())?;
            }
            if report.passed() {
                Ok(())
            } else {
                Err(sd2::Error::mismatch(
                    "parity",
                    format!("{} of the comparisons failed", report.failures()),
                ))
            }
        })(),
        Cmd::Pack {
            manifest,
            out,
            shard_size,
            size,
            face_crop,
            faces,
            format,
            quality,
            skip_bad,
            keep_order,
            seed,
        } => (|| {
            use sd2::data::shards::{PackFormat, PackOptions};
            let format = match format.as_str() {
                "keep" => PackFormat::Keep,
                "jpg" | "jpeg" => PackFormat::Jpeg,
                "png" => PackFormat::Png,
                f => {
                    return Err(sd2::Error::Config {
                        key: "--format".into(),
                        msg: format!("`{f}`: give keep, jpg or png"),
                    })
                }
            };
            if !(1..=100).contains(&quality) || size.is_some_and(|s| !(8..=4096).contains(&s)) {
                return Err(sd2::Error::Config {
                    key: "--quality/--size".into(),
                    msg: "quality must be in 1..=100 and size in 8..=4096".into(),
                });
            }
            let o = PackOptions {
                shard_bytes: sd2::data::shards::parse_size(&shard_size)?,
                size,
                faces: face_crop.then(|| faces.config()),
                format,
                quality,
                skip_bad,
                shuffle: (!keep_order).then_some(seed),
            };
            pack(&manifest, &out, &o)
        })(),
        Cmd::Import(ImportCmd::Deepfakebench {
            json,
            root,
            out,
            map,
            frames_per_video,
            check_files,
            resplit,
            seed,
        }) => import_deepfakebench(
            &json,
            root,
            &out,
            &map,
            frames_per_video,
            check_files,
            resplit.as_deref().map(|r| (r, seed)),
        ),
        Cmd::Synth {
            out,
            n,
            size,
            seed,
            shortcut,
            jpeg,
        } => synth(&out, n, size, seed, shortcut, jpeg),
        Cmd::Train {
            config,
            preset,
            sets,
            print_config,
            resume,
            overwrite,
            nproc,
        } => train(
            config.as_deref(),
            preset.as_deref(),
            &sets,
            print_config,
            nproc,
            resume,
            overwrite,
        ),
        Cmd::Eval {
            checkpoint,
            manifest,
            split,
            out,
            clip,
            skip_bad,
            device,
            perturb,
        } => eval_request(
            checkpoint, manifest, &split, out, clip, skip_bad, &device, &perturb,
        )
        .and_then(eval),
        Cmd::Probe {
            checkpoint,
            manifest,
            out,
            c,
            clip,
            skip_bad,
            device,
        } => sd2::Device::parse(&device).and_then(|device| {
            probe(sd2::eval::probe::ProbeRequest {
                checkpoint,
                manifest,
                out,
                c,
                clip,
                skip_bad,
                device,
            })
        }),
        Cmd::Ablation { out, run } => ablation(&out, &run),
        Cmd::Kernels => {
            print!("{}", sd2::backend::cuda::resources_table());
            Ok(())
        }
        Cmd::Bench(BenchCmd::Loader {
            manifest,
            size,
            batch,
            limit,
            stages,
            shards,
            json,
        }) => bench_loader(
            &manifest,
            size,
            batch,
            limit,
            stages,
            shards.as_deref(),
            json.as_deref(),
        ),
        Cmd::Bench(BenchCmd::Flash {
            batch,
            warmup,
            iters,
            json,
        }) => bench_flash(batch, warmup, iters.max(1), json.as_deref()),
        Cmd::Bench(BenchCmd::Lora {
            warmup,
            iters,
            json,
        }) => bench_lora(warmup, iters.max(1), json.as_deref()),
        Cmd::Bench(BenchCmd::Train { m }) => bench_model(m, true),
        Cmd::Bench(BenchCmd::Infer { m }) => bench_model(m, false),
        Cmd::Bench(BenchCmd::Gemm {
            batch,
            plain_only,
            warmup,
            iters,
            json,
        }) => bench_gemm(batch, plain_only, warmup, iters.max(1), json.as_deref()),
        Cmd::Predict {
            checkpoint,
            images,
            dir,
            clip,
            device,
            no_face_crop,
            faces,
            frames,
            annotate,
        } => predict(
            &checkpoint,
            &images,
            dir.as_deref(),
            clip.as_deref(),
            &device,
            (!no_face_crop).then(|| faces.config()),
            frames,
            annotate.as_deref(),
        ),
        #[cfg(feature = "server")]
        Cmd::Serve {
            checkpoint,
            clip,
            device,
            host,
            port,
            s,
        } => serve(&checkpoint, clip, &device, (host, port).into(), &s),
        #[cfg(feature = "server")]
        Cmd::Bench(BenchCmd::Serve {
            checkpoint,
            device,
            clients,
            requests,
            unbatched_requests,
            image,
            face_crop,
            json,
            s,
        }) => bench_serve(
            checkpoint,
            &device,
            clients,
            requests,
            unbatched_requests,
            image.as_deref(),
            face_crop,
            json.as_deref(),
            &s,
        ),
        Cmd::Tokenize {
            texts_file,
            context,
            tokenizer,
        } => tokenize(&texts_file, context, tokenizer.as_deref()),
        Cmd::Demo { out, run } => demo(&out, &run),
    };
    if let Some(b) = peak_resident_bytes() {
        log::info!(
            "peak resident memory {:.1} MiB",
            b as f64 / (1 << 20) as f64
        );
    }
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
