"""The headline robust accuracy: the per-sample worst case over every attack that ran.

A test point counts as robust under the headline of a (run, checkpoint, norm, ε) on its first
N test points only if *every* attack whose stored flags (``RUN/flags/<eval_key>.pt``) cover
those N points failed on it: AutoAttack, the PGD variants, C&W, FGSM, and what ``advbench
check`` computed (Square, transfer, PGD with more steps or restarts). Flags of a longer
evaluation are sliced to its first N points (the test order is fixed). Nothing is attacked
here: the headline is read from flags that exist.

``write_headlines`` writes one row ``RUN/eval/headline-<key>.json`` (``"kind": "headline"``) per
(checkpoint, norm, ε, N), for every N at which one of those attacks was evaluated, so that a
table section can pick the headline on its own N: each row covers every attack evaluated on
at least N points. ``advbench evaluate`` and ``advbench check`` call it after their attacks.

Per-sample flags travel in rows as compact hex bit strings (:func:`to_hex`: bit i is test
point i, most significant bit first, zero-padded to whole bytes), so the report can slice a
cell to a section's first N points and run paired tests from ``rows.jsonl`` alone.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from benchmark.config import same_eps, stable_hash
from benchmark.run.protocols import format_eps
from benchmark.store import atomic_write_json, code_version, now, read_json, safe_torch_load

logger = logging.getLogger(__name__)

HEADLINE_SCHEMA = 1
#: the ``attack`` label of the headline cell (what :meth:`RowVerdict.mark` is given)
HEADLINE = "headline"


def worst_case(flags: Sequence[Tensor]) -> Tensor:
    """Per-sample logical AND of robust flags over attacks (all of the same length N).

    Raises:
        ValueError: no flags, or flags of different lengths.
    """
    if not len(flags):
        raise ValueError("worst_case needs the flags of at least one attack")
    n = len(flags[0])
    if any(len(f) != n for f in flags):
        raise ValueError(f"flags of different lengths: {sorted({len(f) for f in flags})}")
    out = torch.ones(n, dtype=torch.bool)
    for f in flags:
        out &= f.detach().cpu().bool()
    return out


def to_hex(flags: Tensor | np.ndarray | Sequence[bool]) -> str:
    """Boolean flags → hex string (bit i = point i, MSB first, zero-padded to whole bytes)."""
    arr = np.asarray(flags.cpu() if isinstance(flags, Tensor) else flags, dtype=bool)
    return np.packbits(arr).tobytes().hex()


def from_hex(text: str, n: int) -> np.ndarray:
    """The first ``n`` flags of a :func:`to_hex` string.

    Raises:
        ValueError: the string holds fewer than ``n`` bits.
    """
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8)).astype(bool)
    if len(bits) < n:
        raise ValueError(f"bit string holds {len(bits)} bits, {n} asked")
    return bits[:n]


def bit_fields(clean: Tensor, robust: Tensor) -> dict[str, str]:
    """``clean_bits`` and ``robust_bits`` of a row (see :func:`to_hex`)."""
    return {"clean_bits": to_hex(clean), "robust_bits": to_hex(robust)}


# ------------------------------------------------------------------------- stored flags
def flags_payload(clean: Tensor, robust: Tensor, adv_ce: Tensor,
                  spec: Optional[Mapping[str, Any]] = None,
                  checkpoint: Optional[str] = None) -> dict[str, Any]:
    """What a ``flags/<key>.pt`` file holds; ``spec`` (``AttackSpec.record()``) and the
    ``checkpoint`` name the attack, so a headline can include flags that have no attack row
    (``advbench check``'s)."""
    out: dict[str, Any] = {"clean": clean, "robust": robust, "adv_ce": adv_ce}
    if spec is not None:
        out["spec"] = {k: spec[k] for k in ("attack", "attack_name", "norm", "eps")
                       if k in spec}
        if checkpoint is not None:
            out["spec"]["checkpoint"] = checkpoint
    return out


def stored_attacks(run_dir: Path, rows: Sequence[Mapping[str, Any]], checkpoint: str
                   ) -> list[dict[str, Any]]:
    """Every complete flags file of ``checkpoint`` under ``run_dir/flags``:
    ``{"key", "attack", "norm", "eps", "clean", "robust"}`` each.

    The attack is named by the file's own ``spec`` or, for files written before it was
    stored, by the attack row of the same key; a file named by neither is skipped (logged).
    Flags of other checkpoints are told apart by the row or by the ``checkpoint`` recorded
    with the spec.
    """
    by_key = {str(r.get("eval_key")): r for r in rows if r.get("kind", "attack") == "attack"}
    out = []
    for path in sorted((Path(run_dir) / "flags").glob("*.pt")):
        if path.name.endswith(".partial.pt"):
            continue
        key = path.stem
        row = by_key.get(key)
        try:
            saved = safe_torch_load(path)
            clean, robust = saved["clean"].cpu().bool(), saved["robust"].cpu().bool()
        except Exception as exc:  # a damaged file: never trusted
            logger.warning("flags %s unreadable, left out of the headline: %s", path, exc)
            continue
        spec = saved.get("spec") or ({"attack": row.get("attack"), "norm": row.get("norm"),
                                      "eps": row.get("eps")} if row is not None else None)
        if spec is None:
            logger.warning("flags %s name no attack (no spec, no attack row): left out of the "
                           "headline", path)
            continue
        ckpt = spec.get("checkpoint") or (row or {}).get("checkpoint") or checkpoint
        if ckpt != checkpoint or len(robust) != len(clean):
            continue
        out.append({"key": key, "attack": str(spec["attack"]),
                    "norm": str(spec.get("norm") or "linf"), "eps": float(spec["eps"]),
                    "clean": clean, "robust": robust})
    return out


def headline_groups(stored: Sequence[Mapping[str, Any]]
                    ) -> dict[tuple[str, float], list[Mapping[str, Any]]]:
    """Stored flags grouped by (norm, ε)."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for s in stored:
        key = next((k for k in groups if k[0] == s["norm"] and same_eps(k[1], s["eps"])),
                   (s["norm"], s["eps"]))
        groups.setdefault(key, []).append(s)
    return groups


def headline(stored: Sequence[Mapping[str, Any]], n: int) -> Optional[dict[str, Any]]:
    """Worst case on the first ``n`` points over the stored flags covering them (one
    (norm, ε) group); None when none covers ``n`` points.

    Returns:
        ``{"attacks", "keys", "clean", "robust", "clean_agrees"}``: the attack labels
        (sorted, each once), their flags files, the clean flags (of the first file in label
        order) and whether every file saw the same clean flags on those points.
    """
    cover = sorted((s for s in stored if len(s["robust"]) >= n),
                   key=lambda s: (s["attack"], s["key"]))
    if not cover or n < 1:
        return None
    clean = cover[0]["clean"][:n]
    return {"attacks": sorted({s["attack"] for s in cover}), "keys": [s["key"] for s in cover],
            "clean": clean, "robust": worst_case([s["robust"][:n] for s in cover]) & clean,
            "clean_agrees": all(torch.equal(s["clean"][:n], clean) for s in cover)}


def headline_key(run_id: str, checkpoint: str, norm: str, eps: float, n: int) -> str:
    return "headline-" + stable_hash({"run_id": run_id, "checkpoint": checkpoint,
                                      "norm": norm, "eps": eps, "n_examples": n})


def write_headlines(run_dir: Path | str, checkpoint: str = "best",
                    base: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
    """(Re)write the headline rows of one checkpoint of a run folder from its stored flags.

    One row per (norm, ε, N) for every N at which an attack of that (norm, ε) was evaluated;
    a headline row whose attacks no longer cover it is left as it is, and a row whose content
    did not change is not rewritten. Runs no attack.

    Args:
        run_dir: the run folder (or an evaluation ``--out`` folder) holding ``flags/``.
        checkpoint: ``best``, ``last`` or ``file-<sha>``.
        base: the provenance fields every row starts with (``Target.row``); default: those of
            an attack row of the checkpoint (no row: nothing is written).

    Returns:
        The rows written.
    """
    run_dir = Path(run_dir)
    rows = []
    for f in sorted((run_dir / "eval").glob("*.json")):
        try:
            rows.append(read_json(f))
        except Exception:  # an unreadable row: RunStore.rows warns about it
            continue
    if base is None:
        base = next((r for r in rows if r.get("kind", "attack") == "attack"
                     and r.get("checkpoint") == checkpoint), None)
        if base is None:
            return []
    keep = ("schema", "run_id", "defense", "dataset", "data_provenance", "arch", "profile",
            "seed", "checkpoint", "checkpoint_file", "checkpoint_epoch", "hparams", "git",
            "paper", "inputs_sha256")
    common = {k: base[k] for k in keep if k in base}
    evaluated = next((r for r in rows if r.get("kind", "attack") == "attack"
                      and r.get("checkpoint") == checkpoint and r.get("data_provenance")), None)
    if evaluated is not None:  # the data actually attacked (a zoo model's differs from training)
        common["data_provenance"] = evaluated["data_provenance"]
    out = []
    for (norm, eps), stored in sorted(headline_groups(
            stored_attacks(run_dir, rows, checkpoint)).items()):
        for n in sorted({len(s["robust"]) for s in stored}):
            h = headline(stored, n)
            if h is None:
                continue
            key = headline_key(str(common.get("run_id")), checkpoint, norm, eps, n)
            row = {**common, "schema": HEADLINE_SCHEMA, "kind": "headline", "eval_key": key,
                   "checkpoint": checkpoint, "attack": HEADLINE, "norm": norm, "eps": eps,
                   "eps_str": format_eps(eps), "n_examples": n,
                   "points": f"first {n} test points",
                   "clean_acc": float(h["clean"].float().mean()),
                   "robust_acc": float(h["robust"].float().mean()),
                   "attacks": h["attacks"], "flags_keys": h["keys"],
                   "clean_flags_agree": h["clean_agrees"], **bit_fields(h["clean"], h["robust"]),
                   "bits": "hex, bit i = test point i, most significant bit first",
                   "eval_git": code_version(), "created": now()}
            path = run_dir / "eval" / f"{key}.json"
            if not _unchanged(path, row):  # a rerun with nothing new touches no file
                atomic_write_json(path, row)
            out.append(row)
    return out


def _unchanged(path: Path, row: Mapping[str, Any]) -> bool:
    """Whether ``path`` already holds ``row`` (up to its ``created`` stamp)."""
    if not path.exists():
        return False
    try:
        old = read_json(path)
    except Exception:
        return False
    strip = lambda r: json.dumps({k: v for k, v in r.items() if k != "created"},  # noqa: E731
                                 sort_keys=True, default=str)
    return strip(old) == strip(json.loads(json.dumps(row, default=str)))
