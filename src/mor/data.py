"""Instruction and multiple-choice data: reading task files, validating records, building
training examples and multiple-choice items, tokenising, and mixing tasks.

Vocabulary used throughout:

* A **record** is one JSON object from a task file, of one of three kinds:

  - ``"instruction"``: ``{"instruction", "input"?, "output", "answer"?, "choices"?, "label"?}``
    (the LLM-Adapters format; multiple choice when the instruction ends with
    ``Answer format: answer1/answer2/...``);
  - ``"chat"``: ``{"messages": [{"role", "content"}, ...]}`` ending in an assistant message;
  - ``"choice"``: ``{"question", "choices": [...], "label": int}`` (``"answer"`` may replace
    ``"label"``: an index or the text of the correct choice).

* A **task** is the records of one file or folder, with a name (see :func:`task_name`).
* **Label scoring** compares ``"the correct answer is <label>"`` continuations after the
  instruction prompt (the LLM-Adapters format); **text scoring** compares each option's text
  after ``Question: <q>\\nAnswer:`` (the lm-evaluation-harness way).

Every record remembers ``file:line`` so that every error can point at it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = [
    "DataError",
    "MultipleChoiceItem",
    "TrainingExample",
    "Record",
    "Task",
    "ParsedChoice",
    "TokenizedExample",
    "TokenizedTask",
    "DEFAULT_TEMPLATE",
    "LABEL_CONTINUATION",
    "SPLIT_NAMES",
    "task_name",
    "load_task_records",
    "load_tasks",
    "load_hub_task",
    "validate_record",
    "parse_multiple_choice",
    "text_prompt",
    "instruction_prompt",
    "chat_prompt",
    "multiple_choice_items",
    "training_examples",
    "encode_pair",
    "tokenize_example",
    "tokenize_examples",
    "collate",
    "mix_tasks",
    "split_records",
]


class DataError(ValueError):
    """A task file or record is malformed. The message says where, what, and how to fix it."""


@dataclass
class MultipleChoiceItem:
    """One multiple-choice question, ready to score by log-likelihood.

    Choice ``i`` is scored as log P(continuations[i] | contexts[i]). Usually every context is
    the same prompt; fill-in-the-blank records (lm-eval's "partial" scoring) have one context
    per option and a shared continuation.
    """

    task: str
    contexts: list[str]  # one per choice
    continuations: list[str]  # one per choice
    gold: int  # index of the correct choice
    source: str = ""  # "file:line" of the record, for messages


@dataclass
class TrainingExample:
    """One supervised example: the loss is taken on ``target`` only."""

    task: str
    prompt: str  # fully rendered prompt text (chat template already applied where used)
    target: str  # response text; the tokeniser appends EOS
    source: str = ""


# --------------------------------------------------------------------------------------------
# Records and tasks
# --------------------------------------------------------------------------------------------

SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
"""File stems that name a split, not a task: ``boolq/train.json`` is task "boolq"."""

DATA_SUFFIXES = (".json", ".jsonl")


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


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _check_choices(record: dict) -> None:
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError('"choices" must be a list of at least two option texts, e.g. ["yes", "no"].')
    for k, choice in enumerate(choices):
        if not _nonempty_str(choice):
            raise DataError(f'choice {k} in "choices" is {choice!r}; every choice must be non-empty text.')
    label = record.get("label")
    if "label" in record and (not isinstance(label, int) or isinstance(label, bool)):
        raise DataError(f'"label" is {label!r}; it must be the 0-based index of the correct choice (an int).')
    if isinstance(label, int) and not 0 <= label < len(choices):
        raise DataError(
            f'"label" is {label} but there are {len(choices)} choices; use an index from 0 to {len(choices) - 1}.'
        )
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and not 0 <= answer < len(choices):
        raise DataError(
            f'"answer" is {answer} but there are {len(choices)} choices; use an index from 0 to {len(choices) - 1}.'
        )


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


def _check_choice(record: dict) -> None:
    if not _nonempty_str(record.get("question")):
        raise DataError('"question" must be non-empty text.')
    if "choices" not in record:
        raise DataError('missing field "choices": add the list of option texts.')
    _check_choices(record)
    if "label" not in record and "answer" not in record:
        raise DataError('missing field "label": add the 0-based index of the correct choice.')


def validate_record(record: Any) -> str:
    """Check one record and return its kind (``"instruction"``, ``"chat"`` or ``"choice"``).

    Raises :class:`DataError` (without a location; the caller adds ``file:line``).
    """
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
    values: Iterable[tuple[int, Any]], file: str, skip_bad: bool, skipped: list[str]
) -> list[Record]:
    records = []
    for line, value in values:
        try:
            kind = validate_record(value)
        except DataError as err:
            if not skip_bad:
                raise DataError(f"{file}:{line}: {err}") from None
            skipped.append(f"{file}:{line}: {err}")
            continue
        records.append(Record(value, file, line, kind))
    return records


def _read_file(path: Path, skip_bad: bool, skipped: list[str]) -> list[Record]:
    bad: list[str] | None = [] if skip_bad else None
    values = list(_iter_file_values(path, bad))
    if bad:
        skipped.extend(bad)
    return _records_from_values(values, str(path), skip_bad, skipped)


def _folder_files(folder: Path, split: str | None) -> list[Path]:
    """The data files of a task folder: the ``split`` file, or all of them when that is safe."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    names = ", ".join(p.name for p in files) or "none"
    if split is not None:
        chosen = [p for p in files if p.stem.lower() == split.lower()]
        if not chosen:
            hint = " (carve one with mor.data.split_records)" if split.lower() == "train" else ""
            raise FileNotFoundError(
                f"{folder} has no {split}.json or {split}.jsonl{hint}; its data files are: {names}"
            )
        return chosen
    if not files:
        raise FileNotFoundError(f"{folder} has no .json or .jsonl files")
    split_files = [p for p in files if p.stem.lower() in SPLIT_NAMES]
    if split_files and len(files) > 1:
        raise DataError(
            f"{folder} holds several splits ({names}); choose one with split='train' (or --split) "
            "so that train and test records are never mixed."
        )
    return files


def load_task_records(path: str | Path, skip_bad: bool = False, split: str | None = None) -> Task:
    """Read one task from a JSON-list file, a JSON Lines file, or a folder.

    A folder is one task: its ``<split>.json``/``.jsonl`` when ``split`` is given, else its only
    data file, else all its data files (refused when they are several splits). ``split`` is
    ignored for a file. With ``skip_bad=True`` malformed records (and bad JSON Lines lines) are
    skipped and listed in ``Task.skipped``; a syntax error inside a JSON list still raises,
    since nothing after it can be trusted.

    Raises FileNotFoundError for a missing path, DataError for malformed data or an empty task.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task data not found: {path}")
    files = _folder_files(path, split) if path.is_dir() else [path]
    skipped: list[str] = []
    records = [r for f in files for r in _read_file(f, skip_bad, skipped)]
    if not records:
        why = f" ({len(skipped)} skipped as malformed; first: {skipped[0]})" if skipped else ""
        raise DataError(f"{path}: the task has no records{why}; add records or fix the skipped ones.")
    return Task(task_name(path), records, [str(f) for f in files], skipped)


def load_tasks(
    paths: Sequence[str | Path], skip_bad: bool = False, split: str | None = None
) -> list[Task]:
    """Read several tasks (see :func:`load_task_records`); their names must be distinct."""
    tasks = [load_task_records(p, skip_bad=skip_bad, split=split) for p in paths]
    seen: dict[str, str] = {}
    for task in tasks:
        if task.name in seen:
            raise DataError(
                f"two tasks are both named {task.name!r} ({seen[task.name]} and {task.files[0]}); "
                "rename a file or folder so that task names are distinct."
            )
        seen[task.name] = task.files[0]
    return tasks


def load_hub_task(dataset_id: str, split: str = "train", name: str | None = None, skip_bad: bool = False) -> Task:
    """Read a Hugging Face dataset split whose rows are records of the kinds above.

    Needs network (or a local datasets cache). Rows are located as ``<id>[<split>]:<row>``,
    1-based. Not used by the offline tests.
    """
    import datasets

    rows = datasets.load_dataset(dataset_id, name, split=split)
    file = f"{dataset_id}[{split}]"
    skipped: list[str] = []
    # datasets fills fields a row lacks with None; drop them so optional fields stay optional
    values = ((k + 1, {key: v for key, v in row.items() if v is not None}) for k, row in enumerate(rows))
    records = _records_from_values(values, file, skip_bad, skipped)
    if not records:
        raise DataError(f"{file}: the dataset has no usable records ({len(skipped)} skipped).")
    return Task(dataset_id.rstrip("/").split("/")[-1], records, [file], skipped)


# --------------------------------------------------------------------------------------------
# Multiple-choice parsing
# --------------------------------------------------------------------------------------------

_FORMAT = re.compile(r"Answer format\s*:[ \t]*(?P<labels>[^\n]*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_CORRECT = re.compile(r"correct answer is\s*:?\s*(?P<label>[^\s.,;]+)", re.IGNORECASE)
_PREAMBLE = re.compile(r"^Please\b[^:\n]*:\s*", re.IGNORECASE)
_NUMBERED = re.compile(r"^(?P<stem>[A-Za-z]+)\d+$")


@dataclass
class ParsedChoice:
    """What a multiple-choice record asks.

    ``question``: the question text (preamble such as "Please choose the correct answer to the
    question:" removed); ``options``: each option's text; ``labels``: the names after
    "Answer format:" (empty for records without one); ``gold``: index of the correct option;
    ``blank``: the question is a sentence with a ``_`` to fill with an option (winogrande).
    """

    question: str
    options: list[str]
    labels: list[str]
    gold: int
    blank: bool = False


def _format_labels(instruction: str) -> tuple[list[str], int]:
    """Labels after the last "Answer format:" line and where that line starts (or len)."""
    match = None
    for match in _FORMAT.finditer(instruction):
        pass
    if match is None:
        return [], len(instruction)
    labels = [s.strip() for s in match.group("labels").split("/")]
    if len(labels) < 2 or not all(labels):
        raise DataError(
            f'"Answer format: {match.group("labels")}" does not list at least two labels separated by "/"; '
            "write e.g. Answer format: answer1/answer2/answer3/answer4."
        )
    return labels, match.start()


def _marker(label: str) -> re.Pattern:
    """``Label:`` at a word start, case-insensitive (``answer1`` matches ``Answer1:``)."""
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(label)}\s*:", re.IGNORECASE)


def _missing(label: str) -> DataError:
    marker = label[:1].upper() + label[1:]
    return DataError(
        f'the instruction has no "{marker}:" option text although "Answer format" lists {label!r}; '
        f'add "{marker}: <text>" before the format line or fix the format line.'
    )


def _find_markers(body: str, labels: list[str]) -> list[tuple[int, int]] | None:
    """Spans of the ``Label:`` markers of all labels, in label order, or None when some label
    has no marker. Searches backwards from the last label, so a question that happens to
    mention "Answer1:" does not confuse it."""
    spans: list[tuple[int, int]] = []
    limit = len(body)
    for label in reversed(labels):
        found = list(_marker(label).finditer(body, 0, limit))
        if not found:
            return None
        spans.append(found[-1].span())
        limit = found[-1].start()
    return spans[::-1]


def _strip_preamble(text: str) -> str:
    return _PREAMBLE.sub("", text.strip(), count=1).strip()


def _instruction_options(instruction: str, labels: list[str], body_end: int) -> tuple[str, list[str]]:
    """Question text and option texts of an LLM-Adapters instruction.

    With ``Answer1: ... Answer2: ...`` markers the options are the marker texts. Without any
    marker the options are the label words themselves (boolq's ``true/false``), unless the
    labels are numbered (``answer1``), which then must have markers.
    """
    body = instruction[:body_end]
    spans = _find_markers(body, labels)
    if spans is None:
        if all(_NUMBERED.match(label) for label in labels):
            missing = [label for label in labels if not _marker(label).search(body)]
            if missing:
                raise _missing(missing[0])
            raise DataError(
                "the option markers are not in the order of \"Answer format\"; list them as "
                f"{' '.join(label[:1].upper() + label[1:] + ': ...' for label in labels)}."
            )
        return _strip_preamble(body), list(labels)
    options = []
    for k, (_, end) in enumerate(spans):
        stop = spans[k + 1][0] if k + 1 < len(spans) else len(body)
        text = body[end:stop].strip()
        if not text:
            raise DataError(f"option {labels[k]!r} has no text after its marker; write the option's text.")
        options.append(text)
    return _strip_preamble(body[: spans[0][0]]), options


def _match_answer(value: Any, labels: list[str], options: list[str], what: str) -> int:
    """Index named by an answer value: an int index, a label (case-insensitive), or an option text."""
    n = len(options)
    if isinstance(value, bool):
        raise DataError(f"{what} is {value!r}; give a label, an option text or an index.")
    if isinstance(value, int):
        if not 0 <= value < n:
            raise DataError(f"{what} is {value} but there are {n} options; use an index from 0 to {n - 1}.")
        return value
    text = str(value).strip()
    lowered = [label.lower() for label in labels]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text in options:
        return options.index(text)
    known = "/".join(labels) if labels else " | ".join(options)
    raise DataError(f"{what} is {value!r}, which is none of the choices ({known}); correct it.")


def _gold(record: dict, labels: list[str], options: list[str]) -> int:
    """Gold index from "label", "answer" and (instruction records) "output"; all must agree."""
    votes: list[tuple[str, int]] = []
    if "label" in record:
        votes.append(('"label"', _match_answer(record["label"], labels, options, '"label"')))
    if "answer" in record and record["answer"] not in (None, ""):
        votes.append(('"answer"', _match_answer(record["answer"], labels, options, '"answer"')))
    output = record.get("output")
    if isinstance(output, str) and "instruction" in record:
        match = _CORRECT.search(output)
        if match:
            votes.append(('"output"', _match_answer(match.group("label"), labels, options, '"output"')))
        elif output.strip() in options:
            votes.append(('"output"', options.index(output.strip())))
    if not votes:
        raise DataError(
            'no gold answer: add "answer" (e.g. "answer2"), "label" (an index) or an output '
            '"the correct answer is <label>".'
        )
    if len({index for _, index in votes}) > 1:
        said = ", ".join(f"{name} says option {index + 1}" for name, index in votes)
        raise DataError(f"the answer fields disagree ({said}); make them name the same option.")
    return votes[0][1]


def _is_blank(question: str, labels: list[str]) -> bool:
    """Fill-in-the-blank (winogrande in LLM-Adapters form): ``option1/option2`` labels and a
    ``_`` in the sentence. ARC's ``___`` questions use ``answerN`` labels and are not blanks."""
    return bool(labels) and all(re.fullmatch(r"option\d+", label, re.I) for label in labels) and "_" in question


def parse_multiple_choice(record: dict) -> ParsedChoice:
    """Question, option texts, labels and gold index of a multiple-choice record.

    Handles LLM-Adapters instructions (``Answer1:``/``Solution1:``/``Option1:``/``Ending1:``
    markers, or label words such as ``true/false`` as the options), instruction records with an
    explicit ``"choices"`` list, and ``{"question", "choices", "label"}`` records. A non-empty
    ``"input"`` is appended to the question on a new line. An explicit record is a
    fill-in-the-blank only when it says ``"blank": true``. Raises :class:`DataError` naming
    the problem (the caller adds ``file:line``).
    """
    if not isinstance(record, dict):
        raise DataError("record is not a JSON object.")
    if "messages" in record:
        raise DataError("chat records are not multiple choice; use instruction or question/choices records.")
    if "instruction" in record:
        return _parse_instruction_choice(record)
    if "question" in record:
        _check_choice(record)
        options = [c.strip() for c in record["choices"]]
        question = record["question"].strip()
        blank = record.get("blank") is True and "_" in question  # opt-in for explicit records
        return ParsedChoice(question, options, [], _gold(record, [], options), blank)
    raise DataError('record has neither "instruction" nor "question"; it cannot be multiple choice.')


def _parse_instruction_choice(record: dict) -> ParsedChoice:
    instruction = record.get("instruction")
    if not _nonempty_str(instruction):
        raise DataError('"instruction" must be non-empty text.')
    labels, body_end = _format_labels(instruction)
    if "choices" in record:
        _check_choices(record)
        options = [c.strip() for c in record["choices"]]
        if labels and len(labels) != len(options):
            raise DataError(
                f'"Answer format" lists {len(labels)} labels but "choices" has {len(options)}; make them match.'
            )
        body = instruction[:body_end]
        spans = _find_markers(body, labels) if labels else None
        question = _strip_preamble(body[: spans[0][0]] if spans else body)
    elif labels:
        question, options = _instruction_options(instruction, labels, body_end)
    else:
        raise DataError(
            'the instruction has no "Answer format: label1/label2/..." line and the record has no '
            '"choices"; add one of them to make it multiple choice.'
        )
    extra = (record.get("input") or "").strip()
    if extra:
        question = f"{question}\n{extra}" if question else extra
    if not question:
        raise DataError("the question text is empty; put the question before the options.")
    return ParsedChoice(question, options, labels, _gold(record, labels, options), _is_blank(question, labels))


# --------------------------------------------------------------------------------------------
# Prompts, multiple-choice items and training examples
# --------------------------------------------------------------------------------------------

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
"""Prompt for answer-text scoring (lm-eval's arc/piqa/openbookqa form)."""

LABEL_CONTINUATION = "the correct answer is {label}"
"""Continuation scored for each label in label scoring (the LLM-Adapters output format)."""

TARGET_DELIMITER = " "
"""Put between context and option text in text scoring, as lm-eval's ``target_delimiter``."""


def text_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """Fill ``{question}`` in ``template`` (a plain replacement, so other braces are literal)."""
    if "{question}" not in template:
        raise ValueError(f"template {template!r} has no {{question}} placeholder; add one.")
    return template.replace("{question}", question)


def _has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _render_chat(messages: list[dict], tokenizer: Any) -> str:
    """Messages rendered with the tokenizer's chat template and a generation prompt; without a
    template, the contents joined by blank lines and ending in one."""
    if _has_chat_template(tokenizer):
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['content']}\n\n" for m in messages)


def instruction_prompt(instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """Prompt for an instruction (+ input): one user turn through the chat template when the
    tokenizer has one, else ``"{instruction}\\n\\n{input}\\n\\n"`` (``"{instruction}\\n\\n"``
    when the input is empty)."""
    user = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    return _render_chat([{"role": "user", "content": user}], tokenizer)


def chat_prompt(messages: list[dict], tokenizer: Any = None) -> str:
    """Prompt for a chat record: all messages but the final assistant reply, rendered."""
    return _render_chat(messages[:-1], tokenizer)


def _record_prompt(record: Record, tokenizer: Any) -> str:
    data = record.data
    if record.kind == "instruction":
        return instruction_prompt(data["instruction"], data.get("input") or "", tokenizer)
    if record.kind == "chat":
        return chat_prompt(data["messages"], tokenizer)
    return instruction_prompt(data["question"], "", tokenizer)


def _parse(record: Record) -> ParsedChoice:
    try:
        return parse_multiple_choice(record.data)
    except DataError as err:
        raise DataError(f"{record.source}: {err}") from None


def _blank_parts(question: str, option: str) -> tuple[str, str]:
    """lm-eval winogrande "partial" scoring: context = sentence up to the blank with the option
    filled in; continuation = the rest after the blank, stripped, after one space."""
    idx = question.index("_")
    return question[:idx] + option, TARGET_DELIMITER + question[idx + 1 :].strip()


def _text_item(task: str, record: Record, template: str) -> MultipleChoiceItem:
    parsed = _parse(record)
    if parsed.blank:
        parts = [_blank_parts(parsed.question, option) for option in parsed.options]
        contexts, continuations = [c for c, _ in parts], [t for _, t in parts]
    else:
        context = text_prompt(parsed.question, template)
        contexts = [context] * len(parsed.options)
        continuations = [TARGET_DELIMITER + option for option in parsed.options]
    return MultipleChoiceItem(task, contexts, continuations, parsed.gold, record.source)


def _label_item(task: str, record: Record, tokenizer: Any) -> MultipleChoiceItem:
    parsed = _parse(record)
    context = _record_prompt(record, tokenizer)
    if parsed.labels:
        continuations = [LABEL_CONTINUATION.format(label=label) for label in parsed.labels]
    else:
        continuations = list(parsed.options)
    return MultipleChoiceItem(task, [context] * len(continuations), continuations, parsed.gold, record.source)


def multiple_choice_items(
    task: Task, scoring: str = "text", tokenizer: Any = None, template: str = DEFAULT_TEMPLATE,
    skipped: list[str] | None = None,
) -> list[MultipleChoiceItem]:
    """Multiple-choice items of a task, for log-likelihood scoring.

    ``scoring="text"``: context ``template`` filled with the question, continuation ``" " +
    option text``; fill-in-the-blank records use lm-eval's winogrande partial scoring (one
    context per option, shared continuation). No chat template.

    ``scoring="label"``: context = the record's prompt (chat template with generation prompt
    when the tokenizer has one, else plain), continuations ``"the correct answer is <label>"``
    for each label after "Answer format:"; records without labels (``question``/``choices``)
    use the choice texts as continuations.

    A record that is not multiple choice raises :class:`DataError`; when ``skipped`` is a list
    (``--skip-bad``) it is appended there as ``"file:line: reason"`` and left out instead.
    """
    if scoring == "text":
        build = lambda r: _text_item(task.name, r, template)  # noqa: E731
    elif scoring == "label":
        build = lambda r: _label_item(task.name, r, tokenizer)  # noqa: E731
    else:
        raise ValueError(f"scoring must be 'text' or 'label', not {scoring!r}")
    items = []
    for record in task.records:
        try:
            items.append(build(record))
        except DataError as err:
            if skipped is None:
                raise
            skipped.append(str(err))
    if not items and skipped is not None:
        raise DataError(f"{task.name}: no record is multiple choice ({len(skipped or [])} skipped; first: "
                        f"{(skipped or ['-'])[0]}); eval needs records with choices.")
    return items


def _output_example(task: str, record: Record, tokenizer: Any) -> TrainingExample:
    data = record.data
    prompt = _record_prompt(record, tokenizer)
    if record.kind == "instruction":
        target = data["output"]
    elif record.kind == "chat":
        target = data["messages"][-1]["content"]
    else:
        parsed = _parse(record)
        target = parsed.options[parsed.gold]
    return TrainingExample(task, prompt, target, record.source)


def _text_example(task: str, record: Record, template: str) -> TrainingExample:
    parsed = _parse(record)
    option = parsed.options[parsed.gold]
    if parsed.blank:
        prompt, target = _blank_parts(parsed.question, option)
    else:
        prompt, target = text_prompt(parsed.question, template), TARGET_DELIMITER + option
    return TrainingExample(task, prompt, target, record.source)


def training_examples(
    task: Task, target: str = "output", tokenizer: Any = None, template: str = DEFAULT_TEMPLATE,
    skipped: list[str] | None = None,
) -> list[TrainingExample]:
    """Supervised examples of a task.

    ``target="output"``: prompt = the record's prompt (chat template + generation prompt when
    the tokenizer has one, else plain), target = ``output`` (instruction records), the final
    assistant message (chat records) or the correct choice's text (question/choices records).

    ``target="text"``: prompt and target exactly as text scoring builds the gold choice
    (``template`` prompt, ``" " + correct option``; blanks: the partial sentence and its rest),
    so that training and scoring match token for token.

    A record that cannot give an example (``"text"`` needs multiple choice) raises
    :class:`DataError`; when ``skipped`` is a list (``--skip-bad``) it is appended there instead.
    """
    if target == "output":
        build = lambda r: _output_example(task.name, r, tokenizer)  # noqa: E731
    elif target == "text":
        build = lambda r: _text_example(task.name, r, template)  # noqa: E731
    else:
        raise ValueError(f"target must be 'output' or 'text', not {target!r}")
    examples = []
    for record in task.records:
        try:
            examples.append(build(record))
        except DataError as err:
            if skipped is None:
                raise
            skipped.append(str(err))
    return examples


# --------------------------------------------------------------------------------------------
# Tokenising and batching
# --------------------------------------------------------------------------------------------

IGNORE_INDEX = -100


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (chat templates render their own,
    and lm-eval encodes causal-LM requests this way too)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids exactly as lm-eval's causal ``_encode_pair``: trailing
    whitespace of the context moves to the continuation, the whole is encoded at once and the
    continuation is its tail after the context's own encoding. For scorers."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


class TokenizedExample(dict):
    """``{"input_ids", "attention_mask", "labels"}`` (lists of ints), plus attributes
    ``truncated`` (bool), ``task`` and ``source`` that stay out of the dict, so that any
    collator sees only the three keys."""

    truncated: bool = False
    task: str = ""
    source: str = ""


def _split_ids(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids and target ids whose concatenation is the tokenisation of ``prompt+target``.

    When the tokenizer merges across the boundary (the prompt's ids are not a prefix of the
    whole's), the target is encoded on its own, so prompt text is never supervised.
    """
    prompt_ids = _encode(tokenizer, prompt)
    whole = _encode(tokenizer, prompt + target)
    if whole[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, whole[len(prompt_ids) :]
    return prompt_ids, _encode(tokenizer, target)


def tokenize_example(example: TrainingExample, tokenizer: Any, max_length: int) -> TokenizedExample:
    """Prompt ids + target ids + EOS; labels are -100 on the prompt and the ids on target + EOS.

    Over ``max_length``: the prompt is cut from the left first (its end, next to the target,
    is kept); if target + EOS alone is still too long, the prompt is dropped and the target's
    tail is cut (no EOS then, since the target no longer ends there). ``result.truncated``
    says whether anything was cut.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, not {max_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token before tokenising.")
    prompt_ids, target_ids = _split_ids(tokenizer, example.prompt, example.target)
    target_ids = target_ids + [eos]
    truncated = len(prompt_ids) + len(target_ids) > max_length
    if truncated:
        room = max_length - len(target_ids)
        if room >= 0:
            prompt_ids = prompt_ids[len(prompt_ids) - room :] if room else []
        else:
            prompt_ids, target_ids = [], target_ids[:max_length]
    out = TokenizedExample(
        input_ids=prompt_ids + target_ids,
        attention_mask=[1] * (len(prompt_ids) + len(target_ids)),
        labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids,
    )
    out.truncated, out.task, out.source = truncated, example.task, example.source
    return out


@dataclass
class TokenizedTask:
    """Tokenised examples and how many of them were truncated (none is ever dropped)."""

    features: list[TokenizedExample]
    truncated: int
    truncated_sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.features)

    def summary(self) -> str:
        """E.g. ``"3 of 400 examples truncated to fit max_length"``."""
        return f"{self.truncated} of {len(self.features)} examples truncated to fit max_length"


def tokenize_examples(examples: Sequence[TrainingExample], tokenizer: Any, max_length: int) -> TokenizedTask:
    """Tokenise every example (see :func:`tokenize_example`) and count truncations."""
    features = [tokenize_example(e, tokenizer, max_length) for e in examples]
    cut = [f.source for f in features if f.truncated]
    return TokenizedTask(features, len(cut), cut)


def collate(batch: Sequence[dict], pad_token_id: int) -> dict:
    """Right-pad a batch for a causal LM: ``input_ids`` with ``pad_token_id``, ``attention_mask``
    with 0, ``labels`` with -100. Returns LongTensors of shape (batch, longest)."""
    import torch

    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token).")
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(item["input_ids"]) for item in batch)

    def pad(key: str, value: int) -> "torch.Tensor":
        rows = [list(item[key]) + [value] * (width - len(item[key])) for item in batch]
        return torch.tensor(rows, dtype=torch.long)

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", IGNORE_INDEX),
    }


# --------------------------------------------------------------------------------------------
# Mixing tasks and carving splits
# --------------------------------------------------------------------------------------------


def _cycled(items: list, n: int, rng: random.Random) -> list:
    """``n`` items drawn by walking through fresh shuffles of ``items``: every item is used
    before any repeats (sampling with replacement, but with the least possible imbalance)."""
    out: list = []
    while len(out) < n:
        order = list(items)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def mix_tasks(
    per_task_examples: dict[str, list], mode: str = "proportional", seed: int = 0, size: int | None = None
) -> list[tuple[str, Any]]:
    """One shuffled training stream of ``(task_name, example)`` pairs, deterministic per seed.

    ``proportional``: every example once (``size`` given: that many, by walking through
    repeated shuffles of the whole pool, so proportions hold). ``uniform``: the same number per
    task (``size // n_tasks``, the remainder to the first tasks by name; default the largest
    task's size), smaller tasks repeated, drawn by cycling through seeded shuffles.
    Tasks are visited in sorted name order, so the dict's order does not matter.
    """
    names = sorted(per_task_examples)
    empty = [n for n in names if not per_task_examples[n]]
    if not names or empty:
        raise ValueError(f"mix_tasks needs non-empty tasks (empty: {', '.join(empty) or 'no tasks given'})")
    if size is not None and size < 1:
        raise ValueError(f"size must be positive, not {size}")
    rng = random.Random(seed)
    if mode == "proportional":
        pool = [(n, e) for n in names for e in per_task_examples[n]]
        return _cycled(pool, size if size is not None else len(pool), rng)
    if mode == "uniform":
        if size is None:
            counts = [max(len(per_task_examples[n]) for n in names)] * len(names)
        else:
            base, extra = divmod(size, len(names))
            counts = [base + (k < extra) for k in range(len(names))]
        stream = [(n, e) for n, c in zip(names, counts) for e in _cycled(per_task_examples[n], c, rng)]
        rng.shuffle(stream)
        return stream
    raise ValueError(f"mode must be 'proportional' or 'uniform', not {mode!r}")


def split_records(
    task: Task, eval_fraction: float | None = None, eval_size: int | None = None, seed: int = 0
) -> tuple[Task, Task]:
    """A fixed, seeded ``(train, eval)`` split of one task's records (both keep the task's
    name and the records' file order). Give exactly one of ``eval_fraction`` (rounded, at least
    one record each side) or ``eval_size``."""
    n = len(task.records)
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction and eval_size")
    if n < 2:
        raise DataError(f"task {task.name!r} has {n} record(s); a train/eval split needs at least two.")
    if eval_fraction is not None:
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, not {eval_fraction}")
        k = min(max(round(n * eval_fraction), 1), n - 1)
    else:
        if not 0 < eval_size < n:
            raise ValueError(f"eval_size must be between 1 and {n - 1} for task {task.name!r}, not {eval_size}")
        k = eval_size
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [r for i, r in enumerate(task.records) if i not in held]
    evals = [r for i, r in enumerate(task.records) if i in held]
    return Task(task.name, train, list(task.files)), Task(task.name, evals, list(task.files))
