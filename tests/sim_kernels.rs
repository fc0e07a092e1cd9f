//! Every kernel of `kernels/*.cu` run in the kernel simulator (feature `cuda-sim`) against the
//! CPU reference backend, at small odd sizes with tails, f32 and bf16 storage. Outputs are
//! poisoned (NaN) before each launch so an unwritten element fails. Each check prints its worst
//! error (value, index, tolerance).
#![cfg(feature = "cuda-sim")]
use sd2::backend::cuda::sim::{launch, Arg, LaunchConfig};
use sd2::{DType, Device, Tensor};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = sd2::rng::Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect()
}

fn to_bf16(v: &[f32]) -> Vec<half::bf16> {
    v.iter().map(|x| half::bf16::from_f32(*x)).collect()
}

fn from_bf16(v: &[half::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

#[track_caller]
fn check(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let (mut worst, mut at) = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs() / (1.0 + w.abs());
        if e > worst || e.is_nan() {
            worst = if e.is_nan() { f32::INFINITY } else { e };
            at = i;
        }
    }
    println!(
        "{name}: worst rel err {worst:.3e} at {at} (got {}, want {}), tol {tol:e}",
        got[at], want[at]
    );
    assert!(worst <= tol, "{name}: {worst} > {tol}");
}

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape.to_vec(), Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap()
}

/// The CPU reference for LayerNorm with a fused residual: y, v = x + res, and the gradients of
/// Σ y·dy + Σ v·dsum w.r.t. x, γ, β.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn layernorm_reference(
    x: &[f32],
    res: &[f32],
    g: &[f32],
    b: &[f32],
    dy: &[f32],
    dsum: &[f32],
    rows: usize,
    n: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let xt = t(x, &[rows, n]).into_trainable();
    let gt = t(g, &[n]).into_trainable();
    let bt = t(b, &[n]).into_trainable();
    let v = xt.add(&t(res, &[rows, n])).unwrap();
    let y = v.layer_norm(&gt, &bt, 1e-5).unwrap();
    let loss = y
        .mul(&t(dy, &[rows, n]))
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&v.mul(&t(dsum, &[rows, n])).unwrap().sum_all().unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    (
        host(&y),
        host(&v),
        host(grads.get(&xt).unwrap()),
        host(grads.get(&gt).unwrap()),
        host(grads.get(&bt).unwrap()),
    )
}

#[test]
fn layernorm_fused_residual_matches_cpu() {
    for &(rows, n, threads, blocks) in &[
        (37usize, 72usize, 32u32, 5u32),
        (5, 1024, 128, 8),
        (3, 5, 32, 3),
    ] {
        let (x, res) = (randn(rows * n, 1), randn(rows * n, 2));
        let g: Vec<f32> = randn(n, 3).iter().map(|v| 1.0 + 0.3 * v).collect();
        let b = randn(n, 4);
        let (dy, dsum) = (randn(rows * n, 5), randn(rows * n, 6));
        for bf in [false, true] {
            // bf16 runs see bf16-rounded inputs; the reference gets the same rounded values.
            let r = |v: &Vec<f32>| if bf { bf16_round(v) } else { v.clone() };
            let (x, res, g, b, dy, dsum) = (r(&x), r(&res), r(&g), r(&b), r(&dy), r(&dsum));
            let (want_y, want_v, want_dx, want_dg, want_db) =
                layernorm_reference(&x, &res, &g, &b, &dy, &dsum, rows, n);
            let (mut mean, mut rstd) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
            let mut dg_part = vec![f32::NAN; blocks as usize * n];
            let mut db_part = vec![f32::NAN; blocks as usize * n];
            let (mut dg, mut db) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let cfg = LaunchConfig {
                grid: (blocks, 1, 1),
                block: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let (got_y, got_v, got_dx);
            let tag = if bf { "bf16" } else { "f32" };
            macro_rules! run {
                ($ty:ty, $conv:expr, $back:expr) => {{
                    let (xs, rs, gs, bs, dys, dss): (
                        Vec<$ty>,
                        Vec<$ty>,
                        Vec<$ty>,
                        Vec<$ty>,
                        Vec<$ty>,
                        Vec<$ty>,
                    ) = (
                        $conv(&x),
                        $conv(&res),
                        $conv(&g),
                        $conv(&b),
                        $conv(&dy),
                        $conv(&dsum),
                    );
                    let mut y: Vec<$ty> = $conv(&vec![f32::NAN; rows * n]);
                    let mut v: Vec<$ty> = $conv(&vec![f32::NAN; rows * n]);
                    let mut dx: Vec<$ty> = $conv(&vec![f32::NAN; rows * n]);
                    unsafe {
                        launch(
                            &format!("layernorm_fwd_{tag}"),
                            cfg,
                            &[
                                Arg::ptr(xs.as_ptr()),
                                Arg::ptr(rs.as_ptr()),
                                Arg::ptr(gs.as_ptr()),
                                Arg::ptr(bs.as_ptr()),
                                Arg::mut_ptr(v.as_mut_ptr()),
                                Arg::mut_ptr(y.as_mut_ptr()),
                                Arg::mut_ptr(mean.as_mut_ptr()),
                                Arg::mut_ptr(rstd.as_mut_ptr()),
                                Arg::I32(rows as i32),
                                Arg::I32(n as i32),
                                Arg::F32(1e-5),
                            ],
                        )
                        .unwrap();
                        launch(
                            &format!("layernorm_bwd_{tag}"),
                            cfg,
                            &[
                                Arg::ptr(dys.as_ptr()),
                                Arg::ptr(v.as_ptr()),
                                Arg::ptr(gs.as_ptr()),
                                Arg::ptr(mean.as_ptr()),
                                Arg::ptr(rstd.as_ptr()),
                                Arg::ptr(dss.as_ptr()),
                                Arg::mut_ptr(dx.as_mut_ptr()),
                                Arg::mut_ptr(dg_part.as_mut_ptr()),
                                Arg::mut_ptr(db_part.as_mut_ptr()),
                                Arg::I32(rows as i32),
                                Arg::I32(n as i32),
                            ],
                        )
                        .unwrap();
                        for (part, out) in [(&dg_part, &mut dg), (&db_part, &mut db)] {
                            launch(
                                "column_sum_f32",
                                LaunchConfig {
                                    grid: ((n as u32).div_ceil(64), 1, 1),
                                    block: (64, 1, 1),
                                    shared_mem_bytes: 0,
                                },
                                &[
                                    Arg::ptr(part.as_ptr()),
                                    Arg::mut_ptr(out.as_mut_ptr()),
                                    Arg::I32(blocks as i32),
                                    Arg::I32(n as i32),
                                ],
                            )
                            .unwrap();
                        }
                    }
                    got_y = $back(&y);
                    got_v = $back(&v);
                    got_dx = $back(&dx);
                }};
            }
            if bf {
                run!(half::bf16, to_bf16, from_bf16);
            } else {
                run!(f32, |v: &Vec<f32>| v.clone(), |v: &Vec<f32>| v.clone());
            }
            // f32: accumulation-order noise only; bf16: one rounding of each stored output
            // (and of v, which the backward reads back).
            let (tol, tol_g) = if bf { (8e-3, 3e-2) } else { (2e-5, 2e-5) };
            let name = format!("layernorm {tag} rows {rows} n {n}");
            check(&format!("{name} y"), &got_y, &want_y, tol);
            check(&format!("{name} v = x + res"), &got_v, &want_v, tol);
            check(&format!("{name} dx"), &got_dx, &want_dx, tol_g);
            check(&format!("{name} dgamma"), &dg, &want_dg, tol_g);
            check(&format!("{name} dbeta"), &db, &want_db, tol_g);
        }
    }
}

#[test]
fn bias_quick_gelu_matches_cpu() {
    let (rows, n, blocks) = (37usize, 40usize, 6u32);
    let x = randn(rows * n, 11);
    let b = randn(n, 12);
    let dy = randn(rows * n, 13);
    let xt = t(&x, &[rows, n]).into_trainable();
    let bt = t(&b, &[n]).into_trainable();
    let y = xt.add(&bt).unwrap().quick_gelu().unwrap();
    let grads = y
        .mul(&t(&dy, &[rows, n]))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (want_y, want_dx, want_db) = (
        host(&y),
        host(grads.get(&xt).unwrap()),
        host(grads.get(&bt).unwrap()),
    );
    let mut got_y = vec![f32::NAN; rows * n];
    let mut got_dx = vec![f32::NAN; rows * n];
    let mut part = vec![f32::NAN; blocks as usize * n];
    let mut got_db = vec![f32::NAN; n];
    unsafe {
        launch(
            "bias_quick_gelu_fwd_f32",
            LaunchConfig {
                grid: (7, 1, 1),
                block: (64, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::ptr(x.as_ptr()),
                Arg::ptr(b.as_ptr()),
                Arg::mut_ptr(got_y.as_mut_ptr()),
                Arg::I32(rows as i32),
                Arg::I32(n as i32),
            ],
        )
        .unwrap();
        launch(
            "bias_quick_gelu_bwd_f32",
            LaunchConfig {
                grid: (blocks, 1, 1),
                block: (32, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::ptr(x.as_ptr()),
                Arg::ptr(b.as_ptr()),
                Arg::ptr(dy.as_ptr()),
                Arg::mut_ptr(got_dx.as_mut_ptr()),
                Arg::mut_ptr(part.as_mut_ptr()),
                Arg::I32(rows as i32),
                Arg::I32(n as i32),
            ],
        )
        .unwrap();
        launch(
            "column_sum_f32",
            LaunchConfig {
                grid: (1, 1, 1),
                block: (64, 1, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::ptr(part.as_ptr()),
                Arg::mut_ptr(got_db.as_mut_ptr()),
                Arg::I32(blocks as i32),
                Arg::I32(n as i32),
            ],
        )
        .unwrap();
    }
    check("bias+quick_gelu y", &got_y, &want_y, 1e-5);
    check("bias+quick_gelu dx", &got_dx, &want_dx, 1e-5);
    check("bias+quick_gelu db", &got_db, &want_db, 1e-5);
}

#[test]
fn simulator_reports_bad_launches_and_lists_kernels() {
    let names = sd2::backend::cuda::sim::kernel_names();
    for k in [
        "layernorm_fwd_f32",
        "layernorm_bwd_bf16",
        "bias_quick_gelu_fwd_bf16",
        "column_sum_f32",
    ] {
        assert!(names.iter().any(|n| n == k), "{k} missing from {names:?}");
    }
    let cfg = LaunchConfig {
        grid: (1, 1, 1),
        block: (2048, 1, 1),
        shared_mem_bytes: 0,
    };
    let e = unsafe { launch("column_sum_f32", cfg, &[]) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("2048 threads"), "{e}");
    let e = unsafe { launch("no_such_kernel", cfg, &[]) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such_kernel"), "{e}");
}

/// The fused sigmoid contrastive loss: loss, ∂f, ∂d (same kernel, inputs swapped), ∂t, ∂b
/// against the CPU op, at odd sizes (n = 5, 37; dim = 72, 200) and extreme logits (t = 60).
#[test]
fn sigmoid_loss_matches_cpu() {
    for &(n, dim, t_val, b_val, threads) in &[
        (5usize, 72usize, 10.0f32, -10.0f32, 64u32),
        (37, 200, 3.0, -1.5, 128),
        (37, 72, 60.0, -5.0, 96),
    ] {
        // Normalized rows, as SD2 feeds the loss; a few pairs made similar so some logits are
        // positive off the diagonal.
        let norm = |v: Vec<f32>| -> Vec<f32> {
            v.chunks(dim)
                .flat_map(|r| {
                    let s = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                    r.iter().map(move |x| x / s).collect::<Vec<_>>()
                })
                .collect()
        };
        let f = norm(randn(n * dim, 21));
        let mut draw = randn(n * dim, 22);
        for (k, v) in draw.iter_mut().enumerate() {
            *v += 0.8 * f[k];
        }
        let d = norm(draw);
        let ft = t(&f, &[n, dim]).into_trainable();
        let dt_ = t(&d, &[n, dim]).into_trainable();
        let tt = Tensor::from_vec(vec![t_val], (), Device::Cpu)
            .unwrap()
            .into_trainable();
        let bt = Tensor::from_vec(vec![b_val], (), Device::Cpu)
            .unwrap()
            .into_trainable();
        let loss = sd2::ops::loss::sigmoid_loss(&ft, &dt_, &tt, &bt).unwrap();
        let grads = loss.backward().unwrap();
        let want = (
            host(&loss),
            host(grads.get(&ft).unwrap()),
            host(grads.get(&dt_).unwrap()),
            host(grads.get(&tt).unwrap()),
            host(grads.get(&bt).unwrap()),
        );
        let cfg = LaunchConfig {
            grid: (7, 1, 1),
            block: (threads, 1, 1),
            shared_mem_bytes: ((1 + threads as usize / 32) * dim * 4) as u32,
        };
        let run = |a: &[f32], c: &[f32]| -> (Vec<f32>, f32, f32, f32) {
            let mut grad = vec![f32::NAN; n * dim];
            let mut parts = vec![f32::NAN; 3 * n];
            let mut sums = [f32::NAN; 3];
            unsafe {
                let (l, rest) = parts.split_at_mut(n);
                let (dtp, dbp) = rest.split_at_mut(n);
                launch(
                    "sigmoid_loss_rows_f32",
                    cfg,
                    &[
                        Arg::ptr(a.as_ptr()),
                        Arg::ptr(c.as_ptr()),
                        Arg::ptr(&t_val as *const f32),
                        Arg::ptr(&b_val as *const f32),
                        Arg::mut_ptr(grad.as_mut_ptr()),
                        Arg::mut_ptr(l.as_mut_ptr()),
                        Arg::mut_ptr(dtp.as_mut_ptr()),
                        Arg::mut_ptr(dbp.as_mut_ptr()),
                        Arg::I32(n as i32),
                        Arg::I32(dim as i32),
                    ],
                )
                .unwrap();
                for (k, s) in sums.iter_mut().enumerate() {
                    launch(
                        "column_sum_f32",
                        LaunchConfig {
                            grid: (1, 1, 1),
                            block: (32, 1, 1),
                            shared_mem_bytes: 0,
                        },
                        &[
                            Arg::ptr(parts[k * n..].as_ptr()),
                            Arg::mut_ptr(s as *mut f32),
                            Arg::I32(n as i32),
                            Arg::I32(1),
                        ],
                    )
                    .unwrap();
                }
            }
            (grad, sums[0], sums[1], sums[2])
        };
        let (df, loss_got, dt_got, db_got) = run(&f, &d);
        let (dd, loss_again, _, _) = run(&d, &f);
        let name = format!("sigmoid loss n {n} dim {dim} t {t_val}");
        check(
            &format!("{name} loss"),
            &[loss_got, loss_again],
            &[want.0[0], want.0[0]],
            2e-5,
        );
        check(&format!("{name} df"), &df, &want.1, 2e-5);
        check(&format!("{name} dd"), &dd, &want.2, 2e-5);
        check(&format!("{name} dt"), &[dt_got], &want.3, 2e-5);
        check(&format!("{name} db"), &[db_got], &want.4, 2e-5);
    }
}
