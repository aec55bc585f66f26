"""Projected gradient descent (Madry et al. 2018) for l∞, l2 and l1 threat models.

Paper: "Towards Deep Learning Models Resistant to Adversarial Attacks", arXiv:1706.06083.
The l1 step is the sparse steepest-ascent step of SLIDE ("Adversarial Training and
Robustness for Multiple Perturbations", Tramèr & Boneh 2019, arXiv:1904.13000).

Update rule (one descent loop; the norms differ only in ``random_start``, ``direction`` and
``project`` of :mod:`attacks.norms`, as in foolbox's ``gradient_descent_base.py``)::

    δ₀ = Π(start(ε))                                uniform in the ball, 0.001·N(0,1), or 0
    δ_{t+1} = Π_{B_p(ε) ∩ [0,1]^d − x}(δ_t + α · direction(∇_δ L(x + δ_t, y), x + δ_t))

L is the per-sample objective handed to the call (cross-entropy unless the caller passes
another, e.g. a defense's own loss for the adaptive attack).

Hyperparameters (keyword-only):

    =============  =========  ===================================================
    steps          20         iterations
    step_size      None       α in pixel units; None → rel_step_size·ε
    rel_step_size  None       α/ε (e.g. 0.1 for "step ε/10"); None → 2.5/steps (Madry)
    random_start   "uniform"  "uniform" | "normal" (x + init_std·N(0,1)) | "none"
    init_std       0.001      std of the "normal" start (TRADES)
    restarts       1          random restarts; restarts after the first attack only the
                              samples no restart has misclassified yet
    l1_sparsity    0.99       l1 only: the step moves the top ⌈(1 − q)·d⌉ coordinates
    =============  =========  ===================================================

The resolved α is written back into ``hparams["step_size"]`` so result rows record it.

With restarts, the returned x' of a sample is the first restart's x' that misclassifies it,
or, for a sample no restart breaks, the restart's x' with the highest objective (the
worst-case rule of Tramèr & Boneh's evaluation code), so the CE reported at x' is the
largest one found.

Deviation: a single run returns the last iterate (not the highest-loss one), as in the
reference implementations of Madry et al. and TRADES.

Example:
    >>> atk = PGD(ThreatModel(Norm.LINF, 8 / 255), steps=20, step_size=1 / 255, seed=0)
    >>> x_adv = atk(model, x, y)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective, ThreatModel
from attacks.norms import NORM_OPS, NormOps
from benchmark.errors import UsageError


@register_attack("pgd")
class PGD(Attack):
    """PGD with a random start in the l∞, l2 or l1 ball (see module docstring)."""

    description = "projected gradient descent, l∞/l2/l1 (Madry et al. 2018; l1 step: SLIDE)"
    supported_norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    default_hparams = {"steps": 20, "step_size": None, "rel_step_size": None,
                       "random_start": "uniform", "init_std": 0.001, "restarts": 1,
                       "l1_sparsity": 0.99}

    def __init__(self, threat: ThreatModel, *, seed: Optional[int] = None, **hparams: Any) -> None:
        super().__init__(threat, seed=seed, **hparams)
        hp = self.hparams
        if hp["random_start"] not in ("uniform", "normal", "none"):
            raise UsageError(f"random_start must be uniform|normal|none, got {hp['random_start']!r}")
        if int(hp["steps"]) < 0 or int(hp["restarts"]) < 1:
            raise UsageError(f"steps must be >= 0 and restarts >= 1, got {hp['steps']}, "
                             f"{hp['restarts']}")
        if not 0 <= float(hp["l1_sparsity"]) < 1:
            raise UsageError(f"l1_sparsity must lie in [0, 1), got {hp['l1_sparsity']}")
        if hp["step_size"] is None:
            rel = hp["rel_step_size"]
            rel = 2.5 / max(int(hp["steps"]), 1) if rel is None else float(rel)
            hp["step_size"] = rel * self.threat.eps

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        ops = NORM_OPS[self.threat.norm]
        gen = self.generator(x.device)
        restarts = int(self.hparams["restarts"])
        if restarts == 1:
            return self._descend(model, x, y, loss, ops, gen)
        best = x.clone()
        best_obj = torch.full((x.shape[0],), -torch.inf, device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            idx = torch.nonzero(~fooled).flatten()
            if idx.numel() == 0:
                break
            xs, ys = x[idx], y[idx]
            x_adv = self._descend(model, xs, ys, loss, ops, gen)
            with torch.no_grad():
                obj = loss(model, x_adv, xs, ys).float()
                wrong = model(x_adv).argmax(1) != ys
            take = wrong | (obj > best_obj[idx])
            best[idx[take]] = x_adv[take]
            best_obj[idx[take]] = obj[take]
            fooled[idx[wrong]] = True
        return best

    def _descend(self, model: nn.Module, x: Tensor, y: Tensor, loss: Objective, ops: NormOps,
                 gen: Optional[torch.Generator]) -> Tensor:
        eps, alpha = self.threat.eps, float(self.hparams["step_size"])
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
                step = ops.direction(grad, x + delta, self.hparams)
                delta = ops.project(x, delta.detach() + alpha * step, eps)
        return (x + delta).clamp_(0, 1).detach()
