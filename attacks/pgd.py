"""Projected gradient descent (Madry et al. 2018) for l∞, l2 and l1 threat models.

Paper: "Towards Deep Learning Models Resistant to Adversarial Attacks", arXiv:1706.06083.

Update rule (one descent loop; the norms differ only in ``start``, ``direction`` and
``project``, as in foolbox's ``gradient_descent_base.py``)::

    δ₀ = start(ε)                                   uniform in the ball, 0.001·N(0,1), or 0
    δ_{t+1} = Π_{B_p(ε) ∩ [0,1]^d - x}(δ_t + α · direction(∇_δ L(x + δ_t, y)))

Hyperparameters (keyword-only):

    ============  =========  ==================================================
    steps         20         iterations
    step_size     None       α in pixel units; None → 2.5·ε/steps (Madry)
    random_start  "uniform"  "uniform" | "normal" (x + init_std·N(0,1)) | "none"
    init_std      0.001      std of the "normal" start (TRADES)
    restarts      1          random restarts; a sample counts as broken if any restart
                             misclassifies it (the first such restart's x' is returned)
    l1_sparsity   0.99       l1 only: the step moves the top (1 − q) coordinates by |grad|
    ============  =========  ==================================================

Deviation: the last iterate is returned (not the highest-loss one), as in the reference
implementations of Madry et al. and TRADES.

Example:
    >>> atk = PGD(ThreatModel(Norm.LINF, 8 / 255), steps=20, step_size=1 / 255)
    >>> x_adv = atk(model, x, y)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective
from attacks.norms import NORM_OPS


@register_attack("pgd")
class PGD(Attack):
    """PGD with uniform random start in the l∞, l2 or l1 ball (see module docstring)."""

    description = "projected gradient descent, l∞/l2/l1 (Madry et al. 2018)"
    supported_norms = frozenset({Norm.LINF, Norm.L2})
    default_hparams = {"steps": 20, "step_size": None, "random_start": "uniform",
                       "init_std": 0.001, "restarts": 1, "l1_sparsity": 0.99}

    def __init__(self, threat: Any, *, seed: Optional[int] = None, **hparams: Any) -> None:
        super().__init__(threat, seed=seed, **hparams)
        if self.hparams["step_size"] is None:
            self.hparams["step_size"] = 2.5 * self.threat.eps / max(int(self.hparams["steps"]), 1)
        if self.hparams["random_start"] not in ("uniform", "normal", "none"):
            raise ValueError(f"random_start must be uniform|normal|none, "
                             f"got {self.hparams['random_start']!r}")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        ops = NORM_OPS[self.threat.norm]
        eps, alpha = self.threat.eps, float(self.hparams["step_size"])
        gen = self.generator(x.device)
        restarts = max(int(self.hparams["restarts"]), 1)
        result = x.clone()
        todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for r in range(restarts):
            x_adv = self._descend(model, x, y, loss, ops, eps, alpha, gen)
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                fooled = model(x_adv).argmax(1) != y
            take = todo & (fooled | torch.full_like(fooled, r == restarts - 1))
            result[take] = x_adv[take]
            todo &= ~take
        return result

    def _descend(self, model: nn.Module, x: Tensor, y: Tensor, loss: Objective, ops: Any,
                 eps: float, alpha: float, gen: Optional[torch.Generator]) -> Tensor:
        start = self.hparams["random_start"]
        if start == "uniform" and eps > 0:
            delta = ops.random_start(x, eps, gen)
        elif start == "normal":
            delta = float(self.hparams["init_std"]) * torch.randn(
                x.shape, generator=gen, device=x.device, dtype=x.dtype)
        else:
            delta = torch.zeros_like(x)
        delta = ops.project(x, delta, eps)
        for _ in range(int(self.hparams["steps"])):
            delta.requires_grad_(True)
            obj = loss(model, x + delta, x, y).sum()
            (grad,) = torch.autograd.grad(obj, delta)
            with torch.no_grad():
                step = ops.direction(grad, self.hparams)
                delta = ops.project(x, delta.detach() + alpha * step, eps)
        return (x + delta).clamp_(0, 1).detach()
