"""Rejection evaluation (SPEC §9): a run's detector score against PGD, OOD and an adaptive attack.

Every defense has a rejection score ``r(x) = defense.rejection_score(model, x)`` (higher = more
suspicious): ±ED-WTA's min_k ½‖f − p_k‖² and, as a second row set, its winner score (a
defense with ``score_options`` is evaluated once per option), Adv-DPNP's distance to the nearest prototype,
DRP's ℓ∞ distance to the nearest prototype (its softmax saturates in float32), 1 − max
softmax for every other defense. On the first ``n`` test points (the points
``advbench evaluate`` attacks):

* positives are the n clean test points; the threshold τ accepts a fraction ``tpr`` (95%) of
  them (r ≤ τ accepts, r > τ rejects);
* each *negative set* gives AUROC (probability that a negative scores above a positive, ties
  count ½) and the FPR at τ (fraction of negatives accepted):

  - ``pgd``: x' of the protocol's ``pgd`` column (CE, random start) that the classifier gets
    wrong (successful adversarial examples of clean-correct points);
  - ``adaptive``: x' of PGD on ``margin(x') − λ·max(0, r(x') − τ)/σ`` with margin
    ``max_{k≠y} z_k − z_y``, σ the standard deviation of r on the clean points (so λ has no
    unit), for each λ of ``lambdas`` in turn (default 0.1, 1, 10; ``0`` is the detector-blind
    margin attack), each on the points no earlier λ broke; same steps, step size and start as
    ``pgd``. A point is broken when some λ finds an iterate that is misclassified *and*
    accepted (every iterate is checked, not only the last); negatives are the misclassified x'
    (the breaking iterate where one exists, else the last λ's last iterate). AUROC over these
    is reported, but the attack targets the operating point: read ``fpr_at_tpr`` and
    ``robust_acc_reject``;
  - ``ood-noise``: uniform noise images (seeded), for every dataset;
  - ``ood-cifar10-grey`` (MNIST-scale runs): CIFAR-10 test images from ``--data-dir``,
    converted to grey (ITU-R 601 luma) and resized to 28×28; ``ood-mnist-rgb`` (CIFAR-scale
    runs): MNIST test digits as 3×32×32. Absent files skip that set with a message.

Attack rows also give ``robust_acc`` (no rejection) and ``robust_acc_reject``: the fraction of
points that are correct clean and that the attack cannot turn into an accepted
misclassification. Each set is one ``"kind": "rejection"`` row in ``RUN/eval/<key>.json`` with
a down-sampled ROC curve (``roc``: [fpr, tpr] pairs) for the report's plot.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import check_perturbation
from benchmark.config import stable_hash
from benchmark.data import Data, DataInfo, load_dataset
from benchmark.device import default_eval_batch_size
from benchmark.errors import DataError, UsageError
from benchmark.eval.target import check_model, open_target
from benchmark.run.protocols import AttackSpec, attack_specs

logger = logging.getLogger(__name__)
DEFAULT_LAMBDAS = (0.1, 1.0, 10.0)
#: OOD source per dataset scale: (set name, dataset name)
OOD_SOURCES = {"mnist": ("cifar10-grey", "cifar10"), "cifar": ("mnist-rgb", "mnist")}


# ------------------------------------------------------------------------------ metrics
def auroc(pos: Tensor | np.ndarray, neg: Tensor | np.ndarray) -> float:
    """P(r_neg > r_pos) + ½·P(r_neg = r_pos) from average ranks (Mann-Whitney U); NaN if a
    side is empty."""
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if not len(p) or not len(n):
        return math.nan
    from scipy.stats import rankdata
    ranks = rankdata(np.concatenate([p, n]))  # ties get their average rank
    return float((ranks[len(p):].sum() - len(n) * (len(n) + 1) / 2) / (len(p) * len(n)))


def threshold_at_tpr(pos: Tensor | np.ndarray, tpr: float = 0.95) -> float:
    """Smallest τ with at least ``tpr`` of the positives at r ≤ τ (accepted)."""
    p = np.sort(np.asarray(pos, dtype=np.float64))
    if not len(p):
        raise UsageError("no positive (clean) scores to set a threshold")
    return float(p[max(math.ceil(tpr * len(p) - 1e-9) - 1, 0)])  # 0.95·1000 = 950.0000000000001


def fpr_at(neg: Tensor | np.ndarray, tau: float) -> float:
    """Fraction of negatives accepted (r ≤ τ); NaN if there are none."""
    n = np.asarray(neg, dtype=np.float64)
    return float((n <= tau).mean()) if len(n) else math.nan


def roc_points(pos: Tensor | np.ndarray, neg: Tensor | np.ndarray, max_points: int = 101
               ) -> list[list[float]]:
    """ROC curve [fpr, tpr] (a point accepted when r ≤ t) at ≤ ``max_points`` thresholds."""
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if not len(p) or not len(n):
        return []
    t = np.unique(np.concatenate([p, n]))
    if len(t) > max_points - 1:
        t = np.quantile(t, np.linspace(0, 1, max_points - 1))
    t = np.concatenate([[-np.inf], t])  # start at (0, 0)
    return [[round(float((n <= v).mean()), 5), round(float((p <= v).mean()), 5)] for v in t]


# ------------------------------------------------------------------------------ OOD data
def _convert(x: Tensor, info: DataInfo) -> Tensor:
    """Float images N×C'×H'×W' in [0,1] → the run's channels and size."""
    if x.shape[1] == 3 and info.in_channels == 1:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    elif x.shape[1] == 1 and info.in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != info.image_size or x.shape[-2] != info.image_size:
        x = F.interpolate(x, size=(info.image_size, info.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
    return x.clamp(0, 1).contiguous()


def _folder_test_images(root: Path, n: int) -> Tensor:
    """The first n test images of an image folder, in a seeded shuffled order (float, [0,1])."""
    from benchmark.data import read_images
    files = sorted(f for d in sorted((root / "test").iterdir()) if d.is_dir()
                   for f in d.iterdir() if f.is_file())
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:n]
    arrs = read_images([files[i] for i in order.tolist()], root / "test")
    return torch.from_numpy(arrs).permute(0, 3, 1, 2).float().div(255)


def tensor_sha256(x: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (an OOD set as it is scored)."""
    import hashlib
    x = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


def ood_sets(info: DataInfo, n: int, data_dir: Optional[Path | str]
             ) -> tuple[dict[str, tuple[Tensor, str]], list[str]]:
    """{set name: (images in the run's shape, provenance)} and messages for skipped sets."""
    gen = torch.Generator().manual_seed(0)
    sets = {"noise": (torch.rand(n, info.in_channels, info.image_size, info.image_size,
                                 generator=gen), "uniform noise U(0,1), seed 0")}
    skipped = []
    name, source = OOD_SOURCES[info.scale]
    root = Path(data_dir).expanduser() if data_dir else None
    # only the folder the user named (--ood-data-dir, else --data-dir), never its parent: a
    # folder nobody named is not read (CIFAR batches are read without running code anyway)
    roots = [root] if root is not None else []
    errors = []
    for cand in roots:
        # a sub-folder named after the source only: the folder itself is the run's own data
        folder = next((cand / nm for nm in (source, f"{source}-jpeg")
                       if (cand / nm / "train").is_dir() and (cand / nm / "test").is_dir()), None)
        try:
            if folder is not None:
                x, prov = _folder_test_images(folder, n), f"{source} test images from {folder.name}"
            elif (cand / "train").is_dir() and (cand / "test").is_dir():
                raise DataError(f"{cand} is an image folder (the run's own data?), not a "
                                f"{source} root")
            else:
                data = load_dataset(source, cand)
                x, _ = data.test.subset(torch.arange(min(n, len(data.test)))).floats()
                prov = f"{source} test images ({data.info.provenance}) from {cand.name}"
        except (DataError, OSError) as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        sets[name] = (_convert(x, info), f"{prov}, converted to {info.in_channels}×"
                                         f"{info.image_size}×{info.image_size}")
        break
    else:
        msg = (f"OOD set {name} skipped: no {source} under the OOD data folder "
               f"({'; '.join(errors) or 'no --ood-data-dir or --data-dir given'})")
        logger.warning(msg)
        skipped.append(msg)
    return sets, skipped


# ------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_batches(defense: Any, model: nn.Module, x: Tensor, batch_size: int = 256
                  ) -> tuple[Tensor, Tensor]:
    """(scores, predictions) on the CPU for every row of x."""
    scores, preds = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        scores.append(defense.rejection_score(model, xb).float().cpu())
        preds.append(model(xb).argmax(1).cpu())
    return torch.cat(scores), torch.cat(preds)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{k≠y} z_k − z_y (positive when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(1)
    return other - true


def score_and_logits(defense: Any, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(r(x), logits) with one forward when the defense keeps the default max-softmax score."""
    from defenses.base import Defense
    logits = model(x)
    if type(defense).rejection_score is Defense.rejection_score:  # the default hook
        return 1.0 - torch.softmax(logits.float(), dim=1).amax(dim=1), logits
    return defense.rejection_score(model, x).float(), logits


class DetectorObjective:
    """``margin(x') − λ·max(0, r(x') − τ)/σ`` that also records, per sample, the first iterate
    that is misclassified and accepted (the attack's own loop calls it at every iterate)."""

    def __init__(self, defense: Any, tau: float, sigma: float, lam: float, x: Tensor) -> None:
        self.defense, self.tau, self.sigma, self.lam = defense, tau, max(sigma, 1e-12), lam
        self.hit = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.x_hit = x.clone()

    def __call__(self, model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
        r, logits = score_and_logits(self.defense, model, x_adv)
        m = margin(logits.float(), y)
        with torch.no_grad():
            new = (m > 0) & (r <= self.tau) & ~self.hit
            if len(new) == len(self.hit) and new.any():
                self.x_hit[new] = x_adv.detach()[new]
                self.hit |= new
        return m - self.lam * (r - self.tau).clamp_min(0) / self.sigma


def adaptive_attack(defense: Any, model: nn.Module, spec: AttackSpec, x: Tensor, y: Tensor,
                    tau: float, sigma: float, lambdas: Sequence[float], batch_size: int = 256
                    ) -> tuple[Tensor, Tensor, dict[str, int]]:
    """Per point (broken flags, chosen x'), and the points each λ broke first; each λ attacks
    only the points no earlier λ broke (see the module docstring)."""
    broken = torch.zeros(len(y), dtype=torch.bool)
    chosen = x.clone()
    per_lambda: dict[str, int] = {}
    for lam in lambdas:
        attack = spec.build(seed=0)
        todo = torch.nonzero(~broken).flatten()
        hits = 0
        for i in range(0, len(todo), batch_size):
            idx = todo[i:i + batch_size]
            xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
            obj = DetectorObjective(defense, tau, sigma, float(lam), xb)
            last = attack(model, xb, yb, loss=obj)
            with torch.no_grad():  # the returned (last) iterate counts too
                r, logits = score_and_logits(defense, model, last)
                ok = (margin(logits.float(), yb) > 0) & (r <= tau) & ~obj.hit
            obj.x_hit[ok] = last[ok]
            obj.hit |= ok
            # a broken point keeps its accepted misclassification, the others the last iterate
            chosen[idx.to(x.device)] = torch.where(obj.hit.view(-1, *[1] * (x.dim() - 1)),
                                                   obj.x_hit, last)
            broken[idx] = obj.hit.cpu()
            hits += int(obj.hit.sum())
        per_lambda[f"{lam:g}"] = hits
    check_perturbation(x, chosen, spec.build().threat)
    return broken, chosen, per_lambda


class ScoreOption:
    """A defense seen through one of its rejection scores (``defense.score_options``: option →
    score name), for defenses whose sources leave the score open (±ED-WTA)."""

    def __init__(self, defense: Any, option: str) -> None:
        self.defense, self.option = defense, option
        self.score_name = defense.score_options[option]

    def rejection_score(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.defense.rejection_score(model, x, self.option)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.defense, name)


# ------------------------------------------------------------------------------ driver
def _key(run_id: str, checkpoint: str, negatives: str, n: int, tpr: float,
         extra: dict[str, Any]) -> str:
    return stable_hash({"run_id": run_id, "checkpoint": checkpoint, "kind": "rejection",
                        "negatives": negatives, "n_examples": n, "tpr": tpr, **extra})


def evaluate_rejection(run_dir: Path | str, *, checkpoint: str = "best",
                       n_examples: Optional[int] = None, device: str = "cpu",
                       batch_size: Optional[int] = None, data: Optional[Data] = None,
                       data_dir: Optional[Path | str] = None, force: bool = False,
                       tpr: float = 0.95, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                       ood_data_dir: Optional[Path | str] = None) -> list[dict[str, Any]]:
    """Rejection rows of one run folder (see the module docstring); existing rows are reused.

    Args:
        run_dir: a trained run folder.
        checkpoint: ``best`` or ``last``.
        n_examples: first N test points (default: the profile's, 1000 on ``cpu``).
        device: where the model runs.
        batch_size: evaluation batch (default: sized for the device and arch).
        data: the run's dataset already in memory (else loaded from ``data_dir``).
        data_dir: where the run's dataset lives; also searched for the OOD source.
        force: recompute existing rows.
        tpr: fraction of clean points accepted by the threshold.
        lambdas: detector weights of the adaptive attack.
        ood_data_dir: where to look for the OOD source (default ``data_dir``).
    """
    from benchmark.store import atomic_write_json

    if not 0 < tpr < 1:
        raise UsageError(f"tpr must lie in (0, 1), got {tpr}")
    t = open_target(run_dir, checkpoint, device=device)
    model, defense, dev = t.model, t.defense, t.device
    batch_size = batch_size or default_eval_batch_size(dev, t.cfg.arch)
    data = t.test_data(data, data_dir)
    n_examples = t.n_points(n_examples)
    n = len(data.test) if n_examples is None else min(int(n_examples), len(data.test))
    x, y = data.test.subset(torch.arange(n)).floats(dev)
    check_model(model, x[:8], randomized=defense.randomized)
    spec = attack_specs(t.info.scale)["pgd"]
    lambdas = [float(v) for v in lambdas]

    sets, skipped = ood_sets(t.info, n, ood_data_dir or data_dir)
    rows: list[dict[str, Any]] = []
    options = list(getattr(defense, "score_options", None) or [None])
    pgd_adv: Optional[Tensor] = None  # PGD on CE does not depend on the score: run it once
    for rank, option in enumerate(options):
        # a defense with several rejection scores is evaluated with each; the first keeps
        # the plain keys, the others add their option to the key and are labelled in rows
        scored = defense if option is None else ScoreOption(defense, option)
        opt_key = {"score_option": option} if rank else {}
        opt_field = {} if option is None else {"score_option": option, "score_default": rank == 0}
        t0 = time.perf_counter()
        pos, pred = score_batches(scored, model, x, batch_size)
        tau = threshold_at_tpr(pos, tpr)
        sigma = float(pos.std()) if len(pos) > 1 else 1.0
        clean = pred == y.cpu()
        accepted = pos <= tau
        base = {"score": scored.score_name, **opt_field, "tpr_target": tpr, "tau": tau,
                "score_std_clean": sigma, "n_examples": n,
                "clean_acc": float(clean.float().mean()),
                "clean_accept_acc": float((clean & accepted).float().mean())}
        clean_s = time.perf_counter() - t0

        def emit(negatives: str, extra_key: dict[str, Any], neg: Tensor,
                 fields: dict[str, Any], wall: float, inputs: Optional[dict] = None) -> None:
            key = _key(t.cfg.run_id, t.checkpoint, negatives, n, tpr, {**extra_key, **opt_key})
            row = {**t.row(key, "rejection", inputs=inputs), **base, "negatives": negatives,
                   "n_negatives": int(len(neg)), "auroc": auroc(pos, neg), "fpr_at_tpr": fpr_at(neg, tau),
                   "roc": roc_points(pos, neg), **fields, "wall_s": round(wall + clean_s, 3)}
            atomic_write_json(t.out_dir / "eval" / f"{key}.json", row)
            rows.append(row)
            logger.info("%s seed %d rejection [%s] %s: AUROC %.4f FPR@%g%%TPR %.4f%s",
                        t.cfg.defense, t.cfg.seed, t.checkpoint, negatives, row["auroc"],
                        100 * tpr, row["fpr_at_tpr"],
                        f" robust+reject {row['robust_acc_reject']:.4f}"
                        if "robust_acc_reject" in row else "")

        def cached(negatives: str, extra_key: dict[str, Any], **inputs: str) -> bool:
            key = _key(t.cfg.run_id, t.checkpoint, negatives, n, tpr, {**extra_key, **opt_key})
            row = t.cached(t.out_dir / "eval" / f"{key}.json", force=force, **inputs)
            if row is not None and row.get("score") == base["score"]:  # an earlier score's
                rows.append(row)  # row is recomputed
                return True
            return False

        # PGD (the protocol's column), attacking the clean-correct points
        pgd_key = {"attack": spec.key()}
        if not cached("pgd", pgd_key):
            t1 = time.perf_counter()
            if pgd_adv is None:
                idx = torch.nonzero(clean).flatten()
                pgd_adv = x.clone()
                attack = spec.build(seed=0)
                for i in range(0, len(idx), batch_size):
                    b = idx[i:i + batch_size].to(dev)
                    pgd_adv[b] = attack(model, x[b], y[b])
            s_adv, p_adv = score_batches(scored, model, pgd_adv, batch_size)
            wrong = clean & (p_adv != y.cpu())
            emit("pgd", pgd_key, s_adv[wrong], {
                **spec.record(), "robust_acc": float((clean & ~wrong).float().mean()),
                "robust_acc_reject": float((clean & ~(wrong & (s_adv <= tau))).float().mean())},
                time.perf_counter() - t1)

        ad_key = {"attack": spec.key(), "lambdas": lambdas, "objective": "margin-detector"}
        if not cached("adaptive", ad_key):
            t1 = time.perf_counter()
            idx = torch.nonzero(clean).flatten()
            broken = torch.zeros(n, dtype=torch.bool)
            x_adv = x.clone()
            per_lambda: dict[str, int] = {f"{v:g}": 0 for v in lambdas}
            if len(idx):
                b_flags, chosen, per_lambda = adaptive_attack(
                    scored, model, spec, x[idx.to(dev)], y[idx.to(dev)], tau, sigma, lambdas,
                    batch_size)
                broken[idx] = b_flags
                x_adv[idx.to(dev)] = chosen
            s_adv, p_adv = score_batches(scored, model, x_adv, batch_size)
            wrong = clean & (p_adv != y.cpu())
            rec = spec.record()
            rec.update(attack="adaptive-detector", attack_name=f"{spec.attack}+detector")
            emit("adaptive", ad_key, s_adv[wrong], {
                **rec, "lambdas": lambdas, "broken_per_lambda": per_lambda,
                "robust_acc": float((clean & ~wrong).float().mean()),
                "robust_acc_reject": float((clean & ~broken).float().mean())},
                time.perf_counter() - t1)

        for name, (x_ood, prov) in sets.items():
            ood_sha = tensor_sha256(x_ood)  # the OOD set's content, not its name or folder
            if cached(f"ood-{name}", {"ood": name}, ood_set=ood_sha):
                continue
            t1 = time.perf_counter()
            s_ood, _ = score_batches(scored, model, x_ood.to(dev), batch_size)
            emit(f"ood-{name}", {"ood": name}, s_ood, {"ood_provenance": prov},
                 time.perf_counter() - t1, {"ood_set": ood_sha})
    return rows


def format_rejection(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown listing, one line per row."""
    lines = ["| defense | seed | negatives | n neg | AUROC | FPR@TPR | robust | robust+reject |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def pct(k: str) -> str:
            v = r.get(k)
            return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else \
                f"{100 * v:.2f}"
        lines.append(f"| {r['defense']} | {r['seed']} | {r['negatives']} | {r['n_negatives']} | "
                     f"{pct('auroc')} | {pct('fpr_at_tpr')} | {pct('robust_acc')} | "
                     f"{pct('robust_acc_reject')} |")
    return "\n".join(lines) + "\n"
