#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc + nvvm + headers, from PyPI wheels, ~300 MB) into a
# venv and prints the nvcc path on the last line. Idempotent: an existing, complete install is
# reused. The pins matter: a newer nvvm emits PTX the device machines' driver (580, CUDA 13.0)
# rejects (../shared/GPU.md).
#
#   scripts/install-cuda-toolchain.sh [VENV_DIR]      # default: .cuda-toolchain at the repo root
#   export NVCC=$(scripts/install-cuda-toolchain.sh | tail -1)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${SD2_CUDA_TOOLCHAIN:-$root/.cuda-toolchain}}"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
find_nvcc() {
  "$venv/bin/python" - <<'PY' 2>/dev/null
import os, nvidia
base = os.path.dirname(nvidia.__path__[0]) if hasattr(nvidia, "__path__") else None
for p in nvidia.__path__:
    cand = os.path.join(p, "cu13", "bin", "nvcc")
    if os.path.isfile(cand):
        print(cand)
        break
PY
}
stamp="$venv/.sd2-pins"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
  nvcc="$(find_nvcc || true)"
  if [[ -n "$nvcc" && -x "$nvcc" ]]; then
    echo "$nvcc"
    exit 0
  fi
fi
python="${PYTHON:-python3}"
echo "installing the pinned CUDA 13.0 toolchain into $venv" >&2
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
nvcc="$(find_nvcc || true)"
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
  echo "error: nvcc not found in $venv after installing ${pins[*]}" >&2
  exit 1
fi
echo "${pins[*]}" > "$stamp"
"$nvcc" --version | tail -2 >&2
echo "$nvcc"
