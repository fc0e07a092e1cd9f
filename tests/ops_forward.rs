//! Forward values of every op against hand-computed results, written once and run on every
//! backend (`backend_tests!`).
mod common;
use common::{assert_close, assert_tensor};
use sd2::ops::{self, AttnOptions, Lora};
use sd2::{DType, Device, Tensor};

const TOL: f64 = 1e-5;

fn t(dev: Device, data: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_f64(data, shape, DType::F32, dev).unwrap()
}

fn ids(dev: Device, v: &[u32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), dev).unwrap()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn elementwise_broadcast(dev: Device) {
    let x = t(dev, &[1., 2., 3., 4., 5., 6.], &[2, 3]);
    let bias = t(dev, &[10., 20., 30.], &[3]);
    let col = t(dev, &[2., 4.], &[2, 1]);
    assert_tensor(
        "add bias",
        &x.add(&bias).unwrap(),
        &[11., 22., 33., 14., 25., 36.],
        TOL,
    );
    assert_tensor(
        "sub bias",
        &x.sub(&bias).unwrap(),
        &[-9., -18., -27., -6., -15., -24.],
        TOL,
    );
    assert_tensor(
        "mul column",
        &x.mul(&col).unwrap(),
        &[2., 4., 6., 16., 20., 24.],
        TOL,
    );
    assert_tensor(
        "div column",
        &x.div(&col).unwrap(),
        &[0.5, 1., 1.5, 1., 1.25, 1.5],
        TOL,
    );
    // Both sides broadcast: [2,1] + [3] → [2,3].
    let outer = col.add(&bias).unwrap();
    assert_eq!(outer.dims(), &[2, 3]);
    assert_tensor("outer add", &outer, &[12., 22., 32., 14., 24., 34.], TOL);
    // Positions [S, D] added to [B, S, D].
    let h = t(dev, &[0.; 12], &[2, 3, 2]);
    let pos = t(dev, &[1., 2., 3., 4., 5., 6.], &[3, 2]);
    assert_tensor(
        "positions",
        &h.add(&pos).unwrap(),
        &[1., 2., 3., 4., 5., 6., 1., 2., 3., 4., 5., 6.],
        TOL,
    );
    assert_tensor(
        "affine",
        &x.affine(2.0, -1.0).unwrap(),
        &[1., 3., 5., 7., 9., 11.],
        TOL,
    );
    assert_tensor(
        "scale",
        &x.scale(0.5).unwrap(),
        &[0.5, 1., 1.5, 2., 2.5, 3.],
        TOL,
    );
    assert!(
        x.add(&t(dev, &[1., 2.], &[2])).is_err(),
        "[2,3] + [2] must not broadcast"
    );
}

fn unary(dev: Device) {
    let x = t(dev, &[-2., 0., 1., 4.], &[4]);
    let v = [-2f64, 0., 1., 4.];
    assert_tensor("neg", &x.neg().unwrap(), &[2., 0., -1., -4.], TOL);
    assert_tensor("exp", &x.exp().unwrap(), &v.map(f64::exp), TOL);
    assert_tensor("sqr", &x.sqr().unwrap(), &[4., 0., 1., 16.], TOL);
    assert_tensor(
        "quick_gelu",
        &x.quick_gelu().unwrap(),
        &v.map(|x| x * sigmoid(1.702 * x)),
        TOL,
    );
    assert_tensor("sigmoid", &x.sigmoid().unwrap(), &v.map(sigmoid), TOL);
    let p = t(dev, &[1., 4., 9.], &[3]);
    assert_tensor("sqrt", &p.sqrt().unwrap(), &[1., 2., 3.], TOL);
    assert_tensor("log", &p.log().unwrap(), &[0., 4f64.ln(), 9f64.ln()], TOL);
}

fn reductions(dev: Device) {
    let x = t(dev, &[1., 2., 3., 4., 5., 6.], &[2, 3]);
    assert_eq!(x.sum_all().unwrap().dims(), &[] as &[usize]);
    assert_tensor("sum_all", &x.sum_all().unwrap(), &[21.], TOL);
    assert_tensor("mean_all", &x.mean_all().unwrap(), &[3.5], TOL);
    assert_tensor(
        "sum_dim 0",
        &x.sum_dim(0, false).unwrap(),
        &[5., 7., 9.],
        TOL,
    );
    let s1 = x.sum_dim(-1, true).unwrap();
    assert_eq!(s1.dims(), &[2, 1]);
    assert_tensor("sum_dim -1", &s1, &[6., 15.], TOL);
    assert_tensor("mean_dim 1", &x.mean_dim(1, false).unwrap(), &[2., 5.], TOL);
    let b = t(dev, &[1., 2.], &[2, 1])
        .broadcast_as(&sd2::Shape::from([2, 3]))
        .unwrap();
    assert_tensor("broadcast_as", &b, &[1., 1., 1., 2., 2., 2.], TOL);
}

fn matmul(dev: Device) {
    let a = t(dev, &[1., 2., 3., 4.], &[2, 2]);
    let b = t(dev, &[5., 6., 7., 8.], &[2, 2]);
    assert_tensor("matmul", &a.matmul(&b).unwrap(), &[19., 22., 43., 50.], TOL);
    assert_tensor(
        "matmul aᵀb",
        &a.matmul_t(&b, true, false).unwrap(),
        &[26., 30., 38., 44.],
        TOL,
    );
    assert_tensor(
        "matmul abᵀ",
        &a.matmul_t(&b, false, true).unwrap(),
        &[17., 23., 39., 53.],
        TOL,
    );
    assert_tensor(
        "matmul aᵀbᵀ",
        &a.matmul_t(&b, true, true).unwrap(),
        &[23., 31., 34., 46.],
        TOL,
    );
    // Batched [2, 1, 2] · [2, 2, 1], and a shared rhs.
    let x = t(dev, &[1., 2., 3., 4.], &[2, 1, 2]);
    let y = t(dev, &[1., 1., 2., 0.], &[2, 2, 1]);
    let c = x.matmul(&y).unwrap();
    assert_eq!(c.dims(), &[2, 1, 1]);
    assert_tensor("batched", &c, &[3., 6.], TOL);
    assert_tensor(
        "shared rhs",
        &x.matmul(&b).unwrap(),
        &[19., 22., 43., 50.],
        TOL,
    );
    assert!(a.matmul(&t(dev, &[1., 2., 3.], &[3, 1])).is_err());
}

fn linear_and_lora(dev: Device) {
    let x = t(dev, &[1., 2.], &[1, 2]);
    let w = t(dev, &[1., 0., 0., 1., 1., 1.], &[3, 2]);
    let b = t(dev, &[0.5, 0., -1.], &[3]);
    assert_tensor(
        "linear",
        &x.linear(&w, Some(&b)).unwrap(),
        &[1.5, 2., 2.],
        TOL,
    );
    assert_tensor(
        "linear no bias",
        &x.linear(&w, None).unwrap(),
        &[1., 2., 3.],
        TOL,
    );
    // A = [1, 1] (rank 1), B = [1, 0, 2]ᵀ, s = 2: y += 2·(x·Aᵀ)·Bᵀ = 2·3·[1, 0, 2].
    let a = t(dev, &[1., 1.], &[1, 2]);
    let bm = t(dev, &[1., 0., 2.], &[3, 1]);
    let lora = Lora {
        a: &a,
        b: &bm,
        scale: 2.0,
        dropout: 0.0,
        seed: 0,
    };
    let y = ops::lora_linear(&x, &w, Some(&b), Some(lora)).unwrap();
    assert_tensor("lora_linear", &y, &[7.5, 2., 14.], TOL);
    // With B = 0 (its init), LoRA is exactly the base layer.
    let z = t(dev, &[0., 0., 0.], &[3, 1]);
    let lora0 = Lora {
        a: &a,
        b: &z,
        scale: 4.0,
        dropout: 0.1,
        seed: 3,
    };
    assert_tensor(
        "lora B=0",
        &ops::lora_linear(&x, &w, Some(&b), Some(lora0)).unwrap(),
        &[1.5, 2., 2.],
        TOL,
    );
    // Dropout: every LoRA input element is either dropped or scaled by 1/(1-p).
    let xs = t(dev, &[1.; 64], &[64, 1]);
    let w1 = t(dev, &[0.], &[1, 1]);
    let a1 = t(dev, &[1.], &[1, 1]);
    let b1 = t(dev, &[1.], &[1, 1]);
    let yd = ops::lora_linear(
        &xs,
        &w1,
        None,
        Some(Lora {
            a: &a1,
            b: &b1,
            scale: 1.0,
            dropout: 0.5,
            seed: 7,
        }),
    )
    .unwrap();
    let v = yd.to_vec_f64().unwrap();
    assert!(
        v.iter().all(|y| *y == 0.0 || (*y - 2.0).abs() < 1e-6),
        "{v:?}"
    );
    let kept = v.iter().filter(|y| **y != 0.0).count();
    assert!((16..=48).contains(&kept), "dropout kept {kept} of 64");
}

fn layer_norm(dev: Device) {
    let x = t(dev, &[1., 2., 3., -1., 0., 1.], &[2, 3]);
    let g = t(dev, &[1., 2., 1.], &[3]);
    let b = t(dev, &[0., 0., 0.5], &[3]);
    let s = (1.5f64).sqrt(); // 1/sqrt(var) with var = 2/3
    let e = 1e-5f64;
    let r = 1.0 / (2.0 / 3.0 + e).sqrt();
    let y = x.layer_norm(&g, &b, e).unwrap();
    assert_tensor("layer_norm", &y, &[-r, 0., r + 0.5, -r, 0., r + 0.5], 1e-4);
    assert!((r - s).abs() < 1e-4);
}

fn softmax_l2(dev: Device) {
    let x = t(dev, &[0., 2f64.ln(), 5., 5.], &[2, 2]);
    assert_tensor(
        "softmax",
        &x.softmax_last().unwrap(),
        &[1. / 3., 2. / 3., 0.5, 0.5],
        TOL,
    );
    let v = t(dev, &[3., 4., 0., 0.], &[2, 2]);
    assert_tensor(
        "l2_normalize",
        &v.l2_normalize().unwrap(),
        &[0.6, 0.8, 0., 0.],
        TOL,
    );
}

fn attention(dev: Device) {
    // One head, head_dim 2. q = 0 gives uniform weights: the mean of v.
    let q = t(dev, &[0., 0., 0., 0.], &[1, 2, 2]);
    let k = t(dev, &[1., 0., 0., 1.], &[1, 2, 2]);
    let v = t(dev, &[1., 2., 3., 4.], &[1, 2, 2]);
    assert_tensor(
        "attention uniform",
        &ops::attention(&q, &k, &v, 1, false).unwrap(),
        &[2., 3., 2., 3.],
        TOL,
    );
    // Causal: query 0 sees key 0 only.
    assert_tensor(
        "attention causal",
        &ops::attention(&q, &k, &v, 1, true).unwrap(),
        &[1., 2., 2., 3.],
        TOL,
    );
    // Hand-computed weights: q = [√2·ln3, 0] against k: scores (scaled by 1/√2) ln3 and 0 → 3/4, 1/4.
    let l3 = 2f64.sqrt() * 3f64.ln();
    let q2 = t(dev, &[l3, 0.], &[1, 1, 2]);
    let (o, lse) = ops::attention_lse(
        &q2,
        &k,
        &v,
        AttnOptions {
            heads: 1,
            causal: false,
            scale: None,
        },
    )
    .unwrap();
    assert_tensor(
        "attention weights",
        &o,
        &[0.75 * 1. + 0.25 * 3., 0.75 * 2. + 0.25 * 4.],
        TOL,
    );
    assert_tensor("attention lse", &lse, &[4f64.ln()], TOL);
    // Two heads are independent: head 1 sees only its own columns.
    let q = t(dev, &[0., 0., 0., 0.], &[1, 1, 4]);
    let k = t(dev, &[1., 0., 5., 5., 0., 1., -5., 5.], &[1, 2, 4]);
    let v = t(dev, &[1., 2., 10., 20., 3., 4., 30., 40.], &[1, 2, 4]);
    assert_tensor(
        "attention 2 heads",
        &ops::attention(&q, &k, &v, 2, false).unwrap(),
        &[2., 3., 20., 30.],
        TOL,
    );
}

fn losses(dev: Device) {
    let z = t(dev, &[0., 0., 1., 2f64.ln() + 1.], &[2, 2]);
    let y = ids(dev, &[0, 1]);
    // Row 0: ln 2. Row 1: p(label) = 2/3 → −ln(2/3).
    let ce = ops::cross_entropy(&z, &y).unwrap();
    assert_tensor(
        "cross_entropy",
        &ce,
        &[(2f64.ln() - (2.0f64 / 3.0).ln()) / 2.0],
        TOL,
    );
    let e = ops::cross_entropy(&z, &ids(dev, &[0, 2]))
        .and_then(|l| l.to_scalar())
        .expect_err("label 2 of 2 classes must fail")
        .to_string();
    assert!(
        e.contains("cross_entropy") && e.contains("outside 0..2"),
        "{e}"
    );
    // Sigmoid loss, n = 2 orthonormal pairs: ⟨f_i, d_j⟩ = δ_ij.
    let f = t(dev, &[1., 0., 0., 1.], &[2, 2]);
    let tt = t(dev, &[10.], &[]);
    let bb = t(dev, &[-10.], &[]);
    let sp = |x: f64| (1.0 + x.exp()).ln();
    // Positives: x = 0 → softplus(0); negatives: x = −10 → softplus(−10).
    let want = (2.0 * sp(0.0) + 2.0 * sp(-10.0)) / 2.0;
    assert_tensor(
        "sigmoid_loss",
        &ops::sigmoid_loss(&f, &f, &tt, &bb).unwrap(),
        &[want],
        TOL,
    );
    // Extreme logits stay finite.
    let big = t(dev, &[1e4], &[]);
    let l = ops::sigmoid_loss(&f, &f.neg().unwrap(), &big, &t(dev, &[0.], &[]))
        .unwrap()
        .to_scalar()
        .unwrap();
    // Positives: softplus(1e4) = 1e4 each; negatives: softplus(0) = ln 2 each.
    assert!(
        l.is_finite() && (l - (1e4 + 2f64.ln())).abs() < 1e-2,
        "extreme sigmoid loss {l}"
    );
}

fn gather_and_layout(dev: Device) {
    let table = t(dev, &[0., 1., 10., 11., 20., 21.], &[3, 2]);
    let e = Tensor::embedding(
        &table,
        &Tensor::from_vec(vec![2u32, 0, 2, 1], (2, 2), dev).unwrap(),
    )
    .unwrap();
    assert_eq!(e.dims(), &[2, 2, 2]);
    assert_tensor(
        "embedding",
        &e,
        &[20., 21., 0., 1., 20., 21., 10., 11.],
        TOL,
    );
    // id 3 of 3 rows fails: at the op on the CPU, at the next read on CUDA storage (checked on
    // the device, so the host never waits for the check); the read after that is clean.
    let e = Tensor::embedding(&table, &ids(dev, &[1, 3]))
        .and_then(|e| e.to_vec_f64())
        .expect_err("id 3 of 3 rows must fail")
        .to_string();
    assert!(
        e.contains("index_rows") && e.contains("id 3 at position 1 is outside 0..3"),
        "{e}"
    );
    assert_tensor(
        "after a bad id",
        &table.narrow(0, 1, 1).unwrap(),
        &[10., 11.],
        TOL,
    );
    let h = t(
        dev,
        &(0..12).map(|v| v as f64).collect::<Vec<_>>(),
        &[2, 3, 2],
    );
    assert_tensor(
        "select rows",
        &h.select_rows_per_batch(&[0, 2]).unwrap(),
        &[0., 1., 10., 11.],
        TOL,
    );
    let tr = h.transpose(1, 2).unwrap();
    assert_eq!(tr.dims(), &[2, 2, 3]);
    assert_tensor(
        "transpose",
        &tr,
        &[0., 2., 4., 1., 3., 5., 6., 8., 10., 7., 9., 11.],
        TOL,
    );
    assert_tensor(
        "narrow",
        &h.narrow(1, 1, 2).unwrap(),
        &[2., 3., 4., 5., 8., 9., 10., 11.],
        TOL,
    );
    let a = t(dev, &[1., 2.], &[1, 2]);
    let b = t(dev, &[3., 4., 5., 6.], &[2, 2]);
    assert_tensor(
        "cat dim 0",
        &Tensor::cat(&[&a, &b], 0).unwrap(),
        &[1., 2., 3., 4., 5., 6.],
        TOL,
    );
    let c = t(dev, &[7., 8.], &[2, 1]);
    assert_tensor(
        "cat dim 1",
        &Tensor::cat(&[&b, &c], 1).unwrap(),
        &[3., 4., 7., 5., 6., 8.],
        TOL,
    );
    let r = h.reshape((6, 2)).unwrap();
    assert_eq!(r.dims(), &[6, 2]);
    assert!(h.reshape((5, 2)).is_err());
}

fn patchify(dev: Device) {
    // [1, 1, 4, 4] image 0..16 with 2×2 patches: patch (0,0) = 0 1 4 5, (0,1) = 2 3 6 7, ...
    let img = t(
        dev,
        &(0..16).map(|v| v as f64).collect::<Vec<_>>(),
        &[1, 1, 4, 4],
    );
    let p = img.patchify(2).unwrap();
    assert_eq!(p.dims(), &[1, 4, 4]);
    assert_tensor(
        "patchify",
        &p,
        &[
            0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.,
        ],
        TOL,
    );
    // A 5×5 image drops the last row and column, like a stride-2 convolution.
    let img5 = t(
        dev,
        &(0..25).map(|v| v as f64).collect::<Vec<_>>(),
        &[1, 1, 5, 5],
    );
    assert_tensor(
        "patchify crop",
        &img5.patchify(2).unwrap().narrow(1, 0, 1).unwrap(),
        &[0., 1., 5., 6.],
        TOL,
    );
    // Conv weight [D=1, C=1, 2, 2] that sums each patch.
    let w = t(dev, &[1., 1., 1., 1.], &[1, 1, 2, 2]);
    assert_tensor(
        "patch_conv",
        &img.patch_conv(&w).unwrap(),
        &[10., 18., 42., 50.],
        TOL,
    );
}

fn dtypes(dev: Device) {
    // bf16 compute agrees with f32 to bf16 precision.
    let x = Tensor::from_f64(&common::values(64, 1), (8, 8), DType::F32, dev).unwrap();
    let w = Tensor::from_f64(&common::values(64, 2), (8, 8), DType::F32, dev).unwrap();
    let y32 = x
        .linear(&w, None)
        .unwrap()
        .quick_gelu()
        .unwrap()
        .softmax_last()
        .unwrap();
    let xb = x.to_dtype(DType::BF16).unwrap();
    let wb = w.to_dtype(DType::BF16).unwrap();
    let yb = xb
        .linear(&wb, None)
        .unwrap()
        .quick_gelu()
        .unwrap()
        .softmax_last()
        .unwrap();
    assert_eq!(yb.dtype(), DType::BF16);
    assert_close(
        "bf16 vs f32",
        &yb.to_vec_f64().unwrap(),
        &y32.to_vec_f64().unwrap(),
        2e-2,
        2e-2,
    );
    let i = Tensor::from_vec(vec![1i64, 2], 2, dev).unwrap();
    assert_eq!(i.dtype(), DType::I64);
    assert_eq!(i.to_vec::<i64>().unwrap(), vec![1, 2]);
    assert!(x.add(&xb).is_err(), "mixed dtypes must be an error");
}

backend_tests!(
    elementwise_broadcast,
    unary,
    reductions,
    matmul,
    linear_and_lora,
    layer_norm,
    softmax_l2,
    attention,
    losses,
    gather_and_layout,
    patchify,
    dtypes,
);

#[test]
fn cuda_without_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let e = Tensor::zeros((2, 2), DType::F32, Device::Cuda(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("built without CUDA support"), "{e}");
    assert_eq!(common::devices(), vec![Device::Cpu]);
}
