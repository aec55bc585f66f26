"""The exact projection onto {‖δ‖₁ ≤ ε} ∩ [lo, hi] and the sparse l1 step."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from attacks.norms import L1Ops, project_l1_box


def _bisection_reference(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                         eps: torch.Tensor) -> torch.Tensor:
    """Independent reference, row-wise: δ_i(θ) = clip(soft-threshold(v_i, θ), lo_i, hi_i);
    bisection (200 halvings, float64) on θ for Σ|δ_i(θ)| = ε."""
    def delta(theta: torch.Tensor) -> torch.Tensor:
        soft = torch.sign(v) * torch.clamp(v.abs() - theta[:, None], min=0)
        return torch.minimum(torch.maximum(soft, lo), hi)

    left = torch.zeros(v.shape[0], dtype=v.dtype)
    right = v.abs().amax(1)
    for _ in range(200):
        mid = (left + right) / 2
        over = delta(mid).abs().sum(1) > eps
        left, right = torch.where(over, mid, left), torch.where(over, right, mid)
    inside = delta(left * 0).abs().sum(1) <= eps
    return torch.where(inside[:, None], delta(left * 0), delta(right))


def _random_case(gen: torch.Generator, d: int) -> tuple[torch.Tensor, ...]:
    x = torch.rand(d, generator=gen, dtype=torch.float64)
    x[torch.rand(d, generator=gen) < 0.25] = 0.0  # points on the faces of the box
    x[torch.rand(d, generator=gen) < 0.25] = 1.0
    scale = 3 * float(torch.rand((), generator=gen))
    v = scale * torch.randn(d, generator=gen, dtype=torch.float64)
    eps = 2 * float(torch.rand((), generator=gen))
    return v, -x, 1 - x, eps


def test_projection_equals_bisection_reference_on_small_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(300):  # dimension 1..12, zero-padded to 12 (padding contributes nothing)
        v, lo, hi, eps = _random_case(gen, int(torch.randint(1, 13, (), generator=gen)))
        pad = 12 - v.shape[0]
        rows.append([torch.cat([t, torch.zeros(pad, dtype=t.dtype)]) for t in (v, lo, hi)] + [eps])
    v, lo, hi = (torch.stack([r[i] for r in rows]) for i in range(3))
    eps = torch.tensor([r[3] for r in rows], dtype=torch.float64)
    ref = _bisection_reference(v, lo, hi, eps)
    for i in range(len(rows)):
        got = project_l1_box(v[i:i + 1], lo[i:i + 1], hi[i:i + 1], float(eps[i]))[0]
        assert torch.allclose(got, ref[i], atol=1e-9), (v[i], lo[i], hi[i], eps[i], got, ref[i])
        assert got.abs().sum() <= eps[i] + 1e-9 and (got >= lo[i]).all() and (got <= hi[i]).all()


def test_projection_equals_scipy_minimiser() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(15):
        v, lo, hi, eps = _random_case(gen, 4)
        vn, lon, hin = v.numpy(), lo.numpy(), hi.numpy()
        # split δ = p − n with p, n ≥ 0 makes the l1 constraint linear
        res = minimize(lambda z: np.sum((z[:4] - z[4:] - vn) ** 2), np.zeros(8),
                       method="SLSQP", bounds=[(0, None)] * 8,
                       constraints=[{"type": "ineq", "fun": lambda z: eps - z.sum()},
                                    {"type": "ineq", "fun": lambda z: z[:4] - z[4:] - lon},
                                    {"type": "ineq", "fun": lambda z: hin - (z[:4] - z[4:])}],
                       options={"ftol": 1e-14, "maxiter": 500})
        got = project_l1_box(v[None], lo[None], hi[None], eps)[0].numpy()
        assert np.allclose(got, res.x[:4] - res.x[4:], atol=1e-5), (got, res.x)


def test_projection_is_idempotent_and_nearest_on_images() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3 * 8 * 8, generator=gen, dtype=torch.float64)
    v = 0.5 * torch.randn(6, 3 * 8 * 8, generator=gen, dtype=torch.float64)
    eps = 2.0
    p = project_l1_box(v, -x, 1 - x, eps)
    assert torch.allclose(p.abs().sum(1), torch.full((6,), eps, dtype=torch.float64))
    assert torch.allclose(project_l1_box(p, -x, 1 - x, eps), p, atol=1e-12)
    # variational inequality of a projection onto a convex set: <v − p, z − p> ≤ 0 ∀ feasible z
    for _ in range(20):
        z = project_l1_box(torch.randn(6, 192, generator=gen, dtype=torch.float64), -x, 1 - x,
                           eps * float(torch.rand((), generator=gen)))
        assert (((v - p) * (z - p)).sum(1) <= 1e-9).all()


def test_sparse_step_moves_top_one_percent_and_skips_saturated_pixels() -> None:
    ops = L1Ops()
    x = torch.rand(2, 3, 10, 10)
    grad = torch.randn(2, 3, 10, 10)
    flat_x, flat_g = x.view(2, -1), grad.view(2, -1)
    top = flat_g[0].abs().argmax()
    flat_x[0, top] = 1.0 if flat_g[0, top] > 0 else 0.0  # largest gradient points out of the box
    step = ops.direction(grad, x, {"l1_sparsity": 0.99}).view(2, -1)
    k = math.ceil(0.01 * 300)
    assert ((step != 0).sum(1) == k).all()
    assert torch.allclose(step.abs().sum(1), torch.ones(2))
    assert step[0, top] == 0, "a coordinate at the box face was moved outwards"
    chosen = flat_g[1].abs().topk(k).indices
    assert torch.equal(step[1, chosen], flat_g[1, chosen].sign() / k)


@pytest.mark.parametrize("eps", [0.0, 0.5, 5.0])
def test_l1_random_start_is_inside_ball(eps: float) -> None:
    x = torch.rand(5, 1, 6, 6)
    delta = L1Ops().project(x, L1Ops().random_start(x, eps, torch.Generator().manual_seed(0)), eps)
    assert (delta.flatten(1).abs().sum(1) <= eps * (1 + 1e-6) + 1e-7).all()
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
