"""The one training loop. Every defense gets the same data, optimizer, schedule and epochs.

Resumable: after every epoch ``ckpt_last.pt`` holds model, optimizer, epoch, defense state
and all RNG states (torch, CUDA, numpy, python, the data order generator), so a killed run
restarts from its last finished epoch and ends with the same weights as an uninterrupted one.

Speed options (hyperparameters, so part of the run key; off by default because they change
numerics): ``amp="bf16"`` autocasts the training step (attack + loss; backward and optimizer
outside, validation and evaluation stay fp32), ``channels_last`` converts model and batches,
``compile`` runs the step through ``torch.compile(model)`` while checkpoints keep saving the
uncompiled module's ``state_dict``. The inner loop syncs with the host only every 20 steps
(progress and NaN check). Under ``torch.distributed`` (torchrun, ``advbench train --ddp``) the
step runs under DistributedDataParallel; see :mod:`benchmark.run.distributed`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attacks.base import model_mode
from attacks.pgd import PGD
from benchmark.run import distributed
from benchmark.cores import follow as follow_share
from benchmark.checkpoint import checkpoint_state, read_checkpoint, restore_training
from benchmark.config import RunConfig, profile_defaults
from benchmark.run.resolve import build_defense, build_model, helper_config, model_from_checkpoint
from benchmark.data import BatchLoader, Data, DataInfo, split_train_val
from benchmark.device import peak_memory_mb, resolve_device
from benchmark.errors import NonFiniteError, UsageError
from benchmark.run.health import (FAILURE_FILE, DivergedError, kept_note, record_failure,
                                  record_nonfinite, write_health)
from benchmark.store import (RunStore, append_jsonl, atomic_torch_save, atomic_write_json,
                             clean_tmp, code_version, environment, exclusive, now, read_jsonl,
                             write_jsonl)
from benchmark.validate import check_finite_model
from defenses.base import StepOutput

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(hp: Mapping[str, Any], epoch: int) -> float:
    """Piecewise-constant schedule: lr × gamma^(number of milestones ≤ epoch)."""
    drops = sum(1 for m in hp["lr_milestones"] if epoch >= m)
    return float(hp["lr"]) * float(hp["lr_gamma"]) ** drops


def set_lr(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], epoch: int) -> None:
    """The scheduled lr in every group, times the group's ``lr_scale`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(hp, epoch) * float(group.get("lr_scale", 1.0))


def make_optimizer(model: nn.Module, hp: Mapping[str, Any],
                   defense: Any = None) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on every trainable parameter (the common protocol),
    unless the defense's :meth:`~defenses.base.Defense.param_groups` gives its own groups."""
    groups = defense.param_groups(model) if defense is not None else None
    params = groups if groups else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(hp["lr"]), momentum=float(hp["momentum"]),
                                weight_decay=float(hp["weight_decay"]))
    for group in optimizer.param_groups:
        group["lr"] = float(hp["lr"]) * float(group.get("lr_scale", 1.0))
    return optimizer


def autocast(hp: Mapping[str, Any], device: torch.device) -> contextlib.AbstractContextManager:
    if hp.get("amp", "none") == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if hp.get("amp", "none") != "none":
        raise UsageError(f"amp must be 'none' or 'bf16', got {hp['amp']!r}")
    return contextlib.nullcontext()


def maybe_compile(model: nn.Module, hp: Mapping[str, Any]) -> nn.Module:
    """``torch.compile(model)`` if ``hp["compile"]``; the wrapper shares the parameters, so
    optimizer and checkpoints keep using the uncompiled ``model``."""
    return torch.compile(model) if hp.get("compile") else model


@contextlib.contextmanager
def _run_lock(run_dir: Path, enabled: bool = True) -> Any:
    """Exclusive lock on a run folder (:func:`benchmark.store.exclusive`), so that two
    launcher jobs needing the same run (e.g. HAT's ``st`` helper) never train it twice."""
    if not enabled:
        yield
        return
    with exclusive(run_dir / ".lock", f"training {run_dir}"):
        yield


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(y), batch))
    return correct / max(len(y), 1)


def validate(model: nn.Module, x: Tensor, y: Tensor, hp: Mapping[str, Any]) -> dict[str, float]:
    """Clean and PGD accuracy on the held-out validation split (selects ``ckpt_best``)."""
    attack = PGD(build_threat(hp), steps=int(hp["val_attack_steps"]), seed=0)
    with model_mode(model, train=False):
        clean = _accuracy(model, x, y)
        robust = 0
        for i in range(0, len(y), 512):
            xa = attack(model, x[i:i + 512], y[i:i + 512])
            with torch.no_grad():
                robust += int((model(xa).argmax(1) == y[i:i + 512]).sum())
    return {"val_clean": clean, "val_pgd": robust / max(len(y), 1)}


def build_threat(hp: Mapping[str, Any]) -> Any:
    from attacks.base import Norm, ThreatModel
    return ThreatModel(Norm.LINF, float(hp["eps"]))


def train_run(cfg: RunConfig, data: Data, store: RunStore, *, device: str = "cpu",
              progress: bool = True, stop_after: Optional[int] = None,
              sync_bn: bool = False) -> Path:
    """Train one run to completion (or resume it); return its folder.

    Under an initialised ``torch.distributed`` group of several processes, every rank calls
    this with the same arguments: the run is trained with DDP and only rank 0 writes files.

    Args:
        cfg: the resolved run config.
        data: the dataset in memory.
        store: where run folders live.
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto`` (under DDP: ``cuda:LOCAL_RANK``).
        progress: show a per-epoch progress bar (rank 0 only).
        stop_after: stop after this many epochs in this call (for tests of resumption).
        sync_bn: under DDP, BatchNorm statistics over the global batch (CUDA only).

    Raises:
        DivergedError: the loss became NaN/inf (a ``TrainingError``, exit status 3); the
            last good checkpoint is kept, ``FAILED.json`` and the ``nan`` health row
            (:mod:`benchmark.run.health`) name the epoch and step.
    """
    env = distributed.current()
    run_dir = store.run_dir(cfg)
    if (run_dir / "TRAINED").exists():
        logger.info("%s/%s seed %d already trained: %s", cfg.defense, cfg.dataset, cfg.seed, run_dir)
        return run_dir
    _check_split(cfg, data)
    helpers = {req: _helper_model(req, cfg, data, store, device, progress)
               for req in _requires(cfg.defense)}
    new_dirs = [p for p in (run_dir, run_dir.parent, run_dir.parent.parent) if not p.exists()]
    try:
        with _run_lock(run_dir, enabled=not env.active):
            if not env.active and (run_dir / "TRAINED").exists():  # trained while we waited
                return run_dir
            _train(cfg, data, store, run_dir, helpers, env, device=device,
                   progress=progress and env.is_main, stop_after=stop_after, sync_bn=sync_bn)
    except UsageError:
        if env.is_main:
            _remove_unused(new_dirs)
        raise
    distributed.barrier(env)  # other ranks may read what rank 0 just wrote
    return run_dir


def _remove_unused(new_dirs: Sequence[Path]) -> None:
    """Bad input found once the run folder exists (an unknown ``--arch``, a defense that
    refuses its hyperparameters): remove the folders this call created, unless a checkpoint
    was saved in them (a run with a finished epoch is kept for resumption)."""
    if not new_dirs or any(new_dirs[0].glob("ckpt_*.pt")):
        return
    shutil.rmtree(new_dirs[0], ignore_errors=True)
    for d in new_dirs[1:]:
        with contextlib.suppress(OSError):
            d.rmdir()  # only if empty: another run may have appeared there meanwhile


@dataclass
class _Session:
    """One run being trained in this process: what setup builds and every epoch uses."""

    cfg: RunConfig
    info: DataInfo
    run_dir: Path
    env: distributed.DistEnv
    dev: torch.device
    defense: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: BatchLoader
    loader_gen: torch.Generator
    x_val: Tensor
    y_val: Tensor
    progress: bool
    step_model: Optional[nn.Module] = None
    ddp: Optional[nn.Module] = None

    @property
    def hp(self) -> Mapping[str, Any]:
        return self.cfg.hparams


def _train(cfg: RunConfig, data: Data, store: RunStore, run_dir: Path,
           helpers: Mapping[str, nn.Module], env: distributed.DistEnv, *, device: str,
           progress: bool, stop_after: Optional[int], sync_bn: bool) -> None:
    s = _setup(cfg, data, run_dir, helpers, env, device=device, progress=progress,
               sync_bn=sync_bn)
    start_epoch, best = _resume(s)
    epochs = int(s.hp["epochs"])
    for epoch in range(start_epoch, epochs):
        if stop_after is not None and epoch - start_epoch >= stop_after:
            return
        best = _epoch(s, epoch, best)
    _finish(s, best)


def seeded_build(cfg: RunConfig, info: DataInfo) -> tuple[Any, nn.Module]:
    """Seed, then build the defense and its model exactly as a run starts (same RNG draws):
    the model at its initialisation, e.g. to measure how far training moved it."""
    seed_everything(cfg.seed)
    defense = build_defense(cfg, info)
    return defense, build_model(defense, cfg, info)


def _setup(cfg: RunConfig, data: Data, run_dir: Path, helpers: Mapping[str, nn.Module],
           env: distributed.DistEnv, *, device: str, progress: bool, sync_bn: bool) -> _Session:
    """Write config.json, seed, and build defense, model, optimizer, loader and validation
    split (in this order: the RNG draws of a run depend on it)."""
    dev = distributed.rank_device(resolve_device(device), env)
    hp = cfg.hparams
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_tmp(run_dir, max_age_s=0.0 if not env.active else 86400.0)  # killed writes
        if not (run_dir / "config.json").exists():
            atomic_write_json(run_dir / "config.json", {
                **cfg.to_dict(), "run_id": cfg.run_id, "data": data.info.to_dict(),
                "env": environment(dev), "git": code_version(), "created": now(),
                **({"distributed": {"world_size": env.world_size, "sync_bn": sync_bn}}
                   if env.active else {})})

    defense, model = seeded_build(cfg, data.info)
    model = model.to(dev)
    if env.active and sync_bn:
        model = distributed.convert_sync_bn(model, dev)
    if hp.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    defense.setup({k: m.to(dev) for k, m in helpers.items()})
    defense.training_attack()  # None for a defense that declares it uses no training attack
    optimizer = make_optimizer(model, hp, defense)
    train_split, val_split = split_train_val(data.train, int(hp["val_size"]),
                                             subset=hp.get("train_subset"))
    if env.active and 0 < len(train_split) % int(hp["batch_size"]) < env.world_size:
        raise UsageError(f"the last batch of {len(train_split) % int(hp['batch_size'])} samples "
                         f"cannot feed {env.world_size} processes; change batch_size")
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader = BatchLoader(train_split, int(hp["batch_size"]), generator=loader_gen,
                         augment=bool(hp["augment"]), crop_pad=data.info.crop_pad,
                         flip=data.info.flip, device=dev)
    x_val, y_val = val_split.floats(dev)
    return _Session(cfg, data.info, run_dir, env, dev, defense, model, optimizer, loader,
                    loader_gen, x_val, y_val, progress)


def _resume(s: _Session) -> tuple[int, float]:
    """Continue from ``ckpt_last.pt`` if there is one; wrap the step (compile, DDP).

    Returns:
        (first epoch to train, best validation score so far).
    """
    start_epoch, best = 0, -math.inf
    if (s.run_dir / "ckpt_last.pt").exists():
        start_epoch, best = restore_training(read_checkpoint(s.run_dir / "ckpt_last.pt"),
                                             s.model, s.optimizer, s.defense, s.loader_gen)
        logger.info("resuming %s from epoch %d", s.run_dir, start_epoch)
    if s.env.is_main:
        _sync_log(s.run_dir / "train_log.jsonl", start_epoch)
    s.step_model = maybe_compile(s.model, s.hp)
    s.ddp = distributed.wrap_step(s.step_model, s.defense, lambda: autocast(s.hp, s.dev), s.dev) \
        if s.env.active else None
    return start_epoch, best


def _epoch(s: _Session, epoch: int, best: float) -> float:
    """Train one epoch, validate, write checkpoints and the log line; return the new best."""
    cfg, hp, env = s.cfg, s.hp, s.env
    epochs = int(hp["epochs"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    set_lr(s.optimizer, hp, epoch)
    s.model.train()
    s.defense.on_epoch_start(s.model, epoch)
    if env.active:
        distributed.seed_rank(cfg.seed, epoch, env)
    assert s.step_model is not None
    try:
        stats = train_epoch(s.step_model, s.defense, s.optimizer, s.loader, hp, s.dev, epoch,
                            epochs, s.progress, cfg, ddp=s.ddp, env=env)
    except DivergedError as err:
        if env.is_main:
            record_failure(s.run_dir, err)
        if not (s.run_dir / "ckpt_last.pt").exists():
            raise err.without_checkpoint() from None
        raise
    distributed.broadcast_defense_state(s.defense, env)
    # every rank checks (same weights under DDP), so all stop together
    _check_finite(s.model, s.x_val, cfg, epoch + 1, s.run_dir, env.is_main)
    if not env.is_main:
        return best
    record = {"epoch": epoch + 1, "lr": lr_at(hp, epoch), **stats,
              "epoch_s": round(time.perf_counter() - t0, 3), "peak_mem_mb": peak_memory_mb(s.dev),
              # the cost the defense causes, whatever else loads the machine: CPU-seconds of
              # this process (all its threads) and the torch thread count they ran on
              "cpu_s": round(time.process_time() - cpu0, 3),
              "torch_threads": torch.get_num_threads()}
    if env.active:
        record["world_size"] = env.world_size
    if has_eps_warmup(hp):
        record["eps_scale"] = s.defense.eps_scale  # the ε warm-up's value at the epoch's end
    if (epoch + 1) % int(hp.get("val_every", 1)) == 0 or epoch + 1 == epochs:
        v0, vc0 = time.perf_counter(), time.process_time()
        record.update(validate(s.model, s.x_val, s.y_val, hp))
        record.update(val_s=round(time.perf_counter() - v0, 3),
                      val_cpu_s=round(time.process_time() - vc0, 3))
    score = record.get(str(hp.get("select_by", "val_pgd")), -math.inf)
    is_best = score >= best  # ties go to the later epoch
    best = max(best, score)
    # the log line first: a kill before the checkpoint only makes the resume retrain and
    # re-log this epoch (_sync_log drops lines after the checkpoint's epoch)
    append_jsonl(s.run_dir / "train_log.jsonl", record)
    if is_best:
        atomic_torch_save(s.run_dir / "ckpt_best.pt", checkpoint_state(
            cfg, s.info, epoch=epoch + 1, best_val=best, model=s.model, defense=s.defense))
    atomic_torch_save(s.run_dir / "ckpt_last.pt", checkpoint_state(
        cfg, s.info, epoch=epoch + 1, best_val=best, model=s.model, defense=s.defense,
        optimizer=s.optimizer, loader_gen=s.loader_gen))
    logger.info("%s seed %d epoch %d/%d %s", cfg.defense, cfg.seed, epoch + 1, epochs,
                " ".join(f"{k}={v:.4g}" for k, v in record.items()
                         if isinstance(v, float) and k != "lr"))
    return best


def _finish(s: _Session, best: float) -> None:
    """Mark the run trained (rank 0); a 0-epoch run still gets a ``ckpt_last.pt``."""
    if not s.env.is_main:
        return
    _check_finite(s.model, s.x_val, s.cfg, int(s.hp["epochs"]), s.run_dir, s.env.is_main)
    if int(s.hp["epochs"]) == 0:
        atomic_torch_save(s.run_dir / "ckpt_last.pt", checkpoint_state(
            s.cfg, s.info, epoch=0, best_val=best, model=s.model, defense=s.defense))
    (s.run_dir / "TRAINED").write_text(now() + "\n")
    (s.run_dir / FAILURE_FILE).unlink(missing_ok=True)  # a stale record of an earlier attempt
    write_health(s.run_dir)


def _check_split(cfg: RunConfig, data: Data) -> None:
    """The validation split must leave training samples (checked before any folder exists).

    Raises:
        UsageError: no training samples would remain, or a ``val_size`` the user set exceeds
            a fifth of the training set (the profile's default is capped, with a warning).
    """
    n = len(data.train)
    asked = int(cfg.hparams["val_size"])
    val = min(asked, n // 5)
    if asked > val:
        default = profile_defaults(cfg.profile, data.info.scale, cfg.dataset).get("val_size")
        if asked != default:  # the user's value: refused, never silently changed
            raise UsageError(f"'val_size' {asked} is more than a fifth of {data.info.name}'s "
                             f"{n} training samples; use at most {n // 5}")
        logger.info("the profile's val_size %d is capped at %d (a fifth of %s's %d training "
                    "samples)", asked, val, data.info.name, n)
    left = n - val
    if cfg.hparams.get("train_subset") is not None:
        left = min(left, int(cfg.hparams["train_subset"]))
    if left < 1:
        raise UsageError(f"{data.info.name} has {n} training samples: nothing is left to train on "
                         f"after a validation split of {val}")


def _check_finite(model: nn.Module, x_val: Tensor, cfg: RunConfig, epoch: int,
                  run_dir: Path, main: bool = True) -> None:
    """Weights and outputs finite before a checkpoint is declared good or TRAINED written.

    Raises:
        NonFiniteError: exit 3; the checkpoints on disk are those of the earlier epochs, and
            the failure is recorded like a NaN loss (``FAILED.json``, health verdict ``nan``).
    """
    try:
        check_finite_model(model, x_val[:256], f"{cfg.defense} seed {cfg.seed} epoch {epoch}")
    except NonFiniteError as exc:
        if main:
            record_nonfinite(run_dir, epoch, None, "non-finite weights or outputs")
        kept = (run_dir / "ckpt_last.pt").exists()
        raise NonFiniteError(f"{exc}; nothing saved for this epoch, the "
                             f"{kept_note(kept)} (lower lr or lr_gamma?)") from None


def _sync_log(path: Path, epoch: int) -> None:
    """Make the training log hold exactly one line per finished epoch up to ``epoch`` (the
    checkpoint's): lines written for an epoch whose checkpoint a kill prevented are dropped,
    duplicates keep their last copy."""
    if not path.exists():
        return
    rows = read_jsonl(path)
    by_epoch = {}
    for r in rows:
        if isinstance(r.get("epoch"), int) and 1 <= r["epoch"] <= epoch:
            by_epoch[r["epoch"]] = r
    kept = [by_epoch[e] for e in sorted(by_epoch)]
    missing = sorted(set(range(1, epoch + 1)) - set(by_epoch))
    if missing:  # only runs written before the log line came first can lack one
        logger.warning("%s lacks the record of epoch(s) %s (written by an older advbench)",
                       path, missing)
    if kept != rows or path.read_bytes()[-1:] not in (b"\n", b""):
        if len(kept) < len(rows):
            logger.info("%s: dropped %d line(s) after epoch %d (not covered by the checkpoint)",
                        path, len(rows) - len(kept), epoch)
        write_jsonl(path, kept)


def has_eps_warmup(hp: Mapping[str, Any]) -> bool:
    """Whether the run trains with the ε warm-up (``clean_epochs`` or ``eps_warmup_epochs``)."""
    return bool(hp.get("clean_epochs") or hp.get("eps_warmup_epochs"))


def eps_scale_at(hp: Mapping[str, Any], epoch: int, step: int, steps_per_epoch: int) -> float:
    """Fraction of the protocol's ε the training attack uses at ``step`` of ``epoch`` (0-based).

    ``clean_epochs`` E₀ epochs train on clean inputs (x' = x), then ε grows linearly over
    ``eps_warmup_epochs`` E₁ epochs, reaching the full ε at the end of epoch E₀ + E₁ (a step's
    value is the schedule at the step's end); afterwards 1. Both default to 0 (no warm-up);
    only architectures that record them use them (``config.ARCH_OVERRIDES``: LeNets++).
    """
    clean, ramp = float(hp.get("clean_epochs", 0)), float(hp.get("eps_warmup_epochs", 0))
    if epoch < clean:
        return 0.0
    if ramp <= 0:
        return 1.0
    done = epoch - clean + (step + 1) / max(steps_per_epoch, 1)
    return min(1.0, done / ramp)


def full_eps_epoch(hp: Mapping[str, Any]) -> int:
    """The first (0-based) epoch whose every step :func:`eps_scale_at` puts at the full ε
    (0 without a warm-up)."""
    ramp = max(float(hp.get("eps_warmup_epochs", 0)), 0.0)
    return math.ceil(float(hp.get("clean_epochs", 0)) + ramp)


def train_epoch(model: nn.Module, defense: Any, optimizer: torch.optim.Optimizer,
                 loader: BatchLoader, hp: Mapping[str, Any], dev: torch.device, epoch: int,
                 epochs: int, progress: bool, cfg: RunConfig, *, ddp: Optional[nn.Module] = None,
                 env: distributed.DistEnv = distributed.DistEnv()) -> dict[str, float]:
    """One pass over ``loader``. With ``ddp`` (the step wrapped by
    :func:`distributed.wrap_step`) each rank steps on its shard of every global batch."""
    sums: dict[str, Tensor] = {}
    n_seen, correct = 0, torch.zeros((), device=dev)
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first non-finite step, no sync
    bar = tqdm(loader, desc=f"{cfg.defense} s{cfg.seed} ep {epoch + 1}/{epochs}", leave=False,
               disable=not progress, unit="batch", dynamic_ncols=True)
    warmup = has_eps_warmup(hp)
    for step, (x, y) in enumerate(bar):
        follow_share()  # a sweep's job takes the cores of jobs that ended (benchmark.cores)
        weight = 1.0
        if warmup:
            defense.set_eps_scale(eps_scale_at(hp, epoch, step, len(loader)))
        if ddp is not None:
            x, y, weight = env.shard(x, y)
        if hp.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        if ddp is None:
            with autocast(hp, dev):
                out = defense.training_step(model, x, y, epoch=epoch, step=step)
        else:
            out = StepOutput(*ddp(x, y, epoch, step))
        optimizer.zero_grad(set_to_none=True)
        (out.loss * weight if weight != 1.0 else out.loss).backward()
        if hp.get("grad_clip"):  # a recorded protocol value (config.ARCH_OVERRIDES: lenets++)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(hp["grad_clip"]))
        optimizer.step()
        b = y.shape[0]
        n_seen += b
        for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * b
        if out.logits is not None:
            correct += (out.logits.detach().argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(out.loss.detach()),
                                torch.full_like(first_bad, step), first_bad)
        if step % 20 == 0 or step == len(loader) - 1:  # the only host syncs of the loop
            if ddp is None:
                loss_val, bad_anywhere = float(out.loss.detach()), int(first_bad) >= 0
            else:  # every rank must see the same values, or one raises while others wait
                num, den, bad = distributed.all_reduce_sum(torch.stack(
                    [out.loss.detach().double() * b, torch.tensor(float(b), device=dev,
                                                                 dtype=torch.float64),
                     (first_bad >= 0).double()]), env)
                loss_val, bad_anywhere = float(num / den), float(bad) > 0
            if not math.isfinite(loss_val) or bad_anywhere:
                at = int(first_bad)
                raise DivergedError(cfg.defense, epoch + 1, at if at >= 0 else step,
                                    loss_val if not math.isfinite(loss_val) else math.nan)
            bar.set_postfix(loss=f"{float(sums['loss']) / n_seen:.3f}",
                            acc=f"{float(correct) / n_seen:.3f}")
    bar.close()
    if ddp is not None:  # global sums over ranks, in a fixed key order
        keys = sorted(sums)
        total = distributed.all_reduce_sum(torch.stack(
            [sums[k].double() for k in keys] + [correct.double(),
                                                torch.tensor(float(n_seen), device=dev,
                                                             dtype=torch.float64)]), env)
        sums = dict(zip(keys, total[:len(keys)]))
        correct, n_seen = total[-2], int(total[-1])
    stats = {k: float(v) / max(n_seen, 1) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in stats.values()):
        bad = next(k for k, v in stats.items() if not math.isfinite(v))
        raise DivergedError(cfg.defense, epoch + 1, None, stats[bad])
    stats["train_acc"] = float(correct) / max(n_seen, 1)
    return stats


def _requires(defense: str) -> tuple[str, ...]:
    from defenses import DEFENSES
    return tuple(DEFENSES.get(defense).requires)


def _helper_model(req: str, cfg: RunConfig, data: Data, store: RunStore, device: str,
                  progress: bool) -> nn.Module:
    """Train (or reuse from the store) the run a defense requires, and load its last weights."""
    req_cfg = helper_config(req, cfg, data.info.scale)
    run_dir = train_run(req_cfg, data, store, device=device, progress=progress)
    model, _, _, _ = model_from_checkpoint(read_checkpoint(run_dir / "ckpt_last.pt"))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def train_log(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "train_log.jsonl")
