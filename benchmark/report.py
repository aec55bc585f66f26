"""Result rows → comparison tables (numeric CSV + Markdown).

Pure functions over a DataFrame of rows (one row per run × checkpoint × attack), so tables can
be regenerated from committed rows without any run folder. Accuracies are in percent in the
tables; means and standard deviations are over seeds.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from benchmark.store import RunStore, atomic_write_bytes

logger = logging.getLogger(__name__)

GROUP = ["dataset", "profile", "arch", "checkpoint"]


def defense_order() -> list[str]:
    from defenses import DEFENSES
    return DEFENSES.names()


def load_rows(source: Path | str | Iterable[dict]) -> pd.DataFrame:
    """Rows from a runs folder, a ``rows.jsonl`` file, or an iterable of dicts."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_file():
            from benchmark.store import read_jsonl
            rows = read_jsonl(p)
        else:
            rows = RunStore(p).rows()
    else:
        rows = list(source)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["dataset", "defense", "seed", "checkpoint", "attack"], kind="stable")


def _order_defenses(names: Iterable[str]) -> list[str]:
    order = {n: i for i, n in enumerate(defense_order())}
    return sorted(set(names), key=lambda n: (order.get(n, len(order)), n))


def accuracy_table(df: pd.DataFrame, columns: Optional[list[str]] = None) -> pd.DataFrame:
    """Defense × (clean + attack columns) in percent: ``<col>`` mean, ``<col>_std``, ``n_seeds``.

    The clean accuracy comes from the rows' ``clean_acc`` (identical for every attack of one
    run and checkpoint); missing cells are NaN.
    """
    if columns is None:
        columns = list(dict.fromkeys(df["attack"]))
    clean = (df.groupby(["defense", "seed"])["clean_acc"].first() * 100).rename("clean")
    rob = df.pivot_table(index=["defense", "seed"], columns="attack", values="robust_acc",
                         aggfunc="first") * 100
    per_seed = pd.concat([clean, rob.reindex(columns=columns)], axis=1)
    g = per_seed.groupby(level="defense")
    mean, std = g.mean(), g.std(ddof=1)
    out = pd.DataFrame(index=_order_defenses(per_seed.index.get_level_values("defense")))
    for col in ["clean", *columns]:
        out[col] = mean[col] if col in mean else np.nan
        out[f"{col}_std"] = std[col] if col in std else np.nan
    out["n_seeds"] = g.size()
    out.index.name = "defense"
    return out


def to_markdown(table: pd.DataFrame, *, bold_best: bool = True) -> str:
    """Markdown with ``mean ± std`` cells (std when n_seeds > 1) and the best per column bold."""
    cols = [c for c in table.columns if not c.endswith("_std") and c != "n_seeds"]
    header = "| defense | " + " | ".join(cols) + " | seeds |"
    lines = [header, "|" + "---|" * (len(cols) + 2)]
    best = {c: table[c].max() for c in cols}
    for name, r in table.iterrows():
        cells = []
        for c in cols:
            v, s = r[c], r.get(f"{c}_std", np.nan)
            if pd.isna(v):
                cells.append("–")
                continue
            text = f"{v:.2f}" + (f" ± {s:.2f}" if pd.notna(s) else "")
            cells.append(f"**{text}**" if bold_best and np.isclose(v, best[c]) else text)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {int(r['n_seeds'])} |")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, out_dir: Path, stem: str, title: str = "") -> str:
    """Write ``<stem>.csv`` (numeric, fixed format) and ``<stem>.md``; return the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / f"{stem}.csv", table.to_csv(float_format="%.4f").encode())
    md = (f"### {title}\n\n" if title else "") + to_markdown(table)
    atomic_write_bytes(out_dir / f"{stem}.md", md.encode())
    return md


def write_report(df: pd.DataFrame, out_dir: Path | str) -> list[str]:
    """One accuracy table per (dataset, profile, arch, checkpoint); also ``rows.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        logger.warning("no result rows found")
        return []
    rows = df.to_dict(orient="records")
    atomic_write_bytes(out_dir / "rows.jsonl", "".join(
        json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows).encode())
    mds = []
    for keys, part in df.groupby(GROUP, sort=True):
        stem = "accuracy_" + "_".join(str(k) for k in keys)
        title = ("Clean and robust accuracy (%) — dataset {}, profile {}, arch {}, checkpoint {}"
                 .format(*keys))
        mds.append(write_table(accuracy_table(part), out_dir / "tables", stem, title))
    return mds
