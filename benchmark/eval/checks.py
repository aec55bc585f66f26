"""Evaluation-reliability verdict per (run, ε): the standard gradient-masking checks.

Sources: Carlini et al. 2019, "On Evaluating Adversarial Robustness" (arXiv:1902.06705, §5 and
the checklist); Athalye, Carlini & Wagner 2018 (arXiv:1802.00420, §3); the Adv-DPNP paper's
§4.5 (Tables 6/7); AutoAttack's own checks (Croce & Hein 2020, ``pyautoattack/checks.py``).
Each check is a row ``RUN/eval/check-<key>.json`` with ``"kind": "check"``, its ``name``,
``value``, ``threshold``, ``status`` (pass | fail | skipped) and a sentence (``detail``).

=====  ======================  ==============================================  =============
check  name                    value                                           fails when
=====  ======================  ==============================================  =============
(a)    ``aa-vs-pgd``           share of the points PGD left robust that        > 0.20
                               AutoAttack breaks (per sample)
(b)    ``eps-monotone``        largest rise of PGD accuracy from one ε of      > 0.01
                               the Figure 4 grid to the next
(c)    ``unbounded-eps``       PGD accuracy at ε = 1 (MNIST) / 0.5 (CIFAR)     > 0.02
(d)    ``square`` and          share of the points PGD left robust that the    > 0.10
       ``transfer``            black-box attack breaks (per sample)
(e)    ``more-budget``         largest accuracy drop from the table's PGD to   > 0.05
                               more iterations (Table 6), and from 1 to more
                               restarts (Table 7)
(f)    ``zero-gradient``       share of correctly classified points whose CE   > 0.05
                               input gradient is all zero or not finite
(g)    ``fgsm-vs-pgd``         share of the points PGD left robust that FGSM   > 0.05
                               breaks (per sample)
=====  ======================  ==============================================  =============

Thresholds (:data:`THRESHOLDS`) are documented judgement calls. (a): published sound models
lose 5-10% of their PGD-robust points to AutoAttack (Madry's MNIST model 89→88, CIFAR
PGD-20 ~47-50→44; TRADES 56.6→53.1), a masked one most of them. (d), (g): a black-box or
one-step attack should find almost nothing PGD missed. (b): the grid is attacked on the same
points with the same seeded attack; a rise beyond one point is not noise. (c): with ε
covering the whole box every input can be turned into any image. (e): Table 6/7 of a sound
model move by a point or two. (f): a zero gradient stops PGD on CE where it starts.

Same points: every per-sample comparison uses the first N test points, where N is the number of
points of the run's AutoAttack row at that ε (the most points when there are several), or
``--n-examples``, or :data:`DEFAULT_CHECK_N` for the profile when no AutoAttack row exists.
Existing attack rows of the run with their per-sample flags (``flags/<eval_key>.pt``,
at least N points) are reused, sliced to the first N; anything missing is computed on those
points and its flags stored under the same key as ``advbench evaluate`` would (no attack row is
written, so tables do not change). Which rows were reused is recorded in ``reused``.

Cheap subset (``advbench run``): (a) and (e) only from existing rows, (b), (c), (f), (g);
never AutoAttack, Square or the transfer source.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import stable_hash
from benchmark.run.resolve import helper_config
from benchmark.run.protocols import SUITE_EPS, AttackSpec, attack_specs, format_eps
from benchmark.store import atomic_torch_save, atomic_write_json, code_version, now, read_json, \
    safe_torch_load

logger = logging.getLogger(__name__)

#: check name → (letter, threshold); the check fails when its value exceeds the threshold
THRESHOLDS: dict[str, tuple[str, float]] = {
    "aa-vs-pgd": ("a", 0.20), "eps-monotone": ("b", 0.01), "unbounded-eps": ("c", 0.02),
    "square": ("d", 0.10), "transfer": ("d", 0.10), "more-budget": ("e", 0.05),
    "zero-gradient": ("f", 0.05), "fgsm-vs-pgd": ("g", 0.05)}
CHECKS = tuple(THRESHOLDS)
CHEAP = ("aa-vs-pgd", "eps-monotone", "unbounded-eps", "more-budget", "zero-gradient",
         "fgsm-vs-pgd")
#: ε that covers the whole [0,1] box for the scale's images (l∞)
UNBOUNDED_EPS = {"mnist": 1.0, "cifar": 0.5}
#: test points of the checks when the run has no AutoAttack row (cpu: AutoAttack's cpu cap)
DEFAULT_CHECK_N = {"cpu": 100, "paper": 1000}
#: Square's queries per point in the check (AutoAttack's 5000 on GPUs; fewer on 2 CPU cores)
SQUARE_QUERIES = {"cpu": 1000, "paper": 5000}
#: Table 6/7 budgets computed when the run has no such rows (more when rows exist)
MORE_STEPS, MORE_RESTARTS = 100, 5
SOURCE_DEFENSE = "st"


@dataclass
class CheckResult:
    """One check at one ε: ``passed`` is None when it was skipped (``detail`` says why)."""

    name: str
    value: Optional[float]
    passed: Optional[bool]
    detail: str
    n_points: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def letter(self) -> str:
        return THRESHOLDS[self.name][0]

    @property
    def threshold(self) -> float:
        return THRESHOLDS[self.name][1]

    @property
    def status(self) -> str:
        return "skipped" if self.passed is None else "pass" if self.passed else "fail"


#: tolerance of the threshold comparison: accuracies are float32 means, so a drop of exactly
#: 5 of 100 points can come out as 0.05000001 (measured on a real MART run: 72% → 67%)
JUDGE_TOL = 1e-6


def _judge(name: str, value: float, detail: str, n: int, **extra: Any) -> CheckResult:
    """Pass when ``value`` does not exceed the threshold (up to :data:`JUDGE_TOL`)."""
    return CheckResult(name, float(value), bool(value <= THRESHOLDS[name][1] + JUDGE_TOL),
                       detail, n, extra)


def skipped(name: str, why: str) -> CheckResult:
    return CheckResult(name, None, None, why)


# ------------------------------------------------------------------- the checks (pure)
def broken_beyond(ref: Tensor, other: Tensor) -> tuple[int, int]:
    """(points robust under ``ref`` that ``other`` breaks, points robust under ``ref``)."""
    return int((ref & ~other).sum()), int(ref.sum())


def per_sample_gap(name: str, ref: Tensor, other: Tensor, what: str) -> CheckResult:
    """Checks (a), (d), (g): share of PGD-robust points that ``other`` breaks."""
    k, m = broken_beyond(ref, other)
    value = k / m if m else 0.0
    return _judge(name, value, f"{what} breaks {k} of the {m} points PGD left robust "
                               f"(PGD {100 * ref.float().mean():.1f}%, {what} "
                               f"{100 * other.float().mean():.1f}% on {len(ref)} points)",
                  len(ref), broken=k, pgd_robust=m, pgd_acc=float(ref.float().mean()),
                  other_acc=float(other.float().mean()))


def eps_monotone(grid: Sequence[tuple[float, float]], n: int) -> CheckResult:
    """Check (b): largest rise of accuracy between consecutive ε of the grid."""
    grid = sorted(grid)
    rises = [(b[1] - a[1], a[0], b[0]) for a, b in zip(grid, grid[1:])]
    rise, lo, hi = max(rises) if rises else (0.0, math.nan, math.nan)
    curve = ", ".join(f"{format_eps(e)}: {100 * a:.1f}" for e, a in grid)
    detail = (f"accuracy rises by {100 * rise:.1f} points from ε={format_eps(lo)} to "
              f"ε={format_eps(hi)}" if rise > 0 else "accuracy never rises with ε") + \
        f" (PGD, Figure 4 grid, %: {curve})"
    return _judge("eps-monotone", max(rise, 0.0), detail, n, curve={format_eps(e): a
                                                                    for e, a in grid})


def unbounded(acc: float, eps: float, n: int) -> CheckResult:
    """Check (c): PGD accuracy at an ε covering the whole box."""
    return _judge("unbounded-eps", acc, f"PGD at ε={format_eps(eps)} leaves "
                                        f"{100 * acc:.1f}% accuracy", n, unbounded_eps=eps)


def more_budget(pairs: Sequence[tuple[str, float, str, float]], n: int) -> CheckResult:
    """Check (e): ``pairs`` of (base label, accuracy, stronger label, accuracy)."""
    drops = [(a - b, la, lb, a, b) for la, a, lb, b in pairs]
    drop, la, lb, a, b = max(drops)
    parts = "; ".join(f"{x} {100 * p:.1f}% → {y} {100 * q:.1f}%" for _, x, y, p, q in drops)
    return _judge("more-budget", max(drop, 0.0), f"largest drop {100 * drop:.1f} points "
                                                 f"({parts})", n,
                  pairs=[list(p) for p in pairs])


def zero_gradient(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor,
                  batch_size: int = 256) -> CheckResult:
    """Check (f): share of correctly classified points whose CE input gradient is all zero
    or has a non-finite entry (model in eval mode, as the attacks see it)."""
    bad = torch.zeros(len(y), dtype=torch.bool)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].clone().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(xb).float(), y[i:i + batch_size], reduction="sum")
                (g,) = torch.autograd.grad(loss, xb, allow_unused=True)
            if g is None:
                bad[i:i + batch_size] = True
                continue
            g = g.flatten(1)
            bad[i:i + batch_size] = ((g == 0).all(1) | ~torch.isfinite(g).all(1)).cpu()
    finally:
        for m, flag in was:
            m.training = flag
    m = int(clean.sum())
    k = int((bad & clean).sum())
    return _judge("zero-gradient", k / m if m else 0.0,
                  f"{k} of {m} correctly classified points have an all-zero or non-finite "
                  f"CE input gradient", len(y), zero_or_nonfinite=k, correct=m)


# ------------------------------------------------------------------- the driver
FlagSource = Callable[[AttackSpec], Tensor]


@dataclass
class Checker:
    """Runs the checks for one model on fixed points.

    Args:
        model: the target in eval mode.
        x, y: the check's points (the first N test points).
        scale: ``mnist`` or ``cifar`` (attack protocols, the Figure 4 grid, unbounded ε).
        profile: ``cpu`` or ``paper`` (Square's budget).
        flags: robust flags of a spec on these points; default: attack in memory.
        overrides: attack name → hyperparameters replacing the spec's (tests, quick checks).
        randomized: the defense is randomized (AutoAttack's ``rand`` version).
        transfer_source: run folder / checkpoint / model of the transfer source (None: skip).
        existing: whether a spec's flags are already stored (the cheap subset uses only those).
        batch_size: attack batch.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    scale: str
    profile: str = "cpu"
    flags: Optional[FlagSource] = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    randomized: bool = False
    transfer_source: Any = None
    existing: Callable[[AttackSpec], bool] = lambda spec: False
    batch_size: int = 256

    def __post_init__(self) -> None:
        from benchmark.eval.flags import predict
        self.clean = predict(self.model, self.x, self.y, self.batch_size)[0]
        self._cache: dict[str, Tensor] = {}

    def spec(self, label: str, eps: float, attack: Optional[str] = None, **hp: Any) -> AttackSpec:
        specs = attack_specs(self.scale)
        base = specs.get(label) or AttackSpec(label, attack or label, "linf", eps)
        spec = base.with_eps(eps).with_hparams(**hp)
        from benchmark.eval.flags import adapt_spec
        spec = adapt_spec(spec, self.randomized)
        return spec.with_hparams(**self.overrides.get(spec.attack, {}))

    def robust(self, spec: AttackSpec) -> Tensor:
        self.__dict__.setdefault("used", []).append(f"{spec.label}@{format_eps(spec.eps)}")
        key = stable_hash(spec.key())
        if key not in self._cache:
            if self.flags is not None:
                self._cache[key] = self.flags(spec)
            else:
                from benchmark.eval.flags import attack_points
                source = self.transfer_source if spec.attack == "transfer" else None
                atk = spec.build(seed=0)
                if isinstance(source, nn.Module):
                    atk.source_model = source
                self._cache[key] = attack_points(self.model, atk, self.x, self.y,
                                                 clean=self.clean, clean_ce=torch.zeros(len(
                                                     self.y)), batch_size=self.batch_size)[0]
        return self._cache[key]

    def acc(self, spec: AttackSpec) -> float:
        return float(self.robust(spec).float().mean())

    def run(self, eps: float, names: Sequence[str] = CHECKS, *,
            cheap: bool = False) -> list[CheckResult]:
        """The checks ``names`` at ``eps``; with ``cheap`` the expensive ones are skipped
        unless their inputs already exist."""
        n = len(self.y)
        out = []
        pgd = self.spec("pgd", eps)
        for name in names:
            if name == "aa-vs-pgd":
                aa = self.spec("autoattack", eps)
                if cheap and not self.existing(aa):
                    out.append(skipped(name, "no AutoAttack row at this ε (run advbench check)"))
                    continue
                out.append(per_sample_gap(name, self.robust(pgd), self.robust(aa), "AutoAttack"))
            elif name == "eps-monotone":
                grid = SUITE_EPS["fig4"][self.scale]
                out.append(eps_monotone([(e, self.acc(self.spec("pgd-fig4", e))) for e in grid],
                                        n))
            elif name == "unbounded-eps":
                e = UNBOUNDED_EPS[self.scale]
                out.append(unbounded(self.acc(self.spec("pgd-fig4", e)), e, n))
            elif name == "square":
                if cheap:
                    out.append(skipped(name, "not in the cheap subset (advbench check)"))
                    continue
                sq = self.spec("square", eps, n_queries=SQUARE_QUERIES.get(self.profile, 5000))
                out.append(per_sample_gap(name, self.robust(pgd), self.robust(sq), "Square"))
            elif name == "transfer":
                if cheap or self.transfer_source is None:
                    out.append(skipped(name, "no transfer source (train the `st` run of this "
                                             "protocol, or give --source)" if not cheap else
                                       "not in the cheap subset (advbench check)"))
                    continue
                src = self.transfer_source
                tr = self.spec("transfer", eps, **({"source": str(src)} if isinstance(
                    src, (str, Path)) else {}))
                out.append(per_sample_gap(name, self.robust(pgd), self.robust(tr),
                                          "the transfer attack"))
            elif name == "more-budget":
                pairs = []
                for base_label, fmt, default in (("pgd", "pgd-k{}", MORE_STEPS),
                                                 ("pgd-r1", "pgd-r{}", MORE_RESTARTS)):
                    strong = self._strongest(fmt, eps, None if cheap else default)
                    if strong is None:
                        continue
                    pairs.append((base_label, self.acc(self.spec(base_label, eps)),
                                  strong.label, self.acc(strong)))
                out.append(more_budget(pairs, n) if pairs else
                           skipped(name, "no Table 6/7 rows at this ε (run advbench check)"))
            elif name == "zero-gradient":
                out.append(zero_gradient(self.model, self.x, self.y, self.clean,
                                         self.batch_size))
            elif name == "fgsm-vs-pgd":
                out.append(per_sample_gap(name, self.robust(pgd),
                                          self.robust(self.spec("fgsm", eps)), "FGSM"))
        return out

    def _strongest(self, fmt: str, eps: float, default: Optional[int]) -> Optional[AttackSpec]:
        """The largest Table 6/7 budget with an existing row, else ``default`` (None: none)."""
        from benchmark.run.protocols import TABLE6_STEPS, TABLE7_RESTARTS
        base = int(attack_specs(self.scale)["pgd"].hparams["steps"]) if "k" in fmt else 1
        values = [v for v in (TABLE6_STEPS if "k" in fmt else TABLE7_RESTARTS) if v > base]
        have = [v for v in values if self.existing(self._dyn(fmt.format(v), eps))]
        if not have and default is None:
            return None
        return self._dyn(fmt.format(max(have) if have else default), eps)

    def _dyn(self, label: str, eps: float) -> AttackSpec:
        from benchmark.run.protocols import resolve_specs
        spec = resolve_specs(label, self.scale)[0].with_eps(eps)
        return spec.with_hparams(**self.overrides.get(spec.attack, {}))


# ------------------------------------------------------------------- run folders
def _matches(row: Mapping[str, Any], spec: AttackSpec, checkpoint: str) -> bool:
    if row.get("kind", "attack") != "attack" or row.get("checkpoint") != checkpoint:
        return False
    if row.get("attack") != spec.label or row.get("attack_name", row.get("attack")) != \
            spec.attack or row.get("norm") != spec.norm:
        return False
    if not np.isclose(float(row.get("eps", -1)), spec.eps, rtol=1e-6, atol=1e-9):
        return False
    hp = row.get("attack_hparams") or {}
    return all(hp.get(k) == v for k, v in spec.hparams.items() if k != "members")


class RunFlags:
    """Per-sample flags of a run folder on its first ``n`` test points: existing attack rows'
    flags (sliced), else an earlier check's, else computed and stored under the evaluate key."""

    def __init__(self, target: Any, rows: Sequence[Mapping[str, Any]], n: int,
                 data: Callable[[], tuple[Tensor, Tensor]], clean: Callable[[], Tensor],
                 batch_size: int, transfer_model: Callable[[], Optional[nn.Module]]) -> None:
        self.t, self.rows, self.n = target, rows, n
        self._data, self._clean, self.batch_size = data, clean, batch_size
        self._transfer_model = transfer_model
        self.reused: list[str] = []
        self.computed: list[str] = []

    def _flag_file(self, spec: AttackSpec) -> Optional[tuple[Path, str]]:
        from benchmark.eval.flags import eval_key
        best = None
        for row in self.rows:
            if _matches(row, spec, self.t.checkpoint) and int(row.get("n_examples", 0)) >= \
                    self.n:
                path = self.t.out_dir / "flags" / f"{row.get('eval_key')}.pt"
                if path.exists() and (best is None or row["n_examples"] < best[2]):
                    best = (path, f"row {row.get('eval_key')}", int(row["n_examples"]))
        if best is not None:
            return best[0], best[1]
        own = self.t.out_dir / "flags" / f"{eval_key(self.t.cfg.run_id, self.t.checkpoint, spec, self.n)}.pt"
        return (own, "flags of an earlier check") if own.exists() else None

    def exists(self, spec: AttackSpec) -> bool:
        return self._flag_file(spec) is not None

    def __call__(self, spec: AttackSpec) -> Tensor:
        from benchmark.eval.flags import attack_points, eval_key, predict
        label = f"{spec.label}@{format_eps(spec.eps)}"
        found = self._flag_file(spec)
        if found is not None:
            saved = safe_torch_load(found[0])
            if len(saved["robust"]) >= self.n and torch.equal(saved["clean"][:self.n],
                                                              self._clean()):
                self.reused.append(f"{label} ({found[1]})")
                return saved["robust"][:self.n]
        x, y = self._data()
        clean = self._clean()
        atk = spec.build(seed=0)
        if spec.attack == "transfer" and self._transfer_model() is not None:
            atk.source_model = self._transfer_model()
        ce = predict(self.t.model, x, y, self.batch_size)[1]
        robust, adv_ce = attack_points(self.t.model, atk, x, y, clean=clean, clean_ce=ce,
                                       batch_size=self.batch_size)
        key = eval_key(self.t.cfg.run_id, self.t.checkpoint, spec, self.n)
        from benchmark.eval.worstcase import flags_payload
        atomic_torch_save(self.t.out_dir / "flags" / f"{key}.pt", flags_payload(
            clean, robust, adv_ce, spec.record(), self.t.checkpoint))
        self.computed.append(label)
        return robust


def transfer_source(run_dir: Path, cfg: Any, scale: Optional[str] = None
                    ) -> tuple[Optional[Path], str]:
    """The default transfer source of a run: the ``st`` run of its protocol, if trained.
    ``scale`` (the run's data scale) is needed for image-folder datasets such as
    ``cifar10-jpeg``, whose name alone does not tell it."""
    if cfg.defense == SOURCE_DEFENSE:
        return None, "the target is itself the `st` source run"
    from benchmark.store import RunStore
    src_cfg = helper_config(SOURCE_DEFENSE, cfg, scale)
    path = RunStore(run_dir.parent.parent.parent).run_dir(src_cfg)
    if not (path / "ckpt_best.pt").exists() and not (path / "ckpt_last.pt").exists():
        return None, f"no trained `st` run of this protocol at {path}"
    return path, str(path)


def check_run(run_dir: Path | str, *, eps: Optional[Sequence[float]] = None,
              n_examples: Optional[int] = None, names: Sequence[str] = CHECKS,
              cheap: bool = False, checkpoint: str = "best", device: str = "cpu",
              batch_size: Optional[int] = None, data: Any = None,
              data_dir: Optional[Path] = None,
              source: Optional[Path | str] = None) -> list[dict[str, Any]]:
    """Write the health row and the check rows of one run folder; return them.

    Args:
        run_dir: the run folder.
        eps: ε values to check (default: the run's nominal ε, ``hparams.eps``).
        n_examples: the check's points (default: AutoAttack's row's, else the profile's).
        names: which checks (see :data:`CHECKS`).
        cheap: the subset ``advbench run`` uses (nothing expensive that is not stored).
        source: transfer source (run folder or checkpoint file; default the ``st`` run).
    """
    import time

    from benchmark.device import default_eval_batch_size, resolve_device
    from benchmark.eval.flags import adapt_spec, predict
    from benchmark.eval.target import check_model, open_target
    from benchmark.run.health import write_health

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    out: list[dict[str, Any]] = []
    health = run_dir / "eval" / "health.json"
    if (run_dir / "config.json").exists():
        out.append(read_json(health) if cheap and health.exists() else write_health(run_dir))
    if not names:  # the health verdict only (works for a run without a checkpoint yet)
        return out
    t = open_target(run_dir, checkpoint, device=dev)
    batch_size = batch_size or default_eval_batch_size(dev, t.cfg.arch)
    rows = _rows_of(run_dir)
    if not cheap:
        backfill_prefixes(run_dir, rows)
    scale = t.info.scale
    eps_list = list(eps) if eps else [float(t.cfg.hparams["eps"])]
    if source is not None:
        src_path, src_note = Path(source), str(source)
    else:
        src_path, src_note = transfer_source(run_dir, t.cfg, scale)
    cache: dict[str, Any] = {}

    def test_points() -> tuple[Tensor, Tensor]:
        if "xy" not in cache:
            cache["xy"] = t.test_data(data, data_dir).test.floats(dev)
            check_model(t.model, cache["xy"][0][:8], randomized=t.defense.randomized)
        return cache["xy"]

    def source_model() -> Optional[nn.Module]:
        if src_path is None:
            return None
        if "src" not in cache:
            from benchmark.checkpoint import read_checkpoint, resolve_checkpoint
            from benchmark.run.resolve import model_from_checkpoint
            ck = resolve_checkpoint(src_path, "best") if src_path.is_dir() else src_path
            cache["src"] = model_from_checkpoint(read_checkpoint(ck))[0].to(dev).eval()
        return cache["src"]

    for e in eps_list:
        t0 = time.perf_counter()
        todo = list(names)
        if cheap:  # `advbench run`: a verdict once written is reused, like attack rows
            done = {c: t.out_dir / "eval" / f"{_check_key(t, c, e)}.json" for c in names}
            out += [read_json(p) for p in done.values() if p.exists()]
            todo = [c for c in names if not done[c].exists()]
            if not todo:
                continue
        aa_spec = adapt_spec(attack_specs(scale)["autoattack"].with_eps(e), t.defense.randomized)
        aa_rows = [r for r in rows if _matches(r, aa_spec, t.checkpoint) and
                   (t.out_dir / "flags" / f"{r.get('eval_key')}.pt").exists()]
        n_aa = max((int(r["n_examples"]) for r in aa_rows), default=None)
        n = n_examples or n_aa or DEFAULT_CHECK_N.get(t.cfg.profile, 1000)

        def points(n: int = n) -> tuple[Tensor, Tensor]:
            xa, ya = test_points()
            return xa[:n], ya[:n]

        def clean_flags(n: int = n) -> Tensor:
            k = f"clean{n}"
            if k not in cache:
                xa, ya = points(n)
                cache[k] = predict(t.model, xa, ya, batch_size)[0]
            return cache[k]

        flags = RunFlags(t, rows, n, points, clean_flags, batch_size, source_model)
        checker = _LazyChecker(t.model, points, clean_flags, scale, t.cfg.profile, flags,
                               t.defense.randomized, src_path, batch_size)
        for name in todo:
            t0, checker.used = time.perf_counter(), []
            (res,) = checker.run(e, [name], cheap=cheap)
            res.extra["attacks_used"] = sorted(set(checker.used))
            wall = time.perf_counter() - t0
            n_pts = min(n, len(test_points()[1])) if cache.get("xy") is not None else n
            row = _check_row(t, res, e, n_pts, n_aa, flags, wall, src_note)
            path = t.out_dir / "eval" / f"{row['eval_key']}.json"
            if res.passed is None and path.exists():
                old = read_json(path)
                if old.get("status") in ("pass", "fail"):
                    out.append(old)
                    continue
            atomic_write_json(path, row)
            out.append(row)
    from benchmark.eval.worstcase import write_headlines
    write_headlines(t.out_dir, t.checkpoint, base=t.row("", "headline"))  # checks' flags too
    return out


def backfill_prefixes(run_dir: Path, rows: Sequence[dict[str, Any]]) -> int:
    """Add ``acc_on_first`` (accuracies on test-order prefixes, for same-point tables) to
    attack rows written before it existed, from their stored flags; return how many."""
    from benchmark.eval.flags import prefix_stats
    done = 0
    for row in rows:
        flags = run_dir / "flags" / f"{row.get('eval_key')}.pt"
        if row.get("kind", "attack") != "attack" or "acc_on_first" in row or not flags.exists():
            continue
        saved = safe_torch_load(flags)
        adv_ce = saved.get("adv_ce", torch.full((len(saved["robust"]),), math.nan))
        row["acc_on_first"] = prefix_stats(saved["clean"], saved["robust"], adv_ce)
        atomic_write_json(run_dir / "eval" / f"{row['eval_key']}.json", row)
        done += 1
    return done


def _rows_of(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted((run_dir / "eval").glob("*.json")):
        try:
            rows.append(read_json(f))
        except Exception:  # an unreadable row is skipped (RunStore.rows warns about it)
            continue
    return rows


class _LazyChecker(Checker):
    """A :class:`Checker` whose points load only when an attack must run."""

    def __init__(self, model: nn.Module, points: Callable, clean: Callable, scale: str,
                 profile: str, flags: RunFlags, randomized: bool, source: Any,
                 batch_size: int) -> None:
        self.model, self._points, self._clean_fn = model, points, clean
        self.scale, self.profile, self.flags, self.randomized = scale, profile, flags, randomized
        self.overrides, self.transfer_source, self.batch_size = {}, source, batch_size
        self.existing = flags.exists
        self._cache = {}

    @property
    def x(self) -> Tensor:  # type: ignore[override]
        return self._points()[0]

    @property
    def y(self) -> Tensor:  # type: ignore[override]
        return self._points()[1]

    @property
    def clean(self) -> Tensor:  # type: ignore[override]
        return self._clean_fn()


def _check_key(t: Any, name: str, eps: float) -> str:
    """One verdict per (run, checkpoint, check, ε): a recheck replaces it."""
    return "check-" + stable_hash({"run_id": t.cfg.run_id, "checkpoint": t.checkpoint,
                                   "check": name, "eps": eps})


def _check_row(t: Any, res: CheckResult, eps: float, n: int, n_aa: Optional[int],
               flags: RunFlags, wall: float, source: str) -> dict[str, Any]:
    cfg = t.cfg
    key = _check_key(t, res.name, eps)
    used = set(res.extra.get("attacks_used", ()))
    return {"schema": 1, "kind": "check", "eval_key": key, "check": res.name,
            "letter": res.letter, "value": res.value, "threshold": res.threshold,
            "status": res.status, "passed": res.passed, "detail": res.detail,
            "run_id": cfg.run_id, "defense": cfg.defense, "dataset": cfg.dataset,
            "data_provenance": t.info.provenance, "arch": cfg.arch, "profile": cfg.profile,
            "seed": cfg.seed, "checkpoint": t.checkpoint, "checkpoint_epoch": t.epoch,
            "hparams": cfg.hparams, "norm": "linf", "eps": eps, "eps_str": format_eps(eps),
            "n_examples": n, "points": f"first {n} test points",
            "autoattack_points": n_aa,
            "reused": [u for u in flags.reused if u.split(" (")[0] in used],
            "computed": [c for c in flags.computed if c in used], "transfer_source": source if
            res.name == "transfer" else None, **res.extra, "wall_s": round(wall, 3),
            "git": t.config.get("git") or code_version(), "eval_git": code_version(),
            "created": now()}


def format_checks(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown listing: one line per health or check row."""
    lines = ["| defense | seed | ckpt | ε | check | status | value | threshold | points | detail |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "health":
            lines.append(f"| {r['defense']} | {r['seed']} | – | – | health | {r['verdict']} | "
                         f"– | – | – | {'; '.join(r['reasons']) or 'trained normally'} |")
            continue
        value = "–" if r.get("value") is None else f"{r['value']:.3f}"
        lines.append(f"| {r['defense']} | {r['seed']} | {r['checkpoint']} | {r['eps_str']} | "
                     f"({r['letter']}) {r['check']} | {r['status']} | {value} | "
                     f"{r['threshold']:g} | {r['n_examples']} | {r['detail']} |")
    return "\n".join(lines) + "\n"
