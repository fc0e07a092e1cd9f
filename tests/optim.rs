//! AdamW against hand-computed updates, and the gradient norm.
mod common;
use common::{assert_close, t64};
use sd2::optim::{grad_norm, AdamW, AdamWConfig, Param};

#[test]
fn adamw_matches_the_formula() {
    let w = t64(&[1.0, -2.0], &[2]).into_trainable();
    let b = t64(&[0.5], &[1]).into_trainable();
    let params = [
        Param::new("w", w.clone(), true),
        Param::new("b", b.clone(), false),
    ];
    let mut opt = AdamW::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    });
    // loss = Σ w² + 3b → g_w = 2w, g_b = 3.
    let grads = w
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&b.scale(3.0).unwrap().sum_all().unwrap())
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "grad norm",
        &[grad_norm(&params, &grads).unwrap()],
        &[(4.0f64 + 16.0 + 9.0).sqrt()],
        1e-12,
        0.0,
    );
    let lr = 0.01;
    opt.step(&params, &grads, lr, 0.5).unwrap();
    // Step 1: m̂ = g', v̂ = g'², so the update is g'/(|g'| + eps) = sign(g') with g' = 0.5·g.
    let upd = |g: f64| g / (g.abs() + 1e-8);
    let want_w = [
        1.0 * (1.0 - lr * 0.1) - lr * upd(1.0),
        -2.0 * (1.0 - lr * 0.1) - lr * upd(-2.0),
    ];
    assert_close(
        "w after 1 step",
        &w.to_vec_f64().unwrap(),
        &want_w,
        1e-12,
        0.0,
    );
    assert_close(
        "b after 1 step (no decay)",
        &b.to_vec_f64().unwrap(),
        &[0.5 - lr * upd(1.5)],
        1e-12,
        0.0,
    );
    // Step 2 with the same gradient: m = g', v = g'² again after bias correction.
    let g2 = w.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let w1 = w.to_vec_f64().unwrap();
    opt.step(&params[..1], &g2, lr, 1.0).unwrap();
    let (b1, b2): (f64, f64) = (0.9, 0.999);
    let want: Vec<f64> = [(1.0, w1[0]), (-2.0, w1[1])]
        .iter()
        .map(|&(w0, w1)| {
            let (g1, g2) = (0.5 * 2.0 * w0, 2.0 * w1);
            let m = b1 * (1.0 - b1) * g1 + (1.0 - b1) * g2;
            let v = b2 * (1.0 - b2) * g1 * g1 + (1.0 - b2) * g2 * g2;
            let (mh, vh) = (m / (1.0 - b1 * b1), v / (1.0 - b2 * b2));
            w1 * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8)
        })
        .collect();
    assert_close(
        "w after 2 steps",
        &w.to_vec_f64().unwrap(),
        &want,
        1e-12,
        0.0,
    );
    assert_eq!(opt.steps(), 2);
}

#[test]
fn adamw_rejects_frozen_parameters() {
    let frozen = t64(&[1.0], &[1]);
    let mut opt = AdamW::new(AdamWConfig::default());
    let e = opt
        .step(
            &[Param::new("frozen", frozen, true)],
            &sd2::GradStore::new(),
            0.1,
            1.0,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("frozen") && e.contains("not a trainable"), "{e}");
}
