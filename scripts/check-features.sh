#!/usr/bin/env bash
# The library linted under each feature alone, with none, and with the defaults (CI runs this; all
# features together are linted by CI's clippy step). The library with no features must not
# pull any CLI or async crate. The `cuda` check needs nvcc (NVCC or .cuda-toolchain), the
# `dlib` check the system's dlib (libdlib-dev), the `mpi` check Open MPI and libclang
# (libopenmpi-dev, libclang-dev); `nccl` needs nothing beyond `cuda` (NCCL is loaded at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
lint() { cargo clippy -q --lib "$@" -- -D warnings; }

echo "-- no features"
lint --no-default-features
deps=$(cargo tree -q --no-default-features -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
bad=""
for c in clap indicatif plotters toml tokio axum hyper cudarc mpi; do
  if grep -qx "$c" <<< "$deps"; then bad="$bad $c"; fi
done
if [ -n "$bad" ]; then
  echo "the library without features depends on:$bad" >&2
  exit 1
fi
echo "   $(wc -l <<< "$deps") crates, none of clap indicatif plotters toml tokio axum hyper cudarc mpi"

# `nccl` alone is left out: it is `cuda` plus src/dist/nccl.rs, which CI's clippy step lints with
# every feature on, and each CUDA feature set costs a full nvcc build of the kernels.
for f in cli server cuda-sim cuda dlib mpi; do
  echo "-- only $f"
  lint --no-default-features --features "$f"
done
echo "-- defaults"
lint

echo "-- rustdoc (every feature; broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc -q --no-deps --lib --features cuda,cuda-sim,cli,server,dlib,mpi,nccl
