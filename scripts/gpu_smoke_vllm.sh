#!/usr/bin/env bash
# GPU smoke test of the vLLM rollout engine: one command, a few minutes, on a machine with one NVIDIA
# GPU (H100/H200) and network access:
#   bash scripts/gpu_smoke_vllm.sh            # extra arguments go to scripts/gpu_smoke_vllm.py
# It brings its own wheels: a venv (.venv-gpu) with the CUDA build of vllm (which pins its own torch,
# so a preinstalled torch is not reused), then aropd, editable. VLLM_VERSION picks another vllm.
#
# Expected output (figures vary by GPU; the checks are the contract):
#   ok   greedy parity with HFGenerate: 8/8 rows
#   ok   sampled log-probs vs a teacher-forced forward: max |gap| <1e-4 (fp32)
#   ok   sync parity, stale control: synced 8/8 equal the perturbed model, stale 0-2/8
#        G=8: vLLM ... tok/s, LeanDecode ... tok/s      (and G=32, G=64)
#   ok   throughput measured: one weight sync ... s
#   ok   sleep frees GPU memory: free ... GiB asleep, ... GiB awake
#   ok   3-step fit: losses [...], gap max <1e-3
#   {... the figures as JSON ...}
#   GPU SMOKE OK
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm==${VLLM_VERSION:-0.32.0}"
"$VENV/bin/pip" install -q -e ".[test]"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" scripts/gpu_smoke_vllm.py "$@"
