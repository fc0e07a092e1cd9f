//! Scoring an image held in memory with a checkpoint: the encoded bytes (from a file, an
//! upload, a database) decoded, judged whole and, if faces are found, face by face.
//!
//!     cargo run --release --example detect_bytes -- CHECKPOINT_DIR IMAGE [CLIP_DIR]
use sd2::{Detector, Device, FaceConfig, FaceDetector};

fn main() -> sd2::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(ckpt), Some(image)) = (args.next(), args.next()) else {
        eprintln!("usage: detect_bytes CHECKPOINT_DIR IMAGE [CLIP_DIR]");
        std::process::exit(2);
    };
    let clip = args.next();
    let det = Detector::load(
        ckpt.as_ref(),
        clip.as_deref().map(|c| c.as_ref()),
        Device::Cpu,
    )?;
    let bytes = std::fs::read(&image).map_err(|e| sd2::Error::Msg(format!("{image}: {e}")))?;
    let img = sd2::clip::preprocess::decode_image_bytes(&bytes, &image)?;
    let whole = &det.detect(std::slice::from_ref(&img))?[0];
    println!(
        "whole image: {} (fake score {:.3}, fake at 0.5: {})",
        whole.label,
        whole.fake_score,
        whole.is_fake(0.5)
    );
    let mut faces = FaceDetector::new(FaceConfig::default())?;
    let verdict = det.detect_faces(&mut faces, &img)?;
    println!(
        "{}",
        serde_json::to_string(&verdict).map_err(|e| sd2::Error::Msg(e.to_string()))?
    );
    Ok(())
}
