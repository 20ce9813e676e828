#!/usr/bin/env bash
# Fresh machine -> everything installed (.venv) -> the built-in example run end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" PYTHON="$PWD/.venv/bin/python"
exec bash scripts/example.sh "$@"
