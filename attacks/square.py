"""Square Attack, standalone: a score-based black-box attack (no gradients).

Paper: Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020, arXiv:1912.00049. Implementation: the
reference code as packaged in ``pyautoattack==0.2.0`` (``pyautoattack.square.SquareAttack``,
fra31/auto-attack's file unchanged), called here outside AutoAttack's cascade.

Update rule (l∞): start from vertical stripes of ±ε; at query t change a random square window
(side set by ``p_init`` and the schedule) to a random ±ε pattern per channel, and keep the
change iff the margin loss max_{k≠y} z_k − z_y decreases; stop a point once it is misclassified.
l2 uses the paper's l2 square updates. Only logits are read, so a model that hides its
gradients (rounding, saturated softmax, non-differentiable preprocessing) is attacked as well
as a plain one: the gradient-masking check "black-box not stronger than white-box" (Carlini et
al. 2019, arXiv:1902.06705, §5) compares it with PGD.

Hyperparameters (keyword-only):

    ==========  ========  ===================================================
    n_queries   5000      queries per point (AutoAttack's value)
    p_init      0.8       initial fraction of pixels changed per window
    n_restarts  1         restarts on the points still correctly classified
    loss        "margin"  "margin" | "ce"
    ==========  ========  ===================================================

Deviation: none in the algorithm; the global torch RNG is restored after a call (the
reference code reseeds it with the attack's seed).

Example:
    >>> x_adv = Square(ThreatModel(Norm.LINF, 0.3), seed=0, n_queries=1000)(model, x, y)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective, ce_objective
from attacks.norms import fit_to_ball
from benchmark.errors import UsageError

_NORMS = {Norm.LINF: "Linf", Norm.L2: "L2"}


@register_attack("square")
class Square(Attack):
    """Square Attack from pyautoattack, standalone (see module docstring)."""

    description = "Square Attack, score-based black-box random search (Andriushchenko et al. 2020)"
    supported_norms = frozenset({Norm.LINF, Norm.L2})
    default_hparams = {"n_queries": 5000, "p_init": 0.8, "n_restarts": 1, "loss": "margin"}

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        if loss is not ce_objective:
            raise UsageError("square runs its own margin/CE loss; it takes no objective")
        if self.hparams["loss"] not in ("margin", "ce"):
            raise UsageError(f"square loss must be margin|ce, got {self.hparams['loss']!r}")
        if x.shape[0] == 0 or self.threat.eps == 0:
            return x
        from pyautoattack.square import SquareAttack
        hp = self.hparams
        atk = SquareAttack(model, norm=_NORMS[self.threat.norm], n_queries=int(hp["n_queries"]),
                           eps=self.threat.eps, p_init=float(hp["p_init"]),
                           n_restarts=int(hp["n_restarts"]), seed=self.seed or 0,
                           loss=hp["loss"], device=x.device)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            x_adv = atk.perturb(x, y)
        # the reference code adds ±ε steps in fp32; keep x' exactly inside ball ∩ [0,1]
        return fit_to_ball(x, x_adv, self.threat.norm, self.threat.eps)
