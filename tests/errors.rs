//! Bad input is a clear error naming the op and the shapes, never a panic.
mod common;
use common::rand64;
use sd2::ops::{self, Lora};
use sd2::{DType, Device, Tensor};

fn msg<T: std::fmt::Debug>(r: sd2::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn shape_errors_name_the_op_and_shapes() {
    let a = rand64(&[2, 3], 1);
    let b = rand64(&[4, 5], 2);
    let e = msg(a.matmul(&b));
    assert!(
        e.contains("matmul") && e.contains("[2, 3]") && e.contains("[4, 5]"),
        "{e}"
    );
    let e = msg(a.add(&b));
    assert!(
        e.contains("add") && e.contains("[2, 3]") && e.contains("[4, 5]"),
        "{e}"
    );
    let e = msg(a.linear(&b, None));
    assert!(e.contains("lora_linear") && e.contains("[4, 5]"), "{e}");
    let e = msg(a.layer_norm(&rand64(&[2], 3), &rand64(&[3], 4), 1e-5));
    assert!(e.contains("layer_norm"), "{e}");
    let q = rand64(&[1, 4, 6], 5);
    let e = msg(ops::attention(&q, &q, &q, 4, false));
    assert!(e.contains("attention") && e.contains("4 heads"), "{e}");
    let x = rand64(&[2, 6], 6);
    let w = rand64(&[3, 6], 7);
    let bad_a = rand64(&[2, 5], 8);
    let bb = rand64(&[3, 2], 9);
    let e = msg(ops::lora_linear(
        &x,
        &w,
        None,
        Some(Lora {
            a: &bad_a,
            b: &bb,
            scale: 1.0,
            dropout: 0.0,
            seed: 0,
        }),
    ));
    assert!(e.contains("LoRA") && e.contains("[2, 5]"), "{e}");
    let e = msg(x.reshape((5, 5)));
    assert!(e.contains("reshape"), "{e}");
    let e = msg(x.narrow(1, 4, 3));
    assert!(e.contains("narrow"), "{e}");
    let labels = Tensor::from_vec(vec![0i64, 7], 2, Device::Cpu).unwrap();
    let e = msg(ops::cross_entropy(&x, &labels));
    assert!(e.contains("cross_entropy") && e.contains("id 7"), "{e}");
    let e = msg(Tensor::from_vec(vec![1f32; 5], (2, 3), Device::Cpu));
    assert!(e.contains("5 elements"), "{e}");
}

#[test]
fn dtype_errors_name_the_op() {
    let a = rand64(&[2, 3], 1);
    let b = a.to_dtype(DType::F32).unwrap();
    let e = msg(a.mul(&b));
    assert!(
        e.contains("mul") && e.contains("F64") && e.contains("F32"),
        "{e}"
    );
    let ids = Tensor::from_vec(vec![1u32, 2], 2, Device::Cpu).unwrap();
    let e = msg(ids.exp());
    assert!(e.contains("exp") && e.contains("U32"), "{e}");
    let e = msg(Tensor::embedding(&a, &b.narrow(0, 0, 1).unwrap()));
    assert!(e.contains("ids must be i64 or u32"), "{e}");
}

#[test]
fn devices_parse_and_cuda_is_reported() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    assert_eq!(Device::parse("cuda:1").unwrap(), Device::Cuda(1));
    // The simulator is its own device, named and parsed as such.
    assert_eq!(Device::parse("cuda:sim").unwrap(), Device::CudaSim);
    assert_eq!(Device::CudaSim.to_string(), "cuda:sim");
    assert!(Device::CudaSim.is_cuda());
    assert!(Device::parse(&format!("cuda:{}", usize::MAX)).is_err());
    assert!(Device::parse("tpu").is_err());
    let r = Tensor::zeros(3, DType::F32, Device::Cuda(0));
    if !cfg!(feature = "cuda") {
        let e = msg(r);
        assert!(e.contains("cuda:0") && e.contains("--features cuda"), "{e}");
    }
}
