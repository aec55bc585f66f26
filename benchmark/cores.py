"""Intra-op threads: every core for a single command, the free cores shared in a sweep.

* A single ``advbench evaluate`` / ``check`` uses every core this process may run on
  (:func:`use_all_cores`, unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise).
* The ``local`` launcher on CPU (:class:`CoreShare`) keeps one small file per running job
  holding its thread count, ``max(1, cores // running jobs)`` (the remainder to the jobs
  started first), rewritten whenever a job starts or ends. The job finds the file through
  ``ADVBENCH_THREADS_FILE`` and :func:`follow` applies a changed count between training
  steps and attack batches (one ``stat`` per call). So when the ``st`` job of the README's
  first run ends, the ``at`` job continues on both cores.

Numbers: ops that give the same result for any thread count give the same result whatever
the share (a test compares); on CPU the oneDNN convolution does not (measured on the
development machine: small-cnn weights after 5 SGD steps differ by up to 2.5e-5 between 1
and 2 threads), so a convolutional run of a sweep can differ in the last bits from the same
run made with another share, and a resume is bit-identical when it runs on the same thread
count. ``train_log.jsonl`` records ``torch_threads`` per epoch. ``--fixed-threads`` on
``advbench run`` turns the sharing off (each job keeps ``cores // jobs``).
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from benchmark.device import cpu_cores

logger = logging.getLogger(__name__)

#: environment variable naming a job's thread-share file
ENV = "ADVBENCH_THREADS_FILE"
_seen: dict[str, tuple[int, int]] = {}


def use_all_cores(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``threads``, else to ``OMP_NUM_THREADS`` where the
    environment sets it (an explicit choice too), else to every core; return the count."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    n = int(threads) if threads else int(env) if env.isdigit() and int(env) > 0 else cpu_cores()
    torch.set_num_threads(n)
    return n


def follow() -> Optional[int]:
    """Apply the launcher's current share to this process (no-op outside a shared sweep)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_mtime_ns)  # each write is a new file (os.replace)
        if _seen.get(path) == stamp:
            return None
        n = int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):  # mid-rename or gone (the launcher is ending)
        return None
    _seen[path] = stamp
    if n >= 1 and n != torch.get_num_threads():
        logger.info("intra-op threads %d -> %d (cores freed or taken by other jobs)",
                    torch.get_num_threads(), n)
        torch.set_num_threads(n)
    return n


class CoreShare:
    """Launcher side of the share: thread-count files of the running jobs in ``folder``.

    Args:
        folder: where the files go (one ``<job>.threads`` per running job).
        cores: the cores to share (default: this process's).
        parallel: jobs at a time; with ``jobs`` (all the launcher's jobs) it sets how many
            will run side by side, so the first job does not start on every core only to
            give half back a moment later.
    """

    def __init__(self, folder: Path | str, cores: Optional[int] = None, *, parallel: int = 1,
                 jobs: int = 1) -> None:
        self.folder, self.cores = Path(folder), int(cores or cpu_cores())
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parallel, self.unfinished = int(parallel), int(jobs)
        self.running: list[str] = []
        self._lock = threading.Lock()

    def shares(self) -> dict[str, int]:
        """Job name → threads: cores // (jobs side by side), the remainder to the earliest
        started; jobs side by side = the running ones, at least min(parallel, unfinished)."""
        k = max(len(self.running), min(self.parallel, self.unfinished), 1)
        base, extra = divmod(self.cores, k)
        return {j: max(1, base + (1 if i < extra else 0)) for i, j in enumerate(self.running)}

    def start(self, name: str) -> tuple[Path, int]:
        """Register a starting job; returns its file and its first thread count."""
        with self._lock:
            self.running.append(name)
            self._write()
            return self.path(name), self.shares()[name]

    def end(self, name: str) -> None:
        """A job ended (or will never start): the others get its cores."""
        with self._lock:
            if name in self.running:
                self.running.remove(name)
            self.unfinished = max(self.unfinished - 1, 0)
            self.path(name).unlink(missing_ok=True)
            self._write()

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.threads"

    def _write(self) -> None:
        for name, n in self.shares().items():
            p = self.path(name)
            if p.exists() and p.read_text().strip() == str(n):
                continue
            tmp = p.with_suffix(".tmp")
            tmp.write_text(f"{n}\n")
            os.replace(tmp, p)
