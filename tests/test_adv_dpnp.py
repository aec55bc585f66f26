"""Adv-DPNP and DPNP: every loss term against an independent computation of the paper's formula."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.run.resolve import resolve_run_config
from benchmark.data import DataInfo
from benchmark.testing import TINY_INFO, check_defense, make_defense
from defenses.adv_dpnp import AdvDPNP, PrototypeHead, adv_dpnp_loss, dnp, nearest_rival
from defenses.dpnp import DPNP

KW = {"alpha": 3.0, "lambda_dpp": 0.1, "lambda_dnp": 0.1, "lambda_dfa": 2.0}
CIFAR_INFO = DataInfo("cifar-like", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, "cifar")


# ------------------------------------------------------------------ independent references
def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _dnp_ref(C: list[list[float]]) -> float:
    """−(1/M) Σ_j Σ_i |c_ji − c_n(j)i|^{1/2}, n(j) = l2-nearest other row (plain Python)."""
    total = 0.0
    for j, cj in enumerate(C):
        k = min((k for k in range(len(C)) if k != j), key=lambda k: math.dist(C[k], cj))
        total += sum(math.sqrt(abs(a - b) + 1e-12) for a, b in zip(cj, C[k]))
    return -total / len(C)


def _eq7_ref(f, fa, C, y, alpha, lambda_dpp, lambda_dnp, lambda_dfa) -> float:
    """Eq. (7) of arXiv:2504.03782 in plain Python floats."""
    def probs(feat):
        return _softmax([sum(a * b for a, b in zip(feat, c)) / alpha for c in C])

    def dpp(feat, yi):
        return (-math.log(probs(feat)[yi])
                + lambda_dpp / 2 * sum((a - b) ** 2 for a, b in zip(feat, C[yi])))

    total = 0.0
    for fi, fai, yi in zip(f, fa, y):
        p, q = probs(fi), probs(fai)
        kl = sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
        total += dpp(fi, yi) + dpp(fai, yi) + lambda_dfa * kl
    return lambda_dnp * _dnp_ref(C) + total / (2 * len(y))


def _clean_terms_ref(f, fa, y, C, alpha, lambda_dpp, lambda_dnp, lambda_dfa):
    """Only what may move C: DNP, clean DPP and DFA through p(x); p(x') is a constant."""
    z = f @ C.t() / alpha
    q = F.log_softmax(fa @ C.detach().t() / alpha, dim=1)
    dnp_t = 0
    for j in range(C.shape[0]):
        k = min((k for k in range(C.shape[0]) if k != j),
                key=lambda k: float(torch.linalg.norm(C[k].detach() - C[j].detach())))
        dnp_t = dnp_t - ((C[j] - C[k]).abs() + 1e-12).sqrt().sum()
    logp = F.log_softmax(z, dim=1)
    per = (-logp[torch.arange(len(y)), y] + lambda_dpp / 2 * ((f - C[y]) ** 2).sum(1)
           + lambda_dfa * (logp.exp() * (logp - q)).sum(1))
    return lambda_dnp * dnp_t / C.shape[0] + per.sum() / (2 * len(y))


# ------------------------------------------------------------------ (1) logits, (2) hypersphere
def test_logits_are_features_times_prototypes_over_alpha() -> None:
    head = PrototypeHead(2, 3, alpha=5.0)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[1.0, 2.0], [0.0, -3.0], [4.0, 0.5]]))
    f = torch.tensor([[2.0, 1.0], [-1.0, 0.5]])
    expected = torch.tensor([[4.0, -3.0, 8.5], [0.0, -1.5, -3.75]]) / 5.0
    assert torch.allclose(head(f), expected)
    defense = make_defense(AdvDPNP)
    model = defense.build_model("tiny", TINY_INFO).eval()
    x = torch.rand(5, 3, 8, 8)
    C = defense.class_centers(model)
    assert torch.allclose(model(x), model.features(x) @ C.t() / 40.0, atol=1e-6)


def test_two_dimensional_prototypes_start_evenly_spaced() -> None:
    """LeNets++'s 2-d features: the M prototypes start on the α-circle 360°/M apart (random
    directions put several within a few degrees); d ≥ 3 keeps the N(0, 1) start."""
    torch.manual_seed(0)
    C = PrototypeHead(2, 10, alpha=40.0).prototypes.detach()
    assert torch.allclose(C.norm(dim=1), torch.full((10,), 40.0))
    gaps = torch.cdist(C, C) + torch.eye(10) * 1e9
    side = 2 * 40.0 * math.sin(math.pi / 10)  # chord between neighbours on a regular 10-gon
    assert torch.allclose(gaps.amin(dim=1), torch.full((10,), side), atol=1e-4)
    torch.manual_seed(0)
    high = PrototypeHead(16, 10, alpha=40.0).prototypes.detach()
    torch.manual_seed(0)
    assert torch.allclose(high, F.normalize(torch.randn(10, 16), dim=1) * 40.0, atol=1e-5)


@pytest.mark.parametrize("alpha", [40.0, 7.5])
def test_prototypes_live_on_the_alpha_sphere(alpha: float) -> None:
    defense = make_defense(AdvDPNP, hparams={"alpha": alpha})
    model = defense.build_model("small-cnn", TINY_INFO)
    C = model.head.prototypes
    assert torch.allclose(C.norm(dim=1), torch.full((10,), alpha))  # fresh model already
    with torch.no_grad():
        C.mul_(torch.rand(10, 1) * 3 + 0.1).add_(0.01)
    direction = F.normalize(C.detach().clone(), dim=1)
    defense.on_epoch_start(model, 3)
    assert torch.allclose(C.norm(dim=1), torch.full((10,), alpha), rtol=1e-5)
    assert torch.allclose(F.normalize(C.detach(), dim=1), direction, atol=1e-6)


# ------------------------------------------------------------------ (3) DNP
def test_dnp_uses_the_l2_nearest_rival_and_the_l_half_formula() -> None:
    # row 0's l2-nearest is row 1 (4.24 < 4.5) although row 2 is nearer in l_{1/2} and l1
    rows = [[0.0, 0.0], [3.0, 3.0], [4.5, 0.0], [10.0, 10.0]]
    C = torch.tensor(rows, requires_grad=True)
    assert nearest_rival(C).tolist() == [1, 2, 1, 1]
    expected = -(2 * math.sqrt(3) + 2 * (math.sqrt(1.5) + math.sqrt(3)) + 2 * math.sqrt(7)) / 4
    assert dnp(C).item() == pytest.approx(expected, rel=1e-6)
    assert dnp(C).item() == pytest.approx(_dnp_ref(rows), rel=1e-6)
    rnd = torch.randn(7, 5)
    assert dnp(rnd).item() == pytest.approx(_dnp_ref(rnd.tolist()), rel=1e-5)


def test_dnp_square_root_is_guarded_at_zero() -> None:
    C = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]], requires_grad=True)  # shared coordinate
    dnp(C).backward()
    assert torch.isfinite(C.grad).all()


def test_dnp_guard_bounds_the_gradient_and_is_a_recorded_hyperparameter() -> None:
    for guard in (1e-12, 1e-4):
        C = torch.tensor([[0.0, 0.0], [1e-9, 3.0], [5.0, 5.0]], requires_grad=True)
        dnp(C, guard).backward()
        # d/dv (|v| + g)^{1/2} = 1/(2 sqrt(|v| + g)); row 0 and row 1 are mutual rivals (M = 3)
        bound = 2 / (2 * math.sqrt(1e-9 + guard)) / 3
        assert C.grad[0, 0].abs().item() == pytest.approx(bound, rel=1e-3)
    defense = make_defense(AdvDPNP, hparams={**KW, "dnp_guard": 1e-4})
    assert defense.hparams["dnp_guard"] == 1e-4
    assert make_defense(AdvDPNP).hparams["dnp_guard"] == 1e-12
    model = defense.build_model("tiny", TINY_INFO).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    defense.adversarial = lambda m, xx, yy, loss=None: xx
    out = defense.training_step(model, x, y, epoch=0, step=0)
    assert out.metrics["dnp"].item() == pytest.approx(
        dnp(model.head.prototypes.detach(), 1e-4).item(), rel=1e-6)


# ------------------------------------------------------------------ (4) dual branch, (5) eq. 7
def _model_and_batch():
    defense = make_defense(AdvDPNP, hparams=KW)
    model = defense.build_model("tiny", TINY_INFO).train()
    x = torch.rand(6, 3, 8, 8)
    x_adv = (x + 0.03 * torch.randn_like(x).sign()).clamp(0, 1)
    return defense, model, x, x_adv, torch.tensor([0, 1, 2, 3, 1, 0])


def test_adversarial_terms_send_no_gradient_to_prototypes() -> None:
    defense, model, x, x_adv, y = _model_and_batch()
    C, backbone = model.head.prototypes, list(model.backbone.parameters())
    f, fa = model.features(x), model.features(x_adv)
    loss, parts = adv_dpnp_loss(f, fa, y, C, **KW)
    grads = torch.autograd.grad(parts["dpp_adv"], [C, *backbone], allow_unused=True,
                                retain_graph=True)
    assert grads[0] is None or torch.count_nonzero(grads[0]) == 0
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1:])
    g_full = torch.autograd.grad(loss, C, retain_graph=True)[0]
    g_ref = torch.autograd.grad(_clean_terms_ref(f.detach(), fa.detach(), y, C, **KW), C)[0]
    assert torch.allclose(g_full, g_ref, atol=1e-6, rtol=1e-5)
    # control: letting the adversarial DPP reach C would change the gradient
    leak = torch.autograd.grad(F.cross_entropy(fa.detach() @ C.t() / KW["alpha"], y), C)[0]
    assert not torch.allclose(g_full, g_ref + leak / 2, atol=1e-6)


def test_training_step_routes_gradients_like_the_dual_branch() -> None:
    defense, model, x, x_adv, y = _model_and_batch()
    defense.adversarial = lambda model, x, y, loss=None: x_adv  # fixed x' for the comparison
    out = defense.training_step(model, x, y, epoch=0, step=0)
    C = model.head.prototypes
    g_step = torch.autograd.grad(out.loss, C)[0]
    with torch.no_grad():
        f, fa = model.features(x), model.features(x_adv)
    g_ref = torch.autograd.grad(_clean_terms_ref(f, fa, y, C, **KW), C)[0]
    assert torch.allclose(g_step, g_ref, atol=1e-6, rtol=1e-5)
    ref = _eq7_ref(f.tolist(), fa.tolist(), C.tolist(), y.tolist(), **KW)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)


def test_full_loss_equals_eq7_on_hand_made_values() -> None:
    f = torch.tensor([[1.0, 0.5], [-0.5, 2.0], [0.3, -1.2]], requires_grad=True)
    fa = torch.tensor([[0.7, 0.9], [-1.0, 1.0], [1.1, -0.2]], requires_grad=True)
    C = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-1.5, -1.5]], requires_grad=True)
    y = torch.tensor([0, 1, 2])
    for kw in (KW, {"alpha": 2.0, "lambda_dpp": 0.3, "lambda_dnp": 3.0, "lambda_dfa": 2.4}):
        loss, _ = adv_dpnp_loss(f, fa, y, C, **kw)
        ref = _eq7_ref(f.tolist(), fa.tolist(), C.tolist(), y.tolist(), **kw)
        assert loss.item() == pytest.approx(ref, rel=1e-6)


def test_adaptive_objective_is_dpp_plus_weighted_dfa_per_sample() -> None:
    defense, model, x, x_adv, y = _model_and_batch()
    obj = defense.objective()(model.eval(), x_adv, x, y)
    with torch.no_grad():
        f, fa = model.features(x).tolist(), model.features(x_adv).tolist()
    C = model.head.prototypes.tolist()
    for i in range(len(y)):
        one = _eq7_ref([f[i]], [fa[i]], C, [int(y[i])], **{**KW, "lambda_dnp": 0.0})
        clean = _eq7_ref([f[i]], [f[i]], C, [int(y[i])], **{**KW, "lambda_dnp": 0.0})
        # 2·eq7(x, x') − DPP(x)  with DPP(x) = eq7(x, x)  (DFA(x, x) = 0)
        assert obj[i].item() == pytest.approx(2 * one - clean, rel=1e-5)


# ------------------------------------------------------------------ (6) DPNP
def test_dpnp_has_no_adversarial_branch() -> None:
    assert "lambda_dfa" not in DPNP.default_hparams
    defense = make_defense(DPNP, hparams={"alpha": 3.0})
    model = defense.build_model("tiny", TINY_INFO).train()

    def forbidden(*args, **kwargs):
        raise AssertionError("dpnp must not generate adversarial examples")

    defense.adversarial = forbidden
    defense.attack_for_training = forbidden
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1, 0])
    out = defense.training_step(model, x, y, epoch=0, step=0)
    with torch.no_grad():
        f = model.features(x).tolist()
    C = model.head.prototypes.tolist()
    # eq7(x, x) with λ_DNP = λ_DFA = 0 is (DPP(x) + DPP(x)) / 2 = DPP(x)
    ref = 0.1 * _dnp_ref(C) + sum(
        _eq7_ref([fi], [fi], C, [int(yi)], 3.0, 0.1, 0.0, 0.0) for fi, yi in zip(f, y)) / 6
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------ contract, configs, archs
@pytest.mark.parametrize("cls", [AdvDPNP, DPNP])
def test_check_defense(cls: type) -> None:
    check_defense(cls, archs=("tiny", "small-cnn", "lenets++"))


@pytest.mark.parametrize("arch", ["resnet18", "preact-resnet18"])
def test_builds_on_resnets(arch: str) -> None:
    defense = make_defense(AdvDPNP, info=CIFAR_INFO)
    model = defense.build_model(arch, CIFAR_INFO).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, f = model(x), model.features(x)
    assert logits.shape == (2, 10) and f.shape == (2, 512)
    assert torch.allclose(logits, f @ model.head.prototypes.t() / 40.0, atol=1e-5)


def test_paper_lambdas_per_dataset() -> None:
    keys = ("alpha", "lambda_dpp", "lambda_dnp", "lambda_dfa")
    c100 = resolve_run_config("adv-dpnp", "cifar100", profile="paper").hparams
    c10 = resolve_run_config("adv-dpnp", "cifar10", profile="paper").hparams
    mnist = resolve_run_config("adv-dpnp", "mnist5k", profile="cpu").hparams
    assert [c100[k] for k in keys] == [40.0, 0.3, 3.0, 2.4]
    assert [c10[k] for k in keys] == [mnist[k] for k in keys] == [40.0, 0.1, 0.1, 2.0]


# ------------------------------------------------------------------ ablation switch (issue 28)
def test_without_dual_branch_the_adversarial_terms_reach_the_prototypes() -> None:
    """``dual_branch=False`` (the ablation) adds exactly the adversarial terms' gradient on C."""
    defense, model, x, x_adv, y = _model_and_batch()
    C = model.head.prototypes
    f, fa = model.features(x), model.features(x_adv)
    on, _ = adv_dpnp_loss(f, fa, y, C, **KW)
    off, parts = adv_dpnp_loss(f, fa, y, C, **KW, dual_branch=False)
    assert off.item() == pytest.approx(on.item(), rel=1e-6)  # same value, other routing
    g_on = torch.autograd.grad(on, C, retain_graph=True)[0]
    g_off = torch.autograd.grad(off, C, retain_graph=True)[0]
    g_adv = torch.autograd.grad(parts["dpp_adv"], C, retain_graph=True)[0]
    assert torch.count_nonzero(g_adv) > 0
    # reference: the adversarial DPP and the p(x') side of DFA with C attached, halved
    q_terms = (KW["lambda_dfa"] * F.kl_div(F.log_softmax(fa @ C.t() / KW["alpha"], 1),
                                           F.log_softmax(f.detach() @ C.detach().t()
                                                         / KW["alpha"], 1),
                                           log_target=True, reduction="none").sum(1))
    ref = torch.autograd.grad((parts["dpp_adv"] * len(y) + q_terms.sum()) / (2 * len(y)), C)[0]
    assert torch.allclose(g_off - g_on, ref, atol=1e-5, rtol=1e-4)


def test_dual_branch_is_an_optional_hparam_outside_the_run_id() -> None:
    base = resolve_run_config("adv-dpnp", "synthetic")
    assert "dual_branch" not in base.hparams
    same = resolve_run_config("adv-dpnp", "synthetic", user_hparams={"dual_branch": True})
    assert same.run_id == base.run_id
    off = resolve_run_config("adv-dpnp", "synthetic", user_hparams={"dual_branch": False})
    assert off.hparams["dual_branch"] is False and off.run_id != base.run_id


def test_without_clean_branch_it_is_at_on_the_prototype_head() -> None:
    """``clean_branch=False``: L = λ_DNP·DNP + mean(DPP(x') + λ_DFA·DFA), no halving; with every
    λ = 0 and no dual branch, CE(x') on the prototype logits with gradient on C (Madry AT)."""
    defense, model, x, _, y = _model_and_batch()
    C, a = model.head.prototypes, KW["alpha"]
    f, fa = model.features(x), model.features(torch.rand_like(x))  # x' far from x: DPP(x) ≠ DPP(x')
    full, parts = adv_dpnp_loss(f, fa, y, C, **KW)
    off, _ = adv_dpnp_loss(f, fa, y, C, **KW, clean_branch=False)
    expected = KW["lambda_dnp"] * parts["dnp"] + parts["dpp_adv"] + KW["lambda_dfa"] * parts["dfa"]
    assert off.item() == pytest.approx(expected.item(), rel=1e-6)
    assert off.item() != pytest.approx(full.item(), rel=1e-3)
    zero = {"alpha": a, "lambda_dpp": 0.0, "lambda_dnp": 0.0, "lambda_dfa": 0.0}
    at, _ = adv_dpnp_loss(f, fa, y, C, **zero, clean_branch=False, dual_branch=False)
    ref = F.cross_entropy(fa @ C.t() / a, y)
    assert at.item() == pytest.approx(ref.item(), rel=1e-6)
    g, g_ref = (torch.autograd.grad(v, [C, *model.parameters()], retain_graph=True, allow_unused=True)
                for v in (at, ref))
    for u, v in zip(g, g_ref):
        assert (u is None) == (v is None) and (u is None or torch.allclose(u, v, atol=1e-6))
    assert torch.count_nonzero(g[0]) > 0
    # the clean forward pass gets no gradient at all
    g_clean = torch.autograd.grad(at, f, allow_unused=True)[0]
    assert g_clean is None or not g_clean.any()
    cfg = resolve_run_config("adv-dpnp", "synthetic", user_hparams={"clean_branch": False})
    assert cfg.run_id != resolve_run_config("adv-dpnp", "synthetic").run_id


def test_prototype_lr_scale_scales_only_the_prototypes_step() -> None:
    """``prototype_lr_scale`` (issue 28's learnable-head control): the default keeps the
    protocol's single optimizer group (and the run id); a factor s gives the prototypes, and
    only them, s times the first SGD step on the same gradients."""
    from benchmark.run.train import make_optimizer
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}
    steps = {}
    for scale in (1.0, 40.0):
        torch.manual_seed(0)
        defense = make_defense(AdvDPNP, hparams={**KW, "prototype_lr_scale": scale})
        model = defense.build_model("tiny", TINY_INFO).train()
        groups = defense.param_groups(model)
        assert (groups is None) == (scale == 1.0)
        if groups:
            ids = [id(p) for g in groups for p in g["params"]]
            assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
        before = [p.detach().clone() for p in model.parameters()]
        opt = make_optimizer(model, hp, defense)
        torch.manual_seed(1)
        x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1, 0])
        F.cross_entropy(model(x), y).backward()
        opt.step()
        steps[scale] = {name: p.detach() - b for (name, p), b in
                        zip(model.named_parameters(), before)}
    proto = "head.prototypes"
    # (differences of float32 values of size ~1: compared to 1e-5)
    assert torch.allclose(steps[40.0][proto], 40.0 * steps[1.0][proto], rtol=1e-3, atol=1e-5)
    assert steps[1.0][proto].abs().sum() > 0
    for name, d in steps[1.0].items():
        if name != proto:
            assert torch.equal(steps[40.0][name], d), name
    base = resolve_run_config("adv-dpnp", "synthetic")
    assert resolve_run_config("adv-dpnp", "synthetic",
                              user_hparams={"prototype_lr_scale": 1.0}).run_id == base.run_id
    assert resolve_run_config("adv-dpnp", "synthetic",
                              user_hparams={"prototype_lr_scale": 40.0}).run_id != base.run_id
