"""Smoke test of ``advbench bench``'s output structure and its pass counting (never timings)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from benchmark.run.bench import bench, count_forwards, format_bench
from benchmark.cli import cli
from benchmark.models import create


def test_count_forwards_counts_backbone_passes_by_grad_mode() -> None:
    model = create("tiny", num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.rand(4, 3, 8, 8)
    with count_forwards(model) as n:
        model(x)                                # a loss forward (with grad)
        model.head(model.features(x))           # the same pass through features() + head
        with torch.no_grad():
            model(x)                            # e.g. TRADES' clean target probabilities
    assert n == {"grad": 2, "nograd": 1, "grad_samples": 8, "nograd_samples": 4}


def test_bench_reports_floor_and_eval_costs() -> None:
    r = bench("at", "tiny", dataset="synthetic", profile="cpu", batch_size=16, steps=1,
              warmup=1, reps=1, attacks="fgsm", device="cpu")
    # cpu profile: PGD-5 → 5 attack forwards + 1 loss forward, all with grad
    assert (r["k"], r["passes_grad"], r["passes_nograd"], r["formula"]) == (5, 6, 0, "k+1")
    for key in ("forward_img_s", "fwd_bwd_img_s", "attack_step_img_s", "train_img_s",
                "loader_img_s", "ratio_to_floor", "ratio_to_components"):
        assert r[key] > 0, key
    assert [e["attack"] for e in r["eval"]] == ["fgsm"] and r["eval"][0]["s_per_sample"] > 0
    # FGSM: one forward+backward per point, counted, on the 16 points (every one attacked)
    fgsm = r["eval"][0]
    assert (fgsm["fwd_bwd_per_sample"], fgsm["fwd_only_per_sample"]) == (1.0, 0.0)
    assert fgsm["cpu_s_per_sample"] > 0 and fgsm["norm"] == "linf"
    text = format_bench(r)
    assert "6 with grad (= k+1, k = 5)" in text and "eval fgsm" in text
    assert "1.0 forward+backward" in text
    json.dumps(r)  # serialisable for --json


def test_bench_times_the_step_at_full_eps_after_a_warm_up(monkeypatch) -> None:
    """LeNets++ records clean and ε warm-up epochs: the timed steps must still attack at the
    full ε (measured on 2026-12-05: timing epoch 0 reported a clean step as the AT step)."""
    from defenses.base import Defense
    scales: list[float] = []
    real = Defense.set_eps_scale
    monkeypatch.setattr(Defense, "set_eps_scale",
                        lambda self, s: (scales.append(s), real(self, s))[1])
    r = bench("at", "lenets++", dataset="mnist", profile="cpu", batch_size=8, steps=1,
              warmup=1, reps=1, attacks="", device="cpu")  # its protocol: 1 clean + 5 ramp
    assert scales and set(scales) == {1.0}, scales
    assert r["ratio_to_components"] > 0.5  # the step costs about k+1 passes, not 1


def test_bench_command_standard_training_has_one_pass(tmp_path) -> None:
    out = tmp_path / "b.json"
    res = CliRunner().invoke(cli, ["bench", "--defense", "st", "--arch", "tiny", "--dataset",
                                   "synthetic", "--batch-size", "8", "--steps", "1", "--reps",
                                   "1", "--attacks", "", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert (r["k"], r["passes_grad"], r["eval"]) == (0, 1, [])


def test_bench_run_measures_attacks_autoattack_against_pyautoattack_and_checks(
        run_dir, tmp_path, monkeypatch) -> None:
    """The evaluation side: per-attack CPU-seconds, AutoAttack through advbench vs
    pyautoattack directly on the same points (same robust points), a check and its cascade
    on scratch copies (the run folder is left as it was)."""
    import shutil

    from benchmark.run import protocols
    from benchmark.eval.bench_eval import bench_eval, format_bench_eval
    real = protocols.attack_specs

    def fast(scale: str) -> dict:  # AutoAttack's schedule shortened (the test is of the tool)
        specs = real(scale)
        specs["autoattack"] = specs["autoattack"].with_hparams(n_iter=3, n_queries=10)
        return specs
    monkeypatch.setattr(protocols, "attack_specs", fast)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval", "flags"))
    rec = bench_eval(run, attacks="fgsm,autoattack", n_examples=8, checks=["fgsm-vs-pgd"],
                     cascade=True, ab_reps=2)
    assert not list(run.glob("eval/*.json")) and not list(run.glob("flags/*")), "wrote rows"
    fgsm, aa = rec["attacks"]
    assert fgsm["attack"] == "fgsm" and fgsm["n"] == 8 and fgsm["cpu_s"] > 0
    assert aa["cpu_s_per_point"] == pytest.approx(aa["cpu_s"] / 8)
    assert set(aa["components_cpu_s"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    d = rec["aa_direct"]
    assert d["points"] == aa["attacked"] and d["same_robust_points"] and d["cpu_s"] > 0
    # interleaved A/B: two pairs, each advbench run against a direct one, median ratio
    assert len(d["ours_cpu_s"]) == len(d["direct_cpu_s"]) == len(d["ratios"]) == 2
    assert d["ratio_cpu"] == pytest.approx(sum(d["ratios"]) / 2)
    assert d["ratios"][0] == pytest.approx(d["ours_cpu_s"][0] / d["direct_cpu_s"][0])
    assert rec["check"]["headlines"] == rec["check_cascade"]["headlines"] != {}
    text = format_bench_eval(rec)
    assert "pyautoattack called directly" in text and "cascade saving" in text
    assert "interleaved" in text and "load average" in text
