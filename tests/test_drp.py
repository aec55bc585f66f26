"""DRP: repelled prototypes, the ℓ∞ loss and logits on hand-made inputs, no training attack,
and prototypes that survive a kill -9 and resume exactly as the checkpoint holds them."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from benchmark.run.bench import bench, format_bench
from benchmark.testing import check_defense, kill_after_epochs, make_defense
from defenses.drp import DeepRepulsivePrototypes, RepulsiveHead, repulsive_prototypes


def _pairwise_linf(p: Tensor) -> Tensor:
    """All ℓ∞ distances i < j, by a plain double loop."""
    return torch.tensor([float((p[i] - p[j]).abs().max())
                         for i in range(len(p)) for j in range(i + 1, len(p))])


def test_repelled_prototypes_are_farther_apart_than_random_ones() -> None:
    protos = repulsive_prototypes(10, 100, steps=100, seed=0)
    assert torch.equal(protos, repulsive_prototypes(10, 100, steps=100, seed=0))  # seeded
    ours = _pairwise_linf(protos)
    for seed in range(20):  # U(−1, 1) draws, the optimisation's starting distribution
        rand = _pairwise_linf(torch.rand(10, 100, generator=torch.Generator().manual_seed(seed))
                              * 2 - 1)
        assert ours.min() > rand.max(), (float(ours.min()), float(rand.max()))
        assert ours.sum() > rand.sum()
    start = repulsive_prototypes(10, 100, steps=0, seed=0)
    assert _pairwise_linf(start).max() <= 2.0 < ours.min()  # started in [−1, 1], pushed out


class _Stub(nn.Module):
    """A 'model' whose features are fixed numbers, with DRP's head."""

    def __init__(self, features: Tensor, prototypes: Tensor) -> None:
        super().__init__()
        self.feats = nn.Parameter(features)
        self.head = RepulsiveHead(prototypes)

    def features(self, x: Tensor) -> Tensor:
        return self.feats

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.feats)


def test_loss_logits_and_objective_match_a_hand_computation() -> None:
    P = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]])
    f = torch.tensor([[0.5, 0.0, 0.0], [3.0, 1.0, 1.0]])
    y = torch.tensor([0, 1])
    # ‖f0 − p0‖∞ = max(.5, 1, .5) = 1 ; ‖f1 − p1‖∞ = max(3, 1, 2) = 3 → mean 2
    model = _Stub(f, P)
    defense = make_defense(DeepRepulsivePrototypes, info=_info(2))
    out = defense.training_step(model, torch.zeros(2, 1), y, epoch=0, step=0)
    assert math.isclose(float(out.loss.detach()), 2.0, rel_tol=1e-6)
    # f/‖f‖∞ · Pᵀ: [1,0,0]·P = [1, 0]; [1,1/3,1/3]·P = [1 − 1/3 + 1/6, 2/3 − 1/3]
    expected = torch.tensor([[1.0, 0.0], [1 - 1 / 3 + 1 / 6, 2 / 3 - 1 / 3]])
    assert torch.allclose(model(None), expected, atol=1e-6)
    obj = defense.objective()(model, torch.zeros(2, 1), torch.zeros(2, 1), y)
    assert torch.allclose(obj, torch.tensor([1.0, 3.0]))
    # the ℓ∞ gradient reaches exactly one coordinate per sample (the arg-max one)
    out.loss.backward()
    assert torch.equal((model.feats.grad != 0).sum(1), torch.tensor([1, 1]))


def _info(classes: int):  # noqa: ANN202
    from benchmark.data import DataInfo
    return DataInfo("tiny", classes, 3, 8, (0.5,) * 3, (0.25,) * 3, "cifar")


def test_contract_model_shape_and_no_training_attack() -> None:
    check_defense(DeepRepulsivePrototypes, archs=("tiny", "small-cnn", "lenets++"))
    defense = make_defense(DeepRepulsivePrototypes)
    model = defense.build_model("tiny", _info(10))
    assert model.features(torch.rand(2, 3, 8, 8)).shape == (2, 100)  # the backbone ends in d
    assert torch.equal(model.head.prototypes, defense.prototypes)
    assert torch.equal(defense.class_centers(model), defense.prototypes)
    assert defense.training_attack() is None
    with pytest.raises(RuntimeError, match="uses_training_attack"):
        defense.adversarial(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    from benchmark.eval.metrics import feature_metrics  # Table 4: centres = prototypes, in R^d
    x = torch.rand(20, 3, 8, 8)
    metrics = feature_metrics(model.features(x).detach(), torch.arange(20) % 10,
                              defense.class_centers(model))
    assert all(math.isfinite(v) for v in metrics.values())
    other = make_defense(DeepRepulsivePrototypes, hparams={"proto_seed": 1})
    other.load_state_dict(defense.state_dict())
    assert torch.equal(other.prototypes, defense.prototypes)


def test_bench_counts_one_forward_backward_per_sample() -> None:
    r = bench("drp", "tiny", dataset="synthetic", profile="cpu", batch_size=16, steps=1,
              warmup=1, reps=1, attacks="", device="cpu")
    assert (r["k"], r["passes_grad"], r["passes_nograd"], r["training_attack"]) == (0, 1, 0, False)
    assert "1 with grad (= k+1, k = 0: declares no training attack)" in format_bench(r)


def _protos(ckpt: Path) -> tuple[Tensor, Tensor]:
    state = torch.load(ckpt, weights_only=True)
    return state["model"]["head.prototypes"], state["defense"]["prototypes"]


def test_kill_minus_nine_then_resume_keeps_the_stored_prototypes(tmp_path: Path) -> None:
    hp = json.dumps({"epochs": 80, "lr_milestones": [70], "val_attack_steps": 1,
                     "batch_size": 64})
    cmd = [sys.executable, "-m", "benchmark.cli", "-q", "train", "--defense", "drp",
           "--dataset", "synthetic", "--arch", "tiny", "--hparams", hp, "--no-progress",
           "--device", "cpu", "--runs-dir", str(tmp_path)]
    run_dir = kill_after_epochs(cmd, tmp_path, 2)
    ckpt = run_dir / "ckpt_last.pt"
    in_model, in_state = _protos(ckpt)
    assert torch.equal(in_model, repulsive_prototypes(10, 100, steps=100, seed=0))
    assert torch.equal(in_model, in_state)
    # Swap two prototypes in the checkpoint: a resume that regenerated them instead of
    # restoring what the checkpoint holds would end with the original order.
    state = torch.load(ckpt, weights_only=True)
    swapped = in_model[[1, 0, *range(2, 10)]].clone()
    state["model"]["head.prototypes"] = swapped
    state["defense"]["prototypes"] = swapped.clone()
    torch.save(state, ckpt)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (run_dir / "TRAINED").exists()
    final_model, final_state = _protos(ckpt)
    assert torch.equal(final_model, swapped) and torch.equal(final_state, swapped)


def test_rejection_score_keeps_its_ranking_where_softmax_saturates() -> None:
    """Features near their prototypes give DRP logits of order 80: 1 − max softmax is exactly 0
    in float32 for all of them, the ℓ∞ distance to the nearest prototype still ranks them."""
    from benchmark.eval.rejection import auroc, score_batches

    defense = make_defense(DeepRepulsivePrototypes, info=_info(10))
    protos = defense.prototypes
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 10
    near = protos[y] + 0.05 * torch.randn(40, protos.shape[1], generator=g)  # "clean"
    far = protos[y] + 0.6 * torch.randn(40, protos.shape[1], generator=g)  # off the prototypes
    pos_model, neg_model = _Stub(near, protos), _Stub(far, protos)
    logits = pos_model(None).detach()
    assert float(logits.amax(1).min()) > 40  # DRP's logit scale
    assert torch.equal(1 - torch.softmax(logits, 1).amax(1), torch.zeros(40))  # the old score
    pos = defense.rejection_score(pos_model, torch.zeros(40, 1)).detach()
    neg = defense.rejection_score(neg_model, torch.zeros(40, 1)).detach()
    assert pos.dtype == torch.float32 and len(set(pos.tolist())) == 40  # no ties
    assert auroc(pos, neg) > 0.99
    # the harness's batched scoring uses the override, not the default softmax score
    scores, _ = score_batches(defense, pos_model, torch.zeros(40, 1), batch_size=40)
    assert torch.equal(scores, pos)


def test_rejection_score_is_the_linf_distance_to_the_nearest_prototype() -> None:
    P = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]])
    f = torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.5, -1.0]])
    # f0: ‖·‖∞ to p0 = 1, to p1 = 2 → 1 ; f1: to p0 = 2.5, to p1 = 0.5 → 0.5
    defense = make_defense(DeepRepulsivePrototypes, info=_info(2))
    score = defense.rejection_score(_Stub(f, P), torch.zeros(2, 1))
    assert torch.allclose(score, torch.tensor([1.0, 0.5]))
    score.sum().backward()  # differentiable: the adaptive attack can follow it
    assert defense.score_name == "min_k ‖f − p_k‖∞"
