"""Every form a ``--data`` entry takes, and the split of it to train on or to evaluate:

* a JSON list / JSON Lines / parquet / arrow / CSV file: one undivided task;
* a folder of such files: its ``<split>`` files when it has them (``train.json``, ``test.parquet``),
  else all its files;
* a ``datasets`` ``save_to_disk`` folder: a Dataset (undivided) or a DatasetDict (its splits);
* ``hub:NAME[:CONFIG]`` (or a bare ``owner/name`` that is no local path): a hub dataset's splits.

``columns`` (``{"instruction": "question", "output": "answer"}``) maps record fields onto the
data's columns, for every form. Rows of datasets are located as ``name[split]:row`` (1-based).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import MissingInput
from .records import DATA_SUFFIXES, SPLIT_NAMES, Task, _distinct, _records_from_values, load_task_records, task_name
from .tables import check_columns, column_hint, dataset_rows, hub_dataset, saved_dataset
from .types import DataError

HUB_PREFIX = "hub:"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name of a Hugging Face dataset, without hub:
TRAIN_SPLIT = "train"
EVAL_SPLIT = "test"


class DataSource:
    """One ``--data`` entry: what it is, which named splits it holds, and its tasks."""

    def __init__(self, spec: str | Path, columns: dict[str, str] | None = None, skip_bad: bool = False):
        self.spec, self.columns, self.skip_bad = str(spec), dict(columns or {}), skip_bad
        self.path = Path(spec)
        self.hub: tuple[str, str | None] | None = None
        if self.spec.startswith(HUB_PREFIX):
            name, _, config = self.spec[len(HUB_PREFIX):].partition(":")
            if not name:
                raise DataError(f"--data {spec}: name the dataset, e.g. hub:openai/gsm8k:main")
            self.hub = (name, config or None)
        elif not self.path.exists():
            if not HUB_ID.fullmatch(self.spec):
                raise MissingInput(f"--data {spec}: no such file or folder (a hub dataset is hub:NAME[:CONFIG])")
            self.hub = (self.spec, None)

    @property
    def name(self) -> str:
        """The task's name: the file's or folder's (see task_name), or the hub dataset's (+ config)."""
        if self.hub:
            name, config = self.hub
            return name.rstrip("/").split("/")[-1] + (f"_{config}" if config else "")
        return task_name(self.path)

    @property
    def saved(self) -> bool:
        """A ``save_to_disk`` folder (a Dataset's holds state.json, a DatasetDict's dataset_dict.json)."""
        return self.path.is_dir() and any((self.path / f).is_file() for f in ("dataset_dict.json", "state.json"))

    @cached_property
    def dataset(self) -> Any:
        """The ``datasets`` object behind a saved folder or a hub name (loaded once)."""
        if self.hub:
            name, config = self.hub
            try:
                return hub_dataset(name, config)
            except (OSError, ConnectionError) as err:
                raise MissingInput(f"--data {self.spec}: the Hugging Face dataset could not be loaded ({err})") \
                    from err
        return saved_dataset(self.path)

    @property
    def splits(self) -> list[str] | None:
        """The named splits it holds; None for one undivided set of records."""
        if self.hub or self.saved:
            return list(self.dataset) if hasattr(self.dataset, "keys") else None
        if self.path.is_dir():
            stems = [p.stem for p in sorted(self.path.iterdir()) if p.is_file() and p.suffix.lower() in DATA_SUFFIXES]
            return list(dict.fromkeys(s for s in stems if s.lower() in SPLIT_NAMES)) or None
        return None

    def load(self, split: str | None = None) -> Task:
        """The task of ``split`` (None: the undivided records)."""
        if not (self.hub or self.saved):
            return load_task_records(self.path, skip_bad=self.skip_bad, split=split, columns=self.columns)
        dataset = self.dataset if split is None else self.dataset[split]
        where = self.spec if split is None else f"{self.spec}[{split}]"
        names, rows = dataset_rows(dataset)
        check_columns(self.columns, names, where)
        skipped: list[str] = []
        try:
            records = _records_from_values(rows, where, self.skip_bad, skipped, self.columns)
        except DataError as err:
            raise column_hint(err, names) from None
        if not records:
            raise DataError(f"{where}: no usable records ({len(skipped)} skipped; the columns are "
                            f"{', '.join(names)}; map them onto record fields with --columns)")
        return Task(self.name, records, [where], skipped)

    def _missing(self, split: str, flag: str) -> DataError:
        return DataError(f"--data {self.spec} has no split {split!r}; its splits are: "
                         f"{', '.join(self.splits or [])}. Choose one with {flag}.")

    def train_and_eval(self, train_split: str = TRAIN_SPLIT, eval_split: str = EVAL_SPLIT) -> tuple[Task, Task | None]:
        """The task to train on and, when the source holds it, the one to evaluate.

        A source without named splits (or a folder holding neither) is all training data; one
        holding ``eval_split`` but not ``train_split`` is refused (a test split is never trained
        on), as is a named ``eval_split`` other than the default that it lacks.
        """
        splits = self.splits
        if splits is not None and train_split in splits:
            if eval_split in splits:
                return self.load(train_split), self.load(eval_split)
            if eval_split != EVAL_SPLIT:
                raise self._missing(eval_split, "--eval-split")
            return self.load(train_split), None
        if splits is not None and train_split != TRAIN_SPLIT:
            raise self._missing(train_split, "--data-split")
        if splits is not None and eval_split in splits:
            raise DataError(f"--data {self.spec} holds a {eval_split} split but no {train_split} split: a test split "
                            "is never trained on. Add a train split, give --eval-data for it, or choose the split "
                            "to train on with --data-split.")
        if splits is not None and (self.hub or self.saved):
            raise self._missing(train_split, "--data-split")
        return self.load(None), None

    def eval_task(self, eval_split: str = EVAL_SPLIT) -> Task:
        """The task to evaluate: its ``eval_split`` when it has one, else its only split, else all of it."""
        splits = self.splits
        if splits is not None and eval_split in splits:
            return self.load(eval_split)
        if (self.hub or self.saved) and splits is not None:
            if len(splits) != 1:
                raise self._missing(eval_split, "--eval-split")
            return self.load(splits[0])
        if eval_split != EVAL_SPLIT:
            raise DataError(f"--data {self.spec} has no split {eval_split!r} (its splits are: "
                            f"{', '.join(splits or ['none'])})")
        return self.load(None)


def load_eval_tasks(specs: list[str], skip_bad: bool = False, columns: dict[str, str] | None = None,
                    eval_split: str = EVAL_SPLIT) -> list[Task]:
    """Tasks to evaluate: each entry's test split when it has one, else the whole of it."""
    return _distinct([DataSource(spec, columns, skip_bad).eval_task(eval_split) for spec in specs])


def load_hub_task(dataset_id: str, split: str = TRAIN_SPLIT, name: str | None = None, skip_bad: bool = False,
                  columns: dict[str, str] | None = None) -> Task:
    """One split of a Hugging Face dataset (config ``name``) whose rows are records (or become
    records through ``columns``). Needs the network or datasets' cache."""
    source = DataSource(HUB_PREFIX + dataset_id + (f":{name}" if name else ""), columns, skip_bad)
    if split not in (source.splits or []):
        raise source._missing(split, "split=")
    return source.load(split)
