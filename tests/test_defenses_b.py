"""FSR, DIO and PCL: losses against independent computations, deterministic evaluation."""
from __future__ import annotations

import math

import pytest
import torch

from benchmark.testing import TINY_INFO, check_defense, make_defense
from defenses.dio import DIO, dio_loss, margin_hinge, orthogonality
from defenses.fsr import FSR, DELTA, FSRNeck, fsr_loss, gumbel_sigmoid, most_likely_wrong
from defenses.pcl import PCL, contrastive_proximity, pcl_loss, proximity


def _ce(z: list[float], k: int) -> float:
    m = max(z)
    return -(z[k] - m - math.log(sum(math.exp(v - m) for v in z)))


def _fixed_adversary(defense, x_adv):
    defense.adversarial = lambda model, x, y, loss=None: x_adv


@pytest.mark.parametrize("cls", [FSR, DIO, PCL])
def test_check_defense(cls: type) -> None:
    check_defense(cls, archs=("tiny", "small-cnn", "lenets++"))


# ------------------------------------------------------------------ FSR
def test_gumbel_sigmoid_matches_the_official_two_way_softmax() -> None:
    p = torch.rand(4, 6)
    tau = 0.1
    g_half = -math.log(-math.log(0.5 + DELTA) + DELTA)  # official eval noise (U = 0.5)
    two_way = torch.stack([(p + DELTA).log() + g_half, (1 - p + DELTA).log() + g_half])
    expected = torch.softmax(two_way / (tau + DELTA), dim=0)[0]
    assert torch.allclose(gumbel_sigmoid(p, tau, stochastic=False), expected, atol=1e-6)
    torch.manual_seed(3)
    got = gumbel_sigmoid(p, tau, stochastic=True)
    torch.manual_seed(3)
    u1, u2 = torch.rand_like(p), torch.rand_like(p)
    g1, g2 = (-(-(u + DELTA).log() + DELTA).log() for u in (u1, u2))
    two_way = torch.stack([(p + DELTA).log() + g1, (1 - p + DELTA).log() + g2])
    assert torch.allclose(got, torch.softmax(two_way / (tau + DELTA), dim=0)[0], atol=1e-6)


def test_fsr_neck_deterministic_in_eval_stochastic_in_train() -> None:
    neck = FSRNeck(8, 10)
    maps = torch.rand(3, 8, 4, 4)
    neck.eval()
    assert torch.equal(neck(maps), neck(maps))
    out, robust, nonrobust, recal = neck.separate(maps)
    m = neck.mask(maps)
    assert torch.allclose(robust + nonrobust, maps, atol=1e-6)
    assert torch.allclose(recal, maps * (1 - m) + neck.recalibration(maps * (1 - m)) * (1 - m))
    assert torch.allclose(out, maps * m + recal)
    neck.train()
    assert not torch.equal(neck.mask(maps), neck.mask(maps))


def test_most_likely_wrong_class_matches_official_get_pred() -> None:
    logits = torch.tensor([[5.0, 3.0, 1.0], [1.0, 4.0, 2.0], [0.0, 0.5, 2.0]])
    y = torch.tensor([0, 0, 2])
    assert most_likely_wrong(logits, y).tolist() == [1, 1, 1]
    order = logits.sort(dim=1, descending=True)[1]
    official = torch.where(order[:, 0] == y, order[:, 1], order[:, 0])
    assert torch.equal(most_likely_wrong(logits, y), official)


def test_fsr_loss_equals_formula() -> None:
    z = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]
    aux_r = [[0.5, 0.1, 0.2], [0.3, 0.3, 0.9]]
    aux_nr = [[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
    aux_rec = [[0.2, 0.4, 0.6], [1.5, 0.5, 0.0]]
    y = [0, 2]
    y_hat = [1, 1]  # most likely wrong class of z
    ref = sum(_ce(z[i], y[i]) + 0.5 * (_ce(aux_r[i], y[i]) + _ce(aux_nr[i], y_hat[i]))
              + 2.0 * _ce(aux_rec[i], y[i]) for i in range(2)) / 2
    t = torch.tensor
    loss, _ = fsr_loss(t(z), t(aux_r), t(aux_nr), t(aux_rec), t(y), lambda_sep=0.5, lambda_rec=2.0)
    assert loss.item() == pytest.approx(ref, rel=1e-6)


def test_fsr_training_step_uses_one_mask_sample_for_all_outputs() -> None:
    defense = make_defense(FSR)
    model = defense.build_model("tiny", TINY_INFO).train()
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1, 0])
    x_adv = (x + 0.03).clamp(0, 1)
    _fixed_adversary(defense, x_adv)
    torch.manual_seed(11)
    out = defense.training_step(model, x, y, epoch=0, step=0)
    torch.manual_seed(11)
    with torch.no_grad():
        _, r, nr, rec = model.neck.separate(model.maps(x_adv))
        logits = model.head(model.backbone.forward_pool(r + rec))
        aux = [model.neck.aux(t.mean(dim=(2, 3))).tolist() for t in (r, nr, rec)]
    z, yl = logits.tolist(), y.tolist()
    wrong = [max((k for k in range(10) if k != yl[i]), key=lambda k: z[i][k]) for i in range(6)]
    ref = sum(_ce(z[i], yl[i]) + _ce(aux[0][i], yl[i]) + _ce(aux[1][i], wrong[i])
              + _ce(aux[2][i], yl[i]) for i in range(6)) / 6
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------ DIO
def test_orthogonality_is_sum_of_squared_frobenius_products() -> None:
    W = torch.randn(4, 3, 5)
    ref = sum(float((W[i] * W[j]).sum()) ** 2 for i in range(4) for j in range(i + 1, 4))
    assert orthogonality(W).item() == pytest.approx(ref, rel=1e-5)


def test_margin_term_on_hand_made_logits() -> None:
    # head 0 rows have norms (1, 2, 1); head 1 rows norm 1
    W = torch.zeros(2, 3, 4)
    W[0, 0, 0], W[0, 1, 1], W[0, 2, 2] = 1.0, 2.0, 1.0
    W[1, 0, 0], W[1, 1, 1], W[1, 2, 2] = 1.0, 1.0, 1.0
    logits = torch.tensor([[[3.0, 2.5, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]],
                           [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]])
    y = torch.tensor([0, 0, 2])
    # head 0: sample 0 margin min(0.5/2, 3/1) = 0.25 -> hinge 0.25; sample 1 wrong (excluded);
    # sample 2 margin min(1/1, 1/2) = 0.5 -> hinge 0.  Head 1 gets every sample wrong -> 0.
    hinge, pred = margin_hinge(logits, W, tau=0.5)
    assert hinge[0, 0].item() == pytest.approx(0.25) and hinge[0, 2].item() == 0.0
    loss, parts = dio_loss(logits, y, W, alpha=0.0, beta=1.0, tau=0.5)
    assert parts["margin"].item() == pytest.approx(0.125)
    ce = sum(_ce(logits[l, i].tolist(), int(y[i])) for l in range(2) for i in range(3)) / 6
    assert loss.item() == pytest.approx(ce + 0.125, rel=1e-6)


def test_dio_loss_weights_and_mean_logit_eval() -> None:
    defense = make_defense(DIO, hparams={"num_heads": 3})
    model = defense.build_model("tiny", TINY_INFO).eval()
    W = model.head.weight
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    f = model.features(x)
    assert torch.allclose(model(x), sum(f @ W[l].t() for l in range(3)) / 3, atol=1e-6)
    assert torch.allclose(defense.class_centers(model), W.detach().mean(0))
    all_logits = torch.stack([f @ W[l].t() for l in range(3)])
    loss, parts = dio_loss(all_logits, y, W, alpha=0.1, beta=0.1, tau=0.2)
    assert loss.item() == pytest.approx(
        (parts["ce_adv"] + 0.1 * parts["ortho"] + 0.1 * parts["margin"]).item(), rel=1e-6)
    ce = sum(_ce(all_logits[l, i].tolist(), int(y[i])) for l in range(3) for i in range(5)) / 15
    assert parts["ce_adv"].item() == pytest.approx(ce, rel=1e-5)


def test_dio_training_attack_heads() -> None:
    assert make_defense(DIO)._attack_objective() is not None  # official: a random head
    assert make_defense(DIO, hparams={"attack_head": "mean"})._attack_objective() is None
    with pytest.raises(ValueError):
        make_defense(DIO, hparams={"attack_head": "all"})._attack_objective()


# ------------------------------------------------------------------ PCL
def test_proximity_terms_equal_loops() -> None:
    f, c, y = torch.randn(5, 3), torch.randn(4, 3), torch.tensor([0, 3, 1, 1, 2])
    prox = sum(float(((f[i] - c[y[i]]) ** 2).sum()) for i in range(5)) / 5
    con = sum(float(((f[i] - c[k]) ** 2).sum()) for i in range(5) for k in range(4)
              if k != y[i]) / 15
    assert proximity(f, y, c).item() == pytest.approx(prox, rel=1e-5)
    assert contrastive_proximity(f, y, c).item() == pytest.approx(con, rel=1e-5)


def test_pcl_feature_head_is_a_linear_layer_after_the_backbone() -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    model = make_defense(PCL).build_model("tiny", TINY_INFO).eval()
    plain = make_defense(PCL, hparams={"feature_head": "none"}).build_model("tiny", TINY_INFO)
    embed = model.backbone.embed
    assert isinstance(embed, torch.nn.Linear)
    with torch.no_grad():
        inner = model.backbone.inner(model.normalize(x))
        assert torch.allclose(model.features(x), embed(inner))
        assert (model.features(x) < 0).any() and (plain.features(x) >= 0).all()


def test_pcl_pretrain_stage_is_clean_softmax_without_attack() -> None:
    """The official softmax stage: CE on clean x only, no attack, centres get no gradient."""
    defense = make_defense(PCL, hparams={"epochs": 8})
    assert defense.pretrain_epochs() == 2
    model = defense.build_model("tiny", TINY_INFO).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])

    def no_attack(*args, **kwargs):
        raise AssertionError("the softmax stage must not attack")

    defense.adversarial = no_attack
    out = defense.training_step(model, x, y, epoch=1, step=0)
    logits = model(x)
    assert out.loss.item() == pytest.approx(
        sum(_ce(z, k) for z, k in zip(logits.tolist(), y.tolist())) / 4, rel=1e-5)
    grads = torch.autograd.grad(out.loss, [model.head.centers, model.head.con_centers],
                                allow_unused=True)
    assert all(g is None for g in grads)
    assert make_defense(PCL, hparams={"epochs": 8, "pretrain_frac": 0.0}).pretrain_epochs() == 0


def test_pcl_step_concatenates_clean_and_adversarial() -> None:
    defense = make_defense(PCL, hparams={"weight_conprox": 0.01})
    model = defense.build_model("tiny", TINY_INFO).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    x_adv = (x - 0.03).clamp(0, 1)
    _fixed_adversary(defense, x_adv)
    assert defense.pretrain_epochs() == 2  # round(0.25 · 10 cpu-profile epochs)
    out = defense.training_step(model, x, y, epoch=2, step=0)
    head = model.head
    c, cc = head.centers.detach(), head.con_centers.detach()
    with torch.no_grad():
        f = torch.cat([model.features(x), model.features(x_adv)])
        ref, _ = pcl_loss(head(f), f, torch.cat([y, y]), head.centers, head.con_centers,
                          weight_prox=1.0, weight_conprox=0.01)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    labels = [0, 1, 2, 3] * 2
    ce = sum(_ce(z, k) for z, k in zip(head(f).tolist(), labels)) / 8
    prox = sum(float(((f[i] - c[k]) ** 2).sum()) for i, k in enumerate(labels))
    con = sum(float(((f[i] - cc[j]) ** 2).sum()) for i, k in enumerate(labels)
              for j in range(10) if j != k)
    assert out.loss.item() == pytest.approx(ce + prox / 8 - 0.01 * con / 72, rel=1e-5)
    grads = torch.autograd.grad(out.loss, [head.centers, head.con_centers], retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)  # the harness optimizer trains the centres
    ref_g, _ = pcl_loss(head(f), f, torch.cat([y, y]), head.centers, head.con_centers,
                        weight_prox=1.0, weight_conprox=0.01)
    ref_grads = torch.autograd.grad(ref_g, [head.centers, head.con_centers], retain_graph=True)
    # official lrs: model 0.01 = 0.1 × protocol-stage lr; c 50× and c' 100× the model's
    assert torch.allclose(grads[0], 0.1 * 50 * ref_grads[0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(grads[1], 0.1 * 100 * ref_grads[1], rtol=1e-4, atol=1e-9)
    w = model.head.fc.weight
    (g_model,), (g_ref,) = torch.autograd.grad(out.loss, [w]), torch.autograd.grad(ref_g, [w])
    assert torch.allclose(g_model, 0.1 * g_ref, rtol=1e-4, atol=1e-7)
    assert torch.equal(defense.class_centers(model), head.centers.detach())
