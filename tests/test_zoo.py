"""RobustBench interop: a zoo architecture evaluated offline, and the model_info export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from benchmark.cli import cli
from benchmark.errors import UsageError

DATA = Path(__file__).parent / "data"
#: RobustBench's model_info/cifar10/Linf/Wong2020Fast.json keys (plus the optional footnote)
RB_KEYS = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
           "venue", "architecture", "eps", "clean_acc", "reported", "autoattack_acc"}
ZOO_MODEL = "Ding2020MMA"  # a WideResNet-28-4 (5.8M parameters): cheap to build and run


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """robustbench (skip if absent), a zoo architecture's state dict saved in RobustBench's
    layout (with the ``module.`` prefix of DataParallel checkpoints), a tiny CIFAR-10 folder."""
    from benchmark.eval.zoo import import_robustbench
    try:
        import_robustbench()
    except UsageError as exc:
        pytest.skip(f"robustbench is not installed (pip install 'advbench[zoo]'): {exc}")
    from PIL import Image
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    tmp = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(5)
    model = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][ZOO_MODEL]["model"]().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a fresh init differs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    weights = tmp / "models" / "cifar10" / "Linf" / f"{ZOO_MODEL}.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    rng = np.random.RandomState(0)
    for split, n in (("train", 1), ("test", 2)):
        for c in range(10):
            d = tmp / "cifar10" / split / f"{c:02d}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)).save(
                    d / f"{i}.png")
    return {"dir": tmp, "model": model}


def test_zoo_model_is_built_and_loaded_from_the_local_file(zoo: dict) -> None:
    from benchmark.eval.zoo import zoo_target

    t = zoo_target(ZOO_MODEL, model_dir=zoo["dir"] / "models", runs_dir=zoo["dir"] / "runs")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(t.model(x), zoo["model"](x), atol=1e-5)
    assert t.cfg.defense == f"rb:{ZOO_MODEL}" and t.checkpoint == "zoo"
    assert t.cfg.hparams["eps"] == pytest.approx(8 / 255)


def test_evaluate_robustbench_writes_rows_like_a_trained_run(zoo: dict) -> None:
    tmp = zoo["dir"]
    args = ["evaluate", "--robustbench", ZOO_MODEL, "--threat", "Linf", "--dataset", "cifar10",
            "--model-dir", str(tmp / "models"), "--data-dir", str(tmp / "cifar10"),
            "--runs-dir", str(tmp / "runs"), "--attacks", "fgsm,pgd", "--n-examples", "4",
            "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rows = {(r := json.loads(p.read_text()))["attack"]: r
            for p in (tmp / "runs").glob("cifar10/*/*/eval/*.json")}
    assert set(rows) == {"fgsm", "pgd", "headline"}  # headline: worst case of the two
    assert rows["headline"]["attacks"] == ["fgsm", "pgd"]
    r = rows["fgsm"]
    assert (r["defense"], r["checkpoint"], r["attack"], r["n_examples"]) == \
        (f"rb:{ZOO_MODEL}", "zoo", "fgsm", 4)
    assert r["eps_str"] == "8/255" and r["zoo"]["name"] == ZOO_MODEL
    assert r["robust_acc"] <= r["clean_acc"]
    # the same model on the same points: the clean accuracy is the saved model's
    from benchmark.data import load_dataset
    data = load_dataset("cifar10", tmp / "cifar10")
    x, y = data.test.floats("cpu")
    with torch.no_grad():
        acc = (zoo["model"](x[:4]).argmax(1) == y[:4]).float().mean().item()
    assert r["clean_acc"] == pytest.approx(acc)
    # the report merges it like any run: its own section (arch, checkpoint zoo) in the tables
    out = tmp / "report"
    res = CliRunner().invoke(cli, ["report", "--runs-dir", str(tmp / "runs"), "--out", str(out),
                                   "--no-print"])
    assert res.exit_code == 0, res.output
    assert f"rb:{ZOO_MODEL}" in (out / "index.html").read_text()
    assert f"rb:{ZOO_MODEL}" in (out / "tables" / "accuracy_cifar10_paper.md").read_text()


def test_missing_weights_never_download_implicitly(zoo: dict, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["evaluate", "--robustbench", ZOO_MODEL, "--model-dir",
                                   str(tmp_path / "empty"), "--runs-dir", str(tmp_path / "runs"),
                                   "--attacks", "fgsm", "--n-examples", "2"])
    assert res.exit_code == 2
    assert "--download" in res.output and f"cifar10/Linf/{ZOO_MODEL}.pt" in res.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "empty").exists()
    res = CliRunner().invoke(cli, ["evaluate", "--robustbench", "NoSuchModel2099", "--model-dir",
                                   str(tmp_path)])
    assert res.exit_code == 2 and "no RobustBench model" in res.output


def test_robustbench_json_has_robustbench_fields_and_formats(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["report", "--rows", str(DATA / "golden_rows.jsonl"), "--out",
                                   str(tmp_path / "out"), "--no-plots", "--no-print",
                                   "--robustbench-json", str(tmp_path / "rb")])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "rb").glob("*/Linf/*.json"))
    assert files and all(p.parent.parent.name in ("cifar10", "mnist5k") for p in files)
    at = json.loads((tmp_path / "rb" / "cifar10" / "Linf" / "at_small-cnn_cpu.json").read_text())
    assert set(at) == RB_KEYS | {"footnote"}
    assert at["link"] == "https://arxiv.org/abs/1706.06083" and at["eps"] == "8/255"
    assert at["authors"] == "Madry et al." and at["venue"] == "ICLR 2018"
    t1 = pd.read_csv(tmp_path / "out" / "tables" / "table1_cifar10_cpu.csv",
                     index_col=["arch", "checkpoint", "defense"])
    row = t1.loc[("small-cnn", "best", "at")]
    assert at["clean_acc"] == f"{row['clean']:.2f}"
    # the export is on AutoAttack's points (100, which every exported row has; issue 21's
    # same-N rule), Table 1 on the 1000 every row covers: seed 0's AutoAttack on 100 points
    rows = [json.loads(line) for line in (DATA / "golden_rows.jsonl").read_text().splitlines()]
    aa100 = [r for r in rows if r.get("defense") == "at" and r.get("attack") == "autoattack"
             and r.get("profile") == "cpu" and r.get("eps_str") == "8/255"
             and r.get("checkpoint") == "best" and r["n_examples"] == 100]
    assert at["autoattack_acc"] == f"{100 * aa100[0]['robust_acc']:.2f}"
    assert "on 100 test points" in at["footnote"]
    assert isinstance(at["additional_data"], bool) and at["number_forward_passes"] == 1
    assert "2 seeds" in at["footnote"]
    # only defenses with an AutoAttack row get a file (RobustBench ranks by it)
    names = {p.stem for p in files}
    assert "st_small-cnn_cpu" not in names
