"""From rows to table grids: the (arch, checkpoint, defense) index in the caller's defense
order, per-seed aggregation, the cells behind a table, and the dataset × provenance × profile
groups. Shared by the Markdown/CSV/LaTeX report, the leaderboard page and the RobustBench
export, which import it and not each other."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from benchmark.config import stable_hash
from benchmark.report.tables import TableSpec, order_labels

BLOCK = ["arch", "checkpoint"]
INDEX = [*BLOCK, "defense"]


def aggregate(cells: pd.DataFrame, columns: list[str], index: pd.MultiIndex
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cells → wide table (``col``, ``col_std`` per column, ``n_seeds``) and per-cell seed counts.

    Means and sample standard deviations (ddof=1; NaN with one seed) are over seeds.
    """
    keys = [*BLOCK, "label"]
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
    seeds = cells.groupby(keys)["seed"].nunique()
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


def build_table(spec: TableSpec, frame: pd.DataFrame, index: pd.MultiIndex
                ) -> Optional[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]]:
    """(wide table, seed counts, cells, columns), or None when the rows have nothing for it.

    Sections (arch × checkpoint) without any cell are left out; inside a section every
    defense of the dataset × profile is listed, so absent evaluations show as missing.
    """
    cells, columns = spec.build(frame)
    if not len(cells) or not (set(cells["column"]) - spec.derived):
        return None
    blocks = set(zip(cells["arch"], cells["checkpoint"]))  # sections with data for this table
    index = index[[(a, c) in blocks for a, c, _ in index]]
    wide, counts = aggregate(cells, columns, index)
    return wide, counts, cells, columns


def _index(fr: dict[str, pd.DataFrame], order: Sequence[str]) -> pd.MultiIndex:
    units = pd.concat([f[["arch", "checkpoint", "label"]] for f in fr.values() if len(f)])
    tuples = []
    for (arch, ckpt), part in units.groupby(BLOCK, sort=True):
        tuples += [(arch, ckpt, lab) for lab in order_labels(part["label"], order)]
    return pd.MultiIndex.from_tuples(tuples, names=INDEX)


def _groups(records: list[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """(stem suffix, provenance text, profile, records) per dataset × provenance × profile."""
    by: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in records:
        key = (str(r.get("dataset", "?")), str(r.get("profile") or "?"))
        by.setdefault(key, {}).setdefault(str(r.get("data_provenance") or ""), []).append(r)
    out = []
    for (dataset, profile), provs in sorted(by.items()):
        for prov, recs in sorted(provs.items()):
            suffix = f"{dataset}_{profile}" + (f"_p{stable_hash(prov, 6)}" if len(provs) > 1
                                               else "")
            out.append((suffix, prov, profile, recs))
    return out
