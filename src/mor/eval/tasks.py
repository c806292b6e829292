"""Accuracy of a model on a list of tasks: as it is (:func:`evaluate_model`), or with its MoR
adapter merged under fixed routing, one merged model per task (:func:`evaluate_merged`)."""

from __future__ import annotations

import copy
from typing import Union

from ..data import DEFAULT_TEMPLATE, Task, multiple_choice_items, task_prompts
from ..routing import RoutingProfile
from .scoring import SCORING_NAMES, evaluate_tasks, results_of, score_tasks


def task_items(tasks: list[Task], scoring: str, tokenizer, template: str = DEFAULT_TEMPLATE,
               skip_bad: bool = False) -> dict[str, list]:
    """``{task name: multiple-choice items}`` for ``scoring`` ("label" or "text")."""
    return {t.name: multiple_choice_items(t, scoring=scoring, tokenizer=tokenizer, template=template,
                                          skipped=t.skipped if skip_bad else None) for t in tasks}


def evaluate_model(model, tokenizer, tasks: list[Task], scoring: str, batch_size: int = 16,
                   limit: int | None = None, template: str = DEFAULT_TEMPLATE, skip_bad: bool = False,
                   log_samples: bool = False) -> dict:
    """Zero-shot multiple-choice accuracy per task (see mor.eval.scoring)."""
    items = task_items(tasks, scoring, tokenizer, template, skip_bad)
    return evaluate_tasks(model, tokenizer, items, batch_size=batch_size, limit=limit, scoring=scoring,
                          log_samples=log_samples)


def evaluate_merged(model, tokenizer, tasks: list[Task], scoring: str, routing: Union[str, None] = None,
                    batch_size: int = 16, limit: int | None = None, template: str = DEFAULT_TEMPLATE,
                    skip_bad: bool = False, log_samples: bool = False) -> dict:
    """Accuracy per task of the MoR ``model`` merged with fixed routing: one merged copy per task,
    with ``routing`` (a saved routing_profile.json) or else that task's measured routing."""
    items = task_items(tasks, scoring, tokenizer, template, skip_bad)
    scores = []
    for task in tasks:
        profile = (RoutingProfile.load(routing) if routing
                   else model.measure_routing(task_prompts(task, tokenizer, limit), tokenizer=tokenizer))
        merged = copy.deepcopy(model).merge_and_unload(profile)
        scores += score_tasks(merged, tokenizer, {task.name: items[task.name]}, batch_size, limit)
    return results_of(scores, SCORING_NAMES[scoring] + "; merged with fixed routing, one profile per task",
                      order=[t.name for t in tasks], log_samples=log_samples)
