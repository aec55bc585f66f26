"""Registry: decorator registration, entry-point plugins, wildcard resolution, errors."""
from __future__ import annotations

import importlib.metadata as md
import sys
import types

import pytest

from benchmark.errors import UsageError
from benchmark.registry import Registry
from defenses import DEFENSES, Defense, StepOutput


class Base:
    pass


def make_registry() -> Registry:
    reg: Registry = Registry("widget", "advbench.widgets-test", Base)

    @reg.register("alpha")
    class Alpha(Base):
        pass

    @reg.register("beta")
    class Beta(Base):
        pass

    @reg.register("trades-like")
    class Tr(Base):
        pass

    return reg


def test_registration_order_and_name_attribute() -> None:
    reg = make_registry()
    assert reg.names() == ["alpha", "beta", "trades-like"]
    assert reg.get("beta").name == "beta"


def test_duplicate_name_is_an_error() -> None:
    reg = make_registry()
    with pytest.raises(ValueError, match="duplicate"):
        reg.register("alpha")(type("Other", (Base,), {}))


def test_non_subclass_rejected() -> None:
    reg = make_registry()
    with pytest.raises(TypeError):
        reg.register("gamma")(type("NotBase", (), {}))


def test_resolve_all_list_and_wildcards_keep_registry_order() -> None:
    reg = make_registry()
    assert reg.resolve("all") == ["alpha", "beta", "trades-like"]
    assert reg.resolve("trades-like,alpha") == ["alpha", "trades-like"]
    assert reg.resolve("tr*") == ["trades-like"]
    assert reg.resolve("*a") == ["alpha", "beta"]


def test_unknown_names_list_valid_ones() -> None:
    reg = make_registry()
    with pytest.raises(UsageError, match="valid: alpha, beta, trades-like"):
        reg.get("alpah")
    with pytest.raises(UsageError, match="did you mean alpha"):
        reg.resolve("alpah")
    with pytest.raises(UsageError, match="matches nothing"):
        reg.resolve("zz*")


class PluginDefense(Defense):
    """A third-party defense living in its own package."""

    def training_step(self, model, x, y, *, epoch, step):  # type: ignore[no-untyped-def]
        return StepOutput(model(x).sum())


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, eps: list[md.EntryPoint]) -> None:
    real = md.entry_points

    def fake(**kw):  # type: ignore[no-untyped-def]
        if kw.get("group") == "advbench.defenses":
            return eps
        return real(**kw)

    monkeypatch.setattr(md, "entry_points", fake)


def test_plugin_found_through_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("my_advbench_plugin")
    mod.PluginDefense = PluginDefense  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_advbench_plugin", mod)
    _fake_entry_points(monkeypatch, [md.EntryPoint("my-def", "my_advbench_plugin:PluginDefense",
                                                   "advbench.defenses")])
    reg = Registry("defense", "advbench.defenses", Defense)
    reg.register("st")(type("St", (PluginDefense,), {}))
    assert reg.names() == ["st", "my-def"]
    assert reg.get("my-def") is PluginDefense
    assert reg.resolve("all") == ["st", "my-def"]


def test_broken_plugin_reported_and_skipped(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    _fake_entry_points(monkeypatch, [md.EntryPoint("bad", "no_such_module_xyz:Thing",
                                                   "advbench.defenses")])
    reg = Registry("defense", "advbench.defenses", Defense)
    assert reg.names() == []
    assert "skipping broken defense plugin 'bad'" in caplog.text
    assert [e.name for e in reg.entries() if e.error] == ["bad"]
    with pytest.raises(UsageError, match="failed to load"):
        reg.get("bad")


def test_plugin_colliding_with_builtin_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("my_advbench_plugin2")
    mod.PluginDefense = PluginDefense  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_advbench_plugin2", mod)
    _fake_entry_points(monkeypatch, [md.EntryPoint("at", "my_advbench_plugin2:PluginDefense",
                                                   "advbench.defenses")])
    reg = Registry("defense", "advbench.defenses", Defense)
    reg.register("at")(type("At", (PluginDefense,), {}))
    with pytest.raises(ValueError, match="collides with a built-in"):
        reg.names()


def test_builtin_defenses_start_with_st_at() -> None:
    assert DEFENSES.names()[:2] == ["st", "at"]
