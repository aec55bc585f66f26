"""OC: adversarial training with a fixed orthogonal classifier.

Paper: Xu, Li and Yang, "An Orthogonal Classifier for Improving the Adversarial Robustness of
Neural Networks", Information Sciences 591 (2022), arXiv:2105.09109. Official code:
MTandHJ/roboc (``models/base.py::generate_weights``, ``src/base.py::Coach.adv_train``,
``src/loss_zoo.py::SquaredLoss``, ``src/attacks.py::LinfSquaredLoss``).

Head: a fixed, bias-free linear layer ``W = s · Ĥ[:C]`` where Ĥ is the Sylvester–Hadamard
matrix of size d (the feature dimension) with rows normalised to unit length, so every row of
W has norm s, all entries have magnitude s/√d and the rows are mutually orthogonal
(``W Wᵀ = s²·I``). W is a buffer: no gradient, never in the optimizer. Eval logits are
``f(x) Wᵀ``.

Loss, read from roboc: "f" is the *penultimate feature vector* (not the logits), the target
is the class's row of W (norm s), and MSE is ``F.mse_loss`` with mean reduction over N×d::

    L = λ · MSE(f(x), W_y) + (1 − λ) · MSE(f(x'), W_y)

Training attack: PGD-l∞ maximising the squared distance ``‖f(x') − W_y‖²`` (roboc's
``pgd-squared``; uniform start, protocol steps and step size). Per sample we use the mean over
the d coordinates, which has the same sign gradient as roboc's sum.

Feature head: roboc's backbones end in PReLU (MNIST net: ``Linear(200, 256) → PReLU``; its
ResNets: PReLU blocks before the average pool), so their features are signed and can reach the
±s/√d targets. advbench's backbones end in ReLU (``small-cnn``: ReLU(fc); the ResNets: ReLU
before the pool): every feature is ≥ 0, the MSE pulls the coordinates whose target is negative
below 0, the ReLUs die and the features collapse to 0 (measured: chance accuracy on MNIST and
CIFAR). With ``feature_head="prelu"`` (default) OC appends roboc's last feature layer,
``Linear(d, d) → PReLU``, to the backbone, so ``model.features`` (what the loss, the attack,
the feature metrics and Figure 2 see) is signed, as in the official networks.

Hyperparameters:

    ============  =======  =========================================================
    lam           0.15     weight of the clean term ("leverage"; 0.3 on MNIST: roboc
                           README, ``python AT.py mnist mnist ... --leverage=0.3``)
    s             10.0     row norm of the fixed classifier ("scale")
    seed          0        seed of the fallback matrix when d is not a power of two
    feature_head  "prelu"  "prelu": Linear(d, d) → PReLU after the backbone (roboc's
                           signed features); "none": the backbone's own features
    loss_scale    1.0      factor on the training loss, i.e. OC's own lr as a multiple
                           of the protocol's (weight decay unchanged); 1 = roboc
    ============  =======  =========================================================

Step budget: roboc's MSE is a mean over N×d, so the gradient it sends into each feature is
2(f − W_y)/d per sample, about 1/100 of what CE sends through the same head at d = 256; roboc
compensates with 80 epochs of full MNIST at lr 0.1 (~37,500 SGD steps). The cpu profile gives
~250 steps, so OC learns slowly there; ``loss_scale`` is the documented knob. Summing over d
instead (×256) diverged at lr 0.05 (NaN in epoch 1).

Deviations from the official code:

* roboc asserts d = 2^k. When d is not a power of two (e.g. WRN-34-10, d = 640) the rows are
  the first C columns of Q from the QR decomposition of a seeded Gaussian d×C matrix
  (orthonormal), times s. When C > d (LeNets++, d = 2) no orthogonal set exists: the rows are
  those of a Parseval frame (C×d slice of a seeded random orthogonal C×C matrix) normalised to
  norm s, and a warning is logged;
* roboc's MNIST network keeps a frozen random bias in its last layer; this head has no bias.

* the feature head above is roboc's last feature layer added to backbones that end in ReLU;
  ``feature_head="none"`` gives the loss on ReLU features (does not train, see above).

Example:
    advbench train --defense oc --dataset cifar10 --hparams '{"lam": 0.15, "s": 10.0}'
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Objective
from defenses import register_defense
from benchmark import models
from benchmark.data import DataInfo
from benchmark.errors import UsageError
from defenses.base import CleanCache, Defense, StepOutput, detached

logger = logging.getLogger(__name__)


def sylvester_hadamard(d: int) -> Tensor:
    """The d×d Sylvester–Hadamard matrix (entries ±1, H Hᵀ = d·I); d must be a power of 2."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"Sylvester–Hadamard needs a power of two, got {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([-h, h], 1)], 0)
    return h


def orthogonal_classifier(num_classes: int, dim: int, scale: float, seed: int = 0) -> Tensor:
    """Fixed C×d classifier with rows of norm ``scale`` (mutually orthogonal when C ≤ d)."""
    if num_classes <= dim and not dim & (dim - 1):
        return scale * sylvester_hadamard(dim)[:num_classes] / dim ** 0.5
    gen = torch.Generator().manual_seed(seed)
    if num_classes <= dim:
        q, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=gen, dtype=torch.float64))
        return (scale * q.t()).float()
    logger.warning("oc: %d classes do not fit orthogonally in %d dimensions; using a Parseval "
                   "frame with rows of norm %g", num_classes, dim, scale)
    q, _ = torch.linalg.qr(torch.randn(num_classes, num_classes, generator=gen,
                                       dtype=torch.float64))
    return (scale * F.normalize(q[:, :dim], dim=1)).float()


class FixedLinear(nn.Module):
    """``f Wᵀ`` with W a (persistent) buffer: saved in checkpoints, never trained."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.clone())

    def forward(self, features: Tensor) -> Tensor:
        return features @ self.weight.t()


def squared_error(features: Tensor, targets: Tensor) -> Tensor:
    """Per-sample squared error, mean over the d coordinates (roboc's ``F.mse_loss``)."""
    return (features - targets).pow(2).mean(1)


def oc_loss(feat_nat: Tensor, feat_adv: Tensor, targets: Tensor,
            lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """``λ·MSE(f(x), W_y) + (1−λ)·MSE(f(x'), W_y)``; returns (loss, mse_nat, mse_adv)."""
    mse_nat = squared_error(feat_nat, targets).mean()
    mse_adv = squared_error(feat_adv, targets).mean()
    return lam * mse_nat + (1 - lam) * mse_adv, mse_nat, mse_adv


@register_defense("oc")
class OrthogonalClassifier(Defense):
    """Squared loss between features and fixed orthogonal class vectors, clean + adversarial."""

    description = "OC: fixed Hadamard classifier, λ·MSE(f(x),W_y)+(1−λ)·MSE(f(x'),W_y) (Xu 2022)"
    loss_passes = 2  # MSE on f(x) and f(x')
    paper = "Xu, Li and Yang, Information Sciences 2022, arXiv:2105.09109"
    default_hparams = {"lam": 0.15, "s": 10.0, "seed": 0, "feature_head": "prelu",
                       "loss_scale": 1.0}
    dataset_hparams = {"mnist": {"lam": 0.3}, "mnist5k": {"lam": 0.3}}

    def build_model(self, arch: str, info: DataInfo) -> models.Network:
        """The arch's network; with ``feature_head="prelu"`` its features end in
        ``Linear(d, d) → PReLU`` (roboc's last feature layer), so they can be negative."""
        model = super().build_model(arch, info)
        kind = str(self.hparams["feature_head"])
        if kind == "prelu":
            d = model.backbone.feature_dim
            model.backbone = models.EmbeddedBackbone(model.backbone, nn.Sequential(nn.Linear(d, d),
                                                                            nn.PReLU()))
        elif kind != "none":
            raise UsageError(f"oc: feature_head must be 'prelu' or 'none', got {kind!r}")
        return model

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return FixedLinear(orthogonal_classifier(num_classes, feature_dim,
                                                 float(self.hparams["s"]), int(self.hparams["seed"])))

    @staticmethod
    def _targets(model: nn.Module, y: Tensor) -> Tensor:
        return model.head.weight[y]  # type: ignore[union-attr,index]

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        targets = self._targets(model, y)

        def attack_loss(m: nn.Module, x_adv: Tensor, x0: Tensor, y0: Tensor) -> Tensor:
            return squared_error(m.features(x_adv), targets)  # type: ignore[operator]

        x_adv = self.adversarial(model, x, y, loss=attack_loss)
        feat_nat, feat_adv = model.features(x), model.features(x_adv)  # type: ignore[operator]
        loss, mse_nat, mse_adv = oc_loss(feat_nat, feat_adv, targets, float(self.hparams["lam"]))
        loss = float(self.hparams["loss_scale"]) * loss
        return StepOutput(loss, detached(mse_nat=mse_nat, mse_adv=mse_adv),
                          model.head(feat_adv))  # type: ignore[operator]

    def objective(self) -> Objective:
        """Per-sample ``λ·MSE(f(x), W_y) + (1−λ)·MSE(f(x'), W_y)`` (mean over d)."""
        lam = float(self.hparams["lam"])
        cache = CleanCache(lambda m, x: m.features(x))  # type: ignore[operator]

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            targets = self._targets(model, y)
            nat = squared_error(cache(model, x), targets)
            adv = squared_error(model.features(x_adv), targets)  # type: ignore[operator]
            return lam * nat + (1 - lam) * adv

        return loss
