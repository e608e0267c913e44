"""Bad options on the command line or in a --config file, reported first and alone: every unknown key (with the file
and line that holds it and the closest valid name), then the parser's own complaint, then where the options are
listed. jsonargparse prints its whole usage (over a hundred lines) before a one-line error naming only the first bad
key, and points to `__main__.py fit --help`, which is not a command anyone can run. Options renamed when the settings
were grouped, and a --config file that is not YAML, are reported before the parser sees them."""

import difflib
import os
import re
import sys
from pathlib import Path

from lit_mistral.config import RENAMED
from lit_mistral.errors import LitMistralError

PROG = "python -m lit_mistral"


def prog() -> str:
    """How the user started lit_mistral, as a command they can run again: the `lit-mistral` script or the module."""
    return "lit-mistral" if os.path.basename(sys.argv[0]) == "lit-mistral" else PROG


def config_keys(path: Path, subcommand: str, options: set[str]) -> dict[str, int]:
    """The dotted keys that the YAML file `path` sets, each with its line. A key that is an option is not looked
    into (its value may be a mapping: `trainer.callbacks`, a logger's `init_args`); a top-level `subcommand:` key
    (a config given before the subcommand) is."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # reported by the parser (or by `read_config`)
        return {}
    found: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value in node.value:
            name = str(key_node.value)
            if not prefix and name == subcommand and isinstance(value, yaml.MappingNode):
                walk(value, "")
                continue
            key = f"{prefix}{name}"
            found[key] = key_node.start_mark.line + 1
            if key not in options:
                walk(value, f"{key}.")

    walk(root, "")
    return found


def command_line_keys(args: list[str], subcommand: str) -> tuple[list[str], list[Path]]:
    """The option names given after `subcommand` on the command line (without `--`), and the --config files given
    anywhere."""
    keys, configs = [], []
    seen_subcommand = False
    for i, arg in enumerate(args):
        if arg == subcommand and not seen_subcommand:
            seen_subcommand = True
            continue
        if arg in ("--config", "-c") and i + 1 < len(args):
            configs.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            configs.append(Path(arg.split("=", 1)[1]))
        elif seen_subcommand and arg.startswith("--") and len(arg) > 2:
            key = arg[2:].split("=", 1)[0].removesuffix("+")
            if key not in ("config", "help", "print_config"):
                keys.append(key)
    return keys, configs


def _known(key: str, options: set[str], groups: set[str]) -> bool:
    """`key` is an option, a group of options, or inside an option whose value is free-form."""
    parts = key.split(".")
    return key in options or key in groups or any(".".join(parts[:n]) in options for n in range(1, len(parts)))


def _closest(key: str, options: set[str]) -> str:
    """The valid option nearest to `key`, or ''. A name written flat where the option sits in a group
    (`model.lora_rank` for `model.lora.r`) is also tried with each `_` read as a `.`."""
    spellings = [key] + [key[:i] + "." + key[i + 1:] for i, c in enumerate(key) if c == "_"]
    scored = [(difflib.SequenceMatcher(None, spelling, option).ratio(), option)
              for spelling in spellings for option in difflib.get_close_matches(spelling, options, n=3, cutoff=0.6)]
    return max(scored)[1] if scored else ""


def unknown_options(args: list[str], subcommand: str, options: set[str]) -> list[str]:
    """One line per key that is not an option of `subcommand` (whose options are `options`, dotted), in the --config
    files (`file:line`) and on the command line, each with the closest valid name."""
    groups = {o.rsplit(".", n)[0] for o in options for n in range(1, o.count(".") + 1)}
    keys, configs = command_line_keys(args, subcommand)
    problems = []
    for path in configs:
        for key, line in config_keys(path, subcommand, options).items():
            if not _known(key, options, groups):
                near = _closest(key, options)
                problems.append(f"{path}:{line}: {key!r} is not an option" + (f"; did you mean {near!r}?" if near
                                                                               else ""))
    for key in keys:
        # argparse takes an unambiguous abbreviation of an option on the command line
        if _known(key, options, groups) or len([o for o in options if o.startswith(key)]) == 1:
            continue
        near = _closest(key, options)
        problems.append(f"command line: --{key} is not an option" + (f"; did you mean --{near}?" if near else ""))
    return problems


def readable(text: str) -> str:
    """The parser's complaint about a value of a union type (`Literal[...] | None`), which lists Python's type
    reprs and each subtype's error, as the values it takes and the value it got."""
    subtypes = re.search(r"Does not validate against any of the Union subtypes Subtypes: \[(.*?)\] Errors:", text)
    given = re.search(r"Given value: (.*)$", text)
    if subtypes is None or given is None:
        return text
    takes = re.sub(r"typing\.Literal\[([^\]]*)\]", r"\1", subtypes.group(1))
    takes = re.sub(r"<class '(\w+\.)*(\w+)'>", r"\2", takes).replace("NoneType", "null")
    return f"{text[:subtypes.start()].rstrip()} {given.group(1)!r} is not one of: {takes}"


def located(message: str, args: list[str], subcommand: str | None, options: set[str]) -> str:
    """The parser's `message`, prefixed with the file and line of the --config that sets the key it names."""
    found = re.search(r'[Kk]ey "([^"]+)"', message)
    text = readable(" ".join(line.strip() for line in message.strip().splitlines()))
    if found is None or subcommand is None:
        return text
    key = found.group(1)
    cli_keys, configs = command_line_keys(args, subcommand)
    if key in cli_keys:
        return f"command line: {text}"
    for path in reversed(configs):  # the last file given wins
        line = config_keys(path, subcommand, options).get(key)
        if line is not None:
            return f"{path}:{line}: {text}"
    return text


def argument_problems(message: str, args: list[str], subcommand: str | None, options: set[str]) -> list[str]:
    """Everything wrong with `args` that the parser stopped at (its `message`): every unknown key, and the parser's
    own complaint when it is about something else (a wrong type, a value out of its choices)."""
    unknown = unknown_options(args, subcommand, options) if subcommand is not None else []
    about_unknown = any(phrase in message for phrase in (
        "does not accept option", "unrecognized arguments", "No action for key", "is not expected",
        "Unrecognized arguments"))
    if unknown and about_unknown:
        return unknown
    return [located(message, args, subcommand, options), *unknown]


def read_config(path: Path):
    """The YAML document of the config file `path`, or one clear error naming the file, the line and the column (as
    jsonargparse reports it, the error names no file)."""
    import yaml

    fix = "Fix: correct it (`python -m lit_mistral fit --print_config` prints a complete, valid config)."
    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise LitMistralError(f"--config {path}: not UTF-8 text (byte offset {err.start}). {fix}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = "; ".join(str(part) for part in (err.context, err.problem) if part)
        raise LitMistralError(f"--config {path}{where}: malformed YAML ({what}). {fix}") from None
    except yaml.YAMLError as err:
        raise LitMistralError(f"--config {path}: malformed YAML ({err}). {fix}") from None


def renamed_options(args: list[str]) -> list[str]:
    """The options of `args` (command line and --config files) that were renamed, each with its new name."""
    found = []
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].removesuffix("+")
            if key in RENAMED:
                found.append(f"--{key} is now --{RENAMED[key]}")
        if arg in ("--config", "-c") and i + 1 < len(args) or arg.startswith("--config="):
            path = Path(args[i + 1] if arg in ("--config", "-c") else arg.split("=", 1)[1])
            config = read_config(path) if path.is_file() else None  # a missing file: jsonargparse names it
            for section, values in (config or {}).items() if isinstance(config, dict) else ():
                for key in values if isinstance(values, dict) else ():
                    if f"{section}.{key}" in RENAMED:
                        found.append(f"{path}: {section}.{key} is now {RENAMED[f'{section}.{key}']}")
    return found
