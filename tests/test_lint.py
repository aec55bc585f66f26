"""The linter is part of the suite (so CI fails on a finding): ``ruff check`` over the tree
with the explicit rule set of ``pyproject.toml`` (pyflakes ``F``: unused imports F401,
undefined names F821, ...; ``E9``: syntax errors)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert exe, "ruff is not installed (it is in the `test` extra: pip install -e '.[test]')"
    return [exe]


def test_rule_set_is_explicit_and_covers_unused_imports_and_undefined_names() -> None:
    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "F" in lint["select"] and "E9" in lint["select"]


def test_ruff_finds_an_unused_import_and_an_undefined_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f() -> int:\n    return undefined_name\n")
    res = subprocess.run([*_ruff(), "check", "--config", str(ROOT / "pyproject.toml"),
                          "--no-cache", str(bad)], capture_output=True, text=True)
    assert res.returncode == 1 and "F401" in res.stdout and "F821" in res.stdout, res.stdout


def test_the_tree_is_clean_under_ruff() -> None:
    res = subprocess.run([*_ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
