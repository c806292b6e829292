"""Zero-shot multiple-choice scoring by log-likelihood, matching lm-evaluation-harness's ``HFLM``.

Choice ``i`` of a :class:`~mor.data.MultipleChoiceItem` scores ``log P(continuations[i] | contexts[i])``
in float32. ``acc`` = argmax of the summed log-probabilities; ``acc_norm`` = argmax of that sum
divided by the choice's length in characters (:func:`choice_length`). Tokenisation
(:func:`encode_pair`), left truncation and ``max_length`` (:func:`resolve_max_length`) follow
HFLM, so the numbers are lm-eval's up to float rounding. Each distinct context runs once and its
KV cache serves all its candidates when that saves enough tokens (``reuse_prefix``).

The pieces, each in its module (every public name is importable from here too):

    encoding.py  tokenisation as HFLM: encode_pair, choice_length, resolve_max_length
    loglik.py    score_items: an ItemScore (log-likelihood per choice) per item
    results.py   accuracy_table, record_scores, format_table, write_results_json
    scoring.py   score_tasks / evaluate_tasks: the items of every task, scored and tabled

Each rule and the prefix reuse in full: docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..data import MultipleChoiceItem
from .encoding import DEFAULT_MAX_LENGTH, TOKENIZER_INFINITY, choice_length, encode_pair, resolve_max_length
from .loglik import PREFIX_REUSE_MIN_SAVING, ItemScore, score_items
from .results import (SCORING, SCORING_NAMES, accuracy_table, format_table, record_scores, results_of,
                      write_results_json)

__all__ = [
    "ItemScore",
    "score_items",
    "score_tasks",
    "accuracy_table",
    "format_table",
    "write_results_json",
    "evaluate_tasks",
    "results_of",
    "record_scores",
    "encode_pair",
    "choice_length",
    "resolve_max_length",
    "SCORING",
    "SCORING_NAMES",
    "DEFAULT_MAX_LENGTH",
    "TOKENIZER_INFINITY",
    "PREFIX_REUSE_MIN_SAVING",
]


def score_tasks(
    model,
    tokenizer,
    tasks_items: Mapping[str, Sequence[MultipleChoiceItem]],
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    **score_kwargs,
) -> list[ItemScore]:
    """Scores of the first ``limit`` items (all when ``None``) of every task, in task order."""
    items: list[MultipleChoiceItem] = []
    for task_items in tasks_items.values():
        items.extend(list(task_items)[:limit] if limit is not None else list(task_items))
    return score_items(model, tokenizer, items, batch_size=batch_size, progress=progress, **score_kwargs)


def evaluate_tasks(
    model,
    tokenizer,
    tasks_items: Mapping[str, Sequence[MultipleChoiceItem]],
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    scoring: str = "text",
    log_samples: bool = False,
    **score_kwargs,
) -> dict[str, Any]:
    """Score the first ``limit`` items (all when ``None``) of every task and return
    :func:`accuracy_table`'s results (tasks keep the mapping's order); ``scoring`` ("text",
    "label" or free text) names how the items were built, for the table's heading.
    ``log_samples`` adds every record's scores under "samples" (lm-eval's ``--log_samples``)."""
    scores = score_tasks(model, tokenizer, tasks_items, batch_size, limit, progress, **score_kwargs)
    return results_of(scores, SCORING_NAMES.get(scoring, scoring), order=list(tasks_items), log_samples=log_samples)
