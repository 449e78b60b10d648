"""The core's layers import downward only, and the core never imports the built-in plugins: import-linter checks
both (the contracts are in pyproject.toml), here and so in CI. Each contract is shown to fail on a copy of the
core with one import that breaks it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the qtoolkit package under `root`, with `root`'s pyproject.toml (root first on the path, so
    that a copy is linted, not the installed checkout)."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(root / "pyproject.toml")], cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=120)


def test_every_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.fixture
def core_copy(tmp_path):
    shutil.copytree(ROOT / "qtoolkit", tmp_path / "qtoolkit", ignore=shutil.ignore_patterns("__pycache__", "hub"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _add_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


@pytest.mark.parametrize("line", ["from ..runner import prepare",
                                  "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..recipe import Recipe"],
                         ids=["import", "type-checking-import"])
def test_an_upward_import_breaks_the_layers_contract(core_copy, line):
    _add_line(core_copy / "qtoolkit" / "graph" / "patterns.py", line)
    result = lint_imports(core_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The core's layers import downward only BROKEN" in result.stdout
    assert "qtoolkit.graph.patterns ->" in result.stdout


def test_a_core_import_of_a_builtin_plugin_breaks_the_forbidden_contract(core_copy):
    _add_line(core_copy / "qtoolkit" / "sampling.py", "import qtoolkit_plugins.ndtc")
    result = lint_imports(core_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The core never imports the built-in plugins (it asks the registry for a name) BROKEN" in result.stdout
    assert "qtoolkit.sampling -> qtoolkit_plugins.ndtc" in result.stdout


def test_an_import_cycle_inside_a_package_breaks_the_acyclic_contract(core_copy):
    _add_line(core_copy / "qtoolkit" / "engines" / "sources.py", "from .backends import build_backend")
    result = lint_imports(core_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "No import cycle among the modules of any core package" in result.stdout
    assert "BROKEN" in result.stdout
