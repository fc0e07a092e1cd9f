//! Central-difference gradient checks in f64 for every op with a backward.
#![allow(clippy::cloned_ref_to_slice_refs)]
mod common;
use common::{gradcheck, rand64, t64, values};
use sd2::ops::{self, AttnOptions, Lora};
use sd2::{Device, Shape, Tensor};

const TOL: f64 = 1e-6;

fn positive(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    t64(
        &values(n, seed)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect::<Vec<_>>(),
        shape,
    )
}

#[test]
fn binary_broadcast() {
    let x = rand64(&[2, 3], 1);
    let bias = rand64(&[3], 2);
    let col = positive(&[2, 1], 3);
    gradcheck(
        "add bias",
        &[x.clone(), bias.clone()],
        |v| v[0].add(&v[1]),
        TOL,
    );
    gradcheck(
        "sub bias",
        &[x.clone(), bias.clone()],
        |v| v[0].sub(&v[1]),
        TOL,
    );
    gradcheck(
        "mul column",
        &[x.clone(), col.clone()],
        |v| v[0].mul(&v[1]),
        TOL,
    );
    gradcheck(
        "div column",
        &[x.clone(), col.clone()],
        |v| v[0].div(&v[1]),
        TOL,
    );
    gradcheck(
        "outer [2,1]+[3]",
        &[col.clone(), bias.clone()],
        |v| v[0].add(&v[1]),
        TOL,
    );
    gradcheck(
        "positions [2,3,2]+[3,2]",
        &[rand64(&[2, 3, 2], 4), rand64(&[3, 2], 5)],
        |v| v[0].mul(&v[1]),
        TOL,
    );
    gradcheck("same tensor twice", &[x], |v| v[0].mul(&v[0]), TOL);
}

#[test]
fn unary() {
    let x = rand64(&[3, 4], 6);
    let p = positive(&[3, 4], 7);
    gradcheck("neg", &[x.clone()], |v| v[0].neg(), TOL);
    gradcheck("affine", &[x.clone()], |v| v[0].affine(-1.5, 0.25), TOL);
    gradcheck("exp", &[x.clone()], |v| v[0].exp(), TOL);
    gradcheck("sqr", &[x.clone()], |v| v[0].sqr(), TOL);
    gradcheck(
        "quick_gelu",
        &[x.scale(3.0).unwrap()],
        |v| v[0].quick_gelu(),
        TOL,
    );
    gradcheck("sigmoid", &[x.scale(3.0).unwrap()], |v| v[0].sigmoid(), TOL);
    gradcheck("log", &[p.clone()], |v| v[0].log(), TOL);
    gradcheck("sqrt", &[p], |v| v[0].sqrt(), TOL);
}

#[test]
fn reductions() {
    let x = rand64(&[2, 3, 4], 8);
    gradcheck("sum_all", &[x.clone()], |v| v[0].sum_all(), TOL);
    gradcheck("mean_all", &[x.clone()], |v| v[0].mean_all(), TOL);
    gradcheck("sum_dim 1", &[x.clone()], |v| v[0].sum_dim(1, false), TOL);
    gradcheck(
        "mean_dim -1",
        &[x.clone()],
        |v| v[0].mean_dim(-1, true),
        TOL,
    );
    gradcheck(
        "sum_to [3,1]",
        &[x.clone()],
        |v| v[0].sum_to(&Shape::from([3, 1])),
        TOL,
    );
    gradcheck(
        "broadcast_as",
        &[rand64(&[3, 1], 9)],
        |v| v[0].broadcast_as(&Shape::from([2, 3, 4])),
        TOL,
    );
}

#[test]
fn matmul() {
    let a = rand64(&[3, 4], 10);
    let b = rand64(&[4, 5], 11);
    gradcheck(
        "matmul",
        &[a.clone(), b.clone()],
        |v| v[0].matmul(&v[1]),
        TOL,
    );
    gradcheck(
        "matmul aᵀ",
        &[rand64(&[4, 3], 12), b.clone()],
        |v| v[0].matmul_t(&v[1], true, false),
        TOL,
    );
    gradcheck(
        "matmul bᵀ",
        &[a.clone(), rand64(&[5, 4], 13)],
        |v| v[0].matmul_t(&v[1], false, true),
        TOL,
    );
    gradcheck(
        "matmul aᵀbᵀ",
        &[rand64(&[4, 3], 14), rand64(&[5, 4], 15)],
        |v| v[0].matmul_t(&v[1], true, true),
        TOL,
    );
    gradcheck(
        "batched",
        &[rand64(&[2, 3, 4], 16), rand64(&[2, 4, 5], 17)],
        |v| v[0].matmul(&v[1]),
        TOL,
    );
    gradcheck(
        "batched bᵀ",
        &[rand64(&[2, 3, 4], 18), rand64(&[2, 5, 4], 19)],
        |v| v[0].matmul_t(&v[1], false, true),
        TOL,
    );
    gradcheck(
        "shared rhs",
        &[rand64(&[2, 3, 4], 20), b.clone()],
        |v| v[0].matmul(&v[1]),
        TOL,
    );
    gradcheck(
        "shared rhs bᵀ",
        &[rand64(&[2, 3, 4], 21), rand64(&[5, 4], 22)],
        |v| v[0].matmul_t(&v[1], false, true),
        TOL,
    );
    gradcheck(
        "shared rhs aᵀ",
        &[rand64(&[2, 4, 3], 23), b],
        |v| v[0].matmul_t(&v[1], true, false),
        TOL,
    );
    gradcheck(
        "shared rhs aᵀbᵀ",
        &[rand64(&[2, 4, 3], 24), rand64(&[5, 4], 25)],
        |v| v[0].matmul_t(&v[1], true, true),
        TOL,
    );
}

#[test]
fn linear() {
    let x = rand64(&[2, 3, 4], 26);
    gradcheck(
        "linear+bias",
        &[x.clone(), rand64(&[5, 4], 27), rand64(&[5], 28)],
        |v| v[0].linear(&v[1], Some(&v[2])),
        TOL,
    );
    gradcheck(
        "linear",
        &[x, rand64(&[5, 4], 29)],
        |v| v[0].linear(&v[1], None),
        TOL,
    );
}

#[test]
fn lora_linear() {
    // x, W, b, A, B all checked (W and b are frozen in SD2, but the op supports their gradients).
    let ins = [
        rand64(&[2, 3, 6], 30),
        rand64(&[5, 6], 31),
        rand64(&[5], 32),
        rand64(&[2, 6], 33),
        rand64(&[5, 2], 34),
    ];
    for (p, name) in [(0.0, "lora p=0"), (0.3, "lora p=0.3")] {
        gradcheck(
            name,
            &ins,
            |v| {
                ops::lora_linear(
                    &v[0],
                    &v[1],
                    Some(&v[2]),
                    Some(Lora {
                        a: &v[3],
                        b: &v[4],
                        scale: 4.0,
                        dropout: p,
                        seed: 99,
                    }),
                )
            },
            TOL,
        );
    }
    let with_res = [&ins[..], &[rand64(&[2, 3, 5], 35)]].concat();
    gradcheck(
        "lora + residual",
        &with_res,
        |v| {
            ops::lora_linear_residual(
                &v[0],
                &v[1],
                Some(&v[2]),
                Some(Lora {
                    a: &v[3],
                    b: &v[4],
                    scale: 4.0,
                    dropout: 0.3,
                    seed: 99,
                }),
                &v[5],
            )
        },
        TOL,
    );
    gradcheck(
        "lora no bias",
        &[
            ins[0].clone(),
            ins[1].clone(),
            ins[3].clone(),
            ins[4].clone(),
        ],
        |v| {
            ops::lora_linear(
                &v[0],
                &v[1],
                None,
                Some(Lora {
                    a: &v[2],
                    b: &v[3],
                    scale: 0.5,
                    dropout: 0.5,
                    seed: 5,
                }),
            )
        },
        TOL,
    );
}

#[test]
fn layout_ops() {
    let x = rand64(&[2, 3, 4], 35);
    gradcheck(
        "reshape",
        &[x.clone()],
        |v| v[0].reshape((4, 6))?.sqr(),
        TOL,
    );
    gradcheck("permute", &[x.clone()], |v| v[0].permute(&[2, 0, 1]), TOL);
    gradcheck("transpose", &[x.clone()], |v| v[0].transpose(0, -1), TOL);
    gradcheck("narrow", &[x.clone()], |v| v[0].narrow(1, 1, 2), TOL);
    gradcheck(
        "cat",
        &[x.clone(), rand64(&[2, 1, 4], 36)],
        |v| Tensor::cat(&[&v[0], &v[1]], 1),
        TOL,
    );
    gradcheck(
        "select_rows_per_batch",
        &[x.clone()],
        |v| v[0].select_rows_per_batch(&[2, 0]),
        TOL,
    );
    let ids = Tensor::from_vec(vec![1u32, 3, 1, 0, 1], 5, Device::Cpu).unwrap();
    gradcheck(
        "embedding (repeated ids)",
        &[rand64(&[4, 3], 37)],
        |v| Tensor::embedding(&v[0], &ids),
        TOL,
    );
    gradcheck(
        "patch_conv (cropped)",
        &[rand64(&[2, 3, 5, 6], 38), rand64(&[4, 3, 2, 2], 39)],
        |v| v[0].patch_conv(&v[1]),
        TOL,
    );
}

#[test]
fn normalisation() {
    let x = rand64(&[3, 5], 40);
    gradcheck(
        "layer_norm",
        &[x.clone(), positive(&[5], 41), rand64(&[5], 42)],
        |v| v[0].layer_norm(&v[1], &v[2], 1e-5),
        TOL,
    );
    gradcheck(
        "softmax",
        &[x.scale(2.0).unwrap()],
        |v| v[0].softmax_last(),
        TOL,
    );
    gradcheck("l2_normalize", &[x], |v| v[0].l2_normalize(), TOL);
}

#[test]
fn attention() {
    for (seq, causal) in [(7, false), (7, true), (13, false), (13, true)] {
        let ins = [
            rand64(&[2, seq, 6], 43),
            rand64(&[2, seq, 6], 44),
            rand64(&[2, seq, 6], 45),
        ];
        gradcheck(
            &format!("attention S={seq} causal={causal}"),
            &ins,
            |v| ops::attention(&v[0], &v[1], &v[2], 2, causal),
            TOL,
        );
    }
    // Cross attention (q_len ≠ kv_len), causal aligned at the end, and a custom scale.
    let ins = [
        rand64(&[1, 5, 6], 46),
        rand64(&[1, 7, 6], 47),
        rand64(&[1, 7, 6], 48),
    ];
    for causal in [false, true] {
        gradcheck(
            &format!("attention 5x7 causal={causal}"),
            &ins,
            |v| {
                Ok(ops::attention_lse(
                    &v[0],
                    &v[1],
                    &v[2],
                    AttnOptions {
                        heads: 3,
                        causal,
                        scale: Some(0.7),
                    },
                )?
                .0)
            },
            TOL,
        );
    }
}

#[test]
fn losses() {
    let z = rand64(&[4, 5], 49).scale(3.0).unwrap();
    let labels = Tensor::from_vec(vec![0i64, 4, 2, 4], 4, Device::Cpu).unwrap();
    gradcheck(
        "cross_entropy",
        &[z],
        |v| ops::cross_entropy(&v[0], &labels),
        TOL,
    );
    let f = rand64(&[4, 3], 50).l2_normalize().unwrap();
    let d = rand64(&[4, 3], 51).l2_normalize().unwrap();
    let t = t64(&[3.0], &[]);
    let b = t64(&[-1.0], &[1]);
    gradcheck(
        "sigmoid_loss",
        &[f.clone(), d.clone(), t, b],
        |v| ops::sigmoid_loss(&v[0], &v[1], &v[2], &v[3]),
        TOL,
    );
    // Through the normalisation and t = exp(t'), as SD2 uses it.
    gradcheck(
        "sigmoid_loss normalized",
        &[
            rand64(&[3, 4], 52),
            rand64(&[3, 4], 53),
            t64(&[10f64.ln()], &[]),
            t64(&[-10.0], &[]),
        ],
        |v| {
            ops::sigmoid_loss(
                &v[0].l2_normalize()?,
                &v[1].l2_normalize()?,
                &v[2].exp()?,
                &v[3],
            )
        },
        TOL,
    );
    // Rectangular: 3 rows of f against 7 of d, positives from row 2 (gathered negatives).
    gradcheck(
        "sigmoid_loss_offset",
        &[
            rand64(&[3, 4], 54).l2_normalize().unwrap(),
            rand64(&[7, 4], 55).l2_normalize().unwrap(),
            t64(&[3.0], &[]),
            t64(&[-1.0], &[]),
        ],
        |v| ops::sigmoid_loss_offset(&v[0], &v[1], 2, &v[2], &v[3]),
        TOL,
    );
    // Extreme logits: saturated but finite, and the gradient still matches.
    gradcheck(
        "sigmoid_loss extreme",
        &[f, d, t64(&[1e4], &[]), t64(&[-1e3], &[])],
        |v| ops::sigmoid_loss(&v[0], &v[1], &v[2], &v[3]),
        1e-5,
    );
}
