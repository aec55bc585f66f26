"""``--cascade``: the headline of a set of attacks for less, by attacking only what is left.

The headline (:mod:`benchmark.eval.worstcase`) is the per-sample worst case over the
attacks: a point is robust only if every attack failed on it. A point that one attack
already broke needs no other attack for the headline, so the attacks of one (norm, ε, N)
group run from the cheapest to the dearest (:func:`attack_cost`: model passes per point
the attack declares through its hyperparameters), each only on the points every earlier one
left robust; stored single-attack flags of the group narrow the points first. The stored
flags of a cascaded attack are the points robust under it *and* every earlier one, so the
headline's logical AND over the flags files equals the full run's.

Exactly equal per sample where each attack's result on a point does not depend on the other
points of its batch (batch size 1, or attacks without a random start): a random start is
drawn per batch, so on a subset it is another seeded draw (as inside AutoAttack's own
cascade). The test compares on a fixture at batch size 1.

A cascaded attack writes no single-attack result: its row (``"kind": "cascade"``) has no
``robust_acc`` but ``cascade_robust_acc`` (robust under it and the earlier ones), the points
it attacked and broke, its seconds and ``why``; the tables show its column empty with that
reason. Its flags file has its own key (:func:`cascade_key`, which names the earlier
attacks), so no check or table ever reads it as the single attack.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from benchmark.config import same_eps, stable_hash
from benchmark.run.protocols import AttackSpec

#: Square's query is a forward pass only: about a third of a forward+backward pass
FORWARD = 1 / 3


def attack_cost(attack: str, hp: Mapping[str, Any]) -> float:
    """Model passes per attacked point (forward+backward = 1) that an attack's resolved
    hyperparameters declare; the cascade's order, not a measurement."""
    if attack == "fgsm":
        return 1.0
    if attack in ("pgd", "cw", "adaptive", "transfer", "bpda"):
        return float(hp.get("steps", 20)) * float(hp.get("restarts", 1))
    if attack.startswith("apgd"):
        return float(hp.get("n_iter", 100)) * float(hp.get("n_restarts", 1))
    if attack == "square":
        return float(hp.get("n_queries", 5000)) * float(hp.get("n_restarts", 1)) * FORWARD
    if attack == "ensemble":
        return sum(attack_cost(m["attack"], m.get("hparams", {})) for m in hp["members"])
    if attack.startswith("autoattack"):
        n_iter, queries = float(hp.get("n_iter") or 100), float(hp.get("n_queries") or 5000)
        if hp.get("version") == "rand":
            return 2 * 20 * n_iter  # APGD-CE and APGD-DLR with 20 EOT draws
        per = {"apgd-ce": n_iter, "apgd-dlr": n_iter, "apgd-t": 9 * n_iter, "fab": n_iter,
               "fab-t": 9 * n_iter, "square": queries * FORWARD}
        subs = hp.get("attacks") or ["apgd-ce", "apgd-t", "fab-t", "square"]
        return sum(per.get(s, n_iter) for s in subs)
    return float(hp.get("steps", 100))


def cascade_order(specs: Sequence[AttackSpec]) -> list[list[AttackSpec]]:
    """The specs grouped by (norm, ε) in first-seen order, each group cheapest first (ties
    keep the given order)."""
    groups: list[list[AttackSpec]] = []
    for s in specs:
        g = next((g for g in groups if g[0].norm == s.norm and same_eps(g[0].eps, s.eps)), None)
        if g is None:
            groups.append([s])
        else:
            g.append(s)
    return [sorted(g, key=lambda s: attack_cost(s.attack, s.build(seed=0).hparams))
            for g in groups]


def cascade_key(run_id: str, checkpoint: str, spec: AttackSpec, n: Any,
                after: Sequence[str]) -> str:
    """Eval key of a cascaded attack: the spec, the points and the flags it started from."""
    return "cascade-" + stable_hash({"run_id": run_id, "checkpoint": checkpoint, **spec.key(),
                                     "n_examples": -1 if n is None else n,
                                     "after": list(after)})


def why(label: str, before: Sequence[str], n: int) -> str:
    """The reason a cascaded attack's column is empty."""
    if not before:
        return (f"cascaded run (--cascade): `{label}` ran first in the cascade on the first {n} "
                "points; its flags feed only the headline")
    return (f"cascaded run (--cascade): `{label}` attacked only the points every earlier "
            f"attack ({', '.join(before)}) left robust of the first {n}; no single-attack "
            "accuracy, only the headline")


def known_flags(out_dir: Any, checkpoint: str) -> list[dict[str, Any]]:
    """Every stored single-attack flags file of a checkpoint (attack rows' and checks'), as
    :func:`benchmark.eval.worstcase.stored_attacks` lists them; cascaded files left out (their
    keys name what they started from)."""
    from pathlib import Path

    from benchmark.eval.worstcase import stored_attacks
    from benchmark.store import read_json
    rows = []
    for f in sorted((Path(out_dir) / "eval").glob("*.json")):
        try:
            rows.append(read_json(f))
        except Exception:  # an unreadable row: RunStore.rows warns about it
            continue
    return [s for s in stored_attacks(Path(out_dir), rows, checkpoint)
            if not s["key"].startswith("cascade-")]


def run_cascade(t: Any, pending: Sequence[tuple[AttackSpec, Any]],
                known: Sequence[Mapping[str, Any]], x_all: Any, y_all: Any, clean_all: Any,
                ce_all: Any, *, batch_size: int, force: bool, progress: bool,
                provenance: str) -> list[dict[str, Any]]:
    """Run ``pending`` ((spec, n) pairs) as cascades per (norm, ε, N); write their rows
    (``"kind": "cascade"``) and flags; return the rows. ``known`` (:func:`known_flags`): the
    single-attack flags that exist; those of a group that cover its points narrow them first."""
    import time

    import torch

    from benchmark.eval.flags import ATTACK_SEED, attack_points
    from benchmark.eval.worstcase import flags_payload, to_hex
    from benchmark.store import (atomic_torch_save, atomic_write_json, read_row,
                                 safe_torch_load)
    from benchmark.validate import check_row

    out: list[dict[str, Any]] = []
    for n in dict.fromkeys(n for _, n in pending):  # each N in first-seen order
        m = len(y_all) if n is None else min(n, len(y_all))
        x, y, clean = x_all[:m], y_all[:m], clean_all[:m]
        for group in cascade_order([s for s, k in pending if k == n]):
            live, ce = clean.clone(), ce_all[:m].clone().float()
            after: list[str] = []
            before: list[str] = []
            for s in known:
                if s["norm"] == group[0].norm and same_eps(s["eps"], group[0].eps) and \
                        len(s["robust"]) >= m and torch.equal(s["clean"][:m], clean.cpu()):
                    live &= s["robust"][:m].to(live.device)
                    after.append(str(s["key"]))
                    before.append(str(s["attack"]))
            for spec in group:
                key = cascade_key(t.cfg.run_id, t.checkpoint, spec, n, after)
                path, fpath = t.out_dir / "eval" / f"{key}.json", t.out_dir / "flags" / f"{key}.pt"
                row = read_row(path) if path.exists() and fpath.exists() and not force else None
                if row is not None:
                    saved = safe_torch_load(fpath)
                    live, ce = saved["robust"] & clean, saved["adv_ce"]
                else:
                    attack, extra = spec.build(seed=ATTACK_SEED), {}
                    desc = f"{t.cfg.defense} s{t.cfg.seed} {spec.label}@{spec.eps:.4g} (cascade)"
                    t0, c0, attacked = time.perf_counter(), time.process_time(), live.clone()
                    if spec.attack == "ensemble":
                        flags, adv_ce, extra = ensemble_flags(t, spec, attack, x, y, live, ce, n,
                                                         batch_size, progress, desc)
                    else:
                        loss = t.defense.objective() if spec.attack == "adaptive" else None
                        flags, adv_ce = attack_points(
                            t.model, attack, x, y, clean=live, clean_ce=ce,
                            batch_size=batch_size, loss=loss, progress=progress, desc=desc,
                            partial=t.out_dir / "flags" / f"{key}.partial.pt", stats=extra)
                    first_by = extra.pop("first_broken_by", None)
                    row = {**t.row(key, "cascade", data_provenance=provenance), **spec.record(),
                           "attack_hparams": dict(attack.hparams), "attack_seed": ATTACK_SEED,
                           "n_examples": m, "clean_acc": float(clean.float().mean()),
                           "cascade_robust_acc": float(flags.float().mean()),
                           "cascade_position": len(before), "cascade_after": list(before),
                           "cascade_after_keys": list(after),
                           "points_attacked": int(attacked.sum()),
                           "points_broken": int((attacked & ~flags).sum()),
                           "wall_s": round(time.perf_counter() - t0 +
                                           extra.pop("resumed_wall_s", 0.0), 3),
                           "cpu_s": round(time.process_time() - c0, 3),
                           "batch_size": batch_size, **extra, "why": why(spec.label, before, m),
                           "clean_bits": to_hex(clean), "cascade_robust_bits": to_hex(flags)}
                    check_row(row, f"row {path}")
                    payload = flags_payload(clean, flags, adv_ce, spec.record(), t.checkpoint)
                    payload["cascade_after"] = list(after)
                    if first_by is not None:
                        payload.update(first_broken_by=first_by,
                                       components=extra["components"]["order"])
                    atomic_torch_save(fpath, payload)
                    atomic_write_json(path, row)
                    live, ce = flags.clone(), adv_ce
                out.append(row)
                after.append(key)
                before.append(spec.label)
    return out


class SpecRecorder:
    """A :class:`benchmark.eval.checks.Checker` flags source that attacks nothing: it records
    every spec the checks ask for (the attacks a full ``advbench check`` would run) and
    answers with the clean flags; ``exists`` and ``specs`` are the run's (``flags``), so the
    checker chooses the same attacks as in a full check."""

    def __init__(self, flags: Any, clean: Any) -> None:
        self.flags, self._clean = flags, clean
        self.asked: list[AttackSpec] = []

    def __call__(self, spec: AttackSpec) -> Any:
        if spec not in self.asked:
            self.asked.append(spec)
        return self._clean().clone()

    def exists(self, spec: AttackSpec) -> bool:
        return bool(self.flags.exists(spec))

    def specs(self, eps: float) -> list[AttackSpec]:
        return list(self.flags.specs(eps))


#: checks that attack nothing the headline counts (gradients, repeated forwards, a readout,
#: PGD's loss curve): a cascaded check leaves them out
NO_FLAGS = ("zero-gradient", "unstable", "binarization", "incomplete-opt")


def ensemble_flags(t: Any, spec: AttackSpec, attack: Any, x: Any, y: Any, clean: Any,
                   clean_ce: Any, n: Optional[int], batch_size: int, progress: bool,
                   desc: str) -> tuple[Any, Any, dict[str, Any]]:
    """The ``ensemble`` column: worst case over the members, their stored flags where present
    (same run, checkpoint and points), else a cascade of the missing ones on the points still
    robust (:mod:`attacks.ensemble`)."""
    import torch

    from attacks.ensemble import WorstCase
    from benchmark.eval.flags import attack_points, eval_key
    from benchmark.store import safe_torch_load
    state = WorstCase(clean, clean_ce)
    stored, ran = [], []
    for m, (label, member) in zip(attack.hparams["members"], attack.members()):
        mspec = AttackSpec(label, m["attack"], spec.norm, spec.eps, m["hparams"])
        mkey = eval_key(t.cfg.run_id, t.checkpoint, mspec, n)
        mfile = t.out_dir / "flags" / f"{mkey}.pt"
        if mfile.exists():
            saved = safe_torch_load(mfile)
            if torch.equal(saved["clean"], clean) and "adv_ce" in saved:
                state.update(torch.arange(len(y)), saved["robust"], saved["adv_ce"])
                stored.append(label)
                continue
        live = state.robust.clone()
        r, c = attack_points(t.model, member, x, y, clean=live, clean_ce=state.ce,
                             batch_size=batch_size, progress=progress, desc=f"{desc}/{label}")
        idx = torch.nonzero(live).flatten()
        state.update(idx, r[idx], c[idx])
        ran.append(label)
    flags, adv_ce = state.result()
    resolved = {label: dict(member.hparams) for label, member in attack.members()}
    return flags, adv_ce, {"members_from_store": stored, "members_run": ran,
                           "member_hparams": resolved}
