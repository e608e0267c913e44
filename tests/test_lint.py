"""The code's form: ruff's pycodestyle and pyflakes rules (`[tool.ruff]` in pyproject.toml: lines within 120 columns,
no unused imports or names) hold for the package, its tests and its benchmarks."""

import shutil
import subprocess
import sys

from conftest import ROOT


def ruff(root, *paths) -> subprocess.CompletedProcess:
    """`ruff check` of `paths` (default: everything) under `root`, with the settings of its pyproject.toml."""
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *paths], cwd=root,
                          capture_output=True, text=True)


def test_the_code_passes_ruff():
    result = ruff(ROOT, "lit_mistral", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_long_line_or_an_unused_import_fails(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "bad.py").write_text("import os\n\nNAME = '" + "x" * 120 + "'\n")
    result = ruff(tmp_path, "bad.py")
    assert result.returncode == 1 and "E501" in result.stdout and "F401" in result.stdout, result.stdout
