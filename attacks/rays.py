"""RayS: a hard-label (decision-only) l∞ attack by ray search.

Paper: Chen & Gu, "RayS: A Ray Searching Method for Hard-label Adversarial Attack", KDD 2020,
arXiv:2006.12792 (official code: github.com/uclaml/RayS, ``RayS.py``).

The attack reads only the predicted class. It reformulates the l∞ attack as a search over ray
directions θ ∈ {-1, +1}^d: the decision-boundary radius along θ is
g(θ) = min{r ≥ 0 : argmax f(clip(x + r·θ)) ≠ y}, and RayS minimises g by hierarchical
sign flips (the paper's Algorithm 3). Start from θ = (+1, …, +1) and r* = ∞. At stage s the
flattened input is cut into 2^s contiguous blocks of ⌈d / 2^s⌉ coordinates; each block's signs
are flipped in turn. A flip is kept only if it shortens the radius: one query at the current
best radius r* tells whether the flipped ray crosses the boundary before r* (the paper's fast
check); only then a binary search on [0, min(r*, 1)] finds its radius, to a tolerance of
``tol``/√d (the official code's ``tol`` on the l2-normalised ray). After the last block of a
stage the next stage starts (s + 1). A point is robust at ε if r* > ε once its queries are
spent (``early_stop``: stop a point as soon as r* ≤ ε; the verdict is the same, since r* never
grows).

Hyperparameters (keyword-only):

    ===========  =======  ===================================================
    n_queries    10000    queries (model calls) per point (the paper's default)
    tol          1e-3     binary-search tolerance on the l2-normalised ray
    early_stop   False    stop a point once r* ≤ ε (cheaper; ADBD then only
                          bounds the distance of the stopped points)
    ===========  =======  ===================================================

After a call, :attr:`RayS.distances` holds one tensor per call: each point's final r* (the
l∞ distance to the boundary it found; 1.0, the whole box, where no ray crossed it). Their mean
over the test points, with 0 for misclassified points, is the paper's average decision
boundary distance (ADBD).

Deviations: the radius is kept in l∞ units (the official code keeps it along the
l2-normalised ray, r·√d); the returned x' is x itself for points still robust at ε (the
official code returns the boundary point at any distance), so that x' stays in the ε-ball.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective, ce_objective
from attacks.norms import fit_to_ball
from benchmark.errors import UsageError


@register_attack("rays")
class RayS(Attack):
    """RayS, hard-label ray search (see module docstring)."""

    description = "RayS, decision-only (hard-label) l∞ ray search (Chen & Gu, KDD 2020)"
    supported_norms = frozenset({Norm.LINF})
    default_hparams = {"n_queries": 10000, "tol": 1e-3, "early_stop": False}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.distances: list[Tensor] = []

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        if loss is not ce_objective:
            raise UsageError("rays reads only the predicted class; it takes no objective")
        limit = int(self.hparams["n_queries"])
        if limit < 1 or float(self.hparams["tol"]) <= 0:
            raise UsageError("rays needs n_queries >= 1 and tol > 0")
        n, dim = x.shape[0], x[0].numel()
        if n == 0:
            return x
        flat = x.reshape(n, dim)
        tol = float(self.hparams["tol"]) / math.sqrt(dim)
        eps, early = self.threat.eps, bool(self.hparams["early_stop"])
        sgn = torch.ones_like(flat)
        best = torch.full((n,), math.inf, device=x.device)
        queries = torch.zeros(n, dtype=torch.long, device=x.device)

        def wrong(idx: Tensor, theta: Tensor, r: Tensor) -> Tensor:
            """One query for the points ``idx`` along ``theta`` at radius ``r``."""
            queries[idx] += 1
            xa = (flat[idx] + r.clamp_max(1.0)[:, None] * theta).clamp(0, 1)
            return model(xa.reshape(-1, *x.shape[1:])).argmax(1) != y[idx]

        level, block = 0, 0
        with torch.no_grad():
            while True:
                live = queries < limit
                if early:
                    live &= best > eps
                idx = torch.nonzero(live).flatten()
                if len(idx) == 0:
                    break
                size = math.ceil(dim / 2 ** level)
                start, end = block * size, min(dim, (block + 1) * size)
                theta = sgn[idx].clone()
                theta[:, start:end] *= -1
                # fast check: does the flipped ray cross the boundary before r*?
                hit = wrong(idx, theta, best[idx])
                lo = torch.zeros(int(hit.sum()), device=x.device)
                hi = torch.minimum(best[idx][hit], torch.ones_like(lo))
                todo, th = idx[hit], theta[hit]
                active = torch.arange(len(todo), device=x.device)
                while len(active):
                    mid = (lo[active] + hi[active]) / 2
                    bad = wrong(todo[active], th[active], mid)
                    hi[active[bad]] = mid[bad]
                    lo[active[~bad]] = mid[~bad]
                    active = active[(hi[active] - lo[active]) > tol]
                better = hi < best[todo]
                best[todo[better]] = hi[better]
                sgn[todo[better]] = th[better]
                block += 1
                if block == 2 ** level or end == dim:
                    level, block = level + 1, 0
        self.distances.append(best.clamp_max(1.0).cpu())
        found = best <= eps
        x_adv = torch.where(found[:, None], (flat + best.clamp_max(1.0)[:, None] * sgn)
                            .clamp(0, 1), flat).reshape(x.shape)
        return fit_to_ball(x, x_adv, Norm.LINF, eps)
