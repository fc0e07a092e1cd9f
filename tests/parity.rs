//! `sd2 parity` against the shipped script's dumps (tests/fixtures/parity_tiny, made by
//! scripts/reference/make_parity_fixture.sh): a tiny random HF CLIP with an SD2 checkpoint
//! `sd2 train` trained on it (LoRA rank 4, CLAM), compared in float32 and bfloat16; and a
//! dump with one tensor nudged, which must fail naming it.
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use sd2::parity::{self, ParityRequest, Tolerance};
use sd2::{DType, Device, Tensor};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity_tiny")
}

fn request(dump: &str) -> ParityRequest {
    let f = fixture();
    ParityRequest {
        model: f.join("clip"),
        checkpoint: Some(f.join("checkpoint")),
        reference: f.join(dump),
        device: Device::Cpu,
        dtype: None,
        tolerance: None,
    }
}

fn print(r: &parity::ParityReport) {
    print!("{}", parity::format_report(r));
}

/// `dump` compared at its own dtype, which must be `dtype`, under that dtype's default bound.
fn passing(dump: &str, dtype: DType) -> parity::ParityReport {
    let r = parity::run(&request(dump)).unwrap();
    print(&r);
    assert_eq!(r.dtype, dtype);
    assert_eq!(r.tolerance, Tolerance::for_dtype(dtype));
    assert!(r.passed(), "{dtype} parity failed");
    r
}

/// `sd2 parity` on the fixture's model and checkpoint against `reference`.
fn command(reference: &std::path::Path) -> Command {
    let f = fixture();
    let mut c = Command::new(env!("CARGO_BIN_EXE_sd2"));
    c.args(["parity", "--model"])
        .arg(f.join("clip"))
        .arg("--checkpoint")
        .arg(f.join("checkpoint"))
        .arg("--reference")
        .arg(reference);
    c
}

#[test]
fn f32_dump_matches_within_f32_tolerance() {
    let r = passing("reference_float32.safetensors", DType::F32);
    let names: Vec<&str> = r.tensors.iter().map(|t| t.name.as_str()).collect();
    // Tokens, preprocessing of the two face crops, 4 + 3 vision/text states, CLAM, logits.
    for n in [
        "inputs.input_ids",
        "inputs.pixel_values",
        "vision.hidden_states.0",
        "vision.hidden_states.3",
        "vision.pooled",
        "vision.image_embeds",
        "text.hidden_states.2",
        "text.last_hidden_state",
        "text.text_embeds",
        "sd2.clam",
        "sd2.image_features",
        "sd2.class_embeddings",
        "sd2.logits",
        "sd2.probs",
    ] {
        assert!(names.contains(&n), "{n} not compared: {names:?}");
    }
    assert!(r.unmatched.is_empty() && r.notes.is_empty(), "{r:?}");
    // f32 against f32: far inside the bound (a real mismatch is orders of magnitude larger).
    let logits = r.tensors.iter().find(|t| t.name == "sd2.logits").unwrap();
    assert!(logits.rel < 1e-5, "{logits:?}");
}

#[test]
fn bf16_dump_matches_within_bf16_tolerance() {
    let r = passing("reference_bfloat16.safetensors", DType::BF16);
    // The bf16 run really is bf16: its errors are far above f32's bound somewhere.
    let worst = r
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("vision.") || t.name.starts_with("sd2."))
        .map(|t| t.rel)
        .fold(0.0, f64::max);
    assert!(worst > 1e-4, "bf16 errors suspiciously small: {worst:e}");
}

/// The f32 dump with `name` scaled by `factor` at one element, written under `out`.
fn nudged(name: &str, factor: f32, out: &std::path::Path) {
    let src = fixture().join("reference_float32.safetensors");
    let meta: HashMap<String, String> = sd2::io::metadata(&src).unwrap();
    let tensors = sd2::io::load(&src, Device::Cpu).unwrap();
    let mut owned: Vec<(String, Tensor)> = vec![];
    for (n, t) in tensors {
        if n == name {
            let mut v = t.to_vec::<f32>().unwrap();
            v[1] *= factor;
            owned.push((
                n,
                Tensor::from_vec(v, t.dims().to_vec(), Device::Cpu).unwrap(),
            ));
        } else {
            owned.push((n, t));
        }
    }
    let refs: Vec<(&str, &Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sd2::io::save(out, &refs, Some(meta)).unwrap();
}

#[test]
fn a_nudged_tensor_fails_and_is_named_and_the_command_exits_nonzero() {
    let dir = std::env::temp_dir().join(format!("sd2-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("nudged.safetensors");
    nudged("sd2.clam", 1.01, &bad);
    let mut req = request("reference_float32.safetensors");
    req.reference = bad.clone();
    let r = parity::run(&req).unwrap();
    print(&r);
    assert!(!r.passed());
    let failed: Vec<&str> = r
        .tensors
        .iter()
        .filter(|t| !t.pass)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(failed, vec!["sd2.clam"], "only the nudged tensor fails");
    let t = r.tensors.iter().find(|t| t.name == "sd2.clam").unwrap();
    assert_eq!(t.index, vec![0, 1]);
    assert!(t.worst_ratio > 1.0);
    // The image files are not beside the nudged copy: the preprocessing check says so.
    assert!(
        r.notes.iter().any(|n| n.contains("face0.jpg")),
        "{:?}",
        r.notes
    );

    let json = dir.join("report.json");
    let out = command(&bad).arg("--json").arg(&json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert!(!out.status.success());
    assert!(stdout
        .lines()
        .any(|l| l.starts_with("sd2.clam") && l.contains("FAIL")));
    assert!(stdout.contains("FAIL: "), "{stdout}");
    assert!(stderr.contains("parity"), "{stderr}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "sd2.clam" && t["pass"] == false));

    // The good dump through the command: exit 0, PASS.
    let out = command(&fixture().join("reference_bfloat16.safetensors"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("PASS: "));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn plain_clip_without_checkpoint_reports_the_sd2_tensors_unmatched() {
    let mut req = request("reference_float32.safetensors");
    req.checkpoint = None;
    let r = parity::run(&req).unwrap();
    // The CLIP tensors differ (the dump's towers carry the checkpoint's LoRA), and every sd2.*
    // tensor has no counterpart without the checkpoint.
    assert!(!r.passed());
    assert!(r.unmatched.iter().any(|n| n == "sd2.logits"), "{r:?}");
    assert!(r.notes.iter().any(|n| n.contains("checkpoint")));
}

#[test]
fn a_file_that_is_not_a_parity_dump_is_an_error_naming_it() {
    let mut req = request("reference_float32.safetensors");
    req.reference = fixture().join("clip/model.safetensors");
    let e = parity::run(&req).unwrap_err();
    assert!(matches!(e, sd2::Error::Parse { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors") && e.to_string().contains("sd2-parity/1"));
    req.reference = fixture().join("missing.safetensors");
    let e = parity::run(&req).unwrap_err();
    assert!(e.is_not_found(), "{e}");
}
