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
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from benchmark.data import public_provenance
from benchmark.safepath import inside
from benchmark.safepath import write_bytes as safe_write
from benchmark.store import RunStore, atomic_write_bytes, read_jsonl
from benchmark.report import verdicts as vd
from benchmark.report.stats import rankable
from benchmark.report.latex import best_mask, best_values, tex_escape, to_latex
from benchmark.report.grid import (BLOCK, INDEX, _groups, _index, aggregate, build_table,
                                   reasons, section_rule)
from benchmark.report.tables import TABLES, TableSpec, _labels, corruption_title, display, frames

logger = logging.getLogger(__name__)

#: what every attack (and rejection) table says about its statistics
_STATS_NOTE = (" [lo, hi]: 95% Wilson interval of the accuracy on the section's points (seeds "
               "pooled: k and N summed over seeds), apart from the std over seeds.")
#: what tables with a headline column say about it
_HEADLINE_NOTE = (" Headline: per-sample worst case over every attack evaluated on the section's "
                  "points (a point is robust only if every attack failed on it); rows are bold "
                  "by it, and a row whose headline is unreliable is never bold above reliable "
                  "ones. ≈: statistically tied with the section's best headline; p vs best / "
                  "p vs at: exact McNemar test (binomial on the discordant points) against the "
                  "best row and AT on the same points, α = 0.05, seeds paired by seed index "
                  "(in seed order when two rows share none), discordant counts summed.")

_SORT = ("dataset", "profile", "kind", "defense", "arch", "seed", "checkpoint", "attack", "eps",
         "condition", "corruption", "severity", "n_examples", "eval_key")


# ------------------------------------------------------------------------------ rows
def _clean_record(r: dict) -> dict:
    """Drop NaN scalars (a DataFrame round trip fills absent fields with NaN)."""
    return {k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}


def valid_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a rows.jsonl or a runs folder that pass
    :func:`benchmark.validate.row_problem`, and the problems of the others. ``advbench report``
    and ``advbench false-alarms`` read rows through this one function.

    Raises:
        DataError: a row whose ``dataset`` or ``profile`` cannot name a file (the line or
            file is named): nothing is built from it.
    """
    from benchmark.errors import DataError
    from benchmark.validate import path_problem, row_problem

    skipped: list[str] = []
    rows = []
    if not path.is_file():
        rows = RunStore(path).rows(skipped, strict=True)
    for i, r in enumerate(read_jsonl(path, skipped) if path.is_file() else []):
        bad_path = path_problem(r)
        if bad_path:
            raise DataError(f"{path} row {i + 1}: {bad_path}")
        problem = row_problem(r)
        if problem:
            skipped.append(f"row {i + 1}: {problem}")
        else:
            rows.append(r)
    return rows, skipped


def _usable_rows(path: Path) -> list[dict[str, Any]]:
    """The valid rows of a rows.jsonl or a runs folder (:func:`valid_rows`); the others are
    summarised in one warning, or one error if no row is valid."""
    from benchmark.errors import UsageError
    from benchmark.validate import is_result_row

    rows, skipped = valid_rows(path)
    if skipped and not any(is_result_row(r) for r in rows):
        raise UsageError(f"no result rows in {path}: {len(skipped)} invalid line(s), first "
                         f"{skipped[0]}")
    if skipped:
        logger.warning("%s: skipped %d invalid line(s), first %s", path, len(skipped), skipped[0])
    return rows


def load_records(source: Path | str | pd.DataFrame | Iterable[dict], *,
                 extra: Iterable[dict] = ()) -> list[dict[str, Any]]:
    """Rows from a runs folder, a ``rows.jsonl`` file, a DataFrame or dicts; sorted, deduplicated.

    ``extra`` rows join them: ``advbench report`` passes the ``"kind": "cost"`` row of each
    trained run (:mod:`benchmark.run.cost` computes them; the report only reads rows).

    Rows with the same ``eval_key`` are kept once (the last one read).
    """
    if isinstance(source, (str, Path)):
        p = Path(source)
        rows = _usable_rows(p)
    elif isinstance(source, pd.DataFrame):
        rows = [_clean_record(r) for r in source.to_dict(orient="records")]
    else:
        rows = [dict(r) for r in source]
    rows += [dict(r) for r in extra]
    unique: dict[str, dict] = {}
    for i, r in enumerate(rows):
        if r.get("data_provenance"):  # no local paths in a published report
            r = {**r, "data_provenance": public_provenance(r["data_provenance"])}
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


# ------------------------------------------------------------------------------ escaping
#: Markdown characters that text from rows (defense names, labels, reasons) must not use as
#: syntax: raw HTML and entities, code spans, table cells, bold, and the backslash itself
#: (``_`` and brackets stay: an intraword ``_`` is not emphasis, and ``](`` is broken below)
_MD_SPECIALS = re.compile(r"([\\`*<>|&])")


def md_escape(text: object) -> str:
    """Text from rows or configs → Markdown that shows it literally (one line; ``<script>``
    cannot become HTML, ``|`` a cell break, ``[x](url)`` a link, ``**`` bold)."""
    out = _MD_SPECIALS.sub(r"\\\1", " ".join(str(text).split()))
    return out.replace("](", "]\\(")


def md_code(text: object) -> str:
    """Text as a Markdown code span whose fence is longer than any backtick run inside it
    (CommonMark), one line, with ``|`` escaped for GFM tables."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _code_safe(text: object) -> str:
    """Text for a single-backtick code span written by code outside this module (verdict
    footnotes): one line, no backtick, no ``|``."""
    return " ".join(str(text).split()).replace("`", "'").replace("|", "/")


def _md_verdicts(verdicts: dict) -> dict:
    """The verdicts with names and reasons made safe for the Markdown footnotes."""
    return {(a, c, _code_safe(n)): vd.RowVerdict(
                [md_escape(u) for u in v.unhealthy], [md_escape(f) for f in v.failed], v.passed,
                [vd.Doubt(md_escape(d.text), d.finding, d.cells) for d in v.doubts],
                [(md_escape(t), r) for t, r in v.stale])
            for (a, c, n), v in verdicts.items()}


#: a CSV cell starting with one of these is read as a formula by spreadsheets
_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: Any) -> Any:
    """A text cell for a CSV file: a leading formula character is neutralised with ``'``
    (CSV injection); numbers and other values pass unchanged (quoting is the CSV writer's)."""
    if isinstance(value, str) and value.startswith(_CSV_FORMULA):
        return "'" + value
    return value


def _csv_safe(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its text index levels and text cells passed through :func:`csv_text`."""
    out = table.copy()
    if isinstance(out.index, pd.MultiIndex):
        out.index = pd.MultiIndex.from_tuples([tuple(csv_text(v) for v in i) for i in out.index],
                                              names=out.index.names)
    else:
        out.index = pd.Index([csv_text(v) for v in out.index], name=out.index.name)
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(csv_text)
    return out


# ------------------------------------------------------------------------------ tables
def to_csv(table: pd.DataFrame) -> str:
    return _csv_safe(table).to_csv(float_format="%.4f", na_rep="NaN", lineterminator="\n")


def _fmt(v: float, s: float, d: int) -> str:
    return f"{v:.{d}f}" + (f" ± {s:.{d}f}" if pd.notna(s) else "")


def _p(v: Any) -> str:
    return "–" if pd.isna(v) else "<0.001" if v < 0.001 else f"{v:.3f}"


def to_markdown(table: pd.DataFrame, spec: Optional[TableSpec] = None, *,
                counts: Optional[pd.DataFrame] = None, points: Optional[dict] = None,
                verdicts: Optional[dict] = None, why: Optional[dict] = None) -> str:
    """Markdown sections (one per arch × checkpoint): ``mean ± std [95% interval]`` cells,
    best per column bold.

    Best is the highest value (lowest for the spec's ``lower`` columns) at the shown precision,
    all tied rows bold, and nothing bold when every row ties; a row whose headline is
    unreliable is never bold in a robustness column while reliable rows have values. A headline
    cell statistically tied with the section's best carries ``≈``, and the p-values of the
    paired tests against the best row and AT follow. Missing cells are ``–`` and listed with
    their reason (``why``: (arch, ckpt, label, column) → reason, else the spec's); cells over
    fewer seeds than the row has are listed too. ``points``: (arch, ckpt) → the section's
    points and rule. With ``verdicts`` (:func:`benchmark.report.verdicts.row_verdicts`) cells
    carry health/reliability marks, attack tables get a ``reliable`` column, and footnotes say
    why.
    """
    from benchmark.report import stats
    from benchmark.report.tables import HEADLINES

    spec = spec or TABLES[0]
    if not isinstance(table.index, pd.MultiIndex):
        table = table.set_index(pd.MultiIndex.from_tuples(
            [("?", "?", i) for i in table.index], names=INDEX))
    cols = stats.value_columns(table)
    tested = "headline_p_best" in table and bool(table["headline_p_best"].notna().any())
    ok = rankable(verdicts)
    parts = []
    for (arch, ckpt), block in table.groupby(level=BLOCK, sort=False):
        rel = verdicts is not None and spec.has_reliability
        lines = [f"#### arch {md_code(arch)}, checkpoint {md_code(ckpt)}", ""]
        if points and points.get((arch, ckpt)):
            lines += [f"Test points: {points[(arch, ckpt)]}, for every cell of this section.",
                      ""]
        lines += ["| defense | " + " | ".join(display(c) for c in cols) + " | seeds |"
                  + (" p vs best | p vs at |" if tested else "") + (" reliable |" if rel else ""),
                  "|---|" + "---:|" * len(cols) + "---:|" + ("---:|---:|" if tested else "")
                  + ("---|" if rel else "")]
        best = best_values(block, cols, spec, ok)
        bold = best_mask(block, cols, spec, ok)
        missing, partial = [], []
        for idx, r in block.iterrows():
            name, cells = idx[-1], []
            for c in cols:
                v, s, d = r[c], r.get(f"{c}_std", np.nan), spec.decimals(c)
                if pd.isna(v):
                    cells.append("–")
                    missing.append((name, c, (why or {}).get((arch, ckpt, name, c))))
                    continue
                text = _fmt(v, s, d)
                robust = spec.is_robustness(c) or c in HEADLINES.values()
                attack = "headline" if c in HEADLINES.values() else vd.column_attack(c)
                mark = verdicts[idx].mark(robust, attack=attack) \
                    if verdicts and idx in verdicts else ""
                tie = " ≈" if c in best and not bold.loc[idx, c] and \
                    r.get(f"{c}_tied_best") == 1 else ""
                text += stats.interval_text(r.get(f"{c}_lo"), r.get(f"{c}_hi"))
                cells.append((f"**{text}**" if bold.loc[idx, c] else text) + tie
                             + (f" {mark}" if mark else ""))
                if counts is not None and 0 < counts.loc[idx, c] < r["n_seeds"]:
                    partial.append(f"- {md_code(name)} / {display(c)}: {counts.loc[idx, c]} of "
                                   f"{int(r['n_seeds'])} seeds")
            lines.append(f"| {md_escape(name)} | " + " | ".join(cells) + f" | {int(r['n_seeds'])} |"
                         + (f" {_p(r['headline_p_best'])} | {_p(r['headline_p_at'])} |"
                            if tested else "")
                         + (f" {_reliable(verdicts, idx)} |" if rel else ""))
        covers = [c for c in cols if f"{c}_attacks" in block]
        for c in covers:
            got = {idx[-1]: a for idx, a in block[f"{c}_attacks"].items() if isinstance(a, str)}
            if got:
                same = len(set(got.values())) == 1
                lines += ["", f"{display(c)} covers (per-sample worst case over): " + (
                    ", ".join(md_code(a) for a in next(iter(got.values())).split("+"))
                    + " for every row" if same else "; ".join(
                        f"{md_code(n)}: " + ", ".join(a.split("+")) for n, a in got.items())) + "."]
        notes = vd.footnotes(_md_verdicts(verdicts), arch, ckpt,
                             [_code_safe(i[-1]) for i in block.index],
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


def _missing_lines(missing: list[tuple[str, str, Optional[str]]], cols: list[str],
                   spec: TableSpec) -> list[str]:
    by_name: dict[str, list[tuple[str, Optional[str]]]] = {}
    for name, c, why in missing:
        by_name.setdefault(name, []).append((c, why))
    out = []
    for name, absent in by_name.items():
        if len(absent) == len(cols) and len(cols) > 1 and not any(w for _, w in absent):
            out.append(f"- {md_code(name)}: no rows for this table")
        else:
            out += [f"- {md_code(name)} / {display(c)}: {why or spec.why(c)}" for c, why in absent]
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
    from benchmark.errors import DataError
    from benchmark.validate import path_problem

    out_dir = Path(out_dir)
    records = load_records(rows)
    for i, r in enumerate(records):  # rows name files: refused before anything is written
        problem = path_problem(r)
        if problem:
            raise DataError(f"row {i + 1} ({r.get('eval_key')!r:.80}): {problem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not records:
        logger.warning("no result rows found")
        return []
    rows_bytes = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records
                         ).encode()
    limit = OUTPUT_MULTIPLE * len(rows_bytes) + OUTPUT_SLACK
    tables: dict[str, bytes] = {}  # file name under tables/ -> bytes, written once all fit
    mds, missing = [], []
    for suffix, prov, profile, recs in _groups(records):
        fr = frames(recs)
        dataset = str(recs[0].get("dataset", "?"))
        if not any(len(f) for f in fr.values()):  # trained, nothing evaluated yet
            logger.info("%s (%s): no table rows yet, skipped", dataset, profile)
            continue
        index = _index(fr, order)
        variants = score_variants(fr)
        for spec in TABLES:
            verdicts = vd.row_verdicts(recs, _labels(recs), any_eps=spec.name == "table3") \
                if vd.has_verdicts(recs) else None
            labels = index.get_level_values(-1)
            built = build_table(spec, fr[spec.kind], index[
                labels.isin(set(fr["rejection"].get("label", ()))) if spec.kind == "rejection"
                else ~labels.isin(variants)], rankable(verdicts))
            if built is None:
                continue
            wide, counts, cells, columns = built
            why = reasons(cells)
            extra, title = "", spec.title
            if spec.kind == "corruption":
                cprov = sorted({str(r.get("corruption_provenance")) for r in recs
                                if r.get("kind") == "corruption" and r.get("corruption_provenance")})
                extra = "Corruptions: " + "; ".join(cprov) + "." if cprov else ""
                title = corruption_title(title, cprov)
            numeric = wide.assign(**vd.csv_columns(verdicts, wide.index)) \
                if verdicts is not None and spec.has_reliability else wide
            md = (f"### {title} — {md_code(dataset)}, profile {md_code(profile)}\n\n"
                  f"Data: {md_escape(prov or 'provenance not recorded')}."
                  + (f" {md_escape(extra)}" if extra else "") + " "
                  f"Profile {md_code(profile)}. "
                  + (spec.note + " " if spec.note else "")
                  + "Cells: mean ± std over seeds (std only with several seeds); best per column "
                    "in bold." + (_STATS_NOTE if spec.kind in ("attack", "rejection") else "")
                  + (_HEADLINE_NOTE if "headline" in columns else "") + "\n\n"
                  + to_markdown(numeric, spec, counts=counts, points=section_rule(cells),
                                verdicts=verdicts, why=why))
            stem = f"{spec.name}_{suffix}"
            tables[f"{stem}.csv"] = to_csv(numeric).encode()
            tables[f"{stem}.md"] = md.encode()
            tables[f"{stem}.tex"] = to_latex(
                numeric, spec, tex_escape(f"{title} — {dataset}, profile {profile}. Mean ± "
                                          f"std over seeds [95% Wilson interval]; best per "
                                          f"column in bold."), rankable(verdicts)).encode()
            _within(sum(map(len, tables.values())), limit, len(rows_bytes))
            mds.append(md)
            for idx, r in wide.iterrows():
                missing += [{"table": stem, "arch": idx[0], "checkpoint": idx[1],
                             "defense": idx[2], "column": c,
                             "reason": why.get((*idx, c)) or spec.why(c)}
                            for c in columns if pd.isna(r[c])]
        refused = refused_section(recs, dataset, profile)
        if refused:
            mds.append(refused)
            missing += [{"table": f"*_{suffix}", "arch": r.get("arch"),
                         "checkpoint": r.get("checkpoint"), "defense": r.get("defense"),
                         "column": "*", "reason": f"refused: {r.get('reason')}"}
                        for r in recs if r.get("kind") == "refused"]
    tables["missing.csv"] = pd.DataFrame(
        missing, columns=["table", "arch", "checkpoint", "defense", "column", "reason"]
    ).map(csv_text).to_csv(index=False, lineterminator="\n").encode()
    report_md = "\n".join(mds).encode()
    _within(sum(map(len, tables.values())) + len(report_md), limit, len(rows_bytes))
    atomic_write_bytes(out_dir / "rows.jsonl", rows_bytes)
    for name, data in tables.items():
        safe_write(out_dir, ("tables", name), data)
    if plots:
        for suffix, _prov, _profile, recs in _groups(records):
            fr = frames(recs)
            if any(len(f) for f in fr.values()):
                _figures(fr, inside(out_dir, "plots"), suffix, order)
    atomic_write_bytes(out_dir / "report.md", report_md)
    from benchmark.report.html import write_page
    write_page(_groups(records), out_dir, order=order, catalog=catalog)
    return mds


#: the report's tables may hold at most this many times the bytes of its rows (plus
#: :data:`OUTPUT_SLACK`): a row whose text would blow them up is refused, nothing is written
OUTPUT_MULTIPLE = 20
OUTPUT_SLACK = 1 << 20


def _within(size: int, limit: int, rows_size: int) -> None:
    """Refuse an output larger than the stated multiple of its input.

    Raises:
        DataError: ``size`` exceeds ``limit``.
    """
    if size > limit:
        from benchmark.errors import DataError
        raise DataError(f"the report's tables would be {size} bytes, more than "
                        f"{OUTPUT_MULTIPLE}× the {rows_size} bytes of its rows + "
                        f"{OUTPUT_SLACK} bytes: refused (a row's text is too large?)")


def score_variants(fr: dict[str, pd.DataFrame]) -> set[str]:
    """Labels that exist only as a rejection-score option (``pm-ed-wta [score: winner]``):
    they are rows of the rejection table only, never empty rows of the other tables (and the
    rejection table lists only the defenses that ran the rejection suite)."""
    rej = fr.get("rejection")
    if rej is None or not len(rej):
        return set()
    other = set().union(*(set(f["label"]) for k, f in fr.items() if k != "rejection" and len(f)))
    return {lab for lab in set(rej["label"]) - other if "[score: " in str(lab)}


def refused_section(records: Sequence[dict], dataset: str, profile: str) -> str:
    """Markdown listing the runs that evaluation refused (``"kind": "refused"`` rows, e.g. a
    nondeterministic eval forward), each with its reason; '' when there are none."""
    lines = [f"- {md_code(r.get('defense'))} seed {md_escape(r.get('seed'))}, arch "
             f"{md_code(r.get('arch'))}, checkpoint {md_code(r.get('checkpoint'))} "
             f"(run {md_code(r.get('run_id'))}): {md_escape(r.get('reason'))}"
             for r in records if r.get("kind") == "refused"]
    if not lines:
        return ""
    return (f"### Runs refused by evaluation — {md_code(dataset)}, profile {md_code(profile)}"
            f"\n\nThese runs have no cells in the tables above:\n\n" + "\n".join(lines) + "\n")


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
