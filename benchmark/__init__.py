"""advbench harness: config, data, models, training loop, evaluation, store and reports."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(path: Any, *, which: str = "best", device: Any = "cpu") -> Any:
    """The trained model of a run folder or checkpoint (eval mode, inputs in [0,1], logits).

    See :func:`benchmark.run.resolve.load_model`.
    """
    from benchmark.run.resolve import load_model as _load
    return _load(path, which=which, device=device)


__all__ = ["load_model", "__version__"]
