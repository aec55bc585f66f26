"""RobustBench zoo models as baselines: build the architecture, load local weights, evaluate.

``advbench evaluate --robustbench NAME --threat Linf --dataset cifar10 --model-dir DIR`` builds
``NAME``'s architecture through robustbench, loads its weights from ``DIR`` (RobustBench's own
layout, ``DIR/<dataset>/<threat>/<NAME>.pt``, what ``robustbench.utils.load_model`` writes;
ensembles ``<NAME>.pt_m<i>.pt``) and evaluates it with the same attack suites and rows as a
trained run: ``defense`` = ``rb:NAME``, ``checkpoint`` = ``zoo``, arch = RobustBench's
architecture name, rows under ``RUNS/<dataset>/rb-NAME/<id>/eval/`` so ``advbench report``
merges them with the trained runs. Nothing is downloaded unless ``download=True``
(``--download``); robustbench reads the file with ``torch.load``, whose default in the torch
versions advbench supports is ``weights_only=True``.

Compatibility layer (SPEC §1): robustbench 1.1.1 from PyPI does not import as published. It
imports ``pkg_resources`` (gone from new setuptools) and a module named ``autoattack``, which
the PyPI package ``pyautoattack`` provides under another name. :func:`import_robustbench`
installs ``sys.modules`` aliases ``autoattack`` → ``pyautoattack`` (and ``autoattack.state``)
and, only where ``pkg_resources`` is missing, a stub with the one function robustbench uses
(``resource_filename``). It runs only when a zoo model is asked for; nothing else in advbench
imports robustbench. robustbench's own ``benchmark()`` stays unusable (it passes ``log_path``/
``bs`` that pyautoattack does not take); advbench's evaluation replaces it.
"""
from __future__ import annotations

import hashlib

import importlib
import logging
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Optional

from torch import nn

from attacks.base import ce_objective
from benchmark.config import RunConfig, stable_hash
from benchmark.data import dataset_info
from benchmark.errors import AdvbenchError, CheckpointError, UsageError
from benchmark.eval.target import Target

logger = logging.getLogger(__name__)

#: RobustBench's threat names and the nominal ε advbench's suites use for them (CIFAR scale)
THREATS = {"Linf": ("linf", 8 / 255), "L2": ("l2", 0.5)}
DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}


def import_robustbench() -> types.ModuleType:
    """``import robustbench`` with the aliases and stub it needs (see the module docstring).

    Raises:
        UsageError: robustbench is not installed (``pip install 'advbench[zoo]'``).
    """
    import pyautoattack
    import pyautoattack.state

    sys.modules.setdefault("autoattack", pyautoattack)
    sys.modules.setdefault("autoattack.state", pyautoattack.state)
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")

        def resource_filename(package: str, path: str) -> str:
            return str(Path(importlib.import_module(package).__file__).parent / path)

        stub.resource_filename = resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stub
    try:
        import robustbench
        import robustbench.utils  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"RobustBench models need robustbench: pip install 'advbench[zoo]' "
                         f"({exc})") from None
    return robustbench


class ZooDefense:
    """What the evaluation needs of a defense, for a model that advbench did not train."""

    randomized = False

    def objective(self) -> Any:
        """The adaptive attack's loss: cross-entropy (a zoo model brings no training loss)."""
        return ce_objective

    def class_centers(self, model: nn.Module) -> None:
        return None


def published(name: str, dataset: str = "cifar10", threat: str = "Linf") -> dict[str, str]:
    """RobustBench's leaderboard row of a model as printed in the installed package's README
    (paper title and link, clean and AutoAttack accuracy, architecture, venue); {} if absent."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        text = metadata("robustbench").get_payload() or ""  # type: ignore[attr-defined]
    except PackageNotFoundError:
        return {}
    heading = {"cifar10": "### CIFAR-10", "cifar100": "### CIFAR-100"}.get(dataset)
    if heading is None or heading not in text:
        return {}
    part = text.split(heading + "\n", 1)[1]
    part = part.split("\n### ", 1)[0]
    sub = re.search(rf"#### {re.escape(threat)}[^\n]*\n(.*?)(?=\n#### |\Z)", part, re.S)
    if not sub:
        return {}
    for line in sub.group(1).splitlines():
        cells = [re.sub(r"</?su[bp]>|\*", "", c).strip() for c in line.strip().strip("|")
                 .split("|")]
        if len(cells) >= 7 and cells[1] == name:
            m = re.match(r"\[(.*)\]\((\S+)\)", cells[2])
            return {"name": m.group(1) if m else cells[2], "link": m.group(2) if m else "",
                    "clean_acc": cells[3].rstrip("%"), "autoattack_acc": cells[4].rstrip("%"),
                    "architecture": cells[-2], "venue": cells[-1]}
    return {}


def weight_files(name: str, dataset: str, threat: str, model_dir: Path,
                 entry: dict[str, Any]) -> list[Path]:
    """The local files robustbench's ``load_model`` reads for this model."""
    path = Path(model_dir) / dataset / threat / f"{name}.pt"
    ids = entry.get("gdrive_id")
    if isinstance(ids, list):
        return [Path(f"{path}_m{i}.pt") for i in range(len(ids))]
    return [path]


def zoo_target(name: str, *, threat: str = "Linf", dataset: str = "cifar10",
               model_dir: Path | str = "models", runs_dir: Path | str = "runs",
               profile: str = "paper", download: bool = False,
               device: str = "cpu") -> Target:
    """Build and load RobustBench model ``name``; rows go to ``RUNS/<dataset>/rb-<name>/<id>``.

    Raises:
        UsageError: unknown dataset, threat or model name; weights missing without ``download``.
    """
    if dataset not in DATASETS:
        raise UsageError(f"--dataset for RobustBench models: one of {', '.join(DATASETS)}")
    if threat not in THREATS:
        raise UsageError(f"--threat: one of {', '.join(THREATS)}")
    with warnings.catch_warnings():  # robustbench's imports warn about torch APIs
        warnings.simplefilter("ignore", FutureWarning)
        rb = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if name not in zoo:
        close = [n for n in zoo if n.lower().startswith(name.lower()[:6])][:8]
        raise UsageError(f"no RobustBench model {name!r} for {dataset}/{threat}"
                         + (f"; similar: {', '.join(close)}" if close else
                            f" ({len(zoo)} models; see robustbench's model zoo)"))
    files = weight_files(name, dataset, threat, Path(model_dir), zoo[name])
    missing = [f for f in files if not f.is_file()]
    if missing and not download:
        raise UsageError(f"no weights for {name} at {missing[0]} (RobustBench layout "
                         f"MODEL_DIR/{dataset}/{threat}/{name}.pt); put them there or pass "
                         f"--download to let robustbench fetch them")
    try:
        with warnings.catch_warnings():  # torch.load's notes on a foreign file: not ours
            warnings.simplefilter("ignore")
            model = rb.utils.load_model(name, model_dir=str(model_dir), dataset=dataset,
                                        threat_model=threat).eval()
    except (AdvbenchError, OSError):
        raise
    except Exception as exc:  # a foreign file at the I/O boundary: the user's input
        why = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"cannot load RobustBench weights {files[0]}: "
                              f"{type(exc).__name__}: {why}") from None
    info = published(name, dataset, threat)
    norm, eps = THREATS[threat]
    arch = info.get("architecture") or type(model).__name__
    hparams = {"eps": eps, "norm": norm, "zoo": "robustbench", "zoo_model": name,
               "zoo_threat": threat, "robustbench_version": getattr(rb, "__version__", "1.1.1")}
    cfg = RunConfig(defense=f"rb:{name}", dataset=dataset, arch=arch, profile=profile, seed=0,
                    hparams=hparams)
    out = Path(runs_dir) / dataset / f"rb-{name}" / cfg.run_id
    digest = stable_hash([f.stat().st_size for f in files if f.is_file()], 8)
    row_extra: dict[str, Any] = {"zoo": {"source": "robustbench", "name": name, "threat": threat,
                                         "files": [str(f) for f in files], "size_hash": digest}}
    if info.get("link"):
        row_extra["paper"] = info["link"]
        row_extra["zoo"]["published"] = info
    from benchmark.device import resolve_device
    from benchmark.eval.target import file_sha256
    dev = resolve_device(device)
    shas = [file_sha256(f) for f in files if f.is_file()]
    sha = shas[0] if len(shas) == 1 else hashlib.sha256("".join(shas).encode()).hexdigest()
    return Target(model=model.to(dev), defense=ZooDefense(), cfg=cfg,
                  info=dataset_info(dataset), device=dev, ckpt_path=files[0], checkpoint="zoo",
                  epoch=0, out_dir=out, config={"git": None}, row_extra=row_extra,
                  ckpt_sha256=sha)


def evaluate_zoo(name: str, *, threat: str = "Linf", dataset: str = "cifar10",
                 model_dir: Path | str = "models", runs_dir: Path | str = "runs",
                 profile: str = "paper", download: bool = False, attacks: Optional[str] = None,
                 suite: Optional[str] = None, eps: Optional[str] = None, device: str = "cpu",
                 **kwargs: Any) -> list[dict[str, Any]]:
    """Evaluate zoo model ``name`` under ``--attacks/--suite/--eps`` like a trained run.

    ``kwargs`` go to :func:`benchmark.eval.evaluate.evaluate_target` (``n_examples``,
    ``batch_size``, ``data_dir``, ``force``, ``progress``). ``profile`` only sets the default
    number of test points (``paper``: the whole test set) and the report section.
    """
    from benchmark.eval.evaluate import evaluate_target
    from benchmark.run.protocols import parse_eps_list, resolve_specs

    t = zoo_target(name, threat=threat, dataset=dataset, model_dir=model_dir,
                   runs_dir=runs_dir, profile=profile, download=download, device=device)
    norm = THREATS[threat][0]
    specs = resolve_specs(attacks, t.info.scale, suite=suite, eps=parse_eps_list(eps))
    if norm != "linf":
        specs = [s for s in specs if s.norm == norm] or specs
    return evaluate_target(t, specs, **kwargs)
