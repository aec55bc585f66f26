"""advbench's headline, intervals and verdicts for any model: ``benchmark.evaluate_model``.

RobustBench's convention (``robustbench.eval.benchmark(model, dataset=..., threat_model=...,
eps=...)``): one call on a ``torch.nn.Module`` and a dataset returns the numbers. Here it
returns advbench's: the per-attack accuracies and the headline (the per-sample worst case over
every attack that ran), each with a 95% Wilson interval, the gradient-masking check rows with
their findings and marks, the verdict on the headline (``reliable``), and the per-sample flags.

The model's contract is advbench's own (and AutoAttack's, RobustBench's): inputs N×C×H×W in
[0,1], no normalisation applied outside the model; outputs N×K logits (not probabilities);
eval mode deterministic unless ``randomized=True``.

Nothing here evaluates on its own: the model is opened as a
:class:`~benchmark.eval.target.Target` (:func:`~benchmark.eval.target.model_target`) and goes
through :func:`~benchmark.eval.evaluate.evaluate_target` and
:func:`~benchmark.eval.checks.check_target`, the functions behind ``advbench evaluate`` and
``advbench check``, so the rows are the same rows and ``advbench report`` renders them.

Example::

    import benchmark
    result = benchmark.evaluate_model(model, dataset="cifar10", data_dir="DATA",
                                      threat_model="Linf", eps=8/255, n_examples=1000)
    print(result)                # accuracies, intervals, checks, verdict
    result.reliable              # "yes" | "no" | "–"
    result.to_frame()            # pandas
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from benchmark.api_result import EvaluationResult, build_result
from benchmark.data import DATASETS, Data, DataInfo, FloatSplit, dataset_info, load_dataset
from benchmark.errors import UsageError

logger = logging.getLogger(__name__)

#: RobustBench's threat-model names → advbench's norms
THREATS = {"Linf": "linf", "L2": "l2", "L1": "l1"}
#: ``attacks="standard"``: FGSM, PGD and AutoAttack's standard version of the norm
STANDARD = {"linf": "fgsm,pgd,autoattack", "l2": "pgd-l2,autoattack-l2",
            "l1": "pgd-l1,autoattack-l1"}
#: the paper's attack of a norm, whose protocol ε is the default ``eps``
PAPER_ATTACK = {"linf": "pgd", "l2": "pgd-l2", "l1": "pgd-l1"}
#: checks that do not depend on the norm (the only ones run for an ℓ2 or ℓ1 threat model;
#: the others attack in ℓ∞)
NORM_FREE_CHECKS = ("zero-gradient", "unstable")


def evaluate_model(model: nn.Module, *, dataset: Optional[str] = None,
                   data_dir: Optional[str | Path] = None, x: Optional[Tensor] = None,
                   y: Optional[Tensor] = None, threat_model: str = "Linf",
                   eps: Optional[float] = None, n_examples: Optional[int] = 1000,
                   attacks: str = "standard", checks: bool | str | Sequence[str] = True,
                   randomized: bool = False, source: Optional[nn.Module | str | Path] = None,
                   device: str | torch.device = "cpu", name: str = "model",
                   arch: Optional[str] = None, runs_dir: Optional[str | Path] = None, profile: str = "paper",
                   batch_size: Optional[int] = None, progress: bool = False,
                   objective: Any = None) -> EvaluationResult:
    """Attack a model, run the gradient-masking checks, and return advbench's verdict.

    Args:
        model: a ``torch.nn.Module``: inputs in [0,1] (N×C×H×W), N×K logits out.
        dataset: ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``mnist5k``, ``synthetic``
            or an image-folder name under ``data_dir`` (test split). With ``x``/``y``: only
            names the rows' dataset and its attack scale (default ``custom``).
        data_dir: root of the dataset's files (torchvision or image-folder layout).
        x: test inputs instead of a dataset, float N×C×H×W in [0,1].
        y: their labels, int N.
        threat_model: ``Linf``, ``L2`` or ``L1``.
        eps: the radius (default: the protocol's for the scale, e.g. 8/255 ℓ∞ on CIFAR).
        n_examples: the first N test points (None: all).
        attacks: ``standard`` (FGSM, PGD, AutoAttack) or advbench's column labels
            (``fgsm,pgd,cw``; ``advbench list attacks``); every one of the threat model's norm.
        checks: True (every check of the norm), ``cheap`` (``advbench run``'s subset), False,
            or check names (``zero-gradient,unbounded-eps``).
        randomized: the forward is random on purpose (AutoAttack's ``rand`` version, EOT).
        source: the transfer check's source model (an ``nn.Module``, a model file or an
            advbench run folder); None skips that check, and the verdict says so.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        name: the rows' defense label.
        arch: the architecture name the rows record (default: the module's class name).
        runs_dir: keep the rows in ``RUNS_DIR/<dataset>/<name>/<run_id>/`` (cached while
            the weights are unchanged; ``advbench report --runs-dir RUNS_DIR`` shows them
            beside advbench's runs); None: a temporary folder.
        profile: the report section the rows go to (``paper`` or ``cpu``).
        batch_size: attack batch (default: sized for the device).
        progress: show progress bars.
        objective: the model's own attack objective, ``loss(model, x', x, y) -> Tensor[N]``
            (an adaptive attack declared by its author): check (n) ``adaptive`` runs PGD on it
            and its flags enter the headline. A non-differentiable input preprocessing is
            declared in the model itself, by wrapping it in
            :class:`attacks.bpda.NonDifferentiable` (check (m), BPDA).

    Returns:
        The :class:`~benchmark.api_result.EvaluationResult`.

    Raises:
        UsageError: bad arguments, inputs outside [0,1], labels outside the model's classes,
            an output that is not N×K logits, a nondeterministic model not declared
            ``randomized``.
        NonFiniteError: NaN/inf outputs.
    """
    data = user_data(x, y, dataset) if x is not None or y is not None else \
        _load(dataset, data_dir)
    return evaluate_on_data(model, data, threat_model=threat_model, eps=eps,
                            n_examples=n_examples, attacks=attacks, checks=checks,
                            randomized=randomized, source=source, device=device, name=name,
                            arch=arch, runs_dir=runs_dir, profile=profile,
                            batch_size=batch_size, progress=progress, objective=objective)


def evaluate_on_data(model: nn.Module, data: Data, *, threat_model: str = "Linf",
                     eps: Optional[float] = None, n_examples: Optional[int] = 1000,
                     attacks: str = "standard", checks: bool | str | Sequence[str] = True,
                     randomized: bool = False, source: Optional[nn.Module | str | Path] = None,
                     device: str | torch.device = "cpu", name: str = "model",
                     arch: Optional[str] = None, runs_dir: Optional[str | Path] = None,
                     profile: str = "paper", batch_size: Optional[int] = None,
                     progress: bool = False, model_source: Optional[str] = None,
                     objective: Any = None) -> EvaluationResult:
    """:func:`evaluate_model` on loaded test data (``data.test``); ``model_source`` (a model
    file's path) is recorded in the rows. ``advbench evaluate/check --model-file`` call this."""
    from benchmark.device import default_eval_batch_size
    from benchmark.eval.checks import CHECKS, check_target
    from benchmark.eval.evaluate import evaluate_target
    from benchmark.eval.target import model_target
    from benchmark.run.protocols import attack_specs, resolve_specs

    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if threat_model not in THREATS:
        raise UsageError(f"threat_model {threat_model!r}: one of {', '.join(THREATS)}")
    if n_examples is not None and (isinstance(n_examples, bool) or not isinstance(
            n_examples, int) or n_examples < 1):
        raise UsageError(f"n_examples must be a positive integer or None, got {n_examples!r}")
    norm = THREATS[threat_model]
    info = data.info
    eps = float(attack_specs(info.scale)[PAPER_ATTACK[norm]].eps) if eps is None else eps
    t = model_target(model, info, name=name, eps=eps, norm=norm, arch=arch, profile=profile,
                     randomized=randomized, device=device, runs_dir=runs_dir,
                     source=model_source, objective=objective)
    n = len(data.test) if n_examples is None else min(n_examples, len(data.test))
    check_outputs(t.model, data, t.device, info.num_classes)
    specs = resolve_specs(STANDARD[norm] if attacks == "standard" else attacks, info.scale,
                          eps=float(eps))
    wrong = sorted({s.label for s in specs if s.norm != norm})
    if wrong:
        raise UsageError(f"attacks {', '.join(wrong)} are not {threat_model} attacks")
    bs = batch_size or default_eval_batch_size(t.device, t.cfg.arch)
    rows = evaluate_target(t, specs, n_examples=n, batch_size=bs, data=data, progress=progress)
    names = _check_names(checks, norm, CHECKS)
    check_rows: list[dict[str, Any]] = []
    if names:
        src, note = _source(source, t.device, info)
        check_rows = [r for r in check_target(
            t, eps=[float(eps)], n_examples=n, names=names, cheap=checks == "cheap",
            batch_size=bs, data=data, source=src, source_note=note) if r.get("kind") == "check"]
    return build_result(t, rows, check_rows, n)


def user_data(x: Optional[Tensor], y: Optional[Tensor], dataset: Optional[str]) -> Data:
    """``x``/``y`` as a test split (kept as floats), checked: shapes, [0,1], integer labels.

    Raises:
        UsageError: one of them missing, or not what the contract says.
    """
    if x is None or y is None:
        raise UsageError("give both x and y (or neither, and a dataset)")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise UsageError("x and y must be torch tensors")
    if x.dim() != 4 or not x.is_floating_point():
        raise UsageError(f"x must be float N×C×H×W, got {x.dtype} {tuple(x.shape)}")
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool or len(y) != len(x):
        raise UsageError(f"y must be {len(x)} integer labels, got {y.dtype} {tuple(y.shape)}")
    if len(x) == 0:
        raise UsageError("x holds no points")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise UsageError("x must hold finite values in [0,1] (advbench's input contract; "
                         "normalise inside the model)")
    if int(y.min()) < 0:
        raise UsageError("y holds negative labels")
    c, h = int(x.shape[1]), int(x.shape[2])
    known = dataset_info(dataset) if dataset in DATASETS else None
    if known is not None and (known.in_channels, known.image_size) != (c, h):
        raise UsageError(f"x is {c}×{h}×{x.shape[3]}, {dataset} images are "
                         f"{known.in_channels}×{known.image_size}×{known.image_size}")
    digest = __import__("hashlib").sha256(x.detach().cpu().contiguous().numpy().tobytes()
                                         ).hexdigest()[:12]
    info = DataInfo(dataset or "custom", known.num_classes if known else int(y.max()) + 1, c, h,
                    (0.5,) * c, (0.5,) * c, known.scale if known else
                    ("mnist" if c == 1 else "cifar"),
                    provenance=f"user-supplied tensors: {len(y)} points, sha256 {digest}")
    x, y = x.detach().float().cpu(), y.detach().long().cpu()
    return Data(info, FloatSplit(x[:0], y[:0]), FloatSplit(x, y))


def _load(dataset: Optional[str], data_dir: Optional[str | Path]) -> Data:
    if not dataset:
        raise UsageError("give a dataset (cifar10, mnist, ...) or test points x=, y=")
    return load_dataset(dataset, Path(data_dir) if data_dir else None)


def check_outputs(model: nn.Module, data: Data, device: torch.device, k: int) -> None:
    """The model returns N×K logits on the first test points, K = the dataset's classes.

    Raises:
        UsageError: any other output (one line naming the shape).
    """
    xb = data.test.floats(device)[0][:2]
    with torch.no_grad():
        try:
            out = model(xb)
        except Exception as exc:  # the user's model failed on the contract's inputs
            raise UsageError(f"model failed on {tuple(xb.shape)} inputs in [0,1]: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                             ) from None
    if not isinstance(out, Tensor) or tuple(out.shape) != (len(xb), k):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UsageError(f"model must return N×{k} logits for {data.info.name} "
                         f"({k} classes), got {shape}")


def _check_names(checks: bool | str | Sequence[str], norm: str, valid: Sequence[str]
                 ) -> list[str]:
    from benchmark.eval.checks import CHEAP, PER_NORM
    if checks is False or checks is None:
        return []
    if checks is True or checks == "cheap":
        names = [c for c in (CHEAP if checks == "cheap" else valid) if c not in PER_NORM]
    else:
        names = [c.strip() for c in (checks.split(",") if isinstance(checks, str) else checks)
                 if c.strip()]
        bad = sorted(set(names) - set(valid))
        if bad:
            raise UsageError(f"unknown checks {bad}; valid: {', '.join(valid)}")
    if norm != "linf":
        names = [c for c in names if c in NORM_FREE_CHECKS]
    return names


def _source(source: Any, device: torch.device, info: DataInfo
            ) -> tuple[Optional[Any], str]:
    """(transfer source, its note): a module as given, a model file opened without running
    code, a run folder or checkpoint path as it is; None with the reason."""
    if source is None:
        return None, "none given (source= in Python, --source FILE in the CLI)"
    if isinstance(source, nn.Module):
        return source.to(device).eval(), "nn.Module (Python API)"
    path = Path(source)
    from benchmark.modelfile import sniff
    if path.is_file() and sniff(path) == "safetensors":
        raise UsageError(f"source {path}: safetensors weights need their architecture; load "
                         f"them with benchmark.load_model_file(path, arch) and pass the module")
    if path.is_file() and sniff(path) == "pt2":
        from benchmark.modelfile import load_model_file
        return load_model_file(path, None, info).to(device).eval(), str(path)
    return path, str(path)


__all__ = ["evaluate_model", "evaluate_on_data", "EvaluationResult", "THREATS", "STANDARD"]
