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

Each call runs AutoAttack's cascade on the batch it is given, seeded with the attack's seed,
on the batch's device, and returns AutoAttack's x' (points AutoAttack fails on come back
unchanged). The global torch RNG is restored afterwards (APGD reseeds it). The cascade runs
one component per ``run_standard_evaluation`` call (``attacks_to_run = [component]``), each
on the points every earlier component left robust, in AutoAttack's order: that is what one
call does internally (each component reseeds with the same seed and gets the same points in
the same order), so x' is bit-identical to one call on a deterministic model (a test
compares). Between components it logs the points still robust and the component's wall and
CPU seconds, and inside each component one line per restart or target class (Square: per
10% of its queries; :mod:`attacks.aa_trace`). :meth:`AutoAttack.breakdown` returns, for
the last call, the components, which component first broke each point and each
component's seconds; the evaluation writes them into the row (``components``, see
:func:`benchmark.eval.flags.attack_points`).

Parameters: the whole cascade runs with the model's parameters frozen
(:func:`attacks.base.input_grads_only`), so FAB's ``.backward()`` computes the input gradient
only (pyautoattack called directly also computes the weight gradients it then discards, about
a quarter of a small CNN's backward) and leaves ``p.grad`` untouched; x' is bit-identical.

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
* A randomized defense (``rand`` version): each component's call classifies its points once
  more before APGD reseeds, which draws from the model's randomness, so x' is not
  bit-identical to a single ``run_standard_evaluation`` call there (still fixed by the seed).
* The batch the harness passes is AutoAttack's batch, so for a given evaluation batch size
  the cascade is AutoAttack's own; only the split into batches can differ from one
  ``run_standard_evaluation`` call over the whole test set.

Example:
    >>> x_adv = AutoAttack(ThreatModel(Norm.LINF, 8 / 255), seed=0)(model, x, y)
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.aa_trace import traced
from attacks.base import Attack, Norm, Objective, ThreatModel, ce_objective, input_grads_only
from attacks.norms import fit_to_ball
from benchmark.errors import UsageError

_NORMS = {Norm.LINF: "Linf", Norm.L2: "L2", Norm.L1: "L1"}
logger = logging.getLogger(__name__)
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
        aa = self.build(model, x.device) if x.shape[0] else None
        order = list(aa.attacks_to_run) if aa is not None else self._order()
        first = torch.full((x.shape[0],), -1, dtype=torch.int8)
        wall, cpu = [0.0] * len(order), [0.0] * len(order)
        self._last = {"components": order, "first_broken_by": first, "wall_s": wall,
                      "cpu_s": cpu}
        if aa is None:
            return x
        x_adv = x.clone()
        devices = [x.device] if x.device.type == "cuda" else []
        live = torch.arange(x.shape[0], device=x.device)  # the first call drops wrong points
        with torch.random.fork_rng(devices=devices), input_grads_only(model):
            for i, comp in enumerate(order):  # AutoAttack's own cascade, one component a call
                if not len(live):
                    break
                t0, c0 = time.perf_counter(), time.process_time()
                aa.attacks_to_run = [comp]
                with traced(aa, comp, len(live)):
                    xa, ya = aa.run_standard_evaluation(x[live], y[live], batch_size=len(live))
                broken = (ya != y[live]).to(live.device)
                x_adv[live[broken]] = xa[broken]
                moved = (xa != x[live]).flatten(1).any(1)  # not moved: wrong at x itself
                first[live[broken & moved].cpu()] = i
                wall[i], cpu[i] = time.perf_counter() - t0, time.process_time() - c0
                live = live[~broken]
                logger.info("AutoAttack %s: %d broken, %d points still robust (%.1f s, %.1f "
                            "CPU-s)", comp, int(broken.sum()), len(live), wall[i], cpu[i])
        return fit_to_ball(x, x_adv, self.threat.norm, self.threat.eps)

    def _order(self) -> list[str]:
        """The components the configured version runs (without building the model)."""
        hp = self.hparams
        return list(hp["attacks"]) if hp["version"] == "custom" else \
            ["apgd-ce", "apgd-dlr"] if hp["version"] == "rand" else \
            ["apgd-ce", "apgd-t", "fab-t", "square"]

    def breakdown(self) -> Optional[dict[str, Any]]:
        """Per-component record of the last call (see :meth:`Attack.breakdown`)."""
        return getattr(self, "_last", None)


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
