"""Shared fixtures: every test is CPU-only, offline and seeded."""
from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="module")
def data():
    """The synthetic dataset (built once per test module)."""
    from benchmark.data import load_dataset
    return load_dataset("synthetic")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A briefly trained tiny model: some points wrong clean, some broken, some robust
    (a test module may override it, e.g. with fewer epochs)."""
    from benchmark.testing import tiny_st_run
    return tiny_st_run(tmp_path_factory.mktemp("runs"), epochs=3)
