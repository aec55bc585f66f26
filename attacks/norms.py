"""Per-norm pieces of gradient attacks: random start, steepest-ascent direction, projection.

The descent loop of :mod:`attacks.pgd` is the same for every norm (foolbox's
``gradient_descent_base.py`` shape); only these three operations differ:

======  ==============================  ===============================  =============================
norm    random start                    direction of a step              projection of δ
======  ==============================  ===============================  =============================
l∞      uniform in the cube             sign(∇)                          clip to [-ε, ε] then to the box
l2      uniform in the ball             ∇ / ‖∇‖₂                         radial rescale, then box clip
l1      uniform in the ball (foolbox)   sparse: top (1 − q) of |∇|,      exact Euclidean projection onto
                                        sign/k each (SLIDE, Tramèr &     {‖δ‖₁ ≤ ε} ∩ {0 ≤ x + δ ≤ 1}
                                        Boneh 2019, arXiv:1904.13000)    (:func:`project_l1_box`)
======  ==============================  ===============================  =============================

Every projection returns δ such that ``x + δ`` lies in [0,1]^d and ``‖δ‖_p ≤ ε``. For l∞ and
l2, ball projection followed by box clipping is the exact projection onto the intersection
for l∞ and a feasible (not always nearest) point for l2; for l1 the intersection is
projected onto exactly, by a sort over the breakpoints of the dual variable θ.

Deviation from SLIDE: SLIDE selects every coordinate with ``|∇| ≥`` the q-th percentile
(ties included) and projects onto the l1 ball and then clips to the box (not the exact
projection onto the intersection); here exactly ``k = ⌈(1 − q)·d⌉`` coordinates are moved
(``torch.topk``) and the projection is exact. As in SLIDE, coordinates already at a box face
whose gradient points outwards are excluded from the selection.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Protocol

import torch
from torch import Tensor

from attacks.base import Norm


class NormOps(Protocol):
    def random_start(self, x: Tensor, eps: float, gen: Optional[torch.Generator]) -> Tensor: ...

    def direction(self, grad: Tensor, x_adv: Tensor, hparams: Mapping[str, Any]) -> Tensor: ...

    def project(self, x: Tensor, delta: Tensor, eps: float) -> Tensor: ...


def _rand(shape: Any, like: Tensor, gen: Optional[torch.Generator]) -> Tensor:
    return torch.rand(shape, generator=gen, device=like.device, dtype=like.dtype)


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class LinfOps:
    """Uniform start in the cube, signed gradient, coordinate clipping."""

    def random_start(self, x: Tensor, eps: float, gen: Optional[torch.Generator]) -> Tensor:
        return (2 * _rand(x.shape, x, gen) - 1) * eps

    def direction(self, grad: Tensor, x_adv: Tensor, hparams: Mapping[str, Any]) -> Tensor:
        return grad.sign()

    def project(self, x: Tensor, delta: Tensor, eps: float) -> Tensor:
        return torch.clamp(x + delta.clamp(-eps, eps), 0, 1) - x


class L2Ops:
    """Uniform start in the ball, normalised gradient, radial rescaling then box clipping."""

    def random_start(self, x: Tensor, eps: float, gen: Optional[torch.Generator]) -> Tensor:
        g = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        g = g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12), x)
        r = _rand((x.shape[0],), x, gen) ** (1.0 / x[0].numel())
        return g * _view(r * eps, x)

    def direction(self, grad: Tensor, x_adv: Tensor, hparams: Mapping[str, Any]) -> Tensor:
        return grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)

    def project(self, x: Tensor, delta: Tensor, eps: float) -> Tensor:
        n = delta.flatten(1).norm(dim=1)
        delta = delta * _view(torch.clamp(eps / n.clamp_min(1e-12), max=1.0), delta)
        # box clipping only shrinks coordinates, so the l2 bound is kept
        return torch.clamp(x + delta, 0, 1) - x


def project_l1_box(v: Tensor, lo: Tensor, hi: Tensor, eps: float) -> Tensor:
    """Exact Euclidean projection of each row of ``v`` onto ``{‖δ‖₁ ≤ ε} ∩ [lo, hi]``.

    Requires ``lo ≤ 0 ≤ hi`` (the box contains 0, as ``[-x, 1 − x]`` does). The solution is
    ``δ_i = sign(v_i)·clamp(|v_i| − θ, 0, b_i)`` with ``b_i`` the box bound on the side of
    ``v_i`` and θ ≥ 0 the smallest value making ``‖δ‖₁ ≤ ε``. ``f(θ) = Σ clamp(|v_i| − θ, 0,
    b_i)`` is piecewise linear and non-increasing with breakpoints ``max(|v_i| − b_i, 0)``
    (slope −1 starts) and ``|v_i|`` (slope −1 ends); sorting them gives f at every
    breakpoint by a cumulative sum, and θ by linear interpolation on the crossing segment.

    Args:
        v: N×d points to project.
        lo: N×d lower bounds (≤ 0).
        hi: N×d upper bounds (≥ 0).
        eps: l1 radius.

    Returns:
        N×d projections, in ``v``'s dtype (computed in float64).
    """
    v64, lo64, hi64 = v.double(), lo.double(), hi.double()
    a = v64.abs()
    b = torch.where(v64 >= 0, hi64, -lo64).clamp_min(0)
    f0 = torch.minimum(a, b).sum(1, keepdim=True)
    starts = (a - b).clamp_min(0)
    t, order = torch.sort(torch.cat([starts, a], 1), dim=1)
    dslope = torch.cat([-torch.ones_like(a), torch.ones_like(a)], 1).gather(1, order)
    slope = dslope.cumsum(1)  # slope of f on [t_k, t_{k+1}]
    seg = slope[:, :-1] * (t[:, 1:] - t[:, :-1])
    f = torch.cat([f0, f0 + seg.cumsum(1)], 1)  # f(t_k)
    # first breakpoint where f ≤ ε (exists: f = 0 at the last one); θ lies on the segment before
    k = (f > eps).sum(1, keepdim=True).clamp(1, t.shape[1] - 1)
    t0, f_t0, s = t.gather(1, k - 1), f.gather(1, k - 1), slope.gather(1, k - 1)
    theta = torch.where(f0 > eps, t0 + (f_t0 - eps) / (-s).clamp_min(1), torch.zeros_like(t0))
    out = torch.sign(v64) * torch.minimum((a - theta).clamp_min(0), b)
    return out.to(v.dtype)


class L1Ops:
    """Uniform start in the l1 ball, sparse SLIDE step, exact projection onto ball ∩ box."""

    def random_start(self, x: Tensor, eps: float, gen: Optional[torch.Generator]) -> Tensor:
        n, d = x.shape[0], x[0].numel()
        u = _rand((n, d), x, gen).sort(1).values  # spacings of sorted uniforms: uniform simplex
        mag = u - torch.cat([torch.zeros_like(u[:, :1]), u[:, :-1]], 1)
        sign = torch.where(_rand((n, d), x, gen) < 0.5, -1.0, 1.0).to(x.dtype)
        return (eps * sign * mag).view_as(x)

    def direction(self, grad: Tensor, x_adv: Tensor, hparams: Mapping[str, Any]) -> Tensor:
        g, xa = grad.flatten(1), x_adv.flatten(1)
        g = torch.where(((xa >= 1) & (g > 0)) | ((xa <= 0) & (g < 0)), torch.zeros_like(g), g)
        q = float(hparams.get("l1_sparsity", 0.99))
        k = min(max(1, math.ceil(round((1 - q) * g.shape[1], 6))), g.shape[1])
        idx = g.abs().topk(k, dim=1).indices
        step = torch.zeros_like(g).scatter_(1, idx, g.gather(1, idx).sign() / k)
        return step.view_as(grad)

    def project(self, x: Tensor, delta: Tensor, eps: float) -> Tensor:
        xf = x.flatten(1)
        d = project_l1_box(delta.flatten(1), -xf, 1 - xf, eps)
        return (torch.clamp(xf + d, 0, 1) - xf).view_as(x)


NORM_OPS: dict[Norm, NormOps] = {Norm.LINF: LinfOps(), Norm.L2: L2Ops(), Norm.L1: L1Ops()}


def fit_to_ball(x: Tensor, x_adv: Tensor, norm: Norm, eps: float) -> Tensor:
    """``x_adv`` moved into ``[0,1]^d ∩ B_norm(x, ε)`` by at most float rounding.

    Reference code that works in fp32 (pyautoattack's APGD, FAB and Square) can return x'
    a few ulps outside the box or the ball. This clamps to the box (and to the cube for l∞),
    then, for l2 and l1, rescales δ towards 0 (in float64) where ``‖δ‖ > ε``; both moves only
    shrink δ, so a point already inside comes back unchanged. Not a projection: meant for
    rounding-sized excesses, which it removes without changing which point was found.
    """
    if norm is Norm.LINF:
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    x_adv = x_adv.clamp(0, 1)
    if norm is Norm.LINF:
        return x_adv
    delta = (x_adv.double() - x.double()).flatten(1)
    size = delta.norm(p=norm.p, dim=1)
    scale = torch.where(size > eps, eps / size.clamp_min(1e-300), torch.ones_like(size))
    if bool((scale < 1).any()):
        x_adv = (x.double() + (delta * scale[:, None]).view_as(x)).clamp(0, 1).to(x_adv.dtype)
    return x_adv
