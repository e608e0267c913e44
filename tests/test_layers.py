"""The package's shape: layers point down (the import-linter contract in pyproject.toml, which sees imports inside
functions too), and README's Layout table lists every module of the package, each once."""

import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "lit_mistral"


def lint(root) -> subprocess.CompletedProcess:
    """import-linter's contracts (`pyproject.toml` in `root`) checked against the package in `root`, in a process of
    its own: import-linter reconfigures logging, which other tests' caplog relies on."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)


def test_layers_point_down():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "lit_mistral", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "lit_mistral" / "modeling" / "loss.py", "a") as f:
        f.write("\n\ndef upward():\n    from lit_mistral.module import QLoRAModule\n\n    return QLoRAModule\n")
    result = lint(tmp_path)
    assert result.returncode != 0 and "lit_mistral.modeling.loss -> lit_mistral.module" in result.stdout, result.stdout


def package_modules() -> set[str]:
    """The package's modules as paths inside it (`modeling/offload.py`), without `__init__.py` and `__main__.py`."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts}


def layout_rows(readme: str) -> list[str]:
    """The module paths in the first column of the table under README's `## Layout` heading (`lit_mistral/` dropped)."""
    section = re.split(r"^## Layout\b.*$", readme, maxsplit=1, flags=re.M)[1].split("\n## ", 1)[0]
    paths = []
    for line in section.splitlines():
        cells = line.strip().strip("|").split("|")
        if not line.startswith("|") or set(cells[0].strip()) <= set("-: "):  # not a row, or the header's rule
            continue
        paths += [p.removeprefix("lit_mistral/") for p in re.findall(r"`([^`]+\.py)`", cells[0])]
    return paths


def test_readme_layout_lists_every_module_once():
    rows = layout_rows((ROOT / "README.md").read_text())
    modules = package_modules()
    assert not (missing := sorted(modules - set(rows))), f"README's Layout table lacks {missing}"
    assert not (stale := sorted(set(rows) - modules)), f"README's Layout table lists modules that are gone: {stale}"
    assert len(rows) == len(set(rows)), f"README's Layout table lists a module twice: {rows}"


def test_layout_rows_are_read_from_the_first_column():
    readme = ("## Layout\n\n| module | owns |\n|---|---|\n| `lit_mistral/cli.py` | the `io.py` command line |\n"
              "| `modeling/offload.py` | offloading |\n\n## Next\n| `data/x.py` | not in Layout |\n")
    assert layout_rows(readme) == ["cli.py", "modeling/offload.py"]
    assert "modeling/offload.py" in package_modules() and not any(os.sep + "__" in m for m in package_modules())
