"""One-at-a-time ablations of a defense, paired with its full method and with AT.

``advbench ablation`` reads the rows of a runs folder and builds one table per (dataset,
arch): a row per hyperparameter variant of ``--defense`` (the *full method* is the variant
whose varied keys all hold the defense's defaults, or for a protocol key such as
``train_attack_steps`` the value most of its runs hold) and a row per variant of the reference
defense (AT).
Every row uses the same per-sample worst case over the same attacks (default FGSM, PGD-40,
C&W, AutoAttack), recomputed from each attack row's ``robust_bits``, so a run whose stored
headline covers more attacks (``advbench check`` adds some) is compared on equal terms.

Per row: the seeds, clean and per-attack robust accuracy (mean over seeds), the headline
(mean ± std over seeds) with its pooled 95% Wilson interval, exact McNemar tests of the
headline flags against the full method and against the AT variant trained the same way
(the fewest differing hyperparameters, e.g. the same training attack; seeds paired by seed index,
discordant counts summed: :func:`benchmark.report.stats.pair_seeds`), the seed-paired mean
difference to each with a 95% Student-t interval over the common seeds, and the feature-space
metrics of Table 4 (FDR, AFS, SCR on clean and PGD-20 features) where ``advbench features``
wrote them. A variant that lacks an attack row on some seed is listed with what is missing,
never averaged over fewer attacks.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy.stats import t as student_t

from benchmark.eval.worstcase import from_hex
from benchmark.report.stats import ALPHA, mcnemar, pair_seeds, wilson

STANDARD = ("fgsm", "pgd", "cw", "autoattack")
FEATURES = ("fdr", "afs", "scr")
GEOMETRY = ("mean_sep", "min_sep")  # angles between class centres: the same in both conditions


@dataclass
class Variant:
    """The runs of one (defense, hyperparameters) pair: per seed, per attack, the flags."""

    defense: str
    label: str
    hparams: dict[str, Any] = field(default_factory=dict)
    clean: dict[int, np.ndarray] = field(default_factory=dict)
    robust: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    features: dict[str, list[float]] = field(default_factory=dict)

    def missing(self, attacks: Sequence[str]) -> list[str]:
        """``seed s: attack`` for every attack row a seed lacks."""
        return [f"seed {s}: {a}" for s in sorted(self.robust) for a in attacks
                if a not in self.robust[s]]

    def headline(self, attacks: Sequence[str]) -> dict[int, np.ndarray]:
        """Per seed, the per-sample worst case over ``attacks`` (seeds with all of them), on
        the first N test points that every attack's row covers (rows are on the first N
        points, so a longer row's head is the same points)."""
        out = {}
        for s, got in self.robust.items():
            if all(a in got for a in attacks):
                n = min(len(got[a]) for a in attacks)
                out[s] = np.logical_and.reduce([got[a][:n] for a in attacks])
        return out

    def accuracy(self, seed: int, attack: str, n: int) -> float:
        """Accuracy (%) of one attack (or ``clean``) on the first ``n`` points of a seed."""
        f = self.clean[seed] if attack == "clean" else self.robust[seed][attack]
        return 100 * float(f[:n].mean())


def _baseline(rows: Sequence[Mapping[str, Any]], defense: str, defaults: Mapping[str, Any]
              ) -> dict[str, Any]:
    """The full method's value of every key: the defense's default where it has one, else the
    value most of its runs hold (a protocol key such as ``train_attack_steps``)."""
    runs = {r.get("run_id"): r.get("hparams") or {} for r in rows if r.get("defense") == defense}
    out = dict(defaults)
    for k in sorted({k for hp in runs.values() for k in hp} - set(defaults)):
        vals = [json.dumps(hp.get(k), sort_keys=True, default=str) for hp in runs.values()]
        out[k] = json.loads(max(sorted(set(vals)), key=vals.count))
    return out


def _varied(rows: Sequence[Mapping[str, Any]], defense: str, base: Mapping[str, Any]
            ) -> list[str]:
    """The keys whose value differs between the runs of ``defense``."""
    runs = [r.get("hparams") or {} for r in rows if r.get("defense") == defense]
    return [k for k in sorted(base) if len({json.dumps(hp.get(k, base[k]), default=str)
                                            for hp in runs}) > 1]


def _label(hp: Mapping[str, Any], varied: Sequence[str], defaults: Mapping[str, Any]) -> str:
    diff = [k for k in varied if hp.get(k, defaults.get(k)) != defaults.get(k)]
    return "full method" if not diff else ", ".join(f"{k}={hp.get(k, defaults.get(k))}"
                                                   for k in diff)


def collect(records: Iterable[Mapping[str, Any]], *, defense: str, reference: str,
            defaults: Mapping[str, Any], dataset: str, arch: Optional[str] = None,
            eps: Optional[float] = None, checkpoint: str = "best") -> list[Variant]:
    """Group attack and feature rows into variants (the reference's first, then the full
    method, then the other variants by label).

    Args:
        records: rows (``benchmark.report.report.load_records``).
        defense: the ablated defense; reference: the baseline defense.
        defaults: the defense's default hyperparameters (incl. optional ones).
        dataset, arch, checkpoint: which rows; eps: the attacks' ε (default: PGD's most
            common ε among the rows).
    """
    rows = [r for r in records if r.get("dataset") == dataset
            and (arch is None or r.get("arch") == arch) and r.get("checkpoint") == checkpoint
            and r.get("defense") in (defense, reference)]
    attack_rows = [r for r in rows if r.get("kind", "attack") == "attack"
                   and r.get("norm", "linf") == "linf" and r.get("robust_bits")]
    if eps is None:
        pgd = [float(r["eps"]) for r in attack_rows if r.get("attack") == "pgd"]
        eps = max(set(pgd), key=pgd.count) if pgd else None
    base = _baseline(rows, defense, defaults)
    varied = _varied(rows, defense, base)
    ref_base = _baseline(rows, reference, {})
    ref_varied = _varied(rows, reference, ref_base)
    out: dict[tuple, Variant] = {}
    for r in attack_rows + [r for r in rows if r.get("kind") == "features"]:
        hp = r.get("hparams") or {}
        if r["defense"] == reference:
            lab = _label(hp, ref_varied, ref_base)
            lab = reference if lab == "full method" else f"{reference} [{lab}]"
        else:
            lab = _label(hp, varied, base)
        v = out.setdefault((r["defense"], lab), Variant(r["defense"], lab, dict(hp)))
        seed, n = int(r.get("seed", 0)), int(r.get("n_examples", 0))
        if r.get("kind") == "features":
            for m in FEATURES + (GEOMETRY if r.get("condition") == "clean" else ()):
                if r.get(m) is not None:
                    name = m if m in GEOMETRY else f"{m}_{r.get('condition')}"
                    v.features.setdefault(name, []).append(float(r[m]))
            continue
        if eps is not None and not math.isclose(float(r["eps"]), eps, rel_tol=1e-6):
            continue
        got = v.robust.setdefault(seed, {})
        if len(got.get(str(r["attack"]), ())) >= n:  # keep the row on the most points
            continue
        got[str(r["attack"])] = from_hex(r["robust_bits"], n)
        if r.get("clean_bits") and len(v.clean.get(seed, ())) < n:
            v.clean[seed] = from_hex(r["clean_bits"], n)
    order = sorted(out.values(), key=lambda v: (v.defense != reference,
                                                v.label != "full method", v.label))
    return order


def _mean_diff(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray]
               ) -> tuple[float, float, float, int]:
    """Seed-paired mean difference of accuracies (points) and its 95% t interval."""
    common = sorted(set(a) & set(b))
    d = np.array([100 * (a[s].mean() - b[s].mean()) for s in common])
    if len(d) < 2:
        m = float(d[0]) if len(d) else math.nan
        return m, math.nan, math.nan, len(d)
    half = student_t.ppf(1 - ALPHA / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), len(d)


def _matching(v: Variant, refs: Sequence[tuple[Variant, Mapping[int, np.ndarray]]]
              ) -> tuple[Optional[Variant], Mapping[int, np.ndarray]]:
    """The reference variant trained like ``v`` and its headline flags: the fewest differing
    shared keys (a variant meets AT with the same training attack), then the most seeds."""
    if not refs:
        return None, {}

    def cost(ref: tuple[Variant, Mapping[int, np.ndarray]]) -> tuple[int, int]:
        r, heads = ref
        shared = set(r.hparams) & set(v.hparams)
        return (sum(json.dumps(r.hparams[k], default=str) != json.dumps(v.hparams[k], default=str)
                    for k in shared), -len(heads))
    return min(refs, key=cost)


def summarise(variants: Sequence[Variant], attacks: Sequence[str] = STANDARD,
              reference: str = "at") -> list[dict[str, Any]]:
    """One dict per variant with the numbers the table shows (accuracies in percent)."""
    heads = [v.headline(attacks) for v in variants]
    full, full_h = next(((v, h) for v, h in zip(variants, heads) if v.label == "full method"),
                        (None, {}))
    refs = [(v, h) for v, h in zip(variants, heads) if v.defense == reference]
    out = []
    for v, h in zip(variants, heads):
        ref, ref_h = _matching(v, refs)
        accs = [100 * f.mean() for _, f in sorted(h.items())]
        k, n = sum(int(f.sum()) for f in h.values()), sum(len(f) for f in h.values())
        lo, hi = wilson(k, n) if n else (math.nan, math.nan)
        row: dict[str, Any] = {
            "variant": v.label, "defense": v.defense, "seeds": sorted(h),
            "n_points": sorted({len(f) for f in h.values()}),
            **{a: float(np.mean([v.accuracy(s, a, len(f)) for s, f in h.items()]))
               if h else math.nan for a in ("clean", *attacks)},
            "headline": float(np.mean(accs)) if accs else math.nan,
            "headline_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else math.nan,
            "headline_per_seed": accs, "lo": 100 * lo, "hi": 100 * hi,
            "missing": v.missing(attacks),
            **{m: float(np.mean(x)) for m, x in v.features.items()}}
        for name, base, other in (("full", full, full_h), ("at", ref, ref_h)):
            if other and h and v is not base:
                a, b = pair_seeds(h, other)
                row[f"only_this_vs_{name}"], row[f"only_{name}"], row[f"p_{name}"] = mcnemar(a, b)
                row[f"{name}_variant"] = base.label
                row[f"diff_{name}"], row[f"diff_{name}_lo"], row[f"diff_{name}_hi"], \
                    row[f"diff_{name}_seeds"] = _mean_diff(h, other)
        out.append(row)
    return out


def _num(v: Any, d: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _test(r: Mapping[str, Any], name: str) -> str:
    if f"p_{name}" not in r:
        return "–"
    against = r.get(f"{name}_variant", "")
    tag = f"against {against}: " if name == "at" and "[" in against else ""
    return (tag + f"{r[f'only_this_vs_{name}']}/{r[f'only_{name}']}, p = {r[f'p_{name}']:.2g}; "
            f"Δ {_num(r[f'diff_{name}'])} [{_num(r[f'diff_{name}_lo'])}, "
            f"{_num(r[f'diff_{name}_hi'])}]")


def to_markdown(rows: Sequence[Mapping[str, Any]], attacks: Sequence[str] = STANDARD,
                title: str = "") -> str:
    """The ablation table (accuracies in %, headline mean ± std over seeds [pooled Wilson])."""
    feats = [m for m in [f"{f}_{c}" for c in ("clean", "pgd20") for f in FEATURES]
             + list(GEOMETRY) if any(m in r for r in rows)]
    head = (["variant", "seeds", "clean", *attacks, "headline", "vs full method", "vs AT"]
            + feats)
    lines = ([f"**{title}**", ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hl = (f"{_num(r['headline'])} ± {_num(r['headline_std'])} "
              f"[{_num(r['lo'])}, {_num(r['hi'])}]")
        cells = [str(r["variant"]), ",".join(map(str, r["seeds"])) or "–", _num(r["clean"]),
                 *[_num(r[a]) for a in attacks], hl, _test(r, "full"), _test(r, "at"),
                 *[_num(r.get(m), 2) for m in feats]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Headline: per-sample worst case over " + ", ".join(attacks) + " on the same "
              "points; mean ± std over seeds [95% Wilson interval of the seeds' points pooled]. "
              "Tests: exact McNemar on the headline flags, seeds paired by index, `b/c` = points "
              "only this row / only the other row keeps; Δ = seed-paired mean difference "
              "(points) with a 95% t interval over the common seeds."
              + (" Feature metrics (Table 4, `advbench features`): mean over the seeds that "
                 "have them; MeanSep/MinSep in degrees." if feats else "")]
    miss = [(r["variant"], m) for r in rows for m in r["missing"]]
    if miss:
        lines += ["", "Missing attack rows (those seeds are left out): "
                  + "; ".join(f"{v}: {m}" for v, m in miss) + "."]
    return "\n".join(lines) + "\n"
