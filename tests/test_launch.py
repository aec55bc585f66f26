"""Many runs: job planning (requirements first), the local and submitit launchers, merging."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from benchmark.run import launch
from benchmark.cli import cli
from benchmark.run.resolve import resolve_run_config
from benchmark.errors import UsageError
from benchmark.store import RunStore, read_json
from benchmark.sweep import run_job

HP = {"epochs": 1}
ARGS = ["--dataset", "synthetic", "--arch", "tiny", "--hparams", json.dumps(HP), "--attacks",
        "fgsm", "--n-examples", "32", "--device", "cpu", "--no-progress"]


def _cfg(defense: str, seed: int = 0) -> Any:
    return resolve_run_config(defense, "synthetic", arch="tiny", seed=seed, user_hparams=HP)


def _needs(table: dict[str, tuple[str, ...]]) -> Any:
    return lambda name: table.get(name, ())


def test_plan_puts_required_runs_first_once_and_unevaluated() -> None:
    # "at" pretends to need "st" (as HAT does); two seeds need two different st runs
    cfgs = [_cfg("at", 0), _cfg("at", 1)]
    jobs = launch.plan(cfgs, "cifar", requires=_needs({"at": ("st",)}), runs_dir="runs")
    assert [(j.cfg.defense, j.cfg.seed, j.evaluate) for j in jobs] == [
        ("st", 0, False), ("st", 1, False), ("at", 0, True), ("at", 1, True)]
    # the required run is exactly the config train.py's _helper_model would train
    helper = resolve_run_config("st", "synthetic", profile="cpu", arch="tiny", seed=0,
                                user_hparams=HP, scale="cifar")
    assert jobs[0].cfg == helper and jobs[2].needs == (helper.run_id,)
    # asked for in the sweep as well: one job, evaluated, still before its dependent
    both = launch.plan([_cfg("at"), helper], "cifar", requires=_needs({"at": ("st",)}),
                       runs_dir="runs")
    assert [(j.cfg.defense, j.evaluate) for j in both] == [("st", True), ("at", True)]
    with pytest.raises(UsageError, match="circular"):
        launch.plan([_cfg("at")], "cifar", requires=_needs({"at": ("st",), "st": ("at",)}),
                    runs_dir="runs")


def test_job_round_trips_through_json() -> None:
    job = launch.plan([_cfg("at")], "cifar", runs_dir="r", checkpoints=("best", "last"))[0]
    assert launch.Job.from_json(job.to_json()) == job


def test_local_launcher_runs_required_job_first_and_report_merges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from defenses import DEFENSES
    monkeypatch.setattr(DEFENSES.get("at"), "requires", ("st",))  # in this (parent) process
    runs = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", "--launcher", "local", "--jobs", "2", "--defenses",
                                   "at", "--runs-dir", str(runs), *ARGS])
    assert res.exit_code == 0, res.output
    # what _helper_model trains: st with the protocol values this run overrode (HP)
    helper = resolve_run_config("st", "synthetic", profile="cpu", arch="tiny", seed=0,
                                user_hparams=HP, scale="cifar")
    st_dir, at_dir = RunStore(runs).run_dir(helper), RunStore(runs).run_dir(_cfg("at"))
    assert (st_dir / "TRAINED").exists() and (at_dir / "TRAINED").exists()
    assert [p.name for p in (st_dir / "eval").glob("*.json")] == ["health.json"], \
        "a pure requirement is trained (and gets its health verdict), not evaluated"
    # the dependent started only after its requirement had finished
    assert (st_dir / "TRAINED").stat().st_mtime <= (at_dir / "config.json").stat().st_mtime
    attack_rows = [p for p in (at_dir / "eval").glob("*.json")
                   if read_json(p).get("kind", "attack") == "attack"]
    assert (at_dir / "job.log").exists() and len(attack_rows) == 1
    assert "1 jobs:" in res.output and "2 jobs via local" in res.output
    dry = CliRunner().invoke(cli, ["run", "--dry-run", "--defenses", "at", "--runs-dir",
                                   str(runs), *ARGS])
    assert "1 done" in dry.output and "required by at" in dry.output
    rep = CliRunner().invoke(cli, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "o")])
    assert rep.exit_code == 0, rep.output  # the merged rows of every run folder


def test_submitit_local_executor(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    res = CliRunner().invoke(cli, ["run", "--launcher", "submitit", "--cluster", "local",
                                   "--defenses", "st", "--runs-dir", str(runs), *ARGS])
    assert res.exit_code == 0, res.output
    run_dir = RunStore(runs).run_dir(_cfg("st"))
    rows = [read_json(f) for f in (run_dir / "eval").glob("*.json")]
    rows = [r for r in rows if r.get("kind", "attack") == "attack"]
    assert [r["attack"] for r in rows] == ["fgsm"] and rows[0]["n_examples"] == 32
    assert list((runs / ".submitit").glob("*_result.pkl")), "submitit ran the job"


class _FakeJob:
    def __init__(self, job_id: str, result: str) -> None:
        self.job_id, self._result = job_id, result

    def result(self) -> str:
        return self._result


class _FakeSlurm:
    """Records what would go to sbatch."""

    calls: list[dict[str, Any]] = []

    def __init__(self, folder: str, cluster: Any = None) -> None:
        self.cluster, self.params = "slurm", {}

    def update_parameters(self, **kw: Any) -> None:
        self.params = kw

    def submit(self, fn: Any, job: launch.Job) -> _FakeJob:
        self.calls.append({"label": job.label, **self.params})
        return _FakeJob(str(100 + len(self.calls)), str(job.run_dir()))


def test_slurm_dependents_wait_via_afterok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit
    monkeypatch.setattr(submitit, "AutoExecutor", _FakeSlurm)
    _FakeSlurm.calls = []
    jobs = launch.plan([_cfg("at")], "cifar", requires=_needs({"at": ("st",)}),
                       runs_dir=str(tmp_path), device="cuda", gpus=4)
    launch.launch_submitit(jobs, run_job, folder=tmp_path, parameters={"slurm_partition": "gpu"})
    first, second = _FakeSlurm.calls
    assert first["label"].startswith("st/") and "slurm_additional_parameters" not in first
    assert second["slurm_additional_parameters"] == {"dependency": "afterok:101"}
    assert second["tasks_per_node"] == second["gpus_per_node"] == 4  # one DDP group per job
    assert second["slurm_partition"] == "gpu"


def _train_same_run(root: str) -> None:
    from benchmark.data import load_dataset
    from benchmark.run.train import train_run
    train_run(_cfg("st"), load_dataset("synthetic"), RunStore(root), device="cpu",
              progress=False)


def test_concurrent_trainers_of_one_run_train_it_once(tmp_path: Path) -> None:
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_train_same_run, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    log = (RunStore(tmp_path).run_dir(_cfg("st")) / "train_log.jsonl").read_text().splitlines()
    assert len(log) == HP["epochs"], "the second trainer must wait, then find the run trained"


def test_auto_launcher_uses_every_core_for_independent_jobs(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    two = launch.plan([_cfg("st"), _cfg("at")], "cifar", requires=_needs({}), runs_dir="r",
                      device="cpu")
    chain = launch.plan([_cfg("at")], "cifar", requires=_needs({"at": ("st",)}), runs_dir="r",
                        device="cpu")  # HAT-like: the dependent waits for its requirement
    assert launch.concurrency(two) == 2 and launch.concurrency(chain) == 1
    monkeypatch.setattr(launch, "cpu_cores", lambda: 2)
    assert launch.choose_launcher(two, "cpu") == ("local", {"parallel": 2})
    assert launch.choose_launcher(chain, "cpu") == ("serial", {})
    monkeypatch.setattr(launch, "cpu_cores", lambda: 1)
    assert launch.choose_launcher(two, "cpu") == ("serial", {})
    monkeypatch.setattr(launch, "cpu_cores", lambda: 64)  # never more processes than jobs
    assert launch.choose_launcher(two, "cpu") == ("local", {"parallel": 2})
    assert launch.choose_launcher(two, "cpu", parallel=1) == ("serial", {})


def test_auto_launcher_puts_one_job_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = launch.plan([_cfg("st", s) for s in range(3)], "cifar", requires=_needs({}),
                       runs_dir="r", device="cuda")
    monkeypatch.setattr(launch, "resolve_device", lambda d: __import__("torch").device("cuda"))
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["0", "1"])
    assert launch.choose_launcher(jobs, "cuda") == ("local", {"parallel": 2})
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["0"])
    assert launch.choose_launcher(jobs, "cuda") == ("serial", {})


def test_local_subprocesses_get_one_thread_each(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, str]] = []

    class Done:
        returncode = 0

    def fake_run(cmd: list[str], env: dict[str, str], **kw: Any) -> Done:
        seen.append({"module": cmd[2], "threads": env["OMP_NUM_THREADS"]})
        return Done()
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    monkeypatch.setattr(launch, "cpu_cores", lambda: 2)
    monkeypatch.setattr(launch, "visible_gpus", lambda: [])
    jobs = launch.plan([_cfg("st"), _cfg("at")], "cifar", requires=_needs({}),
                       runs_dir=str(tmp_path), device="cpu")
    launch.launch(jobs, run_job, "auto", share_cores=False)  # --fixed-threads
    assert seen == [{"module": "benchmark.sweep", "threads": "1"}] * 2


def test_local_jobs_on_cpu_take_the_cores_of_jobs_that_ended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs on 2 cores start with 1 thread each; when the first ends, the one still
    running is told to use both (its thread-share file); --fixed-threads turns it off."""
    import threading

    from benchmark import cores
    seen: dict[str, list[str]] = {}
    both, st_ended = threading.Barrier(2), threading.Event()

    class Done:
        returncode = 0

    def fake_run(cmd: list[str], env: dict[str, str], **kw: Any) -> Done:
        job = json.loads(cmd[-1])["config"]["defense"]
        seen[job] = [env["OMP_NUM_THREADS"]]
        if cores.ENV not in env:
            return Done()
        path = Path(env[cores.ENV])
        both.wait(timeout=10)  # both running
        seen[job].append(path.read_text().strip())
        both.wait(timeout=10)  # both have read their share
        if job == "at":  # still running after st ended
            assert st_ended.wait(timeout=10)
            seen[job].append(path.read_text().strip())
        return Done()

    real_end = cores.CoreShare.end

    def end(self: Any, name: str) -> None:
        real_end(self, name)
        if name == jobs[0].cfg.run_id:
            st_ended.set()
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    monkeypatch.setattr(launch, "cpu_cores", lambda: 2)
    monkeypatch.setattr(cores, "cpu_cores", lambda: 2)
    monkeypatch.setattr(launch, "visible_gpus", lambda: [])
    monkeypatch.setattr(cores.CoreShare, "end", end)
    jobs = launch.plan([_cfg("st"), _cfg("at")], "cifar", requires=_needs({}),
                       runs_dir=str(tmp_path), device="cpu")
    assert jobs[0].cfg.defense == "st"
    launch.launch(jobs, run_job, "auto")
    assert seen["st"] == ["1", "1"] and seen["at"] == ["1", "1", "2"]
    seen.clear()
    launch.launch(jobs, run_job, "local", parallel=2, share_cores=False)
    assert seen == {"st": ["1"], "at": ["1"]}


def test_follow_applies_the_share_and_single_commands_use_every_core(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from benchmark import cores
    before = torch.get_num_threads()
    share = tmp_path / "job.threads"
    try:
        monkeypatch.setenv(cores.ENV, str(share))
        assert cores.follow() is None  # no file yet: nothing changes
        for n in (2, 1, 3):
            tmp = tmp_path / "t"
            tmp.write_text(f"{n}\n")
            tmp.replace(share)
            assert cores.follow() == n and torch.get_num_threads() == n
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cores, "cpu_cores", lambda: 4)
        assert cores.use_all_cores() == 4 and torch.get_num_threads() == 4
        assert cores.use_all_cores(2) == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cores.use_all_cores() == 1
    finally:
        torch.set_num_threads(before)
