"""Evaluation-reliability verdict per (run, ε): gradient-masking checks and attack-failure
indicators.

Sources: Carlini et al. 2019, "On Evaluating Adversarial Robustness" (arXiv:1902.06705, §5 and
the checklist); Athalye, Carlini & Wagner 2018 (arXiv:1802.00420, §3); the Adv-DPNP paper's
§4.5 (Tables 6/7); AutoAttack's own checks (Croce & Hein 2020, ``pyautoattack/checks.py``);
Zimmermann et al. 2022, "Increasing Confidence in Adversarial Robustness Evaluations" (the
binarization test, :mod:`benchmark.eval.binarization`);
Pintor et al. 2022, "Indicators of Attack Failure" (incomplete optimisation, unavailable
gradients, unstable predictions, non-converging restarts).
Each check is a row ``RUN/eval/check-<key>.json`` with ``"kind": "check"``, its ``name``,
``value``, ``threshold`` (the minimum effect), ``status`` (pass | fail | skipped), a sentence
(``detail``), its exact test (``test``, ``p_value``, ``alpha``), its counts, its ``finding``
(``masking`` | ``weak-attack``) and the attack labels it ``doubts``.

A check fails only when its value exceeds the minimum effect AND its exact one-sided test
rejects at α = :data:`ALPHA` (0.01). Two attacks on the same points: McNemar's exact test on
the discordant points, ``binomtest(b, b + c, 0.5, alternative="greater")`` with b the points
the weaker attack left robust that the stronger breaks and c the reverse. One share: the
binomial test of k bad points of m against the minimum effect,
``binomtest(k, m, threshold, alternative="greater")``.

=====  ==================  ================================================  ======  =========
check  name                value (test)                                      effect  finding
=====  ==================  ================================================  ======  =========
(a)    ``aa-vs-pgd``,      share of the points the paper's PGD of the norm   > 0.20  weak PGD
       ``-l2``, ``-l1``    left robust that the reference (AutoAttack, else
                           APGD, of that norm) breaks (McNemar)
(b)    ``eps-monotone``    share of points PGD at a grid ε leaves robust     > 0.01  weak PGD
                           although it broke them at a smaller ε (McNemar
                           against the worst case over ε' ≤ ε)
(c)    ``unbounded-eps``   accuracy at ε = 1 (MNIST) / 0.5 (CIFAR), worst    > 0.02  masking
                           case over every ε up to it (binomial)
(d)    ``square``,         share of the points every gradient attack left    > 0.10  masking
       ``transfer``        robust that the black-box attack breaks (McNemar)
(e)    ``more-budget``     accuracy drop from PGD to more iterations (Table  > 0.05  weak PGD
                           6) or restarts (Table 7) (McNemar, largest drop)
(f)    ``zero-gradient``   share of correct points with an all-zero or non-  > 0.05  masking
                           finite CE input gradient (binomial)
(g)    ``fgsm-vs-pgd``     share of PGD-robust points FGSM breaks (McNemar)  > 0.05  weak PGD
(h)    ``incomplete-opt``  share of PGD-robust points whose loss still       > 0.10  weak PGD
                           rises at PGD's last steps (binomial)
(i)    ``unstable``        share of correct points whose loss changes        > 0.05  masking
                           between forward passes, when the defense is not
                           declared randomized (binomial; declared: pass,
                           AutoAttack runs its EOT version)
(j)    ``binarization``    share of feasible binarized tasks (Zimmermann et  > 0.10  weak PGD
                           al. 2022: a readout with a known adversarial
                           example in the ball) on which PGD fails
                           (binomial; not in the cheap subset)
(k)    ``rays``            share of the points every score-based attack      > 0.10  masking
                           (every gradient attack and Square) left robust
                           that RayS, which reads only decisions, breaks
                           (McNemar; records RayS's ADBD; not in the cheap
                           subset)
(l)    ``noise``           share of the points every gradient attack left    > 0.05  masking
                           robust that random noise breaks (uniform random
                           signs ±ε, many draws; McNemar): noise must never
                           beat gradients (Carlini et al. 2019, §5.2)
(m)    ``bpda``            for a model that declares a non-differentiable    > 0.10  weak
                           preprocessing: share of the points every other            gradient
                           gradient attack left robust that BPDA (identity           attacks
                           backward) breaks (McNemar); else skipped
(n)    ``adaptive``        for a defense that declares its own attack        > 0.10  weak
                           objective: share of the points every standard             gradient
                           gradient attack left robust that PGD on that              attacks
                           objective breaks (McNemar); else skipped
=====  ==================  ================================================  ======  =========

A ``masking`` finding doubts every white-box cell and the headline (†); a ``weak-attack``
finding only the cells of the attack it found weak (§, never the headline): see
:mod:`benchmark.report.verdicts` and the README's table. An overwhelming (a) (ℓ∞), (g) or (j)
is a masking finding (:data:`MASKING_EFFECT`, :func:`escalate`: more than 0.5, 0.25, 0.5 of
the cases fail, exact binomial test against that share; never for a declared randomized
defense). (f) looks at the clean point and at a uniform random start in the ε-ball.

A model that declares a non-differentiable preprocessing (:class:`attacks.bpda.NonDifferentiable`)
is attacked through BPDA, so the masking checks that read gradients read the gradient that BPDA
follows: (c) runs BPDA on the Figure 4 grid (``bpda-fig4``; (b) keeps PGD's) and (f) takes the
straight-through gradient. A quantiser declared and attacked with BPDA is then not doubted for
the zero gradient it was declared to have; a preprocessing that BPDA's identity does not
approximate still fails (c). Undeclared, the same model keeps its raw gradients and is flagged
(the zoo's shattered-gradient model). The rows of models without a declared preprocessing are
computed as before, hence no new check version (declared preprocessing landed one sitting
earlier, and no stored row outside the tests' folders came from such a model).

Minimum effects (:data:`THRESHOLDS`) are documented judgement calls. (a): published sound
models lose 5-10% of their PGD-robust points to AutoAttack (Madry's MNIST model 89→88, CIFAR
PGD-20 ~47-50→44; TRADES 56.6→53.1), a masked one most of them. (d), (g): a black-box or
one-step attack should find almost nothing PGD missed. (b): a point PGD broke at ε stays broken
in every larger ball. (c): with ε covering the whole box every input can be turned into any
image. (e): Table 6/7 of a sound model move by a point or two. (f): a zero gradient stops PGD
on CE where it starts. (h): Pintor et al.'s rule (5% of the loss's range over the last
iterates). The ε sweeps (b), (c) use the per-sample worst case over all ε up to the one
tested, so a weak attack at a large ε cannot fail the model (it fails (b), a weak-attack
finding). (d) compares the black-box attack with the worst case of every gradient attack on
the points: the table's PGD and FGSM, AutoAttack's gradient part (APGD-CE and APGD-T run alone,
since the standard version's Square is a black-box attack; the ``rand`` version as it is), and
every other white-box row of the run at that ε (Table 2's, Table 6/7's, C&W, adaptive).

Same points: every per-sample comparison uses the first N test points, where N is the number of
points of the run's AutoAttack row at that ε (the most points when there are several), or
``--n-examples``, or :data:`DEFAULT_CHECK_N` for the profile when no AutoAttack row exists.
Existing attack rows of the run with their per-sample flags (``flags/<eval_key>.pt``,
at least N points) are reused, sliced to the first N; anything missing is computed on those
points and its flags stored under the same key as ``advbench evaluate`` would (no attack row is
written, so tables do not change). Which rows were reused is recorded in ``reused``.

Cheap subset (``advbench run``): (a) and (e) only from existing rows, (b), (c), (f), (g), (h),
(i), (l), and (m), (n) where declared; never AutoAttack, Square or the transfer source.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy.stats import binomtest
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import same_eps, stable_hash
from benchmark.eval.worstcase import flags_payload, worst_case, write_headlines
from benchmark.run.resolve import helper_config
from benchmark.run.protocols import SUITE_EPS, AttackSpec, attack_specs, format_eps
from benchmark.store import atomic_torch_save, atomic_write_json, code_version, now, read_json, \
    safe_torch_load

logger = logging.getLogger(__name__)

#: check name → (letter, minimum effect); a check fails when its value exceeds the minimum
#: effect *and* its exact test rejects at :data:`ALPHA`
THRESHOLDS: dict[str, tuple[str, float]] = {
    "aa-vs-pgd": ("a", 0.20), "aa-vs-pgd-l2": ("a", 0.20), "aa-vs-pgd-l1": ("a", 0.20),
    "eps-monotone": ("b", 0.01), "unbounded-eps": ("c", 0.02),
    "square": ("d", 0.10), "transfer": ("d", 0.10), "more-budget": ("e", 0.05),
    "zero-gradient": ("f", 0.05), "fgsm-vs-pgd": ("g", 0.05), "incomplete-opt": ("h", 0.10),
    "unstable": ("i", 0.05), "binarization": ("j", 0.10), "rays": ("k", 0.10),
    "noise": ("l", 0.05), "bpda": ("m", 0.10), "adaptive": ("n", 0.10)}
CHECKS = tuple(THRESHOLDS)
#: version of each check's rule, written into every row it writes (``check_version``); bump a
#: check's number whenever its rule (value, test, minimum effect, finding or the attacks it
#: compares) changes. A row of another version, or of none (written before versions existed),
#: is stale (:func:`is_stale`): the report lists it apart and never reads it as a finding, and
#: ``advbench check`` recomputes it instead of reusing it.
CHECK_VERSIONS: dict[str, int] = {name: 1 for name in THRESHOLDS}
#: (a) and (j) got their masking escalation (:data:`MASKING_EFFECT`, issue 30)
CHECK_VERSIONS.update({"aa-vs-pgd": 2, "fgsm-vs-pgd": 2, "binarization": 2})
#: (f) also looks at a random start in the ε-ball (issue 30)
CHECK_VERSIONS["zero-gradient"] = 2
#: weak-attack checks whose finding becomes ``masking`` when it is overwhelming (issue 30):
#: more than this share of the attack's cases fail (AutoAttack breaks most of the points PGD
#: left robust; FGSM, PGD's own first step, breaks a quarter of them, Athalye et al. 2018's
#: first characteristic of obfuscated gradients; PGD misses most of the adversarial examples
#: known to exist), by the exact one-sided binomial test against this share at
#: :data:`ALPHA`, on a defense not declared randomized (whose PGD lacks EOT by design). Such a
#: gradient attack is not merely weak: its gradients mislead. Honest runs stay far below
#: (results/runs, every healthy MNIST and CIFAR-10-JPEG run with a headline above 0: (a) at
#: most 0.30, 17 of 56 on the 3-epoch mnist5k AT; (g) at most 0.038, 1 of 26; (j) 0
#: failures in 91-100 tasks). Not the per-norm (a)-ℓ2/ℓ1: the paper's PGD-ℓ1 misses 59 of 60
#: on honest MNIST AT
MASKING_EFFECT: dict[str, float] = {"aa-vs-pgd": 0.5, "fgsm-vs-pgd": 0.25,
                                    "binarization": 0.5}
CHEAP = ("aa-vs-pgd", "aa-vs-pgd-l2", "aa-vs-pgd-l1", "eps-monotone", "unbounded-eps",
         "more-budget", "zero-gradient", "fgsm-vs-pgd", "incomplete-opt", "unstable", "noise",
         "bpda", "adaptive")
#: significance level of every check's exact one-sided test
ALPHA = 0.01
#: what a failed check says: ``masking`` (gradients are broken: every white-box cell and the
#: headline are doubted, mark †) or ``weak-attack`` (one attack is weak: only its cells, §)
FINDING: dict[str, str] = {
    "aa-vs-pgd": "weak-attack", "aa-vs-pgd-l2": "weak-attack", "aa-vs-pgd-l1": "weak-attack",
    "eps-monotone": "weak-attack", "unbounded-eps": "masking", "square": "masking",
    "transfer": "masking", "more-budget": "weak-attack", "zero-gradient": "masking",
    "fgsm-vs-pgd": "weak-attack", "incomplete-opt": "weak-attack", "unstable": "masking",
    "binarization": "weak-attack", "rays": "masking", "noise": "masking",
    "bpda": "weak-attack", "adaptive": "weak-attack"}
#: the attack labels a weak-attack check doubts by default (rows may narrow them: ``doubts``)
WEAK_CELLS: dict[str, tuple[str, ...]] = {
    "aa-vs-pgd": ("pgd",), "aa-vs-pgd-l2": ("pgd-l2",), "aa-vs-pgd-l1": ("pgd-l1",),
    "eps-monotone": ("pgd-fig4",), "more-budget": ("pgd",), "fgsm-vs-pgd": ("pgd",),
    "incomplete-opt": ("pgd",), "binarization": ("pgd",)}
#: per norm: the paper's attack and the reference attacks (first available wins) of check (a)
REFERENCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "linf": ("pgd", ("autoattack",)), "l2": ("pgd-l2", ("autoattack-l2", "apgd-l2")),
    "l1": ("pgd-l1", ("autoattack-l1", "apgd-l1"))}
#: the (a) checks of the other norms (run at the paper's column's ε of that norm)
PER_NORM = ("aa-vs-pgd-l2", "aa-vs-pgd-l1")
#: registered attacks that never read the target's gradients
BLACK_BOX = frozenset({"square", "transfer", "rays"})
#: registered attacks that read only the target's decisions (check (k))
DECISION_ONLY = frozenset({"rays"})
#: AutoAttack sub-attacks that read gradients (its white-box part, for check (d))
AA_WHITE_BOX = ("apgd-ce", "apgd-t")
#: incomplete optimisation (Pintor et al. 2022): the running best of the attack loss, scaled
#: to [0, 1] per point, still rises by more than INCOMPLETE_RISE over the last
#: INCOMPLETE_SHARE of the iterates (at least 2; Pintor et al. take the last 10 of 100+)
INCOMPLETE_RISE, INCOMPLETE_SHARE = 0.05, 0.1
#: forward passes per point of the unstable-predictions check (i)
UNSTABLE_DRAWS = 4
#: ε that covers the whole [0,1] box for the scale's images (l∞)
UNBOUNDED_EPS = {"mnist": 1.0, "cifar": 0.5}
#: test points of the checks when the run has no AutoAttack row (cpu: AutoAttack's cpu cap)
DEFAULT_CHECK_N = {"cpu": 100, "paper": 1000}
#: Square's queries per point in the check (AutoAttack's 5000 on GPUs; fewer on 2 CPU cores)
SQUARE_QUERIES = {"cpu": 1000, "paper": 5000}
#: RayS's queries per point in the check (the paper's 10000; fewer on 2 CPU cores)
RAYS_QUERIES = {"cpu": 2000, "paper": 10000}
#: random-noise draws per point of check (l) (corners of the l∞ ball: ±ε per coordinate)
NOISE_DRAWS = {"cpu": 20, "paper": 100}
#: Table 6/7 budgets computed when the run has no such rows (more when rows exist)
MORE_STEPS, MORE_RESTARTS = 100, 5
SOURCE_DEFENSE = "st"


@dataclass
class CheckResult:
    """One check at one ε: ``passed`` is None when it was skipped (``detail`` says why).

    ``p_value`` is the check's exact one-sided test (``test`` names it); ``doubts`` the attack
    labels a failed weak-attack check doubts (empty for masking checks: every white-box cell).
    """

    name: str
    value: Optional[float]
    passed: Optional[bool]
    detail: str
    n_points: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    p_value: Optional[float] = None
    test: str = ""
    doubts: list[str] = field(default_factory=list)

    @property
    def letter(self) -> str:
        return THRESHOLDS[self.name][0]

    @property
    def threshold(self) -> float:
        return THRESHOLDS[self.name][1]

    @property
    def finding(self) -> str:
        return "masking" if self.extra.get("escalated") else FINDING[self.name]

    @property
    def status(self) -> str:
        return "skipped" if self.passed is None else "pass" if self.passed else "fail"


#: tolerance of the threshold comparison: accuracies are float32 means, so a drop of exactly
#: 5 of 100 points can come out as 0.05000001 (measured on a real MART run: 72% → 67%)
JUDGE_TOL = 1e-6


def _judge(name: str, value: float, detail: str, n: int, p_value: Optional[float] = None,
           test: str = "", doubts: Sequence[str] = (), **extra: Any) -> CheckResult:
    """Fail when ``value`` exceeds the minimum effect (up to :data:`JUDGE_TOL`) and the test's
    p-value is below :data:`ALPHA` (no p-value: the effect alone decides)."""
    big = value > THRESHOLDS[name][1] + JUDGE_TOL
    significant = p_value is None or p_value < ALPHA
    if p_value is not None:
        detail += f"; {test} p = {p_value:.2g} (α = {ALPHA:g})"
    return CheckResult(name, float(value), not (big and significant), detail, n, extra,
                       p_value, test, list(doubts or WEAK_CELLS.get(name, ())))


def _judge_share(name: str, k: int, m: int, detail: str, n: int, doubts: Sequence[str] = (),
                 **extra: Any) -> CheckResult:
    """A share check: ``k`` bad of ``m`` points against the minimum effect of ``name``, with the
    exact one-sided binomial test (:func:`excess_test`)."""
    share = THRESHOLDS[name][1]
    return _judge(name, k / m if m else 0.0, detail, n, excess_test(k, m, share),
                  f"binomial exact one-sided vs {share:g}", doubts, **extra)


def is_stale(row: Mapping[str, Any]) -> bool:
    """Whether a ``check`` row was written by another version of its check's rule than
    :data:`CHECK_VERSIONS` holds (or by none, or by a check that no longer exists)."""
    current = CHECK_VERSIONS.get(str(row.get("check")))
    return row.get("kind") == "check" and (current is None or
                                           row.get("check_version") != current)


def renew_command(row: Mapping[str, Any], names: Sequence[str] = ()) -> str:
    """The command that renews a stale check row (``RUNS`` is the runs folder)."""
    run = f"RUNS/{row.get('dataset')}/{row.get('defense')}/{row.get('run_id')}"
    ckpt = row.get("checkpoint") or "best"
    return (f"advbench check --run {run} --checks {','.join(names or [str(row.get('check'))])}"
            + ("" if ckpt == "best" else f" --checkpoint {ckpt}"))


def skipped(name: str, why: str) -> CheckResult:
    return CheckResult(name, None, None, why)


def escalate(res: CheckResult, k: int, m: int) -> CheckResult:
    """A failed weak-attack check of :data:`MASKING_EFFECT` whose effect is overwhelming
    becomes a masking finding: ``k`` failures of ``m`` cases exceed the check's masking share
    and the exact one-sided binomial test against that share rejects at :data:`ALPHA`. The row
    records ``masking_effect``, ``masking_p`` and ``escalated``; an escalated row doubts every
    white-box cell and the headline (``doubts`` empty), like every masking check."""
    share = MASKING_EFFECT.get(res.name)
    if share is None or res.passed is not False or not m:
        return res
    p = excess_test(k, m, share)
    res.extra.update(masking_effect=share, masking_p=p)
    if k / m > share + JUDGE_TOL and p < ALPHA:
        res.extra["escalated"] = True
        res.doubts = []
        res.detail += (f"; masking: {k} of {m} > {share:g}, binomial exact one-sided vs "
                       f"{share:g} p = {p:.2g} < α: the gradients mislead, not merely a weak "
                       f"attack")
    return res


# ------------------------------------------------------------------- statistics
def paired_test(weak: Tensor, strong: Tensor) -> tuple[int, int, float]:
    """Exact one-sided McNemar test that ``strong`` breaks more points than ``weak``.

    Returns (b, c, p): b points robust under ``weak`` that ``strong`` breaks, c the reverse,
    and ``binomtest(b, b + c, 0.5, alternative="greater")``'s p-value (1 without discordant
    points).
    """
    b, c = int((weak & ~strong).sum()), int((~weak & strong).sum())
    p = float(binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0
    return b, c, p


def excess_test(k: int, m: int, share: float) -> float:
    """Exact one-sided binomial p-value that more than ``share`` of ``m`` points are bad,
    given ``k`` bad ones (1 when ``m`` is 0)."""
    return float(binomtest(k, m, share, alternative="greater").pvalue) if m else 1.0


# ------------------------------------------------------------------- the checks (pure)
def broken_beyond(ref: Tensor, other: Tensor) -> tuple[int, int]:
    """(points robust under ``ref`` that ``other`` breaks, points robust under ``ref``)."""
    return int((ref & ~other).sum()), int(ref.sum())


def per_sample_gap(name: str, ref: Tensor, other: Tensor, what: str, ref_what: str = "PGD",
                   doubts: Sequence[str] = ()) -> CheckResult:
    """Checks (a), (d), (g): share of the points ``ref`` left robust that ``other`` breaks,
    with the exact McNemar test on the discordant points."""
    b, c, p = paired_test(ref, other)
    m = int(ref.sum())
    value = b / m if m else 0.0
    return _judge(name, value, f"{what} breaks {b} of the {m} points {ref_what} left robust "
                               f"and misses {c} that {ref_what} broke ({ref_what} "
                               f"{100 * ref.float().mean():.1f}%, {what} "
                               f"{100 * other.float().mean():.1f}% on {len(ref)} points)",
                  len(ref), p, "McNemar exact one-sided", doubts, broken=b, pgd_robust=m,
                  discordant_other=c, pgd_acc=float(ref.float().mean()),
                  other_acc=float(other.float().mean()))


def eps_monotone(grid: Sequence[tuple[float, Tensor]], n: int) -> CheckResult:
    """Check (b) on per-sample flags of the Figure 4 grid.

    A point robust at ε must be robust at every smaller ε, so the curve reported is the
    per-sample worst case over all ε up to each one (it never rises). The check counts the
    points the attack at ε left robust although it broke them at a smaller ε: its own failure
    at the larger ε (an attack that is weak there), tested like check (a).
    """
    grid = sorted(grid, key=lambda g: g[0])
    worst = None
    curve, curve_worst, found = {}, {}, []
    for e, flags in grid:
        worst = flags.clone() if worst is None else worst & flags
        curve[format_eps(e)] = float(flags.float().mean())
        curve_worst[format_eps(e)] = float(worst.float().mean())
        b, c, p = paired_test(flags, worst)
        found.append((b / max(n, 1), b, p, e))
    value, b, p, e = max(found, key=lambda t: (t[0], -t[2])) if found else (0.0, 0, 1.0, math.nan)
    text = ", ".join(f"{k}: {100 * v:.1f}" for k, v in curve.items())
    detail = (f"PGD at ε={format_eps(e)} leaves robust {b} points it broke at a smaller ε"
              if b else "PGD never leaves robust a point it broke at a smaller ε") + \
        f" (PGD, Figure 4 grid, %: {text})"
    return _judge("eps-monotone", value, detail, n, p, "McNemar exact one-sided", (),
                  curve=curve, curve_worst=curve_worst, inconsistent=b)


def unbounded(worst: Tensor, plain: float, eps: float) -> CheckResult:
    """Check (c): accuracy at an ε covering the whole box, per-sample worst case over every
    ε up to it (so a weak attack at that ε alone cannot fail the model); ``plain`` is the
    attack's own accuracy at ``eps``."""
    k, n = int(worst.sum()), len(worst)
    return _judge_share("unbounded-eps", k, n,
                        f"at ε={format_eps(eps)} {k} of {n} points stay robust under the worst "
                        f"case of PGD over every ε up to it (PGD at ε={format_eps(eps)} alone: "
                        f"{100 * plain:.1f}%)", n, unbounded_eps=eps, robust=k, plain_acc=plain)


def eps_curve(points: Sequence[tuple[float, Tensor]], chance: float
              ) -> tuple[dict[str, float], Optional[float]]:
    """Accuracy versus ε up to chance (Carlini et al. 2019's checklist), from the flags check
    (c) already computed: per ε (ascending), the accuracy of the per-sample worst case over
    every attack at every ε′ ≤ ε (so it never rises), and the smallest ε at which it is at most
    ``chance`` (None: not reached on the grid)."""
    worst: Optional[Tensor] = None
    curve: dict[str, float] = {}
    at: Optional[float] = None
    for e, flags in sorted(points, key=lambda p: p[0]):
        worst = flags.cpu().bool() if worst is None else worst & flags.cpu().bool()
        acc = float(worst.float().mean())
        curve[format_eps(e)] = acc
        if at is None and acc <= chance + JUDGE_TOL:
            at = float(e)
    return curve, at


def with_curve(res: CheckResult, points: Sequence[tuple[float, Tensor]], chance: float
               ) -> CheckResult:
    """Check (c)'s result with the accuracy-versus-ε curve (``eps_curve``), the ε at which
    it reaches chance (``eps_at_chance``) and ``chance`` recorded, and said in its detail."""
    curve, at = eps_curve(points, chance)
    res.extra.update(eps_curve=curve, eps_at_chance=at, chance=chance)
    text = ", ".join(f"{k} {100 * v:.1f}" for k, v in curve.items())
    reach = f"at chance ({100 * chance:.1f}%) from ε={format_eps(at)}" if at is not None \
        else f"never at chance ({100 * chance:.1f}%) up to ε={list(curve)[-1]}"
    res.detail += f"; accuracy vs ε (worst case over ε′ ≤ ε, %): {text}; {reach}"
    return res


def more_budget(pairs: Sequence[tuple[str, Tensor, str, Tensor]], n: int,
                doubts: Sequence[str] = ()) -> CheckResult:
    """Check (e): ``pairs`` of (base label, flags, stronger label, flags); the value is the
    largest accuracy drop, tested by McNemar on that pair's discordant points."""
    rows = []
    for la, a, lb, b in pairs:
        k, c, p = paired_test(a, b)
        rows.append(((k - c) / max(len(a), 1), p, la, lb, float(a.float().mean()),
                     float(b.float().mean()), k, c))
    drop, p, la, lb, a, b, k, c = max(rows, key=lambda r: (r[0], -r[1]))
    parts = "; ".join(f"{x} {100 * q:.1f}% → {y} {100 * r:.1f}%"
                      for _, _, x, y, q, r, _, _ in rows)
    return _judge("more-budget", max(drop, 0.0),
                  f"largest drop {100 * drop:.1f} points ({parts}); {lb} breaks {k} points "
                  f"{la} left robust and misses {c}", n, p, "McNemar exact one-sided", doubts,
                  pairs=[[r[2], r[4], r[3], r[5], r[6], r[7], r[1]] for r in rows])


def zero_gradient(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor,
                  batch_size: int = 256, eps: Optional[float] = None) -> CheckResult:
    """Check (f): share of correctly classified points whose CE input gradient is all zero
    or has a non-finite entry (model in eval mode, as the attacks see it), at the point and,
    with ``eps``, also at PGD's kind of start, a uniform random point of the l∞ ε-ball (seeded):
    Pintor et al.'s unavailable gradients are measured where the attack runs, and a gradient
    that is honest at the clean point only (a mask active on the ball around it) still stalls
    every attack that starts or steps inside the ball."""
    bad = _zero_gradient_at(model, x, y, batch_size)
    where = "at the point"
    if eps is not None and eps > 0:
        gen = torch.Generator(device=x.device).manual_seed(0)
        start = (x + eps * (2 * torch.rand(x.shape, generator=gen, device=x.device) - 1)
                 ).clamp(0, 1)
        bad |= _zero_gradient_at(model, start, y, batch_size)
        where = "at the point or at a uniform random start in the ε-ball"
    m = int(clean.sum())
    k = int((bad & clean).sum())
    return _judge_share("zero-gradient", k, m,
                        f"{k} of {m} correctly classified points have an all-zero or non-finite "
                        f"CE input gradient {where}", len(y), zero_or_nonfinite=k, correct=m)


def _zero_gradient_at(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Per point: the CE input gradient at ``x`` is all zero, not finite, or absent."""
    bad = torch.zeros(len(y), dtype=torch.bool)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].clone().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(xb).float(), y[i:i + batch_size], reduction="sum")
                if not loss.requires_grad:  # no graph back to the input at all
                    bad[i:i + batch_size] = True
                    continue
                (g,) = torch.autograd.grad(loss, xb, allow_unused=True)
            if g is None:
                bad[i:i + batch_size] = True
                continue
            g = g.flatten(1)
            bad[i:i + batch_size] = ((g == 0).all(1) | ~torch.isfinite(g).all(1)).cpu()
    finally:
        for m, flag in was:
            m.training = flag
    return bad


def loss_trajectories(model: nn.Module, attack: Any, x: Tensor, y: Tensor,
                      batch_size: int = 256) -> Tensor:
    """Per-point CE loss at every iterate of a gradient attack (the points it evaluates its
    objective at) and at its final x': N × (calls + 1)."""
    out = []
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        seen: list[Tensor] = []

        def objective(m: nn.Module, xa: Tensor, x0: Tensor, yy: Tensor) -> Tensor:
            v = F.cross_entropy(m(xa).float(), yy, reduction="none")
            seen.append(v.detach().cpu())
            return v

        xa = attack(model, xb, yb, loss=objective)
        with torch.no_grad():
            seen.append(F.cross_entropy(model(xa).float(), yb, reduction="none").cpu())
        out.append(torch.stack(seen, 1))
    return torch.cat(out) if out else torch.zeros(0, 1)


def still_improving(losses: Tensor, share: float = INCOMPLETE_SHARE,
                    rise: float = INCOMPLETE_RISE) -> Tensor:
    """Pintor et al.'s incomplete-optimisation indicator per point: the running best of the
    (maximised) loss, scaled to [0, 1] per point, gains more than ``rise`` over the last
    ``share`` of the iterates (at least 2)."""
    best = torch.cummax(losses, 1).values
    lo, hi = best.min(1, keepdim=True).values, best.max(1, keepdim=True).values
    scaled = (best - lo) / (hi - lo).clamp_min(1e-12)
    last = scaled[:, -min(max(2, round(share * scaled.shape[1])), scaled.shape[1]):]
    return (last[:, -1] - last[:, 0]) > rise


def incomplete_opt(losses: Tensor, label: str) -> CheckResult:
    """Check (h): share of the points an attack left robust whose loss was still rising at
    its last steps (``losses`` of those points only)."""
    k, m = int(still_improving(losses).sum()), losses.shape[0]
    return _judge_share("incomplete-opt", k, m,
                        f"{label}'s loss is still rising over its last "
                        f"{100 * INCOMPLETE_SHARE:g}% of steps on {k} of the {m} points it left "
                        f"robust", m, (label,), still_rising=k, attacked=m,
                        steps=losses.shape[1] - 1)


def _has_black_box(spec: AttackSpec) -> bool:
    """Whether an AutoAttack spec runs Square (the standard version ends with it)."""
    version = spec.hparams.get("version", "standard")
    return version == "standard" or (version == "custom" and
                                     "square" in (spec.hparams.get("attacks") or ()))


def unstable(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor, randomized: bool,
             draws: int = UNSTABLE_DRAWS, batch_size: int = 256) -> CheckResult:
    """Check (i), Pintor et al.'s unstable predictions: share of correctly classified points
    whose loss differs between repeated forward passes in eval mode. A randomized model
    attacked without EOT has stochastic gradients (Athalye et al. 2018, §4.2): masking, unless
    the defense is declared randomized (its AutoAttack is then the EOT ``rand`` version)."""
    from benchmark.eval.flags import predict
    ces = torch.stack([predict(model, x, y, batch_size)[1] for _ in range(draws)])
    varies = (ces.max(0).values - ces.min(0).values) > 1e-5 * (1 + ces.abs().max(0).values)
    m, k = int(clean.sum()), int((varies & clean).sum())
    if randomized:
        return CheckResult("unstable", k / m if m else 0.0, True,
                           f"{k} of {m} correctly classified points change their loss between "
                           f"forward passes; the defense is declared randomized, so "
                           f"AutoAttack runs its EOT version (rand)", len(y),
                           {"varying": k, "correct": m, "declared_randomized": True})
    return _judge_share("unstable", k, m,
                        f"{k} of {m} correctly classified points change their loss between "
                        f"{draws} forward passes, and the attacks use no EOT", len(y),
                        varying=k, correct=m, declared_randomized=False)


def binarization(model: nn.Module, spec: AttackSpec, x: Tensor) -> CheckResult:
    """Check (j), Zimmermann et al.'s binarization test of the attack ``spec`` on the points
    ``x`` (:mod:`benchmark.eval.binarization`): share of the feasible binarized tasks, each with
    a known adversarial example in the ε-ball, on which the attack fails."""
    from benchmark.eval.binarization import binarization_test
    feasible, failed, n = binarization_test(model, spec.build(seed=0), x, spec.eps)
    if not feasible:
        return skipped("binarization", f"no feasible binarized task on {n} points (the "
                                       f"readout never separated the boundary point)")
    return _judge_share("binarization", failed, feasible,
                        f"{spec.label} fails on {failed} of {feasible} binarized tasks that have "
                        f"an adversarial example in the ε-ball ({n - feasible} of {n} points had "
                        f"no feasible readout)", n, (spec.label,), failed=failed,
                        feasible=feasible)


def boundary_distances(atk: Any, clean: Tensor) -> Optional[Tensor]:
    """Per-point decision-boundary distances of a decision-based attack that records them
    (:attr:`attacks.rays.RayS.distances`, one tensor per batch of the correctly classified
    points, in order), on all points: 0 for a misclassified point; None for other attacks."""
    got = getattr(atk, "distances", None)
    if not got:
        return None
    out = torch.zeros(len(clean))
    out[torch.nonzero(clean.cpu()).flatten()] = torch.cat(got).float()
    return out


def noise_flags(model: nn.Module, x: Tensor, y: Tensor, eps: float, draws: int,
                batch_size: int = 256, seed: int = 0) -> Tensor:
    """Per point: still correctly classified under every one of ``draws`` random corners of
    the l∞ ball (x + ε·s, s uniform in {-1, +1}^d, clipped to [0, 1])."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    robust = torch.ones(len(y), dtype=torch.bool)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(draws):
                for i in range(0, len(y), batch_size):
                    xb = x[i:i + batch_size]
                    s = torch.randint(0, 2, xb.shape, generator=gen, device=x.device) * 2 - 1
                    out = model((xb + eps * s.to(xb.dtype)).clamp(0, 1))
                    robust[i:i + batch_size] &= (out.argmax(1) == y[i:i + batch_size]).cpu()
    finally:
        for m, flag in was:
            m.training = flag
    return robust


def decision_gap(score: Tensor, decision: Tensor, labels: Sequence[str],
                 distances: Optional[Tensor]) -> CheckResult:
    """Check (k): share of the points every score-based attack left robust that the
    decision-only attack (RayS) breaks, with its ADBD (mean boundary distance, all points)."""
    res = per_sample_gap("rays", score, decision, "RayS", "every score-based attack")
    res.extra["score_based"] = list(labels)
    if distances is not None:
        adbd = float(distances.mean())
        res.extra["adbd"] = adbd
        res.detail += f"; RayS's ADBD {adbd:.4f}"
    return res


def declares_adaptive(defense: Any) -> bool:
    """Whether ``defense`` declares its own attack objective (the hook of check (n)): an
    advbench defense that overrides :meth:`~defenses.Defense.objective` (adv-dpnp's Table 8
    loss), or an outside model given ``objective=`` (``benchmark.evaluate_model``)."""
    fn = getattr(defense, "declares_adaptive_attack", None)
    return bool(fn()) if callable(fn) else False


def cell_labels(labels: Sequence[str]) -> list[str]:
    """Attack labels as table cells name them (AutoAttack's gradient part is its cell)."""
    return sorted({"autoattack" if lab == "autoattack-apgd" else lab for lab in labels})


def beyond_gradients(name: str, wb: Tensor, labels: Sequence[str], other: Tensor,
                     what: str) -> CheckResult:
    """Checks (m), (n): share of the points every other gradient attack left robust that
    ``other`` (BPDA, the defense's adaptive attack) breaks; a weak-attack finding on those
    attacks' cells (the headline holds ``other``'s flags, so it is not doubted)."""
    res = per_sample_gap(name, wb, other, what, "every other gradient attack",
                         cell_labels(labels))
    res.extra["white_box"] = list(labels)
    return res


# ------------------------------------------------------------------- the driver
FlagSource = Callable[[AttackSpec], Tensor]


@dataclass
class Checker:
    """Runs the checks for one model on fixed points.

    Args:
        model: the target in eval mode.
        x, y: the check's points (the first N test points).
        scale: ``mnist`` or ``cifar`` (attack protocols, the Figure 4 grid, unbounded ε).
        profile: ``cpu`` or ``paper`` (Square's budget).
        flags: robust flags of a spec on these points; default: attack in memory.
        overrides: attack name → hyperparameters replacing the spec's (tests, quick checks).
        randomized: the defense is randomized (AutoAttack's ``rand`` version).
        transfer_source: run folder / checkpoint / model of the transfer source (None: skip).
        no_source: why there is no transfer source (said in the skipped row).
        existing: whether a spec's flags are already stored (the cheap subset uses only those).
        batch_size: attack batch.
        defense: the run's defense (its ``objective`` is the adaptive attack's loss, check
            (n)); None: no declared attack.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    scale: str
    profile: str = "cpu"
    flags: Optional[FlagSource] = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    randomized: bool = False
    transfer_source: Any = None
    existing: Callable[[AttackSpec], bool] = lambda spec: False
    batch_size: int = 256
    no_source: str = ""
    defense: Any = None

    def __post_init__(self) -> None:
        from benchmark.eval.flags import predict
        self.clean = predict(self.model, self.x, self.y, self.batch_size)[0]
        self._cache: dict[str, Tensor] = {}

    @property
    def declared(self) -> bool:
        """The model declares a non-differentiable preprocessing: (c) and (f) read BPDA's
        gradient (the module docstring)."""
        from attacks.bpda import declares_nondifferentiable
        return declares_nondifferentiable(self.model)

    def sweep_spec(self, eps: float) -> AttackSpec:
        """Check (c)'s attack at ``eps`` of the Figure 4 grid: PGD, or on a model that
        declares a non-differentiable preprocessing BPDA with the same budget."""
        if not self.declared:
            return self.spec("pgd-fig4", eps)
        return self.spec("bpda-fig4", eps, attack="bpda",
                         **attack_specs(self.scale)["pgd-fig4"].hparams)

    def _through_bpda(self, res: CheckResult) -> CheckResult:
        """``res`` of (c) or (f), saying when it read BPDA's gradient (``gradient``)."""
        if self.declared:
            res.extra["gradient"] = "bpda"
            res.detail += ("; through BPDA: the model declares a non-differentiable "
                           "preprocessing, whose backward pass is the identity here")
        return res

    def spec(self, label: str, eps: Optional[float] = None, attack: Optional[str] = None,
             norm: str = "linf", **hp: Any) -> AttackSpec:
        """The check's spec of a column label at ``eps`` (None: the label's own ε), with the
        randomized adaptation and the ``overrides`` applied."""
        specs = attack_specs(self.scale)
        base = specs.get(label) or AttackSpec(label, attack or label, norm,
                                              eps if eps is not None else math.nan)
        spec = (base if eps is None else base.with_eps(eps)).with_hparams(**hp)
        from benchmark.eval.flags import adapt_spec
        spec = adapt_spec(spec, self.randomized)
        return spec.with_hparams(**self.overrides.get(spec.attack, {}))

    def robust(self, spec: AttackSpec) -> Tensor:
        self.__dict__.setdefault("used", []).append(f"{spec.label}@{format_eps(spec.eps)}")
        key = stable_hash(spec.key())
        if key not in self._cache:
            self.__dict__.setdefault("_specs", {})[key] = spec
            if self.flags is not None:
                self._cache[key] = self.flags(spec)
            else:
                from benchmark.eval.flags import attack_points
                source = self.transfer_source if spec.attack == "transfer" else None
                atk = spec.build(seed=0)
                if isinstance(source, nn.Module):
                    atk.source_model = source
                self._cache[key] = attack_points(self.model, atk, self.x, self.y,
                                                 clean=self.clean, clean_ce=torch.zeros(len(
                                                     self.y)), batch_size=self.batch_size,
                                                 loss=attack_objective(spec, self.defense))[0]
                dist = boundary_distances(atk, self.clean)
                if dist is not None:
                    self.__dict__.setdefault("_dist", {})[key] = dist
        return self._cache[key]

    def distances(self, spec: AttackSpec) -> Optional[Tensor]:
        """Boundary distances a decision-based attack recorded on these points (or None)."""
        self.robust(spec)
        got = self.__dict__.get("_dist", {}).get(stable_hash(spec.key()))
        lister = getattr(self.flags, "distances", None)
        return got if got is not None or not callable(lister) else lister(spec)

    def acc(self, spec: AttackSpec) -> float:
        return float(self.robust(spec).float().mean())

    def num_classes(self) -> int:
        """The model's number of classes (its output width on one point; eval mode)."""
        with torch.no_grad():
            return int(self.model(self.x[:1]).shape[1])

    def white_box(self, eps: float, cheap: bool = False,
                  exclude: Sequence[str] = ()) -> tuple[Tensor, list[str]]:
        """Per-sample worst case over every gradient attack at ``eps`` (l∞) on these points:
        the table's PGD and FGSM, AutoAttack's gradient part, and every other white-box attack
        that already ran here (this checker's and the run's stored rows), but the registered
        attacks in ``exclude``; with the labels."""
        specs = [self.spec("pgd", eps), self.spec("fgsm", eps)]
        aa = self.spec("autoattack", eps)
        if aa.hparams.get("version") == "rand":  # APGD-CE/DLR with EOT: no black-box part
            specs.append(aa)
        elif not cheap or self.existing(self._aa_white_box(eps)):
            specs.append(self._aa_white_box(eps))
        known = list(self.__dict__.get("_specs", {}).values()) + list(self.stored(eps))
        for s in known:
            if s.norm == "linf" and np.isclose(s.eps, eps) and s.attack not in BLACK_BOX and \
                    s.attack not in exclude and \
                    not (s.attack == "autoattack" and _has_black_box(s)) and s not in specs:
                specs.append(s)
        flags = [self.robust(s) for s in specs]
        return worst_case(flags), sorted({s.label for s in specs})

    def _aa_white_box(self, eps: float) -> AttackSpec:
        """AutoAttack's gradient sub-attacks alone (its standard version ends with Square,
        whose successes must not count as a gradient attack's in check (d))."""
        aa = self.spec("autoattack", eps)
        subs = [a for a in (aa.hparams.get("attacks") or AA_WHITE_BOX) if a in AA_WHITE_BOX]
        return replace(aa, label="autoattack-apgd").with_hparams(
            version="custom", attacks=subs or list(AA_WHITE_BOX))

    def run(self, eps: float, names: Sequence[str] = CHECKS, *,
            cheap: bool = False) -> list[CheckResult]:
        """The checks ``names`` at ``eps``; with ``cheap`` the expensive ones are skipped
        unless their inputs already exist. The per-norm (a) checks (``aa-vs-pgd-l2``,
        ``-l1``) run at their norm's ε (the paper's column's), not at ``eps``."""
        n = len(self.y)
        out = []
        pgd = self.spec("pgd", eps)
        for name in names:
            if name.startswith("aa-vs-pgd"):
                res = self._reference(name, eps, cheap)
                if not self.randomized:  # a declared randomized defense's PGD lacks EOT
                    res = escalate(res, res.extra.get("broken", 0), res.extra.get(
                        "pgd_robust", 0))
                out.append(res)
            elif name == "eps-monotone":
                grid = SUITE_EPS["fig4"][self.scale]
                out.append(eps_monotone([(e, self.robust(self.spec("pgd-fig4", e)))
                                         for e in grid], n))
            elif name == "unbounded-eps":
                e = UNBOUNDED_EPS[self.scale]
                top = self.sweep_spec(e)
                ref = self.spec("bpda", eps) if self.declared else pgd
                grid = [g for g in SUITE_EPS["fig4"][self.scale] if g <= e]
                below = [self.robust(self.sweep_spec(g)) for g in grid]
                worst = worst_case([self.robust(top), self.robust(ref), *below])
                res = with_curve(unbounded(worst, self.acc(top), e),
                                 [*zip(grid, below), (ref.eps, self.robust(ref)),
                                  (e, self.robust(top))], 1.0 / self.num_classes())
                out.append(self._through_bpda(res))
            elif name in ("square", "transfer"):
                if cheap:
                    out.append(skipped(name, "not in the cheap subset (advbench check)"))
                    continue
                if name == "transfer" and self.transfer_source is None:
                    out.append(skipped(name, f"skipped for want of a source model: "
                                             f"{self.no_source or 'none given'}"))
                    continue
                if name == "square":
                    bb = self.spec("square", eps, n_queries=SQUARE_QUERIES.get(self.profile,
                                                                               5000))
                    what = "Square"
                else:
                    src = self.transfer_source
                    bb = self.spec("transfer", eps, source=_source_label(src))
                    what = "the transfer attack"
                wb, labels = self.white_box(eps)
                res = per_sample_gap(name, wb, self.robust(bb), what,
                                     "every gradient attack")
                res.extra["white_box"] = labels
                out.append(res)
            elif name == "rays":
                if cheap:
                    out.append(skipped(name, "not in the cheap subset (advbench check)"))
                    continue
                if self.randomized:
                    out.append(skipped(name, "the defense is declared randomized: a hard-label "
                                             "ray search needs deterministic decisions"))
                    continue
                rs = self.spec("rays", eps, n_queries=RAYS_QUERIES.get(self.profile, 10000))
                wb, labels = self.white_box(eps)
                sq = self.spec("square", eps, n_queries=SQUARE_QUERIES.get(self.profile, 5000))
                score = worst_case([wb, self.robust(sq)])
                res = decision_gap(score, self.robust(rs), [*labels, sq.label],
                                   self.distances(rs))
                out.append(res)
            elif name == "noise":
                if self.randomized:
                    out.append(skipped(name, "the defense is declared randomized: one draw of "
                                             "noise cannot be told from one of the defense"))
                    continue
                draws = NOISE_DRAWS.get(self.profile, 100)
                wb, labels = self.white_box(eps, cheap)
                noisy = noise_flags(self.model, self.x, self.y, eps, draws, self.batch_size)
                res = per_sample_gap(name, wb, noisy & self.clean.cpu(),
                                     f"random noise ({draws} draws of ±ε)",
                                     "every gradient attack")
                res.extra.update(white_box=labels, draws=draws)
                out.append(res)
            elif name == "bpda":
                from attacks.bpda import declares_nondifferentiable
                if not declares_nondifferentiable(self.model):
                    out.append(skipped(name, "the model declares no non-differentiable "
                                             "preprocessing (attacks.bpda.NonDifferentiable)"))
                    continue
                wb, labels = self.white_box(eps, cheap, exclude=("bpda",))
                out.append(beyond_gradients(name, wb, labels,
                                            self.robust(self.spec("bpda", eps)), "BPDA"))
            elif name == "adaptive":
                if not declares_adaptive(self.defense):
                    out.append(skipped(name, "the defense declares no attack objective of its "
                                             "own (Defense.objective)"))
                    continue
                wb, labels = self.white_box(eps, cheap, exclude=("adaptive",))
                out.append(beyond_gradients(name, wb, labels,
                                            self.robust(self.spec("adaptive", eps)),
                                            "the defense's adaptive attack"))
            elif name == "more-budget":
                pairs, weaker = [], []
                for base_label, fmt, default in (("pgd", "pgd-k{}", MORE_STEPS),
                                                 ("pgd-r1", "pgd-r{}", MORE_RESTARTS)):
                    strong = self._strongest(fmt, eps, None if cheap else default)
                    if strong is None:
                        continue
                    pairs.append((base_label, self.robust(self.spec(base_label, eps)),
                                  strong.label, self.robust(strong)))
                    weaker += [base_label] + self._below(fmt, strong)
                out.append(more_budget(pairs, n, weaker) if pairs else
                           skipped(name, "no Table 6/7 rows at this ε (run advbench check)"))
            elif name == "zero-gradient":
                from attacks.bpda import straight_through
                with straight_through(self.model):  # a no-op without a declared preprocessing
                    res = zero_gradient(self.model, self.x, self.y, self.clean,
                                        self.batch_size, eps)
                out.append(self._through_bpda(res))
            elif name == "fgsm-vs-pgd":
                res = per_sample_gap(name, self.robust(pgd),
                                     self.robust(self.spec("fgsm", eps)), "FGSM")
                if not self.randomized:
                    res = escalate(res, res.extra["broken"], res.extra["pgd_robust"])
                out.append(res)
            elif name == "incomplete-opt":
                left = self.robust(pgd)
                idx = torch.nonzero(left).flatten()
                losses = loss_trajectories(self.model, pgd.build(seed=0), self.x[idx.to(
                    self.x.device)], self.y[idx.to(self.y.device)], self.batch_size)
                out.append(incomplete_opt(losses, pgd.label))
            elif name == "binarization":
                if cheap:
                    out.append(skipped(name, "not in the cheap subset (advbench check)"))
                    continue
                res = binarization(self.model, pgd, self.x)
                if not self.randomized:
                    res = escalate(res, res.extra.get("failed", 0), res.extra.get(
                        "feasible", 0))
                out.append(res)
            elif name == "unstable":
                out.append(unstable(self.model, self.x, self.y, self.clean, self.randomized,
                                    batch_size=self.batch_size))
        return out

    def stored(self, eps: float) -> Sequence[AttackSpec]:
        """Specs of attacks already stored for these points (none for an in-memory check)."""
        lister = getattr(self.flags, "specs", None)
        return lister(eps) if callable(lister) else ()

    def _reference(self, name: str, eps: float, cheap: bool) -> CheckResult:
        """Check (a) for the norm in ``name``: the norm's reference attack (AutoAttack, else
        APGD) against the paper's PGD of that norm, at that PGD's ε (l∞: ``eps``)."""
        norm = name[len("aa-vs-pgd-"):] or "linf"
        paper, refs = REFERENCES[norm]
        base = self.spec(paper, eps if norm == "linf" else None)
        from attacks import ATTACKS
        cands = [self.spec(r, base.eps, norm=norm) for r in refs]
        have = [c for c in cands if self.existing(c)]
        ref = (have or [c for c in cands if c.attack in ATTACKS] or [None])[0]
        if ref is None or (cheap and not have):
            why = "no reference attack registered" if ref is None and not cheap else \
                "no reference row at this ε (run advbench check)"
            return skipped(name, f"{why}: {' or '.join(refs)} ({norm})")
        res = per_sample_gap(name, self.robust(base), self.robust(ref), ref.label,
                             base.label, (base.label,))
        res.extra.update(norm=norm, eps=base.eps, reference=ref.label)
        return res

    def _below(self, fmt: str, strong: AttackSpec) -> list[str]:
        """Labels of the same family with less budget than ``strong`` (Table 6/7 columns)."""
        from benchmark.run.protocols import TABLE6_STEPS, TABLE7_RESTARTS
        top = int(strong.label.rsplit("k" if "k" in fmt else "r", 1)[1])
        values = TABLE6_STEPS if "k" in fmt else TABLE7_RESTARTS
        return [fmt.format(v) for v in values if v < top]

    def _strongest(self, fmt: str, eps: float, default: Optional[int]) -> Optional[AttackSpec]:
        """The largest Table 6/7 budget with an existing row, else ``default`` (None: none)."""
        from benchmark.run.protocols import TABLE6_STEPS, TABLE7_RESTARTS
        base = int(attack_specs(self.scale)["pgd"].hparams["steps"]) if "k" in fmt else 1
        values = [v for v in (TABLE6_STEPS if "k" in fmt else TABLE7_RESTARTS) if v > base]
        have = [v for v in values if self.existing(self._dyn(fmt.format(v), eps))]
        if not have and default is None:
            return None
        return self._dyn(fmt.format(max(have) if have else default), eps)

    def _dyn(self, label: str, eps: float) -> AttackSpec:
        from benchmark.run.protocols import resolve_specs
        spec = resolve_specs(label, self.scale)[0].with_eps(eps)
        return spec.with_hparams(**self.overrides.get(spec.attack, {}))


def attack_objective(spec: AttackSpec, defense: Any) -> Any:
    """The loss an attack of ``spec`` maximises: the defense's own objective for the
    ``adaptive`` attack (as ``advbench evaluate`` hands it over), else None (CE)."""
    return defense.objective() if spec.attack == "adaptive" and defense is not None else None


def _source_label(source: Any) -> Optional[str]:
    """The transfer spec's ``source``: a path as given, a module by its weights' hash (so
    flags of one source are never reused for another)."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, nn.Module):
        from benchmark.eval.target import state_sha256
        return "module-sha256:" + state_sha256(source)[:16]
    return None


# ------------------------------------------------------------------- run folders
def _matches(row: Mapping[str, Any], spec: AttackSpec, checkpoint: str) -> bool:
    if row.get("kind", "attack") != "attack" or row.get("checkpoint") != checkpoint:
        return False
    if row.get("attack") != spec.label or row.get("attack_name", row.get("attack")) != \
            spec.attack or row.get("norm") != spec.norm:
        return False
    if not same_eps(float(row.get("eps", -1)), spec.eps):
        return False
    hp = row.get("attack_hparams") or {}
    return all(hp.get(k) == v for k, v in spec.hparams.items() if k != "members")


class RunFlags:
    """Per-sample flags of a run folder on its first ``n`` test points: existing attack rows'
    flags (sliced), else an earlier check's, else computed and stored under the evaluate key."""

    def __init__(self, target: Any, rows: Sequence[Mapping[str, Any]], n: int,
                 data: Callable[[], tuple[Tensor, Tensor]], clean: Callable[[], Tensor],
                 batch_size: int, transfer_model: Callable[[], Optional[nn.Module]]) -> None:
        self.t, self.rows, self.n = target, rows, n
        self._data, self._clean, self.batch_size = data, clean, batch_size
        self._transfer_model = transfer_model
        self.reused: list[str] = []
        self.computed: list[str] = []
        self._clean_ce: Optional[Tensor] = None  # clean CE of the points, once for all specs

    def _flag_file(self, spec: AttackSpec) -> Optional[tuple[Path, str]]:
        from benchmark.eval.flags import eval_key
        best = None
        for row in self.rows:
            if _matches(row, spec, self.t.checkpoint) and int(row.get("n_examples", 0)) >= \
                    self.n:
                path = self.t.out_dir / "flags" / f"{row.get('eval_key')}.pt"
                if path.exists() and (best is None or row["n_examples"] < best[2]):
                    best = (path, f"row {row.get('eval_key')}", int(row["n_examples"]))
        if best is not None:
            return best[0], best[1]
        own = self.t.out_dir / "flags" / f"{eval_key(self.t.cfg.run_id, self.t.checkpoint, spec, self.n)}.pt"
        return (own, "flags of an earlier check") if own.exists() else None

    def exists(self, spec: AttackSpec) -> bool:
        return self._flag_file(spec) is not None

    def distances(self, spec: AttackSpec) -> Optional[Tensor]:
        """The boundary distances stored with a decision-based attack's flags (or None)."""
        found = self._flag_file(spec)
        got = safe_torch_load(found[0]).get("boundary_distance") if found else None
        return None if got is None else got[:self.n]

    def specs(self, eps: float) -> list[AttackSpec]:
        """Specs of the run's attack rows at ``eps`` whose flags cover these points."""
        out = []
        for row in self.rows:
            if row.get("kind", "attack") != "attack" or row.get("checkpoint") != \
                    self.t.checkpoint or int(row.get("n_examples", 0)) < self.n or \
                    not same_eps(float(row.get("eps", -1)), eps):
                continue
            if not (self.t.out_dir / "flags" / f"{row.get('eval_key')}.pt").exists():
                continue
            spec = AttackSpec(str(row.get("attack")), str(row.get("attack_name",
                                                                  row.get("attack"))),
                              str(row.get("norm", "linf")), float(row["eps"]),
                              dict(row.get("attack_hparams") or {}))
            if spec not in out:
                out.append(spec)
        return out

    def __call__(self, spec: AttackSpec) -> Tensor:
        from benchmark.eval.flags import attack_points, eval_key, predict
        label = f"{spec.label}@{format_eps(spec.eps)}"
        found = self._flag_file(spec)
        if found is not None:
            saved = safe_torch_load(found[0])
            if len(saved["robust"]) >= self.n and torch.equal(saved["clean"][:self.n],
                                                              self._clean()):
                self.reused.append(f"{label} ({found[1]})")
                return saved["robust"][:self.n]
        x, y = self._data()
        clean = self._clean()
        atk = spec.build(seed=0)
        if spec.attack == "transfer" and self._transfer_model() is not None:
            atk.source_model = self._transfer_model()
        if self._clean_ce is None:
            self._clean_ce = predict(self.t.model, x, y, self.batch_size)[1]
        ce = self._clean_ce
        stats: dict[str, Any] = {}
        robust, adv_ce = attack_points(self.t.model, atk, x, y, clean=clean, clean_ce=ce,
                                       batch_size=self.batch_size, stats=stats,
                                       loss=attack_objective(spec, self.t.defense))
        key = eval_key(self.t.cfg.run_id, self.t.checkpoint, spec, self.n)
        payload = flags_payload(clean, robust, adv_ce, spec.record(), self.t.checkpoint)
        dist = boundary_distances(atk, clean)
        if dist is not None:
            payload["boundary_distance"] = dist
        if "components" in stats:  # AutoAttack: which component first broke each point
            payload.update(first_broken_by=stats["first_broken_by"],
                           components=stats["components"])
        atomic_torch_save(self.t.out_dir / "flags" / f"{key}.pt", payload)
        self.computed.append(label)
        return robust


def transfer_source(run_dir: Path, cfg: Any, scale: Optional[str] = None
                    ) -> tuple[Optional[Path], str]:
    """The default transfer source of a run: the ``st`` run of its protocol, if trained.
    ``scale`` (the run's data scale) is needed for image-folder datasets such as
    ``cifar10-jpeg``, whose name alone does not tell it."""
    if cfg.defense == SOURCE_DEFENSE:
        return None, "the target is itself the `st` source run"
    from benchmark.store import RunStore
    src_cfg = helper_config(SOURCE_DEFENSE, cfg, scale)
    path = RunStore(run_dir.parent.parent.parent).run_dir(src_cfg)
    if not (path / "ckpt_best.pt").exists() and not (path / "ckpt_last.pt").exists():
        return None, f"no trained `st` run of this protocol at {path}"
    return path, str(path)


def check_run(run_dir: Path | str, *, eps: Optional[Sequence[float]] = None,
              n_examples: Optional[int] = None, names: Sequence[str] = CHECKS,
              cheap: bool = False, checkpoint: str = "best", device: str = "cpu",
              batch_size: Optional[int] = None, data: Any = None,
              data_dir: Optional[Path] = None, source: Optional[Path | str] = None,
              cascade: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """Write the health row and the check rows of one run folder; return them.

    With ``cascade`` no verdict is judged: the attacks the checks ``names`` would run (those
    stored already narrow the points) run as a cascade per (norm, ε), cheapest first, each on
    the points every earlier one left robust (:mod:`benchmark.eval.cascade`), for the headline
    the full check would give; the health row, the cascade rows and the headline rows they
    feed are returned.

    Args:
        run_dir: the run folder.
        eps: ε values to check (default: the run's nominal ε, ``hparams.eps``).
        n_examples: the check's points (default: AutoAttack's row's, else the profile's).
        names: which checks (see :data:`CHECKS`).
        cheap: the subset ``advbench run`` uses (nothing expensive that is not stored).
        source: transfer source (run folder or checkpoint file; default the ``st`` run).
    """
    from benchmark.device import resolve_device
    from benchmark.eval.target import open_target
    from benchmark.run.health import write_health

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    out: list[dict[str, Any]] = []
    health = run_dir / "eval" / "health.json"
    if (run_dir / "config.json").exists():
        out.append(read_json(health) if cheap and health.exists() else write_health(run_dir))
    if not names:  # the health verdict only (works for a run without a checkpoint yet)
        return out
    t = open_target(run_dir, checkpoint, device=dev)
    if source is not None:
        src: Any = Path(source)
        src_note = str(source)
    else:
        src, src_note = transfer_source(run_dir, t.cfg, t.info.scale)
        if src is None:
            src_note += "; give --source to run it"
    return out + check_target(t, eps=eps, n_examples=n_examples, names=names, cheap=cheap,
                              batch_size=batch_size, data=data, data_dir=data_dir, source=src,
                              source_note=src_note, cascade=cascade, progress=progress)


def load_source(source: Path, device: Any) -> nn.Module:
    """A transfer source from a run folder or an advbench checkpoint file, in eval mode."""
    from benchmark.checkpoint import read_checkpoint, resolve_checkpoint
    from benchmark.run.resolve import model_from_checkpoint
    ck = resolve_checkpoint(source, "best") if source.is_dir() else source
    return model_from_checkpoint(read_checkpoint(ck))[0].to(device).eval()


def check_target(t: Any, *, eps: Optional[Sequence[float]] = None,
                 n_examples: Optional[int] = None, names: Sequence[str] = CHECKS,
                 cheap: bool = False, batch_size: Optional[int] = None, data: Any = None,
                 data_dir: Optional[Path] = None, source: Any = None, source_note: str = "",
                 overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 cascade: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """Write the check rows of an opened target (:mod:`benchmark.eval.target`: a run's
    checkpoint or a model advbench did not train) and its headlines; return the rows.

    Args:
        t: the :class:`~benchmark.eval.target.Target`; rows go to ``t.out_dir``.
        eps, n_examples, names, cheap: as :func:`check_run`.
        data: the test points (a :class:`~benchmark.data.Data`; default: the target's
            dataset, loaded from ``data_dir``).
        source: the transfer source: an ``nn.Module``, a run folder or an advbench checkpoint
            file; None skips the transfer check, and its row says why (``source_note``).
        source_note: where the source came from, or why there is none.
        overrides: attack name → hyperparameters replacing the protocol's (quick checks).
        cascade, progress: as :func:`check_run` (no verdict; the checks' attacks as a cascade).
    """
    import time

    from benchmark.device import default_eval_batch_size
    from benchmark.eval.flags import adapt_spec, predict
    from benchmark.eval.target import check_model

    dev = t.device
    out: list[dict[str, Any]] = []
    batch_size = batch_size or default_eval_batch_size(dev, t.cfg.arch)
    rows = _rows_of(t.out_dir)
    if not cheap:
        backfill_prefixes(t.out_dir, rows)
    scale = t.info.scale
    eps_list = list(eps) if eps else [float(t.cfg.hparams["eps"])]
    cache: dict[str, Any] = {}
    asked: list[tuple[AttackSpec, int]] = []

    def test_points() -> tuple[Tensor, Tensor]:
        if "xy" not in cache:
            loaded = t.test_data(data, data_dir)
            cache["xy"], cache["provenance"] = loaded.test.floats(dev), loaded.info.provenance
            check_model(t.model, cache["xy"][0][:8], randomized=t.defense.randomized)
        return cache["xy"]

    def source_model() -> Optional[nn.Module]:
        if source is None or isinstance(source, nn.Module):
            return source
        if "src" not in cache:
            cache["src"] = load_source(Path(source), dev)
        return cache["src"]

    for e in eps_list:
        t0 = time.perf_counter()
        todo = list(names)
        if cheap:  # `advbench run`: a verdict once written is reused, like attack rows
            done = {c: t.out_dir / "eval" / f"{_check_key(t, c, e)}.json" for c in names}
            fresh = {c: read_json(p) for c, p in done.items() if p.exists()}
            fresh = {c: r for c, r in fresh.items() if not is_stale(r)}  # stale: recomputed
            out += list(fresh.values())
            todo = [c for c in names if c not in fresh]
            if not todo:
                continue
        aa_spec = adapt_spec(attack_specs(scale)["autoattack"].with_eps(e), t.defense.randomized)
        aa_rows = [r for r in rows if _matches(r, aa_spec, t.checkpoint) and
                   (t.out_dir / "flags" / f"{r.get('eval_key')}.pt").exists()]
        n_aa = max((int(r["n_examples"]) for r in aa_rows), default=None)
        n = n_examples or n_aa or DEFAULT_CHECK_N.get(t.cfg.profile, 1000)

        def points(n: int = n) -> tuple[Tensor, Tensor]:
            xa, ya = test_points()
            return xa[:n], ya[:n]

        def clean_flags(n: int = n) -> Tensor:
            k = f"clean{n}"
            if k not in cache:
                xa, ya = points(n)
                cache[k] = predict(t.model, xa, ya, batch_size)[0]
            return cache[k]

        flags = RunFlags(t, rows, n, points, clean_flags, batch_size, source_model)
        if cascade:  # which attacks the checks would run; none runs here
            from benchmark.eval.cascade import NO_FLAGS, SpecRecorder
            rec = SpecRecorder(flags, clean_flags)
            checker = _LazyChecker(t.model, points, clean_flags, scale, t.cfg.profile, rec,
                                   t.defense.randomized, source, batch_size, t.defense)
            for name in todo:
                if name not in NO_FLAGS and not (name in PER_NORM and e != eps_list[0]):
                    checker.run(e, [name], cheap=cheap)
            asked += [(s, n) for s in rec.asked if not flags.exists(s) and (s, n) not in asked]
            continue
        checker = _LazyChecker(t.model, points, clean_flags, scale, t.cfg.profile, flags,
                               t.defense.randomized, source, batch_size, t.defense)
        checker.overrides = dict(overrides or {})
        checker.no_source = source_note
        for name in todo:
            if name in PER_NORM and e != eps_list[0]:  # at their norm's ε: once per run
                continue
            t0, checker.used = time.perf_counter(), []
            (res,) = checker.run(e, [name], cheap=cheap)
            res.extra["attacks_used"] = sorted(set(checker.used))
            wall = time.perf_counter() - t0
            n_pts = min(n, len(test_points()[1])) if cache.get("xy") is not None else n
            row = _check_row(t, res, e, n_pts, n_aa, flags, wall, source_note)
            path = t.out_dir / "eval" / f"{row['eval_key']}.json"
            if res.passed is None and path.exists():
                old = read_json(path)
                if old.get("status") in ("pass", "fail") and not is_stale(old):
                    out.append(old)
                    continue
            atomic_write_json(path, row)
            out.append(row)
    if cascade and asked:
        from benchmark.eval.cascade import known_flags, run_cascade
        xa, ya = test_points()
        n_max = min(max(k for _, k in asked), len(ya))
        clean_all, ce_all = predict(t.model, xa[:n_max], ya[:n_max], batch_size)
        done = run_cascade(t, asked, known_flags(t.out_dir, t.checkpoint), xa, ya, clean_all,
                           ce_all, batch_size=batch_size, force=False, progress=progress,
                           provenance=cache["provenance"])
        groups = {(r["norm"], r["n_examples"], round(r["eps"], 9)) for r in done}
        heads = write_headlines(t.out_dir, t.checkpoint, base=t.row("", "headline"))
        return out + done + [h for h in heads if (h["norm"], h["n_examples"],
                                                  round(h["eps"], 9)) in groups]
    write_headlines(t.out_dir, t.checkpoint, base=t.row("", "headline"))  # checks' flags too
    return out


def backfill_prefixes(run_dir: Path, rows: Sequence[dict[str, Any]]) -> int:
    """Add ``acc_on_first`` (accuracies on test-order prefixes, for same-point tables) to
    attack rows written before it existed, from their stored flags; return how many."""
    from benchmark.eval.flags import prefix_stats
    from benchmark.safepath import ident_problem, inside
    done = 0
    for row in rows:
        key = row.get("eval_key")
        if row.get("kind", "attack") != "attack" or "acc_on_first" in row or \
                ident_problem(key, 255) is not None:  # a key that cannot name a file: skipped
            continue
        flags = inside(run_dir, "flags", f"{key}.pt")
        if not flags.exists() or not inside(run_dir, "eval", f"{key}.json").is_file():
            continue
        saved = safe_torch_load(flags)
        adv_ce = saved.get("adv_ce", torch.full((len(saved["robust"]),), math.nan))
        row["acc_on_first"] = prefix_stats(saved["clean"], saved["robust"], adv_ce)
        atomic_write_json(inside(run_dir, "eval", f"{key}.json"), row)
        done += 1
    return done


def _rows_of(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted((run_dir / "eval").glob("*.json")):
        try:
            rows.append(read_json(f))
        except Exception:  # an unreadable row is skipped (RunStore.rows warns about it)
            continue
    return rows


class _LazyChecker(Checker):
    """A :class:`Checker` whose points load only when an attack must run."""

    def __init__(self, model: nn.Module, points: Callable, clean: Callable, scale: str,
                 profile: str, flags: RunFlags, randomized: bool, source: Any,
                 batch_size: int, defense: Any = None) -> None:
        self.model, self._points, self._clean_fn = model, points, clean
        self.scale, self.profile, self.flags, self.randomized = scale, profile, flags, randomized
        self.overrides, self.transfer_source, self.batch_size = {}, source, batch_size
        self.existing = flags.exists
        self.defense = defense
        self._cache = {}

    @property
    def x(self) -> Tensor:  # type: ignore[override]
        return self._points()[0]

    @property
    def y(self) -> Tensor:  # type: ignore[override]
        return self._points()[1]

    @property
    def clean(self) -> Tensor:  # type: ignore[override]
        return self._clean_fn()


def _check_key(t: Any, name: str, eps: float) -> str:
    """One verdict per (run, checkpoint, check, ε): a recheck replaces it."""
    return "check-" + stable_hash({"run_id": t.cfg.run_id, "checkpoint": t.checkpoint,
                                   "check": name, "eps": eps})


def _check_row(t: Any, res: CheckResult, eps: float, n: int, n_aa: Optional[int],
               flags: RunFlags, wall: float, source: str) -> dict[str, Any]:
    cfg = t.cfg
    key = _check_key(t, res.name, eps)
    used = set(res.extra.get("attacks_used", ()))
    eps = float(res.extra.pop("eps", eps))  # the per-norm (a) checks run at their norm's ε
    return {"schema": 2, "kind": "check", "eval_key": key, "check": res.name,
            "check_version": CHECK_VERSIONS[res.name], "letter": res.letter,
            "value": res.value, "threshold": res.threshold,
            "status": res.status, "passed": res.passed, "detail": res.detail,
            "run_id": cfg.run_id, "defense": cfg.defense, "dataset": cfg.dataset,
            "data_provenance": t.info.provenance, "arch": cfg.arch, "profile": cfg.profile,
            "seed": cfg.seed, "checkpoint": t.checkpoint, "checkpoint_epoch": t.epoch,
            "hparams": cfg.hparams, "norm": res.extra.get("norm", "linf"), "eps": eps,
            "eps_str": format_eps(eps), "finding": res.finding, "doubts": res.doubts,
            "p_value": res.p_value, "alpha": ALPHA, "test": res.test,
            "n_examples": n, "points": f"first {n} test points",
            "autoattack_points": n_aa,
            "reused": [u for u in flags.reused if u.split(" (")[0] in used],
            "computed": [c for c in flags.computed if c in used], "transfer_source": source if
            res.name == "transfer" else None, **res.extra, "wall_s": round(wall, 3),
            "git": t.config.get("git") or code_version(), "eval_git": code_version(),
            "created": now()}


def format_checks(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown listing: one line per health or check row (``p`` is the check's exact test;
    ``–`` for rows written before it)."""
    lines = ["| defense | seed | ckpt | ε | check | status | finding | value | threshold | p | "
             "points | ADBD | detail |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "health":
            lines.append(f"| {r['defense']} | {r['seed']} | – | – | health | {r['verdict']} | "
                         f"– | – | – | – | – | – | "
                     f"{'; '.join(r['reasons']) or 'trained normally'} |")
            continue
        value = "–" if r.get("value") is None else f"{r['value']:.3f}"
        p = r.get("p_value")
        lines.append(f"| {r['defense']} | {r['seed']} | {r['checkpoint']} | {r['eps_str']} | "
                     f"({r['letter']}) {r['check']} | {r['status']} | "
                     f"{r.get('finding') or FINDING.get(str(r.get('check')), '–')} | {value} | "
                     f"{r['threshold']:g} | {'–' if p is None else f'{p:.2g}'} | "
                     f"{r['n_examples']} | "
                     f"{'–' if r.get('adbd') is None else format(r['adbd'], '.4f')} | "
                     f"{r['detail']} |")
    return "\n".join(lines) + "\n"


#: the honest defenses of the false-alarm measurement (issue 21)
HONEST = ("st", "at", "trades", "pm-ed-wta")


def false_alarms(rows: Sequence[Mapping[str, Any]], defenses: Sequence[str] = HONEST) -> str:
    """Markdown false-alarm summary of honest defenses' check rows.

    For every check: how many of the judged (pass/fail) rows of each defense failed; and per
    defense how many runs had their headline doubted (a failed masking check) out of the runs
    with at least one judged check. Rows of an older check version (:func:`is_stale`) are left
    out and counted in a note. Every failure here is a false alarm if the defenses are
    honest; a weak-attack finding is not one on the headline (it doubts PGD's cell only).
    """
    honest = [r for r in rows if r.get("kind") == "check" and r.get("defense") in defenses
              and r.get("status") in ("pass", "fail")]
    judged = [r for r in honest if not is_stale(r)]  # a verdict of a replaced rule is no evidence
    stale = [r for r in honest if is_stale(r)]
    names = [c for c in CHECKS if any(r.get("check") == c for r in judged)]
    head = "| check | finding | " + " | ".join(defenses) + " | all |"
    lines = [head, "|---|---|" + "---:|" * (len(defenses) + 1)]

    def cell(sel: list[Mapping[str, Any]]) -> str:
        return f"{sum(r['status'] == 'fail' for r in sel)}/{len(sel)}" if sel else "–"

    for c in names:
        mine = [r for r in judged if r.get("check") == c]
        lines.append(f"| ({THRESHOLDS[c][0]}) {c} | {FINDING[c]} | " + " | ".join(
            cell([r for r in mine if r["defense"] == d]) for d in defenses) + f" | {cell(mine)} |")
    runs: dict[str, dict[str, bool]] = {}
    for r in judged:
        what = r.get("finding") or FINDING.get(str(r.get("check")), "masking")
        doubted = r["status"] == "fail" and what != "weak-attack"
        per = runs.setdefault(str(r["defense"]), {})
        key = f"{r.get('run_id')}/{r.get('checkpoint')}"
        per[key] = per.get(key, False) or doubted
    tot = [v for d in defenses for v in runs.get(d, {}).values()]
    lines.append("| **headline doubted (runs)** | masking | " + " | ".join(
        f"{sum(runs[d].values())}/{len(runs[d])}" if runs.get(d) else "–" for d in defenses)
        + f" | {sum(tot)}/{len(tot)} |")
    seeds = sorted({str(r.get("seed")) for r in judged})
    note = ""
    if stale:
        per = ", ".join(f"{d} {len({r.get('run_id') for r in stale if r['defense'] == d})}"
                        for d in defenses if any(r["defense"] == d for r in stale))
        note = (f"\nLeft out: {len(stale)} judged row(s) written by an older version of their "
                f"check (runs: {per}); `advbench check --run RUN` renews them.\n")
    return (f"False alarms on honest defenses ({', '.join(defenses)}; seeds "
            f"{', '.join(seeds) or '–'}): failed/judged check rows of the current check "
            f"versions, α = {ALPHA:g}.\n\n" + "\n".join(lines) + "\n" + note)
