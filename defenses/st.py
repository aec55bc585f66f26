"""Standard (non-adversarial) training: the undefended baseline and HAT's helper model.

Loss: ``CE(f(x), y)`` on clean inputs. No method hyperparameters; the common protocol
(optimizer, schedule, augmentation) applies. Deviation from the other defenses: the "best"
checkpoint is selected by validation clean accuracy (``select_by = "val_clean"``), since an
undefended model's PGD accuracy is ~0 at every epoch.

Example:
    advbench train --defense st --dataset mnist5k --profile cpu
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from defenses import register_defense
from defenses.base import Defense, StepOutput, detached


@register_defense("st")
class StandardTraining(Defense):
    """Cross-entropy on clean data only."""

    description = "standard training on clean data (undefended baseline)"
    uses_training_attack = False
    paper = "-"
    default_hparams = {"select_by": "val_clean"}

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, detached(ce=loss), logits)
