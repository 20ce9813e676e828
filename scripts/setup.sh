#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev extras, pinned by constraints.txt.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "[setup] installing audioset-dcls and its dependencies (first run: about 2 minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
echo "[setup] ready: $(.venv/bin/python -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")')"
