"""The headline (per-sample worst case over attacks), its rows, and the statistics the tables
draw from it: Wilson intervals, exact McNemar ties, the same-N rule, ranking apart."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binomtest, norm

from benchmark.eval.worstcase import (from_hex, headline, headline_groups, to_hex, worst_case,
                                      write_headlines)
from benchmark.eval.checks import CHECK_VERSIONS
from benchmark.report import stats

N = 48


# --------------------------------------------------------------------------- worst case
def test_worst_case_is_the_per_sample_and() -> None:
    a = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    c = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool)
    assert worst_case([a, b, c]).tolist() == [True, False, False, False, False]
    assert worst_case([a]).tolist() == a.tolist()
    with pytest.raises(ValueError):
        worst_case([])
    with pytest.raises(ValueError):
        worst_case([a, a[:3]])


def test_hex_bits_round_trip_and_slice_to_a_prefix() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 100, 1001):
        bits = rng.random(n) < 0.4
        text = to_hex(torch.from_numpy(bits))
        assert len(text) == 2 * ((n + 7) // 8)
        assert (from_hex(text, n) == bits).all()
        assert (from_hex(text, n // 2) == bits[:n // 2]).all()
    with pytest.raises(ValueError):
        from_hex(to_hex([True] * 8), 9)


def test_headline_is_at_most_every_attack_and_covers_the_longer_evaluations() -> None:
    """Constructed: three attacks on 10 points, one evaluated on 20; the headline at N = 10 is
    the AND over all three (below the minimum of the single attacks here), at N = 20 only the
    attack that covers 20 points."""
    clean = torch.tensor([1] * 9 + [0], dtype=torch.bool)
    pgd = clean & torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    aa = clean & torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    long_clean = torch.cat([clean, torch.ones(10, dtype=torch.bool)])
    square = long_clean & torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 0] + [1] * 10,
                                       dtype=torch.bool)
    stored = [{"key": k, "attack": lab, "norm": "linf", "eps": 0.3, "clean": c, "robust": r}
              for k, lab, c, r in (("k1", "pgd", clean, pgd), ("k2", "autoattack", clean, aa),
                                   ("k3", "square", long_clean, square))]
    h = headline(stored, 10)
    assert h["attacks"] == ["autoattack", "pgd", "square"]
    assert h["robust"].tolist() == [False, True, True, False, False, True, False, False, False,
                                    False]
    acc = float(h["robust"].float().mean())
    assert acc == pytest.approx(0.3) and acc < min(float(r.float().mean()) for r in (pgd, aa, square[:10]))
    h20 = headline(stored, 20)
    assert h20["attacks"] == ["square"] and torch.equal(h20["robust"], square)
    assert headline(stored, 21) is None
    other = dict(stored[0], key="k4", eps=0.1)
    assert sorted(headline_groups([*stored, other])) == [("linf", 0.1), ("linf", 0.3)]


def test_headline_rows_cover_every_stored_flags_file_without_rerunning(
        run_dir: Path, data, tmp_path: Path, monkeypatch) -> None:
    """evaluate writes headline rows over its flags; check adds flags with no attack row
    (FGSM here); the next evaluate rewrites the headline over all of them and attacks
    nothing (attack calls counted)."""
    import benchmark.eval.evaluate as ev
    import benchmark.eval.flags as fl
    from benchmark.eval.checks import check_run
    from benchmark.eval.evaluate import evaluate_run, load_flags
    from benchmark.run.protocols import resolve_specs

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval", "flags"))
    calls: list[str] = []
    real = fl.attack_points

    def counted(model, attack, *args, **kwargs):
        calls.append(attack.name)
        return real(model, attack, *args, **kwargs)

    monkeypatch.setattr(ev, "attack_points", counted)
    monkeypatch.setattr(fl, "attack_points", counted)
    specs = resolve_specs("pgd", "cifar")
    (pgd,) = evaluate_run(run, specs, n_examples=N, data=data, progress=False)
    assert "robust_bits" in pgd and "clean_bits" in pgd  # every attack row carries its bits
    assert from_hex(pgd["robust_bits"], N).mean() == pytest.approx(pgd["robust_acc"])
    heads = sorted((run / "eval").glob("headline-*.json"))
    assert len(heads) == 1 and json.loads(heads[0].read_text())["attacks"] == ["pgd"]

    check_run(run, names=["fgsm-vs-pgd"], n_examples=N, data=data)  # FGSM: flags, no row
    assert not [r for r in (run / "eval").glob("*.json")
                if json.loads(r.read_text()).get("attack") == "fgsm"]
    calls.clear()
    evaluate_run(run, specs, n_examples=N, data=data, progress=False)
    assert calls == []  # nothing re-run: the headline is read from stored flags
    (head,) = [json.loads(p.read_text()) for p in (run / "eval").glob("headline-*.json")]
    keys = sorted(p.stem for p in (run / "flags").glob("*.pt"))
    assert sorted(head["flags_keys"]) == keys and head["attacks"] == ["fgsm", "pgd"]
    assert head["kind"] == "headline" and head["n_examples"] == N and head["norm"] == "linf"
    want = worst_case([load_flags(run, k)["robust"] for k in keys])
    assert (from_hex(head["robust_bits"], N) == want.numpy()).all()
    assert head["robust_acc"] == pytest.approx(float(want.float().mean()))
    assert head["robust_acc"] <= pgd["robust_acc"]
    assert write_headlines(run)[0]["robust_bits"] == head["robust_bits"]  # idempotent


# --------------------------------------------------------------------------- statistics
def test_wilson_interval_is_scipys_and_the_closed_form() -> None:
    lo, hi = stats.wilson(78, 100)
    ci = binomtest(78, 100).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == (ci.low, ci.high)
    z, p, n = norm.ppf(0.975), 0.78, 100  # Wilson (1927), by hand
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert lo == pytest.approx((centre - half) / (1 + z * z / n), abs=1e-9)
    assert hi == pytest.approx((centre + half) / (1 + z * z / n), abs=1e-9)


def test_mcnemar_counts_discordant_pairs() -> None:
    a = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 1], dtype=bool)
    assert stats.mcnemar(a, b) == (2, 1, binomtest(2, 3, 0.5).pvalue)
    assert stats.mcnemar(a, a)[2] == 1.0
    x, y = stats.pair_seeds({0: a, 1: b}, {1: a, 2: b})  # seed 1 is common: paired alone
    assert (x == b).all() and (y == a).all()


def _rows(n: int = 100) -> list[dict]:
    """Three defenses with headline rows and bits on ``n`` points: `at` (best, 80), `trades`
    (78, disagreeing with AT on 4 points: tied), `st` (40: not tied)."""
    base = {"dataset": "mnist", "arch": "small-cnn", "profile": "cpu", "checkpoint": "best",
            "hparams": {"eps": 0.3}, "data_provenance": "MNIST", "seed": 0, "norm": "linf",
            "eps": 0.3, "eps_str": "0.3", "n_examples": n}
    clean = np.ones(n, dtype=bool)
    at = np.arange(n) < 80
    trades = at.copy()
    trades[[0, 1, 2]] = False
    trades[80] = True  # 78 robust: 3 + 1 discordant points
    st = np.arange(n) < 40
    rows = []
    for d, robust in (("st", st), ("at", at), ("trades", trades)):
        common = {**base, "defense": d, "run_id": d}
        rows.append({**common, "kind": "attack", "eval_key": f"{d}-pgd", "attack": "pgd",
                     "clean_acc": 1.0, "robust_acc": float(robust.mean()) + 0.05,
                     "clean_bits": to_hex(clean), "robust_bits": to_hex(robust | (np.arange(n)
                                                                                 > 94))})
        rows.append({**common, "kind": "headline", "eval_key": f"{d}-h", "attack": "headline",
                     "attacks": ["autoattack", "pgd"], "clean_acc": 1.0,
                     "robust_acc": float(robust.mean()), "clean_bits": to_hex(clean),
                     "robust_bits": to_hex(robust)})
    return rows


def test_tables_mark_rows_tied_with_the_best_by_mcnemar(tmp_path: Path) -> None:
    from benchmark.report.report import write_report
    write_report(_rows(), tmp_path, plots=False)
    t = pd.read_csv(tmp_path / "tables" / "table1_mnist_cpu.csv",
                    index_col=["arch", "checkpoint", "defense"]).loc[("small-cnn", "best")]
    assert t.loc["at", "headline"] == 80.0 and t.loc["trades", "headline"] == 78.0
    assert t.loc["trades", "headline_p_best"] == pytest.approx(binomtest(1, 4, 0.5).pvalue)
    assert t.loc["trades", "headline_tied_best"] == 1 and t.loc["st", "headline_tied_best"] == 0
    assert t.loc["st", "headline_p_at"] < 1e-4  # binomtest(0, 40): 1.8e-12
    assert t.loc["at", "headline_attacks"] == "autoattack+pgd"
    lo, hi = stats.wilson(78, 100)
    assert (t.loc["trades", "headline_lo"], t.loc["trades", "headline_hi"]) == \
        pytest.approx((100 * lo, 100 * hi), abs=1e-4)
    md = (tmp_path / "tables" / "table1_mnist_cpu.md").read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "**80.00 [71.1, 86.7]**" in lines["at"]
    assert "78.00 [68.9, 85.0] ≈" in lines["trades"] and "≈" not in lines["st"]
    assert "α = 0.05" in md and "seeds paired by seed index" in md
    assert "Headline covers (per-sample worst case over): `autoattack`, `pgd` for every row." \
        in md


def test_same_n_rule_leaves_a_cell_empty_with_its_reason(tmp_path: Path) -> None:
    """`at` has AutoAttack on 100 points, `trades` none: the section uses the 500 points every
    row covers, so AT's AutoAttack cell is empty (with why), never its 100-point number; AT's
    PGD row on 1000 points with no per-sample record cannot be sliced to 500 either."""
    from benchmark.report.report import write_report
    base = {"dataset": "mnist", "arch": "small-cnn", "profile": "cpu", "checkpoint": "best",
            "hparams": {"eps": 0.3}, "data_provenance": "MNIST", "seed": 0, "norm": "linf",
            "eps": 0.3, "eps_str": "0.3", "kind": "attack", "clean_acc": 0.9}
    rows = [{**base, "defense": "at", "run_id": "at", "eval_key": "a1", "attack": "autoattack",
             "robust_acc": 0.5, "n_examples": 100},
            {**base, "defense": "at", "run_id": "at", "eval_key": "a2", "attack": "fgsm",
             "robust_acc": 0.7, "n_examples": 500},
            {**base, "defense": "at", "run_id": "at", "eval_key": "a3", "attack": "pgd",
             "robust_acc": 0.6, "n_examples": 1000},
            {**base, "defense": "trades", "run_id": "trades", "eval_key": "t1", "attack": "fgsm",
             "robust_acc": 0.65, "n_examples": 500},
            {**base, "defense": "trades", "run_id": "trades", "eval_key": "t2", "attack": "pgd",
             "robust_acc": 0.55, "n_examples": 500}]
    write_report(rows, tmp_path, plots=False)
    t = pd.read_csv(tmp_path / "tables" / "accuracy_mnist_cpu.csv",
                    index_col=["arch", "checkpoint", "defense"]).loc[("small-cnn", "best")]
    assert np.isnan(t.loc["at", "autoattack"]) and np.isnan(t.loc["at", "pgd"])
    assert t.loc["at", "fgsm"] == 70.0 and t.loc["trades", "pgd"] == 55.0
    assert (t["n_points"] == 500).all()
    missing = pd.read_csv(tmp_path / "tables" / "missing.csv")
    why = missing[(missing["table"] == "accuracy_mnist_cpu") & (missing["defense"] == "at")] \
        .set_index("column")["reason"]
    assert why["autoattack"] == "`autoattack` evaluated on 100 points only; the section uses " \
                                "the first 500"
    assert "no per-sample record of the first 500" in why["pgd"]
    md = (tmp_path / "tables" / "accuracy_mnist_cpu.md").read_text()
    assert md.count("Test points: the first 500 test points (the most points every row covers "
                    "(not every row has AutoAttack))") == 1


def test_an_unreliable_row_is_never_ranked_or_bold_above_reliable_ones(tmp_path: Path) -> None:
    """`st` gets the highest headline but fails a gradient-masking check: the page lists it
    apart, unranked, with its reason; the tables bold AT's headline, not st's."""
    from benchmark.report.html import board
    from benchmark.report.report import write_report
    rows = _rows()
    for r in rows:  # st now tops the headline
        if r["defense"] == "st" and r["kind"] == "headline":
            r["robust_bits"], r["robust_acc"] = to_hex(np.arange(100) < 95), 0.95
    common = {k: rows[0][k] for k in ("dataset", "arch", "profile", "checkpoint", "hparams",
                                      "data_provenance", "eps", "eps_str")}
    rows += [{**common, "kind": "check", "defense": d, "seed": 0, "run_id": d,
              "eval_key": f"c-{d}", "check": "zero-gradient",
              "check_version": CHECK_VERSIONS["zero-gradient"],
              "letter": "f", "status": s,
              "value": v, "threshold": 0.05, "detail": "masked" if s == "fail" else "ok"}
             for d, s, v in (("st", "fail", 0.9), ("at", "pass", 0.0), ("trades", "pass", 0.0))]
    rows.append({**rows[-1], "defense": "st", "run_id": "st", "eval_key": "c-st-g",
                 "check": "fgsm-vs-pgd", "letter": "g", "status": "fail", "value": 0.3,
                 "detail": "FGSM beats PGD"})  # a weak-attack finding: not a reason to unrank
    write_report(rows, tmp_path, plots=False)
    wide, _ = board(rows)
    assert list(wide["defense"]) == ["at", "trades", "st"]
    assert list(wide["rank"]) == ["1", "2", "–"] and "zero-gradient" in wide["apart"].iloc[2]
    assert "fgsm-vs-pgd" not in wide["apart"].iloc[2]  # the reason names the masking finding
    page = (tmp_path / "index.html").read_text()
    assert "Listed apart: headline potentially unreliable" in page
    body = page[page.index("<table"):]
    assert body.index(">at<") < body.index("Listed apart") < body.index(">st<")
    md = (tmp_path / "tables" / "table1_mnist_cpu.md").read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "**80.00 [71.1, 86.7]**" in lines["at"] and "**" not in lines["st"].split("|")[3]
    t = pd.read_csv(tmp_path / "tables" / "table1_mnist_cpu.csv",
                    index_col=["arch", "checkpoint", "defense"]).loc[("small-cnn", "best")]
    assert t.loc["at", "headline_p_best"] == 1.0  # AT, not st, is the section's best


def test_report_builds_from_rows_without_headlines_or_bits(tmp_path: Path) -> None:
    """Rows from before headline rows existed (e.g. the committed results): empty headline
    cells with the reason, no interval-less crash, no paired test columns in Markdown."""
    from benchmark.report.report import write_report
    rows = [r for r in _rows() if r["kind"] == "attack"]
    for r in rows:
        del r["robust_bits"], r["clean_bits"]
    write_report(rows, tmp_path, plots=False)
    md = (tmp_path / "tables" / "table1_mnist_cpu.md").read_text()
    assert "- `at` / Headline: no headline row: no ℓ∞ attack was evaluated on the run, or it was evaluated before headline rows existed" in md
    assert "| p vs best |" not in md


def test_table1_shows_apgd_and_aa_l1_l2_beside_the_paper_pgd_only_where_they_ran(
        tmp_path: Path) -> None:
    """Issue 19: the reference attacks of l1/l2 and the per-norm headline sit beside the
    paper's PGD-l1/l2 columns in Table 1; a table without them has no empty columns."""
    from benchmark.report.report import write_report
    rows = _rows()
    write_report(rows, tmp_path / "a", plots=False)
    head = (tmp_path / "a" / "tables" / "table1_mnist_cpu.csv").read_text().splitlines()[0]
    assert "apgd-l1" not in head and "headline-l1" not in head
    n, extra = 100, []
    for r in rows:
        if r["kind"] == "attack":  # an l1 PGD, APGD and their headline per defense
            robust = from_hex(r["robust_bits"], n)
            for label, k in (("pgd-l1", 0), ("apgd-l1", 10)):
                weaker = robust.copy()
                weaker[:k] = False
                extra.append({**r, "eval_key": f"{r['defense']}-{label}", "attack": label,
                              "norm": "l1", "eps": 10.0, "eps_str": "10",
                              "robust_acc": float(weaker.mean()), "robust_bits": to_hex(weaker)})
            extra.append({**r, "kind": "headline", "eval_key": f"{r['defense']}-h1",
                          "attack": "headline", "norm": "l1", "eps": 10.0, "eps_str": "10",
                          "attacks": ["apgd-l1", "pgd-l1"], "robust_acc": float(weaker.mean()),
                          "robust_bits": to_hex(weaker)})
    write_report(rows + extra, tmp_path / "b", plots=False)
    t = pd.read_csv(tmp_path / "b" / "tables" / "table1_mnist_cpu.csv",
                    index_col=["arch", "checkpoint", "defense"]).loc[("small-cnn", "best")]
    cols = list(t.columns)
    assert cols.index("pgd-l1") < cols.index("apgd-l1") and "headline-l1" in cols
    assert t.loc["at", "apgd-l1"] == pytest.approx(t.loc["at", "pgd-l1"] - 10)
    assert t.loc["at", "headline-l1"] == pytest.approx(t.loc["at", "apgd-l1"])


def test_a_dataset_with_trained_but_unevaluated_runs_does_not_stop_the_report(
        tmp_path: Path) -> None:
    """A runs folder where one dataset has only health rows (trained, not yet evaluated)
    still gives the other dataset's tables (found on a real runs folder: 'No objects to
    concatenate')."""
    from benchmark.report.report import write_report
    pending = {"kind": "health", "dataset": "cifar10-jpeg", "arch": "small-cnn",
               "profile": "cpu", "defense": "at", "seed": 0, "run_id": "c-at",
               "eval_key": "h-c-at", "verdict": "ok", "healthy": True, "reasons": [],
               "data_provenance": "CIFAR-10 JPEG", "hparams": {"eps": 8 / 255}}
    write_report(_rows() + [pending], tmp_path, plots=False)
    tables = sorted(p.name for p in (tmp_path / "tables").glob("*.md"))
    assert "table1_mnist_cpu.md" in tables
    assert not any("cifar10-jpeg" in t for t in tables)


def _checked(rows: list[dict], verdicts: dict[str, tuple[str, str, float]]) -> list[dict]:
    """``rows`` plus one current check row per defense: defense → (check, status, value)."""
    common = {k: rows[0][k] for k in ("dataset", "arch", "profile", "checkpoint", "hparams",
                                      "data_provenance", "eps", "eps_str", "n_examples")}
    return rows + [{**common, "kind": "check", "defense": d, "seed": 0, "run_id": d,
                    "eval_key": f"c-{d}-{c}", "check": c,
                    "check_version": CHECK_VERSIONS[c], "letter": "f",
                    "status": s, "value": v, "threshold": 0.05, "detail": "d"}
                   for d, (c, s, v) in verdicts.items()]


def test_an_unchecked_row_is_never_ranked_or_bold_above_checked_ones(tmp_path: Path) -> None:
    """Issue 30: `at` has the best headline but no masking check ran on it (health only): it
    shows –, ranks below the checked rows and is not bold; the checked `trades` is best."""
    from benchmark.report.html import board
    from benchmark.report.report import write_report
    rows = _checked(_rows(), {"trades": ("zero-gradient", "pass", 0.0),
                              "st": ("zero-gradient", "pass", 0.0)})
    rows.append({**rows[0], "kind": "health", "defense": "at", "run_id": "at",
                 "eval_key": "h-at", "verdict": "ok", "healthy": True, "reasons": []})
    wide, _ = board(rows)
    assert list(wide["defense"]) == ["trades", "st", "at"] and list(wide["rank"]) == \
        ["1", "2", "3"]
    write_report(rows, tmp_path, plots=False)
    page = (tmp_path / "index.html").read_text()
    at_row = page[page.index(">at<"):].split("</tr>")[0]
    assert "<b>" not in at_row and "no gradient-masking check judged" in at_row
    assert "✓" not in at_row
    md = (tmp_path / "tables" / "table1_mnist_cpu.md").read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "**" not in lines["at"] and "**78.00" in lines["trades"]
    assert lines["at"].rstrip().endswith("| – |") and lines["trades"].rstrip().endswith("| yes |")


def test_a_masking_finding_against_a_headline_of_0_is_reported_not_unranked() -> None:
    """A headline of 0 cannot be overstated: the masking finding is reported (footnote, † on
    the other white-box cells) but neither doubts the headline nor unranks the row."""
    from benchmark.report.html import board
    from benchmark.report.verdicts import footnotes, row_verdicts
    rows = _rows()
    for r in rows:
        if r["defense"] == "st" and r["kind"] == "headline":
            r["robust_bits"], r["robust_acc"] = to_hex(np.zeros(100, dtype=bool)), 0.0
    rows = _checked(rows, {"st": ("zero-gradient", "fail", 0.9),
                           "at": ("zero-gradient", "pass", 0.0),
                           "trades": ("zero-gradient", "pass", 0.0)})
    wide, _ = board(rows)
    assert list(wide["rank"]) == ["1", "2", "3"] and (wide["apart"] == "").all()
    labels = [str(r["defense"]) for r in rows]
    v = row_verdicts(rows, labels)[("small-cnn", "best", "st")]
    assert v.reliable == "yes" and v.mark(True, "headline") == "" and v.mark(True, "pgd") == "†"
    assert "headline is 0, which cannot be overstated" in "\n".join(
        footnotes(row_verdicts(rows, labels), "small-cnn", "best", ["st"], True))
    # the same finding against a headline above 0 still unranks
    above = [r for r in rows if not (r["defense"] == "st" and r["kind"] == "headline")]
    wide, _ = board(above)
    assert list(wide.loc[wide["defense"] == "st", "rank"]) == ["–"]
