"""``advbench bench --run RUN``: the evaluation side of the cost, on a trained run.

In one process, on the run's first test points (each attack's own N: the profile's cap, or
``n_examples``), nothing reused and nothing written into the run folder:

* each attack's process CPU-seconds (all threads; the machine's load does not enter them)
  and wall seconds, per point and in all, through the harness's own
  :func:`benchmark.eval.flags.attack_points` (AutoAttack also per component);
* AutoAttack through advbench against ``pyautoattack.AutoAttack.run_standard_evaluation``
  called directly (one call, the object :meth:`attacks.autoattack.AutoAttack.build`
  configures: the same settings and seed) on the same clean-correct points, in one batch
  each: the CPU-second ratio (goal <= 1.05) and whether both leave the same points robust.
  Measured A/B interleaved, so that a busy machine or a cold start does not decide it: the
  table's AutoAttack run is the untimed warm-up, then ``ab_reps`` pairs alternate the order
  (direct, advbench; advbench, direct; ...); the ratio is the median over the pairs;
* a full ``advbench check`` (every check, the run's ``st`` run as transfer source when it
  exists) on a scratch copy of the run folder (checkpoint and config only), CPU-seconds per
  point; with ``cascade`` also ``check --cascade`` on another scratch copy, and the saving.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch


def _scratch(run_dir: Path, root: Path, name: str) -> Path:
    """A copy of the run folder without rows or flags (same run id, checkpoint, config)."""
    dst = root / name
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("eval", "flags", "*.log"))
    return dst


def bench_eval(run_dir: Path | str, *, attacks: str = "fgsm,pgd,autoattack",
               n_examples: Optional[int] = None, checkpoint: str = "best",
               device: str = "cpu", batch_size: Optional[int] = None,
               data_dir: Optional[Path] = None, check: bool = True,
               cascade: bool = False, checks: Optional[Sequence[str]] = None,
               ab_reps: int = 3) -> dict[str, Any]:
    """Measure (see module docstring); returns the record :func:`format_bench_eval` prints.
    ``checks``: the checks of the "full" check (default every one); ``ab_reps``: interleaved
    pairs of the AutoAttack comparison (0: none)."""
    from benchmark.device import default_eval_batch_size
    from benchmark.eval.checks import check_run, transfer_source
    from benchmark.eval.flags import adapt_spec, attack_points, effective_n, predict
    from benchmark.eval.target import open_target
    from benchmark.run.protocols import resolve_specs

    run_dir = Path(run_dir)
    t = open_target(run_dir, checkpoint, device=device)
    bs = batch_size or default_eval_batch_size(t.device, t.cfg.arch)
    data = t.test_data(None, data_dir)
    x_all, y_all = data.test.floats(t.device)
    out: dict[str, Any] = {"run": str(run_dir), "defense": t.cfg.defense, "arch": t.cfg.arch,
                           "threads": torch.get_num_threads(), "batch_size": bs,
                           "torch": torch.__version__, "attacks": [],
                           "loadavg_start": os.getloadavg()[0]}
    for spec in resolve_specs(attacks, t.info.scale):
        spec = adapt_spec(spec, t.defense.randomized)
        n = min(effective_n(spec, t.cfg.profile, n_examples) or len(y_all), len(y_all))
        x, y = x_all[:n], y_all[:n]
        clean, ce = predict(t.model, x, y, bs)
        attack, stats = spec.build(seed=0), {}
        objective = t.defense.objective() if spec.attack == "adaptive" else None
        w0, c0 = time.perf_counter(), time.process_time()
        robust, _ = attack_points(t.model, attack, x, y, clean=clean, clean_ce=ce, batch_size=bs,
                                  loss=objective, stats=stats)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rec = {"attack": spec.label, "n": n, "attacked": int(clean.sum()),
               "robust_acc": float(robust.float().mean()), "wall_s": wall, "cpu_s": cpu,
               "cpu_s_per_point": cpu / n}
        if "components" in stats:
            rec["components_cpu_s"] = stats["components"]["cpu_s"]
        out["attacks"].append(rec)
        if spec.attack.startswith("autoattack") and spec.hparams.get("version") == "standard" \
                and ab_reps > 0:
            out["aa_direct"] = _interleaved(t.model, spec, x, y, clean, ce, robust, bs, ab_reps)
    if check:
        src, _ = transfer_source(run_dir, t.cfg, t.info.scale)
        with tempfile.TemporaryDirectory(prefix="advbench-bench-") as tmp:
            for mode in ([False, True] if cascade else [False]):
                copy = _scratch(run_dir, Path(tmp), "cascade" if mode else "full")
                c0, w0 = time.process_time(), time.perf_counter()
                rows = check_run(copy, n_examples=n_examples, checkpoint=checkpoint,
                                 device=device, batch_size=bs, data_dir=data_dir, source=src,
                                 cascade=mode, **({"names": list(checks)} if checks else {}))
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                n_pts = max((int(r.get("n_examples") or 0) for r in rows), default=0) or 1
                heads = [r for r in rows if r.get("kind") == "headline"] or \
                    [r for r in _rows(copy) if r.get("kind") == "headline"]
                out["check_cascade" if mode else "check"] = {
                    "n": n_pts, "cpu_s": cpu, "wall_s": wall, "cpu_s_per_point": cpu / n_pts,
                    "headlines": {f"{h['norm']}@{h['eps_str']}/{h['n_examples']}":
                                  h["robust_acc"] for h in heads}}
    out["loadavg_end"] = os.getloadavg()[0]
    return out


def _interleaved(model: Any, spec: Any, x: Any, y: Any, clean: Any, ce: Any, robust: Any,
                 bs: int, reps: int) -> dict[str, Any]:
    """AutoAttack through :func:`attack_points` vs pyautoattack directly on the clean-correct
    points, ``reps`` pairs in alternating order; per pair the CPU ratio, and the median."""
    from benchmark.eval.flags import attack_points
    xc, yc = x[clean.to(x.device)], y[clean.to(y.device)]
    ours_cpu, direct_cpu, direct_wall, same = [], [], [], True
    for r in range(reps):
        for which in (("direct", "ours") if r % 2 == 0 else ("ours", "direct")):
            if which == "ours":
                c0 = time.process_time()
                got, _ = attack_points(model, spec.build(seed=0), x, y, clean=clean,
                                       clean_ce=ce, batch_size=bs)
                ours_cpu.append(time.process_time() - c0)
                same &= bool(torch.equal(got, robust))
            else:
                c, w, left = _direct(model, spec, xc, yc, bs)
                direct_cpu.append(c)
                direct_wall.append(w)
                same &= bool(torch.equal(left, robust[clean]))
    ratios = [o / d if d > 0 else float("nan") for o, d in zip(ours_cpu, direct_cpu)]
    return {"points": int(len(yc)), "pairs": reps, "ours_cpu_s": ours_cpu,
            "direct_cpu_s": direct_cpu, "ratios": ratios,
            "ratio_cpu": float(statistics.median(ratios)),
            "cpu_s": float(statistics.median(direct_cpu)),
            "wall_s": float(statistics.median(direct_wall)), "same_robust_points": same}


def _direct(model: Any, spec: Any, x: Any, y: Any, bs: int) -> tuple[float, float, Any]:
    """pyautoattack called directly on (x, y): CPU and wall seconds, points left robust."""
    aa = spec.build(seed=0).build(model, x.device)  # a pyautoattack.AutoAttack, same settings
    w0, c0 = time.perf_counter(), time.process_time()
    with torch.random.fork_rng():
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=max(bs, 1))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    with torch.no_grad():
        robust = torch.cat([model(x_adv[i:i + bs]).argmax(1) == y[i:i + bs]
                            for i in range(0, len(y), bs)]).cpu() if len(y) else \
            torch.zeros(0, dtype=torch.bool)
    return cpu, wall, robust


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    from benchmark.store import read_json
    return [read_json(f) for f in sorted((run_dir / "eval").glob("*.json"))]


def format_bench_eval(r: dict[str, Any]) -> str:
    """Markdown: per attack, AutoAttack's ratio, the full check (and its cascade)."""
    lines = [f"Evaluation cost of {r['defense']} ({r['arch']}), {r['run']}: process "
             f"CPU-seconds (all {r['threads']} threads), batch {r['batch_size']}, torch "
             f"{r['torch']}; machine load (1-min load average) {r['loadavg_start']:.1f} at the "
             f"start, {r.get('loadavg_end', float('nan')):.1f} at the end", "", "| attack | points | attacked | robust % | CPU s | CPU s / point "
             "| wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for a in r["attacks"]:
        lines.append(f"| {a['attack']} | {a['n']} | {a['attacked']} | "
                     f"{100 * a['robust_acc']:.1f} | {a['cpu_s']:.1f} | "
                     f"{a['cpu_s_per_point']:.3f} | {a['wall_s']:.1f} |")
        if a.get("components_cpu_s"):
            lines.append("| ↳ components | | | | " + ", ".join(
                f"{k} {v:.1f}" for k, v in a["components_cpu_s"].items()) + " | | |")
    d = r.get("aa_direct")
    if d:
        pairs = ", ".join(f"{v:.3f}" for v in d.get("ratios", []))
        lines += ["", f"AutoAttack through advbench / pyautoattack called directly on the same "
                      f"{d['points']} points, CPU-seconds, measured A/B interleaved "
                      f"({d.get('pairs', 1)} pairs in alternating order after a warm-up run; "
                      f"median ratio over the pairs): {d['ratio_cpu']:.3f} (pairs {pairs}; "
                      f"direct {d['cpu_s']:.1f} CPU s, {d['wall_s']:.1f} s wall); same robust "
                      f"points: {'yes' if d['same_robust_points'] else 'NO'}"]
    for key, what in (("check", "full `advbench check`"),
                      ("check_cascade", "`advbench check --cascade`")):
        c = r.get(key)
        if c:
            heads = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in sorted(c["headlines"].items()))
            lines.append(f"\n{what} on {c['n']} points: {c['cpu_s']:.1f} CPU s "
                         f"({c['cpu_s_per_point']:.2f} per point), {c['wall_s']:.1f} s wall; "
                         f"headlines {heads or '–'}")
    if r.get("check") and r.get("check_cascade"):
        lines.append(f"\ncascade saving on the full check: "
                     f"{100 * (1 - r['check_cascade']['cpu_s'] / r['check']['cpu_s']):.1f}% "
                     "of its CPU-seconds")
    return "\n".join(lines) + "\n"
