"""DIO: diversity via orthogonality — L mutually orthogonal linear heads on shared features.

Paper: K. Fang, Q. Tao, Y. Wu, T. Li, J. Cai, F. Cai, X. Huang, J. Yang, "Towards Robust Neural
Networks via Orthogonal Diversity", Pattern Recognition 149 (2024), arXiv:2010.12190;
official code fanghenshaometeor/DIversity-via-Orthogonality (``train.py``, ``model/dio_*.py``).

Heads W_l ∈ R^{M×d} (no bias), logits z_l = f·W_lᵀ. Loss on x' = PGD-l∞ of the protocol::

    L = (1/L) Σ_l CE(z_l(x'), y) + α·Σ_{i<j} ⟨W_i, W_j⟩_F² + β·Σ_l mean_{n ∈ C_l} (τ − m_{l,n})₊
    m_{l,n} = min_{k : d>0} |z_{l,n,k} − max_k z_{l,n,k}| / ‖W_{l,k}‖₂

C_l is the set of samples head l classifies correctly (a head with none adds 0), and the
margin m is the official ``compute_margin_loss``: the smallest logit gap to the winning class,
each gap divided by the norm of the *other* class's weight row (not of a weight difference).

Evaluation: ``model(x)`` = the mean of the L heads' logits (deterministic; equal to one linear
classifier whose weight is the mean of the W_l, which ``class_centers`` returns).

Hyperparameters (official ``train.sh``, AT + DIO):

    ===========  ======  ====================================================
    num_heads    10      L
    alpha        0.1     orthogonality weight
    beta         0.1     margin weight
    tau          0.2     margin upper bound (0.5 for WRN-34-10)
    attack_head  random  training PGD on CE of one random head per step
                         ("random", official) or of the mean logits ("mean")
    ===========  ======  ====================================================

Deviations: the official evaluation attacks one head (or a random one for AutoAttack);
advbench evaluates the deterministic mean-logit model. The common protocol replaces the
official recipe (lr 0.05, batch 256, 200 epochs). Heads use nn.Linear's default init. The
adaptive objective is per sample ``mean_l CE_l(x') + β·Σ_l (τ − m_l)₊·[head l correct]``.

Example:
    advbench train --defense dio --dataset cifar10 --profile paper
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Objective
from defenses import register_defense
from defenses.base import Defense, StepOutput, detached, head_of


class MultiHead(nn.Module):
    """L bias-free linear heads stored as one (L, M, d) weight; forward = mean of the logits."""

    def __init__(self, feature_dim: int, num_classes: int, num_heads: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(feature_dim)
        self.weight = nn.Parameter(
            torch.empty(num_heads, num_classes, feature_dim).uniform_(-bound, bound))

    def all_logits(self, features: Tensor) -> Tensor:
        """Logits of every head, shape (L, N, M)."""
        return torch.einsum("nd,lmd->lnm", features, self.weight)

    def forward(self, features: Tensor) -> Tensor:
        return self.all_logits(features).mean(dim=0)


def orthogonality(weight: Tensor) -> Tensor:
    """Σ_{i<j} ⟨W_i, W_j⟩_F² over the heads of an (L, M, d) weight."""
    flat = weight.flatten(1)
    gram = flat @ flat.t()
    return torch.triu(gram, diagonal=1).pow(2).sum()


def margin_hinge(all_logits: Tensor, weight: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Per (head, sample) hinge ``(τ − m)₊`` and the mask of correctly classified pairs."""
    top = all_logits.max(dim=2, keepdim=True).values
    dist = (all_logits - top).abs() / weight.norm(dim=2)[:, None, :]
    dist = torch.where(dist > 0, dist, torch.full_like(dist, 1000.0))
    return (tau - dist.min(dim=2).values).clamp(min=0), all_logits.detach().argmax(dim=2)


def dio_loss(all_logits: Tensor, y: Tensor, weight: Tensor, *, alpha: float, beta: float,
             tau: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The DIO objective on (L, N, M) logits; returns the loss and its (attached) parts."""
    num_heads = all_logits.shape[0]
    ce = sum(F.cross_entropy(z, y) for z in all_logits) / num_heads
    hinge, pred = margin_hinge(all_logits, weight, tau)
    correct = (pred == y[None]).float()
    margin = ((hinge * correct).sum(1) / correct.sum(1).clamp(min=1)).sum()
    ortho = orthogonality(weight)
    return ce + alpha * ortho + beta * margin, {"ce_adv": ce, "ortho": ortho, "margin": margin}


def multi_head(model: nn.Module) -> MultiHead:
    """The model's :class:`MultiHead` (raises ``TypeError`` for any other head)."""
    return head_of(model, MultiHead, "dio")


@register_defense("dio")
class DIO(Defense):
    """PGD-AT with L orthogonal heads, a margin regulariser and mean-logit evaluation."""

    description = "diversity via orthogonality: orthogonal multi-head + margin (Fang et al.)"
    paper = "Fang et al., Pattern Recognition 2024, arXiv:2010.12190"
    default_hparams = {"num_heads": 10, "alpha": 0.1, "beta": 0.1, "tau": 0.2,
                       "attack_head": "random"}
    hparam_choices = {"attack_head": ("random", "mean")}
    arch_hparams = {"wrn-34-10": {"tau": 0.5}}

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return MultiHead(feature_dim, num_classes, int(self.hparams["num_heads"]))

    def _attack_objective(self) -> Objective | None:
        mode = self.hparams["attack_head"]
        if mode == "mean":
            return None
        if mode != "random":
            raise ValueError(f"attack_head must be 'random' or 'mean', got {mode!r}")

        def random_head_ce(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            head = multi_head(model)
            pick = int(torch.randint(head.weight.shape[0], (1,)))  # official: new head per call
            return F.cross_entropy(model.features(x_adv) @ head.weight[pick].t(), y,
                                   reduction="none")

        return random_head_ce

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        x_adv = self.adversarial(model, x, y, loss=self._attack_objective())
        head = multi_head(model)
        all_logits = head.all_logits(model.features(x_adv))
        loss, parts = dio_loss(all_logits, y, head.weight, alpha=float(self.hparams["alpha"]),
                               beta=float(self.hparams["beta"]), tau=float(self.hparams["tau"]))
        return StepOutput(loss, detached(**parts), all_logits.detach().mean(0))

    def objective(self) -> Objective:
        """Per-sample ``mean_l CE_l(x') + β·Σ_l (τ − m_l)₊·[head l correct]``."""
        beta, tau = float(self.hparams["beta"]), float(self.hparams["tau"])

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            head = multi_head(model)
            all_logits = head.all_logits(model.features(x_adv))
            ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in all_logits])
            hinge, pred = margin_hinge(all_logits, head.weight, tau)
            return ce.mean(0) + beta * (hinge * (pred == y[None]).float()).sum(0)

        return loss

    def class_centers(self, model: nn.Module) -> Tensor:
        """The mean head weight: the linear classifier that eval ``forward`` applies."""
        return multi_head(model).weight.detach().mean(dim=0)
