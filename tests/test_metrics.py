"""Feature-space metrics (paper eq. 8-12) on hand-made feature sets, and the features rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.eval import metrics
from benchmark.run.resolve import resolve_run_config
from benchmark.data import load_dataset
from benchmark.store import RunStore
from benchmark.run.train import train_run

# two classes in 2-D: class 0 around (1, 0), class 1 around (0, 3)
F = np.array([[1.0, 1.0], [1.0, -1.0], [1.0, 3.0], [-1.0, 3.0]])
Y = np.array([0, 0, 1, 1])


def test_fdr_is_the_sum_of_per_class_within_over_between_traces() -> None:
    # μ0 = (1,0), μ1 = (0,3), μ = (0.5,1.5)
    # class 0: within = 1 + 1 = 2, between = 2·(0.25 + 2.25) = 5
    # class 1: within = 1 + 1 = 2, between = 2·(0.25 + 2.25) = 5
    assert metrics.fdr(F, Y) == pytest.approx(2 / 5 + 2 / 5)
    # the docstring's example: collinear points, within 2 and between 9 per class
    f = np.array([[2.0, 0], [4, 0], [0, 2], [0, 4]])
    assert metrics.fdr(f, Y) == pytest.approx(4 / 9)


def test_fdr_matches_explicit_scatter_matrices() -> None:
    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(60, 5)), rng.integers(0, 4, 60)
    mu, expected = f.mean(0), 0.0
    for j in range(4):
        fj = f[y == j]
        mj = fj.mean(0)
        sw = sum(np.outer(v - mj, v - mj) for v in fj)
        sb = len(fj) * np.outer(mj - mu, mj - mu)
        expected += np.trace(sw) / np.trace(sb)
    assert metrics.fdr(torch.tensor(f), torch.tensor(y)) == pytest.approx(expected, rel=1e-12)


def test_afs_is_angular_within_over_angular_between() -> None:
    within = 2 * (1 - 1 / math.sqrt(2)) + 2 * (1 - 3 / math.sqrt(10))
    norm_mu = math.sqrt(0.5 ** 2 + 1.5 ** 2)
    between = 2 * (1 - 0.5 / norm_mu) + 2 * (1 - 4.5 / (3 * norm_mu))
    assert metrics.afs(F, Y) == pytest.approx(within / between)
    # features along their class mean have no angular spread
    f = np.array([[2.0, 0], [4, 0], [0, 2], [0, 4]])
    assert metrics.afs(f, Y) == 0.0


def test_scr_uses_the_given_centres_and_their_nearest_rival() -> None:
    c = np.array([[2.0, 0.0], [0.0, 3.0], [10.0, 10.0]])  # class 2 has no samples
    sep = math.sqrt(13)  # ‖c0 - c1‖; c2 is farther from both
    compact0 = math.sqrt(2)  # ‖(1,±1) - (2,0)‖
    compact1 = 1.0  # ‖(±1,3) - (0,3)‖
    assert metrics.scr(F, Y, c) == pytest.approx((sep / compact0 + sep / compact1) / 2)


def test_scr_rejects_labels_without_centres() -> None:
    with pytest.raises(ValueError):
        metrics.scr(F, Y, np.array([[1.0, 0.0]]))


def test_orthogonal_centres_are_90_degrees_apart() -> None:
    c = 40 * np.eye(10)  # Adv-DPNP prototypes live on a sphere of radius α = 40
    assert metrics.mean_sep(c) == pytest.approx(90.0)
    assert metrics.min_sep(c) == pytest.approx(90.0)


def test_meansep_averages_nearest_rival_angles_and_minsep_is_the_smallest() -> None:
    a = math.radians(30)
    c = np.array([[1.0, 0.0], [math.cos(a), math.sin(a)], [0.0, -1.0]])
    # pairwise: 30°, 90°, 120° -> nearest rivals 30, 30, 90 (not the all-pairs mean 80)
    assert metrics.mean_sep(c) == pytest.approx(50.0)
    assert metrics.min_sep(c) == pytest.approx(30.0)
    assert metrics.mean_sep(c * np.array([[3.0], [0.5], [7.0]])) == pytest.approx(50.0)


def test_without_centres_the_centre_metrics_are_nan() -> None:
    out = metrics.feature_metrics(F, Y, None)
    assert out["fdr"] == pytest.approx(0.8) and math.isnan(out["scr"])
    assert math.isnan(out["mean_sep"]) and math.isnan(out["min_sep"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hp = {"epochs": 1, "lr_milestones": [1], "train_attack_steps": 1, "val_attack_steps": 1,
          "batch_size": 128}
    cfg = resolve_run_config("at", "synthetic", profile="cpu", arch="tiny", user_hparams=hp)
    return train_run(cfg, load_dataset("synthetic"), RunStore(tmp_path_factory.mktemp("runs")),
                     progress=False)


def test_features_rows_use_test_features_and_classifier_weights(tiny_run: Path) -> None:
    from benchmark.run.resolve import load_model
    from benchmark.eval.features import evaluate_features

    rows = evaluate_features(tiny_run, n_examples=64)
    by = {r["condition"]: r for r in rows}
    assert set(by) == {"clean", "pgd20"} and all(r["kind"] == "features" for r in rows)
    model = load_model(tiny_run)
    x, y = load_dataset("synthetic").test.floats()
    with torch.no_grad():  # the first 64 of the test order: the points `evaluate` attacks
        f = model.features(x[:64])
        acc = (model(x[:64]).argmax(1) == y[:64]).float().mean().item()
    w = model.head.weight.detach()
    expected = metrics.feature_metrics(f, y[:64], w)
    for k, v in expected.items():
        assert by["clean"][k] == pytest.approx(v, rel=1e-5), k
    assert by["clean"]["centers"] == "classifier weights" and by["clean"]["n_examples"] == 64
    assert by["clean"]["accuracy"] == pytest.approx(acc)
    from benchmark.eval.evaluate import evaluate_run
    from benchmark.run.protocols import attack_specs
    ev = evaluate_run(tiny_run, [attack_specs("cifar")["fgsm"]], n_examples=64, progress=False)
    assert ev[0]["clean_acc"] == pytest.approx(by["clean"]["accuracy"])  # one point set
    adv = by["pgd20"]
    assert adv["attack_hparams"]["steps"] == 20 and adv["eps_str"] == "8/255"
    hp = adv["attack_hparams"]
    step = hp["step_size"] if "step_size" in hp else hp["rel_step_size"] * adv["eps"]
    assert step == pytest.approx(adv["eps"] / 10)
    assert adv["fdr"] != pytest.approx(by["clean"]["fdr"])
    assert adv["mean_sep"] == pytest.approx(by["clean"]["mean_sep"])  # same centres
    for r in rows:
        stored = json.loads((tiny_run / "eval" / f"{r['eval_key']}.json").read_text())
        assert stored["fdr"] == pytest.approx(r["fdr"])
        assert {"dataset", "data_provenance", "arch", "hparams", "seed", "checkpoint", "git",
                "env", "profile"} <= set(stored)
    again = evaluate_features(tiny_run, n_examples=64)  # reused, not recomputed
    assert sorted(r["created"] for r in again) == sorted(r["created"] for r in rows)


def test_features_take_centres_from_the_defense(tiny_run: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmark.eval.features import evaluate_features
    from defenses import DEFENSES

    monkeypatch.setattr(DEFENSES.get("at"), "class_centers",
                        lambda self, model: 5 * torch.eye(10, 32))
    rows = evaluate_features(tiny_run, n_examples=32, force=True)
    assert all(r["mean_sep"] == pytest.approx(90.0) for r in rows)
    assert all(r["centers"] == "MadryAT.class_centers" for r in rows)


def test_figure2_command_plots_two_d_features(tmp_path: Path, tiny_run: Path) -> None:
    from click.testing import CliRunner

    from benchmark.cli import cli
    from benchmark.errors import UsageError
    from benchmark.eval.features import figure2_panels

    data, runs = load_dataset("synthetic"), {}
    for name in ("at", "adv-dpnp"):  # untrained LeNets++ (epochs 0): only the plumbing matters
        cfg = resolve_run_config(name, "synthetic", profile="cpu", arch="lenets++",
                                 user_hparams={"epochs": 0})
        runs[name] = train_run(cfg, data, RunStore(tmp_path / "runs"), progress=False)
    panel = figure2_panels(runs["adv-dpnp"], n_examples=16)
    assert panel["clean"].shape == panel["adv"].shape == (16, 2)
    assert panel["centers"].shape == (10, 2) and panel["centers_source"] != "classifier weights"
    assert not np.allclose(panel["clean"], panel["adv"])
    # the figure says how each model was trained (its training attack is half the story)
    from benchmark.report.plots import training_text
    assert panel["hparams"]["train_attack_steps"] == 5
    assert training_text(panel["hparams"]).startswith("PGD-5 (step ")
    assert "margin loss" in training_text({**panel["hparams"], "train_attack_loss": "margin"})
    out = tmp_path / "fig2.png"
    res = CliRunner().invoke(cli, ["figure2", "--at", str(runs["at"]), "--adv-dpnp",
                                   str(runs["adv-dpnp"]), "--out", str(out), "--n-examples", "16",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UsageError, match="2-D features"):
        figure2_panels(tiny_run, n_examples=4)


def test_figure2_defaults_to_the_profiles_points(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --n-examples Figure 2 uses the profile's number of points (as the help says),
    not the whole test set (10,000 PGD-40 attacks on LeNets++ took over 15 CPU-minutes)."""
    import benchmark.config as config
    from benchmark.eval.features import figure2_panels

    cfg = resolve_run_config("at", "synthetic", profile="cpu", arch="lenets++",
                             user_hparams={"epochs": 0})
    run = train_run(cfg, load_dataset("synthetic"), RunStore(tmp_path), progress=False)
    monkeypatch.setitem(config.DEFAULT_N_EXAMPLES, "cpu", 12)
    assert figure2_panels(run)["clean"].shape == (12, 2)


def test_features_command_prints_both_conditions(tiny_run: Path) -> None:
    from click.testing import CliRunner

    from benchmark.cli import cli
    res = CliRunner().invoke(cli, ["features", "--run", str(tiny_run), "--n-examples", "32",
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("at\t")]
    assert [ln.split("\t")[2] for ln in lines] == ["clean", "pgd20"]
    assert all("mean_sep=" in ln for ln in lines)
