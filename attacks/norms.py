"""Per-norm pieces of gradient attacks: random start, steepest-ascent direction, projection.

Each projection returns δ such that ``x + δ`` lies in [0,1]^d and ``||δ||_p <= ε``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import torch
from torch import Tensor

from attacks.base import Norm


class NormOps(Protocol):
    def random_start(self, x: Tensor, eps: float, gen: Optional[torch.Generator]) -> Tensor: ...

    def direction(self, grad: Tensor, hparams: Mapping[str, Any]) -> Tensor: ...

    def project(self, x: Tensor, delta: Tensor, eps: float) -> Tensor: ...


def _rand(x: Tensor, gen: Optional[torch.Generator]) -> Tensor:
    return torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class LinfOps:
    """Uniform start in the cube, signed gradient, coordinate clipping."""

    def random_start(self, x: Tensor, eps: float, gen: Optional[torch.Generator]) -> Tensor:
        return (2 * _rand(x, gen) - 1) * eps

    def direction(self, grad: Tensor, hparams: Mapping[str, Any]) -> Tensor:
        return grad.sign()

    def project(self, x: Tensor, delta: Tensor, eps: float) -> Tensor:
        return torch.clamp(x + delta.clamp(-eps, eps), 0, 1) - x


class L2Ops:
    """Uniform start in the ball, normalised gradient, radial rescaling then box clipping."""

    def random_start(self, x: Tensor, eps: float, gen: Optional[torch.Generator]) -> Tensor:
        g = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        g = g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12), x)
        d = x[0].numel()
        r = _rand(x[:, :1, :1, :1] if x.dim() == 4 else x[:, :1], gen).flatten() ** (1.0 / d)
        return g * _view(r * eps, x)

    def direction(self, grad: Tensor, hparams: Mapping[str, Any]) -> Tensor:
        return grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)

    def project(self, x: Tensor, delta: Tensor, eps: float) -> Tensor:
        n = delta.flatten(1).norm(dim=1)
        delta = delta * _view(torch.clamp(eps / n.clamp_min(1e-12), max=1.0), delta)
        # box clipping only shrinks coordinates, so the l2 bound is kept
        return torch.clamp(x + delta, 0, 1) - x


NORM_OPS: dict[Norm, NormOps] = {Norm.LINF: LinfOps(), Norm.L2: L2Ops()}
