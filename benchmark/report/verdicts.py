"""Verdict marks for the tables: training health (‡), masking (†) and weak attacks (§).

Reads the ``health`` rows (:mod:`benchmark.run.health`) and ``check`` rows
(:mod:`benchmark.eval.checks`) beside the attack rows, and gives every table row (a defense
label in an arch × checkpoint section, averaged over seeds) its marks:

* ‡ on every cell when one of the row's runs did not train healthily (verdict ``nan``,
  ``did-not-train``, ``robust-above-clean`` or ``incomplete``), with a footnote giving the verdict and its reasons,
  and when the row's clean accuracy is more than :data:`BEHIND_AT_POINTS` below AT's in the
  same section (trained, but under-trained at this budget: issue 12's yardstick);
* marks only on the cells a failed check doubts (the row's ``doubts``/``finding``, else the
  mapping below for rows written before them), and footnotes saying why:

=====  =======================  =====================================  ==================
check  name                     doubts                                 mark
=====  =======================  =====================================  ==================
(a)    ``aa-vs-pgd``, ``-l2``,  the paper's PGD of that norm           § attack weak
       ``-l1``                  (``pgd``, ``pgd-l2``, ``pgd-l1``)
(b)    ``eps-monotone``         the Figure 4 PGD (``pgd-fig4``)        § attack weak
(c)    ``unbounded-eps``        every white-box cell and the headline  † masking
(d)    ``square``,              every white-box cell and the headline  † masking
       ``transfer``
(e)    ``more-budget``          ``pgd``, ``pgd-r1`` and the Table 6/7  § attack weak
                                columns with less budget
(f)    ``zero-gradient``        every white-box cell and the headline  † masking
(g)    ``fgsm-vs-pgd``          ``pgd``                                § attack weak
(h)    ``incomplete-opt``       ``pgd``                                § attack weak
(i)    ``unstable``             every white-box cell and the headline  † masking
(j)    ``binarization``         ``pgd``                                § attack weak
(k)    ``rays``                 every white-box cell and the headline  † masking
(l)    ``noise``                every white-box cell and the headline  † masking
(m)    ``bpda``                 the other gradient attacks (its row's  § attack weak
                                ``doubts``; BPDA is in the headline)
(n)    ``adaptive``             the other gradient attacks (its row's  § attack weak
                                ``doubts``; the adaptive attack is in
                                the headline)
=====  =======================  =====================================  ==================

A failed (a) (ℓ∞), (g) or (j) row whose ``finding`` is ``masking`` (``escalated``: the attack
failed on more than :data:`benchmark.eval.checks.MASKING_EFFECT` of its cases) doubts every
white-box cell and the headline (†) like the masking checks.

A check row written by another version of its check's rule (``check_version`` differs from
:data:`benchmark.eval.checks.CHECK_VERSIONS`, or is absent) is *stale*: it never marks,
unranks or passes a row; the footnotes list it apart with the command that renews it.

White-box cells are every robustness cell except the black-box attacks' (Square, transfer,
RayS).
``reliable`` is the verdict on the headline: ``no`` when a masking check failed for one of the
row's runs at the ε of the table (the nominal ε; every ε for Table 3; the norm's own ε for the
per-norm (a) checks, which only ever doubt PGD cells), ``yes`` when at least one masking check
was judged and none of the failed ones doubts the headline, ``–`` when no masking check was
judged (weak-attack checks alone say nothing about masking). A masking finding against a
headline of 0 (on the check's points) is reported and marks the other white-box cells, but
does not doubt the headline: a robust accuracy of 0 cannot be overstated.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from benchmark.config import same_eps
from benchmark.eval.checks import is_stale, renew_command


HEALTH_MARK, RELIABILITY_MARK, WEAK_MARK = "‡", "†", "§"
#: a defense whose clean accuracy (mean over seeds) is more than this many points below AT's,
#: in the same dataset × profile × arch × checkpoint section, is marked as under-trained
BEHIND_AT_POINTS = 10.0
#: the reference defense of that comparison
REFERENCE = "at"
#: the headline cell's attack label in :meth:`RowVerdict.mark`
HEADLINE = "headline"
#: attack labels of black-box attacks (never doubted by a masking finding)
BLACK_BOX = frozenset({"square", "transfer", "rays"})
#: check → (finding, doubted labels) for rows without ``finding``/``doubts`` (older rows)
MAPPING: dict[str, tuple[str, tuple[str, ...]]] = {
    "aa-vs-pgd": ("weak-attack", ("pgd",)), "aa-vs-pgd-l2": ("weak-attack", ("pgd-l2",)),
    "aa-vs-pgd-l1": ("weak-attack", ("pgd-l1",)),
    "eps-monotone": ("weak-attack", ("pgd-fig4",)), "unbounded-eps": ("masking", ()),
    "square": ("masking", ()), "transfer": ("masking", ()),
    "more-budget": ("weak-attack", ("pgd", "pgd-r1")), "zero-gradient": ("masking", ()),
    "fgsm-vs-pgd": ("weak-attack", ("pgd",)), "incomplete-opt": ("weak-attack", ("pgd",)),
    "unstable": ("masking", ()), "binarization": ("weak-attack", ("pgd",)),
    "rays": ("masking", ()), "noise": ("masking", ()),
    "bpda": ("weak-attack", ("pgd", "fgsm")), "adaptive": ("weak-attack", ("pgd", "fgsm"))}


def finding(row: dict) -> tuple[str, frozenset[str]]:
    """(``masking`` | ``weak-attack``, doubted attack labels) of a check row."""
    kind, cells = MAPPING.get(str(row.get("check")), ("masking", ()))
    kind = str(row.get("finding") or kind)
    doubts = row.get("doubts")
    return kind, frozenset(doubts if doubts and kind == "weak-attack" else cells)


def column_attack(column: str) -> str:
    """The attack label behind a table column (``pgd@4/255`` → ``pgd``, ``acc_k100`` →
    ``pgd-k100``, ``acc_r5`` → ``pgd-r5``, ``avg`` → ``autoattack``, ``accrej_pgd`` →
    ``pgd``)."""
    column = column.partition("@")[0]
    m = re.match(r"^(?:acc|ce)_(k|r)(\d+)$", column)
    if m:
        return f"pgd-{m.group(1)}{m.group(2)}"
    m = re.match(r"^(?:acc|accrej|auroc|fpr)_(.+)$", column)
    if m:
        return m.group(1)
    return {"avg": "autoattack"}.get(column, column)


@dataclass
class Doubt:
    """One failed check of a row: its footnote, finding and doubted labels."""

    text: str
    finding: str
    cells: frozenset[str]
    #: a masking finding on a run whose headline is 0 on the check's points (not doubted)
    at_zero: bool = False


@dataclass
class RowVerdict:
    """Marks and footnotes of one table row."""

    unhealthy: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    passed: int = 0
    doubts: list[Doubt] = field(default_factory=list)
    #: stale check rows (another version of the check's rule): (text, row)
    stale: list[tuple[str, dict]] = field(default_factory=list)
    #: judged (pass or fail) masking checks: without one the row is not checked for masking
    masking_judged: int = 0

    @property
    def masked(self) -> bool:
        """Whether a failed check doubts the headline (gradients look masked and the headline
        is above 0)."""
        return any(d.finding != "weak-attack" and not d.at_zero for d in self.doubts)

    @property
    def masking_any(self) -> bool:
        """Whether a masking check failed at all (also against a headline of 0)."""
        return any(d.finding != "weak-attack" for d in self.doubts)

    @property
    def reliable(self) -> str:
        """The verdict on the headline: ``no`` | ``yes`` | ``–`` (no masking check judged)."""
        return "no" if self.masked else "yes" if self.masking_judged else "–"

    def weak_attacks(self) -> dict[str, list[str]]:
        """Attack label → the checks (``(a) aa-vs-pgd``) that found it weak."""
        out: dict[str, list[str]] = {}
        for d in self.doubts:
            if d.finding == "weak-attack":
                for c in sorted(d.cells):
                    tag = d.text.split(" at ε=")[0]
                    if tag not in out.setdefault(c, []):
                        out[c].append(tag)
        return out

    def summary(self) -> str:
        """What the verdict means, in words (the page's reliability cell)."""
        if self.masked:
            return "potentially unreliable: " + "; ".join(
                d.text for d in self.doubts if d.finding != "weak-attack" and not d.at_zero)
        parts = [f"no masking finding ({self.masking_judged} masking check rows judged)"
                 if self.masking_judged else "no gradient-masking check judged"]
        zero = [d.text for d in self.doubts if d.at_zero]
        if zero:
            parts.append("masking finding against a headline of 0 (reported, not doubted: "
                         "0 cannot be overstated): " + "; ".join(zero))
        weak = self.weak_attacks()
        parts.append("attacks found weak: " + "; ".join(
            f"{a} ({', '.join(t)})" for a, t in weak.items()) if weak
            else "no attack found weak")
        if self.stale:
            parts.append(f"{len(self.stale)} stale check rows not read (renew with advbench "
                         "check)")
        return "; ".join(parts)

    @property
    def reliable_cell(self) -> str:
        """The ``reliable`` column's text (``no †`` when the headline is doubted)."""
        return f"no {RELIABILITY_MARK}" if self.masked else self.reliable

    def weak(self, attack: str) -> bool:
        return any(d.finding == "weak-attack" and attack in d.cells for d in self.doubts)

    def mark(self, robustness: bool, attack: Optional[str] = None) -> str:
        """‡ when the row is unhealthy; on a robustness cell † when a masking check failed
        (every white-box cell and the headline) and § when a check found the cell's attack
        weak. ``attack``: the cell's attack label or ``headline``; None marks every
        robustness cell with the row's strongest doubt (†, else §)."""
        marks = HEALTH_MARK if self.unhealthy else ""
        if not robustness:
            return marks
        if attack is None:
            return marks + (RELIABILITY_MARK if self.masked else WEAK_MARK if self.doubts
                            else "")
        if attack not in BLACK_BOX and (self.masked or (self.masking_any and attack != HEADLINE)):
            marks += RELIABILITY_MARK
        if self.weak(attack):
            marks += WEAK_MARK
        return marks


def _nominal(r: dict) -> float:
    eps = (r.get("hparams") or {}).get("eps")
    return float(eps) if isinstance(eps, (int, float)) else math.nan


def row_verdicts(records: Iterable[dict], labels: list[str], *, any_eps: bool = False
                 ) -> dict[tuple[str, str, str], RowVerdict]:
    """(arch, checkpoint, label) → :class:`RowVerdict` from the group's health/check rows.

    ``labels`` are the table labels of ``records`` (same order, from ``tables._labels``).
    Health rows have no checkpoint: they mark the row in every checkpoint section.
    """
    records = list(records)
    checkpoints = sorted({str(r.get("checkpoint") or "best") for r in records
                          if r.get("kind") not in ("health",)}) or ["best"]
    out: dict[tuple[str, str, str], RowVerdict] = {}
    zero = _zero_headlines(records)
    for r, label in zip(records, labels):
        kind = r.get("kind")
        arch = str(r.get("arch", "?"))
        if kind == "health" and not r.get("healthy", True):
            why = "; ".join(r.get("reasons") or []) or str(r.get("verdict"))
            for ckpt in checkpoints:
                out.setdefault((arch, ckpt, label), RowVerdict()).unhealthy.append(
                    f"seed {r.get('seed')}: {r.get('verdict')} ({why})")
        elif kind == "check" and r.get("status") in ("pass", "fail"):
            if not any_eps and r.get("norm", "linf") == "linf" and not same_eps(
                    float(r.get("eps", math.nan)), _nominal(r)):
                continue
            v = out.setdefault((arch, str(r.get("checkpoint") or "best"), label), RowVerdict())
            if is_stale(r):  # never a finding: listed apart with the command that renews it
                v.stale.append((f"({r.get('letter')}) {r.get('check')} at ε={r.get('eps_str')}, "
                                f"seed {r.get('seed')} (check version "
                                f"{r.get('check_version', 'none')}): {r.get('detail')}", r))
                continue
            what, cells = finding(r)
            if what != "weak-attack":
                v.masking_judged += 1
            if r["status"] == "pass":
                v.passed += 1
                continue
            test = (f", {r.get('test')} p = {r['p_value']:.2g} < α = {r.get('alpha'):g}"
                    if isinstance(r.get("p_value"), (int, float)) and r.get("test")
                    and " p = " not in str(r.get("detail")) else "")  # said once
            text = (f"({r.get('letter')}) {r.get('check')} at ε={r.get('eps_str')}, seed "
                    f"{r.get('seed')}: {_num(r.get('value'), '.3g')} > "
                    f"{_num(r.get('threshold'), 'g')}{test}, "
                    f"{r.get('detail')}")
            at_zero = what != "weak-attack" and _headline_zero(zero, r)
            if at_zero:
                text += " (the headline is 0 on these points: reported, not doubted)"
            v.failed.append(text)
            v.doubts.append(Doubt(text, what, cells, at_zero))
    for key, why in behind_reference(records, labels).items():
        out.setdefault(key, RowVerdict()).unhealthy.append(why)
    return out


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def _zero_headlines(records: list[dict]) -> dict[tuple, list[tuple[float, int]]]:
    """(run_id, checkpoint, ε) → the point counts N at which the run's l∞ headline is 0."""
    out: dict[tuple, list[tuple[float, int]]] = {}
    for r in records:
        if r.get("kind") == "headline" and r.get("norm", "linf") == "linf" and \
                r.get("robust_acc") == 0 and isinstance(r.get("eps"), (int, float)):
            key = (r.get("run_id"), str(r.get("checkpoint") or "best"))
            out.setdefault(key, []).append((float(r["eps"]), int(r.get("n_examples") or 0)))
    return out


def _headline_zero(zero: dict, check: dict) -> bool:
    """Whether the check's run has a headline of 0 at its ε on at least its points."""
    n = int(check.get("n_examples") or 0)
    return any(same_eps(e, float(check.get("eps", math.nan))) and m >= n
               for e, m in zero.get((check.get("run_id"), str(check.get("checkpoint") or
                                                                "best")), []))


def behind_reference(records: Iterable[dict], labels: list[str]) -> dict[tuple[str, str, str], str]:
    """(arch, checkpoint, label) → reason, for rows whose clean accuracy (attack rows, mean per
    seed, then over seeds) is more than :data:`BEHIND_AT_POINTS` below the ``at`` row's."""
    per_seed: dict[tuple[str, str, str], dict[Any, list[float]]] = {}
    for r, label in zip(records, labels):
        acc = r.get("clean_acc")
        if r.get("kind") != "attack" or not isinstance(acc, (int, float)) or not math.isfinite(acc):
            continue
        key = (str(r.get("arch", "?")), str(r.get("checkpoint") or "best"), label)
        per_seed.setdefault(key, {}).setdefault(r.get("seed"), []).append(100.0 * acc)
    clean = {k: float(np.mean([np.mean(v) for v in seeds.values()]))
             for k, seeds in per_seed.items()}
    out = {}
    for (arch, ckpt, label), acc in clean.items():
        ref = clean.get((arch, ckpt, REFERENCE))
        if label != REFERENCE and ref is not None and round(ref - acc, 6) > BEHIND_AT_POINTS:
            out[(arch, ckpt, label)] = (f"under-trained: clean accuracy {acc:.1f} is "
                                        f"{ref - acc:.1f} points below {REFERENCE}'s {ref:.1f} "
                                        f"(> {BEHIND_AT_POINTS:g}) under the same protocol")
    return out


def footnotes(verdicts: dict[tuple[str, str, str], RowVerdict], arch: str, ckpt: str,
              names: list[str], reliability: bool) -> list[str]:
    """Footnote lines for one section."""
    lines = []
    for name in names:
        v = verdicts.get((arch, ckpt, name))
        if v is None:
            continue
        if v.unhealthy:
            lines.append(f"- {HEALTH_MARK} `{name}`: training health: " + "; ".join(v.unhealthy))
        if not reliability:
            continue
        masking = [d.text for d in v.doubts if d.finding != "weak-attack" and not d.at_zero]
        at_zero = [d.text for d in v.doubts if d.at_zero]
        weak = [d for d in v.doubts if d.finding == "weak-attack"]
        if masking:
            lines.append(f"- {RELIABILITY_MARK} `{name}`: gradients look masked, so every "
                         f"white-box cell and the headline are potentially unreliable: "
                         + "; ".join(masking))
        if at_zero and not masking:
            lines.append(f"- {RELIABILITY_MARK} `{name}`: gradients look masked, so the "
                         "white-box cells are potentially unreliable, but the headline is 0, "
                         "which cannot be overstated: it is not doubted and the row stays "
                         "ranked: " + "; ".join(at_zero))
        if weak:
            cells = sorted({c for d in weak for c in d.cells})
            lines.append(f"- {WEAK_MARK} `{name}`: attack weak (the cells of "
                         + ", ".join(f"`{c}`" for c in cells) + " overstate robustness; the "
                         "headline is not doubted): " + "; ".join(d.text for d in weak))
        if v.stale:
            lines.append(stale_line(name, v.stale))
    return lines


def stale_line(name: str, stale: list[tuple[str, dict]]) -> str:
    """The footnote of a row's stale check rows: what they are and the commands (one per run
    and checkpoint) that renew them."""
    runs: dict[tuple, tuple[dict, list[str]]] = {}
    for _, r in stale:
        key = tuple(r.get(k) for k in ("dataset", "defense", "run_id", "checkpoint"))
        names = runs.setdefault(key, (r, []))[1]
        if str(r.get("check")) not in names:
            names.append(str(r.get("check")))
    renew = "; ".join(f"`{renew_command(r, names)}`" for r, names in runs.values())
    failed = [t for t, r in stale if r.get("status") == "fail"]
    return (f"- stale `{name}`: {len(stale)} check rows of {len(runs)} runs were written by an "
            "older version of the checks (or before check versions existed) and are not read "
            "(no mark, no ranking)" + (f"; {len(failed)} of them had failed: " + "; ".join(failed)
                                       if failed else "") + f". Renew: {renew}")


def has_verdicts(records: Iterable[dict]) -> bool:
    return any(r.get("kind") in ("health", "check") for r in records)


def csv_columns(verdicts: dict[tuple[str, str, str], RowVerdict], index: Any
                ) -> dict[str, list[Any]]:
    """``reliable`` (1/0/NaN) and ``healthy`` (1/0) per index entry, for the numeric CSV."""
    rel, healthy = [], []
    for idx in index:
        v = verdicts.get(tuple(idx))
        rel.append(math.nan if v is None or v.reliable == "–" else float(v.reliable == "yes"))
        healthy.append(0.0 if v is not None and v.unhealthy else 1.0)
    return {"reliable": rel, "healthy": healthy}
