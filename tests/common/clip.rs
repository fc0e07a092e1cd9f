//! Helpers for the CLIP fixture tests.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

use sd2::{Device, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn load_map(path: &std::path::Path) -> HashMap<String, Tensor> {
    sd2::io::load(path, Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Compares a tensor with a reference, normwise: max|a−b| / max|b| ≤ rtol. Prints the worst
/// element (value, index) and the relative error.
#[track_caller]
pub fn compare(name: &str, got: &Tensor, want: &Tensor, rtol: f64) -> f64 {
    compare_floor(name, got, want, rtol, 1e-30)
}

/// As `compare`, with max|b| floored at `floor` (for tensors whose true value is ~0, such as
/// the gradient of a key bias, which softmax cancels exactly).
#[track_caller]
pub fn compare_floor(name: &str, got: &Tensor, want: &Tensor, rtol: f64, floor: f64) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let g = got.to_vec_f64().unwrap();
    let w = want.to_vec_f64().unwrap();
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(floor);
    let (mut worst, mut at) = (0f64, 0);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let e = (a - b).abs();
        if e > worst || e.is_nan() {
            worst = if e.is_nan() { f64::INFINITY } else { e };
            at = i;
        }
    }
    let rel = worst / scale;
    println!("{name:<28} {:?}: worst |err| {worst:.3e} at [{at}] (got {:.7}, want {:.7}), rel {rel:.2e} (tol {rtol:.0e})", got.dims(), g[at], w[at]);
    assert!(rel <= rtol, "{name}: relative error {rel:.3e} > {rtol:.0e}");
    rel
}
