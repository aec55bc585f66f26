#!/usr/bin/env bash
# Issue 28 on MNIST (small-cnn, the committed protocol: cpu profile, 4,000 training digits,
# 8 epochs, PGD-5 step 0.15 training attack). Every stage is resumable: `advbench run` skips
# finished runs and stored rows, so rerunning this script continues where it stopped.
#   RUNS (default /work/runs28)  DATA (default /work/data)
set -euo pipefail
RUNS=${RUNS:-/work/runs28}
DATA=${DATA:-/work/data}
EVAL=(--attacks fgsm,pgd,cw,autoattack --n-examples 100 --launcher local --jobs 2 --no-progress)
run() { advbench run --dataset mnist --data-dir "$DATA" --runs-dir "$RUNS" "${EVAL[@]}" "$@"; }
P='"train_subset": 4000'
# 1. the committed pair again (with checkpoints, for diagnose), then seeds 2-4
run --defenses at,adv-dpnp --seeds 0,1 --hparams "{$P}"
advbench diagnose --n-examples 100 --data-dir "$DATA" \
    --run "$(ls -d "$RUNS"/mnist/at/* | head -1)" --run "$(ls -d "$RUNS"/mnist/adv-dpnp/* | head -1)" || true
run --defenses at,adv-dpnp --seeds 2,3,4 --hparams "{$P}"
# 2. the remedy: a scale-free training attack (deviation from the paper, off by default)
run --defenses adv-dpnp --seeds 0,1,2 --hparams "{$P, \"train_attack_loss\": \"margin\"}"
# 3. one-at-a-time ablations of the full method
for H in '"lambda_dpp": 0.0' '"lambda_dnp": 0.0' '"lambda_dfa": 0.0' '"dual_branch": false' '"alpha": 10.0'; do
    run --defenses adv-dpnp --seeds 0,1,2 --hparams "{$P, $H}"
done
