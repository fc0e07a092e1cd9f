//! `sd2 clip embed` end to end: pixel values, image files and texts in; f32 safetensors out,
//! equal to the library's (and, on the fixture, to transformers').
#[path = "common/clip.rs"]
mod clip_common;

use clip_common::{compare, fixture, load_map};
use sd2::clip::{ClipConfig, ClipModel, ClipTokenizer};
use sd2::{DType, Device, Tensor};

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sd2-cli-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sd2(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn embed_pixel_values_and_images() {
    let d = tmpdir("px");
    let model = fixture("clip_tiny_a");
    let exp = load_map(&model.join("expected.safetensors"));
    let pv = d.join("pv.safetensors");
    sd2::io::save(&pv, &[("pixel_values", &exp["pixel_values"])], None).unwrap();
    let out = d.join("out.safetensors");
    let r = sd2(&[
        "clip",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--pixel-values",
        pv.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "1",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = load_map(&out);
    assert_eq!(got["image_embeds"].dtype(), DType::F32);
    compare(
        "cli image_embeds vs transformers",
        &got["image_embeds"],
        &exp["image_embeds"],
        1e-5,
    );
    assert!(!got.contains_key("text_embeds"));

    // Image files go through the preprocessing at the model's image size.
    let imgs: Vec<String> = ["square_224", "wide_517x230"]
        .iter()
        .map(|n| {
            fixture("clip_images")
                .join(format!("{n}.png"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let r = sd2(&[
        "clip",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--images",
        &imgs[0],
        &imgs[1],
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = load_map(&out);
    let m = ClipModel::load(&model, DType::F32, Device::Cpu).unwrap();
    let decoded: Vec<_> = imgs
        .iter()
        .map(|p| sd2::clip::preprocess::decode_image(std::path::Path::new(p)).unwrap())
        .collect();
    let px = sd2::clip::preprocess::pixel_values(&decoded, 30, DType::F32, Device::Cpu).unwrap();
    compare(
        "cli image files",
        &got["image_embeds"],
        &m.image_embeds(&px).unwrap(),
        1e-6,
    );

    // Errors: a missing tensor name, an undecodable image, nothing to embed.
    let bad = d.join("bad.safetensors");
    sd2::io::save(&bad, &[("pixels", &exp["pixel_values"])], None).unwrap();
    let r = sd2(&[
        "clip",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--pixel-values",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("pixel_values"));
    let r = sd2(&[
        "clip",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn embed_texts_with_the_full_vocabulary() {
    // A small model with CLIP's real vocabulary, so real token ids can be embedded.
    let d = tmpdir("txt");
    let cfg_json = serde_json::json!({
        "projection_dim": 8,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "image_size": 28, "patch_size": 14},
        "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}
    });
    let cfg = ClipConfig::from_json(&cfg_json.to_string()).unwrap();
    assert_eq!(cfg.text_config.vocab_size, 49408);
    let m = ClipModel::random(&cfg, DType::F32, Device::Cpu, 3).unwrap();
    let named = m.named_tensors();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sd2::io::save(&d.join("model.safetensors"), &refs, None).unwrap();
    std::fs::write(d.join("config.json"), cfg_json.to_string()).unwrap();
    let texts = [
        "a photo of a real face",
        "",
        "a photo of a Face Swapping forgery",
    ];
    std::fs::write(d.join("texts.txt"), texts.join("\n") + "\n").unwrap();
    let out = d.join("out.safetensors");
    let r = sd2(&[
        "clip",
        "embed",
        "--model",
        d.to_str().unwrap(),
        "--texts-file",
        d.join("texts.txt").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = load_map(&out);
    let tk = ClipTokenizer::openai().unwrap();
    let want = m
        .text_embeds(&tk.tokenize_batch(&texts, 77, Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(got["text_embeds"].dims(), &[3, 8]);
    compare("cli text_embeds", &got["text_embeds"], &want, 1e-6);
    std::fs::remove_dir_all(&d).ok();
}
