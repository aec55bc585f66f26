"""AT-HE: PGD adversarial training with hypersphere embedding.

Paper: Pang et al., "Boosting Adversarial Training with Hypersphere Embedding", NeurIPS 2020,
arXiv:2002.08619. Official code: ShawnXYang/AT_HE (``CIFAR-10/train_adv_cifar10.py``,
``losses.py``, ``he.py``; README: ``--loss=pgd_he --s=10.0 --m=0.2``).

Head: features and class weights are l2-normalised and the layer has no bias, so
``cos_{ik} = ⟨f̂(x_i), Ŵ_k⟩``. Eval logits are ``s·cos`` (what every attack sees). Loss, on the
PGD example x' only::

    L = CE(s · (cos(x') − m · onehot(y)), y)

The additive angular margin m lives only in the training loss: the training attack is the
protocol's PGD on CE of the eval logits ``s·cos`` (the official attack uses HELoss with m = 0,
i.e. the same objective).

Hyperparameters:

    ============  =========  ==================================================
    s             10.0       scale of the cosine logits
    m             0.2        additive margin on the true-class cosine
    attack_start  "uniform"  PGD start: "uniform" (protocol) or "normal"
                             (x + 0.001·N(0,1), the official code)
    ============  =========  ==================================================

Deviations from the official code:

* weights are normalised inside ``forward`` so the true gradient flows through the
  normalisation; the official model overwrites ``fc.weight.data`` with its normalised value at
  every forward (a projection after each SGD step, gradient taken at the normalised point);
* the training attack starts uniformly in the ε-ball (common protocol) instead of at
  ``x + 0.001·N(0,1)``; ``attack_start="normal"`` reproduces the official start.

Example:
    advbench train --defense at-he --dataset cifar10 --hparams '{"s": 10.0, "m": 0.2}'
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Objective
from defenses import register_defense
from defenses.base import Defense, StepOutput, detached


class CosineHead(nn.Module):
    """``s · normalize(f) · normalize(W)ᵀ``: a bias-free linear layer on the unit hypersphere."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def cosine(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * self.cosine(features)


def margin_logits(logits: Tensor, y: Tensor, scale: float, margin: float) -> Tensor:
    """``s·(cos − m·onehot(y))`` from eval logits ``s·cos``."""
    return logits - scale * margin * F.one_hot(y, logits.shape[1]).to(logits.dtype)


def he_loss(logits: Tensor, y: Tensor, scale: float, margin: float,
            reduction: str = "mean") -> Tensor:
    """``CE(s·(cos − m·onehot(y)), y)`` from the eval logits ``s·cos``."""
    return F.cross_entropy(margin_logits(logits, y, scale, margin), y, reduction=reduction)


@register_defense("at-he")
class ATHE(Defense):
    """PGD-AT with normalised features/weights and an additive angular margin."""

    description = "AT-HE: CE(s·(cos(x') − m·onehot)) with a cosine head (Pang et al. 2020)"
    paper = "Pang et al., NeurIPS 2020, arXiv:2002.08619"
    default_hparams = {"s": 10.0, "m": 0.2, "attack_start": "uniform"}

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return CosineHead(feature_dim, num_classes, float(self.hparams["s"]))

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        x_adv = self.adversarial(model, x, y)
        logits = model(x_adv)
        loss = he_loss(logits, y, float(self.hparams["s"]), float(self.hparams["m"]))
        return StepOutput(loss, detached(he_adv=loss), logits)

    def objective(self) -> Objective:
        """Per-sample training loss ``CE(s·(cos(x') − m·onehot(y)), y)`` (margin included)."""
        s, m = float(self.hparams["s"]), float(self.hparams["m"])

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return he_loss(model(x_adv), y, s, m, reduction="none")

        return loss

    def class_centers(self, model: nn.Module) -> Optional[Tensor]:
        """The l2-normalised class weights."""
        head = getattr(model, "head", None)
        if not isinstance(head, CosineHead):
            return super().class_centers(model)
        return F.normalize(head.weight.detach(), dim=1)
