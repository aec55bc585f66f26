"""Run configuration: profiles, per-dataset protocol values, hyperparameter merge, run keys.

Merge order (later wins): profile defaults → per-scale protocol values (ε, attack step) →
``Defense.default_hparams`` → ``Defense.dataset_hparams[dataset]`` → user ``--hparams``.
Unknown keys and values of the wrong type raise ``UsageError``. The merged dict is written
into ``config.json`` and into every result row, and it is part of the run key, so changing a
default creates a new run instead of mixing old and new results.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from benchmark.errors import UsageError

#: bump when the training loop changes in a way that changes results
#: (2: MNIST trains without augmentation in every profile)
PROTOCOL_VERSION = 2

#: the nominal l∞ ε of each dataset scale (paper §4.1: 8/255 on CIFAR-10/100 and SVHN, 0.3 on
#: MNIST): the training ε of the profiles and the ε of the attack columns. The one place it is
#: written.
LINF_EPS: dict[str, float] = {"cifar": 8 / 255, "mnist": 0.3}


def linf_eps(scale: str) -> float:
    """The nominal l∞ ε of a dataset scale (``mnist`` or ``cifar``)."""
    return LINF_EPS["mnist" if scale == "mnist" else "cifar"]


def same_eps(a: float, b: float) -> bool:
    """Whether two ε values are one (rows store ε as floats written from fractions such as
    8/255, so equality is up to float rounding)."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


#: the paper's common protocol (§4.1)
PAPER: dict[str, Any] = {
    "epochs": 110, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "lr_milestones": [100, 105], "lr_gamma": 0.1, "augment": True,
    "eps": LINF_EPS["cifar"], "train_attack_steps": 10, "train_step_size": 2 / 255,
    "train_subset": None, "val_size": 1000, "val_attack_steps": 10, "val_every": 1,
    "select_by": "val_pgd",
    "amp": "none", "channels_last": False, "compile": False,
}

#: a small CPU profile: same protocol shape, fewer epochs / attack steps, a training subset
CPU: dict[str, Any] = {
    **PAPER, "epochs": 10, "lr": 0.05, "lr_milestones": [8, 9], "train_attack_steps": 5,
    "train_step_size": 2.5 * LINF_EPS["cifar"] / 5, "train_subset": 10000, "val_size": 256,
    "val_attack_steps": 5,
}

PROFILES: dict[str, dict[str, Any]] = {"paper": PAPER, "cpu": CPU}

#: protocol hyperparameters that a user may set but that are *absent* from the merged dict
#: while they keep their default, so adding one leaves every existing run id unchanged (a
#: user value equal to the default is dropped: the same model keeps the same run).
#:
#: * ``train_attack_loss``: the objective of the training attack: ``ce`` (every paper's),
#:   or a scale-free one, ``margin`` (C&W: max_{j≠y} z_j − z_y) or ``dlr`` (Croce & Hein's
#:   difference of logits ratio). A deviation from every defense's paper, for the issue-28
#:   test of whether a cross-entropy training attack is what fails Adv-DPNP.
OPTIONAL_HPARAMS: dict[str, Any] = {"train_attack_loss": "ce"}


def optional_defaults(cls: type) -> dict[str, Any]:
    """The optional hyperparameters a defense class accepts, with their defaults: the
    harness's (:data:`OPTIONAL_HPARAMS`) and the class's own ``optional_hparams``."""
    return {**OPTIONAL_HPARAMS, **getattr(cls, "optional_hparams", {})}

#: per-scale overrides (MNIST: ε = 0.3, step 0.01, 40 steps, paper Figure 2 protocol; no
#: augmentation, as in Madry et al.'s and TRADES's MNIST protocols: a random crop of 28×28
#: digits cost AT about 30 points of clean accuracy at the cpu budget)
SCALE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"mnist": {"eps": LINF_EPS["mnist"], "train_attack_steps": 40, "train_step_size": 0.01,
                        "augment": False}},
    "cpu": {"mnist": {"eps": LINF_EPS["mnist"], "train_attack_steps": 5, "train_step_size": 0.15,
                      "epochs": 8, "lr": 0.05, "lr_milestones": [6, 7], "augment": False}},
}
#: dataset-specific protocol values per profile. SVHN: half the CIFAR step (paper §4.1: 1/255
#: vs 2/255); in ``cpu`` that is 2/255 (half of 4/255), so 5 steps still travel 10/255 > ε as
#: the paper's 10 × 1/255 do (a fixed 1/255 gave 5 × 1/255 = 5/255 < ε)
DATASET_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"svhn": {"train_step_size": 1 / 255}},
    "cpu": {"svhn": {"train_step_size": 2 / 255}},
}

#: per-architecture protocol values, applied by the harness to every defense alike. LeNets++
#: (Wen et al. 2016) has no batch norm and a 2-d feature layer:
#:
#: * ``grad_clip`` 5: Adv-DPNP's pull of its 2-d features towards prototypes of norm α = 40
#:   blew the weights up (NaN) at every lr tried from 0.003 up, so its runs clip the global
#:   gradient norm.
#: * ``lr`` 0.01: the center-loss paper's LeNets++ learning rate (its Caffe solver; the
#:   PyTorch port KaiyangZhou/pytorch-center-loss uses 0.001). At the MNIST cpu lr 0.05 even
#:   clean training collapses the features to 0 within 20 steps (measured).
#: * ``clean_epochs`` 2, ``eps_warmup_epochs`` 6 (and in ``cpu`` 12 ``epochs``, lr drops at 10,
#:   11, so that 4 epochs train at the full ε; :data:`ARCH_PROFILE_OVERRIDES`): PGD-AT
#:   at ε = 0.3 from scratch collapses every 2-d feature onto 0 (constant output, loss ln 10)
#:   within 30 steps at lr 0.01 and 0.05, also with a 60-step ε ramp or after 40 clean
#:   steps (measured); two clean epochs and a slow linear ramp of ε keep it learning. The paper
#:   states no LeNets++ schedule (Figure 2: ε 0.3, step 0.01, 40 steps); an ε warm-up is a
#:   common AT practice (e.g. Gowal et al. 2018, IBP; Wong et al. 2020 for MNIST FGSM-AT).
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "lenets++": {"grad_clip": 5.0, "lr": 0.01, "clean_epochs": 2, "eps_warmup_epochs": 6},
}
#: per-architecture values of one profile (applied after :data:`ARCH_OVERRIDES`)
ARCH_PROFILE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {"lenets++": {"epochs": 12, "lr_milestones": [10, 11]}},
}

#: architecture used when --arch is not given
DEFAULT_ARCH = {"paper": "resnet18", "cpu": "small-cnn"}
#: test points evaluated when --n-examples is not given (None = the whole test set)
DEFAULT_N_EXAMPLES = {"paper": None, "cpu": 1000}


def profile_defaults(profile: str, scale: str, dataset: str) -> dict[str, Any]:
    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    out = dict(PROFILES[profile])
    out.update(SCALE_OVERRIDES.get(profile, {}).get(scale, {}))
    out.update(DATASET_OVERRIDES.get(profile, {}).get(dataset, {}))
    return out


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice is refused, not silently overwritten."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise UsageError(f"--hparams gives the key {_cut(key)!r} twice")
        out[key] = value
    return out


def _cut(text: str, n: int = 80) -> str:
    """``text``, or its first ``n`` characters and a count of the rest (error messages echo
    user input: a 30,000-character key must not become a 60 KB line)."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text) - n} more characters)"


def parse_hparams(text: Optional[str]) -> dict[str, Any]:
    """Parse ``--hparams`` JSON into a dict.

    Raises:
        UsageError: not valid JSON, not an object, or a key given twice.
    """
    if not text:
        return {}
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--hparams is not valid JSON ({exc.msg} at char {exc.pos}): "
                         f"{_cut(text, 200)}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--hparams must be a JSON object, got {type(value).__name__}")
    return value


def merge_hparams(base: Mapping[str, Any], *layers: Mapping[str, Any],
                  user: Optional[Mapping[str, Any]] = None,
                  choices: Optional[Mapping[str, Any]] = None,
                  optional: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Merge layers of defaults, then validate and apply the user's overrides.

    Validation (:mod:`benchmark.validate`) only accepts or refuses; it never changes a value.
    ``optional`` keys (:data:`OPTIONAL_HPARAMS`, ``Defense.optional_hparams``) are accepted
    from the user and enter the merged dict only with a value other than their default.

    Raises:
        UsageError: unknown key, wrong type (an int where an int is meant, null, NaN/inf),
            a value out of range, a string outside its allowed set, or a cross-field rule
            (``lr_milestones`` inside ``[1, epochs]``).
    """
    from benchmark.validate import check_hparams, check_user_value

    merged = dict(base)
    for layer in layers:
        merged.update(layer)
    optional = dict(optional or {})
    for key, value in (user or {}).items():
        if key not in merged and key in optional:
            check_user_value(key, optional[key], value)
            if value != optional[key]:
                merged[key] = value
            continue
        if key not in merged:
            raise UsageError(f"unknown hyperparameter {_cut(str(key))!r}; valid: "
                             f"{', '.join(sorted(set(merged) | set(optional)))}")
        check_user_value(key, merged[key], value)
        merged[key] = value
    check_hparams(merged, user or {}, choices)
    return merged


def stable_hash(obj: Any, n: int = 12) -> str:
    """First ``n`` hex digits of SHA-256 over canonical JSON (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a trained model; its hash is the run id."""

    defense: str
    dataset: str
    arch: str
    profile: str
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION

    @property
    def run_id(self) -> str:
        return stable_hash(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        return cls(**{k: d[k] for k in ("defense", "dataset", "arch", "profile", "seed",
                                        "hparams", "protocol_version") if k in d})


def parse_seeds(text: str) -> list[int]:
    """``--seeds`` (``0,1,2``) as integers (see :func:`benchmark.validate.parse_seeds`).

    Raises:
        UsageError: empty, not a comma list of integers, or outside ``[0, 2**32)``.
    """
    from benchmark.validate import parse_seeds as parse

    return parse(text)
