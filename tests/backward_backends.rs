//! Gradients on every backend against the CPU reference: the same small graphs (every op family
//! with a backward rule, and an AdamW step) built on the CPU and on each other device — the
//! CUDA storage run by the kernel simulator (`cuda:sim`, every `cargo test`) and a GPU
//! (`cuda:0`, feature `cuda`, when one is present). f32, then bf16 storage against the CPU's
//! bf16 (which rounds each op's output as the kernels do); each worst error printed.
mod common;
use common::assert_close;
use sd2::ops::{self, AttnOptions, Lora};
use sd2::{DType, Device, Tensor};

const ATOL: f64 = 2e-5;
const RTOL: f64 = 2e-4;

/// `v` as bf16 values (for an f64 reference on exactly the bf16 inputs), or as given.
fn maybe_bf16(v: Vec<f64>, round: bool) -> Vec<f64> {
    if !round {
        return v;
    }
    v.into_iter()
        .map(|x| half::bf16::from_f64(x).to_f64())
        .collect()
}

fn input(dev: Device, dtype: DType, shape: &[usize], seed: u64, round: bool) -> Tensor {
    Tensor::from_f64(
        &maybe_bf16(common::values(shape.iter().product(), seed), round),
        shape,
        dtype,
        dev,
    )
    .unwrap()
    .into_trainable()
}

/// Loss = Σ out·w (fixed random w, so every output element carries a distinct upstream
/// gradient) and the gradient of each input. `round`: inputs and w take bf16 values (for an
/// f64 reference of a bf16 run).
fn grads(
    dev: Device,
    dtype: DType,
    shapes: &[&[usize]],
    build: &dyn Fn(Device, &[Tensor]) -> Tensor,
    round: bool,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let xs: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| input(dev, dtype, s, 100 + i as u64, round))
        .collect();
    let out = build(dev, &xs);
    let w = Tensor::from_f64(
        &maybe_bf16(common::values(out.elem_count(), 7), round),
        out.dims(),
        out.dtype(),
        dev,
    )
    .unwrap();
    let loss = out.mul(&w).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let gs = xs
        .iter()
        .map(|x| match g.get(x) {
            Some(t) => t.to_vec_f64().unwrap(),
            None => vec![0.0; x.elem_count()],
        })
        .collect();
    (out.to_vec_f64().unwrap(), gs)
}

fn compare(
    name: &str,
    dev: Device,
    shapes: &[&[usize]],
    build: &dyn Fn(Device, &[Tensor]) -> Tensor,
) {
    // bf16: inputs are exact in both; each stored result is rounded once per op on both sides,
    // but fused kernels round fewer intermediates than the CPU's op-by-op path.
    for (dtype, atol, rtol) in [(DType::F32, ATOL, RTOL), (DType::BF16, 3e-2, 3e-2)] {
        let (want_out, want) = grads(Device::Cpu, dtype, shapes, build, false);
        let (got_out, got) = grads(dev, dtype, shapes, build, false);
        let tag = format!("[{dev} {dtype}] {name}");
        assert_close(&format!("{tag} out"), &got_out, &want_out, atol, rtol);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("{tag} d input {i}"), g, w, atol, rtol);
        }
    }
}

/// As `compare`, for graphs whose CUDA path fuses what the CPU rounds op by op (the LoRA GEMM
/// kernels): bf16 results against an f64 reference on the same bf16 inputs, where the fused
/// kernel must be within bf16 tolerance of the truth (the CPU's bf16 path printed beside it).
fn compare_fused(
    name: &str,
    dev: Device,
    shapes: &[&[usize]],
    build: &dyn Fn(Device, &[Tensor]) -> Tensor,
) {
    let (want_out, want) = grads(Device::Cpu, DType::F32, shapes, build, false);
    let (got_out, got) = grads(dev, DType::F32, shapes, build, false);
    assert_close(
        &format!("[{dev} f32] {name} out"),
        &got_out,
        &want_out,
        ATOL,
        RTOL,
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("[{dev} f32] {name} d input {i}"), g, w, ATOL, RTOL);
    }
    let (want_out, want) = grads(Device::Cpu, DType::F64, shapes, build, true);
    let (cpu_out, cpu) = grads(Device::Cpu, DType::BF16, shapes, build, true);
    let (got_out, got) = grads(dev, DType::BF16, shapes, build, true);
    // Intermediates (dS, each GEMM's terms) are rounded to bf16 at the size of the tensor's
    // largest elements, so a small element can carry their rounding: the absolute tolerance
    // is two bf16 steps of the largest |value|.
    let atol = |w: &[f64]| (8e-3 * w.iter().fold(0f64, |m, v| m.max(v.abs()))).max(3e-2);
    let rtol = 3e-2;
    let tag = format!("[{dev} bf16 vs f64] {name}");
    assert_close(
        &format!("[cpu bf16 vs f64] {name} out"),
        &cpu_out,
        &want_out,
        1.0,
        1.0,
    );
    assert_close(
        &format!("{tag} out"),
        &got_out,
        &want_out,
        atol(&want_out),
        rtol,
    );
    for (i, ((g, c), w)) in got.iter().zip(&cpu).zip(&want).enumerate() {
        assert_close(
            &format!("[cpu bf16 vs f64] {name} d input {i}"),
            c,
            w,
            1.0,
            1.0,
        );
        assert_close(&format!("{tag} d input {i}"), g, w, atol(w), rtol);
    }
}

fn elementwise(dev: Device) {
    compare("elementwise", dev, &[&[3, 4], &[4]], &|_, x| {
        let (a, b) = (&x[0], &x[1]);
        let p = a.add(b).unwrap().mul(a).unwrap().quick_gelu().unwrap();
        let q = a
            .sub(b)
            .unwrap()
            .sigmoid()
            .unwrap()
            .div(&a.sqr().unwrap().affine(1.0, 1.0).unwrap())
            .unwrap();
        let r = a
            .sqr()
            .unwrap()
            .affine(1.0, 2.0)
            .unwrap()
            .sqrt()
            .unwrap()
            .log()
            .unwrap();
        let s = a.neg().unwrap().scale(0.5).unwrap().exp().unwrap();
        p.add(&q).unwrap().add(&r).unwrap().add(&s).unwrap()
    });
}

fn reductions_and_layout(dev: Device) {
    compare("reductions/layout", dev, &[&[2, 3, 4], &[3, 1]], &|_, x| {
        let (a, c) = (&x[0], &x[1]);
        let s = a.sum_dim(2, true).unwrap().mul(c).unwrap(); // [2,3,1]
        let m = a.mean_dim(0, false).unwrap(); // [3,4]
        let t = a.permute(&[2, 0, 1]).unwrap().narrow(0, 1, 2).unwrap(); // [2,2,3]
        let cat = Tensor::cat(&[&t, &t.scale(2.0).unwrap()], 1).unwrap(); // [2,4,3]
        let b = m.broadcast_as(&[2, 3, 4].as_slice().into()).unwrap();
        let y = a.add(&s).unwrap().mul(&b).unwrap();
        y.sum_all()
            .unwrap()
            .add(&cat.sum_all().unwrap())
            .unwrap()
            .reshape(vec![1usize])
            .unwrap()
    });
}

fn matmul(dev: Device) {
    compare("batched matmul", dev, &[&[2, 3, 5], &[2, 5, 4]], &|_, x| {
        x[0].matmul(&x[1]).unwrap()
    });
    compare("matmul_t", dev, &[&[5, 3], &[4, 5]], &|_, x| {
        x[0].matmul_t(&x[1], true, true).unwrap()
    });
    compare(
        "matmul shared rhs",
        dev,
        &[&[2, 67, 70], &[70, 65]],
        &|_, x| x[0].matmul(&x[1]).unwrap(),
    );
}

fn norms(dev: Device) {
    compare("layer_norm", dev, &[&[5, 8], &[8], &[8]], &|_, x| {
        x[0].layer_norm(&x[1], &x[2], 1e-5).unwrap()
    });
    compare("softmax + l2", dev, &[&[4, 7]], &|_, x| {
        x[0].scale(3.0)
            .unwrap()
            .softmax_last()
            .unwrap()
            .add(&x[0].l2_normalize().unwrap())
            .unwrap()
    });
}

fn attention(dev: Device) {
    // Head dim 64 runs flash attention on CUDA; 16 runs the whole-sequence (CLAM) kernel.
    for (d, sq, skv, causal) in [
        (64usize, 9usize, 9usize, false),
        (64, 7, 13, true),
        (64, 5, 150, false),
        (16, 5, 5, true),
    ] {
        let heads = 2;
        compare(
            &format!("attention d{d} sq{sq} skv{skv} causal {causal}"),
            dev,
            &[
                &[2, sq, heads * d],
                &[2, skv, heads * d],
                &[2, skv, heads * d],
            ],
            &|_, x| {
                ops::attention_lse(
                    &x[0].scale(0.5).unwrap(),
                    &x[1],
                    &x[2],
                    AttnOptions {
                        heads,
                        causal,
                        scale: None,
                    },
                )
                .unwrap()
                .0
            },
        );
    }
}

fn losses(dev: Device) {
    compare("cross_entropy", dev, &[&[6, 5]], &|dev, x| {
        let labels = Tensor::from_vec(vec![0i64, 4, 2, 2, 1, 3], 6, dev).unwrap();
        ops::cross_entropy(&x[0].scale(3.0).unwrap(), &labels)
            .unwrap()
            .reshape(vec![1usize])
            .unwrap()
    });
    compare(
        "sigmoid_loss",
        dev,
        &[&[5, 6], &[5, 6], &[1], &[1]],
        &|_, x| {
            let (f, d) = (x[0].l2_normalize().unwrap(), x[1].l2_normalize().unwrap());
            let t = x[2].affine(1.0, 2.0).unwrap().exp().unwrap();
            ops::sigmoid_loss(&f, &d, &t, &x[3])
                .unwrap()
                .reshape(vec![1usize])
                .unwrap()
        },
    );
    compare(
        "sigmoid_loss_offset",
        dev,
        &[&[3, 6], &[8, 6], &[1], &[1]],
        &|_, x| {
            let (f, d) = (x[0].l2_normalize().unwrap(), x[1].l2_normalize().unwrap());
            let t = x[2].affine(1.0, 2.0).unwrap().exp().unwrap();
            ops::sigmoid_loss_offset(&f, &d, 4, &t, &x[3])
                .unwrap()
                .reshape(vec![1usize])
                .unwrap()
        },
    );
}

fn lora(dev: Device) {
    compare(
        "lora_linear (dropout)",
        dev,
        &[&[4, 6], &[5, 6], &[5], &[3, 6], &[5, 3]],
        &|_, x| {
            let l = Lora {
                a: &x[3],
                b: &x[4],
                scale: 2.0,
                dropout: 0.25,
                seed: 11,
            };
            ops::lora_linear(&x[0], &x[1], Some(&x[2]), Some(l)).unwrap()
        },
    );
    // No dropout, K and r multiples of 8: bf16 takes the fused kernels for Y (the Hopper one
    // where the device has it: always in the simulator) and for dX = dY·W + s·dS·A.
    compare_fused(
        "lora_linear (fused shapes)",
        dev,
        &[&[9, 16], &[12, 16], &[12], &[8, 16], &[12, 8]],
        &|_, x| {
            let l = Lora {
                a: &x[3],
                b: &x[4],
                scale: 4.0,
                dropout: 0.0,
                seed: 0,
            };
            ops::lora_linear(&x[0], &x[1], Some(&x[2]), Some(l)).unwrap()
        },
    );
    // The residual in the fused kernels' epilogue (bias + residual), dropout on the LoRA input
    // through the register-mask kernels; its gradient is dy.
    compare_fused(
        "lora_linear_residual (fused shapes, dropout)",
        dev,
        &[&[9, 16], &[12, 16], &[12], &[8, 16], &[12, 8], &[9, 12]],
        &|_, x| {
            let l = Lora {
                a: &x[3],
                b: &x[4],
                scale: 4.0,
                dropout: 0.2,
                seed: 5,
            };
            ops::lora_linear_residual(&x[0], &x[1], Some(&x[2]), Some(l), &x[5]).unwrap()
        },
    );
    compare(
        "lora_linear_residual (no bias)",
        dev,
        &[&[4, 6], &[5, 6], &[4, 5]],
        &|_, x| ops::lora_linear_residual(&x[0], &x[1], None, None, &x[2]).unwrap(),
    );
    compare_fused(
        "linear (fused, no LoRA)",
        dev,
        &[&[7, 24], &[10, 24]],
        &|_, x| x[0].linear(&x[1], None).unwrap(),
    );
}

fn embedding_and_patches(dev: Device) {
    compare("embedding", dev, &[&[7, 4]], &|dev, x| {
        let ids = Tensor::from_vec(vec![3u32, 0, 6, 3, 3], 5, dev).unwrap();
        Tensor::embedding(&x[0], &ids).unwrap()
    });
    compare(
        "patch_conv",
        dev,
        &[&[2, 3, 9, 8], &[5, 3, 4, 4]],
        &|_, x| x[0].patch_conv(&x[1]).unwrap(),
    );
}

fn adamw(dev: Device) {
    use sd2::optim::{grad_norm, AdamW, AdamWConfig, Param};
    let run = |dev: Device| -> (Vec<f64>, f64) {
        let p = input(dev, DType::F32, &[70_000], 5, false);
        let q = input(dev, DType::F32, &[3, 4], 6, false);
        let params = vec![
            Param::new("p", p.clone(), true),
            Param::new("q", q.clone(), false),
        ];
        let mut opt = AdamW::new(AdamWConfig::default());
        let mut norm = 0.0;
        for _ in 0..2 {
            let loss = p
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .add(&q.exp().unwrap().sum_all().unwrap())
                .unwrap();
            let g = loss.backward().unwrap();
            norm = grad_norm(&params, &g).unwrap();
            opt.step(&params, &g, 1e-2, 0.5).unwrap();
        }
        let mut v = p.to_vec_f64().unwrap();
        v.extend(q.to_vec_f64().unwrap());
        (v, norm)
    };
    let (want, want_norm) = run(Device::Cpu);
    let (got, got_norm) = run(dev);
    assert_close(
        &format!("[{dev}] adamw params after 2 steps"),
        &got,
        &want,
        1e-6,
        1e-5,
    );
    assert_close(
        &format!("[{dev}] grad norm"),
        &[got_norm],
        &[want_norm],
        1e-6,
        1e-5,
    );
}

macro_rules! on_devices {
    ($($name:ident),+ $(,)?) => {
        #[cfg(feature = "cuda-sim")]
        mod cuda_sim {
            $(#[test]
            fn $name() {
                super::$name(sd2::Device::CUDA_SIM);
            })+
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $(#[test]
            fn $name() {
                let dev = sd2::Device::Cuda(0);
                if let Err(e) = dev.check_available() {
                    println!("skipped on cuda:0: {e}");
                    return;
                }
                super::$name(dev);
            })+
        }
    };
}

on_devices!(
    elementwise,
    reductions_and_layout,
    matmul,
    norms,
    attention,
    losses,
    lora,
    embedding_and_patches,
    adamw,
);
