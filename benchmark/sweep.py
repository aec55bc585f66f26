"""``advbench run`` as one library call: configs → jobs → a launcher → rows → report.

The orchestration sits above the three layers it joins (``benchmark.run`` trains,
``benchmark.eval`` evaluates, ``benchmark.report`` renders), so none of them imports another
layer above it: the launchers in :mod:`benchmark.run.launch` receive :func:`run_job` as their
worker (DomainBed's ``command_launchers`` pattern), and the ``local`` launcher starts
``python -m benchmark.sweep JOB_JSON`` for each job.

Example::

    from benchmark.sweep import sweep
    result = sweep("st,at", "mnist5k", profile="cpu", runs_dir="runs")
    print(result.tables[0])
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from benchmark.config import parse_seeds
from benchmark.run.resolve import sweep_configs
from benchmark.data import Data, dataset_scale, load_dataset
from benchmark.device import default_eval_batch_size
from benchmark.errors import UsageError
from benchmark.eval.checks import check_run
from benchmark.eval.evaluate import evaluate_run, expected_keys
from benchmark.run.cost import cost_row
from benchmark.run.protocols import resolve_specs
from benchmark.run import distributed
from benchmark.run.launch import Job, choose_launcher, launch, plan
from benchmark.run.phases import Phases
from benchmark.run.train import train_run
from benchmark.store import RunStore, now, read_json, read_jsonl, read_row

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _dataset(name: str, data_dir: Optional[str], download: bool) -> Data:
    """The sweep's dataset, loaded once per process (in-process jobs share it)."""
    return load_dataset(name, data_dir, download=download)


def run_job(job: Job) -> str:
    """Train one run (or resume it) and evaluate it; the worker of every launcher.

    Every DDP rank calls this; rank 0 evaluates. Returns the run folder.
    """
    if job.gpus > 1 and "SUBMITIT_EXECUTOR" in os.environ and distributed.env_world_size() <= 1:
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    cfg = job.cfg
    phases, since = Phases(), now()
    data = _dataset(cfg.dataset, job.data_dir, job.download)
    log = job.run_dir() / "train_log.jsonl"
    skip = len(read_jsonl(log)) if log.exists() else 0
    with distributed.process_group(job.device) as env:
        run_dir = train_run(cfg, data, RunStore(job.runs_dir), device=job.device,
                            progress=job.progress)
    if not env.is_main:
        return str(run_dir)
    phases.training(Path(run_dir) / "train_log.jsonl", skip)
    if job.evaluate:
        specs = resolve_specs(job.attacks, data.info.scale, suite=job.suite)
        batch = job.batch_size or default_eval_batch_size(job.device, cfg.arch)
        for which in job.checkpoints:
            phases.attacks(evaluate_run(run_dir, specs, checkpoint=which,
                                        n_examples=job.n_examples, device=job.device,
                                        batch_size=batch, data=data, progress=job.progress),
                           since)
            t0, c0 = time.perf_counter(), time.process_time()
            check_run(run_dir, cheap=True, checkpoint=which, n_examples=job.n_examples,
                      device=job.device, batch_size=batch, data=data)  # the cheap verdicts
            phases.add("checks (cheap)", time.perf_counter() - t0, time.process_time() - c0)
    phases.write(Path(run_dir))
    return str(run_dir)


def collect_rows(jobs: Sequence[Job], scale: str) -> list[dict[str, Any]]:
    """The result rows the evaluated jobs were asked for, read from their run folders."""
    rows = []
    for job in jobs:
        if not job.evaluate:
            continue
        specs = resolve_specs(job.attacks, scale, suite=job.suite)
        for key in expected_keys(job.cfg, job.checkpoints, specs, job.n_examples):
            row = read_row(job.run_dir() / "eval" / f"{key}.json")
            if row is not None:
                rows.append(row)
        verdicts = sorted((job.run_dir() / "eval").glob("check-*.json"))  # advbench check rows
        rows += [read_json(p) for p in [job.run_dir() / "eval" / "health.json", *verdicts]
                 if p.exists()]
        # the per-sample worst case of the attacks above (and of the checks'): the table's
        # Headline column, which the printed table showed empty ("no headline row")
        for p in sorted((job.run_dir() / "eval").glob("headline-*.json")):
            row = read_row(p)
            if row is not None and row.get("checkpoint") in job.checkpoints:
                rows.append(row)
        cost = cost_row(job.run_dir(), job.run_dir().parents[2])  # the cost columns
        if cost is not None:
            rows.append(cost)
    return rows


@dataclass
class SweepResult:
    """What :func:`sweep` did.

    Attributes:
        configs: the asked-for runs, in sweep order.
        states: job state of each of them before the sweep (``new``, ``partial``, ...).
        jobs: the planned jobs (required runs first).
        launcher: the launcher used (``auto`` resolved), or ``dry-run``.
        rows: the result rows of the asked-for runs.
        tables: the Markdown of every table written.
        out_dir: the report folder.
        wall_s: seconds the sweep took.
        phases: the time breakdown per job (:func:`benchmark.run.phases.format_phases`).
    """

    configs: list[Any]
    states: list[str]
    jobs: list[Job]
    launcher: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    phases: str = ""
    tables: list[str] = field(default_factory=list)
    out_dir: Optional[Path] = None
    wall_s: float = 0.0

    def counts(self) -> str:
        """``N jobs: a done, b partial, c trained, d new`` (the asked-for runs)."""
        n = {s: self.states.count(s) for s in ("done", "partial", "trained", "new")}
        return f"{len(self.states)} jobs: " + ", ".join(f"{v} {k}" for k, v in n.items())

    def _job(self, cfg: Any) -> Job:
        return next(j for j in self.jobs if j.cfg.run_id == cfg.run_id)

    def listing(self) -> list[str]:
        """One line per job: state, defense, seed, folder (``--dry-run``)."""
        lines = []
        for cfg, st, job in zip(self.configs, self.states, [self._job(c) for c in self.configs]):
            lines.append(f"{st:8s} {cfg.defense:10s} seed {cfg.seed}  {job.run_dir()}")
        for job in self.jobs:
            if not job.evaluate:
                users = ", ".join(j.cfg.defense for j in self.jobs if job.cfg.run_id in j.needs)
                lines.append(f"{RunStore.state(job.run_dir()).value:8s} {job.cfg.defense:10s} "
                             f"seed {job.cfg.seed}  {job.run_dir()}  (required by {users}; "
                             f"trained, not evaluated)")
        return lines


def sweep(defenses: str, dataset: str, *, arch: Optional[str] = None, profile: str = "cpu",
          seeds: str = "0", hparams: Optional[str] = None, runs_dir: str = "runs",
          data_dir: Optional[str] = None, download: bool = False, device: str = "auto",
          progress: bool = True, attacks: Optional[str] = None, suite: Optional[str] = None,
          n_examples: Optional[int] = None, checkpoints: str = "best",
          batch_size: Optional[int] = None, out: Optional[str] = None, force: bool = False,
          dry_run: bool = False, launcher: str = "auto", parallel: Optional[int] = None,
          gpus_per_job: int = 1, cluster: Optional[str] = None,
          executor_params: Optional[str] = None, share_cores: bool = False,
          on_plan: Optional[Callable[[SweepResult], None]] = None) -> SweepResult:
    """Train every missing run of the sweep, evaluate it, and write the report.

    Arguments are those of ``advbench run``. ``on_plan`` is called with the planned result
    before anything runs (the CLI prints the job counts there).

    Raises:
        UsageError: bad names, options or JSON.
        AdvbenchError: some jobs failed (the others' work is kept).
    """
    from defenses import DEFENSES, catalog

    t0 = time.perf_counter()
    names = DEFENSES.resolve(defenses)
    scale = dataset_scale(dataset, data_dir)
    cfgs = sweep_configs(names, dataset, profile=profile, arch=arch, seeds=parse_seeds(seeds),
                         hparams=hparams, scale=scale)
    specs = resolve_specs(attacks, scale, suite=suite)
    which = tuple(c.strip() for c in checkpoints.split(",") if c.strip())
    if not which or not set(which) <= {"best", "last"}:
        raise UsageError(f"--checkpoints takes best and/or last, got {checkpoints!r}")
    params = _json_object(executor_params, "--executor-params")
    store = RunStore(runs_dir)
    states = [store.state(store.run_dir(c), expected_keys(c, which, specs, n_examples)).value
              for c in cfgs]
    jobs = plan(cfgs, scale, runs_dir=runs_dir, data_dir=data_dir, download=download,
                attacks=attacks, suite=suite, checkpoints=which, n_examples=n_examples,
                batch_size=batch_size, device=device, gpus=gpus_per_job)
    result = SweepResult(cfgs, states, jobs, "dry-run" if dry_run else launcher)
    if on_plan is not None:
        on_plan(result)
    if dry_run:
        return result
    if launcher == "auto":
        launcher, extra = choose_launcher(jobs, device, parallel)
        parallel = extra.get("parallel", parallel)
    if launcher in ("serial", "local"):  # this machine: fail on missing data here, once
        _dataset(dataset, data_dir, download)
    result.launcher = launcher
    if force:
        for job in jobs:
            if job.evaluate and job.run_dir().exists():
                shutil.rmtree(job.run_dir())
    if launcher == "serial":
        jobs = [replace(job, progress=progress) for job in jobs]
        kwargs: dict[str, Any] = {}
    elif launcher == "local":  # share_cores: running jobs take freed cores (benchmark.cores)
        kwargs = {"parallel": parallel, "share_cores": share_cores}
    else:
        kwargs = {"folder": Path(runs_dir) / ".submitit", "cluster": cluster, "parameters": params}
    logger.info("%d jobs via %s%s", len(jobs), launcher,
                f" ({parallel} at a time)" if launcher == "local" and parallel else "")
    launch(jobs, run_job, launcher, **kwargs)
    from benchmark.report.report import write_report
    from benchmark.run.phases import format_phases
    t_report = time.perf_counter()
    result.rows = collect_rows(jobs, scale)
    result.out_dir = Path(out) if out else Path(runs_dir) / "report"
    result.tables = write_report(result.rows, result.out_dir, order=DEFENSES.names(),
                                 catalog=catalog())
    result.wall_s = time.perf_counter() - t0
    result.phases = format_phases([(j.label, j.run_dir()) for j in jobs], result.wall_s,
                                  time.perf_counter() - t_report)
    return result


def _json_object(text: Optional[str], option: str) -> dict[str, Any]:
    import json
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object")
    return value


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m benchmark.sweep JOB_JSON``: run one job (what the local launcher starts)."""
    from benchmark.logs import setup_logging

    setup_logging(0)
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m benchmark.sweep JOB_JSON")
    sys.stdout.write(run_job(Job.from_json(args[0])) + "\n")


if __name__ == "__main__":
    main()
