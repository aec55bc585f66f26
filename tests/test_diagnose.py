"""Issue 28's instruments: scale-free attack objectives, the training attack's loss switch,
and ``advbench diagnose``'s saturation measurements."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Norm, ThreatModel, ce_objective
from attacks.objectives import dlr_loss, margin_gap, margin_objective, objective_named
from attacks.pgd import PGD
from benchmark.errors import UsageError
from benchmark.eval.diagnose import loss_comparison, scale_stats, zero_gradient_share
from benchmark.run.resolve import resolve_run_config
from benchmark.testing import make_defense
from defenses.at import MadryAT as AT
from defenses.trades import TRADES

Z = torch.tensor([[3.0, 1.0, -2.0, 0.5], [0.2, 0.1, 4.0, 1.0]])
Y = torch.tensor([1, 2])


def test_margin_and_dlr_equal_their_formulas_on_hand_made_logits() -> None:
    # row 0: y=1 (z=1), best other 3 → gap 2; sorted 3, 1, 0.5 → DLR 2 / (3 - 0.5)
    # row 1: y=2 (z=4), best other 1 → gap -3; sorted 4, 1, 0.2 → DLR -3 / (4 - 0.2)
    assert margin_gap(Z, Y).tolist() == pytest.approx([2.0, -3.0])
    assert dlr_loss(Z, Y).tolist() == pytest.approx([2.0 / 2.5, -3.0 / 3.8])
    # DLR is scale-free, the margin scales, CE saturates
    assert dlr_loss(100 * Z, Y).tolist() == pytest.approx(dlr_loss(Z, Y).tolist())
    assert margin_gap(100 * Z, Y).tolist() == pytest.approx([200.0, -300.0])
    with pytest.raises(UsageError):
        dlr_loss(Z[:, :2], Y.clamp(max=1))
    with pytest.raises(UsageError):
        objective_named("hinge")


def test_train_attack_loss_is_optional_and_outside_the_default_run_id() -> None:
    base = resolve_run_config("at", "synthetic")
    assert "train_attack_loss" not in base.hparams
    assert resolve_run_config("at", "synthetic", user_hparams={"train_attack_loss": "ce"}
                              ).run_id == base.run_id
    margin = resolve_run_config("at", "synthetic", user_hparams={"train_attack_loss": "margin"})
    assert margin.hparams["train_attack_loss"] == "margin" and margin.run_id != base.run_id
    with pytest.raises(UsageError, match="train_attack_loss"):
        resolve_run_config("at", "synthetic", user_hparams={"train_attack_loss": "hinge"})


def test_training_attack_maximises_the_configured_objective() -> None:
    """x' of the defense's training attack with ``margin`` equals PGD run on the margin
    objective directly, and differs from the CE attack's."""
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    outs = {}
    for name in ("ce", "margin"):
        defense = make_defense(AT, hparams={"train_attack_loss": name})
        torch.manual_seed(1)
        model = defense.build_model("tiny", _info()).eval()
        torch.manual_seed(2)
        outs[name] = defense.adversarial(model, x, y)
        attack = PGD(defense.threat, steps=2, step_size=2 / 255, random_start="uniform",
                     init_std=0.001)
        torch.manual_seed(2)
        direct = attack(model, x, y, loss=margin_objective if name == "margin" else ce_objective)
        assert torch.equal(outs[name], direct)
    assert not torch.equal(outs["ce"], outs["margin"])


def test_train_attack_loss_refused_for_a_defense_with_its_own_attack_objective() -> None:
    defense = make_defense(TRADES, hparams={"train_attack_loss": "dlr"})
    model = defense.build_model("tiny", _info())
    with pytest.raises(UsageError, match="own objective"):
        defense.adversarial(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]),
                            loss=ce_objective)


class _Scaled(nn.Module):
    """Fixed linear logits times a scale (a model whose confidence we control)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3 * 4 * 4, 10, generator=g), requires_grad=False)
        self.scale = scale

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.features(x)


def test_scale_stats_and_zero_gradients_follow_the_logit_scale() -> None:
    small, huge = _Scaled(0.01), _Scaled(1e4)
    x = _confident(huge, torch.rand(32, 3, 4, 4))
    y = huge(x).argmax(1)  # huge is confident and right on every point
    s, h = scale_stats(small, x, y), scale_stats(huge, x, y)
    z = small(x)
    assert s["max_abs_logit"] == pytest.approx(float(z.abs().amax(1).median()))
    assert s["max_softmax"] == pytest.approx(float(F.softmax(z, 1).amax(1).median()))
    assert s["feature_norm"] == pytest.approx(float(small.features(x).norm(dim=1).median()))
    assert h["share_softmax_gt_099"] == 1.0 and s["share_softmax_gt_099"] == 0.0
    # saturated float32 CE has an exactly zero input gradient; the small model has none
    assert zero_gradient_share(huge, x, y)["share_zero_grad"] == 1.0
    assert zero_gradient_share(small, x, y)["share_zero_grad"] == 0.0


def test_a_saturated_model_defeats_ce_pgd_but_not_margin_pgd() -> None:
    """The instrument can tell saturation apart: on a confident linear model, CE-PGD has zero
    gradients and breaks nothing, while the margin and DLR PGDs break points."""
    model = _Scaled(1e4)
    x = _confident(model, torch.rand(64, 3, 4, 4))
    y = model(x).argmax(1)
    attack = PGD(ThreatModel(Norm.LINF, 0.3), steps=10, step_size=0.05, random_start="none")
    accs, flags, _ = loss_comparison(model, attack, x, y)
    assert accs["ce"] == 1.0
    assert accs["margin"] < 1.0 and accs["dlr"] < 1.0
    assert accs["worst"] == min(accs["ce"], accs["margin"], accs["dlr"])
    assert torch.equal(flags["worst"], flags["ce"] & flags["margin"] & flags["dlr"])


def _confident(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The points whose logit margin exceeds 200 (float32 softmax saturates exactly)."""
    z = model(x)
    keep = (-margin_gap(z, z.argmax(1))) > 200
    assert int(keep.sum()) >= 8
    return x[keep]


def _info():
    from benchmark.testing import TINY_INFO
    return TINY_INFO
