"""``benchmark.evaluate_model``: advbench's verdict for a model it did not train.

A small MLP trained here in plain PyTorch (its own loop, no advbench code) on 3×8×8 class
templates gets its accuracies, headline, intervals and verdict from one call; the same MLP
behind one of advbench's masked fixtures (rounded logits, a plain ``nn.Module``) is flagged;
the rows render in ``advbench report`` beside a run advbench trained.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import benchmark
from benchmark.errors import UsageError
from benchmark.testing import RoundedLogits, train_plain
from benchmark.testing import templates_data as templates

EPS = 8 / 255
N = 40
#: cheap checks (no AutoAttack, no Square): what the tests need to judge the headline
CHECKS = ["zero-gradient", "unbounded-eps", "fgsm-vs-pgd", "unstable", "transfer"]




def plain_pytorch_model(seed: int = 0) -> nn.Module:
    """Trained the way a user's own script would: plain CE, SGD, a few seconds."""
    x, y = templates(1000, 1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    return train_plain(model, x, y, epochs=10, lr=0.1, batch_size=100)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return plain_pytorch_model()


@pytest.fixture(scope="module")
def points() -> tuple[torch.Tensor, torch.Tensor]:
    return templates(N, 2)


@pytest.fixture(scope="module")
def honest(model: nn.Module, points: tuple) -> "benchmark.EvaluationResult":
    x, y = points
    return benchmark.evaluate_model(model, x=x, y=y, eps=EPS, attacks="fgsm,pgd",
                                    checks=CHECKS, name="my-mlp")


def test_a_plain_pytorch_model_gets_headline_intervals_and_verdict(honest, model, points
                                                                   ) -> None:
    r = honest
    x, y = points
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).numpy()
    assert np.array_equal(r.flags["clean"], clean) and r.clean.value == clean.mean()
    assert set(r.attacks) == {"fgsm", "pgd"} and r.n_examples == N
    for acc in [r.clean, r.headline, *r.attacks.values()]:
        assert 0 <= acc.low <= acc.value <= acc.high <= 1 and acc.n == N
        assert acc.high - acc.low > 0.05  # 40 points: a real interval, not a point
    # the headline is the per-sample worst case: robust only where every attack failed
    for label in ("fgsm", "pgd"):
        assert not (r.flags["headline"] & ~r.flags[label]).any()
    assert r.headline.value <= min(a.value for a in r.attacks.values())
    assert r.headline.value < r.clean.value, "a plain model must lose points to PGD"
    assert {"fgsm", "pgd"} <= set(r.headline_attacks)
    # verdict: an honest model, every judged check passes; transfer skipped and said so
    status = {c.name: c.status for c in r.checks}
    assert status == {"zero-gradient": "pass", "unbounded-eps": "pass", "fgsm-vs-pgd": "pass",
                      "unstable": "pass", "transfer": "skipped"}
    assert r.reliable == "yes" and r.headline.mark == "" and not r.masked
    assert any("transfer" in n and "want of a source" in n for n in r.notes)
    text = str(r)
    assert "reliable: yes" in text and "headline" in text and "want of a source" in text


def test_frame_and_rows(honest) -> None:
    frame = honest.to_frame()
    head = frame[frame["kind"] == "headline"].iloc[0]
    assert head["value"] == pytest.approx(honest.headline.value)
    assert head["ci_low"] <= head["value"] <= head["ci_high"]
    assert set(frame[frame["kind"] == "check"]["name"]) == set(CHECKS)
    rows = honest.to_rows()
    kinds = {r["kind"] for r in rows}
    assert {"attack", "headline", "check"} <= kinds
    assert all(r["defense"] == "my-mlp" and r["checkpoint"] == "model" for r in rows)
    (h,) = [r for r in rows if r["kind"] == "headline" and r["n_examples"] == N
            and r["eps"] == pytest.approx(EPS)]
    assert h["robust_acc"] == pytest.approx(honest.headline.value)
    json.dumps(rows)  # plain JSON, as rows.jsonl holds them


def test_a_masked_fixture_passed_as_a_plain_module_is_flagged(model, points) -> None:
    x, y = points
    masked = RoundedLogits(model)  # zero input gradient everywhere: gradient attacks stall
    r = benchmark.evaluate_model(masked, x=x, y=y, eps=EPS, attacks="fgsm,pgd",
                                 checks=["zero-gradient", "unbounded-eps"], name="rounded")
    failed = {c.name for c in r.checks if c.status == "fail"}
    assert "zero-gradient" in failed, r.checks
    assert r.reliable == "no" and r.masked
    assert r.headline.mark == "†" and all(a.mark == "†" for a in r.attacks.values())
    assert "reliable: no †" in str(r)


def test_rows_render_in_the_report_next_to_a_trained_run(model, tmp_path: Path) -> None:
    from benchmark.cli import cli
    from benchmark.data import load_dataset
    from benchmark.eval.evaluate import evaluate_path
    from benchmark.testing import tiny_st_run

    runs = tmp_path / "runs"
    run = tiny_st_run(runs, epochs=1)  # advbench's own run (synthetic, 3×8×8, 10 classes)
    evaluate_path(run, attacks="fgsm,pgd", n_examples=N, progress=False)
    test = load_dataset("synthetic").test
    r = benchmark.evaluate_model(model, dataset="synthetic", eps=EPS, n_examples=N,
                                 attacks="fgsm,pgd", checks=["zero-gradient"], name="my-mlp",
                                 runs_dir=runs, profile="cpu")
    assert r.n_examples == N and r.dataset == "synthetic" and len(test) >= N
    res = CliRunner().invoke(cli, ["-q", "report", "--runs-dir", str(runs), "--out",
                                   str(tmp_path / "out"), "--no-plots"])
    assert res.exit_code == 0, res.output
    tables = "\n".join(p.read_text() for p in (tmp_path / "out" / "tables").glob("*.md"))
    lines = [ln for ln in tables.splitlines() if ln.startswith("| my-mlp")]
    assert lines and any(ln.startswith("| st ") for ln in tables.splitlines())
    assert f"{100 * r.attacks['pgd'].value:.1f}" in "\n".join(lines)
    assert "my-mlp" in (tmp_path / "out" / "index.html").read_text()


def test_the_contract_is_enforced(model, points) -> None:
    x, y = points
    with pytest.raises(UsageError, match=r"\[0,1\]"):
        benchmark.evaluate_model(model, x=x * 255, y=y, eps=EPS)
    with pytest.raises(UsageError, match="N×10 logits"):
        benchmark.evaluate_model(nn.Sequential(model, nn.Softmax(1), nn.Flatten(0)), x=x, y=y,
                                 dataset="synthetic", eps=EPS)
    with pytest.raises(UsageError, match="both x and y"):
        benchmark.evaluate_model(model, x=x, eps=EPS)
    with pytest.raises(UsageError, match="threat_model"):
        benchmark.evaluate_model(model, x=x, y=y, threat_model="linf")
