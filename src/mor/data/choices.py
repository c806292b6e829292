"""Multiple-choice parsing: the options and the gold answer of a record (LLM-Adapters
``Answer format: answer1/answer2`` instructions, or ``{question, choices, label}``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .types import DataError


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


def _check_choice(record: dict) -> None:
    if not _nonempty_str(record.get("question")):
        raise DataError('"question" must be non-empty text.')
    if "choices" not in record:
        raise DataError('missing field "choices": add the list of option texts.')
    _check_choices(record)
    if "label" not in record and "answer" not in record:
        raise DataError('missing field "label": add the 0-based index of the correct choice.')



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
