#!/usr/bin/env bash
# Regenerates tests/fixtures/parity_tiny: a tiny random HF CLIP (clip/), an SD2 checkpoint
# `sd2 train` trained on it with LoRA and CLAM (checkpoint/), two face crops, and the
# reference dumps of scripts/reference/dump_reference.py in float32 and bfloat16.
#
#   scripts/reference/make_parity_fixture.sh [PYTHON]
#
# PYTHON: a Python with torch, transformers, peft and pillow (scripts/reference/setup_venv.sh
# makes one; default /tmp/pyref/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-/tmp/pyref/bin/python}"
OUT=tests/fixtures/parity_tiny
WORK=target/parity-fixture
rm -rf "$OUT" "$WORK"
mkdir -p "$OUT" "$WORK"

"$PY" scripts/reference/make_tiny_clip.py "$OUT/clip"
cargo run --release -q -- synth --out "$WORK/data" --n 64 --size 48 --jpeg 90
cargo run --release -q -- train --preset vit-l14 \
  --set clip=\""$OUT/clip"\" \
  --set manifest=\""$WORK/data/manifest.jsonl"\" --set out=\""$WORK/run"\" \
  --set epochs=1 --set sd2.clam_heads=2 --set sd2.lora.rank=4 --set sd2.lora.alpha=8 \
  --set train.micro_batch=16 --set train.effective_batch=16 --set train.lr=1e-2 \
  --set train.warmup_frac=0.0 --set dtype=\"f32\"
mkdir -p "$OUT/checkpoint"
cp "$WORK/run/checkpoints/last/state.json" "$WORK/run/checkpoints/last/trainable.safetensors" \
  "$OUT/checkpoint/"
# The first two synthetic face crops, for the preprocessing comparison.
n=0
while read -r line && [ "$n" -lt 2 ]; do
  img=$(printf '%s' "$line" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["path"])')
  cp "$WORK/data/$img" "$OUT/face$n.jpg"
  n=$((n + 1))
done < "$WORK/data/manifest.jsonl"

# Image paths are recorded as given: run from the fixture folder so they resolve beside it.
(
  cd "$OUT"
  for dt in float32 bfloat16; do
    "$PY" ../../../scripts/reference/dump_reference.py --model clip --checkpoint checkpoint \
      --images face0.jpg face1.jpg --dtype "$dt" --out "reference_$dt.safetensors"
  done
)
du -sh "$OUT"
