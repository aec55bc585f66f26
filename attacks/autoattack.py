"""AutoAttack through the reference implementation packaged as ``pyautoattack``.

Paper: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, arXiv:2003.01690.

``pyautoattack==0.2.0`` is fra31/auto-attack's code (APGD, FAB, Square unchanged) with a
keyword-only API. Versions:

* ``standard``: APGD-CE (100 iterations, 1 restart), APGD-T (9 target classes), FAB-T
  (9 targets), Square (5000 queries), run as a cascade: each attack only sees the points that
  all earlier ones failed on. l1 uses AutoAttack's own l1 settings (APGD-CE with 5 restarts
  and APGD-T with 5 target classes, both on the larger-radius schedule 3ε, 2ε, ε).

Registered names: ``autoattack`` (any norm; the protocol's ``autoattack`` column is l∞),
``autoattack-l2`` and ``autoattack-l1`` (the same wrapper with the norm fixed, for the
protocol's l2 and l1 columns).
* ``rand``: APGD-CE and APGD-DLR with EOT over 20 draws, for randomised defenses
  (``Defense.randomized``; the harness switches to it automatically).
* ``custom``: the sub-attacks named in ``attacks`` (e.g. ``["apgd-ce"]``) with the
  constructor's settings (APGD with 5 restarts) — for tests and quick checks.

Hyperparameters (keyword-only):

    =========  ==========  ==============================================================
    version    "standard"  "standard" | "rand" | "custom"
    attacks    None        sub-attacks for ``custom`` (apgd-ce, apgd-dlr, apgd-t, fab,
                           fab-t, square)
    n_iter     None        override of the iterations of APGD / APGD-T / FAB (None: 100)
    n_queries  None        override of Square's queries (None: 5000)
    =========  ==========  ==============================================================

Each call runs ``AutoAttack.run_standard_evaluation`` on the batch it is given, seeded with
the attack's seed, on the batch's device, and returns AutoAttack's x' (points AutoAttack
fails on come back unchanged). The global torch RNG is restored afterwards (APGD reseeds it).

Deviations:

* x' is passed through :func:`attacks.norms.fit_to_ball`, which removes fp32 rounding (a
  few ulps outside the box or the ball) that the reference code can leave in l1/l2; a point
  strictly inside comes back unchanged.
* Resumption: pyautoattack's ``state_path`` is not used, because its ``EvaluationState``
  does not round-trip in 0.2.0 (``_attacks_to_run`` is written as a string, so every resume
  raises "different set of attacks", and the resume path leaves ``y_adv`` unbound). The
  harness instead keeps its own resumable state in the run folder
  (``flags/<eval_key>.partial.pt``, one entry per finished batch; see
  :mod:`benchmark.eval.evaluate`), which resumes to the same result because every batch is seeded
  alike.
* The batch the harness passes is AutoAttack's batch, so for a given evaluation batch size
  the cascade is AutoAttack's own; only the split into batches can differ from one
  ``run_standard_evaluation`` call over the whole test set.

Example:
    >>> x_adv = AutoAttack(ThreatModel(Norm.LINF, 8 / 255), seed=0)(model, x, y)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective, ThreatModel, ce_objective
from attacks.norms import fit_to_ball
from benchmark.errors import UsageError

_NORMS = {Norm.LINF: "Linf", Norm.L2: "L2", Norm.L1: "L1"}
_SUB_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


@register_attack("autoattack")
class AutoAttack(Attack):
    """Thin wrapper over ``pyautoattack.AutoAttack`` (see module docstring)."""

    description = "AutoAttack standard/rand via pyautoattack (Croce & Hein 2020)"
    supported_norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    default_hparams = {"version": "standard", "attacks": None, "n_iter": None,
                       "n_queries": None}

    def __init__(self, threat: ThreatModel, *, seed: Optional[int] = None, **hparams: Any) -> None:
        super().__init__(threat, seed=seed, **hparams)
        version, attacks = self.hparams["version"], self.hparams["attacks"]
        if version not in ("standard", "rand", "custom"):
            raise UsageError(f"autoattack version must be standard|rand|custom, got {version!r}")
        if (version == "custom") != (attacks is not None):
            raise UsageError("autoattack: give `attacks` exactly when version is 'custom'")
        bad = set(attacks or ()) - set(_SUB_ATTACKS)
        if bad:
            raise UsageError(f"unknown AutoAttack sub-attacks {sorted(bad)}; valid: {_SUB_ATTACKS}")
        if attacks is not None:
            self.hparams["attacks"] = list(attacks)

    def build(self, model: nn.Module, device: torch.device) -> Any:
        """The configured ``pyautoattack.AutoAttack`` for ``model``."""
        try:
            from pyautoattack import AutoAttack as _AA
        except ImportError as exc:  # pragma: no cover - hard dependency
            raise UsageError("autoattack needs the package pyautoattack==0.2.0") from exc
        hp = self.hparams
        kwargs: dict[str, Any] = {"attacks": hp["attacks"]} if hp["version"] == "custom" else {}
        aa = _AA(model, norm=_NORMS[self.threat.norm], eps=self.threat.eps,
                 version=hp["version"], seed=self.seed, device=device, **kwargs)
        if hp["n_iter"] is not None:
            for sub in (aa.apgd, aa.apgd_targeted, aa.fab):
                sub.n_iter = int(hp["n_iter"])
                if hasattr(sub, "n_iter_orig"):  # APGD derives its schedule from these
                    sub.n_iter_orig = int(hp["n_iter"])
                    sub.n_iter_2 = max(int(0.22 * sub.n_iter), 1)
                    sub.n_iter_min = max(int(0.06 * sub.n_iter), 1)
                    sub.size_decr = max(int(0.03 * sub.n_iter), 1)
        if hp["n_queries"] is not None:
            aa.square.n_queries = int(hp["n_queries"])
        return aa

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        if loss is not ce_objective:
            raise UsageError("autoattack runs its own losses; it takes no objective")
        if x.shape[0] == 0:
            return x
        aa = self.build(model, x.device)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
        return fit_to_ball(x, x_adv, self.threat.norm, self.threat.eps)


@register_attack("autoattack-l2")
class AutoAttackL2(AutoAttack):
    """AutoAttack in the l2 ball: ``AutoAttack(norm='L2')`` (same wrapper, norm fixed)."""

    description = "AutoAttack l2 standard/rand via pyautoattack (Croce & Hein 2020)"
    supported_norms = frozenset({Norm.L2})


@register_attack("autoattack-l1")
class AutoAttackL1(AutoAttack):
    """AutoAttack in the l1 ball: ``AutoAttack(norm='L1')`` (same wrapper, norm fixed)."""

    description = "AutoAttack l1 standard/rand via pyautoattack (Croce & Hein 2021)"
    supported_norms = frozenset({Norm.L1})
