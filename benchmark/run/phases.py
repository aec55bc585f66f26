"""Where a sweep's time goes: per job, training, validation, each attack, the checks, the rest.

:func:`benchmark.sweep.run_job` measures its own phases (wall seconds and CPU-seconds of the
job's process, all its threads) and writes them to ``RUN_DIR/phases.json`` (this invocation
only: a rerun that reuses everything shows only the time it took to find that out).
Training and validation come from the epochs this invocation trained (``train_log.jsonl``:
``epoch_s``/``cpu_s`` and ``val_s``/``val_cpu_s``), each attack from the rows this
invocation wrote (``wall_s``/``cpu_s``), and ``other`` is the rest of the job (data, model,
checkpoints, start-up). ``advbench run`` prints :func:`format_phases` at the end.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from benchmark.store import atomic_write_json, read_json, read_jsonl


class Phases:
    """Collects the phases of one job."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.items: list[dict[str, Any]] = []

    def add(self, phase: str, wall: float, cpu: Optional[float]) -> None:
        for it in self.items:  # e.g. the same attack on two checkpoints
            if it["phase"] == phase:
                it["wall_s"] += wall
                it["cpu_s"] = None if cpu is None or it["cpu_s"] is None else it["cpu_s"] + cpu
                return
        self.items.append({"phase": phase, "wall_s": wall, "cpu_s": cpu})

    def training(self, log: Path, skip: int) -> None:
        """Training and validation of the epochs logged after the first ``skip`` lines."""
        lines = read_jsonl(log)[skip:] if log.exists() else []
        if lines:
            self.add("training", sum(float(r.get("epoch_s", 0)) for r in lines),
                     _sum(lines, "cpu_s"))
            self.add("validation", sum(float(r.get("val_s", 0)) for r in lines),
                     _sum(lines, "val_cpu_s"))

    def attacks(self, rows: Sequence[Mapping[str, Any]], since: str) -> None:
        """One phase per attack row written at or after ``since`` (``created``)."""
        for r in rows:
            if str(r.get("created", "")) >= since and "wall_s" in r:
                kind = "" if r.get("kind", "attack") == "attack" else f" ({r['kind']})"
                self.add(f"attack {r['attack']}@{r.get('eps_str')}{kind}", float(r["wall_s"]),
                         r.get("cpu_s"))

    def write(self, run_dir: Path) -> dict[str, Any]:
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        known = sum(it["wall_s"] for it in self.items)
        known_cpu = sum(it["cpu_s"] or 0.0 for it in self.items)
        items = [*self.items, {"phase": "other (data, model, checkpoints, start-up)",
                               "wall_s": max(wall - known, 0.0),
                               "cpu_s": max(cpu - known_cpu, 0.0)}]
        out = {"job_wall_s": round(wall, 3), "job_cpu_s": round(cpu, 3),
               "phases": [{**it, "wall_s": round(it["wall_s"], 3),
                           "cpu_s": None if it["cpu_s"] is None else round(it["cpu_s"], 3)}
                          for it in items]}
        atomic_write_json(run_dir / "phases.json", out)
        return out


def _sum(lines: Sequence[Mapping[str, Any]], key: str) -> Optional[float]:
    vals = [r.get(key) for r in lines]
    return None if any(v is None for v in vals) else float(sum(vals))


def format_phases(runs: Sequence[tuple[str, Path]], sweep_wall: float,
                  report_s: float) -> str:
    """The breakdown table of a sweep: one block per job (``(label, run folder)``)."""
    lines = ["| job | phase | wall (s) | CPU (s) |", "|---|---|---:|---:|"]
    for label, run_dir in runs:
        path = Path(run_dir) / "phases.json"
        if not path.exists():
            lines.append(f"| {label} | (no phases.json: job not run here) | – | – |")
            continue
        rec = read_json(path)
        for it in rec["phases"]:
            cpu = "–" if it.get("cpu_s") is None else f"{it['cpu_s']:.1f}"
            lines.append(f"| {label} | {it['phase']} | {it['wall_s']:.1f} | {cpu} |")
        lines.append(f"| {label} | **job total** | {rec['job_wall_s']:.1f} | "
                     f"{rec['job_cpu_s']:.1f} |")
    lines.append(f"| sweep | report (tables) | {report_s:.1f} | – |")
    lines.append(f"| sweep | **wall time** (jobs side by side) | {sweep_wall:.1f} | – |")
    return "\n".join(lines) + "\n"
