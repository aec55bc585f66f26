"""Madry PGD adversarial training.

Paper: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018, arXiv:1706.06083.

Loss: ``CE(f(x'), y)`` with ``x' = PGD-l∞(x)`` (protocol: 10 steps, ε = 8/255, step 2/255,
uniform random start; MNIST ε = 0.3, step 0.01, 40 steps), model in eval mode while the
attack runs. No method hyperparameters.

Example:
    advbench train --defense at --dataset cifar10 --profile paper
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from defenses import register_defense
from defenses.base import Defense, StepOutput, detached


@register_defense("at")
class MadryAT(Defense):
    """Cross-entropy on PGD adversarial examples only."""

    description = "PGD adversarial training: CE on x' (Madry et al. 2018)"
    paper = "Madry et al., ICLR 2018, arXiv:1706.06083"

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        x_adv = self.adversarial(model, x, y)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, detached(ce_adv=loss), logits)
