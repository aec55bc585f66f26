"""RayS (attacks/rays.py): decision-only, in the ball, and point by point like the official code.

The comparison with the official implementation (uclaml/RayS, ``RayS.py``) is slow and needs
that file: ``RAYS_OFFICIAL=/path/to/RayS.py pytest -m slow tests/test_rays.py -s`` (the file
is imported from there, never copied into this repository; its ``pgbar`` progress bar is
replaced by a no-op, and ``.cuda()`` by the identity on a machine without CUDA).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from attacks import ATTACKS
from attacks.base import Norm, ThreatModel
from benchmark.testing import DetectorHead, ScaledLogits
from benchmark.testing import templates_data as _data
from benchmark.testing import templates_mlp

logger = logging.getLogger(__name__)
EPS = 8 / 255




def _model(seed: int = 0) -> nn.Module:
    """An MLP adversarially trained (PGD-5, ε = 0.03) on the templates."""
    return templates_mlp(seed)


def _rays(queries: int, **hp: object):  # noqa: ANN202
    return ATTACKS.get("rays")(ThreatModel(Norm.LINF, EPS), seed=0, n_queries=queries, **hp)


def test_rays_reads_only_decisions_and_breaks_points_in_the_ball() -> None:
    """Models with the same decisions and different scores (logits × 1000, a detector head
    that boosts the predicted class off the clean points) get the same x' bit for bit."""
    model = _model()
    x, y = _data(20, 2)
    atk = _rays(200)
    x_adv = atk(model, x, y)
    clean = model(x).argmax(1) == y
    robust = model(x_adv).argmax(1) == y
    dist = torch.cat(atk.distances)
    assert (robust <= clean).all() and robust.sum() < clean.sum()  # it breaks some points
    assert ((x_adv - x).abs().flatten(1).amax(1) <= EPS + 1e-6).all()
    assert (dist[clean & ~robust] <= EPS + 1e-7).all() and (dist[robust] > EPS).all()
    for other in (ScaledLogits(model), DetectorHead(model, x)):
        assert torch.equal(_rays(200)(other, x, y), x_adv)
    # early stopping changes the cost, never the verdict
    early = _rays(200, early_stop=True)(model, x, y)
    assert torch.equal(model(early).argmax(1) == y, robust)


def _official(path: str) -> types.ModuleType:
    """The official ``RayS.py`` imported from ``path`` (pgbar stubbed; CPU without CUDA)."""
    sys.modules.setdefault("pgbar", types.SimpleNamespace(progress_bar=lambda *a, **k: None))
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    spec = importlib.util.spec_from_file_location("rays_official", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


class _Labels(nn.Module):
    """The official code's model interface: ``predict_label``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_label(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).argmax(1)


def compare_with_official(path: str, n: int = 100, queries: int = 1000
                          ) -> dict[str, float]:
    """Robust accuracy and ADBD of advbench's RayS and the official one on the same model and
    points (all n points, misclassified ones count as broken at distance 0, as the official
    ``attack_robust.py`` counts them)."""
    official = _official(path)
    model = _model()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev)
    x, y = _data(n, 2)
    x, y = x.to(dev), y.to(dev)
    clean = model(x).argmax(1) == y
    atk = _rays(queries)
    ours = (model(atk(model, x, y)).argmax(1) == y).cpu()
    d_ours = torch.cat(atk.distances) * clean.cpu()
    ref = official.RayS(_Labels(model), epsilon=EPS, order=np.inf)
    _, _, d_ref, succ = ref(x, y, query_limit=queries)
    d_ref = d_ref.cpu() * clean.cpu()  # the official distance of a misclassified point: ~0
    theirs = ~succ.cpu() & clean.cpu()
    out = {"n": n, "queries": queries, "clean": float(clean.float().mean()),
           "robust_ours": float(ours.float().mean()), "robust_official": float(
               theirs.float().mean()), "adbd_ours": float(d_ours.mean()),
           "adbd_official": float(d_ref.mean()),
           "disagree": int((ours != theirs).sum())}
    logger.warning("RayS vs official: %s", out)
    print(out)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RAYS_OFFICIAL"), reason="set RAYS_OFFICIAL to the "
                    "official RayS.py (github.com/uclaml/RayS)")
def test_rays_matches_the_official_implementation() -> None:
    got = compare_with_official(os.environ["RAYS_OFFICIAL"],
                                int(os.environ.get("RAYS_POINTS", 100)),
                                int(os.environ.get("RAYS_QUERIES", 1000)))
    assert abs(got["robust_ours"] - got["robust_official"]) <= 0.01, got
    assert abs(got["adbd_ours"] - got["adbd_official"]) <= 0.05 * got["adbd_official"], got
