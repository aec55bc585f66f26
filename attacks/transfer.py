"""Transfer attack: PGD on a source model, the adversarial examples applied to the target.

Paper: Papernot, McDaniel & Goodfellow, "Transferability in Machine Learning", 2016,
arXiv:1605.07277; used as a gradient-masking check by Athalye, Carlini & Wagner 2018
(arXiv:1802.00420, §2) and Carlini et al. 2019 (arXiv:1902.06705, §5.3): a black-box attack
that never reads the target's gradients must not beat white-box PGD on the target.

Update rule: x' = PGD_source(x, y) (:class:`~attacks.pgd.PGD`, same threat model, the
objective evaluated on the *source* model), then the target is only queried for its
prediction at x'. The target's gradients are never used.

Source: the ``source`` hyperparameter, a run folder or an advbench checkpoint file (its
``ckpt_best.pt`` / the file is loaded with ``weights_only=True``). ``advbench check`` sets it
by default to the ``st`` run of the target's protocol (same dataset, arch, profile, seed and
protocol overrides; :func:`benchmark.config.helper_config`). A model object can be given
in-process as ``source_model`` (tests, notebooks).

Hyperparameters (keyword-only): ``source`` (None) and ``checkpoint`` ("best"), plus those of
:class:`~attacks.pgd.PGD`; the defaults are PGD-20 with step ε/10 (Table 2's PGD-20).

Example:
    >>> atk = Transfer(ThreatModel(Norm.LINF, 0.3), seed=0, source="runs/mnist/st/abc123")
    >>> x_adv = atk(target_model, x, y)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from attacks import register_attack
from attacks.base import Attack, Norm, Objective, ThreatModel, model_mode
from attacks.pgd import PGD
from benchmark.errors import UsageError


@register_attack("transfer")
class Transfer(Attack):
    """PGD on a source model, applied to the target (see module docstring)."""

    description = "transfer attack: PGD on a source checkpoint (default the st run) applied to the target"
    supported_norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    #: the public test kit hands such an attack a surrogate ``source_model``
    needs_source_model = True
    default_hparams = {**PGD.default_hparams, "steps": 20, "rel_step_size": 0.1,
                       "source": None, "checkpoint": "best"}

    def __init__(self, threat: ThreatModel, *, seed: Optional[int] = None,
                 source_model: Optional[nn.Module] = None, **hparams: Any) -> None:
        super().__init__(threat, seed=seed, **hparams)
        pgd_hp = {k: v for k, v in self.hparams.items() if k in PGD.default_hparams}
        self._pgd = PGD(threat, seed=seed, **pgd_hp)
        self.hparams["step_size"] = self._pgd.hparams["step_size"]
        self.source_model = source_model

    def _source(self, device: Any) -> nn.Module:
        if self.source_model is None:
            src = self.hparams["source"]
            if src is None:
                raise UsageError("transfer needs a source: hparams source=RUN_DIR or a "
                                 "checkpoint file (advbench check defaults to the st run)")
            from benchmark.checkpoint import read_checkpoint, resolve_checkpoint
            from benchmark.run.resolve import model_from_checkpoint
            path = resolve_checkpoint(Path(src), str(self.hparams["checkpoint"])) \
                if Path(src).is_dir() else Path(src)
            self.source_model = model_from_checkpoint(read_checkpoint(path))[0]
        return self.source_model.to(device)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, *, loss: Objective) -> Tensor:
        source = self._source(x.device)
        with model_mode(source, train=False):
            return self._pgd(source, x, y, loss=loss)
