"""Device helpers shared by training, evaluation and the launchers."""
from __future__ import annotations

import os
from typing import Optional

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else as given.

    Raises:
        UsageError: not a device name, or a device this machine does not have.
    """
    from benchmark.validate import check_device

    check_device(str(device))
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_eval_batch_size(device: str | torch.device, arch: Optional[str] = None) -> int:
    """Evaluation batch sized for the device: 256 on CPU; on a GPU 1024 (512 under 40 GiB),
    a quarter of that for WRN-34-10, whose attack activations are ~8x ResNet-18's."""
    dev = resolve_device(str(device))
    if dev.type != "cuda":
        return 256
    mem_gib = torch.cuda.get_device_properties(dev).total_memory / 2 ** 30
    size = 1024 if mem_gib >= 40 else 512
    return size // 4 if arch and arch.startswith("wrn") else size


def peak_memory_mb(dev: torch.device) -> float:
    """Peak memory of this process so far, in MiB: CUDA max allocated on a GPU, else max RSS."""
    if dev.type == "cuda":
        return round(torch.cuda.max_memory_allocated(dev) / 2 ** 20, 1)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def visible_gpus() -> list[str]:
    """GPU ids visible to this process (``CUDA_VISIBLE_DEVICES`` if set, else every device)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover
        return []
