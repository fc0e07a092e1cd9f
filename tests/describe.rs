//! `sd2 describe` on a tiny random CLIP saved in HuggingFace's layout: lines without
//! descriptions get two sentences and per-attribute scores, which agree with CLIP's own
//! `logits_per_image` softmax over the same prompts; described lines are kept unless `--all`;
//! an unreadable image is a named error, or a listed line with `--skip-bad`.
use std::path::Path;

use sd2::clip::ClipModel;
use sd2::data::describe::{Describer, VOCABULARY};
use sd2::{DType, Device, Tensor};

mod common;
use common::sd2_cli as sd2;

const TINY: &str = r#"{"projection_dim": 64,
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4, "image_size": 64, "patch_size": 8},
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 32}}"#;

fn tiny_clip(dir: &Path) -> ClipModel {
    std::fs::create_dir_all(dir).unwrap();
    let clip = ClipModel::random(
        &sd2::presets::tiny_clip_config(),
        DType::F32,
        Device::Cpu,
        11,
    )
    .unwrap();
    let named = clip.named_tensors();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sd2::io::save(&dir.join("model.safetensors"), &refs, None).unwrap();
    std::fs::write(dir.join("config.json"), TINY).unwrap();
    ClipModel::load(dir, DType::F32, Device::Cpu).unwrap()
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn describe_fills_missing_descriptions_with_clip_zero_shot_choices() {
    let d = std::env::temp_dir().join(format!("sd2-describe-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let clip_dir = d.join("clip");
    let clip = tiny_clip(&clip_dir);
    let m = sd2::data::synth::generate(&d.join("data"), 12, 64, 2).unwrap();
    // The first six lines lose their descriptions.
    let mut recs = lines(&m.path);
    for r in recs.iter_mut().take(6) {
        r["face"] = "".into();
        r.as_object_mut().unwrap().remove("env");
    }
    let src = d.join("data/undescribed.jsonl");
    // A blank line after the eighth: line numbers (which seed augmentations) must not move.
    let body: String = recs
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{r}\n{}", if i == 7 { "\n" } else { "" }))
        .collect();
    std::fs::write(&src, body).unwrap();
    let out = d.join("data/described.jsonl");
    let run = |extra: &[&str], out: &Path| {
        let mut a = vec![
            "describe",
            "--clip",
            clip_dir.to_str().unwrap(),
            "--manifest",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        sd2(&a)
    };
    let r = run(&[], &out);
    let said = String::from_utf8_lossy(&r.stdout);
    println!("{said}{}", String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success());
    assert!(said.contains("6 lines described, 6 kept"), "{said}");
    let got = lines(&out);
    assert_eq!(got.len(), 12);
    let raw = std::fs::read_to_string(&out).unwrap();
    assert_eq!(raw.lines().count(), 13);
    assert!(
        raw.lines().nth(8).unwrap().is_empty(),
        "the blank line kept in place"
    );
    // Kept lines: untouched.
    for (g, w) in got[6..].iter().zip(&recs[6..]) {
        assert_eq!(g, w);
    }
    // Described lines: both sentences, and a choice per attribute that CLIP's own logits
    // (prompts tokenized and embedded again, `logits_per_image`, softmax) agree with.
    let tk = sd2::clip::ClipTokenizer::openai().unwrap();
    let _g = sd2::no_grad();
    let mut worst = 0f32;
    for (i, g) in got[..6].iter().enumerate() {
        let face = g["face"].as_str().unwrap();
        let env = g["env"].as_str().unwrap();
        assert!(
            face.contains(" with ") && env.contains(", in front of "),
            "{face} | {env}"
        );
        let img = sd2::clip::preprocess::decode_image(&m.items[i].path).unwrap();
        let px = Tensor::from_vec(
            sd2::clip::preprocess::preprocess(&img, 64),
            (1, 3, 64, 64),
            Device::Cpu,
        )
        .unwrap();
        let ie = clip.image_embeds(&px).unwrap();
        for a in VOCABULARY {
            let texts = a.prompts();
            let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
            let te = clip
                .text_embeds(&tk.tokenize_batch_longest(&refs, 32, Device::Cpu).unwrap())
                .unwrap();
            let l = clip
                .logits_per_image(&ie, &te)
                .unwrap()
                .to_vec_f64()
                .unwrap();
            let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = l.iter().map(|x| (x - max).exp()).sum();
            let best = l.iter().position(|x| *x == max).unwrap();
            let chosen = &g["describe"][a.name];
            assert_eq!(
                chosen["value"],
                a.options[best].0,
                "line {} {}",
                i + 1,
                a.name
            );
            let err = (chosen["score"].as_f64().unwrap() - 1.0 / z).abs() as f32;
            worst = worst.max(err);
        }
    }
    println!("worst |score − softmax(logits_per_image)|: {worst:e} (tol 1e-4)");
    assert!(worst < 1e-4);
    // The library gives the same sentences.
    let desc = Describer::new(clip).unwrap();
    let img = sd2::clip::preprocess::decode_image(&m.items[0].path).unwrap();
    let px = Tensor::from_vec(
        sd2::clip::preprocess::preprocess(&img, 64),
        (1, 3, 64, 64),
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        desc.describe(&px).unwrap()[0].face,
        got[0]["face"].as_str().unwrap()
    );
    // The output is a manifest with every description, as loss_dual needs.
    let opts = sd2::data::LoadOptions {
        require_descriptions: true,
        ..Default::default()
    };
    assert_eq!(
        sd2::data::Manifest::load(&out, opts).unwrap().items.len(),
        12
    );

    // --all describes every line; another folder gets absolute paths.
    let elsewhere = d.join("other/all.jsonl");
    std::fs::create_dir_all(d.join("other")).unwrap();
    let r = run(&["--all"], &elsewhere);
    assert!(String::from_utf8_lossy(&r.stdout).contains("12 lines described, 0 kept"));
    let all = lines(&elsewhere);
    assert!(all
        .iter()
        .all(|l| Path::new(l["path"].as_str().unwrap()).is_absolute()));
    assert_eq!(
        sd2::data::Manifest::load(&elsewhere, opts)
            .unwrap()
            .items
            .len(),
        12
    );

    // An unreadable image: a named error and nothing written; --skip-bad lists it.
    std::fs::write(&m.items[2].path, b"junk").unwrap();
    let out3 = d.join("data/bad.jsonl");
    let r = run(&[], &out3);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && e.contains("undescribed.jsonl:3"),
        "{e}"
    );
    assert!(!out3.exists());
    let r = run(&["--skip-bad"], &out3);
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && said.contains("5 lines described, 6 kept as they were, 1 unreadable"),
        "{said}"
    );
    std::fs::remove_dir_all(&d).ok();
}
