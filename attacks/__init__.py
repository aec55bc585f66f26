"""Attacks: base class, threat model, registry and the built-in attacks.

Third-party attacks register through the ``advbench.attacks`` entry-point group.
"""
from __future__ import annotations

from attacks.base import (Attack, Norm, Objective, ThreatModel, check_perturbation, ce_objective,
                          eps_to_str, model_mode, parse_eps)
from benchmark.registry import Registry

ATTACKS: Registry = Registry("attack", "advbench.attacks", Attack)
register_attack = ATTACKS.register

# built-ins, imported for their registration side effect (timm style); order = listing order
from attacks import (fgsm, pgd, cw, ensemble, autoattack, adaptive, square,  # noqa: E402,F401
                     transfer, apgd, rays, bpda)

__all__ = ["ATTACKS", "Attack", "Norm", "Objective", "ThreatModel", "ce_objective",
           "check_perturbation", "eps_to_str", "model_mode", "parse_eps", "register_attack"]
