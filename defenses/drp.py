"""DRP: Deep Repulsive Prototypes, fixed ℓ∞-repelled output prototypes, no adversarial training.

Paper: A. Serban, E. Poll, J. Visser, "Deep Repulsive Prototypes for Adversarial Robustness",
arXiv:2105.12427 (2021). Official code: NullConvergence/repulsive_proto (``generate_proto.py``,
``hyper_proto.py``, ``train_proto.py``, ``cnfg.yml``).

Prototypes P ∈ R^{C×d} are generated once, before training, and never trained: rows start
U(−1, 1) (seeded by ``proto_seed``) and ``proto_steps`` SGD steps (lr ``proto_lr``, momentum
``proto_momentum``, no norm constraint) maximise Σ_{i<j} ‖p_i − p_j‖_∞ (``torch.pdist`` with
p = ∞, as ``generate_proto.py``). The backbone ends in a linear layer with d outputs, so
``model.features(x) = f(x) ∈ R^d``. Loss and logits (``hyper_proto.py``, ``loss_reduction
= "inf"``)::

    L = mean_i ‖f(x_i) − p_{y_i}‖_∞          (clean inputs only; no cross-entropy)
    z = (f / ‖f‖_∞) · Pᵀ,  prediction argmax z

The defense declares ``uses_training_attack = False``: the harness builds no training attack
and a step costs one forward+backward pass per sample. The adaptive attack maximises the
per-sample ℓ∞ prototype loss ‖f(x') − p_y‖_∞ (the official PGD objective). P is a persistent
buffer of the head, so a checkpoint's model state (and ``benchmark.load_model``) carries it,
and it is also the defense state; the class centres of the feature metrics are P.

Rejection score (``advbench evaluate --suite rejection``): the ℓ∞ distance to the nearest
prototype, r(x) = min_k ‖f(x) − p_k‖_∞, the quantity DRP's loss pulls down for its class
and its PGD objective pushes up. Not the harness's default 1 − max softmax: DRP's logits
(f/‖f‖_∞)·Pᵀ reach about 80 (‖p_k‖₁ is large after the repulsion), and once the top logit
leads by more than about 17, float32 softmax rounds the top probability to exactly 1, so
1 − max softmax was exactly 0 for 96–99% of clean and adversarial points: no ranking, no
usable AUROC. The distance keeps its ranking in float32 over its whole range (a difference of
two numbers of order 1, no exponential), and it is differentiable almost everywhere, so the
adaptive classifier+detector attack can follow it.

Hyperparameters:

    ==============  =====  ==============================================================
    proto_dim       100    d (500 for CIFAR-100, as the official configs)
    proto_steps     100    repulsion steps (1,000 for CIFAR-100)
    proto_lr        0.01   SGD lr of the repulsion
    proto_momentum  0.9    its momentum
    proto_seed      0      seed of the U(−1, 1) start (prototypes do not follow the run seed,
                           as the official code trains every run on one prototype file)
    ==============  =====  ==============================================================

Deviations from the official code: the common protocol's optimizer, weight decay and
piecewise schedule replace SGD with wd 5e-5, 200 epochs and the cyclic lr 0.001↔0.006;
fp32 instead of apex O2; the ℓ∞ distance has no 1e-6 offset (``PairwiseDistance``'s eps);
the logged training accuracy is on clean inputs. The official PGD's random start never
fired (``rand_init`` received ``restarts: 1``); advbench's attacks start at random as usual.

Example:
    advbench train --defense drp --dataset mnist5k --profile cpu
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from attacks.base import Objective
from benchmark import models
from benchmark.data import DataInfo
from defenses import register_defense
from defenses.base import Defense, StepOutput, detached, head_of


def repulsive_prototypes(num_classes: int, dim: int, *, steps: int, lr: float = 0.01,
                         momentum: float = 0.9, seed: int = 0) -> Tensor:
    """C×d prototypes: U(−1, 1) start, then SGD with momentum on −Σ_{i<j} ‖p_i − p_j‖_∞."""
    gen = torch.Generator().manual_seed(int(seed))
    protos = torch.rand(num_classes, dim, generator=gen) * 2 - 1
    velocity = torch.zeros_like(protos)
    for _ in range(int(steps)):
        p = protos.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(-torch.pdist(p, p=math.inf).sum(), p)
        velocity = momentum * velocity + grad  # torch.optim.SGD's momentum rule
        protos = protos - lr * velocity
    return protos.detach()


def linf_distance(features: Tensor, targets: Tensor) -> Tensor:
    """Per-sample ‖f − t‖_∞."""
    return (features - targets).abs().amax(dim=1)


class EmbeddingBackbone(models.Backbone):
    """A backbone followed by a linear layer to d outputs (DRP's last layer)."""

    def __init__(self, inner: models.Backbone, dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.proj = nn.Linear(inner.feature_dim, dim)
        self.feature_dim, self.map_channels = dim, inner.map_channels

    def forward_maps(self, x: Tensor) -> Tensor:
        return self.inner.forward_maps(x)

    def forward_pool(self, maps: Tensor) -> Tensor:
        return self.proj(self.inner.forward_pool(maps))


class RepulsiveHead(nn.Module):
    """Logits ``(f/‖f‖_∞)·Pᵀ`` against fixed prototypes (a persistent buffer)."""

    def __init__(self, prototypes: Tensor) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.clone())

    def forward(self, features: Tensor) -> Tensor:
        scale = features.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        return (features / scale) @ self.prototypes.t().to(features.dtype)


@register_defense("drp")
class DeepRepulsivePrototypes(Defense):
    """ℓ∞ regression onto fixed repelled prototypes, clean data only."""

    description = "deep repulsive prototypes: ℓ∞ loss to fixed repelled prototypes, no AT"
    paper = "Serban, Poll & Visser, arXiv:2105.12427"
    default_hparams = {"proto_dim": 100, "proto_steps": 100, "proto_lr": 0.01,
                       "proto_momentum": 0.9, "proto_seed": 0}
    dataset_hparams = {"cifar100": {"proto_dim": 500, "proto_steps": 1000}}
    uses_training_attack = False
    score_name = "min_k ‖f − p_k‖∞"

    def __init__(self, hparams: Any, **kwargs: Any) -> None:
        super().__init__(hparams, **kwargs)
        self._prototypes: Optional[Tensor] = None

    @property
    def prototypes(self) -> Tensor:
        """The C×d prototypes (generated on first use, or restored by ``load_state_dict``)."""
        if self._prototypes is None:
            hp = self.hparams
            self._prototypes = repulsive_prototypes(
                self.num_classes, int(hp["proto_dim"]), steps=int(hp["proto_steps"]),
                lr=float(hp["proto_lr"]), momentum=float(hp["proto_momentum"]),
                seed=int(hp["proto_seed"]))
        return self._prototypes

    def build_model(self, arch: str, info: DataInfo) -> models.Network:
        backbone = EmbeddingBackbone(models.create_backbone(arch, info.in_channels),
                                     int(self.hparams["proto_dim"]))
        return models.Network(backbone, RepulsiveHead(self.prototypes), mean=info.mean,
                              std=info.std, preprocess=self.make_preprocess(info))

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        head = head_of(model, RepulsiveHead, "drp")
        features = model.features(x)
        loss = linf_distance(features, head.prototypes[y]).mean()
        return StepOutput(loss, detached(linf=loss), head(features).detach())

    def objective(self) -> Objective:
        """Per-sample ℓ∞ prototype loss ‖f(x') − p_y‖_∞ (the official PGD objective)."""

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            head = head_of(model, RepulsiveHead, "drp")
            return linf_distance(model.features(x_adv), head.prototypes[y])

        return loss

    def rejection_score(self, model: nn.Module, x: Tensor) -> Tensor:
        """min_k ‖f(x) − p_k‖_∞: ℓ∞ distance to the nearest prototype (module docstring)."""
        protos = head_of(model, RepulsiveHead, "drp").prototypes
        features = model.features(x).float()
        return (features[:, None, :] - protos[None].to(features)).abs().amax(dim=2).amin(dim=1)

    def class_centers(self, model: nn.Module) -> Optional[Tensor]:
        return head_of(model, RepulsiveHead, "drp").prototypes.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes.clone()}

    def load_state_dict(self, state: Any) -> None:
        if "prototypes" in state:
            self._prototypes = state["prototypes"].detach().clone().float().cpu()
