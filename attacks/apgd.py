"""Auto-PGD for l2 and l1 through the reference implementation packaged as ``pyautoattack``.

Papers: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, arXiv:2003.01690 (APGD, l∞ and l2); Croce & Hein,
"Mind the box: l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021,
arXiv:2103.01208 (l1-APGD). Implementation: ``pyautoattack.autopgd_base.APGDAttack`` of
``pyautoattack==0.2.0`` (fra31/auto-attack's code unchanged), called, not reimplemented.

Algorithm: PGD with momentum (0.75) whose step size starts at 2ε (l2) or ε (l1) and is
halved at checkpoints where the loss stopped rising (l2), keeping the best point found; every
iterate that misclassifies is kept as x'. The l1 step moves the coordinates with the largest
|∇|, an adaptive fraction of them (starting at 20%), and projects exactly onto the
intersection of the l1 ball with the box [0,1]^d — the box is what the SLIDE-style sparse
PGD of :mod:`attacks.pgd` neglects and why it overstates l1 robustness ("Mind the box" §3).
The loss is cross-entropy (``loss="ce"``, the APGD-CE column of AutoAttack) or DLR.

Hyperparameters (keyword-only; defaults are AutoAttack's ``standard`` settings of APGD-CE
for the norm, ``pyautoattack.AutoAttack._set_version``):

    ==============  =====  =====  =========================================================
    name            l2     l1
    n_iter          100    100    iterations per restart
    n_restarts      1      5      restarts, each on the points no restart has broken yet
    use_largereps   False  True   l1: run the iterations at ε' = 3ε, 2ε, ε (30%/30%/40%),
                                  the "larger radius" schedule AutoAttack uses for l1
    loss            "ce"   "ce"   "ce" | "dlr"
    rho             0.75   0.75   step-size halving threshold on the oscillation check
    ==============  =====  =====  =========================================================

Points APGD does not break come back unchanged (x' = x). Each call seeds APGD with the
attack's seed (None: a seed drawn from the global RNG) and restores the global torch RNG
afterwards (APGD reseeds it).

Deviation: x' is passed through :func:`attacks.norms.fit_to_ball`, which removes the fp32
rounding (a few ulps outside the box or the ball) that the reference code can leave; a
point strictly inside is returned unchanged.

Example:
    >>> x_adv = APGDL1(ThreatModel(Norm.L1, 10.0), seed=0)(model, x, y)
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective, ThreatModel, ce_objective
from attacks.norms import fit_to_ball
from benchmark.errors import UsageError

logger = logging.getLogger(__name__)

_NORMS = {Norm.L2: "L2", Norm.L1: "L1"}


class _APGD(Attack):
    """``pyautoattack``'s APGDAttack for one norm (subclasses fix the norm and defaults)."""

    default_hparams = {"n_iter": 100, "n_restarts": 1, "use_largereps": False, "loss": "ce",
                       "rho": 0.75}

    def __init__(self, threat: ThreatModel, *, seed: Optional[int] = None, **hparams: Any) -> None:
        super().__init__(threat, seed=seed, **hparams)
        hp = self.hparams
        if hp["loss"] not in ("ce", "dlr"):
            raise UsageError(f"{self.name} loss must be ce|dlr, got {hp['loss']!r}")
        if int(hp["n_iter"]) < 1 or int(hp["n_restarts"]) < 1:
            raise UsageError(f"{self.name}: n_iter and n_restarts must be >= 1, got "
                             f"{hp['n_iter']}, {hp['n_restarts']}")
        if hp["use_largereps"] and self.threat.norm is not Norm.L1:
            raise UsageError(f"{self.name}: use_largereps is defined for l1 only")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        if loss is not ce_objective:
            raise UsageError(f"{self.name} runs its own CE/DLR loss; it takes no objective")
        if x.shape[0] == 0 or self.threat.eps == 0:
            return x
        from pyautoattack.autopgd_base import APGDAttack
        hp = self.hparams
        seed = self.seed if self.seed is not None else int(torch.randint(2**31 - 1, ()))
        apgd = APGDAttack(model, n_iter=int(hp["n_iter"]), norm=_NORMS[self.threat.norm],
                          n_restarts=int(hp["n_restarts"]), eps=self.threat.eps, seed=seed,
                          loss=hp["loss"], rho=float(hp["rho"]), device=x.device,
                          use_largereps=bool(hp["use_largereps"]), logger=logger)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            x_adv = apgd.perturb(x, y)
        return fit_to_ball(x, x_adv, self.threat.norm, self.threat.eps)


@register_attack("apgd-l2")
class APGDL2(_APGD):
    """APGD-CE in the l2 ball, 100 iterations, 1 restart (AutoAttack's l2 APGD-CE)."""

    description = "Auto-PGD l2, CE loss, via pyautoattack (Croce & Hein 2020)"
    supported_norms = frozenset({Norm.L2})


@register_attack("apgd-l1")
class APGDL1(_APGD):
    """l1-APGD-CE, 100 iterations, 5 restarts, larger-radius schedule (AutoAttack's l1)."""

    description = "Auto-PGD l1 (l1-APGD), CE loss, via pyautoattack (Croce & Hein 2021)"
    supported_norms = frozenset({Norm.L1})
    default_hparams = {**_APGD.default_hparams, "n_restarts": 5, "use_largereps": True}
