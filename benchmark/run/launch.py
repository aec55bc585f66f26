"""Many runs: one job per (defense, dataset, arch, seed), dispatched by a launcher.

A sweep (:mod:`benchmark.sweep`) turns its configs into :class:`Job` s with :func:`plan` and
hands them, with a *worker* (a module-level function ``worker(job) -> run folder``), to one of
the launchers, as DomainBed's ``command_launchers`` take commands. Every job writes only its
own run folder, so ``advbench report`` merges whatever has finished. Launchers:

* ``serial``: in the calling process, one job after the other (``worker(job)``).
* ``local``: ``parallel`` subprocesses at a time (``python -m <worker's module> JOB_JSON``; the
  module runs one job from its command line), each pinned to its own GPU(s) through
  ``CUDA_VISIBLE_DEVICES`` and given cores/parallel threads; with ``gpus > 1`` a job runs under
  ``torchrun --nproc_per_node=G`` (DDP). Log: ``RUN_DIR/job.log``.
* ``submitit``: Slurm through submitit (``cluster="local"`` runs submitit's own local
  executor, which is how the tests exercise this path). A job with G GPUs is G Slurm tasks that
  form one DDP group. Submitit's pickles and logs go to ``RUNS/.submitit``.
* ``auto`` (:func:`choose_launcher`): the whole machine. On CPU, ``local`` with one job per
  core and one thread each when at least two jobs can run at once; on GPUs one job per GPU
  (group); otherwise ``serial``.

Requirements (HAT needs a trained ``st`` run of the same dataset/arch/profile/seed): the
required runs are jobs of their own, placed first; a dependent job starts only after them
(Slurm ``--dependency=afterok``; local launchers wait for them), so a required run is trained
once, never twice concurrently. ``train_run`` also holds an exclusive lock on a run folder
while it trains, as a second guard.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import queue
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from benchmark.config import RunConfig
from benchmark.run.resolve import helper_config
from benchmark.device import cpu_cores, resolve_device, visible_gpus
from benchmark.errors import AdvbenchError, UsageError
from benchmark.store import RunStore

logger = logging.getLogger(__name__)

LAUNCHERS = ("auto", "serial", "local", "submitit")
Worker = Callable[["Job"], str]


@dataclass(frozen=True)
class Job:
    """Everything one job needs, as plain JSON-able values (pickled by submitit)."""

    config: dict[str, Any]
    runs_dir: str
    data_dir: Optional[str] = None
    download: bool = False
    attacks: Optional[str] = None
    suite: Optional[str] = None
    checkpoints: tuple[str, ...] = ("best",)
    n_examples: Optional[int] = None
    batch_size: Optional[int] = None
    device: str = "auto"
    evaluate: bool = True  # False: a requirement run that the sweep did not ask to evaluate
    needs: tuple[str, ...] = ()  # run ids that must be trained first
    gpus: int = 1  # processes (GPUs) of the job's DDP group; 1: no DDP
    progress: bool = False  # progress bars (in-process runs)

    @property
    def cfg(self) -> RunConfig:
        return RunConfig.from_dict(self.config)

    @property
    def label(self) -> str:
        c = self.config
        return f"{c['defense']}/{c['dataset']}/{c['arch']}/seed{c['seed']}"

    def run_dir(self) -> Path:
        return RunStore(self.runs_dir).run_dir(self.cfg)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        d = json.loads(text)
        return cls(**{**d, "checkpoints": tuple(d["checkpoints"]), "needs": tuple(d["needs"])})


def plan(cfgs: Sequence[RunConfig], scale: str, *, requires: Optional[Callable[[str],
         Sequence[str]]] = None, **job_args: Any) -> list[Job]:
    """Jobs for the sweep plus the runs they require, required ones first (deduplicated).

    Args:
        cfgs: the sweep's resolved configs.
        scale: the dataset's scale (the required run's config depends on it, as in training).
        requires: defense name → names of the defenses it needs (default: the registry's).
        **job_args: the other :class:`Job` fields (runs_dir, attacks, device, ...).
    """
    if requires is None:
        from defenses import DEFENSES
        requires = lambda name: tuple(DEFENSES.get(name).requires)  # noqa: E731
    jobs: dict[str, Job] = {}
    asked = {c.run_id for c in cfgs}

    def add(cfg: RunConfig, evaluate: bool, chain: tuple[str, ...] = ()) -> str:
        if cfg.run_id in chain:
            raise UsageError(f"circular requirement through {cfg.defense}")
        needs = tuple(add(helper_config(req, cfg, scale), evaluate=False, chain=chain + (cfg.run_id,))
                      for req in requires(cfg.defense))
        old = jobs.get(cfg.run_id)
        jobs[cfg.run_id] = Job(config=cfg.to_dict(), evaluate=evaluate or bool(old and old.evaluate),
                               needs=needs, **job_args)
        return cfg.run_id

    for cfg in cfgs:
        add(cfg, evaluate=True)
    order: list[Job] = []
    placed: set[str] = set()

    def place(run_id: str) -> None:  # depth-first: a job after everything it needs
        if run_id in placed:
            return
        for need in jobs[run_id].needs:
            place(need)
        placed.add(run_id)
        order.append(jobs[run_id])

    for run_id in sorted(jobs, key=lambda r: r in asked):  # pure requirements first
        place(run_id)
    return order


def concurrency(jobs: Sequence[Job]) -> int:
    """How many of ``jobs`` can run at once: the widest level of the requirement graph."""
    level: dict[str, int] = {}
    for job in jobs:  # plan order: requirements first
        level[job.cfg.run_id] = 1 + max((level.get(n, 0) for n in job.needs), default=0)
    widths = [list(level.values()).count(v) for v in set(level.values())]
    return max(widths, default=0)


def choose_launcher(jobs: Sequence[Job], device: str = "auto",
                    parallel: Optional[int] = None) -> tuple[str, dict[str, Any]]:
    """``auto``: the launcher and options that use the whole machine for ``jobs``.

    On CPU one job per core (one thread each), on GPUs one job per GPU group, never more jobs
    at a time than can run at once; ``serial`` (in this process) when that is one.
    """
    if parallel is None:
        if resolve_device(device).type == "cuda":
            per = max(jobs[0].gpus if jobs else 1, 1)
            slots = len(visible_gpus()) // per
        else:
            slots = cpu_cores()
        parallel = min(slots, concurrency(jobs))
    if parallel > 1:
        return "local", {"parallel": parallel}
    return "serial", {}


# ------------------------------------------------------------------------------ launchers
def launch_serial(jobs: Sequence[Job], worker: Worker) -> list[str]:
    """Run every job in this process, one after the other."""
    return [worker(job) for job in jobs]


def launch_local(jobs: Sequence[Job], worker: Worker, *,
                 parallel: Optional[int] = None, share_cores: bool = True) -> list[str]:
    """Run each job as a subprocess, ``parallel`` at a time (default: one per GPU group, or 1).

    Each subprocess is ``python -m <worker.__module__> JOB_JSON``; that module must run the
    job given on its command line. On CPU with ``share_cores`` the running jobs share the
    cores (:class:`benchmark.cores.CoreShare`: a job that ends gives its cores to the
    others); else each job keeps ``cores // parallel`` threads.

    Raises:
        AdvbenchError: some jobs failed (the others finish; each failure names its log).
    """
    gpus = visible_gpus()
    per = max(jobs[0].gpus if jobs else 1, 1)
    groups = [",".join(gpus[i:i + per]) for i in range(0, len(gpus) - per + 1, per)]
    if parallel is None:
        parallel = max(len(groups), 1)
    free: "queue.Queue[Optional[str]]" = queue.Queue()
    for i in range(parallel):
        free.put(groups[i % len(groups)] if groups else None)
    threads = max(1, cpu_cores() // parallel)
    futures: dict[str, cf.Future] = {}
    share = None
    if share_cores and not groups and parallel > 1:
        import tempfile

        from benchmark.cores import ENV, CoreShare
        share = CoreShare(tempfile.mkdtemp(prefix="advbench-cores-"), parallel=parallel,
                          jobs=len(jobs))

    def work(job: Job) -> str:
        try:
            return run_one(job)
        finally:
            if share is not None:
                share.end(job.cfg.run_id)  # its cores go to the jobs still running

    def run_one(job: Job) -> str:
        for need in job.needs:  # queued before us (plan order), so already running or done
            if futures[need].exception() is not None:
                raise AdvbenchError(f"job {job.label} not run: a run it needs failed")
        group = free.get()
        name = job.cfg.run_id
        try:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            if share is not None:
                path, first = share.start(name)
                env.update({ENV: str(path), "OMP_NUM_THREADS": str(first)})
            if group is not None:
                env["CUDA_VISIBLE_DEVICES"] = group
            head = [sys.executable, "-m", worker.__module__]
            if job.gpus > 1:
                head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={job.gpus}", "-m", worker.__module__]
            job.run_dir().mkdir(parents=True, exist_ok=True)
            log = job.run_dir() / "job.log"
            logger.info("starting %s (gpus %s) → %s", job.label, group or "-", log)
            with open(log, "a") as fh:
                rc = subprocess.run(head + [job.to_json()], env=env, stdout=fh,
                                    stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise AdvbenchError(f"job {job.label} failed (exit {rc}); see {log}")
            return str(job.run_dir())
        finally:
            free.put(group)

    with cf.ThreadPoolExecutor(max_workers=parallel) as pool:
        for job in jobs:
            futures[job.cfg.run_id] = pool.submit(work, job)
    if share is not None:
        import shutil
        shutil.rmtree(share.folder, ignore_errors=True)
    return _results(jobs, [futures[j.cfg.run_id] for j in jobs])


def launch_submitit(jobs: Sequence[Job], worker: Worker, *, folder: Path | str,
                    cluster: Optional[str] = None,
                    parameters: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Submit one submitit job per run and wait for all of them.

    Args:
        jobs: in :func:`plan` order.
        worker: what each submitted job runs (pickled by submitit).
        folder: submitit's folder for pickles and logs (named by job id).
        cluster: None (auto: Slurm if available), ``slurm``, ``local`` or ``debug``.
        parameters: executor parameters, e.g. ``{"timeout_min": 1440, "slurm_partition":
            "gpu"}``; ``gpus_per_node``/``tasks_per_node`` are set from each job's ``gpus``.
    """
    try:
        import submitit
    except ImportError:
        raise UsageError("--launcher submitit needs submitit: pip install 'advbench[cluster]'") \
            from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    base = {"timeout_min": 24 * 60, **(parameters or {})}
    submitted: dict[str, Any] = {}
    for job in jobs:
        params = dict(base, tasks_per_node=job.gpus,
                      gpus_per_node=0 if job.device.startswith("cpu") else job.gpus)
        params.setdefault("name", "advbench-" + job.label.replace("/", "-"))
        needs = [submitted[n] for n in job.needs]
        if needs and executor.cluster == "slurm":
            ids = ":".join(str(j.job_id) for j in needs)
            params["slurm_additional_parameters"] = {
                **params.get("slurm_additional_parameters", {}), "dependency": f"afterok:{ids}"}
        else:
            for j in needs:  # executors without dependencies: wait for the required runs
                j.result()
        executor.update_parameters(**params)
        submitted[job.cfg.run_id] = executor.submit(worker, job)
        logger.info("submitted %s as job %s", job.label, submitted[job.cfg.run_id].job_id)
    return _results(jobs, [submitted[j.cfg.run_id] for j in jobs])


def _results(jobs: Sequence[Job], handles: Sequence[Any]) -> list[str]:
    out, failed = [], []
    for job, h in zip(jobs, handles):
        try:
            out.append(str(h.result()))
        except Exception as exc:  # a job's own failure; the others' work is kept
            failed.append(f"{job.label}: {str(exc).strip().splitlines()[-1][:300]}")
    if failed:
        raise AdvbenchError(f"{len(failed)} of {len(jobs)} jobs failed:\n  " + "\n  ".join(failed))
    return out


def launch(jobs: Sequence[Job], worker: Worker, launcher: str = "serial",
           **kwargs: Any) -> list[str]:
    """Dispatch ``jobs`` to ``worker`` with the named launcher; returns their run folders."""
    if launcher == "auto":
        launcher, auto = choose_launcher(jobs, jobs[0].device if jobs else "auto",
                                         kwargs.pop("parallel", None))
        kwargs.update(auto)
    if launcher == "serial":
        return launch_serial(jobs, worker)
    if launcher == "local":
        return launch_local(jobs, worker, **kwargs)
    if launcher == "submitit":
        return launch_submitit(jobs, worker, **kwargs)
    raise UsageError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")


# ------------------------------------------------------------------------------ advbench train
@dataclass(frozen=True)
class TrainJob:
    """What ``advbench train`` trains: one defense over seeds (each DDP process gets a copy)."""

    defense: str
    dataset: str
    runs_dir: str
    arch: Optional[str] = None
    profile: str = "cpu"
    seeds: tuple[int, ...] = (0,)
    hparams: Optional[str] = None  # --hparams JSON
    data_dir: Optional[str] = None
    download: bool = False
    device: str = "auto"
    progress: bool = True
    sync_bn: bool = False


def train_job(job: TrainJob) -> list[Path]:
    """Train (or resume) the job's runs in this process, joining the process group that the
    environment describes (torchrun, ``advbench train --ddp``).

    Returns:
        The run folders on the main rank; [] on the other ranks.
    """
    from benchmark.run.resolve import sweep_configs
    from benchmark.data import dataset_scale, load_dataset
    from benchmark.run import distributed
    from benchmark.run.train import train_run

    scale = dataset_scale(job.dataset, job.data_dir)
    cfgs = sweep_configs([job.defense], job.dataset, profile=job.profile, arch=job.arch,
                         seeds=job.seeds, hparams=job.hparams, scale=scale)
    data = load_dataset(job.dataset, job.data_dir, download=job.download)
    out = []
    with distributed.process_group(job.device) as env:
        for cfg in cfgs:
            run_dir = train_run(cfg, data, RunStore(job.runs_dir), device=job.device,
                                progress=job.progress, sync_bn=job.sync_bn)
            out.append(run_dir)
    return out if env.is_main else []
