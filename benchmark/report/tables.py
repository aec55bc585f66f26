"""The paper's tables as functions of result rows: rows → long "cells" → one spec per table.

A *unit* is one trained checkpoint (``run_id`` × ``checkpoint``); a *cell* is one number of
one unit in one table column. :mod:`benchmark.report.report` averages cells over seeds and renders
them. Three row kinds feed the tables (a row without ``kind`` is an attack row):

* ``attack`` (``benchmark.eval.evaluate``): ``attack`` column label, ``norm``, ``eps``,
  ``clean_acc``, ``robust_acc``, ``adv_ce``, ``n_examples``;
* ``features`` (``benchmark.eval.features``): ``condition`` clean|pgd20 and the five metrics;
* ``corruption`` (``benchmark.eval.corruptions``): ``corruption``, ``severity``, ``accuracy``;
* ``rejection`` (``benchmark.eval.rejection``): ``negatives`` (pgd, adaptive, ood-<set>),
  ``auroc``, ``fpr_at_tpr``, ``robust_acc_reject``, ``roc``.

``headline`` rows (:mod:`benchmark.eval.worstcase`: the per-sample worst case over every
attack of a run, checkpoint, norm and ε on its first N points) enter the attack frame with the
label ``headline`` (l∞) or ``headline-l2`` / ``headline-l1``, and become the ``Headline``
columns of the accuracy table and Tables 1 and 2: the number tables rank and bold by.

``cost`` rows (:mod:`benchmark.run.cost`, one per trained run) are not cells of their own:
their ``epoch_cpu_s`` (CPU-seconds per epoch: the load of the machine does not enter it),
``passes_per_sample`` and ``peak_mem_mb`` join the attack rows of the same ``run_id`` and
become the cost columns of Tables 1 and 2.

Same points (:func:`on_points`): every cell of one table section (arch × checkpoint) is
computed on the section's N test points, the first N of the fixed test order: AutoAttack's N
when every row of the section has an AutoAttack row, else the largest N every row covers.
Rows on more points are sliced to the first N (from their per-sample bits, or their
``acc_on_first`` prefix accuracies); a cell that cannot be brought to N stays empty with its
reason (a placeholder cell: value NaN, ``why``), never filled from another N.

Accuracies become percent. For every l∞ column except Table 3's and Figure 4's sweeps, only
rows at the run's *nominal* ε (its training ε, ``hparams.eps``: 8/255 on CIFAR scale, 0.3
on MNIST scale) count; where a unit has several rows for one column (e.g. different
``n_examples``), the row with the most test points wins. The clean accuracy of a unit is that
of its attack row with the most test points.

Runs of one defense with different hyperparameters are never averaged together: their rows
get labels such as ``trades [beta=3.0]`` naming the keys that differ.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from attacks.base import eps_to_str
from benchmark.config import linf_eps, same_eps
from benchmark.eval.corruptions import CORRUPTIONS

UNIT = ["dataset", "profile", "provenance", "arch", "checkpoint", "label", "defense", "seed",
        "run_id"]
CELL = [*UNIT, "column", "value", "n"]

#: display names of columns in Markdown (CSV headers keep the machine names)
DISPLAY = {"clean": "Clean", "autoattack": "AA", "avg": "Avg", "pgd-l1": "PGD l1",
           "pgd-l2": "PGD l2", "apgd-l1": "APGD l1", "apgd-l2": "APGD l2", "autoattack-l1": "AA l1",
           "autoattack-l2": "AA l2", "pgd": "PGD l∞", "fgsm": "FGSM", "pgd20": "PGD-20",
           "pgd100": "PGD-100", "cw": "C&W", "ensemble": "Ensemble", "adaptive": "Adaptive",
           "fdr_clean": "FDR↓ cln", "fdr_adv": "FDR↓ adv", "afs_clean": "AFS↓ cln",
           "afs_adv": "AFS↓ adv", "scr_clean": "SCR↑ cln", "scr_adv": "SCR↑ adv",
           "mean_sep": "MeanSep↑ (°)", "min_sep": "MinSep↑ (°)", "avg_all": "Avg",
           "epoch_cpu_s": "CPU s/epoch", "passes": "passes/sample", "peak_mem_mb": "peak MiB",
           "headline": "Headline", "headline-l2": "Headline l2", "headline-l1": "Headline l1"}
#: training-cost columns of Tables 1 and 2 (from ``"kind": "cost"`` rows, joined by run_id)
COST = ["epoch_cpu_s", "passes", "peak_mem_mb"]
#: the headline column of each norm (``headline`` rows' label in the attack frame)
HEADLINES = {"linf": "headline", "l2": "headline-l2", "l1": "headline-l1"}
#: how a missing headline names its norm
NORM_NAMES = {"linf": "ℓ∞", "l2": "ℓ2", "l1": "ℓ1"}
_REJ = {"auroc": "AUROC", "fpr": "FPR@95", "acc": "Acc", "accrej": "Acc+rej"}


def display(column: str) -> str:
    """Markdown header of a CSV column (``pgd@4/255`` → ``PGD l∞ ε=4/255``)."""
    if "@" in column:
        label, _, eps = column.partition("@")
        return f"{DISPLAY.get(label, label)} ε={eps}"
    m = re.match(r"^(acc|ce)_(k|r)(\d+)$", column)
    if m:
        what = "Acc" if m.group(1) == "acc" else "CE"
        return f"{what} {'K' if m.group(2) == 'k' else 'R'}={m.group(3)}"
    m = re.match(r"^(auroc|fpr|acc|accrej)_(pgd|adaptive|ood-.+)$", column)
    if m:
        return f"{_REJ[m.group(1)]} {m.group(2)}"
    if re.match(r"^s[1-5]$", column):
        return f"Severity {column[1]}"
    return DISPLAY.get(column, column)


_ORDER = ["headline", "headline-l2", "headline-l1", "fgsm", "pgd", "pgd-l2", "pgd-l1", "pgd20",
          "pgd100", "cw", "ensemble", "autoattack", "apgd-l2", "autoattack-l2", "apgd-l1",
          "autoattack-l1", "adaptive"]
_SWEEP = re.compile(r"^pgd-(k|r)(\d+)$")


def order_labels(labels: Iterable[str], order: Sequence[str] = ()) -> list[str]:
    """Row labels sorted by their defense's position in ``order`` (the label's first word;
    the caller passes the registry order), then by label; defenses not in ``order`` last."""
    rank = {n: i for i, n in enumerate(order)}
    return sorted(set(labels), key=lambda s: (rank.get(s.split(" ")[0], len(rank)), s))


def _kind(r: dict) -> str:
    return str(r.get("kind") or "attack")


def _nan(v: Any) -> float:
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def _labels(records: list[dict]) -> list[str]:
    """Row label per record: the defense, plus the differing hparams when a block has several."""
    groups: dict[tuple, dict[str, dict]] = {}
    keyf = [(r.get("dataset"), r.get("profile"), r.get("data_provenance"), r.get("arch"),
             r.get("defense")) for r in records]
    for k, r in zip(keyf, records):
        hp = r.get("hparams") or {}
        groups.setdefault(k, {})[json.dumps(hp, sort_keys=True, default=str)] = hp
    out = []
    for k, r in zip(keyf, records):
        variants = groups[k]
        if len(variants) == 1:
            out.append(str(r.get("defense")))
            continue
        hp = r.get("hparams") or {}
        keys = sorted({key for v in variants.values() for key in v
                       if len({json.dumps(w.get(key), default=str)
                               for w in variants.values()}) > 1})
        out.append(f"{r.get('defense')} [" + ", ".join(f"{key}={hp.get(key)}" for key in keys)
                   + "]")
    return out


def frames(records: Iterable[dict]) -> dict[str, pd.DataFrame]:
    """Normalised frames per row kind (``attack``, ``features``, ``corruption``)."""
    records = list(records)
    costs = {str(r.get("run_id")): r for r in records if _kind(r) == "cost"}
    records = [r for r in records if _kind(r) != "cost"]
    labels = _labels(records)
    out: dict[str, list[dict]] = {"attack": [], "features": [], "corruption": [], "rejection": []}
    cascaded: list[dict] = []
    for r, label in zip(records, labels):
        kind = _kind(r)
        if kind == "headline":  # the worst case over attacks: a column of the attack tables
            r = {**r, "attack": HEADLINES.get(str(r.get("norm") or "linf"),
                                              f"headline-{r.get('norm')}")}
            kind = "attack"
        was_cascade = kind == "cascade"
        if was_cascade:  # --cascade: no single-attack accuracy; an empty cell says why
            r = {k: v for k, v in r.items() if not k.endswith("_bits") and k != "acc_on_first"}
            kind = "attack"
        if kind not in out or (kind == "corruption" and r.get("aggregate")):
            continue
        base = {"dataset": str(r.get("dataset", "?")), "profile": str(r.get("profile") or "?"),
                "provenance": str(r.get("data_provenance") or ""),
                "arch": str(r.get("arch", "?")), "checkpoint": str(r.get("checkpoint") or "best"),
                "label": label, "defense": str(r.get("defense")), "seed": int(r.get("seed", 0)),
                "run_id": str(r.get("run_id") or f"{r.get('defense')}-{r.get('seed', 0)}"),
                "n": _nan(r.get("n_examples"))}
        if kind == "attack":
            eps, norm = _nan(r.get("eps")), str(r.get("norm") or "linf")
            nominal_eps = _nan((r.get("hparams") or {}).get("eps"))
            if math.isnan(nominal_eps):
                nominal_eps = linf_eps("mnist" if r.get("eps_str") == "0.3" else "cifar")
            nominal = norm != "linf" or same_eps(eps, nominal_eps)
            base.update(attack=str(r.get("attack")), norm=norm, eps=eps,
                        eps_str=str(r.get("eps_str") or eps_to_str(eps)), nominal=nominal,
                        clean=100 * _nan(r.get("clean_acc")), robust=100 * _nan(r.get("robust_acc")),
                        ce=_nan(r.get("adv_ce")), first=r.get("acc_on_first") or {},
                        bits=r.get("robust_bits"), clean_bits=r.get("clean_bits"),
                        covers=tuple(r.get("attacks") or ()))
            cost = costs.get(base["run_id"], {})
            base.update(has_cost=bool(cost), epoch_cpu_s=_nan(cost.get("epoch_cpu_s")),
                        cpu_s_missing_in=cost.get("cpu_s_missing_in") or "the run",
                        passes=_nan(cost.get("passes_per_sample")),
                        peak_mem_mb=_nan(cost.get("peak_mem_mb")))
            if was_cascade:
                base.update(why=str(r.get("why") or "cascaded run (--cascade)"))
                cascaded.append(base)
                continue
        elif kind == "rejection":
            if r.get("score_default") is False:  # a defense's second rejection score
                base["label"] = f"{label} [score: {r.get('score_option')}]"
            base.update(negatives=str(r.get("negatives")), score=str(r.get("score")),
                        auroc=100 * _nan(r.get("auroc")), fpr=100 * _nan(r.get("fpr_at_tpr")),
                        robust=100 * _nan(r.get("robust_acc")),
                        robust_reject=100 * _nan(r.get("robust_acc_reject")),
                        roc=r.get("roc") or [])
        elif kind == "features":
            base.update(condition=str(r.get("condition", "clean")),
                        **{m: _nan(r.get(m)) for m in ("fdr", "afs", "scr", "mean_sep", "min_sep")})
        else:
            base.update(corruption=str(r.get("corruption")), severity=int(r.get("severity") or 0),
                        accuracy=100 * _nan(r.get("accuracy")),
                        corruption_provenance=str(r.get("corruption_provenance") or ""))
        out[kind].append(base)
    col = lambda b: (b["run_id"], b["checkpoint"], b["attack"], b["norm"],  # noqa: E731
                     round(b["eps"], 7))
    real = {col(b) for b in out["attack"]}
    out["attack"] += [b for b in cascaded if col(b) not in real]  # no single-attack row there
    return {k: pd.DataFrame(v) for k, v in out.items()}


def corruption_title(title: str, provenances: Sequence[str]) -> str:
    """``title`` with "CIFAR-10-C" → "regenerated CIFAR-10-C" when any row's corruption data
    were regenerated (``advbench corruptions --generate``), never the released files."""
    from benchmark.eval.cifar_c import LABEL
    if any(p.startswith(LABEL) for p in provenances):
        return title.replace("CIFAR-10-C", LABEL)
    return title


# ------------------------------------------------------------------------- cell helpers
def _best_n(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per ``keys``: the one with the most test points (ties: first in input order;
    placeholders, which have no points, last)."""
    return df.sort_values("n", ascending=False, kind="stable", na_position="last"
                          ).drop_duplicates(keys)


#: optional fields a cell carries along: a placeholder's reason, the section's points rule,
#: the per-sample robust flags on the section's points (paired tests), the attacks covered
_CARRY = ("why", "rule", "flags", "covers")


def _cells(df: pd.DataFrame, column: str, value: str) -> pd.DataFrame:
    """One cell per row of ``df``; rows without a value are kept only as placeholders that
    say why (``why``)."""
    out = df[UNIT].copy()
    out["column"], out["value"], out["n"] = column, df[value].to_numpy(), df["n"].to_numpy()
    for c in _CARRY:
        if c in df:
            out[c] = df[c].to_numpy()
    if "flags" in out and value != "robust":
        out["flags"] = None  # the flags are the robust ones: only robust-accuracy cells
    keep = out["value"].notna()
    if "why" in out:
        keep |= out["why"].notna()
        out.loc[out["value"].notna(), "why"] = None
    return out[keep]


def _clean(a: pd.DataFrame) -> pd.DataFrame:
    return _cells(_best_n(a, UNIT), "clean", "clean") if len(a) else pd.DataFrame(columns=CELL)


def _attack(a: pd.DataFrame, label: str, *, value: str = "robust", column: Optional[str] = None,
            eps: Optional[float] = None) -> pd.DataFrame:
    if not len(a):
        return pd.DataFrame(columns=CELL)
    sel = a[a["attack"] == label]
    sel = sel[sel["nominal"]] if eps is None else sel[np.isclose(sel["eps"], eps, rtol=1e-6)]
    return _cells(_best_n(sel, UNIT), column or label, value)


def _avg(cells: pd.DataFrame, a: str, b: str, column: str = "avg") -> pd.DataFrame:
    """Per-unit mean of two columns (the paper's Avg(clean, AA)); absent if either is."""
    x = cells[cells["column"] == a].set_index(UNIT)
    y = cells[cells["column"] == b].set_index(UNIT)
    both = x.add_suffix("_a").join(y.add_suffix("_b"), how="inner")
    out = both.reset_index()[UNIT]
    out["column"] = column
    out["value"] = ((both["value_a"] + both["value_b"]) / 2).to_numpy()
    out["n"] = np.minimum(both["n_a"], both["n_b"]).to_numpy()
    return out[out["value"].notna()]


def _concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CELL)


# ------------------------------------------------------------------------- table specs
def _why_attack(c: str) -> str:
    if c == "clean":
        return "no attack row for this checkpoint"
    if c == "avg":
        return "needs both `clean` and `autoattack`"
    if "@" in c:
        label, _, eps = c.partition("@")
        return f"no `{label}` row at ε = {eps}"
    if c.startswith(("acc_", "ce_")):
        label = "pgd-" + c.split("_", 1)[1]
        return f"no `{label}` row" + (" with `adv_ce`" if c.startswith("ce_") else "")
    if c in HEADLINES.values():
        norm = next(n for n, col in HEADLINES.items() if col == c)
        return (f"no headline row: no {NORM_NAMES.get(norm, norm)} attack was evaluated on "
                "the run, or it was evaluated before headline rows existed")
    if c in COST:
        return "no cost row for the run (a run folder with train_log.jsonl)" + (
            ", or no `peak_mem_mb` in its log (runs made before it was logged)"
            if c == "peak_mem_mb" else ", or no CPU-seconds (`cpu_s`) in its log (trained "
            "before they were logged; wall seconds measure the machine's load, not shown)"
            if c == "epoch_cpu_s" else "")
    return f"no `{c}` row at the run's nominal ε"


@dataclass(frozen=True)
class TableSpec:
    """One of the paper's tables.

    Attributes:
        name: file prefix (``table1`` → ``table1_<dataset>_<profile>.csv``).
        title: Markdown heading.
        kind: row kind it is built from.
        build: frame of that kind → (cells, expected columns in order).
        derived: columns computed from others (they alone never make a table worth writing).
        lower: columns where lower is better; ``neutral`` ones get no bold.
        decimals: decimals shown in Markdown (CSV always has 4).
        note: sentence printed under the title.
        why: the reason given for a missing cell of a column.
        robust: on a table of another kind than ``attack``, the columns that are robust
            accuracies (they then get the reliability mark and the table a ``reliable``
            column, as attack tables do).
    """

    name: str
    title: str
    kind: str
    build: Callable[[pd.DataFrame], tuple[pd.DataFrame, list[str]]]
    derived: frozenset[str] = frozenset({"clean", "avg"})
    lower: frozenset[str] = frozenset()
    neutral: Callable[[str], bool] = lambda c: False
    decimals: Callable[[str], int] = lambda c: 2
    note: str = ""
    why: Callable[[str], str] = _why_attack
    robust: Optional[Callable[[str], bool]] = None

    @property
    def has_reliability(self) -> bool:
        """Whether the table shows robust accuracies (and so a ``reliable`` column)."""
        return self.kind == "attack" or self.robust is not None

    def is_robustness(self, column: str) -> bool:
        """Whether ``column`` is a robust accuracy (it carries † when a check failed)."""
        if self.robust is not None:
            return self.robust(column)
        return self.kind == "attack" and column not in {"clean", *COST}

    def better(self, column: str) -> Optional[str]:
        if self.neutral(column):
            return None
        return "lower" if column in self.lower else "higher"


def section_points(a: pd.DataFrame, labels: Iterable[str], *, nominal: bool = True
                   ) -> dict[tuple[str, str], tuple[int, str]]:
    """(arch, checkpoint) → (N, rule): the test points of every cell of a table section.

    Rule: AutoAttack's N (its fewest points) when every row of the section has an
    AutoAttack row among ``labels``; else the largest N that every row covers (the smallest,
    over the section's units, of a unit's most points). Headline rows do not set N.
    """
    labels = [lab for lab in labels if lab not in HEADLINES.values()]
    sel = a[a["attack"].isin(labels) & (a["nominal"] if nominal else True) & a["n"].notna()]
    out = {}
    for (arch, ckpt), part in sel.groupby(["arch", "checkpoint"], sort=False):
        units = part.groupby(UNIT)
        aa = part[part["attack"] == "autoattack"].groupby(UNIT)["n"].min()
        if "autoattack" in labels and len(aa) == units.ngroups:
            out[(arch, ckpt)] = (int(aa.min()), "AutoAttack's points, which every row has")
        else:
            out[(arch, ckpt)] = (int(units["n"].max().min()),
                                 "the most points every row covers" + (
                                     " (not every row has AutoAttack)"
                                     if "autoattack" in labels else ""))
    return out


def _prefix(r: pd.Series, n: int) -> Optional[tuple[float, float, float, Any]]:
    """(clean %, robust %, CE, robust flags) of a row on its first ``n`` points, from its bits
    (CE from ``acc_on_first`` where it has that prefix), else from ``acc_on_first``; None if
    the row records neither."""
    from benchmark.eval.worstcase import from_hex

    pre = (r.get("first") or {}).get(str(n))
    bits, clean_bits = r.get("bits"), r.get("clean_bits")
    if isinstance(bits, str) and isinstance(clean_bits, str):
        robust, clean = from_hex(bits, n), from_hex(clean_bits, n)
        return (100 * float(clean.mean()), 100 * float(robust.mean()),
                pre[2] if pre else math.nan, robust)
    return (100 * pre[0], 100 * pre[1], pre[2], None) if pre else None


def on_points(a: pd.DataFrame, labels: Iterable[str], *, nominal: bool = True) -> pd.DataFrame:
    """Every row of ``labels`` on its section's N points (:func:`section_points`).

    Every row of a section is brought to N (``labels`` only choose N, so the clean accuracy
    is on N points too): a row on exactly N points is kept; one on more is sliced to the
    first N; one that cannot be (fewer points, or no per-sample record) becomes a
    placeholder: values NaN, ``why`` saying so. The rows get ``rule`` (the section's N and
    its rule) and ``flags`` (robust flags on the N points, where the row has bits). Of
    several rows of one unit and label, the one evaluated on the fewest points (at least N)
    comes first.
    """
    if not len(a):
        return a
    from benchmark.eval.worstcase import from_hex

    points = section_points(a, labels, nominal=nominal)
    a = a.copy()
    n0 = a["n"].to_numpy().copy()
    why: list[Optional[str]] = [w if isinstance(w, str) else None for w in a["why"]] \
        if "why" in a else [None] * len(a)  # a cascaded row's reason stays
    rule: list[Optional[str]] = [None] * len(a)
    flags: list[Any] = [None] * len(a)
    for j, (i, r) in enumerate(a.iterrows()):
        sec = points.get((r["arch"], r["checkpoint"]))
        if sec is None or pd.isna(r["n"]):
            continue
        n, text = sec
        rule[j] = f"the first {n} test points ({text})"
        if r["n"] == n:
            if isinstance(r.get("bits"), str):
                flags[j] = from_hex(r["bits"], n)
            continue
        got = _prefix(r, n) if r["n"] > n else None
        if got is None:
            what = "the worst case" if r["attack"] in HEADLINES.values() else f"`{r['attack']}`"
            why[j] = (f"{what} evaluated on {int(r['n'])} points only; the section uses the "
                      f"first {n}" if r["n"] < n else
                      f"{what} evaluated on {int(r['n'])} points with no per-sample record of "
                      f"the first {n} (the section's points)")
            a.loc[i, ["clean", "robust", "ce", "n"]] = math.nan
            continue
        a.loc[i, ["clean", "robust", "ce"]] = got[:3]
        a.loc[i, "n"] = n
        flags[j] = got[3]
    a["why"], a["rule"], a["flags"] = why, rule, flags
    order = np.argsort(n0, kind="stable")
    return a.iloc[order]


def _no_cpu_s(where: str) -> str:
    """Why a CPU s/epoch cell is empty although a cost row exists: ``where`` (the run itself
    or a helper run whose cost it adds, such as HAT's ``st``) has no CPU-seconds in its log."""
    return (f"no CPU-seconds (`cpu_s`) in the training log of {where} (trained before they "
            "were logged; its wall seconds measure the machine's load, so they are not shown)")


def headline_columns(a: pd.DataFrame) -> list[str]:
    """The headline columns present in an attack frame: l∞'s always, l2's and l1's where
    attacks of that norm have headline rows."""
    found = set(a["attack"]) if len(a) else set()
    return [c for norm, c in HEADLINES.items() if norm == "linf" or c in found]


def _fixed(columns: list[str], avg_of: Optional[tuple[str, str]] = None,
           rename: Optional[dict[str, str]] = None, headline: bool = False,
           optional: Optional[dict[str, list[str]]] = None) -> Callable:
    rename = rename or {}

    def build(a: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
        cols = list(columns)
        if headline:  # next to Clean
            at = cols.index("clean") + 1 if "clean" in cols else 0
            cols[at:at] = headline_columns(a)
        found = set(a["attack"]) if len(a) else set()
        for anchor, extra in (optional or {}).items():  # columns shown only where they ran
            at = cols.index(anchor) + 1
            cols[at:at] = [c for c in extra if c in found]
        a = on_points(a, [rename.get(c, c) for c in cols])
        parts = [_clean(a)] if "clean" in cols else []
        parts += [_attack(a, rename.get(c, c), column=c) for c in cols
                  if c not in ("clean", "avg", *COST)]
        if len(a) and "epoch_cpu_s" in a:
            runs = _best_n(a, UNIT)
            gap = [_no_cpu_s(w) if has and isna else None for w, has, isna in
                   zip(runs.get("cpu_s_missing_in", pd.Series("the run", index=runs.index)),
                       runs["has_cost"], runs["epoch_cpu_s"].isna())]
            parts += [_cells(runs.assign(why=gap if c == "epoch_cpu_s" else None), c, c)
                      .assign(n=np.nan) for c in COST
                      if c in cols]  # per run, not per test point
        cells = _concat(parts)
        if avg_of:
            cells = _concat([cells, _avg(cells, *avg_of)])
        return cells, cols
    return build


def _summary(a: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    labels = [lab for lab in dict.fromkeys(a["attack"]) if not _SWEEP.match(lab)
              and lab != "pgd-fig4" and lab not in HEADLINES.values()] if len(a) else []
    labels.sort(key=lambda s: (_ORDER.index(s) if s in _ORDER else len(_ORDER), s))
    return _fixed(["clean", *labels], headline=True)(a)


def _eps_sweep(a: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    a = on_points(a, ["pgd", "autoattack"], nominal=False)
    sel = a[a["attack"].isin(["pgd", "autoattack"]) & (a["norm"] == "linf")] if len(a) else a
    if not len(sel) or sel["nominal"].all():
        return pd.DataFrame(columns=CELL), []
    parts, cols = [], []
    for eps in sorted(set(np.round(sel["eps"], 9))):
        for label in ("pgd", "autoattack"):
            col = f"{label}@{eps_to_str(eps)}"
            cols.append(col)
            parts.append(_attack(a, label, column=col, eps=eps))
    return _concat(parts), cols


def _iter_sweep(letter: str) -> Callable:
    def build(a: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
        found = sorted({int(m.group(2)) for lab in (a["attack"] if len(a) else [])
                        if (m := _SWEEP.match(lab)) and m.group(1) == letter})
        a = on_points(a, [f"pgd-{letter}{k}" for k in found])
        parts, cols = [], []
        for k in found:
            label = f"pgd-{letter}{k}"
            cols += [f"acc_{letter}{k}", f"ce_{letter}{k}"]
            parts += [_attack(a, label, column=f"acc_{letter}{k}"),
                      _attack(a, label, column=f"ce_{letter}{k}", value="ce")]
        return _concat(parts), cols
    return build


def _features(f: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    cols = ["fdr_clean", "fdr_adv", "afs_clean", "afs_adv", "scr_clean", "scr_adv", "mean_sep",
            "min_sep"]
    if not len(f):
        return pd.DataFrame(columns=CELL), cols
    clean = _best_n(f[f["condition"] == "clean"], UNIT)
    adv = _best_n(f[f["condition"] != "clean"], UNIT)
    parts = [_cells(clean, f"{m}_clean", m) for m in ("fdr", "afs", "scr")]
    parts += [_cells(adv, f"{m}_adv", m) for m in ("fdr", "afs", "scr")]
    centres = _best_n(pd.concat([clean, adv]), UNIT)  # centres do not depend on the condition
    parts += [_cells(centres, m, m) for m in ("mean_sep", "min_sep")]
    return _concat(parts), cols


def _corruption_units(c: pd.DataFrame) -> pd.DataFrame:
    return _best_n(c, [*UNIT, "corruption", "severity"]) if len(c) else c


def _severity(c: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    cols = [f"s{s}" for s in range(1, 6)] + ["avg_all"]
    c = _corruption_units(c)
    if not len(c):
        return pd.DataFrame(columns=CELL), cols
    g = c.groupby([*UNIT, "severity"], sort=False).agg(value=("accuracy", "mean"), n=("n", "min"))
    sev = g.reset_index()
    sev["column"] = "s" + sev["severity"].astype(str)
    allc = c.groupby(UNIT, sort=False).agg(value=("accuracy", "mean"), n=("n", "min")).reset_index()
    allc["column"] = "avg_all"
    return _concat([sev[CELL], allc[CELL]]), cols


def _per_corruption(c: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    c = _corruption_units(c)
    if not len(c):
        return pd.DataFrame(columns=CELL), []
    names = set(c["corruption"])
    cols = [n for n in CORRUPTIONS if n in names] + sorted(names - set(CORRUPTIONS))
    g = c.groupby([*UNIT, "corruption"], sort=False).agg(value=("accuracy", "mean"),
                                                         n=("n", "min")).reset_index()
    g["column"] = g["corruption"]
    return g[CELL], cols


def _rejection(j: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """AUROC and FPR at the TPR target per negative set; robust accuracy with rejection."""
    if not len(j):
        return pd.DataFrame(columns=CELL), []
    found = set(j["negatives"])
    sets = [s for s in ("pgd", "adaptive") if s in found] + sorted(found - {"pgd", "adaptive"})
    parts, cols = [], []
    for s in sets:
        sel = _best_n(j[j["negatives"] == s], UNIT)
        cols += [f"auroc_{s}", f"fpr_{s}"]
        parts += [_cells(sel, f"auroc_{s}", "auroc"), _cells(sel, f"fpr_{s}", "fpr")]
        if s in ("pgd", "adaptive"):
            cols += [f"acc_{s}", f"accrej_{s}"]
            parts += [_cells(sel, f"acc_{s}", "robust"),
                      _cells(sel, f"accrej_{s}", "robust_reject")]
    return _concat(parts), cols


def _why_rejection(c: str) -> str:
    return f"no `rejection` row for `{c.split('_', 1)[1]}` (`advbench evaluate --suite rejection`)"

#: Tables 1 and 2 carry the training cost: no bold, never enough alone to write a table
_COST_SPEC: dict[str, Any] = dict(
    derived=frozenset({"clean", "avg", *COST, *HEADLINES.values()}), neutral=lambda c: c in COST,
    decimals=lambda c: 0 if c in ("passes", "peak_mem_mb") else 1 if c == "epoch_cpu_s" else 2,
    note="Cost: mean CPU-seconds of the training process per epoch (all its threads; the "
         "machine's load does not enter it), forward+backward passes per training sample "
         "(declared by the defense; HAT includes its `st` helper run), peak memory (CUDA max "
         "allocated, or max RSS on CPU).")

TABLES: list[TableSpec] = [
    TableSpec("accuracy", "Clean and robust accuracy (%) under every evaluated attack", "attack",
              _summary, derived=frozenset({"clean", "avg"}),  # a cascaded run: headline only
              note="All attack columns at the nominal ε (sweeps of Tables 3, 6, 7 "
                   "and Figure 4 excluded)."),
    TableSpec("table1", "Table 1: clean, AutoAttack, Avg(clean, AA) and PGD l1/l2/l∞ accuracy (%)",
              "attack", _fixed(["clean", "autoattack", "avg", "pgd-l1", "pgd-l2", "pgd", *COST],
                               ("clean", "autoattack"), headline=True, optional={
                                   "pgd-l1": ["apgd-l1", "autoattack-l1"],
                                   "pgd-l2": ["apgd-l2", "autoattack-l2"]}), **_COST_SPEC),
    TableSpec("table2", "Table 2: accuracy (%) under clean, AA, FGSM, PGD-20, PGD-100, C&W and "
                        "the per-sample Ensemble", "attack",
              _fixed(["clean", "autoattack", "avg", "fgsm", "pgd20", "pgd100", "cw", "ensemble",
                      *COST], ("clean", "autoattack"), headline=True), **_COST_SPEC),
    TableSpec("table3", "Table 3: PGD and AutoAttack accuracy (%) at several l∞ ε", "attack",
              _eps_sweep, note="Columns `<attack>@<ε>`; PGD as in Table 1."),
    TableSpec("table4", "Table 4: feature-space discrimination on clean and PGD-20 features",
              "features", _features, derived=frozenset(), decimals=lambda c: 2 if "sep" in c else 3,
              lower=frozenset({"fdr_clean", "fdr_adv", "afs_clean", "afs_adv"}),
              why=lambda c: "no `features` row for this condition (`advbench features`)",
              note="FDR eq. 8, AFS eq. 9, SCR eq. 10 (class centres: prototypes for prototype "
                   "defenses, classifier weights otherwise), MeanSep/MinSep eq. 11-12 in degrees."),
    TableSpec("table5", "Table 5: accuracy (%) on CIFAR-10-C per severity and on average",
              "corruption", _severity, derived=frozenset(),
              note="`s1`…`s5`: mean over corruptions at that severity; `avg_all`: mean over all "
                   "corruptions and severities.",
              why=lambda c: "no `corruption` row (`advbench corruptions`)"),
    TableSpec("table5-corruptions", "CIFAR-10-C accuracy (%) per corruption (mean over "
                                    "severities)", "corruption", _per_corruption,
              derived=frozenset(), why=lambda c: f"no `{c}` row (`advbench corruptions`)"),
    TableSpec("table6", "Table 6: PGD with more iterations: accuracy (%) and mean CE loss at x'",
              "attack", _iter_sweep("k"), derived=frozenset(),
              neutral=lambda c: c.startswith("ce_"), decimals=lambda c: 4 if c.startswith("ce_")
              else 2, note="`acc_kK` / `ce_kK`: PGD with K iterations (ε nominal, step 1/255)."),
    TableSpec("table7", "Table 7: PGD with random restarts: accuracy (%) and mean CE loss at x'",
              "attack", _iter_sweep("r"), derived=frozenset(),
              neutral=lambda c: c.startswith("ce_"), decimals=lambda c: 4 if c.startswith("ce_")
              else 2, note="`acc_rR` / `ce_rR`: PGD with R random restarts."),
    TableSpec("table8", "Table 8: accuracy (%) under PGD on CE vs PGD on the defense's own loss",
              "attack", _fixed(["pgd20", "adaptive"]), derived=frozenset(),
              note="`pgd20`: PGD-20 on cross-entropy; `adaptive`: the same PGD maximising "
                   "the defense's own per-sample training loss."),
    TableSpec("rejection", "Rejection: detector AUROC (%), FPR (%) at 95% TPR, and robust "
                           "accuracy (%) without and with rejection", "rejection", _rejection,
              derived=frozenset(), lower=frozenset({"fpr_pgd", "fpr_adaptive", "fpr_ood-noise",
                                                     "fpr_ood-cifar10-grey", "fpr_ood-mnist-rgb"}),
              why=_why_rejection, robust=lambda c: c.startswith(("acc_", "accrej_")),
              note="Score: ±ED-WTA min_k ½‖f − p_k‖² (rows `[score: winner]`: ½‖f − p_w‖² "
                   "to the winning neuron's positive prototype), Adv-DPNP/DPNP distance to the "
                   "nearest prototype, DRP ℓ∞ distance to the nearest prototype, 1 − max "
                   "softmax otherwise; τ accepts 95% of the clean test points. "
                   "`pgd`: successful PGD x'; `adaptive`: PGD on margin − λ·max(0, r − τ)/σ; "
                   "`ood-*`: out-of-distribution sets. `acc_*`: robust accuracy; `accrej_*`: "
                   "points correct clean whose attack gives no accepted misclassification."),
]
