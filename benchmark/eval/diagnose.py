"""Why does PGD overstate a model? Saturation, loss choice and AutoAttack's components.

``advbench diagnose`` (issue 28) measures, on one checkpoint and its first ``n`` test points:

* **Scale and saturation** at x and at x' (the protocol's PGD-40 on cross-entropy): the
  median of max |z|, of the max softmax, of the margin z_y − max_{k≠y} z_k and of the feature
  norm ‖f‖ (Adv-DPNP's logits are f·Cᵀ/α with ‖c‖ = α, so they grow with ‖f‖), the share of
  points whose max softmax exceeds 0.99, and the share whose CE input gradient is exactly 0
  (the only case in which a sign-gradient PGD cannot move).
* **The evaluation attack's loss**: the protocol's PGD column (ε, steps, step size, start)
  maximising CE, the margin ``max_{k≠y} z_k − z_y`` and the DLR loss; robust accuracy of each
  and of their per-sample worst case.
* **The training attack's loss**, on the same training batches: the run's training attack
  (its steps, step size and start, at the full training ε) with CE, margin and DLR; the share
  of the batches it misclassifies (its success rate). If a CE training attack is weakened by
  saturation, the scale-free ones succeed more often on the same inputs.
* **AutoAttack's components** (pyautoattack, standard settings), each run alone on the points
  that PGD-40 (CE) left robust: how many each breaks, and which one breaks each point first in
  AutoAttack's order (APGD-CE, APGD-T, FAB-T, Square).
* **Learning curve**: the run's per-epoch log (clean and PGD validation accuracy, loss parts).

Results go to ``RUN/diagnose/<key>.json`` (key: the hash of checkpoint file digest and
settings, so a replaced checkpoint is measured again) and are reused while that holds.

Example::

    advbench diagnose --run runs/mnist/adv-dpnp/92ca2c29bbd7 --run runs/mnist/at/1317a84706bb \\
        --n-examples 100 --data-dir /work/data
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import ThreatModel
from attacks.objectives import OBJECTIVES, margin_gap
from benchmark.config import stable_hash
from benchmark.eval.features import _test_points
from benchmark.eval.flags import predict
from benchmark.eval.target import Target, check_model, file_sha256, open_target
from benchmark.store import atomic_write_json, read_json

logger = logging.getLogger(__name__)

#: AutoAttack's standard order (the cascade's), used for "first breaker"
AA_ORDER = ("apgd-ce", "apgd-t", "fab-t", "square")
#: version of this measurement's layout and rules
DIAGNOSE_VERSION = 1


def _median(v: Tensor) -> float:
    return float(v.float().median()) if v.numel() else float("nan")


@torch.no_grad()
def scale_stats(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Medians of max |z|, max softmax, margin z_y − max_{k≠y} z_k and ‖f‖; the share of
    points with max softmax > 0.99."""
    logits = model(x).float()
    prob = logits.softmax(1).amax(1)
    out = {"max_abs_logit": _median(logits.abs().amax(1)), "max_softmax": _median(prob),
           "margin": _median(-margin_gap(logits, y)),
           "share_softmax_gt_099": float((prob > 0.99).float().mean())}
    if hasattr(model, "features"):
        out["feature_norm"] = _median(model.features(x).float().norm(dim=1))
    return out


def zero_gradient_share(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Share of points whose CE input gradient is exactly 0, and the median gradient l1 norm."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    norms = grad.flatten(1).abs().sum(1)
    return {"share_zero_grad": float((norms == 0).float().mean()),
            "grad_l1": _median(norms)}


def _robust(model: nn.Module, attack: Any, x: Tensor, y: Tensor, loss: Any, clean: Tensor
            ) -> tuple[Tensor, Tensor]:
    """(robust flags, x') of ``attack`` maximising ``loss``; x' = x where ``clean`` is False."""
    x_adv = x.clone()
    if bool(clean.any()):
        x_adv[clean] = attack(model, x[clean], y[clean], loss=loss)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y) & clean, x_adv


def loss_comparison(model: nn.Module, attack: Any, x: Tensor, y: Tensor
                    ) -> tuple[dict[str, float], dict[str, Tensor], Tensor]:
    """Robust accuracy of ``attack`` maximising CE, margin and DLR, and of their worst case.

    Returns:
        accuracies by loss (``worst`` included), robust flags by loss, and CE's x'.
    """
    flags, x_ce = {}, x
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    for name, objective in OBJECTIVES.items():
        flags[name], x_adv = _robust(model, attack, x, y, objective, clean)
        if name == "ce":
            x_ce = x_adv
    flags["worst"] = torch.stack(list(flags.values())).all(0)
    return {k: float(v.float().mean()) for k, v in flags.items()}, flags, x_ce


def training_attack_success(t: Target, x: Tensor, y: Tensor, batch_size: int
                            ) -> dict[str, Any]:
    """Success rate (share misclassified at x') of the run's training attack with each loss,
    on the same training batches, at the full training ε."""
    defense = t.defense
    attack = defense.attack_for_training() if defense.uses_training_attack else None
    if attack is None:
        return {"skipped": f"{t.cfg.defense} trains without a training attack"}
    attack = type(attack)(ThreatModel(attack.threat.norm, float(t.cfg.hparams["eps"])),
                          seed=0, **attack.hparams)
    out: dict[str, Any] = {"n": int(len(y)), "configured": str(
        t.cfg.hparams.get("train_attack_loss", "ce")), "attack": attack.record()}
    with torch.no_grad():
        out["clean_error"] = float(sum(int((t.model(x[i:i + batch_size]).argmax(1)
                                            != y[i:i + batch_size]).sum())
                                       for i in range(0, len(y), batch_size)) / max(len(y), 1))
    for name, objective in OBJECTIVES.items():
        wrong = 0
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_adv = attack(t.model, xb, yb, loss=objective)
            with torch.no_grad():
                wrong += int((t.model(x_adv).argmax(1) != yb).sum())
        out[f"success_{name}"] = wrong / max(len(y), 1)
    return out


def aa_components(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str,
                  seed: int = 0) -> dict[str, Any]:
    """Each AutoAttack component (standard settings) run alone on (x, y): the points it breaks
    and the first breaker of each point in AutoAttack's order."""
    from pyautoattack import AutoAttack as _AA

    n = int(len(y))
    out: dict[str, Any] = {"n": n, "broken": {}, "first": {}, "seconds": {}}
    if n == 0:
        return out
    broken: dict[str, Tensor] = {}
    for name in AA_ORDER:
        t0 = time.process_time()
        aa = _AA(model, norm={"linf": "Linf", "l2": "L2", "l1": "L1"}[norm], eps=eps,
                 version="standard", seed=seed, device=x.device)
        aa.attacks_to_run = [name]
        with torch.random.fork_rng(devices=[]):
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=n)
        with torch.no_grad():
            broken[name] = (model(x_adv).argmax(1) != y).cpu()
        out["broken"][name] = int(broken[name].sum())
        out["seconds"][name] = round(time.process_time() - t0, 1)
    left = torch.ones(n, dtype=torch.bool)
    for name in AA_ORDER:
        out["first"][name] = int((broken[name] & left).sum())
        left &= ~broken[name]
    out["unbroken"] = int(left.sum())
    out["broken_mask"] = {k: [int(i) for i in torch.nonzero(v).flatten()] for k, v in
                          broken.items()}
    return out


def learning_curve(run_dir: Path) -> list[dict[str, Any]]:
    """The run's per-epoch log lines (accuracies and loss parts), as logged by training."""
    from benchmark.run.train import train_log

    keep = ("epoch", "lr", "eps_scale", "train_acc", "val_clean", "val_pgd", "loss", "ce_adv",
            "dpp_clean", "dpp_adv", "dfa", "dnp", "cpu_s")
    return [{k: line[k] for k in keep if k in line} for line in train_log(run_dir)]


def diagnose_run(run_dir: Path | str, *, checkpoint: str = "best", n_examples: int = 100,
                 train_points: int = 512, components: bool = True, device: str = "cpu",
                 data_dir: Optional[Path | str] = None, batch_size: int = 128,
                 force: bool = False) -> dict[str, Any]:
    """Every measurement of the module docstring for one run (cached in ``RUN/diagnose``).

    Args:
        run_dir: a trained run folder.
        checkpoint: ``best`` or ``last``.
        n_examples: the first ``n`` test points (those ``advbench evaluate`` attacks).
        train_points: training points for the training-attack comparison (0: skip).
        components: run AutoAttack's components on the PGD-robust points.
        device: torch device.
        data_dir: dataset root.
        batch_size: attack batch size.
        force: recompute even if a stored result matches.
    """
    run_dir = Path(run_dir)
    t = open_target(run_dir, checkpoint, device=device)
    settings = {"version": DIAGNOSE_VERSION, "checkpoint_sha256": file_sha256(t.ckpt_path),
                "n_examples": n_examples, "train_points": train_points,
                "components": components}
    path = run_dir / "diagnose" / f"{stable_hash(settings)}.json"
    if path.is_file() and not path.is_symlink() and not force:
        stored = read_json(path)
        if isinstance(stored, dict) and {k: stored.get(k) for k in settings} == settings:
            return stored
    t0 = time.process_time()
    data = t.test_data(data_dir=data_dir)
    x, y = _test_points(t, data, None, n_examples)
    check_model(t.model, x[:8], randomized=t.defense.randomized)
    from benchmark.eval.features import adversarial_spec

    spec = adversarial_spec(t.info.scale, "pgd")
    attack = spec.build(seed=0)
    accs, flags, x_ce = loss_comparison(t.model, attack, x, y)
    clean, _ = predict(t.model, x, y)
    out: dict[str, Any] = {
        **settings, "run_id": t.cfg.run_id, "defense": t.cfg.defense, "arch": t.cfg.arch,
        "dataset": t.cfg.dataset, "seed": t.cfg.seed, "checkpoint": t.checkpoint,
        "checkpoint_epoch": t.epoch, "hparams": t.cfg.hparams, "eval_attack": spec.record(),
        "clean": float(clean.float().mean()), "pgd_by_loss": accs,
        "scale_clean": {**scale_stats(t.model, x, y), **zero_gradient_share(t.model, x, y)},
        "scale_adv": {**scale_stats(t.model, x_ce, y), **zero_gradient_share(t.model, x_ce, y)},
    }
    if train_points > 0:
        tr = data.train
        idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))[:train_points]
        xt, yt = tr.subset(idx).floats(t.device)
        out["training_attack"] = training_attack_success(t, xt, yt, batch_size)
    if components:
        robust = flags["ce"].to(x.device)
        out["aa_components"] = aa_components(t.model, x[robust], y[robust], spec.eps, spec.norm)
        out["aa_components"]["of"] = "points PGD-40 (CE) left robust"
    out["learning_curve"] = learning_curve(run_dir)
    out["cpu_s"] = round(time.process_time() - t0, 1)
    atomic_write_json(path, out)
    return out


def format_diagnoses(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown tables: scale and saturation, PGD by loss, training attack, AA components."""
    def pct(v: Any) -> str:
        return "" if v is None else f"{100 * float(v):.1f}"

    lines = ["| run | defense | clean | PGD CE | PGD margin | PGD DLR | worst | "
             "max abs z x / x' | max softmax x / x' | >0.99 x / x' | ‖f‖ x / x' | zero grad x' |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        a, c, d = r["pgd_by_loss"], r["scale_clean"], r["scale_adv"]
        fn = (f"{c['feature_norm']:.1f} / {d['feature_norm']:.1f}"
              if "feature_norm" in c else "")
        lines.append(f"| {r['run_id']} | {r['defense']} | {pct(r['clean'])} | {pct(a['ce'])} | "
                     f"{pct(a['margin'])} | {pct(a['dlr'])} | {pct(a['worst'])} | "
                     f"{c['max_abs_logit']:.2f} / {d['max_abs_logit']:.2f} | "
                     f"{c['max_softmax']:.3f} / {d['max_softmax']:.3f} | "
                     f"{pct(c['share_softmax_gt_099'])} / {pct(d['share_softmax_gt_099'])} | "
                     f"{fn} | {pct(d['share_zero_grad'])} |")
    lines += ["", "| run | defense | training attack | n | clean error | success CE | "
              "success margin | success DLR |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ta = r.get("training_attack") or {}
        if "n" in ta:
            h = ta["attack"].get("attack_hparams", {})
            lines.append(f"| {r['run_id']} | {r['defense']} | PGD-{h.get('steps')} step "
                         f"{h.get('step_size')} ({ta['configured']}) | {ta['n']} | "
                         f"{pct(ta['clean_error'])} | {pct(ta['success_ce'])} | "
                         f"{pct(ta['success_margin'])} | {pct(ta['success_dlr'])} |")
    lines += ["", "| run | defense | PGD-robust points | " + " | ".join(
        f"{n} breaks (first)" for n in AA_ORDER) + " | none breaks |",
        "|---|---|---:|" + "---:|" * (len(AA_ORDER) + 1)]
    for r in results:
        aa = r.get("aa_components")
        if aa:
            cells = " | ".join(f"{aa['broken'].get(n, 0)} ({aa['first'].get(n, 0)})"
                               for n in AA_ORDER)
            lines.append(f"| {r['run_id']} | {r['defense']} | {aa['n']} | {cells} | "
                         f"{aa.get('unbroken', 0)} |")
    return "\n".join(lines)
