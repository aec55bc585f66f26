"""Ensemble (per-sample worst case) over FGSM, PGD-20, PGD-100 and C&W.

Paper: Adv-DPNP (arXiv:2504.03782) §4.2 and Table 2: "The Ensemble accuracy is calculated by
sequentially applying FGSM, PGD-20, PGD-100, and C&W attacks to each test sample, marking it
as failed if its predicted label changes under any of these attacks."

Rule: a sample is robust iff it is classified correctly on x and on every member's x'
(logical AND of the members' per-sample robust flags). Members run as a cascade: each one
attacks only the samples every earlier member failed on, so the result equals the AND of
the members run separately (given per-sample deterministic members).

x' of a sample (and so the CE reported at x'): x if it is misclassified clean, else the x' of
the first member that breaks it, else the member x' with the highest CE.

In the evaluation harness the ensemble is evaluation-level logic
(:func:`benchmark.eval.evaluate.evaluate_run`): members whose per-sample flags are already stored
for the same run, checkpoint and test points are read from the store, the missing ones are
run as a cascade on the still-robust samples only, and :class:`WorstCase` combines them.
Calling the attack directly runs the whole cascade on the batch.

Hyperparameters (keyword-only):

    =======  ===================================================================
    members  list of ``{"label", "attack", "hparams"}``, in order; default: ``fgsm``;
             ``pgd20`` (PGD, 20 steps, step ε/10); ``pgd100`` (100 steps, step ε/10);
             ``cw`` (κ 50, 30 steps, step ε/10) — the Table 2 columns
    =======  ===================================================================

Example:
    >>> x_adv = Ensemble(ThreatModel(Norm.LINF, 8 / 255), seed=0)(model, x, y)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective, ThreatModel, ce_objective
from benchmark.errors import UsageError

#: the Table 2 members (also the standalone columns fgsm, pgd20, pgd100, cw)
TABLE2_MEMBERS: list[dict[str, Any]] = [
    {"label": "fgsm", "attack": "fgsm", "hparams": {}},
    {"label": "pgd20", "attack": "pgd", "hparams": {"steps": 20, "rel_step_size": 0.1}},
    {"label": "pgd100", "attack": "pgd", "hparams": {"steps": 100, "rel_step_size": 0.1}},
    {"label": "cw", "attack": "cw", "hparams": {"steps": 30, "rel_step_size": 0.1,
                                                "kappa": 50.0}},
]


class WorstCase:
    """Accumulates members' per-sample results into the ensemble's flags and CE at x'.

    Args:
        robust: clean correctness of every sample (the starting flags).
        ce: CE at x of every sample (kept for samples misclassified clean).
    """

    def __init__(self, robust: Tensor, ce: Tensor) -> None:
        self.robust = robust.clone().bool()
        self.ce = ce.clone().float()
        #: highest CE at a member's x' so far, for samples no member has broken yet
        self.best_ce = torch.full_like(self.ce, -torch.inf)

    def pending(self) -> Tensor:
        """Indices of the samples still robust (what the next member must attack)."""
        return torch.nonzero(self.robust).flatten()

    def update(self, idx: Tensor, robust: Tensor, ce: Tensor) -> None:
        """Merge one member's flags and CE at its x' on the samples ``idx``."""
        live = self.robust[idx]
        idx, robust, ce = idx[live], robust[live].bool(), ce[live].float()
        self.ce[idx[~robust]] = ce[~robust]
        self.robust[idx[~robust]] = False
        self.best_ce[idx[robust]] = torch.maximum(self.best_ce[idx[robust]], ce[robust])

    def result(self) -> tuple[Tensor, Tensor]:
        """(robust flags, CE at x') of the ensemble."""
        done = self.robust & torch.isfinite(self.best_ce)
        return self.robust.clone(), torch.where(done, self.best_ce, self.ce)


@register_attack("ensemble")
class Ensemble(Attack):
    """Cascade of member attacks; per sample the first successful x' (see module docstring)."""

    description = "per-sample worst case over FGSM, PGD-20, PGD-100 and C&W (Adv-DPNP Table 2)"
    supported_norms = frozenset({Norm.LINF})
    default_hparams = {"members": TABLE2_MEMBERS}

    def __init__(self, threat: ThreatModel, *, seed: Optional[int] = None, **hparams: Any) -> None:
        super().__init__(threat, seed=seed, **hparams)
        members = self.hparams["members"]
        if not members or not all({"label", "attack", "hparams"} <= set(m) for m in members):
            raise UsageError("ensemble members must be a non-empty list of "
                             "{'label', 'attack', 'hparams'} dicts")
        self.hparams["members"] = [dict(m, hparams=dict(m["hparams"])) for m in members]

    def members(self) -> list[tuple[str, Attack]]:
        """(label, attack) of every member, built on this threat model and seed."""
        from attacks import ATTACKS
        return [(m["label"], ATTACKS.get(m["attack"])(self.threat, seed=self.seed, **m["hparams"]))
                for m in self.hparams["members"]]

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        if loss is not ce_objective:
            raise UsageError("the ensemble attacks cross-entropy; it takes no objective")
        with torch.no_grad():
            logits = model(x)
        state = WorstCase(logits.argmax(1) == y, F.cross_entropy(logits, y, reduction="none"))
        x_out = x.clone()
        for _, attack in self.members():
            idx = state.pending()
            if idx.numel() == 0:
                break
            x_adv = attack(model, x[idx], y[idx])
            with torch.no_grad():
                out = model(x_adv)
            robust = out.argmax(1) == y[idx]
            ce = F.cross_entropy(out, y[idx], reduction="none")
            prev_best = state.best_ce[idx].clone()
            state.update(idx, robust, ce)
            # take this member's x' where it broke the sample or raised its worst-case CE
            take = ~robust | (ce > prev_best)
            x_out[idx[take]] = x_adv[take]
        return x_out
