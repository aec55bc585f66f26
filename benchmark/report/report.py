"""Result rows → the paper's tables (numeric CSV + Markdown) and figures (PNG).

``advbench report`` reads every row under a runs folder (``RUN/eval/*.json``) or a
``rows.jsonl`` file and writes, under ``OUT``::

    rows.jsonl                              every row, sorted; ``--rows`` rebuilds all tables
    report.md                               every Markdown table, in order
    index.html                              the leaderboard page (self-contained, offline)
    tables/<table>_<dataset>_<profile>.csv  numeric: mean and ``_std`` per column, ``n_seeds``
    tables/<table>_<dataset>_<profile>.md   ``mean ± std``, best per column bold, notes
    tables/<table>_<dataset>_<profile>.tex  the same through pandas' Styler (booktabs)
    tables/missing.csv                      every absent cell and why
    plots/figure3_<dataset>_<profile>.png   CIFAR-10-C accuracy per severity
    plots/figure4_<dataset>_<profile>.png   accuracy vs ε (FGSM, PGD)
    plots/roc_<dataset>_<profile>.png       ROC of the rejection score per negative set

Tables are built by :mod:`benchmark.report.tables` (which rows feed which column). One file holds
one dataset (and data provenance: a second provenance of the same dataset name gets its own
files, suffixed by a hash) and one profile: profiles are never mixed. Inside a file, one
section per (arch, checkpoint); rows follow the defense order the caller passes (``advbench
report`` passes the registry order, ``DEFENSES.names()``), others after by name: the report
reads only rows and imports no defense. CSV floats use a fixed format (``%.4f``) and missing
cells are ``NaN``, so a rebuild from the same rows is byte-identical; in Markdown missing
cells are ``–`` and listed with a reason.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from benchmark.run.cost import cost_rows
from benchmark.store import RunStore, atomic_write_bytes, read_jsonl
from benchmark.report import verdicts as vd
from benchmark.report.latex import tex_escape, to_latex
from benchmark.report.grid import BLOCK, INDEX, _groups, _index, _points, aggregate, build_table
from benchmark.report.tables import TABLES, TableSpec, _labels, display, frames

logger = logging.getLogger(__name__)

_SORT = ("dataset", "profile", "kind", "defense", "arch", "seed", "checkpoint", "attack", "eps",
         "condition", "corruption", "severity", "n_examples", "eval_key")


# ------------------------------------------------------------------------------ rows
def _clean_record(r: dict) -> dict:
    """Drop NaN scalars (a DataFrame round trip fills absent fields with NaN)."""
    return {k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}


def _usable_rows(path: Path) -> list[dict[str, Any]]:
    """The valid rows of a rows.jsonl or a runs folder (:func:`benchmark.validate.row_problem`);
    the others are summarised in one warning, or one error if no row is valid."""
    from benchmark.errors import UsageError
    from benchmark.validate import is_result_row, row_problem

    skipped: list[str] = []
    rows = []
    if not path.is_file():
        rows = RunStore(path).rows(skipped)
    for i, r in enumerate(read_jsonl(path, skipped) if path.is_file() else []):
        problem = row_problem(r)
        if problem:
            skipped.append(f"row {i + 1}: {problem}")
        else:
            rows.append(r)
    if skipped and not any(is_result_row(r) for r in rows):
        raise UsageError(f"no result rows in {path}: {len(skipped)} invalid line(s), first "
                         f"{skipped[0]}")
    if skipped:
        logger.warning("%s: skipped %d invalid line(s), first %s", path, len(skipped), skipped[0])
    return rows


def load_records(source: Path | str | pd.DataFrame | Iterable[dict]) -> list[dict[str, Any]]:
    """Rows from a runs folder, a ``rows.jsonl`` file, a DataFrame or dicts; sorted, deduplicated.

    A runs folder also gives one ``"kind": "cost"`` row per trained run (:mod:`benchmark.run.cost`).

    Rows with the same ``eval_key`` are kept once (the last one read).
    """
    if isinstance(source, (str, Path)):
        p = Path(source)
        rows = _usable_rows(p) + ([] if p.is_file() else cost_rows(p))
    elif isinstance(source, pd.DataFrame):
        rows = [_clean_record(r) for r in source.to_dict(orient="records")]
    else:
        rows = [dict(r) for r in source]
    unique: dict[str, dict] = {}
    for i, r in enumerate(rows):
        unique[str(r.get("eval_key") or f"#{i}")] = r

    def key(r: dict) -> tuple:
        return tuple(json.dumps(r.get(k, r.get("kind", "attack") if k == "kind" else None),
                                sort_keys=True, default=str) for k in _SORT)
    return sorted(unique.values(), key=key)


def load_rows(source: Path | str | Iterable[dict]) -> pd.DataFrame:
    """Rows as a DataFrame (nested fields such as ``hparams`` stay dicts)."""
    return pd.DataFrame(load_records(source))


def write_rows(records: list[dict], path: Path) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n"
                                     for r in records).encode())


# ------------------------------------------------------------------------------ tables
def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(float_format="%.4f", na_rep="NaN", lineterminator="\n")


def _fmt(v: float, s: float, d: int) -> str:
    return f"{v:.{d}f}" + (f" ± {s:.{d}f}" if pd.notna(s) else "")


def to_markdown(table: pd.DataFrame, spec: Optional[TableSpec] = None, *,
                counts: Optional[pd.DataFrame] = None, points: Optional[dict] = None,
                verdicts: Optional[dict] = None) -> str:
    """Markdown sections (one per arch × checkpoint): ``mean ± std`` cells, best per column bold.

    Best is the highest value (lowest for the spec's ``lower`` columns) at the shown precision,
    all tied rows bold, and nothing bold when every row ties. Missing cells are ``–`` and listed with the
    spec's reason; cells over fewer seeds than the row has are listed too. With ``verdicts``
    (:func:`benchmark.report.verdicts.row_verdicts`) cells carry health/reliability marks,
    attack tables get a ``reliable`` column, and footnotes say why.
    """
    spec = spec or TABLES[0]
    if not isinstance(table.index, pd.MultiIndex):
        table = table.set_index(pd.MultiIndex.from_tuples(
            [("?", "?", i) for i in table.index], names=INDEX))
    cols = [c for c in table.columns if not c.endswith("_std") and c != "n_seeds"]
    parts = []
    for (arch, ckpt), block in table.groupby(level=BLOCK, sort=False):
        rel = verdicts is not None and spec.has_reliability
        lines = [f"#### arch `{arch}`, checkpoint `{ckpt}`", "",
                 "| defense | " + " | ".join(display(c) for c in cols) + " | seeds |"
                 + (" reliable |" if rel else ""),
                 "|---|" + "---:|" * len(cols) + "---:|" + ("---|" if rel else "")]
        best = {}
        for c in cols:
            d = spec.decimals(c)
            vals = block[c].dropna().round(d)
            if spec.better(c) and vals.nunique() > 1:
                best[c] = vals.min() if spec.better(c) == "lower" else vals.max()
        missing, partial = [], []
        for idx, r in block.iterrows():
            name, cells = idx[-1], []
            for c in cols:
                v, s, d = r[c], r.get(f"{c}_std", np.nan), spec.decimals(c)
                if pd.isna(v):
                    cells.append("–")
                    missing.append((name, c))
                    continue
                text = _fmt(v, s, d)
                mark = verdicts[idx].mark(spec.is_robustness(c), attack=vd.column_attack(c)) \
                    if verdicts and idx in verdicts else ""
                cells.append((f"**{text}**" if c in best and round(v, d) == best[c] else text)
                             + (f" {mark}" if mark else ""))
                if counts is not None and 0 < counts.loc[idx, c] < r["n_seeds"]:
                    partial.append(f"- `{name}` / {display(c)}: {counts.loc[idx, c]} of "
                                   f"{int(r['n_seeds'])} seeds")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {int(r['n_seeds'])} |" + (
                f" {_reliable(verdicts, idx)} |" if rel else ""))
        if points and points.get((arch, ckpt)):
            lines += ["", "Test points per column: " + ", ".join(
                f"{display(c)} {n}" for c, n in points[(arch, ckpt)].items()) + "."]
        notes = vd.footnotes(verdicts, arch, ckpt, [i[-1] for i in block.index],
                             spec.has_reliability) if verdicts else []
        if notes:
            lines += ["", "Verdicts (`advbench check`; thresholds in benchmark/eval/checks.py "
                          "and benchmark/run/health.py):"] + notes
        if missing:
            lines += ["", "Missing (–):"] + _missing_lines(missing, cols, spec)
        if partial:
            lines += ["", "Fewer seeds than the row:"] + partial
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _reliable(verdicts: dict, idx: tuple) -> str:
    v = verdicts.get(idx)
    if v is None:
        return "–"
    return v.reliable_cell


def _missing_lines(missing: list[tuple[str, str]], cols: list[str], spec: TableSpec) -> list[str]:
    by_name: dict[str, list[str]] = {}
    for name, c in missing:
        by_name.setdefault(name, []).append(c)
    out = []
    for name, absent in by_name.items():
        if len(absent) == len(cols) and len(cols) > 1:
            out.append(f"- `{name}`: no rows for this table")
        else:
            out += [f"- `{name}` / {display(c)}: {spec.why(c)}" for c in absent]
    return out


def accuracy_table(df: pd.DataFrame | Iterable[dict], columns: Optional[list[str]] = None,
                   order: Sequence[str] = ()) -> pd.DataFrame:
    """Clean + attack columns (percent) of the rows, indexed by (arch, checkpoint, defense),
    defenses in ``order`` (then the others by name)."""
    fr = frames(load_records(df))
    spec = TABLES[0]
    cells, cols = spec.build(fr["attack"])
    if columns is not None:
        cols = ["clean", *[c for c in columns if c != "clean"]]
    return aggregate(cells, cols, _index(fr, order))[0]


def write_report(rows: pd.DataFrame | Iterable[dict], out_dir: Path | str, *,
                 plots: bool = True, order: Sequence[str] = (),
                 catalog: Optional[Mapping[str, Mapping[str, str]]] = None) -> list[str]:
    """Write rows.jsonl, every table that has data (CSV + Markdown), missing.csv and the plots.

    The report reads nothing but the rows: ``order`` (defense names; ``advbench report``
    passes the registry order) sets the row order of every table and the colour of every
    defense in the plots; defenses not in it follow by name.

    Returns:
        The Markdown of each table written, in order.
    """
    out_dir = Path(out_dir)
    records = load_records(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not records:
        logger.warning("no result rows found")
        return []
    write_rows(records, out_dir / "rows.jsonl")
    mds, missing = [], []
    for suffix, prov, profile, recs in _groups(records):
        fr = frames(recs)
        index = _index(fr, order)
        dataset = str(recs[0].get("dataset", "?"))
        for spec in TABLES:
            built = build_table(spec, fr[spec.kind], index)
            if built is None:
                continue
            wide, counts, cells, columns = built
            extra = ""
            if spec.kind == "corruption":
                cprov = sorted({str(r.get("corruption_provenance")) for r in recs
                                if r.get("kind") == "corruption" and r.get("corruption_provenance")})
                extra = " Corruptions: " + "; ".join(cprov) + "." if cprov else ""
            verdicts = vd.row_verdicts(recs, _labels(recs), any_eps=spec.name == "table3") \
                if vd.has_verdicts(recs) else None
            numeric = wide.assign(**vd.csv_columns(verdicts, wide.index)) \
                if verdicts is not None and spec.has_reliability else wide
            md = (f"### {spec.title} — `{dataset}`, profile `{profile}`\n\n"
                  f"Data: {prov or 'provenance not recorded'}.{extra} Profile `{profile}`. "
                  + (spec.note + " " if spec.note else "")
                  + "Cells: mean ± std over seeds (std only with several seeds); best per column "
                    "in bold.\n\n"
                  + to_markdown(wide, spec, counts=counts, points=_points(cells, columns),
                                verdicts=verdicts))
            stem = f"{spec.name}_{suffix}"
            atomic_write_bytes(out_dir / "tables" / f"{stem}.csv", to_csv(numeric).encode())
            atomic_write_bytes(out_dir / "tables" / f"{stem}.md", md.encode())
            atomic_write_bytes(out_dir / "tables" / f"{stem}.tex", to_latex(
                wide, spec, tex_escape(f"{spec.title} — {dataset}, profile {profile}. Mean ± std "
                                       f"over seeds; best per column in bold.")).encode())
            mds.append(md)
            for idx, r in wide.iterrows():
                missing += [{"table": stem, "arch": idx[0], "checkpoint": idx[1],
                             "defense": idx[2], "column": c, "reason": spec.why(c)}
                            for c in columns if pd.isna(r[c])]
        if plots:
            _figures(fr, out_dir / "plots", suffix, order)
    atomic_write_bytes(out_dir / "tables" / "missing.csv", pd.DataFrame(
        missing, columns=["table", "arch", "checkpoint", "defense", "column", "reason"])
        .to_csv(index=False, lineterminator="\n").encode())
    atomic_write_bytes(out_dir / "report.md", "\n".join(mds).encode())
    from benchmark.report.html import write_page
    write_page(_groups(records), out_dir, order=order, catalog=catalog)
    return mds


def _figures(fr: dict[str, pd.DataFrame], plot_dir: Path, suffix: str,
             order: Sequence[str]) -> None:
    import matplotlib.pyplot as plt

    from benchmark.report import plots

    for name, fig in (("figure3", plots.severity_figure(fr["corruption"], order)),
                      ("figure4", plots.eps_figure(fr["attack"], order)),
                      ("roc", plots.roc_figure(fr["rejection"], order))):
        if fig is not None:
            plots.save(fig, plot_dir / f"{name}_{suffix}.png")
            plt.close(fig)
