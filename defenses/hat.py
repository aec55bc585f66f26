"""HAT: Helper-based Adversarial Training (TRADES + helper examples).

Paper: Rade and Moosavi-Dezfooli, "Reducing Excessive Margin to Achieve a Better Accuracy vs.
Robustness Trade-off", ICLR 2022, https://openreview.net/forum?id=Azh9QBQ4tR7 (workshop version:
"Helper-based Adversarial Training", ICML 2021 AdvML). Official code: imrahulr/hat
(``core/utils/hat.py::hat_loss``, ``core/utils/parser.py``).

Loss (p = softmax, KL summed over classes and averaged over the batch)::

    x_h = x + h · (x' − x)                     (not clipped to [0,1], as in the official code)
    ŷ_h = argmax f_std(x')                     (the standard-trained helper, eval mode, no grad)
    L   = CE(f(x), y) + β · KL(p(x) ‖ p(x')) + γ · CE(f(x_h), ŷ_h)

Training attack: the TRADES attack (PGD-l∞ maximising ``KL(p(x) ‖ p(x'))`` from
``x + 0.001·N(0,1)``, p(x) computed once per batch in eval mode). The helper model is the
``st`` run of the same dataset/arch/profile/seed (``requires = ("st",)``); the harness trains or
reuses it and passes it to :meth:`setup`. It is held as a plain attribute, never registered as a
submodule of the trained model, so it is neither optimised nor saved in its checkpoints.

Hyperparameters:

    =====  =====  ======================================================
    beta   2.5    weight of the TRADES KL term (README, CIFAR-10)
    gamma  0.5    weight of the helper CE term
    h      2.0    extrapolation factor of the helper examples (parser default)
    =====  =====  ======================================================

Deviations from the official code: none in the loss (the PGD start caveat of
``defenses.trades`` applies: ``x + 0.001·N(0,1)`` is projected into [0,1] before the first
step). The adaptive-attack objective (:meth:`objective`) includes the helper term only when a
helper was given; after loading a checkpoint for evaluation (no :meth:`setup`) it is the
TRADES part alone.

Example:
    advbench run --defenses hat --dataset cifar10   # trains (or reuses) the st run first
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Attack, Objective, model_mode
from benchmark.errors import UsageError
from defenses import register_defense
from defenses.base import (CleanCache, Defense, StepOutput, clean_logits_eval, detached,
                           kl_attack_objective, kl_per_sample, protocol_pgd)

logger = logging.getLogger(__name__)


def helper_labels(helper: nn.Module, x_adv: Tensor) -> Tensor:
    """``argmax f_std(x')`` with the helper in eval mode and no graph."""
    with torch.no_grad(), model_mode(helper, train=False):
        return helper(x_adv).argmax(1)


def hat_loss(logits_nat: Tensor, logits_adv: Tensor, logits_help: Tensor, y: Tensor,
             y_help: Tensor, *, beta: float, gamma: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``CE(z, y) + β·KL(p(x)‖p(x')) + γ·CE(z_h, ŷ_h)``; returns (loss, ce, kl, ce_help)."""
    ce = F.cross_entropy(logits_nat, y)
    kl = kl_per_sample(logits_nat, logits_adv).mean()
    ce_help = F.cross_entropy(logits_help, y_help)
    return ce + beta * kl + gamma * ce_help, ce, kl, ce_help


@register_defense("hat")
class HAT(Defense):
    """TRADES plus CE on extrapolated helper examples labelled by a standard model."""

    description = "HAT: TRADES + γ·CE(f(x+h(x'−x)), argmax f_std(x')) (Rade & Moosavi-Dezfooli)"
    loss_passes = 3  # f(x), f(x') and f(x + h(x'−x)); the st helper run is counted apart
    paper = "Rade and Moosavi-Dezfooli, ICLR 2022, openreview Azh9QBQ4tR7"
    default_hparams = {"beta": 2.5, "gamma": 0.5, "h": 2.0}
    requires = ("st",)

    def __init__(self, hparams: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(hparams, **kwargs)
        self._helper: Optional[nn.Module] = None

    def setup(self, helpers: Mapping[str, nn.Module]) -> None:
        if "st" not in helpers:
            raise UsageError(f"hat needs the trained 'st' model as helper; got {sorted(helpers)}")
        self._helper = helpers["st"]

    def attack_for_training(self) -> Attack:
        return protocol_pgd(self.threat, self.hparams, "normal")

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        if self._helper is None:
            raise UsageError("hat: no helper model; call defense.setup({'st': model}) with a "
                             "standard-trained model of the same arch before training")
        target = clean_logits_eval(model, x)
        x_adv = self.adversarial(model, x, y, loss=kl_attack_objective(target))
        x_help = x + float(self.hparams["h"]) * (x_adv - x)
        y_help = helper_labels(self._helper, x_adv)
        logits_nat, logits_adv, logits_help = model(x), model(x_adv), model(x_help)
        loss, ce, kl, ce_help = hat_loss(logits_nat, logits_adv, logits_help, y, y_help,
                                         beta=float(self.hparams["beta"]),
                                         gamma=float(self.hparams["gamma"]))
        return StepOutput(loss, detached(ce=ce, kl=kl, ce_help=ce_help), logits_adv)

    def objective(self) -> Objective:
        """Per-sample HAT loss on x' (helper term only when a helper was set up)."""
        cache = CleanCache()
        beta, gamma, h = (float(self.hparams[k]) for k in ("beta", "gamma", "h"))
        helper = self._helper
        if helper is None:
            logger.info("hat objective without a helper model: TRADES part only")

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            nat = cache(model, x)
            out = F.cross_entropy(nat, y, reduction="none") + beta * kl_per_sample(nat, model(x_adv))
            if helper is not None:
                out = out + gamma * F.cross_entropy(model(x + h * (x_adv - x)),
                                                    helper_labels(helper, x_adv), reduction="none")
            return out

        return loss
