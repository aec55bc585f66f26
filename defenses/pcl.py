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

Hyperparameters (official PGD script):

    ==============  =======  ==========================================
    weight_prox     1.0      weight of the proximity loss
    weight_conprox  1e-5     weight of the contrastive-proximity loss
    ==============  =======  ==========================================

Deviations from the official code: (1) the centres are trained by the one harness SGD
(protocol lr, momentum and weight decay) on the gradient of this total loss; officially each
centre set has its own momentum-free SGD without weight decay (lr 0.5 for c, 1e-5 for c') that
steps on the gradient divided by its loss weight — so here c' moves by weight decay almost
only (its loss weight is 1e-5); (2) the losses act on one feature level (``model.features``)
instead of two (the 256-d pooled and the 1024-d fc features of their ResNet-110); (3) the
training attack is the protocol's PGD (officially ε ~ U(0.02, 0.05), step 2/255, 10 steps, no
random start); (4) training starts from scratch under the common protocol, not from a
softmax-pretrained model for 500 epochs. SPEC §2 expects low AutoAttack robustness for PCL.

Example:
    advbench train --defense pcl --dataset cifar10 --profile paper
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Objective
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


def pcl_head(model: nn.Module) -> PCLHead:
    """The model's :class:`PCLHead` (raises ``TypeError`` for any other head)."""
    return head_of(model, PCLHead, "pcl")


@register_defense("pcl")
class PCL(Defense):
    """PGD-AT on clean + adversarial batches with the prototype conformity loss."""

    description = "prototype conformity loss + PGD-AT on clean+adv (Mustafa et al. 2019)"
    loss_passes = 2  # one forward of clean+adv concatenated
    paper = "Mustafa et al., ICCV 2019, arXiv:1904.00887"
    default_hparams = {"weight_prox": 1.0, "weight_conprox": 1e-5}

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return PCLHead(feature_dim, num_classes)

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        x_adv = self.adversarial(model, x, y)
        head = pcl_head(model)
        both, labels = torch.cat([x, x_adv]), torch.cat([y, y])
        features = model.features(both)
        logits = head(features)
        loss, parts = pcl_loss(logits, features, labels, head.centers, head.con_centers,
                               weight_prox=float(self.hparams["weight_prox"]),
                               weight_conprox=float(self.hparams["weight_conprox"]))
        return StepOutput(loss, detached(**parts), logits.detach()[x.shape[0]:])

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
