#!/usr/bin/env bash
# Runs the CPU benchmark and the PyTorch reference on the same machine, one after the other,
# and prints the ratio table that goes into BENCHMARKS.md.
#   scripts/bench-cpu.sh [PYTHON]   (PYTHON: an interpreter with torch; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
cargo bench --bench cpu_ops -- --json target/cpu_ops.json
"$py" scripts/reference/torch_cpu_bench.py --ours target/cpu_ops.json --threads "$(nproc)"
