"""The one way into evaluation: open a trained checkpoint once, check it, stamp its rows.

Every evaluation command (``evaluate``, ``features``, ``corruptions``, and the ones built on
them) starts with :func:`open_target`, checks the model with :func:`check_model` on a few
inputs, reads its test points through :meth:`Target.test_data`, and starts every result row
with :meth:`Target.row` (the provenance fields), so all row kinds carry the same provenance
and a checkpoint is read from disk once per command.

Example::

    from benchmark.eval.target import check_model, open_target

    t = open_target("runs/mnist5k/at/0123abcd4567", checkpoint="best", device="cpu")
    data = t.test_data()                     # the run's dataset, class count checked
    x, y = data.test.floats(t.device)
    check_model(t.model, x[:8], randomized=t.defense.randomized)
    row = {**t.row(key, "my-kind"), "accuracy": ...}
"""
from __future__ import annotations

import glob
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from benchmark.checkpoint import read_checkpoint, resolve_checkpoint
from benchmark.run.resolve import model_from_checkpoint
from benchmark.config import DEFAULT_N_EXAMPLES, RunConfig, stable_hash
from benchmark.data import Data, DataInfo, load_dataset
from benchmark.device import resolve_device
from benchmark.errors import NonFiniteError, UsageError
from benchmark.safepath import ident_problem, identifier, inside, is_hex_digest, read_small
from benchmark.store import (atomic_write_bytes, atomic_write_json, code_version, environment,
                             now, read_json, read_row)
from benchmark.validate import check_finite_model

logger = logging.getLogger(__name__)

#: version of the result-row layout, written into every row
SCHEMA = 1


@dataclass
class Target:
    """A trained checkpoint opened for evaluation (model in eval mode on ``device``).

    Attributes:
        model: the trained network (inputs in [0,1], logits out).
        defense: the run's defense, with its trained state loaded.
        cfg: the run's resolved config.
        info: the dataset facts stored in the checkpoint.
        device: where ``model`` lives.
        ckpt_path: the checkpoint file read.
        checkpoint: ``best`` / ``last``, or ``file-<sha>`` for a checkpoint file outside a run.
        epoch: epochs trained when the checkpoint was written.
        out_dir: where ``eval/`` and ``flags/`` go (the run folder, or the ``--out`` folder).
        config: the run folder's ``config.json`` ({} for a bare checkpoint file).
        row_extra: fields added to every row (e.g. a RobustBench zoo model's origin).
        ckpt_sha256: SHA-256 of the checkpoint file's content (every row records it).
    """

    model: nn.Module
    defense: Any
    cfg: RunConfig
    info: DataInfo
    device: torch.device
    ckpt_path: Path
    checkpoint: str
    epoch: int
    out_dir: Path
    config: Mapping[str, Any]
    row_extra: Mapping[str, Any] = field(default_factory=dict)
    ckpt_sha256: str = ""

    def n_points(self, n_examples: Optional[int]) -> Optional[int]:
        """``n_examples``, or the profile's number of test points when it is None (``cpu``:
        1000; ``paper``: None, the whole test set)."""
        return DEFAULT_N_EXAMPLES.get(self.cfg.profile) if n_examples is None else n_examples

    def inputs(self, **extra: str) -> dict[str, str]:
        """The SHA-256 of every input a row reads: the checkpoint, plus ``extra`` (an OOD
        set, a corruption set)."""
        return {"checkpoint": self.ckpt_sha256, **extra}

    def cached(self, path: Path, *, force: bool = False, **extra: str
               ) -> Optional[dict[str, Any]]:
        """The stored row at ``path`` if it may be reused: valid, of this checkpoint label,
        and computed on inputs with the same SHA-256 as now (:meth:`inputs`); else None.

        A row written before rows recorded their inputs is reused only for a checkpoint
        whose stamp vouched for it (:func:`retire_stale_rows`) and when no other input is
        named: its OOD or corruption set is unknown.
        """
        if force or not path.exists():
            return None
        row = read_row(path)
        if row is None or row.get("checkpoint") != self.checkpoint:
            return None
        recorded = row.get(INPUTS)
        if recorded is None:
            return row if not extra else None
        return row if recorded == self.inputs(**extra) else None

    def row(self, key: str, kind: str, *, data_provenance: Optional[str] = None,
            inputs: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
        """The provenance fields every result row of this checkpoint starts with.

        Args:
            key: the row's eval key (its file name under ``eval/``).
            kind: ``attack``, ``features``, ``corruption``, ...
            data_provenance: provenance of the data actually evaluated (default: the
                training data's, from the checkpoint).
            inputs: SHA-256 of the inputs read besides the checkpoint (see :meth:`inputs`).
        """
        cfg = self.cfg
        return {"schema": SCHEMA, "kind": kind, "run_id": cfg.run_id, "eval_key": key,
                "defense": cfg.defense, "dataset": cfg.dataset,
                "data_provenance": data_provenance or self.info.provenance, "arch": cfg.arch,
                "profile": cfg.profile, "seed": cfg.seed, "checkpoint": self.checkpoint,
                "checkpoint_file": self.ckpt_path.name if self.checkpoint in ("best", "last")
                else str(self.ckpt_path), "checkpoint_epoch": self.epoch,
                "hparams": cfg.hparams, "env": environment(self.device),
                "git": self.config.get("git") or code_version(), "eval_git": code_version(),
                "created": now(), INPUTS: self.inputs(**(inputs or {})), **self.row_extra}

    def test_data(self, data: Optional[Data] = None,
                  data_dir: Optional[Path | str] = None) -> Data:
        """The run's dataset (``data`` if given, else loaded), checked against the model.

        Raises:
            UsageError: the dataset's class count differs from the checkpoint's.
        """
        if data is None:
            data = load_dataset(self.cfg.dataset, Path(data_dir) if data_dir else None)
        if data.info.num_classes != self.info.num_classes:
            raise UsageError(f"checkpoint has {self.info.num_classes} classes, dataset "
                             f"{data.info.name} has {data.info.num_classes}")
        return data


def open_target(path: Path | str, checkpoint: str = "best", *, device: str | torch.device = "cpu",
                out_dir: Optional[Path | str] = None) -> Target:
    """Open a run folder's checkpoint (``best`` falls back to ``last``) or any advbench
    checkpoint file, once.

    Args:
        path: a run folder, its ``ckpt_best.pt`` / ``ckpt_last.pt``, or a foreign checkpoint
            file (rows then go to ``out_dir``, default ``<file stem>-eval/`` beside it, and the
            checkpoint label is ``file-<sha256 prefix>``).
        checkpoint: ``best`` or ``last`` (for a run folder).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        out_dir: result folder for a checkpoint file outside a run folder.

    Raises:
        CheckpointError: missing, foreign or corrupt checkpoint.
    """
    path = Path(path)
    if path.is_file() and path.name in ("ckpt_best.pt", "ckpt_last.pt") and \
            (path.parent / "config.json").exists():
        path, checkpoint = path.parent, path.name[5:-3]
    ckpt_path = resolve_checkpoint(path, checkpoint)
    ckpt = read_checkpoint(ckpt_path)
    model, defense, cfg, info = model_from_checkpoint(ckpt)
    dev = resolve_device(device)
    sha = file_sha256(ckpt_path)
    if path.is_dir():
        out = path
        config = read_json(path / "config.json") if (path / "config.json").exists() else {}
        retire_stale_rows(path, checkpoint, ckpt_path, sha)
        if config:
            carry_training_failure(path)
    else:
        checkpoint = "file-" + sha[:12]
        out = Path(out_dir) if out_dir else path.parent / f"{path.stem}-eval"
        config = {}
    t = Target(model.to(dev).eval(), defense, cfg, info, dev, ckpt_path, checkpoint,
               int(ckpt.get("epoch", 0)), out, config, ckpt_sha256=sha)
    if path.is_dir():
        refuse_nondeterministic(t)
    return t


class OutsideDefense:
    """What evaluation needs of a defense, for a model advbench did not train (a plain
    ``nn.Module`` or a model file): cross-entropy for the adaptive attack, no class centers.

    Args:
        randomized: the model's forward is random on purpose (AutoAttack's ``rand`` version,
            EOT); otherwise a nondeterministic forward is refused.
        objective: the model's own attack objective, ``loss(model, x', x, y) -> Tensor[N]``
            (declared: ``advbench check`` runs PGD on it into the headline, check (n)); None:
            none declared, the adaptive column is PGD on cross-entropy.
    """

    def __init__(self, randomized: bool = False, objective: Any = None) -> None:
        self.randomized = bool(randomized)
        self._objective = objective

    def objective(self) -> Any:
        """The adaptive attack's loss: the declared one, else cross-entropy."""
        from attacks.base import ce_objective
        return self._objective or ce_objective

    def declares_adaptive_attack(self) -> bool:
        return self._objective is not None

    def class_centers(self, model: nn.Module) -> None:
        return None


#: the checkpoint label of a model that advbench did not train (rows, flags and headlines)
OUTSIDE_CHECKPOINT = "model"
#: report sections an outside model's rows may go to
OUTSIDE_PROFILES = ("cpu", "paper")


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's ``state_dict`` (names, dtypes, shapes and values, in order): what
    keys an outside model's cached rows, as a checkpoint file's hash does."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            h.update(f"{name}={value!r};".encode())
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def objective_sha256(objective: Any) -> str:
    """SHA-256 of an attack objective's code (module, qualified name and source, else its
    bytecode and constants): what keys the rows of an outside model attacked with it, so that
    rows computed with another objective are never reused. Values a closure captures are not
    read: give a changed objective a new name or code."""
    import inspect

    fn = getattr(objective, "__func__", objective)
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = repr((code.co_code, code.co_consts, code.co_names)) if code is not None \
            else repr(type(fn))
    label = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    return hashlib.sha256(f"{label}\n{text}".encode()).hexdigest()


def model_target(model: nn.Module, info: DataInfo, *, name: str, eps: float, norm: str = "linf",
                 arch: Optional[str] = None, profile: str = "paper", randomized: bool = False,
                 device: str | torch.device = "cpu", runs_dir: Optional[Path | str] = None,
                 source: Optional[str] = None, objective: Any = None) -> Target:
    """Open a model that advbench did not train (a plain ``nn.Module``, or one built from a
    model file) for evaluation: the same :class:`Target` a checkpoint gives.

    Rows go to ``RUNS_DIR/<dataset>/<name>/<run_id>/`` (``advbench report --runs-dir RUNS_DIR``
    shows them beside advbench's own runs; ``run_id`` hashes name, dataset, arch, profile, ε
    and norm), or to a fresh temporary folder when ``runs_dir`` is None. The checkpoint label
    is ``model``; rows cached there are reused only while the model's weights (their SHA-256,
    stamped in ``eval/``) are unchanged, else they move to ``stale/``.

    Args:
        model: inputs in [0,1] (N×C×H×W), logits out (N×K); put in eval mode here.
        info: the dataset facts (classes, input shape, attack scale).
        name: the rows' ``defense`` label (e.g. ``my-model``).
        eps: the nominal ε (the verdicts are judged at it).
        norm: ``linf``, ``l2`` or ``l1``.
        arch: the architecture name recorded in rows (default: the module's class name).
        profile: the report section (``paper`` or ``cpu``).
        randomized: the forward is random on purpose (attacked with EOT).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        runs_dir: where rows go (None: a temporary folder).
        source: where the model came from (a file path), recorded in every row.
        objective: the model's own attack objective (:class:`OutsideDefense`), or None.

    Raises:
        UsageError: a name that is not a plain label, an unknown profile, a non-positive ε.
    """
    import re
    import tempfile

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", name):
        raise UsageError(f"model name {name!r}: letters, digits and ._+- only (at most 100)")
    if profile not in OUTSIDE_PROFILES:
        raise UsageError(f"profile {profile!r}: one of {', '.join(OUTSIDE_PROFILES)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or \
            not 0 < float(eps) < float("inf"):
        raise UsageError(f"eps must be a positive number, got {eps!r}")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    sha = state_sha256(model)
    hparams: dict[str, Any] = {"eps": float(eps), "norm": norm, "outside": True}
    if objective is not None:  # another objective, another run folder: no row is reused
        hparams["objective_sha256"] = objective_sha256(objective)
    cfg = RunConfig(defense=name, dataset=info.name, arch=arch or type(model).__name__,
                    profile=profile, seed=0, hparams=hparams)
    out = Path(runs_dir) / info.name / name / cfg.run_id if runs_dir is not None \
        else Path(tempfile.mkdtemp(prefix="advbench-model-"))
    out.mkdir(parents=True, exist_ok=True)
    retire_stale_rows(out, OUTSIDE_CHECKPOINT, None, sha=sha)
    extra = {"outside": {"weights_sha256": sha, "source": source or "nn.Module (Python API)"}}
    return Target(model, OutsideDefense(randomized, objective), cfg, info, dev,
                  Path(source) if source else Path(f"{name}.state_dict"), OUTSIDE_CHECKPOINT, 0,
                  out, {"git": None}, row_extra=extra, ckpt_sha256=sha)


#: the row a run refused by evaluation leaves, so that the report shows it with its reason
REFUSED_KIND = "refused"


def refuse_nondeterministic(t: Target) -> None:
    """A run whose eval-mode forward is not deterministic and whose defense is not declared
    randomized cannot be evaluated: leave a ``"kind": "refused"`` row with the reason (the
    report lists the run instead of dropping it), then refuse. A run that passes loses an
    earlier refusal row of the same checkpoint.

    Raises:
        UsageError: the forward is nondeterministic and the defense is not ``randomized``.
    """
    key = "refused-" + stable_hash({"run_id": t.cfg.run_id, "checkpoint": t.checkpoint})
    path = t.out_dir / "eval" / f"{key}.json"
    if not getattr(t.defense, "randomized", False):
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(4, t.info.in_channels, t.info.image_size, t.info.image_size,
                       generator=gen).to(t.device)
        with torch.no_grad():
            a, b = t.model(x), t.model(x)
        if bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) and \
                not torch.equal(a, b):
            reason = "model is not deterministic in eval mode; mark the defense randomized"
            atomic_write_json(path, {**t.row(key, REFUSED_KIND), "reason": reason})
            raise UsageError(reason)
    path.unlink(missing_ok=True)


def check_model(model: nn.Module, x: Tensor, *, randomized: bool = False) -> None:
    """AutoAttack-style sanity checks: eval mode, logits (not probabilities), finite outputs,
    determinism.

    Raises:
        UsageError: train mode, outputs that are not N×K, or a nondeterministic model that is
            not marked ``randomized``.
        NonFiniteError: NaN/inf weights or outputs (exit 3), named before determinism is
            judged (NaN != NaN).
    """
    if model.training:
        raise UsageError("model must be in eval mode for evaluation")
    with torch.no_grad():
        a, b = model(x), model(x)
    if a.dim() != 2:
        raise UsageError(f"model must return N×K logits, got shape {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        check_finite_model(model, None, "checkpoint not usable")
        raise NonFiniteError("checkpoint not usable: the model outputs NaN/inf on test points")
    if (a >= 0).all() and torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-4):
        logger.warning("model outputs look like probabilities; attacks expect logits")
    if not randomized and not torch.equal(a, b):
        raise UsageError("model is not deterministic in eval mode; mark the defense randomized")


#: the SHA-256 of the checkpoint file a run's rows were computed on, per checkpoint label
STAMP = "eval/.checkpoint-{}.sha256"
#: the row field holding the SHA-256 of every input the row was computed from
INPUTS = "inputs_sha256"


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _row_checkpoint_sha(row: Mapping[str, Any]) -> Optional[str]:
    """The checkpoint SHA-256 a row records (:data:`INPUTS` field), if it is a valid digest."""
    inputs = row.get(INPUTS)
    sha = inputs.get("checkpoint") if isinstance(inputs, Mapping) else None
    return sha if is_hex_digest(sha) else None


def retire_stale_rows(run_dir: Path, checkpoint: str, ckpt_path: Path,
                      sha: Optional[str] = None) -> int:
    """Keep cached rows only while the checkpoint they were computed on is unchanged.

    Each row records the SHA-256 of the checkpoint file it read (``inputs_sha256``); a row
    written before that field existed counts as computed on the file whose hash the label's
    stamp (``eval/.checkpoint-<label>.sha256``) holds. A row whose hash differs from the file's
    now (retrained, replaced, overwritten by NaN weights), or that has no hash at all (no
    field and no valid stamp), moves with its flags to ``stale/<hash prefix>/`` (or
    ``stale/unstamped/``), so every command (evaluate, check, features, corruptions,
    rejection) recomputes instead of reusing it.

    The stamp is text from a file: it is used only if it is a regular file (a symlink is never
    followed, it is replaced) holding a 64-hex-digit digest; anything else counts as no stamp.
    Returns the number of rows moved.
    """
    stamp = inside(run_dir, "eval", f".checkpoint-{identifier(checkpoint, 'checkpoint label')}"
                                    ".sha256")
    sha = sha or file_sha256(ckpt_path)
    text = read_small(stamp)
    old = text.strip() if text is not None and is_hex_digest(text.strip()) else None
    if old is None and (stamp.is_symlink() or stamp.exists()):
        logger.warning("%s is not a regular file holding a SHA-256 digest: ignored and replaced",
                       stamp)
    moved = 0
    eval_dir = run_dir / "eval"
    for f in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        if f.is_symlink():
            continue
        try:
            row = read_json(f)
        except Exception:  # an unreadable row is recomputed anyway
            continue
        if row.get("checkpoint") != checkpoint or row.get("kind") == REFUSED_KIND:
            continue
        computed_on = _row_checkpoint_sha(row) or old
        if computed_on == sha:
            continue
        dest = computed_on[:16] if computed_on else "unstamped"
        for src in [f, *(run_dir / "flags").glob(f"{glob.escape(f.stem)}.*")]:
            if src.is_symlink() or not src.is_file() or ident_problem(src.name, 255):
                continue  # not a file advbench wrote: left where it is
            target = inside(run_dir, "stale", dest, src.parent.name, src.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            src.replace(target)
        moved += 1
    if moved:
        logger.info("%s: %d result row(s) were not computed on its current content (sha256 %s, "
                    "stamp %s): they moved to %s and are recomputed", ckpt_path, moved,
                    sha[:12], old[:12] if old else "missing", run_dir / "stale")
    if old != sha:
        atomic_write_bytes(stamp, (sha + "\n").encode())
    return moved


def carry_training_failure(run_dir: Path) -> Optional[dict[str, Any]]:
    """A run whose training failed (NaN, ``FAILED.json``) or never finished is evaluated with
    a warning, and its health row is (re)written so the report marks its rows (‡).

    Returns:
        the health row when the run is not healthy-finished, else None.
    """
    from benchmark.run.health import FAILURE_FILE, write_health

    if (run_dir / "TRAINED").exists() and not (run_dir / FAILURE_FILE).exists():
        return None
    health = write_health(run_dir)
    logger.warning("%s: training %s (%s); its rows are marked unhealthy in the report",
                   run_dir, "failed" if health.get("verdict") == "nan" else "did not finish",
                   "; ".join(health.get("reasons") or []) or health.get("verdict"))
    return health
