"""Per-sample flags, the primitive every evaluation command is built from.

Only samples the model classifies correctly are attacked (:func:`attack_points`); a sample is
robust iff it is correct clean and under the attack. Evaluation keys (:func:`eval_key`) name
the stored rows and flags (``eval/<key>.json``, ``flags/<key>.pt``). ``evaluate``, ``checks``
and the other commands import these from here, not from each other.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from attacks.base import Attack, Objective, input_grads_only
from benchmark.config import DEFAULT_N_EXAMPLES, stable_hash
from benchmark.cores import follow as follow_share
from benchmark.run.protocols import AttackSpec
from benchmark.store import atomic_torch_save, safe_torch_load

logger = logging.getLogger(__name__)

#: seed of every evaluation attack (each batch reseeds it, so resumed runs give equal flags)
ATTACK_SEED = 0


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Per-sample (correctness, cross-entropy) of the model on (x, y), on the CPU."""
    flags, ces = [], []
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size])
        flags.append((out.argmax(1) == y[i:i + batch_size]).cpu())
        ces.append(F.cross_entropy(out.float(), y[i:i + batch_size], reduction="none").cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool), \
        torch.cat(ces) if ces else torch.zeros(0)


def predict_flags(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """Per-sample correctness of the model on (x, y)."""
    return predict(model, x, y, batch_size)[0]


def attack_points(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, *, clean: Tensor,
                  clean_ce: Tensor, batch_size: int = 256, loss: Optional[Objective] = None,
                  progress: bool = False, desc: str = "", partial: Optional[Path] = None,
                  save_every_s: float = 60.0,
                  stats: Optional[dict[str, Any]] = None) -> tuple[Tensor, Tensor]:
    """Attack the samples flagged in ``clean``; return per-sample (robust flags, CE at x').

    Samples not in ``clean`` are not attacked: robust False, CE = ``clean_ce``. The attack
    runs with the model's parameters frozen (:func:`attacks.base.input_grads_only`: no weight
    gradients, same x'). With
    ``partial``, progress is saved there and resumed from it (deleted when finished); the
    seconds spent before a resume go to ``stats["resumed_wall_s"]``.

    An attack made of components (:meth:`Attack.breakdown`, AutoAttack) adds
    ``stats["components"]`` (:func:`components_record`) and ``stats["first_broken_by"]``
    (int8 per sample: index of the component that first broke it, -1 none).
    """
    flags, ce = clean.clone(), clean_ce.clone().float()
    todo = torch.nonzero(clean).flatten()
    starts = list(range(0, len(todo), batch_size))
    first, t0, before = 0, time.monotonic(), 0.0
    last_save = t0
    parts: dict[str, Any] = {"names": None, "first": torch.full((len(clean),), -1,
                                                                 dtype=torch.int8)}
    if partial is not None and partial.exists():
        state = safe_torch_load(partial)
        if torch.equal(state["clean"], clean) and state["batch_size"] == batch_size:
            first, flags, ce = int(state["done"]), state["robust"], state["adv_ce"]
            before = float(state.get("wall_s", 0.0))
            if "components" in state:
                parts = state["components"]
            if stats is not None:
                stats["resumed_wall_s"] = before
            logger.info("resuming %s at batch %d/%d", desc or attack.name, first, len(starts))
    for b in tqdm(range(first, len(starts)), desc=desc or attack.name, leave=False,
                  disable=not progress, unit="batch", initial=first, total=len(starts)):
        follow_share()  # a sweep's job takes the cores of jobs that ended (benchmark.cores)
        idx = todo[starts[b]:starts[b] + batch_size]
        xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
        with input_grads_only(model):  # weight gradients are never needed here
            x_adv = attack(model, xb, yb, loss=loss)
        with torch.no_grad():
            out = model(x_adv)
            flags[idx] = (out.argmax(1) == yb).cpu()
            ce[idx] = F.cross_entropy(out.float(), yb, reduction="none").cpu()
        _add_breakdown(parts, attack.breakdown(), idx.cpu())
        if partial is not None and (b + 1 < len(starts)) and \
                time.monotonic() - last_save >= save_every_s:
            atomic_torch_save(partial, {"clean": clean, "batch_size": batch_size, "done": b + 1,
                                        "robust": flags, "adv_ce": ce,
                                        "wall_s": before + time.monotonic() - t0,
                                        **({"components": parts} if parts["names"] else {})})
            last_save = time.monotonic()
    if partial is not None:
        partial.unlink(missing_ok=True)
    if stats is not None and parts["names"]:
        stats["components"] = components_record(parts, clean)
        stats["first_broken_by"] = parts["first"]
    return flags, ce


def _add_breakdown(parts: dict[str, Any], rec: Optional[dict[str, Any]], idx: Tensor) -> None:
    """Merge one batch's :meth:`Attack.breakdown` into the evaluation's (``idx``: its points)."""
    if rec is None:
        return
    if parts["names"] is None:
        parts.update(names=list(rec["components"]), wall_s=[0.0] * len(rec["components"]),
                     cpu_s=[0.0] * len(rec["components"]))
    parts["first"][idx] = rec["first_broken_by"].to(torch.int8).cpu()
    for i in range(len(parts["names"])):
        parts["wall_s"][i] += float(rec["wall_s"][i])
        parts["cpu_s"][i] += float(rec["cpu_s"][i])


def components_record(parts: dict[str, Any], clean: Tensor) -> dict[str, Any]:
    """The row's ``components`` field: per component (in the order they ran) its wall and
    CPU seconds, the points it broke first, the points still robust after it, and
    ``first_broken_bits`` (hex bits over the row's points, as ``robust_bits``: bit i set iff
    this component was the first to break test point i; a point no component broke is in
    none), so that, e.g., the AutoAttack components that break the points PGD left robust
    are ``first_broken_bits[c] & pgd.robust_bits``."""
    from benchmark.eval.worstcase import to_hex
    first, left = parts["first"], int(clean.sum())
    out: dict[str, Any] = {"order": list(parts["names"]), "wall_s": {}, "cpu_s": {},
                           "broken": {}, "robust_after": {}, "first_broken_bits": {}}
    for i, name in enumerate(parts["names"]):
        hit = first == i
        left -= int(hit.sum())
        out["wall_s"][name] = round(parts["wall_s"][i], 3)
        out["cpu_s"][name] = round(parts["cpu_s"][i], 3)
        out["broken"][name] = int(hit.sum())
        out["robust_after"][name] = left
        out["first_broken_bits"][name] = to_hex(hit)
    return out


def robust_flags(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, *,
                 clean: Optional[Tensor] = None, batch_size: int = 256,
                 loss: Optional[Objective] = None, progress: bool = False,
                 desc: str = "") -> Tensor:
    """Per-sample robustness: True iff the sample is correct clean and under ``attack``."""
    pred, ce = predict(model, x, y, batch_size)
    return attack_points(model, attack, x, y, clean=pred if clean is None else clean,
                         clean_ce=ce, batch_size=batch_size, loss=loss, progress=progress,
                         desc=desc)[0]


def effective_n(spec: AttackSpec, profile: str, n_examples: Optional[int]) -> Optional[int]:
    """Test points for a spec: an explicit ``n_examples``, else the profile's default capped
    by the spec's cap for that profile (None = the whole test set)."""
    if n_examples is not None:
        return int(n_examples)
    n, cap = DEFAULT_N_EXAMPLES.get(profile), spec.caps.get(profile)
    return cap if n is None else n if cap is None else min(n, cap)


def eval_key(run_id: str, checkpoint: str, spec: AttackSpec, n_examples: Optional[int]) -> str:
    return stable_hash({"run_id": run_id, "checkpoint": checkpoint, **spec.key(),
                        "n_examples": -1 if n_examples is None else n_examples})


def adapt_spec(spec: AttackSpec, randomized: bool) -> AttackSpec:
    """AutoAttack's ``rand`` version for randomised defenses (every norm's AutoAttack)."""
    if randomized and spec.attack in ("autoattack", "autoattack-l2", "autoattack-l1") and \
            spec.hparams.get("version", "standard") == "standard":
        return spec.with_hparams(version="rand")
    return spec


#: prefixes of the test order whose accuracies every attack row records, so that a table can
#: show every column of a run on the same points as its AutoAttack column (cpu caps 100, 200)
PREFIXES = (100, 200, 500, 1000)


def prefix_stats(clean: Tensor, robust: Tensor, adv_ce: Tensor) -> dict[str, list[float]]:
    """``{"N": [clean_acc, robust_acc, adv_ce]}`` on the first N points, for each prefix N
    shorter than the evaluation."""
    return {str(n): [float(clean[:n].float().mean()), float(robust[:n].float().mean()),
                     float(adv_ce[:n].float().mean())] for n in PREFIXES if n < len(clean)}


def load_flags(run_dir: Path, key: str) -> dict[str, Tensor]:
    """The stored per-sample flags of one evaluation."""
    return safe_torch_load(Path(run_dir) / "flags" / f"{key}.pt")
