"""Training-health verdict of a run: did it diverge, did it train at all.

The verdict is a pure function of a run folder's ``config.json`` and ``train_log.jsonl`` (plus
the failure record a diverged run leaves), so it can be computed after the fact for runs
trained before this module existed (``advbench check``), and at the end of every training
(:func:`benchmark.run.train.train_run`). It is written as a row ``RUN/eval/health.json``
(``"kind": "health"``) that the report reads like every other row.

Verdicts:

* ``ok``: trained to its last epoch, every logged loss finite, above both thresholds.
* ``nan``: the loss became NaN or inf (training stopped, the last good checkpoint was kept);
  ``epoch`` and ``step`` say where.
* ``did-not-train``: the final training accuracy is within :data:`TRAIN_ACC_CHANCE_MARGIN` of
  chance (1/classes), or the final validation clean accuracy closes less than
  :data:`VAL_CLEAN_MIN_FRACTION` of the gap between chance and 100%.
* ``robust-above-clean``: in some validation epoch the PGD accuracy exceeds the clean accuracy
  by more than :data:`ROBUST_ABOVE_CLEAN_TOL` (Carlini et al. 2019's checklist: robust
  accuracy above clean means the attack made the model *more* accurate, i.e. it climbs the
  wrong way). Both are measured on the same validation points, so the excess is a count of
  points the attack turned from wrong to right, not sampling noise: a sound attack on CE leaves
  a misclassified point misclassified, up to a rare last-iterate flip of a point on the
  boundary. The tolerance, one percentage point (at least 2 points of the profiles'
  validation sets of 256 or more), allows such a flip; none of the 4,942 validation epochs
  logged by the repository's runs (2026-12-07) had any excess at all.
* ``incomplete``: no ``TRAINED`` marker and no failure record (still training, killed, or a
  divergence from before the failure record existed).

Thresholds (documented choices, measured against the committed cpu-profile runs): AT's final
training accuracy (on adversarial inputs) is 26% on CIFAR-10-JPEG and 58-62% on MNIST, the
runs that never left chance (OC, PCL) sit at 9.4-12%; a margin of 5 points over chance
separates them. Validation clean accuracy: AT reaches 43-47% on CIFAR-10-JPEG and 94-95% on
MNIST; a threshold at chance + 0.25·(1 − chance) (32.5% for 10 classes, 25.75% for 100)
leaves every defense that learned anything above it and flags models that are barely better
than guessing.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from benchmark.config import stable_hash
from benchmark.errors import TrainingError
from benchmark.store import atomic_write_json, code_version, now, read_json, read_jsonl

#: final training accuracy at most chance + this margin → did not train
TRAIN_ACC_CHANCE_MARGIN = 0.05
#: final validation clean accuracy below chance + this fraction of (1 − chance) → did not train
VAL_CLEAN_MIN_FRACTION = 0.25
#: validation PGD accuracy above validation clean accuracy by more than this → the attack
#: raised accuracy (robust-above-clean); 1e-9 absorbs the float rounding of logged shares
ROBUST_ABOVE_CLEAN_TOL = 0.01
#: file (under the run folder) of the health row
HEALTH_FILE = Path("eval") / "health.json"
#: file a diverged training leaves behind (epoch, step, loss)
FAILURE_FILE = "FAILED.json"


class DivergedError(TrainingError):
    """The loss became NaN or inf at ``epoch`` (1-based) and ``step`` (0-based batch index)."""

    def __init__(self, defense: str, epoch: int, step: Optional[int], loss: float,
                 kept: bool = True) -> None:
        where = f"epoch {epoch} step {step}" if step is not None else f"epoch {epoch}"
        super().__init__(f"{defense}: loss became {loss} at {where}; training stopped, "
                         f"{kept_note(kept)} (lower lr?)")
        self.defense, self.epoch, self.step, self.loss = defense, epoch, step, loss

    def without_checkpoint(self) -> "DivergedError":
        """The same error, saying that no checkpoint exists (it diverged in its first epoch)."""
        return DivergedError(self.defense, self.epoch, self.step, self.loss, kept=False)


def kept_note(kept: bool) -> str:
    """What a failed run leaves: the last good checkpoint, or (first epoch) none."""
    return "last good checkpoint kept" if kept else "no checkpoint was saved (it failed in " \
        "its first epoch)"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def robust_above_clean(log: Sequence[Mapping[str, Any]], val_size: Optional[int] = None
                       ) -> list[str]:
    """Findings (one sentence per epoch) where the validation PGD accuracy exceeds the
    validation clean accuracy by more than :data:`ROBUST_ABOVE_CLEAN_TOL`; ``val_size`` (the
    configured validation size, an upper bound when the profile capped it) sizes the count."""
    out = []
    for r in log:
        clean, robust = r.get("val_clean"), r.get("val_pgd")
        if not (_finite(clean) and _finite(robust)):
            continue
        excess = float(robust) - float(clean)
        if excess > ROBUST_ABOVE_CLEAN_TOL + 1e-9:
            count = f" (about {round(excess * val_size)} of the {val_size} points)" \
                if val_size else ""
            out.append(f"epoch {r.get('epoch')}: validation PGD accuracy {100 * robust:.1f}% "
                       f"exceeds validation clean accuracy {100 * clean:.1f}% by "
                       f"{100 * excess:.1f} points on the same points{count}: the attack "
                       f"made the model more accurate")
    return out


def health_verdict(config: Mapping[str, Any], log: Sequence[Mapping[str, Any]], *,
                   trained: bool, failure: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The verdict of one run from its config, its per-epoch log and its failure record.

    Args:
        config: the run's ``config.json`` (``data.num_classes`` gives chance).
        log: the ``train_log.jsonl`` records, one per finished epoch.
        trained: whether the run finished (``TRAINED`` exists).
        failure: the ``FAILED.json`` record of a diverged run, if any.

    Returns:
        ``verdict``, ``healthy``, ``reasons`` (sentences), the measured values and thresholds.
    """
    classes = int((config.get("data") or {}).get("num_classes") or 10)
    chance = 1.0 / classes
    train_min = chance + TRAIN_ACC_CHANCE_MARGIN
    val_min = chance + VAL_CLEAN_MIN_FRACTION * (1 - chance)
    last = log[-1] if log else {}
    val = [r for r in log if "val_clean" in r]
    out: dict[str, Any] = {
        "epochs_logged": len(log), "epochs": (config.get("hparams") or {}).get("epochs"),
        "train_acc": last.get("train_acc"), "val_clean": val[-1]["val_clean"] if val else None,
        "chance": chance, "train_acc_threshold": train_min, "val_clean_threshold": val_min,
        "epoch": None, "step": None}
    reasons: list[str] = []
    bad_log = [r for r in log if any(not _finite(r.get(k)) for k in ("loss", "train_acc")
                                     if k in r)]
    if failure is not None or bad_log:
        first = failure or {"epoch": bad_log[0].get("epoch"), "step": None,
                            "loss": bad_log[0].get("loss")}
        out.update(epoch=first.get("epoch"), step=first.get("step"))
        where = f"epoch {first.get('epoch')}" + (f" step {first['step']}"
                                                 if first.get("step") is not None else "")
        what = str(first.get("loss"))
        reasons.append(f"{what} at {where}" if what.startswith("non-finite")
                       else f"loss became {what} at {where}")
        verdict = "nan"
    elif not trained:
        reasons.append(f"training unfinished ({len(log)} of {out['epochs']} epochs logged, no "
                       f"TRAINED marker)")
        verdict = "incomplete"
    else:
        if _finite(out["train_acc"]) and out["train_acc"] <= train_min:
            reasons.append(f"final training accuracy {100 * out['train_acc']:.1f}% is within "
                           f"{100 * TRAIN_ACC_CHANCE_MARGIN:.0f} points of chance "
                           f"({100 * chance:.1f}%)")
        if _finite(out["val_clean"]) and out["val_clean"] < val_min:
            reasons.append(f"validation clean accuracy {100 * out['val_clean']:.1f}% is below "
                           f"{100 * val_min:.1f}%")
        size = (config.get("hparams") or {}).get("val_size")
        above = robust_above_clean(log, int(size) if _finite(size) else None)
        verdict = "did-not-train" if reasons else "robust-above-clean" if above else "ok"
        reasons += above
        out["robust_above_clean_tol"] = ROBUST_ABOVE_CLEAN_TOL
    out.update(verdict=verdict, healthy=verdict == "ok", reasons=reasons)
    return out


def health_row(run_dir: Path | str) -> dict[str, Any]:
    """The health row of a run folder (computed, not written)."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json")
    failure = read_json(run_dir / FAILURE_FILE) if (run_dir / FAILURE_FILE).exists() else None
    verdict = health_verdict(config, read_jsonl(run_dir / "train_log.jsonl"),
                             trained=(run_dir / "TRAINED").exists(), failure=failure)
    run_id = str(config.get("run_id") or run_dir.name)
    data = config.get("data") or {}
    return {"schema": 1, "kind": "health", "eval_key": "health-" + stable_hash(run_id),
            "run_id": run_id, "defense": config.get("defense"), "dataset": config.get("dataset"),
            "data_provenance": data.get("provenance"), "arch": config.get("arch"),
            "profile": config.get("profile"), "seed": config.get("seed"),
            "hparams": config.get("hparams"), **verdict,
            "git": config.get("git"), "eval_git": code_version(), "created": now()}


def write_health(run_dir: Path | str) -> dict[str, Any]:
    """Compute the health row of a run folder and write it to ``RUN/eval/health.json``."""
    row = health_row(run_dir)
    atomic_write_json(Path(run_dir) / HEALTH_FILE, row)
    return row


def record_failure(run_dir: Path | str, err: DivergedError) -> dict[str, Any]:
    """Leave the failure record of a diverged run and write its health row."""
    return record_nonfinite(run_dir, err.epoch, err.step, str(err.loss))


def record_nonfinite(run_dir: Path | str, epoch: int, step: Optional[int], loss: str
                     ) -> dict[str, Any]:
    """Leave the failure record of a run stopped by NaN/inf (a loss, or weights/outputs, then
    ``loss`` says so) and write its health row (verdict ``nan``)."""
    atomic_write_json(Path(run_dir) / FAILURE_FILE, {"epoch": epoch, "step": step,
                                                     "loss": loss, "created": now()})
    return write_health(run_dir)
