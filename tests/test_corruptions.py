"""CIFAR-10-C: the official .npy layout (written small by the tests) and the corruption rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.eval import corruptions as cc
from benchmark.run.resolve import resolve_run_config
from benchmark.data import load_dataset
from benchmark.errors import DataError, UsageError
from benchmark.store import RunStore
from benchmark.run.train import train_run

N = 6  # images per severity (10,000 in the real files)
NAMES = ["fog", "gaussian_noise", "zz_extra"]


def write_cifar10c(root: Path, names: list[str] = NAMES, n: int = N, seed: int = 0) -> dict:
    """Official layout: <name>.npy (5·n)×32×32×3 uint8, labels.npy (5·n) = test labels ×5.

    The clean images are the synthetic test set upsampled to 32×32; each corruption adds
    noise that grows with the severity, so accuracies differ between blocks.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    test = load_dataset("synthetic").test
    clean = np.kron(test.x[:n].permute(0, 2, 3, 1).numpy().astype(float), np.ones((1, 4, 4, 1)))
    labels = np.tile(test.y[:n].numpy(), 5).astype(np.int64)
    np.save(root / "labels.npy", labels)
    arrays = {}
    for i, name in enumerate(names):
        blocks = [clean + rng.normal(0, 25 * (i + 1) * sev, clean.shape) for sev in range(1, 6)]
        arrays[name] = np.clip(np.concatenate(blocks), 0, 255).round().astype(np.uint8)
        np.save(root / f"{name}.npy", arrays[name])
    return {"labels": labels, **arrays}


def test_blocks_are_sliced_by_severity_and_made_nchw(tmp_path: Path) -> None:
    arrays = write_cifar10c(tmp_path)
    for sev in (1, 3, 5):
        x, y = cc.load_corruption(tmp_path, "fog", sev)
        block = arrays["fog"][(sev - 1) * N:sev * N]
        assert x.dtype == torch.uint8 and x.shape == (N, 3, 32, 32)
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), block)
        assert np.array_equal(y.numpy(), arrays["labels"][(sev - 1) * N:sev * N])
    x, y = cc.load_corruption(tmp_path, "gaussian_noise", 2, n_examples=4)
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), arrays["gaussian_noise"][N:N + 4])
    assert len(y) == 4


def test_listing_and_root_discovery(tmp_path: Path) -> None:
    write_cifar10c(tmp_path / "CIFAR-10-C")
    root = cc.find_root(tmp_path)
    assert root == tmp_path / "CIFAR-10-C"
    assert cc.list_corruptions(root) == ["gaussian_noise", "fog", "zz_extra"]  # official first
    assert len(cc.CORRUPTIONS) == 19


def test_bad_layouts_fail_with_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="labels.npy"):
        cc.find_root(tmp_path)
    write_cifar10c(tmp_path)
    with pytest.raises(UsageError):
        cc.load_corruption(tmp_path, "fog", 6)
    with pytest.raises(DataError, match="present: gaussian_noise, fog"):
        cc.load_corruption(tmp_path, "snow", 1)
    np.save(tmp_path / "fog.npy", np.zeros((5 * N, 32, 32, 3), dtype=np.float32))
    with pytest.raises(DataError, match="uint8"):
        cc.load_corruption(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((5 * N + 5, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="labels.npy"):
        cc.load_corruption(tmp_path, "fog", 1)


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hp = {"epochs": 1, "lr_milestones": [1], "train_attack_steps": 1, "val_attack_steps": 1,
          "batch_size": 128}
    cfg = resolve_run_config("st", "synthetic", profile="cpu", arch="tiny", user_hparams=hp)
    return train_run(cfg, load_dataset("synthetic"), RunStore(tmp_path_factory.mktemp("runs")),
                     progress=False)


def test_corruption_rows_hold_the_model_accuracy_per_block(rgb_run: Path,
                                                           tmp_path: Path) -> None:
    from benchmark.run.resolve import load_model

    arrays = write_cifar10c(tmp_path, n=40)
    rows = cc.evaluate_corruptions(rgb_run, tmp_path, n_examples=30, batch_size=16)
    cells = [r for r in rows if not r.get("aggregate")]
    assert len(cells) == 3 * 5 and all(r["kind"] == "corruption" for r in rows)
    model = load_model(rgb_run)
    expected = {}
    for name in NAMES:
        for sev in range(1, 6):
            img = arrays[name][(sev - 1) * 40:(sev - 1) * 40 + 30]
            x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                pred = model(x).argmax(1).numpy()
            expected[(name, sev)] = float((pred == arrays["labels"][:30]).mean())
    got = {(r["corruption"], r["severity"]): r["accuracy"] for r in cells}
    assert got == pytest.approx(expected)
    assert len(set(got.values())) > 1  # a constant would not test the slicing
    agg = [r for r in rows if r.get("aggregate")][0]
    assert agg["accuracy"] == pytest.approx(np.mean(list(expected.values())))
    assert agg["accuracy_by_severity"]["3"] == pytest.approx(
        np.mean([expected[(n, 3)] for n in NAMES]))
    assert all(r["n_examples"] == 30 and r["data_provenance"] for r in cells)
    assert "CIFAR-10-C" in cells[0]["corruption_provenance"]
    again = cc.evaluate_corruptions(rgb_run, tmp_path, n_examples=30, corruptions=["fog"],
                                    severities=[2])
    assert again[0]["created"] == next(r["created"] for r in cells
                                       if (r["corruption"], r["severity"]) == ("fog", 2))


def test_a_model_with_the_wrong_number_of_classes_is_refused(tmp_path: Path,
                                                            rgb_run: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    write_cifar10c(tmp_path)
    real = cc.open_target

    def fake(*a, **k):  # type: ignore[no-untyped-def]
        run = real(*a, **k)
        run.info = type(run.info)(**{**run.info.to_dict(), "num_classes": 100})
        return run
    monkeypatch.setattr(cc, "open_target", fake)
    with pytest.raises(UsageError, match="10-class"):
        cc.evaluate_corruptions(rgb_run, tmp_path)
