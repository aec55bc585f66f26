"""From rows to table grids: the (arch, checkpoint, defense) index in the caller's defense
order, per-seed aggregation, the cells behind a table, and the dataset × provenance × profile
groups. Shared by the Markdown/CSV/LaTeX report, the leaderboard page and the RobustBench
export, which import it and not each other."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from benchmark.config import stable_hash
from benchmark.safepath import identifier
from benchmark.report.tables import TableSpec, order_labels

BLOCK = ["arch", "checkpoint"]
INDEX = [*BLOCK, "defense"]


def aggregate(cells: pd.DataFrame, columns: list[str], index: pd.MultiIndex
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cells → wide table (``col``, ``col_std`` per column, ``n_seeds``) and per-cell seed counts.

    Means and sample standard deviations (ddof=1; NaN with one seed) are over seeds.
    """
    keys = [*BLOCK, "label"]
    seeds = cells.groupby(keys)["seed"].nunique()
    cells = cells[cells["value"].notna()]  # placeholders only say why a cell is empty
    stats = cells.groupby([*keys, "column"])["value"].agg(["mean", "std", "count"])
    wide = pd.DataFrame(index=index)
    counts = pd.DataFrame(0, index=index, columns=columns)
    for col in columns:
        if col in stats.index.get_level_values("column"):
            part = stats.xs(col, level="column")
            part.index = part.index.set_names(INDEX)
            wide[col] = part["mean"].reindex(index)
            wide[f"{col}_std"] = part["std"].reindex(index)
            counts[col] = part["count"].reindex(index).fillna(0).astype(int)
        else:
            wide[col] = wide[f"{col}_std"] = np.nan
    seeds.index = seeds.index.set_names(INDEX)
    wide["n_seeds"] = seeds.reindex(index).fillna(0).astype(int)
    return wide, counts


def _points(cells: pd.DataFrame, columns: list[str]) -> dict[tuple, dict[str, str]]:
    out: dict[tuple, dict[str, str]] = {}
    for (arch, ckpt), part in cells.groupby(BLOCK, sort=False):
        ns = {}
        for c in columns:
            vals = sorted({int(n) for n in part.loc[part["column"] == c, "n"] if pd.notna(n)})
            if vals:
                ns[c] = str(vals[0]) if len(vals) == 1 else f"{vals[0]}–{vals[-1]}"
        out[(arch, ckpt)] = ns
    return out


def build_table(spec: TableSpec, frame: pd.DataFrame, index: pd.MultiIndex,
                rankable: Optional[Mapping[tuple, bool]] = None
                ) -> Optional[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]]:
    """(wide table, seed counts, cells, columns), or None when the rows have nothing for it.

    Sections (arch × checkpoint) without any cell are left out; inside a section every
    defense of the dataset × profile is listed, so absent evaluations show as missing. The
    wide table carries the 95% intervals of its accuracy columns and, per headline column,
    the attacks it covers and the paired tests against the section's best row and AT
    (:mod:`benchmark.report.stats`; ``rankable``: (arch, checkpoint, label) → whether the row
    may be the best, False for an unreliable headline).
    """
    from benchmark.report import stats
    from benchmark.report.tables import HEADLINES

    cells, columns = spec.build(frame)
    valued = cells[cells["value"].notna()] if len(cells) else cells
    if not len(valued) or not (set(valued["column"]) - spec.derived):
        return None
    blocks = set(zip(valued["arch"], valued["checkpoint"]))  # sections with data for this table
    index = index[[(a, c) in blocks for a, c, _ in index]]
    cells = cells[[(a, c) in blocks for a, c in zip(cells["arch"], cells["checkpoint"])]]
    wide, counts = aggregate(cells, columns, index)
    wide = stats.add_intervals(wide, cells, columns, spec)
    for c in columns:
        if c in HEADLINES.values():
            wide = stats.add_covers(wide, cells, c)
            wide = stats.add_tests(wide, cells, c, rankable)
    valued = cells[cells["value"].notna() & cells["n"].notna()]
    npts = valued.groupby([*BLOCK, "label"])["n"].max() if len(valued) else pd.Series(dtype=float)
    npts.index = npts.index.set_names(INDEX)
    wide["n_points"] = npts.reindex(index) if len(npts) else np.nan  # the section's N
    order = [f"{c}{x}" for c in columns for x in ("", "_std", "_lo", "_hi", "_attacks",
                                                  "_p_best", "_p_at", "_tied_best")]
    wide = wide[[c for c in order if c in wide] + ["n_seeds", "n_points"]]
    return wide, counts, cells, columns


def section_rule(cells: pd.DataFrame) -> dict[tuple, str]:
    """(arch, checkpoint) → the section's points and their rule (from :func:`tables.on_points`)."""
    if not len(cells) or "rule" not in cells:
        return {}
    out = {}
    for (arch, ckpt), part in cells.groupby(BLOCK, sort=False):
        rules = sorted({r for r in part["rule"] if isinstance(r, str)})
        if rules:
            out[(arch, ckpt)] = "; ".join(rules)
    return out


def reasons(cells: pd.DataFrame) -> dict[tuple, str]:
    """(arch, checkpoint, label, column) → why the cell is empty, from placeholder cells."""
    if not len(cells) or "why" not in cells:
        return {}
    out: dict[tuple, list[str]] = {}
    for _, r in cells[cells["value"].isna() & cells["why"].notna()].iterrows():
        why = out.setdefault((r["arch"], r["checkpoint"], r["label"], r["column"]), [])
        if r["why"] not in why:
            why.append(str(r["why"]))
    return {k: "; ".join(v) for k, v in out.items()}


def _index(fr: dict[str, pd.DataFrame], order: Sequence[str]) -> pd.MultiIndex:
    units = pd.concat([f[["arch", "checkpoint", "label"]] for f in fr.values() if len(f)])
    tuples = []
    for (arch, ckpt), part in units.groupby(BLOCK, sort=True):
        tuples += [(arch, ckpt, lab) for lab in order_labels(part["label"], order)]
    return pd.MultiIndex.from_tuples(tuples, names=INDEX)


def _groups(records: list[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """(stem suffix, provenance text, profile, records) per dataset × provenance × profile.

    Raises:
        DataError: a ``dataset`` or ``profile`` that is not an identifier (it names files).
    """
    by: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in records:
        key = (str(r.get("dataset", "?")), str(r.get("profile") or "?"))
        by.setdefault(key, {}).setdefault(str(r.get("data_provenance") or ""), []).append(r)
    out = []
    for (dataset, profile), provs in sorted(by.items()):
        name = [identifier(v if v != "?" else "unknown", k)  # the suffix names files
                for k, v in (("dataset", dataset), ("profile", profile))]
        for prov, recs in sorted(provs.items()):
            suffix = "_".join(name) + (f"_p{stable_hash(prov, 6)}" if len(provs) > 1 else "")
            out.append((suffix, prov, profile, recs))
    return out
