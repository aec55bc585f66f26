"""±ED-WTA: positive/negative prototype neurons with a winner-take-all head, adversarially trained.

Paper: R. Zarei-Sabzevar, K. Ghiasi-Shirazi, A. Harati, "Prototype-based interpretation of the
functionality of neurons in winner-take-all neural networks", IEEE TNNLS 2023,
arXiv:2008.08750. Official code: raminzs/pmED-WTA (``CompetitiveCrossEntropy_pmEDWTA.py``).

Head: L = C·K neurons, K per class; neuron k has a positive prototype p_k and a negative one
n_k in feature space (f = ``model.features(x)``) and outputs, in the affine form the head
computes (fp32, autocast off)::

    o_k = β(½‖f − n_k‖² − ½‖f − p_k‖²) = β[(p_k·f − ½‖p_k‖²) − (n_k·f − ½‖n_k‖²)]

Class logit = max over the class's K neurons (the eval logits every attack sees).
Loss: competitive cross-entropy on x' (the protocol's PGD on CE of the logits, as AT)::

    z = softmax(o),  E = −log Σ_{k∈y} z_k                       (plain CE when K = 1)

Switching rule (the method's core; ``fit`` of the official code): p_k learns only from
samples of its own class and n_k only from samples of other classes, while the backbone and β
get the full gradient. Implemented as masked gradients: per sample i and neuron k the head
mixes the term built from the live prototype with the same term built from a detached copy,
``where(mask_ik, p_k·f_i − ½‖p_k‖², sg(p_k)·f_i − ½‖sg(p_k)‖²)`` (and likewise for n_k with
the complementary mask). Values are unchanged; only the gradient routing differs.

Rejection score: r(x) = min_k ½‖f(x) − p_k‖² (distance to the nearest positive prototype).
Class centres for the feature metrics: the positive prototypes (the mean of a class's K
positive prototypes when K > 1).

Hyperparameters:

    =================  =====  ========================================================
    neurons_per_class  1      K (the paper's MNIST runs use 6)
    beta_init          1.0    initial β
    beta_lr_scale      0.01   β's lr as a multiple of the scheduled lr (official:
                              beta_learning_rate 1e-4 next to learning_rate 0.01)
    =================  =====  ========================================================

Deviations from the official code (a single-layer WTA on raw pixels trained by per-sample
SGD): the head sits on a deep backbone trained with the common protocol; prototypes start
like ``nn.Linear`` weights, U(±1/√d), instead of k-means subclass means (no features exist
before training); p, n and the backbone get the protocol's weight decay, β none; β follows
the protocol's lr schedule scaled by ``beta_lr_scale`` instead of a 0.95-per-epoch decay.

Example:
    advbench train --defense pm-ed-wta --dataset mnist5k --profile cpu
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from attacks.base import Objective
from defenses import register_defense
from defenses.base import Defense, StepOutput, detached, head_of


def _half_affine(features: Tensor, protos: Tensor) -> Tensor:
    """``proto·f − ½‖proto‖²`` for every (sample, neuron): N×L."""
    return features @ protos.t() - 0.5 * protos.pow(2).sum(1)


def _routed(features: Tensor, protos: Tensor, mask: Tensor) -> Tensor:
    """:func:`_half_affine` whose gradient reaches ``protos`` only where ``mask`` (N×L) holds."""
    return torch.where(mask, _half_affine(features, protos),
                       _half_affine(features, protos.detach()))


class PMEDWTAHead(nn.Module):
    """C·K neurons with positive and negative prototypes and a learned scale β.

    Args:
        feature_dim: d.
        num_classes: C.
        neurons_per_class: K.
        beta_init: initial β.
    """

    def __init__(self, feature_dim: int, num_classes: int, neurons_per_class: int = 1,
                 beta_init: float = 1.0) -> None:
        super().__init__()
        self.num_classes, self.k = num_classes, int(neurons_per_class)
        bound = 1.0 / math.sqrt(feature_dim)
        shape = (num_classes * self.k, feature_dim)
        self.pos = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.neg = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))
        self.register_buffer("neuron_class", torch.arange(num_classes).repeat_interleave(self.k),
                             persistent=False)

    def neurons(self, features: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """Neuron outputs o (N×L, fp32); with labels ``y`` the switching rule routes the
        prototypes' gradients (p_k: own-class samples, n_k: other-class samples)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            f = features.float()
            if y is None:
                pos, neg = _half_affine(f, self.pos), _half_affine(f, self.neg)
            else:
                own = self.neuron_class[None, :] == y[:, None]
                pos, neg = _routed(f, self.pos, own), _routed(f, self.neg, ~own)
            return self.beta * (pos - neg)

    def class_logits(self, neurons: Tensor) -> Tensor:
        """Class logit = max over the class's K neurons."""
        return neurons.view(neurons.shape[0], self.num_classes, self.k).amax(dim=2)

    def forward(self, features: Tensor) -> Tensor:
        return self.class_logits(self.neurons(features))


def competitive_ce(neurons: Tensor, y: Tensor, neuron_class: Tensor) -> Tensor:
    """Per-sample E = −log Σ_{k∈y} softmax(o)_k."""
    own = neuron_class[None, :] == y[:, None]
    return torch.logsumexp(neurons, 1) - torch.logsumexp(neurons.masked_fill(~own, -math.inf), 1)


def pm_head(model: nn.Module) -> PMEDWTAHead:
    return head_of(model, PMEDWTAHead, "pm-ed-wta")


@register_defense("pm-ed-wta")
class PMEDWTA(Defense):
    """Adversarial training of a ±ED-WTA head with competitive CE and the switching rule."""

    description = "±ED-WTA head (positive/negative prototype neurons), competitive CE, PGD-AT"
    paper = "Zarei-Sabzevar, Ghiasi-Shirazi & Harati, TNNLS 2023, arXiv:2008.08750"
    default_hparams = {"neurons_per_class": 1, "beta_init": 1.0, "beta_lr_scale": 0.01}
    score_name = "min_k ½‖f − p_k‖²"

    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        return PMEDWTAHead(feature_dim, num_classes, int(self.hparams["neurons_per_class"]),
                           float(self.hparams["beta_init"]))

    def param_groups(self, model: nn.Module) -> Optional[list[dict[str, Any]]]:
        beta = pm_head(model).beta
        rest = [p for p in model.parameters() if p.requires_grad and p is not beta]
        return [{"params": rest},
                {"params": [beta], "lr_scale": float(self.hparams["beta_lr_scale"]),
                 "weight_decay": 0.0}]

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        x_adv = self.adversarial(model, x, y)
        head = pm_head(model)
        neurons = head.neurons(model.features(x_adv), y)
        loss = competitive_ce(neurons, y, head.neuron_class).mean()
        return StepOutput(loss, detached(cce_adv=loss, beta=head.beta),
                          head.class_logits(neurons).detach())

    def objective(self) -> Objective:
        """Per-sample competitive CE at x' (the training loss)."""

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            head = pm_head(model)
            return competitive_ce(head.neurons(model.features(x_adv)), y, head.neuron_class)

        return loss

    def rejection_score(self, model: nn.Module, x: Tensor) -> Tensor:
        """r(x) = min_k ½‖f(x) − p_k‖² over every positive prototype."""
        head = pm_head(model)
        f, pos = model.features(x).float(), head.pos.float()
        sq = f.pow(2).sum(1, keepdim=True) - 2 * f @ pos.t() + pos.pow(2).sum(1)
        return 0.5 * sq.clamp_min(0).amin(dim=1)

    def class_centers(self, model: nn.Module) -> Optional[Tensor]:
        head = pm_head(model)
        return head.pos.detach().view(head.num_classes, head.k, -1).mean(dim=1)
