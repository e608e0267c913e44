"""Reading and checking instruction records: local .jsonl/.json/.parquet/.csv files or a Hugging Face hub dataset,
each record checked (fields present, strings, non-empty, valid UTF-8) before anything else runs, every problem named
by file and line."""

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_mistral.errors import LitMistralError, raise_problems
from lit_mistral.sources import PKG_SCHEME, resolve_location

TRAIN_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
PREDICT_EXTENSIONS = (".txt", ".jsonl")


@dataclass  # not frozen: Lightning rebuilds dataclasses in batches when moving them to the device
class Example:
    """One instruction record. `response` is None for inputs to predict."""

    instruction: str
    context: str = ""
    response: str | None = None
    category: str | None = None
    where: str = ""  # "file.jsonl:12" or "hub-id[7]": named in every error about this record
    max_new_tokens: int | None = None  # a predict input's own answer limit (within the settings')


@dataclass
class Fields:
    """Which keys of a record hold its parts.

    Args:
        instruction: Record key of the instruction.
        context: Record key of the optional context (null: the data has none).
        response: Record key of the response.
        category: Record key of the optional category (null: none), used for per-category metrics.
    """

    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"
    category: str | None = "category"


def _record_to_example(row, where: str, fields: Fields, need_response: bool) -> tuple[Example | None, list[str]]:
    """Check one raw record; return the `Example` or the list of what is wrong with it."""
    if not isinstance(row, dict):
        return None, [f"{where}: expected a JSON object with an {fields.instruction!r} field, got {type(row).__name__}"]
    problems = []

    def text(key: str | None, required: bool, non_empty: bool) -> str | None:
        if key is None:
            return None
        if key not in row or row[key] is None:
            if required:
                problems.append(f"{where}: field {key!r} is {'missing' if key not in row else 'null'}")
            return None
        value = row[key]
        if not isinstance(value, str):
            problems.append(f"{where}: field {key!r} must be a string, got {type(value).__name__} "
                            f"({str(value)[:40]!r})")
            return None
        if non_empty and not value.strip():
            problems.append(f"{where}: field {key!r} is empty")
            return None
        return value

    instruction = text(fields.instruction, required=True, non_empty=True)
    context = text(fields.context, required=False, non_empty=False)
    response = text(fields.response, required=need_response, non_empty=need_response)
    category = text(fields.category, required=False, non_empty=False)
    limit, bad = answer_limit(row, where) if not need_response else (None, None)
    problems += [bad] if bad else []
    if problems:
        return None, problems
    return Example(instruction, (context or "").strip(), response, category, where, limit), []


def answer_limit(row: dict, where: str) -> tuple[int | None, str | None]:
    """A predict input's own `max_new_tokens` (a positive whole number, or None: the settings'), and what is wrong
    with it (None: nothing)."""
    value = row.get("max_new_tokens")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        return None, f"{where}: field 'max_new_tokens' must be a whole number >= 1, got {value!r}"
    return value, None


def _malformed(err: json.JSONDecodeError) -> str:
    # json's messages may end in "at" ("Unterminated string starting at"): the column follows either way
    return f"malformed JSON ({err.msg.removesuffix(' at')} at column {err.colno})"


def _raw_rows(path: Path) -> tuple[list[tuple[str, object]], list[str]]:
    """(where, row) pairs of a local file, and the lines that could not be parsed at all. A UTF-8 byte order mark
    at the start of the file (Windows editors write one) is dropped."""
    suffix = path.suffix.lower()
    rows, problems, blank = [], [], []
    if suffix in (".jsonl", ".txt"):
        for number, raw in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(f"{where}: not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})")
                continue
            if not line.strip():
                blank.append(number)
                continue
            if suffix == ".txt":
                rows.append((where, {"instruction": line.strip()}))
                continue
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                problems.append(f"{where}: {_malformed(err)}")
        if blank and rows:
            shown = ", ".join(map(str, blank[:10])) + (" ..." if len(blank) > 10 else "")
            rank_zero_info(f"{path}: skipped {len(blank)} blank line(s) ({shown}); they are not inputs.")
    elif suffix == ".json":
        try:
            document = json.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8"))
        except UnicodeDecodeError as err:
            raise LitMistralError(f"{path}: not valid UTF-8 (byte offset {err.start}). "
                                  "Fix: save the file as UTF-8.") from None
        except json.JSONDecodeError as err:
            raise LitMistralError(f"{path}:{err.lineno}: {_malformed(err)}. "
                                  "Fix: the file must hold one JSON list of records.") from None
        if not isinstance(document, list):
            raise LitMistralError(f"{path}: expected a JSON list of records, got a {type(document).__name__}. "
                                  "Fix: write [ {...}, {...} ] or use .jsonl with one record per line.")
        rows = [(f"{path}[{i}]", row) for i, row in enumerate(document)]
    else:  # .parquet, .csv: columnar formats that `datasets` reads
        import datasets

        try:
            table = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        except Exception as err:  # pyarrow raises many kinds; all mean the same to the user
            raise LitMistralError(f"{path}: could not read it as {suffix[1:]} ({err}).") from None
        rows = [(f"{path} row {i + 1}", row) for i, row in enumerate(table)]
    return rows, problems


def _check_fields_exist(rows: list[tuple[str, object]], fields: Fields, key: str, source: str, need_response: bool,
                        table: bool) -> None:
    """One error when no record has a field that every record needs (a table's header names other columns, or
    every line of a file uses other keys), instead of one problem per record."""
    records = [row for _, row in rows if isinstance(row, dict)]
    if not records:
        return
    found = sorted({k for row in records[:1000] for k in row})
    needed = {"instruction": fields.instruction, **({"response": fields.response} if need_response else {})}
    absent = {part: name for part, name in needed.items() if not any(name in row for row in records)}
    if not absent:
        return
    noun = "column" if table else "field"
    missing = [f"{name!r} (data.fields.{part})" for part, name in absent.items()]
    what = (f"{source} has no column {' and no column '.join(missing)}; its columns are {found}" if table else
            f"no record of {source} has the field {' or the field '.join(missing)}; the records' fields are {found}")
    options = " ".join(f"--data.fields.{part} <{noun}>" for part in absent)
    raise LitMistralError(f"{key}: {what}. Fix: name the {noun}s that hold them: {options}.")


def hub_rows(name: str) -> list[tuple[str, object]]:
    import datasets

    try:
        table = datasets.load_dataset(name, split="train")
    except Exception as err:  # offline, unknown id, gated: datasets raises many kinds
        raise LitMistralError(
            f"data.path: {name!r} is not a local file and could not be loaded from the Hugging Face hub ({err}). "
            f"Fix: give a local {'/'.join(TRAIN_EXTENSIONS)} file, or a hub dataset id while online."
        ) from None
    return [(f"{name}[{i}]", row) for i, row in enumerate(table)]


def is_hub_id(source: str) -> bool:
    if source.startswith(PKG_SCHEME):
        return False
    path = Path(source).expanduser()
    return not (path.exists() or path.suffix or source.startswith((".", "/", "~")))


def read_rows(source: str, key: str, need_response: bool = True) -> tuple[str, list[tuple[str, object]], list[str],
                                                                         bool]:
    """The source as resolved (`pkg://` paths), the raw `(where, row)` pairs of `source` (a local file or a hub
    dataset id), the lines that could not be parsed at all, and whether it is a table (columns, not keys)."""
    extensions = TRAIN_EXTENSIONS if need_response else PREDICT_EXTENSIONS
    source = resolve_location(source, key)
    path = Path(source).expanduser()
    # a hub dataset id looks like "owner/name"; anything with an extension or a path prefix is a file
    if is_hub_id(source) and need_response:
        return source, hub_rows(source), [], True
    if path.is_dir():
        raise LitMistralError(f"{key}: {str(path)!r} is a folder, not a file. Fix: give a file in it "
                              f"({', '.join(extensions)}).")
    if not path.is_file():
        raise LitMistralError(f"{key}: file {str(path)!r} does not exist. Fix: check the path.")
    if path.suffix.lower() not in extensions:
        raise LitMistralError(
            f"{key}: {str(path)!r} has an unsupported extension {path.suffix!r}. "
            f"Fix: use one of {', '.join(extensions)}."
        )
    rows, problems = _raw_rows(path)
    return source, rows, problems, path.suffix.lower() in (".parquet", ".csv")


def read_inputs(source: str, fields: Fields, key: str, need_response: bool = True, skip_invalid: bool = False,
                format: str = "auto") -> tuple[str, list]:
    """Read and check every row of `source`: instruction records (`Example`s) or conversations
    (`Conversation`s, the `messages` or ShareGPT shape), as `format` says or, with `auto`, as the rows show.
    Returns the kind read (`instruction`, `messages` or `sharegpt`) and the items.

    All problems are collected and raised as one error naming file and line, unless `skip_invalid`, in which case
    bad rows are left out and counted in the log."""
    from lit_mistral.data.conversations import detect_format, read_conversations

    source, rows, problems, table = read_rows(source, key, need_response)
    n_bad = len(problems)  # so far: lines that did not parse, one problem each
    kind = format if format != "auto" else (detect_format(rows)[0] or "instruction")
    items = []
    if kind == "instruction":
        _check_fields_exist(rows, fields, key, source, need_response, table)
        for where, row in rows:
            example, bad = _record_to_example(row, where, fields, need_response)
            problems += bad
            if example is not None:
                items.append(example)
            else:
                n_bad += 1
    else:
        read = read_conversations(rows, None if format == "auto" else kind, need_response, fields.category)
        items, problems = read.conversations, problems + read.problems
        if not need_response:  # predict inputs may carry their own answer limit; a bad one leaves the input out
            by_where, kept = dict(rows), []
            for conversation in items:
                conversation.max_new_tokens, bad = answer_limit(by_where[conversation.where], conversation.where)
                problems += [bad] if bad else []
                kept += [] if bad else [conversation]
            items = kept
        n_bad += len(rows) - len(items)
    if problems and not skip_invalid:
        raise_problems(problems, "Fix: correct these records, or set --data.skip_invalid true to leave them out.")
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        rank_zero_warn(f"{key}: skipped {n_bad} invalid record(s) of {n_bad + len(items)} in {source} "
                       f"(data.skip_invalid=true): {shown}")
    if not items:
        raise LitMistralError(f"{key}: {source!r} holds no usable records. Fix: point it at a non-empty dataset.")
    return kind, items


def read_examples(source: str, fields: Fields, key: str, need_response: bool = True,
                  skip_invalid: bool = False) -> list[Example]:
    """Read and check every instruction record of `source` (see `read_inputs`)."""
    return read_inputs(source, fields, key, need_response, skip_invalid, format="instruction")[1]


def input_key(instruction: str | None, messages: list[dict] | None = None) -> str | None:
    """What identifies an input among others (a resumed predict run matches its rows by it): a conversation's
    messages, else the instruction; from an input or from an output row alike."""
    return json.dumps(messages, ensure_ascii=False) if messages is not None else instruction


def example_key(example) -> str:
    """`input_key` of an instruction record or a conversation."""
    return input_key(example.instruction, example.as_dicts() if hasattr(example, "messages") else None)
