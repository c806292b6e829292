"""The errors a user can act on: one family, ``MorError``, that the ``mor`` command line prints as
one ``error:`` line (exit 2). Anything else that escapes a command is a bug and shows its
traceback. Each class is also a ``ValueError`` (or ``FileNotFoundError`` / ``ImportError``), so
code that caught those before still catches them.

    MorError
    ├── SettingsError      a setting out of range (MoRConfig, TrainConfig, a flag, a run file)
    ├── DataError          a task file or record is malformed
    ├── AdapterError       an adapter folder cannot be used (unreadable, mismatched, non-finite)
    ├── OutputError        a command would overwrite what it does not own, or resume another run
    ├── PlanError          a ``mor compare`` plan that cannot run as written
    ├── TrainingDiverged   the loss or the trainable weights became NaN/inf
    ├── MissingInput       a file or folder the user named is not there
    └── MissingExtra       a command needs an optional package: names the extra that installs it
"""

from __future__ import annotations

import importlib.util


class MorError(Exception):
    """A mistake in what the user gave (or asked for); the message says what and how to fix it."""


class SettingsError(MorError, ValueError):
    """A setting is out of range; the message names the field or flag and what is allowed."""


class DataError(MorError, ValueError):
    """A task file or record is malformed. The message says where, what, and how to fix it."""


class AdapterError(MorError, ValueError):
    """An adapter folder cannot be used: unreadable, mismatched, or with non-finite weights."""


class OutputError(MorError, ValueError):
    """A command would overwrite something it does not own, or resume a different run."""


class PlanError(MorError, ValueError):
    """A plan that cannot run as written; the message names the key and what to write instead."""


class TrainingDiverged(MorError, ValueError):
    """The loss or the trainable weights became NaN/inf during training."""


class MissingInput(MorError, FileNotFoundError):
    """A file or folder the user named (a model, an adapter, a task, a run file) is not there."""


class MissingExtra(MorError, ImportError):
    """A command needs an optional package that is not installed."""


#: The extra of ``mor-adapters`` that installs each optional package (pyproject's optional-dependencies).
EXTRAS = {"datasets": "train", "gguf": "train", "tensorboard": "train", "matplotlib": "train", "yaml": "train",
          "lm_eval": "lmeval", "vllm": "vllm", "trl": "trl", "bitsandbytes": "qlora"}


def require(module: str, purpose: str) -> None:
    """Raise ``MissingExtra`` naming the extra to install when ``module`` is not importable."""
    if importlib.util.find_spec(module) is None:
        extra = EXTRAS[module]
        raise MissingExtra(f"{purpose} needs the package {module!r}, which is not installed: "
                           f"pip install \"mor-adapters[{extra}]\" (or \"mor-adapters[all]\")")
