//! `sd2 train --config FILE.toml [--set k=v]`: layering of preset, file and overrides; a short
//! run writes checkpoints and one JSON line per optimizer step; bad configs are clear errors.
fn sd2(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn train_from_a_config_file() {
    let d = std::env::temp_dir().join(format!("sd2-traincli-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = sd2::data::synth::generate(&d.join("data"), 96, 64, 3).unwrap();
    let cfg = d.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "preset = \"tiny\"\nmanifest = \"{}\"\nout = \"{}\"\nepochs = 3\n\n[train]\nmicro_batch = 8\neffective_batch = 16\nlr = 0.002\n\n[sd2]\nloss_dual = \"face\"\n",
            m.path.display(),
            d.join("run").display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    // Layering: the file overrides the preset, --set overrides the file.
    let r = sd2(&[
        "train",
        "--config",
        c,
        "--set",
        "epochs=1",
        "--set",
        "train.seed=9",
        "--print-config",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&r.stdout)).unwrap();
    assert_eq!(printed["epochs"].as_integer(), Some(1));
    assert_eq!(printed["train"]["seed"].as_integer(), Some(9));
    assert_eq!(printed["train"]["lr"].as_float(), Some(0.002));
    assert_eq!(
        printed["train"]["weight_decay"].as_float(),
        Some(0.01),
        "preset default kept"
    );
    assert_eq!(printed["sd2"]["loss_dual"].as_str(), Some("face"));
    assert_eq!(
        printed["sd2"]["train_base"].as_bool(),
        Some(true),
        "tiny preset trains the base"
    );

    let r = sd2(&["train", "--config", c, "--set", "epochs=1"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("validation AUC") && out.contains("best validation AUC"),
        "{out}"
    );
    assert!(d
        .join("run/checkpoints/best/trainable.safetensors")
        .is_file());
    let log = std::fs::read_to_string(d.join("run/train_log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    for k in [
        "step",
        "l_c",
        "l_s",
        "l_d",
        "total",
        "lr",
        "grad_norm",
        "images_per_sec",
    ] {
        assert!(!first[k].is_null(), "train log lacks {k}: {first}");
    }
    let train_items = m
        .items
        .iter()
        .filter(|i| i.split == sd2::data::Split::Train)
        .count();
    assert_eq!(
        log.lines().count(),
        train_items.div_ceil(16),
        "one line per optimizer step of 16 images"
    );

    // The run folder holds a run now: a fresh run into it is refused.
    let r = sd2(&["train", "--config", c, "--set", "epochs=1"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("holds a run already"),
        "{err}"
    );

    // bf16 mixed precision: refused while the tiny preset trains CLIP whole; with CLIP frozen
    // it trains (f32 masters) and logs finite losses.
    let out_refused = format!("out={}", d.join("run16-refused").display());
    let r = sd2(&[
        "train",
        "--config",
        c,
        "--set",
        "epochs=1",
        "--set",
        "dtype=bf16",
        "--set",
        &out_refused,
    ]);
    assert!(
        !r.status.success() && String::from_utf8_lossy(&r.stderr).contains("train_base"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let out16 = format!("out={}", d.join("run16").display());
    let r = sd2(&[
        "train",
        "--config",
        c,
        "--set",
        "epochs=1",
        "--set",
        "dtype=bf16",
        "--set",
        "sd2.train_base=false",
        "--set",
        &out16,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let log16 = std::fs::read_to_string(d.join("run16/train_log.jsonl")).unwrap();
    for l in log16.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["total"].as_f64().is_some_and(f64::is_finite), "{l}");
    }
    let r = sd2(&["train", "--config", c, "--set", "dtype=f16"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("f32 or bf16"));

    // Bad configs.
    let r = sd2(&["train", "--config", c, "--set", "train.learning_rate=1"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("learning_rate"));
    let r = sd2(&["train", "--preset", "tiny"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("manifest"));
    let r = sd2(&["train", "--preset", "huge", "--set", "manifest=x"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("unknown preset"));
    let r = sd2(&[
        "train",
        "--preset",
        "vit-l14",
        "--set",
        &format!("manifest={}", m.path.display()),
    ]);
    assert!(
        !r.status.success() && String::from_utf8_lossy(&r.stderr).contains("local CLIP folder")
    );
    std::fs::remove_dir_all(&d).ok();
}
