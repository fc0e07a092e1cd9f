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
    let r = run(&cfg, |l| lines.push(l.to_string())).unwrap();
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
    std::fs::remove_dir_all(&out).ok();
}
