"""Cost of a defense: declared forward+backward passes per training sample vs a counter."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.run.resolve import resolve_run_config
from benchmark.data import load_dataset
from benchmark.eval.evaluate import evaluate_run
from benchmark.run.protocols import resolve_specs
from benchmark.report.grid import reasons
from benchmark.report.report import build_table, load_records
from benchmark.report.tables import TABLES, frames
from benchmark.run.cost import cost_row, cost_rows
from benchmark.run.train import train_run
from benchmark.store import RunStore, read_jsonl
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
    defense = make_defense(cls, hparams={"train_attack_steps": 3})
    # a defense with a leading stage (PCL's softmax pre-training) declares the epoch mean
    pre = int(getattr(defense, "pretrain_epochs", lambda: 0)())
    epochs = int(defense.hparams["epochs"])
    graph, _ = _count_passes(name, steps=3, epoch=pre)
    if pre:
        graph = (pre * _count_passes(name, steps=3, epoch=0)[0] + (epochs - pre) * graph) / epochs
    declared = defense.passes_per_sample()
    assert graph == declared, f"{name}: counted {graph} forward+backward passes, declared {declared}"


def test_declared_default_follows_the_training_attack() -> None:
    hp = {"train_attack_steps": 7}
    assert make_defense(DEFENSES.get("at"), hparams=hp).passes_per_sample() == 8
    assert make_defense(DEFENSES.get("trades"), hparams=hp).passes_per_sample() == 9
    assert make_defense(DEFENSES.get("st"), hparams=hp).passes_per_sample() == 1


FAST = {"epochs": 2, "lr_milestones": [1], "train_attack_steps": 2, "val_attack_steps": 1,
        "batch_size": 64, "train_subset": 128, "val_size": 32}


def test_cost_rows_of_real_runs_add_the_helper_and_reach_table1(tmp_path: Path) -> None:
    """HAT's cost row = its own log + its st helper's; the report puts it in Table 2."""
    data = load_dataset("synthetic")
    store = RunStore(tmp_path)
    hat = train_run(resolve_run_config("hat", "synthetic", arch="tiny", user_hparams=FAST), data,
                    store, progress=False)
    st_dir = next((tmp_path / "synthetic" / "st").iterdir())
    own, helper = (read_jsonl(d / "train_log.jsonl") for d in (hat, st_dir))
    row = cost_row(hat)
    assert row["passes_per_sample"] == (2 + 3) + 1  # PGD-2, three loss passes, st helper
    assert row["helpers"][0]["run_id"] == st_dir.name
    assert row["epoch_s"] == pytest.approx(sum(r["epoch_s"] for r in own) / 2
                                           + sum(r["epoch_s"] for r in helper) / 2, abs=2e-3)
    assert row["peak_mem_mb"] == max(r["peak_mem_mb"] for r in own + helper)
    # CPU-seconds (what the tables show): every epoch logs process CPU time and thread count
    assert all(r["cpu_s"] >= 0 and r["torch_threads"] == torch.get_num_threads()
               for r in own + helper)
    assert row["epoch_cpu_s"] == pytest.approx(sum(r["cpu_s"] for r in own) / 2
                                               + sum(r["cpu_s"] for r in helper) / 2, abs=2e-3)
    # no peak_mem_mb in an older log: the cell is absent, not zero
    log = hat / "train_log.jsonl"
    log.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "peak_mem_mb"}) + "\n"
                           for r in own))
    assert cost_row(hat)["peak_mem_mb"] is None

    evaluate_run(hat, resolve_specs("fgsm", "cifar"), n_examples=16, data=data, progress=False)
    records = load_records(tmp_path, extra=cost_rows(tmp_path))
    assert {r["run_id"] for r in records if r.get("kind") == "cost"} == {hat.name, st_dir.name}
    wide = build_table(TABLES[2], frames(records)["attack"],
                       pd.MultiIndex.from_tuples([("tiny", "best", "hat")],
                                                 names=["arch", "checkpoint", "defense"]))[0]
    assert wide.loc[("tiny", "best", "hat"), "passes"] == 6
    assert wide.loc[("tiny", "best", "hat"), "epoch_cpu_s"] == \
        pytest.approx(cost_row(hat)["epoch_cpu_s"])
    assert "epoch_s" not in wide  # wall seconds measure the load: never a table column
    assert np.isnan(wide.loc[("tiny", "best", "hat"), "peak_mem_mb"])
    # a log from before CPU-seconds were recorded: empty cost cell with its reason
    log.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "cpu_s"}) + "\n"
                           for r in own))
    assert cost_row(hat)["epoch_cpu_s"] is None
    built = build_table(TABLES[2], frames(load_records(tmp_path, extra=cost_rows(tmp_path)))["attack"],
                        pd.MultiIndex.from_tuples([("tiny", "best", "hat")],
                                                  names=["arch", "checkpoint", "defense"]))
    assert np.isnan(built[0].loc[("tiny", "best", "hat"), "epoch_cpu_s"])
    assert "no CPU-seconds" in reasons(built[2])[("tiny", "best", "hat", "epoch_cpu_s")]
    assert "training log of the run" in reasons(built[2])[("tiny", "best", "hat", "epoch_cpu_s")]
    # the helper's log lacks them, the run's has them: the reason names the helper run
    log.write_text("".join(json.dumps(r) + "\n" for r in own))
    helper_log = st_dir / "train_log.jsonl"
    helper_log.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "cpu_s"})
                                  + "\n" for r in helper))
    built = build_table(TABLES[2], frames(load_records(tmp_path, extra=cost_rows(tmp_path)))["attack"],
                        pd.MultiIndex.from_tuples([("tiny", "best", "hat")],
                                                  names=["arch", "checkpoint", "defense"]))
    assert np.isnan(built[0].loc[("tiny", "best", "hat"), "epoch_cpu_s"])
    assert f"`st` helper run {st_dir.name}" in \
        reasons(built[2])[("tiny", "best", "hat", "epoch_cpu_s")]
