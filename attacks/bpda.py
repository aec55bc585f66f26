"""BPDA: PGD through a declared non-differentiable preprocessing, identity on the backward pass.

Paper: Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security:
Circumventing Defenses to Adversarial Examples" (ICML 2018, arXiv:1802.00420), §4.1
(Backward Pass Differentiable Approximation). A defense ``f(g(x))`` whose preprocessing ``g``
(quantisation, JPEG, thermometer encoding, ...) has no useful gradient shatters the gradients
that PGD follows. BPDA keeps the forward pass ``f(g(x))`` exactly and replaces ``∇g`` by the
identity on the backward pass (``g(x) ≈ x``, the straight-through estimator), so the attack
follows ``∇f`` at ``g(x)``.

Declaring: a model declares a preprocessing non-differentiable by wrapping it in
:class:`NonDifferentiable` (a shape-preserving module or function on [0,1] inputs). An advbench
defense returns it from :meth:`defenses.Defense.make_preprocess`; a model from outside advbench
(``benchmark.evaluate_model``) holds it as a submodule, e.g.
``nn.Sequential(NonDifferentiable(jpeg), net)``. ``advbench check`` runs this attack (check
(m) ``bpda``) on every model that holds one, and its flags enter the headline.

Update rule: that of :class:`~attacks.pgd.PGD` while every :class:`NonDifferentiable` of the
model is in straight-through mode (:func:`straight_through`): its output is
``g(x).detach() + (x − x.detach())``, whose value is ``g(x)`` bit for bit and whose derivative
is exactly the identity. Outside the attack (the evaluation of x') the real ``g`` runs.

Hyperparameters: those of :class:`~attacks.pgd.PGD`; the harness's ``bpda`` column uses the
protocol's PGD budget (``pgd``: 40 steps of 0.01 on MNIST, 20 of 1/255 on CIFAR), random start.

Deviations: Athalye et al. also use a learned or hand-made differentiable approximation when
``g(x) ≈ x`` does not hold; only the identity is implemented. On a model that declares no
preprocessing the attack is plain PGD.

Example:
    >>> model = nn.Sequential(NonDifferentiable(lambda x: torch.round(x * 8) / 8), net)
    >>> x_adv = BPDA(ThreatModel(Norm.LINF, 8 / 255), steps=20, seed=0)(model, x, y)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Union

from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Objective
from attacks.pgd import PGD


class NonDifferentiable(nn.Module):
    """A preprocessing declared non-differentiable (attacked with BPDA's identity backward).

    Args:
        fn: the shape-preserving preprocessing (an ``nn.Module``, registered as a submodule,
            or a function ``Tensor -> Tensor``).
    """

    def __init__(self, fn: Union[nn.Module, Callable[[Tensor], Tensor]]) -> None:
        super().__init__()
        self.fn = fn
        self.straight_through = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.fn(x)
        if not self.straight_through:
            return out
        if out.shape != x.shape:
            raise ValueError(f"BPDA's identity backward needs a shape-preserving preprocessing, "
                             f"got {tuple(x.shape)} -> {tuple(out.shape)}")
        return out.detach() + (x - x.detach())


def preprocessings(model: nn.Module) -> list[NonDifferentiable]:
    """The declared non-differentiable preprocessings of ``model`` (its submodules)."""
    return [m for m in model.modules() if isinstance(m, NonDifferentiable)]


def declares_nondifferentiable(model: nn.Module) -> bool:
    """Whether ``model`` holds a preprocessing declared non-differentiable."""
    return bool(preprocessings(model))


@contextlib.contextmanager
def straight_through(model: nn.Module) -> Iterator[nn.Module]:
    """Every declared preprocessing of ``model`` in straight-through mode (forward exact,
    backward the identity) inside the block; the previous modes are restored after it."""
    mods = preprocessings(model)
    before = [m.straight_through for m in mods]
    try:
        for m in mods:
            m.straight_through = True
        yield model
    finally:
        for m, flag in zip(mods, before):
            m.straight_through = flag


@register_attack("bpda")
class BPDA(PGD):
    """PGD with the identity as the backward pass of declared non-differentiable steps."""

    description = ("PGD through declared non-differentiable preprocessing, identity backward "
                   "(BPDA, Athalye et al. 2018)")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        with straight_through(model):
            return super().perturb(model, x, y, loss=loss)
