"""FSR: feature separation and recalibration on top of PGD adversarial training.

Paper: W. J. Kim, Y. Cho, J. Jung, S.-E. Yoon, "Feature Separation and Recalibration for
Adversarial Robustness", CVPR 2023, arXiv:2303.13846; official code wkim97/FSR.

One FSR module (:class:`FSRNeck`) sits after the backbone's last stage, on its feature maps F:

    s  = σ(Sep(F)),  Sep = conv3×3(C→64)-BN-ReLU-conv3×3(64→64)-BN-ReLU-conv3×3(64→C)
    m  = σ((log(s+δ) − log(1−s+δ) + g₁ − g₂)/(τ+δ)),  g = −log(−log(U+δ)+δ), U ~ U(0,1), δ = 1e-8
    F⁺ = m ⊙ F,  F⁻ = (1 − m) ⊙ F,  F̃⁻ = F⁻ + Rec(F⁻) ⊙ (1 − m)      (Rec: same shape as Sep)
    output maps F⁺ + F̃⁻  →  the backbone's pooling  →  the linear classifier

At eval the official code sets U = 0.5, so g₁ = g₂ and the mask is the deterministic
σ(logit(s)/τ); :class:`FSRNeck` does the same whenever it is in eval mode (so the training PGD,
which runs in eval mode, also sees the deterministic mask, as in the official attack).

Loss on x' = PGD-l∞ of the protocol (aux = a linear layer on the global-average-pooled maps)::

    CE(f(x'), y) + λ_sep·[CE(aux(F⁺), y) + CE(aux(F⁻), ŷ)] + λ_rec·CE(aux(F̃⁻), y)
    ŷ = the most likely wrong class of f(x') (official ``get_pred``)

Hyperparameters (official ``train.py`` defaults):

    ==========  =====  =================================================
    lambda_sep  1.0    weight of the separation losses
    lambda_rec  1.0    weight of the recalibration loss
    tau         0.1    Gumbel-sigmoid temperature
    width       64     channels inside Sep and Rec (official num_channel)
    ==========  =====  =================================================

Deviations: the common protocol replaces the official recipe (100 epochs, lr ×0.1 at 75 and
90; SVHN lr 0.01 and PGD step 0.125·ε; the CIFAR PGD, 10 steps of 0.25·ε = 2/255 with a random
start, already matches). The module is placed after ``forward_maps`` of each advbench
backbone (after layer4 for ResNet-18 as officially; for PreAct ResNet-18 and WRN that is after
the final BN-ReLU, for the small CPU nets after their last conv block).

Example:
    advbench train --defense fsr --dataset cifar10 --profile paper
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses import register_defense
from defenses.base import Defense, StepOutput, detached

#: the official code's numerical guard inside the Gumbel sigmoid
DELTA = 1e-8


def _conv_stack(channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, channels, 3, padding=1, bias=False))


def gumbel_sigmoid(prob: Tensor, tau: float, *, stochastic: bool) -> Tensor:
    """Official Gumbel sigmoid of a probability map (deterministic when not stochastic)."""
    logit = (prob + DELTA).log() - (1 - prob + DELTA).log()
    if stochastic:
        u1, u2 = torch.rand_like(prob), torch.rand_like(prob)
        g1 = -(-(u1 + DELTA).log() + DELTA).log()
        g2 = -(-(u2 + DELTA).log() + DELTA).log()
        logit = logit + g1 - g2
    return torch.sigmoid(logit / (tau + DELTA))


class FSRNeck(nn.Module):
    """Separation + recalibration on the last feature maps; ``forward`` keeps their shape."""

    def __init__(self, channels: int, num_classes: int, *, tau: float = 0.1,
                 width: int = 64) -> None:
        super().__init__()
        self.tau = float(tau)
        self.separation = _conv_stack(channels, width)
        self.recalibration = _conv_stack(channels, width)
        self.aux = nn.Linear(channels, num_classes)

    def mask(self, maps: Tensor) -> Tensor:
        """Robustness mask m ∈ (0,1): Gumbel-sampled in train mode, deterministic in eval."""
        return gumbel_sigmoid(torch.sigmoid(self.separation(maps)), self.tau,
                              stochastic=self.training)

    def separate(self, maps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (output maps F⁺ + F̃⁻, F⁺, F⁻, F̃⁻) from one mask sample."""
        m = self.mask(maps)
        robust, nonrobust = maps * m, maps * (1 - m)
        recalibrated = nonrobust + self.recalibration(nonrobust) * (1 - m)
        return robust + recalibrated, robust, nonrobust, recalibrated

    def aux_logits(self, maps: Tensor) -> Tensor:
        """The auxiliary classifier on globally average-pooled maps."""
        return self.aux(torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1))

    def forward(self, maps: Tensor) -> Tensor:
        return self.separate(maps)[0]


def most_likely_wrong(logits: Tensor, y: Tensor) -> Tensor:
    """The highest-scoring class other than y (official ``get_pred``)."""
    masked = logits.detach().scatter(1, y[:, None], float("-inf"))
    return masked.argmax(dim=1)


def fsr_loss(logits: Tensor, aux_robust: Tensor, aux_nonrobust: Tensor, aux_recal: Tensor,
             y: Tensor, *, lambda_sep: float,
             lambda_rec: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The FSR objective on adversarial inputs; returns the loss and its (attached) parts."""
    ce = F.cross_entropy(logits, y)
    sep = lambda_sep * (F.cross_entropy(aux_robust, y)
                        + F.cross_entropy(aux_nonrobust, most_likely_wrong(logits, y)))
    rec = lambda_rec * F.cross_entropy(aux_recal, y)
    return ce + sep + rec, {"ce_adv": ce, "sep": sep, "rec": rec}


@register_defense("fsr")
class FSR(Defense):
    """PGD-AT with one feature separation & recalibration module after the last stage."""

    description = "feature separation and recalibration + PGD-AT (Kim et al. 2023)"
    paper = "Kim et al., CVPR 2023, arXiv:2303.13846"
    default_hparams = {"lambda_sep": 1.0, "lambda_rec": 1.0, "tau": 0.1, "width": 64}

    def make_neck(self, map_channels: int, num_classes: int) -> nn.Module:
        return FSRNeck(map_channels, num_classes, tau=float(self.hparams["tau"]),
                       width=int(self.hparams["width"]))

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        x_adv = self.adversarial(model, x, y)
        neck = model.neck
        if not isinstance(neck, FSRNeck):
            raise TypeError(f"fsr needs a model with an FSRNeck, got {type(neck)}")
        out, robust, nonrobust, recal = neck.separate(model.maps(x_adv))
        logits = model.head(model.backbone.forward_pool(out))
        loss, parts = fsr_loss(logits, neck.aux_logits(robust), neck.aux_logits(nonrobust),
                               neck.aux_logits(recal), y,
                               lambda_sep=float(self.hparams["lambda_sep"]),
                               lambda_rec=float(self.hparams["lambda_rec"]))
        return StepOutput(loss, detached(**parts), logits.detach())
