#!/usr/bin/env bash
# The loader side by side with PyTorch's DataLoader + torchvision on the same machine, the same
# 224 px JPEG images and the same core counts (sd2's rayon threads = torch's worker
# processes), each run twice alternately and its best kept; prints the table that goes into
# BENCHMARKS.md.
#   scripts/bench-loader.sh PYTHON [IMAGES]   (PYTHON: an interpreter with torch + torchvision)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?give a python with torch and torchvision}
n=${2:-2048}
data=target/bench-loader-jpeg
cargo build --release --quiet
sd2=target/release/sd2
[ -f "$data/manifest.jsonl" ] || "$sd2" synth --out "$data" --n "$n" --size 224 --jpeg 90 > /dev/null
cores=(1)
[ "$(nproc)" -ge 2 ] && cores+=(2)
[ "$(nproc)" -ge 4 ] && cores+=(4)
[ "$(nproc)" -ge 8 ] && cores+=(8)
[ "$(nproc)" -ge 16 ] && cores+=(16)
for c in "${cores[@]}"; do
  for i in 1 2; do
    RAYON_NUM_THREADS=$c "$sd2" bench loader --manifest "$data/manifest.jsonl" --limit "$n" \
      --json "target/loader_sd2_${c}_$i.json" > /dev/null
    "$py" scripts/reference/torch_loader_bench.py --manifest "$data/manifest.jsonl" \
      --workers "$c" --limit "$n" --json "target/loader_torch_${c}_$i.json" > /dev/null
  done
done
"$py" - "${cores[@]}" <<'PY'
import json, sys
best = lambda who, c, case: max(
    next(t["images_per_s"] for t in json.load(open(f"target/loader_{who}_{c}_{i}.json"))["timings"]
         if t["case"] == case) for i in (1, 2))
tv = json.load(open(f"target/loader_torch_{sys.argv[1]}_1.json"))
print(f"torch {tv['torch']}, torchvision {tv['torchvision']}; images/s, best of 2")
print("| cores | decode + preprocess: sd2 | torch | ratio | + augmentations: sd2 | torch | ratio | sd2 per core |")
print("|---|---|---|---|---|---|---|---|")
for c in sys.argv[1:]:
    row = [c]
    for case in ("decode + preprocess", "+ train augmentations"):
        a, b = best("sd2", c, case), best("torch", c, case)
        row += [f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.2f}×"]
    row.append(f"{best('sd2', c, '+ train augmentations') / int(c):,.0f}")
    print("| " + " | ".join(row) + " |")
PY
