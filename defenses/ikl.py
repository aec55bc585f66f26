"""IKL-AT: adversarial training with the Improved Kullback–Leibler (IKL / DKL) loss.

Paper: Cui et al., "Decoupled Kullback-Leibler Divergence Loss", NeurIPS 2024,
arXiv:2305.13948. Official code: jiequancui/DKL (``DKLv2/Adv-training-dkl/
train_dkl_cifar10.py`` and ``train_dkl_cifar100.py``, function ``dkl_loss``).

Loss (z = f(x) clean logits, z' = f(x') adversarial logits, Δ_jk = z_j − z_k)::

    wMSE = Σ_i Σ_jk w_{y_i j} w_{y_i k} (Δ_jk(x_i) − Δ_jk(x'_i))² / 4  /  Σ_i (Σ_j w_{y_i j})²
    sCE  = mean_i [ −Σ_j softmax(z_i)_j.detach() · log_softmax(z'_i)_j ]
    L    = CE(z, y) + β · wMSE + α · sCE

Gradient flows through both z and z' inside wMSE; the soft labels of sCE are detached. The
class-wise global weights w (C×C) are state: row c is the mean of ``softmax(z/T)`` (train-mode
clean logits, detached) over the class-c samples of the previous epoch; uniform 1/C in the first
epoch. They are part of :meth:`state_dict`, so a resumed run equals an uninterrupted one.

Training attack: PGD-l∞ from ``x + 0.001·N(0,1)`` maximising
``attack_alpha · sCE + attack_beta · wMSE`` with the clean logits fixed (eval mode, once per
batch): (1, 0) on CIFAR-10 and (1, 1) on CIFAR-100, as in the official scripts.

Hyperparameters:

    ===========  =====  ==========================================================
    alpha        4.0    weight of sCE (5.0 on CIFAR-100, the paper's value)
    beta         20.0   weight of wMSE
    T            4.0    temperature of the class-wise statistics softmax(z/T)
    attack_alpha 1.0    weight of sCE in the training attack
    attack_beta  0.0    weight of wMSE in the training attack (1.0 on CIFAR-100)
    ===========  =====  ==========================================================

Deviations from the official code: only the loss is used, under the common protocol of this
benchmark: no AWP, no weight averaging (EMA), no ε-ramp / attack-step schedule
(``train_budget``), no cosine learning-rate schedule, no extra augmentation. The official
code's ``temperature`` argument of ``dkl_loss`` is left at its default 1 in every call, so T
enters only the class-wise statistics, as here. The γ exponent on the weights (default 1) is
fixed at 1. A class absent from an epoch keeps its previous weight row (the official code
would divide by zero).

Example:
    advbench train --defense ikl --dataset cifar100 --hparams '{"alpha": 5.0}'
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Attack, Objective
from defenses import register_defense
from defenses.base import (CleanCache, Defense, StepOutput, clean_logits_eval, detached,
                           protocol_pgd)


def ikl_terms(logits_nat: Tensor, logits_adv: Tensor,
              sample_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample IKL parts.

    Uses ``Σ_jk w_j w_k (d_j − d_k)² = 2 (Σ_j w_j)(Σ_j w_j d_j²) − 2 (Σ_j w_j d_j)²`` with
    ``d = z − z'`` (O(C) per sample instead of O(C²)).

    Args:
        logits_nat: clean logits z (N×C).
        logits_adv: adversarial logits z' (N×C).
        sample_w: each sample's class-wise weight row ``w_{y_i}`` (N×C, no grad).

    Returns:
        (wmse_raw, wsum_sq, sce): ``¼ Σ_jk w_j w_k (Δ − Δ')²``, ``(Σ_j w_j)²`` and the soft CE.
    """
    d = logits_nat - logits_adv
    wsum = sample_w.sum(1)
    wmse_raw = 0.5 * (wsum * (sample_w * d * d).sum(1) - (sample_w * d).sum(1) ** 2)
    sce = -(F.softmax(logits_nat, dim=1).detach() * F.log_softmax(logits_adv, dim=1)).sum(1)
    return wmse_raw, wsum ** 2, sce


def ikl_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, sample_w: Tensor, *,
             alpha: float, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``CE(z, y) + β·wMSE + α·sCE``; returns (loss, ce, wmse, sce) as batch scalars."""
    wmse_raw, wsum_sq, sce = ikl_terms(logits_nat, logits_adv, sample_w)
    wmse, sce = wmse_raw.sum() / wsum_sq.sum(), sce.mean()
    ce = F.cross_entropy(logits_nat, y)
    return ce + beta * wmse + alpha * sce, ce, wmse, sce


@register_defense("ikl")
class IKL(Defense):
    """CE + class-weighted logit-difference MSE + soft-label CE between clean and x'."""

    description = "IKL-AT: CE(f(x)) + β·wMSE(Δ logits) + α·sCE (Cui et al. 2024)"
    loss_passes = 2  # f(x) and f(x')
    paper = "Cui et al., NeurIPS 2024, arXiv:2305.13948"
    default_hparams = {"alpha": 4.0, "beta": 20.0, "T": 4.0, "attack_alpha": 1.0,
                       "attack_beta": 0.0}
    dataset_hparams = {"cifar100": {"alpha": 5.0, "attack_beta": 1.0}}

    def __init__(self, hparams: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(hparams, **kwargs)
        c = self.num_classes
        self.weights = torch.full((c, c), 1.0 / c)  # used in the current epoch
        self.accum = torch.zeros(c, c)  # Σ softmax(z/T) per class, current epoch
        self.accum_epoch = -1

    def attack_for_training(self) -> Attack:
        return protocol_pgd(self.threat, self.hparams, "normal")

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Turn the previous epoch's statistics into the class-wise weights."""
        if epoch != self.accum_epoch and bool(self.accum.sum() > 0):
            counts = self.accum.sum(1, keepdim=True)
            seen = counts.squeeze(1) > 0
            self.weights[seen] = (self.accum / counts.clamp_min(1e-12))[seen].to(self.weights)
            self.accum.zero_()

    def _sample_weights(self, y: Tensor) -> Tensor:
        if self.weights.device != y.device:
            self.weights, self.accum = self.weights.to(y.device), self.accum.to(y.device)
        return self.weights[y]

    def _objective(self, nat: Tensor, adv: Tensor, w: Tensor, a: float, b: float) -> Tensor:
        wmse_raw, wsum_sq, sce = ikl_terms(nat, adv, w)
        return b * wmse_raw / wsum_sq + a * sce

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        w = self._sample_weights(y)
        nat_eval = clean_logits_eval(model, x)
        a_atk, b_atk = float(self.hparams["attack_alpha"]), float(self.hparams["attack_beta"])
        x_adv = self.adversarial(model, x, y, loss=lambda m, xa, x0, y0: self._objective(
            nat_eval, m(xa), w, a_atk, b_atk))
        logits_adv, logits_nat = model(x_adv), model(x)
        with torch.no_grad():
            probs = F.softmax(logits_nat.detach().float() / float(self.hparams["T"]), dim=1)
            self.accum.index_add_(0, y, probs.to(self.accum))
            self.accum_epoch = epoch
        loss, ce, wmse, sce = ikl_loss(logits_nat, logits_adv, y, w,
                                       alpha=float(self.hparams["alpha"]),
                                       beta=float(self.hparams["beta"]))
        return StepOutput(loss, detached(ce=ce, wmse=wmse, sce=sce), logits_adv)

    def objective(self) -> Objective:
        """Per-sample ``CE(z, y) + β·wMSE_i + α·sCE_i`` with the current class-wise weights."""
        cache = CleanCache()
        alpha, beta = float(self.hparams["alpha"]), float(self.hparams["beta"])

        def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
            nat = cache(model, x)
            return (F.cross_entropy(nat, y, reduction="none")
                    + self._objective(nat, model(x_adv), self._sample_weights(y), alpha, beta))

        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.detach().cpu().clone(),
                "accum": self.accum.detach().cpu().clone(), "accum_epoch": self.accum_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.weights = state["weights"].clone().float()
        self.accum = state["accum"].clone().float()
        self.accum_epoch = int(state["accum_epoch"])
