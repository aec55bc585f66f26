"""Foundation contracts: attack validation, PGD ball/box and mode restore, AT's loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Norm, ThreatModel, check_perturbation, eps_to_str, model_mode, parse_eps
from attacks.pgd import PGD
from benchmark import models
from benchmark.errors import PerturbationError, UsageError
from benchmark.testing import TINY_INFO, make_defense
from defenses import DEFENSES


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 8 / 255), (Norm.LINF, 0.3), (Norm.L2, 0.5)])
@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
def test_pgd_stays_in_ball_and_box(norm: Norm, eps: float, start: str) -> None:
    model = small_model()
    x = torch.rand(16, 3, 8, 8)
    x[:4] = 0.0  # corners of the box
    x[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    x_adv = PGD(ThreatModel(norm, eps), steps=5, step_size=eps / 2, random_start=start)(model, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    n = d.abs().amax(1) if norm is Norm.LINF else d.norm(dim=1)
    assert (n <= eps * (1 + 1e-5) + 1e-6).all()
    assert (n > 0).any(), "the attack did not move at all"


def test_pgd_increases_loss_and_restores_mode() -> None:
    model = small_model()
    model.train()
    model[1].eval()  # a submodule in a different mode must come back as it was
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    x_adv = PGD(ThreatModel(Norm.LINF, 8 / 255), steps=10, step_size=2 / 255)(model, x, y)
    assert model.training and not model[1].training
    with torch.no_grad(), model_mode(model, train=False):
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_seeded_pgd_is_deterministic_and_seed_matters() -> None:
    model = small_model().eval()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    t = ThreatModel(Norm.LINF, 8 / 255)
    a = PGD(t, steps=3, seed=1)(model, x, y)
    assert torch.equal(a, PGD(t, steps=3, seed=1)(model, x, y))
    assert not torch.equal(a, PGD(t, steps=3, seed=2)(model, x, y))


def test_check_perturbation_raises_never_clips() -> None:
    x = torch.full((2, 1, 2, 2), 0.5)
    t = ThreatModel(Norm.LINF, 0.1)
    check_perturbation(x, x + 0.1, t)
    with pytest.raises(PerturbationError, match="exceed"):
        check_perturbation(x, x + 0.11, t)
    with pytest.raises(PerturbationError, match=r"\[0,1\]"):
        check_perturbation(torch.ones_like(x), torch.ones_like(x) + 0.05, t)


def test_attack_rejects_inputs_outside_unit_box() -> None:
    with pytest.raises(UsageError, match=r"\[0,1\]"):
        PGD(ThreatModel(Norm.LINF, 0.1))(small_model(), torch.rand(2, 3, 8, 8) * 2, torch.zeros(2,
                                                                                 dtype=torch.long))


def test_unknown_attack_hparam_and_bad_eps() -> None:
    with pytest.raises(UsageError, match="unknown hyperparameters"):
        PGD(ThreatModel(Norm.LINF, 0.1), stpes=3)
    with pytest.raises(UsageError):
        ThreatModel(Norm.LINF, -0.1)
    with pytest.raises(UsageError):
        parse_eps("8/zero")
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert eps_to_str(8 / 255) == "8/255" and eps_to_str(0.3) == "0.3"
    assert eps_to_str(0.2) == "0.2" and eps_to_str(2000 / 255) == "2000/255"  # not "51/255"


def test_at_loss_is_ce_on_the_adversarial_batch() -> None:
    """AT's loss equals CE(f(x'), y) where x' is the training attack's output from the same RNG."""
    defense = make_defense(DEFENSES.get("at"))
    model = defense.build_model("tiny", TINY_INFO)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 10
    torch.manual_seed(5)
    out = defense.training_step(model.train(), x, y, epoch=0, step=0)
    torch.manual_seed(5)
    x_adv = defense.attack_for_training()(model, x, y)
    assert not torch.equal(x_adv, x)
    expected = F.cross_entropy(model.train()(x_adv), y)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert model.training
    # and it is not the clean loss
    assert not torch.allclose(out.loss, F.cross_entropy(model(x), y))


def test_st_loss_is_clean_ce() -> None:
    defense = make_defense(DEFENSES.get("st"))
    model = defense.build_model("tiny", TINY_INFO).train()
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 10
    out = defense.training_step(model, x, y, epoch=0, step=0)
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y))


@pytest.mark.parametrize("arch", ["tiny", "small-cnn", "lenets++", "resnet18", "preact-resnet18"])
def test_models_normalise_inside_and_expose_features(arch: str) -> None:
    defense = make_defense(DEFENSES.get("st"))
    model = defense.build_model(arch, TINY_INFO).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        f = model.features(x)
        assert torch.allclose(model(x), model.head(f), atol=1e-6)
        manual = model.backbone(model.normalize(x))
        assert torch.allclose(f, manual, atol=1e-6)
        assert torch.allclose(model.normalize(x), (x - 0.5) / 0.25)


def test_lenets_pp_initialisation_keeps_the_signal_scale() -> None:
    """No batch norm: with PyTorch's default init the 2-d features of normalised inputs start
    near 0.03 and AT never leaves chance; He's PReLU init keeps every layer at order 1."""
    torch.manual_seed(0)
    net = models.LeNetsPP(1)
    x = torch.randn(64, 1, 28, 28)
    rms = []
    with torch.no_grad():
        h = x
        for layer in net.convs:
            h = layer(h)
            if isinstance(layer, torch.nn.PReLU):
                rms.append(float(h.pow(2).mean().sqrt()))
        f = net.forward_pool(h)
    assert min(rms) > 0.3 and max(rms) < 10, rms
    assert float(f.norm(dim=1).mean()) > 0.3
    assert all(float(m.bias.detach().abs().max()) == 0 for m in net.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_ci_runs_exactly_the_readme_commands() -> None:
    """.ci/run ends with the README's two command lines, verbatim and in order."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in readme.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[1].endswith("python -m pytest -q")
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-2:] == lines
