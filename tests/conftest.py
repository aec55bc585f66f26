"""Shared fixtures: every test is CPU-only, offline and seeded."""
from __future__ import annotations

import os

import pytest
import torch

# Small test models run fastest (and identically) on one intra-op thread; it also keeps the
# suite quick when the machine is shared. Subprocesses inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def fast_hparams() -> dict:
    """Protocol overrides that make a synthetic/tiny run take a second or two."""
    return {"epochs": 2, "lr_milestones": [1], "train_attack_steps": 2, "val_attack_steps": 2,
            "batch_size": 64}
