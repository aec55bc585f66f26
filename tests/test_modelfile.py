"""``--model-file``: models trained anywhere, in files that run no code when loaded.

A plain model saved as safetensors (advbench's ``tiny`` arch) or as a ``torch.export`` .pt2
(a plain ``nn.Sequential``) gets, through ``advbench evaluate --model-file``, the same
per-sample headline as ``benchmark.evaluate_model`` on the same points. Crafted files that
run code under an unrestricted load (a pickle whose ``__reduce__`` creates a marker file,
disguised as safetensors, as a torch.save file, inside a .pt2 that needs torch.export's
unrestricted fallback; TorchScript) are refused with exit 2 and the marker never appears.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import benchmark
from benchmark.data import load_dataset
from benchmark.eval.worstcase import from_hex
from benchmark.models import create
from benchmark.testing import run_cli as advbench, train_plain

N = 40


def synthetic_plain(model: nn.Module) -> nn.Module:
    """``model`` trained by a plain PyTorch loop on the synthetic training split."""
    x, y = load_dataset("synthetic").train.floats()
    torch.manual_seed(0)
    return train_plain(model, x, y, epochs=6, lr=0.05, batch_size=64)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    info = load_dataset("synthetic").info
    return synthetic_plain(create("tiny", num_classes=10, in_channels=3, mean=info.mean,
                                  std=info.std))


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    return synthetic_plain(nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(),
                                         nn.Linear(64, 10)))


def export_pt2(model: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.rand(2, 3, 8, 8),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def cli_headline(runs: Path) -> np.ndarray:
    (row,) = [r for r in (json.loads(p.read_text()) for p in runs.rglob("eval/headline-*.json"))
              if r["n_examples"] == N]
    return from_hex(row["robust_bits"], N)


@pytest.mark.parametrize("fmt", ["safetensors", "pt2"])
def test_model_file_round_trip_gives_the_api_headline(fmt: str, tiny: nn.Module, mlp: nn.Module,
                                                      tmp_path: Path) -> None:
    model = tiny if fmt == "safetensors" else mlp
    if fmt == "safetensors":
        path, extra = tmp_path / "mine.safetensors", ["--arch", "tiny"]
        save_file(model.state_dict(), str(path))
    else:
        path, extra = export_pt2(model, tmp_path / "mine.pt2"), []
    runs = tmp_path / "runs"
    res = advbench("evaluate", "--model-file", str(path), *extra, "--dataset", "synthetic",
                   "--n-examples", str(N), "--attacks", "fgsm,pgd", "--runs-dir", str(runs),
                   "--profile", "cpu", "--device", "cpu", "--no-progress")
    assert res.code == 0, res.err
    assert "headline (worst case)" in res.out
    api = benchmark.evaluate_model(model, dataset="synthetic", n_examples=N, attacks="fgsm,pgd",
                                   checks=False)
    from_file = cli_headline(runs)
    assert np.array_equal(from_file, api.flags["headline"])
    assert 0 < api.clean.value and f"{100 * api.headline.value:6.2f}%" in res.out
    rows = [json.loads(p.read_text()) for p in runs.rglob("eval/*.json")]
    assert {r["defense"] for r in rows} == {"mine"}
    assert all(r["outside"]["source"] == str(path) for r in rows if r["kind"] == "attack")


def test_check_on_a_model_file_says_when_transfer_was_skipped(tiny: nn.Module, mlp: nn.Module,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "mine.safetensors"
    save_file(tiny.state_dict(), str(path))
    args = ["check", "--model-file", str(path), "--arch", "tiny", "--dataset", "synthetic",
            "--n-examples", str(N), "--checks", "zero-gradient,transfer", "--runs-dir",
            str(tmp_path / "runs"), "--device", "cpu"]
    res = advbench(*args)
    assert res.code == 0, res.err
    assert "skipped for want of a source model" in res.out and "reliable:" in res.out
    source = export_pt2(mlp, tmp_path / "source.pt2")
    res = advbench(*args, "--source", str(source))
    assert res.code == 0, res.err
    (line,) = [ln for ln in res.out.splitlines() if "(d) transfer" in ln and ln.startswith("|")]
    assert "| pass |" in line or "| fail |" in line, line
    assert "want of a source" not in res.out


# ------------------------------------------------------------------ files that run code
class Evil:
    """Unpickling this creates the marker file (stands for any code a pickle can run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def crafted(kind: str, tmp_path: Path, marker: Path, mlp: nn.Module) -> Path:
    if kind == "pickle-named-safetensors":
        path = tmp_path / "weights.safetensors"
        path.write_bytes(__import__("pickle").dumps(Evil(marker)))
    elif kind == "torch-save":
        path = tmp_path / "weights.pt"
        torch.save({"state_dict": Evil(marker)}, path)
    elif kind == "pt2-needs-fallback":  # sample inputs that only an unrestricted load reads
        good = export_pt2(mlp, tmp_path / "good.pt2")
        buf = io.BytesIO()
        torch.save((Evil(marker),), buf)
        path = tmp_path / "model.pt2"
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
            for item in zin.infolist():
                data = zin.read(item.filename)
                zout.writestr(item, buf.getvalue() if item.filename.endswith(
                    "sample_inputs/model.pt") else data)
    else:  # torchscript
        path = tmp_path / "model.pt2"
        with warnings.catch_warnings():  # torch.jit is deprecated: still what it loads
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.trace(mlp, torch.rand(2, 3, 8, 8)), str(path))
    return path


UNRESTRICTED = {"pickle-named-safetensors": "import pickle; pickle.load(open(P, 'rb'))",
                "torch-save": "import torch; torch.load(P, weights_only=False)",
                "pt2-needs-fallback": "import torch; torch.export.load(P)"}


@pytest.mark.parametrize("kind", ["pickle-named-safetensors", "torch-save",
                                  "pt2-needs-fallback", "torchscript"])
@pytest.mark.parametrize("command", ["evaluate", "check"])
def test_a_file_that_would_run_code_is_refused_and_nothing_runs(
        kind: str, command: str, mlp: nn.Module, tmp_path: Path) -> None:
    marker = tmp_path / "RAN"
    path = crafted(kind, tmp_path, marker, mlp)
    runs = tmp_path / "runs"
    res = advbench(command, "--model-file", str(path), "--arch", "tiny", "--dataset",
                   "synthetic", "--n-examples", "8", "--runs-dir", str(runs), "--device", "cpu")
    assert res.code == 2 and "refused" in res.err and len(res.err.strip().splitlines()) == 1, res
    assert not marker.exists(), "the crafted file ran code"
    assert not runs.exists() or not any(runs.rglob("*.json"))
    if kind in UNRESTRICTED and command == "evaluate":  # the file is a real attack
        subprocess.run([sys.executable, "-c", f"P = {str(path)!r}\n" + UNRESTRICTED[kind]],
                       capture_output=True, timeout=120)
        assert marker.exists(), f"{kind}: the crafted file does not run code when unrestricted"


def test_bad_model_files_are_one_line_exit_2(tiny: nn.Module, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mine.safetensors"
    save_file(tiny.state_dict(), str(path))
    base = ["evaluate", "--model-file", str(path), "--dataset", "synthetic", "--n-examples", "8",
            "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "--attacks", "fgsm"]
    cases = {"do not fit arch small-cnn": ["--arch", "small-cnn"],
             "name their architecture": [],
             "nor a timm model name": ["--arch", "no-such-arch-xyz"]}
    for why, extra in cases.items():
        res = advbench(*base, *extra)
        assert res.code == 2 and why in res.err and len(res.err.strip().splitlines()) == 1, res
    wrong = tmp_path / "five.pt2"  # 5 logits for a 10-class dataset
    export_pt2(nn.Sequential(nn.Flatten(), nn.Linear(192, 5)).eval(), wrong)
    res = advbench("evaluate", "--model-file", str(wrong), "--dataset", "synthetic",
                   "--runs-dir", str(tmp_path / "runs"), "--device", "cpu")
    assert res.code == 2 and "N×10 logits" in res.err and "(2, 5)" in res.err, res
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    res = advbench(*base, "--arch", "resnet50")
    assert res.code == 2 and "pip install timm" in res.err, res
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))


def test_check_on_a_run_says_when_transfer_was_skipped(tmp_path: Path) -> None:
    from benchmark.testing import tiny_st_run
    run = tiny_st_run(tmp_path / "runs", epochs=1)  # the st run is no source for itself
    res = advbench("check", "--run", str(run), "--checks", "transfer", "--n-examples", "8",
                   "--device", "cpu")
    assert res.code == 0, res.err
    (note,) = [ln for ln in res.out.splitlines() if ln.startswith("note:")]
    assert "transfer check (d) was not run" in note and "want of a source model" in note
    assert "give --source" in note
