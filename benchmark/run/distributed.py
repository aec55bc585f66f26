"""Data-parallel training of one run over several processes (torch DistributedDataParallel).

Entry points, all equivalent::

    torchrun --nproc_per_node=4 -m benchmark.cli train --defense trades --dataset cifar10 ...
    advbench train --ddp 4 ...                    # spawns the 4 local processes itself
    advbench run --launcher submitit --gpus-per-job 4 ...   # one DDP job per run on Slurm

Semantics (what makes an N-process run equal a 1-process run with the same global batch):

* Every rank builds the same global batch (same loader seed, same augmentation draws) and
  keeps a disjoint contiguous shard of it (:meth:`DistEnv.shard`); shard sizes differ by at
  most one, and the shard's loss is scaled by ``n_rank · N / n_global`` so that DDP's gradient
  average equals the gradient of the global-batch loss even when the last batch does not
  divide evenly. (Each rank augments the whole global batch so that the loader's generator
  advances alike everywhere; the tensor augmentation is cheap next to a PGD step.)
* The whole defense step (training attack + loss) runs inside ONE DDP forward
  (:class:`StepModule`), so defenses may call ``model(x)``, ``model.features(x)`` or the head
  any number of times; gradients are all-reduced once, during ``backward``.
* Randomness inside the step (PGD random starts, Gumbel noise, dropout) comes from the global
  torch RNG, reseeded per (seed, epoch, rank) at each epoch start, so ranks draw different
  starts and a resumed DDP run equals an uninterrupted one. Such draws cannot match the
  single-process stream sample for sample: equality with a 1-process run is exact (to float
  tolerance) only for steps that draw no random numbers (``tests/test_ddp.py`` checks ``st``
  and ``at`` with ε = 0); for the rest the two runs are equal in distribution.
* BatchNorm: each rank normalises with its shard's statistics (the usual DDP behaviour) and
  running statistics are broadcast from rank 0 at every step, so a BN model trained on N
  ranks is not bit-equal to the 1-process model. ``--sync-bn`` (CUDA only; torch's
  SyncBatchNorm has no CPU kernel) computes batch statistics over the global batch instead.
* Defense state (e.g. IKL's class-wise statistics) is broadcast from rank 0 after every
  epoch, so such statistics come from rank 0's shard: see :func:`broadcast_defense_state`.
* Only rank 0 writes files (config, checkpoints, log, markers) and runs validation.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmark.config import stable_hash
from benchmark.errors import AdvbenchError, UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of a global batch of ``n`` (sizes differ by ≤ 1)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """This rank's slice of a global batch and its loss weight ``n_rank · N / n``."""
        n = int(y.shape[0])
        start, stop = self.shard_bounds(n)
        if stop == start:
            raise UsageError(f"a global batch of {n} samples cannot feed {self.world_size} "
                             f"processes; change batch_size/train_subset")
        return x[start:stop], y[start:stop], (stop - start) * self.world_size / n


def current() -> DistEnv:
    """The initialised process group's rank/size, or the single-process default."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistEnv(dist.get_rank(), dist.get_world_size(),
                       int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistEnv()


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun / :func:`launch_local` / submitit (1 if unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    """Give each rank its own GPU (``cuda`` → ``cuda:LOCAL_RANK``); CPU stays CPU."""
    if device.type == "cuda" and env.active:
        device = torch.device("cuda", env.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistEnv]:
    """Join the process group described by the environment (torchrun's variables) if any.

    NCCL for CUDA devices, gloo otherwise. Destroys the group on exit if it created it. Without
    ``WORLD_SIZE > 1`` it yields the single-process :class:`DistEnv` and does nothing.
    """
    if env_world_size() <= 1 or dist.is_initialized():
        yield current()
        return
    cuda = torch.cuda.is_available() and device != "cpu" and not device.startswith("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    logger.info("rank %d/%d joined the %s process group", dist.get_rank(),
                dist.get_world_size(), backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def seed_rank(seed: int, epoch: int, env: DistEnv) -> None:
    """Reseed the global torch RNG (CPU and CUDA) from (seed, epoch, rank): in-step draws."""
    torch.manual_seed(int(stable_hash({"seed": seed, "epoch": epoch, "rank": env.rank}, 15), 16))


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def all_reduce_sum(values: Tensor, env: DistEnv) -> Tensor:
    """Sum a float64 vector over ranks (identity when not distributed)."""
    if env.active:
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_defense_state(defense: Any, env: DistEnv) -> None:
    """Give every rank rank 0's defense state (e.g. IKL's class statistics), once per epoch.

    Defense state that a step accumulates from its data would otherwise drift apart between
    ranks (each sees its shard) and a resumed run, which loads rank 0's state everywhere, would
    differ from an uninterrupted one. Deviation: such statistics then come from rank 0's shard
    (1/N of the data) rather than from the whole epoch.
    """
    if not env.active:
        return
    box = [defense.state_dict() if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    if not env.is_main:
        defense.load_state_dict(box[0])


class StepModule(nn.Module):
    """One defense training step as a module, so that DDP wraps the whole step.

    ``forward(x, y, epoch, step)`` runs ``defense.training_step`` (training attack + loss) under
    the run's autocast and returns ``(loss, metrics, logits)``.
    """

    def __init__(self, model: nn.Module, defense: Any,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        super().__init__()
        self.model = model
        self.defense = defense
        self._autocast = autocast

    def forward(self, x: Tensor, y: Tensor, epoch: int, step: int
                ) -> tuple[Tensor, Mapping[str, Tensor], Optional[Tensor]]:
        with self._autocast():
            out = self.defense.training_step(self.model, x, y, epoch=epoch, step=step)
        return out.loss, dict(out.metrics), out.logits


def wrap_step(model: nn.Module, defense: Any, autocast: Callable[[], Any],
              device: torch.device) -> nn.Module:
    """DDP over :class:`StepModule` (device_ids for CUDA, none for CPU/gloo)."""
    step = StepModule(model, defense, autocast)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step, device_ids=ids)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm → SyncBatchNorm (global-batch statistics). CUDA only.

    Raises:
        UsageError: on CPU, where torch's SyncBatchNorm does not run.
    """
    if device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, nprocs: int, port: int, fn: Callable[..., Any], args: Sequence[Any],
            threads: Optional[int], log_level: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                       "LOCAL_WORLD_SIZE": str(nprocs)})
    if not logging.getLogger().handlers:  # spawned: configure like the parent, rank-tagged
        logging.basicConfig(level=log_level, datefmt="%H:%M:%S",
                            format=f"%(asctime)s %(levelname).1s [rank {rank}] %(name)s: "
                                   f"%(message)s")
    if threads:
        torch.set_num_threads(threads)
    fn(*args)


def launch_local(nprocs: int, fn: Callable[..., Any], args: Sequence[Any] = (), *,
                 start_method: str = "spawn", threads: Optional[int] = None) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes with torchrun's environment variables.

    The equivalent of ``torchrun --standalone --nproc_per_node=nprocs``; ``fn`` (a module-level
    function, for ``spawn``) typically enters :func:`process_group`. ``threads`` sets each
    worker's intra-op threads (default: the cores divided among the workers).

    Raises:
        AdvbenchError: a worker failed (its error's last line; the traceback is logged).
    """
    import torch.multiprocessing as mp

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nprocs)
    try:
        mp.start_processes(_worker, args=(nprocs, free_port(), fn, tuple(args), threads,
                                          logging.getLogger().getEffectiveLevel()),
                           nprocs=nprocs, join=True, start_method=start_method)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        logger.error("%s", exc)
        last = [ln for ln in str(exc).strip().splitlines() if ln.strip()][-1]
        raise AdvbenchError(f"a DDP worker failed: {last}") from None
