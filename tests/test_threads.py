"""Threads: the share of a sweep's job changes how the work runs, never what it computes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Norm, ThreatModel
from attacks.pgd import PGD
from benchmark.eval.flags import attack_points, predict
from benchmark import cores


def _share(path: Path, n: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{n}\n")
    tmp.replace(path)


def test_flags_are_identical_when_the_share_changes_between_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x, y = torch.rand(48, 3, 8, 8), torch.randint(0, 10, (48,))
    before = torch.get_num_threads()

    def grad(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        xx = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(xx), y), xx)[0]
    try:
        if not torch.equal(grad(1), grad(2)):
            pytest.skip("this CPU's matmul depends on the thread count: no identity to test")
        seen: list[int] = []
        share = tmp_path / "job.threads"

        class Flip(PGD):  # records the threads of each batch, then flips the share
            def perturb(self, model, x, y, *, loss):  # type: ignore[override]
                seen.append(torch.get_num_threads())
                _share(share, 3 - seen[-1])
                return super().perturb(model, x, y, loss=loss)

        threat = ThreatModel(Norm.LINF, 8 / 255)
        clean, ce = predict(model, x, y)
        torch.set_num_threads(1)
        ref = attack_points(model, PGD(threat, steps=10, seed=0), x, y, clean=clean,
                            clean_ce=ce, batch_size=4)
        monkeypatch.setenv(cores.ENV, str(share))
        _share(share, 2)
        got = attack_points(model, Flip(threat, steps=10, seed=0), x, y, clean=clean,
                            clean_ce=ce, batch_size=4)
        assert set(seen) == {1, 2}, "the share never reached the evaluation"
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        assert 0 < int(ref[0].sum()) < int(clean.sum()), "need broken and robust points"
    finally:
        torch.set_num_threads(before)


def test_training_under_a_share_and_its_resume_are_bit_identical(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmark.data import load_dataset
    from benchmark.run.resolve import resolve_run_config
    from benchmark.run.train import train_run
    from benchmark.store import RunStore
    fast = {"epochs": 3, "lr_milestones": [2], "train_attack_steps": 2, "val_attack_steps": 2,
            "batch_size": 64}
    data = load_dataset("synthetic")
    cfg = resolve_run_config("at", "synthetic", arch="tiny", user_hparams=fast)
    plain = train_run(cfg, data, RunStore(tmp_path / "a"), progress=False)
    share = tmp_path / "job.threads"
    _share(share, 1)
    monkeypatch.setenv(cores.ENV, str(share))
    store = RunStore(tmp_path / "b")
    train_run(cfg, data, store, progress=False, stop_after=1)
    shared = train_run(cfg, data, store, progress=False)
    wa = torch.load(plain / "ckpt_last.pt", weights_only=True)["model"]
    wb = torch.load(shared / "ckpt_last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
