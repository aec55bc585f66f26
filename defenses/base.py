"""The ``Defense`` interface: a defense supplies its model head, training attack and loss.

The harness (``benchmark.run.train``) owns data, optimizer, schedule, epochs and checkpoints, so
every defense gets the same budget. A defense never calls ``backward()`` or ``step()``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Attack, Objective, ThreatModel, ce_objective, model_mode
from benchmark import models
from benchmark.config import optional_defaults
from benchmark.data import DataInfo
from benchmark.errors import UsageError


@dataclass(frozen=True)
class StepOutput:
    """What one training step hands back to the harness.

    Attributes:
        loss: scalar with graph; the harness calls backward and steps the optimizer.
        metrics: loss parts (detached scalars), averaged per epoch and logged.
        logits: logits on the step's main inputs (for the running training accuracy).
    """

    loss: Tensor
    metrics: Mapping[str, Tensor] = field(default_factory=dict)
    logits: Optional[Tensor] = None


class Defense(abc.ABC):
    """One training method. Subclasses document paper, loss and hyperparameters.

    Class attributes:
        name: registry name (set by ``@register_defense``).
        paper: citation shown by ``advbench list defenses``.
        default_hparams: the method's own hyperparameters (the allow-list, with defaults).
        dataset_hparams: per-dataset overrides from the method's paper.
        arch_hparams: per-architecture overrides (e.g. MART's β for ResNet-18).
        requires: names of defenses whose trained model (same dataset/arch/profile/seed) this
            one needs; the harness trains or reuses them and passes them to :meth:`setup`.
        randomized: stochastic at inference (AutoAttack's "rand" version, repeated evaluation).
        uses_training_attack: training runs the training attack (PGD-k); ``st``, ``dpnp`` and
            defenses such as ``drp`` that train on clean data only set it False
            (the harness then builds no training attack and :meth:`adversarial` refuses).
        loss_passes: forward+backward passes per training sample outside the training attack:
            1 for a loss on x' alone (AT), 2 for a loss on x and x' (TRADES-style).
        score_name: what :meth:`rejection_score` computes (recorded in rejection rows).

    Args:
        hparams: the fully merged hyperparameters (protocol + method).
        threat: the training threat model (ε from the protocol).
        num_classes: number of classes.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    default_hparams: ClassVar[Mapping[str, Any]] = {}
    dataset_hparams: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    arch_hparams: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    requires: ClassVar[tuple[str, ...]] = ()
    randomized: ClassVar[bool] = False
    uses_training_attack: ClassVar[bool] = True
    loss_passes: ClassVar[int] = 1
    score_name: ClassVar[str] = "1 - max softmax"
    #: allowed values of this defense's string hyperparameters (checked before training)
    hparam_choices: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: hyperparameters (with defaults) that a user may set but that stay out of the merged
    #: dict, and so out of the run id, while they keep their default (ablation switches
    #: added after runs exist; see ``config.OPTIONAL_HPARAMS``)
    optional_hparams: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, hparams: Mapping[str, Any], *, threat: ThreatModel,
                 num_classes: int) -> None:
        self.hparams = dict(hparams)
        self._threat = threat
        self.num_classes = num_classes
        self._train_attack: Optional[Attack] = None
        self.eps_scale = 1.0

    @property
    def threat(self) -> ThreatModel:
        """The training threat model now: the protocol's ε times :attr:`eps_scale`."""
        if self.eps_scale == 1.0:
            return self._threat
        return ThreatModel(self._threat.norm, self._threat.eps * self.eps_scale)

    def set_eps_scale(self, scale: float) -> None:
        """Train against ``scale`` × the protocol's ε (the harness's ε warm-up sets this
        before every step; see :func:`benchmark.run.train.eps_scale_at`). At 0 the training
        attack is skipped and x' = x."""
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"eps scale must lie in [0, 1], got {scale}")
        if scale != self.eps_scale:
            self.eps_scale = float(scale)
            self._train_attack = None  # rebuilt for the new ε on its next use

    # ---------------------------------------------------------------- model
    def make_head(self, feature_dim: int, num_classes: int) -> nn.Module:
        """The classifier on penultimate features; default a linear layer."""
        return nn.Linear(feature_dim, num_classes)

    def make_neck(self, map_channels: int, num_classes: int) -> Optional[nn.Module]:
        """Optional shape-preserving module on the backbone's last feature maps."""
        return None

    def make_preprocess(self, info: DataInfo) -> Optional[nn.Module]:
        """Optional shape-preserving preprocessing of the [0,1] inputs (default none).

        A preprocessing without a useful gradient (quantisation, JPEG, thermometer encoding)
        must be declared by wrapping it in :class:`attacks.bpda.NonDifferentiable`:
        ``advbench check`` then attacks the model with BPDA (check (m), identity backward
        through it) and BPDA's flags enter the headline.
        """
        return None

    def build_model(self, arch: str, info: DataInfo) -> models.Network:
        """Backbone of ``arch`` with this defense's head, neck and preprocessing."""
        backbone = models.create_backbone(arch, info.in_channels)
        return models.Network(backbone, self.make_head(backbone.feature_dim, info.num_classes),
                              mean=info.mean, std=info.std,
                              neck=self.make_neck(backbone.map_channels, info.num_classes),
                              preprocess=self.make_preprocess(info))

    # ---------------------------------------------------------------- training
    def attack_for_training(self) -> Attack:
        """The training attack: PGD-l∞ of the protocol (steps and step size from hparams).

        A defense whose hparams have ``attack_start`` ("uniform", the protocol, or "normal",
        x + 0.001·N(0,1) as in several official codes) gets that random start.
        """
        return protocol_pgd(self.threat, self.hparams,
                            str(self.hparams.get("attack_start", "uniform")))

    def training_attack(self) -> Optional[Attack]:
        """The training attack, built once; None for a defense that declares
        ``uses_training_attack = False`` (the harness calls this before the first epoch and
        builds nothing for such a defense; :meth:`adversarial` then refuses to run)."""
        if not self.uses_training_attack:
            return None
        if self._train_attack is None:
            self._train_attack = self.attack_for_training()
        return self._train_attack

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, *,
                    loss: Optional[Objective] = None) -> Tensor:
        """x' from the training attack (model in eval mode while it runs, then restored).

        Raises:
            RuntimeError: the defense declared ``uses_training_attack = False``.
        """
        attack = self.training_attack()
        if attack is None:
            raise RuntimeError(f"{self.name or type(self).__name__} declares "
                               f"uses_training_attack = False but asked for a training attack")
        if self.eps_scale == 0.0:  # clean warm-up epochs of the harness's ε schedule
            return x.detach().clone()
        return attack(model, x, y, loss=self._training_objective(loss))

    def option(self, name: str) -> Any:
        """An optional hyperparameter's value: the run's, else its default
        (:func:`benchmark.config.optional_defaults`; absent from a run that keeps it)."""
        return self.hparams[name] if name in self.hparams else optional_defaults(type(self))[name]

    def _training_objective(self, loss: Optional[Objective]) -> Optional[Objective]:
        """``loss``, or for a CE training attack (``loss`` None) the objective named by the
        optional ``train_attack_loss`` (``ce`` by default; ``margin``/``dlr`` deviate from
        the paper on purpose, see ``config.OPTIONAL_HPARAMS``).

        Raises:
            UsageError: ``train_attack_loss`` set for a defense whose training attack maximises
                its own objective (TRADES's KL, ...), which it would silently not change.
        """
        name = str(self.option("train_attack_loss"))
        if name == "ce":
            return loss
        if loss is not None:
            raise UsageError(f"train_attack_loss={name!r}: {self.name}'s training attack "
                             f"maximises its own objective, not cross-entropy")
        from attacks.objectives import objective_named

        return objective_named(name)

    @abc.abstractmethod
    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, *, epoch: int,
                      step: int) -> StepOutput:
        """Compute the training loss on one mini-batch (model in train mode)."""

    def passes_per_sample(self) -> int:
        """Declared cost: forward+backward passes per training sample per step.

        ``train_attack_steps`` (k) attack steps when the defense uses the training attack, plus
        :attr:`loss_passes`: k+1 for PGD-k AT, k+2 for TRADES-style losses, 1 for clean-only
        training. Helper runs (``requires``) are not included; the cost rows add them.
        """
        k = int(self.hparams.get("train_attack_steps", 0)) if self.uses_training_attack else 0
        return k + int(self.loss_passes)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Hook run by the harness before each epoch (e.g. renormalise prototypes)."""

    def setup(self, helpers: Mapping[str, nn.Module]) -> None:
        """Receive trained models of the defenses named in ``requires`` (eval mode, frozen)."""

    def param_groups(self, model: nn.Module) -> Optional[list[dict[str, Any]]]:
        """Optimizer parameter groups, or None for one group with the protocol's values.

        A group may carry ``lr_scale`` (its lr is the scheduled lr times this factor) and its
        own ``weight_decay``; every trainable parameter must appear in exactly one group.
        """
        return None

    # ---------------------------------------------------------------- evaluation
    def objective(self) -> Objective:
        """Per-sample training objective as a function of x' (the adaptive attack's loss).

        Returns ``loss(model, x_adv, x, y) -> Tensor[N]``; default cross-entropy on x'.
        """
        return ce_objective

    def declares_adaptive_attack(self) -> bool:
        """Whether the defense declares an attack of its own: ``advbench check`` then runs
        PGD on :meth:`objective` (the ``adaptive`` column, check (n)) into the headline.
        True when the subclass overrides :meth:`objective` (adv-dpnp's Table 8 loss)."""
        return type(self).objective is not Defense.objective

    def rejection_score(self, model: nn.Module, x: Tensor) -> Tensor:
        """Per-sample rejection score r(x) (higher = more suspicious; reject when r > τ).

        Default: 1 − max softmax of the logits (Hendrycks & Gimpel's baseline). Differentiable,
        so an adaptive attack can target the detector as well as the classifier.
        """
        return 1.0 - F.softmax(model(x).float(), dim=1).amax(dim=1)

    def class_centers(self, model: nn.Module) -> Optional[Tensor]:
        """Class centres for feature-space metrics: classifier weights by default."""
        head = getattr(model, "head", None)
        weight = getattr(head, "weight", None)
        return weight.detach() if isinstance(weight, Tensor) else None

    def state_dict(self) -> dict[str, Any]:
        """Defense-private training state that is not part of the model (default none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def kl_per_sample(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p ‖ q) per sample, summed over classes, from logits (p = softmax(p_logits))."""
    logp = F.log_softmax(p_logits, dim=1)
    return (logp.exp() * (logp - F.log_softmax(q_logits, dim=1))).sum(1)


def accuracy_metric(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == y).float().mean()


def detached(**parts: Tensor) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in parts.items()}


def clean_logits_eval(model: nn.Module, x: Tensor) -> Tensor:
    """Logits on x with the model in eval mode and no graph (attack targets, once per batch)."""
    with torch.no_grad(), model_mode(model, train=False):
        return model(x)


class CleanCache:
    """Eval-mode clean outputs of the batch an attack is working on, computed once per batch.

    An attack calls its objective at every step with the same ``x`` tensor; the outputs
    (``compute(model, x)``, default the logits) are recomputed, without graph and in eval mode,
    only when a different tensor or model comes in.
    """

    def __init__(self, compute: Optional[Callable[[nn.Module, Tensor], Tensor]] = None) -> None:
        self._compute = compute
        self._x: Optional[Tensor] = None
        self._model: Optional[nn.Module] = None
        self._value: Optional[Tensor] = None

    def __call__(self, model: nn.Module, x: Tensor) -> Tensor:
        if self._value is None or self._x is not x or self._model is not model:
            with torch.no_grad(), model_mode(model, train=False):
                value = self._compute(model, x) if self._compute else model(x)
            self._x, self._model, self._value = x, model, value
        return self._value


def kl_attack_objective(logits_nat: Tensor) -> Objective:
    """Per-sample ``KL(p(x) ‖ p(x'))`` with p(x) fixed (the TRADES/HAT training attack)."""

    def loss(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return kl_per_sample(logits_nat, model(x_adv))

    return loss


H = TypeVar("H", bound=nn.Module)


def head_of(model: nn.Module, kind: type[H], defense: str) -> H:
    """``model.head`` checked to be a ``kind`` (raises ``TypeError`` naming the defense)."""
    head = getattr(model, "head", None)
    if not isinstance(head, kind):
        raise TypeError(f"{defense} needs a model whose head is a {kind.__name__}, "
                        f"got {type(head)}")
    return head


def protocol_pgd(threat: ThreatModel, hparams: Mapping[str, Any], start: str = "uniform") -> Attack:
    """The protocol's training PGD (``train_attack_steps``, ``train_step_size``) with a
    ``uniform`` start in the ε-ball or a ``normal`` one at x + 0.001·N(0,1) (TRADES style)."""
    from attacks.pgd import PGD

    return PGD(threat, steps=int(hparams["train_attack_steps"]),
               step_size=float(hparams["train_step_size"]), random_start=start, init_std=0.001)
