"""Verdict marks for the tables: training health (‡) and evaluation reliability (†).

Reads the ``health`` rows (:mod:`benchmark.run.health`) and ``check`` rows
(:mod:`benchmark.eval.checks`) beside the attack rows, and gives every table row (a defense
label in an arch × checkpoint section, averaged over seeds) its marks:

* ‡ on every cell when one of the row's runs did not train healthily (verdict ``nan``,
  ``did-not-train`` or ``incomplete``), with a footnote giving the verdict and its reasons,
  and when the row's clean accuracy is more than :data:`BEHIND_AT_POINTS` below AT's in the
  same section (trained, but under-trained at this budget: issue 12's yardstick);
* a ``reliable`` column on attack tables, like RobustBench's "AA eval potentially unreliable":
  ``no`` when a gradient-masking check failed for one of the row's runs at the ε of the table
  (the nominal ε; every ε for Table 3), ``yes`` when checks ran and none failed, ``–`` when no
  check ran; and † on every robustness cell of an unreliable row (so no PGD-only number is
  shown as a defense's robustness without it), with a footnote naming the failed checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np


HEALTH_MARK, RELIABILITY_MARK = "‡", "†"
#: a defense whose clean accuracy (mean over seeds) is more than this many points below AT's,
#: in the same dataset × profile × arch × checkpoint section, is marked as under-trained
BEHIND_AT_POINTS = 10.0
#: the reference defense of that comparison
REFERENCE = "at"


@dataclass
class RowVerdict:
    """Marks and footnotes of one table row."""

    unhealthy: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    passed: int = 0

    @property
    def reliable(self) -> str:
        return "no" if self.failed else "yes" if self.passed else "–"

    def mark(self, robustness: bool, attack: Optional[str] = None) -> str:
        """‡ when the row is unhealthy, plus † on a robust-accuracy cell of an unreliable row.

        ``attack``: the cell's attack label, or ``"headline"`` (placeholder for the checks
        branch's per-attack marks; ignored here: every robustness cell is doubted)."""
        marks = HEALTH_MARK if self.unhealthy else ""
        if robustness and self.failed:
            marks += RELIABILITY_MARK
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
    for r, label in zip(records, labels):
        kind = r.get("kind")
        arch = str(r.get("arch", "?"))
        if kind == "health" and not r.get("healthy", True):
            why = "; ".join(r.get("reasons") or []) or str(r.get("verdict"))
            for ckpt in checkpoints:
                out.setdefault((arch, ckpt, label), RowVerdict()).unhealthy.append(
                    f"seed {r.get('seed')}: {r.get('verdict')} ({why})")
        elif kind == "check" and r.get("status") in ("pass", "fail"):
            if not any_eps and not np.isclose(float(r.get("eps", math.nan)), _nominal(r),
                                              rtol=1e-6, atol=1e-9):
                continue
            v = out.setdefault((arch, str(r.get("checkpoint") or "best"), label), RowVerdict())
            if r["status"] == "pass":
                v.passed += 1
            else:
                v.failed.append(f"({r.get('letter')}) {r.get('check')} at ε={r.get('eps_str')}, "
                                f"seed {r.get('seed')}: {r.get('value'):.3g} > "
                                f"{r.get('threshold'):g}, {r.get('detail')}")
    for key, why in behind_reference(records, labels).items():
        out.setdefault(key, RowVerdict()).unhealthy.append(why)
    return out


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
        if reliability and v.failed:
            lines.append(f"- {RELIABILITY_MARK} `{name}`: evaluation potentially unreliable, "
                         f"failed checks: " + "; ".join(v.failed))
    return lines


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
