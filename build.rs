//! Build script: the CUDA kernels in `kernels/*.cu`.
//! - feature `cuda`: nvcc compiles each file to a fatbin (cubin for sm_90a, PTX for compute_80;
//!   `SD2_CUDA_ARCHS` overrides, e.g. `sm_90a,sm_80,compute_80`), `-lineinfo`, keeping each
//!   file's `ptxas -v` report; `OUT_DIR/kernels.rs` embeds both (`include_bytes!`/`include_str!`).
//! - feature `cuda-sim`: the host C++ compiler builds the same files against
//!   `kernels/sim/cuda_sim.h` into a static library, so every kernel runs on the CPU in tests.
use std::path::{Path, PathBuf};
use std::process::Command;

fn kernel_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn rerun_on_sources(files: &[PathBuf]) {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for dir in ["kernels/include", "kernels/sim"] {
        println!("cargo:rerun-if-changed={dir}");
        if let Ok(d) = std::fs::read_dir(dir) {
            for e in d.flatten() {
                println!("cargo:rerun-if-changed={}", e.path().display());
            }
        }
    }
    for f in files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    for v in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "SD2_CUDA_ARCHS",
        "SD2_CUDA_TOOLCHAIN",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
}

/// nvcc from `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, or the toolchain venv.
fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(h) = std::env::var(v) {
            let p = Path::new(&h).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let venv = std::env::var("SD2_CUDA_TOOLCHAIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(".cuda-toolchain"));
    let lib = venv.join("lib");
    for py in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
        let p = py.path().join("site-packages/nvidia/cu13/bin/nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

fn build_cuda(files: &[PathBuf], out: &Path) {
    let Some(nvcc) = find_nvcc() else {
        panic!(
            "feature `cuda` needs nvcc 13.0: run `scripts/install-cuda-toolchain.sh` (pinned wheels \
             into .cuda-toolchain, found automatically) or set NVCC=/path/to/nvcc"
        );
    };
    let archs = std::env::var("SD2_CUDA_ARCHS").unwrap_or_else(|_| "sm_90a,compute_80".into());
    let mut gencode = vec![];
    for a in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        if let Some(n) = a.strip_prefix("sm_") {
            gencode.push(format!("-gencode=arch=compute_{n},code=sm_{n}"));
        } else if let Some(n) = a.strip_prefix("compute_") {
            gencode.push(format!("-gencode=arch=compute_{n},code=compute_{n}"));
        } else {
            panic!("SD2_CUDA_ARCHS: `{a}` is neither sm_NN nor compute_NN");
        }
    }
    let mut table = String::from(
        "/// (file stem, fatbin, `ptxas -v` report) for every `kernels/*.cu`.\n\
         pub const KERNELS: &[(&str, &[u8], &str)] = &[\n",
    );
    for f in files {
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let fatbin = out.join(format!("{stem}.fatbin"));
        let report = out.join(format!("{stem}.ptxas.txt"));
        let o = Command::new(&nvcc)
            .args(&gencode)
            .args([
                "-fatbin",
                "-lineinfo",
                "-std=c++17",
                "-Xptxas",
                "-v",
                "-I",
                "kernels/include",
            ])
            .arg("-o")
            .arg(&fatbin)
            .arg(f)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        let text = String::from_utf8_lossy(&o.stderr).to_string();
        if !o.status.success() {
            panic!("nvcc failed on {}:\n{text}", f.display());
        }
        std::fs::write(&report, &text).expect("write ptxas report");
        table.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?}), include_str!({:?})),\n",
            fatbin.display().to_string(),
            report.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), table).expect("write kernels.rs");
}

fn build_sim(files: &[PathBuf], out: &Path) {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .flag("-Wno-unknown-pragmas")
        .include("kernels/include")
        .include("kernels/sim")
        .file("kernels/sim/cuda_sim.cpp");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let mut k = cc::Build::new();
    k.cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .flag("-Wno-unknown-pragmas")
        // TmaDesc (128-byte aligned, by value): GCC's note on an ABI change from GCC 4.6.
        .flag("-Wno-psabi")
        .flag("-include")
        .flag(
            root.join("kernels/sim/cuda_sim.h")
                .to_string_lossy()
                .to_string(),
        )
        .include("kernels/include")
        .include("kernels/sim");
    // Kernels register in static initializers, which a linker keeps only for the archive
    // members it pulls in. Each file gets a wrapper with one `extern "C"` anchor that the
    // launcher calls (OUT_DIR/sim_units.rs), so every member is pulled by an ordinary
    // reference — no `+whole-archive`, which would define every kernel twice in a binary that
    // links two copies of this crate (the lib's unit tests with sd2 as its own dev-dependency).
    let units = out.join("sim_units");
    std::fs::create_dir_all(&units).expect("create OUT_DIR/sim_units");
    let mut rs = String::from(
        "// Generated by build.rs: one anchor per simulated kernel file.\nextern \"C\" {\n",
    );
    let mut calls = String::new();
    for f in files {
        let stem = f
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file name")
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let anchor = format!("sd2_sim_unit_{stem}");
        let wrapper = units.join(format!("{stem}.cpp"));
        let text = format!(
            "#include \"{}\"\nextern \"C\" void {anchor}() {{}}\n",
            root.join(f).display()
        );
        // Rewritten only when changed, so cc does not recompile an unchanged kernel.
        if std::fs::read_to_string(&wrapper).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&wrapper, text).expect("write sim wrapper");
        }
        k.file(&wrapper);
        rs.push_str(&format!("    fn {anchor}();\n"));
        calls.push_str(&format!("        {anchor}();\n"));
    }
    rs.push_str("}\n\n/// Pulls every simulated kernel file into the link (their registrations run at start-up).\n");
    rs.push_str("#[inline(never)]\npub(crate) fn link_units() {\n    // SAFETY: empty C functions.\n    unsafe {\n");
    rs.push_str(&calls);
    rs.push_str("    }\n}\n");
    std::fs::write(out.join("sim_units.rs"), rs).expect("write sim_units.rs");
    b.compile("sd2_sim_runtime");
    if !files.is_empty() {
        k.compile("sd2_sim_kernels");
    }
}

fn main() {
    let files = kernel_files();
    rerun_on_sources(&files);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda(&files, &out);
    }
    if std::env::var_os("CARGO_FEATURE_CUDA_SIM").is_some() {
        build_sim(&files, &out);
    }
    if std::env::var_os("CARGO_FEATURE_DLIB").is_some() {
        // The shape predictor behind a C interface, against the system's dlib.
        println!("cargo:rerun-if-changed=src/faces/dlib_shim.cpp");
        cc::Build::new()
            .cpp(true)
            .std("c++14")
            .opt_level(2)
            .warnings(false)
            .file("src/faces/dlib_shim.cpp")
            .compile("sd2_dlib_shim");
        link_dlib();
    }
}

/// Links what `pkg-config --libs dlib-1` names: dlib, and the BLAS/LAPACK its headers call into.
/// Debian names them by their unversioned `.so`, which only their -dev packages ship; the
/// versioned library beside it (which the runtime package ships) is linked instead.
fn link_dlib() {
    let libs = std::process::Command::new("pkg-config")
        .args(["--libs", "dlib-1"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "-ldlib".into());
    for tok in libs.split_whitespace() {
        if let Some(l) = tok.strip_prefix("-l") {
            println!("cargo:rustc-link-lib={l}");
        } else if let Some(d) = tok.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={d}");
        } else if tok.contains(".so") {
            let p = Path::new(tok);
            let (Some(dir), Some(name)) = (p.parent(), p.file_name().and_then(|n| n.to_str()))
            else {
                continue;
            };
            let file = if p.exists() {
                Some(name.to_string())
            } else {
                std::fs::read_dir(dir).ok().and_then(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|f| f.starts_with(&format!("{name}.")))
                        .min_by_key(|f| f.len())
                })
            };
            if let Some(f) = file {
                println!("cargo:rustc-link-search=native={}", dir.display());
                println!("cargo:rustc-link-lib=dylib:+verbatim={f}");
            }
        }
    }
}
