#!/usr/bin/env bash
# CLIP tower forward on the CPU, sd2 vs transformers, alternating (sd2, torch, sd2, torch);
# prints the ratio table for BENCHMARKS.md.   scripts/bench-clip.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
threads=$(nproc)
cargo bench --bench clip_forward --no-run
for i in 1 2; do
  cargo bench --bench clip_forward -- --json "target/clip_forward_$i.json" > /dev/null
  "$py" scripts/reference/torch_clip_bench.py --threads "$threads" --save "target/torch_clip_$i.json" > /dev/null
done
echo "sd2 $(git rev-parse --short HEAD 2>/dev/null || echo ?) CLIP forward vs transformers, CPU f32, $threads threads, $(uname -m)"
"$py" scripts/reference/torch_clip_bench.py --threads "$threads" \
  --ours target/clip_forward_1.json target/clip_forward_2.json --torch target/torch_clip_1.json target/torch_clip_2.json
