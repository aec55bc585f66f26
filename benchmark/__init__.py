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


#: public names imported on first use (``import benchmark`` stays light)
_LAZY = {"evaluate_model": "benchmark.api", "EvaluationResult": "benchmark.api_result",
         "load_model_file": "benchmark.modelfile"}


def __getattr__(name: str) -> Any:
    """``benchmark.evaluate_model`` (:func:`benchmark.api.evaluate_model`: advbench's
    accuracies, headline, intervals and masking verdict for any ``torch.nn.Module``),
    ``benchmark.EvaluationResult`` and ``benchmark.load_model_file``
    (:func:`benchmark.modelfile.load_model_file`), imported on first use."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'benchmark' has no attribute {name!r}")


__all__ = ["load_model", "evaluate_model", "EvaluationResult", "load_model_file",
           "__version__"]
