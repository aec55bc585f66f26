"""TRADES: TRadeoff-inspired Adversarial DEfense via Surrogate-loss minimization.

Paper: Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019, arXiv:1901.08573. Official code: yaodongyu/TRADES (``trades.py``).

Loss (p = softmax, KL summed over classes, mean over the batch)::

    L = CE(f(x), y) + β · mean_i KL(p(x_i) ‖ p(x'_i))

The clean softmax is *not* detached: gradient flows through both p(x) and p(x'), as in the
official ``trades_loss``. Training attack: PGD-l∞ maximising ``KL(p(x) ‖ p(x'))`` from
``x + 0.001·N(0,1)`` (protocol steps and step size); p(x) is computed once per batch with the
model in eval mode and held fixed during the attack.

Hyperparameters:

    ======  =======  ==========================================
    beta    6.0      weight of the KL (robustness) term, 1/λ
    ======  =======  ==========================================

Deviations from the official code:

* the clean logits are computed once per step in train mode and used for both the CE and the
  KL target (the official code runs a second forward pass on x for the KL target, which only
  updates the BatchNorm running statistics one more time);
* the ``normal`` start of ``attacks.pgd.PGD`` projects ``x + 0.001·N(0,1)`` into [0,1] before
  the first gradient step (the official code evaluates the first gradient unclipped);
* β = 6 on every dataset (the benchmark spec); the official ``train_trades_mnist.py`` defaults
  to β = 1.0 (``--hparams '{"beta": 1.0}'`` reproduces it).

Example:
    advbench train --defense trades --dataset cifar10 --profile paper --hparams '{"beta": 6.0}'
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Attack, Objective
from defenses import register_defense
# CleanCache is re-exported for code that imported it from here before it moved to the base
from defenses.base import (CleanCache, Defense, StepOutput, clean_logits_eval,  # noqa: F401
                           detached, kl_attack_objective, kl_per_sample, protocol_pgd)


def trades_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor,
                beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """TRADES loss from clean and adversarial logits.

    Returns:
        (loss, ce, kl): the total and its two batch-mean parts (with graph).
    """
    ce = F.cross_entropy(logits_nat, y)
    kl = kl_per_sample(logits_nat, logits_adv).mean()
    return ce + beta * kl, ce, kl


@register_defense("trades")
class TRADES(Defense):
    """CE on clean data plus β·KL between clean and adversarial predictions."""

    description = "TRADES: CE(f(x)) + β·KL(p(x)‖p(x')) (Zhang et al. 2019)"
    loss_passes = 2  # CE(f(x)) and KL(p(x)‖p(x'))
    paper = "Zhang et al., ICML 2019, arXiv:1901.08573"
    default_hparams = {"beta": 6.0}

    def attack_for_training(self) -> Attack:
        return protocol_pgd(self.threat, self.hparams, "normal")

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        target = clean_logits_eval(model, x)
        x_adv = self.adversarial(model, x, y, loss=kl_attack_objective(target))
        logits_nat, logits_adv = model(x), model(x_adv)
        loss, ce, kl = trades_loss(logits_nat, logits_adv, y, float(self.hparams["beta"]))
        return StepOutput(loss, detached(ce=ce, kl=kl), logits_adv)

    def objective(self) -> Objective:
        """Per-sample ``CE(f(x), y) + β·KL(p(x) ‖ p(x'))`` (clean logits computed once)."""
        cache, beta = CleanCache(), float(self.hparams["beta"])

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            nat = cache(model, x)
            return F.cross_entropy(nat, y, reduction="none") + beta * kl_per_sample(nat, model(x_adv))

        return loss
