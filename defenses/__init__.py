"""Defenses: base class, registry and the built-in defenses.

Third-party defenses register through the ``advbench.defenses`` entry-point group.
"""
from __future__ import annotations

from benchmark.registry import Registry
from defenses.base import Defense, StepOutput

DEFENSES: Registry = Registry("defense", "advbench.defenses", Defense)
register_defense = DEFENSES.register

# built-ins, imported for their registration side effect; order = table/listing order
from defenses import (st, at, trades, mart, at_he, oc, fsr, ikl, adv_dpnp, dpnp,  # noqa: E402,F401
                      hat, dio, pcl, drp, pm_ed_wta)



def catalog() -> dict[str, dict[str, str]]:
    """Name -> ``paper`` and ``description`` of every registered defense, in registry order:
    what the report needs from the registry, handed in by its caller."""
    return {n: {"paper": DEFENSES.get(n).paper, "description": DEFENSES.get(n).description}
            for n in DEFENSES.names()}


__all__ = ["DEFENSES", "Defense", "StepOutput", "catalog", "register_defense"]
