//! Build script. With the `cuda` feature, CUDA backend I compiles `kernels/*.cu` here (nvcc for
//! sm_90a/compute_80, plus the host-C++ kernel simulator) and embeds the results. Until then it
//! only tells cargo when to rerun.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
