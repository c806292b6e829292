"""Prompts, multiple-choice items (what evaluation scores) and training examples (what training
learns) from validated records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SettingsError
from .choices import ParsedChoice, parse_multiple_choice
from .records import Record, Task
from .types import DataError, MultipleChoiceItem, TrainingExample



DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
"""Prompt for answer-text scoring (lm-eval's arc/piqa/openbookqa form)."""

LABEL_CONTINUATION = "the correct answer is {label}"
"""Continuation scored for each label in label scoring (the LLM-Adapters output format)."""

TARGET_DELIMITER = " "
"""Put between context and option text in text scoring, as lm-eval's ``target_delimiter``."""


def text_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """Fill ``{question}`` in ``template`` (a plain replacement, so other braces are literal)."""
    if "{question}" not in template:
        raise SettingsError(f"template {template!r} has no {{question}} placeholder; add one.")
    return template.replace("{question}", question)


def _has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def read_chat_template(value: str) -> str:
    """The Jinja chat template ``--chat-template`` gives: the text of the file it names, or itself."""
    path = Path(value)
    if len(value) < 4096 and "\n" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise SettingsError(f"--chat-template {value}: no such file, and not a Jinja template (it has no {{{{ or {{%); "
                           "give a template file or its text")


def _render_chat(messages: list[dict], tokenizer: Any, generation_prompt: bool = True) -> str:
    """Messages rendered with the tokenizer's chat template (and a generation prompt); without a
    template, each turn as ``"{Role}: {content}\\n\\n"`` (and ``"Assistant: "``)."""
    if _has_chat_template(tokenizer):
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # a template that cannot render these turns (jinja's errors): name it
            raise DataError(f"the chat template cannot render these messages ({type(err).__name__}: {err}); "
                            "give --chat-template with one that can, or --no-chat-template") from None
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return turns + ("Assistant: " if generation_prompt else "")


def instruction_prompt(instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """Prompt for an instruction (+ input): one user turn through the chat template when the
    tokenizer has one, else ``"{instruction}\\n\\n{input}\\n\\n"`` (``"{instruction}\\n\\n"``
    when the input is empty)."""
    user = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    if not _has_chat_template(tokenizer):
        return f"{user}\n\n"
    return _render_chat([{"role": "user", "content": user}], tokenizer)


def chat_prompt(messages: list[dict], tokenizer: Any = None) -> str:
    """Prompt for a chat record: all messages but the final assistant reply, rendered."""
    return _render_chat(messages[:-1], tokenizer)


def assistant_spans(messages: list[dict], tokenizer: Any = None) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` character spans, in :func:`chat_prompt`'s text, of every assistant turn
    before the last: each turn as the template renders it (its content and end-of-turn marker),
    found as the text the turn adds to the conversation before it.

    Raises :class:`DataError` when the template renders earlier turns differently once later
    turns follow (the turns could not be located; training them would supervise other text)."""
    prompt = chat_prompt(messages, tokenizer)
    spans = []
    for i, message in enumerate(messages[:-1]):
        if message["role"] != "assistant":
            continue
        before = _render_chat(messages[:i], tokenizer)
        through = _render_chat(messages[: i + 1], tokenizer, generation_prompt=False)
        if not (through.startswith(before) and prompt.startswith(through)):
            raise DataError(f"assistant turn {i} cannot be located for the loss: the chat template renders a "
                            "conversation differently from the turns before it plus the new turn; give "
                            "--chat-template with a template that renders turn by turn, or --no-chat-template")
        spans.append((len(before), len(through)))
    return tuple(spans)


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
    items = _build_each(task.records, build, skipped)
    if not items and skipped is not None:
        raise DataError(f"{task.name}: no record is multiple choice ({len(skipped or [])} skipped; first: "
                        f"{(skipped or ['-'])[0]}); eval needs records with choices.")
    return items


def _output_example(task: str, record: Record, tokenizer: Any) -> TrainingExample:
    data = record.data
    prompt = _record_prompt(record, tokenizer)
    if record.kind == "instruction":
        target = data["output"]
    elif record.kind == "chat":  # every assistant turn is learnt: the last as target, earlier ones in the prompt
        target = data["messages"][-1]["content"]
        return TrainingExample(task, prompt, target, record.source, assistant_spans(data["messages"], tokenizer))
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
    A chat record's earlier assistant turns are learnt too (``trained_spans`` of the prompt):
    assistant-only loss on every turn.

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
    return _build_each(task.records, build, skipped)


def _build_each(records: list[Record], build, skipped: list[str] | None) -> list:
    """``build(record)`` for every record; a DataError raises, or with ``skipped`` (--skip-bad)
    is recorded there as "file:line: reason" and the record left out."""
    built = []
    for record in records:
        try:
            built.append(build(record))
        except DataError as err:
            if skipped is None:
                raise
            skipped.append(str(err))
    return built


def task_prompts(task: Task, tokenizer: Any, limit: int | None = None) -> list[str]:
    """The prompts of a task's first ``limit`` training examples (all when None): the text whose
    routing is measured for a routing profile, a merge or a figure."""
    return [example.prompt for example in training_examples(task, target="output", tokenizer=tokenizer)[:limit]]
