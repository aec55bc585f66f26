"""The import graph of ``benchmark/`` (read with ast, nothing imported): no circle, layers
only import downwards (report → eval → run → core), the core names no plugin package
(``defenses``, ``attacks``: they build on the core, and ``benchmark/run/resolve.py`` joins
them), and the report imports no defense and nothing from ``run/`` (it reads rows)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "benchmark"
#: above every layer: the command line, the sweep that joins the layers, the plugin test kit,
#: and the package's public façade (``benchmark.load_model``, ``benchmark.evaluate_model`` and
#: its result)
APP = {"benchmark", "benchmark.cli", "benchmark.sweep", "benchmark.testing", "benchmark.api",
       "benchmark.api_result"}
PLUGINS = ("defenses", "attacks")
RANK = {"core": 0, "run": 1, "eval": 2, "report": 3, "app": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def layer(module: str) -> str:
    if module in APP:
        return "app"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ("run", "eval", "report") else "core"


def imports(module: str) -> set[str]:
    """Every module named by an import statement anywhere in ``module`` (function bodies too)."""
    tree = ast.parse(MODULES[module].read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names
                    if f"{node.module}.{a.name}" in MODULES}
    return out


GRAPH = {m: {d for d in imports(m) if d in MODULES and d != m} for m in MODULES}


def test_the_graph_is_read() -> None:
    assert {"benchmark.cli", "benchmark.eval.target", "benchmark.run.train",
            "benchmark.report.report"} <= set(GRAPH)
    assert "benchmark.eval.target" in GRAPH["benchmark.eval.evaluate"]
    assert "benchmark.run.distributed" in GRAPH["benchmark.run.train"]  # `from pkg import mod`


def test_layers_only_import_downwards() -> None:
    upward = sorted(f"{m} ({layer(m)}) -> {d} ({layer(d)})" for m, deps in GRAPH.items()
                    for d in deps if RANK[layer(d)] > RANK[layer(m)])
    assert not upward, "imports against report -> eval -> run -> core:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_report_imports_no_defense() -> None:
    bad = sorted(f"{m} -> {d}" for m in MODULES if layer(m) == "report"
                 for d in imports(m) if d == "defenses" or d.startswith("defenses."))
    assert not bad, bad


def test_evaluation_modules_share_one_entry_and_do_not_import_each_other() -> None:
    commands = {f"benchmark.eval.{m}" for m in ("evaluate", "features", "corruptions",
                                                "rejection", "checks")} & set(MODULES)
    assert len(commands) >= 3
    for m in commands:
        assert "benchmark.eval.target" in GRAPH[m], m
        assert not GRAPH[m] & (commands - {m}), f"{m} imports {GRAPH[m] & commands}"


def _names_plugin(dep: str) -> bool:
    return any(dep == p or dep.startswith(p + ".") for p in PLUGINS)


def test_the_core_imports_no_plugin_package() -> None:
    core = sorted(m for m in MODULES if layer(m) == "core")
    assert {"benchmark.config", "benchmark.checkpoint", "benchmark.store"} <= set(core)
    bad = sorted(f"{m} -> {d}" for m in core for d in imports(m) if _names_plugin(d))
    assert not bad, "the core names a plugin package:\n" + "\n".join(bad)


def test_the_report_imports_nothing_from_run() -> None:
    bad = sorted(f"{m} -> {d}" for m in MODULES if layer(m) == "report"
                 for d in imports(m) if d == "benchmark.run" or d.startswith("benchmark.run."))
    assert not bad, bad


def test_the_layer_checks_can_fail() -> None:
    """The two rules above see a violation written the ways the tree writes imports."""
    tree = ast.parse("def f():\n    from defenses import DEFENSES\nimport attacks.base\n"
                     "from benchmark.run.cost import cost_rows\n")
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert _names_plugin("defenses") and _names_plugin("attacks.base")
    assert {"defenses", "attacks.base", "benchmark.run.cost"} <= names
