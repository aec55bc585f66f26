"""Resolving a run: where the defense plugins meet the core.

The core (``benchmark/config.py``, ``benchmark/checkpoint.py``) knows profiles, merge rules and
the checkpoint format but names no plugin package; this module looks the defense up in the
registry (``defenses.DEFENSES``, imported on first use) and hands its defaults to the core:

* :func:`resolve_run_config`, :func:`sweep_configs`, :func:`helper_config`: a run's fully
  resolved :class:`~benchmark.config.RunConfig` (merge order in :mod:`benchmark.config`);
* :func:`build_defense`, :func:`model_from_checkpoint`, :func:`load_model`: a defense and its
  model rebuilt from a config or a checkpoint.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from attacks.base import Norm, ThreatModel
from benchmark.checkpoint import read_checkpoint, resolve_checkpoint
from benchmark.config import (ARCH_OVERRIDES, ARCH_PROFILE_OVERRIDES, DEFAULT_ARCH, PROFILES,
                              RunConfig, merge_hparams, optional_defaults, parse_hparams,
                              profile_defaults)
from benchmark.data import DataInfo, dataset_info
from benchmark.errors import AdvbenchError, CheckpointError, UsageError


def _defenses() -> Any:
    """The defense registry, imported on first use: modules that only import this one (the
    report's path through ``eval``) load no defense."""
    from defenses import DEFENSES
    return DEFENSES


def resolve_run_config(defense: str, dataset: str, *, profile: str = "cpu",
                       arch: Optional[str] = None, seed: int = 0,
                       user_hparams: Optional[Mapping[str, Any]] = None,
                       scale: Optional[str] = None) -> RunConfig:
    """Build the fully resolved :class:`RunConfig` for one (defense, dataset, arch, seed)."""
    cls = _defenses().get(defense)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise UsageError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if scale is None:
        scale = dataset_info(dataset).scale
    base = profile_defaults(profile, scale, dataset)
    arch = arch or DEFAULT_ARCH[profile]
    base.update(ARCH_OVERRIDES.get(arch, {}))
    base.update(ARCH_PROFILE_OVERRIDES.get(profile, {}).get(arch, {}))
    hp = merge_hparams(base, cls.default_hparams, cls.dataset_hparams.get(dataset, {}),
                       cls.arch_hparams.get(arch, {}), user=user_hparams,
                       choices=getattr(cls, "hparam_choices", None),
                       optional=optional_defaults(cls))
    return RunConfig(defense=defense, dataset=dataset, arch=arch, profile=profile, seed=seed,
                     hparams=hp)


def sweep_configs(defenses: Sequence[str], dataset: str, *, profile: str = "cpu",
                  arch: Optional[str] = None, seeds: Sequence[int] = (0,),
                  hparams: Optional[str] = None, scale: Optional[str] = None) -> list[RunConfig]:
    """Resolved configs of a sweep (defenses × seeds, in that order).

    With several defenses, each takes the ``--hparams`` keys it knows (protocol keys go to all).

    Raises:
        UsageError: a ``--hparams`` key that none of the defenses knows, or any error of
            :func:`resolve_run_config`.
    """
    if scale is None:
        scale = dataset_info(dataset).scale
    user = parse_hparams(hparams)
    protocol = set(profile_defaults(profile, scale, dataset))
    used: set[str] = set()
    cfgs = []
    for name in defenses:
        cls = _defenses().get(name)
        known = protocol | set(cls.default_hparams) | set(optional_defaults(cls))
        mine = user if len(defenses) == 1 else {k: v for k, v in user.items() if k in known}
        used |= set(mine)
        for seed in seeds:
            cfgs.append(resolve_run_config(name, dataset, profile=profile, arch=arch, seed=seed,
                                           user_hparams=mine, scale=scale))
    unused = set(user) - used
    if unused:
        raise UsageError(f"--hparams keys {sorted(unused)} belong to none of: {', '.join(defenses)}")
    return cfgs


def helper_config(requirement: str, cfg: RunConfig, scale: Optional[str] = None) -> RunConfig:
    """The run a defense requires (HAT's ``st`` helper) for the run ``cfg``.

    It has the same dataset, arch, profile and seed, and the same protocol: profile values that
    the user overrode for ``cfg`` (``train_subset``, ``epochs``, ...) are passed on, the
    defense's own hyperparameters are not.
    """
    default = resolve_run_config(cfg.defense, cfg.dataset, profile=cfg.profile, arch=cfg.arch,
                                 seed=cfg.seed, scale=scale).hparams
    protocol = PROFILES[cfg.profile]
    overrides = {k: v for k, v in cfg.hparams.items()
                 if k in protocol and k in default and default[k] != v}
    return resolve_run_config(requirement, cfg.dataset, profile=cfg.profile, arch=cfg.arch,
                              seed=cfg.seed, user_hparams=overrides, scale=scale)


@contextlib.contextmanager
def plugin_boundary(defense: str) -> Iterator[None]:
    """Code of a third-party defense plugin runs inside this: an exception it raises is the
    user's input (the plugin they installed), so it becomes a one-line ``UsageError`` (exit 2)
    naming the plugin. A built-in defense that raises is a bug of advbench (exit 1)."""
    try:
        yield
    except (AdvbenchError, OSError, KeyboardInterrupt):
        raise
    except Exception as exc:
        source = _defenses().source(defense)
        if source in ("built-in", ""):
            raise
        why = (str(exc).splitlines() or [""])[0]
        raise UsageError(f"defense plugin {defense!r} from {source} failed: "
                         f"{type(exc).__name__}: {why}") from None


def build_defense(cfg: RunConfig, info: DataInfo) -> Any:
    """Instantiate the run's defense with its resolved hyperparameters."""
    cls = _defenses().get(cfg.defense)
    threat = ThreatModel(Norm.LINF, float(cfg.hparams["eps"]))
    with plugin_boundary(cfg.defense):
        return cls(cfg.hparams, threat=threat, num_classes=info.num_classes)


def build_model(defense: Any, cfg: RunConfig, info: DataInfo) -> nn.Module:
    """The run's model, built by its defense (inside :func:`plugin_boundary`)."""
    with plugin_boundary(cfg.defense):
        return defense.build_model(cfg.arch, info)


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> tuple[nn.Module, Any, RunConfig, DataInfo]:
    """Rebuild (model, defense, config, info) and load the weights; model in eval mode."""
    cfg = RunConfig.from_dict(ckpt["config"])
    info = DataInfo(**{**ckpt["info"], "mean": tuple(ckpt["info"]["mean"]),
                       "std": tuple(ckpt["info"]["std"])})
    defense = build_defense(cfg, info)
    model = build_model(defense, cfg, info)
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
