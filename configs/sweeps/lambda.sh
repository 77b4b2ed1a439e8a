#!/usr/bin/env bash
# λ sweep: AR-OPD on math with the paper's settings (configs/recipes/math.yaml + configs/methods/ar_opd.yaml)
# at λ ∈ {0.4, 0.6, 0.8, 1.0, 1.2, 1.4} (model.init_args.target.init_args.lam; c stays 5): six runs in
# runs/lambda/lam=<λ>/, then runs/lambda/table.md. The paper's λ variants are 0.6, 0.8 and 1.2 of them.
#   bash configs/sweeps/lambda.sh --dry-run      # list the runs and their commands
#   bash configs/sweeps/lambda.sh --slurm --partition gpu --account my-project --time 48:00:00 [--submit]
#   bash configs/sweeps/lambda.sh --slurm ... --table-only   # the table, once the jobs have finished
#   bash configs/sweeps/lambda.sh                # one after another on this machine (2 x 8 GPUs per run as
#                                                # in the recipe: --set trainer.num_nodes=1
#                                                # --set trainer.accumulate_grad_batches=32 for one 8-GPU node)
# Extra arguments go to scripts/sweep.py (see its --help); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" scripts/sweep.py --name lambda \
  --config configs/recipes/math.yaml --config configs/methods/ar_opd.yaml \
  --grid model.init_args.target.init_args.lam=0.4,0.6,0.8,1.0,1.2,1.4 \
  "$@"
