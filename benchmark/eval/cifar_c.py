"""Regenerate CIFAR-10-C from CIFAR-10's test images (for machines that cannot download it).

Hendrycks & Dietterich (ICLR 2019, arXiv 1903.12261) made CIFAR-10-C with
``ImageNet-C/create_c/make_cifar_c.py`` (repository hendrycks/robustness, commit ca36008).
That script has its own CIFAR severity parameters (32×32 images), different from ImageNet-C's.
``PARAMS`` below holds them, one entry per corruption with the five severities, copied from
that script; the functions apply them.

What comes from the ``imagecorruptions`` package (PyPI, 1.1.2; Michaelis et al. 2019): the
six frost photographs, the anti-aliased disk kernel (``disk``), the zoom helper
(``clipped_zoom``) and the NumPy motion blur (``_motion_blur``, the package's replacement for
ImageMagick's ``MotionBlurImage``). Its corruption functions hard-code ImageNet-C's severities
(e.g. ``gaussian_noise`` σ = 0.08…0.38 against CIFAR's 0.04…0.10) and take no parameters, so
each corruption is written here with the CIFAR parameters, following the steps of
``make_cifar_c.py``. Its ``plasma_fractal`` needs ``np.float_``, which NumPy 2 removed, so
:func:`plasma_fractal` is written here too.

Deliberate deviations from ``make_cifar_c.py`` (the files are *regenerated*, never identical
to the released ones, and every row built on them says so):

* Randomness: one ``numpy.random.Generator`` per (seed, corruption, severity, image index)
  instead of the global NumPy state, so that any subset, order or resumed run gives the same
  image, and the first N images of a larger generation equal a generation of N.
* Motion blur (``motion_blur``, ``snow``): the package's NumPy kernel instead of ImageMagick
  through Wand (not installable offline); same radius, sigma and angle ranges.

Kept on purpose (they look like bugs, but the released images were made this way): ``frost``
draws from the first five of the six photographs (``randint(5)``); ``glass_blur``'s "swap"
assigns NumPy views and therefore copies the neighbour's pixel instead of swapping the two.

Every function maps an H×W×3 uint8 image to floats in [0, 255]; :func:`corrupt` truncates to
uint8 as the original (``np.uint8(...)``).
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
import importlib.resources
import logging
import sys
import types
from io import BytesIO
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from benchmark.errors import DataError, UsageError
from benchmark.safepath import ident_problem

logger = logging.getLogger(__name__)
SEVERITIES = (1, 2, 3, 4, 5)

#: the CIFAR severity parameters of make_cifar_c.py, severities 1..5, in its order
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # σ of N(0, σ²) on [0,1]
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper fraction
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # σ, δ, it
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # zoom factors np.arange(1, this, 0.01)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # strength, wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor around the mean
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                          (0.1, 0.03, 0.03)),  # (alpha, sigma, affine shift) × image size
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-scaling factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1)),  # loc, scale, σ, threshold, intensity, mud
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV s·a + b
}
SOURCE = ("severity parameters: make_cifar_c.py (hendrycks/robustness, "
          "ImageNet-C/create_c/make_cifar_c.py, commit ca36008); frost images, disk kernel, "
          "zoom and motion-blur helpers: imagecorruptions")

Fn = Callable[[np.ndarray, object, np.random.Generator], np.ndarray]


def _package() -> types.ModuleType:
    """``imagecorruptions.corruptions``; 1.1.2 imports ``pkg_resources`` (gone from setuptools
    ≥ 81) only for ``resource_filename``: a stand-in lives in ``sys.modules`` during the import
    when the real one is missing, and is removed afterwards."""
    name = "imagecorruptions.corruptions"
    if name in sys.modules:
        return sys.modules[name]
    try:
        import pkg_resources  # noqa: F401
        stub = None
    except ImportError:
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda pkg, rel: str(  # type: ignore[attr-defined]
            importlib.resources.files(pkg.split(".")[0]).joinpath(rel.lstrip("./")))
        sys.modules["pkg_resources"] = stub
    try:
        return importlib.import_module(name)
    finally:
        if stub is not None and sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.filters import gaussian
    return gaussian(x, sigma=sigma, channel_axis=-1 if x.ndim == 3 else None)


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The package's ``clipped_zoom`` with make_cifar_c.py's centred trim back to H×W."""
    h = x.shape[0]
    z = _package().clipped_zoom(x, factor)
    top = (z.shape[0] - h) // 2
    return z[top:top + h, top:top + h]


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1] (``size`` a power of two), as make_cifar_c.py's."""
    m = np.zeros((size, size))
    step, wibble = size, 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        around = corners + np.roll(corners, -1, axis=0)
        m[half::step, half::step] = noisy_mean(around + np.roll(around, -1, axis=1))
        centres = m[half::step, half::step]
        corners = m[0:size:step, 0:size:step]
        ltsum = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        m[0:size:step, half::step] = noisy_mean(ltsum)
        ttsum = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        m[half::step, 0:size:step] = noisy_mean(ttsum)
        step, wibble = half, wibble / decay
    m -= m.min()
    return m / m.max()


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def _out(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 1) * 255


def gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _out(_unit(x) + rng.normal(size=x.shape, scale=c))


def shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _out(rng.poisson(_unit(x) * c) / c)


def impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from skimage.util import random_noise
    return _out(random_noise(_unit(x), mode="s&p", amount=c, rng=rng))


def speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    u = _unit(x)
    return _out(u + u * rng.normal(size=x.shape, scale=c))


def gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _out(_gauss(_unit(x), c))


def glass_blur(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    sigma, delta, iterations = c
    img = np.uint8(_gauss(_unit(x), sigma) * 255)
    size = img.shape[0]
    cells = [(h, w) for h in range(size - delta, delta, -1) for w in range(size - delta, delta, -1)]
    flat = img.reshape(-1, 3).tolist()  # sequential pixel copies: a Python list is fastest
    for offsets in rng.integers(-delta, delta, size=(iterations, len(cells), 2)).tolist():
        for (h, w), (dx, dy) in zip(cells, offsets):
            # the original's view "swap" copies the neighbour's pixel (module docstring)
            flat[h * size + w] = flat[(h + dy) * size + w + dx]
    img = np.array(flat, dtype=np.uint8).reshape(img.shape)
    return _out(_gauss(img / 255.0, sigma))


def defocus_blur(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    import cv2
    kernel = _package().disk(radius=c[0], alias_blur=c[1])
    return _out(cv2.filter2D(_unit(x), -1, kernel))


def motion_blur(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    blurred = _package()._motion_blur(x.astype(np.float64), radius=c[0], sigma=c[1],
                                      angle=rng.uniform(-45, 45))
    return np.clip(blurred, 0, 255)


def zoom_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    u = _unit(x).astype(np.float32)
    factors = np.arange(1, c, 0.01)
    out = u + sum(_zoom(u, f) for f in factors)
    return _out(out / (len(factors) + 1))


def snow(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    import cv2
    u = _unit(x).astype(np.float32)
    layer = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    layer = _zoom(layer[..., None], c[2])[..., 0]
    layer[layer < c[3]] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8) / 255.0  # the original's PNG round trip
    layer = _package()._motion_blur(layer, radius=c[4], sigma=c[5], angle=rng.uniform(-135, -45))
    layer = (np.round(np.clip(layer, 0, 1) * 255) / 255.0)[..., None]
    grey = cv2.cvtColor(u, cv2.COLOR_RGB2GRAY)[..., None]
    u = c[6] * u + (1 - c[6]) * np.maximum(u, grey * 1.5 + 0.5)
    return _out(u + layer + np.rot90(layer, k=2))


@functools.lru_cache(maxsize=None)
def frost_image(index: int) -> np.ndarray:
    """Frost photograph ``index`` (0…4) of the package, BGR, scaled by 0.2 as make_cifar_c.py."""
    import cv2
    name = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")[index]
    _package()  # imports the package (needs the pkg_resources stand-in) before its files
    path = importlib.resources.files("imagecorruptions").joinpath("frost", name)
    img = cv2.imread(str(path))
    if img is None:
        raise DataError(f"cannot read the frost image {path} (reinstall imagecorruptions)")
    img = cv2.resize(img, (0, 0), fx=0.2, fy=0.2)
    img.setflags(write=False)
    return img


def frost(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    img = frost_image(int(rng.integers(5)))
    h, w = x.shape[:2]
    top, left = rng.integers(0, img.shape[0] - h), rng.integers(0, img.shape[1] - w)
    return np.clip(c[0] * x + c[1] * img[top:top + h, left:left + w][..., ::-1], 0, 255)


def fog(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    u = _unit(x)
    top = u.max()
    u = u + c[0] * plasma_fractal(32, c[1], rng)[:x.shape[0], :x.shape[1], None]
    return _out(u * top / (top + c[0]))


def _hsv(x: np.ndarray, channel: int, scale: float, shift: float) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv
    hsv = rgb2hsv(_unit(x))
    hsv[..., channel] = np.clip(hsv[..., channel] * scale + shift, 0, 1)
    return _out(hsv2rgb(hsv))


def brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _hsv(x, 2, 1.0, c)


def saturate(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    return _hsv(x, 1, c[0], c[1])


def contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    u = _unit(x)
    mean = u.mean(axis=(0, 1), keepdims=True)
    return _out((u - mean) * c + mean)


def _pil_round_trip(x: np.ndarray, how: Callable) -> np.ndarray:
    from PIL import Image
    return np.asarray(how(Image.fromarray(x)), dtype=np.float64)


def jpeg_compression(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    def encode(img: "Image.Image") -> "Image.Image":
        buf = BytesIO()
        img.save(buf, "JPEG", quality=c)
        return Image.open(buf).convert("RGB")
    return _pil_round_trip(x, encode)


def pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image
    h, w = x.shape[:2]
    return _pil_round_trip(x, lambda im: im.resize((int(w * c), int(h * c)), Image.BOX)
                           .resize((w, h), Image.BOX))


def elastic_transform(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    img = _unit(x).astype(np.float32)
    h, w = img.shape[:2]
    c = tuple(h * v for v in c)
    centre, half = np.float32((h, w)) // 2, min(h, w) // 3
    src = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + rng.uniform(-c[2], c[2], size=src.shape).astype(np.float32)
    img = cv2.warpAffine(img, cv2.getAffineTransform(src, dst), (w, h),
                         borderMode=cv2.BORDER_REFLECT_101)
    dx, dy = ((gaussian(rng.uniform(-1, 1, size=(h, w)), c[1], mode="reflect", truncate=3)
               * c[0]).astype(np.float32)[..., None] for _ in range(2))
    xs, ys, zs = np.meshgrid(np.arange(w), np.arange(h), np.arange(img.shape[2]))
    coords = (ys + dy).reshape(-1, 1), (xs + dx).reshape(-1, 1), zs.reshape(-1, 1)
    return _out(map_coordinates(img, coords, order=1, mode="reflect").reshape(img.shape))


def spatter(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    import cv2
    from skimage.filters import gaussian

    u = _unit(x).astype(np.float32)
    liquid = gaussian(rng.normal(size=x.shape[:2], loc=c[0], scale=c[1]), sigma=c[2])
    liquid[liquid < c[3]] = 0
    if not c[5]:  # water: pale turquoise streaks along the liquid's edges
        liquid = (liquid * 255).astype(np.uint8)
        dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
        dist = cv2.equalizeHist(cv2.blur(cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)[1],
                                         (3, 3)).astype(np.uint8))
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, ker), (3, 3)).astype(np.float32)
        m = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
        m = m / np.maximum(np.max(m, axis=(0, 1)), 1e-12) * c[4]  # no liquid: 0, not 0/0
        colour = cv2.cvtColor(np.broadcast_to(np.float32([175, 238, 238]) / 255,
                                              u.shape).copy(), cv2.COLOR_BGR2BGRA)
        u = cv2.cvtColor(u, cv2.COLOR_BGR2BGRA)
        return cv2.cvtColor(np.clip(u + m * colour, 0, 1), cv2.COLOR_BGRA2BGR) * 255
    m = gaussian(np.where(liquid > c[3], 1, 0).astype(np.float32), sigma=c[4])  # mud
    m[m < 0.8] = 0
    mud = np.float32([63, 42, 20]) / 255 * m[..., None]
    return _out(u * (1 - m[..., None]) + mud)


CORRUPT: dict[str, Fn] = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur,
    snow, frost, fog, brightness, contrast, elastic_transform, pixelate, jpeg_compression,
    speckle_noise, gaussian_blur, spatter, saturate)}


def corrupt(x: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """One H×W×3 uint8 image corrupted at ``severity`` (1…5), truncated to uint8 as the original."""
    out = CORRUPT[name](x, PARAMS[name][severity - 1], rng)
    return np.uint8(np.clip(out, 0, 255))


# ------------------------------------------------------------------------------ generation
META = "PROVENANCE.json"
LABEL = "regenerated CIFAR-10-C"
#: raised whenever a change to this module changes the pixels of a generation
GENERATOR_VERSION = 1


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from benchmark.store import code_version
    out = {"advbench": code_version()}
    for pkg in ("imagecorruptions", "numpy", "scipy", "scikit-image", "opencv-python", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def read_meta(root: Path | str) -> Optional[dict]:
    """The generation record in ``root`` (``PROVENANCE.json``), or None for released files."""
    path = Path(root) / META
    if not path.is_file():
        return None
    from benchmark.store import read_json
    return read_json(path)


def describe(meta: dict) -> str:
    """One line for rows and tables: what the files are and how they were made."""
    text = (f"{LABEL} (not the released files): corruptions of the first {meta['n_images']} "
            f"test images of {meta['source_dataset']} [{meta['source_provenance']}], seed "
            f"{meta['seed']}, {meta['parameters_source']}")
    return " ".join(text.split())  # one line (a PROVENANCE file may hold several)


def generation_id(meta: dict) -> str:
    """A short hash of what determines the generated pixels (part of every row key)."""
    from benchmark.config import stable_hash
    return stable_hash({k: meta.get(k) for k in ("generator_version", "source_sha256",
                                                 "n_images", "seed", "parameters")})


def source_images(dataset: str, source_dir: Optional[Path | str],
                  n_images: Optional[int]) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``n_images`` CIFAR-10 test images (N×32×32×3 uint8), labels, provenance.

    Raises:
        UsageError: no ``source_dir``, not a 10-class 32×32 RGB dataset, or fewer test images
            than asked.
        DataError: files missing (from :func:`benchmark.data.load_dataset`).
    """
    from benchmark.data import load_dataset

    if source_dir is None:
        raise UsageError(f"CIFAR-10-C generation needs the folder holding {dataset}'s test "
                         f"images (--source-dir DIR)")
    data = load_dataset(dataset, source_dir)
    shape = tuple(data.test.x.shape[1:])
    if data.info.num_classes != 10 or shape != (3, 32, 32):
        raise UsageError(f"CIFAR-10-C is made from a 10-class 3×32×32 dataset; {dataset} has "
                         f"{data.info.num_classes} classes of {'×'.join(map(str, shape))}")
    n = len(data.test) if n_images is None else n_images
    if n > len(data.test):
        raise UsageError(f"--n-images {n}: {dataset} has only {len(data.test)} test images")
    x = data.test.x[:n].permute(0, 2, 3, 1).contiguous().numpy()
    return x, data.test.y[:n].numpy(), data.info.provenance


def _save_npy(path: Path, arr: np.ndarray) -> None:
    from benchmark.store import atomic_write_bytes
    buf = BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _complete(path: Path, n: int) -> bool:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return arr.dtype == np.uint8 and arr.shape == (5 * n, 32, 32, 3)


def generate(out_dir: Path | str, dataset: str = "cifar10",
             source_dir: Optional[Path | str] = None, *, n_images: Optional[int] = None,
             seed: int = 0, corruptions: Optional[Sequence[str]] = None, force: bool = False,
             progress: bool = True) -> dict:
    """Write CIFAR-10-C in the official layout into ``out_dir``; return the generation record.

    ``out_dir/<corruption>.npy`` holds severities 1…5 of the ``n_images`` images stacked
    ((5·n)×32×32×3 uint8), ``labels.npy`` the labels repeated five times (uint8, as released),
    ``PROVENANCE.json`` the record (regenerated, parameter source, package versions, seed, n,
    a SHA-256 of the source images). Image ``i`` at severity ``s`` of the ``k``-th corruption
    uses the generator ``default_rng([seed, k, s, i])``: deterministic, independent of ``n``.
    Finished files are skipped (each is written atomically), so an interrupted run resumes.

    Raises:
        UsageError: unknown corruption name, bad source, or ``out_dir`` holds a generation
            with other settings (pass ``force`` to overwrite it).
    """
    import hashlib
    import time

    from tqdm.auto import tqdm

    from benchmark.store import atomic_write_json, clean_tmp

    names = list(corruptions) if corruptions else list(PARAMS)
    unknown = [c for c in names if c not in PARAMS]
    if unknown:
        raise UsageError(f"unknown corruption(s) {', '.join(unknown)}; valid: {', '.join(PARAMS)}")
    x, y, prov = source_images(dataset, source_dir, n_images)
    n = len(x)
    ident = {"what": LABEL, "generator_version": GENERATOR_VERSION,
             "source_dataset": dataset, "source_provenance": prov,
             "source_sha256": hashlib.sha256(x.tobytes() + y.astype(np.int64).tobytes()).hexdigest(),
             "n_images": n, "seed": seed, "parameters_source": SOURCE,
             "parameters": {k: PARAMS[k] for k in PARAMS}}
    out = Path(out_dir).expanduser()
    old = read_meta(out) if out.is_dir() else None
    if old is not None and not force:
        differ = [k for k in ident if json_safe(old.get(k)) != json_safe(ident[k])]
        if differ:
            raise UsageError(f"{out} holds a CIFAR-10-C generation with other settings "
                             f"({', '.join(differ)}); choose another --data-dir or pass --force")
    if old is None and out.is_dir() and any(out.iterdir()):
        raise UsageError(f"{out} holds files but no {META}: not a CIFAR-10-C generation; "
                         f"choose an empty or new --data-dir")
    same = old is not None and all(json_safe(old.get(k)) == json_safe(ident[k]) for k in ident)
    # written into a hidden sibling folder, renamed into place only when complete: a killed
    # generation is never read as a whole one (and the next call resumes the sibling)
    stage = out.parent / f".{out.name}.partial"
    staged = read_meta(stage) if stage.is_dir() else None
    if stage.exists() and (force or staged is None or any(
            json_safe(staged.get(k)) != json_safe(ident[k]) for k in ident)):
        shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)
    clean_tmp(stage)
    carried = []
    if same and not force:  # finished files of the same settings are kept (hard links)
        for f in sorted(out.glob("*.npy")):
            if f.is_symlink() or f.stem == "labels" or not _complete(f, n):
                continue
            if not (stage / f.name).exists():
                try:
                    os.link(f, stage / f.name)
                except OSError:
                    shutil.copy2(f, stage / f.name)
            carried.append(f.stem)
    order = list(PARAMS)
    listed = [c for c in order if c in set(names) | set(carried)]
    meta = {**ident, "released_files": False,
            "note": "regenerated from the test images with make_cifar_c.py's CIFAR parameters; "
                    "not the released CIFAR-10-C (zenodo 2535967): numbers are not comparable",
            "layout": "<corruption>.npy (5·n)×32×32×3 uint8, severity s in rows [(s-1)n, sn); "
                      "labels.npy 5·n uint8", "rng": "numpy default_rng([seed, k, s, i])",
            "versions": _versions(), "corruptions": listed,
            "wall_s": dict((staged or old or {}).get("wall_s") or {}) if not force else {}}
    atomic_write_json(stage / META, meta)
    _save_npy(stage / "labels.npy", np.tile(y, 5).astype(np.uint8))
    todo = [c for c in names if not _complete(stage / f"{c}.npy", n)]
    logger.info("CIFAR-10-C: %d of %d corruption files to write (%d images each) in %s",
                len(todo), len(names), 5 * n, stage)
    with tqdm(total=len(todo) * 5 * n, desc="CIFAR-10-C", unit="img", disable=not progress,
              leave=False) as bar:
        for name in todo:
            t0, k = time.perf_counter(), order.index(name)
            arr = np.empty((5 * n, 32, 32, 3), dtype=np.uint8)
            for s in SEVERITIES:
                for i in range(n):
                    arr[(s - 1) * n + i] = corrupt(x[i], name, s, np.random.default_rng([seed, k, s, i]))
                bar.update(n)
            _save_npy(stage / f"{name}.npy", arr)
            meta["wall_s"][name] = round(time.perf_counter() - t0, 2)
            atomic_write_json(stage / META, meta)
    check_generation(stage, meta)
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(stage, out)
        shutil.rmtree(trash)
    else:
        os.rename(stage, out)
    return meta


def check_generation(root: Path, meta: dict) -> None:
    """Refuse a generated CIFAR-10-C folder that lacks a corruption its record lists (a
    generation killed by an earlier advbench, or a ``.partial`` folder).

    Raises:
        DataError: a listed corruption file is missing or not (5·n)×32×32×3 uint8.
    """
    listed = meta.get("corruptions") or []
    n = meta.get("n_images")
    if not isinstance(listed, list) or not isinstance(n, int):
        raise DataError(f"{root / META}: no list of corruptions and n_images")
    bad = [c for c in listed if not isinstance(c, str) or ident_problem(c) is not None
           or not _complete(Path(root) / f"{c}.npy", n)]
    if bad:
        raise DataError(f"{root} holds an incomplete CIFAR-10-C generation: {len(bad)} of its "
                        f"{len(listed)} corruptions missing or truncated (first "
                        f"{str(bad[0])[:40]}); an interrupted `advbench corruptions --generate`? "
                        f"Rerun it")


def json_safe(obj: object) -> object:
    """``obj`` as it reads back from JSON (tuples become lists), for comparisons."""
    import json
    return json.loads(json.dumps(obj, default=str))
