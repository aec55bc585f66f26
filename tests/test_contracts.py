"""Registry-driven contract tests (timm's test_models pattern): every registered defense and
attack, built-in or plugin, passes the public test kit, with no per-name test to write.

A defense or attack that registers itself is covered here without editing this file.
"""
from __future__ import annotations

from typing import Any, Mapping

import pytest
import torch

from attacks import ATTACKS
from benchmark.testing import check_attack, check_defense
from defenses import DEFENSES, StepOutput
from defenses.base import Defense

#: budget keys an attack may have, and the small value the contract runs them with (the
#: contract does not depend on the budget)
CHEAP = {"steps": 3, "n_iter": 3, "n_queries": 10, "restarts": 1, "n_restarts": 1}


def cheap_hparams(cls: type) -> dict[str, Any]:
    """The attack's budget hyperparameters set small (only keys it declares)."""
    return {k: v for k, v in CHEAP.items() if k in cls.default_hparams}


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_registered_defense_meets_the_contract(name: str) -> None:
    check_defense(DEFENSES.get(name))


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_registered_attack_meets_the_contract(name: str) -> None:
    cls = ATTACKS.get(name)
    check_attack(cls, hparams=cheap_hparams(cls))


def test_the_registries_list_the_builtins() -> None:
    assert {"st", "at", "trades", "hat", "ikl"} <= set(DEFENSES.names())
    assert {"fgsm", "pgd", "cw", "autoattack", "ensemble"} <= set(ATTACKS.names())


class _Counting(Defense):
    """Plain adversarial training that counts its steps in defense-private state."""

    name = "counting"

    def __init__(self, hparams: Mapping[str, Any], **kw: Any) -> None:
        super().__init__(hparams, **kw)
        self.steps = torch.zeros((), dtype=torch.long)

    def training_step(self, model, x, y, *, epoch, step):  # type: ignore[no-untyped-def]
        self.steps += 1
        logits = model(self.adversarial(model, x, y))
        return StepOutput(torch.nn.functional.cross_entropy(logits, y), logits=logits)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = state["steps"].clone()


class _ForgetsItsState(_Counting):
    """``load_state_dict`` that silently restores nothing (a resumed run would lose state)."""

    name = "forgets"

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class _WrongDtype(_Counting):
    name = "wrong-dtype"

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = state["steps"].float()


def _forgetful(name: str) -> type:
    """A registered defense with its ``load_state_dict`` replaced by a no-op."""
    return type(f"Forgetful{name}", (DEFENSES.get(name),), {"load_state_dict": lambda s, st: None})


def test_check_defense_passes_a_defense_whose_state_round_trips() -> None:
    check_defense(_Counting)


@pytest.mark.parametrize("cls", [_ForgetsItsState, _WrongDtype, _forgetful("ikl")])
def test_check_defense_fails_when_load_state_dict_is_broken(cls: type) -> None:
    with pytest.raises(AssertionError, match="load_state_dict|float"):
        check_defense(cls)
