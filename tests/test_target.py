"""The single evaluation entry (benchmark.eval.target): one opening, one provenance builder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import benchmark.eval.target as target
from benchmark.data import load_dataset
from benchmark.errors import UsageError
from benchmark.eval.corruptions import evaluate_corruptions
from benchmark.eval.evaluate import evaluate_path
from benchmark.eval.features import evaluate_features
from benchmark.testing import tiny_st_run

#: fields that legitimately differ between two rows of one checkpoint (``inputs_sha256``: the
#: checkpoint's hash is common, a corruption row adds its corruption set's)
PER_ROW = {"eval_key", "kind", "created", "inputs_sha256"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_st_run(tmp_path_factory.mktemp("runs"), epochs=1)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every checkpoint file read through the evaluation entry."""
    seen: list[Path] = []
    real = target.read_checkpoint

    def counting(path):  # type: ignore[no-untyped-def]
        seen.append(Path(path))
        return real(path)
    monkeypatch.setattr(target, "read_checkpoint", counting)
    return seen


def test_each_command_opens_the_checkpoint_once(run_dir: Path, data, reads: list[Path]) -> None:
    evaluate_path(run_dir, attacks="fgsm,pgd", n_examples=8, data=data, progress=False)
    assert len(reads) == 1, reads
    evaluate_features(run_dir, n_examples=8, data=data)
    assert len(reads) == 2, reads


def test_every_row_kind_carries_the_same_provenance(run_dir: Path, data, tmp_path: Path) -> None:
    attack_row = evaluate_path(run_dir, attacks="fgsm", n_examples=8, data=data,
                               progress=False)[0]
    feature_row = evaluate_features(run_dir, n_examples=8, data=data)[0]
    _write_tiny_cifar10c(tmp_path)
    corruption_row = evaluate_corruptions(run_dir, tmp_path, corruptions=["fog"],
                                          severities=[1])[0]
    t = target.open_target(run_dir)
    expected = t.row("k", "x")
    for row in (attack_row, feature_row, corruption_row):
        for field, value in expected.items():
            if field not in PER_ROW:
                assert row[field] == value, (row["kind"], field)
        assert row["inputs_sha256"]["checkpoint"] == t.ckpt_sha256 == \
            target.file_sha256(t.ckpt_path)
    assert set(corruption_row["inputs_sha256"]) == {"checkpoint", "corruption_set"}
    assert (attack_row["kind"], feature_row["kind"], corruption_row["kind"]) == \
        ("attack", "features", "corruption")


def _write_tiny_cifar10c(root: Path, n: int = 4) -> None:
    import numpy as np
    rng = np.random.default_rng(0)
    np.save(root / "fog.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(np.arange(n) % 10, 5))


def test_a_dataset_with_other_classes_is_refused(run_dir: Path) -> None:
    t = target.open_target(run_dir)
    with pytest.raises(UsageError, match="classes"):
        t.test_data(_with_classes(load_dataset("synthetic"), 3))


def _with_classes(data, k: int):  # type: ignore[no-untyped-def]
    from dataclasses import replace
    return replace(data, info=replace(data.info, num_classes=k))


class _Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], 10)


def test_check_model_refuses_train_mode_and_nondeterminism() -> None:
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(UsageError, match="eval mode"):
        target.check_model(_Noisy().train(), x)
    with pytest.raises(UsageError, match="deterministic"):
        target.check_model(_Noisy().eval(), x)
    target.check_model(_Noisy().eval(), x, randomized=True)
