"""MART: Misclassification-Aware adveRsarial Training.

Paper: Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified
Examples", ICLR 2020, https://openreview.net/forum?id=rklOg6EFwS. Official code:
YisenWang/MART (``mart.py``, ``train_wideresnet.py``, ``train_resnet.py``).

Loss (p = softmax of f(x), p' = softmax of f(x'), per-sample terms averaged over the batch)::

    BCE_i = CE(f(x'_i), y_i) − log(1.0001 − max_{k≠y_i} p'_{i,k} + 1e-12)
    KL_i  = Σ_k p_{i,k} (log p_{i,k} − log(p'_{i,k} + 1e-12))
    L     = mean_i BCE_i + β · mean_i [ KL_i · (1.0000001 − p_{i,y_i}) ]

Gradient flows through p (both inside the KL and in the weight 1 − p_y), as in the official
code. The numerical constants (1.0001, 1e-12, 1.0000001) are the official ones.

Training attack: PGD-l∞ on CE of the eval logits (the protocol's attack).

Hyperparameters:

    ============  =========  ====================================================
    beta          6.0        weight of the misclassification-aware KL term
                             (5.0 for ResNet-18, as in the official train_resnet.py)
    attack_start  "uniform"  PGD random start: "uniform" (protocol) or "normal"
                             (x + 0.001·N(0,1), the official MART code)
    ============  =========  ====================================================

Deviations from the official code: the training attack starts uniformly in the ε-ball (the
common protocol of this benchmark) instead of at ``x + 0.001·N(0,1)``; set
``attack_start="normal"`` to reproduce the official start. The rival class ``max_{k≠y} p'_k``
is taken by masking the true class (the official code uses an argsort of the top two, which
differs only on exact ties).

Example:
    advbench train --defense mart --dataset cifar10 --arch resnet18 --profile paper
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Objective
from defenses import register_defense
from defenses.base import CleanCache, Defense, StepOutput, detached


def mart_terms(logits_nat: Tensor, logits_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample MART parts: (BCE_i, KL_i · (1.0000001 − p_y(x_i)))."""
    p_adv = F.softmax(logits_adv, dim=1)
    rival = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), float("-inf")).amax(1)
    bce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(1.0001 - rival + 1e-12)
    p_nat = F.softmax(logits_nat, dim=1)
    kl = (torch.xlogy(p_nat, p_nat) - p_nat * torch.log(p_adv + 1e-12)).sum(1)
    true_prob = p_nat.gather(1, y[:, None]).squeeze(1)
    return bce, kl * (1.0000001 - true_prob)


def mart_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor,
              beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """MART loss from clean and adversarial logits.

    Returns:
        (loss, bce, weighted_kl): the total and its two batch-mean parts (with graph).
    """
    bce, wkl = mart_terms(logits_nat, logits_adv, y)
    return bce.mean() + beta * wkl.mean(), bce.mean(), wkl.mean()


@register_defense("mart")
class MART(Defense):
    """Boosted CE on x' plus a KL term weighted by the clean misclassification probability."""

    description = "MART: BCE(f(x')) + β·KL(p(x)‖p(x'))·(1−p_y(x)) (Wang et al. 2020)"
    loss_passes = 2  # BCE(f(x')) and KL with p(x)
    paper = "Wang et al., ICLR 2020, openreview rklOg6EFwS"
    default_hparams = {"beta": 6.0, "attack_start": "uniform"}
    arch_hparams = {"resnet18": {"beta": 5.0}, "preact-resnet18": {"beta": 5.0}}

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        x_adv = self.adversarial(model, x, y)
        logits_nat, logits_adv = model(x), model(x_adv)
        loss, bce, wkl = mart_loss(logits_nat, logits_adv, y, float(self.hparams["beta"]))
        return StepOutput(loss, detached(bce=bce, kl_weighted=wkl), logits_adv)

    def objective(self) -> Objective:
        """Per-sample ``BCE_i + β·KL_i·(1 − p_y(x_i))`` (clean logits computed once per batch)."""
        cache, beta = CleanCache(), float(self.hparams["beta"])

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            bce, wkl = mart_terms(cache(model, x), model(x_adv), y)
            return bce + beta * wkl

        return loss
