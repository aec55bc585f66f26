"""TRADES, MART, AT-HE, OC, IKL, HAT: each loss against an independent computation.

Pure loss helpers are pinned on hand-made logits/features; ``training_step`` wiring is pinned
by replacing the training attack with a fixed x' and recomputing the loss from the model's
outputs in the test.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark import models
from benchmark.run.resolve import resolve_run_config
from benchmark.data import load_dataset
from benchmark.errors import UsageError
from benchmark.store import RunStore, read_jsonl
from benchmark.testing import TINY_INFO, check_defense, make_defense
from benchmark.run.train import make_optimizer, train_run
from defenses import DEFENSES
from defenses.at_he import CosineHead, he_loss
from defenses.hat import hat_loss
from defenses.ikl import ikl_loss
from defenses.mart import mart_loss
from defenses.oc import oc_loss, orthogonal_classifier, sylvester_hadamard
from defenses.trades import trades_loss

NAMES = ["trades", "mart", "at-he", "oc", "ikl", "hat"]


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def batch(n: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.rand(n, 3, 8, 8)
    x_adv = (x + 0.03 * torch.randn_like(x).sign()).clamp(0, 1)
    return x, x_adv, torch.arange(n) % 10


def fix_attack(monkeypatch: pytest.MonkeyPatch, defense: object, x_adv: Tensor) -> dict:
    """Replace the training attack by a fixed x'; record the objective it was given."""
    seen: dict = {}

    def fake(model: nn.Module, x: Tensor, y: Tensor, *, loss: object = None) -> Tensor:
        seen["loss"] = loss
        return x_adv

    monkeypatch.setattr(defense, "adversarial", fake)
    return seen


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def kl_rows(p: Tensor, q: Tensor) -> Tensor:
    """Σ_k p_k (log p_k − log q_k) per row, in plain Python floats (independent of torch)."""
    rows = zip(p.detach().double().tolist(), q.detach().double().tolist())
    return torch.tensor([sum(a * (math.log(a) - math.log(b)) for a, b in zip(pr, qr))
                         for pr, qr in rows], dtype=torch.float64)


# ---------------------------------------------------------------- contract on three archs
@pytest.mark.parametrize("name", NAMES)
def test_check_defense(name: str) -> None:
    helpers = None
    if name == "hat":
        helpers = {"st": models.create("tiny", num_classes=10, in_channels=3,
                                       mean=TINY_INFO.mean, std=TINY_INFO.std).eval()}
    check_defense(DEFENSES.get(name), archs=("tiny", "small-cnn", "lenets++"), helpers=helpers)


# ---------------------------------------------------------------- TRADES
def test_trades_loss_formula_and_clean_softmax_not_detached() -> None:
    nat = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -0.5], [0.3, -0.2, 0.1]])
    y = torch.tensor([0, 2])
    loss, ce, kl = trades_loss(nat, adv, y, beta=6.0)
    p, q = nat.detach().softmax(1), adv.softmax(1)
    ce_ref = -(torch.log(p[0, 0]) + torch.log(p[1, 2])) / 2
    kl_ref = kl_rows(p, q).mean()
    assert torch.allclose(ce, ce_ref) and torch.allclose(kl, kl_ref.float())
    assert torch.allclose(loss, ce_ref + 6.0 * kl_ref.float())
    (g,) = torch.autograd.grad(kl, nat)
    assert g.abs().sum() > 1e-4, "KL must backpropagate into the clean logits"


def test_trades_step_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    defense = make_defense(DEFENSES.get("trades"))
    atk = defense.attack_for_training()
    assert atk.hparams["random_start"] == "normal" and atk.hparams["init_std"] == 0.001
    model, (x, x_adv, y) = linear_model(), batch()
    seen = fix_attack(monkeypatch, defense, x_adv)
    out = defense.training_step(model, x, y, epoch=0, step=0)
    nat, adv = model(x).detach(), model(x_adv).detach()
    ref = F.cross_entropy(nat, y) + 6.0 * F.kl_div(adv.log_softmax(1), nat.softmax(1),
                                                   reduction="batchmean")
    assert torch.allclose(out.loss, ref, atol=1e-6)
    attack_obj = seen["loss"]  # KL to the (fixed) clean prediction, zero at x' = x
    assert torch.allclose(attack_obj(model, x, x, y), torch.zeros(len(y)), atol=1e-6)
    assert torch.allclose(attack_obj(model, x_adv, x, y), kl_rows(nat.softmax(1), adv.softmax(1)).float(),
                          atol=1e-6)


def test_training_attacks_compute_clean_logits_once_per_batch() -> None:
    x, _, y = batch()
    for name, train_passes in [("trades", 2), ("ikl", 2)]:
        defense, model = make_defense(DEFENSES.get(name)), linear_model()
        calls = count_forwards(model)
        defense.training_step(model, x, y, epoch=0, step=0)
        steps = int(defense.hparams["train_attack_steps"])
        assert calls[0] == 1 + steps + train_passes, name


def test_objectives_are_per_sample_training_losses_with_cached_clean_pass() -> None:
    """Mean of objective() = the batch training loss (model without BN, x' fixed)."""
    x, x_adv, y = batch()
    for name in ["trades", "mart", "at-he", "oc", "ikl"]:
        defense = make_defense(DEFENSES.get(name))
        model = defense.build_model("tiny", TINY_INFO)
        obj = defense.objective()
        trunk = getattr(model.backbone, "inner", model.backbone)  # OC's feature head wraps it
        calls = count_forwards(trunk.conv)  # every feature computation passes here
        values = [obj(model, xa, x, y) for xa in (x_adv, x_adv.flip(0), x)]
        expected = 3 if name == "at-he" else 4  # 3 attack steps (+ 1 clean pass, cached)
        assert calls[0] == expected, f"{name}: {calls[0]} backbone passes, expected {expected}"
        assert values[0].shape == (len(y),)
        nat, adv = model(x), model(x_adv)
        hp = defense.hparams
        if name == "trades":
            ref = trades_loss(nat, adv, y, hp["beta"])[0]
        elif name == "mart":
            ref = mart_loss(nat, adv, y, hp["beta"])[0]
        elif name == "at-he":
            ref = he_loss(adv, y, hp["s"], hp["m"])
        elif name == "oc":
            w = model.head.weight[y]
            ref = oc_loss(model.features(x), model.features(x_adv), w, hp["lam"])[0]
        else:  # CE(z) + β·wMSE + α·sCE
            ref = ikl_loss(nat, adv, y, defense.weights[y], alpha=hp["alpha"], beta=hp["beta"])[0]
        assert torch.allclose(values[0].mean(), ref, atol=1e-5), name


# ---------------------------------------------------------------- MART
def test_mart_loss_formula_and_beta_per_arch() -> None:
    nat = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [0.0, 3.0, 1.0]])
    adv = torch.tensor([[1.0, 1.5, -0.5], [0.3, -0.2, 0.1], [0.2, 2.0, 2.5]])
    y = torch.tensor([0, 2, 1])  # sample 1: true class is not the top-1 of x'; sample 2 is
    loss, bce, wkl = mart_loss(nat, adv, y, beta=6.0)
    p, q = nat.softmax(1), adv.softmax(1)
    bce_ref, wkl_ref = [], []
    for i in range(3):
        rival = max(q[i, k] for k in range(3) if k != y[i])
        bce_ref.append(-torch.log(q[i, y[i]]) - torch.log(1.0001 - rival + 1e-12))
        kl = sum(p[i, k] * (torch.log(p[i, k]) - torch.log(q[i, k] + 1e-12)) for k in range(3))
        wkl_ref.append(kl * (1.0000001 - p[i, y[i]]))
    bce_ref, wkl_ref = torch.stack(bce_ref).mean(), torch.stack(wkl_ref).mean()
    assert torch.allclose(bce, bce_ref) and torch.allclose(wkl, wkl_ref)
    assert torch.allclose(loss, bce_ref + 6.0 * wkl_ref)
    beta = {a: resolve_run_config("mart", "cifar10", profile="paper", arch=a).hparams["beta"]
            for a in ("resnet18", "wrn-34-10")}
    assert beta == {"resnet18": 5.0, "wrn-34-10": 6.0}


def test_mart_step_attacks_with_ce(monkeypatch: pytest.MonkeyPatch) -> None:
    defense, model, (x, x_adv, y) = make_defense(DEFENSES.get("mart")), linear_model(), batch()
    seen = fix_attack(monkeypatch, defense, x_adv)
    out = defense.training_step(model, x, y, epoch=0, step=0)
    assert seen["loss"] is None  # the protocol's PGD on CE
    assert torch.allclose(out.loss, mart_loss(model(x), model(x_adv), y, 6.0)[0])


# ---------------------------------------------------------------- AT-HE
def test_at_he_head_is_scaled_cosine_without_bias() -> None:
    head = CosineHead(3, 2, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0, 4.0], [0.0, -2.0, 0.0]]))
    f = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 7.0]])
    expected = 10.0 * torch.tensor([[0.6 / math.sqrt(2), -1 / math.sqrt(2)], [0.8, 0.0]])
    assert torch.allclose(head(f), expected, atol=1e-6)
    assert torch.allclose(head(5 * f), head(f), atol=1e-6)  # invariant to feature norm
    assert [n for n, _ in head.named_parameters()] == ["weight"]


def test_at_he_margin_only_in_training_and_grad_through_normalisation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    defense = make_defense(DEFENSES.get("at-he"))
    model, (x, x_adv, y) = defense.build_model("tiny", TINY_INFO), batch()
    s, m = defense.hparams["s"], defense.hparams["m"]
    feats = model.features(x_adv)
    cos = F.normalize(feats, dim=1) @ F.normalize(model.head.weight, dim=1).t()
    assert torch.allclose(model.eval()(x_adv), s * cos, atol=1e-5)  # eval: no margin
    model.train()
    seen = fix_attack(monkeypatch, defense, x_adv)
    out = defense.training_step(model, x, y, epoch=0, step=0)
    assert seen["loss"] is None  # the attack maximises CE of s·cos (no margin)
    onehot = F.one_hot(y, 10).float()
    ref = -(F.log_softmax(s * (cos - m * onehot), 1) * onehot).sum(1).mean()
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert out.loss > F.cross_entropy(s * cos, y)
    out.loss.backward()
    w, g = model.head.weight, model.head.weight.grad
    assert g.abs().sum() > 0
    radial = (g * w).sum(1) / w.norm(dim=1)
    assert radial.abs().max() < 1e-5 * g.norm(), "gradient must be tangent to ‖w‖ (true grad)"
    centers = defense.class_centers(model)
    assert torch.allclose(centers.norm(dim=1), torch.ones(10))


# ---------------------------------------------------------------- OC
@pytest.mark.parametrize("d", [1, 2, 4, 8, 32, 256])
def test_sylvester_hadamard(d: int) -> None:
    h = sylvester_hadamard(d)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), d * torch.eye(d))


def test_orthogonal_classifier_geometry() -> None:
    w = orthogonal_classifier(10, 32, 10.0)
    assert torch.allclose(w.abs(), torch.full_like(w, 10.0 / math.sqrt(32)))  # Hadamard rows
    assert torch.allclose(w @ w.t(), 100 * torch.eye(10), atol=1e-4)
    q = orthogonal_classifier(10, 24, 10.0, seed=3)  # d not a power of two
    assert torch.allclose(q @ q.t(), 100 * torch.eye(10), atol=1e-3)
    assert torch.equal(q, orthogonal_classifier(10, 24, 10.0, seed=3))
    assert not torch.allclose(q, orthogonal_classifier(10, 24, 10.0, seed=4))
    assert torch.allclose(orthogonal_classifier(10, 2, 10.0).norm(dim=1), torch.full((10,), 10.0))


def test_oc_loss_formula() -> None:
    fn, fa = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.5, 0.0], [3.0, 1.0]])
    t = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    loss, mn, ma = oc_loss(fn, fa, t, lam=0.15)
    assert torch.isclose(mn, torch.tensor((0 + 1 + 1 + 0) / 4))
    assert torch.isclose(ma, torch.tensor((0.25 + 1 + 4 + 4) / 4))
    assert torch.isclose(loss, 0.15 * mn + 0.85 * ma)


def test_oc_head_is_fixed_buffer_and_loss_uses_features(monkeypatch: pytest.MonkeyPatch) -> None:
    defense = make_defense(DEFENSES.get("oc"))
    model, (x, x_adv, y) = defense.build_model("tiny", TINY_INFO), batch()
    assert "head.weight" in model.state_dict()
    assert all(not n.startswith("head") for n, _ in model.named_parameters())
    opt = make_optimizer(model, {**defense.hparams, "lr": 0.5})
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())
    head_before = model.head.weight.clone()
    assert torch.allclose(head_before @ head_before.t(), 100 * torch.eye(10), atol=1e-4)
    seen = fix_attack(monkeypatch, defense, x_adv)
    out = defense.training_step(model, x, y, epoch=0, step=0)
    w = head_before[y]
    ref = 0.15 * ((model.features(x) - w) ** 2).mean() + 0.85 * ((model.features(x_adv) - w) ** 2).mean()
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert torch.allclose(seen["loss"](model, x_adv, x, y), ((model.features(x_adv) - w) ** 2).mean(1))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert model.head.weight.grad is None and torch.equal(model.head.weight, head_before)
    assert torch.allclose(model.eval()(x), model.features(x) @ head_before.t())
    assert resolve_run_config("oc", "mnist5k").hparams["lam"] == 0.3


def test_oc_feature_head_makes_features_signed_and_none_keeps_relu() -> None:
    """Default: features end in Linear+PReLU (roboc), so they take negative values that the
    ±s/√d targets need; "none" keeps the backbone's ReLU features (all ≥ 0)."""
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    signed = make_defense(DEFENSES.get("oc")).build_model("tiny", TINY_INFO)
    plain = make_defense(DEFENSES.get("oc"), hparams={"feature_head": "none"}).build_model(
        "tiny", TINY_INFO)
    assert isinstance(signed.backbone.embed[1], nn.PReLU)
    with torch.no_grad():
        assert (signed.features(x) < 0).any() and (plain.features(x) >= 0).all()
        assert torch.allclose(signed(x), signed.features(x) @ signed.head.weight.t())
    assert any(n.startswith("backbone.embed") for n, _ in signed.named_parameters())
    with pytest.raises(UsageError):
        make_defense(DEFENSES.get("oc"), hparams={"feature_head": "relu"}).build_model(
            "tiny", TINY_INFO)


# ---------------------------------------------------------------- IKL
def official_dkl(nat: Tensor, adv: Tensor, w: Tensor, alpha: float, beta: float) -> Tensor:
    """The official pairwise formulation (C×C logit differences), written in the test."""
    dn = nat[:, :, None] - nat[:, None, :]
    da = adv[:, :, None] - adv[:, None, :]
    pn = w[:, :, None] * w[:, None, :]
    mse = 0.25 * ((dn - da) ** 2 * pn).sum() / pn.sum()
    sce = -(nat.softmax(1).detach() * adv.log_softmax(1)).sum(1).mean()
    return beta * mse + alpha * sce


def test_ikl_loss_matches_pairwise_formula_and_sce_teacher_detached() -> None:
    nat = torch.randn(5, 4, requires_grad=True)
    adv = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    weights = torch.rand(4, 4)
    for w in (weights / weights.sum(1, keepdim=True), weights):  # normalised and raw rows
        loss, ce, wmse, sce = ikl_loss(nat, adv, y, w[y], alpha=4.0, beta=20.0)
        ref = F.cross_entropy(nat, y) + official_dkl(nat, adv, w[y], 4.0, 20.0)
        assert torch.allclose(loss, ref, atol=1e-5)
    g_sce_nat, g_sce_adv = torch.autograd.grad(sce, (nat, adv), retain_graph=True,
                                               allow_unused=True, materialize_grads=True)
    (g_mse,) = torch.autograd.grad(wmse, nat)
    assert torch.equal(g_sce_nat, torch.zeros_like(nat)) and g_sce_adv.abs().sum() > 0
    assert g_mse.abs().sum() > 0  # the clean logits are not detached inside wMSE


def test_ikl_classwise_weights_update_and_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = DEFENSES.get("ikl")
    defense, model, (x, x_adv, y) = make_defense(cls), linear_model(), batch(6)
    y = torch.tensor([0, 0, 1, 1, 1, 2])  # classes 3..9 unseen
    fix_attack(monkeypatch, defense, x_adv)
    atk = defense.attack_for_training()
    assert atk.hparams["random_start"] == "normal" and atk.hparams["init_std"] == 0.001
    uniform = torch.full((10, 10), 0.1)
    defense.on_epoch_start(model, 0)
    out = defense.training_step(model, x, y, epoch=0, step=0)
    assert torch.equal(defense.weights, uniform)
    assert torch.allclose(out.loss, ikl_loss(model(x), model(x_adv), y, uniform[y], alpha=4.0,
                                             beta=20.0)[0])
    resumed = make_defense(cls)
    resumed.load_state_dict(defense.state_dict())
    for d in (defense, resumed):
        d.on_epoch_start(model, 1)
    p = (model(x) / 4.0).softmax(1).detach()
    expected = uniform.clone()
    for c in (0, 1, 2):
        expected[c] = p[y == c].mean(0)
    assert torch.allclose(defense.weights, expected, atol=1e-6)
    assert torch.equal(resumed.weights, defense.weights)
    fix_attack(monkeypatch, resumed, x_adv)
    out = resumed.training_step(model, x, y, epoch=1, step=0)
    assert torch.allclose(out.loss, ikl_loss(model(x), model(x_adv), y, expected[y], alpha=4.0,
                                             beta=20.0)[0], atol=1e-6)
    assert resolve_run_config("ikl", "cifar100").hparams["alpha"] == 5.0


# ---------------------------------------------------------------- HAT
def test_hat_requires_helper() -> None:
    defense, model, (x, _, y) = make_defense(DEFENSES.get("hat")), linear_model(), batch()
    with pytest.raises(UsageError, match="helper"):
        defense.training_step(model, x, y, epoch=0, step=0)
    with pytest.raises(UsageError, match="st"):
        defense.setup({})


def test_hat_loss_and_unclipped_helper_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    defense, model = make_defense(DEFENSES.get("hat")), linear_model(1)
    helper = nn.Sequential(nn.Dropout(0.9), linear_model(2)).train()
    defense.setup({"st": helper})
    x = torch.full((6, 3, 8, 8), 0.99)
    x_adv, y = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1), torch.arange(6)
    fix_attack(monkeypatch, defense, x_adv)
    calls = count_forwards(model)
    out = defense.training_step(model, x, y, epoch=0, step=0)
    assert calls[0] == 1 + 3 and helper.training  # attack target + 3 passes; mode restored
    x_help = x + 2.0 * (x_adv - x)
    assert x_help.max() > 1  # the official code does not clip helper examples
    with torch.no_grad():
        y_help = helper[1](x_adv).argmax(1)  # eval mode: dropout off
    nat, adv, hlp = model(x), model(x_adv), model(x_help)
    ref = (F.cross_entropy(nat, y) + 2.5 * kl_rows(nat.softmax(1), adv.softmax(1)).float().mean()
           + 0.5 * F.cross_entropy(hlp, y_help))
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert torch.allclose(out.loss, hat_loss(nat, adv, hlp, y, y_help, beta=2.5, gamma=0.5)[0])
    assert not torch.allclose(ref, hat_loss(nat, adv, model(x_help.clamp(0, 1)), y, y_help,
                                            beta=2.5, gamma=0.5)[0])


def test_ikl_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    """The class-wise weights are checkpointed: epoch 3 after a resume sees epoch 2's weights."""
    data = load_dataset("synthetic")
    fast = {"epochs": 3, "lr_milestones": [2], "train_attack_steps": 1, "val_attack_steps": 1,
            "batch_size": 64}
    cfg = resolve_run_config("ikl", "synthetic", arch="tiny", user_hparams=fast)
    full = train_run(cfg, data, RunStore(tmp_path / "a"), progress=False)
    store = RunStore(tmp_path / "b")
    train_run(cfg, data, store, progress=False, stop_after=2)
    resumed = train_run(cfg, data, store, progress=False)
    a, b = (torch.load(d / "ckpt_last.pt", weights_only=True) for d in (full, resumed))
    assert not torch.allclose(a["defense"]["weights"], torch.full((10, 10), 0.1))
    assert torch.equal(a["defense"]["weights"], b["defense"]["weights"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["loss"] for r in read_jsonl(full / "train_log.jsonl")] == \
        [r["loss"] for r in read_jsonl(resumed / "train_log.jsonl")]


def test_hat_objective_with_and_without_helper() -> None:
    cls, model, (x, x_adv, y) = DEFENSES.get("hat"), linear_model(1), batch()
    helper = linear_model(2)
    with_helper, without = make_defense(cls), make_defense(cls)
    with_helper.setup({"st": helper})
    nat, adv = model(x), model(x_adv)
    trades_part = trades_loss(nat, adv, y, 2.5)[0]
    help_part = F.cross_entropy(model(x + 2 * (x_adv - x)), helper(x_adv).argmax(1))
    assert torch.allclose(with_helper.objective()(model, x_adv, x, y).mean(),
                          trades_part + 0.5 * help_part, atol=1e-5)
    assert torch.allclose(without.objective()(model, x_adv, x, y).mean(), trades_part, atol=1e-5)


@pytest.mark.parametrize("name", ["mart", "at-he"])
def test_attack_start_hparam_selects_the_training_attack_start(name: str) -> None:
    for start in ("uniform", "normal"):
        defense = make_defense(DEFENSES.get(name), hparams={"attack_start": start})
        attack = defense.attack_for_training()
        assert attack.hparams["random_start"] == start and attack.hparams["init_std"] == 0.001
        assert attack.hparams["steps"] == int(defense.hparams["train_attack_steps"])
