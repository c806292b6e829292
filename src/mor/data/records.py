"""Reading task files (JSON list or JSONL, with ``file:line`` for every record) and validating
records; one rule per record shape, the same for training and evaluation."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import MissingInput
from .choices import _FORMAT, _check_choice, _check_choices, _nonempty_str, parse_multiple_choice
from .tables import TABLE_FORMATS, check_columns, column_hint, rename_fields, table_rows
from .types import DataError


SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
"""File stems that name a split, not a task: ``boolq/train.json`` is task "boolq"."""

DATA_SUFFIXES = (".json", ".jsonl", *TABLE_FORMATS)
"""Files a task is read from: JSON list / JSON Lines here, parquet / arrow / CSV through ``datasets``."""


@dataclass
class Record:
    """One validated record: its JSON object, where it came from, and its kind."""

    data: dict
    file: str
    line: int  # 1-based line where the record's object starts
    kind: str  # "instruction" | "chat" | "choice"

    @property
    def source(self) -> str:
        """``file:line`` of the record, for messages."""
        return f"{self.file}:{self.line}"


@dataclass
class Task:
    """The records of one task file or folder.

    ``skipped`` lists ``"file:line: reason"`` for each record dropped by ``skip_bad=True``.
    """

    name: str
    records: list[Record]
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


def task_name(path: str | Path) -> str:
    """Name of the task stored at ``path``.

    A folder is named after itself; a file after its stem, except that a split-named file
    (``train.json``, ``test.jsonl``, ...) is named after its parent folder.
    """
    path = Path(path)
    if path.is_dir():
        return path.resolve().name
    if path.stem.lower() in SPLIT_NAMES:
        return path.resolve().parent.name
    return path.stem


_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def _line_at(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _json_error(path: str, err: json.JSONDecodeError) -> DataError:
    return DataError(
        f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno}). Fix the syntax "
        "there (a missing comma or quote, a trailing comma, an unescaped newline in a string)."
    )


def _iter_json_list(path: str, text: str, start: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, value)`` for each element of the JSON list starting at ``text[start]``.

    Each value is decoded with :meth:`json.JSONDecoder.raw_decode`, so its line is exactly the
    line where its text starts.
    """
    decoder = json.JSONDecoder()
    i = _skip_ws(text, start + 1)
    line, pos = _line_at(text, i), i  # line of position ``pos``, advanced incrementally
    if i < len(text) and text[i] == "]":
        i = _skip_ws(text, i + 1)
    else:
        while True:
            if i >= len(text):
                raise DataError(f"{path}:{_line_at(text, i)}: the JSON list is not closed; add ']' at the end.")
            line, pos = line + text.count("\n", pos, i), i
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as err:
                raise _json_error(path, err) from None
            yield line, value
            i = _skip_ws(text, end)
            if i >= len(text):
                raise DataError(f"{path}:{_line_at(text, i)}: the JSON list is not closed; add ']' at the end.")
            if text[i] == "]":
                i = _skip_ws(text, i + 1)
                break
            if text[i] != ",":
                raise DataError(
                    f"{path}:{_line_at(text, i)}: expected ',' or ']' after the record that starts on "
                    f"line {line}, found {text[i]!r}; put a comma between records."
                )
            i = _skip_ws(text, i + 1)
            if i < len(text) and text[i] == "]":
                raise DataError(
                    f"{path}:{_line_at(text, i)}: trailing comma before ']'; JSON allows none, remove it."
                )
    if i < len(text):
        raise DataError(
            f"{path}:{_line_at(text, i)}: extra content after the closing ']' of the list; remove it "
            "(a JSON file holds one list of records; use .jsonl for one record per line)."
        )


def _iter_jsonl(path: str, text: str, bad: list[str] | None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, value)`` for each non-blank line. A bad line raises, or is appended to
    ``bad`` as ``"file:line: reason"`` when ``bad`` is a list (``skip_bad``)."""
    for number, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            msg = (
                f"{path}:{number}: invalid JSON: {err.msg} (column {err.colno}). Each line of a "
                "JSON Lines file must be one complete JSON object; fix or remove this line."
            )
            if bad is None:
                raise DataError(msg) from None
            bad.append(msg)
            continue
        yield number, value


def _iter_file_values(path: Path, bad: list[str] | None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, value)`` for every record in a JSON-list or JSON Lines file.

    The format is chosen by content, not by suffix: a file starting with ``[`` is a JSON list,
    one starting with ``{`` is JSON Lines (a lone object spread over several lines is refused:
    it is most likely a mistaken JSON file).
    """
    name = str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{name}:{line}: the file is not UTF-8 text ({err.reason}); re-save it as UTF-8.") from None
    i = _skip_ws(text, 0)
    if i >= len(text):
        raise DataError(f"{name}:1: the file is empty; it must hold a JSON list of records or JSON Lines.")
    if text[i] == "[":
        yield from _iter_json_list(name, text, i)
        return
    if text[i] != "{":
        raise DataError(
            f"{name}:{_line_at(text, i)}: expected '[' (a JSON list of records) or '{{' (one JSON "
            f"object per line), found {text[i]!r}."
        )
    try:
        _, end = json.JSONDecoder().raw_decode(text, i)
        single = _skip_ws(text, end) >= len(text)
    except json.JSONDecodeError:
        single = False  # let the line-by-line reader report it with its line
    if single and "\n" in text[i:end].strip():
        raise DataError(
            f"{name}:{_line_at(text, i)}: the file holds one JSON object spread over several lines, "
            "not a list of records; wrap the records in [ ... ] or write one object per line (.jsonl)."
        )
    yield from _iter_jsonl(name, text, bad)


# ---- record validation ---------------------------------------------------------------------


def _check_instruction(record: dict) -> None:
    if not _nonempty_str(record.get("instruction")):
        raise DataError('"instruction" must be non-empty text.')
    if "input" in record and record["input"] is not None and not isinstance(record["input"], str):
        raise DataError(f'"input" is {type(record["input"]).__name__}; it must be text (or "" / absent).')
    if "output" not in record:
        raise DataError('missing field "output": add the response text the model should learn.')
    if not _nonempty_str(record["output"]):
        raise DataError(f'empty output ({record["output"]!r}): write the response text the model should learn.')
    if record.get("answer") is not None and not isinstance(record["answer"], (str, int)):
        raise DataError(f'"answer" is {record["answer"]!r}; it must be a label such as "answer2" or an index.')
    if "choices" in record:
        _check_choices(record)


def _check_chat(record: dict) -> None:
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(
            '"messages" must be a list of at least two {"role", "content"} objects: the prompt '
            "turn(s), then the assistant reply to learn."
        )
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or not _nonempty_str(msg.get("role")) or not isinstance(msg.get("content"), str):
            raise DataError(f'message {k} is {msg!r}; each message needs a "role" and a text "content".')
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(
            f'the last message has role {last["role"]!r}; it must be the "assistant" reply the model learns.'
        )
    if not last["content"].strip():
        raise DataError("the last (assistant) message is empty; write the reply the model should learn.")


MAX_RECORD_CHARS = 1_000_000
"""Most characters of text one record may hold. Prompts and answers are at most a few thousand
tokens; one 50 MB record made evaluation tokenise and pad it until the machine ran out of memory."""


def _text_size(value: Any) -> int:
    """Characters of text in a JSON value (strings, nested in lists and objects, keys included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _text_size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 0


def validate_record(record: Any) -> str:
    """Check one record and return its kind (``"instruction"``, ``"chat"`` or ``"choice"``).

    Raises :class:`DataError` (without a location; the caller adds ``file:line``).
    """
    size = _text_size(record)
    if size > MAX_RECORD_CHARS:
        raise DataError(f"the record holds {size / 1e6:.1f} million characters of text, beyond any model's context "
                        f"(the bound is {MAX_RECORD_CHARS / 1e6:g} million, ~{MAX_RECORD_CHARS // 4:,} tokens); "
                        "shorten it or remove it (--skip-bad skips it).")
    if not isinstance(record, dict):
        raise DataError(
            f"record is a JSON {type(record).__name__}, not an object; each record must be "
            '{"instruction": ..., "output": ...}, {"messages": [...]} or {"question", "choices", "label"}.'
        )
    if "messages" in record:
        _check_chat(record)
        return "chat"
    if "instruction" in record:
        _check_instruction(record)
        if "choices" in record or _FORMAT.search(record["instruction"]):
            parse_multiple_choice(record)  # one rule for train and eval: its answer must be one of its choices
        return "instruction"
    if "question" in record or "choices" in record:
        _check_choice(record)
        parse_multiple_choice(record)
        return "choice"
    raise DataError(
        f"record has none of the fields instruction/messages/question (it has: {', '.join(sorted(record)) or 'none'}); "
        'use {"instruction", "input", "output"}, {"messages": [...]} or {"question", "choices", "label"}.'
    )


def _records_from_values(
    values: Iterable[tuple[int, Any]], file: str, skip_bad: bool, skipped: list[str],
    columns: dict[str, str] | None = None,
) -> list[Record]:
    records = []
    for line, value in values:
        if columns and isinstance(value, dict):
            value = rename_fields(value, columns)
        try:
            kind = validate_record(value)
        except DataError as err:
            if not skip_bad:
                raise DataError(f"{file}:{line}: {err}") from None
            skipped.append(f"{file}:{line}: {err}")
            continue
        records.append(Record(value, file, line, kind))
    return records


def _read_file(path: Path, skip_bad: bool, skipped: list[str], columns: dict[str, str] | None = None) -> list[Record]:
    """Records of one file: JSON / JSON Lines by content, parquet / arrow / CSV by suffix (rows
    located as ``file:row``, 1-based)."""
    if path.suffix.lower() in TABLE_FORMATS:
        names, values = table_rows(path)
        check_columns(columns or {}, names, str(path))
        try:
            return _records_from_values(values, str(path), skip_bad, skipped, columns)
        except DataError as err:
            raise column_hint(err, names) from None
    bad: list[str] | None = [] if skip_bad else None
    values = list(_iter_file_values(path, bad))
    if bad:
        skipped.extend(bad)
    if columns:
        check_columns(columns, (k for _, v in values if isinstance(v, dict) for k in v), str(path))
    return _records_from_values(values, str(path), skip_bad, skipped, columns)


def _folder_files(folder: Path, split: str | None) -> list[Path]:
    """The data files of a task folder: the ``split`` file, or all of them when that is safe."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    names = ", ".join(p.name for p in files) or "none"
    if split is not None:
        chosen = [p for p in files if p.stem.lower() == split.lower()]
        if not chosen:
            hint = " (carve one with mor.data.split_records)" if split.lower() == "train" else ""
            raise MissingInput(
                f"{folder} has no {split} file ({split}.json, .jsonl, .parquet, .arrow or .csv){hint}; its data "
                f"files are: {names}"
            )
        return chosen
    if not files:
        raise MissingInput(f"{folder} has no data files ({', '.join(DATA_SUFFIXES)})")
    split_files = [p for p in files if p.stem.lower() in SPLIT_NAMES]
    if split_files and len(files) > 1:
        raise DataError(
            f"{folder} holds several splits ({names}); choose one with split='train' (or --split) "
            "so that train and test records are never mixed."
        )
    return files


def load_task_records(path: str | Path, skip_bad: bool = False, split: str | None = None,
                      columns: dict[str, str] | None = None) -> Task:
    """Read one task from a JSON-list file, a JSON Lines file, a parquet / arrow / CSV file, or a
    folder of them (``save_to_disk`` folders and hub datasets: :mod:`mor.data.sources`).

    A folder is one task: its ``<split>.json``/``.jsonl`` when ``split`` is given, else its only
    data file, else all its data files (refused when they are several splits). ``split`` is
    ignored for a file. ``columns`` maps record fields onto the data's columns (``{"instruction":
    "question"}``). With ``skip_bad=True`` malformed records (and bad JSON Lines lines) are
    skipped and listed in ``Task.skipped``; a syntax error inside a JSON list still raises,
    since nothing after it can be trusted.

    Raises FileNotFoundError for a missing path, DataError for malformed data or an empty task.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"task data not found: {path}")
    files = _folder_files(path, split) if path.is_dir() else [path]
    skipped: list[str] = []
    records = [r for f in files for r in _read_file(f, skip_bad, skipped, columns)]
    if not records:
        why = f" ({len(skipped)} skipped as malformed; first: {skipped[0]})" if skipped else ""
        raise DataError(f"{path}: the task has no records{why}; add records or fix the skipped ones.")
    return Task(task_name(path), records, [str(f) for f in files], skipped)


def load_tasks(
    paths: Sequence[str | Path], skip_bad: bool = False, split: str | None = None
) -> list[Task]:
    """Read several tasks (see :func:`load_task_records`); their names must be distinct."""
    return _distinct([load_task_records(p, skip_bad=skip_bad, split=split) for p in paths])


def _distinct(tasks: list[Task]) -> list[Task]:
    """``tasks``, refused when two share a name (one would silently replace the other in results)."""
    seen: dict[str, str] = {}
    for task in tasks:
        if task.name in seen:
            raise DataError(
                f"two tasks are both named {task.name!r} ({seen[task.name]} and {task.files[0]}); "
                "rename a file or folder so that task names are distinct."
            )
        seen[task.name] = task.files[0]
    return tasks


def has_split(folder: Path, split: str) -> bool:
    """Whether ``folder`` holds a ``<split>`` data file (``<split>.json``, ``.jsonl``, ``.parquet``, ...)."""
    return any((folder / f"{split}{ext}").is_file() for ext in DATA_SUFFIXES)
