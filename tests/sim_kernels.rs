//! Every kernel of `kernels/*.cu` against the CPU reference backend, at small odd sizes with
//! tails, f32 and bf16 storage — on every kernel backend here: the simulator (feature
//! `cuda-sim`, so CI checks each kernel's logic without a GPU) and the GPU (feature `cuda`, when
//! one is present; `SD2_KERNEL_BACKENDS=gpu` makes its absence a failure). Outputs are poisoned
//! (NaN) before each launch so an unwritten element fails. Each check prints its worst error
//! (value, index, tolerance) and the backend.
#![cfg(any(feature = "cuda-sim", feature = "cuda"))]
use std::cell::Cell;

use sd2::backend::cuda::kernels::{
    AdamwMulti, Affine, BiasQuickGeluBwd, BiasQuickGeluFwd, Binary, BinaryContig, Cast,
    ClamAttentionBwd, ClamAttentionFwd, ColumnSum, CrossEntropyBwd, CrossEntropyFwd, FlashBwdDq,
    FlashDelta, FlashDkdv, FlashDq, FlashFwd, GradClip, IndexAddRows, IndexRows, L2NormBwd,
    L2NormFwd, LayerNormBwd, LayerNormFwd, LoraDaPart, LoraDown, LoraDsDbPart, LoraGemm3Fwd,
    LoraGemmBwd, LoraGemmFwd, LoraGrads, LoraUpAdd, Patchify, SigmoidLossRows, SumSqMulti, Unary,
    UnaryBwd,
};
use sd2::backend::cuda::launch::{KArg, LaunchConfig, Runner};
use sd2::backend::cuda::{flash, lora_gemm};
use sd2::{DType, Device, Tensor};

thread_local! {
    static BACKEND: Cell<&'static str> = const { Cell::new("?") };
}

/// The kernel backends to test on; prints why any is skipped.
fn runners() -> Vec<Runner> {
    let (run, skipped) = Runner::available().expect("kernel backends");
    for s in skipped {
        println!("skipped kernel backend {s}");
    }
    run
}

/// Runs `f` once per kernel backend, tagging its checks with the backend's name.
fn each_backend(mut f: impl FnMut(&Runner)) {
    for r in runners() {
        BACKEND.with(|b| b.set(r.name()));
        f(&r);
    }
}

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
    let backend = BACKEND.with(|b| b.get());
    println!(
        "[{backend}] {name}: worst rel err {worst:.3e} at {at} (got {}, want {}), tol {tol:e}",
        got[at], want[at]
    );
    assert!(worst <= tol, "[{backend}] {name}: {worst} > {tol}");
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
    each_backend(|r| {
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
                let rnd = |v: &Vec<f32>| if bf { bf16_round(v) } else { v.clone() };
                let (x, res, g, b, dy, dsum) =
                    (rnd(&x), rnd(&res), rnd(&g), rnd(&b), rnd(&dy), rnd(&dsum));
                let (want_y, want_v, want_dx, want_dg, want_db) =
                    layernorm_reference(&x, &res, &g, &b, &dy, &dsum, rows, n);
                let (mut mean, mut rstd) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
                let mut dg_part = vec![f32::NAN; blocks as usize * n];
                let mut db_part = vec![f32::NAN; blocks as usize * n];
                let (dg, db);
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
                            r.run_staged(
                                &format!("layernorm_fwd_{tag}"),
                                cfg,
                                LayerNormFwd {
                                    x: KArg::input(&xs),
                                    res: KArg::input(&rs),
                                    gamma: KArg::input(&gs),
                                    beta: KArg::input(&bs),
                                    sum_out: KArg::output(&mut v),
                                    y: KArg::output(&mut y),
                                    mean: KArg::output(&mut mean),
                                    rstd: KArg::output(&mut rstd),
                                    rows,
                                    n,
                                    eps: 1e-5,
                                },
                            )
                            .unwrap();
                            r.run_staged(
                                &format!("layernorm_bwd_{tag}"),
                                cfg,
                                LayerNormBwd {
                                    dy: KArg::input(&dys),
                                    x: KArg::input(&v),
                                    gamma: KArg::input(&gs),
                                    mean: KArg::input(&mean),
                                    rstd: KArg::input(&rstd),
                                    dsum: KArg::input(&dss),
                                    dx: KArg::output(&mut dx),
                                    dgamma_part: KArg::output(&mut dg_part),
                                    dbeta_part: KArg::output(&mut db_part),
                                    rows,
                                    n,
                                },
                            )
                            .unwrap();
                            // A frozen norm: no partials, a grid the partials do not cap,
                            // the same dx bit for bit.
                            let mut dx2: Vec<$ty> = $conv(&vec![f32::NAN; rows * n]);
                            r.run_staged(
                                &format!("layernorm_bwd_{tag}"),
                                LaunchConfig {
                                    grid: (rows as u32, 1, 1),
                                    ..cfg
                                },
                                LayerNormBwd {
                                    dy: KArg::input(&dys),
                                    x: KArg::input(&v),
                                    gamma: KArg::input(&gs),
                                    mean: KArg::input(&mean),
                                    rstd: KArg::input(&rstd),
                                    dsum: KArg::input(&dss),
                                    dx: KArg::output(&mut dx2),
                                    dgamma_part: KArg::Null,
                                    dbeta_part: KArg::Null,
                                    rows,
                                    n,
                                },
                            )
                            .unwrap();
                            let bits =
                                |v: &[$ty]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&dx2), bits(&dx), "frozen-norm dx differs");
                        }
                        dg = column_sum(r, &dg_part, n);
                        db = column_sum(r, &db_part, n);
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
    });
}

#[test]
fn bias_quick_gelu_matches_cpu() {
    each_backend(|r| {
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
        unsafe {
            r.run_staged(
                "bias_quick_gelu_fwd_f32",
                LaunchConfig {
                    grid: (7, 1, 1),
                    block: (64, 1, 1),
                    shared_mem_bytes: 0,
                },
                BiasQuickGeluFwd {
                    x: KArg::input(&x),
                    b: KArg::input(&b),
                    y: KArg::output(&mut got_y),
                    rows,
                    n,
                },
            )
            .unwrap();
            r.run_staged(
                "bias_quick_gelu_bwd_f32",
                LaunchConfig {
                    grid: (blocks, 1, 1),
                    block: (32, 1, 1),
                    shared_mem_bytes: 0,
                },
                BiasQuickGeluBwd {
                    x: KArg::input(&x),
                    b: KArg::input(&b),
                    dy: KArg::input(&dy),
                    dx: KArg::output(&mut got_dx),
                    db_part: KArg::output(&mut part),
                    rows,
                    n,
                },
            )
            .unwrap();
        }
        let got_db = column_sum(r, &part, n);
        check("bias+quick_gelu y", &got_y, &want_y, 1e-5);
        check("bias+quick_gelu dx", &got_dx, &want_dx, 1e-5);
        check("bias+quick_gelu db", &got_db, &want_db, 1e-5);
    });
}

#[cfg(feature = "cuda-sim")]
#[test]
fn simulator_reports_bad_launches_and_lists_kernels() {
    use sd2::backend::cuda::sim::launch;
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
    // The simulator's own raw entry point (`sim::launch` with `Arg`s), not a `Runner`: it stays
    // untyped, as it is what this test checks.
    let args = [
        sd2::backend::cuda::launch::Arg::null(),
        sd2::backend::cuda::launch::Arg::null(),
        sd2::backend::cuda::launch::Arg::I32(1),
        sd2::backend::cuda::launch::Arg::I32(4),
    ];
    let e = unsafe { launch("column_sum_f32", cfg, &args) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("2048 threads"), "{e}");
    let e = unsafe { launch("no_such_kernel", cfg, &[]) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such_kernel"), "{e}");
}

/// Every launch is checked against the kernel's C++ parameter list, which the simulator's
/// registration records from the declaration: a missing argument or one of the wrong kind is an
/// error naming the kernel and the argument — on every backend, before anything is launched.
#[cfg(feature = "cuda-sim")]
#[test]
fn launch_arguments_are_checked_against_the_kernel_signature() {
    use sd2::backend::cuda::sim::kernel_signature;
    let sig = |k: &str| kernel_signature(k).unwrap_or_else(|| panic!("{k}: no signature"));
    assert_eq!(sig("flash_bwd_dq_tc2_d64_bf16"), "ppppppppiiiif");
    assert_eq!(sig("flash_fwd_tc4_d64_bf16"), "pppppiiiif");
    assert!(sig("lora_gemm3_fwd_bf16").starts_with("TTTT"));
    assert!(kernel_signature("no_such_kernel").is_none());
    // Sizes become 4-byte parameters only when they fit.
    use sd2::backend::cuda::abi::Arg;
    assert!(matches!(Arg::int(77usize), Ok(Arg::I32(77))));
    let e = Arg::int(3_000_000_000usize).unwrap_err().to_string();
    assert!(e.contains("3000000000") && e.contains("32-bit"), "{e}");
    // Deliberately malformed argument lists through the untyped `Runner::launch`: the typed
    // structs could not express them, and the raw path's signature check is what is tested.
    let good = || {
        let mut a: Vec<KArg> = (0..8).map(|_| KArg::Null).collect();
        a.extend([
            KArg::I32(1),
            KArg::I32(5),
            KArg::I32(5),
            KArg::I32(0),
            KArg::F32(0.125),
        ]);
        a
    };
    each_backend(|r| {
        let cfg = flash::bwd_tc_config(1, 5);
        let mut a = good();
        a.pop();
        let e = unsafe { r.launch("flash_bwd_dq_tc2_d64_bf16", cfg, &mut a) }
            .unwrap_err()
            .to_string();
        println!("[{}] {e}", r.name());
        assert!(
            e.contains("flash_bwd_dq_tc2_d64_bf16") && e.contains("12 arguments, declared with 13"),
            "{e}"
        );
        let mut a = good();
        a[9] = KArg::F32(5.0); // sq as a float
        let e = unsafe { r.launch("flash_bwd_dq_tc2_d64_bf16", cfg, &mut a) }
            .unwrap_err()
            .to_string();
        println!("[{}] {e}", r.name());
        assert!(e.contains("argument 9 is f32"), "{e}");
        let mut a = good();
        a[2] = KArg::I32(0); // a pointer passed as an int
        let e = unsafe { r.launch("flash_bwd_dq_tc2_d64_bf16", cfg, &mut a) }
            .unwrap_err()
            .to_string();
        assert!(e.contains("argument 2 is i32"), "{e}");
    });
}

/// Unknown kernels and impossible launches are errors naming the kernel, on every backend.
#[test]
fn bad_launches_are_clear_errors_on_every_backend() {
    each_backend(|r| {
        // An undeclared kernel has no typed struct: the untyped launch is the path under test.
        let e = unsafe { r.launch("no_such_kernel", cfg1(1, 32), &mut []) }
            .unwrap_err()
            .to_string();
        assert!(e.contains("no_such_kernel"), "[{}] {e}", r.name());
        let mut out = vec![f32::NAN; 4];
        let e = unsafe {
            r.run_staged(
                "column_sum_f32",
                cfg1(1, 2048),
                ColumnSum {
                    part: KArg::input(&[1.0f32; 4]),
                    out: KArg::output(&mut out),
                    parts: 1,
                    n: 4,
                },
            )
        }
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("column_sum_f32") || e.contains("2048"),
            "[{}] {e}",
            r.name()
        );
        println!("[{}] bad launch: {e}", r.name());
    });
}

/// The fused sigmoid contrastive loss: loss, ∂f, ∂d (same kernel, inputs swapped), ∂t, ∂b
/// against the CPU op, at odd sizes (n = 5, 37; dim = 72, 200), extreme logits (t = 60) and
/// rectangular problems (n rows of f against m ≥ n rows of d, positives from row `off`: the
/// negatives gathered over ranks).
#[test]
fn sigmoid_loss_matches_cpu() {
    each_backend(|r| {
        for &(n, m, off, dim, t_val, b_val, threads, bf) in &[
            (
                5usize, 5usize, 0usize, 72usize, 10.0f32, -10.0f32, 64u32, false,
            ),
            (37, 37, 0, 200, 3.0, -1.5, 128, false),
            (37, 37, 0, 72, 60.0, -5.0, 96, false),
            (37, 37, 0, 200, 10.0, -10.0, 128, true),
            (5, 19, 9, 72, 10.0, -10.0, 64, false),
            (13, 40, 27, 200, 3.0, -1.5, 128, true),
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
            let round = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
            let f = norm(randn(n * dim, 21));
            let mut draw = randn(m * dim, 22);
            for (k, v) in f.iter().enumerate() {
                draw[off * dim + k] += 0.8 * v;
            }
            // bf16 storage: the reference sees the same rounded embeddings.
            let (f, d) = (round(f), round(norm(draw)));
            let ft = t(&f, &[n, dim]).into_trainable();
            let dt_ = t(&d, &[m, dim]).into_trainable();
            let tt = Tensor::from_vec(vec![t_val], (), Device::Cpu)
                .unwrap()
                .into_trainable();
            let bt = Tensor::from_vec(vec![b_val], (), Device::Cpu)
                .unwrap()
                .into_trainable();
            let loss = sd2::ops::sigmoid_loss_offset(&ft, &dt_, off, &tt, &bt).unwrap();
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
            let suffix = if bf { "bf16" } else { "f32" };
            // Rows `a` against columns `c`, positives from `offset`, scaled by 1/n.
            let run = |a: &[f32], c: &[f32], offset: i32| -> (Vec<f32>, f32, f32, f32) {
                let (rows, cols) = (a.len() / dim, c.len() / dim);
                let (a, c) = (Buf::new(a, bf), Buf::new(c, bf));
                let mut grad = Buf::poisoned(rows * dim, bf);
                let mut parts = vec![f32::NAN; 3 * rows];
                let mut sums = [f32::NAN; 3];
                unsafe {
                    let (l, rest) = parts.split_at_mut(rows);
                    let (dtp, dbp) = rest.split_at_mut(rows);
                    r.run_staged(
                        &format!("sigmoid_loss_rows_{suffix}"),
                        cfg,
                        SigmoidLossRows {
                            f: a.arg(),
                            d: c.arg(),
                            t: KArg::scalar(&t_val),
                            b: KArg::scalar(&b_val),
                            grad: grad.arg_mut(),
                            loss_part: KArg::output(l),
                            dt_part: KArg::output(dtp),
                            db_part: KArg::output(dbp),
                            rows,
                            cols,
                            dim,
                            offset,
                            inv_n: 1.0 / n as f32,
                        },
                    )
                    .unwrap();
                }
                for (k, s) in sums.iter_mut().enumerate() {
                    *s = column_sum(r, &parts[k * rows..(k + 1) * rows], 1)[0];
                }
                (grad.get(), sums[0], sums[1], sums[2])
            };
            let (df, loss_got, dt_got, db_got) = run(&f, &d, off as i32);
            let (dd, loss_again, _, _) = run(&d, &f, -(off as i32));
            let name =
                format!("sigmoid loss {suffix} n {n} m {m} offset {off} dim {dim} t {t_val}");
            // Scalars accumulate in f32 in both; bf16 rounds each stored gradient once.
            let tol_g = if bf { 2e-3 } else { 2e-5 };
            check(
                &format!("{name} loss"),
                &[loss_got, loss_again],
                &[want.0[0], want.0[0]],
                2e-5,
            );
            check(&format!("{name} df"), &df, &want.1, tol_g);
            check(&format!("{name} dd"), &dd, &want.2, tol_g);
            check(&format!("{name} dt"), &[dt_got], &want.3, 2e-5);
            check(&format!("{name} db"), &[db_got], &want.4, 2e-5);
        }
    });
}

fn cfg1(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid: (blocks, 1, 1),
        block: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Sums `parts` in order with the kernel used everywhere for cross-block reductions.
fn column_sum(r: &Runner, parts: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    unsafe {
        r.run_staged(
            "column_sum_f32",
            cfg1((n as u32).div_ceil(32), 32),
            ColumnSum {
                part: KArg::input(parts),
                out: KArg::output(&mut out),
                parts: parts.len() / n,
                n,
            },
        )
        .unwrap();
    }
    out
}

#[test]
fn l2norm_matches_cpu() {
    each_backend(|r| {
        let (rows, cols) = (13usize, 77usize);
        let mut x = randn(rows * cols, 31);
        // One all-zero row exercises the clamped (eps) branch.
        x[2 * cols..3 * cols].iter_mut().for_each(|v| *v = 0.0);
        let dy = randn(rows * cols, 32);
        let xt = t(&x, &[rows, cols]).into_trainable();
        let y = xt.l2_normalize().unwrap();
        let g = y
            .mul(&t(&dy, &[rows, cols]))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (want_y, want_dx) = (host(&y), host(g.get(&xt).unwrap()));
        let (mut got_y, mut norm, mut got_dx) = (
            vec![f32::NAN; rows * cols],
            vec![f32::NAN; rows],
            vec![f32::NAN; rows * cols],
        );
        unsafe {
            r.run_staged(
                "l2norm_fwd_f32",
                cfg1(4, 64),
                L2NormFwd {
                    x: KArg::input(&x),
                    y: KArg::output(&mut got_y),
                    norm: KArg::output(&mut norm),
                    rows,
                    cols,
                    eps: 1e-12,
                },
            )
            .unwrap();
            r.run_staged(
                "l2norm_bwd_f32",
                cfg1(5, 32),
                L2NormBwd {
                    y: KArg::input(&got_y),
                    norm: KArg::input(&norm),
                    dy: KArg::input(&dy),
                    dx: KArg::output(&mut got_dx),
                    rows,
                    cols,
                    eps: 1e-12,
                },
            )
            .unwrap();
        }
        check("l2norm y", &got_y, &want_y, 1e-6);
        // The zero row's gradient is dy / eps (1e12-scale): compare relative to magnitude.
        check("l2norm dx", &got_dx, &want_dx, 1e-5);
    });
}

#[test]
fn cross_entropy_matches_cpu() {
    each_backend(|r| {
        for &(rows, cols) in &[(37usize, 5usize), (9, 77)] {
            let z: Vec<f32> = randn(rows * cols, 41).iter().map(|v| 4.0 * v).collect();
            let labels: Vec<i64> = (0..rows).map(|r| ((r * 7 + 3) % cols) as i64).collect();
            let zt = t(&z, &[rows, cols]).into_trainable();
            let lt = Tensor::from_vec(labels.clone(), rows, Device::Cpu).unwrap();
            let loss = sd2::ops::cross_entropy(&zt, &lt).unwrap();
            let g = loss.scale(0.7).unwrap().backward().unwrap();
            let (want_loss, want_dz) = (host(&loss), host(g.get(&zt).unwrap()));
            let (mut part, mut lse, mut dz) = (
                vec![f32::NAN; rows],
                vec![f32::NAN; rows],
                vec![f32::NAN; rows * cols],
            );
            let dloss = 0.7f32;
            unsafe {
                r.run_staged(
                    "cross_entropy_fwd_f32",
                    cfg1(3, 64),
                    CrossEntropyFwd {
                        z: KArg::input(&z),
                        labels: KArg::input(&labels),
                        loss_part: KArg::output(&mut part),
                        lse: KArg::output(&mut lse),
                        rows,
                        cols,
                    },
                )
                .unwrap();
                r.run_staged(
                    "cross_entropy_bwd_f32",
                    cfg1(4, 64),
                    CrossEntropyBwd {
                        z: KArg::input(&z),
                        labels: KArg::input(&labels),
                        lse: KArg::input(&lse),
                        dloss: KArg::scalar(&dloss),
                        dz: KArg::output(&mut dz),
                        rows,
                        cols,
                    },
                )
                .unwrap();
            }
            let name = format!("cross-entropy {rows}x{cols}");
            check(
                &format!("{name} loss"),
                &column_sum(r, &part, 1),
                &want_loss,
                1e-6,
            );
            check(&format!("{name} dz"), &dz, &want_dz, 1e-6);
        }
    });
}

/// Mirrors `struct AdamwChunk` in kernels/adamw.cu (pointers as the runner's addresses).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamwChunk {
    p: u64,
    g: u64,
    m: u64,
    v: u64,
    begin: i64,
    end: i64,
    weight_decay: f32,
    pad: f32,
}

#[test]
fn adamw_multi_tensor_and_grad_norm_match_cpu() {
    each_backend(|r| {
        use sd2::backend::AdamWStep;
        // Two tensors (one with weight decay), the larger split into pieces with a tail.
        let sizes = [1000usize, 37];
        let decay = [0.01f32, 0.0];
        let mut p: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| randn(n, 50 + k as u64))
            .collect();
        let g: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| randn(n, 60 + k as u64))
            .collect();
        let mut m: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| randn(n, 70 + k as u64).iter().map(|v| 0.1 * v).collect())
            .collect();
        let mut v: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                randn(n, 80 + k as u64)
                    .iter()
                    .map(|x| 0.01 * x * x)
                    .collect()
            })
            .collect();
        let step = |wd: f32| AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: wd as f64,
            bias1: 1.0 - 0.9f64.powi(3),
            bias2: 1.0 - 0.999f64.powi(3),
            grad_scale: 0.5,
        };
        let want_sq: f64 = g.iter().flatten().map(|x| (*x as f64) * (*x as f64)).sum();
        let clipped = |wd: f32| AdamWStep {
            grad_scale: 0.5 * sd2::optim::clip_coefficient(want_sq.sqrt(), 0.5 * want_sq.sqrt()),
            ..step(wd)
        };
        let mut want: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = vec![];
        for k in 0..2 {
            let (mut pp, mut mm, mut vv) = (p[k].clone(), m[k].clone(), v[k].clone());
            sd2::ops::fused::adamw::adamw(&mut pp, &g[k], &mut mm, &mut vv, clipped(decay[k]));
            want.push((pp, mm, vv));
        }
        // The kernel reaches the tensors through the table: they live in the runner's memory.
        let put = |v: &[Vec<f32>]| -> Vec<_> { v.iter().map(|x| r.buffer(x).unwrap()).collect() };
        let (pb, gb, mb, vb) = (put(&p), put(&g), put(&m), put(&v));
        let mut chunks = vec![];
        for k in 0..2 {
            let mut b = 0;
            while b < sizes[k] {
                let e = (b + 300).min(sizes[k]);
                chunks.push(AdamwChunk {
                    p: pb[k].addr(),
                    g: gb[k].addr(),
                    m: mb[k].addr(),
                    v: vb[k].addr(),
                    begin: b as i64,
                    end: e as i64,
                    weight_decay: decay[k],
                    pad: 0.0,
                });
                b = e;
            }
        }
        let mut parts = vec![f32::NAN; chunks.len()];
        let mut clip = [f32::NAN; 2];
        let s = step(0.0);
        // Clipping at half the norm: the device coefficient ≈ 0.5 scales every gradient.
        let max_norm = 0.5 * want_sq.sqrt();
        unsafe {
            r.run_staged(
                "sum_sq_multi_f32",
                cfg1(2, 64),
                SumSqMulti {
                    chunks: KArg::input(&chunks),
                    num_chunks: chunks.len(),
                    part: KArg::output(&mut parts),
                },
            )
            .unwrap();
            r.run_staged(
                "grad_clip_f32",
                cfg1(1, 64),
                GradClip {
                    part: KArg::input(&parts),
                    num_parts: parts.len(),
                    max_norm: max_norm as f32,
                    out: KArg::output(&mut clip),
                },
            )
            .unwrap();
            r.run_staged(
                "adamw_multi_f32",
                cfg1(3, 64),
                AdamwMulti {
                    chunks: KArg::input(&chunks),
                    num_chunks: chunks.len(),
                    lr: s.lr as f32,
                    beta1: s.beta1 as f32,
                    beta2: s.beta2 as f32,
                    eps: s.eps as f32,
                    bias1: s.bias1 as f32,
                    bias2: s.bias2 as f32,
                    grad_scale: s.grad_scale as f32,
                    scale_ptr: KArg::input(&clip[1..]),
                },
            )
            .unwrap();
        }
        for k in 0..2 {
            p[k] = r.read(&pb[k]).unwrap();
            m[k] = r.read(&mb[k]).unwrap();
            v[k] = r.read(&vb[k]).unwrap();
        }
        let got_sq: f64 = parts.iter().map(|x| *x as f64).sum();
        check(
            "grad sum of squares",
            &[got_sq as f32],
            &[want_sq as f32],
            1e-6,
        );
        let coef = sd2::optim::clip_coefficient(want_sq.sqrt(), max_norm);
        check(
            "grad norm, clip coefficient",
            &clip,
            &[want_sq.sqrt() as f32, coef as f32],
            1e-6,
        );
        assert!(coef < 0.51, "the test must clip: coefficient {coef}");
        for k in 0..2 {
            check(&format!("adamw tensor {k} p"), &p[k], &want[k].0, 1e-6);
            check(&format!("adamw tensor {k} m"), &m[k], &want[k].1, 1e-6);
            check(&format!("adamw tensor {k} v"), &v[k], &want[k].2, 1e-6);
        }
    });
}

#[test]
fn gather_scatter_patchify_and_casts_match_cpu() {
    each_backend(|r| {
        // Embedding gather and its gradient (deterministic scatter-add, repeated ids).
        let (vocab, cols, n) = (11usize, 24usize, 9usize);
        let table = randn(vocab * cols, 90);
        let ids: Vec<i64> = vec![3, 0, 10, 3, 7, 3, 1, 10, 5];
        let tt = t(&table, &[vocab, cols]).into_trainable();
        let it = Tensor::from_vec(ids.clone(), n, Device::Cpu).unwrap();
        let e = Tensor::embedding(&tt, &it).unwrap();
        let dy = randn(n * cols, 91);
        let g = e
            .mul(&t(&dy, &[n, cols]))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (mut rows, mut dtable) = (vec![f32::NAN; n * cols], vec![0.0f32; vocab * cols]);
        unsafe {
            r.run_staged(
                "index_rows_f32",
                cfg1(2, 32),
                IndexRows {
                    table: KArg::input(&table),
                    ids: KArg::input(&ids),
                    out: KArg::output(&mut rows),
                    n,
                    cols,
                },
            )
            .unwrap();
            r.run_staged(
                "index_add_rows_f32",
                cfg1(1, 32),
                IndexAddRows {
                    src: KArg::input(&dy),
                    ids: KArg::input(&ids),
                    out: KArg::output(&mut dtable),
                    n,
                    cols,
                },
            )
            .unwrap();
        }
        check("embedding gather", &rows, &host(&e), 0.0);
        check(
            "embedding scatter-add",
            &dtable,
            &host(g.get(&tt).unwrap()),
            1e-6,
        );
        // bf16 rows added into a gradient that exists (the CLS rows into the residual
        // stream's), distinct ids: each touched element is round(acc + g), the others untouched.
        let (rows_total, picks) = (7usize, [5i64, 0, 3]);
        let acc = bf16_round(&randn(rows_total * cols, 93));
        let src = bf16_round(&randn(picks.len() * cols, 94));
        let mut into = to_bf16(&acc);
        unsafe {
            r.run_staged(
                "index_add_rows_bf16",
                cfg1(1, 32),
                IndexAddRows {
                    src: KArg::input(&to_bf16(&src)),
                    ids: KArg::input(&picks),
                    out: KArg::output(&mut into),
                    n: picks.len(),
                    cols,
                },
            )
            .unwrap();
        }
        let mut want = acc.clone();
        for (i, id) in picks.iter().enumerate() {
            for c in 0..cols {
                want[*id as usize * cols + c] += src[i * cols + c];
            }
        }
        let want16: Vec<u16> = to_bf16(&want).iter().map(|v| v.to_bits()).collect();
        let got16: Vec<u16> = into.iter().map(|v| v.to_bits()).collect();
        assert_eq!(
            got16, want16,
            "index_add_rows_bf16 into an existing gradient"
        );
        // Patchify with trailing pixels dropped (H = 19, W = 17, p = 4).
        let (b, c, h, w, p) = (2usize, 3usize, 19usize, 17usize, 4usize);
        let x = randn(b * c * h * w, 92);
        let want = host(&t(&x, &[b, c, h, w]).patchify(p).unwrap());
        let mut got = vec![f32::NAN; want.len()];
        unsafe {
            r.run_staged(
                "patchify_f32",
                cfg1(3, 64),
                Patchify {
                    x: KArg::input(&x),
                    out: KArg::output(&mut got),
                    b,
                    c,
                    h,
                    w,
                    p,
                },
            )
            .unwrap();
        }
        check("patchify", &got, &want, 0.0);
        // Casts round to nearest even, as `half` does; specials survive.
        let mut vals = randn(100, 93);
        vals.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            -f32::INFINITY,
            1e-40,
            3.0e38,
            1.0 + 1.0 / 256.0,
        ]);
        let mut bf = vec![half::bf16::from_bits(0xffff); vals.len()];
        let mut back = vec![f32::NAN; vals.len()];
        unsafe {
            r.run_staged(
                "cast_f32_bf16",
                cfg1(1, 64),
                Cast {
                    x: KArg::input(&vals),
                    y: KArg::output(&mut bf),
                    n: vals.len(),
                },
            )
            .unwrap();
            r.run_staged(
                "cast_bf16_f32",
                cfg1(1, 64),
                Cast {
                    x: KArg::input(&bf),
                    y: KArg::output(&mut back),
                    n: vals.len(),
                },
            )
            .unwrap();
        }
        let want_bits: Vec<u16> = vals
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let got_bits: Vec<u16> = bf.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got_bits, want_bits, "f32 → bf16 bits");
        assert!(back
            .iter()
            .zip(&bf)
            .all(|(a, b)| a.to_bits() == b.to_f32().to_bits()));
    });
}

/// out, lse, dq, dk, dv of the CPU attention op for q [b, sq, width], k/v [b, skv, width] and
/// the upstream gradient dout.
fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    [b, sq, skv, width, heads]: [usize; 5],
    causal: bool,
) -> [Vec<f32>; 5] {
    use sd2::ops::{attention_lse, AttnOptions};
    let (qt, kt, vt) = (
        t(q, &[b, sq, width]).into_trainable(),
        t(k, &[b, skv, width]).into_trainable(),
        t(v, &[b, skv, width]).into_trainable(),
    );
    let (o, lse) = attention_lse(
        &qt,
        &kt,
        &vt,
        AttnOptions {
            heads,
            causal,
            scale: None,
        },
    )
    .unwrap();
    let g = o
        .mul(&t(dout, &[b, sq, width]))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    [
        host(&o),
        host(&lse),
        host(g.get(&qt).unwrap()),
        host(g.get(&kt).unwrap()),
        host(g.get(&vt).unwrap()),
    ]
}

/// CLAM's attention (24 tokens × 8 heads of 128, as in ViT-L/14) and small causal/cross shapes:
/// out, lse, dq, dk, dv against the CPU attention op (f32; CLAM's shape also in bf16 storage).
#[test]
fn clam_attention_matches_cpu() {
    each_backend(|r| {
        for &(b, heads, sq, skv, d, causal, bf) in &[
            (3usize, 8usize, 24usize, 24usize, 128usize, false, false),
            (2, 3, 5, 5, 24, true, false),
            (2, 2, 7, 13, 16, true, false),
            (2, 8, 24, 24, 128, false, true),
        ] {
            let width = heads * d;
            let round = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
            let q = round(randn(b * sq * width, 101));
            let k = round(randn(b * skv * width, 102));
            let v = round(randn(b * skv * width, 103));
            let dout = round(randn(b * sq * width, 104));
            let want = attention_reference(&q, &k, &v, &dout, [b, sq, skv, width, heads], causal);
            let (qb, kb, vb, dob) = (
                Buf::new(&q, bf),
                Buf::new(&k, bf),
                Buf::new(&v, bf),
                Buf::new(&dout, bf),
            );
            let mut got_o = Buf::poisoned(b * sq * width, bf);
            let mut got_lse = vec![f32::NAN; b * heads * sq];
            let (mut dq, mut dk, mut dv) = (
                Buf::poisoned(b * sq * width, bf),
                Buf::poisoned(b * skv * width, bf),
                Buf::poisoned(b * skv * width, bf),
            );
            let suffix = if bf { "bf16" } else { "f32" };
            let fwd_smem = ((sq + 2 * skv) * d + sq * skv) * 4;
            let bwd_smem = ((2 * sq + 2 * skv) * d + 2 * sq * skv) * 4;
            let scale = 1.0 / (d as f32).sqrt();
            unsafe {
                r.run_staged(
                    &format!("clam_attention_fwd_{suffix}"),
                    LaunchConfig {
                        grid: (5, 1, 1),
                        block: (128, 1, 1),
                        shared_mem_bytes: fwd_smem as u32,
                    },
                    ClamAttentionFwd {
                        q: qb.arg(),
                        k: kb.arg(),
                        v: vb.arg(),
                        out: got_o.arg_mut(),
                        lse: KArg::output(&mut got_lse),
                        batch: b,
                        heads,
                        sq,
                        skv,
                        d,
                        causal,
                        scale,
                    },
                )
                .unwrap();
                r.run_staged(
                    &format!("clam_attention_bwd_{suffix}"),
                    LaunchConfig {
                        grid: (4, 1, 1),
                        block: (96, 1, 1),
                        shared_mem_bytes: bwd_smem as u32,
                    },
                    ClamAttentionBwd {
                        q: qb.arg(),
                        k: kb.arg(),
                        v: vb.arg(),
                        o: got_o.arg(),
                        lse: KArg::input(&got_lse),
                        dout: dob.arg(),
                        dq: dq.arg_mut(),
                        dk: dk.arg_mut(),
                        dv: dv.arg_mut(),
                        batch: b,
                        heads,
                        sq,
                        skv,
                        d,
                        causal,
                        scale,
                    },
                )
                .unwrap();
            }
            let tol = if bf { 1e-2 } else { 2e-5 };
            let name =
                format!("attention {suffix} b{b} h{heads} sq{sq} skv{skv} d{d} causal {causal}");
            for (what, got, want) in [
                ("out", got_o.get(), &want[0]),
                ("lse", got_lse.clone(), &want[1]),
                ("dq", dq.get(), &want[2]),
                ("dk", dk.get(), &want[3]),
                ("dv", dv.get(), &want[4]),
            ] {
                check(&format!("{name} {what}"), &got, want, tol);
            }
        }
    });
}

/// A kernel buffer with f32 or bf16 storage.
enum Buf {
    F(Vec<f32>),
    B(Vec<half::bf16>),
}

impl Buf {
    fn new(v: &[f32], bf: bool) -> Buf {
        if bf {
            Buf::B(to_bf16(v))
        } else {
            Buf::F(v.to_vec())
        }
    }
    /// NaN-filled, so anything the kernel leaves unwritten fails the comparison.
    fn poisoned(n: usize, bf: bool) -> Buf {
        Buf::new(&vec![f32::NAN; n], bf)
    }
    fn arg(&self) -> KArg<'_> {
        match self {
            Buf::F(v) => KArg::input(v),
            Buf::B(v) => KArg::input(v),
        }
    }
    fn arg_mut(&mut self) -> KArg<'_> {
        match self {
            Buf::F(v) => KArg::output(v),
            Buf::B(v) => KArg::output(v),
        }
    }
    fn get(&self) -> Vec<f32> {
        match self {
            Buf::F(v) => v.clone(),
            Buf::B(v) => from_bf16(v),
        }
    }
}

/// Flash attention (head dim 64) at the towers' sequence lengths — vision 257 non-causal, text 77
/// causal — plus 5 and a cross shape (7 queries, 13 keys, causal): out, lse, dq, dk, dv against
/// the CPU attention op; f32 storage everywhere, bf16 storage (f32 math) on the shorter shapes
/// with the reference fed the same bf16-rounded inputs.
#[test]
fn flash_attention_matches_cpu() {
    each_backend(|r| {
        let d = 64usize;
        for &(b, heads, sq, skv, causal, bf) in &[
            (3usize, 2usize, 257usize, 257usize, false, false),
            (3, 2, 77, 77, true, false),
            (2, 1, 5, 5, false, false),
            (2, 2, 7, 13, true, false),
            (2, 2, 77, 77, true, true),
            (2, 2, 7, 13, true, true),
        ] {
            let width = heads * d;
            let round = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
            let q = round(randn(b * sq * width, 201));
            let k = round(randn(b * skv * width, 202));
            let v = round(randn(b * skv * width, 203));
            let dout = round(randn(b * sq * width, 204));
            let want = attention_reference(&q, &k, &v, &dout, [b, sq, skv, width, heads], causal);
            let scale = 1.0 / (d as f32).sqrt();
            let bh = b * heads;
            let (qb, kb, vb, dob) = (
                Buf::new(&q, bf),
                Buf::new(&k, bf),
                Buf::new(&v, bf),
                Buf::new(&dout, bf),
            );
            let mut got_o = Buf::poisoned(b * sq * width, bf);
            let mut got_lse = vec![f32::NAN; b * heads * sq];
            let mut delta = vec![f32::NAN; b * heads * sq];
            let (mut dq, mut dk, mut dv) = (
                Buf::poisoned(b * sq * width, bf),
                Buf::poisoned(b * skv * width, bf),
                Buf::poisoned(b * skv * width, bf),
            );
            let suffix = if bf { "bf16" } else { "f32" };
            unsafe {
                r.run_staged(
                    &format!("flash_fwd_d64_{suffix}"),
                    flash::fwd_config(bh, sq, d),
                    FlashFwd {
                        q: qb.arg(),
                        k: kb.arg(),
                        v: vb.arg(),
                        out: got_o.arg_mut(),
                        lse: KArg::output(&mut got_lse),
                        heads,
                        sq,
                        skv,
                        causal,
                        scale,
                    },
                )
                .unwrap();
                r.run_staged(
                    &format!("flash_delta_{suffix}"),
                    flash::delta_config(b * heads * sq),
                    FlashDelta {
                        o: got_o.arg(),
                        dout: dob.arg(),
                        delta: KArg::output(&mut delta),
                        batch: b,
                        heads,
                        sq,
                        d,
                    },
                )
                .unwrap();
                r.run_staged(
                    &format!("flash_dq_d64_{suffix}"),
                    flash::dq_config(bh, sq, d),
                    FlashDq {
                        q: qb.arg(),
                        k: kb.arg(),
                        v: vb.arg(),
                        lse: KArg::input(&got_lse),
                        delta: KArg::input(&delta),
                        dout: dob.arg(),
                        dq: dq.arg_mut(),
                        heads,
                        sq,
                        skv,
                        causal,
                        scale,
                    },
                )
                .unwrap();
                r.run_staged(
                    &format!("flash_dkdv_d64_{suffix}"),
                    flash::dkdv_config(bh, skv, d),
                    FlashDkdv {
                        q: qb.arg(),
                        k: kb.arg(),
                        v: vb.arg(),
                        lse: KArg::input(&got_lse),
                        delta: KArg::input(&delta),
                        dout: dob.arg(),
                        dk: dk.arg_mut(),
                        dv: dv.arg_mut(),
                        heads,
                        sq,
                        skv,
                        causal,
                        scale,
                    },
                )
                .unwrap();
            }
            // bf16: each stored output rounded once (2^-8 relative), and the backward reads the
            // rounded O for D_i.
            let tol = if bf { 1e-2 } else { 3e-5 };
            let name = format!("flash {suffix} b{b} h{heads} sq{sq} skv{skv} causal {causal}");
            for (what, got, want) in [
                ("out", got_o.get(), &want[0]),
                ("lse", got_lse.clone(), &want[1]),
                ("dq", dq.get(), &want[2]),
                ("dk", dk.get(), &want[3]),
                ("dv", dv.get(), &want[4]),
            ] {
                check(&format!("{name} {what}"), &got, want, tol);
            }
        }
    });
}

/// Flash attention variants 3 and 4 (tensor cores through the mma/ldmatrix/cp.async wrappers; the
/// simulator emulates the fragments lane by lane): out and lse against the CPU attention op on bf16 inputs — one
/// key tile with a tail (77 causal), several tiles with tails (130), a causal cross shape.
#[test]
fn flash_attention_tensor_core_forward_matches_cpu() {
    each_backend(|r| {
        let d = 64usize;
        for (kernel, &(b, heads, sq, skv, causal)) in
            ["flash_fwd_tc3_d64_bf16", "flash_fwd_tc4_d64_bf16"]
                .into_iter()
                .flat_map(|k| {
                    [
                        (2usize, 2usize, 77usize, 77usize, true),
                        (2, 1, 130, 130, false),
                        (1, 2, 7, 13, true),
                    ]
                    .iter()
                    .map(move |s| (k, s))
                })
        {
            let width = heads * d;
            let q = bf16_round(&randn(b * sq * width, 301));
            let k = bf16_round(&randn(b * skv * width, 302));
            let v = bf16_round(&randn(b * skv * width, 303));
            let dout = randn(b * sq * width, 304);
            let want = attention_reference(&q, &k, &v, &dout, [b, sq, skv, width, heads], causal);
            let (qb, kb, vb) = (to_bf16(&q), to_bf16(&k), to_bf16(&v));
            let mut o = to_bf16(&vec![f32::NAN; b * sq * width]);
            let mut lse = vec![f32::NAN; b * heads * sq];
            unsafe {
                r.run_staged(
                    kernel,
                    flash::fwd_tc_config(b * heads, sq),
                    FlashFwd {
                        q: KArg::input(&qb),
                        k: KArg::input(&kb),
                        v: KArg::input(&vb),
                        out: KArg::output(&mut o),
                        lse: KArg::output(&mut lse),
                        heads,
                        sq,
                        skv,
                        causal,
                        scale: 1.0 / (d as f32).sqrt(),
                    },
                )
                .unwrap();
            }
            let name = format!("{kernel} b{b} h{heads} sq{sq} skv{skv} causal {causal}");
            // P is rounded to bf16 before P·V, and O is stored in bf16.
            check(&format!("{name} out"), &from_bf16(&o), &want[0], 1.5e-2);
            check(&format!("{name} lse"), &lse, &want[1], 1e-5);
        }
    });
}

/// The tensor-core flash backward (variants 2 and 3, head dims 64, 32, 16, bf16 storage):
/// dQ, the row deltas D_i it writes, dK and dV against the CPU attention op on the same
/// bf16-valued inputs (O and lse from the reference) — 5, 77 causal, 7×13 causal, 150 and 257
/// keys at head dim 64, tails and causal shapes at 32 and 16. Each launch runs twice on fresh
/// poisoned outputs and must give the same bits (no atomics: no scheduling dependence).
#[test]
fn flash_attention_tensor_core_backward_matches_cpu() {
    each_backend(|r| {
        let shapes: &[(usize, usize, usize, usize, usize, bool)] = &[
            (64, 2, 2, 5, 5, false),
            (64, 2, 2, 77, 77, true),
            (64, 2, 2, 7, 13, true),
            (64, 1, 2, 150, 150, false),
            (64, 1, 1, 257, 257, false),
            (32, 2, 2, 77, 77, true),
            (32, 1, 2, 70, 70, false),
            (16, 2, 4, 7, 13, true),
            (16, 2, 4, 65, 65, false),
            // More queries than keys, causal: the first rows see no key (O = 0, lse = −∞).
            (16, 1, 2, 13, 7, true),
            (64, 1, 2, 70, 7, true),
        ];
        for variant in flash::BWD_TC_VARIANTS {
            for &(d, b, heads, sq, skv, causal) in shapes {
                let width = heads * d;
                let seed = 400 + sq as u64;
                let q = bf16_round(&randn(b * sq * width, seed));
                let k = bf16_round(&randn(b * skv * width, seed + 1));
                let v = bf16_round(&randn(b * skv * width, seed + 2));
                let dout = bf16_round(&randn(b * sq * width, seed + 3));
                let want =
                    attention_reference(&q, &k, &v, &dout, [b, sq, skv, width, heads], causal);
                let o = bf16_round(&want[0]);
                // D_i = ⟨dO_i, O_i⟩ over the head's columns, from the bf16 O the kernel reads.
                let mut want_delta = vec![0.0f32; b * heads * sq];
                for bi in 0..b {
                    for h in 0..heads {
                        for i in 0..sq {
                            let at = (bi * sq + i) * width + h * d;
                            want_delta[(bi * heads + h) * sq + i] =
                                (0..d).map(|c| o[at + c] * dout[at + c]).sum();
                        }
                    }
                }
                let (qb, kb, vb, ob, dob) = (
                    to_bf16(&q),
                    to_bf16(&k),
                    to_bf16(&v),
                    to_bf16(&o),
                    to_bf16(&dout),
                );
                let (dq_kernel, dkdv_kernel) = flash::bwd_tc_kernels(variant, d);
                let scale = 1.0 / (d as f32).sqrt();
                let run = || {
                    let mut delta = vec![f32::NAN; b * heads * sq];
                    let mut dq = to_bf16(&vec![f32::NAN; b * sq * width]);
                    let mut dk = to_bf16(&vec![f32::NAN; b * skv * width]);
                    let mut dv = to_bf16(&vec![f32::NAN; b * skv * width]);
                    unsafe {
                        r.run_staged(
                            &dq_kernel,
                            flash::bwd_tc_config(b * heads, sq),
                            FlashBwdDq {
                                q: KArg::input(&qb),
                                k: KArg::input(&kb),
                                v: KArg::input(&vb),
                                o: KArg::input(&ob),
                                lse: KArg::input(&want[1]),
                                dout: KArg::input(&dob),
                                delta: KArg::output(&mut delta),
                                dq: KArg::output(&mut dq),
                                heads,
                                sq,
                                skv,
                                causal,
                                scale,
                            },
                        )
                        .unwrap();
                        r.run_staged(
                            &dkdv_kernel,
                            flash::bwd_tc_config(b * heads, skv),
                            FlashDkdv {
                                q: KArg::input(&qb),
                                k: KArg::input(&kb),
                                v: KArg::input(&vb),
                                lse: KArg::input(&want[1]),
                                delta: KArg::input(&delta),
                                dout: KArg::input(&dob),
                                dk: KArg::output(&mut dk),
                                dv: KArg::output(&mut dv),
                                heads,
                                sq,
                                skv,
                                causal,
                                scale,
                            },
                        )
                        .unwrap();
                    }
                    (delta, from_bf16(&dq), from_bf16(&dk), from_bf16(&dv))
                };
                let first = run();
                let again = run();
                let name =
                    format!("bwd tc{variant} d{d} b{b} h{heads} sq{sq} skv{skv} causal {causal}");
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                for (what, x, y) in [
                    ("delta", &first.0, &again.0),
                    ("dq", &first.1, &again.1),
                    ("dk", &first.2, &again.2),
                    ("dv", &first.3, &again.3),
                ] {
                    assert_eq!(bits(x), bits(y), "{name} {what}: two runs differ");
                }
                check(&format!("{name} delta"), &first.0, &want_delta, 1e-5);
                // P and dS are rounded to bf16 before they multiply; outputs stored in bf16.
                check(&format!("{name} dq"), &first.1, &want[2], 1e-2);
                check(&format!("{name} dk"), &first.2, &want[3], 1e-2);
                check(&format!("{name} dv"), &first.3, &want[4], 1e-2);
            }
        }
    });
}

/// f64 reference of the LoRA GEMM forward on bf16-valued inputs: X·Wᵀ + s·S·Bᵀ, then the
/// epilogue (0 none, 1 bias, 2 bias + quick_gelu, 3 bias + residual).
#[allow(clippy::too_many_arguments)]
fn lora_reference(
    x: &[f32],
    w: &[f32],
    s: &[f32],
    bl: &[f32],
    bias: &[f32],
    res: &[f32],
    (m, n, k, rank): (usize, usize, usize, usize),
    scale: f32,
    epi: i32,
) -> Vec<f32> {
    let mut want = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let main: f64 = (0..k)
                .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                .sum();
            let low: f64 = (0..rank)
                .map(|c| s[i * rank + c] as f64 * bl[j * rank + c] as f64)
                .sum();
            let mut v = main + scale as f64 * low;
            if epi != 0 {
                v += bias[j] as f64;
            }
            if epi == 2 {
                v /= 1.0 + (-1.702 * v).exp();
            }
            if epi == 3 {
                v += res[i * n + j] as f64;
            }
            want[i * n + j] = v as f32;
        }
    }
    want
}

/// The LoRA-linear GEMM (mma.sync variants): Y = X·Wᵀ + s·S·Bᵀ with every epilogue (none,
/// bias, bias + quick_gelu, bias + residual), against an f64 reference on the same bf16 inputs,
/// at odd shapes with tails in M, N, K and r (K = 37 and r = 5 take the element-load path).
#[test]
fn lora_gemm_forward_matches_reference() {
    each_backend(|r| {
        for (v, &(m, n, k, rank, epi)) in lora_gemm::VARIANTS.iter().flat_map(|v| {
            [
                (37usize, 40usize, 72usize, 8usize, 0i32),
                (37, 40, 72, 8, 1),
                (37, 40, 72, 8, 2),
                (37, 40, 72, 8, 3),
                (70, 67, 37, 5, 1),
                (33, 65, 96, 0, 2),
                // more k-tiles than pipeline stages, several blocks each way
                (130, 136, 200, 16, 3),
            ]
            .iter()
            .map(move |s| (v, s))
        }) {
            let round = |v: Vec<f32>| bf16_round(&v);
            let x = round(randn(m * k, 401));
            let w = round(randn(n * k, 402).iter().map(|v| v * 0.2).collect());
            let s = round(randn(m * rank, 403));
            let bl = round(randn(n * rank, 404).iter().map(|v| v * 0.3).collect());
            let bias = round(randn(n, 405));
            let res = round(randn(m * n, 406));
            let scale = 2.0f32;
            let want = lora_reference(&x, &w, &s, &bl, &bias, &res, (m, n, k, rank), scale, epi);
            let mut y = to_bf16(&vec![f32::NAN; m * n]);
            let mut pre = to_bf16(&vec![f32::NAN; m * n]);
            let (xb, wb, sb, lb, bb, rb) = (
                to_bf16(&x),
                to_bf16(&w),
                to_bf16(&s),
                to_bf16(&bl),
                to_bf16(&bias),
                to_bf16(&res),
            );
            unsafe {
                r.run_staged(
                    v.fwd,
                    v.config(m, n),
                    LoraGemmFwd {
                        x: KArg::input(&xb),
                        w: KArg::input(&wb),
                        bias: KArg::input(&bb),
                        s_low: if rank > 0 {
                            KArg::input(&sb)
                        } else {
                            KArg::Null
                        },
                        lb: if rank > 0 {
                            KArg::input(&lb)
                        } else {
                            KArg::Null
                        },
                        // The residual is added whenever it is given.
                        res: if epi == 3 {
                            KArg::input(&rb)
                        } else {
                            KArg::Null
                        },
                        pre: if epi == 2 {
                            KArg::output(&mut pre)
                        } else {
                            KArg::Null
                        },
                        y: KArg::output(&mut y),
                        m,
                        n,
                        k,
                        r: rank,
                        scale,
                        epilogue: epi,
                    },
                )
                .unwrap();
            }
            // One bf16 rounding of the output, plus f32 accumulation order.
            let name = format!("lora gemm {} m{m} n{n} k{k} r{rank} epilogue {epi}", v.name);
            check(&name, &from_bf16(&y), &want, 8e-3);
            if epi == 2 {
                // bias + quick_gelu also writes the pre-activation (fc1's saved h).
                let want_pre =
                    lora_reference(&x, &w, &s, &bl, &bias, &res, (m, n, k, rank), scale, 1);
                check(&format!("{name} pre"), &from_bf16(&pre), &want_pre, 8e-3);
            }
        }
    });
}

/// The Hopper LoRA GEMM (wgmma + TMA, warp-specialized) against the same f64 reference: in the
/// simulator its TMA, mbarrier and wgmma emulations check the pipeline and indexing; on an
/// sm_90 GPU it checks our reading of the hardware layouts. Shapes with tails in every
/// dimension, more k-tiles than stages, ranks 8, 16 and none.
#[test]
fn lora_gemm_hopper_forward_matches_reference() {
    use sd2::backend::cuda::launch::TileMap;
    use sd2::backend::cuda::lora_gemm::hopper;
    each_backend(|r| {
        if !r.has_hopper() {
            println!("[{}] skipped: not an sm_90 device", r.name());
            return;
        }
        for &(m, n, k, rank, epi) in &[
            (37usize, 40usize, 72usize, 8usize, 0i32),
            (37, 40, 72, 8, 1),
            (37, 40, 72, 8, 2),
            (37, 40, 72, 8, 3),
            (33, 65, 96, 0, 2),
            (70, 67, 136, 8, 1),
            (130, 300, 328, 16, 3),
        ] {
            let round = |v: Vec<f32>| bf16_round(&v);
            let x = round(randn(m * k, 601));
            let w = round(randn(n * k, 602).iter().map(|v| v * 0.2).collect());
            let s = round(randn(m * rank.max(1), 603));
            let bl = round(
                randn(n * rank.max(1), 604)
                    .iter()
                    .map(|v| v * 0.3)
                    .collect(),
            );
            let bias = round(randn(n, 605));
            let res = round(randn(m * n, 606));
            let scale = 2.0f32;
            let want = lora_reference(&x, &w, &s, &bl, &bias, &res, (m, n, k, rank), scale, epi);
            let mut y = to_bf16(&vec![f32::NAN; m * n]);
            let mut pre = to_bf16(&vec![f32::NAN; m * n]);
            let (xb, wb, sb, lb, bb, rb) = (
                to_bf16(&x),
                to_bf16(&w),
                to_bf16(&s),
                to_bf16(&bl),
                to_bf16(&bias),
                to_bf16(&res),
            );
            let maps: [TileMap; 4] = hopper::maps(m, n, k, rank);
            let bytes = |v: &[half::bf16]| bytemuck::cast_slice::<_, u8>(v).to_vec();
            let (xs, ws) = (bytes(&xb), bytes(&wb));
            let (ss, ls) = if rank > 0 {
                (bytes(&sb), bytes(&lb))
            } else {
                (xs.clone(), ws.clone())
            };
            unsafe {
                r.run_staged(
                    hopper::KERNEL,
                    hopper::config(m, n),
                    LoraGemm3Fwd {
                        tm_x: KArg::Tma(&xs, maps[0]),
                        tm_w: KArg::Tma(&ws, maps[1]),
                        tm_s: KArg::Tma(&ss, maps[2]),
                        tm_b: KArg::Tma(&ls, maps[3]),
                        bias: KArg::input(&bb),
                        res: if epi == 3 {
                            KArg::input(&rb)
                        } else {
                            KArg::Null
                        },
                        pre: if epi == 2 {
                            KArg::output(&mut pre)
                        } else {
                            KArg::Null
                        },
                        aux: KArg::Null,
                        lds: KArg::Null,
                        la: KArg::Null,
                        lr: 0,
                        lp: 0.0,
                        lseed: 0,
                        y: KArg::output(&mut y),
                        m,
                        n,
                        k,
                        r: rank,
                        scale,
                        epilogue: epi,
                    },
                )
                .unwrap();
            }
            let name = format!(
                "lora gemm {} m{m} n{n} k{k} r{rank} epilogue {epi}",
                hopper::NAME
            );
            check(&name, &from_bf16(&y), &want, 8e-3);
            if epi == 2 {
                let want_pre =
                    lora_reference(&x, &w, &s, &bl, &bias, &res, (m, n, k, rank), scale, 1);
                check(&format!("{name} pre"), &from_bf16(&pre), &want_pre, 8e-3);
            }
        }
    });
}

/// The LoRA-linear backward through the same GEMM body with depth-major B operands:
/// dS = dY·B, then dX = dY·W + s·dS·A — plain, and with the epilogue that multiplies by
/// quick_gelu′(h) (fc2's dX is fc1's output gradient) and adds the gradient dX already has —
/// against f64 references on the same bf16 inputs.
#[test]
fn lora_gemm_backward_dx_matches_reference() {
    const P: f32 = 0.3;
    const SEED: u64 = 0x5eed;
    each_backend(|r| {
        // (m, n, k, rank, gelu′ + acc epilogue, LoRA term under dropout in the epilogue)
        for (v, &(m, n, k, rank, epi, drop)) in lora_gemm::VARIANTS.iter().flat_map(|v| {
            [
                (37usize, 40usize, 72usize, 8usize, false, false),
                (37, 40, 72, 8, true, false),
                (70, 37, 67, 5, false, false),
                (70, 37, 67, 0, true, false),
                (130, 200, 136, 16, true, false),
                (37, 40, 72, 8, false, true),
                (70, 37, 67, 5, true, true),
            ]
            .iter()
            .map(move |s| (v, s))
        }) {
            let round = |v: Vec<f32>| bf16_round(&v);
            let dy = round(randn(m * n, 501));
            let w = round(randn(n * k, 502).iter().map(|v| v * 0.2).collect());
            let a = round(randn(rank * k, 503).iter().map(|v| v * 0.3).collect());
            let bl = round(randn(n * rank, 504).iter().map(|v| v * 0.3).collect());
            let scale = 2.0f32;
            let cfg = |out: usize| v.config(m, out);
            let (dyb, wb, ab, bb) = (to_bf16(&dy), to_bf16(&w), to_bf16(&a), to_bf16(&bl));
            let h = round(randn(m * k, 505).iter().map(|v| v * 2.0).collect());
            let acc = round(randn(m * k, 506));
            let (hb, accb) = (to_bf16(&h), to_bf16(&acc));
            let mut ds = to_bf16(&vec![f32::NAN; m * rank]);
            let mut dx = to_bf16(&vec![f32::NAN; m * k]);
            unsafe {
                if rank > 0 {
                    r.run_staged(
                        v.bwd,
                        cfg(rank),
                        LoraGemmBwd {
                            x: KArg::input(&dyb),
                            w: KArg::input(&bb),
                            s_low: KArg::Null,
                            lb: KArg::Null,
                            lds: KArg::Null,
                            la: KArg::Null,
                            lr: 0,
                            lp: 0.0,
                            lseed: 0,
                            res: KArg::Null,
                            aux: KArg::Null,
                            y: KArg::output(&mut ds),
                            m,
                            n: rank,
                            k: n,
                            r: 0,
                            scale: 1.0,
                            epilogue: 0,
                        },
                    )
                    .unwrap();
                }
                r.run_staged(
                    v.bwd,
                    cfg(k),
                    LoraGemmBwd {
                        x: KArg::input(&dyb),
                        w: KArg::input(&wb),
                        // The LoRA term as extra depth, or under dropout in the epilogue.
                        s_low: if rank > 0 && !drop {
                            KArg::input(&ds)
                        } else {
                            KArg::Null
                        },
                        lb: if rank > 0 && !drop {
                            KArg::input(&ab)
                        } else {
                            KArg::Null
                        },
                        lds: if drop { KArg::input(&ds) } else { KArg::Null },
                        la: if drop { KArg::input(&ab) } else { KArg::Null },
                        lr: if drop { rank } else { 0 },
                        lp: P,
                        lseed: SEED,
                        res: if epi { KArg::input(&accb) } else { KArg::Null },
                        aux: if epi { KArg::input(&hb) } else { KArg::Null },
                        y: KArg::output(&mut dx),
                        m,
                        n: k,
                        k: n,
                        r: if drop { 0 } else { rank },
                        scale,
                        epilogue: if epi { 4 } else { 0 },
                    },
                )
                .unwrap();
            }
            let dsf = from_bf16(&ds);
            let mut want_ds = vec![0f32; m * rank];
            let mut want_dx = vec![0f32; m * k];
            for i in 0..m {
                for j in 0..rank {
                    want_ds[i * rank + j] = (0..n)
                        .map(|c| dy[i * n + c] as f64 * bl[c * rank + j] as f64)
                        .sum::<f64>() as f32;
                }
                for j in 0..k {
                    let main: f64 = (0..n)
                        .map(|c| dy[i * n + c] as f64 * w[c * k + j] as f64)
                        .sum();
                    let low: f64 = (0..rank)
                        .map(|c| dsf[i * rank + c] as f64 * a[c * k + j] as f64)
                        .sum();
                    let mut v = if !drop {
                        main + scale as f64 * low
                    } else if sd2::rng::dropout_keep(SEED, (i * k + j) as u64, P) {
                        main + low * (1.0 / (1.0 - P as f64)) as f32 as f64
                    } else {
                        main
                    };
                    if epi {
                        let x = h[i * k + j] as f64;
                        let sg = 1.0 / (1.0 + (-1.702 * x).exp());
                        v = v * (sg + 1.702 * x * sg * (1.0 - sg)) + acc[i * k + j] as f64;
                    }
                    want_dx[i * k + j] = v as f32;
                }
            }
            let name = format!(
                "lora gemm backward {} m{m} n{n} k{k} r{rank}{}",
                v.name,
                if epi { " ·gelu′(h) + acc" } else { "" }
            ) + if drop { " LoRA term under dropout" } else { "" };
            if rank > 0 {
                check(&format!("{name} dS = dY·B"), &dsf, &want_ds, 8e-3);
            }
            check(
                &format!("{name} dX = dY·W + s·dS·A"),
                &from_bf16(&dx),
                &want_dx,
                8e-3,
            );
        }
    });
}

/// The LoRA low-rank kernels with the dropout mask in registers (`kernels/lora_lowrank.cu`)
/// against an f64 reference that draws the mask from `sd2::rng::dropout_keep` — the CPU's own
/// mask, so a kept/dropped element that differs fails at once. Odd sizes (a partial warp's
/// row, ranks below and at the limit), p = 0 (no mask) and p = 0.3, f32 and bf16.
#[test]
fn lora_lowrank_kernels_match_the_cpu_mask() {
    each_backend(|r| {
        for &(m, k, rank, p) in &[
            (37usize, 45usize, 8usize, 0.3f32),
            (5, 70, 32, 0.0),
            (9, 33, 3, 0.5),
        ] {
            let seed = 0x5eed ^ (m * 131 + k) as u64;
            let x = randn(m * k, 71);
            let a = randn(rank * k, 72);
            let ds = randn(m * rank, 73);
            let dx0 = randn(m * k, 74);
            let keep = 1.0 / (1.0 - p as f64);
            let drop = |i: usize, v: f64| {
                if p <= 0.0 {
                    v
                } else if sd2::rng::dropout_keep(seed, i as u64, p) {
                    v * keep
                } else {
                    0.0
                }
            };
            let reference = |x: &[f32], a: &[f32], ds: &[f32], dx0: &[f32]| {
                let (mut want_s, mut want_dx) = (vec![0f32; m * rank], vec![0f32; m * k]);
                for i in 0..m {
                    for j in 0..rank {
                        want_s[i * rank + j] = (0..k)
                            .map(|c| drop(i * k + c, x[i * k + c] as f64) * a[j * k + c] as f64)
                            .sum::<f64>() as f32;
                    }
                    for c in 0..k {
                        let v: f64 = (0..rank)
                            .map(|j| ds[i * rank + j] as f64 * a[j * k + c] as f64)
                            .sum();
                        want_dx[i * k + c] = (dx0[i * k + c] as f64 + drop(i * k + c, v)) as f32;
                    }
                }
                (want_s, want_dx)
            };
            let (want_s, want_dx) = reference(&x, &a, &ds, &dx0);
            // dA = dSᵀ·drop(x) from per-chunk partials (rows_per_chunk 16: several chunks,
            // the last one partial).
            let want_da: Vec<f32> = (0..rank * k)
                .map(|jc| {
                    let (j, c) = (jc / k, jc % k);
                    (0..m)
                        .map(|i| ds[i * rank + j] as f64 * drop(i * k + c, x[i * k + c] as f64))
                        .sum::<f64>() as f32
                })
                .collect();
            let rows_per_chunk = 16;
            let chunks = m.div_ceil(rows_per_chunk);
            let mut part = vec![f32::NAN; chunks * rank * k];
            unsafe {
                let da = LoraDaPart {
                    ds: KArg::input(&ds),
                    x: KArg::input(&x),
                    part: KArg::output(&mut part),
                    m,
                    k,
                    r: rank,
                    rows_per_chunk,
                    p,
                    seed,
                };
                let cfg = LaunchConfig {
                    grid: (k.div_ceil(32) as u32, chunks as u32, 1),
                    block: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                r.run_staged("lora_da_part_f32", cfg, da).unwrap();
            }
            let got_da: Vec<f32> = (0..rank * k)
                .map(|i| (0..chunks).map(|ch| part[ch * rank * k + i]).sum())
                .collect();
            check(
                &format!("lora dA {m}x{k} r{rank} p{p} f32"),
                &got_da,
                &want_da,
                1e-5,
            );
            let name = format!("lora low-rank {m}x{k} r{rank} p{p}");
            // On a small grid, so both kernels grid-stride over rows: (S, dx) for operands of
            // one element type, its kernels named by `sfx`.
            fn run<T: bytemuck::Pod>(
                r: &Runner,
                sfx: &str,
                (x, a, ds, dx0): (&[T], &[T], &[T], &[T]),
                (m, k, rank, p, seed): (usize, usize, usize, f32, u64),
                nan: T,
            ) -> (Vec<T>, Vec<T>) {
                let (mut s, mut dx) = (vec![nan; m * rank], dx0.to_vec());
                unsafe {
                    let down = LoraDown {
                        x: KArg::input(x),
                        a: KArg::input(a),
                        a_b: KArg::Null,
                        a_c: KArg::Null,
                        s: KArg::output(&mut s),
                        s_b: KArg::Null,
                        s_c: KArg::Null,
                        m,
                        k,
                        r: rank,
                        group: rank,
                        p,
                        seed,
                        seed_b: 0,
                        seed_c: 0,
                    };
                    r.run_staged(
                        &format!("lora_down_{sfx}"),
                        LaunchConfig::linear(2, 64),
                        down,
                    )
                    .unwrap();
                    let up = LoraUpAdd {
                        ds: KArg::input(ds),
                        a: KArg::input(a),
                        dx: KArg::output(&mut dx),
                        m,
                        k,
                        r: rank,
                        p,
                        seed,
                    };
                    r.run_staged(
                        &format!("lora_up_add_{sfx}"),
                        LaunchConfig::linear(3, 64),
                        up,
                    )
                    .unwrap();
                }
                (s, dx)
            }
            let dims = (m, k, rank, p, seed);
            let (s, dx) = run(r, "f32", (&x, &a, &ds, &dx0), dims, f32::NAN);
            check(&format!("{name} f32 S"), &s, &want_s, 1e-5);
            check(&format!("{name} f32 dx"), &dx, &want_dx, 1e-5);
            let (xb, ab, dsb, dxb0) = (to_bf16(&x), to_bf16(&a), to_bf16(&ds), to_bf16(&dx0));
            let bf = (&xb[..], &ab[..], &dsb[..], &dxb0[..]);
            let (s16, dx16) = run(r, "bf16", bf, dims, half::bf16::NAN);
            // The reference on the rounded operands; the kernels round once, at the store.
            let r16 = |v: &[half::bf16]| from_bf16(v);
            let (want_s, want_dx) = reference(&r16(&xb), &r16(&ab), &r16(&dsb), &r16(&dxb0));
            check(&format!("{name} bf16 S"), &r16(&s16), &want_s, 8e-3);
            check(&format!("{name} bf16 dx"), &r16(&dx16), &want_dx, 8e-3);
        }
    });
}

/// The contiguous elementwise kernels (16-byte vectors, then an element-wise tail) against
/// f64 formulas, f32 and bf16, at sizes with and without a tail and with more chunks than
/// threads (grid-stride); binary_contig gives the same bits as the broadcasting kernel.
#[test]
fn elementwise_vector_paths_match_cpu() {
    each_backend(|r| {
        for bf in [false, true] {
            for &(n, blocks, threads) in &[
                (1usize, 1u32, 32u32),
                (7, 1, 32),
                (8, 1, 32),
                (9, 2, 32),
                (1003, 2, 32),
            ] {
                let tag = if bf { "bf16" } else { "f32" };
                let cfg = cfg1(blocks, threads);
                let tol = if bf { 8e-3 } else { 1e-6 };
                let round = |v: &[f32]| if bf { bf16_round(v) } else { v.to_vec() };
                let x = round(&randn(n, 801));
                let y = round(&randn(n, 802).iter().map(|v| v + 3.0).collect::<Vec<_>>());
                let sg = |v: f64| 1.0 / (1.0 + (-v).exp());
                let gelu = |v: f64| v * sg(1.702 * v);
                let gelu_d =
                    |v: f64| sg(1.702 * v) + 1.702 * v * sg(1.702 * v) * (1.0 - sg(1.702 * v));
                let f = |g: &dyn Fn(usize) -> f64| (0..n).map(|i| g(i) as f32).collect::<Vec<_>>();
                let want_unary = f(&|i| gelu(x[i] as f64));
                let want_bwd = f(&|i| y[i] as f64 * gelu_d(x[i] as f64));
                let want_affine = f(&|i| x[i] as f64 * 1.5 - 0.25);
                macro_rules! run {
                    ($ty:ty, $conv:expr, $back:expr) => {{
                        let (xs, ys): (Vec<$ty>, Vec<$ty>) = ($conv(&x), $conv(&y));
                        let mut u: Vec<$ty> = $conv(&vec![f32::NAN; n]);
                        let mut d: Vec<$ty> = $conv(&vec![f32::NAN; n]);
                        let mut a: Vec<$ty> = $conv(&vec![f32::NAN; n]);
                        unsafe {
                            r.run_staged(
                                &format!("unary_{tag}"),
                                cfg,
                                Unary {
                                    x: KArg::input(&xs),
                                    y: KArg::output(&mut u),
                                    op: 5,
                                    n,
                                },
                            )
                            .unwrap();
                            // y null: quick_gelu's derivative needs only x.
                            r.run_staged(
                                &format!("unary_bwd_{tag}"),
                                cfg,
                                UnaryBwd {
                                    x: KArg::input(&xs),
                                    y: KArg::Null,
                                    dy: KArg::input(&ys),
                                    dx: KArg::output(&mut d),
                                    op: 5,
                                    n,
                                },
                            )
                            .unwrap();
                            r.run_staged(
                                &format!("affine_{tag}"),
                                cfg,
                                Affine {
                                    x: KArg::input(&xs),
                                    y: KArg::output(&mut a),
                                    mul: 1.5,
                                    add: -0.25,
                                    n,
                                },
                            )
                            .unwrap();
                        }
                        let name = format!("{tag} n{n} grid {blocks}x{threads}");
                        check(
                            &format!("unary quick_gelu {name}"),
                            &$back(&u),
                            &want_unary,
                            tol,
                        );
                        check(
                            &format!("unary_bwd quick_gelu {name}"),
                            &$back(&d),
                            &want_bwd,
                            tol,
                        );
                        check(&format!("affine {name}"), &$back(&a), &want_affine, tol);
                        for op in 0..4 {
                            let want = f(&|i| {
                                let (p, q) = (x[i] as f64, y[i] as f64);
                                [p + q, p - q, p * q, p / q][op as usize]
                            });
                            let mut c: Vec<$ty> = $conv(&vec![f32::NAN; n]);
                            let mut g: Vec<$ty> = $conv(&vec![f32::NAN; n]);
                            unsafe {
                                r.run_staged(
                                    &format!("binary_contig_{tag}"),
                                    cfg,
                                    BinaryContig {
                                        a: KArg::input(&xs),
                                        b: KArg::input(&ys),
                                        out: KArg::output(&mut c),
                                        op,
                                        n,
                                    },
                                )
                                .unwrap();
                                let one = |v: usize| {
                                    let mut d = vec![1usize; 6];
                                    d[0] = v;
                                    d
                                };
                                r.run_staged(
                                    &format!("binary_{tag}"),
                                    cfg,
                                    Binary {
                                        a: KArg::input(&xs),
                                        b: KArg::input(&ys),
                                        out: KArg::output(&mut g),
                                        op,
                                        n,
                                        rank: 1,
                                        dims: one(n),
                                        stride_a: one(1),
                                        stride_b: one(1),
                                    },
                                )
                                .unwrap();
                            }
                            check(
                                &format!("binary_contig op {op} {name}"),
                                &$back(&c),
                                &want,
                                tol,
                            );
                            let bits =
                                |v: &[$ty]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&c),
                                bits(&g),
                                "binary_contig op {op} {name}: differs from binary"
                            );
                        }
                    }};
                }
                if bf {
                    run!(half::bf16, to_bf16, from_bf16);
                } else {
                    run!(f32, |v: &Vec<f32>| v.clone(), |v: &Vec<f32>| v.clone());
                }
            }
        }
    });
}

/// dS = s·dY·B and dB = s·dYᵀ·S from one pass over dY (`lora_dsdb_part`), partials summed in
/// order, against f64 references: several 256-column tiles with a tail, several row chunks,
/// ranks below and at the limit, f32 and bf16.
#[test]
fn lora_dsdb_one_pass_matches_reference() {
    each_backend(|r| {
        for bf in [false, true] {
            for &(m, n, rank, rows_per_chunk) in &[
                (37usize, 300usize, 8usize, 16usize),
                (70, 40, 5, 64),
                (9, 513, 32, 4),
            ] {
                let tag = if bf { "bf16" } else { "f32" };
                let round = |v: Vec<f32>| if bf { bf16_round(&v) } else { v };
                let dy = round(randn(m * n, 901));
                let b = round(randn(n * rank, 902).iter().map(|v| v * 0.3).collect());
                let sm = round(randn(m * rank, 903));
                let scale = 4.0f32;
                let (tiles, chunks) = (n.div_ceil(256), m.div_ceil(rows_per_chunk));
                let mut ds_part = vec![f32::NAN; tiles * m * rank];
                let mut db_part = vec![f32::NAN; chunks * n * rank];
                macro_rules! run {
                    ($conv:expr) => {{
                        let (dys, bs, ss) = ($conv(&dy), $conv(&b), $conv(&sm));
                        let k = LoraDsDbPart {
                            dy: KArg::input(&dys),
                            b: KArg::input(&bs),
                            s: KArg::input(&ss),
                            ds_part: KArg::output(&mut ds_part),
                            db_part: KArg::output(&mut db_part),
                            m,
                            n,
                            r: rank,
                            rows_per_chunk,
                            scale,
                        };
                        let cfg = LaunchConfig {
                            grid: (tiles as u32, chunks as u32, 1),
                            block: (256, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        unsafe { r.run_staged(&format!("lora_dsdb_part_{tag}"), cfg, k) }.unwrap();
                    }};
                }
                if bf {
                    run!(to_bf16);
                } else {
                    run!(|v: &Vec<f32>| v.clone());
                }
                let sum = |part: &[f32], parts: usize, w: usize| -> Vec<f32> {
                    (0..w)
                        .map(|i| (0..parts).map(|p| part[p * w + i]).sum::<f32>())
                        .collect()
                };
                let (ds, db) = (
                    sum(&ds_part, tiles, m * rank),
                    sum(&db_part, chunks, n * rank),
                );
                // The partials summed on the device straight into bf16: the in-order f32 sum,
                // rounded once.
                let mut ds16 = to_bf16(&vec![f32::NAN; m * rank]);
                unsafe {
                    r.run_staged(
                        "column_sum_bf16",
                        cfg1((m * rank).div_ceil(128) as u32, 128),
                        ColumnSum {
                            part: KArg::input(&ds_part),
                            out: KArg::output(&mut ds16),
                            parts: tiles,
                            n: m * rank,
                        },
                    )
                    .unwrap();
                }
                let bits = |v: &[half::bf16]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&ds16), bits(&to_bf16(&ds)), "column_sum_bf16");
                let mut want_ds = vec![0f32; m * rank];
                let mut want_db = vec![0f32; n * rank];
                for j in 0..rank {
                    for i in 0..m {
                        want_ds[i * rank + j] = (0..n)
                            .map(|c| dy[i * n + c] as f64 * b[c * rank + j] as f64)
                            .sum::<f64>() as f32
                            * scale;
                    }
                    for c in 0..n {
                        want_db[c * rank + j] = (0..m)
                            .map(|i| dy[i * n + c] as f64 * sm[i * rank + j] as f64)
                            .sum::<f64>() as f32
                            * scale;
                    }
                }
                let name = format!("lora_dsdb_part {tag} m{m} n{n} r{rank} chunk {rows_per_chunk}");
                // f32 partials of exactly rounded inputs: accumulation order only.
                check(&format!("{name} dS"), &ds, &want_ds, 1e-5);
                check(&format!("{name} dB"), &db, &want_db, 1e-5);
            }
        }
    });
}

/// dS, dB and dA of a LoRA-linear from one tensor-core pass over dY and x (`lora_grads`), against
/// f64 references: dS from dY·B (rounded once to bf16), dB from dYᵀ·S, dA from the kernel's
/// rounded dS and bf16(drop(x)) with the mask drawn by `sd2::rng::dropout_keep` — row chunks
/// with a tail, column tiles with tails in n and k, ranks 8, 16 and 32, with and without
/// dropout.
#[test]
fn lora_grads_one_pass_matches_reference() {
    each_backend(|r| {
        for &(m, n, k, rank, p) in &[
            (300usize, 136usize, 264usize, 8usize, 0.3f32),
            (37, 40, 48, 16, 0.0),
            (130, 64, 136, 32, 0.1),
        ] {
            let dy = bf16_round(&randn(m * n, 911));
            let b = bf16_round(
                &randn(n * rank, 912)
                    .iter()
                    .map(|v| v * 0.3)
                    .collect::<Vec<_>>(),
            );
            let sm = bf16_round(&randn(m * rank, 913));
            let x = bf16_round(&randn(m * k, 914));
            let (scale, seed) = (4.0f32, 0x5eed_u64);
            let cfg = sd2::backend::cuda::kernels::lora_grads_config(m, rank);
            let chunks = cfg.grid.0 as usize;
            let mut ds = to_bf16(&vec![f32::NAN; m * rank]);
            let mut db_part = vec![f32::NAN; chunks * n * rank];
            let mut da_part = vec![f32::NAN; chunks * rank * k];
            let (dys, bs, ss, xs) = (to_bf16(&dy), to_bf16(&b), to_bf16(&sm), to_bf16(&x));
            let args = LoraGrads {
                dy: KArg::input(&dys),
                b: KArg::input(&bs),
                s: KArg::input(&ss),
                x: KArg::input(&xs),
                ds: KArg::output(&mut ds),
                db_part: KArg::output(&mut db_part),
                da_part: KArg::output(&mut da_part),
                m,
                n,
                k,
                p,
                seed,
                scale,
            };
            unsafe { r.run_staged(&format!("lora_grads_r{rank}_bf16"), cfg, args) }.unwrap();
            let sum = |part: &[f32], w: usize| -> Vec<f32> {
                (0..w)
                    .map(|i| (0..chunks).map(|c| part[c * w + i]).sum::<f32>())
                    .collect()
            };
            let (db, da) = (sum(&db_part, n * rank), sum(&da_part, rank * k));
            let ds = from_bf16(&ds);
            let keep = if p > 0.0 { 1.0 / (1.0 - p as f64) } else { 1.0 };
            let xd: Vec<f64> = (0..m * k)
                .map(|i| {
                    if p <= 0.0 {
                        x[i] as f64
                    } else if sd2::rng::dropout_keep(seed, i as u64, p) {
                        half::bf16::from_f32(x[i] * keep as f32).to_f32() as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut want_ds = vec![0f32; m * rank];
            let mut want_db = vec![0f32; n * rank];
            let mut want_da = vec![0f32; rank * k];
            for j in 0..rank {
                for i in 0..m {
                    want_ds[i * rank + j] = ((0..n)
                        .map(|c| dy[i * n + c] as f64 * b[c * rank + j] as f64)
                        .sum::<f64>()
                        * scale as f64) as f32;
                }
                for c in 0..n {
                    want_db[c * rank + j] = ((0..m)
                        .map(|i| dy[i * n + c] as f64 * sm[i * rank + j] as f64)
                        .sum::<f64>()
                        * scale as f64) as f32;
                }
                for c in 0..k {
                    want_da[j * k + c] = (0..m)
                        .map(|i| ds[i * rank + j] as f64 * xd[i * k + c])
                        .sum::<f64>() as f32;
                }
            }
            let name = format!("lora_grads m{m} n{n} k{k} r{rank} p{p}");
            // dS: one bf16 rounding of an f32 sum (half an ulp, 2⁻⁹ relative, plus the sum's).
            check(&format!("{name} dS"), &ds, &want_ds, 4.5e-3);
            // dB, dA: f32 sums of exactly representable products, in another order.
            check(&format!("{name} dB"), &db, &want_db, 1e-4);
            check(&format!("{name} dA"), &da, &want_da, 1e-4);
        }
    });
}

/// lora_down for two or three adapters of one x (q, k, v of a LayerNorm output) in one pass,
/// each with its own dropout seed: the same bits as one launch per adapter, f32 and bf16.
#[test]
fn lora_down_of_several_adapters_matches_one_launch_each() {
    each_backend(|r| {
        for bf in [false, true] {
            for &(m, k, group, groups) in &[(37usize, 45usize, 8usize, 3usize), (9, 70, 5, 2)] {
                let tag = if bf { "bf16" } else { "f32" };
                let x = randn(m * k, 951);
                let a = randn(groups * group * k, 952);
                let seeds = [11u64, 0x2222, 0x3333_3333];
                let p = 0.25f32;
                macro_rules! run {
                    ($ty:ty, $conv:expr) => {{
                        let (xs, as_): (Vec<$ty>, Vec<$ty>) = ($conv(&x), $conv(&a));
                        let mut outs: Vec<Vec<$ty>> =
                            (0..3).map(|_| $conv(&vec![f32::NAN; m * group])).collect();
                        let [o0, o1, o2] = &mut outs[..] else { unreachable!() };
                        let ag = |g: usize| &as_[g * group * k..(g + 1) * group * k];
                        let k_all = LoraDown {
                            x: KArg::input(&xs),
                            a: KArg::input(ag(0)),
                            a_b: if groups > 1 { KArg::input(ag(1)) } else { KArg::Null },
                            a_c: if groups > 2 { KArg::input(ag(2)) } else { KArg::Null },
                            s: KArg::output(o0),
                            s_b: if groups > 1 { KArg::output(o1) } else { KArg::Null },
                            s_c: if groups > 2 { KArg::output(o2) } else { KArg::Null },
                            m,
                            k,
                            r: groups * group,
                            group,
                            p,
                            seed: seeds[0],
                            seed_b: seeds[1],
                            seed_c: seeds[2],
                        };
                        let cfg = LaunchConfig::linear(2, 64);
                        unsafe { r.run_staged(&format!("lora_down_{tag}"), cfg, k_all) }.unwrap();
                        for g in 0..groups {
                            let mut one: Vec<$ty> = $conv(&vec![f32::NAN; m * group]);
                            let k1 = LoraDown {
                                x: KArg::input(&xs),
                                a: KArg::input(ag(g)),
                                a_b: KArg::Null,
                                a_c: KArg::Null,
                                s: KArg::output(&mut one),
                                s_b: KArg::Null,
                                s_c: KArg::Null,
                                m,
                                k,
                                r: group,
                                group,
                                p,
                                seed: seeds[g],
                                seed_b: 0,
                                seed_c: 0,
                            };
                            unsafe { r.run_staged(&format!("lora_down_{tag}"), cfg, k1) }.unwrap();
                            let bits = |v: &[$ty]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&outs[g]),
                                bits(&one),
                                "{tag} m{m} k{k}: adapter {g} of {groups} differs from its own launch"
                            );
                        }
                    }};
                }
                if bf {
                    run!(half::bf16, to_bf16);
                } else {
                    run!(f32, |v: &Vec<f32>| v.clone());
                }
                println!("[{}] lora_down {tag} m{m} k{k}: {groups} adapters in one pass = one launch each, bit for bit", r.name());
            }
        }
    });
}

/// q, k and v of one input through `lora_linears_of_one_input` (their LoRA S in one pass) give
/// the same bits as three `lora_linear` calls on the simulator — outputs and every gradient,
/// with LoRA dropout on.
#[test]
fn lora_linears_of_one_input_match_separate_calls() {
    use sd2::ops::{self, Lora};
    let dev = Device::CudaSim;
    let bf = |v: Vec<f32>, shape: &[usize]| {
        Tensor::from_vec(v, shape.to_vec(), dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    let (d, o, r) = (16usize, 12usize, 4usize);
    let x = bf(randn(2 * 5 * d, 961), &[2, 5, d]).into_trainable();
    let lin: Vec<(Tensor, Tensor, Tensor, Tensor)> = (0..3u64)
        .map(|i| {
            (
                bf(
                    randn(o * d, 970 + i).iter().map(|v| v * 0.3).collect(),
                    &[o, d],
                ),
                bf(randn(o, 980 + i), &[o]),
                bf(randn(r * d, 990 + i), &[r, d]).into_trainable(),
                bf(randn(o * r, 1000 + i), &[o, r]).into_trainable(),
            )
        })
        .collect();
    let lora = |i: usize| Lora {
        a: &lin[i].2,
        b: &lin[i].3,
        scale: 2.0,
        dropout: 0.2,
        seed: 500 + i as u64,
    };
    let run = |shared: bool| {
        let ys: Vec<Tensor> = if shared {
            let specs: Vec<_> = (0..3)
                .map(|i| (&lin[i].0, Some(&lin[i].1), Some(lora(i))))
                .collect();
            ops::lora_linears_of_one_input(&x, &specs).unwrap()
        } else {
            (0..3)
                .map(|i| ops::lora_linear(&x, &lin[i].0, Some(&lin[i].1), Some(lora(i))).unwrap())
                .collect()
        };
        let mut loss = ys[0].sum_all().unwrap();
        for (i, y) in ys.iter().enumerate().skip(1) {
            loss = loss
                .add(&y.sqr().unwrap().sum_all().unwrap().scale(i as f64).unwrap())
                .unwrap();
        }
        let g = loss.backward().unwrap();
        let mut out: Vec<Vec<u32>> = ys
            .iter()
            .map(|y| host(y).iter().map(|v| v.to_bits()).collect())
            .collect();
        for t in std::iter::once(&x).chain(lin.iter().flat_map(|l| [&l.2, &l.3])) {
            out.push(
                host(g.get(t).unwrap())
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            );
        }
        out
    };
    let (shared, separate) = (run(true), run(false));
    assert_eq!(shared.len(), 3 + 7);
    for (i, (a, b)) in shared.iter().zip(&separate).enumerate() {
        assert!(a.iter().any(|v| *v != 0), "tensor {i} is all zero");
        assert_eq!(
            a, b,
            "tensor {i} (3 outputs, then dx, dA/dB per adapter) differs"
        );
    }
    println!(
        "[sim] q/k/v with S in one pass: outputs and gradients equal separate calls, bit for bit"
    );
}
