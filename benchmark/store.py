"""Run store: hashed run folders, atomic JSON, tolerant JSONL, markers and job states.

Layout (DomainBed's hashed job folders)::

    <runs>/<dataset>/<defense>/<run_id>/
        config.json          resolved RunConfig + environment + code version
        train_log.jsonl      one line per epoch
        ckpt_last.pt         model, optimizer, epoch, defense state, RNG states
        ckpt_best.pt         best epoch by validation PGD accuracy
        TRAINED              marker: training finished
        eval/<eval_key>.json one result row per (checkpoint, attack spec, n_examples)
        flags/<eval_key>.pt  per-sample clean and robust flags
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import io
import json
import logging
import os
import platform
import subprocess
import re
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from benchmark.config import RunConfig
from benchmark.errors import CheckpointError
from benchmark.safepath import HOST as _HOST, atomic_write_bytes, tmp_name as _tmp_name  # noqa: F401

logger = logging.getLogger(__name__)

CKPT_FORMAT = "advbench-checkpoint"
CKPT_VERSION = 1
_TMP_OWNER = re.compile(r"\.([A-Za-z0-9]+)-(\d+)\.[0-9a-f]+\.tmp$")


class JobState(str, enum.Enum):
    NEW = "new"
    PARTIAL = "partial"
    TRAINED = "trained"
    DONE = "done"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_tmp(folder: Path, *, max_age_s: float = 86400.0) -> list[Path]:
    """Remove temp files of atomic writes that were killed mid-write; return them.

    A temp file is an orphan when its writer (named in the file name) is a dead process on
    this host, or it is older than ``max_age_s`` (another host's, or an old naming).
    """
    removed = []
    if not folder.is_dir():
        return removed
    for f in folder.glob(".*.tmp"):
        m = _TMP_OWNER.search(f.name)
        try:
            if m and m.group(1) == _HOST:
                orphan = int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2)))
            else:
                orphan = time.time() - f.stat().st_mtime > (max_age_s if m else min(max_age_s, 60.0))
            if orphan:
                f.unlink()
                removed.append(f)
        except (OSError, ValueError):
            continue
    if removed:
        logger.info("removed %d orphan temp file(s) in %s", len(removed), folder)
    return removed


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the ``with`` block.

    The OS releases it when the process dies, so a killed job never blocks the next one. A
    second process (another launcher, another sweep on the same runs folder) waits here and
    then may find the work done: the block receives True when it had to wait, and the caller
    then re-reads its result. On a file system without locks it warns and continues unlocked.

    Args:
        lock_path: the lock file (kept; its content is irrelevant).
        what: what is being done, for the log line of a process that has to wait.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process %s", what)
            fcntl.flock(fh, fcntl.LOCK_EX)
            waited = True
        except OSError as exc:
            logger.warning("cannot lock %s (%s); continuing unlocked", lock_path, exc)
        yield waited  # closing the file releases the lock


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
                       .encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    Raises:
        CheckpointError: missing, truncated, corrupt or not a weights-only file.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before
            warnings.simplefilter("ignore", UserWarning)  # refusing it: the error says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        size = Path(path).stat().st_size
        raise CheckpointError(f"cannot load {path} as a weights-only checkpoint "
                              f"({'empty file' if size == 0 else detail})") from None


def repair_jsonl(path: Path) -> bool:
    """Make a JSONL file end in a complete line; return True if it was changed.

    A crash mid-append leaves a last line without its newline: if that line is a complete
    JSON object it only gets its newline, otherwise the fragment is cut off (with a warning),
    so that the next record never gets glued onto it.
    """
    if not path.exists():
        return False
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return False
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return False
        start = 0
        fh.seek(start)
        tail = fh.read()
        cut = tail.rfind(b"\n")
        last = tail[cut + 1:]
        try:
            complete = isinstance(json.loads(last), dict)
        except ValueError:
            complete = False
        if complete:
            fh.write(b"\n")
        else:
            fh.truncate(start + cut + 1 if cut >= 0 else 0)
            logger.warning("%s: dropped a truncated last line (%d bytes, a write cut short)",
                           path, len(last))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one JSON object as one line (after repairing a truncated last line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(path)
    with open(path, "a") as fh:
        fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace a JSONL file atomically with ``rows``."""
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n"
                                     for r in rows).encode())


def read_jsonl(path: Path, skipped: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """JSON objects of a JSONL file; a truncated or corrupt line (crash mid-write) and a line
    that is not an object are skipped: with a warning each, or described in ``skipped``."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            problem = f"line {i + 1}: not JSON (truncated?)"
        except RecursionError:
            problem = f"line {i + 1}: JSON nested too deeply"
        else:
            if isinstance(value, dict):
                rows.append(value)
                continue
            problem = f"line {i + 1}: not a JSON object"
        if skipped is None:
            logger.warning("%s: skipping %s", path, problem)
        else:
            skipped.append(problem)
    return rows


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file.

    Raises:
        CheckpointError: unreadable, not JSON, or not an object.
    """
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"cannot read {path}: expected a JSON object, got "
                              f"{type(value).__name__}")
    return value


def read_row(path: Path, skipped: Optional[list[str]] = None, *,
             strict: bool = False) -> Optional[dict[str, Any]]:
    """A stored result row, or None if it is unreadable or invalid
    (:func:`benchmark.validate.row_problem`): such a row is recomputed, never reused. The
    problem is logged as a warning, or appended to ``skipped``.

    Raises:
        DataError: with ``strict``, a row whose ``dataset`` or ``profile`` cannot name a
            file (:func:`benchmark.validate.path_problem`): the report refuses it.
    """
    from benchmark.errors import DataError
    from benchmark.validate import path_problem, row_problem

    if not Path(path).exists():
        return None
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem: Optional[str] = f"unreadable ({exc})"
    except RecursionError:
        problem = "unreadable (JSON nested too deeply)"
    else:
        bad_path = path_problem(row) if strict and isinstance(row, dict) else None
        if bad_path:
            raise DataError(f"{path}: {bad_path}")
        problem = row_problem(row)
    if problem is None:
        return row
    if skipped is None:
        logger.warning("ignoring result %s: %s", path, problem)
    else:
        skipped.append(f"{path}: {problem}")
    return None


def code_version() -> str:
    """Git commit of the advbench checkout (with ``+dirty``), or the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, text=True,
                             capture_output=True, timeout=5).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=here, text=True, capture_output=True, timeout=5).stdout
            return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version
        return "advbench-" + version("advbench")
    except Exception:
        return "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions and device facts recorded in configs and rows."""
    dev = torch.device(device)
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "device": str(dev), "threads": torch.get_num_threads(),
                           "cuda": torch.version.cuda, "host_cpu": platform.processor() or
                           platform.machine()}
    if dev.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunStore:
    """Folders of runs under one root."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def run_dir(self, cfg: RunConfig) -> Path:
        """``<root>/<dataset>/<defense>/<run_id>``, each an identifier (so the text cannot
        leave the root; a folder the user symlinked under the root is theirs to place).

        Raises:
            DataError: a name that is not an identifier.
        """
        from benchmark.safepath import identifier
        return self.root / identifier(cfg.dataset, "dataset") / \
            identifier(cfg.defense, "defense") / identifier(cfg.run_id, "run id")

    def runs(self) -> Iterator[Path]:
        """Every run folder (one holding a config.json) under the root."""
        yield from sorted(p.parent for p in self.root.glob("*/*/*/config.json"))

    @staticmethod
    def state(run_dir: Path, eval_keys: list[str] = ()) -> JobState:  # type: ignore[assignment]
        if (run_dir / "TRAINED").exists():
            done = all(read_row(run_dir / "eval" / f"{k}.json") is not None for k in eval_keys)
            return JobState.DONE if done else JobState.TRAINED
        if (run_dir / "ckpt_last.pt").exists():
            return JobState.PARTIAL
        return JobState.NEW

    def rows(self, skipped: Optional[list[str]] = None, *,
             strict: bool = False) -> list[dict[str, Any]]:
        """All valid evaluation rows under the root; the others are skipped (a warning each,
        or described in ``skipped``; with ``strict`` a row that cannot name a file raises
        :class:`~benchmark.errors.DataError`)."""
        out = []
        for f in sorted(self.root.glob("*/*/*/eval/*.json")):
            row = read_row(f, skipped, strict=strict)
            if row is not None:
                out.append(row)
        return out
