"""``results/index.html``: the leaderboard page, one self-contained file (no CDN, works offline).

One section per (dataset, data provenance, profile), modelled on RobustBench's leaderboard
columns plus what a training benchmark has and a model zoo does not (one protocol, seeds,
cost): rank, defense (linked to its paper), clean, AutoAttack and PGD accuracy (mean ± std over
seeds), the reliability mark and its reason (training-health and gradient-masking rows where
they exist, "–" otherwise), arch, seeds, data provenance, and the training cost (seconds per
epoch, forward+backward passes per sample, peak MiB). Rows are ranked by AutoAttack where a
row has it, then by PGD (the basis is stated above each table); clicking a header re-sorts
(a few lines of inline JavaScript; without it the page keeps the ranked order). The section's
figures are embedded as base64 PNGs, and each section links to its tables' CSV, Markdown and
LaTeX files. The table markup comes from pandas' Styler.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from benchmark.report.latex import cell_text
from benchmark.report.stats import interval_text
from benchmark.report.tables import COST, TableSpec, _fixed, _labels, frames
from benchmark.report import verdicts as vd
from benchmark.report.verdicts import behind_reference

#: columns of the page's table (machine name → header)
HEADERS = {"rank": "Rank", "defense": "Defense", "clean": "Clean (%)",
           "headline": "Headline (%)", "autoattack": "AutoAttack (%)", "pgd": "PGD (%)",
           "reliable": "Reliable", "arch": "Arch", "n_seeds": "Seeds", "data": "Data",
           "epoch_cpu_s": "CPU s/epoch", "passes": "passes/sample", "peak_mem_mb": "peak MiB"}
#: accuracy columns of the page (each with its 95% interval)
_ACC = ("clean", "headline", "autoattack", "pgd")
_SPEC = TableSpec("leaderboard", "Leaderboard", "attack",
                  _fixed(["clean", "autoattack", "pgd", *COST], headline=True),
                  derived=frozenset({"clean", "headline", "headline-l2", "headline-l1", *COST}),
                  decimals=lambda c: 0 if c in ("passes", "peak_mem_mb") else
                  1 if c == "epoch_cpu_s" else 2)

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1250px;padding:0 1rem;color:#1d1d1f}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2.4rem;border-bottom:2px solid #ddd}
nav a{margin-right:1rem}.note{color:#555;font-size:.9rem}
table.board{border-collapse:collapse;width:100%;margin:.6rem 0;font-size:.9rem}
table.board th,table.board td{padding:.35rem .5rem;border-bottom:1px solid #e3e3e3;
text-align:right;white-space:nowrap}
table.board th{background:#f4f5f7;cursor:pointer;user-select:none;position:sticky;top:0;
white-space:normal}
.prov{display:inline-block;max-width:8rem;white-space:normal;font-size:.8rem;text-align:left}
table.board th[aria-sort=ascending]::after{content:" \\25B2"}
table.board th[aria-sort=descending]::after{content:" \\25BC"}
table.board .col1,table.board .col5,table.board .col6,table.board .col8{text-align:left}
table.board td.col8{white-space:normal;max-width:16rem;font-size:.8rem;color:#555}
table.board td.col5{white-space:normal;max-width:18rem}
table.board td.col1{white-space:normal;max-width:14rem;overflow-wrap:anywhere}
table.board tr:hover td{background:#fafbff}
.few{font-size:.75rem;color:#777}
.ok{color:#11772d}.bad{color:#b3261e}.warn{color:#a15c00}.why{display:block;font-size:.78rem;
color:#666}details.why{white-space:normal;max-width:16rem}
details.why summary{cursor:pointer;font-size:.9rem;white-space:nowrap}
figure{display:inline-block;margin:.5rem 1rem .5rem 0}figure img{max-width:100%;
width:900px;border:1px solid #eee}
"""

_JS = """
document.querySelectorAll('table.board').forEach(function(t){
  t.querySelectorAll('thead th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      t.querySelectorAll('thead th').forEach(function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      function key(r){var s=r.cells[i].textContent.trim(),v=parseFloat(s);
        return isNaN(v)?(s==='\\u2013'?null:s.toLowerCase()):v;}
      rows.sort(function(a,b){var x=key(a),y=key(b);
        if(x===null)return y===null?0:1; if(y===null)return -1;
        var c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
        return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def paper_link(citation: str) -> Optional[str]:
    """URL of a defense's paper from its citation (arXiv id, OpenReview id, DOI or URL)."""
    if m := re.search(r"https?://\S+", citation):
        return m.group(0).rstrip(").,")
    if m := re.search(r"arXiv:\s*(\d{4}\.\d{4,5})", citation, re.I):
        return f"https://arxiv.org/abs/{m.group(1)}"
    if m := re.search(r"openreview\s+(\S+)", citation, re.I):
        return f"https://openreview.net/forum?id={m.group(1)}"
    if m := re.search(r"\b(10\.\d{4,}/\S+)", citation):
        return f"https://doi.org/{m.group(1)}"
    return None


def _citation(defense: str, records: Iterable[dict],
              catalog: Optional[Mapping[str, Mapping[str, str]]] = None) -> str:
    """A defense's citation: from its rows (zoo rows carry their own), else from the
    ``catalog`` the caller passes (``advbench report`` passes the registry's)."""
    for r in records:
        if r.get("defense") == defense and r.get("paper"):
            return str(r["paper"])
    return str((catalog or {}).get(defense, {}).get("paper", "") or "")


def reliability(records: list[dict], run_ids: Iterable[str], under_trained: str = "",
                verdict: Any = None) -> tuple[str, str]:
    """(mark, reason) for the runs of one table row from ``health`` and ``check`` rows.

    ``✗`` when a run's training-health verdict is not ok or the row is ``under_trained`` (the
    tables' ‡ yardstick: clean accuracy more than 10 points below AT's), ``⚠`` (potentially
    unreliable, as RobustBench flags it) when a gradient-masking check doubts the headline,
    ``✓`` when masking checks were judged and none doubts it (the reason says so, and names
    the attacks found weak), ``–`` when no masking check was judged. ``verdict``: the row's
    :class:`benchmark.report.verdicts.RowVerdict` (default: built from the runs' check rows,
    at every ε). Stale check rows are never read.
    """
    ids = set(run_ids)
    health = [r for r in records if r.get("kind") == "health" and r.get("run_id") in ids]
    sick = [r for r in health if r.get("verdict", "ok") != "ok" or r.get("healthy") is False]
    if sick:
        r = sick[0]
        reasons = "; ".join(r.get("reasons") or []) or str(r.get("verdict"))
        return "✗", f"training: {r.get('verdict')} (seed {r.get('seed')}): {reasons}"
    if under_trained:
        return "✗", f"training: {under_trained}"
    if verdict is None:
        checks = [r for r in records if r.get("kind") == "check" and r.get("run_id") in ids]
        verdict = vd.RowVerdict()
        for v in vd.row_verdicts(checks, ["row"] * len(checks), any_eps=True).values():
            verdict.passed += v.passed
            verdict.masking_judged += v.masking_judged
            verdict.doubts += v.doubts
            verdict.stale += v.stale
    mark = {"no": "⚠", "yes": "✓"}.get(verdict.reliable, "–")
    return mark, verdict.summary()


def _embed_png(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def board(records: list[dict], order: Sequence[str] = ()) -> tuple[pd.DataFrame, str]:
    """The ranked rows of one dataset × provenance × profile group, and the ranking basis.

    Rows are ranked by the headline (the per-sample worst case over every attack on the
    section's points), then rows without one by AutoAttack, then by PGD. A row whose headline
    is unreliable (``RowVerdict.reliable == "no"``) is never ranked: it follows the ranked
    rows with rank ``–`` and its reason in ``apart``.
    """
    from benchmark.report.grid import _index, build_table
    from benchmark.report.stats import rankable

    fr = frames(records)
    if not len(fr["attack"]):
        return pd.DataFrame(), ""
    verdicts = vd.row_verdicts(records, _labels(records)) if vd.has_verdicts(records) else {}
    rank_ok = rankable(verdicts)
    # the models with attack rows (a rejection-score option is no model of its own)
    built = build_table(_SPEC, fr["attack"], _index({"attack": fr["attack"]}, order), rank_ok)
    if built is None:
        return pd.DataFrame(), ""
    wide, counts = built[0], built[1]
    for c in (*_ACC, *COST):  # cells over fewer seeds than their row
        wide[f"{c}_seeds"] = counts[c].reindex(wide.index)
    wide["apart"] = [("; ".join(d.text for d in verdicts[i].doubts if d.finding != "weak-attack")
                      or "headline potentially unreliable")
                     if i in verdicts and verdicts[i].reliable == "no" else ""
                     for i in wide.index]
    # a row not checked for masking never ranks or is bold above a checked one
    wide["_checked"] = [rank_ok.get(i) for i in wide.index]
    wide["_verdict"] = [verdicts.get(i) or vd.RowVerdict() for i in wide.index]
    ckpts = wide.index.get_level_values("checkpoint")
    if (ckpts != "last").any():  # one row per model: the validation-selected checkpoint
        wide = wide[ckpts != "last"]  # (best) of a trained run, the published zoo weights
    wide = wide.reset_index()
    has_h, has_aa = wide["headline"].notna(), wide["autoattack"].notna()
    wide["_key0"] = (wide["apart"] != "").astype(int) * 2 + (~wide["_checked"].astype(bool))
    wide["_key1"] = np.where(has_h, 0, np.where(has_aa, 1, 2))
    wide["_key2"] = np.where(has_h, wide["headline"], np.where(has_aa, wide["autoattack"],
                                                               wide["pgd"]))
    wide = wide.sort_values(["_key0", "_key1", "_key2", "clean"],
                            ascending=[True, True, False, False], na_position="last",
                            kind="stable").drop(columns=["_key0", "_key1", "_key2"])
    wide["_checked"] = wide["_checked"].astype(bool)
    ranked = int((wide["apart"] == "").sum())
    wide.insert(0, "rank", [str(i) for i in range(1, ranked + 1)] + ["–"] * (len(wide) - ranked))
    if has_h.all():
        basis = "Ranked by the headline robust accuracy."
    elif has_h.any() or has_aa.any():
        basis = ("Ranked by the headline robust accuracy; rows without a headline follow, "
                 "ranked by AutoAttack, then PGD accuracy (upper bounds on the headline).")
    else:
        basis = "Ranked by PGD accuracy (no headline or AutoAttack cell on the section's points)."
    basis += (" Headline: per-sample worst case over every attack evaluated on the section's "
              "points. ≈: statistically tied with the best headline (exact McNemar test on "
              "the same points, α = 0.05, seeds paired by seed index). Rows whose headline is "
              "potentially unreliable are never ranked: they follow, listed apart with their "
              "reason.")
    return wide.reset_index(drop=True), basis


def _row_cells(r: pd.Series, records: list[dict], prov: str,
               catalog: Optional[Mapping[str, Mapping[str, str]]] = None,
               behind: Optional[Mapping[tuple[str, str, str], str]] = None) -> dict[str, str]:
    label = str(r["defense"])
    defense = label.split(" ")[0]
    link = paper_link(_citation(defense, records, catalog))
    name = html.escape(label)
    cells = {"rank": str(r["rank"]),
             "defense": f'<a href="{html.escape(link)}">{name}</a>' if link else name}
    for c in (*_ACC, *COST):
        std = np.nan if c == "passes" else r.get(f"{c}_std", np.nan)  # declared: no spread
        cells[c] = html.escape(cell_text(r[c], std, _SPEC.decimals(c)))
        if pd.notna(r[c]) and c in _ACC:
            ci = interval_text(r.get(f"{c}_lo"), r.get(f"{c}_hi")).strip()
            cells[c] += f' <span class="why">{html.escape(ci)}</span>'
        if c == "headline" and r.get("headline_tied_best") == 1 and r.get("headline_p_best") != 1:
            cells[c] += ' <span title="statistically tied with the best headline">≈</span>'
        elif c == "headline" and pd.notna(r[c]) and r.get("headline_p_best") == 1 and \
                str(r["rank"]) != "–" and r.get("_checked", True):
            cells[c] = f"<b>{cells[c]}</b>"
        n = r.get(f"{c}_seeds", np.nan)
        if pd.notna(r[c]) and pd.notna(n) and 0 < n < r["n_seeds"]:
            cells[c] += f' <span class="few">({int(n)} of {int(r["n_seeds"])} seeds)</span>'
    runs = {str(x.get("run_id")) for x in records if str(x.get("defense")) == defense
            and str(x.get("arch")) == str(r["arch"])}
    verdict = r.get("_verdict")
    mark, why = reliability(records, runs, (behind or {}).get(
        (str(r["arch"]), str(r["checkpoint"]), label), ""),
        verdict if isinstance(verdict, vd.RowVerdict) else None)
    if r.get("apart"):
        why = f"not ranked: {r['apart']}"
    cls = {"✓": "ok", "✗": "bad", "⚠": "warn"}.get(mark, "")
    # the reason one click away (a closed <details>), so a long one never widens the board
    cells["reliable"] = (f'<details class="why"><summary><span class="{cls}">{mark}</span>'
                         f'</summary>{html.escape(why)}</details>' if why else
                         f'<span class="{cls}">{mark}</span>')
    cells["arch"] = html.escape(str(r["arch"]))
    cells["n_seeds"] = str(int(r["n_seeds"]))
    short = prov.split(":")[0].split(". ")[0]
    cells["data"] = (f'<span class="prov" title="{html.escape(prov)}">'
                     f'{html.escape(short)}</span>')
    return cells


def section_html(records: list[dict], *, suffix: str, prov: str, profile: str,
                 out_dir: Path, order: Sequence[str] = (),
                 catalog: Optional[Mapping[str, Mapping[str, str]]] = None) -> str:
    """One section: heading, provenance, basis, the sortable table, table links, figures."""
    wide, basis = board(records, order)
    dataset = str(records[0].get("dataset", "?"))
    parts = [f'<section id="{html.escape(suffix)}">',
             f"<h2>{html.escape(dataset)} — profile <code>{html.escape(profile)}</code></h2>",
             f'<p class="note">Data: {html.escape(prov or "provenance not recorded")}. '
             f"Profile <code>{html.escape(profile)}</code>: one training protocol for every "
             "defense; numbers are comparable within this section only.</p>"]
    if len(wide):
        behind = behind_reference(records, _labels(records))
        tables = []
        for which, part in (("", wide[wide["apart"] == ""]), ("-apart", wide[wide["apart"] != ""])):
            if not len(part):
                continue
            cells = pd.DataFrame([_row_cells(r, records, prov, catalog, behind)
                                  for _, r in part.iterrows()], columns=list(HEADERS))
            cells.columns = [HEADERS[c] for c in cells.columns]
            styler = cells.style.hide(axis="index").set_table_attributes(
                f'class="board" id="board-{html.escape(suffix)}{which}"')
            tables.append((which, styler.to_html(table_uuid=re.sub(r"\W", "-", suffix + which),
                                                 doctype_html=False)))
        parts.append(f'<p class="note">{html.escape(basis)} Cells: mean ± std over seeds '
                     "and the 95% Wilson interval on the section's points (seeds pooled) "
                     "(checkpoint selected by validation PGD accuracy). Cost: mean CPU-seconds "
                     "of the training process per epoch (the machine's load does not enter "
                     "it), forward+backward passes per training sample (declared by the "
                     "defense; HAT includes its <code>st</code> helper), peak memory (CUDA "
                     "max allocated, or max RSS on CPU). Click a header to sort.</p>")
        for which, table in tables:
            if which:
                parts.append('<h3>Listed apart: headline potentially unreliable (not ranked)'
                             '</h3>')
            parts.append(table)
    refused = [r for r in records if r.get("kind") == "refused"]
    if refused:
        parts.append("<h3>Runs refused by evaluation (no cells above)</h3><ul>" + "".join(
            f"<li><code>{html.escape(str(r.get('defense')))}</code> seed "
            f"{html.escape(str(r.get('seed')))}, arch <code>{html.escape(str(r.get('arch')))}"
            f"</code>, checkpoint <code>{html.escape(str(r.get('checkpoint')))}</code> (run "
            f"<code>{html.escape(str(r.get('run_id')))}</code>): "
            f"{html.escape(str(r.get('reason')))}</li>" for r in refused) + "</ul>")
    links = []
    for csv in sorted((out_dir / "tables").glob(f"*_{suffix}.csv")):
        stem = csv.stem
        fmt = " ".join(f'<a href="tables/{html.escape(stem)}.{ext}">{ext}</a>'
                       for ext in ("csv", "md", "tex") if (csv.parent / f"{stem}.{ext}").exists())
        links.append(f"<li><code>{html.escape(stem)}</code>: {fmt}</li>")
    if links:
        parts.append("<details open><summary>Tables of this section</summary><ul>"
                     + "".join(links) + "</ul></details>")
    for png in sorted((out_dir / "plots").glob(f"*_{suffix}.png")):
        parts.append(_embed_png(png, png.stem))
    parts.append("</section>")
    return "\n".join(parts)


def write_page(groups: list[tuple[str, str, str, list[dict]]], out_dir: Path | str,
               *, title: str = "advbench leaderboard", order: Sequence[str] = (),
               catalog: Optional[Mapping[str, Mapping[str, str]]] = None) -> Path:
    """Write ``OUT/index.html`` from the report's groups (suffix, provenance, profile, rows).

    ``order`` (defense names) and ``catalog`` (defense name -> ``paper``, ``description``)
    come from the caller, so the page needs nothing but the rows and no plugin installed."""
    from benchmark.store import atomic_write_bytes

    out_dir = Path(out_dir)
    sections = [section_html(recs, suffix=suffix, prov=prov, profile=profile, out_dir=out_dir,
                             order=order, catalog=catalog)
                for suffix, prov, profile, recs in groups]
    nav = " ".join(f'<a href="#{html.escape(s)}">{html.escape(s)}</a>' for s, *_ in groups)
    n_rows = sum(len(g[3]) for g in groups)
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n"
            f'<p class="note">Built by <code>advbench report</code> from {n_rows} result rows. '
            "One section per dataset, data provenance and profile; profiles are never mixed. "
            "Reliability: ✓ trained normally and no gradient-masking finding on the headline "
            "(the reason names the attacks found weak), ⚠ potentially unreliable (a masking "
            "check failed), ✗ the training did not converge, – no masking check judged (never "
            "ranked or bold above a checked row).</p>\n"
            f"<nav>{nav}</nav>\n" + "\n".join(sections)
            + f"\n<script>{_JS}</script>\n</body>\n</html>\n")
    path = out_dir / "index.html"
    atomic_write_bytes(path, page.encode())
    return path
