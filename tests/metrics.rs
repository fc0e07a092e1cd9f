//! Detection metrics against scikit-learn (fixtures from scripts/reference/metrics_reference.py):
//! ties, perfect/reversed/all-tied scores, and single-class inputs (NaN, not a panic).
use sd2::eval::metrics::*;
use serde_json::Value;

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[track_caller]
fn same(name: &str, got: f64, want: f64) {
    let ok = (got.is_nan() && want.is_nan()) || (got - want).abs() <= 1e-12;
    println!("{name}: sd2 {got} sklearn {want}");
    assert!(ok, "{name}: sd2 {got} vs sklearn {want}");
}

#[test]
fn matches_sklearn() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics_cases.json"
    ))
    .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    for c in v["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let scores: Vec<f64> = c["scores"].as_array().unwrap().iter().map(num).collect();
        let fake: Vec<bool> = c["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_i64() == Some(1))
            .collect();
        same(
            &format!("{name} auc"),
            roc_auc(&scores, &fake),
            num(&c["auc"]),
        );
        same(
            &format!("{name} ap"),
            average_precision(&scores, &fake),
            num(&c["ap"]),
        );
        same(&format!("{name} eer"), eer(&scores, &fake), num(&c["eer"]));
        same(
            &format!("{name} tpr@1%"),
            tpr_at_fpr(&scores, &fake, 0.01),
            num(&c["tpr_at_fpr_1pct"]),
        );
        same(
            &format!("{name} acc@0.5"),
            accuracy_at(&scores, &fake, 0.5),
            num(&c["acc_at_0_5"]),
        );
        if let Some(fpr) = c["fpr"].as_array() {
            let (f, t, _) = roc_curve(&scores, &fake);
            let wf: Vec<f64> = fpr.iter().map(num).collect();
            let wt: Vec<f64> = c["tpr"].as_array().unwrap().iter().map(num).collect();
            assert_eq!(f.len(), wf.len(), "{name}: ROC points");
            assert!(
                f.iter().zip(&wf).all(|(a, b)| (a - b).abs() < 1e-12),
                "{name}: fpr"
            );
            assert!(
                t.iter().zip(&wt).all(|(a, b)| (a - b).abs() < 1e-12),
                "{name}: tpr"
            );
        }
        if let Some(prec) = c["precision"].as_array() {
            let (p, r) = pr_curve(&scores, &fake);
            let wp: Vec<f64> = prec.iter().map(num).collect();
            let wr: Vec<f64> = c["recall"].as_array().unwrap().iter().map(num).collect();
            assert_eq!(p.len(), wp.len(), "{name}: PR points");
            let worst = p
                .iter()
                .zip(&wp)
                .chain(r.iter().zip(&wr))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            println!(
                "{name} PR curve: worst |diff| {worst:e} over {} points",
                p.len()
            );
            assert!(worst < 1e-12, "{name}: PR curve");
        }
    }
    let c = &v["confusion"];
    let truth: Vec<usize> = c["truth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let pred: Vec<usize> = c["pred"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let (m, acc) = confusion(&truth, &pred, 5);
    let want: Vec<Vec<usize>> = c["matrix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    assert_eq!(m, want);
    same("5-class accuracy", acc, num(&c["accuracy"]));
}

#[test]
fn thresholds_videos_and_edge_cases() {
    let s = [0.1, 0.3, 0.35, 0.8, 0.9];
    let f = [false, false, true, true, true];
    let t = best_threshold(&s, &f);
    assert!(t > 0.3 && t <= 0.35, "threshold {t}");
    assert_eq!(accuracy_at(&s, &f, t), 1.0);
    assert_eq!(real_fake_accuracy(&s, &f, 0.5), (1.0, 2.0 / 3.0));
    let vids = [
        Some("a".to_string()),
        Some("a".to_string()),
        Some("b".to_string()),
        None,
        Some("b".to_string()),
    ];
    let (vs, vf) = per_video(&s, &f, &vids);
    assert_eq!(vf, vec![false, true]);
    assert!((vs[0] - 0.2).abs() < 1e-12 && (vs[1] - 0.625).abs() < 1e-12);
    assert!(roc_auc(&[], &[]).is_nan() && accuracy_at(&[], &[], 0.5).is_nan());
    assert!(eer(&[0.4], &[true]).is_nan());
}

/// The linear probe's logistic regression lands on sklearn's optimum (C = 1 and 0.1), with the
/// objective's gradient ≈ 0 there.
#[test]
fn probe_matches_sklearn_logistic_regression() {
    use sd2::eval::probe::{fit, objective_grad};
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics_cases.json"
    ))
    .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let lr = &v["logreg"];
    let x: Vec<Vec<f64>> = lr["x"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(num).collect())
        .collect();
    let y: Vec<bool> = lr["y"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_i64() == Some(1))
        .collect();
    for f in lr["fits"].as_array().unwrap() {
        let c = num(&f["c"]);
        let m = fit(&x, &y, c).unwrap();
        let want: Vec<f64> = f["coef"].as_array().unwrap().iter().map(num).collect();
        let mut worst = (m.b - num(&f["intercept"])).abs();
        for (a, b) in m.w.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
        let g = objective_grad(&m, &x, &y, c)
            .iter()
            .map(|v| v.abs())
            .fold(0.0, f64::max);
        println!(
            "C={c}: worst |w - sklearn| {worst:e} (tol 1e-6), max |grad| {g:e}, {} iterations",
            m.iterations
        );
        assert!(worst < 1e-6, "C={c}: {worst}");
        assert!(g < 1e-8, "C={c}: gradient {g}");
    }
    // One class only: a clear error, not a panic.
    let err = fit(&x, &vec![true; x.len()], 1.0).unwrap_err().to_string();
    assert!(err.contains("both real and fake"), "{err}");
}
