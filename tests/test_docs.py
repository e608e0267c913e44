"""Every command the docs show runs: each `python -m lit_mistral ...` in a code block of README.md, EVALUATION.md,
BENCHMARKS.md, benchmarks/**/README.md and docs/*.md is parsed by the CLI's own parser (with `--print_config`, in this
process: no model loads), and every `--group.option` the README-like docs name in prose is an option the parser
knows. A renamed or misspelt option in a doc fails here, naming the file and line."""

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lit_mistral.cli import main


@contextlib.contextmanager
def in_root():
    """The docs' commands run from the repository root (`configs/...` paths)."""
    before = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(before)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "EVALUATION.md", "BENCHMARKS.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").rglob("README.md")),
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
PROSE_DOCS = [d for d in DOCS if d != "BENCHMARKS.md"]  # BENCHMARKS' history names options as they were then
SHELL_ENDS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1"}
OPTION = re.compile(r"--((?:model|data|trainer|evaluation|checkpoint|predictions)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def code_blocks(text: str) -> list[tuple[int, str]]:
    """The lines inside ``` fences, each with its 1-based line number; lines ending in `\\` joined to the next."""
    out, inside, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def doc_commands(text: str) -> list[tuple[int, list[str]]]:
    """Each `python -m lit_mistral` command of the code blocks in `text`: (line, its arguments after `lit_mistral`),
    cut at the shell's separators, redirections and comments."""
    commands = []
    for number, line in code_blocks(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i in range(len(tokens) - 2):
            if tokens[i].startswith("python") and tokens[i + 1:i + 3] == ["-m", "lit_mistral"]:
                args = []
                for token in tokens[i + 3:]:
                    if token in SHELL_ENDS:
                        break
                    args.append(token)
                commands.append((number, args))
    return commands


def parse_error(args: list[str]) -> str | None:
    """None when the CLI parses `args` (run from the repository root, as the docs' commands are), else its message."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), in_root():
        try:
            main([*args, "--print_config"])
            status = 0
        except SystemExit as exit_:
            status = exit_.code or 0
    if status == 0 and out.getvalue().strip():
        return None
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return f"exit {status}: " + " / ".join(lines[-3:])


def test_the_docs_show_commands():
    # the extraction itself: the set-up commands, a continued line, and a command after `&&`
    readme = doc_commands((ROOT / "README.md").read_text())
    assert ["fit", "--config", "configs/demo.yaml"] in [args for _, args in readme]
    assert any(args[:1] == ["export"] and "--output_dir" in args for _, args in readme)
    text = "```bash\ncd x && python -m lit_mistral fit \\\n    --config configs/demo.yaml | tee log  # note\n```\n"
    assert doc_commands(text) == [(2, ["fit", "--config", "configs/demo.yaml"])]


def test_every_documented_command_parses():
    failures, count = [], 0
    for doc in DOCS:
        path = ROOT / doc
        if not path.is_file():
            continue
        for number, args in doc_commands(path.read_text()):
            count += 1
            error = parse_error(args)
            if error is not None:
                failures.append(f"{doc}:{number}: python -m lit_mistral {shlex.join(args)}\n    {error}")
    assert count >= 10, f"only {count} commands found in {DOCS}: is the extraction broken?"
    assert not failures, "documented commands that do not parse:\n" + "\n".join(failures)


def test_a_renamed_or_unknown_option_fails_the_check():
    assert parse_error(["fit", "--config", "configs/demo.yaml", "--evaluation.compare_base", "true"]) is None
    assert "is now --evaluation.compare_base" in parse_error(
        ["fit", "--config", "configs/demo.yaml", "--model.compare_base", "true"])
    unknown = ["fit", "--config", "configs/demo.yaml", "--model.no_such_option", "1"]
    assert "--model.no_such_option" in parse_error(unknown)


@pytest.fixture(scope="module")
def known_options() -> set[str]:
    """Every dotted option of fit and predict, and each group above one (`model.compute`), from `--print_config`."""
    keys = set()

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            keys.add(name)
            if isinstance(value, dict):
                walk(value, name + ".")

    for subcommand in ("fit", "predict"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), in_root(), pytest.raises(SystemExit):
            main([subcommand, "--config", "configs/demo.yaml", "--print_config"])
        walk(yaml.safe_load(out.getvalue()), "")
    return keys


def test_options_named_in_the_docs_exist(known_options):
    unknown = []
    for doc in PROSE_DOCS:
        path = ROOT / doc
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in OPTION.findall(line):
                if name not in known_options:
                    unknown.append(f"{doc}:{number}: --{name}")
    assert not unknown, "options the CLI does not know:\n" + "\n".join(unknown)


LINK = re.compile(r"\]\(([^)\s#]*)(?:#([^)\s]*))?\)")
GENERATED = {"docs/configuration.md"}  # written from the dataclasses by its own generator, which its test checks


def anchors(text: str):
    """GitHub's anchors for the headings of a Markdown text (a repeated one gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        fenced ^= line.lstrip().startswith("```")
        if line.startswith("#") and not fenced:
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_links_between_the_docs_lead_somewhere():
    broken = []
    for doc in DOCS:
        path = ROOT / doc
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for target, anchor in LINK.findall(line):
                if target.startswith(("http://", "https://")):
                    continue
                linked = (path.parent / target).resolve() if target else path
                name = str(linked.relative_to(ROOT)) if linked.is_relative_to(ROOT) else str(linked)
                if not linked.exists():
                    if name not in GENERATED:
                        broken.append(f"{doc}:{number}: {target} does not exist")
                elif anchor and linked.is_file() and anchor not in set(anchors(linked.read_text())):
                    broken.append(f"{doc}:{number}: {target}#{anchor}: no such heading")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)
