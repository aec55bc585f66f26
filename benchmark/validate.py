"""One validation layer at the boundary: hyperparameters, CLI options, rows and weights.

Everything a user can type is checked here before any run folder or row exists, and every
failure is one :class:`~benchmark.errors.UsageError` (exit 2) naming the field and the problem.
Validation never changes a valid value (run ids are hashes of the resolved config).

* :func:`check_hparams`: types (an int where an int is meant, finite floats, no ``null``
  except where a default is ``None``), ranges and cross-field rules of a merged config.
* click parameter types and callbacks for the options (:data:`POSITIVE`, :func:`seeds_option`,
  :func:`device_option`, :func:`writable_dir_option`).
* :func:`row_problem`: a result row that must not be written or reused (``n_examples`` 0,
  NaN accuracy, missing fields).
* :func:`check_finite_model`: weights, buffers and outputs finite before a checkpoint is
  declared good or a row is written.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import click
import numpy as np
import torch
from torch import Tensor, nn

from benchmark.errors import NonFiniteError, UsageError

#: allowed values of string hyperparameters (defenses add theirs via ``hparam_choices``)
CHOICES: dict[str, tuple[str, ...]] = {
    "select_by": ("val_pgd", "val_clean"),
    "amp": ("none", "bf16"),
    "attack_start": ("uniform", "normal"),
    "train_attack_loss": ("ce", "margin", "dlr"),
}

#: (minimum, maximum, minimum is exclusive) of numeric protocol hyperparameters
RANGES: dict[str, tuple[float, float, bool]] = {
    "epochs": (0, math.inf, False),
    "batch_size": (1, math.inf, False),
    "lr": (0, math.inf, True),
    "momentum": (0, 1, False),
    "weight_decay": (0, math.inf, False),
    "lr_gamma": (0, math.inf, True),
    "eps": (0, 1, False),
    "train_attack_steps": (0, math.inf, False),
    "train_step_size": (0, math.inf, False),
    "train_subset": (1, math.inf, False),
    "val_size": (1, math.inf, False),
    "val_attack_steps": (0, math.inf, False),
    "val_every": (1, math.inf, False),
    "grad_clip": (0, math.inf, True),
    "clean_epochs": (0, math.inf, False),
    "eps_warmup_epochs": (0, math.inf, False),
}

#: protocol hyperparameters that count something
INT_KEYS = frozenset({"epochs", "batch_size", "train_attack_steps", "train_subset", "val_size",
                      "val_attack_steps", "val_every", "clean_epochs"})

#: a seed must fit numpy's ``RandomState`` (and the run's loader generator)
SEED_LIMIT = 2 ** 32


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: keys whose value may be null in some profile (``train_subset`` null = the whole set)
NULLABLE = frozenset({"train_subset"})


def _type_problem(default: Any, value: Any, key: str = "") -> Optional[str]:
    """Why ``value`` cannot replace ``default`` (None if it can)."""
    if value is None:
        return None if default is None or key in NULLABLE else "a value, got null"
    if isinstance(value, float) and not math.isfinite(value):
        return f"a finite number, got {value!r}"
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"bool (true or false), got {value!r}"
    if _is_int(default):
        return None if _is_int(value) else f"int (an integer), got {value!r}"
    if isinstance(default, float):
        return None if _is_number(value) else f"float (a number), got {value!r}"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else f"list, got {value!r}"
    if not isinstance(value, type(default)):
        return f"{type(default).__name__}, got {value!r}"
    return None


def check_user_value(key: str, default: Any, value: Any) -> None:
    """One ``--hparams`` override against the default it replaces.

    Raises:
        UsageError: wrong type, null, or a non-finite number.
    """
    problem = _type_problem(default, value, key)
    if problem:
        raise UsageError(f"hyperparameter {key!r} expects {problem}")


def check_hparams(hp: Mapping[str, Any], user: Mapping[str, Any] = (),  # type: ignore[assignment]
                  choices: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    """Ranges and cross-field rules of a merged hyperparameter dict.

    ``user`` are the keys the user set: a user-given ``lr_milestones`` must lie inside
    ``[1, epochs]`` (``epochs`` itself is the usual way to write "no drop"); the profile's
    milestones may exceed a shortened ``epochs`` (they then never fire, as in every short
    test run).

    Raises:
        UsageError: the first problem found, naming the key.
    """
    allowed = {**CHOICES, **(choices or {})}
    for key, value in hp.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"hyperparameter {key!r} must be finite, got {value!r}")
        if key in allowed and value not in allowed[key]:
            raise UsageError(f"hyperparameter {key!r} must be one of "
                             f"{', '.join(map(repr, allowed[key]))}; got {value!r}")
        if key == "eps" and value is not None and (not _is_number(value) or not 0 <= value <= 1):
            raise UsageError(f"eps must lie in [0, 1] (pixel units), got {value}")
        if key in RANGES and value is not None:
            lo, hi, open_lo = RANGES[key]
            if key in INT_KEYS and not _is_int(value):
                raise UsageError(f"hyperparameter {key!r} expects an integer, got {value!r}")
            if not _is_number(value) or (value <= lo if open_lo else value < lo) or value > hi:
                bound = f"> {lo:g}" if open_lo else f">= {lo:g}"
                rng = bound if hi == math.inf else f"in [{lo:g}, {hi:g}]"
                raise UsageError(f"hyperparameter {key!r} must be {rng}, got {value!r}")
    if {"clean_epochs", "eps_warmup_epochs"} & set(user) and _is_int(hp.get("epochs")):
        warm = hp.get("clean_epochs", 0) + hp.get("eps_warmup_epochs", 0)
        if warm > hp["epochs"]:
            raise UsageError(f"clean_epochs + eps_warmup_epochs ({warm:g}) must be <= epochs "
                             f"({hp['epochs']}); the training attack would never reach ε")
    if "lr_milestones" in hp:
        ms = hp["lr_milestones"]
        if not isinstance(ms, (list, tuple)) or not all(_is_int(m) for m in ms):
            raise UsageError(f"hyperparameter 'lr_milestones' expects a list of integers "
                             f"(epochs), got {ms!r}")
        if any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
            raise UsageError(f"lr_milestones must be increasing epochs >= 1, got {list(ms)}")
        epochs = hp.get("epochs")
        if "lr_milestones" in user and _is_int(epochs) and epochs > 0 and \
                any(m > epochs for m in ms):
            raise UsageError(f"lr_milestones {list(ms)} must be <= epochs ({epochs}); a milestone "
                             f"after the last epoch never lowers the lr")
    _check_lr_schedule(hp)


#: the largest learning rate an optimizer step can use (float32 parameters)
LR_MAX = float(np.finfo(np.float32).max)


def _check_lr_schedule(hp: Mapping[str, Any]) -> None:
    """Every learning rate of the schedule (``lr`` × ``lr_gamma``^k after the k-th milestone
    that fires) must fit a float32 parameter update; checked before any run folder exists.

    Raises:
        UsageError: an lr of the schedule overflows float32.
    """
    lr, gamma = hp.get("lr"), hp.get("lr_gamma", 1.0)
    if not _is_number(lr) or not _is_number(gamma) or lr <= 0 or gamma <= 0:
        return
    ms = hp.get("lr_milestones") or []
    epochs = hp.get("epochs")
    fire = [m for m in ms if _is_int(m) and (not _is_int(epochs) or m <= epochs)]
    for k in range(len(fire) + 1):
        value = math.log10(lr) + k * math.log10(gamma)
        if value > math.log10(LR_MAX):
            where = "'lr'" if k == 0 else f"'lr' × 'lr_gamma'^{k} (after epoch {fire[k - 1]})"
            raise UsageError(f"{where} is 1e{value:.0f}, more than a float32 update holds "
                             f"({LR_MAX:.3g}); lower lr or lr_gamma")


# ------------------------------------------------------------------------------ CLI options
#: ``--n-examples``, ``--batch-size``, ``--jobs``: an integer >= 1
POSITIVE = click.IntRange(min=1)
#: ``--warmup`` and similar: an integer >= 0
NON_NEGATIVE = click.IntRange(min=0)


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a non-empty comma list of integers in ``[0, 2**32)``.

    Raises:
        UsageError: empty, not integers, or out of range.
    """
    parts = [s.strip() for s in str(text).split(",")]
    if not any(parts):
        raise UsageError(f"--seeds must list at least one integer, got {text!r}")
    try:
        seeds = [int(s) for s in parts if s]
    except ValueError:
        raise UsageError(f"--seeds must be a comma list of integers, got {text!r}") from None
    bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        raise UsageError(f"--seeds must lie in [0, 2**32), got {bad[0]}")
    return seeds


def _validating_callback(check: Callable[[str], Any], option: str) -> Callable[..., Optional[str]]:
    """A click callback that runs ``check`` on the value and keeps the value as given; the
    check's message (without its leading option name, which click adds) becomes the error."""
    def callback(ctx: click.Context, param: click.Parameter, value: Optional[str]
                 ) -> Optional[str]:
        if value is not None:
            try:
                check(value)
            except UsageError as exc:
                raise click.BadParameter(str(exc).removeprefix(f"{option} ")) from None
        return value
    return callback


#: click callback: validate ``--seeds`` and keep it as given
seeds_option = _validating_callback(parse_seeds, "--seeds")


def checkpoints_option(ctx: click.Context, param: click.Parameter, value: Optional[str]
                       ) -> Optional[str]:
    """click callback: ``--checkpoints`` is a non-empty comma list of best and/or last."""
    if value is not None:
        which = [c.strip() for c in value.split(",") if c.strip()]
        if not which or not set(which) <= {"best", "last"}:
            raise click.BadParameter(f"takes best and/or last (e.g. best,last), got {value!r}")
    return value


def check_device(text: str) -> None:
    """``--device``: auto, cpu, cuda, cuda:N or mps, and available on this machine.

    Raises:
        UsageError: not a device name, or that device is absent.
    """
    if text == "auto":
        return
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device; use auto, cpu, cuda, cuda:N "
                         f"or mps") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA GPU is available here (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {text}: MPS is not available here")
        return
    raise UsageError(f"--device {text!r} is not supported; use auto, cpu, cuda, cuda:N or mps")


#: click callback for ``--device``
device_option = _validating_callback(check_device, "--device")


def check_writable_dir(path: Path | str, what: str) -> None:
    """A folder advbench will write into: an existing writable directory, or creatable.

    Nothing is created here (``--dry-run`` writes nothing).

    Raises:
        UsageError: it is a file, or it (or its nearest existing parent) is not writable.
    """
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        if probe.is_symlink():
            raise UsageError(f"{what} {path}: {probe} is a broken symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == p else f"cannot be created: {probe} is a file"
        raise UsageError(f"{what} {path} {where}, not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        where = "is not writable" if probe == p else f"cannot be created: {probe} is not writable"
        raise UsageError(f"{what} {path} {where}")


def writable_dir_option(ctx: click.Context, param: click.Parameter,
                        value: Optional[str]) -> Optional[str]:
    """click callback: ``--runs-dir`` / ``--out`` must be (or become) a writable directory."""
    if value is not None:
        try:
            check_writable_dir(value, "")
        except UsageError as exc:
            raise click.BadParameter(str(exc).strip()) from None
    return value


def check_eval_sizes(n_examples: Optional[int], batch_size: Optional[int]) -> None:
    """Library-level guard for evaluation sizes (the CLI checks them as options).

    Raises:
        UsageError: ``n_examples`` or ``batch_size`` below 1.
    """
    if n_examples is not None and (not _is_int(n_examples) or n_examples < 1):
        raise UsageError(f"n_examples must be an integer >= 1, got {n_examples!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")


# ------------------------------------------------------------------------------ rows
#: fields every attack row has (the report and ``format_rows`` read them)
ATTACK_FIELDS = ("run_id", "eval_key", "defense", "dataset", "seed", "checkpoint", "attack",
                 "eps", "n_examples", "clean_acc", "robust_acc")
#: fractions that must be finite and in [0, 1] wherever present
ACCURACY_FIELDS = ("clean_acc", "robust_acc", "accuracy", "clean_accuracy")


#: fields that become file or folder names (report tables, plots, RobustBench export)
PATH_FIELDS = ("dataset", "profile")
#: fields that name things in tables (and their labels): at most :data:`MAX_NAME_CHARS`
NAME_FIELDS = ("run_id", "eval_key", "defense", "arch", "checkpoint", "attack", "norm", "kind",
               "condition", "corruption", "negatives", "score", "score_option", "eps_str",
               "check", "status", "finding")
MAX_NAME_CHARS = 256
#: longest text anywhere in a row (provenance, reasons, per-sample bit strings)
MAX_TEXT_CHARS = 1 << 16


def path_problem(row: Mapping[str, Any]) -> Optional[str]:
    """Why a row's :data:`PATH_FIELDS` cannot name a file (None if they can, or are absent)."""
    from benchmark.safepath import ident_problem
    for k in PATH_FIELDS:
        if k in row and row[k] is not None:
            problem = ident_problem(row[k])
            if problem is not None:
                return f"{k} {problem}"
    return None


def _text_problem(value: Any, where: str, depth: int = 0) -> Optional[str]:
    if isinstance(value, str):
        return f"{where} is {len(value)} characters (at most {MAX_TEXT_CHARS})" \
            if len(value) > MAX_TEXT_CHARS else None
    if depth > 8:
        return f"{where} is nested deeper than 8 levels"
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and len(k) > MAX_NAME_CHARS:
            return f"a key of {where} is {len(k)} characters (at most {MAX_NAME_CHARS})"
        problem = _text_problem(v, f"{where}.{k}" if isinstance(value, dict) else where, depth + 1)
        if problem:
            return problem
    return None


def row_problem(row: Any) -> Optional[str]:
    """Why a result row must not be written or reused (None if it is fine).

    A row is a JSON object; an attack row has :data:`ATTACK_FIELDS`; ``n_examples`` (where
    present) is an integer >= 1; accuracies are finite and within [0, 1]; ``adv_ce`` is finite;
    ``dataset`` and ``profile`` are identifiers (:func:`path_problem`: they name files); names
    are at most :data:`MAX_NAME_CHARS` characters, any text at most :data:`MAX_TEXT_CHARS`,
    nesting at most 8 levels (so that no row makes the report's output explode).
    """
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    problem = path_problem(row)
    if problem:
        return problem
    for k in NAME_FIELDS:
        if isinstance(row.get(k), str) and len(row[k]) > MAX_NAME_CHARS:
            return f"{k} is {len(row[k])} characters (at most {MAX_NAME_CHARS})"
    for k, v in (row.get("hparams") or {}).items() if isinstance(row.get("hparams"), dict) \
            else ():
        if isinstance(v, str) and len(v) > MAX_NAME_CHARS:
            return f"hparams.{k} is {len(v)} characters (at most {MAX_NAME_CHARS})"
    problem = _text_problem(row, "row")
    if problem:
        return problem
    if row.get("kind", "attack") == "attack":
        missing = [k for k in ATTACK_FIELDS if k not in row]
        if missing:
            return f"missing field(s) {', '.join(missing)}"
    n = row.get("n_examples")
    if n is not None and (not _is_int(n) or n < 1):
        return f"n_examples is {row['n_examples']!r} (must be >= 1)"
    for k in ACCURACY_FIELDS:
        if k in row:
            v = row[k]
            if not _is_number(v) or not math.isfinite(v) or not 0 <= v <= 1:
                return f"{k} is {v!r} (must be a finite fraction)"
    if "adv_ce" in row and (not _is_number(row["adv_ce"]) or not math.isfinite(row["adv_ce"])):
        return f"adv_ce is {row['adv_ce']!r} (must be finite)"
    return None


#: row kinds that describe training, checks or a refused evaluation, not results: no table is
#: built from them alone
NON_RESULT_KINDS = frozenset({"cost", "health", "check", "refused"})


def is_result_row(row: Mapping[str, Any]) -> bool:
    """An evaluation result (attack, features, corruption, rejection, ...) row."""
    return row.get("kind", "attack") not in NON_RESULT_KINDS


def check_row(row: Mapping[str, Any], where: str = "row") -> None:
    """Refuse to write a bad row.

    Raises:
        NonFiniteError: NaN/inf accuracy or loss (exit 3).
        UsageError: no evaluated points or missing fields (exit 2).
    """
    problem = row_problem(row)
    if problem is None:
        return
    if "finite" in problem:
        raise NonFiniteError(f"{where} not written: {problem}")
    raise UsageError(f"{where} not written: {problem}")


# ------------------------------------------------------------------------------ weights
def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf (nested dicts are searched)."""
    bad = []
    for name, t in tensors.items():
        if isinstance(t, Mapping):
            bad += [f"{name}.{n}" for n in nonfinite_tensors(t)]
        elif isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


@torch.no_grad()
def check_finite_model(model: nn.Module, x: Optional[Tensor], what: str) -> None:
    """Weights, buffers and eval-mode outputs on ``x`` are all finite.

    The forward pass runs in eval mode on a forked RNG, so it changes neither the model's
    mode nor any random stream (resumed runs stay bit-identical).

    Raises:
        NonFiniteError: names the first bad tensors, or the outputs' largest magnitude.
    """
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise NonFiniteError(f"{what}: non-finite weights in {', '.join(bad[:3])}"
                             + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    if x is None or len(x) == 0:
        return
    devices = [x.device] if x.device.type == "cuda" else []
    was_training = model.training
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices):
            out = model(x)
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(out).all()):
        big = max((float(t.abs().max()) for t in model.state_dict().values()
                   if t.is_floating_point() and t.numel()), default=0.0)
        raise NonFiniteError(f"{what}: the model outputs NaN/inf (largest weight "
                             f"magnitude {big:.3g})")
