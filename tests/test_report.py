"""Report generator: golden tables from committed rows (DomainBed's test_collect_results
pattern), exact rebuilds from rows.jsonl, and the table semantics checked independently.

The golden CSVs (tests/data/golden_*.csv) were produced by
``advbench report --rows tests/data/golden_rows.jsonl --out OUT --no-plots`` and checked by
hand against the rows (the tests below recompute several cells independently). If the table
format changes on purpose, regenerate them with that command and check them again.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark.cli import cli
from benchmark.report.report import load_records, load_rows, write_report
from defenses import DEFENSES

DATA = Path(__file__).parent / "data"
GOLDEN_ROWS = DATA / "golden_rows.jsonl"
ORDER = DEFENSES.names()  # what `advbench report` passes: the report itself reads only rows


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in GOLDEN_ROWS.read_text().splitlines()]


@pytest.fixture(scope="module")
def report_dir(rows: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report(rows, out, plots=False, order=ORDER)
    return out


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, index_col=["arch", "checkpoint", "defense"])


def test_tables_equal_the_golden_files(report_dir: Path) -> None:
    made = {p.name for p in (report_dir / "tables").glob("*.csv")} - {"missing.csv"}
    golden = {p.name[len("golden_"):] for p in DATA.glob("golden_*.csv")}
    assert made == golden
    for name in sorted(made):
        assert (report_dir / "tables" / name).read_text() == \
            (DATA / f"golden_{name}").read_text(), name


def test_rows_file_rebuilds_every_table_byte_for_byte(rows: list[dict], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for r in rows:  # the run-store layout: RUN/eval/<key>.json
        path = runs / r["dataset"] / r["defense"] / r["run_id"] / "eval" / f"{r['eval_key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=1))
    runner = CliRunner()
    first = runner.invoke(cli, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "a"),
                                "--no-print"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(cli, ["report", "--rows", str(tmp_path / "a" / "rows.jsonl"),
                                 "--out", str(tmp_path / "b"), "--no-print"])
    assert second.exit_code == 0, second.output
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.suffix in (".csv", ".md", ".jsonl"))
    assert len(files) > 20
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert len((tmp_path / "a" / "rows.jsonl").read_text().splitlines()) == len(rows)
    assert sorted((tmp_path / "a" / "plots").glob("*.png"))


def test_clean_avg_and_seed_statistics_follow_their_definitions(rows: list[dict],
                                                               report_dir: Path) -> None:
    t1 = _csv(report_dir / "tables" / "table1_cifar10_cpu.csv")
    at = [r for r in rows if r["defense"] == "at" and r["profile"] == "cpu"
          and r.get("kind", "attack") == "attack" and r["checkpoint"] == "best"]
    clean, aa = {}, {}
    for seed in (0, 1):
        mine = [r for r in at if r["seed"] == seed]
        clean[seed] = 100 * max(mine, key=lambda r: r["n_examples"])["clean_acc"]
        # same points (issue 21): the section's N is 1000 (not every row has AutoAttack), so
        # seed 0's AutoAttack on 100 points leaves its cell empty instead of mixing N
        aa[seed] = next((100 * r["robust_acc"] for r in mine if r["attack"] == "autoattack"
                         and r["eps_str"] == "8/255" and r["n_examples"] == 1000), None)
    row = t1.loc[("small-cnn", "best", "at")]
    assert row["clean"] == pytest.approx(np.mean(list(clean.values())))
    assert row["clean_std"] == pytest.approx(np.std(list(clean.values()), ddof=1), abs=1e-4)
    assert aa[0] is None and row["autoattack"] == pytest.approx(aa[1])
    avg = [(clean[s] + aa[s]) / 2 for s in (0, 1) if aa[s] is not None]
    assert row["avg"] == pytest.approx(np.mean(avg)) and row["n_seeds"] == 2
    # the l∞ PGD column uses the nominal ε (not the 4/255 row) and the n=1000 row (not n=100)
    pgd = [100 * r["robust_acc"] for r in at if r["attack"] == "pgd" and r["eps_str"] == "8/255"
           and r["n_examples"] == 1000]
    assert row["pgd"] == pytest.approx(np.mean(pgd))
    t3 = _csv(report_dir / "tables" / "table3_cifar10_cpu.csv")
    assert t3.loc[("small-cnn", "best", "at"), "pgd@4/255"] == pytest.approx(62.0)
    # training cost: the cost rows of the same runs, averaged over seeds like the accuracies
    cost = {r["seed"]: r for r in rows if r.get("kind") == "cost" and r["defense"] == "at"}
    assert np.isnan(row["epoch_cpu_s"])  # the golden cost rows predate CPU-seconds
    assert row["n_points"] == 1000
    assert row["peak_mem_mb_std"] == pytest.approx(
        np.std([cost[s]["peak_mem_mb"] for s in (0, 1)], ddof=1), abs=1e-4)
    assert row["passes"] == cost[0]["passes_per_sample"] == 6


def test_corruption_table_averages_cells_and_ignores_the_aggregate_row(
        rows: list[dict], report_dir: Path) -> None:
    t5 = _csv(report_dir / "tables" / "table5_cifar10_cpu.csv")
    cells = [r for r in rows if r.get("kind") == "corruption" and not r.get("aggregate")
             and r["defense"] == "adv-dpnp"]
    for sev in range(1, 6):
        expect = 100 * np.mean([r["accuracy"] for r in cells if r["severity"] == sev])
        assert t5.loc[("small-cnn", "best", "adv-dpnp"), f"s{sev}"] == pytest.approx(expect)
    assert t5.loc[("small-cnn", "best", "adv-dpnp"), "avg_all"] == pytest.approx(
        100 * np.mean([r["accuracy"] for r in cells]))


def test_profiles_datasets_and_hparam_variants_never_mix(report_dir: Path) -> None:
    paper = _csv(report_dir / "tables" / "table1_cifar10_paper.csv")
    assert list(paper.index) == [("resnet18", "best", "at")]
    assert paper.loc[("resnet18", "best", "at"), "pgd"] == pytest.approx(52.0)
    cpu = _csv(report_dir / "tables" / "table1_cifar10_cpu.csv")
    assert "resnet18" not in cpu.index.get_level_values("arch")
    labels = list(cpu.loc[("small-cnn", "best")].index)
    assert labels == ["st", "at", "trades [beta=3.0]", "trades [beta=6.0]", "adv-dpnp"]
    assert cpu.loc[("small-cnn", "best", "trades [beta=6.0]"), "pgd"] == pytest.approx(48.0)
    mnist = _csv(report_dir / "tables" / "table1_mnist5k_cpu.csv")
    assert mnist.loc[("small-cnn", "best", "at"), "pgd"] == pytest.approx(88.0)  # ε = 0.3


def test_markdown_marks_missing_cells_best_values_and_provenance(report_dir: Path) -> None:
    md = (report_dir / "tables" / "table1_cifar10_cpu.md").read_text()
    assert "JPEG (quality 75)" in md and "profile `cpu`" in md
    st = next(line for line in md.splitlines() if line.startswith("| st |"))
    assert st.split("|")[2:8] == [" **91.00 ± 1.41 [89.7, 92.2]** ", " – ", " – ", " – ",
                                  " – ", " – "]
    assert "- `st` / Headline: no headline row: no ℓ∞ attack was evaluated on the run, or it was evaluated before headline rows existed" in md
    assert "- `adv-dpnp` / AA: `autoattack` evaluated on 100 points only; the section uses " \
           "the first 1000" in md
    assert "- `st` / AA: no `autoattack` row at the run's nominal ε" in md
    assert "- `at` / PGD l2: 1 of 2 seeds" in md
    t4 = (report_dir / "tables" / "table4_cifar10_cpu.md").read_text()
    at = next(line for line in t4.splitlines() if line.startswith("| at |")).split("|")
    dpnp = next(line for line in t4.splitlines() if line.startswith("| adv-dpnp |")).split("|")
    assert dpnp[2].strip() == "**0.060**" and at[2].strip() == "0.080"  # FDR: lower is best
    assert dpnp[6].strip() == "**1.680**" and at[6].strip() == "0.600"  # SCR: higher is best
    missing = pd.read_csv(report_dir / "tables" / "missing.csv")
    hit = missing[(missing["table"] == "table1_cifar10_cpu") & (missing["defense"] == "st")]
    assert set(hit["column"]) == {"headline", "autoattack", "avg", "pgd-l1", "pgd-l2", "epoch_cpu_s"}
    assert hit[hit["column"] == "headline"]["reason"].iloc[0] == \
        "no headline row: no ℓ∞ attack was evaluated on the run, or it was evaluated before headline rows existed"
    csv = (report_dir / "tables" / "table1_cifar10_cpu.csv").read_text()
    assert "small-cnn,best,st,91.0000,1.4142,89.6659,92.1769,NaN,NaN,NaN,NaN" in csv


def test_ties_are_not_bold_and_lower_is_better_only_where_declared() -> None:
    from benchmark.report.report import to_markdown
    from benchmark.report.tables import TABLES

    idx = pd.MultiIndex.from_tuples([("a", "best", "st"), ("a", "best", "at")],
                                    names=["arch", "checkpoint", "defense"])
    table = pd.DataFrame({"clean": [80.0, 80.0], "clean_std": [np.nan] * 2, "pgd": [1.0, 40.0],
                          "pgd_std": [np.nan] * 2, "n_seeds": [1, 1]}, index=idx)
    md = to_markdown(table, TABLES[1])
    assert "| st | 80.00 | 1.00 | 1 |" in md and "| at | 80.00 | **40.00** | 1 |" in md


def test_dataframe_input_gives_the_same_tables(rows: list[dict], report_dir: Path,
                                               tmp_path: Path) -> None:
    df = load_rows(rows)  # absent fields become NaN in a frame (as `advbench run` passes them)
    assert df["adv_ce"].isna().any() and len(load_records(df)) == len(rows)
    write_report(df, tmp_path, plots=False, order=ORDER)
    for p in (report_dir / "tables").glob("*.csv"):
        assert (tmp_path / "tables" / p.name).read_text() == p.read_text(), p.name


def test_plots_return_labelled_figures(rows: list[dict], tmp_path: Path) -> None:
    from benchmark.report import plots
    from benchmark.report.tables import frames

    fr = frames(rows)
    fig3 = plots.severity_figure(fr["corruption"])
    assert fig3.axes[0].get_xlabel() == "corruption severity"
    assert "accuracy" in fig3.axes[0].get_ylabel()
    assert plots.eps_figure(fr["attack"]) is None  # no ε sweep in the golden rows
    sweep = [dict(r, attack=a, eps=e / 255, eps_str=f"{e}/255", robust_acc=0.5 - e / 100,
                  eval_key=f"{r['eval_key']}-{a}-{e}")
             for r in rows if r.get("attack") == "fgsm" and r["profile"] == "cpu"
             for a in ("fgsm", "pgd-fig4") for e in (2, 4, 8)]
    fig4 = plots.eps_figure(frames(sweep)["attack"])
    assert [ax.get_xlabel() for ax in fig4.axes[:2]] == ["ε (×1/255)"] * 2
    line = fig4.axes[0].lines[0]
    assert list(line.get_xdata()) == [0.0, 2.0, 4.0, 8.0]  # ε = 0 is the clean accuracy
    path = plots.save(fig4, tmp_path / "f4.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rng = np.random.default_rng(0)
    panel = {"defense": "at", "dataset": "mnist", "clean": rng.normal(size=(50, 2)),
             "adv": rng.normal(size=(50, 2)), "labels": np.arange(50) % 10,
             "centers": rng.normal(size=(10, 2)), "centers_source": "classifier weights",
             "clean_acc": 0.9, "adv_acc": 0.5, "attack": {"eps_str": "0.3",
                                                          "attack_hparams": {"steps": 40}}}
    fig2 = plots.figure2([panel, dict(panel, defense="adv-dpnp", centers_source="prototypes")])
    assert len(fig2.axes) == 4 and fig2.axes[0].get_xlabel() == "feature 1"
    assert [ax.get_title().split(" — ")[0] for ax in fig2.axes] == ["at", "adv-dpnp"] * 2
    assert plots.defense_colour("trades", ORDER) == plots.defense_colour("trades [beta=3.0]", ORDER)
    assert plots.defense_colour("st", ORDER) != plots.defense_colour("at", ORDER)
    assert plots.defense_colour("at", ["st", "at"]) == plots.defense_colour("at", ORDER)


def test_report_reads_only_rows_and_order_comes_from_the_caller(rows: list[dict],
                                                                 tmp_path: Path) -> None:
    """Rebuilding from rows imports no defense (no plugin needs to be installed); the row
    order is the one passed in, defenses not named in it last by name."""
    import subprocess
    import sys
    code = ("import sys, json; from benchmark.report.report import write_report, load_records; "
            f"recs = load_records({str(GOLDEN_ROWS)!r}); "
            f"write_report(recs, {str(tmp_path / 'r')!r}, order=['st', 'at']); "
            "bad = sorted(m for m in sys.modules if m == 'defenses' or m.startswith('defenses.')); "
            "print(json.dumps(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    table = pd.read_csv(next((tmp_path / "r" / "tables").glob("accuracy_*.csv")))
    names = list(dict.fromkeys(table["defense"]))
    assert names[:2] == ["st", "at"] and names[2:] == sorted(names[2:])


def test_report_without_rows_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["report", "--runs-dir", str(tmp_path), "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code != 0 and "no result rows" in res.output
    assert "Traceback" not in res.output
