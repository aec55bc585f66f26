"""Fast gradient sign method (Goodfellow et al. 2015).

Paper: "Explaining and Harnessing Adversarial Examples", arXiv:1412.6572.

Update rule: ``x' = clip_[0,1](x + ε · sign(∇_x L(x, y)))`` — one signed step of size ε,
no random start. Only l∞. No hyperparameters.

Example:
    >>> x_adv = FGSM(ThreatModel(Norm.LINF, 8 / 255))(model, x, y)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective


@register_attack("fgsm")
class FGSM(Attack):
    """One signed-gradient step of size ε."""

    description = "fast gradient sign method, one step of size eps (Goodfellow et al. 2015)"
    supported_norms = frozenset({Norm.LINF})
    default_hparams: dict = {}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        x_req = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(model, x_req, x, y).sum(), x_req)
        return torch.clamp(x + self.threat.eps * grad.sign(), 0, 1)
