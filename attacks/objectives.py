"""Per-sample attack objectives by name: cross-entropy and two that softmax saturation cannot
weaken, for the training attack's ``train_attack_loss`` and the issue-28 diagnostics.

* ``ce``: ``CE(z, y)`` (every adversarial-training paper's training attack).
* ``margin``: ``max_{k≠y} z_k − z_y`` (Carlini & Wagner's f6 without the clip at −κ): its
  gradient is the difference of two logit gradients and never vanishes with confidence.
* ``dlr``: ``−(z_y − max_{k≠y} z_k) / (z_π1 − z_π3 + 1e-12)`` (Croce & Hein 2020, eq. 6,
  the untargeted DLR of APGD-DLR; needs at least 3 classes): also invariant to the scale of
  the logits.

A sign-gradient attack (PGD-l∞) only reads the sign of the input gradient, so it is hurt by
saturation only where the CE gradient underflows to exactly 0; the margin and DLR objectives
test that directly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks.base import Objective, ce_objective
from benchmark.errors import UsageError


def margin_gap(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample ``max_{k≠y} z_k − z_y`` (positive exactly when ``y`` is not predicted)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return other - true


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample untargeted DLR loss (to be maximised), Croce & Hein 2020 eq. (6)."""
    if logits.shape[1] < 3:
        raise UsageError("the dlr objective needs at least 3 classes")
    top = logits.sort(dim=1, descending=True).values
    return margin_gap(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def margin_objective(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Objective form of :func:`margin_gap`."""
    return margin_gap(model(x_adv), y)


def dlr_objective(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Objective form of :func:`dlr_loss`."""
    return dlr_loss(model(x_adv), y)


OBJECTIVES: dict[str, Objective] = {"ce": ce_objective, "margin": margin_objective,
                                    "dlr": dlr_objective}


def objective_named(name: str) -> Objective:
    """The objective called ``name`` (``ce``, ``margin`` or ``dlr``).

    Raises:
        UsageError: an unknown name.
    """
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UsageError(f"unknown attack objective {name!r}; valid: "
                         f"{', '.join(OBJECTIVES)}") from None
