"""CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019, arXiv 1903.12261): loader and evaluation.

Official layout (zenodo record 2535967, ``CIFAR-10-C.tar``)::

    DIR/<corruption>.npy   uint8, (5·n)×32×32×3: severity 1 is rows [0, n), ..., 5 is [4n, 5n)
    DIR/labels.npy         int, 5·n labels (the test labels repeated once per severity)

with n = 10,000 and 19 corruptions. ``DIR`` may also be the parent of a ``CIFAR-10-C`` folder.
``advbench corruptions --generate`` writes the same layout from CIFAR-10's test images
(:mod:`benchmark.eval.cifar_c`) with a ``PROVENANCE.json``; rows built on such a folder record
"regenerated CIFAR-10-C" and its generation in ``corruption_provenance``, and their keys include
the generation, so they never mix with rows of the released files.
Files are memory-mapped and read one severity block at a time. ``n`` is inferred from the
file (length / 5), so small files in the same layout work too (the tests write such files).

Evaluation (paper §4.4, Table 5, Figure 3) writes one ``"kind": "corruption"`` row per
(corruption, severity) with its accuracy, plus one aggregate row (``"corruption": "all"``,
``"aggregate": true``) holding the per-severity and overall means. The report recomputes the
averages from the per-cell rows and ignores the aggregate row.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from benchmark.config import stable_hash
from benchmark.errors import DataError, UsageError
from benchmark.eval.cifar_c import (SEVERITIES, check_generation, describe, generation_id,
                                    read_meta)
from benchmark.eval.target import check_model, open_target
from benchmark.safepath import identifier
from benchmark.store import atomic_write_json
from benchmark.validate import check_row

logger = logging.getLogger(__name__)

#: the 19 corruptions of CIFAR-10-C: the 15 benchmark ones, then the 4 extra (official order)
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
PROVENANCE = "CIFAR-10-C (Hendrycks & Dietterich 2019), official .npy layout"
_EXPECTED = "<corruption>.npy (5 severities × n images, n×32×32×3 uint8 each) and labels.npy"


def find_root(data_dir: Path | str) -> Path:
    """The folder holding ``labels.npy``: ``data_dir`` or ``data_dir/CIFAR-10-C``.

    Raises:
        DataError: neither holds ``labels.npy`` and at least one corruption file.
    """
    base = Path(data_dir).expanduser()
    for cand in (base, base / "CIFAR-10-C", base / "cifar10c", base / "cifar10-c"):
        if (cand / "labels.npy").is_file() and list_corruptions(cand):
            return cand
    raise DataError(f"CIFAR-10-C not found under {base}: expected {_EXPECTED} in it or in "
                    f"{base}/CIFAR-10-C (download CIFAR-10-C.tar from zenodo record 2535967)")


def list_corruptions(root: Path) -> list[str]:
    """Corruption files present, official ones first in official order, then others sorted."""
    present = {p.stem for p in Path(root).glob("*.npy") if p.stem != "labels"}
    return [c for c in CORRUPTIONS if c in present] + sorted(present - set(CORRUPTIONS))


def corruption_sha256(root: Path, name: str) -> str:
    """SHA-256 of one corruption set: its ``<name>.npy`` and ``labels.npy`` (what a row read)."""
    from benchmark.eval.target import file_sha256
    path = Path(root) / f"{identifier(name, 'corruption name')}.npy"
    if not path.is_file():
        raise DataError(f"{path} not found; present: {', '.join(list_corruptions(root)) or 'none'}")
    return set_sha256({"images": file_sha256(path), "labels": file_sha256(Path(root) / "labels.npy")})


def set_sha256(parts: dict[str, str]) -> str:
    """One SHA-256 over named digests (sorted by name)."""
    import hashlib
    return hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(parts.items())).encode()
                          ).hexdigest()


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a .npy array ({exc})") from None


def load_labels(root: Path) -> np.ndarray:
    """``labels.npy`` as int64 (5·n entries)."""
    labels = np.asarray(_open(Path(root) / "labels.npy")).astype(np.int64)
    if labels.ndim != 1 or len(labels) % 5:
        raise DataError(f"{root}/labels.npy must be a vector of 5·n labels, got {labels.shape}")
    return labels


def load_corruption(root: Path | str, corruption: str, severity: int,
                    n_examples: Optional[int] = None,
                    labels: Optional[np.ndarray] = None) -> tuple[Tensor, Tensor]:
    """One severity block of one corruption: uint8 images N×3×32×32 and int64 labels.

    Args:
        root: folder with the ``.npy`` files (see :func:`find_root`).
        corruption: file stem, e.g. ``gaussian_noise``.
        severity: 1 … 5.
        n_examples: first ``n`` images of the block (default all).
        labels: ``labels.npy`` if already loaded.

    Raises:
        UsageError: severity outside 1…5.
        DataError: missing file or a shape that is not the official layout.
    """
    if severity not in SEVERITIES:
        raise UsageError(f"severity must be one of 1..5, got {severity}")
    root = Path(root)
    path = root / f"{corruption}.npy"
    if not path.is_file():
        raise DataError(f"{path} not found; present: {', '.join(list_corruptions(root)) or 'none'}")
    images = _open(path)
    labels = load_labels(root) if labels is None else labels
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path} must be uint8 of shape (5·n)×H×W×3, got {images.dtype} "
                        f"{images.shape}")
    if len(images) != len(labels):
        raise DataError(f"{path} holds {len(images)} images but labels.npy {len(labels)}")
    n = len(images) // 5
    stop = n if n_examples is None else min(n, n_examples)
    block = slice((severity - 1) * n, (severity - 1) * n + stop)
    x = torch.from_numpy(np.array(images[block])).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.array(labels[block]))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x`` (scaled to [0,1] batch by batch)."""
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].to(device).float().div_(255)
        correct += int((model(xb).argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(len(y), 1)


def evaluate_corruptions(run_dir: Path | str, data_dir: Path | str, *, checkpoint: str = "best",
                         n_examples: Optional[int] = None,
                         corruptions: Optional[Sequence[str]] = None,
                         severities: Iterable[int] = SEVERITIES, device: str = "cpu",
                         batch_size: int = 256, force: bool = False) -> list[dict[str, Any]]:
    """Accuracy of one checkpoint on every (corruption, severity); rows in ``RUN/eval``.

    ``n_examples`` caps the images per severity (default: the profile's, e.g. 1000 for
    ``cpu``; all 10,000 for ``paper``). Existing rows are reused unless ``force``.
    """
    run = open_target(run_dir, checkpoint, device=device)
    if run.info.num_classes != 10 or run.info.in_channels != 3:
        raise UsageError(f"CIFAR-10-C needs a 10-class RGB model; {run.cfg.defense} was trained "
                         f"on {run.cfg.dataset} ({run.info.num_classes} classes)")
    if run.cfg.dataset != "cifar10":
        logger.warning("evaluating a model trained on %s on CIFAR-10-C", run.cfg.dataset)
    root = find_root(data_dir)
    names = list(corruptions) if corruptions else list_corruptions(root)
    n_examples = run.n_points(n_examples)
    labels = load_labels(root)
    meta = read_meta(root)
    if meta is not None:
        check_generation(root, meta)  # a killed generation is never read as a whole one
    cprov = f"{describe(meta) if meta else PROVENANCE} from {root}"
    data_key = {"generation": generation_id(meta)} if meta else {}
    rows: list[dict[str, Any]] = []
    checked = False
    shas: dict[str, str] = {}
    for name in names:
        identifier(name, "corruption name")
        for sev in severities:
            key = stable_hash({"run_id": run.cfg.run_id, "checkpoint": checkpoint,
                               "kind": "corruption", "corruption": name, "severity": sev,
                               "n_examples": n_examples if n_examples is not None else -1,
                               **data_key})
            path = run.out_dir / "eval" / f"{key}.json"
            if name not in shas:  # the corruption set: its file and the labels
                shas[name] = corruption_sha256(root, name)
            cached = run.cached(path, force=force, corruption_set=shas[name])
            if cached is not None:
                rows.append(cached)
                continue
            x, y = load_corruption(root, name, sev, n_examples, labels)
            if not checked:
                check_model(run.model, x[:8].to(run.device).float() / 255,
                            randomized=run.defense.randomized)
                checked = True
            t0 = time.perf_counter()
            acc = accuracy(run.model, x, y, batch_size=batch_size, device=run.device)
            row = {**run.row(key, "corruption", inputs={"corruption_set": shas[name]}),
                   "corruption": name, "severity": sev,
                   "corruption_provenance": cprov,
                   "n_examples": int(len(y)), "accuracy": acc,
                   "wall_s": round(time.perf_counter() - t0, 3)}
            check_row(row, f"row {path}")
            atomic_write_json(path, row)
            logger.info("%s seed %d [%s] %s s%d: %.4f", run.cfg.defense, run.cfg.seed, checkpoint,
                        name, sev, acc)
            rows.append(row)
    cells = [r for r in rows if not r.get("aggregate")]
    if cells:
        key = stable_hash({"run_id": run.cfg.run_id, "checkpoint": checkpoint,
                           "kind": "corruption", "aggregate": sorted(names),
                           "n_examples": n_examples if n_examples is not None else -1,
                           **data_key})
        per_sev = {str(s): float(np.mean([r["accuracy"] for r in cells if r["severity"] == s]))
                   for s in sorted({r["severity"] for r in cells})}
        agg = {**run.row(key, "corruption", inputs={"corruption_set": set_sha256(shas)}),
               "corruption": "all", "severity": None,
               "aggregate": True, "corruptions": names, "accuracy_by_severity": per_sev,
               "accuracy": float(np.mean([r["accuracy"] for r in cells])),
               "n_examples": n_examples, "corruption_provenance": cprov}
        atomic_write_json(run.out_dir / "eval" / f"{key}.json", agg)
        rows.append(agg)
    return rows
