"""The data's vocabulary: what a task turns into (multiple-choice items, training examples) and its error."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError  # noqa: F401  (the data's error, re-exported: mor.data.DataError)


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
    """One supervised example: the loss is taken on ``target`` and on the ``trained_spans`` of the
    prompt (a multi-turn chat's earlier assistant turns), nothing else."""

    task: str
    prompt: str  # fully rendered prompt text (chat template already applied where used)
    target: str  # response text; the tokeniser appends EOS
    source: str = ""
    trained_spans: tuple = ()  # (start, end) character spans of ``prompt`` learnt too: earlier assistant turns
