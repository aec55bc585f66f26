"""Checkpoints in one place: the state a checkpoint holds is built and read here.

A checkpoint is a weights-only dict (``torch.load(weights_only=True)`` opens it)::

    format, version   "advbench-checkpoint", CKPT_VERSION
    config, info      the run's RunConfig and DataInfo as dicts
    epoch, best_val   epochs finished; best validation score so far
    model, defense    model and defense-private state_dicts
    optimizer, rng    only in ckpt_last.pt of a run in progress (resumption)

:func:`checkpoint_state` builds it (the training loop's only way to write one);
:func:`read_checkpoint` reads and validates it and :func:`restore_training` puts a resumed
run back where it was; :func:`benchmark.run.resolve.model_from_checkpoint` rebuilds the model
for evaluation (it needs the defense registry, which the core does not import).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from benchmark.config import RunConfig
from benchmark.data import DataInfo
from benchmark.errors import CheckpointError
from benchmark.store import CKPT_FORMAT, CKPT_VERSION, safe_torch_load


def resolve_checkpoint(path: Path | str, which: str = "best") -> Path:
    """A checkpoint file from a file path or a run folder (``which`` = best | last)."""
    path = Path(path)
    if path.is_dir():
        cand = path / f"ckpt_{which}.pt"
        if not cand.exists() and which == "best":
            cand = path / "ckpt_last.pt"
        if not cand.exists():
            raise CheckpointError(f"no ckpt_{which}.pt in {path} (is it a trained run folder?)")
        return cand
    return path


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load and validate an advbench checkpoint (weights-only)."""
    ckpt = safe_torch_load(Path(path))
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not an advbench checkpoint")
    problem = _structure_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} is a damaged advbench checkpoint: {problem}")
    return ckpt


def rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG a run draws from (torch, CUDA, numpy, python, the data order), weights-only."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "loader": loader_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": random.getstate()}


def _set_rng_state(state: Mapping[str, Any], loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def checkpoint_state(cfg: RunConfig, info: DataInfo, *, epoch: int, best_val: float,
                     model: nn.Module, defense: Any,
                     optimizer: Optional[torch.optim.Optimizer] = None,
                     loader_gen: Optional[torch.Generator] = None) -> dict[str, Any]:
    """The checkpoint dict of a run after ``epoch`` epochs.

    With ``optimizer`` and ``loader_gen`` it is a resumable state (``ckpt_last.pt``), which
    also captures every RNG; without, the weights only (``ckpt_best.pt``).
    """
    state: dict[str, Any] = {"format": CKPT_FORMAT, "version": CKPT_VERSION,
                             "config": cfg.to_dict(), "info": info.to_dict(), "epoch": epoch,
                             "best_val": best_val, "model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    state["defense"] = defense.state_dict()
    if loader_gen is not None:
        state["rng"] = rng_state(loader_gen)
    return state


def restore_training(ckpt: Mapping[str, Any], model: nn.Module,
                     optimizer: torch.optim.Optimizer, defense: Any,
                     loader_gen: torch.Generator) -> tuple[int, float]:
    """Load a resumable checkpoint into a freshly set-up run; return (epoch, best_val)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    defense.load_state_dict(ckpt["defense"])
    _set_rng_state(ckpt["rng"], loader_gen)
    return int(ckpt["epoch"]), float(ckpt["best_val"])


_CONFIG_KEYS = ("defense", "dataset", "arch", "profile", "seed", "hparams")
_INFO_KEYS = ("name", "num_classes", "in_channels", "image_size", "mean", "std", "scale")


def _structure_problem(ckpt: Mapping[str, Any]) -> str:
    """What is missing or malformed in a checkpoint dict ('' if nothing)."""
    for key, kind in (("config", dict), ("info", dict), ("model", dict)):
        if key not in ckpt:
            return f"no {key!r} entry"
        if not isinstance(ckpt[key], kind):
            return f"{key!r} is a {type(ckpt[key]).__name__}, not a dict"
    missing = [k for k in _CONFIG_KEYS if k not in ckpt["config"]]
    if missing:
        return f"its config lacks {', '.join(missing)}"
    if not isinstance(ckpt["config"]["hparams"], dict):
        return "its config's hparams is not a dict"
    missing = [k for k in _INFO_KEYS if k not in ckpt["info"]]
    if missing:
        return f"its dataset info lacks {', '.join(missing)}"
    unknown = set(ckpt["info"]) - set(DataInfo.__dataclass_fields__)
    if unknown:
        return f"its dataset info has unknown fields {sorted(unknown)}"
    if "epoch" in ckpt and not isinstance(ckpt["epoch"], int):
        return f"epoch is {ckpt['epoch']!r}"
    return ""
