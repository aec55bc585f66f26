"""Evaluation: per-sample robust flags for (checkpoint, attack) pairs, written as rows.

Flags, not accuracies, are the primary output (AutoAttack's ``EvaluationState``): every
evaluation stores ``flags/<eval_key>.pt`` with per-sample clean and robust booleans, so worst
cases over attacks can be recomputed without rerunning anything. Only samples the model
classifies correctly are attacked.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attacks.base import Attack, Objective
from benchmark.checkpoint import model_from_checkpoint, read_checkpoint, resolve_checkpoint
from benchmark.config import DEFAULT_N_EXAMPLES, stable_hash
from benchmark.data import Data, load_dataset
from benchmark.errors import UsageError
from benchmark.protocols import AttackSpec
from benchmark.store import (atomic_torch_save, atomic_write_json, code_version, environment, now,
                             read_json, safe_torch_load)

logger = logging.getLogger(__name__)
SCHEMA = 1


def check_model(model: nn.Module, x: Tensor, *, randomized: bool = False) -> None:
    """AutoAttack-style sanity checks: eval mode, logits (not probabilities), determinism."""
    if model.training:
        raise UsageError("model must be in eval mode for evaluation")
    with torch.no_grad():
        a, b = model(x), model(x)
    if a.dim() != 2:
        raise UsageError(f"model must return N×K logits, got shape {tuple(a.shape)}")
    if (a >= 0).all() and torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-4):
        logger.warning("model outputs look like probabilities; attacks expect logits")
    if not randomized and not torch.equal(a, b):
        raise UsageError("model is not deterministic in eval mode; mark the defense randomized")


@torch.no_grad()
def predict_flags(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """Per-sample correctness of the model on (x, y)."""
    return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                      for i in range(0, len(y), batch_size)]).cpu()


def robust_flags(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, *,
                 clean: Optional[Tensor] = None, batch_size: int = 256,
                 loss: Optional[Objective] = None, progress: bool = False,
                 desc: str = "") -> Tensor:
    """Per-sample robustness: True iff the sample is correct clean and under ``attack``.

    Only samples in ``clean`` (computed if not given) are attacked; the rest are False.
    """
    if clean is None:
        clean = predict_flags(model, x, y, batch_size)
    flags = clean.clone()
    todo = torch.nonzero(clean).flatten()
    for i in tqdm(range(0, len(todo), batch_size), desc=desc or attack.name, leave=False,
                  disable=not progress, unit="batch"):
        idx = todo[i:i + batch_size]
        xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
        x_adv = attack(model, xb, yb, loss=loss)
        with torch.no_grad():
            flags[idx] = (model(x_adv).argmax(1) == yb).cpu()
    return flags


def eval_key(run_id: str, checkpoint: str, spec: AttackSpec, n_examples: int) -> str:
    return stable_hash({"run_id": run_id, "checkpoint": checkpoint, **spec.key(),
                        "n_examples": n_examples})


def evaluate_run(run_dir: Path | str, specs: Sequence[AttackSpec], *, checkpoint: str = "best",
                 n_examples: Optional[int] = None, device: str = "cpu", batch_size: int = 256,
                 data: Optional[Data] = None, data_dir: Optional[Path] = None,
                 force: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate one checkpoint of a run folder under each spec; write and return the rows.

    Existing rows are reused unless ``force``. The first ``n_examples`` test points are used
    (default: the profile's, e.g. 1000 for ``cpu``, all for ``paper``).
    """
    from benchmark.train import resolve_device

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    ckpt_path = resolve_checkpoint(run_dir, checkpoint)
    ckpt = read_checkpoint(ckpt_path)
    model, defense, cfg, info = model_from_checkpoint(ckpt)
    model.to(dev)
    if n_examples is None:
        n_examples = DEFAULT_N_EXAMPLES.get(cfg.profile)
    config = read_json(run_dir / "config.json") if (run_dir / "config.json").exists() else {}
    rows, pending = [], []
    for spec in specs:
        n = n_examples if n_examples is not None else -1
        key = eval_key(cfg.run_id, checkpoint, spec, n)
        path = run_dir / "eval" / f"{key}.json"
        if path.exists() and not force:
            rows.append(read_json(path))
        else:
            pending.append((spec, key, path))
    if not pending:
        return rows
    if data is None:
        data = load_dataset(cfg.dataset, data_dir)
    if data.info.num_classes != info.num_classes:
        raise UsageError(f"checkpoint has {info.num_classes} classes, dataset {data.info.name} "
                         f"has {data.info.num_classes}")
    x, y = data.test.floats(dev)
    if n_examples is not None:
        x, y = x[:n_examples], y[:n_examples]
    check_model(model, x[:8], randomized=defense.randomized)
    clean = predict_flags(model, x, y, batch_size)
    for spec, key, path in pending:
        attack = spec.build(seed=0)
        objective = defense.objective() if spec.attack == "adaptive" else None
        t0 = time.perf_counter()
        flags = robust_flags(model, attack, x, y, clean=clean, batch_size=batch_size,
                             loss=objective, progress=progress,
                             desc=f"{cfg.defense} s{cfg.seed} {spec.label}")
        wall = time.perf_counter() - t0
        atomic_torch_save(run_dir / "flags" / f"{key}.pt", {"clean": clean, "robust": flags})
        row = {"schema": SCHEMA, "run_id": cfg.run_id, "eval_key": key, "defense": cfg.defense,
               "dataset": cfg.dataset, "data_provenance": info.provenance, "arch": cfg.arch,
               "profile": cfg.profile, "seed": cfg.seed, "checkpoint": checkpoint,
               "checkpoint_file": ckpt_path.name, "checkpoint_epoch": int(ckpt["epoch"]),
               **spec.record(), "n_examples": int(len(y)),
               "clean_acc": float(clean.float().mean()), "robust_acc": float(flags.float().mean()),
               "wall_s": round(wall, 3), "hparams": cfg.hparams,
               "env": environment(dev), "git": config.get("git") or code_version(),
               "eval_git": code_version(), "created": now()}
        atomic_write_json(path, row)
        logger.info("%s seed %d [%s] %s: clean %.4f robust %.4f (%.1fs)", cfg.defense, cfg.seed,
                    checkpoint, spec.label, row["clean_acc"], row["robust_acc"], wall)
        rows.append(row)
    return rows


def load_flags(run_dir: Path, key: str) -> dict[str, Tensor]:
    """The stored per-sample flags of one evaluation."""
    return safe_torch_load(Path(run_dir) / "flags" / f"{key}.pt")
