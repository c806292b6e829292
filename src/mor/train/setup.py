"""Setting up a run: its data (task files, the built-in suite, hub datasets; the tokenised, mixed
training stream; the routing probes) and its model (the frozen base's dtype, the router's scale)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import torch

from ..data import (DataError, DataSource, Task, collate, load_eval_tasks, mix_tasks, split_records, tokenize_examples,
                    training_examples)
from ..data.prompts import read_chat_template
from ..layer import find_routers
from ..errors import SettingsError
from .config import TrainConfig

logger = logging.getLogger("mor")


# -- data ----------------------------------------------------------------------------------------

def load_train_and_eval_tasks(cfg: TrainConfig) -> tuple[list[Task], list[Task]]:
    """Training tasks from ``cfg.data`` (or the built-in suite) and their eval tasks.

    An entry with named splits gives its ``data_split`` to train on and its ``eval_split`` (when
    it has one) to evaluate; an undivided one is all training data, unless ``holdout`` carves a
    seeded eval split out of it (see :class:`mor.data.DataSource`).
    """
    specs = list(cfg.data) or _builtin_paths(cfg)
    columns = cfg.columns if cfg.data else None  # the built-in suite's records need no mapping
    train_tasks, eval_tasks = [], []
    for spec in specs:
        task, held = DataSource(spec, columns, cfg.skip_bad).train_and_eval(cfg.data_split, cfg.eval_split)
        if held is None and cfg.holdout:
            task, held = split_records(task, eval_size=cfg.holdout, seed=cfg.seed)
        train_tasks.append(task)
        eval_tasks.extend([held] if held is not None else [])
    names = [t.name for t in train_tasks]
    if len(set(names)) != len(names):
        raise SettingsError(f"two --data entries have the same task name: {names}; rename one of them")
    eval_tasks.extend(load_eval_tasks(cfg.eval_data, cfg.skip_bad, cfg.columns, cfg.eval_split))
    return train_tasks, eval_tasks


def choose_chat_template(tokenizer, cfg: TrainConfig) -> None:
    """The run's chat template on ``tokenizer`` (saved with the adapter): ``--chat-template``'s,
    none with ``--no-chat-template``, else the tokenizer's own."""
    if not cfg.use_chat_template:
        tokenizer.chat_template = None
    elif cfg.chat_template is not None:
        tokenizer.chat_template = read_chat_template(cfg.chat_template)


def builtin_data_folder(output: Union[str, Path]) -> Path:
    """Where a run on the built-in suite writes its generated tasks: a folder of the run's own,
    of which only the built-in tasks' train/test files are ever read."""
    return Path(output) / "builtin-data"


def _builtin_paths(cfg: TrainConfig) -> list[Path]:
    from ..data.builtin import DEFAULT_TRAIN_SIZE, TASK_NAMES, write_builtin_suite

    folder = builtin_data_folder(cfg.output)
    write_builtin_suite(folder, seed=cfg.seed, train_size=cfg.builtin_train_size or DEFAULT_TRAIN_SIZE,
                        eval_size=cfg.builtin_eval_size)
    return [folder / name for name in sorted(TASK_NAMES)]


def build_train_dataset(tasks: list[Task], tokenizer, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Tokenised, mixed training stream and a report (examples per task, truncations, skips)."""
    per_task = {t.name: training_examples(t, target=cfg.target, tokenizer=tokenizer,
                                          skipped=t.skipped if cfg.skip_bad else None) for t in tasks}
    empty = [name for name, examples in per_task.items() if not examples]
    if empty:
        raise DataError(f"task {empty[0]}: no record gives a --target {cfg.target} example (all skipped, e.g. "
                        f"{next(t.skipped[0] for t in tasks if t.name == empty[0])}).")
    stream = [example for _, example in mix_tasks(per_task, mode=cfg.mix, seed=cfg.seed)]
    tokenized = tokenize_examples(stream, tokenizer, cfg.max_length)
    report = {
        "tasks": {name: len(examples) for name, examples in per_task.items()},
        "examples": len(tokenized),
        "truncated": tokenized.truncated,
        "skipped": {t.name: len(t.skipped) for t in tasks if t.skipped},
    }
    if tokenized.truncated:
        logger.warning("%s (max_length=%d); e.g. %s", tokenized.summary(), cfg.max_length,
                       tokenized.truncated_sources[:3])
    for task in tasks:
        if task.skipped:
            logger.warning("task %s: skipped %d bad records (--skip-bad), e.g. %s", task.name, len(task.skipped),
                           task.skipped[:2])
    return [dict(f) for f in tokenized.features], report


def routing_probes(tasks: list[Task], tokenizer, cfg: TrainConfig) -> dict[str, list[dict]]:
    """A fixed probe set for the routing statistics: the first ``routing_probe_size`` training
    examples (prompt and target) of every task, tokenised and right-padded."""
    probes = {}
    for task in tasks:
        examples = training_examples(task, target=cfg.target, tokenizer=tokenizer,
                                     skipped=[] if cfg.skip_bad else None)[: cfg.routing_probe_size]
        features = list(tokenize_examples(examples, tokenizer, cfg.max_length).features)
        if features:
            batch = collate(features, tokenizer.pad_token_id)
            probes[task.name] = [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}]
    return probes


# -- model ---------------------------------------------------------------------------------------


def resolve_base_dtype(name: str) -> torch.dtype:
    """torch dtype of the frozen base for ``--base-dtype``: fp32, bf16, or auto (bf16 on a GPU
    with bf16, or a CPU with native bf16 matmuls -- AVX512-BF16 or AMX -- else fp32)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise SettingsError(f"base_dtype={name!r}: choose fp32, bf16 or auto")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32


def cast_frozen_base(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen (requires_grad=False) floating parameter to ``dtype`` in place; the
    trainable adapter parameters keep their dtype. Returns how many parameters were cast."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def scale_router_init(model: torch.nn.Module, scale: float) -> int:
    """Multiply every router weight by ``scale`` (logits scale alike: a temperature of 1/scale at
    init). Returns how many router tensors were scaled."""
    scaled = 0
    with torch.no_grad():
        for router in find_routers(model).values():
            for param in router.parameters():
                param.mul_(scale)
                scaled += 1
    return scaled
