"""Feature-space discrimination metrics of the Adv-DPNP paper (arXiv 2504.03782, §4.3, Table 4).

Pure functions of a feature matrix ``F`` (N×d), integer labels ``y`` (N) and, for SCR and the
angular separations, class centres ``C`` (M×d). Everything is computed in float64.

=======  ====  ==========================================================================
metric   eq.   definition (better)
=======  ====  ==========================================================================
FDR      (8)   Σ_j tr(S_j^w)/tr(S_j^b) = Σ_j Σ_{i∈C_j} ‖f_i − μ_j‖² / (N_j ‖μ_j − μ‖²)
               (lower)
AFS      (9)   Σ_j Σ_{i∈C_j} (1 − cos⟨f_i, μ_j⟩) / Σ_j N_j (1 − cos⟨μ_j, μ⟩) (lower)
SCR      (10)  (1/M) Σ_j min_{k≠j} ‖c_k − c_j‖ / ((1/N_j) Σ_{i∈C_j} ‖f_i − c_j‖) (higher)
MeanSep  (11)  (1/M) Σ_j min_{k≠j} ∠(c_j, c_k), in degrees (higher)
MinSep   (12)  min_{j≠k} ∠(c_j, c_k), in degrees (higher)
=======  ====  ==========================================================================

μ_j is the mean feature of class j, μ the global mean feature (over all N samples, eq. 8),
c_j the class centre: the prototypes for prototype defenses, the classifier weights otherwise
(``Defense.class_centers``).

Readings of the paper, stated once here:

* FDR is computed exactly as eq. (8) is written: a sum over classes of per-class
  within/between trace ratios (lower is better, as the paper's Table 4 says), although the
  paper's prose calls it "the ratio of inter-class variance to intra-class variance".
* Eq. (11)–(12) write ``arccos(c_jᵀ c_k)``; the centres are l2-normalised first (the angle
  between the vectors), so the result does not depend on their norm (α = 40 for Adv-DPNP).
  MeanSep is the mean *nearest-rival* angle as the paper's text defines it, not the mean over
  all pairs.
* Classes without samples are left out of FDR, AFS and SCR (M counts the classes present);
  MeanSep/MinSep use every centre.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from torch import Tensor

#: column name → "lower" or "higher" is better
DIRECTION = {"fdr": "lower", "afs": "lower", "scr": "higher", "mean_sep": "higher",
             "min_sep": "higher"}


def _np(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _classes(features: np.ndarray | Tensor, labels: np.ndarray | Tensor
             ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    f = _np(features)
    y = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, Tensor) else labels)
    if f.ndim != 2 or y.shape != (f.shape[0],):
        raise ValueError(f"features must be N×d and labels N, got {f.shape} and {y.shape}")
    return f, y.astype(np.int64), sorted(int(c) for c in np.unique(y))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows of ``a`` with vector(s) ``b`` (0 where a norm is 0)."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def fdr(features: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float:
    """Fisher discriminant ratio, eq. (8): Σ_j tr(S_j^w)/tr(S_j^b). Lower is better."""
    f, y, classes = _classes(features, labels)
    mu = f.mean(0)
    total = 0.0
    for j in classes:
        fj = f[y == j]
        mu_j = fj.mean(0)
        within = float(((fj - mu_j) ** 2).sum())
        between = len(fj) * float(((mu_j - mu) ** 2).sum())
        total += within / between if between > 0 else math.inf
    return total


def afs(features: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float:
    """Angular Fisher score, eq. (9): angular within- over between-class scatter. Lower is better."""
    f, y, classes = _classes(features, labels)
    mu = f.mean(0)
    within = between = 0.0
    for j in classes:
        fj = f[y == j]
        mu_j = fj.mean(0)
        within += float((1.0 - _cos(fj, mu_j)).sum())
        between += len(fj) * float(1.0 - _cos(mu_j, mu))
    return within / between if between > 0 else math.inf


def scr(features: np.ndarray | Tensor, labels: np.ndarray | Tensor,
        centers: np.ndarray | Tensor) -> float:
    """Separation-to-compactness ratio, eq. (10), with class centres ``centers``. Higher is better.

    Raises:
        ValueError: a label has no centre (labels must index rows of ``centers``).
    """
    f, y, classes = _classes(features, labels)
    c = _np(centers)
    if c.ndim != 2 or c.shape[1] != f.shape[1]:
        raise ValueError(f"centers must be M×{f.shape[1]}, got {c.shape}")
    if classes and (classes[0] < 0 or classes[-1] >= len(c)):
        raise ValueError(f"labels {classes[0]}..{classes[-1]} do not index {len(c)} centres")
    dist = np.linalg.norm(c[:, None, :] - c[None, :, :], axis=-1)
    np.fill_diagonal(dist, np.inf)
    ratios = []
    for j in classes:
        compact = float(np.linalg.norm(f[y == j] - c[j], axis=1).mean())
        ratios.append(dist[j].min() / compact if compact > 0 else math.inf)
    return float(np.mean(ratios)) if ratios else math.nan


def center_angles(centers: np.ndarray | Tensor) -> np.ndarray:
    """Pairwise angles in degrees between the (l2-normalised) centres; the diagonal is inf."""
    c = _np(centers)
    if c.ndim != 2 or len(c) < 2:
        raise ValueError(f"need at least two centres as an M×d matrix, got shape {c.shape}")
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    u = np.divide(c, norms, out=np.zeros_like(c), where=norms > 0)
    ang = np.degrees(np.arccos(np.clip(u @ u.T, -1.0, 1.0)))
    np.fill_diagonal(ang, np.inf)
    return ang


def mean_sep(centers: np.ndarray | Tensor) -> float:
    """MeanSep, eq. (11): mean over classes of the angle to the nearest rival centre (degrees)."""
    return float(center_angles(centers).min(1).mean())


def min_sep(centers: np.ndarray | Tensor) -> float:
    """MinSep, eq. (12): the smallest angle between any two class centres (degrees)."""
    return float(center_angles(centers).min())


def feature_metrics(features: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                    centers: Optional[np.ndarray | Tensor]) -> dict[str, float]:
    """All five metrics; the centre-based ones are NaN when ``centers`` is None."""
    out = {"fdr": fdr(features, labels), "afs": afs(features, labels)}
    if centers is None:
        out.update(scr=math.nan, mean_sep=math.nan, min_sep=math.nan)
    else:
        out.update(scr=scr(features, labels, centers), mean_sep=mean_sep(centers),
                   min_sep=min_sep(centers))
    return out
