"""docs/configuration.md, the option reference, names every option lit_mistral adds to `--help` (the options of
the `--help` snapshots in tests/fixtures, which test_cli.py keeps equal to `--help`), and no option that is gone;
and each setting's own `--help` text is one or two lines (the rest belongs in that reference)."""

import ast
import re

from conftest import ROOT

LIGHTNING = ("--trainer", "--checkpoint", "--lr_monitor", "--seed_everything", "--weights_only",
             "--return_predictions", "--verbose")
DOCUMENTED = ("lit_mistral/config.py", "lit_mistral/module.py", "lit_mistral/cli.py", "lit_mistral/callbacks.py",
              "lit_mistral/data/datamodule.py", "lit_mistral/data/records.py", "lit_mistral/evaluation/callback.py")


def help_options() -> set[str]:
    """lit_mistral's options (without `--`) in the `--help` snapshots, less Lightning's own and the group headings."""
    options = set()
    for snapshot in (ROOT / "tests" / "fixtures").glob("*_help_options.txt"):
        options |= {line.split()[0] for line in snapshot.read_text().splitlines()}
    groups = {o.rsplit(".", 1)[0] for o in options if "." in o}
    return {o[2:] for o in options if not o.startswith(LIGHTNING) and o not in groups}


def documented() -> list[str]:
    """The options the reference describes: the first code span of each of its list items."""
    return re.findall(r"^- `([\w.]+)`", (ROOT / "docs" / "configuration.md").read_text(), flags=re.M)


def linked() -> set[str]:
    """Options the CLI sets from another (`link_arguments`): not in `--help`, still described."""
    return set(re.findall(r'link_arguments\("[\w.]+", "([\w.]+)"\)', (ROOT / "lit_mistral" / "cli.py").read_text()))


def test_the_reference_names_every_option_and_no_stale_one():
    names = set(documented())
    assert not (missing := sorted(help_options() - names)), f"docs/configuration.md lacks {missing}"
    assert not (stale := sorted(names - help_options() - linked())), f"docs/configuration.md names gone {stale}"


def arg_help_lengths(path) -> dict[str, int]:
    """Lines of each `Args:` entry of the docstrings in `path` (`Class.arg` or `function.arg` -> line count)."""
    lengths = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef) or "Args:" not in (ast.get_docstring(node) or ""):
            continue
        current = None
        for line in ast.get_docstring(node).split("Args:", 1)[1].splitlines():
            if match := re.match(r"^    (\w+): ", line):
                current = f"{node.name}.{match.group(1)}"
                lengths[current] = 1
            elif current and line.startswith("        "):
                lengths[current] += 1
            else:
                current = None
    return lengths


def test_each_setting_says_itself_in_one_or_two_help_lines():
    lengths = {f"{p}:{k}": n for p in DOCUMENTED for k, n in arg_help_lengths(ROOT / p).items()}
    assert "lit_mistral/config.py:Compute.offload_layers" in lengths  # the docstrings are read
    long = {k: n for k, n in lengths.items() if n > 2}
    assert not long, f"--help texts over two lines (move the rest to docs/configuration.md): {long}"
