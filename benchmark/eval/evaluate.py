"""Evaluation: per-sample robust flags for (checkpoint, attack) pairs, written as rows.

Flags, not accuracies, are the primary output (AutoAttack's ``EvaluationState``): every
evaluation stores ``flags/<eval_key>.pt`` with per-sample ``clean`` and ``robust`` booleans
and ``adv_ce`` (CE of the model at x'; x' = x for points misclassified clean), so worst cases
over attacks can be recomputed without rerunning anything. Only samples the model classifies
correctly are attacked. Rows (``eval/<eval_key>.json``, ``"kind": "attack"``) record the
attack's resolved hyperparameters, ε (float and ``"8/255"``), the test points used and the
wall time; an existing row is reused unless ``force``.

Long attacks resume: after a finished batch (at most every ``save_every_s`` seconds) the flags
so far go to ``flags/<eval_key>.partial.pt``; a rerun continues from there. Each batch seeds
its attack afresh, so a resumed evaluation gives the same flags as an uninterrupted one.

The ``ensemble`` column is evaluation-level logic: members already stored for the same run,
checkpoint and points are read back, missing ones run as a cascade on the still-robust points
(see :mod:`attacks.ensemble`). A checkpoint file outside a run folder is evaluated into
``--out`` (default ``<file stem>-eval/`` beside it), keyed by the file's content hash.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from benchmark.config import RunConfig
from benchmark.data import Data
from benchmark.device import default_eval_batch_size
# load_flags, predict_flags and robust_flags stay importable from here (the public flag API)
from benchmark.eval.cascade import ensemble_flags as _ensemble
from benchmark.eval.flags import (ATTACK_SEED, adapt_spec, attack_points, effective_n,  # noqa: F401
                                  eval_key, load_flags, predict, predict_flags, prefix_stats,
                                  robust_flags)
from benchmark.eval.target import Target, check_model, open_target
from benchmark.eval.worstcase import bit_fields, flags_payload, write_headlines
from benchmark.run.protocols import AttackSpec, parse_eps_list, resolve_specs
from benchmark.store import (atomic_torch_save, atomic_write_json, clean_tmp, exclusive,
                             safe_torch_load)
from benchmark.validate import check_eval_sizes, check_row

logger = logging.getLogger(__name__)


def expected_keys(cfg: RunConfig, checkpoints: Sequence[str], specs: Sequence[AttackSpec],
                  n_examples: Optional[int]) -> list[str]:
    """The eval keys :func:`evaluate_run` writes for a run config (job-state detection)."""
    from defenses import DEFENSES
    randomized = DEFENSES.get(cfg.defense).randomized
    return [eval_key(cfg.run_id, w, adapt_spec(s, randomized),
                     effective_n(s, cfg.profile, n_examples)) for w in checkpoints for s in specs]


def evaluate_run(run_dir: Path | str, specs: Sequence[AttackSpec], *, checkpoint: str = "best",
                 device: str = "cpu", out_dir: Optional[Path | str] = None,
                 **kwargs: Any) -> list[dict[str, Any]]:
    """Open one checkpoint (run folder or checkpoint file) and evaluate it under each spec.

    See :func:`evaluate_target` for the other arguments.
    """
    return evaluate_target(open_target(run_dir, checkpoint, device=device, out_dir=out_dir),
                           specs, **kwargs)


def evaluate_target(t: Target, specs: Sequence[AttackSpec], *, n_examples: Optional[int] = None,
                    batch_size: int = 256, data: Optional[Data] = None,
                    data_dir: Optional[Path] = None, force: bool = False,
                    progress: bool = True, cascade: bool = False) -> list[dict[str, Any]]:
    """Evaluate an opened checkpoint under each spec; write flags and rows.

    Existing rows are reused unless ``force``. Each spec uses the first
    :func:`effective_n` test points (profile default, e.g. 1000 for ``cpu``, capped per spec).
    With ``cascade`` the specs without a row run as a cascade for the headline only
    (:mod:`benchmark.eval.cascade`); the cascade rows and the headline rows they feed are
    returned after the reused rows.
    """
    check_eval_sizes(n_examples, batch_size)
    dev = t.device
    rows: list[Optional[dict[str, Any]]] = []
    pending = []
    for spec in specs:
        spec = adapt_spec(spec, t.defense.randomized)
        n = effective_n(spec, t.cfg.profile, n_examples)
        key = eval_key(t.cfg.run_id, t.checkpoint, spec, n)
        path = t.out_dir / "eval" / f"{key}.json"
        cached = t.cached(path, force=force)
        if cached is not None:
            rows.append(cached)
        else:
            pending.append((len(rows), spec, n, key, path))
            rows.append(None)
    if not pending:
        _headlines(t)
        return [r for r in rows if r is not None]
    for sub in ("eval", "flags"):
        clean_tmp(t.out_dir / sub)
    data = t.test_data(data, data_dir)
    x_all, y_all = data.test.floats(dev)
    check_model(t.model, x_all[:8], randomized=t.defense.randomized)
    n_max = max((len(y_all) if n is None else min(n, len(y_all))) for _, _, n, _, _ in pending)
    clean_all, ce_all = predict(t.model, x_all[:n_max], y_all[:n_max], batch_size)
    if cascade:
        from benchmark.eval.cascade import known_flags, run_cascade
        done = run_cascade(t, [(spec, n) for _, spec, n, _, _ in pending],
                           known_flags(t.out_dir, t.checkpoint), x_all, y_all,
                           clean_all, ce_all, batch_size=batch_size, force=force,
                           progress=progress, provenance=data.info.provenance)
        groups = {(r["norm"], r["n_examples"], round(r["eps"], 9)) for r in done}
        heads = [h for h in _headlines(t)
                 if (h["norm"], h["n_examples"], round(h["eps"], 9)) in groups]
        return [r for r in rows if r is not None] + done + heads
    for slot, spec, n, key, path in pending:
        # another process (a second sweep, launcher or `evaluate` on the same runs folder) may
        # be computing this very row: wait for it and reuse its row instead of repeating it
        with exclusive(t.out_dir / "eval" / f".{key}.lock", f"evaluating {path}") as waited:
            done = t.cached(path) if waited and not force else None
            if done is not None:
                rows[slot] = done
                continue
            m = len(y_all) if n is None else min(n, len(y_all))
            x, y, clean, clean_ce = x_all[:m], y_all[:m], clean_all[:m], ce_all[:m]
            desc = f"{t.cfg.defense} s{t.cfg.seed} {spec.label}@{spec.eps:.4g}"
            t0, c0 = time.perf_counter(), time.process_time()
            extra: dict[str, Any] = {}
            attack = spec.build(seed=ATTACK_SEED)
            reused = None if force else _stored_flags(t.out_dir / "flags" / f"{key}.pt", clean)
            if reused is not None:  # e.g. AutoAttack flags that `advbench check` computed
                flags, adv_ce = reused
                extra["flags_reused"] = True
            elif spec.attack == "ensemble":
                flags, adv_ce, extra = _ensemble(t, spec, attack, x, y, clean, clean_ce, n,
                                                 batch_size, progress, desc)
            else:
                objective = t.defense.objective() if spec.attack == "adaptive" else None
                flags, adv_ce = attack_points(t.model, attack, x, y, clean=clean, clean_ce=clean_ce,
                                              batch_size=batch_size, loss=objective,
                                              progress=progress, desc=desc,
                                              partial=t.out_dir / "flags" / f"{key}.partial.pt",
                                              stats=extra)
            first_by = extra.pop("first_broken_by", None)  # per sample: into the flags file
            wall = time.perf_counter() - t0 + extra.get("resumed_wall_s", 0.0)
            row = {**t.row(key, "attack", data_provenance=data.info.provenance), **spec.record(),
                   "attack_hparams": dict(attack.hparams), "attack_seed": ATTACK_SEED,
                   "n_examples": int(len(clean)), "clean_acc": float(clean.float().mean()),
                   "robust_acc": float(flags.float().mean()), "adv_ce": float(adv_ce.float().mean()),
                   "wall_s": round(wall, 3), "cpu_s": round(time.process_time() - c0, 3),
                   "batch_size": batch_size, **extra,
                   "acc_on_first": prefix_stats(clean, flags, adv_ce),  # same-point tables
                   **bit_fields(clean, flags)}  # any prefix, and paired tests, from rows alone
            check_row(row, f"row {path}")  # never a row without points or with NaN accuracy
            payload = flags_payload(clean, flags, adv_ce, spec.record(), t.checkpoint)
            if first_by is not None:
                payload.update(first_broken_by=first_by, components=extra["components"]["order"])
            atomic_torch_save(t.out_dir / "flags" / f"{key}.pt", payload)
            atomic_write_json(path, row)
            logger.info("%s seed %d [%s] %s eps %s: clean %.4f robust %.4f adv_ce %.4f (%.1fs, n=%d)",
                        t.cfg.defense, t.cfg.seed, t.checkpoint, spec.label, row["eps_str"],
                        row["clean_acc"], row["robust_acc"], row["adv_ce"], wall, m)
            rows[slot] = row
    _headlines(t)
    return [r for r in rows if r is not None]


def _headlines(t: Target) -> list[dict[str, Any]]:
    """(Re)write the checkpoint's headline rows from every stored flags file (no attack runs)."""
    return write_headlines(t.out_dir, t.checkpoint, base=t.row("", "headline"))


def _stored_flags(path: Path, clean: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(robust, adv_ce) from a complete flags file of this key whose clean flags equal the
    model's clean predictions on these points, else None (the attack then runs)."""
    if not path.exists():
        return None
    try:
        state = safe_torch_load(path)
        robust, adv_ce = state["robust"], state["adv_ce"]
        ok = torch.equal(state["clean"].to(clean.device), clean) and len(robust) == len(clean)
    except Exception:  # a damaged or foreign file: recompute, never trust it
        return None
    return (robust.to(clean.device), adv_ce.to(clean.device)) if ok else None


def evaluate_path(path: Path | str, *, attacks: Optional[str] = None,
                  suite: Optional[str] = None, eps: Optional[str] = None,
                  checkpoint: str = "best", device: str = "cpu",
                  out_dir: Optional[Path | str] = None,
                  batch_size: Optional[int] = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Open a checkpoint once, resolve ``--attacks/--suite/--eps`` for its dataset scale, and
    evaluate it (``batch_size`` None: sized for the device and arch)."""
    t = open_target(path, checkpoint, device=device, out_dir=out_dir)
    specs = resolve_specs(attacks, t.info.scale, suite=suite, eps=parse_eps_list(eps))
    return evaluate_target(t, specs, batch_size=batch_size or
                           default_eval_batch_size(t.device, t.cfg.arch), **kwargs)


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown listing, one line per row: accuracies in %, CE at x', time. A cascaded
    attack's robust cell is `–` (its points attacked and broken follow), the headline's is the
    worst case."""
    lines = ["| defense | seed | ckpt | attack | eps | n | clean | robust | adv CE | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        robust = f"{100 * r['robust_acc']:.2f}" if "robust_acc" in r else \
            f"– (cascade: broke {r.get('points_broken')} of {r.get('points_attacked')})"
        wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "–"
        lines.append(f"| {r['defense']} | {r['seed']} | {r['checkpoint']} | {r['attack']} | "
                     f"{r['eps_str']} | {r['n_examples']} | {100 * r['clean_acc']:.2f} | "
                     f"{robust} | {r.get('adv_ce', float('nan')):.4f} | {wall} |")
    return "\n".join(lines) + "\n"
