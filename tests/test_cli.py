"""End-to-end CLI on the synthetic dataset, and one-line errors with non-zero exits."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark.cli import cli

FAST = json.dumps({"epochs": 2, "lr_milestones": [1], "train_attack_steps": 2,
                   "val_attack_steps": 2, "batch_size": 64})


def invoke(*args: str) -> "object":
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)


def test_run_then_report_end_to_end(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["run", "--defenses", "st,at", "--dataset", "synthetic", "--arch", "tiny",
            "--hparams", FAST, "--attacks", "fgsm,pgd", "--seeds", "0", "--runs-dir", str(runs),
            "--no-progress", "--device", "cpu", "--n-examples", "64"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "2 jobs: 0 done, 0 partial, 0 trained, 2 new" in res.output
    assert "| st |" in res.output and "| at |" in res.output
    assert "Where the time went" in res.output  # the phase breakdown of each job
    for ph in runs.glob("*/*/*/phases.json"):
        rec = json.loads(ph.read_text())
        by = {it["phase"]: it for it in rec["phases"]}
        assert {"training", "validation", "attack fgsm@8/255", "attack pgd@8/255",
                "checks (cheap)"} < set(by), sorted(by)
        assert by["training"]["wall_s"] > 0 and by["validation"]["cpu_s"] > 0
        assert sum(it["wall_s"] for it in rec["phases"]) == pytest.approx(rec["job_wall_s"],
                                                                          abs=0.01)
    assert len(list(runs.glob("*/*/*/phases.json"))) == 2
    assert "| at/synthetic/tiny/seed0 | attack pgd@8/255 |" in res.output
    # the printed tables have the headline and the cost columns that `advbench report` has
    assert "no headline row" not in res.output and "no cost row" not in res.output, res.output
    every = [json.loads(p.read_text()) for p in runs.glob("*/*/*/eval/*.json")]
    rows = [r for r in every if r.get("kind", "attack") == "attack"]
    assert len(rows) == 4
    assert sorted(r["defense"] for r in every if r["kind"] == "health") == ["at", "st"]
    assert {r["check"] for r in every if r["kind"] == "check"} == {  # run's cheap checks
        "aa-vs-pgd", "aa-vs-pgd-l2", "aa-vs-pgd-l1", "eps-monotone", "unbounded-eps",
        "more-budget", "zero-gradient", "fgsm-vs-pgd", "square", "transfer", "incomplete-opt",
        "unstable", "binarization", "rays", "noise", "bpda", "adaptive"}
    judged = [r for r in every if r["kind"] == "check" and r["status"] != "skipped"]
    assert judged and all(isinstance(r["p_value"], float) and r["alpha"] == 0.01 and
                          r["finding"] in ("masking", "weak-attack") for r in judged)
    for r in rows:
        assert {"run_id", "eval_key", "defense", "dataset", "arch", "seed", "checkpoint", "attack",
                "norm", "eps", "eps_str", "attack_hparams", "n_examples", "clean_acc",
                "robust_acc", "hparams", "env", "git", "profile"} <= set(r)
        assert r["n_examples"] == 64 and 0 <= r["robust_acc"] <= r["clean_acc"] <= 1
        assert r["eps_str"] == "8/255" and r["env"]["torch"]
    assert all((runs / r["dataset"] / r["defense"] / r["run_id"] / "flags" /
                f"{r['eval_key']}.pt").exists() for r in rows)

    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/*/*/*/*") if p.is_file()}
    again = invoke(*args)  # everything is done: nothing retrained or re-attacked
    assert "2 jobs: 2 done, 0 partial, 0 trained, 0 new" in again.output, again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    rep = invoke("report", "--runs-dir", str(runs), "--out", str(out))
    assert rep.exit_code == 0, rep.output
    csvs = list((out / "tables").glob("*.csv"))
    assert csvs
    at_pgd = [r for r in rows if r["defense"] == "at" and r["attack"] == "pgd"][0]
    found = False
    for f in csvs:
        table = pd.read_csv(f)
        if "pgd" in table.columns and "defense" in table.columns:
            cell = table.loc[table["defense"] == "at", "pgd"]
            if len(cell):
                assert float(cell.iloc[0]) == pytest.approx(100 * at_pgd["robust_acc"], abs=1e-3)
                assert list(table["defense"])[:2] == ["st", "at"]
                found = True
    assert found, f"no table with an 'at' row and a 'pgd' column among {csvs}"


def test_dry_run_lists_jobs_without_running(tmp_path: Path) -> None:
    res = invoke("run", "--defenses", "s*", "--dataset", "synthetic", "--arch", "tiny",
                 "--runs-dir", str(tmp_path), "--dry-run")
    assert res.exit_code == 0 and "new" in res.output and "st" in res.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["run", "--defenses", "nope", "--dataset", "synthetic"], "unknown defense 'nope'"),
    (["run", "--defenses", "at", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["run", "--defenses", "at", "--dataset", "synthetic", "--hparams", "{bad"], "not valid JSON"),
    (["run", "--defenses", "at", "--dataset", "synthetic", "--hparams", '{"eps": 2}'],
     "eps must lie"),
    (["run", "--defenses", "at", "--dataset", "synthetic", "--attacks", "pgd,xyz"],
     "unknown attack 'xyz'"),
    (["run", "--defenses", "at", "--dataset", "cifar10", "--data-dir", "/nonexistent"],
     "cifar-10-batches-py"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path, args: list, needle: str) -> None:
    res = CliRunner().invoke(cli, [*args, "--runs-dir", str(tmp_path), "--no-progress"])
    assert res.exit_code == 2, res.output
    err_lines = [ln for ln in res.output.splitlines() if ln.startswith("advbench: error:")]
    assert len(err_lines) == 1 and needle in err_lines[0]


def test_list_prints_one_name_per_line_first() -> None:
    res = invoke("list", "defenses")
    names = [ln.split("\t")[0] for ln in res.output.splitlines()]
    assert names[:2] == ["st", "at"]
    res = invoke("list", "attacks")
    assert {"fgsm", "pgd"} <= {ln.split("\t")[0] for ln in res.output.splitlines()}
