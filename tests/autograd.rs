//! The tape: frozen weights, micro-batch accumulation, no-grad mode, a consumed graph, and
//! thread-count-independent results.
mod common;
use common::{assert_close, rand64};
use sd2::autograd::nodes_recorded;
use sd2::ops::{self, Lora};
use sd2::{no_grad, Device, GradStore, Result, Tensor};

/// A tiny transformer-ish model: LoRA-linear → LayerNorm → causal attention → CLS row →
/// linear head → summed cross-entropy. Returns the loss.
struct Model {
    w: Tensor,
    bias: Tensor,
    a: Tensor,
    b: Tensor,
    gamma: Tensor,
    beta: Tensor,
    head: Tensor,
}

impl Model {
    fn new() -> Model {
        Model {
            w: rand64(&[6, 6], 1),
            bias: rand64(&[6], 2),
            a: rand64(&[2, 6], 3).into_trainable(),
            b: rand64(&[6, 2], 4).into_trainable(),
            gamma: rand64(&[6], 5).into_trainable(),
            beta: rand64(&[6], 6).into_trainable(),
            head: rand64(&[3, 6], 7).into_trainable(),
        }
    }

    fn loss(&self, x: &Tensor, labels: &[i64]) -> Result<Tensor> {
        let lora = Lora {
            a: &self.a,
            b: &self.b,
            scale: 4.0,
            dropout: 0.0,
            seed: 0,
        };
        let h = ops::lora_linear(x, &self.w, Some(&self.bias), Some(lora))?;
        let h = h.layer_norm(&self.gamma, &self.beta, 1e-5)?;
        let h = ops::attention(&h, &h, &h, 2, true)?;
        let cls = h.select_rows_per_batch(&vec![x.dims()[1] - 1; x.dims()[0]])?;
        let logits = cls.linear(&self.head, None)?;
        let y = Tensor::from_vec(labels.to_vec(), labels.len(), Device::Cpu)?;
        // Summed (not mean) loss, so micro-batch losses add up to the full batch's.
        ops::cross_entropy(&logits, &y)?.scale(labels.len() as f64)
    }

    fn trainable(&self) -> Vec<&Tensor> {
        vec![&self.a, &self.b, &self.gamma, &self.beta, &self.head]
    }
}

#[test]
fn frozen_weights_get_no_gradient() {
    let m = Model::new();
    let x = rand64(&[2, 4, 6], 10);
    let g = m.loss(&x, &[0, 2]).unwrap().backward().unwrap();
    assert!(g.get(&m.w).is_none(), "frozen W got a gradient");
    assert!(g.get(&m.bias).is_none(), "frozen bias got a gradient");
    assert!(g.get(&x).is_none(), "input data got a gradient");
    for t in m.trainable() {
        let gt = g.get(t).expect("trainable tensor without gradient");
        assert_eq!(gt.dims(), t.dims());
        assert!(gt.to_vec_f64().unwrap().iter().any(|v| *v != 0.0));
    }
    assert_eq!(g.len(), 5, "exactly the trainable leaves are stored");
}

#[test]
fn accumulation_over_micro_batches_equals_one_batch() {
    let m = Model::new();
    let x = rand64(&[4, 5, 6], 11);
    let labels = [0, 2, 1, 2];
    let full = m.loss(&x, &labels).unwrap().backward().unwrap();
    let mut acc = GradStore::new();
    m.loss(&x.narrow(0, 0, 2).unwrap(), &labels[..2])
        .unwrap()
        .backward_into(&mut acc)
        .unwrap();
    m.loss(&x.narrow(0, 2, 2).unwrap(), &labels[2..])
        .unwrap()
        .backward_into(&mut acc)
        .unwrap();
    for (i, t) in m.trainable().into_iter().enumerate() {
        let a = acc.get(t).unwrap().to_vec_f64().unwrap();
        let f = full.get(t).unwrap().to_vec_f64().unwrap();
        assert_close(&format!("accumulated grad {i}"), &a, &f, 1e-12, 1e-10);
    }
}

#[test]
fn accumulation_is_in_place_and_clearable() {
    let w = rand64(&[3], 12).into_trainable();
    let mut store = GradStore::new();
    for _ in 0..3 {
        w.mul(&w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward_into(&mut store)
            .unwrap();
    }
    let want: Vec<f64> = w.to_vec_f64().unwrap().iter().map(|v| 6.0 * v).collect();
    assert_close(
        "3× d(w²)",
        &store.get(&w).unwrap().to_vec_f64().unwrap(),
        &want,
        1e-12,
        1e-12,
    );
    store.clear();
    assert!(store.is_empty());
}

#[test]
fn no_grad_records_nothing() {
    let m = Model::new();
    let x = rand64(&[2, 4, 6], 13);
    let before = nodes_recorded();
    let loss = {
        let _g = no_grad();
        m.loss(&x, &[1, 1]).unwrap()
    };
    assert_eq!(nodes_recorded(), before, "no_grad recorded graph nodes");
    assert!(!loss.is_tracked());
    assert!(
        loss.backward().is_err(),
        "backward without a graph must fail"
    );
    // Data-only computations record nothing either, even with gradients enabled.
    let y = x.exp().unwrap().sum_all().unwrap();
    assert_eq!(nodes_recorded(), before);
    assert!(!y.is_tracked());
    // And with gradients on, the same forward does record.
    let _l = m.loss(&x, &[1, 1]).unwrap();
    assert!(nodes_recorded() > before);
}

#[test]
fn a_graph_is_consumed_by_backward() {
    let m = Model::new();
    let x = rand64(&[2, 4, 6], 14);
    let loss = m.loss(&x, &[0, 1]).unwrap();
    loss.backward().unwrap();
    let e = loss
        .backward()
        .err()
        .expect("second backward must fail")
        .to_string();
    assert!(e.contains("already consumed"), "{e}");
}

#[test]
fn gradients_of_extreme_sigmoid_logits_are_finite() {
    let f = rand64(&[5, 4], 15).l2_normalize().unwrap().into_trainable();
    let d = rand64(&[5, 4], 16).l2_normalize().unwrap().into_trainable();
    for (t, b) in [(1e6, 1e6), (1e6, -1e6), (1e30, 0.0), (0.0, -1e30)] {
        let tt = common::t64(&[t], &[]).into_trainable();
        let bb = common::t64(&[b], &[]).into_trainable();
        let l = ops::sigmoid_loss(&f, &d, &tt, &bb).unwrap();
        assert!(
            l.to_scalar().unwrap().is_finite(),
            "loss not finite for t={t}, b={b}"
        );
        let g = l.backward().unwrap();
        for x in [&f, &d, &tt, &bb] {
            assert!(
                g.get(x)
                    .unwrap()
                    .to_vec_f64()
                    .unwrap()
                    .iter()
                    .all(|v| v.is_finite()),
                "non-finite grad for t={t}, b={b}"
            );
        }
    }
}

/// L_D with negatives gathered over ranks: each rank's rows against every rank's descriptions
/// (`sigmoid_loss_offset`), weighted by its share of the rows, sum to the one-process loss over
/// all rows, and so do the gradients (what `train.dual_negatives = "all_ranks"` relies on).
#[test]
fn gathered_sigmoid_loss_pieces_sum_to_the_whole() {
    let (n, dim) = (9usize, 4usize);
    let f = rand64(&[n, dim], 18)
        .l2_normalize()
        .unwrap()
        .into_trainable();
    let d = rand64(&[n, dim], 19)
        .l2_normalize()
        .unwrap()
        .into_trainable();
    let tt = common::t64(&[7.0], &[]).into_trainable();
    let bb = common::t64(&[-3.0], &[]).into_trainable();
    let whole = ops::sigmoid_loss(&f, &d, &tt, &bb).unwrap();
    let want = whole.to_scalar().unwrap();
    let gw = whole.backward().unwrap();
    // Three "ranks" of 4, 0 and 5 rows.
    let mut total = None::<Tensor>;
    let mut at = 0;
    for rows in [4usize, 0, 5] {
        let piece = ops::sigmoid_loss_offset(&f.narrow(0, at, rows).unwrap(), &d, at, &tt, &bb)
            .unwrap()
            .scale(rows as f64 / n as f64)
            .unwrap();
        total = Some(match total {
            None => piece,
            Some(t) => t.add(&piece).unwrap(),
        });
        at += rows;
    }
    let total = total.unwrap();
    let got = total.to_scalar().unwrap();
    println!(
        "loss: whole {want}, pieces {got}, |Δ| {:.2e}",
        (want - got).abs()
    );
    assert!((want - got).abs() <= 1e-12 * want.abs().max(1.0));
    let gp = total.backward().unwrap();
    for (name, x) in [("f", &f), ("d", &d), ("t", &tt), ("b", &bb)] {
        let (a, b) = (
            gw.get(x).unwrap().to_vec_f64().unwrap(),
            gp.get(x).unwrap().to_vec_f64().unwrap(),
        );
        let (k, e) = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .enumerate()
            .fold((0, 0.0), |m, (k, e)| if e > m.1 { (k, e) } else { m });
        println!("∂{name}: worst |Δ| {e:.2e} at {k} (tolerance 1e-12)");
        assert!(e <= 1e-12, "∂{name} differs by {e} at {k}");
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let run = |threads: usize| -> Vec<Vec<f64>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let m = Model::new();
            // Enough rows that reductions split into several chunks.
            let x = rand64(&[70, 5, 6], 17).to_dtype(sd2::DType::F32).unwrap();
            let f32m = |t: &Tensor| t.to_dtype(sd2::DType::F32).unwrap();
            let mm = Model {
                w: f32m(&m.w),
                bias: f32m(&m.bias),
                a: f32m(&m.a).detach().into_trainable(),
                b: f32m(&m.b).detach().into_trainable(),
                gamma: f32m(&m.gamma).detach().into_trainable(),
                beta: f32m(&m.beta).detach().into_trainable(),
                head: f32m(&m.head).detach().into_trainable(),
            };
            let labels: Vec<i64> = (0..70).map(|i| i % 3).collect();
            let g = mm.loss(&x, &labels).unwrap().backward().unwrap();
            mm.trainable()
                .iter()
                .map(|t| g.get(t).unwrap().to_vec_f64().unwrap())
                .collect()
        })
    };
    let (one, two) = (run(1), run(2));
    assert_eq!(one, two, "gradients differ between 1 and 2 threads");
}

#[test]
fn dtype_casts_carry_gradients_back() {
    let x = common::t64(&[0.5, -1.25, 2.0], &[3]).into_trainable();
    let w = Tensor::from_f64(&[1.5, 2.0, -0.5], 3, sd2::DType::F32, Device::Cpu).unwrap();
    let g = x
        .to_dtype(sd2::DType::F32)
        .unwrap()
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = g.get(&x).unwrap();
    assert_eq!(
        gx.dtype(),
        sd2::DType::F64,
        "gradient comes back in the leaf's dtype"
    );
    assert_close(
        "d(cast(x)·w)/dx",
        &gx.to_vec_f64().unwrap(),
        &[1.5, 2.0, -0.5],
        0.0,
        0.0,
    );
    // bf16 round trip: the gradient is w rounded to bf16 precision.
    let g = x
        .to_dtype(sd2::DType::BF16)
        .unwrap()
        .to_dtype(sd2::DType::F32)
        .unwrap()
        .mul(&w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "through bf16",
        &g.get(&x).unwrap().to_vec_f64().unwrap(),
        &[1.5, 2.0, -0.5],
        0.0,
        0.0,
    );
}

/// Activation recomputation: a checkpointed block gives the same loss and gradients (inputs
/// and declared parameters) as the recorded one, records one node instead of the block's, and
/// refuses a parameter it was not told about.
#[test]
fn checkpoint_recomputes_the_same_gradients() {
    let x = rand64(&[4, 6], 20).into_trainable();
    let (w, gamma) = (
        rand64(&[6, 6], 21).into_trainable(),
        rand64(&[6], 22).into_trainable(),
    );
    let beta = rand64(&[6], 23);
    let block = {
        let (w, gamma, beta) = (w.clone(), gamma.clone(), beta.clone());
        move |xs: &[Tensor]| -> Result<Tensor> {
            xs[0]
                .linear(&w, None)?
                .quick_gelu()?
                .layer_norm(&gamma, &beta, 1e-5)?
                .mul(&xs[0])
        }
    };
    let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap();
    let n0 = nodes_recorded();
    let plain = loss(block(std::slice::from_ref(&x)).unwrap());
    let n_plain = nodes_recorded() - n0;
    let g_plain = plain.backward().unwrap();
    let n1 = nodes_recorded();
    let y = sd2::checkpoint(&[&x], &[w.clone(), gamma.clone()], block.clone()).unwrap();
    let n_ckpt = nodes_recorded() - n1;
    let ck = loss(y);
    assert_close(
        "checkpointed loss",
        &[ck.to_scalar().unwrap()],
        &[plain.to_scalar().unwrap()],
        1e-12,
        1e-12,
    );
    let g_ck = ck.backward().unwrap();
    for (name, t) in [("x", &x), ("w", &w), ("gamma", &gamma)] {
        let (a, b) = (
            g_ck.get(t).unwrap().to_vec_f64().unwrap(),
            g_plain.get(t).unwrap().to_vec_f64().unwrap(),
        );
        assert_close(&format!("d{name}"), &a, &b, 1e-12, 1e-12);
    }
    // the block's ops recorded once (plus the loss's two), the checkpoint as one node
    assert!(n_plain >= 5, "{n_plain} nodes without recomputation");
    assert_eq!(n_ckpt, 1, "one node for the checkpointed block");

    // gamma read but not declared: an error at backward, not a lost gradient
    let y = sd2::checkpoint(&[&x], std::slice::from_ref(&w), block).unwrap();
    let e = loss(y)
        .backward()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("not passed as `params`"), "{e}");
}

/// A checkpoint whose params include an op output is refused up front (its recomputation
/// would walk into the outer graph); grad mode is back on after a failing recomputation.
#[test]
fn checkpoint_refuses_op_outputs_as_params_and_restores_grad_mode() {
    let w = rand64(&[3, 3], 30).into_trainable();
    let x = rand64(&[2, 3], 31);
    let derived = w.scale(2.0).unwrap();
    let e = sd2::checkpoint(&[&x], std::slice::from_ref(&derived), |xs: &[Tensor]| {
        Ok(xs[0].clone())
    })
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("trainable leaves"), "{e}");
    let xt = x.clone().into_trainable();
    let y = sd2::checkpoint(&[&xt], &[], {
        let w = w.clone();
        move |xs: &[Tensor]| xs[0].linear(&w, None)
    })
    .unwrap();
    assert!(y.sum_all().unwrap().backward().is_err(), "undeclared w");
    assert!(sd2::autograd::is_grad_enabled());
}

/// A pre-LN block whose gradient sums ride in the ops' own kernels — LayerNorm's dx plus the
/// residual stream's gradient, q/k/v's shared input, fc2's input gradient times quick_gelu′,
/// the CLS rows added into the stream's gradient — gives exactly (f64, bit for bit) the
/// gradients of the same block with every sum left to the engine: there each input is wrapped
/// in a ×1 op, which takes no sums, and fc1 → quick_gelu → fc2 are separate ops. The fused run
/// takes each of those five sums; the separate run none.
#[test]
fn gradient_sums_fused_into_kernels_match_separate_adds() {
    use sd2::autograd::accumulations_fused;
    let (b, s, d) = (2usize, 5usize, 8usize);
    let frozen = |shape: &[usize], seed| rand64(shape, seed).scale(0.5).unwrap();
    let train = |shape: &[usize], seed| rand64(shape, seed).into_trainable();
    // (W, bias, A, B) per linear: embed, q, k, v, out, fc1, fc2.
    let dims = [
        (d, d),
        (d, d),
        (d, d),
        (d, d),
        (d, d),
        (2 * d, d),
        (d, 2 * d),
    ];
    let lin: Vec<(Tensor, Tensor, Tensor, Tensor)> = dims
        .iter()
        .enumerate()
        .map(|(i, &(o, inp))| {
            let sd = 1000 + 10 * i as u64;
            (
                frozen(&[o, inp], sd),
                frozen(&[o], sd + 1),
                train(&[2, inp], sd + 2),
                train(&[o, 2], sd + 3),
            )
        })
        .collect();
    let norms: Vec<(Tensor, Tensor)> = (0..2)
        .map(|i| (frozen(&[d], 2000 + i), frozen(&[d], 2010 + i)))
        .collect();
    let x0 = rand64(&[b, s, d], 3000);
    let lora = |i: usize, dropout: f32| Lora {
        a: &lin[i].2,
        b: &lin[i].3,
        scale: 2.0,
        dropout,
        seed: 77 + i as u64,
    };
    let run = |separate: bool| -> (Vec<Vec<f64>>, usize) {
        let sep = |t: &Tensor| {
            if separate {
                t.scale(1.0).unwrap()
            } else {
                t.clone()
            }
        };
        let l = |i: usize, x: &Tensor, dropout: f32| {
            ops::lora_linear(x, &lin[i].0, Some(&lin[i].1), Some(lora(i, dropout))).unwrap()
        };
        let before = accumulations_fused();
        let x = l(0, &x0, 0.0);
        let n1 = sep(&x).layer_norm(&norms[0].0, &norms[0].1, 1e-5).unwrap();
        let (q, k, v) = (
            l(1, &sep(&n1), 0.1),
            l(2, &sep(&n1), 0.1),
            l(3, &sep(&n1), 0.1),
        );
        let a = ops::attention(&q, &k, &v, 2, false).unwrap();
        let x2 =
            ops::lora_linear_residual(&a, &lin[4].0, Some(&lin[4].1), Some(lora(4, 0.0)), &sep(&x))
                .unwrap();
        let n2 = sep(&x2).layer_norm(&norms[1].0, &norms[1].1, 1e-5).unwrap();
        let y = if separate {
            let h = l(5, &n2, 0.0).quick_gelu().unwrap();
            ops::lora_linear_residual(
                &h,
                &lin[6].0,
                Some(&lin[6].1),
                Some(lora(6, 0.0)),
                &sep(&x2),
            )
            .unwrap()
        } else {
            let h =
                ops::lora_linear_gelu(&n2, &lin[5].0, Some(&lin[5].1), Some(lora(5, 0.0))).unwrap();
            ops::lora_linear_gelu_input(
                &h,
                &lin[6].0,
                Some(&lin[6].1),
                Some(lora(6, 0.0)),
                Some(&x2),
            )
            .unwrap()
        };
        let cls = sep(&y).select_rows_per_batch(&vec![0; b]).unwrap();
        let loss = cls
            .sum_all()
            .unwrap()
            .scale(3.0)
            .unwrap()
            .add(&y.sqr().unwrap().sum_all().unwrap())
            .unwrap();
        let g = loss.backward().unwrap();
        let grads = lin
            .iter()
            .flat_map(|(_, _, a, bm)| [a, bm])
            .map(|t| g.get(t).unwrap().to_vec_f64().unwrap())
            .collect();
        (grads, accumulations_fused() - before)
    };
    let (fused, taken) = run(false);
    let (plain, none) = run(true);
    for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
        let worst = f
            .iter()
            .zip(p)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        println!("LoRA factor {i}: worst |fused − separate| = {worst:e}");
        assert!(f.iter().any(|v| *v != 0.0), "factor {i} got no gradient");
        assert_eq!(
            f, p,
            "LoRA factor {i}: fused sums differ from separate adds"
        );
    }
    assert_eq!(taken, 5, "LN1, k, q, LN2 and the CLS rows take their sums");
    assert_eq!(none, 0, "the ×1 wrappers leave every sum to the engine");
}

/// fc1's pre-activation is kept only when a backward can need it: under `no_grad` (or with
/// nothing tracked) `lora_linear_gelu` returns quick_gelu(h) alone, with the same values, and
/// fc2 on it gives the same output.
#[test]
fn fc1_keeps_its_pre_activation_only_for_a_backward() {
    let x = rand64(&[3, 4], 21).into_trainable();
    let (w1, b1, w2) = (rand64(&[6, 4], 22), rand64(&[6], 23), rand64(&[4, 6], 24));
    let run = || {
        let h = ops::lora_linear_gelu(&x, &w1, Some(&b1), None).unwrap();
        let y = ops::lora_linear_gelu_input(&h, &w2, None, None, None).unwrap();
        (
            h.pre().is_some(),
            h.act().to_vec_f64().unwrap(),
            y.to_vec_f64().unwrap(),
        )
    };
    let (kept, act, y) = run();
    let (kept_ng, act_ng, y_ng) = {
        let _g = no_grad();
        run()
    };
    assert!(kept, "a tracked input keeps h for the backward");
    assert!(!kept_ng, "no_grad: h is not kept");
    assert_eq!(act, act_ng);
    assert_eq!(y, y_ng);
    let want: Vec<f64> = x
        .linear(&w1, Some(&b1))
        .unwrap()
        .quick_gelu()
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert_eq!(act, want, "quick_gelu(x·W1ᵀ + b1)");
}

#[test]
fn the_hook_fires_once_per_leaf_when_its_gradient_is_final() {
    let m = Model::new();
    let x = rand64(&[2, 4, 6], 12);
    // `head` is read twice, first and last: its gradient is final only after both reads.
    let twice = m
        .loss(&x, &[1, 0])
        .unwrap()
        .add(&m.head.sum_all().unwrap().scale(0.5).unwrap())
        .unwrap();
    let want = m
        .loss(&x, &[1, 0])
        .unwrap()
        .add(&m.head.sum_all().unwrap().scale(0.5).unwrap())
        .unwrap()
        .backward()
        .unwrap();
    let mut store = GradStore::new();
    let mut fired: Vec<(sd2::TensorId, Vec<f64>)> = vec![];
    let seed = Tensor::ones(twice.shape().clone(), twice.dtype(), twice.device()).unwrap();
    twice
        .backward_seeded_hooked(seed, &mut store, &mut |s, id| {
            let g = s.get_id(id).map(|g| g.to_vec_f64()).transpose()?;
            fired.push((id, g.unwrap_or_default()));
            Ok(())
        })
        .unwrap();
    let order: Vec<usize> = fired
        .iter()
        .map(|(id, _)| {
            m.trainable()
                .iter()
                .position(|t| t.id() == *id)
                .expect("the hook fired for a tensor that is no trainable leaf")
        })
        .collect();
    println!("leaves in the order they were final (a, b, gamma, beta, head = 0..5): {order:?}");
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2, 3, 4], "each leaf exactly once");
    // The head is consumed last in forward, so it is final before the norm's and LoRA's.
    let at = |i: usize| order.iter().position(|&o| o == i).unwrap();
    assert!(
        at(4) < at(2) && at(4) < at(3),
        "head before the norm: {order:?}"
    );
    assert!(
        at(2) < at(0) && at(3) < at(1),
        "norm before LoRA: {order:?}"
    );
    for (id, g) in &fired {
        let t = m.trainable().into_iter().find(|t| t.id() == *id).unwrap();
        let w = want.get(t).unwrap().to_vec_f64().unwrap();
        assert_close(
            "gradient when the hook fired vs the pass's",
            g,
            &w,
            0.0,
            0.0,
        );
    }
    let e = m
        .loss(&x, &[1, 0])
        .unwrap()
        .backward_seeded_hooked(
            Tensor::ones((), sd2::DType::F64, Device::Cpu).unwrap(),
            &mut store,
            &mut |_, _| Err(sd2::Error::Msg("stop".into())),
        )
        .unwrap_err();
    assert!(e.to_string().contains("stop"), "{e}");
}
