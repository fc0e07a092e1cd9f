//! Test helpers shared by the integration tests: closeness checks that print the worst error,
//! central-difference gradient checks in f64, and the list of backends to run every test on.
#![allow(dead_code)]

use sd2::{no_grad, DType, Device, Result, Tensor};

/// Backends the device-generic tests run on: the CPU always, CUDA when compiled in and usable.
pub fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if Device::Cuda(0).check_available().is_ok() {
        d.push(Device::Cuda(0));
    }
    d
}

/// Worst error of `got` against `want`: (abs error, index, value got, value wanted).
pub fn worst(got: &[f64], want: &[f64]) -> (f64, usize, f64, f64) {
    let mut w = (0.0, 0, 0.0, 0.0);
    for (i, (g, e)) in got.iter().zip(want).enumerate() {
        let err = if g.is_nan() || e.is_nan() {
            f64::INFINITY
        } else {
            (g - e).abs()
        };
        if err > w.0 || (i == 0 && err >= w.0) {
            w = (err, i, *g, *e);
        }
    }
    w
}

/// Asserts |got − want| ≤ atol + rtol·|want| everywhere, printing the worst element.
#[track_caller]
pub fn assert_close(name: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: length {} vs {}",
        got.len(),
        want.len()
    );
    let mut bad = None;
    let mut worst_ratio: f64 = 0.0;
    for (i, (g, e)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * e.abs();
        let err = (g - e).abs();
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else {
            err / tol
        };
        if ratio > worst_ratio || bad.is_none() {
            worst_ratio = worst_ratio.max(ratio);
            bad = Some((i, *g, *e, err, tol));
        }
    }
    let (i, g, e, err, tol) = bad.unwrap_or((0, 0.0, 0.0, 0.0, atol));
    println!("{name}: worst |err| {err:.3e} at [{i}] (got {g:.9}, want {e:.9}, tol {tol:.1e})");
    assert!(
        worst_ratio <= 1.0,
        "{name}: error {err:.3e} at [{i}] exceeds tolerance {tol:.1e} (got {g}, want {e})"
    );
}

#[track_caller]
pub fn assert_tensor(name: &str, t: &Tensor, want: &[f64], tol: f64) {
    assert_close(name, &t.to_vec_f64().unwrap(), want, tol, tol);
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut r = sd2::rng::Rng::new(seed);
    (0..n).map(|_| r.uniform() * 2.0 - 1.0).collect()
}

pub fn t64(data: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_f64(data, shape, DType::F64, Device::Cpu).unwrap()
}

pub fn rand64(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    t64(&values(n, seed), shape)
}

/// Checks the gradients of `f` with respect to every input against central differences (f64).
///
/// The scalar differentiated is ⟨f(x), w⟩ for a fixed random `w`, which exercises every output
/// element. The error per element is |analytic − numeric| / max(1, |numeric|); the worst one per
/// input is printed and must stay below `tol`.
#[track_caller]
pub fn gradcheck(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>, tol: f64) {
    let vars: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.copy().unwrap().into_trainable())
        .collect();
    let out = f(&vars).unwrap();
    let w = rand64(out.dims(), 0xfeed);
    let loss = out.mul(&w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let eval = |xs: &[Tensor]| -> f64 {
        let _g = no_grad();
        let o = f(xs).unwrap();
        o.mul(&w).unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    let eps = 1e-6;
    for (i, x) in inputs.iter().enumerate() {
        let base = x.to_vec_f64().unwrap();
        let analytic = match grads.get(&vars[i]) {
            Some(g) => g.to_vec_f64().unwrap(),
            None => vec![0.0; base.len()],
        };
        let mut numeric = vec![0.0; base.len()];
        for j in 0..base.len() {
            let at = |d: f64| {
                let mut v = base.clone();
                v[j] += d;
                let mut xs: Vec<Tensor> = inputs.to_vec();
                xs[i] = t64(&v, x.dims());
                eval(&xs)
            };
            numeric[j] = (at(eps) - at(-eps)) / (2.0 * eps);
        }
        let mut worst_err: f64 = 0.0;
        let mut at_j = 0;
        for j in 0..base.len() {
            let e = (analytic[j] - numeric[j]).abs() / numeric[j].abs().max(1.0);
            let e = if e.is_nan() { f64::INFINITY } else { e };
            if e > worst_err {
                worst_err = e;
                at_j = j;
            }
        }
        let shown = |v: &[f64]| v.get(at_j).copied().unwrap_or(0.0);
        println!(
            "gradcheck {name} input {i} {:?}: worst rel err {worst_err:.2e} at [{at_j}] (analytic {:.9}, numeric {:.9}, tol {tol:.0e})",
            x.dims(),
            shown(&analytic),
            shown(&numeric)
        );
        assert!(
            worst_err <= tol,
            "gradcheck {name} input {i}: {worst_err:.3e} > {tol:.0e}"
        );
        assert!(
            analytic.iter().all(|v| v.is_finite()),
            "gradcheck {name} input {i}: non-finite gradient"
        );
    }
}

/// Generates one `#[test]` per backend for each listed `fn name(dev: Device)`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {
        mod cpu {
            $(#[test]
            fn $name() {
                super::$name(sd2::Device::Cpu);
            })+
        }
        // The CUDA storage with every kernel run by the simulator: CI's check of the GPU path.
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

/// Runs the `sd2` binary with `args`, capturing its output.
pub fn sd2_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args(args)
        .output()
        .expect("run the sd2 binary")
}

/// A loadable checkpoint of a tiny random SD2 model (towers included: `train_base`) in `dir`,
/// for tests of the commands that take `--checkpoint`.
pub fn tiny_checkpoint(dir: &std::path::Path) {
    use sd2::clip::{ClipConfig, ClipModel, ClipTokenizer};
    use sd2::sd2::train::{TrainConfig, Trainer};
    use sd2::sd2::{Sd2Config, Sd2Model, TypeTexts};
    let cfg = ClipConfig::from_json(
        r#"{"projection_dim": 16,
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "image_size": 28, "patch_size": 14},
            "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}}"#,
    )
    .unwrap();
    let clip = ClipModel::random(&cfg, DType::F32, Device::Cpu, 11).unwrap();
    let mut c = Sd2Config::default();
    c.lora.rank = 4;
    c.clam_heads = 4;
    c.train_base = true;
    let model = Sd2Model::new(clip, c, 3).unwrap();
    Trainer::new(
        model,
        TrainConfig::default(),
        ClipTokenizer::openai().unwrap(),
        TypeTexts::shipped().unwrap(),
    )
    .save(dir, None)
    .unwrap();
}

/// `sd2 train` of the tiny preset on `manifest` (a manifest or a pack) into `out`: 2 epochs,
/// micro-batch 8, 2 micro-batches per step, a checkpoint every step.
pub fn tiny_run_args(manifest: &std::path::Path, out: &std::path::Path) -> Vec<String> {
    [
        "train",
        "--preset",
        "tiny",
        "--set",
        &format!("manifest={}", manifest.display()),
        "--set",
        &format!("out={}", out.display()),
        "--set",
        "epochs=2",
        "--set",
        "train.micro_batch=8",
        "--set",
        "train.effective_batch=16",
        "--set",
        "checkpoint.every_steps=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn file_bytes(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
