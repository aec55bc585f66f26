"""Build models from run configs and load trained ones from run folders or checkpoint files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from attacks.base import Norm, ThreatModel
from benchmark.config import RunConfig
from benchmark.data import DataInfo
from benchmark.errors import CheckpointError
from benchmark.store import CKPT_FORMAT, safe_torch_load


def build_defense(cfg: RunConfig, info: DataInfo) -> Any:
    """Instantiate the run's defense with its resolved hyperparameters."""
    from defenses import DEFENSES

    cls = DEFENSES.get(cfg.defense)
    threat = ThreatModel(Norm.LINF, float(cfg.hparams["eps"]))
    return cls(cfg.hparams, threat=threat, num_classes=info.num_classes)


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
    return ckpt


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> tuple[nn.Module, Any, RunConfig, DataInfo]:
    """Rebuild (model, defense, config, info) and load the weights; model in eval mode."""
    cfg = RunConfig.from_dict(ckpt["config"])
    info = DataInfo(**{**ckpt["info"], "mean": tuple(ckpt["info"]["mean"]),
                       "std": tuple(ckpt["info"]["std"])})
    defense = build_defense(cfg, info)
    model = defense.build_model(cfg.arch, info)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit {cfg.defense}/{cfg.arch} with "
                              f"{info.num_classes} classes: {str(exc).splitlines()[0]}") from None
    if "defense" in ckpt:
        defense.load_state_dict(ckpt["defense"])
    return model.eval(), defense, cfg, info


def load_model(path: Path | str, *, which: str = "best",
               device: torch.device | str = "cpu") -> nn.Module:
    """The trained model of a run folder or checkpoint file, in eval mode.

    The model takes inputs in [0,1] (N×C×H×W) and returns logits, so any attack library can
    use it directly. ``model.features(x)`` gives the penultimate features.

    Args:
        path: a run folder (``runs/<dataset>/<defense>/<run_id>``) or a ``.pt`` file.
        which: ``best`` (validation-selected; falls back to last) or ``last`` for a folder.
        device: where to put the model.
    """
    model, _, _, _ = model_from_checkpoint(read_checkpoint(resolve_checkpoint(path, which)))
    return model.to(device)
