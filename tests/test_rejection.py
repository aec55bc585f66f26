"""Rejection evaluation: metrics on inputs with known AUROC/FPR, OOD conversion, the adaptive
classifier+detector attack on a toy model, and the CLI → rows → report table and ROC plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from benchmark.cli import cli
from benchmark.run.resolve import resolve_run_config
from benchmark.data import DataInfo, load_dataset
from benchmark.eval.rejection import (DetectorObjective, _convert, adaptive_attack, auroc,
                                      fpr_at, ood_sets, roc_points, threshold_at_tpr)
from benchmark.run.protocols import AttackSpec
from benchmark.store import RunStore
from benchmark.run.train import train_run


def test_auroc_on_known_cases() -> None:
    assert auroc([0, 1, 2], [3, 4]) == 1.0          # every negative scores higher
    assert auroc([3, 4], [0, 1, 2]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5          # ties count one half
    # pairs (neg > pos): 2>1 yes, 2>3 no, 4>1 yes, 4>3 yes → 3/4
    assert auroc([1, 3], [2, 4]) == 0.75
    assert auroc([1, 2], [2, 5]) == (1 + 0.5 + 1 + 1) / 4
    assert math.isnan(auroc([1, 2], []))
    rng = np.random.default_rng(0)  # brute force on random scores with ties
    p, n = rng.integers(0, 20, 50), rng.integers(5, 25, 40)
    brute = np.mean([(b > a) + 0.5 * (b == a) for a in p for b in n])
    assert abs(auroc(p, n) - brute) < 1e-12


def test_threshold_fpr_and_roc() -> None:
    pos = torch.arange(100).float()
    tau = threshold_at_tpr(pos, 0.95)
    assert tau == 94 and int((pos <= tau).sum()) == 95
    assert threshold_at_tpr(torch.arange(1000).float(), 0.95) == 949  # 0.95·1000 in floats
    assert fpr_at(torch.tensor([90.0, 94.0, 95.0, 200.0]), tau) == 0.5
    roc = np.asarray(roc_points(pos, pos + 50))
    assert roc[0].tolist() == [0, 0] and roc[-1].tolist() == [1, 1] and len(roc) <= 101
    assert (np.diff(roc, axis=0) >= 0).all()  # monotone in both coordinates


def test_ood_conversion_to_the_runs_shape() -> None:
    grey = DataInfo("m", 10, 1, 28, (0.1,), (0.3,), "mnist")
    x = torch.rand(2, 3, 32, 32)
    x[:, :, :, :] = torch.tensor([0.2, 0.6, 1.0])[None, :, None, None]  # a flat colour image
    out = _convert(x, grey)
    assert out.shape == (2, 1, 28, 28)
    assert torch.allclose(out, torch.full_like(out, 0.299 * 0.2 + 0.587 * 0.6 + 0.114))
    rgb = DataInfo("c", 10, 3, 32, (0.5,) * 3, (0.5,) * 3, "cifar")
    assert _convert(torch.rand(2, 1, 28, 28), rgb).shape == (2, 3, 32, 32)
    sets, skipped = ood_sets(rgb, 5, None)  # no --data-dir: noise only, MNIST skipped
    assert list(sets) == ["noise"] and sets["noise"][0].shape == (5, 3, 32, 32)
    assert len(skipped) == 1 and "mnist-rgb skipped" in skipped[0]


class _Toy(nn.Module):
    """Two classes on 1×2×2 inputs: logit difference from the mean pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
            self.lin.bias.copy_(torch.tensor([-2.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


class _Softmax:
    score_name = "1 - max softmax"

    def rejection_score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return 1 - torch.softmax(model(x), 1).amax(1)


def test_default_score_shortcut_equals_the_hook() -> None:
    from benchmark.eval.rejection import score_and_logits
    from benchmark.testing import TINY_INFO, make_defense
    from defenses.at import MadryAT
    defense = make_defense(MadryAT)
    model = defense.build_model("tiny", TINY_INFO).eval()
    x = torch.rand(5, 3, 8, 8)
    r, logits = score_and_logits(defense, model, x)
    assert torch.allclose(r, defense.rejection_score(model, x)) and torch.equal(logits, model(x))


def test_adaptive_attack_needs_an_accepted_misclassification() -> None:
    model, defense = _Toy().eval(), _Softmax()
    # class 0 iff mean pixel > 0.5; points near the boundary can be flipped with ε = 0.3
    x = torch.tensor([0.6, 0.7, 0.95]).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    y = torch.zeros(3, dtype=torch.long)
    spec = AttackSpec("pgd", "pgd", "linf", 0.3, {"steps": 10, "step_size": 0.05})
    accept_all, chosen, per_lambda = adaptive_attack(defense, model, spec, x, y, tau=2.0,
                                                     sigma=1.0, lambdas=[0.0])
    with torch.no_grad():
        wrong = model(chosen).argmax(1) != y
    # τ above every score accepts everything: broken = misclassified at the returned x'
    assert torch.equal(accept_all, wrong) and accept_all[:2].all() and not accept_all[2]
    assert per_lambda == {"0": 2} and (chosen - x).abs().max() <= 0.3 + 1e-6
    # a later λ attacks only the points no earlier λ broke (here the unbreakable third one)
    assert adaptive_attack(defense, model, spec, x, y, 2.0, 1.0, [0.0, 10.0])[2] == \
        {"0": 2, "10": 0}
    # τ below every score: nothing is ever accepted, so nothing is broken
    reject_all = adaptive_attack(defense, model, spec, x, y, tau=-1.0, sigma=1.0,
                                 lambdas=[0.0, 10.0])[0]
    assert not reject_all.any()
    # the objective records the first iterate that is wrong and accepted
    obj = DetectorObjective(defense, tau=2.0, sigma=1.0, lam=0.0, x=x)
    x_wrong = torch.zeros_like(x)
    obj(model, x_wrong, x, y)
    assert obj.hit.all() and torch.equal(obj.x_hit, x_wrong)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = load_dataset("synthetic")
    cfg = resolve_run_config("pm-ed-wta", "synthetic", arch="tiny", user_hparams={
        "epochs": 1, "train_attack_steps": 1, "val_attack_steps": 1, "batch_size": 64})
    return train_run(cfg, data, RunStore(tmp_path_factory.mktemp("runs")), progress=False)


def test_cli_rejection_suite_writes_rows_then_report_table_and_roc(tiny_run: Path,
                                                                   tmp_path: Path) -> None:
    args = ["evaluate", "--suite", "rejection", "--run", str(tiny_run), "--n-examples", "40",
            "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(p.read_text()) for p in (tiny_run / "eval").glob("*.json")]
    # ±ED-WTA's code leaves the score open: both options are reported, each a full row set
    by_option = {opt: {r["negatives"]: r for r in rows if r["kind"] == "rejection"
                       and r["score_option"] == opt} for opt in ("nearest-positive", "winner")}
    assert len([r for r in rows if r["kind"] == "rejection"]) == 6
    names = {"nearest-positive": "min_k ½‖f − p_k‖²", "winner": "½‖f − p_w‖², w = argmax_k o_k"}
    for opt, rej in by_option.items():
        assert set(rej) == {"pgd", "adaptive", "ood-noise"}  # synthetic: no MNIST OOD source
        for r in rej.values():
            assert r["score"] == names[opt] and r["n_examples"] == 40
            assert r["score_default"] == (opt == "nearest-positive")
            assert 0 <= r["auroc"] <= 1 or math.isnan(r["auroc"])
        for s in ("pgd", "adaptive"):
            assert rej[s]["robust_acc"] <= rej[s]["robust_acc_reject"] <= rej[s]["clean_acc"]
    # PGD on CE does not depend on the score: the same x', the same robust accuracy
    assert by_option["winner"]["pgd"]["robust_acc"] == \
        by_option["nearest-positive"]["pgd"]["robust_acc"]
    assert by_option["winner"]["pgd"]["tau"] != by_option["nearest-positive"]["pgd"]["tau"]
    stamp = {p: p.stat().st_mtime_ns for p in (tiny_run / "eval").glob("*.json")}
    assert CliRunner().invoke(cli, args).exit_code == 0  # rows are reused, not recomputed
    assert stamp == {p: p.stat().st_mtime_ns for p in (tiny_run / "eval").glob("*.json")}
    st_cfg = resolve_run_config("st", "synthetic", arch="tiny", user_hparams={"epochs": 1})
    st_run = train_run(st_cfg, load_dataset("synthetic"), RunStore(tiny_run.parents[2]),
                       progress=False)
    for run in (tiny_run, st_run):  # attack rows for both; rejection rows for pm-ed-wta only
        assert CliRunner().invoke(cli, ["evaluate", "--run", str(run), "--attacks", "pgd",
                                        "--n-examples", "40", "--device", "cpu",
                                        "--no-progress"]).exit_code == 0
    out = tmp_path / "results"
    res = CliRunner().invoke(cli, ["report", "--runs-dir", str(tiny_run.parents[2]), "--out",
                                   str(out), "--no-print"])
    assert res.exit_code == 0, res.output
    csv = (out / "tables" / "rejection_synthetic_cpu.csv").read_text()
    assert "auroc_pgd" in csv and "accrej_adaptive" in csv and "pm-ed-wta" in csv
    assert "pm-ed-wta [score: winner]" in csv
    # the score option is a row of the rejection table only, not an empty row elsewhere
    assert ",st," not in csv  # no rejection rows: no empty row in the rejection table
    others = list((out / "tables").glob("table*_synthetic_cpu.csv"))
    assert others and all("[score: winner]" not in f.read_text() for f in others)
    page = (out / "index.html").read_text()
    assert 'id="board-synthetic_cpu"' in page and "[score: winner]" not in page  # nor a board row
    assert "AUROC pgd" in (out / "tables" / "rejection_synthetic_cpu.md").read_text()
    assert (out / "plots" / "roc_synthetic_cpu.png").stat().st_size > 1000


def test_rejection_suite_rejects_checkpoint_files(tiny_run: Path) -> None:
    res = CliRunner().invoke(cli, ["evaluate", "--suite", "rejection", "--checkpoint-file",
                                   str(tiny_run / "ckpt_last.pt")])
    assert res.exit_code == 2 and "--run folders only" in res.output


def test_features_use_the_positive_prototypes_as_class_centres(tiny_run: Path) -> None:
    from benchmark.eval.features import evaluate_features
    rows = evaluate_features(tiny_run, n_examples=40, device="cpu")
    assert {r["condition"] for r in rows} == {"clean", "pgd20"}
    for r in rows:
        assert r["centers"] == "PMEDWTA.class_centers" and math.isfinite(r["scr"])
        assert r["feature_dim"] == 32  # the tiny backbone's features, where p_k live


def test_ood_source_is_never_the_runs_own_image_folder(tmp_path: Path) -> None:
    from PIL import Image
    own = tmp_path / "cifar10-jpeg"  # the run's data: --data-dir points at it
    for split in ("train", "test"):
        for c in range(10):  # ten classes, like MNIST: still not taken for MNIST
            (own / split / str(c)).mkdir(parents=True)
            Image.new("RGB", (32, 32), (255, 0, 0)).save(own / split / str(c) / "a.png")
    rgb = DataInfo("c", 10, 3, 32, (0.5,) * 3, (0.5,) * 3, "cifar")
    sets, skipped = ood_sets(rgb, 3, own)
    assert "mnist-rgb" not in sets and "mnist-rgb skipped" in skipped[0]
    digits = tmp_path / "mnist"  # a sibling image folder named after the source
    for split in ("train", "test"):
        (digits / split / "0").mkdir(parents=True)
        Image.new("L", (28, 28), 255).save(digits / split / "0" / "a.png")
    sets, skipped = ood_sets(rgb, 3, own)  # the parent of --data-dir is never read
    assert "mnist-rgb" not in sets and "mnist-rgb skipped" in skipped[0]
    sets, skipped = ood_sets(rgb, 3, tmp_path)  # the folder named as --ood-data-dir is
    assert not skipped and sets["mnist-rgb"][0].shape == (1, 3, 32, 32)
    assert torch.allclose(sets["mnist-rgb"][0], torch.ones(1, 3, 32, 32))
