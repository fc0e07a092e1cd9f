#!/usr/bin/env bash
# Creates the Python venv the reference scripts use (torch, transformers, open_clip_torch, peft).
# Idempotent. Prints the interpreter path.   scripts/reference/setup_venv.sh [DIR]
set -euo pipefail
dir=${1:-"$(cd "$(dirname "$0")/../.." && pwd)/.venv-ref"}
if [ ! -x "$dir/bin/python" ]; then
  python3 -m venv "$dir"
fi
"$dir/bin/pip" install -q --disable-pip-version-check torch numpy transformers open_clip_torch ftfy pillow safetensors peft
echo "$dir/bin/python"
