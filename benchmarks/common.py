"""What every benchmark here needs: the machine it ran on, timing statistics, table cells and
the table formatter (re-exported from mor.runtime.report), JSON files.

How the benchmarks use these (interleaved rounds, paired ratios, the resume cache) is in
docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
from importlib import metadata
from pathlib import Path

import torch

from mor.runtime.report import markdown_table, text_table  # noqa: F401  (re-exported: the one table formatter)
from mor.runtime.system import cpu_model

# -- the machine -------------------------------------------------------------------------------


def machine_info(device: str | torch.device = "cpu", packages: tuple[str, ...] = ()) -> dict:
    """Date, host, CPU, torch (version, threads), load average, device and the versions of ``packages``."""
    device = torch.device(device)
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in packages:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def machine_line(device: str | torch.device = "cpu") -> str:
    """One line for a table header: host | OS | CPU x count | torch (threads) | device."""
    info = machine_info(device)
    text = (f"{info['host']} | {platform.system()} {platform.release()} | {info['cpu']} x{info['cpu_count']} | "
            f"torch {info['torch']} ({info['threads']} threads) | device {info['device']}")
    return text + (f" ({info['gpu']})" if "gpu" in info else "")


# -- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(times_a: list[float], times_b: list[float]) -> float:
    """Median over rounds of a's time / b's time in the same round (the rounds were interleaved)."""
    return median([a / b for a, b in zip(times_a, times_b)])


def rotations(items: list, rounds: int):
    """``items`` once per round, starting one further each round, so no item always runs first."""
    for k in range(rounds):
        yield items[k % len(items):] + items[:k % len(items)]


def progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (``None`` inside the ``with`` when tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="run", disable=not enabled, leave=False, file=sys.stderr)


# -- table cells (the tables themselves: mor.runtime.report, re-exported above) --------------------------


def f3(x: float | None) -> str:
    return "-" if x is None or x != x else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def rx(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}x"


# -- files -------------------------------------------------------------------------------------


def write_json(path: str | Path, data) -> None:
    """Write ``data`` to ``path`` atomically (a killed run never leaves half a file)."""
    from mor.safety import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path):
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def settings_hash(obj) -> str:
    """A short stable hash of run settings: the key of the resume cache."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]
