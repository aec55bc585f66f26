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


# ------------------------------------------------------------------ regenerated CIFAR-10-C
from benchmark.eval import cifar_c  # noqa: E402


def smooth_images(n: int = 3, seed: int = 1) -> list[np.ndarray]:
    """Natural-like 32×32 RGB images: a smooth colour field (bilinear 4×4 → 32×32) and a disc."""
    from scipy.ndimage import zoom
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    out = []
    for _ in range(n):
        img = zoom(rng.random((4, 4, 3)), (8, 8, 1), order=1)
        img[(yy - 16) ** 2 + (xx - 12) ** 2 < 40] = rng.random(3)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


# Severity runs along which make_cifar_c.py's parameters make an image move further from the
# clean one (mean |x − c(x)|). Default: all five. Exceptions, from the official parameters:
ORDERED = {
    # sigma 0.05, 0.25, 0.4 with one shuffle pass, then sigma 0.25, 0.4 with two
    "glass_blur": [(1, 2, 3), (3, 4)],
    # radius 6, 6, 6, 8, 9 with sigma 1 … 2.5: severities 3 and 4 share sigma 2
    "motion_blur": [(1, 2, 3), (3, 5), (4, 5)],
    # frost weight 0.2 … 0.45 but the image weight falls 1 → 0.75: brighter, not further, at 4, 5
    "frost": [(1, 2, 3)],
    # water (1–3), then mud (4–5)
    "spatter": [(1, 2, 3), (4, 5)],
    # saturation ×0.3, ×0.1 (greyer), then ×1.5, ×2+0.1, ×2.5+0.2 (more saturated)
    "saturate": [(1, 2), (3, 4, 5)],
    # affine shift 0.08 → 0.03 of the size shrinks while the elastic field grows from 0
    "elastic_transform": [],
}


def _distances(name: str, images: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """Mean |x − c(x)| per severity over ``images``, the same random draws at every severity."""
    d = np.zeros(5)
    for i, x in enumerate(images):
        for s in range(1, 6):
            y = cifar_c.corrupt(x, name, s, np.random.default_rng([seed, i]))
            d[s - 1] += np.abs(y.astype(float) - x).mean() / len(images)
    return d


@pytest.mark.parametrize("name", cc.CORRUPTIONS)
def test_each_corruption_is_uint8_ordered_by_severity_and_seeded(name: str) -> None:
    images = smooth_images()
    for s in (1, 5):
        out = cifar_c.corrupt(images[0], name, s, np.random.default_rng(7))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        again = cifar_c.corrupt(images[0], name, s, np.random.default_rng(7))
        assert np.array_equal(out, again)
    d = _distances(name, images)
    assert (d > 0).all(), d  # every severity changes the images
    for run in ORDERED.get(name, [(1, 2, 3, 4, 5)]):
        assert all(d[a - 1] < d[b - 1] for a, b in zip(run, run[1:])), (run, d)


def test_the_corruption_list_matches_the_official_files_and_order() -> None:
    assert tuple(cifar_c.PARAMS) == tuple(cifar_c.CORRUPT) == cc.CORRUPTIONS
    assert all(len(p) == 5 for p in cifar_c.PARAMS.values())


def test_noise_uses_the_cifar_severities_not_imagenet_c_ones() -> None:
    """make_cifar_c.py: Gaussian σ 0.04 … 0.10 (ImageNet-C: 0.08 … 0.38), JPEG quality 80 … 40."""
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    for s, sigma in ((1, 0.04), (5, 0.10)):
        out = np.stack([cifar_c.corrupt(grey, "gaussian_noise", s, np.random.default_rng(i))
                        for i in range(8)])
        assert (out.astype(float) - 128).std() / 255 == pytest.approx(sigma, rel=0.08)
    noisy = cifar_c.corrupt(grey, "gaussian_noise", 1, np.random.default_rng(0))
    assert not np.array_equal(noisy, cifar_c.corrupt(grey, "gaussian_noise", 1,
                                                     np.random.default_rng(1)))


def write_cifar10_folder(root: Path, n_test: int = 12) -> Path:
    """A tiny CIFAR-10 stand-in in the image-folder layout the harness loads as ``cifar10``."""
    from PIL import Image
    images = smooth_images(n_test, seed=3)
    for part, count in (("train", 10), ("test", n_test)):
        for i in range(count):
            folder = root / part / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i % n_test]).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cifar_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar10_folder(tmp_path_factory.mktemp("cifar10"))


FEW = ["gaussian_noise", "frost", "zoom_blur"]


def test_generate_writes_the_official_layout_that_the_loader_reads(cifar_src: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "c10c"
    meta = cifar_c.generate(out, "cifar10", cifar_src, n_images=4, seed=3, progress=False)
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(
        [f"{c}.npy" for c in cc.CORRUPTIONS] + ["labels.npy"])
    x, y, _ = cifar_c.source_images("cifar10", cifar_src, 4)
    root = cc.find_root(out)
    assert cc.list_corruptions(root) == list(cc.CORRUPTIONS)
    for k, name in enumerate(cc.CORRUPTIONS):
        arr = np.load(out / f"{name}.npy")
        assert arr.dtype == np.uint8 and arr.shape == (20, 32, 32, 3)
        for s in (1, 5):
            xb, yb = cc.load_corruption(root, name, s)
            assert np.array_equal(yb.numpy(), y)
            expected = cifar_c.corrupt(x[2], name, s, np.random.default_rng([3, k, s, 2]))
            assert np.array_equal(xb[2].permute(1, 2, 0).numpy(), expected)
    saved = cifar_c.read_meta(out)
    assert saved["what"] == "regenerated CIFAR-10-C" and saved["released_files"] is False
    assert saved["seed"] == 3 and saved["n_images"] == 4 and meta["n_images"] == 4
    assert "make_cifar_c.py" in saved["parameters_source"]
    assert saved["versions"]["imagecorruptions"] != "not installed"
    assert np.load(out / "labels.npy").dtype == np.uint8


def test_generation_is_deterministic_resumable_and_prefix_stable(cifar_src: Path,
                                                                tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    cifar_c.generate(a, "cifar10", cifar_src, n_images=4, corruptions=FEW, progress=False)
    cifar_c.generate(b, "cifar10", cifar_src, n_images=2, corruptions=FEW, progress=False)
    for name in FEW:
        big, small = np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy")
        for s in range(5):  # the first 2 images of each severity block do not depend on n
            assert np.array_equal(big[4 * s:4 * s + 2], small[2 * s:2 * s + 2])
    first = {n: (a / f"{n}.npy").read_bytes() for n in FEW}
    mtime = (a / "frost.npy").stat().st_mtime_ns
    (a / "zoom_blur.npy").unlink()
    (a / "gaussian_noise.npy").write_bytes(b"truncated")
    cifar_c.generate(a, "cifar10", cifar_src, n_images=4, corruptions=FEW, progress=False)
    assert (a / "frost.npy").stat().st_mtime_ns == mtime  # finished file skipped
    assert {n: (a / f"{n}.npy").read_bytes() for n in FEW} == first  # redone identically
    with pytest.raises(UsageError, match="seed"):
        cifar_c.generate(a, "cifar10", cifar_src, n_images=4, seed=1, corruptions=FEW,
                         progress=False)
    cifar_c.generate(a, "cifar10", cifar_src, n_images=4, seed=1, corruptions=FEW[:1],
                     force=True, progress=False)
    from io import BytesIO
    assert not np.array_equal(np.load(a / "gaussian_noise.npy"),
                              np.load(BytesIO(first["gaussian_noise"])))
    assert cifar_c.read_meta(a)["seed"] == 1


def test_generate_cli_and_bad_input(cifar_src: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from benchmark.cli import cli
    out = tmp_path / "out"
    base = ["corruptions", "--generate", "--data-dir", str(out), "--dataset", "cifar10",
            "--source-dir", str(cifar_src), "--no-progress"]
    res = CliRunner().invoke(cli, base + ["--n-images", "99"])
    assert res.exit_code == 2 and "only 12 test images" in res.output and not out.exists()
    res = CliRunner().invoke(cli, base + ["--corruptions", "fog,nope"])
    assert res.exit_code == 2 and "nope" in res.output and not out.exists()
    res = CliRunner().invoke(cli, ["corruptions", "--data-dir", str(out)])
    assert res.exit_code == 2 and "--run" in res.output
    res = CliRunner().invoke(cli, ["corruptions", "--generate", "--data-dir", str(out)])
    assert res.exit_code == 2 and "--source-dir" in res.output and not out.exists()
    res = CliRunner().invoke(cli, base + ["--n-images", "2", "--corruptions", "fog,contrast"])
    assert res.exit_code == 0, res.output
    assert "regenerated CIFAR-10-C" in res.output
    assert cc.list_corruptions(out) == ["fog", "contrast"]


def test_rows_and_tables_on_regenerated_files_say_so(rgb_run: Path, cifar_src: Path,
                                                     tmp_path: Path) -> None:
    from benchmark.report.report import write_report

    released = tmp_path / "released"
    write_cifar10c(released, names=["fog"], n=4)
    regen = tmp_path / "regen"
    cifar_c.generate(regen, "cifar10", cifar_src, n_images=4, corruptions=["fog"],
                     progress=False)
    rows = cc.evaluate_corruptions(rgb_run, released, n_examples=4)
    rows_regen = cc.evaluate_corruptions(rgb_run, regen, n_examples=4)
    assert all(r["corruption_provenance"].startswith("regenerated CIFAR-10-C")
               for r in rows_regen)
    assert not any("regenerated" in r["corruption_provenance"] for r in rows)
    assert {r["eval_key"] for r in rows}.isdisjoint({r["eval_key"] for r in rows_regen})
    mds = write_report(rows_regen, tmp_path / "report", plots=False)
    table5 = [m for m in mds if "Table 5" in m]
    assert table5 and "regenerated CIFAR-10-C" in table5[0].splitlines()[0]
    data_line = next(line for line in table5[0].splitlines() if line.startswith("Data:"))
    assert ". Corruptions: regenerated CIFAR-10-C" in data_line  # its own sentence


def test_frost_works_first_in_a_fresh_process_and_leaves_no_stand_in() -> None:
    """imagecorruptions 1.1.2 imports pkg_resources (gone from recent setuptools): the package's
    files are reached through the stand-in import, which is removed afterwards."""
    import subprocess
    import sys
    code = ("import sys, numpy as np; from benchmark.eval import cifar_c; "
            "had = 'pkg_resources' in sys.modules; "
            "out = cifar_c.corrupt(np.zeros((32, 32, 3), np.uint8), 'frost', 5, "
            "np.random.default_rng(0)); "
            "assert out.dtype == np.uint8 and out.mean() > 20, out.mean(); "
            "assert had or 'pkg_resources' not in sys.modules or "
            "hasattr(sys.modules['pkg_resources'], 'require')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
