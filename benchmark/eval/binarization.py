"""Check (j): the binarization test of Zimmermann, Brendel, Tramèr & Carlini, "Increasing
Confidence in Adversarial Robustness Evaluations" (NeurIPS 2022; reference code:
google-research/active-adversarial-tests, ``active_tests/decision_boundary_binarization.py``).

For each test point x the model's classifier head is replaced by a binary linear readout on
its features, fitted so that an adversarial example is *known* to exist inside the ε-ball:

1. inner set (label 0): x itself and ``n_inner − 1`` points x + U(−ηε, ηε) (η = 1 − gap,
   gap 0.05 as in the reference), clipped to [0, 1];
2. boundary set (label 1): ``n_boundary`` points x + δ, δ ~ U(−ε, ε) with one random
   coordinate set to ±ε (the sign that stays in [0, 1]), so ‖x_b − x‖∞ = ε exactly;
3. an unpenalised logistic regression (scikit-learn, as the reference's default) on the
   features of both sets. A setup is *feasible* only if the readout classifies every one of
   these points correctly (the reference's "perfect" solution goodness); then x is class 0
   and each boundary point, inside the ball, is an adversarial example of class 1;
4. the readout's logits are [−s, s], s = (w·f + b)/r with r the range of 2(w·f + b) over the
   fitted points (the reference's ``rescale_logits="fixed"``: logit range 1, so CE does not
   saturate).

The attack under test (the protocol's ``pgd`` at the check's ε) then attacks x with label 0 on
the binarized model. It *should* succeed on every feasible point; a point where it fails shows
the attack too weak for this model's geometry (Zimmermann et al.: "the attack is not strong
enough"), whatever the true robustness of the original model. The check's value is the share of
feasible points where the attack failed, judged like the other share checks (exact binomial
test against the minimum effect). Its finding is ``weak-attack`` and it doubts the tested
attack's cells only: it measures the attack, not the model.

Features: ``model.features`` when the model has it (advbench's ``Classifier``), else all
layers but the last of an ``nn.Sequential`` ending in a linear layer, else the model's logits
(wrappers that post-process logits are then tested on what they output). Deviations from the
reference: ℓ∞ only; 1 boundary point and ``min(99, d − 1)`` inner points for a d-dimensional
feature layer (the reference asks for more features than fitted points and warns otherwise);
the inner and boundary sets are seeded per point.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """How the binarized tasks are built (defaults: the reference's gap, 1 boundary point)."""

    n_inner: int = 99
    n_boundary: int = 1
    gap: float = 0.05
    seed: int = 0


def feature_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The layer the readout replaces the head on (see the module docstring)."""
    if callable(getattr(model, "features", None)):
        return model.features
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return model[:-1]
    return model


class BinarizedModel(nn.Module):
    """features(x) → [−s(x), s(x)], s = (w·f + b)/r: class 1 is the adversarial class."""

    def __init__(self, features: Callable[[Tensor], Tensor], w: Tensor, b: float,
                 scale: float) -> None:
        super().__init__()
        self._features = features
        self.register_buffer("w", w / scale)
        self.b = b / scale

    def forward(self, x: Tensor) -> Tensor:
        s = self._features(x).flatten(1).float() @ self.w + self.b
        return torch.stack([-s, s], dim=1)


def sample_task(x: Tensor, eps: float, settings: Settings, n_inner: int,
                gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(inner points with x first, boundary points at ℓ∞ distance exactly ε) around one x."""
    eta = (1.0 - settings.gap) * eps
    noise = (2 * torch.rand((n_inner - 1, *x.shape), generator=gen) - 1) * eta
    inner = torch.cat([x[None], (x[None] + noise.to(x)).clamp(0, 1)])
    delta = (2 * torch.rand((settings.n_boundary, *x.shape), generator=gen) - 1) * eps
    flat = delta.view(settings.n_boundary, -1)
    coord = torch.randint(flat.shape[1], (settings.n_boundary,), generator=gen)
    xf = x.flatten().cpu()
    flat[torch.arange(settings.n_boundary), coord] = torch.where(xf[coord] + eps <= 1, eps, -eps)
    boundary = (x[None] + delta.to(x)).clamp(0, 1)
    return inner, boundary


def fit_readout(f_inner: Tensor, f_boundary: Tensor) -> Optional[tuple[Tensor, float, float]]:
    """Unpenalised logistic regression inner → 0, boundary → 1: (w, b, logit range) if it
    separates every fitted point, else None (an infeasible setup)."""
    from sklearn.linear_model import LogisticRegression
    feats = torch.cat([f_inner, f_boundary]).double().cpu().numpy()
    labels = np.r_[np.zeros(len(f_inner)), np.ones(len(f_boundary))]
    lr = LogisticRegression(C=np.inf, max_iter=1000)  # unpenalised
    try:
        lr.fit(feats, labels)
    except ValueError:  # e.g. non-finite features
        return None
    if (lr.predict(feats) != labels).any():
        return None
    z = feats @ lr.coef_[0] + lr.intercept_[0]
    span = float(2 * (z.max() - z.min())) or 1.0
    return torch.as_tensor(lr.coef_[0], dtype=torch.float32), float(lr.intercept_[0]), span


def binarization_test(model: nn.Module, attack: Callable[..., Tensor], x: Tensor, eps: float,
                      settings: Settings = Settings()) -> tuple[int, int, int]:
    """Run the test on every point of ``x``: (feasible setups, attack failures among them,
    points tried). ``attack(model, x, y)`` returns x' in the ε-ball (an advbench attack)."""
    feats_of = feature_fn(model)
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        dim = feats_of(x[:1]).flatten(1).shape[1]
    n_inner = max(2, min(settings.n_inner, dim - settings.n_boundary))
    feasible = failed = 0
    for i in range(len(x)):
        inner, boundary = sample_task(x[i], eps, settings, n_inner, gen)
        with torch.no_grad():
            f_in = feats_of(inner).flatten(1)
            f_bd = feats_of(boundary).flatten(1)
        fit = fit_readout(f_in, f_bd)
        if fit is None:
            continue
        w, b, span = fit
        binar = BinarizedModel(feats_of, w.to(x.device), b, span).eval()
        feasible += 1
        y0 = torch.zeros(1, dtype=torch.long, device=x.device)
        x_adv = attack(binar, x[i:i + 1], y0)
        with torch.no_grad():
            if int(binar(x_adv).argmax(1)) != 1:
                failed += 1
    logger.info("binarization: attack failed on %d of %d feasible setups (%d points)",
                failed, feasible, len(x))
    return feasible, failed, len(x)
