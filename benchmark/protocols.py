"""Evaluation attack specs: the paper's columns as named, fully parameterised attacks.

A column label (``pgd20``) maps to an :class:`AttackSpec` that depends on the dataset's scale
(CIFAR: ε = 8/255; MNIST: ε = 0.3, step 0.01, 40 steps). ``suites`` group labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from attacks.base import Attack, Norm, ThreatModel, eps_to_str
from benchmark.errors import UsageError


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation column: a registered attack with its threat model and hyperparameters."""

    label: str
    attack: str
    norm: str
    eps: float
    hparams: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: Optional[int] = 0) -> Attack:
        from attacks import ATTACKS
        cls = ATTACKS.get(self.attack)
        return cls(ThreatModel(Norm(self.norm), self.eps), seed=seed, **self.hparams)

    def key(self) -> dict[str, Any]:
        return {"label": self.label, "attack": self.attack, "norm": self.norm, "eps": self.eps,
                "hparams": self.hparams}

    def record(self) -> dict[str, Any]:
        return {"attack": self.label, "attack_name": self.attack, "norm": self.norm,
                "eps": self.eps, "eps_str": eps_to_str(self.eps), "attack_hparams": self.hparams}


def _linf_eps(scale: str) -> float:
    return 0.3 if scale == "mnist" else 8 / 255


def attack_specs(scale: str) -> dict[str, AttackSpec]:
    """Every named column for a dataset scale."""
    eps = _linf_eps(scale)
    if scale == "mnist":
        pgd = {"steps": 40, "step_size": 0.01}
    else:
        pgd = {"steps": 20, "step_size": 1 / 255}
    return {
        "fgsm": AttackSpec("fgsm", "fgsm", "linf", eps),
        "pgd": AttackSpec("pgd", "pgd", "linf", eps, pgd),
    }


SUITES: dict[str, list[str]] = {
    "default": ["fgsm", "pgd"],
}


def resolve_specs(attacks: Optional[str], scale: str, *, suite: Optional[str] = None,
                  eps: Optional[float] = None) -> list[AttackSpec]:
    """Turn ``--attacks a,b`` and/or ``--suite name`` into specs (ε optionally overridden).

    Raises:
        UsageError: unknown label or suite (the message lists the valid ones).
    """
    specs = attack_specs(scale)
    labels: list[str] = []
    if suite:
        if suite not in SUITES:
            raise UsageError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
        labels += SUITES[suite]
    if attacks:
        parts = [a.strip() for a in attacks.split(",") if a.strip()]
        labels += list(specs) if parts == ["all"] else parts
    if not labels:
        labels = SUITES["default"]
    out = []
    for label in dict.fromkeys(labels):
        if label not in specs:
            raise UsageError(f"unknown attack {label!r}; valid: {', '.join(specs)}")
        spec = specs[label]
        if eps is not None:
            spec = AttackSpec(spec.label, spec.attack, spec.norm, eps, spec.hparams)
        out.append(spec)
    return out
