"""The training loop: resume equivalence (in-process and after kill -9), NaN guard, loading."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark import load_model
from benchmark.run.resolve import resolve_run_config
from benchmark.data import load_dataset
from benchmark.errors import CheckpointError, TrainingError, UsageError
from benchmark.store import RunStore, read_jsonl
from benchmark.run.train import eps_scale_at, train_run
from benchmark.testing import kill_after_epochs

FAST = {"epochs": 4, "lr_milestones": [3], "train_attack_steps": 2, "val_attack_steps": 2,
        "batch_size": 64}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "ckpt_last.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    data = load_dataset("synthetic")
    cfg = resolve_run_config("at", "synthetic", arch="tiny", user_hparams=FAST)
    full = train_run(cfg, data, RunStore(tmp_path / "a"), progress=False)
    store_b = RunStore(tmp_path / "b")
    part = train_run(cfg, data, store_b, progress=False, stop_after=2)
    assert not (part / "TRAINED").exists() and len(read_jsonl(part / "train_log.jsonl")) == 2
    torch.manual_seed(123)  # a different global RNG state must not matter after resume
    resumed = train_run(cfg, data, store_b, progress=False)
    assert (resumed / "TRAINED").exists()
    assert_same_weights(full, resumed)
    la, lb = read_jsonl(full / "train_log.jsonl"), read_jsonl(resumed / "train_log.jsonl")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_rerun_skips_finished_work(tmp_path: Path) -> None:
    data = load_dataset("synthetic")
    cfg = resolve_run_config("st", "synthetic", arch="tiny", user_hparams=FAST)
    run = train_run(cfg, data, RunStore(tmp_path), progress=False)
    stamp = (run / "ckpt_last.pt").stat().st_mtime_ns
    train_run(cfg, data, RunStore(tmp_path), progress=False)
    assert (run / "ckpt_last.pt").stat().st_mtime_ns == stamp
    cfg_json = json.loads((run / "config.json").read_text())
    assert cfg_json["run_id"] == cfg.run_id and cfg_json["env"]["torch"] == torch.__version__
    assert cfg_json["hparams"]["epochs"] == 4 and "provenance" in cfg_json["data"]


def test_kill_minus_nine_then_resume_matches(tmp_path: Path) -> None:
    hp = json.dumps({**FAST, "epochs": 30, "lr_milestones": [25]})
    cmd = [sys.executable, "-m", "benchmark.cli", "-q", "train", "--defense", "at", "--dataset",
           "synthetic", "--arch", "tiny", "--hparams", hp, "--no-progress", "--device", "cpu"]
    ref = subprocess.run(cmd + ["--runs-dir", str(tmp_path / "ref")], capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    ref_dir = Path(ref.stdout.strip().splitlines()[-1])

    runs = tmp_path / "killed"
    run_dir = kill_after_epochs(cmd + ["--runs-dir", str(runs)], runs, 3)
    done_before = len(read_jsonl(run_dir / "train_log.jsonl"))
    assert 3 <= done_before < 30
    again = subprocess.run(cmd + ["--runs-dir", str(runs)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert (run_dir / "TRAINED").exists()
    assert [r["epoch"] for r in read_jsonl(run_dir / "train_log.jsonl")] == list(range(1, 31))
    assert_same_weights(ref_dir, run_dir)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path: Path) -> None:
    data = load_dataset("synthetic")
    cfg = resolve_run_config("st", "synthetic", arch="tiny",
                             user_hparams={**FAST, "lr": 1e30, "epochs": 3})
    with pytest.raises(TrainingError, match="loss became"):
        train_run(cfg, data, RunStore(tmp_path), progress=False)
    assert not (RunStore(tmp_path).run_dir(cfg) / "TRAINED").exists()


def test_load_model_gives_eval_logits_on_unit_inputs(tmp_path: Path) -> None:
    data = load_dataset("synthetic")
    cfg = resolve_run_config("at", "synthetic", arch="tiny", user_hparams=FAST)
    run = train_run(cfg, data, RunStore(tmp_path), progress=False)
    model = load_model(run)
    assert not model.training
    x = data.test.x[:16].float() / 255
    with torch.no_grad():
        out = model(x)
    assert out.shape == (16, 10) and torch.equal(out, model(x))
    last = load_model(run / "ckpt_last.pt")
    assert set(last.state_dict()) == set(model.state_dict())
    with pytest.raises(CheckpointError):
        load_model(tmp_path)
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "x.pt")


def test_mnist_trains_without_augmentation_in_every_profile() -> None:
    """Madry's and TRADES's MNIST protocols use no augmentation; CIFAR keeps crop + flip."""
    from benchmark.config import PROFILES
    from benchmark.run.resolve import resolve_run_config
    for profile in PROFILES:
        for dataset in ("mnist", "mnist5k"):
            assert resolve_run_config("at", dataset, profile=profile).hparams["augment"] is False
        assert resolve_run_config("at", "cifar10", profile=profile).hparams["augment"] is True


def test_eps_warmup_schedule_equals_its_formula() -> None:
    """E₀ clean epochs (scale 0), then ε·(t − E₀)/E₁ at the end of each step, then ε."""
    hp = {"clean_epochs": 2, "eps_warmup_epochs": 6}
    assert eps_scale_at(hp, 0, 0, 10) == 0.0 and eps_scale_at(hp, 1, 9, 10) == 0.0
    assert eps_scale_at(hp, 2, 0, 10) == pytest.approx(0.1 / 6)
    assert eps_scale_at(hp, 5, 4, 10) == pytest.approx(3.5 / 6)
    assert eps_scale_at(hp, 7, 9, 10) == 1.0 and eps_scale_at(hp, 11, 3, 10) == 1.0
    assert eps_scale_at({}, 0, 0, 10) == 1.0  # no warm-up keys: full ε from the first step
    assert eps_scale_at({"clean_epochs": 1}, 1, 0, 10) == 1.0


def test_eps_warmup_trains_clean_then_ramps_the_training_attack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness's ε warm-up reaches the defense: x' = x in the clean epochs, then
    ‖x' − x‖∞ ≤ (scale·ε) with a growing scale, then the full ε; the log records the scale."""
    from defenses.base import Defense

    cfg = resolve_run_config("at", "synthetic", arch="lenets++", user_hparams={
        **FAST, "epochs": 3, "lr_milestones": [3], "train_subset": 64, "batch_size": 16,
        "clean_epochs": 1, "eps_warmup_epochs": 1})
    eps = cfg.hparams["eps"]
    seen: list[tuple[float, float, float]] = []
    real = Defense.adversarial

    def spy(self, model, x, y, **kwargs):
        x_adv = real(self, model, x, y, **kwargs)
        seen.append((self.eps_scale, self.threat.eps, float((x_adv - x).abs().max())))
        return x_adv

    monkeypatch.setattr(Defense, "adversarial", spy)
    run_dir = train_run(cfg, load_dataset("synthetic"), RunStore(tmp_path), progress=False)
    per_epoch = len(seen) // 3
    clean, ramp, full = seen[:per_epoch], seen[per_epoch:2 * per_epoch], seen[2 * per_epoch:]
    assert all(s == 0.0 and d == 0.0 for s, _, d in clean)
    scales = [s for s, _, _ in ramp]
    assert scales == sorted(scales) and 0 < scales[0] < 1 and scales[-1] == 1.0
    assert all(t == pytest.approx(s * eps) and d <= t + 1e-6 for s, t, d in ramp)
    assert all(s == 1.0 and t == eps for s, t, _ in full) and max(d for *_, d in full) > 0.5 * eps
    log = read_jsonl(run_dir / "train_log.jsonl")
    assert [r["eps_scale"] for r in log] == [0.0, 1.0, 1.0]


def test_eps_warmup_is_validated_and_only_recorded_for_lenets_pp() -> None:
    assert "clean_epochs" not in resolve_run_config("at", "mnist", arch="small-cnn").hparams
    hp = resolve_run_config("at", "mnist", arch="lenets++").hparams
    assert (hp["clean_epochs"], hp["eps_warmup_epochs"], hp["lr"]) == (2, 6, 0.01)
    assert hp["epochs"] == 12 and hp["lr_milestones"] == [10, 11]
    paper = resolve_run_config("at", "mnist", arch="lenets++", profile="paper").hparams
    assert paper["epochs"] == 110 and paper["clean_epochs"] == 2
    with pytest.raises(UsageError, match="never reach"):
        resolve_run_config("at", "mnist", arch="lenets++",
                           user_hparams={"epochs": 4, "lr_milestones": [3], "clean_epochs": 3})
    with pytest.raises(UsageError, match="clean_epochs"):
        resolve_run_config("at", "mnist", arch="lenets++", user_hparams={"clean_epochs": 1.5})


def test_lenets_pp_runs_record_and_apply_gradient_clipping(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """LeNets++ (no batch norm) clips the global gradient norm, as a recorded protocol value;
    other architectures have no such key, so their run ids are unchanged."""
    assert "grad_clip" not in resolve_run_config("at", "synthetic", arch="tiny").hparams
    assert "grad_clip" not in resolve_run_config("at", "mnist", arch="small-cnn").hparams
    cfg = resolve_run_config("adv-dpnp", "synthetic", arch="lenets++",
                             user_hparams={**FAST, "epochs": 1, "lr_milestones": [1],
                                           "train_subset": 64})
    assert cfg.hparams["grad_clip"] == 5.0
    norms: list[float] = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        total = real(params, max_norm, *args, **kwargs)
        norms.append(float(max_norm))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    run_dir = train_run(cfg, load_dataset("synthetic"), RunStore(tmp_path), progress=False)
    assert norms and set(norms) == {5.0}
    assert json.loads((run_dir / "config.json").read_text())["hparams"]["grad_clip"] == 5.0
