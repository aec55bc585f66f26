"""Evaluation harness: rows, stored flags, CE at x', ensembles, caps, resumption, CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from attacks.base import Norm, ThreatModel
from attacks.pgd import PGD
from benchmark.cli import cli
from benchmark.errors import UsageError
from benchmark.eval.evaluate import (adapt_spec, attack_points, effective_n, eval_key, evaluate_path,
                                evaluate_run, load_flags, open_target, predict)
from benchmark.run.protocols import AttackSpec, attack_specs, resolve_specs

N = 48
MEMBERS = [{"label": "fgsm", "attack": "fgsm", "hparams": {}},
           {"label": "pgd-s3", "attack": "pgd", "hparams": {"steps": 3, "rel_step_size": 0.5}},
           {"label": "cw-s3", "attack": "cw", "hparams": {"steps": 3}}]


def fresh(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run folder without any evaluation."""
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("eval", "flags"))
    return dst


def test_rows_flags_and_ce_at_x_adv(run_dir: Path, data, tmp_path: Path) -> None:
    run = fresh(run_dir, tmp_path)
    spec = attack_specs("cifar")["pgd20"]
    (row,) = evaluate_run(run, [spec], n_examples=N, data=data, progress=False)
    assert row["kind"] == "attack" and row["attack"] == "pgd20" and row["n_examples"] == N
    assert row["eps_str"] == "8/255" and row["eps"] == pytest.approx(8 / 255)
    assert row["attack_hparams"]["step_size"] == pytest.approx(0.8 / 255)  # ε/10, resolved
    assert row["attack_hparams"]["steps"] == 20 and row["attack_seed"] == 0
    stored = json.loads((run / "eval" / f"{row['eval_key']}.json").read_text())
    assert stored == row
    flags = load_flags(run, row["eval_key"])
    t = open_target(run)
    x, y = data.test.floats()
    clean, ce = predict(t.model, x[:N], y[:N])
    assert torch.equal(flags["clean"], clean) and row["clean_acc"] == float(clean.float().mean())
    assert not (flags["robust"] & ~clean).any(), "a wrong clean point counted as robust"
    assert 0 < flags["robust"].sum() < clean.sum(), "need both broken and robust points"
    assert row["robust_acc"] == pytest.approx(float(flags["robust"].float().mean()))
    # x' = x for points misclassified clean; adversarial CE is higher where the attack ran
    assert torch.allclose(flags["adv_ce"][~clean], ce[~clean])
    assert (flags["adv_ce"][clean] > ce[clean]).all()
    assert row["adv_ce"] == pytest.approx(float(flags["adv_ce"].mean()), rel=1e-6)
    # the same attack run by hand gives the same flags
    x_adv = spec.build(seed=0)(t.model, x[:N][clean], y[:N][clean])
    with torch.no_grad():
        by_hand = t.model(x_adv).argmax(1) == y[:N][clean]
        ce_hand = F.cross_entropy(t.model(x_adv), y[:N][clean], reduction="none")
    assert torch.equal(flags["robust"][clean], by_hand)
    assert torch.allclose(flags["adv_ce"][clean], ce_hand, atol=1e-5)


def test_existing_rows_are_reused(run_dir: Path, data, tmp_path: Path, monkeypatch) -> None:
    run = fresh(run_dir, tmp_path)
    specs = resolve_specs("fgsm,pgd", "cifar")
    first = evaluate_run(run, specs, n_examples=N, data=data, progress=False)
    monkeypatch.setattr("benchmark.eval.evaluate.attack_points",
                        lambda *a, **k: pytest.fail("an existing row was recomputed"))
    assert evaluate_run(run, specs, n_examples=N, data=data, progress=False) == first


def test_a_row_another_process_is_computing_is_awaited_and_reused(run_dir: Path, data,
                                                                  tmp_path: Path, monkeypatch) -> None:
    """Two evaluations of the same run (two sweeps or launchers on one runs folder) never run
    the same attack twice: the second waits on the row's lock and reuses the first's row."""
    import threading

    import benchmark.eval.evaluate as ev

    run = fresh(run_dir, tmp_path)
    spec = attack_specs("cifar")["fgsm"]
    real, calls = ev.attack_points, []
    entered, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        calls.append(threading.current_thread().name)
        entered.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "attack_points", slow)
    out: dict[str, list] = {}

    def job() -> None:
        out[threading.current_thread().name] = evaluate_run(run, [spec], n_examples=N, data=data,
                                                            progress=False)

    first = threading.Thread(target=job, name="first")
    first.start()
    assert entered.wait(60)
    second = threading.Thread(target=job, name="second")
    second.start()
    second.join(1.0)
    assert second.is_alive(), "the second evaluation did not wait for the first"
    release.set()
    first.join(60)
    second.join(60)
    assert calls == ["first"], "the same row was computed twice"
    assert out["second"] == out["first"] and out["first"][0]["attack"] == "fgsm"


def test_ensemble_from_stored_flags_is_and_of_members(run_dir, data, tmp_path) -> None:
    run = fresh(run_dir, tmp_path)
    eps = 8 / 255
    members = [AttackSpec(m["label"], m["attack"], "linf", eps, m["hparams"]) for m in MEMBERS]
    ens = AttackSpec("ensemble", "ensemble", "linf", eps, {"members": MEMBERS})
    rows = evaluate_run(run, [*members, ens], n_examples=N, data=data, progress=False)
    assert rows[-1]["members_from_store"] == [m["label"] for m in MEMBERS]
    assert rows[-1]["members_run"] == []
    got = load_flags(run, rows[-1]["eval_key"])["robust"]
    each = [load_flags(run, r["eval_key"])["robust"] for r in rows[:-1]]
    assert torch.equal(got, torch.stack(each).all(0))
    assert len({tuple(f.tolist()) for f in each}) > 1, "members must disagree for a real test"


def test_ensemble_cascade_equals_and_of_members(run_dir, data, tmp_path) -> None:
    # batch size 1: each sample's attack is seeded alike, so a cascade on a subset must
    # reproduce the members run on every point
    run = fresh(run_dir, tmp_path)
    eps = 8 / 255
    ens = AttackSpec("ensemble", "ensemble", "linf", eps, {"members": MEMBERS})
    (row,) = evaluate_run(run, [ens], n_examples=N, data=data, progress=False, batch_size=1)
    assert row["members_run"] == [m["label"] for m in MEMBERS] and not row["members_from_store"]
    got = load_flags(run, row["eval_key"])
    other = fresh(run_dir, tmp_path / "other")
    members = [AttackSpec(m["label"], m["attack"], "linf", eps, m["hparams"]) for m in MEMBERS]
    rows = evaluate_run(other, members, n_examples=N, data=data, progress=False, batch_size=1)
    flags = [load_flags(other, r["eval_key"]) for r in rows]
    assert torch.equal(got["robust"], torch.stack([f["robust"] for f in flags]).all(0))
    # CE at x': the first member that breaks a point, else the largest member CE
    for i in range(N):
        if not got["clean"][i]:
            continue
        breaker = next((f for f in flags if not f["robust"][i]), None)
        want = breaker["adv_ce"][i] if breaker else max(f["adv_ce"][i] for f in flags)
        assert got["adv_ce"][i] == pytest.approx(float(want), rel=1e-5)


def test_resume_after_interruption_gives_the_same_flags(run_dir, data, tmp_path) -> None:
    t = open_target(run_dir)
    x, y = data.test.floats()
    clean, ce = predict(t.model, x, y)
    attack = PGD(ThreatModel(Norm.LINF, 8 / 255), steps=2, seed=0)
    full = attack_points(t.model, attack, x, y, clean=clean, clean_ce=ce, batch_size=8)

    class Dies(PGD):
        calls = 0

        def perturb(self, model, x, y, *, loss):
            Dies.calls += 1
            if Dies.calls == 3:
                raise KeyboardInterrupt
            return super().perturb(model, x, y, loss=loss)

    partial = tmp_path / "p.partial.pt"
    with pytest.raises(KeyboardInterrupt):
        attack_points(t.model, Dies(ThreatModel(Norm.LINF, 8 / 255), steps=2, seed=0), x, y,
                      clean=clean, clean_ce=ce, batch_size=8, partial=partial, save_every_s=0)
    assert partial.exists()
    stats: dict = {}
    resumed = attack_points(t.model, Dies(ThreatModel(Norm.LINF, 8 / 255), steps=2, seed=0), x,
                            y, clean=clean, clean_ce=ce, batch_size=8, partial=partial,
                            stats=stats)
    assert stats["resumed_wall_s"] > 0
    assert Dies.calls == 3 + (int(clean.sum()) + 7) // 8 - 2, "finished batches were redone"
    assert torch.equal(resumed[0], full[0]) and torch.allclose(resumed[1], full[1])
    assert not partial.exists()


def test_adaptive_attack_gets_the_defense_objective(run_dir, data, tmp_path, monkeypatch) -> None:
    from attacks.base import ce_objective
    from defenses.st import StandardTraining
    seen = []

    def objective():
        def loss(model, x_adv, x, y):
            seen.append(x_adv.shape[0])
            return ce_objective(model, x_adv, x, y)
        return loss

    monkeypatch.setattr(StandardTraining, "objective", lambda self: objective())
    run = fresh(run_dir, tmp_path)
    evaluate_run(run, [attack_specs("cifar")["adaptive"]], n_examples=N, data=data,
                 progress=False)
    assert seen, "the adaptive attack did not use defense.objective()"


def test_caps_n_examples_and_autoattack_version() -> None:
    specs = attack_specs("cifar")
    assert effective_n(specs["autoattack"], "cpu", None) == 100
    assert effective_n(specs["pgd-k500"], "cpu", None) == effective_n(specs["pgd-k20"], "cpu",
                                                                      None) == 200
    assert effective_n(specs["pgd"], "cpu", None) == 1000
    assert effective_n(specs["autoattack"], "paper", None) is None
    assert effective_n(specs["autoattack"], "cpu", 500) == 500  # explicit wins
    assert adapt_spec(specs["autoattack"], True).hparams["version"] == "rand"
    assert adapt_spec(specs["autoattack"], False) == specs["autoattack"]
    assert eval_key("r", "best", specs["pgd"], None) != eval_key("r", "best", specs["pgd"], 10)


@pytest.mark.parametrize("scale", ["cifar", "mnist"])
def test_l1_l2_apgd_and_autoattack_share_the_paper_pgd_eps_and_aa_cap(scale: str) -> None:
    specs = attack_specs(scale)
    for norm in ("l2", "l1"):
        pgd, apgd, aa = (specs[f"{p}-{norm}"] for p in ("pgd", "apgd", "autoattack"))
        assert apgd.eps == aa.eps == pgd.eps and apgd.norm == aa.norm == pgd.norm == norm
        assert (apgd.attack, aa.attack) == (f"apgd-{norm}", f"autoattack-{norm}")
        assert aa.caps == specs["autoattack"].caps and effective_n(aa, "cpu", None) == 100
        assert effective_n(apgd, "cpu", None) == effective_n(pgd, "cpu", None)
        assert adapt_spec(aa, True).hparams["version"] == "rand"
        assert adapt_spec(apgd, True) == apgd
        atk = apgd.build()
        assert atk.threat.norm.value == norm and atk.hparams["n_iter"] == 100
        assert atk.hparams["use_largereps"] == (norm == "l1")
        assert {"attack": f"apgd-{norm}", "norm": norm, "eps": pgd.eps}.items() <= \
            apgd.record().items()
    assert specs["pgd-l2"].eps == (2.0 if scale == "mnist" else 128 / 255)
    assert specs["pgd-l1"].eps == (10.0 if scale == "mnist" else 2000 / 255)
    t1 = [s.label for s in resolve_specs(None, scale, suite="table1")]
    assert t1 == ["pgd", "pgd-l2", "pgd-l1", "autoattack", "apgd-l2", "apgd-l1",
                  "autoattack-l2", "autoattack-l1"]


def test_protocol_values_and_suites() -> None:
    c, m = attack_specs("cifar"), attack_specs("mnist")
    assert c["pgd"].hparams == {"steps": 20, "step_size": 1 / 255}
    assert m["pgd"].eps == 0.3 and m["pgd"].hparams == {"steps": 40, "step_size": 0.01}
    assert c["pgd-l2"].eps == pytest.approx(128 / 255) and c["pgd-l1"].eps == pytest.approx(
        2000 / 255)
    cw = c["cw"].build()
    assert cw.hparams["kappa"] == 50 and cw.hparams["steps"] == 30
    assert cw.hparams["step_size"] == pytest.approx(0.8 / 255)
    t3 = resolve_specs(None, "cifar", suite="table3")
    assert sorted({round(s.eps * 255) for s in t3}) == [2, 4, 6, 8]
    assert {s.label for s in t3} == {"pgd", "autoattack"}
    fig = resolve_specs(None, "cifar", suite="fig4")
    step = {round(s.eps * 255): s.build().hparams["step_size"] for s in fig
            if s.label == "pgd-fig4"}
    assert step[16] == pytest.approx(2.5 * (16 / 255) / 20)
    (p,) = resolve_specs("pgd20@4/255", "cifar")
    assert p.build().hparams["step_size"] == pytest.approx(0.4 / 255)
    assert resolve_specs("pgd-k7", "cifar")[0].hparams["steps"] == 7
    with pytest.raises(UsageError, match="unknown suite"):
        resolve_specs(None, "cifar", suite="table9")
    with pytest.raises(UsageError, match="unknown attack"):
        resolve_specs("pdg", "cifar")


def test_checkpoint_file_and_cli(run_dir, data, tmp_path) -> None:
    run = fresh(run_dir, tmp_path)
    foreign = tmp_path / "elsewhere" / "model.pt"
    foreign.parent.mkdir()
    shutil.copy(run / "ckpt_best.pt", foreign)
    res = CliRunner().invoke(cli, ["-q", "evaluate", "--checkpoint-file", str(foreign),
                                   "--attacks", "pgd", "--n-examples", str(N), "--no-progress"])
    assert res.exit_code == 0, res.output
    (row_file,) = (tmp_path / "elsewhere" / "model-eval" / "eval").glob("[!h]*.json")
    assert list((tmp_path / "elsewhere" / "model-eval" / "eval").glob("headline-*.json"))
    row = json.loads(row_file.read_text())
    assert row["checkpoint"].startswith("file-") and "| pgd |" in res.output
    (same,) = evaluate_path(run, attacks="pgd", n_examples=N, data=data, progress=False)
    assert same["robust_acc"] == row["robust_acc"] and same["eval_key"] != row["eval_key"]
    bad = CliRunner().invoke(cli, ["evaluate", "--run", str(run), "--suite", "nope"])
    assert bad.exit_code == 2 and "unknown suite" in bad.output


def test_complete_stored_flags_are_reused_not_recomputed(run_dir: Path, data, tmp_path: Path,
                                                          monkeypatch) -> None:
    """Flags of the same key (e.g. AutoAttack computed by `advbench check`) become the row
    without running the attack again; flags whose clean part disagrees are not trusted."""
    import benchmark.eval.evaluate as ev

    run = fresh(run_dir, tmp_path)
    spec = attack_specs("cifar")["fgsm"]
    (first,) = evaluate_run(run, [spec], n_examples=N, data=data, progress=False)
    (run / "eval" / f"{first['eval_key']}.json").unlink()  # flags stay, the row is gone

    def no_attack(*args, **kwargs):
        raise AssertionError("the attack ran although complete flags were stored")

    monkeypatch.setattr(ev, "attack_points", no_attack)
    (again,) = evaluate_run(run, [spec], n_examples=N, data=data, progress=False)
    assert again["flags_reused"] is True
    assert again["robust_acc"] == first["robust_acc"] and again["clean_acc"] == first["clean_acc"]
    flags = load_flags(run, first["eval_key"])  # a stored file that disagrees: attack runs
    flags["clean"] = ~flags["clean"]
    torch.save(flags, run / "flags" / f"{first['eval_key']}.pt")
    (run / "eval" / f"{first['eval_key']}.json").unlink()
    with pytest.raises(AssertionError, match="the attack ran"):
        evaluate_run(run, [spec], n_examples=N, data=data, progress=False)


def test_autoattack_row_records_its_components(run_dir, data, tmp_path) -> None:
    run = fresh(run_dir, tmp_path)
    spec = AttackSpec("autoattack", "autoattack", "linf", 8 / 255,
                      {"version": "standard", "n_iter": 2, "n_queries": 5})
    (row,) = evaluate_run(run, [spec], n_examples=N, data=data, progress=False)
    comp = row["components"]
    assert comp["order"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert sum(comp["broken"].values()) == round(N * (row["clean_acc"] - row["robust_acc"]))
    flags = load_flags(run, row["eval_key"])
    assert flags["components"] == comp["order"]
    broken = flags["clean"] & ~flags["robust"]
    assert torch.equal(flags["first_broken_by"] >= 0, broken) and broken.any()


def test_cascade_headline_equals_the_full_runs_per_sample(run_dir, data, tmp_path) -> None:
    """--cascade: cheapest first, each attack on what is left; the headline's per-sample
    flags equal the full run's (batch size 1: every point's attack is seeded alike)."""
    from benchmark.eval.worstcase import from_hex
    eps = 8 / 255
    aa = AttackSpec("autoattack", "autoattack", "linf", eps,
                    {"version": "standard", "n_iter": 2, "n_queries": 5})
    members = [AttackSpec(m["label"], m["attack"], "linf", eps, m["hparams"]) for m in MEMBERS]
    specs = [aa, *reversed(members)]  # dearest first: the cascade must reorder
    full_run, casc_run = fresh(run_dir, tmp_path / "full"), fresh(run_dir, tmp_path / "casc")
    full = evaluate_run(full_run, specs, n_examples=N, data=data, progress=False, batch_size=1)
    got = evaluate_run(casc_run, specs, n_examples=N, data=data, progress=False, batch_size=1,
                       cascade=True)
    rows = [r for r in got if r["kind"] == "cascade"]
    (head,) = [r for r in got if r["kind"] == "headline"]
    assert [r["attack"] for r in rows] == ["fgsm", "cw-s3", "pgd-s3", "autoattack"]
    assert all("robust_acc" not in r and "cascade" in r["why"] for r in rows)
    each = torch.stack([load_flags(full_run, r["eval_key"])["robust"] for r in full])
    want = each.all(0)
    assert torch.equal(torch.from_numpy(from_hex(head["robust_bits"], N)), want)
    assert head["robust_acc"] == pytest.approx(float(want.float().mean()))
    assert sorted(head["attacks"]) == sorted(s.label for s in specs)
    # each attacked only what every earlier one left robust, and that saved work
    clean = load_flags(full_run, full[0]["eval_key"])["clean"]
    left = clean.clone()
    for r, label in zip(rows, ["fgsm", "cw-s3", "pgd-s3", "autoattack"]):
        assert r["points_attacked"] == int(left.sum())
        left &= each[[s.label for s in specs].index(label)]
    assert rows[-1]["points_attacked"] < int(clean.sum()), "nothing saved: vacuous"
    assert len({tuple(f.tolist()) for f in each}) > 1, "attacks must disagree"
    # a rerun reuses every cascaded row; no single-attack flags were written
    again = evaluate_run(casc_run, specs, n_examples=N, data=data, progress=False,
                         batch_size=1, cascade=True)
    assert [r["eval_key"] for r in again if r["kind"] == "cascade"] == \
        [r["eval_key"] for r in rows]
    assert not any((casc_run / "flags" / f"{r['eval_key']}.pt").exists() for r in full)
    # the tables: single-attack columns empty with the cascade's reason, the headline filled
    from benchmark.report.report import write_report
    write_report([json.loads(f.read_text()) for f in (casc_run / "eval").glob("*.json")],
                 tmp_path / "rep", plots=False)
    missing = (tmp_path / "rep" / "tables" / "missing.csv").read_text()
    assert "cascaded run (--cascade): `autoattack` attacked only" in missing
    assert "cascaded run (--cascade): `fgsm` ran first" in missing
    acc = next((tmp_path / "rep" / "tables").glob("accuracy_*.csv")).read_text()
    assert f"{100 * head['robust_acc']:.4f}"[:5] in acc


def test_check_cascade_gives_the_full_checks_headline(run_dir, data, tmp_path) -> None:
    """check --cascade: the attacks the checks would run, cascaded; the same per-sample
    headline as the full check, and no verdict written."""
    from benchmark.eval.checks import check_run
    from benchmark.eval.worstcase import from_hex
    n, names = 16, ["fgsm-vs-pgd", "more-budget"]
    full_run, casc_run = fresh(run_dir, tmp_path / "full"), fresh(run_dir, tmp_path / "casc")
    full = check_run(full_run, names=names, n_examples=n, data=data, batch_size=1)
    used = sorted({a.split("@")[0] for r in full if r["kind"] == "check"
                   for a in r["attacks_used"]})
    got = check_run(casc_run, names=names, n_examples=n, data=data, batch_size=1, cascade=True)
    rows = [r for r in got if r["kind"] == "cascade"]
    assert sorted(r["attack"] for r in rows) == used == ["fgsm", "pgd", "pgd-k100", "pgd-r1",
                                                        "pgd-r5"]
    assert rows[0]["attack"] == "fgsm" and rows[-1]["attack"] == "pgd-r5"  # cheapest first
    assert not list((casc_run / "eval").glob("check-*.json")), "no verdict from a cascade"
    (head,) = [r for r in got if r["kind"] == "headline"]
    (want,) = [json.loads(f.read_text()) for f in (full_run / "eval").glob("headline-*.json")]
    assert head["robust_bits"] == want["robust_bits"] and head["n_examples"] == n
    assert 0 < rows[-1]["points_attacked"] < rows[0]["points_attacked"], "nothing saved"
    assert from_hex(head["robust_bits"], n).sum() < rows[0]["points_attacked"]


def test_cascade_starts_from_stored_single_attack_flags(run_dir, data, tmp_path) -> None:
    run = fresh(run_dir, tmp_path)
    fgsm, pgd = (AttackSpec(m["label"], m["attack"], "linf", 8 / 255, m["hparams"])
                 for m in MEMBERS[:2])
    (single,) = evaluate_run(run, [fgsm], n_examples=N, data=data, progress=False)
    got = evaluate_run(run, [fgsm, pgd], n_examples=N, data=data, progress=False, cascade=True)
    assert got[0] == single  # the stored row is reused, not cascaded
    (row,) = [r for r in got if r["kind"] == "cascade"]
    assert row["attack"] == "pgd-s3" and row["cascade_after"] == ["fgsm"]
    assert row["points_attacked"] == int(load_flags(run, single["eval_key"])["robust"].sum())
