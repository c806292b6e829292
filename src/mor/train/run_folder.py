"""The folder of a training run (``mor train --output``): claimed before any work, taken once the run's
inputs loaded, released when a run fails before its first checkpoint. ``mor_run.json`` records the
settings a ``--resume`` must match."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..errors import OutputError
from ..safety import _describe, _entries, atomic_write_text, check_output_place
from .config import TrainConfig

RUN_RECORD = "mor_run.json"
"""Written by ``mor train`` into its output folder: the settings a ``--resume`` must match."""


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
                     resume: bool = False, inputs: Mapping[str, Any] | None = None) -> bool:
    """Check ``mor train``'s output folder before any work, changing nothing on disk; return
    whether the folder is new (so that a run that fails early removes it again).

    ``settings`` are what a resumed run must share with the run that wrote the folder (the
    model, adapter, data and optimisation settings; not the step count). The rule of
    :func:`check_output_place` holds against ``inputs``; then a new or empty folder is fine, a
    non-empty one only with ``resume`` and matching settings (``mor_run.json``), or with
    ``overwrite``. :func:`take_run_folder` makes the claim real once the run's inputs loaded.
    """
    folder = Path(folder)
    if resume and overwrite:
        raise OutputError("give --resume (continue the run in --output) or --overwrite (replace it), not both.")
    check_output_place(folder, "--output", inputs)
    if int(os.environ.get("RANK", "0")) != 0:
        return False  # under `accelerate launch` the main process alone claims the folder
    record = folder / RUN_RECORD
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output {folder} is a file; give a folder path.")
    if _entries(folder):
        if resume:
            if not record.is_file():
                raise OutputError(f"--resume: {folder} holds no record of a mor train run ({RUN_RECORD}), so "
                                  "there is nothing to continue; choose a new --output, or add --overwrite "
                                  "(without --resume) to start a new run there.")
            # a setting added since the run, at its default, is no difference (TrainConfig.resume_key)
            differ = _differences(TrainConfig.resume_key(json.loads(record.read_text())["settings"]),
                                  TrainConfig.resume_key(_jsonable(dict(settings))))
            if differ:
                raise OutputError(f"--resume: the run in {folder} was started with other settings ("
                                  + "; ".join(differ) + "); resume with the same flags, or choose a new --output.")
        elif not overwrite:
            raise OutputError(f"--output {folder} is not empty (it holds {_describe(folder)}); mor train writes "
                              "only into a new or empty folder. Choose another --output, add --resume to "
                              "continue the run there, or --overwrite to replace it.")
    return not folder.exists()


RUN_PRODUCTS = ("checkpoints", "figures", "routing_stats.json", "result.json")
"""What ``train --overwrite`` removes of the old run before training: what would otherwise be
mistaken for the new run's (a later ``--resume`` would pick up old checkpoints). The old adapter
stays until the new one replaces it; files the run did not write are left alone."""


def take_run_folder(folder: str | Path, settings: Mapping[str, Any], overwrite: bool = False) -> None:
    """Once a run's data and model loaded, make its claim on ``folder`` (see
    :func:`claim_run_folder`): create it, and with ``overwrite`` remove the old run's
    checkpoints, figures and records so that no later ``--resume`` or reader picks them up;
    then write ``mor_run.json``. A resumed run's folder is left as it is, but for the hidden
    temporaries (``.<name>.*.tmp``) a kill -9 left there mid-write."""
    folder = Path(folder)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for stale in folder.glob(".*.tmp"):  # what a kill -9 left of an atomic write into this run folder
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    record = folder / RUN_RECORD
    if record.is_file() and not overwrite:
        return  # --resume: the folder holds this run
    if overwrite:
        for path in (folder / name for name in RUN_PRODUCTS):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({"command": "mor train", "settings": _jsonable(dict(settings))},
                                         indent=2) + "\n")


def release_failed_run_folder(folder: str | Path, created: bool) -> None:
    """After a run that failed before its first checkpoint, remove the folder it created."""
    folder = Path(folder)
    if created and folder.is_dir() and not any(folder.glob("checkpoints/checkpoint-*")) \
            and not (folder / "adapter").exists():
        shutil.rmtree(folder, ignore_errors=True)
