"""Cost of a defense: declared forward+backward passes per training sample vs a counter."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmark.testing import TINY_INFO, make_defense
from defenses import DEFENSES


def _count_passes(name: str, steps: int, epoch: int = 0) -> tuple[float, float]:
    """(forward passes with autograd graph, forward-only passes) per sample in one real step."""
    cls = DEFENSES.get(name)
    defense = make_defense(cls, hparams={"train_attack_steps": steps})
    model = defense.build_model("tiny", TINY_INFO)
    if cls.requires:
        defense.setup({r: DEFENSES.get(r)(defense.hparams, threat=defense.threat, num_classes=10)
                       .build_model("tiny", TINY_INFO).eval() for r in cls.requires})
    counts = {"graph": 0, "plain": 0}
    inner = model.backbone.forward_maps

    def counted(x: torch.Tensor) -> Any:
        out = inner(x)
        counts["graph" if out.requires_grad else "plain"] += x.shape[0]
        return out

    model.backbone.forward_maps = counted  # every path (forward, features) goes through it
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 10
    model.train()
    defense.on_epoch_start(model, epoch)
    out = defense.training_step(model, x, y, epoch=epoch, step=0)
    out.loss.backward()
    return counts["graph"] / 8, counts["plain"] / 8


@pytest.mark.parametrize("name", DEFENSES.names())
def test_declared_passes_match_a_counter(name: str) -> None:
    """Each registered defense declares what one real training step costs, per sample."""
    cls = DEFENSES.get(name)
    last = int(cls.default_hparams.get("pretrain_epochs", 0))  # e.g. PCL's CE-only stage
    graph, _ = _count_passes(name, steps=3, epoch=last)
    declared = make_defense(cls, hparams={"train_attack_steps": 3}).passes_per_sample()
    assert graph == declared, f"{name}: counted {graph} forward+backward passes, declared {declared}"


def test_declared_default_follows_the_training_attack() -> None:
    hp = {"train_attack_steps": 7}
    assert make_defense(DEFENSES.get("at"), hparams=hp).passes_per_sample() == 8
    assert make_defense(DEFENSES.get("trades"), hparams=hp).passes_per_sample() == 9
    assert make_defense(DEFENSES.get("st"), hparams=hp).passes_per_sample() == 1
