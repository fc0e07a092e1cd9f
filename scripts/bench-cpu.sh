#!/usr/bin/env bash
# Runs the CPU benchmark and the PyTorch reference alternately on the same machine (sd2, torch,
# sd2, torch), and prints the ratio table that goes into BENCHMARKS.md: each side's time per
# op is its best over its runs.
#   scripts/bench-cpu.sh [PYTHON]   (PYTHON: an interpreter with torch; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
threads=$(nproc)
cargo bench --bench cpu_ops --no-run
for i in 1 2; do
  cargo bench --bench cpu_ops -- --json "target/cpu_ops_$i.json" > /dev/null
  "$py" scripts/reference/torch_cpu_bench.py --threads "$threads" --save "target/torch_cpu_$i.json" > /dev/null
done
echo "sd2 $(git rev-parse --short HEAD 2>/dev/null || echo ?) CPU reference backend vs PyTorch, f32, $threads threads, $(uname -m)"
"$py" scripts/reference/torch_cpu_bench.py --threads "$threads" \
  --ours target/cpu_ops_1.json target/cpu_ops_2.json --torch target/torch_cpu_1.json target/torch_cpu_2.json
