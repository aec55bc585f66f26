"""`advbench ablation`: variants labelled against the full method, the headline recomputed as
the per-sample worst case, paired tests and intervals equal to their formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import binomtest, t as student_t

from benchmark.cli import cli
from benchmark.eval.worstcase import to_hex
from benchmark.report.ablation import collect, summarise, to_markdown
from benchmark.report.stats import wilson

DEFAULTS = {"alpha": 40.0, "lambda_dpp": 0.1, "train_attack_loss": "ce"}
ATTACKS = ("fgsm", "pgd", "autoattack")
N = 40


def _rows(defense: str, seed: int, hp: dict, flags: dict[str, np.ndarray],
          clean: np.ndarray) -> list[dict]:
    run_id = f"{defense}-{seed}-{sorted(hp.items())}"
    return [{"kind": "attack", "dataset": "mnist", "arch": "small-cnn", "checkpoint": "best",
             "defense": defense, "run_id": run_id, "seed": seed, "hparams": hp, "norm": "linf",
             "eps": 0.3, "attack": a, "n_examples": len(f), "robust_bits": to_hex(f),
             "clean_bits": to_hex(clean[:len(f)])} for a, f in flags.items()]


def _flags(rng: np.random.Generator, p: float) -> dict[str, np.ndarray]:
    clean = rng.random(N) < 0.95
    out = {a: clean & (rng.random(N) < p + 0.1 * (2 - i)) for i, a in enumerate(ATTACKS)}
    return {"clean": clean, **out}


@pytest.fixture()
def records() -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    recs, truth = [], {}
    for label, defense, hp, p in [("at", "at", {"train_subset": 4000}, 0.7),
                                  ("full method", "adv-dpnp", {"train_subset": 4000}, 0.6),
                                  ("lambda_dpp=0.0", "adv-dpnp",
                                   {"train_subset": 4000, "lambda_dpp": 0.0}, 0.3)]:
        for seed in (0, 1, 2):
            f = _flags(rng, p)
            truth[(label, seed)] = f
            recs += _rows(defense, seed, hp, {a: f[a] for a in ATTACKS}, f["clean"])
    return recs, truth


def _by_label(rows: list[dict]) -> dict[str, dict]:
    return {r["variant"]: r for r in rows}


def test_labels_headline_and_interval_equal_their_formulas(records):
    recs, truth = records
    variants = collect(recs, defense="adv-dpnp", reference="at", defaults=DEFAULTS,
                       dataset="mnist")
    assert [v.label for v in variants] == ["at", "full method", "lambda_dpp=0.0"]
    rows = _by_label(summarise(variants, ATTACKS))
    for label in ("at", "full method", "lambda_dpp=0.0"):
        worst = {s: truth[(label, s)]["fgsm"] & truth[(label, s)]["pgd"]
                 & truth[(label, s)]["autoattack"] for s in (0, 1, 2)}
        accs = [100 * worst[s].mean() for s in (0, 1, 2)]
        r = rows[label]
        assert r["headline"] == pytest.approx(np.mean(accs))
        assert r["headline_std"] == pytest.approx(np.std(accs, ddof=1))
        lo, hi = wilson(sum(int(w.sum()) for w in worst.values()), 3 * N)
        assert (r["lo"], r["hi"]) == pytest.approx((100 * lo, 100 * hi))
        assert r["pgd"] == pytest.approx(np.mean([100 * truth[(label, s)]["pgd"].mean()
                                                  for s in (0, 1, 2)]))


def test_paired_tests_and_seed_difference_equal_their_formulas(records):
    recs, truth = records
    rows = _by_label(summarise(collect(recs, defense="adv-dpnp", reference="at",
                                       defaults=DEFAULTS, dataset="mnist"), ATTACKS))

    def worst(label: str, s: int) -> np.ndarray:
        f = truth[(label, s)]
        return f["fgsm"] & f["pgd"] & f["autoattack"]

    r = rows["lambda_dpp=0.0"]
    a = np.concatenate([worst("lambda_dpp=0.0", s) for s in (0, 1, 2)])
    b = np.concatenate([worst("full method", s) for s in (0, 1, 2)])
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    assert (r["only_this_vs_full"], r["only_full"]) == (only_a, only_b)
    assert r["p_full"] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    d = np.array([100 * (worst("full method", s).mean() - worst("at", s).mean())
                  for s in (0, 1, 2)])
    half = student_t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    f = rows["full method"]
    assert f["diff_at"] == pytest.approx(d.mean())
    assert (f["diff_at_lo"], f["diff_at_hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert "p_full" not in f and "p_at" not in rows["at"]   # never tested against itself


def test_a_missing_attack_drops_that_seed_and_is_listed(records):
    recs, _ = records
    recs = [r for r in recs if not (r["hparams"].get("lambda_dpp") == 0.0 and r["seed"] == 2
                                    and r["attack"] == "autoattack")]
    rows = _by_label(summarise(collect(recs, defense="adv-dpnp", reference="at",
                                       defaults=DEFAULTS, dataset="mnist"), ATTACKS))
    assert rows["lambda_dpp=0.0"]["seeds"] == [0, 1]
    assert rows["lambda_dpp=0.0"]["missing"] == ["seed 2: autoattack"]
    assert "lambda_dpp=0.0: seed 2: autoattack" in to_markdown(list(rows.values()), ATTACKS)


def test_rows_on_more_points_are_cut_to_the_common_first_points():
    rng = np.random.default_rng(1)
    clean = np.ones(500, dtype=bool)
    long = rng.random(500) < 0.8
    short = rng.random(100) < 0.5
    recs = (_rows("at", 0, {}, {"fgsm": long, "pgd": long}, clean)
            + _rows("at", 0, {}, {"autoattack": short}, clean))
    rows = summarise(collect(recs, defense="adv-dpnp", reference="at", defaults=DEFAULTS,
                             dataset="mnist"), ATTACKS)
    assert rows[0]["n_points"] == [100]
    assert rows[0]["headline"] == pytest.approx(100 * (long[:100] & short).mean())
    assert rows[0]["fgsm"] == pytest.approx(100 * long[:100].mean())


@pytest.mark.parametrize("args, needle", [
    (["--defense", "no-such"], "unknown defense"),
    (["--attacks", ","], "--attacks is empty"),
    ([], "has rows of every attack"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    res = CliRunner().invoke(cli, ["ablation", "--runs-dir", str(tmp_path), "--dataset",
                                   "mnist", *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1


def test_feature_metrics_are_averaged_per_condition_and_geometry_read_once(records):
    recs, _ = records
    feats = []
    for seed, fdr in ((0, 1.0), (1, 3.0)):
        for cond, scale in (("clean", 1.0), ("pgd20", 4.0)):
            feats.append({"kind": "features", "dataset": "mnist", "arch": "small-cnn",
                          "checkpoint": "best", "defense": "adv-dpnp", "run_id": f"f{seed}",
                          "seed": seed, "hparams": {"train_subset": 4000}, "condition": cond,
                          "fdr": fdr * scale, "afs": 0.1, "scr": 1.5,
                          "mean_sep": 88.0 + seed + (cond == "pgd20"), "min_sep": 80.0})
    rows = _by_label(summarise(collect(recs + feats, defense="adv-dpnp", reference="at",
                                       defaults=DEFAULTS, dataset="mnist"), ATTACKS))
    full = rows["full method"]
    assert full["fdr_clean"] == pytest.approx(2.0) and full["fdr_pgd20"] == pytest.approx(8.0)
    assert full["mean_sep"] == pytest.approx(88.5)     # the clean rows' only
    assert "fdr_clean" not in rows["lambda_dpp=0.0"]
    assert "| fdr_clean |" in to_markdown(list(rows.values()), ATTACKS).replace(
        "fdr_clean | afs_clean", "fdr_clean |")
