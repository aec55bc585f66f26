"""PCL: prototype conformity loss with PGD adversarial training.

Paper: A. Mustafa, S. Khan, M. Hayat, R. Goecke, J. Shen, L. Shao, "Adversarial Defense by
Restricting the Hidden Space of Deep Neural Networks", ICCV 2019, arXiv:1904.00887 (journal
version TPAMI 2021); official code aamir-mustafa/pcl-adversarial-defense
(``pcl_training_adversarial_pgd.py``, ``proximity.py``, ``contrastive_proximity.py``).

Clean and PGD batches are concatenated (x̂ = [x; x'], ŷ = [y; y], 2N samples) and, with
f = penultimate features, c = proximity centres and c' = contrastive-proximity centres::

    L = CE(f(x̂), ŷ) + w_prox·mean_n ‖f_n − c_{ŷ_n}‖² − w_conprox·mean_{n, k≠ŷ_n} ‖f_n − c'_k‖²

Squared distances are computed as ‖f‖² + ‖c‖² − 2f·c and clamped to [1e-12, 1e12], as in the
official code. Both centre sets are nn.Parameters of the head (initialised N(0, 1) as
officially), so the harness's optimizer trains them; ``class_centers`` returns c.

Official pipeline, kept as documented stages of one run (the harness owns one SGD):

1. Softmax pre-training: the official PGD script starts from a model trained with softmax CE
   on clean data (``softmax_training.py``, 164 epochs, lr 0.1; it loads
   ``Models_Softmax/CIFAR10_Softmax.pth.tar``). Here the first ``round(pretrain_frac·epochs)``
   epochs minimise CE(f(x), y) on clean batches (no attack, centres untouched); 0.25 is the
   official share (164 of 164 + 500 epochs).
2. PCL stage at its own learning rates: officially the model steps at lr 0.01 (a tenth of the
   softmax stage), the centres c at lr 0.5 and c' at lr 1e-5, each on its gradient divided by
   its loss weight (plain SGD). Here the stage's loss is scaled by ``pcl_lr_scale`` = 0.01/0.1
   in the backward pass (so the model steps at a tenth of the protocol lr), and the gradients of
   c and c' are scaled by ``center_lr_scale`` = 0.5/(1·0.01) = 50 and
   ``con_center_lr_scale`` = 1e-5/(1e-5·0.01) = 100 relative to the model's: the official lr
   ratios. Forward values are unchanged.
3. Feature head: the official classifier ``fcf`` and the main proximity level sit on a linear
   1024-d layer (``fc``) after the pooled features; ``feature_head="linear"`` appends
   ``Linear(d, d)`` to the backbone, so ``model.features`` (loss, attacks, feature metrics) is
   that signed linear level. Without it the proximity pull kills the ReLU features (measured).

Measured on MNIST (cpu profile, 4,000 digits): without stage 1 the proximity term (≈ 140 at
the start) swamps CE and accuracy stays at chance; with all three stages the softmax stage
reaches ~80% validation accuracy, and the PCL stage still collapses every feature onto one
point within ~10 steps (prox 480 → 0.1, CE → 2.30): with ``weight_prox`` = 1 the proximity
term is minimised by shrinking the whole feature space, which costs CE only its margin (the
official code has the same loss; it relies on 164 softmax epochs and 500 PCL epochs). At the
cpu budget expect PCL to be marked "did not train". Two controls (MNIST, protocol 2, seed 0):
with ``weight_prox`` = ``weight_conprox`` = 0 the same two stages train (PCL-stage epoch 2:
validation clean 93.0%, PGD 14.1%), so the proximity term, not the switch to adversarial
batches, causes the collapse; starting c at the class means of the clean features at the
stage's first step (instead of N(0, 1)) does not prevent it (prox 32.7 → 1e-4 over 5 epochs,
accuracy at chance), so that variant was not kept.

Hyperparameters (official PGD script, plus the stages above):

    ===================  ========  ===================================================
    weight_prox          1.0       weight of the proximity loss
    weight_conprox       1e-5      weight of the contrastive-proximity loss
    pretrain_frac        0.25      share of epochs of clean softmax pre-training
                                   (cpu MNIST: 2 of 8)
    pcl_lr_scale         0.1       model lr of the PCL stage / protocol lr (0.01 / 0.1)
    center_lr_scale      50.0      lr of c / model lr (0.5 / (w_prox · 0.01))
    con_center_lr_scale  100.0     lr of c' / model lr (1e-5 / (w_conprox · 0.01))
    feature_head         "linear"  "linear": Linear(d, d) after the backbone; "none"
    ===================  ========  ===================================================

Deviations from the official code: (1) the centres use the harness's SGD (momentum 0.9 and
weight decay; officially plain SGD) at the lr ratios above; (2) the losses act on one feature
level (``model.features``) instead of two (the 256-d pooled and the 1024-d fc features of their
ResNet-110); (3) the training attack is the protocol's PGD (officially ε ~ U(0.02, 0.05), step
2/255, 10 steps, no random start); (4) the two stages share one run and the protocol's schedule
(officially two scripts, 164 + 500 epochs). SPEC §2 expects low AutoAttack robustness for PCL.

Example:
    advbench train --defense pcl --dataset cifar10 --profile paper
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Objective
from benchmark import models
from benchmark.data import DataInfo
from benchmark.errors import UsageError
from defenses import register_defense
from defenses.base import Defense, StepOutput, detached, head_of


class PCLHead(nn.Module):
    """Linear classifier plus the proximity and contrastive-proximity centres."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)
        self.centers = nn.Parameter(torch.randn(num_classes, feature_dim))
        self.con_centers = nn.Parameter(torch.randn(num_classes, feature_dim))

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features)


def squared_distances(features: Tensor, centers: Tensor) -> Tensor:
    """(N, M) clamped squared distances ‖f‖² + ‖c‖² − 2f·c (official formula)."""
    d = (features.pow(2).sum(1, keepdim=True) + centers.pow(2).sum(1)[None]
         - 2 * features @ centers.t())
    return d.clamp(min=1e-12, max=1e12)


def proximity(features: Tensor, y: Tensor, centers: Tensor, *,
              reduce: bool = True) -> Tensor:
    """Mean squared distance of each feature to its own class centre."""
    d = squared_distances(features, centers).gather(1, y[:, None]).squeeze(1)
    return d.mean() if reduce else d


def contrastive_proximity(features: Tensor, y: Tensor, centers: Tensor, *,
                          reduce: bool = True) -> Tensor:
    """Mean squared distance of each feature to the centres of the other classes."""
    d = squared_distances(features, centers)
    others = torch.ones_like(d, dtype=torch.bool).scatter(1, y[:, None], False)
    per_sample = (d * others).sum(1) / others.sum(1)
    return per_sample.mean() if reduce else per_sample


def pcl_loss(logits: Tensor, features: Tensor, y: Tensor, centers: Tensor, con_centers: Tensor,
             *, weight_prox: float, weight_conprox: float) -> tuple[Tensor, dict[str, Tensor]]:
    """CE + w_prox·prox − w_conprox·conprox; returns the loss and its (attached) parts."""
    ce = F.cross_entropy(logits, y)
    prox = proximity(features, y, centers)
    conprox = contrastive_proximity(features, y, con_centers)
    return ce + weight_prox * prox - weight_conprox * conprox, {
        "ce": ce, "prox": prox, "conprox": conprox}


def scale_grad(t: Tensor, k: float) -> Tensor:
    """``t`` in the forward pass, ``k ×`` its gradient in the backward pass."""
    return t if k == 1.0 else t.detach() + (t - t.detach()) * k


def pcl_head(model: nn.Module) -> PCLHead:
    """The model's :class:`PCLHead` (raises ``TypeError`` for any other head)."""
    return head_of(model, PCLHead, "pcl")


@register_defense("pcl")
class PCL(Defense):
    """PGD-AT on clean + adversarial batches with the prototype conformity loss."""

    description = "prototype conformity loss + PGD-AT on clean+adv (Mustafa et al. 2019)"
    loss_passes = 2  # one forward of clean+adv concatenated
    paper = "Mustafa et al., ICCV 2019, arXiv:1904.00887"
    default_hparams = {"weight_prox": 1.0, "weight_conprox": 1e-5, "pretrain_frac": 0.25,
                       "center_lr_scale": 50.0, "con_center_lr_scale": 100.0,
                       "pcl_lr_scale": 0.1, "feature_head": "linear"}

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return PCLHead(feature_dim, num_classes)

    def build_model(self, arch: str, info: DataInfo) -> models.Network:
        """The arch's network; with ``feature_head="linear"`` its features end in a
        ``Linear(d, d)`` (the official network's linear 1024-d layer before the classifier)."""
        model = super().build_model(arch, info)
        kind = str(self.hparams["feature_head"])
        if kind == "linear":
            d = model.backbone.feature_dim
            model.backbone = models.EmbeddedBackbone(model.backbone, nn.Linear(d, d))
        elif kind != "none":
            raise UsageError(f"pcl: feature_head must be 'linear' or 'none', got {kind!r}")
        return model

    def pretrain_epochs(self) -> int:
        """Number of leading softmax-only epochs, ``round(pretrain_frac · epochs)``."""
        return int(round(float(self.hparams["pretrain_frac"]) * int(self.hparams["epochs"])))

    def passes_per_sample(self) -> float:  # type: ignore[override]
        """Mean over the run's epochs: 1 in the softmax pre-training stage, k+2 after it."""
        pre, epochs = self.pretrain_epochs(), max(int(self.hparams["epochs"]), 1)
        return (pre + (epochs - pre) * super().passes_per_sample()) / epochs

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        if epoch < self.pretrain_epochs():  # official softmax_training.py stage
            logits = model(x)
            ce = F.cross_entropy(logits, y)
            return StepOutput(ce, detached(ce=ce), logits)
        x_adv = self.adversarial(model, x, y)
        head = pcl_head(model)
        both, labels = torch.cat([x, x_adv]), torch.cat([y, y])
        features = model.features(both)
        logits = head(features)
        stage_scale = float(self.hparams["pcl_lr_scale"])
        centers = scale_grad(head.centers, float(self.hparams["center_lr_scale"]))
        con_centers = scale_grad(head.con_centers, float(self.hparams["con_center_lr_scale"]))
        loss, parts = pcl_loss(logits, features, labels, centers, con_centers,
                               weight_prox=float(self.hparams["weight_prox"]),
                               weight_conprox=float(self.hparams["weight_conprox"]))
        return StepOutput(scale_grad(loss, stage_scale), detached(**parts),
                          logits.detach()[x.shape[0]:])

    def objective(self) -> Objective:
        """Per-sample ``CE + w_prox·‖f − c_y‖² − w_conprox·mean_{k≠y}‖f − c'_k‖²`` on x'."""
        w_prox, w_con = float(self.hparams["weight_prox"]), float(self.hparams["weight_conprox"])

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            head = pcl_head(model)
            features = model.features(x_adv)
            return (F.cross_entropy(head(features), y, reduction="none")
                    + w_prox * proximity(features, y, head.centers, reduce=False)
                    - w_con * contrastive_proximity(features, y, head.con_centers, reduce=False))

        return loss

    def class_centers(self, model: nn.Module) -> Tensor:
        """The learned proximity centres c."""
        return pcl_head(model).centers.detach()
