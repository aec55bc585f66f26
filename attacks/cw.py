"""C&W-∞: PGD on the Carlini–Wagner margin loss inside the ε-ball.

Paper: Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
arXiv:1608.04644 — the margin ("f6") objective; run, as adversarial-training papers
(TRADES, MART, FAT, Adv-DPNP Table 2) do, as a fixed-ε PGD attack rather than C&W's
minimum-norm optimisation.

Objective maximised by PGD (per sample)::

    L_cw(x') = −max(z_y(x') − max_{k≠y} z_k(x') + κ, 0)

so the attack pushes the true logit below the best other logit by a margin κ; the gradient
vanishes once a sample is misclassified with margin κ.

Hyperparameters (keyword-only; the PGD ones are inherited):

    =============  =========  ===================================================
    kappa          50         confidence margin κ (Adv-DPNP §4.2: 50)
    steps          30         PGD iterations (Adv-DPNP §4.2: 30)
    rel_step_size  0.1        α = ε/10
    random_start   "uniform"  as :class:`~attacks.pgd.PGD`
    =============  =========  ===================================================

Deviation from the widespread ``cwloss`` of the FAT/MART evaluation code: the other-class
maximum masks the true class with −inf instead of subtracting 10⁴ from its logit (identical
unless a logit is below −10⁴); the loss is per sample instead of summed (same gradient).

Example:
    >>> x_adv = CW(ThreatModel(Norm.LINF, 8 / 255), seed=0)(model, x, y)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Norm, Objective, ce_objective
from attacks.pgd import PGD
from benchmark.errors import UsageError


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample ``z_y − max_{k≠y} z_k``."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return true - other


def cw_objective(kappa: float) -> Objective:
    """The C&W margin objective ``−max(margin + κ, 0)`` as an attack objective."""

    def objective(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return -torch.clamp(margin(model(x_adv), y) + kappa, min=0)

    return objective


@register_attack("cw")
class CW(PGD):
    """PGD on the C&W margin loss with confidence κ (C&W-∞ in the l∞ ball)."""

    description = "C&W-inf: PGD on the margin loss with confidence kappa (Carlini & Wagner 2017)"
    supported_norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    default_hparams = {**PGD.default_hparams, "steps": 30, "rel_step_size": 0.1, "kappa": 50.0}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        if loss is not ce_objective:
            raise UsageError("the cw attack optimises its own margin loss; it takes no objective")
        return super().perturb(model, x, y, loss=cw_objective(float(self.hparams["kappa"])))
