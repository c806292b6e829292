"""Guards for what the commands write and read: nothing a user already has is overwritten,
writes are atomic, and non-finite weights are never saved or scored.

- :func:`claim_run_folder` (``mor train``): the output folder must be new or empty, or hold
  this same run (``--resume`` with matching settings, recorded in ``mor_run.json``), or the
  user said ``--overwrite``.
- :func:`claim_output_folder` / :func:`check_output_file` (``merge``, ``analyze``, ``eval``):
  a non-empty folder or an existing file is replaced only with ``--overwrite``, and never when
  it is one of the command's own inputs.
- :func:`atomic_folder` / :func:`atomic_write_text`: write to a temporary sibling and rename,
  so a kill leaves the previous result intact.
- :func:`check_adapter_weights`, :class:`FiniteCheckCallback`, :func:`divergence_warning`:
  NaN/inf weights stop training (naming the step), are refused at load, and a loss that ends
  far above its start is reported.

Every refusal is an :class:`OutputError` or :class:`AdapterError` (both ``ValueError``), which
the CLI prints as one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from transformers import TrainerCallback

RUN_RECORD = "mor_run.json"
"""Written by ``mor train`` into its output folder: the settings a ``--resume`` must match."""

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors",)
DIVERGENCE_FACTOR = 1.5  # a final logged loss above 1.5x the first one is reported as divergence


class OutputError(ValueError):
    """A command would overwrite something it does not own, or resume a different run."""


class AdapterError(ValueError):
    """An adapter folder cannot be used: unreadable, mismatched, or with non-finite weights."""


class TrainingDiverged(ValueError):
    """The loss or the trainable weights became NaN/inf during training."""


# -- folders and files a command writes --------------------------------------------------------------

def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _describe(folder: Path) -> str:
    names = _entries(folder)
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} entries)" if len(names) > 4 else "")
    return shown


def _same_or_inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_not_an_input(output: Path, flag: str, inputs: Mapping[str, Any]) -> None:
    for input_flag, value in inputs.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item in (None, "") or not Path(item).exists():
                continue
            if _same_or_inside(Path(item), output):
                raise OutputError(f"{flag} {output} would replace {input_flag} {item}, an input of this "
                                  f"command; choose another {flag}.")


def claim_output_folder(folder: str | Path, overwrite: bool, flag: str = "--output",
                        inputs: Mapping[str, Any] | None = None) -> Path:
    """Check that a command may write the folder ``folder`` (before any work is done).

    Allowed: a new or empty folder, or a non-empty one with ``overwrite`` (the caller then
    replaces it as a whole, see :func:`atomic_folder`). Never allowed: a folder that is (or
    holds) one of ``inputs`` (``{"--model": path, ...}``), or a path that is a file.
    """
    folder = Path(folder)
    _check_not_an_input(folder, flag, inputs or {})
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder} is a file; give a folder path.")
    if _entries(folder) and not overwrite:
        raise OutputError(f"{flag} {folder} is not empty (it holds {_describe(folder)}); choose a new folder, "
                          "or add --overwrite to replace it.")
    return folder


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--output",
                      inputs: Mapping[str, Any] | None = None) -> Path:
    """Check that a command may write the file ``path``: not a folder, not one of ``inputs``,
    and not an existing file unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file path such as {path / 'results.json'}.")
    _check_not_an_input(path, flag, inputs or {})
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {path} exists; choose another file, or add --overwrite to replace it.")
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file next to ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces ``folder`` as a
    whole (old files do not survive next to new ones). On an error, or a kill, ``folder`` is
    left as it was and the temporary folder is removed (or, after a kill, left as a hidden
    ``.name.*.tmp`` sibling)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- the training run's folder -----------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _differences(recorded: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(now)):
        old, new = recorded.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out.extend(_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} in the run, {new!r} now")
    return out


def claim_run_folder(folder: str | Path, settings: Mapping[str, Any], overwrite: bool = False,
                     resume: bool = False) -> bool:
    """Check and claim ``mor train``'s output folder before any work; return whether this call
    created it.

    ``settings`` are what a resumed run must share with the run that wrote the folder (the
    model, adapter, data and optimisation settings; not the step count). A new or empty
    folder is claimed (``mor_run.json`` written); a non-empty one only with ``resume`` and
    matching settings, or with ``overwrite`` (its old checkpoints are removed so that a later
    ``--resume`` never picks them up; the old adapter stays until the new one replaces it).
    """
    folder = Path(folder)
    if int(os.environ.get("RANK", "0")) != 0:
        return False  # under `accelerate launch` the main process alone checks and claims the folder
    if resume and overwrite:
        raise OutputError("give --resume (continue the run in --output) or --overwrite (replace it), not both.")
    settings = _jsonable(dict(settings))
    record = folder / RUN_RECORD
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output {folder} is a file; give a folder path.")
    created = not folder.exists()
    if _entries(folder):
        if resume:
            if not record.is_file():
                raise OutputError(f"--resume: {folder} holds no record of a mor train run ({RUN_RECORD}), so "
                                  "there is nothing to continue; choose a new --output, or add --overwrite "
                                  "(without --resume) to start a new run there.")
            differ = _differences(json.loads(record.read_text())["settings"], settings)
            if differ:
                raise OutputError(f"--resume: the run in {folder} was started with other settings ("
                                  + "; ".join(differ) + "); resume with the same flags, or choose a new --output.")
            return False
        if not overwrite:
            raise OutputError(f"--output {folder} is not empty (it holds {_describe(folder)}); mor train writes "
                              "only into a new or empty folder. Choose another --output, add --resume to "
                              "continue the run there, or --overwrite to replace it.")
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({"command": "mor train", "settings": settings}, indent=2) + "\n")
    return created


def release_failed_run_folder(folder: str | Path, created: bool) -> None:
    """After a run that failed before its first checkpoint, remove the folder it created."""
    folder = Path(folder)
    if created and folder.is_dir() and not any(folder.glob("checkpoints/checkpoint-*")) \
            and not (folder / "adapter").exists():
        shutil.rmtree(folder, ignore_errors=True)


# -- non-finite weights -------------------------------------------------------------------------------

def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def check_adapter_weights(folder: str | Path) -> None:
    """Refuse an adapter folder (MoR/MoE-LoRA or peft LoRA/DoRA) whose safetensors file cannot
    be read or holds NaN/inf values. A folder without a safetensors file is left to the loader."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in ADAPTER_WEIGHT_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise AdapterError(f"{path}: cannot read the adapter weights ({err}); the file is damaged or not "
                               "an adapter: re-save or retrain it.") from None
        bad = nonfinite_tensors(tensors)
        if bad:
            raise AdapterError(f"{path}: {len(bad)} of {len(tensors)} adapter tensors hold NaN or inf (e.g. "
                               f"{bad[0]}); the training that wrote it diverged: retrain with a lower --lr.")


class FiniteCheckCallback(TrainerCallback):
    """Stops training with :class:`TrainingDiverged` as soon as a logged loss or a trainable
    weight is NaN/inf, before that step's checkpoint is written."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for name, param in model.named_parameters():
                if param.requires_grad and not torch.isfinite(param.detach()).all():
                    raise TrainingDiverged(
                        f"training diverged at step {state.global_step}: {name} holds NaN or inf after the "
                        f"update (learning rate {args.learning_rate:g}); no adapter was saved from this run's "
                        "end. Lower --lr and start again (--overwrite).")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged at step {state.global_step}: the loss is {loss} "
                                   f"(learning rate {args.learning_rate:g}); no adapter was saved from this "
                                   "run's end. Lower --lr and start again (--overwrite).")
        return control


def divergence_warning(log_history: list[dict], lr: float) -> str | None:
    """A warning when the last logged training loss ends far above the first one."""
    losses = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if len(losses) < 2:
        return None
    (first_step, first), (last_step, last) = losses[0], losses[-1]
    if last > DIVERGENCE_FACTOR * first:
        return (f"the training loss rose from {first:.4g} (step {first_step}) to {last:.4g} (step {last_step}): "
                f"the run diverged and the adapter is likely worse than none; lower --lr (now {lr:g}).")
    return None
