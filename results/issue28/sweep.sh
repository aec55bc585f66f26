#!/usr/bin/env bash
# Issue 28 on MNIST (small-cnn, the committed protocol: cpu profile, 4,000 training digits,
# 8 epochs, PGD-5 step 0.15 training attack). A queue of single runs, two at a time (one per
# core, one thread each, so every run repeats bit for bit), ordered seed by seed so that every
# variant has seed 0 before any has seed 2. Every job is resumable: `advbench run` skips finished
# runs and stored rows, so rerunning this script continues where it stopped.
#   RUNS (default /work/runs28)  DATA (default /work/data)  WORKERS (default 2)
set -euo pipefail
RUNS=${RUNS:-/work/runs28}
DATA=${DATA:-/work/data}
WORKERS=${WORKERS:-2}
export OMP_NUM_THREADS=1 RUNS DATA
P='"train_subset": 4000'
jobs() {
    for S in 0 1 2; do
        echo "at $S {$P}"
        echo "adv-dpnp $S {$P}"
        echo "adv-dpnp $S {$P, \"train_attack_loss\": \"margin\"}"      # the remedy (off by default)
        for H in '"lambda_dpp": 0.0' '"lambda_dnp": 0.0' '"lambda_dfa": 0.0' \
                 '"dual_branch": false' '"alpha": 10.0'; do
            echo "adv-dpnp $S {$P, $H}"                                  # one-at-a-time ablations
        done
    done
    for S in 3 4; do echo "at $S {$P}"; echo "adv-dpnp $S {$P}"; done
}
one() {  # "DEFENSE SEED HPARAMS"
    local d s h; read -r d s h <<< "$1"
    advbench run --dataset mnist --data-dir "$DATA" --runs-dir "$RUNS" --launcher serial \
        --attacks fgsm,pgd,cw,autoattack --n-examples 100 --no-progress \
        --defenses "$d" --seeds "$s" --hparams "$h" > /dev/null || echo "FAILED: $d $s $h" >&2
}
export -f one
jobs | xargs -d '\n' -n 1 -P "$WORKERS" bash -c 'one "$1"' _
