//! Inference from a checkpoint, LoRA merging, and the peft export.
#[path = "common/clip.rs"]
mod clip_common;
mod common;

use clip_common::{compare, fixture, load_map};
use sd2::clip::{ClipConfig, ClipModel, ClipTokenizer, Fwd};
use sd2::rng::Rng;
use sd2::sd2::detector::Detector;
use sd2::sd2::export::export_peft;
use sd2::sd2::train::{MicroBatch, TrainConfig, Trainer};
use sd2::sd2::{Sd2Config, Sd2Model, TypeTexts};
use sd2::{no_grad, DType, Device, Tensor};

const CLIP_JSON: &str = r#"{"projection_dim": 16,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 28, "patch_size": 14},
    "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}}"#;

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sd2-det-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny CLIP with the real vocabulary, saved as a HF folder.
fn clip_folder(dir: &std::path::Path) -> ClipModel {
    let cfg = ClipConfig::from_json(CLIP_JSON).unwrap();
    let m = ClipModel::random(&cfg, DType::F32, Device::Cpu, 21).unwrap();
    let named = m.named_tensors();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sd2::io::save(&dir.join("model.safetensors"), &refs, None).unwrap();
    std::fs::write(dir.join("config.json"), CLIP_JSON).unwrap();
    m
}

fn trained(clip: ClipModel) -> Trainer {
    let mut cfg = Sd2Config::default();
    cfg.lora.rank = 4;
    cfg.clam_heads = 4;
    let model = Sd2Model::new(clip, cfg, 1).unwrap();
    let mut t = Trainer::new(
        model,
        TrainConfig {
            lr: 1e-2,
            total_steps: 3,
            seed: 2,
            ..Default::default()
        },
        ClipTokenizer::openai().unwrap(),
        TypeTexts::shipped().unwrap(),
    );
    let mut r = Rng::new(3);
    for _ in 0..3 {
        let px: Vec<f64> = (0..4 * 3 * 28 * 28).map(|_| r.normal()).collect();
        let mb = MicroBatch {
            pixel_values: Tensor::from_f64(&px, (4, 3, 28, 28), DType::F32, Device::Cpu).unwrap(),
            labels: vec![0, 1, 2, 4],
            face: vec!["a smiling woman".into(); 4],
            env: vec!["indoor, warm light".into(); 4],
        };
        t.step(&[mb]).unwrap();
    }
    t
}

#[test]
fn detector_from_checkpoint_and_merged_lora() {
    let d = tmpdir("load");
    let clip = clip_folder(&d);
    let t = trained(clip);
    t.save(&d.join("ckpt"), None).unwrap();
    let imgs: Vec<_> = ["square_224", "landscape_300x200", "small_97x150"]
        .iter()
        .map(|n| {
            sd2::clip::preprocess::decode_image(&fixture("clip_images").join(format!("{n}.png")))
                .unwrap()
        })
        .collect();
    let mut det = Detector::load(&d.join("ckpt"), Some(&d), Device::Cpu).unwrap();
    let preds = det.detect(&imgs).unwrap();
    assert_eq!(preds.len(), 3);
    for p in &preds {
        let s: f64 = p.probs.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "probabilities sum to {s}");
        assert!((p.fake_score - (1.0 - p.probs[0])).abs() < 1e-12);
        assert_eq!(p.label.name(), sd2::sd2::CLASSES[p.class]);
        println!("{p:?}");
    }
    // The same model straight from the trainer predicts the same.
    let direct = Detector::from_model(
        t.model,
        &ClipTokenizer::openai().unwrap(),
        &TypeTexts::shipped().unwrap(),
    )
    .unwrap();
    let again = direct.detect(&imgs).unwrap();
    for (a, b) in preds.iter().zip(&again) {
        assert_eq!(a.probs, b.probs);
    }
    // LoRA merged into the weights: same predictions up to rounding.
    det.merge_lora().unwrap();
    assert!(det.model.clip.vision.layers[0].q_proj.lora.is_none());
    let merged = det.detect(&imgs).unwrap();
    for (a, b) in preds.iter().zip(&merged) {
        for j in 0..5 {
            assert!(
                (a.probs[j] - b.probs[j]).abs() < 1e-5,
                "merged {:?} vs {:?}",
                b.probs,
                a.probs
            );
        }
    }
    // A CLIP folder that does not match the checkpoint.
    let other = tmpdir("other");
    std::fs::write(
        other.join("config.json"),
        CLIP_JSON.replace("\"projection_dim\": 16", "\"projection_dim\": 8"),
    )
    .unwrap();
    let cfg = ClipConfig::from_json(&std::fs::read_to_string(other.join("config.json")).unwrap())
        .unwrap();
    let m = ClipModel::random(&cfg, DType::F32, Device::Cpu, 1).unwrap();
    let named = m.named_tensors();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sd2::io::save(&other.join("model.safetensors"), &refs, None).unwrap();
    let e = Detector::load(&d.join("ckpt"), Some(&other), Device::Cpu)
        .err()
        .expect("mismatch must fail");
    assert!(matches!(e, sd2::Error::Mismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("does not match"), "{e}");
    std::fs::remove_dir_all(&d).ok();
    std::fs::remove_dir_all(&other).ok();
}

/// The builder's options: batch splitting, a thread pool, merged LoRA and bf16 give the
/// predictions of the plain f32 detector (bf16 within its rounding); bytes are decoded as files
/// are; the validation threshold comes from state.json, and a bad one is refused.
#[test]
fn detector_builder_options() {
    let d = tmpdir("builder");
    let clip = clip_folder(&d);
    let t = trained(clip);
    let ck = d.join("ckpt");
    t.save(&ck, None).unwrap();
    let names = ["square_224", "landscape_300x200", "small_97x150"];
    let files: Vec<_> = names
        .iter()
        .map(|n| fixture("clip_images").join(format!("{n}.png")))
        .collect();
    let imgs: Vec<_> = files
        .iter()
        .map(|f| sd2::clip::preprocess::decode_image(f).unwrap())
        .collect();
    let plain = Detector::load(&ck, Some(&d), Device::Cpu).unwrap();
    let want = plain.detect(&imgs).unwrap();
    assert_eq!(plain.batch_size(), sd2::sd2::detector::DEFAULT_BATCH_SIZE);
    assert!(!plain.has_validation_threshold());
    assert_eq!(plain.threshold(), 0.5);
    // The class serializes as its name.
    let j = serde_json::to_value(&want[0]).unwrap();
    assert_eq!(j["label"], want[0].label.name());
    assert_eq!(sd2::Class::from_index(want[0].class), Some(want[0].label));

    let worst = |got: &[sd2::Prediction], tol: f64, what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        let (mut w, mut at) = (0.0f64, (0, 0));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            for j in 0..5 {
                let e = (a.probs[j] - b.probs[j]).abs();
                if e > w {
                    (w, at) = (e, (i, j));
                }
            }
        }
        println!(
            "{what}: worst |Δp| {w:e} at image {} class {} (tol {tol:e})",
            at.0, at.1
        );
        assert!(w <= tol, "{what}: worst |Δp| {w:e} > {tol:e}");
    };
    // One image per model call, on a pool of two threads: the same numbers up to the GEMM's
    // summation order (which depends on the batch).
    let split = Detector::builder(&ck)
        .clip(&d)
        .batch_size(1)
        .threads(2)
        .build()
        .unwrap();
    assert_eq!(split.batch_size(), 1);
    let split_preds = split.detect(&imgs).unwrap();
    worst(&split_preds, 1e-6, "batch_size 1, 2 threads");
    // Merged LoRA.
    let merged = Detector::builder(&ck)
        .clip(&d)
        .merge_lora(true)
        .build()
        .unwrap();
    assert!(merged.model.clip.vision.layers[0].q_proj.lora.is_none());
    worst(&merged.detect(&imgs).unwrap(), 1e-5, "merge_lora");
    // bf16 weights and activations, f32 masters and logits.
    let bf = Detector::builder(&ck)
        .clip(&d)
        .dtype(DType::BF16)
        .build()
        .unwrap();
    assert_eq!(bf.model.dtype(), DType::BF16);
    worst(&bf.detect(&imgs).unwrap(), 2e-2, "bf16");
    // Encoded bytes, one image at a time: as decoded files.
    let from_bytes: Vec<_> = files
        .iter()
        .map(|f| split.detect_bytes(&std::fs::read(f).unwrap()).unwrap())
        .collect();
    for (a, b) in from_bytes.iter().zip(&split_preds) {
        assert_eq!(a.probs, b.probs, "detect_bytes");
    }
    let one = split.detect_image(&imgs[1]).unwrap();
    assert_eq!(one.probs, split_preds[1].probs);
    // Bytes that are not an image: a media error.
    let e = split.detect_bytes(b"not an image at all").unwrap_err();
    assert!(matches!(e, sd2::Error::Media(_)), "{e:?}");
    // Options out of range.
    for b in [
        Detector::builder(&ck).clip(&d).batch_size(0),
        Detector::builder(&ck).clip(&d).threads(0),
        Detector::builder(&ck).clip(&d).dtype(DType::I64),
    ] {
        let e = b.build().err().expect("must be refused");
        assert!(matches!(e, sd2::Error::Config { .. }), "{e:?}");
    }
    // A threshold saved with the checkpoint is the detector's.
    let state = ck.join("state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v["threshold"] = serde_json::json!(0.3);
    std::fs::write(&state, v.to_string()).unwrap();
    let det = Detector::builder(&ck).clip(&d).build().unwrap();
    assert!(det.has_validation_threshold());
    assert_eq!(det.threshold(), 0.3);
    let p = &want[0];
    assert_eq!(det.is_fake(p), p.fake_score >= 0.3);
    v["threshold"] = serde_json::json!(7.0);
    std::fs::write(&state, v.to_string()).unwrap();
    let e = Detector::builder(&ck)
        .clip(&d)
        .build()
        .err()
        .expect("threshold 7");
    assert!(matches!(e, sd2::Error::Checkpoint { .. }), "{e:?}");
    assert!(e.to_string().contains("threshold"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

/// Exports the LoRA of the SD2 parity fixture (non-zero A and B) in peft format, with the
/// embeddings sd2 computes through it. With SD2_PEFT_EXPORT_DIR set the export is kept there for
/// `scripts/reference/peft_check.py`, which loads it with peft and compares.
#[test]
fn peft_export_has_peft_names_and_config() {
    let refs = load_map(&fixture("sd2_tiny").join("reference.safetensors"));
    let cfg: Sd2Config = serde_json::from_str(
        &std::fs::read_to_string(fixture("sd2_tiny").join("sd2_config.json")).unwrap(),
    )
    .unwrap();
    let clip = ClipModel::load(&fixture("clip_tiny_a"), DType::F32, Device::Cpu).unwrap();
    let model = Sd2Model::new(clip, cfg, 0).unwrap();
    let init: Vec<(String, Tensor)> = refs
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("init.").map(|n| (n.to_string(), v.clone())))
        .collect();
    model.set_params(&init).unwrap();
    let dir = std::env::var("SD2_PEFT_EXPORT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmpdir("peft"));
    export_peft(&model, &dir, "tests/fixtures/clip_tiny_a").unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    assert_eq!(cfg_json["lora_alpha"], 16.0);
    let saved = load_map(&dir.join("adapter_model.safetensors"));
    // 2 towers × layers × 4 targets × (A, B).
    assert_eq!(saved.len(), 2 * (3 + 2) * 4);
    let key = "base_model.model.vision_model.encoder.layers.2.self_attn.out_proj.lora_B.weight";
    compare(
        "exported lora_B",
        &saved[key],
        &refs[&format!("init.{key}")],
        1e-7,
    );
    // What peft must reproduce: CLIP's projected embeddings with the adapters active.
    let _g = no_grad();
    let px = &refs["pixel_values"];
    let ie = model
        .clip
        .visual_projection
        .forward(
            &model
                .clip
                .vision
                .forward(px, Default::default(), Fwd::default())
                .unwrap()
                .pooled,
            Fwd::default(),
        )
        .unwrap();
    let te = model
        .text_features(&refs["type_ids"], Fwd::default())
        .unwrap();
    sd2::io::save(
        &dir.join("sd2_check.safetensors"),
        &[
            ("pixel_values", px),
            ("input_ids", &refs["type_ids"]),
            ("image_embeds", &ie),
            ("text_embeds", &te),
        ],
        None,
    )
    .unwrap();
    if std::env::var("SD2_PEFT_EXPORT_DIR").is_err() {
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A picture with no pixels is an error, not a prediction; a model whose CLIP weights were
/// trained (`train_base`) is not exported as a PEFT adapter (the adapter on the released base
/// would be another model).
#[test]
fn empty_images_and_trained_base_exports_are_refused() {
    use sd2::clip::preprocess::RgbImage;
    let d = tmpdir("refuse");
    let clip = ClipModel::random(
        &ClipConfig::from_json(CLIP_JSON).unwrap(),
        DType::F32,
        Device::Cpu,
        5,
    )
    .unwrap();
    let cfg = Sd2Config {
        train_base: true,
        clam_heads: 2,
        ..Default::default()
    };
    let model = Sd2Model::new(clip, cfg, 1).unwrap();
    let e = export_peft(&model, &d.join("peft"), "base").unwrap_err();
    println!("{e}");
    assert!(
        matches!(e, sd2::Error::Config { ref key, .. } if key == "sd2.train_base"),
        "{e}"
    );
    assert!(!d.join("peft").exists(), "nothing written");
    assert!(matches!(
        RgbImage::new(0, 4, vec![]),
        Err(sd2::Error::Media(_))
    ));
    let ck = tmpdir("refuse-ck");
    Trainer::new(
        model,
        TrainConfig::default(),
        ClipTokenizer::openai().unwrap(),
        TypeTexts::shipped().unwrap(),
    )
    .save(&ck, None)
    .unwrap();
    let det = Detector::load(&ck, None, Device::Cpu).unwrap();
    // Its CLIP weights are trained tensors: bf16 is refused, f64 loads them as f64.
    assert!(det.model.cfg.train_base);
    let e = Detector::builder(&ck)
        .dtype(DType::BF16)
        .build()
        .err()
        .expect("bf16");
    assert!(e.to_string().contains("train_base"), "{e}");
    let f64_det = Detector::builder(&ck).dtype(DType::F64).build().unwrap();
    assert_eq!(f64_det.model.dtype(), DType::F64);
    let empty = RgbImage {
        width: 0,
        height: 0,
        data: vec![],
    };
    match det.detect(std::slice::from_ref(&empty)) {
        Err(sd2::Error::Media(m)) => assert!(m.contains("no pixels"), "{m}"),
        other => panic!("an empty image gave {other:?}"),
    }
    let mut faces = sd2::faces::FaceDetector::new(Default::default()).unwrap();
    assert!(matches!(
        det.detect_faces(&mut faces, &empty),
        Err(sd2::Error::Media(_))
    ));
    std::fs::remove_dir_all(&d).ok();
    std::fs::remove_dir_all(&ck).ok();
}

/// `sd2 export`: the adapter files of a checkpoint trained on a CLIP folder; an unknown
/// checkpoint format is refused by the detector as by the trainer.
#[test]
fn export_command_writes_the_peft_adapter() {
    let d = tmpdir("export");
    let clip = clip_folder(&d);
    trained(clip).save(&d.join("ckpt"), None).unwrap();
    let out = d.join("peft");
    let r = common::sd2_cli(&[
        "export",
        "--checkpoint",
        d.join("ckpt").to_str().unwrap(),
        "--clip",
        d.to_str().unwrap(),
        "--peft",
        out.to_str().unwrap(),
        "--base",
        "openai/clip-vit-large-patch14",
    ]);
    println!("{}", String::from_utf8_lossy(&r.stdout));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["base_model_name_or_path"],
        "openai/clip-vit-large-patch14"
    );
    assert_eq!(cfg["r"], 4);
    let names = sd2::io::WeightStore::open(&out.join("adapter_model.safetensors")).unwrap();
    assert!(names.names().any(|n| n.contains("lora_A")));
    // A state.json of another format.
    let state = d.join("ckpt/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["format"] = 7.into();
    std::fs::write(&state, v.to_string()).unwrap();
    let e = Detector::load(&d.join("ckpt"), Some(&d), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown checkpoint format 7"), "{e}");
    // A checkpoint (or manifest) that is not there can be told apart from a broken one.
    let missing = d.join("no-such-checkpoint");
    match Detector::load(&missing, None, Device::Cpu) {
        Err(e @ sd2::Error::Read { .. }) => {
            assert!(
                e.is_not_found() && e.to_string().contains("no-such-checkpoint"),
                "{e}"
            )
        }
        Err(e) => panic!("a missing checkpoint gave {e:?}"),
        Ok(_) => panic!("a missing checkpoint loaded"),
    }
    let m = sd2::data::Manifest::load(&d.join("none.jsonl"), Default::default());
    assert!(m.err().is_some_and(|e| e.is_not_found()));
    std::fs::remove_dir_all(&d).ok();
}
