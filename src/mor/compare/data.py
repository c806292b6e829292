"""The fixed, seeded carve of a plan's data into train / validation / test (and held-out) records.

Per trained task: the test records are ``test_per_task`` of its test split (all when smaller); the
training pool is its train split, or what the test carve left when it has none; ``train_per_task``
records of the pool are trained on, and ``validation_per_task`` of the rest are the validation
split on which learning rates are chosen -- never the test records, never a trained record.
Held-out tasks give test records only. The same plan carves the same records on every machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data import Task, split_records
from ..data.sources import DataSource
from ..data.builtin import TASK_NAMES, write_builtin_suite
from ..safety import atomic_write_text
from .plan import BUILTIN_PREFIX, Plan, PlanError, key_hash


@dataclass
class Splits:
    train: dict[str, Task] = field(default_factory=dict)
    validation: dict[str, Task] = field(default_factory=dict)
    test: dict[str, Task] = field(default_factory=dict)
    heldout: dict[str, Task] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def trained(self) -> list[str]:
        return list(self.train)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {t: {s: len(getattr(self, s)[t]) for s in ("train", "validation", "test", "heldout")
                    if t in getattr(self, s)} for t in [*self.train, *self.heldout]}


def _take(task: Task, size: int, seed: int) -> tuple[Task, Task]:
    """(rest, ``size`` records drawn with ``seed``); all of them when the task is not larger."""
    if size < len(task):
        return split_records(task, eval_size=size, seed=seed)
    return Task(task.name, [], list(task.files)), task


def _builtin(source: str, builtin_folder: Path, plan: Plan) -> DataSource:
    """The built-in task ``builtin:<name>``, generated (train and test) under ``builtin_folder``."""
    name = source[len(BUILTIN_PREFIX):]
    if name not in TASK_NAMES:
        raise PlanError(f"data: {source}: no such built-in task; choose from {', '.join(TASK_NAMES)}")
    folder = builtin_folder / name
    if not (folder / "train.json").is_file():
        d = plan.data
        write_builtin_suite(builtin_folder, seed=d.split_seed, train_size=d.train_per_task + d.validation_per_task,
                            eval_size=max(d.test_per_task, d.heldout_per_task), tasks=[name])
    return DataSource(folder)


def carve(plan: Plan, work: Path) -> Splits:
    """The plan's splits (built-in tasks are generated under ``work``). Any form ``--data`` reads
    (mor.data.sources), with the plan's ``data.columns``."""
    d, out = plan.data, Splits()
    builtin_folder = work / f"builtin_{key_hash(d.key())}"
    for entry in d.train + d.heldout:
        source = d.source(entry, plan.folder)
        data = _builtin(source, builtin_folder, plan) if source.startswith(BUILTIN_PREFIX) else \
            DataSource(source, columns=d.columns)
        heldout = entry in d.heldout
        size = d.heldout_per_task if heldout else d.test_per_task
        splits = data.splits or []
        own_train = "train" in splits and "test" in splits
        # the test records: its test split, else carved first from its train split or undivided records
        test_all = data.load("test" if "test" in splits else "train" if "train" in splits else None)
        name = Path(entry.removeprefix(BUILTIN_PREFIX).removeprefix("hub:")).name
        rest, test = _take(test_all, size, d.split_seed)
        test.name = rest.name = name
        (out.heldout if heldout else out.test)[name] = test
        if heldout:
            out.provenance[name] = f"held out (never trained): {len(test)} of {len(test_all)} test records"
            continue
        pool = data.load("train") if own_train else rest
        pool.name = name
        leftover, train = _take(pool, d.train_per_task, d.split_seed + 2)
        if not train.records:
            raise PlanError(f"data: {entry}: no records left to train on after the test carve; lower "
                            "data.test_per_task or give the task a train split")
        out.train[name] = train
        where = "its train split" if own_train else \
            f"the rest of its {'test split' if 'test' in splits else 'records'} (no train/test pair; seed {d.split_seed})"
        text = f"{len(train)} train from {where}"
        if d.validation_per_task:
            if not leftover.records:
                raise PlanError(f"data: {entry}: the training pool has {len(pool)} records, all trained on: none "
                                "are left for validation; lower data.train_per_task or data.validation_per_task")
            out.validation[name] = _take(leftover, d.validation_per_task, d.split_seed + 3)[1]
            text += f"; {len(out.validation[name])} validation from the rest of the pool"
        out.provenance[name] = text + f"; {len(test)} test of {len(test_all)}"
    return out


def write_train_folders(splits: Splits, folder: Path) -> list[str]:
    """``folder/<task>/train.json`` with each task's train records (what a training run reads)."""
    paths = []
    for name, task in splits.train.items():
        dest = folder / name / "train.json"
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dest, json.dumps([r.data for r in task.records], ensure_ascii=False) + "\n")
        paths.append(str(dest.parent))
    return paths
