#!/usr/bin/env bash
# Set up, then run AR-OPD on the quickstart (the committed toy base model, toy task) and say where the logs are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/aropd fit --config configs/quickstart.yaml "$@"
