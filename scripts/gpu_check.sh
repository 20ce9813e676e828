#!/usr/bin/env bash
# The GPU check, for a CUDA machine: in a few minutes (under 10), the GPU-only tests
# (pytest -m gpu), bf16 training speed of the six paper models (DCLS vs baseline, one run), CUDA
# tagging of a 10-minute file and evaluation speed, written to one Markdown file to paste into
# benchmarks/RESULTS.md (benchmarks/gpu_check.py says what each step runs).
#
#   bash scripts/gpu_check.sh [--out gpu_check.md]
#   bash scripts/gpu_check.sh --device cpu --quick      # every step, tiny, on a CPU: checks the check
#
# Python: $PYTHON if set, else .venv/bin/python (bash scripts/setup.sh makes it), else a python3
# that already has the project's dependencies; if none, it runs bash scripts/setup.sh (needs the
# package index; torch from PyPI is the CUDA build). Nothing else is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --device) device=${args[$((i + 1))]:-} ;;
    --device=*) device=${args[$i]#--device=} ;;
  esac
done

usable() { "$1" -c "import torch, timm, webdataset, accelerate, soundfile, soxr, safetensors, pytest" 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && usable .venv/bin/python; then
  PY=.venv/bin/python
elif command -v python3 >/dev/null && usable python3; then
  PY=python3
else
  echo "[gpu_check] no Python with the project's dependencies: bash scripts/setup.sh"
  bash scripts/setup.sh
  PY=.venv/bin/python
fi

if [ "$device" = cuda ]; then
  # Fail fast, with the reason, before anything runs.
  if ! "$PY" - <<'EOF'
import sys
import torch
if torch.cuda.is_available():
    sys.exit(0)
if torch.version.cuda is None:
    why = f"this torch ({torch.__version__}) is a CPU-only build: install the CUDA build for your driver (pytorch.org)"
else:
    why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: no NVIDIA driver, no device visible "
           "(CUDA_VISIBLE_DEVICES, the container's --gpus), or a driver older than the build needs (nvidia-smi)")
print(f"error: no CUDA device: {why}. `bash scripts/gpu_check.sh --device cpu --quick` checks the script on a CPU.",
      file=sys.stderr)
sys.exit(2)
EOF
  then
    exit 2
  fi
fi

echo "[gpu_check] $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
exec "$PY" benchmarks/gpu_check.py "$@"
