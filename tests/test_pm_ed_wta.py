"""±ED-WTA: the affine head equals the distance form, competitive CE reduces to CE at K = 1,
the switching rule routes prototype gradients by class, and β trains with its own lr."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmark.run.train import make_optimizer, set_lr
from benchmark.testing import check_defense, make_defense
from defenses.pm_ed_wta import PMEDWTA, PMEDWTAHead, competitive_ce


def _head(d: int = 5, classes: int = 3, k: int = 2, beta: float = 1.7) -> PMEDWTAHead:
    head = PMEDWTAHead(d, classes, k, beta)
    with torch.no_grad():  # prototypes of a realistic size, not the tiny initial ones
        head.pos.normal_()
        head.neg.normal_()
    return head


def test_affine_form_equals_distance_form() -> None:
    head = _head()
    f = torch.randn(7, 5)
    pos, neg, beta = head.pos.double(), head.neg.double(), float(head.beta.detach())
    fd = f.double()
    dist = beta * (0.5 * ((fd[:, None] - neg[None]) ** 2).sum(-1)
                   - 0.5 * ((fd[:, None] - pos[None]) ** 2).sum(-1))
    assert torch.allclose(head.neurons(f).double(), dist, atol=1e-4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])  # routing changes gradients, never values
    assert torch.equal(head.neurons(f, y), head.neurons(f))
    # class logit = max over the class's two neurons (neurons 2c, 2c+1)
    assert torch.allclose(head(f).double(), torch.maximum(dist[:, 0::2], dist[:, 1::2]), atol=1e-4)
    assert head.neurons(f.bfloat16()).dtype == torch.float32  # fp32 even from bf16 features


def test_competitive_ce_with_one_neuron_per_class_is_cross_entropy() -> None:
    head = _head(k=1)
    f, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    o = head.neurons(f)
    assert torch.allclose(competitive_ce(o, y, head.neuron_class),
                          F.cross_entropy(o, y, reduction="none"), atol=1e-6)
    # K = 2: E = −log(z_{2y} + z_{2y+1}) computed from the softmax directly
    head2 = _head(k=2)
    o2 = head2.neurons(f)
    z = torch.softmax(o2.double(), 1)
    ref = -torch.log(z[torch.arange(6), 2 * y] + z[torch.arange(6), 2 * y + 1])
    assert torch.allclose(competitive_ce(o2, y, head2.neuron_class).double(), ref, atol=1e-6)


def test_switching_rule_routes_prototype_gradients_by_class() -> None:
    head = _head(classes=3, k=2)
    f = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 2, 2, 1])
    own = head.neuron_class[None, :] == y[:, None]  # 4 × 6
    for i in range(4):
        loss = competitive_ce(head.neurons(f[i:i + 1], y[i:i + 1]), y[i:i + 1],
                              head.neuron_class).sum()
        g_pos, g_neg, g_f = torch.autograd.grad(loss, [head.pos, head.neg, f])
        free = competitive_ce(head.neurons(f[i:i + 1]), y[i:i + 1], head.neuron_class).sum()
        t_pos, t_neg, t_f = torch.autograd.grad(free, [head.pos, head.neg, f])
        mine = own[i]
        # p_k: only samples of its own class; n_k: only samples of other classes
        assert torch.all(g_pos[~mine] == 0) and torch.all(g_neg[mine] == 0)
        # ... where they do learn, it is the true gradient, and the true one is not zero
        # where the rule blocks it (so the zeros above are the rule's doing)
        assert torch.allclose(g_pos[mine], t_pos[mine])
        assert torch.allclose(g_neg[~mine], t_neg[~mine])
        assert t_pos[~mine].abs().sum() > 0 and t_neg[mine].abs().sum() > 0
        assert torch.allclose(g_f, t_f)  # the backbone gets the full gradient
    # batch form: a class without samples in the batch (class 1) moves no positive prototype
    yb = torch.tensor([0, 2, 2, 0])
    loss = competitive_ce(head.neurons(f, yb), yb, head.neuron_class).sum()
    g_pos, g_neg = torch.autograd.grad(loss, [head.pos, head.neg])
    absent = head.neuron_class == 1
    assert torch.all(g_pos[absent] == 0) and g_pos[~absent].abs().sum() > 0
    assert g_neg[absent].abs().sum() > 0  # n_k of an absent class learns from every sample


def test_contract_beta_lr_and_rejection_score() -> None:
    check_defense(PMEDWTA, archs=("tiny", "small-cnn", "lenets++"))
    check_defense(PMEDWTA, hparams={"neurons_per_class": 3})
    defense = make_defense(PMEDWTA, hparams={"neurons_per_class": 2, "beta_lr_scale": 0.01})
    from benchmark.testing import TINY_INFO
    model = defense.build_model("tiny", TINY_INFO)
    opt = make_optimizer(model, {**defense.hparams, "lr": 0.1}, defense)
    set_lr(opt, {**defense.hparams, "lr": 0.1}, 0)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wds = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert abs(lrs[id(model.head.beta)] - 0.001) < 1e-12 and wds[id(model.head.beta)] == 0
    assert lrs[id(model.head.pos)] == 0.1 and len(lrs) == len(list(model.parameters()))
    assert float(model.head.beta.detach()) == 1.0
    x = torch.rand(4, 3, 8, 8)
    f = model.features(x).double()
    ref = 0.5 * ((f[:, None] - model.head.pos.double()[None]) ** 2).sum(-1).min(1).values
    assert torch.allclose(defense.rejection_score(model, x).double(), ref, atol=1e-5)
    centres = defense.class_centers(model)
    assert centres.shape == (10, f.shape[1])
    assert torch.allclose(centres[3], model.head.pos[6:8].mean(0))


def test_standard_training_setting_reuses_the_module_on_clean_inputs() -> None:
    """``pm-ed-wta-st``: the same head and loss, no training attack, the loss on clean x."""
    from benchmark.testing import TINY_INFO
    from defenses import DEFENSES
    from defenses.pm_ed_wta import PMEDWTAStandard

    assert DEFENSES.get("pm-ed-wta-st") is PMEDWTAStandard
    assert issubclass(PMEDWTAStandard, PMEDWTA) and "pm-ed-wta-st" in DEFENSES.names()
    assert PMEDWTAStandard.uses_training_attack is False and PMEDWTA.uses_training_attack
    check_defense(PMEDWTAStandard, archs=("tiny",))
    st = make_defense(PMEDWTAStandard)
    assert st.training_attack() is None
    model = st.build_model("tiny", TINY_INFO)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 10
    out = st.training_step(model, x, y, epoch=0, step=0)
    head = model.head
    clean = competitive_ce(head.neurons(model.features(x)), y, head.neuron_class).mean()
    assert torch.allclose(out.loss, clean) and "cce" in out.metrics and "cce_adv" not in out.metrics
    at = make_defense(PMEDWTA)  # the adversarial setting's loss is on x' ≠ x
    assert not torch.allclose(at.training_step(model, x, y, epoch=0, step=0).loss, clean)


def test_rejection_score_options_nearest_positive_and_winner() -> None:
    """Hand-made prototypes: the nearest positive prototype and the winner's can differ."""

    defense = make_defense(PMEDWTA, hparams={"neurons_per_class": 1})
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    pos = torch.zeros(10, 2)
    neg = torch.zeros(10, 2)
    pos[0], pos[1] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    neg[0], neg[1] = torch.tensor([1.0, 0.1]), torch.tensor([0.0, -10.0])
    # o_k = ½‖f − n_k‖² − ½‖f − p_k‖² (β = 1); neurons 2..9 have p = n = 0, so o = 0.
    # f0 = 0: o_0 = ½·1.01 − ½ = 0.005, o_1 = 50 − 4.5 = 45.5 → winner 1, ½‖f0 − p_1‖² = 4.5;
    #         nearest positive: p_2..p_9 = 0, distance 0.
    # f1 = (2,0): o_0 = ½·1.01 − ½ = 0.005, o_1 = ½·104 − ½·13 = 45.5 → winner 1, ½·13 = 6.5;
    #         nearest positive: p_0 = (1,0), ½·1 = 0.5.
    stub = type("Stub", (torch.nn.Module,), {"features": lambda self, x: f})()
    stub.head = PMEDWTAHead(2, 10, 1, 1.0)
    with torch.no_grad():
        stub.head.pos.copy_(pos)
        stub.head.neg.copy_(neg)
    x = torch.zeros(2, 1)
    assert torch.allclose(defense.rejection_score(stub, x), torch.tensor([0.0, 0.5]))
    assert torch.allclose(defense.rejection_score(stub, x, "nearest-positive"),
                          torch.tensor([0.0, 0.5]))
    assert torch.allclose(defense.rejection_score(stub, x, "winner"), torch.tensor([4.5, 6.5]))
    assert list(defense.score_options) == ["nearest-positive", "winner"]
    assert defense.score_name == defense.score_options["nearest-positive"]
    with pytest.raises(ValueError, match="winner"):
        defense.rejection_score(stub, x, "farthest")
