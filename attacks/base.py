"""Attack base class, threat model and the checks every attack passes through.

The shape follows foolbox's ``attacks/base.py``: hyperparameters are keyword-only and
allow-listed at construction, the model is passed per call, and a final ``__call__``
validates inputs and outputs around the subclass's ``perturb``.
"""
from __future__ import annotations

import abc
import contextlib
import enum
import fractions
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.errors import PerturbationError, UsageError

#: per-sample objective maximised by an attack: ``loss(model, x_adv, x, y) -> Tensor[N]``
Objective = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


class Norm(str, enum.Enum):
    """Perturbation norms."""

    LINF = "linf"
    L2 = "l2"
    L1 = "l1"

    @property
    def p(self) -> float:
        return {"linf": math.inf, "l2": 2.0, "l1": 1.0}[self.value]


def eps_to_str(eps: float) -> str:
    """Human form of ε: a short decimal as written (``0.3``, ``0.2``, ``2``), else ``k/255``
    when ε·255 is a whole number (``8/255``, ``2000/255``), else ``%g``."""
    short = f"{eps:g}"
    if float(short) == eps and len(short) <= 4:
        return short
    frac = fractions.Fraction(eps * 255).limit_denominator(100)
    if abs(float(frac) - eps * 255) < 1e-6 and frac.denominator == 1 and eps * 255 >= 1:
        return f"{frac.numerator}/255"
    return f"{eps:g}"


def parse_eps(text: str | float) -> float:
    """Parse ``8/255``, ``0.3`` or a float into a float ε.

    Raises:
        UsageError: malformed or negative.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        try:
            num, _, den = str(text).partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"cannot parse eps {text!r}; use e.g. 8/255 or 0.3") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"eps must be a finite non-negative number, got {text!r}")
    return value


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball: ``||x' - x||_norm <= eps`` in [0,1] pixel units."""

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        if not math.isfinite(self.eps) or self.eps < 0:
            raise UsageError(f"eps must be finite and >= 0, got {self.eps}")
        if self.norm is Norm.LINF and self.eps > 1:
            raise UsageError(f"an l∞ eps above 1 is meaningless for inputs in [0,1]: {self.eps}")

    @property
    def eps_str(self) -> str:
        return eps_to_str(self.eps)


def lp_norms(delta: Tensor, norm: Norm) -> Tensor:
    """Per-sample norm of a perturbation batch."""
    flat = delta.flatten(1)
    if norm is Norm.LINF:
        return flat.abs().amax(1)
    if norm is Norm.L2:
        return flat.norm(p=2, dim=1)
    return flat.abs().sum(1)


def check_perturbation(x: Tensor, x_adv: Tensor, threat: ThreatModel, *, rtol: float = 1e-5,
                       atol: float = 1e-6) -> None:
    """Raise unless every x' lies in [0,1] and inside the ε-ball around x (never clips).

    Raises:
        PerturbationError: with the number of offending samples and the worst excess.
    """
    if x_adv.shape != x.shape:
        raise PerturbationError(f"x_adv has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    norms = lp_norms(x_adv.double() - x.double(), threat.norm)
    bound = threat.eps * (1 + rtol) + atol
    ok = torch.isfinite(x_adv).all() & (x_adv.min() >= 0) & (x_adv.max() <= 1) & (norms <= bound).all()
    if bool(ok):  # the only host synchronisation of a valid call
        return
    if not torch.isfinite(x_adv).all():
        raise PerturbationError("x_adv contains NaN or inf")
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise PerturbationError(f"x_adv leaves [0,1]: range [{x_adv.min():.4g}, {x_adv.max():.4g}]")
    bad = norms > bound
    raise PerturbationError(f"{int(bad.sum())} samples exceed {threat.norm.value} eps "
                            f"{threat.eps:.6g}: max norm {norms.max():.6g}")


@contextlib.contextmanager
def model_mode(model: nn.Module, *, train: bool) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in train or eval mode; restore every submodule's flag after."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def input_grads_only(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``model`` (restored after).

    For evaluation attacks, which need gradients w.r.t. the input only. ``torch.autograd.grad``
    w.r.t. the input already skips the weight gradients, but a ``.backward()`` on the input
    (pyautoattack's FAB) computes and accumulates them into ``p.grad``; frozen parameters
    skip that work (about a quarter of a small CNN's backward) and leave ``p.grad`` alone.
    The input gradients are computed by the same kernels, so x' is unchanged
    (``tests/test_attacks.py`` compares bit for bit). Not for the training attack: the
    training step needs the parameters' flags as they are (DDP, ``torch.compile`` guards).
    """
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def ce_objective(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Default objective: per-sample cross-entropy of the model's logits."""
    return F.cross_entropy(model(x_adv), y, reduction="none")


class Attack(abc.ABC):
    """An evasion attack inside a threat model.

    Subclasses set ``supported_norms`` and ``default_hparams`` (the allow-list of keyword
    hyperparameters) and implement :meth:`perturb`.

    Args:
        threat: the norm ball.
        seed: seeds the attack's own generator (random starts); None uses the global RNG.
        **hparams: overrides of ``default_hparams``; unknown keys raise ``UsageError``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    supported_norms: ClassVar[frozenset[Norm]] = frozenset(Norm)
    default_hparams: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, threat: ThreatModel, *, seed: Optional[int] = None, **hparams: Any) -> None:
        if threat.norm not in self.supported_norms:
            raise UsageError(f"attack {self.name!r} does not support norm {threat.norm.value}; "
                             f"supported: {sorted(n.value for n in self.supported_norms)}")
        unknown = set(hparams) - set(self.default_hparams)
        if unknown:
            raise UsageError(f"unknown hyperparameters for attack {self.name!r}: {sorted(unknown)}; "
                             f"allowed: {sorted(self.default_hparams)}")
        self.threat = threat
        self.seed = seed
        self.hparams: dict[str, Any] = {**self.default_hparams, **hparams}

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        """A fresh generator seeded with ``seed`` (None: use the global RNG)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    @abc.abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        """Return x' for the batch (need not be detached; validated by ``__call__``)."""

    @final
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *,
                 loss: Optional[Objective] = None) -> Tensor:
        """Attack ``model`` at ``(x, y)`` in eval mode and return a validated, detached x'.

        Args:
            model: maps x in [0,1] to logits; its train/eval flags are restored afterwards.
            x: clean inputs in [0,1].
            y: labels.
            loss: per-sample objective to maximise; default cross-entropy.

        Raises:
            UsageError: x outside [0,1] or shapes disagree.
            PerturbationError: the attack produced an invalid x'.
        """
        if x.shape[0] != y.shape[0]:
            raise UsageError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.numel() and not bool((x.min() >= 0) & (x.max() <= 1)):  # one host sync
            raise UsageError("attack inputs must lie in [0,1]; normalise inside the model")
        x = x.detach()
        with model_mode(model, train=False), torch.enable_grad():
            x_adv = self.perturb(model, x, y, loss=loss or ce_objective).detach()
        check_perturbation(x, x_adv, self.threat)
        return x_adv

    def breakdown(self) -> Optional[dict[str, Any]]:
        """Per-component record of the last call, for attacks made of components run as a
        cascade (AutoAttack); None for a single attack.

        Returns:
            ``{"components": [names in order], "first_broken_by": int8 tensor over the
            batch (index of the component that first broke the point, -1 none),
            "wall_s": [seconds per component], "cpu_s": [CPU-seconds per component]}``.
        """
        return None

    def record(self) -> dict[str, Any]:
        """JSON-serialisable description for result rows."""
        return {"attack": self.name, "norm": self.threat.norm.value, "eps": self.threat.eps,
                "eps_str": self.threat.eps_str, "attack_hparams": dict(self.hparams)}
