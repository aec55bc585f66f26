"""RobustBench ``model_info`` JSON export: ``advbench report --robustbench-json DIR``.

One file per (defense, dataset, threat) that has an AutoAttack evaluation at the nominal ε,
at ``DIR/<dataset>/<threat>/<id>.json`` (RobustBench's ``model_info/<dataset>/<threat>/``
layout), with RobustBench's field names and formats (strings for ε and accuracies, accuracies
in percent with two decimals, as in ``model_info/cifar10/Linf/Wong2020Fast.json``)::

    {"link": "https://arxiv.org/abs/1901.08573", "name": "...", "authors": "Zhang et al.",
     "additional_data": false, "number_forward_passes": 1, "dataset": "cifar10",
     "venue": "ICML 2019", "architecture": "small-cnn", "eps": "8/255",
     "clean_acc": "78.00", "reported": "", "autoattack_acc": "44.00", "footnote": "..."}

``id`` is ``<defense>_<arch>_<profile>`` (one advbench defense can have several). Accuracies are
means over the seeds of the validation-selected checkpoint (the zoo weights for ``rb:`` rows);
``reported`` is the number the paper claims, known only for zoo models (RobustBench's own
leaderboard value), else empty. The footnote says what RobustBench's fields cannot: profile,
seeds, test points and the data provenance (a CIFAR-10 JPEG copy is not CIFAR-10). Only l∞
AutoAttack columns exist in advbench's tables, so the threat is ``Linf``.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pandas as pd

from benchmark.report.tables import TableSpec, _fixed, frames
from benchmark.safepath import identifier
from benchmark.safepath import write_bytes as safe_write

logger = logging.getLogger(__name__)

_SPEC = TableSpec("robustbench", "RobustBench export", "attack", _fixed(["clean", "autoattack"]),
                  derived=frozenset({"clean"}))


def _citation_parts(citation: str) -> tuple[str, str]:
    """(authors, venue) from an advbench citation such as ``Zhang et al., ICML 2019, arXiv:…``."""
    parts = [p.strip() for p in citation.split(",") if p.strip()]
    authors = parts[0] if parts and parts[0] != "-" else ""
    venue = next((p for p in parts[1:] if re.search(r"\b(19|20)\d\d\b", p)
                  and not p.lower().startswith(("arxiv", "openreview"))), "")
    return authors, venue or ("arXiv" if "arxiv" in citation.lower() else "")


def model_info(label: str, row: pd.Series, records: list[dict], *, dataset: str, arch: str,
               profile: str, provenance: str, eps_str: str, n_aa: str,
               catalog: Optional[Mapping[str, Mapping[str, str]]] = None) -> dict[str, Any]:
    """One RobustBench model_info dict for a table row (label = defense [+ hparams])."""
    from benchmark.report.html import _citation, paper_link

    defense = label.split(" ")[0]
    zoo = next((r.get("zoo") for r in records if r.get("defense") == defense and r.get("zoo")),
               None) or {}
    published = zoo.get("published") or {}
    citation = _citation(defense, records, catalog)
    authors, venue = _citation_parts(citation)
    name = str((catalog or {}).get(defense, {}).get("description") or published.get("name")
               or defense)
    seeds = int(row["n_seeds"])
    return {"link": published.get("link") or paper_link(citation) or "",
            "name": name, "authors": authors, "additional_data": False,
            "number_forward_passes": 1, "dataset": dataset,
            "venue": published.get("venue") or venue, "architecture": arch, "eps": eps_str,
            "clean_acc": f"{row['clean']:.2f}", "reported": published.get("autoattack_acc", ""),
            "autoattack_acc": f"{row['autoattack']:.2f}",
            "footnote": (f"advbench `{label}`, profile {profile}: mean over {seeds} seed"
                         f"{'s' if seeds != 1 else ''}, AutoAttack (standard) on {n_aa} test "
                         f"points. Data: {provenance or 'not recorded'}.")}


def write_model_info(records: list[dict], out_dir: Path | str, *, order: Sequence[str] = (),
                     catalog: Optional[Mapping[str, Mapping[str, str]]] = None) -> list[Path]:
    """Write the model_info JSON files of every group; return their paths. ``order`` and
    ``catalog`` (defense name -> ``paper``, ``description``) come from the caller."""
    from benchmark.report.grid import _groups, _index, _points, build_table

    out_dir = Path(out_dir)
    written: list[Path] = []
    for _suffix, prov, profile, recs in _groups(records):
        fr = frames(recs)
        if not len(fr["attack"]):
            continue
        built = build_table(_SPEC, fr["attack"], _index(fr, order))
        if built is None:
            continue
        wide, _, cells, columns = built
        points = _points(cells, columns)
        a = fr["attack"]
        dataset = str(recs[0].get("dataset"))
        for (arch, ckpt, label), row in wide.iterrows():
            if ckpt == "last" or pd.isna(row["autoattack"]) or pd.isna(row["clean"]):
                continue
            sel = a[(a["label"] == label) & (a["arch"] == arch) & (a["attack"] == "autoattack")
                    & a["nominal"]]
            eps_str = str(sel["eps_str"].iloc[0]) if len(sel) else ""
            info = model_info(label, row, recs, dataset=dataset, arch=arch, profile=profile,
                              provenance=prov, eps_str=eps_str, catalog=catalog,
                              n_aa=points.get((arch, ckpt), {}).get("autoattack", "?"))
            stem = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9.+-]+", "_",
                                                  f"{label}_{arch}_{profile}")
                          ).strip("_.+-")[:200] or "model"
            path = safe_write(out_dir, (identifier(dataset, "dataset"), "Linf", f"{stem}.json"),
                              (json.dumps(info, indent=2) + "\n").encode())
            written.append(path)
    return written
