"""Tables as LaTeX through pandas' Styler: ``mean $\\pm$ std`` cells, best value per column bold.

``write_report`` writes ``tables/<table>_<dataset>_<profile>.tex`` next to each CSV and
Markdown file: one ``table`` environment per section (arch × checkpoint), booktabs rules
(``\\usepackage{booktabs}``), the same cells, precision, best-per-column rule and missing
cells (``--``) as the Markdown (:func:`benchmark.report.report.to_markdown`). Styler renders
the tabular and applies the bold (``\\textbf``) from a mask; pandas has no Styler output for
Markdown, so the Markdown stays hand-written.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from benchmark.report.tables import TableSpec, display

_SYMBOLS = {"∞": r"$\infty$", "ε": r"$\epsilon$", "↓": r"$\downarrow$", "↑": r"$\uparrow$",
            "°": r"$^\circ$", "±": r"$\pm$", "–": "--", "—": "---", "≤": r"$\leq$",
            "×": r"$\times$", "…": r"\dots{}"}


#: LaTeX's special characters as text (backslash first: the others' escapes contain one)
_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
             "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
             "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
             "|": r"\textbar{}"}
_SPECIAL_RE = re.compile("|".join(re.escape(c) for c in _SPECIALS))


def tex_escape(text: str) -> str:
    """Plain text → LaTeX: every special character (backslash included, so a name cannot
    carry a command such as ``\\input{...}``) as text, line breaks as spaces, the tables'
    symbols in math mode."""
    out = _SPECIAL_RE.sub(lambda m: _SPECIALS[m.group(0)], " ".join(str(text).split()))
    for sym, tex in _SYMBOLS.items():
        out = out.replace(sym, tex)
    return out


def best_values(block: pd.DataFrame, cols: list[str], spec: TableSpec,
                ok: Optional[Mapping[tuple, bool]] = None) -> dict[str, float]:
    """Column → best value at the shown precision (all tied rows bold; nothing when every row
    ties). Robust-accuracy columns take their best among the rows ``ok`` allows (rows whose
    headline is not unreliable), when there are any."""
    best = {}
    for c in cols:
        d = spec.decimals(c)
        vals = block[c].dropna().round(d)
        if not spec.better(c) or vals.nunique() < 2:
            continue
        if ok and spec.is_robustness(c):
            allowed = [i for i in vals.index if ok.get(i, True)]
            vals = vals[allowed] if allowed else vals
        best[c] = vals.min() if spec.better(c) == "lower" else vals.max()
    return best


def best_mask(block: pd.DataFrame, cols: list[str], spec: TableSpec,
              ok: Optional[Mapping[tuple, bool]] = None) -> pd.DataFrame:
    """True where a cell is the column's best at the shown precision (ties all bold; nothing
    bold when every row ties or the column is neutral; unreliable rows not above reliable
    ones) — the Markdown rule (:func:`benchmark.report.report.best_values`)."""
    best = best_values(block, cols, spec, ok)
    mask = pd.DataFrame(False, index=block.index, columns=cols)
    for c, b in best.items():
        mask[c] = block[c].round(spec.decimals(c)) == b
    if ok:  # an unreliable row is never bold in a robustness column
        for c in best:
            if spec.is_robustness(c) and any(ok.get(i, True) for i in block[c].dropna().index):
                mask[c] &= np.array([ok.get(i, True) for i in block.index])
    return mask


def cell_text(v: Any, s: Any, d: int, *, pm: str = " ± ", missing: str = "–") -> str:
    if pd.isna(v):
        return missing
    return f"{v:.{d}f}" + (f"{pm}{s:.{d}f}" if pd.notna(s) else "")


def to_latex(table: pd.DataFrame, spec: TableSpec, caption: str,
             ok: Optional[Mapping[tuple, bool]] = None) -> str:
    """One ``table`` environment per (arch, checkpoint) section of a wide table; accuracy
    cells carry their 95% interval (``<col>_lo``/``<col>_hi``) in brackets."""
    from benchmark.report.stats import interval_text, value_columns

    cols = value_columns(table)
    parts = []
    for (arch, ckpt), block in table.groupby(level=["arch", "checkpoint"], sort=False):
        names = [tex_escape(i[-1]) for i in block.index]
        cells = pd.DataFrame(
            [[name] + [cell_text(r[c], r.get(f"{c}_std", np.nan), spec.decimals(c),
                                 pm=r" $\pm$ ", missing="--")
                       + (interval_text(r.get(f"{c}_lo"), r.get(f"{c}_hi")) if pd.notna(r[c])
                          else "") for c in cols]
             + [str(int(r["n_seeds"]))] for name, (_, r) in zip(names, block.iterrows())],
            columns=["defense"] + [tex_escape(display(c)) for c in cols] + ["seeds"])
        bold = best_mask(block, cols, spec, ok)
        for c in cols:  # ≈: statistically tied with the section's best headline (as Markdown)
            if f"{c}_tied_best" in block:
                tied = (block[f"{c}_tied_best"] == 1) & ~bold[c] & block[c].notna() & bold[c].any()
                col = cells.columns[1 + cols.index(c)]
                cells.loc[tied.to_numpy(), col] += r" $\approx$"
        mask = bold.to_numpy()
        none = np.zeros((len(block), 1), dtype=bool)
        mask = np.concatenate([none, mask, none], axis=1)
        styler = cells.style.hide(axis="index").apply(
            lambda _: np.where(mask, "textbf:--rwrap;", ""), axis=None)
        parts.append(styler.to_latex(
            caption=f"{caption} Arch {tex_escape(arch)}, checkpoint {tex_escape(ckpt)}.",
            column_format="l" + "r" * (len(cols) + 1), hrules=True, environment="table",
            position="ht", position_float="centering"))
    return "\n".join(parts)
