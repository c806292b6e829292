"""Results of a scoring: per-task and average accuracy with lm-eval's standard errors
(:func:`accuracy_table`), every record's scores for paired comparisons (:func:`record_scores`),
the printed table (:func:`format_table`) and the results file (:func:`write_results_json`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..runtime.report import markdown_table
from ..safety import atomic_write_text
from .loglik import ItemScore

SCORING = (
    "answer-text log-likelihood, lm-eval multiple_choice "
    "(acc: sum of log-probs; acc_norm: log-prob per character)"
)
#: How each scoring of ``mor.data.multiple_choice_items`` is described in result tables.
SCORING_NAMES = {
    "text": SCORING,
    "label": "label log-likelihood, LLM-Adapters format (log P('the correct answer is <label>' | prompt))",
}


def _stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def accuracy_table(scores: Sequence[ItemScore], scoring: str = SCORING) -> dict[str, Any]:
    """Per-task and average accuracy.

    Returns ``{"scoring": SCORING, "tasks": {task: row}, "average": row}`` where a task row is
    ``{"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance"}`` (``chance`` = mean
    of 1/number of choices) and the average row is the unweighted mean over tasks (``n`` is
    the total, ``tasks`` the number of tasks, stderrs combined as sqrt(sum se^2) / tasks).
    """
    by_task: dict[str, list[ItemScore]] = {}
    for s in scores:
        by_task.setdefault(s.item.task, []).append(s)
    tasks: dict[str, dict[str, Any]] = {}
    for task, rows in by_task.items():
        acc = [1.0 if s.correct else 0.0 for s in rows]
        acc_norm = [1.0 if s.correct_norm else 0.0 for s in rows]
        tasks[task] = {
            "n": len(rows),
            "acc": sum(acc) / len(rows),
            "acc_stderr": _stderr(acc),
            "acc_norm": sum(acc_norm) / len(rows),
            "acc_norm_stderr": _stderr(acc_norm),
            "chance": sum(1.0 / len(s.item.continuations) for s in rows) / len(rows),
        }
    average: dict[str, Any] = {"n": sum(t["n"] for t in tasks.values()), "tasks": len(tasks)}
    for key in ("acc", "acc_norm", "chance"):
        average[key] = sum(t[key] for t in tasks.values()) / len(tasks) if tasks else None
    for key in ("acc_stderr", "acc_norm_stderr"):
        ses = [t[key] for t in tasks.values()]
        average[key] = math.sqrt(sum(se * se for se in ses)) / len(ses) if ses and None not in ses else None
    return {"scoring": scoring, "tasks": tasks, "average": average}


def _fmt(value, stderr=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}"
    if stderr is not None:
        text += f" ± {stderr:.4f}"
    return text


def format_table(results: Mapping[str, Any], stderr: bool = True) -> str:
    """A Markdown table (task, n, acc, acc_norm, chance, plus an "average" row), preceded by a
    line naming the scoring, for logs and reports."""
    header = ["task", "n", "acc", "acc_norm", "chance"]
    rows = []
    named = list(results.get("tasks", {}).items()) + [("average", results.get("average", {}))]
    for name, row in named:
        if not row:
            continue
        rows.append(
            [
                str(name),
                str(row.get("n", "")),
                _fmt(row.get("acc"), row.get("acc_stderr") if stderr else None),
                _fmt(row.get("acc_norm"), row.get("acc_norm_stderr") if stderr else None),
                _fmt(row.get("chance")),
            ]
        )
    return f"Scoring: {results.get('scoring', SCORING)}\n\n" + markdown_table(header, rows)


def write_results_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` (e.g. from :func:`accuracy_table`) as indented JSON; return the path."""
    return atomic_write_text(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def results_of(scores: Sequence[ItemScore], scoring: str, order: Sequence[str] = (),
               log_samples: bool = False) -> dict[str, Any]:
    """:func:`accuracy_table` of ``scores`` with tasks in ``order``, and optionally every record."""
    results = accuracy_table(scores, scoring)
    order = [t for t in order if t in results["tasks"]]
    results["tasks"] = {t: results["tasks"][t] for t in order + [t for t in results["tasks"] if t not in order]}
    if log_samples:
        results["samples"] = record_scores(scores)
    return results


def record_scores(scores: Sequence[ItemScore]) -> dict[str, list[dict[str, Any]]]:
    """Per task, every record's scores in order (index, gold, preds, log-likelihoods, acc, acc_norm):
    what a paired comparison of two runs on the same records needs."""
    samples: dict[str, list[dict[str, Any]]] = {}
    for score in scores:
        rows = samples.setdefault(score.item.task, [])
        rows.append({"index": len(rows), **score.to_dict(), "acc": float(score.correct),
                     "acc_norm": float(score.correct_norm)})
    return samples
