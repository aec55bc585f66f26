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
import fcntl
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attacks.base import model_mode
from attacks.pgd import PGD
from benchmark.run import distributed
from benchmark.checkpoint import build_defense, model_from_checkpoint, read_checkpoint
from benchmark.config import RunConfig, helper_config
from benchmark.data import BatchLoader, Data, split_train_val
from benchmark.device import peak_memory_mb, resolve_device
from benchmark.errors import TrainingError, UsageError
from benchmark.store import (CKPT_FORMAT, CKPT_VERSION, RunStore, append_jsonl, atomic_torch_save,
                             atomic_write_json, code_version, environment, now, read_jsonl)
from defenses.base import StepOutput

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
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


def lr_at(hp: Mapping[str, Any], epoch: int) -> float:
    """Piecewise-constant schedule: lr × gamma^(number of milestones ≤ epoch)."""
    drops = sum(1 for m in hp["lr_milestones"] if epoch >= m)
    return float(hp["lr"]) * float(hp["lr_gamma"]) ** drops


def make_optimizer(model: nn.Module, hp: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on every trainable parameter (the common protocol)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(hp["lr"]),
                           momentum=float(hp["momentum"]), weight_decay=float(hp["weight_decay"]))


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
    """Exclusive lock on a run folder (released by the OS if the process dies), so that two
    launcher jobs needing the same run (e.g. HAT's ``st`` helper) never train it twice."""
    if not enabled:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process training %s", run_dir)
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks: the launchers' ordering remains
            logger.warning("cannot lock %s (%s); continuing unlocked", run_dir, exc)
        yield  # closing the file releases the lock


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
        TrainingError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    env = distributed.current()
    run_dir = store.run_dir(cfg)
    if (run_dir / "TRAINED").exists():
        logger.info("%s/%s seed %d already trained: %s", cfg.defense, cfg.dataset, cfg.seed, run_dir)
        return run_dir
    helpers = {req: _helper_model(req, cfg, data, store, device, progress)
               for req in _requires(cfg.defense)}
    with _run_lock(run_dir, enabled=not env.active):
        if not env.active and (run_dir / "TRAINED").exists():  # trained while we waited
            return run_dir
        _train(cfg, data, store, run_dir, helpers, env, device=device,
               progress=progress and env.is_main, stop_after=stop_after, sync_bn=sync_bn)
    distributed.barrier(env)  # other ranks may read what rank 0 just wrote
    return run_dir


def _train(cfg: RunConfig, data: Data, store: RunStore, run_dir: Path,
           helpers: Mapping[str, nn.Module], env: distributed.DistEnv, *, device: str,
           progress: bool, stop_after: Optional[int], sync_bn: bool) -> None:
    dev = distributed.rank_device(resolve_device(device), env)
    hp = cfg.hparams
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.json").exists():
            atomic_write_json(run_dir / "config.json", {
                **cfg.to_dict(), "run_id": cfg.run_id, "data": data.info.to_dict(),
                "env": environment(dev), "git": code_version(), "created": now(),
                **({"distributed": {"world_size": env.world_size, "sync_bn": sync_bn}}
                   if env.active else {})})

    seed_everything(cfg.seed)
    defense = build_defense(cfg, data.info)
    model = defense.build_model(cfg.arch, data.info).to(dev)
    if env.active and sync_bn:
        model = distributed.convert_sync_bn(model, dev)
    if hp.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    defense.setup({k: m.to(dev) for k, m in helpers.items()})
    optimizer = make_optimizer(model, hp)
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

    start_epoch, best = 0, -math.inf
    if (run_dir / "ckpt_last.pt").exists():
        ckpt = read_checkpoint(run_dir / "ckpt_last.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        defense.load_state_dict(ckpt["defense"])
        _set_rng_state(ckpt["rng"], loader_gen)
        start_epoch, best = int(ckpt["epoch"]), float(ckpt["best_val"])
        logger.info("resuming %s from epoch %d", run_dir, start_epoch)
    step_model = maybe_compile(model, hp)
    ddp = distributed.wrap_step(step_model, defense, lambda: autocast(hp, dev), dev) \
        if env.active else None

    epochs = int(hp["epochs"])
    for epoch in range(start_epoch, epochs):
        if stop_after is not None and epoch - start_epoch >= stop_after:
            return
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(hp, epoch)
        model.train()
        defense.on_epoch_start(model, epoch)
        if env.active:
            distributed.seed_rank(cfg.seed, epoch, env)
        stats = _train_epoch(step_model, defense, optimizer, loader, hp, dev, epoch, epochs,
                             progress, cfg, ddp=ddp, env=env)
        distributed.broadcast_defense_state(defense, env)
        if not env.is_main:
            continue
        record = {"epoch": epoch + 1, "lr": lr_at(hp, epoch), **stats,
                  "epoch_s": round(time.perf_counter() - t0, 3), "peak_mem_mb": peak_memory_mb(dev)}
        if env.active:
            record["world_size"] = env.world_size
        if (epoch + 1) % int(hp.get("val_every", 1)) == 0 or epoch + 1 == epochs:
            record.update(validate(model, x_val, y_val, hp))
        score = record.get(str(hp.get("select_by", "val_pgd")), -math.inf)
        is_best = score >= best  # ties go to the later epoch
        best = max(best, score)
        state = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": cfg.to_dict(),
                 "info": data.info.to_dict(), "epoch": epoch + 1, "best_val": best,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "defense": defense.state_dict(), "rng": _rng_state(loader_gen)}
        if is_best:
            atomic_torch_save(run_dir / "ckpt_best.pt",
                              {k: v for k, v in state.items() if k not in ("optimizer", "rng")})
        atomic_torch_save(run_dir / "ckpt_last.pt", state)
        append_jsonl(run_dir / "train_log.jsonl", record)
        logger.info("%s seed %d epoch %d/%d %s", cfg.defense, cfg.seed, epoch + 1, epochs,
                    " ".join(f"{k}={v:.4g}" for k, v in record.items()
                             if isinstance(v, float) and k != "lr"))
    if not env.is_main:
        return
    if epochs == 0:
        atomic_torch_save(run_dir / "ckpt_last.pt", {
            "format": CKPT_FORMAT, "version": CKPT_VERSION, "config": cfg.to_dict(),
            "info": data.info.to_dict(), "epoch": 0, "best_val": best,
            "model": model.state_dict(), "defense": defense.state_dict()})
    (run_dir / "TRAINED").write_text(now() + "\n")


def _train_epoch(model: nn.Module, defense: Any, optimizer: torch.optim.Optimizer,
                 loader: BatchLoader, hp: Mapping[str, Any], dev: torch.device, epoch: int,
                 epochs: int, progress: bool, cfg: RunConfig, *, ddp: Optional[nn.Module] = None,
                 env: distributed.DistEnv = distributed.DistEnv()) -> dict[str, float]:
    """One pass over ``loader``. With ``ddp`` (the step wrapped by
    :func:`distributed.wrap_step`) each rank steps on its shard of every global batch."""
    sums: dict[str, Tensor] = {}
    n_seen, correct = 0, torch.zeros((), device=dev)
    bar = tqdm(loader, desc=f"{cfg.defense} s{cfg.seed} ep {epoch + 1}/{epochs}", leave=False,
               disable=not progress, unit="batch", dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        weight = 1.0
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
        optimizer.step()
        b = y.shape[0]
        n_seen += b
        for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * b
        if out.logits is not None:
            correct += (out.logits.detach().argmax(1) == y).sum()
        if step % 20 == 0 or step == len(loader) - 1:  # the only host syncs of the loop
            if ddp is None:
                loss_val = float(out.loss.detach())
            else:  # every rank must see the same value, or one raises while others wait
                num, den = distributed.all_reduce_sum(torch.stack(
                    [out.loss.detach().double() * b, torch.tensor(float(b), device=dev,
                                                                 dtype=torch.float64)]), env)
                loss_val = float(num / den)
            if not math.isfinite(loss_val):
                raise TrainingError(f"{cfg.defense}: loss became {loss_val} at epoch {epoch + 1} "
                                    f"step {step}; last good checkpoint kept (lower lr?)")
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
        raise TrainingError(f"{cfg.defense}: non-finite loss in epoch {epoch + 1}; last good "
                            f"checkpoint kept")
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
