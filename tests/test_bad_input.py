"""Bad input and faults through the CLI: one line on stderr, the documented exit status, no
traceback, and no run folder or row where none should be.

The table drives ``benchmark.cli.main`` in-process (fast); kill -9 and SIGTERM use a
subprocess. Every case records (clean error, traceback, wrong exit status, data lost);
``test_zz_table_counts`` prints the totals (``pytest -s``) and asserts them.
"""
from __future__ import annotations

import errno
import gzip
import math
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from benchmark.run.resolve import resolve_run_config
from benchmark.data import load_dataset
from benchmark.store import RunStore, append_jsonl, read_jsonl
from benchmark.run.train import train_run
from benchmark.testing import CliResult as Result, run_cli as advbench, wait_for_epochs

HP = {"epochs": 2, "lr_milestones": [1], "train_attack_steps": 1, "val_attack_steps": 1,
      "batch_size": 64, "train_subset": 128, "val_size": 32}
TOTALS = {"cases": 0, "clean errors": 0, "tracebacks": 0, "wrong exit statuses": 0,
          "data lost": 0}


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (synthetic data), copied by the cases that need one."""
    root = tmp_path_factory.mktemp("trained")
    cfg = resolve_run_config("st", "synthetic", arch="tiny", user_hparams=HP)
    return train_run(cfg, load_dataset("synthetic"), RunStore(root / "runs"), progress=False)


def copy_run(trained: Path, tmp: Path) -> Path:
    dst = tmp / "runs" / "synthetic" / "st" / trained.name
    shutil.copytree(trained, dst)
    return dst


def train_args(runs: Path, hp: Optional[dict] = None, *extra: str, defense: str = "st") -> list:
    return ["train", "--defense", defense, "--dataset", "synthetic", "--arch", "tiny",
            "--runs-dir", str(runs), "--no-progress", "--device", "cpu",
            "--hparams", json.dumps({**HP, **(hp or {})}, allow_nan=True), *extra]


def run_args(runs: Path, *extra: str) -> list:
    return ["run", "--defenses", "st", "--dataset", "synthetic", "--arch", "tiny",
            "--runs-dir", str(runs), "--no-progress", "--device", "cpu", "--attacks", "fgsm",
            "--hparams", json.dumps(HP), *extra]


def idx(path: Path, magic: int, dims: tuple, payload: bytes, gz: bool = False) -> None:
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def mnist(tmp: Path, n_train: int = 20, n_test: int = 10, *, labels_train: Optional[int] = None,
          bad: str = "", gz: bool = False) -> Path:
    """A small MNIST layout under tmp/mnist; ``bad`` breaks one thing."""
    raw = tmp / "mnist" / "MNIST" / "raw"
    for part, n in (("train", n_train), ("t10k", n_test)):
        size = 27 if bad == "size" and part == "train" else 28
        payload = bytes(n * size * size)
        if bad == "truncated" and part == "train":
            payload = payload[:-100]
        magic = 0x0803 if not (bad == "magic" and part == "train") else 0x0903
        idx(raw / f"{part}-images-idx3-ubyte", magic, (n, size, size), payload, gz)
        m = labels_train if (labels_train is not None and part == "train") else n
        labels = bytes([i % 10 for i in range(m)])
        if bad == "label" and part == "train":
            labels = bytes([12] * m)
        idx(raw / f"{part}-labels-idx1-ubyte", 0x0801, (m,), labels, gz)
    if bad == "badgz":
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    return tmp / "mnist"


def ckpt_file(trained: Path, tmp: Path, edit: Callable[[dict], object],
              replace: bool = False) -> Path:
    """A copy of the run's checkpoint after ``edit`` (or its result, with ``replace``)."""
    ck = torch.load(trained / "ckpt_best.pt", weights_only=True)
    new = edit(ck)
    path = tmp / "edited.pt"
    torch.save(new if replace else ck, path)
    return path


class Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/advbench-pwned",))


# ------------------------------------------------------------------------------ the table
@dataclass
class Case:
    name: str
    argv: Callable[[Path, Path], list]  # (tmp, trained run) -> args; may set up files
    needle: str
    code: int = 2
    creates: bool = False  # a run folder may (or must, for faults) exist afterwards
    check: Optional[Callable[[Path], bool]] = None  # True if no data was lost
    marks: list = field(default_factory=list)


def R(tmp: Path) -> Path:
    return tmp / "runs"


def hp_case(name: str, hp: dict, needle: str, defense: str = "st") -> Case:
    return Case(name, lambda t, tr: train_args(R(t), hp, defense=defense), needle)


def no_cuda() -> list:
    return [pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")]


def _file(t: Path, name: str = "afile") -> Path:
    (t / name).write_text("x")
    return t / name


def _readonly(t: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; use a read-only mount
        return Path("/proc/sys/advbench-runs")
    d = t / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d / "runs"


def _eval_args(run: Path, *extra: str) -> list:
    return ["evaluate", "--run", str(run), "--attacks", "fgsm", "--n-examples", "16",
            "--no-progress", "--device", "cpu", *extra]


def _ckpt_eval(edit: Callable[[dict], object], replace: bool = False
               ) -> Callable[[Path, Path], list]:
    def argv(t: Path, tr: Path) -> list:
        return ["evaluate", "--checkpoint-file", str(ckpt_file(tr, t, edit, replace)),
                "--attacks", "fgsm",
                "--n-examples", "16", "--no-progress", "--device", "cpu",
                "--out", str(t / "out")]
    return argv


def _scale_weights(ck: dict, value: float) -> None:
    for k, v in ck["model"].items():
        if v.is_floating_point() and "weight" in k:
            v.fill_(value)


def _set_nan(ck: dict) -> None:
    next(v for v in ck["model"].values() if v.is_floating_point()).fill_(float("nan"))


def _bad_config(text: str) -> Callable[[Path, Path], list]:
    def argv(t: Path, tr: Path) -> list:
        run = copy_run(tr, t)
        (run / "config.json").write_text(text)
        shutil.rmtree(run / "eval", ignore_errors=True)
        return _eval_args(run)
    return argv


def _rows_file(text: str) -> Callable[[Path, Path], list]:
    def argv(t: Path, tr: Path) -> list:
        (t / "rows.jsonl").write_text(text)
        return ["report", "--rows", str(t / "rows.jsonl"), "--out", str(t / "out"), "--no-plots"]
    return argv


def _mnist_train(missing: bool = False, **kw: object) -> Callable[[Path, Path], list]:
    def argv(t: Path, tr: Path) -> list:
        root = t / "empty" if missing else mnist(t, **kw)  # type: ignore[arg-type]
        return ["train", "--defense", "st", "--dataset", "mnist", "--data-dir", str(root),
                "--arch", "tiny", "--runs-dir", str(R(t)), "--no-progress", "--device", "cpu",
                "--hparams", json.dumps(HP)]
    return argv


CASES = [
    # --- hyperparameters (issue 15 items 3, 4) ---
    hp_case("lr null", {"lr": None}, "'lr' expects a value, got null"),
    hp_case("lr_milestones ['a']", {"lr_milestones": ["a"]}, "lr_milestones"),
    hp_case("val_every 0", {"val_every": 0}, "'val_every' must be >= 1"),
    hp_case("epochs 1e400", {"epochs": float("inf")}, "'epochs' expects a finite number"),
    hp_case("epochs 1.5", {"epochs": 1.5}, "'epochs' expects int"),
    hp_case("train_subset 0", {"train_subset": 0}, "'train_subset' must be >= 1"),
    hp_case("val_size -5", {"val_size": -5}, "'val_size' must be >= 1"),
    hp_case("select_by bogus", {"select_by": "bogus"}, "'select_by' must be one of"),
    hp_case("lr Infinity", {"lr": float("inf")}, "'lr' expects a finite number"),
    hp_case("lr NaN", {"lr": float("nan")}, "'lr' expects a finite number"),
    hp_case("lr 0", {"lr": 0.0}, "'lr' must be > 0"),
    hp_case("lr negative", {"lr": -0.1}, "'lr' must be > 0"),
    hp_case("batch_size 0", {"batch_size": 0}, "'batch_size' must be >= 1"),
    hp_case("batch_size 2.5", {"batch_size": 2.5}, "'batch_size' expects int"),
    hp_case("epochs -1", {"epochs": -1}, "'epochs' must be >= 0"),
    hp_case("momentum 1.5", {"momentum": 1.5}, "'momentum' must be in [0, 1]"),
    hp_case("weight_decay -1", {"weight_decay": -1.0}, "'weight_decay' must be >= 0"),
    hp_case("lr_gamma 0", {"lr_gamma": 0.0}, "'lr_gamma' must be > 0"),
    hp_case("eps 2", {"eps": 2.0}, "eps must lie in [0, 1]"),
    hp_case("train_attack_steps -1", {"train_attack_steps": -1}, "'train_attack_steps' must be"),
    hp_case("train_step_size -0.1", {"train_step_size": -0.1}, "'train_step_size' must be >= 0"),
    hp_case("val_attack_steps 1.0", {"val_attack_steps": 1.0}, "'val_attack_steps' expects int"),
    hp_case("lr_milestones decreasing", {"epochs": 4, "lr_milestones": [3, 2]}, "increasing"),
    hp_case("lr_milestones after epochs", {"lr_milestones": [5]}, "must be <= epochs (2)"),
    hp_case("lr_milestones not a list", {"lr_milestones": 3}, "'lr_milestones' expects list"),
    hp_case("lr_milestones 0", {"lr_milestones": [0]}, "increasing epochs >= 1"),
    hp_case("augment 'yes'", {"augment": "yes"}, "'augment' expects bool"),
    hp_case("amp fp8", {"amp": "fp8"}, "'amp' must be one of"),
    hp_case("unknown key", {"betta": 2}, "unknown hyperparameter 'betta'"),
    hp_case("mart attack_start bogus", {"attack_start": "bogus"}, "'attack_start' must be one of",
            defense="mart"),
    hp_case("dio attack_head sum", {"attack_head": "sum"}, "'attack_head' must be one of",
            defense="dio"),
    hp_case("trades beta 'six'", {"beta": "six"}, "'beta' expects float", defense="trades"),
    hp_case("fsr width 64.5", {"width": 64.5}, "'width' expects int", defense="fsr"),
    Case("hparams not an object", lambda t, tr: train_args(R(t))[:-1] + ["[1]"],
         "must be a JSON object"),
    Case("hparams not JSON", lambda t, tr: train_args(R(t))[:-1] + ["{bad"], "not valid JSON"),
    # --- options ---
    Case("--seeds ''", lambda t, tr: train_args(R(t), None, "--seeds", ""), "at least one"),
    Case("--seeds ','", lambda t, tr: train_args(R(t), None, "--seeds", ","), "at least one"),
    Case("--seeds -1", lambda t, tr: train_args(R(t), None, "--seeds", "-1"), "[0, 2**32)"),
    Case("--seeds 2**70", lambda t, tr: train_args(R(t), None, "--seeds", str(2 ** 70)),
         "[0, 2**32)"),
    Case("--seeds a,b", lambda t, tr: train_args(R(t), None, "--seeds", "a,b"), "integers"),
    Case("--device bogus", lambda t, tr: train_args(R(t))[:-5] + ["--device", "bogus"],
         "'bogus' is not a device"),
    Case("--device cuda without GPU", lambda t, tr: train_args(R(t), None, "--device", "cuda"),
         "no CUDA GPU", marks=no_cuda()),
    Case("evaluate --device cuda:3 without GPU",
         lambda t, tr: _eval_args(copy_run(tr, t), "--device", "cuda:3"), "no CUDA GPU",
         marks=no_cuda()),
    Case("--jobs 0", lambda t, tr: run_args(R(t), "--launcher", "local", "--jobs", "0"),
         "'--jobs': 0 is not in the range x>=1"),
    Case("--gpus-per-job 0", lambda t, tr: run_args(R(t), "--gpus-per-job", "0"), "x>=1"),
    Case("--ddp 0", lambda t, tr: train_args(R(t), None, "--ddp", "0"), "x>=1"),
    Case("--runs-dir is a file", lambda t, tr: train_args(_file(t)), "is a file"),
    Case("--runs-dir under a file", lambda t, tr: train_args(_file(t) / "runs"), "is a file"),
    Case("--runs-dir read-only", lambda t, tr: train_args(_readonly(t)), "not writable"),
    Case("report --out is a file", lambda t, tr: ["report", "--runs-dir", str(tr.parents[2]),
                                                  "--out", str(_file(t))], "is a file"),
    Case("evaluate --out is a file",
         lambda t, tr: ["evaluate", "--checkpoint-file", str(tr / "ckpt_best.pt"), "--out",
                        str(_file(t)), "--no-progress"], "is a file"),
    Case("report --rows missing", lambda t, tr: ["report", "--rows", str(t / "nope.jsonl")],
         "does not exist"),
    Case("run --n-examples 0", lambda t, tr: run_args(R(t), "--n-examples", "0"), "x>=1"),
    Case("run --n-examples -5", lambda t, tr: run_args(R(t), "--n-examples", "-5"), "x>=1"),
    Case("run --batch-size 0", lambda t, tr: run_args(R(t), "--batch-size", "0"), "x>=1"),
    Case("run --batch-size -1", lambda t, tr: run_args(R(t), "--batch-size", "-1"), "x>=1"),
    Case("evaluate --n-examples 0", lambda t, tr: _eval_args(copy_run(tr, t), "--n-examples", "0"),
         "x>=1", creates=True),
    Case("evaluate --batch-size -1",
         lambda t, tr: _eval_args(copy_run(tr, t), "--batch-size", "-1"), "x>=1", creates=True),
    Case("features --n-examples 0",
         lambda t, tr: ["features", "--run", str(copy_run(tr, t)), "--n-examples", "0"], "x>=1",
         creates=True),
    Case("--checkpoints ''", lambda t, tr: run_args(R(t), "--checkpoints", ""), "best and/or last"),
    Case("--checkpoints best,worst", lambda t, tr: run_args(R(t), "--checkpoints", "best,worst"),
         "best and/or last"),
    Case("bench --steps 0", lambda t, tr: ["bench", "--steps", "0"], "x>=1"),
    Case("bench --hparams lr null", lambda t, tr: ["bench", "--arch", "tiny", "--dataset",
                                                   "synthetic", "--hparams", '{"lr": null}'],
         "'lr' expects a value, got null"),
    Case("list bogus", lambda t, tr: ["list", "bogus"], "'bogus' is not one of"),
    Case("corruptions --data-dir missing", lambda t, tr: [
        "corruptions", "--run", str(copy_run(tr, t)), "--data-dir", str(t / "nope")],
         "does not exist", creates=True),
    Case("unknown option", lambda t, tr: train_args(R(t), None, "--bogus"), "No such option"),
    Case("unknown command", lambda t, tr: ["trian"], "No such command"),
    Case("--profile bogus", lambda t, tr: train_args(R(t), None, "--profile", "bogus"),
         "'bogus' is not one of"),
    Case("unknown defense", lambda t, tr: run_args(R(t))[:2] + ["nope"] + run_args(R(t))[3:],
         "unknown defense 'nope'"),
    Case("unknown dataset", lambda t, tr: train_args(R(t), None, "--dataset", "imagenet"),
         "unknown dataset 'imagenet'"),
    Case("evaluate without a target", lambda t, tr: ["evaluate"], "give --run"),
    # --- data files (items 3, 6) ---
    Case("mnist labels shorter than images", _mnist_train(labels_train=15), "do not match"),
    Case("mnist bad magic", _mnist_train(bad="magic"), "magic number"),
    Case("mnist truncated images", _mnist_train(bad="truncated"), "truncated or padded"),
    Case("mnist label 12", _mnist_train(bad="label"), "label 12 outside 0-9"),
    Case("mnist 27x27 images", _mnist_train(bad="size"), "27x27"),
    Case("mnist corrupt .gz", _mnist_train(bad="badgz", gz=True), "cannot read it"),
    Case("mnist missing", _mnist_train(missing=True), "mnist not found"),
    Case("image folder without test images",
         lambda t, tr: (_imgfolder(t), ["train", "--defense", "st", "--dataset", "pics",
                                        "--data-dir", str(t / "pics"), "--arch", "tiny",
                                        "--runs-dir", str(R(t)), "--no-progress"])[1],
         "no images under"),
    # --- checkpoints and run folders (item 4) ---
    Case("zero-byte checkpoint",
         lambda t, tr: ["evaluate", "--checkpoint-file", str(_bytes(t, b""))], "empty file"),
    Case("checkpoint without config", _ckpt_eval(lambda ck: ck.pop("config")), "no 'config'"),
    Case("checkpoint without info", _ckpt_eval(lambda ck: ck.pop("info")), "no 'info'"),
    Case("checkpoint config lacks arch", _ckpt_eval(lambda ck: ck["config"].pop("arch")),
         "lacks arch"),
    Case("checkpoint is a list", _ckpt_eval(lambda ck: [1, 2], replace=True),
         "not an advbench checkpoint"),
    Case("checkpoint is random bytes", lambda t, tr: ["evaluate", "--checkpoint-file",
                                                      str(_bytes(t, os.urandom(300)))],
         "cannot load"),
    Case("malicious pickle", lambda t, tr: ["evaluate", "--checkpoint-file", str(_evil(t))],
         "weights-only"),
    Case("weights do not fit", _ckpt_eval(lambda ck: ck["model"].update(
        {k: v[:1] for k, v in ck["model"].items() if v.dim() >= 1})), "do not fit"),
    Case("NaN weights in checkpoint", _ckpt_eval(_set_nan), "non-finite weights", code=3),
    Case("weights 1e30: outputs inf", _ckpt_eval(lambda ck: _scale_weights(ck, 1e30)),
         "outputs NaN/inf", code=3),
    Case("truncated config.json", _bad_config('{"arch": "ti'), "config.json", creates=True),
    Case("config.json is []", _bad_config("[]"), "expected a JSON object", creates=True),
    Case("run folder without checkpoint", lambda t, tr: _eval_args(_empty_run(t)),
         "no ckpt_best.pt", creates=True),
    Case("report over a run whose only row is {}", lambda t, tr: [
        "report", "--runs-dir", str(_empty_row(copy_run(tr, t)).parents[4]), "--out",
        str(t / "out"), "--no-plots"], "no result rows in", creates=True),
    Case("report over a trained run never evaluated", lambda t, tr: [
        "report", "--runs-dir", str(copy_run(tr, t).parents[2]), "--out", str(t / "out"),
        "--no-plots"], "no evaluation rows under", creates=True),
    Case("rows.jsonl of bare numbers", _rows_file("1\n2\n3\n"), "no result rows in"),
    Case("rows.jsonl of {}", _rows_file("{}\n{}\n"), "no result rows in"),
    Case("rows.jsonl NaN row", _rows_file(json.dumps({
        "run_id": "r", "eval_key": "k", "defense": "st", "dataset": "synthetic", "seed": 0,
        "checkpoint": "best", "attack": "pgd", "eps": 0.03, "n_examples": 0,
        "clean_acc": float("nan"), "robust_acc": float("nan")}) + "\n"), "no result rows in"),
]


def _bytes(t: Path, data: bytes) -> Path:
    (t / "blob.pt").write_bytes(data)
    return t / "blob.pt"


def _evil(t: Path) -> Path:
    import pickle
    path = t / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "advbench-checkpoint", "x": Evil()}))
    return path


def _empty_run(t: Path) -> Path:
    run = R(t) / "synthetic" / "st" / "abc"
    run.mkdir(parents=True)
    return run


def _empty_row(run: Path) -> Path:
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "k.json").write_text("{}")
    return run / "eval" / "k.json"


def _imgfolder(t: Path) -> None:
    from PIL import Image
    for part in ("train", "test"):
        for c in ("a", "b"):
            (t / "pics" / part / c).mkdir(parents=True)
    for c in ("a", "b"):
        Image.new("RGB", (8, 8)).save(t / "pics" / "train" / c / "0.png")


def record(*, clean: bool, traceback: bool, wrong: bool, lost: bool) -> None:
    TOTALS["cases"] += 1
    TOTALS["clean errors"] += clean
    TOTALS["tracebacks"] += traceback
    TOTALS["wrong exit statuses"] += wrong
    TOTALS["data lost"] += lost


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, trained: Path) -> None:
    argv = [str(a) for a in case.argv(tmp_path, trained)]
    before = files(R(tmp_path))
    res = advbench(*argv)
    after = files(R(tmp_path))
    traceback = "Traceback" in res.err
    wrong = res.code != case.code
    created = after - before
    lost = bool(before - after) or (not case.creates and bool(created)) or \
        (case.check is not None and not case.check(tmp_path))
    clean = len(res.lines) == 1 and case.needle in res.lines[0] and \
        res.lines[0].startswith("advbench: error:") and not traceback and not wrong and not lost
    record(clean=clean, traceback=traceback, wrong=wrong, lost=lost)
    assert not traceback, res.err
    assert res.code == case.code, (res.code, res.err)
    assert len(res.lines) == 1, res.err
    assert res.lines[0].startswith("advbench: error:") and case.needle in res.lines[0], res.lines
    assert not created or case.creates, f"created {sorted(created)[:5]}"
    assert not (before - after), "files disappeared"
    assert not Path("/tmp/advbench-pwned").exists()


# ------------------------------------------------------------------------------ faults
def _count(res: Result, expected: int, lost: bool) -> None:
    traceback = "Traceback" in res.err
    record(clean=not traceback and res.code == expected and not lost and len(res.lines) <= 1,
           traceback=traceback, wrong=res.code != expected, lost=lost)


def test_weights_blow_up_with_finite_loss_exit_3_last_good_checkpoint_finite(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue item 1: weights that blow up while the logged loss is finite are never saved."""
    import benchmark.run.train as train_mod
    real = train_mod.train_epoch

    def epoch(model, *a, **k):  # type: ignore[no-untyped-def]
        stats = real(model, *a, **k)
        if a[5] == 1:  # the second epoch: a weight overflows after the last loss check
            next(p for p in model.parameters() if p.dim() > 1).data.mul_(1e30).mul_(1e30)
        return stats
    monkeypatch.setattr(train_mod, "train_epoch", epoch)
    res = advbench(*train_args(R(tmp_path), {"epochs": 3, "lr_milestones": [2]}))
    run = next(R(tmp_path).glob("*/*/*"))
    last = torch.load(run / "ckpt_last.pt", weights_only=True)
    finite = all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    log = [r["epoch"] for r in read_jsonl(run / "train_log.jsonl")]
    _count(res, 3, lost=log != [1])
    assert res.code == 3 and len(res.lines) == 1 and "epoch 2" in res.lines[0], res.err
    assert "non-finite weights" in res.lines[0] or "outputs NaN/inf" in res.lines[0]
    assert last["epoch"] == 1 and finite and log == [1]
    assert not (run / "TRAINED").exists()


def test_lr_gamma_1e30_never_marked_trained(tmp_path: Path) -> None:
    """Issue item 1's command: exit 3 (loss or weights), no TRAINED, checkpoints finite."""
    res = advbench(*train_args(R(tmp_path), {"lr": 1e30, "epochs": 2}))
    run = next(R(tmp_path).glob("*/*/*"))
    ok = all(torch.isfinite(v).all() for f in run.glob("ckpt_*.pt")
             for v in torch.load(f, weights_only=True)["model"].values() if v.is_floating_point())
    _count(res, 3, lost=not ok)
    assert res.code == 3 and len(res.lines) == 1
    # the line says what is on disk (issue 22): a kept checkpoint, or none
    kept = "last good checkpoint kept" in res.lines[0]
    assert kept == bool(list(run.glob("ckpt_*.pt"))), res.lines[0]
    assert kept or "no checkpoint was saved" in res.lines[0]
    assert ok and not (run / "TRAINED").exists()


def test_full_disk_is_one_line_and_resume_loses_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > 4:  # config, epoch 1 (log, best, last) fit; then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    res = advbench(*train_args(R(tmp_path), {"epochs": 3, "lr_milestones": [2]}))
    monkeypatch.setattr(os, "fsync", real)
    run = next(R(tmp_path).glob("*/*/*"))
    tmp_left = list(run.glob(".*.tmp"))
    again = advbench(*train_args(R(tmp_path), {"epochs": 3, "lr_milestones": [2]}))
    log = [r["epoch"] for r in read_jsonl(run / "train_log.jsonl")]
    _count(res, 2, lost=log != [1, 2, 3] or bool(tmp_left))
    assert res.code == 2 and len(res.lines) == 1 and "No space left on device" in res.lines[0]
    assert not tmp_left and again.code == 0, again.err
    assert log == [1, 2, 3] and (run / "TRAINED").exists()


def _resume_case(tmp_path: Path, damage: Callable[[Path], None]) -> tuple[Result, Path]:
    args = train_args(R(tmp_path), {"epochs": 3, "lr_milestones": [2]})
    cfg = resolve_run_config("st", "synthetic", arch="tiny",
                             user_hparams={**HP, "epochs": 3, "lr_milestones": [2]})
    run = train_run(cfg, load_dataset("synthetic"), RunStore(R(tmp_path)), progress=False,
                    stop_after=2)
    damage(run)
    return advbench(*args), run


def test_truncated_log_line_is_repaired_on_resume(tmp_path: Path) -> None:
    def cut(run: Path) -> None:  # killed mid-append of epoch 3's line (before its checkpoint)
        with open(run / "train_log.jsonl", "a") as fh:
            fh.write('{"epoch": 3, "lo')
    res, run = _resume_case(tmp_path, cut)
    log = [r["epoch"] for r in read_jsonl(run / "train_log.jsonl")]
    _count(res, 0, lost=log != [1, 2, 3])
    assert res.code == 0 and log == [1, 2, 3]


def test_log_line_without_its_checkpoint_is_not_duplicated(tmp_path: Path) -> None:
    """A kill between the log line and the checkpoint: the epoch is retrained, logged once."""
    def extra_line(run: Path) -> None:
        append_jsonl(run / "train_log.jsonl", {"epoch": 3, "loss": 9.0})
    res, run = _resume_case(tmp_path, extra_line)
    log = read_jsonl(run / "train_log.jsonl")
    _count(res, 0, lost=[r["epoch"] for r in log] != [1, 2, 3])
    assert res.code == 0 and [r["epoch"] for r in log] == [1, 2, 3] and log[-1]["loss"] != 9.0


def test_orphan_tmp_removed_on_resume_and_files_follow_umask(tmp_path: Path) -> None:
    def orphan(run: Path) -> None:
        (run / ".ckpt_last.pt.somehost-999999.deadbeef.tmp").write_bytes(b"half")
        (run / ".ckpt_last.pt.abc123.tmp").write_bytes(b"half")  # older naming
    old = os.umask(0o022)
    try:
        res, run = _resume_case(tmp_path, orphan)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir() if p.is_file()}
    _count(res, 0, lost=False)
    assert res.code == 0 and not list(run.glob(".*.tmp"))
    assert modes["ckpt_last.pt"] == 0o644 and modes["config.json"] == 0o644, modes


def test_cached_bad_rows_are_recomputed_not_reused(tmp_path: Path, trained: Path) -> None:
    run = copy_run(trained, tmp_path)
    first = advbench(*_eval_args(run))
    assert first.code == 0, first.err
    row_file = next(f for f in (run / "eval").glob("*.json")
                    if json.loads(f.read_text()).get("kind") == "attack")
    good = json.loads(row_file.read_text())
    for bad in ("{}", json.dumps({**good, "n_examples": 0, "clean_acc": float("nan")}), "7"):
        row_file.write_text(bad)
        res = advbench(*_eval_args(run))
        fixed = json.loads(row_file.read_text())
        _count(res, 0, lost=fixed.get("clean_acc") != good["clean_acc"])
        assert res.code == 0 and fixed["n_examples"] == 16, res.err
        assert fixed["clean_acc"] == good["clean_acc"]
        assert any("ignoring" in ln for ln in res.lines), res.err


def test_gz_only_mnist_is_accepted(tmp_path: Path) -> None:
    data = load_dataset("mnist", mnist(tmp_path, gz=True))
    assert len(data.train) == 20 and len(data.test) == 10 and data.train.x.shape[1:] == (1, 28, 28)


def test_unexpected_error_is_one_line_exit_1_traceback_only_with_debug(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmark.run.train as train_mod

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(train_mod, "train_run", boom)
    res = advbench(*train_args(R(tmp_path)))
    _count(res, 1, lost=False)
    assert res.code == 1 and len(res.lines) == 1 and "ZeroDivisionError: a bug" in res.lines[0]
    dbg = advbench("--debug", *train_args(R(tmp_path)))
    assert dbg.code == 1 and "Traceback" in dbg.err


def _spawn(runs: Path, epochs: int) -> subprocess.Popen:
    hp = json.dumps({**HP, "epochs": epochs, "lr_milestones": [epochs], "train_subset": 256})
    cmd = [sys.executable, "-m", "benchmark.cli", "-q", *train_args(runs)[:-2], "--hparams", hp]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_then_kill_minus_nine_then_resume_lose_no_epoch(tmp_path: Path) -> None:
    """SIGTERM at epoch >= 2 (one line, exit 143), resume, kill -9 at epoch >= 4, resume: the
    log holds every epoch exactly once and no temp file is left."""
    runs, epochs = tmp_path / "runs", 8
    for sig, code, at in ((signal.SIGTERM, 143, 2), (signal.SIGKILL, -9, 4)):
        proc = _spawn(runs, epochs)
        run = wait_for_epochs(proc, runs, at)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        traceback = "Traceback" in err
        done = [r["epoch"] for r in read_jsonl(run / "train_log.jsonl")]
        lost = done != list(range(1, len(done) + 1)) or len(done) < at
        record(clean=proc.returncode == code and not traceback and not lost and
               (sig == signal.SIGKILL or len(lines) == 1),
               traceback=traceback, wrong=proc.returncode != code, lost=lost)
        assert proc.returncode == code and not traceback, err
        if sig == signal.SIGTERM:
            assert len(lines) == 1 and "terminated" in lines[0], err
    again = _spawn(runs, epochs)
    again.communicate(timeout=300)
    log = [r["epoch"] for r in read_jsonl(run / "train_log.jsonl")]
    assert again.returncode == 0
    assert log == list(range(1, epochs + 1)) and not list(run.glob(".*.tmp"))
    assert (run / "TRAINED").exists()


# ------------------------------------------------------------------------------ issue 22
class Touch:
    """A pickled object whose unpickling creates ``path`` (proof that code ran)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


def _evil_cifar(root: Path, marker: Path) -> Path:
    """A complete CIFAR-10 python layout whose first training batch runs code when
    unpickled; the other files are valid."""
    import pickle

    import numpy as np
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
        if f == "data_batch_1":
            batch["data"] = Touch(marker)  # type: ignore[assignment]
        (folder / f).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    return root


def _not_pwned(t: Path) -> bool:
    return not (t / "pwned").exists()


def _robustbench() -> list:
    try:
        from benchmark.eval.zoo import import_robustbench
        import_robustbench()
    except Exception as exc:  # the zoo extra is not installed
        return [pytest.mark.skip(reason=f"robustbench not importable: {exc}")]
    return []


def _evil_zoo_weights(t: Path) -> Path:
    import pickle
    path = t / "models" / "cifar10" / "Linf" / "Ding2020MMA.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({"state_dict": Touch(t / "pwned")}))
    return t / "models"


CASES_22 = [
    Case("cifar10 batch that runs code", lambda t, tr: [
        "train", "--defense", "st", "--dataset", "cifar10", "--data-dir",
        str(_evil_cifar(t / "data", t / "pwned")), "--arch", "tiny", "--runs-dir", str(R(t)),
        "--no-progress", "--device", "cpu", "--hparams", json.dumps(HP)],
         "refused global", check=_not_pwned),
    hp_case("val_size above a fifth of the training set", {"val_size": 4000},
            "'val_size' 4000 is more than a fifth"),
    hp_case("lr 1e300 overflows float32", {"lr": 1e300}, "more than a float32 update holds"),
    hp_case("lr_gamma 1e300 overflows after the first milestone", {"lr_gamma": 1e300},
            "'lr' × 'lr_gamma'^1 (after epoch 1)"),
    Case("hparams duplicate key",
         lambda t, tr: train_args(R(t))[:-1] + ['{"lr": 0.1, "epochs": 1, "lr": 0.2}'],
         "gives the key 'lr' twice"),
    Case("train --arch bogus", lambda t, tr: train_args(R(t))[:6] + ["bogus"] + train_args(R(t))[7:],
         "unknown arch 'bogus'"),
    Case("run --arch bogus", lambda t, tr: run_args(R(t))[:6] + ["bogus"] + run_args(R(t))[7:],
         "unknown arch 'bogus'"),
    Case("malicious RobustBench weights", lambda t, tr: [
        "evaluate", "--robustbench", "Ding2020MMA", "--model-dir", str(_evil_zoo_weights(t)),
        "--runs-dir", str(R(t)), "--n-examples", "4", "--no-progress"],
         "cannot load RobustBench weights", check=_not_pwned, marks=_robustbench()),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES_22])
def test_bad_input_issue_22(case: Case, tmp_path: Path, trained: Path) -> None:
    test_bad_input(case, tmp_path, trained)


def test_ood_set_is_read_only_from_the_named_folder_and_never_runs_code(tmp_path: Path) -> None:
    """The rejection suite's OOD CIFAR-10 (MNIST-scale runs): a crafted batch in the parent of
    --data-dir is not read, one in the named folder is refused; no code runs either way."""
    from benchmark.data import DataInfo
    from benchmark.eval.rejection import ood_sets

    grey = DataInfo("m", 10, 1, 28, (0.5,), (0.5,), "mnist", flip=False)
    _evil_cifar(tmp_path, tmp_path / "pwned")
    empty = tmp_path / "empty"
    empty.mkdir()
    sets, skipped = ood_sets(grey, 3, empty)
    assert "cifar10-grey" not in sets and skipped and not (tmp_path / "pwned").exists()
    sets, skipped = ood_sets(grey, 3, tmp_path)
    assert "cifar10-grey" not in sets and "refused global" in skipped[0], skipped
    assert not (tmp_path / "pwned").exists()


def test_a_cifar_batch_of_arrays_lists_and_bytes_still_loads(tmp_path: Path) -> None:
    """The restricted unpickler admits what the official batches hold (protocols 2 and 5)."""
    import pickle

    import numpy as np
    from benchmark.data import read_cifar_batch
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for proto in (2, 5):
        (tmp_path / "b").write_bytes(pickle.dumps(
            {"data": data, "labels": [3, 4], "batch_label": b"x", "filenames": [b"a", b"b"]},
            protocol=proto))
        got = read_cifar_batch(tmp_path / "b")
        assert np.array_equal(got["data"], data) and got["labels"] == [3, 4]


def test_a_30000_character_key_is_cut_in_the_error(tmp_path: Path) -> None:
    res = advbench(*train_args(R(tmp_path), {"k" * 30000: 1}))
    _count(res, 2, lost=bool(files(R(tmp_path))))
    assert res.code == 2 and len(res.lines) == 1 and "unknown hyperparameter" in res.lines[0]
    assert len(res.lines[0]) < 2500 and "more characters" in res.lines[0]


def test_cached_rows_and_verdicts_follow_the_checkpoint_contents(tmp_path: Path,
                                                                 trained: Path) -> None:
    """Evaluate and check a run, then replace ckpt_best.pt with NaN weights: neither command
    reuses the rows of the old checkpoint (exit 3), and the old rows are kept aside."""
    run = copy_run(trained, tmp_path)
    assert advbench(*_eval_args(run)).code == 0
    assert advbench("check", "--run", str(run), "--cheap", "--device", "cpu").code == 0
    old = {f.name for f in (run / "eval").glob("*.json")}
    nan = ckpt_file(trained, tmp_path, _set_nan)
    shutil.copy(nan, run / "ckpt_best.pt")
    for args in (_eval_args(run), ["check", "--run", str(run), "--cheap", "--device", "cpu"]):
        res = advbench(*args)
        _count(res, 3, lost=False)
        assert res.code == 3 and len(res.lines) == 1 and "non-finite weights" in res.lines[0], \
            res.err
    assert not any(f.name in old and json.loads(f.read_text()).get("kind") == "attack"
                   for f in (run / "eval").glob("*.json"))
    assert {f.name for f in run.glob("stale/*/eval/*.json")} & old


def _blow_up_at_epoch_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmark.run.train as train_mod
    real = train_mod.train_epoch

    def epoch(model, *a, **k):  # type: ignore[no-untyped-def]
        stats = real(model, *a, **k)
        if a[5] == 1:
            next(p for p in model.parameters() if p.dim() > 1).data.mul_(1e30).mul_(1e30)
        return stats
    monkeypatch.setattr(train_mod, "train_epoch", epoch)


def test_evaluating_a_run_that_failed_carries_the_failure(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Training exits 3 at epoch 2; evaluating its epoch-1 checkpoint warns, and the report
    marks the row with the health mark and a footnote."""
    _blow_up_at_epoch_2(monkeypatch)
    assert advbench(*train_args(R(tmp_path), {"epochs": 3, "lr_milestones": [2]})).code == 3
    run = next(R(tmp_path).glob("*/*/*"))
    res = advbench(*_eval_args(run))
    assert res.code == 0 and any("training failed" in ln for ln in res.lines), res.err
    assert json.loads((run / "eval" / "health.json").read_text())["verdict"] == "nan"
    rep = advbench("report", "--runs-dir", str(R(tmp_path)), "--out", str(tmp_path / "out"),
                   "--no-plots", "--no-print")
    assert rep.code == 0, rep.err
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| st | " in md and "‡" in md and "non-finite weights or outputs at epoch 2" in md


def test_nan_in_the_first_epoch_does_not_claim_a_kept_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmark.run.train as train_mod
    from benchmark.run.health import DivergedError

    def epoch(*a, **k):  # type: ignore[no-untyped-def]
        raise DivergedError("st", 1, 0, math.nan)
    monkeypatch.setattr(train_mod, "train_epoch", epoch)
    res = advbench(*train_args(R(tmp_path)))
    _count(res, 3, lost=False)
    assert res.code == 3 and len(res.lines) == 1, res.err
    assert "checkpoint kept" not in res.lines[0] and "no checkpoint was saved" in res.lines[0]
    assert not list(R(tmp_path).glob("*/*/*/ckpt_*.pt"))


def test_robustbench_errors_are_one_line_without_warnings(tmp_path: Path) -> None:
    """In a fresh process (pytest would capture the warnings): no FutureWarning lines."""
    if _robustbench():
        pytest.skip("robustbench not importable")
    for name, needle in (("Bogus2099", "Bogus2099"),
                         ("Ding2020MMA", "cannot load RobustBench weights")):
        proc = subprocess.run([sys.executable, "-m", "benchmark.cli", "-q", "evaluate",
                               "--robustbench", name, "--model-dir", str(tmp_path / "models"),
                               "--runs-dir", str(R(tmp_path))],
                              capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        record(clean=proc.returncode == 2 and len(lines) == 1,
               traceback="Traceback" in proc.stderr, wrong=proc.returncode != 2, lost=False)
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
        if name == "Bogus2099":
            _evil_zoo_weights(tmp_path)
    assert not (tmp_path / "pwned").exists()


HOSTILE = "<script>alert(1)</script> | **x** \\input{/etc/passwd} `y`"


def test_hostile_names_are_escaped_in_markdown_latex_and_csv(tmp_path: Path) -> None:
    row = {"run_id": "r", "eval_key": "k", "defense": HOSTILE, "dataset": "synthetic",
           "seed": 0, "checkpoint": "best", "arch": "tiny", "profile": "cpu", "attack": "fgsm",
           "kind": "attack", "norm": "linf", "eps": 8 / 255, "eps_str": "8/255",
           "hparams": {"eps": 8 / 255}, "n_examples": 10, "clean_acc": 0.5, "robust_acc": 0.25,
           "data_provenance": "=cmd|' /C calc'!A0 <b>"}
    formula = {**row, "eval_key": "k2", "run_id": "r2", "defense": "=HYPERLINK(\"x\")"}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(formula) + "\n")
    res = advbench("report", "--rows", str(tmp_path / "rows.jsonl"), "--out",
                   str(tmp_path / "out"), "--no-plots", "--no-print")
    assert res.code == 0, res.err
    md = (tmp_path / "out" / "report.md").read_text()
    outside = re.sub(r"(`+).+?\1", "", md)  # code spans show their text literally
    assert "<script>" not in outside and "<b>" not in outside and "**x**" not in outside
    header = next(ln for ln in md.splitlines() if ln.startswith("| defense |"))
    body = next(ln for ln in md.splitlines() if "alert(1)" in ln and ln.startswith("|"))
    cells = re.split(r"(?<!\\)\|", body)  # an escaped \| is not a cell border
    assert len(cells) == len(re.split(r"(?<!\\)\|", header)), body
    tex = "".join(f.read_text() for f in (tmp_path / "out" / "tables").glob("*.tex"))
    assert "\\input" not in tex and "\\textbackslash{}input\\{/etc/passwd\\}" in tex
    assert "<script>" not in tex and "\\textless{}script\\textgreater{}" in tex
    import csv
    for f in (tmp_path / "out" / "tables").glob("*.csv"):
        for rec in csv.reader(f.open()):
            assert not any(c.startswith(("=", "+", "@")) for c in rec), (f.name, rec)


def test_a_refused_run_shows_in_the_report_with_its_reason(
        tmp_path: Path, trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A nondeterministic eval forward (defense not declared randomized): evaluate refuses
    (exit 2), and the report lists the run and the reason instead of dropping it."""
    from defenses import DEFENSES
    run = copy_run(trained, tmp_path)
    assert advbench(*_eval_args(run)).code == 0
    cls = DEFENSES.get("st")
    real = cls.build_model

    def noisy(self, arch, info):  # type: ignore[no-untyped-def]
        model = real(self, arch, info)
        model.register_forward_hook(lambda m, i, out: out + torch.randn_like(out))
        return model
    monkeypatch.setattr(cls, "build_model", noisy)
    res = advbench(*_eval_args(run, "--checkpoint", "last"))
    assert res.code == 2 and "not deterministic" in res.lines[-1], res.err
    monkeypatch.setattr(cls, "build_model", real)
    rep = advbench("report", "--runs-dir", str(R(tmp_path)), "--out", str(tmp_path / "out"),
                   "--no-plots", "--no-print")
    assert rep.code == 0, rep.err
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("Runs refused by evaluation", 1)[1]
    assert "`st`" in section and "`last`" in section and "not deterministic" in section
    missing = (tmp_path / "out" / "tables" / "missing.csv").read_text()
    assert "refused: model is not deterministic" in missing
    page = (tmp_path / "out" / "index.html").read_text()
    listed = page.split("Runs refused by evaluation", 1)[1].split("</ul>", 1)[0]
    assert "<code>st</code>" in listed and "<code>last</code>" in listed
    assert "not deterministic" in listed


def test_check_defense_accepts_a_declared_randomized_defense() -> None:
    from benchmark.testing import check_defense
    from defenses import DEFENSES
    base = DEFENSES.get("st")

    class Noisy(base):  # type: ignore[misc, valid-type]
        randomized = True

        def build_model(self, arch, info):  # type: ignore[no-untyped-def]
            model = super().build_model(arch, info)
            model.register_forward_hook(lambda m, i, out: out + 0.1 * torch.randn_like(out))
            return model
    Noisy.name = "noisy-st"
    check_defense(Noisy)


def test_a_third_party_plugin_that_raises_is_one_line_exit_2(tmp_path: Path) -> None:
    """An exception from a plugin the user installed is their input (exit 2, one line naming
    the plugin), not an internal error; no run folder is left."""
    from defenses import DEFENSES
    base = DEFENSES.get("st")

    class Broken(base):  # type: ignore[misc, valid-type]
        def build_model(self, arch, info):  # type: ignore[no-untyped-def]
            raise RuntimeError("plugin bug")
    DEFENSES._add("broken-plugin", Broken, "some-dist")
    try:
        res = advbench(*train_args(R(tmp_path), defense="broken-plugin"))
    finally:
        DEFENSES._entries.pop("broken-plugin", None)
    _count(res, 2, lost=bool(files(R(tmp_path))))
    assert res.code == 2 and len(res.lines) == 1, res.err
    assert "defense plugin 'broken-plugin' from some-dist failed: RuntimeError: plugin bug" \
        in res.lines[0]
    assert not files(R(tmp_path))


def test_zz_table_counts() -> None:
    """The totals of every case above (run the whole file; ``-s`` shows them)."""
    print("\nbad-input table: " + ", ".join(f"{k} {v}" for k, v in TOTALS.items()))
    if TOTALS["cases"] < 60:
        pytest.skip(f"only {TOTALS['cases']} cases ran (run the whole file for the totals)")
    assert TOTALS["clean errors"] == TOTALS["cases"]
    assert TOTALS["tracebacks"] == TOTALS["wrong exit statuses"] == TOTALS["data lost"] == 0


def test_validation_keeps_every_committed_run_id() -> None:
    """Validation only accepts or refuses: each committed run's config resolves (with its
    overrides) to the same values, and to the same run id where no hyperparameter was added
    since (a new key changes the id by design)."""
    import dataclasses

    configs = sorted(Path(__file__).resolve().parents[1].glob("results/runs/*/*/*/config.json"))
    if not configs:
        pytest.skip("no committed runs in this checkout")
    for f in configs:
        c = json.loads(f.read_text())
        kw = dict(profile=c["profile"], arch=c["arch"], seed=c["seed"], scale=c["data"]["scale"])
        base = resolve_run_config(c["defense"], c["dataset"], **kw).hparams
        user = {k: v for k, v in c["hparams"].items() if base.get(k) != v}
        cfg = resolve_run_config(c["defense"], c["dataset"], user_hparams=user, **kw)
        cfg = dataclasses.replace(cfg, protocol_version=c.get("protocol_version", 1))
        assert {k: cfg.hparams[k] for k in c["hparams"] if k in cfg.hparams} == \
            {k: v for k, v in c["hparams"].items() if k in cfg.hparams}, f
        if set(cfg.hparams) == set(c["hparams"]):
            assert cfg.run_id == c["run_id"], f


# ------------------------------------------------------------------------------ issue 31
def _row(**fields: object) -> dict:
    """A valid attack row (the report builds tables from it)."""
    return {"run_id": "r", "eval_key": "k", "defense": "st", "dataset": "synthetic", "seed": 0,
            "checkpoint": "best", "arch": "tiny", "profile": "cpu", "attack": "fgsm",
            "kind": "attack", "norm": "linf", "eps": 8 / 255, "eps_str": "8/255",
            "hparams": {"eps": 8 / 255}, "n_examples": 10, "clean_acc": 0.5, "robust_acc": 0.25,
            **fields}


def _outside(root: Path, *inside: Path) -> set[str]:
    """Files under ``root`` that are not under any of ``inside``."""
    return {str(p) for p in root.rglob("*") if p.is_file()
            and not any(p.is_relative_to(d) for d in inside)}


HOSTILE_NAMES = ["../../../../x", "../y", "/tmp/advbench-abs", "a/b", "..", ".", "", "x\ny",
                 "a\\b", "é", "x" * 65, "-rf"]


@pytest.mark.parametrize("field_", ["dataset", "profile"])
@pytest.mark.parametrize("value", HOSTILE_NAMES, ids=repr)
def test_row_fields_never_become_paths_report_rows(tmp_path: Path, field_: str,
                                                   value: str) -> None:
    """Class 1: a row's dataset/profile names table files: a value that is not an identifier
    is a bad file (exit 2, one line naming it), and nothing is written anywhere."""
    base = tmp_path / "a" / "b" / "c" / "d"
    base.mkdir(parents=True)
    (base / "rows.jsonl").write_text(json.dumps(_row()) + "\n"
                                     + json.dumps(_row(eval_key="k2", **{field_: value})) + "\n")
    res = advbench("report", "--rows", str(base / "rows.jsonl"), "--out", str(base / "out"),
                   "--no-plots", "--no-print")
    _count(res, 2, lost=False)
    assert res.code == 2 and len(res.lines) == 1 and field_ in res.lines[0], res.err
    assert str(base / "rows.jsonl") in res.lines[0]
    assert _outside(tmp_path, base / "rows.jsonl") == set() and not (base / "out").exists()
    assert not Path("/tmp/advbench-abs_cpu.md").exists()


def test_row_fields_never_become_paths_run_folder_and_robustbench(tmp_path: Path,
                                                                  trained: Path) -> None:
    """The same from a run folder's eval/*.json, and from report() / the RobustBench export
    given rows directly (library callers)."""
    from benchmark.errors import DataError
    from benchmark.report.report import write_report
    from benchmark.report.robustbench import write_model_info

    run = copy_run(trained, tmp_path)
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "evil.json").write_text(json.dumps(_row(dataset="../../../../../../x")))
    res = advbench("report", "--runs-dir", str(R(tmp_path)), "--out", str(tmp_path / "out"),
                   "--no-plots", "--no-print")
    assert res.code == 2 and len(res.lines) == 1 and "evil.json" in res.lines[0], res.err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("x_*"))
    for bad in ({"dataset": "../x"}, {"profile": "/abs"}):
        with pytest.raises(DataError):
            write_report([_row(**bad)], tmp_path / "out2", plots=False)
        assert not (tmp_path / "out2").exists()
    aa = _row(attack="autoattack", eval_key="k3", dataset="..")
    with pytest.raises(DataError):
        write_model_info([_row(dataset=".."), aa], tmp_path / "rb")
    assert _outside(tmp_path, R(tmp_path)) == set()


def _stamp(run: Path) -> Path:
    return run / "eval" / ".checkpoint-best.sha256"


@pytest.mark.parametrize("text", ["../../../../../../escaped-stamp", "/tmp/advbench-stamp-abs",
                                  "0" * 63, "g" * 64, "\x00", ""], ids=repr)
def test_a_stamp_is_a_hex_digest_or_nothing(tmp_path: Path, trained: Path, text: str) -> None:
    """Class 1: the stamp's text never names a folder: a stamp that is not a 64-hex digest
    counts as no stamp (it is replaced); rows that record the checkpoint's hash are kept, and
    nothing is written outside the run folder."""
    run = copy_run(trained, tmp_path)
    assert advbench(*_eval_args(run)).code == 0
    rows = {f.name: f.read_bytes() for f in (run / "eval").glob("*.json")}
    _stamp(run).write_text(text)
    res = advbench(*_eval_args(run))
    assert res.code == 0, res.err
    assert _outside(tmp_path, run) == set() and not Path("/tmp/advbench-stamp-abs").exists()
    assert {f.name: f.read_bytes() for f in (run / "eval").glob("*.json")} == rows  # reused
    from benchmark.eval.target import file_sha256
    assert _stamp(run).read_text().strip() == file_sha256(run / "ckpt_best.pt")


def test_a_symlinked_stamp_is_replaced_never_followed(tmp_path: Path, trained: Path) -> None:
    run = copy_run(trained, tmp_path)
    assert advbench(*_eval_args(run)).code == 0
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    _stamp(run).unlink()
    _stamp(run).symlink_to(precious)
    res = advbench(*_eval_args(run))
    assert res.code == 0, res.err
    assert precious.read_text() == "keep me\n"
    assert not _stamp(run).is_symlink() and len(_stamp(run).read_text().strip()) == 64


def test_a_symlinked_eval_folder_is_refused(tmp_path: Path, trained: Path) -> None:
    """A run whose eval/ points outside it: evaluation writes nothing there (exit 2)."""
    run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "eval", ignore_errors=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "eval").symlink_to(elsewhere)
    res = advbench(*_eval_args(run))
    assert res.code == 2 and len(res.lines) == 1 and "outside" in res.lines[0], res.err
    assert not list(elsewhere.iterdir())


def test_cached_rows_need_the_checkpoint_hash_they_record(tmp_path: Path,
                                                          trained: Path) -> None:
    """Class 2: without a stamp a row is not reused for a replaced checkpoint (it records the
    hash it was computed on), and a row that says it was computed on `last` is not reused for
    `best`."""
    from benchmark.eval.target import file_sha256
    run = copy_run(trained, tmp_path)
    assert advbench(*_eval_args(run)).code == 0
    (key_file,) = [f for f in (run / "eval").glob("*.json")
                   if json.loads(f.read_text()).get("attack") == "fgsm"]
    _stamp(run).unlink()
    halved = ckpt_file(trained, tmp_path, lambda ck: _scale_weights(ck, 0.01))
    shutil.copy(halved, run / "ckpt_best.pt")
    res = advbench(*_eval_args(run))
    assert res.code == 0, res.err
    row = json.loads(key_file.read_text())
    assert row["inputs_sha256"]["checkpoint"] == file_sha256(run / "ckpt_best.pt")
    assert list(run.glob("stale/*/eval/*.json"))  # the old row is kept aside
    # a row of `last` planted under the key of `best`
    assert advbench(*_eval_args(run, "--checkpoint", "last")).code == 0
    last = next(json.loads(f.read_text()) for f in (run / "eval").glob("*.json")
                if json.loads(f.read_text()).get("checkpoint") == "last"
                and json.loads(f.read_text()).get("attack") == "fgsm")
    key_file.write_text(json.dumps({**last, "eval_key": key_file.stem}))
    assert advbench(*_eval_args(run)).code == 0
    assert json.loads(key_file.read_text())["checkpoint"] == "best"


def _ood_folder(root: Path, value: int) -> Path:
    from PIL import Image
    for part in ("train", "test"):
        for c in ("0", "1"):
            (root / "mnist" / part / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.new("L", (28, 28), color=(value + 40 * i) % 256).save(
                    root / "mnist" / part / c / f"{i}.png")
    return root


def test_the_ood_row_follows_the_ood_set_content(tmp_path: Path, trained: Path) -> None:
    """Class 2: the rejection suite's OOD row is recomputed when --ood-data-dir holds other
    images (same folder names), and reused while they are the same."""
    from benchmark.eval.rejection import evaluate_rejection
    run = copy_run(trained, tmp_path)
    kw = dict(n_examples=16, device="cpu", lambdas=(1.0,))
    first = evaluate_rejection(run, ood_data_dir=_ood_folder(tmp_path / "a", 10), **kw)
    ood_a = next(r for r in first if r["negatives"] == "ood-mnist-rgb")
    again = evaluate_rejection(run, ood_data_dir=tmp_path / "a", **kw)
    assert next(r for r in again if r["negatives"] == "ood-mnist-rgb")["created"] == \
        ood_a["created"]
    second = evaluate_rejection(run, ood_data_dir=_ood_folder(tmp_path / "b", 200), **kw)
    ood_b = next(r for r in second if r["negatives"] == "ood-mnist-rgb")
    assert ood_b["inputs_sha256"]["ood_set"] != ood_a["inputs_sha256"]["ood_set"]
    assert ood_b["auroc"] != ood_a["auroc"] or ood_b["created"] != ood_a["created"]


def _cifar10_folder(root: Path, n: int = 10, size: int = 32, classes: int = 10) -> Path:
    """A tiny image-folder stand-in for CIFAR-10 (random RGB images)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for i in range(n):
            folder = root / part / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                folder / f"{i}.png")
    return root


def test_a_killed_corruption_generation_is_never_read_as_whole(
        tmp_path: Path, trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Class 2: `corruptions --generate` writes into a hidden sibling folder renamed into place
    when complete: killed after 2 corruptions, --data-dir does not exist; a folder left by an
    older advbench (record lists 19, 4 present) is refused by `corruptions --run`."""
    from benchmark.eval import cifar_c
    from benchmark.eval import corruptions as cc
    src = _cifar10_folder(tmp_path / "src")
    out = tmp_path / "c10c"
    real, calls = cifar_c.corrupt, []

    def dying(x, name, s, rng):  # type: ignore[no-untyped-def]
        calls.append(name)
        if len(set(calls)) > 2:
            raise KeyboardInterrupt  # kill -9 stand-in: nothing after this point runs
        return real(x, name, s, rng)
    monkeypatch.setattr(cifar_c, "corrupt", dying)
    with pytest.raises(KeyboardInterrupt):
        cifar_c.generate(out, "cifar10", src, n_images=2, corruptions=["fog", "contrast",
                                                                       "snow"], progress=False)
    assert not out.exists()
    monkeypatch.setattr(cifar_c, "corrupt", real)
    meta = cifar_c.generate(out, "cifar10", src, n_images=2, corruptions=["fog", "contrast",
                                                                          "snow"], progress=False)
    assert meta["corruptions"] == ["snow", "fog", "contrast"]
    assert cc.list_corruptions(out) == ["snow", "fog", "contrast"]
    assert not list(tmp_path.glob(".c10c*"))
    (out / "fog.npy").unlink()  # what an interrupted older generation leaves
    res = advbench("corruptions", "--run", str(copy_run(trained, tmp_path)), "--data-dir",
                   str(out), "--device", "cpu", "--no-progress")
    assert res.code == 2 and res.lines[-1].startswith("advbench: error:"), res.err
    assert "incomplete CIFAR-10-C generation: 1 of its 3" in res.lines[-1]  # (after a warning
    # that the synthetic run is not a CIFAR-10 model)


def _cifar_batches(root: Path, edit: Callable[[str, bytes], bytes] = lambda f, b: b,
                   labels: Optional[list] = None) -> Path:
    """A complete CIFAR-10 python layout (4 images a batch); ``edit`` rewrites a file's
    pickle bytes, ``labels`` replaces the first training batch's labels."""
    import pickle

    import numpy as np
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.full((4, 3072), 7, np.uint8), "labels": [0, 1, 2, 3]}
        if f == "data_batch_1" and labels is not None:
            batch["labels"] = labels
        (folder / f).write_bytes(edit(f, pickle.dumps(batch, protocol=2)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    return root


#: the pickled state of a plain uint8 dtype ends with its flags (0); these set others
_DTYPE_FLAGS = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"


def _forge_flags(flags: int) -> Callable[[str, bytes], bytes]:
    def edit(f: str, raw: bytes) -> bytes:
        assert _DTYPE_FLAGS in raw
        return raw.replace(_DTYPE_FLAGS, _DTYPE_FLAGS[:-2] + bytes([flags]) + b"t") \
            if f == "data_batch_1" else raw
    return edit


def _forge_typecode(raw_from: bytes, raw_to: bytes) -> Callable[[str, bytes], bytes]:
    def edit(f: str, raw: bytes) -> bytes:
        return raw.replace(raw_from, raw_to) if f == "data_batch_1" else raw
    return edit


def _cifar_train(edit: Callable[[str, bytes], bytes] = lambda f, b: b,
                 labels: Optional[list] = None) -> Callable[[Path, Path], list]:
    def argv(t: Path, tr: Path) -> list:
        return ["train", "--defense", "st", "--dataset", "cifar10", "--data-dir",
                str(_cifar_batches(t / "data", edit, labels)), "--arch", "tiny", "--runs-dir",
                str(R(t)), "--no-progress", "--device", "cpu", "--hparams", json.dumps(HP)]
    return argv


def _pics(t: Path, sizes: dict[str, tuple[int, int]], test_classes: tuple = ("a", "b")) -> Path:
    """An image folder: ``sizes`` maps train/<class>/<file> to its size."""
    from PIL import Image
    for c in test_classes:
        (t / "pics" / "test" / c).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(t / "pics" / "test" / c / "0.png")
    for rel, size in sizes.items():
        (t / "pics" / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(t / "pics" / "train" / rel)
    return t / "pics"


def _pics_train(**kw: object) -> Callable[[Path, Path], list]:
    def argv(t: Path, tr: Path) -> list:
        return ["train", "--defense", "st", "--dataset", "pics", "--data-dir",
                str(_pics(t, **kw)), "--arch", "tiny", "--runs-dir", str(R(t)),  # type: ignore[arg-type]
                "--no-progress", "--device", "cpu", "--hparams", json.dumps(HP)]
    return argv


_SQUARE = {"a/0.png": (8, 8), "b/0.png": (8, 8)}

CASES_31 = [
    # --- class 3: the pickle never chooses a dtype or its flags ---
    Case("cifar10 batch whose uint8 dtype has object/refcount flags",
         _cifar_train(_forge_flags(0x3f)), "forged dtype"),
    Case("cifar10 batch whose dtype sets the refcount flag only",
         _cifar_train(_forge_flags(0x01)), "forged dtype"),
    Case("cifar10 batch of object dtype", _cifar_train(_forge_typecode(b"X\x02\x00\x00\x00u1",
                                                                       b"X\x02\x00\x00\x00O8")),
         "'O8'"),
    Case("cifar10 batch whose shape claims more bytes than it holds",
         _cifar_train(_forge_typecode(b"M\x00\x0c", b"M\x00\x0d")), "needs"),
    Case("cifar10 label 10", _cifar_train(labels=[0, 1, 2, 10]), "label 10 outside 0-9"),
    Case("cifar10 label -1", _cifar_train(labels=[0, 1, -1, 3]), "label -1 outside 0-9"),
    # --- class 4: errors of the image reader are bad files ---
    Case("image folder of mixed sizes", _pics_train(sizes={**_SQUARE, "b/1.png": (9, 8)}),
         "one size per folder"),
    Case("image folder whose test/ has a class train/ lacks",
         _pics_train(sizes=_SQUARE, test_classes=("a", "b", "zzz")), "zzz"),
    Case("image folder with a file that is not an image",
         lambda t, tr: (_pics_train(sizes=_SQUARE)(t, tr),
                        (t / "pics" / "train" / "a" / "1.png").write_bytes(b"not png"))[0],
         "cannot read it as an image"),
    Case("report --rows JSON nested 100,000 deep", _rows_file("[" * 100000 + "\n"),
         "nested too deeply"),
    Case("false-alarms --rows JSON nested 100,000 deep",
         lambda t, tr: (_rows_file("{\"a\":" * 100000 + "\n")(t, tr),
                        ["false-alarms", "--rows", str(t / "rows.jsonl")])[1],
         "nested too deeply"),
    Case("report --rows with a 1 MB defense name",
         _rows_file(json.dumps(_row(defense="d" * (1 << 20))) + "\n"), "at most 256"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES_31])
def test_bad_input_issue_31(case: Case, tmp_path: Path, trained: Path) -> None:
    test_bad_input(case, tmp_path, trained)
    assert not (tmp_path / "out").exists()


def test_decompression_bombs_are_bad_files(tmp_path: Path, trained: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Class 4: PIL's decompression-bomb check (here at a lowered pixel limit) is a bad file
    in a training image folder, an OOD folder and a corruption source: exit 2 naming it."""
    from PIL import Image

    from benchmark.data import DataInfo
    from benchmark.eval.rejection import ood_sets
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 8×8 = 64 > 2 × 20: an error
    res = advbench(*[str(a) for a in _pics_train(sizes=_SQUARE)(tmp_path, trained)])
    assert res.code == 2 and len(res.lines) == 1 and "decompression bomb" in res.lines[0], res.err
    assert "0.png" in res.lines[0] and not files(R(tmp_path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 64 > 50: PIL only warns; refused too
    src = _cifar10_folder(tmp_path / "src", size=8)
    res = advbench("corruptions", "--generate", "--data-dir", str(tmp_path / "c10c"),
                   "--source-dir", str(src), "--n-images", "2", "--corruptions", "fog",
                   "--no-progress")
    assert res.code == 2 and len(res.lines) == 1 and "decompression bomb" in res.lines[0], res.err
    assert not (tmp_path / "c10c").exists()
    rgb = DataInfo("c", 10, 3, 8, (0.5,) * 3, (0.5,) * 3, "cifar")
    sets, skipped = ood_sets(rgb, 4, _ood_folder(tmp_path / "ood", 10))
    assert "mnist-rgb" not in sets and "decompression bomb" in skipped[0]


def test_an_empty_ood_folder_is_named_not_a_crash(tmp_path: Path) -> None:
    from benchmark.data import DataInfo
    from benchmark.eval.rejection import ood_sets
    for part in ("train", "test"):
        (tmp_path / "mnist" / part / "0").mkdir(parents=True)
    rgb = DataInfo("c", 10, 3, 8, (0.5,) * 3, (0.5,) * 3, "cifar")
    sets, skipped = ood_sets(rgb, 4, tmp_path)
    assert "mnist-rgb" not in sets and "no images under" in skipped[0], skipped


def test_false_alarms_reads_the_rows_report_accepts(tmp_path: Path) -> None:
    """Class 4: a check row that report refuses (n_examples 0) is not counted by
    false-alarms either; a row whose dataset cannot name a file is refused (exit 2)."""
    ok = {"kind": "check", "check": "cheap", "defense": "st", "status": "pass", "seed": 0,
          "run_id": "r1", "checkpoint": "best", "dataset": "synthetic", "n_examples": 10}
    bad = {**ok, "run_id": "r2", "status": "fail", "n_examples": 0}
    from benchmark.eval.checks import CHECK_VERSIONS, CHECKS
    ok["check"] = bad["check"] = next(iter(CHECKS))
    ok["check_version"] = bad["check_version"] = CHECK_VERSIONS[ok["check"]]
    (tmp_path / "rows.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    res = advbench("false-alarms", "--rows", str(tmp_path / "rows.jsonl"))
    assert res.code == 0, res.err
    assert "0/1" in res.out and "1/2" not in res.out, res.out
    (tmp_path / "rows.jsonl").write_text(json.dumps({**ok, "dataset": "../x"}) + "\n")
    res = advbench("false-alarms", "--rows", str(tmp_path / "rows.jsonl"))
    assert res.code == 2 and len(res.lines) == 1 and "dataset" in res.lines[0], res.err


def test_report_output_is_bounded_by_a_multiple_of_its_rows(tmp_path: Path) -> None:
    """Class 4: tables larger than OUTPUT_MULTIPLE × the rows (+ slack) are refused before
    any is written."""
    import benchmark.report.report as rep
    from benchmark.errors import DataError
    rows = [_row(eval_key=f"k{i}", run_id=f"r{i}", seed=i, defense="d" * 250) for i in range(3)]
    rep.write_report(rows, tmp_path / "ok", plots=False)  # the default budget holds them
    old = rep.OUTPUT_SLACK
    try:
        rep.OUTPUT_SLACK = 0
        rep.OUTPUT_MULTIPLE = 1
        with pytest.raises(DataError, match="more than 1× the"):
            rep.write_report(rows, tmp_path / "out", plots=False)
    finally:
        rep.OUTPUT_SLACK, rep.OUTPUT_MULTIPLE = old, 20
    assert not (tmp_path / "out" / "tables").exists()


# ------------------------------------------------------------------------------ issue 31 fuzz
def _fuzz_text():  # type: ignore[no-untyped-def]
    """Hostile text: path pieces, separators, dots, control and non-ASCII characters."""
    from hypothesis import strategies as st
    piece = st.sampled_from(["..", ".", "/", "\\", "~", "x", "-", "_", "é", "\x00", "\n", "%",
                             "tables", "..%2f", "/tmp", "$HOME", " "])
    return st.one_of(st.lists(piece, max_size=8).map("".join), st.text(max_size=20))


def test_fuzz_row_fields_never_write_outside_the_output_folder(tmp_path: Path) -> None:
    """Any dataset/profile/defense/checkpoint text in a row: `report` exits 0 or 2 (never 1),
    and every file it writes is inside --out."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    counter = iter(range(10 ** 6))

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(field_=st.sampled_from(["dataset", "profile", "defense", "checkpoint", "arch"]),
           value=_fuzz_text())
    def check(field_: str, value: str) -> None:
        base = tmp_path / f"case{next(counter)}" / "deep" / "er"
        base.mkdir(parents=True)
        (base / "rows.jsonl").write_text(json.dumps(_row(eval_key="k0")) + "\n" + json.dumps(
            _row(**{field_: value})) + "\n")
        res = advbench("report", "--rows", str(base / "rows.jsonl"), "--out",
                       str(base / "out"), "--no-plots", "--no-print")
        assert res.code in (0, 2) and "internal error" not in res.err, (field_, value, res.err)
        assert _outside(base.parents[1], base / "out", base / "rows.jsonl") == set(), value
        if res.code == 2:
            assert len(res.lines) == 1 and not (base / "out").exists()
    check()
    assert _outside(tmp_path, *tmp_path.glob("case*")) == set()


def test_fuzz_stamp_contents_never_name_a_path(tmp_path: Path, trained: Path) -> None:
    """Any stamp text (or bytes): the stale rows stay inside the run folder, the stamp ends as
    the checkpoint's digest, and nothing outside the run is written."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from benchmark.eval.target import file_sha256, retire_stale_rows
    run = copy_run(trained, tmp_path)
    assert advbench(*_eval_args(run)).code == 0
    sha = file_sha256(run / "ckpt_best.pt")
    legacy = tmp_path / "legacy.json"  # a row without inputs_sha256: moved by a bad stamp
    row = next(r for r in map(lambda f: json.loads(f.read_text()), (run / "eval").glob("*.json"))
               if r.get("attack") == "fgsm")
    row.pop("inputs_sha256", None)
    legacy.write_text(json.dumps({**row, "eval_key": "legacy"}))

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(content=st.one_of(_fuzz_text(), st.binary(max_size=80),
                             st.just(("../" * 8 + "x").encode()), st.just(b"/" + b"a" * 63)))
    def check(content: object) -> None:
        shutil.copy(legacy, run / "eval" / "legacy.json")
        stamp = _stamp(run)
        if isinstance(content, bytes):
            stamp.write_bytes(content)
        else:
            stamp.write_text(content, errors="surrogateescape")
        retire_stale_rows(run, "best", run / "ckpt_best.pt")
        assert stamp.read_text().strip() == sha
        assert not (run / "eval" / "legacy.json").exists()  # no valid stamp: not reused
        assert _outside(tmp_path, run, legacy) == set()
        assert all(p.resolve().is_relative_to(run.resolve()) for p in run.rglob("*"))
    check()
