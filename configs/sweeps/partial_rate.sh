#!/usr/bin/env bash
# Partial-rate sweep: AR-OPD (λ = 0.8, c = 5) on math with the paper's settings
# (configs/recipes/math.yaml + configs/methods/ar_opd.yaml) at ρ ∈ {0.25, 0.5, 0.75}, the fraction of
# the reference reasoning in the partial (anchor) view: three runs in
# runs/partial_rate/partial_ratio=<ρ>/, then runs/partial_rate/table.md.
#   bash configs/sweeps/partial_rate.sh --dry-run
#   bash configs/sweeps/partial_rate.sh --slurm --partition gpu --account my-project --time 48:00:00 [--submit]
#   bash configs/sweeps/partial_rate.sh --slurm ... --table-only   # the table, once the jobs have finished
# Extra arguments go to scripts/sweep.py (see its --help); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" scripts/sweep.py --name partial_rate \
  --config configs/recipes/math.yaml --config configs/methods/ar_opd.yaml \
  --grid data.init_args.partial_ratio=0.25,0.5,0.75 \
  "$@"
