"""Tokenising training examples (loss on the target only), collating batches, mixing tasks and
carving seeded evaluation splits."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from .records import Task
from .types import DataError, TrainingExample



IGNORE_INDEX = -100


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (chat templates render their own,
    and lm-eval encodes causal-LM requests this way too)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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


def _prompt_labels(tokenizer: Any, example: TrainingExample, prompt_ids: list[int]) -> list[int]:
    """Labels of the prompt's tokens: -100, except the tokens of its ``trained_spans`` (a chat's
    earlier assistant turns): every token whose characters overlap a span, which is what
    transformers' ``return_assistant_tokens_mask`` marks (the tokens from the span's first
    character to its last)."""
    labels = [IGNORE_INDEX] * len(prompt_ids)
    if not example.trained_spans:
        return labels
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("multi-turn chat records need a fast tokenizer (offsets locate the earlier assistant turns)")
    encoding = tokenizer(example.prompt, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoding["input_ids"]) != prompt_ids:  # the prompt's ids are its own encoding (see _split_ids)
        raise ValueError(f"{example.source}: the prompt's tokens changed between two encodings")
    for k, (first, last) in enumerate(encoding["offset_mapping"]):
        if any(first < end and last > start for start, end in example.trained_spans):
            labels[k] = prompt_ids[k]
    return labels


def tokenize_example(example: TrainingExample, tokenizer: Any, max_length: int) -> TokenizedExample:
    """Prompt ids + target ids + EOS; labels are the ids on target + EOS and on the prompt's
    ``trained_spans`` (a chat's earlier assistant turns), -100 on the rest of the prompt.

    Over ``max_length``: the prompt is cut from the left first (its end, next to the target,
    is kept); if target + EOS alone is still too long, the prompt is dropped and the target's
    tail is cut (no EOS then, since the target no longer ends there). ``result.truncated``
    says whether anything was cut.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, not {max_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set tokenizer.eos_token before tokenising.")
    prompt_ids, target_ids = _split_ids(tokenizer, example.prompt, example.target)
    prompt_labels = _prompt_labels(tokenizer, example, prompt_ids)
    target_ids = target_ids + [eos]
    truncated = len(prompt_ids) + len(target_ids) > max_length
    if truncated:
        room = max_length - len(target_ids)
        if room >= 0:
            prompt_ids = prompt_ids[len(prompt_ids) - room :] if room else []
            prompt_labels = prompt_labels[len(prompt_labels) - room :] if room else []
        else:
            prompt_ids, prompt_labels, target_ids = [], [], target_ids[:max_length]
    out = TokenizedExample(
        input_ids=prompt_ids + target_ids,
        attention_mask=[1] * (len(prompt_ids) + len(target_ids)),
        labels=prompt_labels + target_ids,
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
    with 0, ``labels`` with -100. Returns LongTensors of shape (batch, longest).

    What ``DataCollatorForSeq2Seq(label_pad_token_id=-100)`` does, except that it pads on the
    right whatever the tokenizer's ``padding_side``: with left padding and no position ids the
    training positions would shift by the padding."""
    import torch

    if pad_token_id is None:
        raise DataError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token).")
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
        raise DataError(f"mix_tasks needs non-empty tasks (empty: {', '.join(empty) or 'no tasks given'})")
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
            raise DataError(f"eval_fraction must be between 0 and 1, not {eval_fraction}")
        k = min(max(round(n * eval_fraction), 1), n - 1)
    else:
        if not 0 < eval_size < n:
            raise DataError(f"eval_size must be between 1 and {n - 1} for task {task.name!r}, not {eval_size}")
        k = eval_size
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [r for i, r in enumerate(task.records) if i not in held]
    evals = [r for i, r in enumerate(task.records) if i in held]
    return Task(task.name, train, list(task.files)), Task(task.name, evals, list(task.files))
