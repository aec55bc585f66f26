"""Sampling uncertainty and paired tests of the tables (scipy only; no hand-written
distributions).

* :func:`add_intervals`: a 95% Wilson interval for every accuracy column of a wide table,
  ``<col>_lo`` and ``<col>_hi`` (percent), from the cells' counts on their N points. With
  several seeds the points of all seeds are pooled (k and N summed over seeds), so the
  interval is the sampling uncertainty of the mean and stays apart from the std over seeds.
* :func:`add_tests`: an exact McNemar test (``scipy.stats.binomtest`` on the discordant
  pairs) of every row's headline against the section's best row and against AT, on the same
  N points from the per-sample headline flags. Seeds are paired by seed index (seed s of one
  row with seed s of the other; rows with no seed in common are paired in seed order) and the
  discordant counts summed over the pairs. A row is *tied with the best* when the test does
  not reject equality at :data:`ALPHA`. The best row is the highest headline among the rows
  whose headline is not unreliable (``rankable``); an unreliable row is never the best.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest

#: level of the paired tests, and 1 − the intervals' confidence
ALPHA = 0.05
REFERENCE = "at"
#: meta columns of a wide table: never a value column of Markdown or LaTeX
META_SUFFIXES = ("_std", "_lo", "_hi", "_p_best", "_p_at", "_tied_best", "_attacks")
META = frozenset({"n_seeds", "n_points", "reliable", "healthy"})


def value_columns(table: pd.DataFrame) -> list[str]:
    """The value columns of a wide table (no std, interval, test or verdict column)."""
    return [c for c in table.columns if c not in META and not str(c).endswith(META_SUFFIXES)]


class Rankable(dict):
    """(arch, checkpoint, label) → whether the row may be ranked or bold; a row without a
    verdict gets its section's default (``get`` ignores the caller's default)."""

    def __init__(self, items: Mapping[tuple, bool], sections: Mapping[tuple, bool]) -> None:
        super().__init__(items)
        self.sections = dict(sections)

    def get(self, key: Any, default: Any = None) -> bool:  # type: ignore[override]
        if key in self:
            return bool(self[key])
        return self.sections.get(tuple(key)[:2], True) if isinstance(key, tuple) else True


def rankable(verdicts: Optional[Mapping[tuple, Any]]) -> Rankable:
    """(arch, checkpoint, label) → False where the row's headline is unreliable, and, in a
    section where some row passed its masking checks (``reliable == "yes"``), also where the
    row was not checked for masking: such rows are never ranked or bold above checked ones."""
    verdicts = verdicts or {}
    checked: dict[tuple, bool] = {}
    for k, v in verdicts.items():
        checked[k[:2]] = checked.get(k[:2], False) or v.reliable == "yes"
    return Rankable({k: v.reliable == "yes" if checked[k[:2]] else v.reliable != "no"
                     for k, v in verdicts.items()},
                    {s: not c for s, c in checked.items()})


def wilson(k: int, n: int, confidence: float = 1 - ALPHA) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (fractions)."""
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test of paired per-sample flags: (b, c, two-sided p), where b counts the
    points only ``a`` gets right, c those only ``b`` does; p = 1 without discordant pairs."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired flags of different lengths: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return only_a, only_b, p


def pair_seeds(x: Mapping[Any, np.ndarray], y: Mapping[Any, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated flags of the paired seeds of two rows (see the module docstring)."""
    common = sorted(set(x) & set(y), key=str)
    pairs = [(x[s], y[s]) for s in common] or list(zip([x[s] for s in sorted(x, key=str)],
                                                        [y[s] for s in sorted(y, key=str)]))
    if not pairs:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def is_accuracy(spec: Any, column: str) -> bool:
    """Whether a column is a proportion of test points (it gets an interval)."""
    return column == "clean" or (spec.is_robustness(column) and column != "avg"
                                 and not column.startswith("ce_") and column not in
                                 ("epoch_cpu_s", "passes", "peak_mem_mb"))


def add_intervals(wide: pd.DataFrame, cells: pd.DataFrame, columns: Sequence[str],
                  spec: Any) -> pd.DataFrame:
    """``<col>_lo``/``<col>_hi`` (percent) for the accuracy columns, seeds pooled."""
    ok = cells[cells["value"].notna() & cells["n"].notna()] if len(cells) else cells
    for c in columns:
        if not is_accuracy(spec, c):
            continue
        lo = pd.Series(np.nan, index=wide.index)
        hi = lo.copy()
        part = ok[ok["column"] == c] if len(ok) else ok
        for (arch, ckpt, label), g in part.groupby(["arch", "checkpoint", "label"]):
            if (arch, ckpt, label) not in wide.index:
                continue
            n = g["n"].astype(int)
            k = int(np.rint(g["value"].to_numpy() / 100 * n.to_numpy()).sum())
            low, high = wilson(k, int(n.sum()))
            lo[(arch, ckpt, label)], hi[(arch, ckpt, label)] = 100 * low, 100 * high
        wide[f"{c}_lo"], wide[f"{c}_hi"] = lo, hi
    return wide


def _flags(cells: pd.DataFrame, column: str) -> dict[tuple, dict[Any, np.ndarray]]:
    """(arch, checkpoint, label) → seed → robust flags of ``column`` on the section's N."""
    out: dict[tuple, dict[Any, np.ndarray]] = {}
    if not len(cells) or "flags" not in cells:
        return out
    part = cells[(cells["column"] == column) & cells["value"].notna()]
    for _, r in part.iterrows():
        if isinstance(r["flags"], np.ndarray):
            out.setdefault((r["arch"], r["checkpoint"], r["label"]), {})[r["seed"]] = r["flags"]
    return out


def add_tests(wide: pd.DataFrame, cells: pd.DataFrame, column: str,
              rankable: Optional[Mapping[tuple, bool]] = None) -> pd.DataFrame:
    """``<column>_p_best``, ``<column>_p_at`` and ``<column>_tied_best`` (1/0; NaN without
    per-sample flags) per row, section by section (see the module docstring)."""
    if column not in wide:
        return wide
    flags = _flags(cells, column)
    p_best = pd.Series(np.nan, index=wide.index)
    p_at, tied = p_best.copy(), p_best.copy()
    for (arch, ckpt), block in wide.groupby(level=["arch", "checkpoint"], sort=False):
        vals = block[column].dropna()
        ok = [i for i in vals.index if (rankable or {}).get(i, True)]
        pool = vals[ok] if ok else vals
        if not len(pool):
            continue
        best = pool.idxmax()
        ref = (arch, ckpt, REFERENCE)
        for idx in vals.index:
            if idx not in flags:
                continue
            if best in flags:
                p = 1.0 if idx == best else mcnemar(*pair_seeds(flags[idx], flags[best]))[2]
                p_best[idx] = p
                tied[idx] = float(p >= ALPHA)
            if ref in flags and idx != ref:
                p_at[idx] = mcnemar(*pair_seeds(flags[idx], flags[ref]))[2]
    wide[f"{column}_p_best"], wide[f"{column}_p_at"] = p_best, p_at
    wide[f"{column}_tied_best"] = tied
    return wide


def add_covers(wide: pd.DataFrame, cells: pd.DataFrame, column: str) -> pd.DataFrame:
    """``<column>_attacks``: the attacks the row's headline covers (``+``-joined, all seeds)."""
    if column not in wide or "covers" not in cells:
        return wide
    part = cells[(cells["column"] == column) & cells["value"].notna()]
    got: dict[tuple, set[str]] = {}
    for _, r in part.iterrows():
        if isinstance(r["covers"], (tuple, list)):
            got.setdefault((r["arch"], r["checkpoint"], r["label"]), set()).update(r["covers"])
    wide[f"{column}_attacks"] = [("+".join(sorted(got[i])) if i in got else None)
                                 for i in wide.index]
    return wide


def interval_text(lo: Any, hi: Any) -> str:
    """`` [lo, hi]`` (one decimal), or "" without an interval."""
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f" [{lo:.1f}, {hi:.1f}]"
