"""Feature-space evaluation (paper §4.3): Table 4 rows and the data of Figure 2.

``evaluate_features`` computes FDR, AFS, SCR, MeanSep and MinSep (:mod:`benchmark.eval.metrics`)
on the penultimate features ``model.features(x)`` of ``n`` test points (all of them, or the
first ``n`` of the dataset's test order: the same points ``advbench evaluate`` attacks, so that
Table 4 and the accuracy tables describe one point set; loaders hold test sets stored class by
class in one fixed shuffled order), once clean and once at x' from PGD-20 (the ``pgd20``
column of :mod:`benchmark.run.protocols`: l∞, ε of the dataset scale, 20 steps of ε/10,
attacking every point with its true label). Class centres
come from ``defense.class_centers(model)``: prototypes for prototype defenses, the
classifier weights otherwise (paper eq. 10). Each condition is one ``"kind": "features"``
row in ``RUN/eval/<key>.json`` with ``condition`` = ``clean`` or ``pgd20``.

``figure2_panels`` extracts 2-D features (LeNets++, ``--arch lenets++``) clean and under the
MNIST-scale PGD of the paper's Figure 2 (ε = 0.3, step 0.01, 40 steps: the ``pgd`` column).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from benchmark.config import stable_hash
from benchmark.data import Data
from benchmark.errors import UsageError
from benchmark.eval.metrics import feature_metrics
from benchmark.eval.target import Target, check_model, open_target
from benchmark.run.protocols import AttackSpec
from benchmark.store import atomic_write_json
from benchmark.validate import check_row

logger = logging.getLogger(__name__)


def adversarial_spec(scale: str, label: str = "pgd20") -> AttackSpec:
    """The protocol's column ``label`` (PGD-20, step ε/10, by default).

    Raises:
        UsageError: no such column.
    """
    from benchmark.run.protocols import attack_specs

    specs = attack_specs(scale)
    if label not in specs:
        raise UsageError(f"unknown attack {label!r}; valid: {', '.join(specs)}")
    return specs[label]


def extract(model: nn.Module, x: Tensor, y: Tensor, *, attack: Any = None,
            batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Penultimate features (CPU, float) and predictions of x, or of x' = attack(model, x, y)."""
    if not hasattr(model, "features"):
        raise UsageError(f"{type(model).__name__} has no features(x) method")
    feats, preds = [], []
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        if attack is not None:
            xb = attack(model, xb, yb)
        with torch.no_grad():
            f = model.features(xb)
            feats.append(f.float().cpu())
            preds.append(model(xb).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


def _subset(n_examples: Optional[int]) -> str:
    return "all" if n_examples is None else "first n of the test order"


def centers_source(defense: Any, centers: Optional[Tensor]) -> Optional[str]:
    """Where the class centres came from, recorded in the rows."""
    from defenses.base import Defense

    if centers is None:
        return None
    if type(defense).class_centers is Defense.class_centers:
        return "classifier weights"
    return f"{type(defense).__name__}.class_centers"


def _test_points(t: Target, data: Optional[Data], data_dir: Optional[Path | str],
                 n_examples: Optional[int]) -> tuple[Tensor, Tensor]:
    split = t.test_data(data, data_dir).test
    n_examples = t.n_points(n_examples)  # the profile's when None (cpu: 1000 points)
    if n_examples is not None and n_examples < len(split):
        # the points `advbench evaluate` attacks (its first n), not a different sample
        split = split.subset(torch.arange(n_examples))
    return split.floats(t.device)


def evaluate_features(run_dir: Path | str, *, checkpoint: str = "best",
                      n_examples: Optional[int] = None, device: str = "cpu",
                      batch_size: int = 256, data: Optional[Data] = None,
                      data_dir: Optional[Path | str] = None,
                      force: bool = False) -> list[dict[str, Any]]:
    """Feature metrics of one checkpoint, clean and under PGD-20; rows in ``RUN/eval``."""
    run = open_target(run_dir, checkpoint, device=device)
    n_examples = run.n_points(n_examples)
    spec = adversarial_spec(run.info.scale)
    conditions: list[tuple[str, Optional[AttackSpec]]] = [("clean", None), ("pgd20", spec)]
    rows, pending = [], []
    for cond, sp in conditions:
        key = stable_hash({"run_id": run.cfg.run_id, "checkpoint": checkpoint, "kind": "features",
                           "condition": cond, "attack": sp.key() if sp else None,
                           "n_examples": n_examples if n_examples is not None else -1,
                           "subset": _subset(n_examples)})
        path = run.out_dir / "eval" / f"{key}.json"
        cached = run.cached(path, force=force)
        if cached is not None:
            rows.append(cached)
        else:
            pending.append((cond, sp, key, path))
    if not pending:
        return rows
    x, y = _test_points(run, data, data_dir, n_examples)
    check_model(run.model, x[:8], randomized=run.defense.randomized)
    centers = run.defense.class_centers(run.model)
    for cond, sp, key, path in pending:
        t0 = time.perf_counter()
        feats, preds = extract(run.model, x, y, attack=sp.build(seed=0) if sp else None,
                               batch_size=batch_size)
        metrics = feature_metrics(feats, y.cpu(), None if centers is None else centers.cpu())
        attack = sp.record() if sp else {"attack_name": None, "norm": None, "eps": 0.0,
                                         "eps_str": "0", "attack_hparams": {}}
        attack.pop("attack", None)
        row = {**run.row(key, "features"), "condition": cond, **attack,
               "n_examples": int(len(y)), "subset": _subset(n_examples),
               "accuracy": float((preds == y.cpu()).float().mean()),
               **metrics, "feature_dim": int(feats.shape[1]),
               "centers": centers_source(run.defense, centers),
               "wall_s": round(time.perf_counter() - t0, 3)}
        check_row(row, f"row {path}")
        atomic_write_json(path, row)
        logger.info("%s seed %d [%s] features %s: %s", run.cfg.defense, run.cfg.seed, checkpoint,
                    cond, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        rows.append(row)
    return rows


def figure2_panels(run_dir: Path | str, *, checkpoint: str = "best",
                   n_examples: Optional[int] = None, device: str = "cpu",
                   data_dir: Optional[Path | str] = None, data: Optional[Data] = None,
                   batch_size: int = 256) -> dict[str, Any]:
    """2-D features of a run's test points, clean and adversarial, with its class centres.

    Raises:
        UsageError: the model's features are not 2-D (train with ``--arch lenets++``).
    """
    run = open_target(run_dir, checkpoint, device=device)
    x, y = _test_points(run, data, data_dir, n_examples)
    from benchmark.run.protocols import attack_specs
    spec = attack_specs(run.info.scale)["pgd"]
    clean, _ = extract(run.model, x[:2], y[:2])
    if clean.shape[1] != 2:
        raise UsageError(f"Figure 2 needs 2-D features (arch lenets++); {run.cfg.defense} "
                         f"({run.cfg.arch}) has {clean.shape[1]}")
    clean, pc = extract(run.model, x, y, batch_size=batch_size)
    adv, pa = extract(run.model, x, y, attack=spec.build(seed=0), batch_size=batch_size)
    centers = run.defense.class_centers(run.model)
    return {"defense": run.cfg.defense, "dataset": run.cfg.dataset, "arch": run.cfg.arch,
            "profile": run.cfg.profile, "clean": clean.numpy(), "adv": adv.numpy(),
            "labels": y.cpu().numpy(), "centers": None if centers is None else
            centers.detach().cpu().float().numpy(),
            "centers_source": centers_source(run.defense, centers),
            "clean_acc": float((pc == y.cpu()).float().mean()),
            "adv_acc": float((pa == y.cpu()).float().mean()), "attack": spec.record(),
            "hparams": dict(run.cfg.hparams)}
