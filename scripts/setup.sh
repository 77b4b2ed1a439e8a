#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU torch wheel and aropd (editable).
# Called by scripts/quickstart.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: an open range with nothing installed would pull a multi-GB CUDA build.
# GPU users: install the torch build for your CUDA first; this line then does nothing.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[test]"
