#!/usr/bin/env bash
# Issue 28, item 1: Figure 2 as the paper trained it (LeNets++, MNIST, training attack PGD-l_inf
# eps 0.3, step 0.01, 40 iterations). Budget cut (training points and epochs, never the
# attack): 10,000 digits, 5 epochs (2 clean, eps ramped over 2, 1 at full eps; lr x0.1 at 4).
# advbench bench (1 thread, this machine): AT 7.03, Adv-DPNP 7.16 training images per CPU-s
# with PGD-40, i.e. about 1,430 CPU-s per adversarial epoch of 10,000 digits per model.
# Resumable: training resumes from the last finished epoch, evaluation reuses stored rows.
set -euo pipefail
DATA=${DATA:-/work/data}
RUNS=${RUNS:-results/runs}
H='{"train_subset": 10000, "epochs": 5, "lr_milestones": [4], "clean_epochs": 2, "eps_warmup_epochs": 2, "train_attack_steps": 40, "train_step_size": 0.01}'
train() { advbench train --defense "$1" --dataset mnist --data-dir "$DATA" --arch lenets++ \
              --profile cpu --runs-dir "$RUNS" --no-progress --hparams "$H" | tail -1; }
if [ "${1:-}" != "--eval-only" ]; then
    train at & train adv-dpnp & wait   # one model per core
fi
AT=$(train at); DPNP=$(train adv-dpnp)   # prints the finished run folders
ev() { advbench evaluate --run "$1" --data-dir "$DATA" --no-progress "${@:2}"; }
(ev "$AT" --attacks fgsm,pgd,pgd20 --n-examples 500; ev "$AT" --attacks autoattack --n-examples 100) &
(ev "$DPNP" --attacks fgsm,pgd,pgd20 --n-examples 500; ev "$DPNP" --attacks autoattack --n-examples 100) &
wait
advbench diagnose --run "$AT" --n-examples 100 --data-dir "$DATA" > /dev/null &
advbench diagnose --run "$DPNP" --n-examples 100 --data-dir "$DATA" > /dev/null &
wait
advbench diagnose --run "$AT" --run "$DPNP" --n-examples 100 --data-dir "$DATA" --json results/issue28/diagnose_lenets.json
advbench figure2 --at "$AT" --adv-dpnp "$DPNP" --n-examples 1000 --data-dir "$DATA" --out results/plots/figure2.png
