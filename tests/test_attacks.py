"""Attack contracts (every registered attack × norm) and attack strength against references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import ATTACKS
from attacks.base import Norm, ThreatModel, lp_norms
from attacks.cw import CW, cw_objective
from attacks.fgsm import FGSM
from attacks.pgd import PGD
from benchmark.errors import UsageError

#: fast settings for the expensive attacks (the contract does not depend on the budget)
FAST = {"autoattack": {"n_iter": 3, "n_queries": 10}, "pgd": {"steps": 5}, "cw": {"steps": 5},
        "autoattack-l2": {"n_iter": 3, "n_queries": 10},
        "autoattack-l1": {"n_iter": 3, "n_queries": 10},
        "apgd-l2": {"n_iter": 5}, "apgd-l1": {"n_iter": 5, "n_restarts": 1},
        "adaptive": {"steps": 5}, "square": {"n_queries": 20},
        "ensemble": {"members": [{"label": "fgsm", "attack": "fgsm", "hparams": {}},
                                 {"label": "pgd3", "attack": "pgd", "hparams": {"steps": 3}},
                                 {"label": "cw3", "attack": "cw", "hparams": {"steps": 3}}]}}


class PooledSource(nn.Module):
    """A transfer source for any input shape: channel mean pooled to 2×2, then linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x.mean(1, keepdim=True)).flatten(1) * 10)


FAST["transfer"] = {"steps": 5, "source_model": PooledSource()}
EPS = {Norm.LINF: 8 / 255, Norm.L2: 0.5, Norm.L1: 3.0}
SHAPES = [(5, 3, 8, 8), (4, 1, 7, 5)]


def linear(shape: tuple[int, ...]) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape[1:]), 10))


def corner_inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    x[0] = 0.0  # a sample on each corner of the box
    x[1] = 1.0
    return x


CASES = [(name, norm) for name in ATTACKS.names() for norm in sorted(
    ATTACKS.get(name).supported_norms, key=lambda n: n.value)]


@pytest.mark.parametrize("name,norm", CASES, ids=[f"{a}-{n.value}" for a, n in CASES])
def test_attack_stays_in_box_and_ball_and_moves(name: str, norm: Norm) -> None:
    cls = ATTACKS.get(name)
    for i, shape in enumerate(SHAPES):
        model = linear(shape).eval()
        x = corner_inputs(shape, i)
        with torch.no_grad():
            y = model(x).argmax(1)  # every sample correct: an attack must try them all
        x_adv = cls(ThreatModel(norm, EPS[norm]), seed=0, **FAST.get(name, {}))(model, x, y)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (lp_norms(x_adv - x, norm) <= EPS[norm] * (1 + 1e-5) + 1e-6).all()
        if not name.startswith(("autoattack", "square", "apgd", "rays")):  # x where they fail
            assert (x_adv != x).flatten(1).any(1).all(), f"{name} left a sample untouched"


def bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout(0.3), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_is_seeded_deterministic_and_restores_mode(name: str) -> None:
    model = bn_model()
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    cls = ATTACKS.get(name)
    norm = min(cls.supported_norms, key=lambda n: n is not Norm.LINF)  # l∞ where supported
    threat = ThreatModel(norm, 8 / 255 if norm is Norm.LINF else EPS[norm])
    atk = cls(threat, seed=3, **FAST.get(name, {}))
    rng = torch.get_rng_state()
    a = atk(model, x, y)
    assert torch.equal(torch.get_rng_state(), rng), "a seeded attack changed the global RNG"
    assert model.training and not model[1].training
    again = cls(threat, seed=3, **FAST.get(name, {}))(model, x, y)
    assert torch.equal(a, again)


def test_unknown_hparam_and_bad_values_raise() -> None:
    with pytest.raises(UsageError, match="unknown hyperparameters"):
        CW(ThreatModel(Norm.LINF, 0.1), kapa=1)
    with pytest.raises(UsageError):
        PGD(ThreatModel(Norm.L1, 1.0), l1_sparsity=1.0)
    with pytest.raises(UsageError):
        ATTACKS.get("autoattack")(ThreatModel(Norm.LINF, 0.1), version="custom")
    with pytest.raises(UsageError, match="own margin loss"):
        CW(ThreatModel(Norm.LINF, 0.1))(linear((2, 3, 8, 8)), torch.rand(2, 3, 8, 8),
                                        torch.zeros(2, dtype=torch.long), loss=cw_objective(0))


def test_fgsm_is_one_signed_step_of_the_analytic_gradient() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(12, 4)
    model = nn.Sequential(nn.Flatten(), lin)
    x, y = torch.rand(8, 3, 2, 2) * 0.8 + 0.1, torch.arange(8) % 4
    with torch.no_grad():  # ∇_x CE(Wx + b, y) = Wᵀ(softmax − onehot)
        p = F.softmax(model(x), 1) - F.one_hot(y, 4).float()
        grad = (p @ lin.weight).view_as(x)
    eps = 0.05
    assert torch.allclose(FGSM(ThreatModel(Norm.LINF, eps))(model, x, y),
                          (x + eps * grad.sign()).clamp(0, 1))


def test_cw_objective_is_the_hinged_margin() -> None:
    logits = torch.tensor([[5.0, 1.0, 3.0], [0.0, 2.0, -1.0], [1.0, 1.0, 9.0]])
    y = torch.tensor([0, 0, 2])
    model = nn.Identity()
    # z_y − max_{k≠y} z_k: 5−3=2, 0−2=−2, 9−1=8; hinged at −κ
    for kappa, want in [(0.0, [-2.0, 0.0, -8.0]), (3.0, [-5.0, -1.0, -11.0])]:
        got = cw_objective(kappa)(model, logits, logits, y)
        assert torch.equal(got, torch.tensor(want))


def test_pgd_restarts_only_add_broken_samples_and_loss() -> None:
    model = bn_model().eval()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    t = ThreatModel(Norm.LINF, 2 / 255)
    one = PGD(t, steps=3, seed=5)(model, x, y)
    many = PGD(t, steps=3, restarts=4, seed=5)(model, x, y)
    with torch.no_grad():
        wrong1, wrongr = model(one).argmax(1) != y, model(many).argmax(1) != y
        ce1 = F.cross_entropy(model(one), y, reduction="none")
        cer = F.cross_entropy(model(many), y, reduction="none")
    assert (wrongr | ~wrong1).all(), "a restart lost a sample the first run broke"
    assert (cer[~wrongr] >= ce1[~wrongr] - 1e-6).all()


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN trained on close class templates + noise (non-robust at a few /255)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    templates = 0.45 + 0.1 * torch.rand(10, 3, 8, 8, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        return (templates[y] + 0.15 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), y

    (xtr, ytr), (x, y) = make(300), make(96)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model.eval(), x, y


def reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                  steps: int) -> torch.Tensor:
    """Madry et al.'s PGD-l∞ written out plainly."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0, 1)
    return x_adv


def test_pgd_linf_at_least_as_strong_as_reference(trained) -> None:
    model, x, y = trained
    eps, alpha, steps = 2 / 255, 0.5 / 255, 10
    acc = lambda xa: float((model(xa).argmax(1) == y).float().mean())  # noqa: E731
    with torch.no_grad():
        clean = acc(x)
    ours = acc(PGD(ThreatModel(Norm.LINF, eps), steps=steps, step_size=alpha, seed=0)(model, x, y))
    torch.manual_seed(0)
    ref = acc(reference_pgd(model, x, y, eps, alpha, steps))
    assert clean > 0.5 and ref < clean - 0.2, (clean, ref)  # the setting is a real test
    assert ours <= ref + 1 / len(y), (ours, ref)


def test_l1_and_l2_pgd_beat_random_noise(trained) -> None:
    model, x, y = trained
    acc = lambda xa: float((model(xa).argmax(1) == y).float().mean())  # noqa: E731
    for norm, eps in [(Norm.L2, 0.3), (Norm.L1, 3.0)]:
        atk = PGD(ThreatModel(norm, eps), steps=20, rel_step_size=0.2 if norm is Norm.L2 else 0.1,
                  seed=0)
        noise = PGD(ThreatModel(norm, eps), steps=0, seed=0)  # uniform start only
        assert acc(atk(model, x, y)) < acc(noise(model, x, y)) - 0.2, norm


def test_autoattack_apgd_ce_matches_pyautoattack_called_directly(trained) -> None:
    from pyautoattack import AutoAttack as Reference
    model, x, y = trained
    x, y = x[:24], y[:24]
    wrapper = ATTACKS.get("autoattack")(ThreatModel(Norm.LINF, 2 / 255), seed=0,
                                        version="custom", attacks=["apgd-ce"])
    ours = wrapper(model, x, y)
    ref = Reference(model, attacks=["apgd-ce"], version="custom", norm="Linf", eps=2 / 255,
                    seed=0, device="cpu")
    theirs, _ = ref.run_standard_evaluation(x, y, batch_size=len(y))
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        assert (model(ours).argmax(1) != y).any(), "APGD-CE broke nothing: the test is vacuous"


def test_autoattack_components_equal_one_call_and_record_who_broke_each_point(
        trained, caplog) -> None:
    """The wrapper runs AutoAttack's cascade one component a call (progress, seconds, which
    component broke each point): x' must equal one ``run_standard_evaluation`` call."""
    from attacks.norms import fit_to_ball
    from benchmark.eval.flags import attack_points, predict
    from benchmark.eval.worstcase import from_hex
    model, x, y = trained
    eps = 3 / 255
    wrapper = ATTACKS.get("autoattack")(ThreatModel(Norm.LINF, eps), seed=0, n_iter=4,
                                        n_queries=30)
    model.zero_grad(set_to_none=True)
    with caplog.at_level("INFO", logger="attacks"):
        ours = wrapper(model, x, y)
    # the cascade runs with frozen parameters: FAB's .backward() leaves no weight gradients
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    ref = wrapper.build(model, x.device)
    with torch.random.fork_rng():
        theirs, _ = ref.run_standard_evaluation(x, y, batch_size=len(y))
    assert any(p.grad is not None for p in model.parameters()), "FAB never ran: vacuous"
    model.zero_grad(set_to_none=True)
    assert torch.equal(ours, fit_to_ball(x, theirs, Norm.LINF, eps))
    rec = wrapper.breakdown()
    assert rec["components"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    with torch.no_grad():
        correct, fooled = model(x).argmax(1) == y, model(ours).argmax(1) != y
    first = rec["first_broken_by"].long()
    assert torch.equal(first >= 0, correct & fooled), "every broken point has one breaker"
    assert len(set(first[first >= 0].tolist())) >= 2, "one component broke all: vacuous"
    text = caplog.text
    assert "AutoAttack apgd-t: target 9/9, restart 1/1" in text
    assert "AutoAttack apgd-ce: restart 1/1" in text and "still robust" in text
    assert all(f"AutoAttack {c}: " in text for c in rec["components"][:int(first.max()) + 1])
    # through the evaluation primitive: seconds, counts and bits per component
    clean, ce = predict(model, x, y)
    stats: dict = {}
    robust, _ = attack_points(model, wrapper, x, y, clean=clean, clean_ce=ce, batch_size=40,
                              stats=stats)
    comp = stats["components"]
    assert comp["order"] == rec["components"] and set(comp["cpu_s"]) == set(comp["order"])
    assert all(comp["wall_s"][c] >= 0 for c in comp["order"])
    assert sum(comp["broken"].values()) == int(clean.sum() - robust.sum())
    assert comp["robust_after"]["square"] == int(robust.sum())
    for i, c in enumerate(comp["order"]):
        bits = torch.from_numpy(from_hex(comp["first_broken_bits"][c], len(y)))
        assert torch.equal(bits, stats["first_broken_by"] == i)


def test_attack_points_attacks_with_frozen_parameters_and_the_same_flags(trained) -> None:
    """attack_points freezes the parameters while the attack runs (input gradients only)
    and gives bit for bit the flags and CE of the same attack run with them trainable."""
    import torch.nn.functional as F

    from benchmark.eval.flags import attack_points, predict
    model, x, y = trained
    seen: list[bool] = []

    def spy(m: nn.Module, xa: torch.Tensor, x0: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        seen.append(any(p.requires_grad for p in m.parameters()))
        return F.cross_entropy(m(xa), yy, reduction="none")
    atk = PGD(ThreatModel(Norm.LINF, 3 / 255), steps=5, seed=0)
    clean, ce = predict(model, x, y)
    robust, adv_ce = attack_points(model, atk, x, y, clean=clean, clean_ce=ce, batch_size=40,
                                   loss=spy)
    assert seen and not any(seen), "parameters required grad during the attack"
    assert all(p.requires_grad for p in model.parameters()), "flags not restored"
    ref_robust, ref_ce = clean.clone(), ce.clone()
    idx = torch.nonzero(clean).flatten()
    for i in range(0, len(idx), 40):  # the same batches, parameters trainable
        b = idx[i:i + 40]
        with torch.no_grad():
            out = model(atk(model, x[b], y[b]))
        ref_robust[b], ref_ce[b] = out.argmax(1) == y[b], F.cross_entropy(out, y[b],
                                                                           reduction="none")
    assert torch.equal(robust, ref_robust) and torch.equal(adv_ce, ref_ce)
    assert 0 < int(robust.sum()) < int(clean.sum()), "all or nothing broken: vacuous"
