"""``advbench bench``: what the harness costs over the floor of PGD adversarial training.

Cost model (SPEC §7): PGD-k adversarial training needs about k+1 forward+backward passes per
sample (k attack steps + the loss), k+2 for TRADES-style losses that also backpropagate a
clean forward. In ONE process and one run, for a given defense/arch/batch size/device and
speed options, :func:`bench` measures

* the same model's plain rates: forward (eval, no grad), forward+backward (train mode, CE,
  parameter gradients) and one attack step (eval mode, gradient w.r.t. the input only);
* the harness's real training loop (``benchmark.run.train.train_epoch``: loader with
  augmentation, the defense's step under the run's autocast/compile, backward, SGD step,
  metric accounting) over random data of the dataset's shape;
* the number of gradient-carrying forwards one training step makes (counted with a hook on
  the backbone's first layer), i.e. the floor's pass count, next to the k+1 / k+2 formula;
* each evaluation attack's cost per sample (fp32, eval mode, uncompiled: how evaluation runs):
  wall and process-CPU seconds, and the forwards it made per sample, counted with the same
  hook (samples through the backbone with grad = forward+backward passes, and without). The
  labels are the model's own predictions, so every point is attacked; attacks that stop on a
  point once it is broken (APGD restarts, the AutoAttack cascade) cost less on a model whose
  points they break early, so their counts are those of this (untrained) model, a lower
  bound of their cost on a robust one where the later stages run.

It reports ``ratio = train time / (passes × forward+backward time)`` (goal < 1.10) and the
same against the measured components (k attack steps + the loss passes). Numbers, never
asserted: timing belongs in this command, not in tests.

Example:
    advbench bench --defense at --arch resnet18 --batch-size 128 --device cpu --amp bf16
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.run.resolve import build_defense
from benchmark.run.resolve import resolve_run_config
from benchmark.data import BatchLoader, Split, dataset_info
from benchmark.device import resolve_device
from benchmark.run.train import (full_eps_epoch, train_epoch, autocast, make_optimizer,
                                 maybe_compile, seed_everything)

logger = logging.getLogger(__name__)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], Any], dev: torch.device, reps: int, warmup: int = 1) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / max(reps, 1)


@contextlib.contextmanager
def count_forwards(model: nn.Module) -> Any:
    """Count forwards through the backbone's first parametrised layer: calls ``{"grad",
    "nograd"}`` and the samples they carried ``{"grad_samples", "nograd_samples"}``."""
    counts = {"grad": 0, "nograd": 0, "grad_samples": 0, "nograd_samples": 0}
    root = getattr(model, "backbone", model)
    first = next(m for m in root.modules()
                 if not list(m.children()) and list(m.parameters(recurse=False)))

    def hook(module: nn.Module, args: Any) -> None:
        mode = "grad" if torch.is_grad_enabled() else "nograd"
        counts[mode] += 1
        counts[f"{mode}_samples"] += int(args[0].shape[0]) if args and args[0].dim() else 1

    handle = first.register_forward_pre_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def _random_split(n: int, info: Any, gen: torch.Generator) -> Split:
    x = torch.randint(0, 256, (n, info.in_channels, info.image_size, info.image_size),
                      generator=gen, dtype=torch.uint8)
    return Split(x, torch.randint(0, info.num_classes, (n,), generator=gen))


def bench(defense: str = "at", arch: str = "small-cnn", *, dataset: str = "cifar10",
          profile: str = "paper", batch_size: int = 128, device: str = "cpu", steps: int = 3,
          warmup: int = 1, reps: int = 3, amp: str = "none", channels_last: bool = False,
          compile: bool = False, attacks: Optional[str] = "fgsm,pgd",
          eval_samples: Optional[int] = None,
          hparams: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Measure the training step against its forward+backward floor; see the module docstring.

    Args:
        defense: registered defense name.
        arch: backbone.
        dataset: gives the input shape and class count (random data; nothing is loaded).
        profile: ``paper`` (PGD-10) or ``cpu`` (PGD-5).
        batch_size: training batch.
        device: ``cpu``, ``cuda``, ``auto``.
        steps: timed training steps (after ``warmup`` untimed ones).
        warmup: untimed training steps first (compilation happens here).
        reps: timed repetitions of each plain measurement.
        amp: ``none`` or ``bf16`` (training only; evaluation attacks stay fp32).
        channels_last: channels-last model and batches.
        compile: ``torch.compile`` the model for the training step.
        attacks: evaluation attack labels (``benchmark.run.protocols``); None or "" for none.
        eval_samples: batch attacked per evaluation attack (default ``batch_size``).
        hparams: further hyperparameter overrides.

    Returns:
        A JSON-serialisable dict (see :func:`format_bench` for the meaning of each field).
    """
    from benchmark.run.protocols import resolve_specs
    from defenses import DEFENSES

    dev = resolve_device(device)
    info = dataset_info(dataset)
    user = {**(hparams or {}), "batch_size": batch_size, "amp": amp,
            "channels_last": channels_last, "compile": compile}
    cfg = resolve_run_config(defense, dataset, profile=profile, arch=arch, user_hparams=user)
    hp = cfg.hparams
    seed_everything(0)
    dfn = build_defense(cfg, info)
    model = dfn.build_model(arch, info).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    helpers = {}
    for req in DEFENSES.get(defense).requires:  # untrained stand-ins: only their cost matters
        req_cfg = resolve_run_config(req, dataset, profile=profile, arch=arch)
        helpers[req] = build_defense(req_cfg, info).build_model(arch, info).to(dev).eval()
    dfn.setup(helpers)
    optimizer = make_optimizer(model, hp, dfn)
    gen = torch.Generator().manual_seed(0)
    xb = _random_split(batch_size, info, gen).floats(dev)[0]
    yb = torch.randint(0, info.num_classes, (batch_size,), generator=gen).to(dev)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)

    model.train()
    with count_forwards(model) as passes, autocast(hp, dev):
        dfn.training_step(model, xb, yb, epoch=0, step=0)
    # k from the declaration (a defense with uses_training_attack = False runs no attack)
    k = int(hp["train_attack_steps"]) if dfn.uses_training_attack else 0
    step_model = maybe_compile(model, hp)

    def loader_of(n_batches: int) -> BatchLoader:
        return BatchLoader(_random_split(n_batches * batch_size, info, gen), batch_size,
                           generator=gen, augment=bool(hp["augment"]), crop_pad=info.crop_pad,
                           flip=info.flip, device=dev)

    # the first epoch at the full ε: an architecture with clean / ε warm-up epochs (LeNets++)
    # would otherwise time a clean step at epoch 0 and report a training step cheaper than k+1
    full = full_eps_epoch(hp)

    def train_step(loader: BatchLoader) -> None:  # the harness's loop over a one-batch epoch
        train_epoch(step_model, dfn, optimizer, loader, hp, dev, full, full + 1, False, cfg)

    def fwd() -> None:
        with torch.no_grad(), autocast(hp, dev):
            step_model(xb)

    def fwd_bwd() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(hp, dev):
            loss = F.cross_entropy(step_model(xb), yb)
        loss.backward()

    def attack_step() -> None:
        delta = torch.zeros_like(xb, requires_grad=True)
        with autocast(hp, dev):
            loss = F.cross_entropy(step_model(xb + delta), yb)
        torch.autograd.grad(loss, delta)

    def in_mode(fn: Callable[[], None], train: bool) -> Callable[[], None]:
        def run() -> None:
            model.train(train)
            fn()
        return run

    plain = {"forward": in_mode(fwd, False), "attack_step": in_mode(attack_step, False),
             "fwd_bwd": in_mode(fwd_bwd, True)}
    t0 = time.perf_counter()
    for _ in range(warmup):  # compiles every graph variant when compile=True
        train_step(loader_of(1))
        for fn in plain.values():
            fn()
    _sync(dev)
    warmup_s = time.perf_counter() - t0
    # interleaved rounds: a burst of load from other processes hits every measurement alike;
    # medians are reported, and the ratio of best times as a less noisy second estimate
    times: dict[str, list[float]] = {k: [] for k in ("train", "loader", *plain)}
    cpu: dict[str, list[float]] = {k: [] for k in ("train", *plain)}  # process CPU seconds
    loaders = [loader_of(1) for _ in range(steps)]
    for i in range(max(steps, reps)):
        if i < steps:
            loader = loaders[i]
            c0 = time.process_time()
            times["train"].append(_timed(lambda: train_step(loader), dev, 1, warmup=0))
            cpu["train"].append(time.process_time() - c0)
            times["loader"].append(_timed(lambda: [None for _ in loader], dev, 1, warmup=0))
        if i < reps:
            for name, fn in plain.items():
                c0 = time.process_time()
                times[name].append(_timed(fn, dev, 1, warmup=0))
                cpu[name].append(time.process_time() - c0)
    optimizer.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    train_s, fwd_s, atk_s, fb_s, loader_s = (med[k] for k in ("train", "forward", "attack_step",
                                                              "fwd_bwd", "loader"))
    n_pass = max(passes["grad"], 1)
    component_s = k * atk_s + (n_pass - k) * fb_s
    out: dict[str, Any] = {
        "defense": defense, "arch": arch, "dataset": dataset, "profile": profile,
        "batch_size": batch_size, "device": str(dev), "amp": amp, "channels_last": channels_last,
        "compile": compile, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "host": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "k": k, "training_attack": dfn.uses_training_attack, "passes_grad": passes["grad"],
        "passes_nograd": passes["nograd"],
        "formula": "k+1" if n_pass == k + 1 else "k+2" if n_pass == k + 2 else f"k+{n_pass - k}",
        "forward_img_s": batch_size / fwd_s, "fwd_bwd_img_s": batch_size / fb_s,
        "attack_step_img_s": batch_size / atk_s, "train_img_s": batch_size / train_s,
        "loader_img_s": batch_size / loader_s, "warmup_s": warmup_s,
        "ratio_to_floor": train_s / (n_pass * fb_s), "ratio_to_components": train_s / component_s,
        "ratio_to_floor_best": best["train"] / (n_pass * best["fwd_bwd"]),
        # CPU seconds of this process: insensitive to other processes' load on a shared CPU
        # (a clean measure of work with 1 thread; OpenMP spin-waits inflate it with more)
        "ratio_to_floor_cpu": statistics.median(cpu["train"]) / (
            n_pass * statistics.median(cpu["fwd_bwd"])) if dev.type == "cpu" else None,
        "ratio_to_components_cpu": statistics.median(cpu["train"]) / (
            k * statistics.median(cpu["attack_step"])
            + (n_pass - k) * statistics.median(cpu["fwd_bwd"])) if dev.type == "cpu" else None,
        "times_s": times, "cpu_s": cpu, "loadavg": list(os.getloadavg()),
        "img_per_cpu_s": {k: batch_size / statistics.median(v) for k, v in cpu.items()}
        if dev.type == "cpu" else None,
        "eval": [],
    }
    model.eval()
    n_eval = eval_samples or batch_size
    out["eval_samples"] = n_eval
    xe = _random_split(n_eval, info, gen).floats(dev)[0]
    fp32 = model.to(memory_format=torch.contiguous_format)  # evaluation: fp32, uncompiled
    with torch.no_grad():  # every point correct: attacks that skip wrong points try them all
        ye = fp32(xe).argmax(1)
    fb32_s = fb_s
    if amp != "none" or compile or channels_last:
        fp32.train()
        fb32_s = _timed(lambda: F.cross_entropy(fp32(xb.contiguous()), yb).backward(), dev,
                        reps)
        fp32.eval()
        optimizer.zero_grad(set_to_none=True)
    for spec in resolve_specs(attacks, info.scale) if attacks else []:
        atk = spec.build(seed=0)
        c0 = time.process_time()
        with count_forwards(fp32) as fw:
            s = _timed(lambda: atk(fp32, xe, ye), dev, 1, warmup=0) / n_eval
        out["eval"].append({"attack": spec.label, "s_per_sample": s,
                            "cpu_s_per_sample": (time.process_time() - c0) / n_eval,
                            "fwd_bwd_equiv": s / (fb32_s / batch_size),
                            "fwd_bwd_per_sample": fw["grad_samples"] / n_eval,
                            "fwd_only_per_sample": fw["nograd_samples"] / n_eval,
                            **spec.record()})
    return out


def format_bench(r: Mapping[str, Any]) -> str:
    """Human-readable report of :func:`bench`'s result."""
    opts = ", ".join(f"{k}={r[k]}" for k in ("amp", "channels_last", "compile"))
    lines = [
        f"advbench bench: {r['defense']} / {r['arch']} / {r['dataset']} ({r['profile']} profile), "
        f"batch {r['batch_size']}, {r['device']} ({r['gpu'] or r['host']}, {r['threads']} "
        f"threads), torch {r['torch']}; {opts}",
        f"  forward (eval, no grad)      {r['forward_img_s']:9.1f} img/s",
        f"  forward+backward (train)     {r['fwd_bwd_img_s']:9.1f} img/s",
        f"  attack step (input grad)     {r['attack_step_img_s']:9.1f} img/s",
        f"  loader (augmentation)        {r['loader_img_s']:9.1f} img/s",
        f"  training step (harness)      {r['train_img_s']:9.1f} img/s   "
        f"(first {r['warmup_s']:.1f}s of warm-up{' incl. compile' if r['compile'] else ''})",
        f"  passes per step: {r['passes_grad']} with grad (= {r['formula']}, k = {r['k']}"
        f"{'' if r.get('training_attack', True) else ': declares no training attack'}), "
        f"{r['passes_nograd']} without",
        f"  training step / ({r['passes_grad']} x forward+backward) = "
        f"{r['ratio_to_floor']:.3f}   (overhead {100 * (r['ratio_to_floor'] - 1):+.1f}% over the "
        f"floor; goal < +10%; best-of-rounds ratio {r['ratio_to_floor_best']:.3f})",
        f"  training step / ({r['k']} attack steps + {r['passes_grad'] - r['k']} fwd+bwd) = "
        f"{r['ratio_to_components']:.3f}",
    ]
    if r.get("ratio_to_floor_cpu") is not None:
        per = r["img_per_cpu_s"]
        lines.append(f"  same two ratios in process CPU time (robust to other load): "
                     f"{r['ratio_to_floor_cpu']:.3f} / {r['ratio_to_components_cpu']:.3f}; "
                     f"images per CPU-second: forward+backward {per['fwd_bwd']:.1f}, "
                     f"training step {per['train']:.2f}")
    lines.append(f"  medians of {len(r['times_s']['train'])} interleaved rounds; load average "
                 f"{r['loadavg'][0]:.1f} on {os.cpu_count()} cores")
    if r["eval"]:
        lines.append(f"  evaluation attacks on {r.get('eval_samples', '?')} points labelled with "
                     f"the model's own predictions (every point attacked):")
    for e in r["eval"]:
        lines.append(f"  eval {e['attack']:<13s} {1000 * e['s_per_sample']:9.2f} ms/sample, "
                     f"{1000 * e.get('cpu_s_per_sample', float('nan')):9.2f} CPU-ms/sample; "
                     f"{e.get('fwd_bwd_per_sample', float('nan')):7.1f} forward+backward + "
                     f"{e.get('fwd_only_per_sample', float('nan')):6.1f} forward-only "
                     f"passes/sample (time ~{e['fwd_bwd_equiv']:.1f} fp32 fwd+bwd)")
    return "\n".join(lines)


def to_json(r: Mapping[str, Any]) -> str:
    return json.dumps(r, indent=1, sort_keys=True, default=str)
