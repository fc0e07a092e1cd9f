//! Scoring an image held in memory with a checkpoint: the encoded bytes (from a file, an
//! upload, a database) decoded, judged whole and, if faces are found, face by face.
//!
//!     cargo run --release --example detect_bytes -- CHECKPOINT_DIR IMAGE [CLIP_DIR]
use sd2::{Detector, FaceConfig, FaceDetector};

fn main() -> sd2::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(ckpt), Some(image)) = (args.next(), args.next()) else {
        eprintln!("usage: detect_bytes CHECKPOINT_DIR IMAGE [CLIP_DIR]");
        std::process::exit(2);
    };
    let mut builder = Detector::builder(&ckpt).batch_size(16);
    if let Some(clip) = args.next() {
        builder = builder.clip(clip);
    }
    let det = builder.build()?;
    let bytes = std::fs::read(&image).map_err(|e| sd2::Error::read(image.as_ref(), e))?;
    let whole = det.detect_bytes(&bytes)?;
    println!(
        "whole image: {} (fake score {:.3}; threshold {:.3}{}: {})",
        whole.label,
        whole.fake_score,
        det.threshold(),
        if det.has_validation_threshold() {
            ", chosen on validation data"
        } else {
            ""
        },
        if det.is_fake(&whole) { "fake" } else { "real" }
    );
    let img = sd2::clip::preprocess::decode_image_bytes(&bytes, &image)?;
    let mut faces = FaceDetector::new(FaceConfig::default())?;
    let verdict = det.detect_faces(&mut faces, &img)?;
    println!(
        "{}",
        serde_json::to_string(&verdict).map_err(|e| sd2::Error::Msg(e.to_string()))?
    );
    Ok(())
}
