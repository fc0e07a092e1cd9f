//! `sd2 demo`'s pipeline end to end on a very small run: synthetic data → train → best epoch on
//! validation → out-of-domain test report on disk.
use sd2::demo::{run, DemoConfig};

#[test]
fn demo_pipeline_writes_a_report() {
    let out = std::env::temp_dir().join(format!("sd2-demo-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let cfg = DemoConfig {
        out: out.clone(),
        images: 160,
        epochs: 1,
        batch: 16,
        ..Default::default()
    };
    let mut lines = vec![];
    let r = run(&cfg, &mut |l: &str| lines.push(l.to_string())).unwrap();
    assert!(
        lines.iter().any(|l| l.contains("validation AUC")),
        "{lines:?}"
    );
    assert!(r.report.overall.n > 0 && r.report.overall.auc.is_finite());
    assert!(!r.report.per_source.is_empty());
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.eval_dir.join("metrics.json")).unwrap())
            .unwrap();
    for k in [
        "auc",
        "ap",
        "eer",
        "acc_argmax",
        "acc_threshold",
        "tpr_at_fpr_1pct",
    ] {
        assert!(
            metrics["overall"][k].is_number(),
            "metrics.json overall.{k}"
        );
    }
    assert!(metrics["mauc"].is_number() && metrics["per_type"]["fs"].is_number());
    let preds = std::fs::read_to_string(r.eval_dir.join("predictions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(preds.lines().next().unwrap()).unwrap();
    assert_eq!(first["probs"].as_array().unwrap().len(), 5);
    assert!(first["path"].as_str().unwrap().starts_with("images/"));
    assert_eq!(preds.lines().count(), r.report.overall.n);
    assert!(
        out.join("checkpoints/best/state.json").is_file()
            && out.join("checkpoints/last/trainable.safetensors").is_file()
    );
    // The best checkpoint carries the threshold chosen on the val split, and a detector
    // loaded from it uses it.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoints/best/state.json")).unwrap(),
    )
    .unwrap();
    let t = state["threshold"].as_f64().expect("state.json threshold");
    assert!((0.0..=1.0).contains(&t), "threshold {t}");
    let det = sd2::Detector::load(&out.join("checkpoints/best"), None, sd2::Device::Cpu).unwrap();
    assert!(det.has_validation_threshold());
    assert_eq!(det.threshold(), t);
    // The figures are real PNGs.
    for f in ["roc.png", "pr.png", "confusion.png"] {
        let img = image::open(r.eval_dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!((img.width(), img.height()), (640, 560), "{f}");
        // Not a blank canvas: the plot drew dark pixels (axes, text, curves).
        let dark = img
            .to_rgb8()
            .pixels()
            .filter(|p| p.0.iter().all(|v| *v < 80))
            .count();
        assert!(dark > 500, "{f}: {dark} dark pixels");
    }
    cli_on_demo_output(&out);
    std::fs::remove_dir_all(&out).ok();
}

fn sd2(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args(args)
        .output()
        .unwrap()
}

/// `sd2 eval --perturb`, `sd2 probe` and `sd2 bench loader` on the demo's checkpoint and data.
fn cli_on_demo_output(out: &std::path::Path) {
    let ckpt = out.join("checkpoints/best");
    let manifest = sd2::demo::manifest_path(out);
    let (c, m) = (ckpt.to_str().unwrap(), manifest.to_str().unwrap());
    let ev = out.join("eval-perturb");
    let r = sd2(&[
        "eval",
        "--checkpoint",
        c,
        "--manifest",
        m,
        "--out",
        ev.to_str().unwrap(),
        "--perturb",
        "jpeg:90,30",
        "--perturb",
        "blur:2",
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        stdout.contains("jpeg:30") && stdout.contains("blur:2"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ev.join("metrics.json")).unwrap()).unwrap();
    let names: Vec<&str> = v["perturb"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["jpeg:90", "jpeg:30", "blur:2"]);
    assert!(v["perturb"][1]["auc"].is_number());
    // Degrading the pixels changes the scores (so the perturbation really ran).
    assert_ne!(v["perturb"][2]["auc"], v["overall"]["auc"]);
    // A bad level fails before any work, naming the flag.
    let r = sd2(&[
        "eval",
        "--checkpoint",
        c,
        "--manifest",
        m,
        "--out",
        ev.to_str().unwrap(),
        "--perturb",
        "jpeg:0",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--perturb jpeg:0"));
    // The linear probe: one accuracy per test source.
    let pr = out.join("probe");
    let r = sd2(&[
        "probe",
        "--checkpoint",
        c,
        "--manifest",
        m,
        "--out",
        pr.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pr.join("probe.json")).unwrap()).unwrap();
    let per = v["per_source"].as_object().unwrap();
    assert!(
        per.contains_key("broadcast") || per.contains_key("social"),
        "{v}"
    );
    for s in per.values() {
        let a = s["acc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a));
    }
    assert!(v["macc"].as_f64().unwrap() > 0.0);
    // The loader benchmark prints both rows.
    let r = sd2(&[
        "bench",
        "loader",
        "--manifest",
        m,
        "--size",
        "64",
        "--limit",
        "48",
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        stdout.contains("images/s") && stdout.contains("augmentations"),
        "{stdout}"
    );
}

/// The ablation's four rows on a very small benchmark: each row trains what it names, and the
/// table and `ablation.json` are written.
#[test]
fn ablation_runs_four_rows() {
    use sd2::sd2::DualContrast;
    let out = std::env::temp_dir().join(format!("sd2-ablation-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let cfg = DemoConfig {
        out: out.clone(),
        images: 96,
        epochs: 1,
        batch: 16,
        ..Default::default()
    };
    let ab = sd2::ablation::run(&cfg, &mut |_: &str| {}).unwrap();
    let rows: Vec<(bool, DualContrast)> = ab.rows.iter().map(|r| (r.clam, r.loss_dual)).collect();
    assert_eq!(
        rows,
        [
            (false, DualContrast::Off),
            (true, DualContrast::Off),
            (true, DualContrast::Face),
            (true, DualContrast::FaceEnv)
        ]
    );
    assert!(ab.rows.iter().all(|r| r.mauc.is_finite()));
    assert!(ab.table().contains("+L_D face&env"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ablation.json")).unwrap()).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 4);
    // Each row's checkpoint records its own switches.
    let state = std::fs::read_to_string(out.join("row1/checkpoints/best/state.json")).unwrap();
    assert!(
        state.contains("\"clam\":false") || state.contains("\"clam\": false"),
        "{state}"
    );
    std::fs::remove_dir_all(&out).ok();
}
