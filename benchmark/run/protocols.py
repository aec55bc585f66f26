"""Evaluation attack specs: the paper's columns as named, fully parameterised attacks.

A column label (``pgd20``) maps to an :class:`AttackSpec` that depends on the dataset's scale.
Steps given relative to ε (``rel_step_size``) follow an ε override; absolute ones stay.

=============  =================================================  =================================
label          CIFAR/SVHN scale (paper)                           MNIST scale
=============  =================================================  =================================
fgsm           l∞ ε 8/255, one step of ε (Table 2)                ε 0.3
pgd            l∞ ε 8/255, 20 steps, step 1/255 (Table 1)         ε 0.3, 40 steps, step 0.01 (Fig 2)
bpda           pgd's budget, identity backward through declared       same as pgd
               non-differentiable preprocessing (Athalye et al. 2018)
pgd-l2         l2 ε 128/255, 20 steps, step 16/255 (Table 1)      ε 2, 100 steps, step 0.05 (*)
pgd-l1         l1 ε 2000/255, 100 steps, step 50/255, sparse      ε 10, 100 steps, step 0.5 (*)
               top-1% step (Table 1)
pgd20          l∞ 20 steps, step ε/10 (Table 2)                   same, ε 0.3
pgd100         l∞ 100 steps, step ε/10 (Table 2)                  same
cw             PGD on the C&W margin, κ 50, 30 steps, step ε/10   same
ensemble       worst case of fgsm, pgd20, pgd100, cw (Table 2)    same
autoattack     AutoAttack standard (Tables 1–3)                   same
apgd-l2        APGD-CE l2 ε 128/255, 100 iterations (AutoAttack's  ε 2, same settings
               l2 APGD-CE)
apgd-l1        l1-APGD-CE ε 2000/255, 100 iterations, 5 restarts  ε 10, same settings
               on the schedule 3ε/2ε/ε (AutoAttack's l1 APGD-CE)
autoattack-l2  AutoAttack standard l2, ε 128/255                  ε 2
autoattack-l1  AutoAttack standard l1, ε 2000/255                 ε 10
adaptive       PGD-20, step ε/10, on the defense's loss (Table 8) same
rays           RayS, hard-label l∞, 10000 queries (Chen & Gu      same
               2020; issue 30: the decision-only attack)
pgd-k{K}       K ∈ 20, 40, 100, 250, 500; step 1/255 (Table 6)    step 0.01
pgd-r{R}       R ∈ 1, 5, 10, 20 restarts; 40 steps, step 0.5/255  40 steps, step 0.01
               (Table 7)
pgd-fig4       20 steps, step 2.5ε/20 (Figure 4)                  same
=============  =================================================  =================================

(*) MNIST l2/l1 values are those of Tramèr & Boneh's MNIST evaluation (arXiv:1904.13000,
``eval_mnist_lps.py``): the paper evaluates l1/l2 only on CIFAR.

``caps`` give expensive columns a default number of test points per profile (the first N;
an explicit ``--n-examples`` overrides it): in the ``cpu`` profile AutoAttack (l∞, l2 and l1)
uses 100 points and the Table 6/7 columns 200 (each table on one set of points), so a run
finishes on 2 cores.

The APGD and AutoAttack l2/l1 columns (Croce & Hein 2020, 2021; issue 19) sit beside the
paper's PGD-l2/l1 in the ``table1`` suite, at the same ε: the paper's columns are kept for
fidelity, the new ones because SLIDE-style PGD-l1 and plain PGD-l2 overstate robustness.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from attacks.base import Attack, Norm, ThreatModel, eps_to_str, parse_eps
from attacks.ensemble import TABLE2_MEMBERS
from benchmark.config import linf_eps
from benchmark.errors import UsageError

#: Table 6 iterations and Table 7 restarts (paper captions)
TABLE6_STEPS = (20, 40, 100, 250, 500)
TABLE7_RESTARTS = (1, 5, 10, 20)
CPU_CAP_AA, CPU_CAP_SANITY = 100, 200


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation column: a registered attack with its threat model and hyperparameters.

    Attributes:
        label: the column label written into rows (``attack`` field).
        attack: the registered attack name.
        norm: ``linf``, ``l2`` or ``l1``.
        eps: radius in [0,1] pixel units.
        hparams: keyword hyperparameters of the attack.
        caps: profile → default maximum number of test points.
    """

    label: str
    attack: str
    norm: str
    eps: float
    hparams: dict[str, Any] = field(default_factory=dict)
    caps: dict[str, int] = field(default_factory=dict)

    def build(self, seed: Optional[int] = 0) -> Attack:
        from attacks import ATTACKS
        cls = ATTACKS.get(self.attack)
        return cls(ThreatModel(Norm(self.norm), self.eps), seed=seed, **self.hparams)

    def with_eps(self, eps: float) -> "AttackSpec":
        return replace(self, eps=float(eps))

    def with_hparams(self, **hparams: Any) -> "AttackSpec":
        return replace(self, hparams={**self.hparams, **hparams})

    def key(self) -> dict[str, Any]:
        return {"label": self.label, "attack": self.attack, "norm": self.norm, "eps": self.eps,
                "hparams": self.hparams}

    def record(self) -> dict[str, Any]:
        return {"attack": self.label, "attack_name": self.attack, "norm": self.norm,
                "eps": self.eps, "eps_str": format_eps(self.eps), "attack_hparams": self.hparams}


def format_eps(eps: float) -> str:
    """``eps_str`` of rows (same rule as :func:`attacks.base.eps_to_str`)."""
    return eps_to_str(eps)


def attack_specs(scale: str) -> dict[str, AttackSpec]:
    """Every named column for a dataset scale (``mnist`` or ``cifar``), at its default ε."""
    mnist = scale == "mnist"
    eps = linf_eps(scale)
    linf = {"steps": 40, "step_size": 0.01} if mnist else {"steps": 20, "step_size": 1 / 255}
    l2 = (2.0, {"steps": 100, "step_size": 0.05}) if mnist else \
        (128 / 255, {"steps": 20, "step_size": 16 / 255})
    l1 = (10.0, {"steps": 100, "step_size": 0.5, "l1_sparsity": 0.99}) if mnist else \
        (2000 / 255, {"steps": 100, "step_size": 50 / 255, "l1_sparsity": 0.99})
    sanity_step = 0.01 if mnist else 1 / 255
    restart_step = 0.01 if mnist else 0.5 / 255
    sanity_caps = {"cpu": CPU_CAP_SANITY}
    specs = [
        AttackSpec("fgsm", "fgsm", "linf", eps),
        AttackSpec("pgd", "pgd", "linf", eps, linf),
        AttackSpec("bpda", "bpda", "linf", eps, linf),
        AttackSpec("pgd-l2", "pgd", "l2", l2[0], l2[1]),
        AttackSpec("pgd-l1", "pgd", "l1", l1[0], l1[1]),
        AttackSpec("apgd-l2", "apgd-l2", "l2", l2[0]),
        AttackSpec("apgd-l1", "apgd-l1", "l1", l1[0]),
        *(AttackSpec(m["label"], m["attack"], "linf", eps, dict(m["hparams"]))
          for m in TABLE2_MEMBERS if m["label"] != "fgsm"),
        AttackSpec("ensemble", "ensemble", "linf", eps, {"members": TABLE2_MEMBERS}),
        AttackSpec("autoattack", "autoattack", "linf", eps, {"version": "standard"},
                   {"cpu": CPU_CAP_AA}),
        AttackSpec("autoattack-l2", "autoattack-l2", "l2", l2[0], {"version": "standard"},
                   {"cpu": CPU_CAP_AA}),
        AttackSpec("autoattack-l1", "autoattack-l1", "l1", l1[0], {"version": "standard"},
                   {"cpu": CPU_CAP_AA}),
        AttackSpec("adaptive", "adaptive", "linf", eps, {"steps": 20, "rel_step_size": 0.1}),
        AttackSpec("rays", "rays", "linf", eps, {"n_queries": 10000}, {"cpu": CPU_CAP_AA}),
        *(AttackSpec(f"pgd-k{k}", "pgd", "linf", eps, {"steps": k, "step_size": sanity_step},
                     sanity_caps) for k in TABLE6_STEPS),
        *(AttackSpec(f"pgd-r{r}", "pgd", "linf", eps,
                     {"steps": 40, "step_size": restart_step, "restarts": r}, sanity_caps)
          for r in TABLE7_RESTARTS),
        AttackSpec("pgd-fig4", "pgd", "linf", eps, {"steps": 20, "rel_step_size": 2.5 / 20}),
    ]
    return {s.label: s for s in specs}


def _dynamic(label: str, specs: dict[str, AttackSpec]) -> Optional[AttackSpec]:
    """``pgd-k<K>`` / ``pgd-r<R>`` for any K, R (Table 6/7 shapes at other values)."""
    m = re.fullmatch(r"pgd-([kr])([1-9][0-9]*)", label)
    if m is None:
        return None
    base = specs["pgd-k20" if m.group(1) == "k" else "pgd-r1"]
    key = "steps" if m.group(1) == "k" else "restarts"
    return replace(base, label=label).with_hparams(**{key: int(m.group(2))})


SUITES: dict[str, list[str]] = {
    "default": ["fgsm", "pgd"],
    "table1": ["pgd", "pgd-l2", "pgd-l1", "autoattack", "apgd-l2", "apgd-l1", "autoattack-l2",
               "autoattack-l1"],
    "table2": ["fgsm", "pgd20", "pgd100", "cw", "ensemble", "autoattack"],
    "table3": ["pgd", "autoattack"],
    "table6": [f"pgd-k{k}" for k in TABLE6_STEPS],
    "table7": [f"pgd-r{r}" for r in TABLE7_RESTARTS],
    "table8": ["pgd20", "adaptive"],
    "fig4": ["fgsm", "pgd-fig4"],
}
SUITES["sanity"] = SUITES["fig4"] + SUITES["table6"] + SUITES["table7"] + SUITES["table8"]

#: suites that sweep ε: suite → scale → grid (Table 3: paper's {2,4,6}/255 plus 8/255)
SUITE_EPS: dict[str, dict[str, list[float]]] = {
    "table3": {"cifar": [2 / 255, 4 / 255, 6 / 255, 8 / 255], "mnist": [0.1, 0.2, 0.3]},
    "fig4": {"cifar": [e / 255 for e in (1, 2, 4, 6, 8, 12, 16, 24, 32)],
             "mnist": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]},
}
SUITE_EPS["sanity"] = SUITE_EPS["fig4"]


def parse_eps_list(text: Optional[str]) -> Optional[list[float]]:
    """``"2/255,4/255"`` → floats (None passes through).

    Raises:
        UsageError: a malformed or negative value.
    """
    if text is None or not str(text).strip():
        return None
    return [parse_eps(t.strip()) for t in str(text).split(",") if t.strip()]


def resolve_specs(attacks: Optional[str], scale: str, *, suite: Optional[str] = None,
                  eps: Optional[float | list[float]] = None) -> list[AttackSpec]:
    """Turn ``--attacks a,b`` and/or ``--suite name`` into specs.

    A label may carry its own ε as ``label@eps`` (``pgd@4/255``). ``eps`` (one value or a
    list) overrides every ε; otherwise an ε-sweeping suite (``table3``, ``fig4``) expands each
    of its labels over its grid (the sanity suite sweeps only its Figure 4 labels).

    Raises:
        UsageError: unknown label or suite (the message lists the valid ones).
    """
    specs = attack_specs(scale)
    chosen: list[tuple[str, Optional[list[float]]]] = []
    if suite:
        if suite not in SUITES:
            raise UsageError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
        grid = SUITE_EPS.get(suite, {}).get(scale)
        sweep = SUITES["fig4"] if suite == "sanity" else SUITES[suite]
        chosen += [(lab, grid if lab in sweep else None) for lab in SUITES[suite]]
    if attacks:
        parts = [a.strip() for a in attacks.split(",") if a.strip()]
        for part in (list(specs) if parts == ["all"] else parts):
            label, _, at = part.partition("@")
            chosen.append((label, [parse_eps(at)] if at else None))
    if not chosen:
        chosen = [(lab, None) for lab in SUITES["default"]]
    override = [eps] if isinstance(eps, (int, float)) else eps
    out: list[AttackSpec] = []
    for label, grid in chosen:
        base = specs.get(label) or _dynamic(label, specs)
        if base is None:
            raise UsageError(f"unknown attack {label!r}; valid: {', '.join(specs)} "
                             f"(also pgd-k<K>, pgd-r<R>, and label@eps)")
        for e in (override or grid or [None]):
            spec = base if e is None else base.with_eps(e)
            if spec not in out:
                out.append(spec)
    return out
