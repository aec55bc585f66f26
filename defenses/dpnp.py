"""DPNP: deep positive-negative prototypes on clean data only (no adversarial branch).

Paper: R. Zarei-Sabzevar, A. Harati, "A Deep Positive-Negative Prototype Approach to Integrated
Prototypical Discriminative Learning", arXiv:2501.02477 — the clean-training predecessor of
Adv-DPNP (arXiv:2504.03782, ref. [49]), offered as a cheap baseline (SPEC §3).

Model: identical to ``adv-dpnp`` (:class:`defenses.adv_dpnp.PrototypeHead`): logits
``z = f·Cᵀ/α``, prototypes renormalised to ``‖c_j‖ = α`` at the start of every epoch.

Loss (eq. 3 and 5 of arXiv:2504.03782 without the adversarial terms)::

    L = λ_DNP·DNP(C) + mean_i DPP(x_i, y_i; C)
    DPP(x, y; C) = CE(z, y) + (λ_DPP/2)·‖f(x) − c_y‖²
    DNP(C) = −(1/M) Σ_j Σ_i (|c_{j,i} − c_{n(j),i}| + g)^{1/2},  n(j) the nearest rival (l2)

Hyperparameters:

    ==========  ==========  ===================================================
    alpha       40          hypersphere radius α
    lambda_dpp  0.1         prototype-alignment weight (0.3 CIFAR-100)
    lambda_dnp  0.1         DNP weight (3 for CIFAR-100)
    dnp_guard   1e-12       g, the DNP square root's guard at a zero gap
    select_by   val_clean   best checkpoint by clean validation accuracy (no AT)
    ==========  ==========  ===================================================

Deviations: the common protocol replaces the DPNP paper's own training recipe, and the λ
defaults are Adv-DPNP's (no DPNP code is public and its paper's per-dataset values were not
checked here); no adversarial examples are generated at all. The adaptive-attack objective is
the per-sample DPP(x').

Example:
    advbench train --defense dpnp --dataset mnist5k --profile cpu
"""
from __future__ import annotations

from torch import Tensor, nn

from attacks.base import Objective
from defenses import register_defense
from defenses.adv_dpnp import (SQRT_GUARD, PrototypeDefense, dnp, dpp, prototype_head,
                               prototype_logits)
from defenses.base import StepOutput, detached


def dpnp_loss(features: Tensor, y: Tensor, prototypes: Tensor, *, alpha: float,
              lambda_dpp: float, lambda_dnp: float,
              dnp_guard: float = SQRT_GUARD) -> tuple[Tensor, dict[str, Tensor]]:
    """``λ_DNP·DNP(C) + mean DPP(x)``; returns the loss and its (attached) parts."""
    dpp_clean = dpp(features, y, prototypes, alpha=alpha, lambda_dpp=lambda_dpp).mean()
    repel = dnp(prototypes, dnp_guard)
    return lambda_dnp * repel + dpp_clean, {"dpp_clean": dpp_clean, "dnp": repel}


@register_defense("dpnp")
class DPNP(PrototypeDefense):
    """Clean-only DPNP: DPP + DNP, no adversarial examples."""

    description = "deep positive-negative prototypes, clean training (Adv-DPNP without AT)"
    uses_training_attack = False  # clean DPP + DNP only
    paper = "Zarei-Sabzevar & Harati, arXiv:2501.02477"
    default_hparams = {"alpha": 40.0, "lambda_dpp": 0.1, "lambda_dnp": 0.1,
                       "dnp_guard": SQRT_GUARD, "select_by": "val_clean"}
    dataset_hparams = {"cifar100": {"lambda_dpp": 0.3, "lambda_dnp": 3.0}}

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        head = prototype_head(model)
        features = model.features(x)
        loss, parts = dpnp_loss(features, y, head.prototypes,
                                **self._weights("lambda_dpp", "lambda_dnp", "dnp_guard"))
        logits = prototype_logits(features.detach(), head.prototypes.detach(), head.alpha)
        return StepOutput(loss, detached(**parts), logits)

    def objective(self) -> Objective:
        """Per-sample ``DPP(x')``: the x'-dependent part of the training loss."""
        kw = self._weights("lambda_dpp")

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return dpp(model.features(x_adv), y, prototype_head(model).prototypes, **kw)

        return loss
