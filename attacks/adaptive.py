"""Adaptive PGD: PGD that maximises the defense's own training objective instead of CE.

Paper: Adv-DPNP (arXiv:2504.03782) §4.5 and Table 8 — adversarial examples generated with
the defense's composite loss (eq. 7) rather than cross-entropy, the adaptive-attack check of
Carlini et al., "On Evaluating Adversarial Robustness" (arXiv:1902.06705).

Update rule: that of :class:`~attacks.pgd.PGD` with ``L = defense.objective()``, a per-sample
function ``loss(model, x', x, y) -> Tensor[N]``. The evaluation harness
(:func:`benchmark.eval.evaluate.evaluate_run`) hands the objective over for every spec whose
attack is ``adaptive``; called directly without ``loss=`` the attack is PGD on CE. A
defense whose objective is CE (``st``, ``at``) therefore gets PGD-CE, as it should.

Hyperparameters: those of :class:`~attacks.pgd.PGD`; the defaults are the Table 2 PGD-20
(``steps`` 20, ``rel_step_size`` 0.1 = step ε/10, uniform random start) so that Table 8
compares the two objectives under one budget (the ``pgd20`` column).

Example:
    >>> atk = Adaptive(ThreatModel(Norm.LINF, 8 / 255), seed=0)
    >>> x_adv = atk(model, x, y, loss=defense.objective())
"""
from __future__ import annotations

from attacks import register_attack
from attacks.pgd import PGD


@register_attack("adaptive")
class Adaptive(PGD):
    """PGD-20 (step ε/10) on the objective passed as ``loss`` (the defense's own loss)."""

    description = "PGD on the defense's own per-sample loss (adaptive attack, Adv-DPNP Table 8)"
    default_hparams = {**PGD.default_hparams, "steps": 20, "rel_step_size": 0.1}
