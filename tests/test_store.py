"""Run store: key stability, atomic writes, tolerant JSONL, job states, safe loading."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmark.config import RunConfig, merge_hparams, parse_hparams, stable_hash
from benchmark.run.resolve import resolve_run_config
from benchmark.errors import CheckpointError, UsageError
from benchmark.store import (JobState, RunStore, append_jsonl, atomic_write_json, read_jsonl,
                             safe_torch_load)


def test_hash_ignores_key_order_but_not_values() -> None:
    a = {"x": 1, "y": {"b": 2, "a": [1, 2]}}
    b = {"y": {"a": [1, 2], "b": 2}, "x": 1}
    assert stable_hash(a) == stable_hash(b)
    assert stable_hash(a) != stable_hash({**a, "x": 2})
    assert len(stable_hash(a)) == 12


def test_run_id_changes_with_any_hparam_and_is_stable() -> None:
    c1 = resolve_run_config("at", "mnist5k", profile="cpu", seed=0)
    c2 = resolve_run_config("at", "mnist5k", profile="cpu", seed=0)
    assert c1.run_id == c2.run_id
    assert c1.run_id != resolve_run_config("at", "mnist5k", profile="cpu", seed=1).run_id
    assert c1.run_id != resolve_run_config("at", "mnist5k", profile="cpu", seed=0,
                                           user_hparams={"lr": 0.01}).run_id
    assert RunConfig.from_dict(json.loads(json.dumps(c1.to_dict()))).run_id == c1.run_id


def test_profiles_and_dataset_scale_resolve_protocol_values() -> None:
    paper = resolve_run_config("at", "cifar10", profile="paper")
    assert paper.arch == "resnet18"
    hp = paper.hparams
    assert (hp["epochs"], hp["lr"], hp["batch_size"], hp["lr_milestones"]) == (110, 0.1, 128,
                                                                               [100, 105])
    assert hp["eps"] == pytest.approx(8 / 255) and hp["train_step_size"] == pytest.approx(2 / 255)
    assert hp["train_attack_steps"] == 10 and hp["weight_decay"] == 5e-4
    assert resolve_run_config("at", "svhn", profile="paper").hparams["train_step_size"] == \
        pytest.approx(1 / 255)
    # cpu: 5 steps at half the CIFAR cpu step still travel beyond ε (10/255), as 10 × 1/255 do
    sv = resolve_run_config("at", "svhn", profile="cpu").hparams
    cf = resolve_run_config("at", "cifar10", profile="cpu").hparams
    assert sv["train_step_size"] == pytest.approx(cf["train_step_size"] / 2)
    assert sv["train_attack_steps"] * sv["train_step_size"] > sv["eps"]
    mn = resolve_run_config("at", "mnist", profile="paper").hparams
    assert (mn["eps"], mn["train_step_size"], mn["train_attack_steps"]) == (0.3, 0.01, 40)


def test_hparam_validation() -> None:
    with pytest.raises(UsageError, match="unknown hyperparameter 'betta'"):
        merge_hparams({"beta": 1.0}, user={"betta": 2})
    with pytest.raises(UsageError, match="expects float"):
        merge_hparams({"beta": 1.0}, user={"beta": "six"})
    with pytest.raises(UsageError, match="eps must lie"):
        merge_hparams({"eps": 0.1}, user={"eps": 3.0})
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_hparams("{beta: 6}")
    assert merge_hparams({"beta": 1.0}, user={"beta": 6}) == {"beta": 6}


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "row.json"
    atomic_write_json(target, {"v": 1})

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["row.json"]  # no temp file left behind


def test_jsonl_reader_tolerates_truncated_last_line(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"epoch": 1})
    append_jsonl(log, {"epoch": 2})
    with open(log, "a") as fh:
        fh.write('{"epoch": 3, "lo')  # crash mid-write
    assert read_jsonl(log) == [{"epoch": 1}, {"epoch": 2}]


def test_append_after_a_truncated_line_keeps_every_record(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"epoch": 1})
    with open(log, "a") as fh:
        fh.write('{"epoch": 2, "lo')  # killed mid-append
    append_jsonl(log, {"epoch": 2})
    append_jsonl(log, {"epoch": 3})
    assert read_jsonl(log) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    with open(log, "a") as fh:
        fh.write('{"epoch": 4}')  # complete object, only the newline was lost
    append_jsonl(log, {"epoch": 5})
    assert [r["epoch"] for r in read_jsonl(log)] == [1, 2, 3, 4, 5]


def test_job_states(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert RunStore.state(run) is JobState.NEW
    run.mkdir()
    (run / "ckpt_last.pt").write_bytes(b"x")
    assert RunStore.state(run) is JobState.PARTIAL
    (run / "TRAINED").write_text("")
    assert RunStore.state(run, ["k1"]) is JobState.TRAINED
    (run / "eval").mkdir()
    (run / "eval" / "k1.json").write_text("{}")  # not a row: recomputed, never reused
    assert RunStore.state(run, ["k1"]) is JobState.TRAINED
    row = {"run_id": "r", "eval_key": "k1", "defense": "at", "dataset": "synthetic", "seed": 0,
           "checkpoint": "best", "attack": "pgd", "eps": 0.03, "n_examples": 8,
           "clean_acc": 0.5, "robust_acc": 0.25}
    (run / "eval" / "k1.json").write_text(json.dumps(row))
    assert RunStore.state(run, ["k1"]) is JobState.DONE
    (run / "eval" / "k1.json").write_text(json.dumps({**row, "clean_acc": float("nan")}))
    assert RunStore.state(run, ["k1"]) is JobState.TRAINED


def test_checkpoints_load_weights_only(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(safe_torch_load(good)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="weights-only"):
        safe_torch_load(bad)
    assert not (tmp_path / "pwned").exists()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError):
        safe_torch_load(trunc)
    with pytest.raises(CheckpointError, match="not found"):
        safe_torch_load(tmp_path / "missing.pt")


def test_helper_run_shares_the_protocol_overrides_but_not_the_defense_hparams() -> None:
    from benchmark.run.resolve import helper_config
    hat = resolve_run_config("hat", "synthetic", arch="tiny", seed=3,
                             user_hparams={"train_subset": 100, "epochs": 2, "beta": 4.0})
    helper = helper_config("st", hat)
    assert (helper.defense, helper.dataset, helper.arch, helper.seed) == ("st", "synthetic",
                                                                          "tiny", 3)
    assert helper.hparams["train_subset"] == 100 and helper.hparams["epochs"] == 2
    assert "beta" not in helper.hparams  # HAT's own weight is not the helper's business
    assert helper.hparams["select_by"] == "val_clean"  # st's own default survives
    plain = helper_config("st", resolve_run_config("hat", "synthetic", arch="tiny", seed=3))
    assert plain == resolve_run_config("st", "synthetic", arch="tiny", seed=3)
