"""DDP: an N-process run equals the 1-process run with the same global batch; resume works.

The workers are forked (fast: they inherit the imported modules); ``advbench train --ddp``
spawns the same worker function instead, and ``torchrun`` sets the same environment
variables (the slow-marked test runs the real ``torchrun`` entry).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.run import distributed
from benchmark.run.resolve import load_model
from benchmark.run.resolve import resolve_run_config
from benchmark.data import load_dataset
from benchmark.errors import UsageError
from benchmark.store import RunStore
from benchmark.run.train import train_run

# global batch 101 on 512 training images: shards of 51/50 and a last batch of 7 (4/3), so
# the loss weighting of unequal shards is exercised at every step
COMMON = {"epochs": 2, "batch_size": 101, "lr": 0.2, "lr_milestones": [1]}
CASES = [("st", {}),                                              # augmentation, no attack
         ("at", {"eps": 0.0, "train_attack_steps": 2})]           # attack inside the DDP step


def _cfg(defense: str, extra: dict) -> object:
    return resolve_run_config(defense, "synthetic", arch="tiny", user_hparams={**COMMON, **extra})


def _train_cases(root: str, cases: list, stop_after: int | None = None) -> None:
    with distributed.process_group("cpu"):
        data = load_dataset("synthetic")
        for defense, extra in cases:
            if stop_after:
                train_run(_cfg(defense, extra), data, RunStore(root), device="cpu",
                          progress=False, stop_after=stop_after)
            train_run(_cfg(defense, extra), data, RunStore(root), device="cpu", progress=False)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "ckpt_last.pt", weights_only=True)["model"]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_shards_partition_the_global_batch_and_weights_restore_its_mean() -> None:
    x = torch.arange(7.0)
    losses = (x - 2.5) ** 2  # per-sample losses of a global batch of 7
    parts = [distributed.DistEnv(r, 3).shard(x, x) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)  # disjoint, in order, complete
    assert [len(p[0]) for p in parts] == [3, 2, 2]
    # DDP averages the ranks' gradients: mean_r(w_r · mean(shard_r)) must be the global mean
    ddp_mean = sum(w * losses[p.long()].mean() for p, _, w in parts) / 3
    assert torch.allclose(ddp_mean, losses.mean())
    with pytest.raises(UsageError):
        distributed.DistEnv(2, 3).shard(x[:2], x[:2])  # 2 samples cannot feed 3 ranks


def test_ddp_two_processes_equal_single_process(tmp_path: Path) -> None:
    ddp_root, single_root = str(tmp_path / "ddp"), str(tmp_path / "single")
    distributed.launch_local(2, _train_cases, (ddp_root, CASES), start_method="fork")
    _train_cases(single_root, CASES)
    for defense, extra in CASES:
        cfg = _cfg(defense, extra)
        a, b = RunStore(ddp_root).run_dir(cfg), RunStore(single_root).run_dir(cfg)
        wa, wb = _weights(a), _weights(b)
        init = load_model(a, which="last").state_dict()  # same keys, no DDP/compile prefixes
        assert set(wa) == set(init)
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=2e-6, rtol=1e-5), (defense, k)
        init_w = _initial(cfg)
        moved = max(float((wa[k] - init_w[k]).abs().max()) for k in wa)
        assert moved > 1e-2, f"{defense}: weights barely moved; the comparison would be vacuous"
        la, lb = _log(a), _log(b)
        assert len(la) == 2, "only rank 0 may append to the log"
        assert la[0]["world_size"] == 2 and "world_size" not in lb[0]
        for ra, rb in zip(la, lb):
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
            assert ra["train_acc"] == rb["train_acc"]
            assert ra["val_clean"] == rb["val_clean"] and ra["val_pgd"] == rb["val_pgd"]


def _initial(cfg: object) -> dict[str, torch.Tensor]:
    from benchmark.run.resolve import build_defense
    from benchmark.data import dataset_info
    from benchmark.run.train import seed_everything
    seed_everything(cfg.seed)
    info = dataset_info("synthetic")
    return build_defense(cfg, info).build_model(cfg.arch, info).state_dict()


def test_ddp_resume_equals_uninterrupted_ddp_run(tmp_path: Path) -> None:
    from defenses import DEFENSES
    cases = [("at", {"train_attack_steps": 2})]  # real ε: random starts drawn per rank
    if "ikl" in DEFENSES:  # state accumulated from each rank's shard (class statistics)
        cases.append(("ikl", {"train_attack_steps": 2, "epochs": 3}))
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    distributed.launch_local(2, _train_cases, (resumed, cases, 1), start_method="fork")
    distributed.launch_local(2, _train_cases, (straight, cases), start_method="fork")
    for case in cases:
        cfg = _cfg(*case)
        a, b = RunStore(resumed).run_dir(cfg), RunStore(straight).run_dir(cfg)
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), case[0]
        assert [r["loss"] for r in _log(a)] == [r["loss"] for r in _log(b)]
        da, db = (torch.load(d / "ckpt_last.pt", weights_only=True)["defense"] for d in (a, b))
        assert da.keys() == db.keys() and all(
            torch.equal(da[k], db[k]) if isinstance(da[k], torch.Tensor) else da[k] == db[k]
            for k in da), f"{case[0]}: defense state differs after resume"
        assert (a / "TRAINED").exists() and (a / "ckpt_best.pt").exists()
        assert not (a / ".lock").exists(), "DDP runs are exclusive by construction; no lock file"


def test_train_command_under_ddp_prints_once(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from benchmark import cli
    from benchmark.run.launch import TrainJob
    runs = str(tmp_path / "runs")
    job = TrainJob("st", "synthetic", runs, arch="tiny", profile="cpu", seeds=(0,),
                   hparams=json.dumps({**COMMON, "epochs": 1}), device="cpu", progress=False)
    distributed.launch_local(2, cli._train_and_print, (job,), start_method="fork")
    run_dir = RunStore(runs).run_dir(_cfg("st", {"epochs": 1}))
    assert capfd.readouterr().out.strip().splitlines() == [str(run_dir)]  # rank 0 only
    assert (run_dir / "TRAINED").exists() and len(_log(run_dir)) == 1


@pytest.mark.slow
def test_torchrun_entry_point(tmp_path: Path) -> None:
    """The real ``torchrun -m benchmark.cli train`` (slow: three fresh interpreters)."""
    run = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "benchmark.cli", "train", "--defense", "st", "--dataset", "synthetic",
           "--arch", "tiny", "--device", "cpu", "--no-progress", "--runs-dir", str(run),
           "--hparams", json.dumps(COMMON)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = RunStore(run).run_dir(_cfg("st", {}))
    assert out.stdout.strip().splitlines() == [str(run_dir)]  # printed by rank 0 only
    single = tmp_path / "single"
    _train_cases(str(single), [("st", {})])
    wa, wb = _weights(run_dir), _weights(RunStore(single).run_dir(_cfg("st", {})))
    assert all(torch.allclose(wa[k], wb[k], atol=2e-6, rtol=1e-5) for k in wa)
    shutil.rmtree(run)
