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

import enum
import io
import json
import logging
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from benchmark.config import RunConfig
from benchmark.errors import CheckpointError

logger = logging.getLogger(__name__)

CKPT_FORMAT = "advbench-checkpoint"
CKPT_VERSION = 1


class JobState(str, enum.Enum):
    NEW = "new"
    PARTIAL = "partial"
    TRAINED = "trained"
    DONE = "done"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + ``os.replace`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load {path} as a weights-only checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a truncated or corrupt line (crash mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping unreadable line %d of %s", i + 1, path)
    return rows


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


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
        return self.root / cfg.dataset / cfg.defense / cfg.run_id

    def runs(self) -> Iterator[Path]:
        """Every run folder (one holding a config.json) under the root."""
        yield from sorted(p.parent for p in self.root.glob("*/*/*/config.json"))

    @staticmethod
    def state(run_dir: Path, eval_keys: list[str] = ()) -> JobState:  # type: ignore[assignment]
        if (run_dir / "TRAINED").exists():
            done = all((run_dir / "eval" / f"{k}.json").exists() for k in eval_keys)
            return JobState.DONE if done else JobState.TRAINED
        if (run_dir / "ckpt_last.pt").exists():
            return JobState.PARTIAL
        return JobState.NEW

    def rows(self) -> list[dict[str, Any]]:
        """All evaluation rows under the root (unreadable files skipped with a warning)."""
        out = []
        for f in sorted(self.root.glob("*/*/*/eval/*.json")):
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError):
                logger.warning("skipping unreadable result %s", f)
        return out
