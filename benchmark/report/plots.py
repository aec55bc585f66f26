"""The paper's figures with matplotlib (Agg): Figure 2, Figure 3, Figure 4 and the rejection ROC.

Each function returns a ``Figure`` (or None when the rows hold nothing to plot); :func:`save`
writes the PNG. Colours are fixed per defense: its position in the order the caller passes
(the registry order, from ``advbench report``) indexes the ``tab20`` palette, so a defense has
the same colour in every plot of every report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from benchmark.report.tables import corruption_title, order_labels  # noqa: E402
from benchmark.store import atomic_write_bytes  # noqa: E402

_BLOCK = ["arch", "checkpoint"]


def defense_colour(label: str, order: Sequence[str] = ()) -> Any:
    """Fixed colour of a defense (a label ``trades [beta=3]`` takes its defense's colour).

    Position i in ``order`` (the caller passes the registry order) picks ``tab20`` entry 2i
    (the ten saturated hues first), then 2i−19; a defense not in ``order`` gets a colour from
    the hash of its name.
    """
    from benchmark.config import stable_hash

    names = list(order)
    name = label.split(" ")[0]
    i = names.index(name) if name in names else int(stable_hash(name, 6), 16)
    i %= 20
    return plt.get_cmap("tab20")(2 * i if i < 10 else 2 * i - 19)


def save(fig: Figure, path: Path | str, *, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically (no timestamp metadata, so reruns are comparable)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _blocks(df: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    return list(df.groupby(_BLOCK, sort=True)) if len(df) else []


def severity_figure(corr: pd.DataFrame, order: Sequence[str] = ()) -> Optional[Figure]:
    """Figure 3: CIFAR-10-C accuracy per severity (mean over corruptions), bars per defense."""
    blocks = _blocks(corr)
    if not blocks:
        return None
    fig, axes = plt.subplots(len(blocks), 1, figsize=(8, 3.6 * len(blocks)), squeeze=False)
    for ax, ((arch, ckpt), df) in zip(axes[:, 0], blocks):
        per_seed = df.groupby(["label", "seed", "severity"])["accuracy"].mean()
        stats = per_seed.groupby(["label", "severity"]).agg(["mean", "std"])
        labels = order_labels(df["label"], order)
        width = 0.8 / len(labels)
        lo, hi = 100.0, 0.0
        for i, lab in enumerate(labels):
            s = stats.loc[lab]
            x = s.index.to_numpy() + (i - (len(labels) - 1) / 2) * width
            err = s["std"] if s["std"].notna().any() else None  # bars only with several seeds
            ax.bar(x, s["mean"], width, yerr=err, label=lab, color=defense_colour(lab, order), capsize=2)
            lo, hi = min(lo, float(s["mean"].min())), max(hi, float(s["mean"].max()))
        ax.set_ylim(max(0.0, lo - 5), min(100.0, hi + 3))
        ax.set_xticks(range(1, 6))
        ax.set_xlabel("corruption severity")
        ax.set_ylabel("accuracy (%), mean over corruptions")
        data = corruption_title("CIFAR-10-C", df.get("corruption_provenance",
                                                     pd.Series(dtype=str)).unique())
        ax.set_title(f"{data} — arch {arch}, checkpoint {ckpt} (y axis truncated)")
        ax.legend(fontsize=8, ncol=min(4, len(labels)))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def eps_figure(att: pd.DataFrame, order: Sequence[str] = ()) -> Optional[Figure]:
    """Figure 4: accuracy vs ε for FGSM and PGD (``pgd-fig4`` rows), one line per defense.

    ε = 0 is the clean accuracy of the same test points. Drawn when some attack has rows at two
    or more ε.
    """
    if not len(att):
        return None
    sweep = att[att["attack"].isin(["fgsm", "pgd-fig4"])]
    if not len(sweep) or sweep.groupby("attack")["eps"].nunique().max() < 2:
        return None
    blocks = _blocks(sweep)
    fig, axes = plt.subplots(len(blocks), 2, figsize=(10, 3.8 * len(blocks)), squeeze=False,
                             sharey=True)
    per255 = bool((sweep["eps"] <= 64 / 255 + 1e-9).all())
    for row, ((arch, ckpt), df) in zip(axes, blocks):
        for ax, (attack, title) in zip(row, (("fgsm", "FGSM"), ("pgd-fig4", "PGD-20, step 2.5ε/20"))):
            part = _one_point_set(df[df["attack"] == attack])
            for lab in order_labels(part["label"], order):
                p = part[part["label"] == lab]
                clean = p.groupby("seed")["clean"].first().mean()
                curve = p.groupby("eps")["robust"].agg(["mean", "std"]).sort_index()
                x = np.concatenate([[0.0], curve.index.to_numpy()]) * (255 if per255 else 1)
                y = np.concatenate([[clean], curve["mean"].to_numpy()])
                err = np.concatenate([[0.0], curve["std"].fillna(0).to_numpy()])
                ax.errorbar(x, y, yerr=err if err.any() else None, marker="o", ms=3, capsize=2,
                            label=lab, color=defense_colour(lab, order))
            ax.set_title(f"{title} — {arch}, {ckpt}")
            ax.set_xlabel("ε (×1/255)" if per255 else "ε")
            ax.grid(alpha=0.3)
            if len(part):
                ax.legend(fontsize=8)
        row[0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    return fig


def _one_point_set(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run, the rows of its most common ``n_examples`` (the sweep's test points; ties: more
    points), one per ε, so a curve and its ε = 0 clean point are measured on the same points."""
    out = []
    for _, run in rows.groupby(["run_id", "checkpoint"], sort=False):
        counts = run["n"].value_counts()
        n = max(counts.index, key=lambda v: (counts[v], v))
        out.append(run[run["n"] == n].drop_duplicates("eps"))
    return pd.concat(out) if out else rows


def training_text(hp: dict[str, Any]) -> str:
    """How a run was trained, for a figure's title: training attack, digits, epochs."""
    k, step = hp.get("train_attack_steps"), hp.get("train_step_size")
    loss = hp.get("train_attack_loss", "ce")
    subset = hp.get("train_subset")
    digits = f"{subset:,} training points" if subset else "the full training set"
    return (f"PGD-{k} (step {step:g}{'' if loss == 'ce' else ', ' + loss + ' loss'}), "
            f"{digits}, {hp.get('epochs')} epochs")


def figure2(panels: Sequence[dict[str, Any]]) -> Figure:
    """Figure 2: 2-D features, clean (left) then adversarial (right), one panel per model.

    Points are coloured by true class. Prototypes are drawn as stars where they are; classifier
    weights (models without prototypes) only give directions, so they are drawn as stars at the
    median feature norm along their direction and labelled so.
    """
    fig, axes = plt.subplots(1, 2 * len(panels), figsize=(4.2 * 2 * len(panels), 4.4))
    cmap = plt.get_cmap("tab10")
    for col, (cond, name) in enumerate([(c, i) for c in ("clean", "adv")
                                        for i in range(len(panels))]):
        p, ax = panels[name], axes[col]
        f, y = np.asarray(p[cond]), np.asarray(p["labels"])
        for k in np.unique(y):
            m = y == k
            ax.scatter(f[m, 0], f[m, 1], s=3, alpha=0.5, color=cmap(int(k) % 10),
                       rasterized=True)
        centres = p.get("centers")
        if centres is not None and np.asarray(centres).shape[1] == 2:
            c = np.asarray(centres, dtype=float)
            proto = p.get("centers_source") != "classifier weights"
            if not proto:
                radius = np.median(np.linalg.norm(np.asarray(p["clean"]), axis=1))
                c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12) * radius
            ax.scatter(c[:, 0], c[:, 1], marker="*", s=260, c=[cmap(i % 10) for i in range(len(c))],
                       edgecolors="black", linewidths=0.8, zorder=3)
        acc = p["clean_acc"] if cond == "clean" else p["adv_acc"]
        ax.set_title(f"{p['defense']} — {'clean' if cond == 'clean' else 'adversarial'} "
                     f"(acc {100 * acc:.1f}%)", fontsize=10)
        ax.set_xlabel("feature 1")
        ax.set_ylabel("feature 2")
        ax.set_aspect("equal", adjustable="datalim")
    from matplotlib.lines import Line2D

    classes = np.unique(np.concatenate([np.asarray(p["labels"]) for p in panels]))
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=cmap(int(k) % 10), label=str(k))
               for k in classes]
    for kind in dict.fromkeys("weight directions (rescaled)" if p.get("centers_source") ==
                              "classifier weights" else "prototypes" for p in panels
                              if p.get("centers") is not None):
        handles.append(Line2D([], [], ls="", marker="*", ms=12, color="white",
                              markeredgecolor="black", label=kind))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               bbox_to_anchor=(0.5, -0.06))
    atk = panels[0].get("attack", {})
    fig.suptitle(f"LeNets++ features on {panels[0].get('dataset')}: adversarial = PGD "
                 f"ε={atk.get('eps_str', '?')}, {atk.get('attack_hparams', {}).get('steps', '?')} "
                 f"steps of {atk.get('attack_hparams', {}).get('step_size', '?')}"
                 + "".join(f"\n{p['defense']} trained with {training_text(p['hparams'])}"
                           for p in panels if p.get("hparams")), fontsize=10)
    fig.tight_layout()
    return fig


def roc_figure(rej: pd.DataFrame, order: Sequence[str] = ()) -> Optional[Figure]:
    """ROC curves of the rejection score (``rejection`` rows): one panel per negative set, one
    line per defense (its first seed), TPR = clean points accepted, FPR = negatives accepted."""
    if not len(rej) or not any(len(r) for r in rej["roc"]):
        return None
    sets = [s for s in ("pgd", "adaptive") if s in set(rej["negatives"])]
    sets += sorted(set(rej["negatives"]) - set(sets))
    blocks = _blocks(rej)
    fig, axes = plt.subplots(len(blocks), len(sets), figsize=(3.6 * len(sets), 3.6 * len(blocks)),
                             squeeze=False)
    for row, ((arch, ckpt), df) in zip(axes, blocks):
        for ax, neg in zip(row, sets):
            part = df[df["negatives"] == neg].sort_values("seed", kind="stable")
            for lab in order_labels(part["label"], order):
                r = part[part["label"] == lab].iloc[0]
                if len(r["roc"]):
                    pts = np.asarray(r["roc"], dtype=float)
                    ax.plot(pts[:, 0], pts[:, 1], color=defense_colour(lab, order),
                            label=f"{lab} ({r['auroc']:.1f})")
            ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
            ax.axhline(0.95, color="grey", lw=0.5)
            ax.set_title(f"{neg} — {arch}, {ckpt}", fontsize=9)
            ax.set_xlabel("FPR (negatives accepted)")
            ax.grid(alpha=0.3)
            if len(part):
                ax.legend(fontsize=7, title="AUROC %", title_fontsize=7)
        row[0].set_ylabel("TPR (clean accepted)")
    fig.tight_layout()
    return fig
