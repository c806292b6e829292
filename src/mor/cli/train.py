"""``mor train``: the flags are generated from ``TrainConfig`` and ``AdapterSpec`` (one per field),
``--config run.yaml`` gives their values from a file, and the handler calls ``run_training``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..runtime.report import text_table
from . import command


def add_train_flags(p: argparse.ArgumentParser) -> None:
    from ..train.adapters import AdapterSpec  # imports peft and torch: only when `mor train` is run
    from ..train.config import TrainConfig
    from .flags import add_settings_flags

    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML or JSON file of settings (field names as keys, e.g. 'lr: 3e-4', adapter settings "
                        "beside them or under 'adapter:'); flags given on the command line override it")
    add_settings_flags(p, AdapterSpec)
    add_settings_flags(p, TrainConfig, skip=("adapter",))


def defaults_from_file(path: str) -> dict:
    """The flag defaults of ``mor train --config FILE``: its settings, checked (an unknown key or a
    bad value is an error naming it), flattened onto the flags' names."""
    from ..train.config import TrainConfig, read_settings_file

    values = read_settings_file(path)
    cfg = TrainConfig.from_dict(values, source=f"--config {path}")
    given = set(values) | set(values.get("adapter") or {})
    return {name: value for name, value in {**cfg.to_dict(), **cfg.adapter.to_dict()}.items() if name in given}


@command("train", "train an adapter (default: MoR on the built-in suite)", arguments=add_train_flags)
def cmd_train(args) -> int:
    from ..train import AdapterSpec, TrainConfig, run_training
    from ..train.setup import builtin_data_folder
    from .flags import settings_from_args

    cfg = settings_from_args(TrainConfig, args, adapter=settings_from_args(AdapterSpec, args))
    if cfg.builtin:
        print(f"No --data given: training on the built-in multi-task suite (written to "
              f"{builtin_data_folder(cfg.output)}).")
    start = time.perf_counter()
    result = run_training(cfg)
    print(f"\nTrained {cfg.adapter.method} ({result.trainable_parameters:,} trainable parameters) for "
          f"{result.global_step} steps in {result.train_seconds:.0f} s; adapter saved to {result.adapter_dir}")
    if result.hub_repo:
        print(f"Pushed the adapter and its model card to https://huggingface.co/{result.hub_repo}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.after:
        print("\n" + format_before_after(result.before, result.after, "acc_norm" if cfg.scoring == "text" else "acc"))
    if result.figures:
        from ..analysis.analyze import routing_over_steps
        from ..analysis.routing_stats import STATS_NAME

        stats = Path(cfg.output) / STATS_NAME
        if stats.is_file():
            print("\n" + routing_over_steps(stats))
        print(f"\nRouting figures written to {result.figures}/ (see analysis.json there for the numbers)")
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s")
    return 0


def format_before_after(before: dict | None, after: dict, key: str = "acc") -> str:
    """Table of accuracy (``key``: acc or acc_norm) per task before (adapter off) and after training."""
    rows = []
    for name in list(after["tasks"]) + ["average"]:
        a = after["tasks"].get(name) if name != "average" else after["average"]
        b = ((before or {}).get("tasks", {}).get(name) if name != "average" else (before or {}).get("average")) or {}
        rows.append([name, a.get("n", ""), _pct(b.get(key)), _pct(a.get(key)), _pct(a.get("chance"))])
    return text_table(["task", "n", f"before {key}", f"after {key}", "chance"], rows)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
