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

The package, by job: ``records`` (reading JSON files, validation), ``tables`` (what ``datasets``
reads: parquet / arrow / CSV, saved folders, the hub; column mapping), ``sources`` (every form of
a ``--data`` entry and its splits), ``choices`` (multiple-choice
parsing), ``prompts`` (prompts, items, examples), ``batches`` (tokenising, collating, mixing);
``types`` holds the shared vocabulary. Everything public is importable from ``mor.data``.
"""

from .batches import (IGNORE_INDEX, TokenizedExample, TokenizedTask, collate, mix_tasks, split_records,
                      tokenize_example, tokenize_examples)
from .choices import ParsedChoice, parse_multiple_choice
from .prompts import (DEFAULT_TEMPLATE, LABEL_CONTINUATION, TARGET_DELIMITER, chat_prompt, instruction_prompt,
                      multiple_choice_items, task_prompts, text_prompt, training_examples)
from .records import (DATA_SUFFIXES, SPLIT_NAMES, Record, Task, has_split, load_task_records, load_tasks, task_name,
                      validate_record)
from .sources import DataSource, load_eval_tasks, load_hub_task
from .tables import RECORD_FIELDS, parse_columns
from .types import DataError, MultipleChoiceItem, TrainingExample

__all__ = [
    "DataError", "MultipleChoiceItem", "TrainingExample", "Record", "Task", "ParsedChoice", "TokenizedExample",
    "TokenizedTask", "DEFAULT_TEMPLATE", "LABEL_CONTINUATION", "TARGET_DELIMITER", "SPLIT_NAMES", "DATA_SUFFIXES",
    "IGNORE_INDEX", "DataSource", "RECORD_FIELDS", "parse_columns", "task_name", "has_split", "load_eval_tasks", "load_task_records", "load_tasks", "load_hub_task", "validate_record",
    "parse_multiple_choice", "text_prompt", "instruction_prompt", "chat_prompt", "multiple_choice_items",
    "training_examples", "task_prompts", "tokenize_example", "tokenize_examples", "collate", "mix_tasks", "split_records",
]
