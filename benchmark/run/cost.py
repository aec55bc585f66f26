"""Training cost of a run as a result row: CPU-seconds per epoch, passes per sample, peak memory.

One ``"kind": "cost"`` row per trained run folder, built from what training recorded:

* ``epoch_cpu_s``: mean CPU-seconds of the training process per epoch (``train_log.jsonl``
  ``cpu_s``, ``time.process_time``: every thread of the process, the validation pass after an
  epoch not included), with ``torch_threads`` (the thread count it ran on). This is what the
  tables show: it measures the defense, not the machine's load. Absent for runs logged
  before it existed (the table cell is then empty with the reason);
* ``epoch_s``: mean wall seconds of a training epoch (``epoch_s``), kept for the record only:
  on a shared machine it measures the load as much as the defense;
* ``passes_per_sample``: forward+backward passes per training sample per epoch, from the
  defense's declaration (:meth:`defenses.base.Defense.passes_per_sample`: k+1 for PGD-k AT,
  k+2 for TRADES-style losses, 1 for clean training), checked against a counter in the tests;
* ``peak_mem_mb``: the largest ``peak_mem_mb`` of the log (CUDA max allocated on a GPU, max RSS
  of the process on a CPU); absent for runs made before training logged it.

A defense that needs helper runs (HAT's ``st``) adds their cost: seconds per epoch and passes
add up (the helper trains for the same epochs on the same samples), peak memory is the larger
one. A missing helper leaves ``helpers_missing`` in the row and the helper's share out.

The rows live next to the attack rows in ``rows.jsonl`` (``eval_key`` ``cost-<run_id>``), so a
report rebuilt from ``rows.jsonl`` shows the same cost columns as one built from run folders.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from benchmark.store import RunStore, read_json, read_jsonl

logger = logging.getLogger(__name__)
COST_SCHEMA = 1


def _log_cost(run_dir: Path) -> dict[str, Optional[float]]:
    log = read_jsonl(run_dir / "train_log.jsonl")
    secs = [float(r["epoch_s"]) for r in log if isinstance(r.get("epoch_s"), (int, float))]
    mems = [float(r["peak_mem_mb"]) for r in log
            if isinstance(r.get("peak_mem_mb"), (int, float)) and math.isfinite(r["peak_mem_mb"])]
    cpu = [float(r["cpu_s"]) for r in log if isinstance(r.get("cpu_s"), (int, float))]
    threads = sorted({int(r["torch_threads"]) for r in log
                      if isinstance(r.get("torch_threads"), int)})
    return {"epoch_s": round(sum(secs) / len(secs), 3) if secs else None,
            # only when every epoch logged it: a mean over part of the epochs is not the run's
            "epoch_cpu_s": round(sum(cpu) / len(cpu), 3) if cpu and len(cpu) == len(log)
            else None, "torch_threads": threads[0] if len(threads) == 1 else threads or None,
            "peak_mem_mb": max(mems) if mems else None, "epochs_logged": len(log)}


def _passes(config: dict[str, Any]) -> Optional[float]:
    from attacks.base import Norm, ThreatModel
    from defenses import DEFENSES

    try:
        cls = DEFENSES.get(config["defense"])
        hp = config.get("hparams") or {}
        defense = cls(hp, threat=ThreatModel(Norm.LINF, float(hp.get("eps", 0.0))),
                      num_classes=int((config.get("data") or {}).get("num_classes", 10)))
        passes = float(defense.passes_per_sample())  # PCL: epoch mean over its two stages
        return int(passes) if passes.is_integer() else round(passes, 2)
    except Exception as exc:  # an unknown plugin or an old config: no declared cost
        logger.warning("no declared cost for %s: %s", config.get("defense"), exc)
        return None


def cost_row(run_dir: Path | str, root: Optional[Path | str] = None) -> Optional[dict[str, Any]]:
    """The cost row of one run folder, or None when it has no config or no training log.

    Args:
        run_dir: ``<root>/<dataset>/<defense>/<run_id>``.
        root: where helper runs are looked up (default: three levels above ``run_dir``).
    """
    from defenses import DEFENSES

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "train_log.jsonl").is_file():
        return None
    config = read_json(run_dir / "config.json")
    cost = _log_cost(run_dir)
    passes = _passes(config)
    row: dict[str, Any] = {
        "schema": COST_SCHEMA, "kind": "cost", "eval_key": f"cost-{run_dir.name}",
        "run_id": run_dir.name, "defense": config.get("defense"), "dataset": config.get("dataset"),
        "data_provenance": (config.get("data") or {}).get("provenance"),
        "arch": config.get("arch"), "profile": config.get("profile"), "seed": config.get("seed"),
        "hparams": config.get("hparams"), "device": (config.get("env") or {}).get("device"),
        "epochs_logged": cost["epochs_logged"], "epoch_s": cost["epoch_s"],
        "epoch_cpu_s": cost["epoch_cpu_s"], "torch_threads": cost["torch_threads"],
        "passes_per_sample": passes, "peak_mem_mb": cost["peak_mem_mb"], "helpers": [],
    }
    try:
        requires = tuple(DEFENSES.get(str(config.get("defense"))).requires)
    except Exception:
        requires = ()
    store = RunStore(Path(root) if root else run_dir.parent.parent.parent)
    for req in requires:
        helper_dir = _helper_dir(store, req, config)
        helper = cost_row(helper_dir, store.root) if helper_dir is not None else None
        if helper is None:
            row.setdefault("helpers_missing", []).append(req)
            continue
        row["helpers"].append({"defense": req, "run_id": helper["run_id"],
                               **{k: helper[k] for k in ("epoch_s", "epoch_cpu_s",
                                                         "passes_per_sample", "peak_mem_mb")}})
        if helper["epoch_cpu_s"] is None and row["epoch_cpu_s"] is not None:
            row["cpu_s_missing_in"] = f"its `{req}` helper run {helper['run_id']}"
        for key in ("epoch_s", "epoch_cpu_s", "passes_per_sample"):
            row[key] = None if row[key] is None or helper[key] is None else \
                round(row[key] + helper[key], 3)
        if helper["peak_mem_mb"] is not None and row["peak_mem_mb"] is not None:
            row["peak_mem_mb"] = max(row["peak_mem_mb"], helper["peak_mem_mb"])
    return row


def _helper_dir(store: RunStore, req: str, config: dict[str, Any]) -> Optional[Path]:
    """The helper run that training used: the key :func:`helper_config` gives today, else (a run
    made under an older protocol version) the ``req`` run with the same dataset, arch,
    profile, seed, protocol version and protocol hyperparameters (those the helper defense does
    not set itself, such as ``st``'s ``select_by``)."""
    from benchmark.config import PROFILES, RunConfig
    from benchmark.run.resolve import helper_config

    cfg = RunConfig.from_dict(config)
    try:
        today = store.run_dir(helper_config(req, cfg, (config.get("data") or {}).get("scale")))
        if today.is_dir():
            return today
    except Exception:  # an unknown profile or dataset in an old config
        pass
    from defenses import DEFENSES

    keys = set(PROFILES.get(cfg.profile, {})) - set(DEFENSES.get(req).default_hparams)
    for d in store.runs():
        if d.parent.name != req or d.parent.parent.name != cfg.dataset:
            continue
        other = read_json(d / "config.json")
        if all(other.get(k) == config.get(k) for k in ("arch", "profile", "seed",
                                                        "protocol_version")) and \
                all((other.get("hparams") or {}).get(k) == (config.get("hparams") or {}).get(k)
                    for k in keys):
            return d
    return None


def cost_rows(root: Path | str) -> list[dict[str, Any]]:
    """Cost rows of every run folder under ``root`` that has a training log."""
    rows = [cost_row(d, root) for d in RunStore(root).runs()]
    return [r for r in rows if r is not None]
