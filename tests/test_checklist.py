"""Carlini et al.'s checklist items closed by issue 30 (part a): BPDA for a declared
non-differentiable preprocessing (check (m)), a defense's declared adaptive attack in the
headline (check (n)), robust accuracy above clean in the training log (health), and the
accuracy-versus-ε curve up to chance (check (c)'s row).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import ATTACKS
from attacks.bpda import BPDA, NonDifferentiable, declares_nondifferentiable, straight_through
from benchmark.eval import checks as ck
from benchmark.eval.worstcase import stored_attacks, worst_case
from benchmark.run.health import ROBUST_ABOVE_CLEAN_TOL, health_verdict, write_health
from benchmark.testing import (Quantise, RoundedLogits, declared_quantised, surrogate_objective,
                               templates_data, templates_mlp)

EPS = 8 / 255
N_POINTS = 40
#: quick AutoAttack budget (AutoAttack's gradient part is one of the attacks compared)
FAST = {"autoattack": {"version": "custom", "attacks": ["apgd-ce", "apgd-t"], "n_iter": 10}}


@pytest.fixture(scope="module")
def base() -> nn.Module:
    """The check tests' adversarially trained MLP on 3×8×8 class templates."""
    return templates_mlp(0)


@pytest.fixture(scope="module")
def points() -> tuple[torch.Tensor, torch.Tensor]:
    return templates_data(N_POINTS, 2)


# --------------------------------------------------------------------------- (m) BPDA
def test_bpda_backward_is_exactly_the_identity_through_the_preprocessing() -> None:
    """On a hand-made input: under BPDA the forward value is the real quantisation's, bit for
    bit, and the input gradient equals the gradient of the network at the quantised input
    (the identity as ∂g/∂x); without it the gradient through ``round`` is zero."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    model = nn.Sequential(NonDifferentiable(Quantise(4)), net)
    x = torch.tensor([0.0, 0.1, 0.13, 0.2, 0.37, 0.4, 0.5, 0.62, 0.74, 0.88, 0.9, 1.0]
                     ).view(1, 3, 2, 2)
    y = torch.tensor([2])
    z = (torch.round(x * 4) / 4).requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(net(z), y), z)

    def grad(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        xx = x.clone().requires_grad_(True)
        out = m(xx)
        (g,) = torch.autograd.grad(F.cross_entropy(out, y), xx, allow_unused=True)
        return out.detach(), torch.zeros_like(x) if g is None else g

    plain_out, plain = grad(model)
    with straight_through(model):
        bpda_out, bpda = grad(model)
    assert torch.equal(bpda_out, plain_out) and torch.equal(bpda_out, net(z).detach())
    assert torch.equal(bpda, want) and want.abs().sum() > 0
    assert torch.equal(plain, torch.zeros_like(x))
    assert not model[0].straight_through  # the mode is restored


def test_bpda_is_registered_with_the_pgd_protocol_budget() -> None:
    from benchmark.run.protocols import attack_specs
    assert ATTACKS.get("bpda") is BPDA
    for scale in ("mnist", "cifar"):
        specs = attack_specs(scale)
        assert specs["bpda"].hparams == specs["pgd"].hparams and \
            specs["bpda"].eps == specs["pgd"].eps


def test_bpda_breaks_a_declared_quantiser_and_the_headline_falls_to_it(
        base: nn.Module, points: tuple, tmp_path: Path) -> None:
    """The zoo's shattered-gradient model, declared: PGD, FGSM and AutoAttack's gradient part
    leave points robust that BPDA breaks (check (m) finds them weak, §); BPDA's flags are in the
    headline, which is their per-sample worst case. Undeclared, the check is skipped."""
    import benchmark
    x, y = points
    model = declared_quantised(base)
    assert declares_nondifferentiable(model) and not declares_nondifferentiable(base)
    res = benchmark.evaluate_model(model, x=x, y=y, eps=EPS, attacks="fgsm,pgd",
                                   checks=["bpda"], name="declared-q", runs_dir=tmp_path)
    (row,) = [r for r in res.rows if r.get("kind") == "check"]
    assert row["check"] == "bpda" and row["status"] == "fail", row["detail"]
    assert row["finding"] == "weak-attack" and {"pgd", "fgsm", "autoattack"} <= set(row["doubts"])
    stored = {s["attack"]: s for s in stored_attacks(res.out_dir, [], "model")}
    assert "bpda" in stored and "bpda" in res.headline_attacks
    bpda = stored["bpda"]["robust"]
    others = worst_case([s["robust"] for a, s in stored.items() if a != "bpda"])
    assert int((others & ~bpda).sum()) >= 8  # BPDA breaks what every gradient attack left
    headline = torch.as_tensor(res.flags["headline"])
    assert torch.equal(headline, worst_case([others, bpda]) & torch.as_tensor(res.flags["clean"]))
    assert res.headline.value < res.attacks["pgd"].value - 0.15
    # not declared: the same model has no preprocessing to attack with BPDA
    (skip,) = ck.Checker(RoundedLogits(base), x, y, "cifar").run(EPS, ["bpda"])
    assert skip.status == "skipped" and "declares no non-differentiable" in skip.detail


def test_masking_checks_read_bpdas_gradient_on_a_declared_preprocessing(
        base: nn.Module, points: tuple) -> None:
    """(c) and (f) read the gradient the headline's BPDA follows when the model declares its
    preprocessing: the declared quantiser passes both (BPDA reaches chance at ε = 0.5, its
    straight-through gradient is nowhere zero), while the same quantiser undeclared fails both
    (its raw gradient is zero), and a declared preprocessing that BPDA's identity does not
    approximate (an inversion undone inside the network: the model is ``base``, but the
    identity backward flips the gradient's sign) still fails (c)."""
    from benchmark.testing import QuantisedInput
    x, y = points
    names = ["unbounded-eps", "zero-gradient"]

    def run(model: nn.Module) -> dict[str, Any]:
        return {r.name: r for r in ck.Checker(model, x, y, "cifar").run(EPS, names)}

    declared = run(declared_quantised(base))
    assert all(declared[n].status == "pass" for n in names), [declared[n].detail for n in names]
    assert all(declared[n].extra["gradient"] == "bpda" for n in names)
    assert "through BPDA" in declared["unbounded-eps"].detail
    assert declared["unbounded-eps"].extra["eps_at_chance"] is not None
    undeclared = run(QuantisedInput(base))
    assert all(undeclared[n].status == "fail" for n in names), [undeclared[n].detail
                                                                  for n in names]
    assert all("gradient" not in undeclared[n].extra for n in names)
    class Invert(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return 1 - t

    # the same function as ``base``, but BPDA follows the gradient with its sign flipped
    inverted = run(nn.Sequential(NonDifferentiable(Invert()), Invert(), base))
    assert inverted["unbounded-eps"].status == "fail", inverted["unbounded-eps"].detail
    assert inverted["unbounded-eps"].finding == "masking"


def test_a_defense_declares_its_preprocessing_in_its_network() -> None:
    """``Defense.make_preprocess`` goes into the network before the normalisation, so a run's
    model declares it and BPDA sees it."""
    from defenses import DEFENSES
    from benchmark.testing import TINY_INFO, make_defense

    class Quantised(DEFENSES.get("at")):  # type: ignore[misc, valid-type]
        def make_preprocess(self, info: Any) -> nn.Module:
            return NonDifferentiable(Quantise(4))

    plain = make_defense(DEFENSES.get("at")).build_model("tiny", TINY_INFO).eval()
    quant = make_defense(Quantised).build_model("tiny", TINY_INFO).eval()
    quant.load_state_dict(plain.state_dict())  # no new weights: old checkpoints still load
    x = torch.rand(4, 3, 8, 8)
    assert declares_nondifferentiable(quant) and not declares_nondifferentiable(plain)
    with torch.no_grad():
        assert torch.equal(quant(x), plain(torch.round(x * 4) / 4))


# --------------------------------------------------------------------------- (n) adaptive
def test_declared_objectives() -> None:
    """adv-dpnp declares its own loss (Table 8); AT and ST do not; an outside model declares
    one with ``objective=``."""
    from benchmark.eval.target import OutsideDefense
    from benchmark.testing import make_defense
    from defenses import DEFENSES
    assert ck.declares_adaptive(make_defense(DEFENSES.get("adv-dpnp")))
    assert not ck.declares_adaptive(make_defense(DEFENSES.get("at")))
    assert not ck.declares_adaptive(make_defense(DEFENSES.get("st")))
    assert ck.declares_adaptive(OutsideDefense(objective=surrogate_objective))
    assert not ck.declares_adaptive(OutsideDefense()) and not ck.declares_adaptive(None)


def test_a_declared_adaptive_attack_enters_the_headline(base: nn.Module, points: tuple,
                                                        tmp_path: Path) -> None:
    """Rounded logits (zero gradients) whose author declares the objective that reads the
    logits before the rounding: PGD, FGSM and AutoAttack's APGD leave the points robust, PGD
    on the declared objective breaks them, check (n) finds the standard attacks weak, and the
    headline drops to the adaptive attack's worst case."""
    import benchmark
    x, y = points
    model = RoundedLogits(base)
    res = benchmark.evaluate_model(model, x=x, y=y, eps=EPS, attacks="fgsm,pgd",
                                   checks=["adaptive"], name="rounded", runs_dir=tmp_path,
                                   objective=surrogate_objective)
    (row,) = [r for r in res.rows if r.get("kind") == "check"]
    assert row["check"] == "adaptive" and row["status"] == "fail", row["detail"]
    assert "pgd" in row["doubts"] and row["finding"] == "weak-attack"
    assert "adaptive" in res.headline_attacks
    stored = {s["attack"]: s for s in stored_attacks(res.out_dir, [], "model")}
    adaptive = stored["adaptive"]["robust"]
    assert res.headline.value == pytest.approx(float(
        (worst_case([s["robust"] for s in stored.values()])).float().mean()))
    assert res.headline.value <= float(adaptive.float().mean())
    assert res.headline.value < res.attacks["pgd"].value - 0.15
    # without the declaration the check is skipped and the headline stays where it was
    plain = benchmark.evaluate_model(model, x=x, y=y, eps=EPS, attacks="fgsm,pgd",
                                     checks=["adaptive"], name="rounded-undeclared")
    (skip,) = [r for r in plain.rows if r.get("kind") == "check"]
    assert skip["status"] == "skipped" and "adaptive" not in plain.headline_attacks
    assert plain.headline.value == res.attacks["pgd"].value


def test_checker_passes_the_declared_objective_to_the_adaptive_attack(
        base: nn.Module, points: tuple) -> None:
    """The in-memory checker hands the defense's objective to the ``adaptive`` spec (not CE)."""
    from benchmark.eval.target import OutsideDefense
    x, y = points
    checker = ck.Checker(RoundedLogits(base), x, y, "cifar", overrides=FAST,
                         defense=OutsideDefense(objective=surrogate_objective))
    (res,) = checker.run(EPS, ["adaptive"])
    assert res.status == "fail" and res.extra["broken"] >= 8, res.detail


# --------------------------------------------------------------------------- health
def _run(tmp_path: Path, log: list[dict]) -> Path:
    run = tmp_path / "mnist" / "at" / "abc"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "defense": "at", "dataset": "mnist", "arch": "small-cnn", "profile": "cpu", "seed": 0,
        "run_id": "abc", "hparams": {"epochs": len(log), "eps": 0.3, "val_size": 1000},
        "data": {"num_classes": 10, "provenance": "MNIST"}}))
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (run / "TRAINED").write_text("done\n")
    return run


def test_robust_above_clean_in_the_training_log_is_a_health_finding(tmp_path: Path) -> None:
    """The issue's case: a validation epoch whose PGD accuracy exceeds its clean accuracy by
    7 points makes the run unhealthy (‡), naming the epoch and both numbers; an excess within
    the tolerance (a last-iterate flip) does not."""
    log = [{"epoch": 1, "loss": 1.0, "train_acc": 0.6, "val_clean": 0.80, "val_pgd": 0.40},
           {"epoch": 2, "loss": 0.8, "train_acc": 0.7, "val_clean": 0.45, "val_pgd": 0.52},
           {"epoch": 3, "loss": 0.7, "train_acc": 0.8, "val_clean": 0.90, "val_pgd": 0.60}]
    row = write_health(_run(tmp_path, log))
    assert row["verdict"] == "robust-above-clean" and not row["healthy"]
    (why,) = row["reasons"]
    assert why.startswith("epoch 2: validation PGD accuracy 52.0% exceeds validation clean "
                          "accuracy 45.0% by 7.0 points") and "about 70 of the 1000" in why
    cfg = {"data": {"num_classes": 10}, "hparams": {"epochs": 1, "val_size": 1000}}
    near = 0.9 + ROBUST_ABOVE_CLEAN_TOL
    ok = health_verdict(cfg, [{"loss": 1.0, "train_acc": 0.9, "val_clean": 0.9,
                               "val_pgd": near}], trained=True)
    bad = health_verdict(cfg, [{"loss": 1.0, "train_acc": 0.9, "val_clean": 0.9,
                                "val_pgd": near + 0.002}], trained=True)
    assert ok["verdict"] == "ok" and bad["verdict"] == "robust-above-clean"


def test_report_marks_a_robust_above_clean_run(tmp_path: Path) -> None:
    from benchmark.report.verdicts import row_verdicts
    log = [{"epoch": 1, "loss": 1.0, "train_acc": 0.6, "val_clean": 0.45, "val_pgd": 0.52}]
    row = write_health(_run(tmp_path, log))
    v = row_verdicts([{**row, "checkpoint": "best"}], ["at"])[("small-cnn", "best", "at")]
    assert v.unhealthy and "robust-above-clean" in v.unhealthy[0] and \
        v.mark(robustness=False) == "‡"


# --------------------------------------------------------------------------- ε curve
def test_eps_curve_is_the_running_worst_case_and_finds_chance() -> None:
    """On flags: the curve is the accuracy of the per-sample worst case over every ε′ ≤ ε
    (a point broken at a smaller ε stays broken), and the first ε at or below chance."""
    f = lambda *bits: torch.tensor(bits, dtype=torch.bool)  # noqa: E731
    curve, at = ck.eps_curve([(0.3, f(1, 1, 0, 0)), (0.1, f(1, 1, 1, 0)),
                              (0.5, f(1, 0, 1, 1))], chance=0.25)
    assert curve == {"0.1": 0.75, "0.3": 0.5, "0.5": 0.25} and at == pytest.approx(0.5)
    assert ck.eps_curve([(0.1, f(1, 1))], chance=0.1) == ({"0.1": 1.0}, None)


def test_check_c_records_the_curve_down_to_chance(base: nn.Module, points: tuple) -> None:
    """The honest AT model: check (c)'s row holds accuracy versus ε over the Figure 4 grid up
    to the unbounded ε, non-increasing, reaching chance (10%) within the grid; the rounded-
    logits model (no gradient) never gets there, and its row says so."""
    x, y = points
    (res,) = ck.Checker(base, x, y, "cifar").run(EPS, ["unbounded-eps"])
    curve = list(res.extra["eps_curve"].values())
    assert len(curve) >= 10 and all(b <= a for a, b in zip(curve, curve[1:])), curve
    assert curve[0] > 0.5 and curve[-1] <= 0.1 + 0.02 and res.extra["chance"] == 0.1
    at = res.extra["eps_at_chance"]
    assert at is not None and at <= 0.5 and "at chance (10.0%) from ε=" in res.detail
    (masked,) = ck.Checker(RoundedLogits(base), x, y, "cifar").run(EPS, ["unbounded-eps"])
    assert masked.extra["eps_at_chance"] is None and "never at chance" in masked.detail


def test_an_outside_models_rows_are_keyed_by_its_objective(tmp_path: Path) -> None:
    """Rows of an outside model attacked with one objective are never reused for another:
    each objective (and none) gets its own run folder; the same objective the same one."""
    from benchmark.eval.target import model_target
    from benchmark.testing import TINY_INFO

    def margin(model, x_adv, x, y):
        return model(x_adv).gather(1, y[:, None])[:, 0]

    def ce(model, x_adv, x, y):
        return torch.nn.functional.cross_entropy(model(x_adv), y, reduction="none")

    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))

    def run_dir(objective):
        return model_target(net, TINY_INFO, name="mine", eps=8 / 255, runs_dir=tmp_path,
                            objective=objective).out_dir

    dirs = [run_dir(None), run_dir(margin), run_dir(ce), run_dir(margin)]
    assert len({dirs[0], dirs[1], dirs[2]}) == 3 and dirs[1] == dirs[3]
