#!/usr/bin/env bash
# Issue 28 on MNIST (small-cnn, the committed protocol: cpu profile, 4,000 training digits,
# 8 epochs, PGD-5 step 0.15 training attack). A queue of single runs, two at a time (one per
# core, one thread each, so every run repeats bit for bit): AT and the full method first, then
# every variant at seed 0 before any variant at seed 1. Every job is resumable: `advbench run` skips finished
# runs and stored rows, so rerunning this script continues where it stopped.
#   RUNS (default /work/runs28)  DATA (default /work/data)  WORKERS (default 2)
set -euo pipefail
command -v advbench > /dev/null || { echo "sweep.sh: advbench is not on PATH (activate the venv)" >&2; exit 2; }
RUNS=${RUNS:-/work/runs28}
DATA=${DATA:-/work/data}
WORKERS=${WORKERS:-2}
export OMP_NUM_THREADS=1 RUNS DATA
P='"train_subset": 4000'
PAPER='"train_attack_steps": 40, "train_step_size": 0.01'
jobs() {
    local S H D
    # the central comparison first (AT vs the full method, 5 seeds), then the remedy and the
    # ablations at seed 0, then their seeds 1 and 2
    for S in 0 1 2; do echo "at $S {$P}"; echo "adv-dpnp $S {$P}"; done
    # the paper's MNIST training attack (PGD-40, step 0.01) instead of the cpu profile's PGD-5
    # (step 0.15): does Adv-DPNP's PGD-AutoAttack gap come from the coarse training attack? (seeds 0
    # and 1 here; seed 2, ~7x the cost of a PGD-5 run, last)
    for S in 0 1; do for D in at adv-dpnp; do echo "$D $S {$P, $PAPER}"; done; done
    echo "adv-dpnp 0 {$P, \"train_attack_loss\": \"margin\"}"        # the remedy (off by default)
    ABL=('"lambda_dpp": 0.0' '"lambda_dnp": 0.0' '"lambda_dfa": 0.0' '"dual_branch": false'
         '"alpha": 10.0')                                                 # one-at-a-time ablations
    for H in "${ABL[@]}"; do echo "adv-dpnp 0 {$P, $H}"; done
    # all three extra terms off: L = (CE(x) + CE(x'))/2 on the prototype head (what is left of eq. 7)
    NONE='"lambda_dpp": 0.0, "lambda_dnp": 0.0, "lambda_dfa": 0.0'
    for S in 0 1 2; do echo "adv-dpnp $S {$P, $NONE}"; done
    # and without the clean term either: Madry AT on the prototype head (is it the head or the
    # clean half of the loss that costs robustness against AT?)
    HEAD='"clean_branch": false, "dual_branch": false'
    for S in 0 1 2; do echo "adv-dpnp $S {$P, $NONE, $HEAD}"; done
    for S in 3 4; do echo "at $S {$P}"; echo "adv-dpnp $S {$P}"; done
    for S in 1 2; do
        echo "adv-dpnp $S {$P, \"train_attack_loss\": \"margin\"}"
        for H in "${ABL[@]}"; do echo "adv-dpnp $S {$P, $H}"; done
    done
    # the same control with prototypes that learn: lr × α for C, the step a linear head's row
    # gets (CE's gradient on C is α times smaller); is it the frozen random head?
    for S in 0 1; do echo "adv-dpnp $S {$P, $NONE, $HEAD, \"prototype_lr_scale\": 40.0}"; done
    for D in at adv-dpnp; do echo "$D 2 {$P, $PAPER}"; done
}
one() {  # "DEFENSE SEED HPARAMS"
    local d s h; read -r d s h <<< "$1"
    advbench run --dataset mnist --data-dir "$DATA" --runs-dir "$RUNS" --launcher serial \
        --attacks fgsm,pgd,cw,autoattack --n-examples 100 --no-progress \
        --defenses "$d" --seeds "$s" --hparams "$h" > /dev/null || echo "FAILED: $d $s $h" >&2
}
export -f one
# jobs another worker is running now (resuming a killed queue): "DEFENSE SEED HPARAMS" lines
IFS=$'\n' read -r -d '' -a SKIP <<< "${SKIP_JOBS:-}" || true
jobs | grep -vxF -f <(printf "%s\n" "${SKIP[@]}") | xargs -d '\n' -n 1 -P "$WORKERS" bash -c 'one "$1"' _
