"""Model files that run no code when loaded: safetensors weights + an architecture name, or a
``torch.export`` program (``.pt2``) that loads without any unrestricted unpickling.

RobustBench's way: the architecture is code advbench (or timm) ships, the file holds plain
tensors. The format is told from the file's bytes, never from its name:

* **safetensors** (the ``safetensors`` package): a JSON header and raw tensor bytes; nothing in
  it can run. Needs ``arch``: one of advbench's (``advbench list archs``: backbone + linear
  head, normalisation inside, as :func:`benchmark.models.create` builds it) or, when timm is
  installed (optional: ``pip install timm``), a timm model name (``timm.create_model(arch,
  num_classes=K, in_chans=C)``; it sees the [0,1] inputs as they are). The weights must fit
  the architecture exactly (``load_state_dict(strict=True)``).
* **.pt2** (``torch.export.save``): ``torch.export.load`` unpickles parts of the archive and, in
  torch 2.14, retries a failed weights-only unpickling with an unrestricted
  ``torch.load(weights_only=False)``, and loads pickled weights, custom and opaque objects and
  AOTInductor libraries unrestricted. Accepted only when the archive holds none of those
  (read from its JSON configs first), and loaded with every ``torch.load`` forced to
  ``weights_only=True``, so a file that needs the fallback is refused instead of run.
* Refused: TorchScript (``torch.jit.load`` deserialises code), ``torch.save`` pickles
  (``.pt``/``.pth``/``.ckpt``; advbench's own checkpoints go through ``--checkpoint-file``,
  read weights-only), anything else.

Every refusal is a :class:`~benchmark.errors.CheckpointError` (exit 2, one line).
"""
from __future__ import annotations

import contextlib
import json
import logging
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from benchmark.data import DataInfo
from benchmark.errors import CheckpointError, UsageError

logger = logging.getLogger(__name__)

#: what ``--model-file`` accepts
FORMATS = ("safetensors", "pt2")


def sniff(path: Path) -> str:
    """The file's format from its bytes: ``safetensors``, ``pt2``, ``torchscript``,
    ``torch-pickle``, ``pickle`` or ``unknown``."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000 and n + 8 <= path.stat().st_size:
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.endswith("/archive_format") for n in names):
            return "pt2"
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") for n in names):
            return "torch-pickle"
        return "unknown"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def is_model_file(path: Path | str) -> bool:
    """Whether ``path`` is a file in one of the accepted formats (by its bytes)."""
    p = Path(path)
    return p.is_file() and sniff(p) in FORMATS


def load_model_file(path: Path | str, arch: Optional[str] = None,
                    info: DataInfo | str = "cifar10") -> nn.Module:
    """Build the model of a model file, in eval mode, without running code from the file.

    Args:
        path: a safetensors or ``.pt2`` file.
        arch: the architecture of safetensors weights (advbench's or timm's); ignored for
            ``.pt2`` (the program holds its graph).
        info: the dataset or its name (classes, channels, normalisation of advbench's
            archs).

    Raises:
        CheckpointError: a refused or unreadable format, or weights that do not fit ``arch``.
        UsageError: safetensors without ``arch``, an unknown arch, timm missing.
    """
    path = Path(path)
    if isinstance(info, str):
        from benchmark.data import dataset_info
        info = dataset_info(info)
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    kind = sniff(path)
    if kind == "safetensors":
        if not arch:
            raise UsageError(f"{path} holds safetensors weights: name their architecture "
                             f"(--arch: advbench list archs, or a timm model name)")
        return _from_safetensors(path, arch, info)
    if kind == "pt2":
        return _from_pt2(path)
    why = {"torchscript": "TorchScript, whose loading deserialises code",
           "torch-pickle": "a torch.save pickle, which can run code when unpickled (advbench "
                           "checkpoints: --checkpoint-file)",
           "pickle": "a Python pickle, which can run code when unpickled"}.get(kind, "not a "
                                                                              "recognised format")
    raise CheckpointError(f"model file {path} refused: {why}; accepted: safetensors weights "
                          f"+ --arch, or a torch.export .pt2 without pickled parts")


def build_arch(arch: str, info: DataInfo) -> nn.Module:
    """An untrained model of ``arch``: advbench's (:func:`benchmark.models.create`), else timm's.

    Raises:
        UsageError: neither advbench nor timm knows ``arch``, or timm is not installed.
    """
    from benchmark.models import ARCHS, create
    if arch in ARCHS:
        return create(arch, num_classes=info.num_classes, in_channels=info.in_channels,
                             mean=info.mean, std=info.std)
    try:
        import timm
    except ImportError:
        raise UsageError(f"arch {arch!r} is not one of advbench's ({', '.join(ARCHS)}); "
                         f"timm architectures need timm: pip install timm") from None
    if not timm.is_model(arch):
        raise UsageError(f"unknown arch {arch!r}: not one of advbench's "
                         f"({', '.join(ARCHS)}) nor a timm model name")
    return timm.create_model(arch, pretrained=False, num_classes=info.num_classes,
                             in_chans=info.in_channels)


def _from_safetensors(path: Path, arch: str, info: DataInfo) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    model = build_arch(arch, info)
    try:
        state = load_file(str(path))
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"model file {path}: unreadable safetensors: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise CheckpointError(f"model file {path}: the weights do not fit arch {arch} with "
                              f"{info.num_classes} classes: "
                              f"{' '.join(first[1:2] or first[:1]).strip()}") from None
    return model.eval()


#: parts of a .pt2 archive that torch.export.load reads without restriction
_UNSAFE_PREFIXES = ("custom_obj", "opaque_obj")


def _pt2_unsafe_parts(path: Path) -> list[str]:
    """Names of the archive's parts that would be unpickled or loaded as code unrestricted."""
    bad = []
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            low = name.lower()
            if "aotinductor" in low or low.endswith((".so", ".dll", ".dylib", ".cpp")):
                bad.append(name)
            if name.endswith("_config.json") and ("/weights/" in name or "/constants/" in name):
                try:
                    config = json.loads(z.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    bad.append(name)
                    continue
                for fqn, meta in config.items():
                    if not isinstance(meta, dict) or meta.get("use_pickle") or str(
                            meta.get("path_name", "")).startswith(_UNSAFE_PREFIXES):
                        bad.append(f"{name}:{fqn}")
    return bad


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Inside: every ``torch.load`` is weights-only; one asking for ``weights_only=False``
    raises :class:`CheckpointError` instead of unpickling."""
    real = torch.load

    def guarded(f: Any, *args: Any, weights_only: Optional[bool] = None, **kw: Any) -> Any:
        if weights_only is False:
            raise CheckpointError("needs an unrestricted unpickler (torch.load(weights_only="
                                  "False))")
        return real(f, *args, weights_only=True, **kw)

    torch.load = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real  # type: ignore[assignment]


def _from_pt2(path: Path) -> nn.Module:
    bad = _pt2_unsafe_parts(path)
    if bad:
        raise CheckpointError(f"model file {path} refused: torch.export.load would unpickle or "
                              f"load {len(bad)} part(s) without restriction, e.g. {bad[0]}")
    import warnings
    try:
        with weights_only_torch_load(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except CheckpointError as exc:
        raise CheckpointError(f"model file {path} refused: {exc}") from None
    except Exception as exc:  # a foreign file at the I/O boundary: the user's input
        raise CheckpointError(f"model file {path}: not a loadable torch.export program: "
                              f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                              ) from None
    return ExportedModel(program.module()).eval()


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module. Its mode was fixed when it was exported (the
    graph holds eval-mode ops), so ``train``/``eval`` only set this wrapper's flag (the
    program's own module refuses ``eval()``)."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)
