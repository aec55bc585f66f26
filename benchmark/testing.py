"""Public test kit: checks every defense and attack must pass (plugin authors call these too).

Example (in a plugin's own tests)::

    from benchmark.testing import check_defense
    def test_my_defense():
        check_defense(MyDefense)
"""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from attacks.base import Attack, Norm, ThreatModel, lp_norms
from benchmark.config import merge_hparams, optional_defaults, profile_defaults
from benchmark.data import DataInfo

TINY_INFO = DataInfo("synthetic", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, "cifar", crop_pad=1)
MNIST_INFO = DataInfo("mnist-like", 10, 1, 28, (0.1307,), (0.3081,), "mnist", flip=False)


@dataclasses.dataclass
class CliResult:
    """Exit status, stdout and stderr of one in-process ``advbench`` call (:func:`run_cli`)."""

    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        """The non-blank lines of stderr."""
        return [ln for ln in self.err.splitlines() if ln.strip()]


def run_cli(*args: str) -> CliResult:
    """``advbench -q ARGS`` in this process (no interpreter start-up): its exit status (as
    ``sys.exit`` would give it) and what it printed."""
    import contextlib
    import io

    from benchmark.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["-q", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def make_defense(cls: type, *, info: DataInfo = TINY_INFO,
                 hparams: Optional[Mapping[str, Any]] = None) -> Any:
    """Instantiate a defense with the cpu profile's protocol values (+ overrides)."""
    base = profile_defaults("cpu", info.scale, info.name)
    base.update({"train_attack_steps": 2, "train_step_size": 2 / 255})
    hp = merge_hparams(base, cls.default_hparams, user=hparams,
                       optional=optional_defaults(cls))
    return cls(hp, threat=ThreatModel(Norm.LINF, float(hp["eps"])), num_classes=info.num_classes)


def check_defense(cls: type, *, archs: Iterable[str] = ("tiny",), info: DataInfo = TINY_INFO,
                  hparams: Optional[Mapping[str, Any]] = None,
                  helpers: Optional[Mapping[str, nn.Module]] = None, batch: int = 8) -> None:
    """Assert the Defense contract on each architecture.

    Checks: the model maps [0,1] inputs to N×K logits; ``features`` gives N×d; the training step
    returns a finite scalar loss with grad and never steps the optimizer itself; two optimizer
    steps run and change the weights; the model's train flag survives the step (the attack
    restores modes); eval forward is deterministic (unless ``randomized``); the model state
    round-trips through ``state_dict``, and so does the defense's: a fresh defense that loads
    the trained one's ``state_dict()`` must give back an equal ``state_dict()``.
    """
    torch.manual_seed(0)
    for arch in archs:
        defense = make_defense(cls, info=info, hparams=hparams)
        model = defense.build_model(arch, info)
        if cls.requires:
            defense.setup(helpers or {r: defense.build_model(arch, info).eval()
                                      for r in cls.requires})
        x = torch.rand(batch, info.in_channels, info.image_size, info.image_size)
        y = torch.arange(batch) % info.num_classes
        model.eval()
        with torch.no_grad():
            logits, feats = model(x), model.features(x)
            assert logits.shape == (batch, info.num_classes), f"{arch}: logits {logits.shape}"
            assert feats.dim() == 2 and feats.shape[0] == batch, f"{arch}: features {feats.shape}"
            if not cls.randomized:
                assert torch.equal(model(x), logits), f"{arch}: eval forward not deterministic"
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        before = copy.deepcopy(model.state_dict())
        for step in range(2):
            model.train()
            defense.on_epoch_start(model, 0)
            out = defense.training_step(model, x, y, epoch=0, step=step)
            assert model.training, f"{cls.name}: training_step left the model in eval mode"
            assert out.loss.dim() == 0 and torch.isfinite(out.loss), f"{arch}: loss {out.loss}"
            assert out.loss.requires_grad, f"{cls.name}: loss has no graph"
            if step == 0:
                assert all(p.grad is None for p in model.parameters()), \
                    f"{cls.name}: training_step must not call backward()"
            for k, v in out.metrics.items():
                assert torch.as_tensor(v).numel() == 1, f"metric {k} is not a scalar"
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        after = model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"
        clone = defense.build_model(arch, info)
        clone.load_state_dict(after)
        clone.eval(), model.eval()
        with torch.no_grad():  # same seed for both: a randomized defense draws the same noise
            assert torch.allclose(seeded(lambda: clone(x)), seeded(lambda: model(x))), \
                f"{arch}: state_dict does not round-trip"
        state = defense.state_dict()
        other = make_defense(cls, info=info, hparams=hparams)
        other.load_state_dict(copy.deepcopy(state))
        assert_same_state(other.state_dict(), state, f"{cls.name}.state_dict()")
        obj = defense.objective()(model, x, x, y)
        assert obj.shape == (batch,), f"{cls.name}: objective must be per-sample, got {obj.shape}"


def seeded(fn: Callable[[], Any], seed: int = 1234) -> Any:
    """``fn()`` with torch's CPU generator (and numpy's and python's) seeded to ``seed``; the
    generators' states are restored afterwards."""
    py, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            return fn()
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def assert_same_state(got: Any, want: Any, where: str = "state") -> None:
    """Assert two state values are equal: same keys, same tensors (dtype, shape, values),
    equal plain values, recursively through dicts, lists and tuples."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: expected a tensor, got {type(got)}"
        assert got.dtype == want.dtype and got.shape == want.shape, \
            f"{where}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
        assert torch.equal(got.cpu(), want.cpu()), f"{where}: values differ after load_state_dict"
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping) and set(got) == set(want), \
            f"{where}: keys {sorted(got) if isinstance(got, Mapping) else got} != {sorted(want)}"
        for k in want:
            assert_same_state(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), \
            f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_state(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r} after load_state_dict"


def check_attack(cls: type, *, norms: Optional[Iterable[Norm]] = None, eps: float = 8 / 255,
                 hparams: Optional[Mapping[str, Any]] = None, model: Optional[nn.Module] = None,
                 batch: int = 6) -> None:
    """Assert the Attack contract: shape kept, x' in [0,1] and in the ball, mode restored,
    seeded runs deterministic."""
    torch.manual_seed(0)
    if model is None:
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(batch, 3, 8, 8)
    y = torch.arange(batch) % 10
    # an attack that crafts x' on another model (``transfer``) gets a fixed surrogate source
    extra = {"source_model": nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))} \
        if getattr(cls, "needs_source_model", False) else {}
    hparams = {**(hparams or {}), **extra}
    for norm in norms or cls.supported_norms:
        e = eps if norm is Norm.LINF else (0.5 if norm is Norm.L2 else 2.0)
        atk: Attack = cls(ThreatModel(norm, e), seed=1, **(hparams or {}))
        model.train()
        x_adv = atk(model, x, y)
        assert model.training, f"{cls.name}: model mode not restored"
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (lp_norms(x_adv - x, norm) <= e * (1 + 1e-5) + 1e-6).all()
        again = cls(ThreatModel(norm, e), seed=1, **(hparams or {}))(model, x, y)
        assert torch.equal(x_adv, again), f"{cls.name}: seeded runs differ"


def wait_for_epochs(proc: subprocess.Popen, runs_dir: Path, epochs: int, *,
                    timeout_s: float = 120.0) -> Path:
    """The run folder under ``runs_dir`` once its ``train_log.jsonl`` holds ``epochs`` lines,
    with ``proc`` (the training command writing it) still running.

    Raises:
        AssertionError: the process ended, or the deadline passed, first.
    """
    from benchmark.store import read_jsonl

    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        logs = list(Path(runs_dir).glob("*/*/*/train_log.jsonl"))
        if logs and len(read_jsonl(logs[0])) >= epochs:
            return logs[0].parent
        time.sleep(0.005)
    raise AssertionError(f"the run ended, or logged fewer than {epochs} epochs within "
                         f"{timeout_s:g} s, before it could be stopped")


def kill_after_epochs(cmd: Sequence[str], runs_dir: Path, epochs: int, *,
                      sig: int = signal.SIGKILL, timeout_s: float = 120.0) -> Path:
    """Start a training command that writes under ``runs_dir``, send it ``sig`` once its
    ``train_log.jsonl`` holds ``epochs`` lines, and return the (unfinished) run folder.

    Raises:
        AssertionError: the run finished, or logged too little, before it could be killed.
    """
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_dir = wait_for_epochs(proc, runs_dir, epochs, timeout_s=timeout_s)
    os.kill(proc.pid, sig)
    proc.communicate()
    assert not (run_dir / "TRAINED").exists()
    return run_dir


def tiny_st_run(runs_dir: Path, epochs: int = 1) -> Path:
    """A briefly trained ``st`` model (arch ``tiny``, synthetic data) for evaluation tests."""
    from benchmark.run.resolve import resolve_run_config
    from benchmark.data import load_dataset
    from benchmark.run.train import train_run
    from benchmark.store import RunStore

    cfg = resolve_run_config("st", "synthetic", profile="cpu", arch="tiny", user_hparams={
        "epochs": epochs, "lr_milestones": [min(2, epochs)], "val_attack_steps": 1,
        "val_size": 32, "batch_size": 64})
    return train_run(cfg, load_dataset("synthetic"), RunStore(runs_dir), progress=False)


# --------------------------------------------------------------------------- masked zoo
class RoundedLogits(nn.Module):
    """Logits through a rounding step: the input gradient is exactly zero everywhere."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(self.base(x))


class QuantisedInput(nn.Module):
    """Input quantised to ``levels`` grey levels without a gradient (shattered gradients,
    Athalye et al. 2018 §4.1): ``round`` has a zero derivative."""

    def __init__(self, base: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.base, self.levels = base, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(torch.round(x * self.levels) / self.levels)


class RandomizedLogits(nn.Module):
    """Gaussian noise of std ``sigma`` on the logits at every forward (randomised inference:
    attack it with EOT, i.e. declare it randomized)."""

    def __init__(self, base: nn.Module, sigma: float = 3.0) -> None:
        super().__init__()
        self.base, self.sigma = base, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.sigma * torch.randn_like(out)


class ScaledLogits(nn.Module):
    """Logits × ``scale``: the softmax saturates and CE gradients vanish in float32."""

    def __init__(self, base: nn.Module, scale: float = 1000.0) -> None:
        super().__init__()
        self.base, self.scale = base, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scale


class DetectorHead(nn.Module):
    """A detector that flags every input that is not one of the ``known`` clean points
    (ℓ∞ distance > 1e-6) and then answers the base prediction with a margin of ``boost``
    through a non-differentiable gate: gradient attacks stall, query attacks do not."""

    def __init__(self, base: nn.Module, known: torch.Tensor, boost: float = 1000.0) -> None:
        super().__init__()
        self.base, self.boost = base, boost
        self.register_buffer("known", known.flatten(1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        dist = torch.cdist(x.flatten(1), self.known.to(x.dtype), p=float("inf")).min(1).values
        flagged = (dist > 1e-6).to(out.dtype).unsqueeze(1)
        top = torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(out.dtype)
        return out + self.boost * flagged * top



class NearDataDetector(nn.Module):
    """:class:`DetectorHead` built to pass check (c) (issue 30's third-party model): the gate
    is active only on inputs within ℓ∞ distance ``radius`` of a ``known`` clean point (and not
    on the point itself), so gradient attacks stall inside the ε-ball while the large-ε
    attacks of check (c), which leave that neighbourhood, meet the base's honest gradients
    and succeed. Decisions are the base's everywhere; the clean points' gradients are the
    base's, so check (f) sees nothing either."""

    def __init__(self, base: nn.Module, known: torch.Tensor, radius: float = 16 / 255,
                 boost: float = 1000.0) -> None:
        super().__init__()
        self.base, self.radius, self.boost = base, radius, boost
        self.register_buffer("known", known.flatten(1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        dist = torch.cdist(x.flatten(1), self.known.to(x.dtype), p=float("inf")).min(1).values
        gate = ((dist > 1e-6) & (dist <= self.radius)).to(out.dtype).unsqueeze(1)
        top = torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(out.dtype)
        return out + self.boost * gate * top

class OneHotScores(nn.Module):
    """Scores that carry only the decision: ``scale`` × one-hot of the base's prediction.
    Decisions are the base's; gradients are zero and every score-based search (Square's
    margin) sees a flat landscape until the decision flips, so only a decision-based attack
    (RayS, check (k)) sees the base's true robustness."""

    def __init__(self, base: nn.Module, scale: float = 10.0) -> None:
        super().__init__()
        self.base, self.scale = base, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        hot = torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(out.dtype)
        return self.scale * hot + 0.0 * out  # in the graph, with a zero gradient



class UnrolledPurifier(nn.Module):
    """An unrolled iterative purifier with vanishing gradients (Athalye et al. 2018, §4.3 and
    §5.3: PixelDefend's and Defense-GAN's purification loops, whose gradients vanish or explode
    when unrolled): ``steps`` iterations that pull every pixel towards the nearest of
    ``levels`` grey levels with a steep sigmoid, x ← (⌊Lx⌋ + σ(s·(frac(Lx) − ½)))/L. Each step
    is smooth and its output stays within 1/(2L) of its input, but its derivative at a pixel
    already near a level is about s·e^(−s/2), so the input gradient vanishes geometrically
    with the steps (a vanishing, not a zero-derivative, mask: unlike :class:`QuantisedInput`
    nothing in it is non-differentiable). Measured on the zoo's points: with 4 steps the
    median gradient entry is ~4e-32 but not 0, and sign-gradient PGD is *not* fooled (a
    vanishing magnitude does not change a sign); with the default 8 it underflows to exactly
    0 in float32 on half of the points."""

    def __init__(self, base: nn.Module, levels: int = 8, steepness: float = 40.0,
                 steps: int = 8) -> None:
        super().__init__()
        self.base, self.levels, self.steepness, self.steps = base, levels, steepness, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            scaled = x * self.levels
            low = torch.floor(scaled).detach()
            x = (low + torch.sigmoid(self.steepness * (scaled - low - 0.5))) / self.levels
        return self.base(x)


class DitheredQuantisedInput(nn.Module):
    """A randomised, non-differentiable input transformation: bit-depth reduction to
    ``levels`` grey levels with fresh uniform dither at every forward, x → round(Lx + u)/L,
    u ~ U(−½, ½) per pixel. The randomised input transformations of Guo et al. 2018 and Xie et
    al. 2018 (random resize-and-pad) need both BPDA and EOT (Athalye et al. 2018, §4.1-§4.2,
    §5.2): the gradient is zero (``round``) *and* stochastic in input space (unlike
    :class:`RandomizedLogits`, whose noise sits on the logits). The zoo declares it randomized,
    as its author would: EOT is run, and it must still be caught, since EOT over zero
    gradients is zero."""

    def __init__(self, base: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.base, self.levels = base, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dither = torch.rand_like(x) - 0.5
        return self.base((torch.round(x * self.levels + dither) / self.levels).clamp(0, 1))


def masked_zoo(base: nn.Module, points: torch.Tensor) -> dict[str, tuple[nn.Module, bool]]:
    """Constructed masked models around one trained ``base``: name → (model, declared
    randomized). ``points`` are the evaluation's clean inputs (the detector's lookup)."""
    return {"rounded-logits": (RoundedLogits(base), False),
            "quantised-input": (QuantisedInput(base), False),
            "randomized-no-eot": (RandomizedLogits(base), False),
            "randomized-eot": (RandomizedLogits(base), True),
            "logits-x1000": (ScaledLogits(base), False),
            "detector": (DetectorHead(base, points), False),
            "one-hot-scores": (OneHotScores(base), False),
            "unrolled-purifier": (UnrolledPurifier(base), False),
            "dithered-quantised-input": (DitheredQuantisedInput(base), True),
            "near-data-detector": (NearDataDetector(base, points), False)}


def templates_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 3×8×8 class templates in [0,1] (10 classes, labels ``arange(n) % 10``):
    the fixed task of the masked-model zoo and of the tests that train a model outside
    advbench. The templates are the same for every ``seed``; the noise is drawn from ``seed``."""
    g = torch.Generator().manual_seed(0)
    t = 0.5 + 0.3 * (torch.rand(10, 3, 8, 8, generator=g) - 0.5)
    g.manual_seed(seed)
    y = torch.arange(n) % 10
    return (t[y] + 0.3 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), y


def train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                batch_size: int) -> nn.Module:
    """Train ``model`` as a user's own script would, with no advbench training code: plain
    cross-entropy, SGD with momentum 0.9, batches in order. Returns it in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(y), batch_size):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + batch_size]),
                                                     y[i:i + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def templates_mlp(seed: int, adversarial: bool = True) -> nn.Module:
    """An MLP on :func:`templates_data` trained with PGD-5 adversarial training at ε = 0.03
    (clean ~94%, PGD ~56%), or with plain CE (``adversarial=False``: the non-robust ``st``
    model); the honest model of the check tests and RayS's test model."""
    from attacks.pgd import PGD as _PGD

    x, y = templates_data(1000, 1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attack = _PGD(ThreatModel(Norm.LINF, 0.03), steps=5, rel_step_size=0.5, seed=0)
    for _ in range(15):
        for i in range(0, 1000, 100):
            xa = attack(model, x[i:i + 100], y[i:i + 100]) if adversarial else x[i:i + 100]
            model.train()
            loss = torch.nn.functional.cross_entropy(model(xa), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


# ------------------------------------------------- declared preprocessing / attack (issue 30)
class Quantise(nn.Module):
    """Inputs rounded to ``levels`` grey levels: ``round(x·levels)/levels`` (zero derivative)."""

    def __init__(self, levels: int = 4) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels


def declared_quantised(base: nn.Module, levels: int = 4) -> nn.Module:
    """``base`` behind an input quantisation declared non-differentiable
    (:class:`attacks.bpda.NonDifferentiable`): the shattered-gradient model of
    :class:`QuantisedInput`, declared, so that ``advbench check`` attacks it with BPDA."""
    from attacks.bpda import NonDifferentiable
    return nn.Sequential(NonDifferentiable(Quantise(levels)), base)


def surrogate_objective(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
    """A declared adaptive objective for :class:`RoundedLogits`: cross-entropy on the logits
    before the rounding (``model.base``), which its author knows and a generic attack does
    not see."""
    return torch.nn.functional.cross_entropy(model.base(x_adv).float(), y, reduction="none")
