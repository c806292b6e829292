"""What machine a number was measured on, for benchmark headers; and the one warning of a library
we silence because no user can act on it."""

from __future__ import annotations

import logging
import platform

#: (logger, message start) of warnings nobody can act on: bitsandbytes, imported by peft, logs the first on
#: every import on a CPU with AVX512-BF16 when the optional `kernels` package (a hub download) is absent,
#: and then runs its own CPU kernel; DeepSpeed, imported by transformers' Trainer, the second on every
#: machine without a GPU.
UNACTIONABLE_WARNINGS = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
                         ("DeepSpeed", "Setting accelerator to CPU."))


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_unactionable_warnings() -> None:
    """Drop exactly the messages of ``UNACTIONABLE_WARNINGS`` (the loggers' other messages still show).
    Must run before the library is imported: bitsandbytes logs at import time."""
    for name, start in UNACTIONABLE_WARNINGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
