"""Stopping cleanly on SIGTERM / SIGINT, in every phase of every command.

One exception (:class:`Stopped`, carrying the exit status the CLI returns), one exit status for a
stop that a rerun continues (:data:`EXIT_PREEMPTED`), and one way to catch the two signals
(:class:`SignalHandlers`). Training's step-and-checkpoint stop (``mor.safety.StopOnSignal``) is
built on these; every other phase (scoring before or after training, ``mor eval``, ``mor
compare`` scoring, ``mor export-*``, ``mor merge``) uses :func:`stop_cleanly`: its outputs are
written whole or not at all (``mor.safety.atomic_file`` / ``atomic_folder``), so it may stop at
once, with one line saying what was finished, what was not, and the command that continues.
Nothing here knows about the Trainer.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from typing import Any, Callable, Iterator

EXIT_PREEMPTED = 75
"""Exit status of a command stopped by SIGTERM or SIGINT at a point a rerun continues from
(EX_TEMPFAIL: "try again later"). A second signal during training's clean stop exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_command: list[str] = []  # the command line being run (set by the CLI), for "the command that continues"


class Stopped(BaseException):
    """A command stopped by a signal. ``status`` is the exit status the CLI returns. A
    BaseException, as KeyboardInterrupt is: no ``except Exception`` on the way may swallow it."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class SignalHandlers:
    """``handler(signum, frame)`` for SIGTERM and SIGINT between :meth:`install` and :meth:`restore`
    (which puts back the handlers there were). Python delivers signals to the main thread only, so
    elsewhere both do nothing."""

    def __init__(self, handler: Callable[[int, Any], None]):
        self.handler = handler
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self.handler) for signum in SIGNALS}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def set_command(argv: list[str]) -> None:
    """Record the command line being run (``["mor", "eval", ...]``) for :func:`rerun_hint`."""
    _command[:] = argv


def rerun_hint() -> str:
    """"run the same command again: mor eval ..." (the command line the CLI recorded, if any)."""
    return "run the same command again" + (f": {shlex.join(_command)}" if _command else "")


@contextlib.contextmanager
def stop_cleanly(doing: str, unfinished: str, rerun: str | None = None) -> Iterator[None]:
    """Within: the first SIGTERM / SIGINT raises :class:`Stopped` (status :data:`EXIT_PREEMPTED`) at
    once, with the one line "stopped by SIGTERM while <doing>: <unfinished>; to continue, <rerun>."
    (``rerun`` defaults to :func:`rerun_hint`). The handlers are back to what they were before it is
    raised, so a second signal while the stop unwinds acts as it would have. For phases whose
    outputs are written whole or not at all: the exception unwinds through the atomic writers,
    which remove their temporary files."""
    def handle(signum, _frame) -> None:
        handlers.restore()
        raise Stopped(f"stopped by {signal.Signals(signum).name} while {doing}: {unfinished}; to continue, "
                      f"{rerun or rerun_hint()}.", EXIT_PREEMPTED)

    handlers = SignalHandlers(handle)
    handlers.install()
    try:
        yield
    finally:
        handlers.restore()
