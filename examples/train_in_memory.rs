//! Training through the library, no files in: a small random CLIP (the `tiny` preset's),
//! SD2 on top of it, two optimizer steps on in-memory batches, a checkpoint out.
//!
//!     cargo run --release --example train_in_memory -- [CHECKPOINT_DIR]
use sd2::clip::ClipTokenizer;
use sd2::sd2::train::MicroBatch;
use sd2::sd2::TypeTexts;
use sd2::{ClipModel, DType, Device, Sd2Model, Tensor, TrainConfig, Trainer};

fn main() -> sd2::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/example-checkpoint".into());
    let clip_cfg = sd2::presets::tiny_clip_config();
    let clip = ClipModel::random(&clip_cfg, DType::F32, Device::Cpu, 0)?;
    let model = Sd2Model::new(clip, sd2::presets::tiny_sd2_config(), 0)?;
    let mut trainer = Trainer::new(
        model,
        TrainConfig {
            total_steps: 2,
            ..sd2::presets::tiny_train_config()
        },
        ClipTokenizer::openai()?,
        TypeTexts::shipped()?,
    );
    let size = clip_cfg.vision_config.image_size;
    for step in 0..2u64 {
        // Eight images [8, 3, size, size] as CLIP preprocessing would give them, with their
        // classes (0 real, 1 fs, 2 fr, 3 efs, 4 fe) and descriptions.
        let pixels = Tensor::randn((8, 3, size, size), 1.0, DType::F32, Device::Cpu, step)?;
        let batch = MicroBatch {
            pixel_values: pixels,
            labels: vec![0, 1, 2, 3, 4, 0, 1, 0],
            face: vec!["a young adult with short dark hair, smiling".into(); 8],
            env: vec!["indoors, in soft indoor light, in front of a plain wall".into(); 8],
        };
        let log = trainer.step(&[batch])?;
        println!(
            "step {}: loss {:.4} (L_C {:.4})",
            step + 1,
            log.total,
            log.l_c
        );
    }
    trainer.save(std::path::Path::new(&out), None)?;
    println!("checkpoint → {out}");
    Ok(())
}
