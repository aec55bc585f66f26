"""The result of :func:`benchmark.evaluate_model`: accuracies with intervals, checks, verdict.

Built only from the rows evaluation wrote (attack, headline and check rows, the same rows
``advbench report`` reads) and their per-sample bit strings, so what it prints and what the
report shows cannot disagree. The verdict is the report's (:mod:`benchmark.report.verdicts`):
a failed *masking* check doubts every white-box cell and the headline (†, ``reliable`` =
``no``); a failed *weak-attack* check only the attack it found weak (§).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

#: confidence of every interval (Wilson score interval, as the report's tables)
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Accuracy:
    """An accuracy on ``n`` points with its 95% Wilson interval (fractions) and its mark
    († gradients look masked, § attack weak, '' none)."""

    name: str
    value: float
    low: float
    high: float
    n: int
    mark: str = ""

    def __str__(self) -> str:
        return (f"{100 * self.value:6.2f}% [{100 * self.low:5.1f}, {100 * self.high:5.1f}]"
                f"{' ' + self.mark if self.mark else ''}")


@dataclass(frozen=True)
class Check:
    """One gradient-masking check: its status (pass | fail | skipped), finding (``masking``
    or ``weak-attack``), the mark a failure puts on the cells it doubts, and why."""

    name: str
    letter: str
    status: str
    finding: str
    mark: str
    value: Optional[float]
    threshold: float
    p_value: Optional[float]
    detail: str


@dataclass
class EvaluationResult:
    """advbench's verdict on one model (see :func:`benchmark.evaluate_model`).

    Attributes:
        name, dataset, norm, eps, eps_str, n_examples: what was evaluated.
        clean: clean accuracy.
        attacks: per attack label, its robust accuracy.
        headline: the per-sample worst case over every attack that ran on these points
            (``headline_attacks``), the number to report.
        checks: every check row, in the order run.
        reliable: the verdict on the headline: ``yes``, ``no`` (a masking check failed) or
            ``–`` (no check was judged).
        notes: what the verdict leaves out (e.g. the transfer check skipped for want of a
            source model).
        flags: per-sample booleans: ``clean``, each attack label (robust), ``headline``.
        out_dir: the folder holding the rows and flags.
    """

    name: str
    dataset: str
    norm: str
    eps: float
    eps_str: str
    n_examples: int
    clean: Accuracy
    attacks: dict[str, Accuracy]
    headline: Accuracy
    headline_attacks: list[str]
    checks: list[Check]
    reliable: str
    notes: list[str]
    flags: dict[str, np.ndarray]
    out_dir: Any
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def masked(self) -> bool:
        """Whether a masking check failed (the headline is doubted)."""
        return self.reliable == "no"

    def to_rows(self) -> list[dict[str, Any]]:
        """The attack, headline and check rows, as ``advbench report`` reads them (write them
        to a ``rows.jsonl`` for ``advbench report --rows``, or keep ``runs_dir``)."""
        return [dict(r) for r in self.rows]

    def to_frame(self) -> Any:
        """A pandas DataFrame, one line per accuracy (clean, each attack, headline: value and
        interval in [0,1]) and per check (status, finding, value, threshold, p)."""
        import pandas as pd
        lines: list[dict[str, Any]] = []
        for kind, acc in [("clean", self.clean), *(("attack", a) for a in self.attacks.values()),
                          ("headline", self.headline)]:
            lines.append({"kind": kind, "name": acc.name, "value": acc.value,
                          "ci_low": acc.low, "ci_high": acc.high, "n_examples": acc.n,
                          "mark": acc.mark})
        for c in self.checks:
            lines.append({"kind": "check", "name": c.name, "value": c.value,
                          "n_examples": self.n_examples, "mark": c.mark, "status": c.status,
                          "finding": c.finding, "threshold": c.threshold,
                          "p_value": c.p_value, "detail": c.detail})
        frame = pd.DataFrame(lines)
        frame.attrs.update(model=self.name, dataset=self.dataset, norm=self.norm, eps=self.eps,
                           reliable=self.reliable)
        return frame

    def __str__(self) -> str:
        lines = [f"advbench verdict: {self.name} on {self.dataset}, {self.norm} ε = "
                 f"{self.eps_str}, first {self.n_examples} points (95% intervals)",
                 f"  {'clean':<22} {self.clean}"]
        lines += [f"  {label:<22} {acc}" for label, acc in self.attacks.items()]
        lines.append(f"  {'headline (worst case)':<22} {self.headline}   over "
                     + ", ".join(self.headline_attacks))
        judged = [c for c in self.checks if c.status != "skipped"]
        failed = [c for c in judged if c.status == "fail"]
        lines.append(f"  reliable: {self.reliable}{' †' if self.masked else ''}  ({len(judged)} "
                     f"checks judged, {len(failed)} failed, "
                     f"{len(self.checks) - len(judged)} skipped)")
        for c in self.checks:
            value = "–" if c.value is None else f"{c.value:.3f}"
            status = c.status.upper() if c.status == "fail" else c.status
            lines.append(f"    ({c.letter}) {c.name:<15} {status:<7} {c.mark or ' '} value "
                         f"{value:<5} min. effect {c.threshold:<4g} [{c.finding} check]"
                         + (f": {c.detail}" if c.status != "pass" else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def wilson_accuracy(name: str, flags: np.ndarray, mark: str = "") -> Accuracy:
    """An :class:`Accuracy` from per-sample booleans."""
    from benchmark.report.stats import wilson
    k, n = int(np.sum(flags)), int(len(flags))
    lo, hi = wilson(k, n, CONFIDENCE)
    return Accuracy(name, k / n, lo, hi, n, mark)


def build_result(t: Any, attack_rows: Sequence[dict[str, Any]],
                 check_rows: Sequence[dict[str, Any]], n: int) -> EvaluationResult:
    """The result of one evaluation from the rows it wrote (``t`` is its Target)."""
    from benchmark.config import same_eps
    from benchmark.eval.worstcase import from_hex, write_headlines
    from benchmark.report.verdicts import RowVerdict, row_verdicts

    eps, norm = float(t.cfg.hparams["eps"]), str(t.cfg.hparams["norm"])
    heads = [h for h in write_headlines(t.out_dir, t.checkpoint, base=t.row("", "headline"))
             if h["norm"] == norm and same_eps(float(h["eps"]), eps) and h["n_examples"] == n]
    if not heads:
        raise RuntimeError(f"no headline row for {norm} ε={eps} on {n} points in {t.out_dir}")
    head = heads[0]
    name = t.cfg.defense
    verdict = row_verdicts(check_rows, [name] * len(check_rows)).get(
        (t.cfg.arch, t.checkpoint, name), RowVerdict())
    flags = {"clean": from_hex(head["clean_bits"], n)}
    attacks = {}
    for r in attack_rows:
        label = str(r["attack"])
        flags[label] = from_hex(r["robust_bits"], n)
        attacks[label] = wilson_accuracy(label, flags[label], verdict.mark(True, label))
    flags["headline"] = from_hex(head["robust_bits"], n)
    checks = [Check(str(r["check"]), str(r.get("letter")), str(r["status"]),
                    str(r.get("finding")), ("†" if r.get("finding") == "masking" else "§")
                    if r["status"] == "fail" else "", r.get("value"),
                    float(r.get("threshold", float("nan"))), r.get("p_value"),
                    str(r.get("detail"))) for r in check_rows]
    notes = []
    for c in checks:
        if c.name == "transfer" and c.status == "skipped":
            notes.append("the verdict lacks the transfer check (d): it was skipped for want "
                         "of a source model")
    if not checks:
        notes.append("no check ran: the headline is unjudged (checks=True in Python, "
                     "advbench check --model-file FILE in the CLI)")
    kept = {"attack", "headline", "check"}
    from benchmark.eval.checks import _rows_of
    rows = [r for r in _rows_of(t.out_dir) if r.get("kind", "attack") in kept
            and r.get("checkpoint") == t.checkpoint]
    return EvaluationResult(
        name=name, dataset=t.info.name, norm=norm, eps=eps, eps_str=str(head["eps_str"]),
        n_examples=n, clean=wilson_accuracy("clean", flags["clean"]), attacks=attacks,
        headline=wilson_accuracy("headline", flags["headline"], verdict.mark(True, "headline")),
        headline_attacks=list(head["attacks"]), checks=checks, reliable=verdict.reliable,
        notes=notes, flags=flags, out_dir=t.out_dir, rows=rows)
