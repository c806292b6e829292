"""Claims: which worker trains which run, safe across hosts that share the plan's folders.

A claim is a file ``<work>/locks/<job>.lock`` holding the holder's host, PID, start time and a
token. It is created atomically (``os.link`` of a written file: exactly one of several workers,
on any host, succeeds; ``link`` is atomic on NFS too, where ``O_EXCL`` was not always), and its
holder refreshes a heartbeat -- the file's modification time -- from a background thread every
``grace / 5`` seconds. A claim whose heartbeat is older than the grace period is stale (its
holder was killed, lost its node, or hangs) and is taken over; one with a fresh heartbeat is
never taken, whatever its PID says: a PID means nothing on another host, and a reused PID on
this one said "alive" forever. Hosts must agree on the time to within the grace period (NTP).

Taking over is itself claimed (``<lock>.takeover``, created the same way), so two workers that
both see a stale claim cannot both take it: the winner checks that the claim is still the stale
one it saw, replaces it with its own, and drops the takeover file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

DEFAULT_GRACE_SECONDS = 60.0
GRACE_ENV = "MOR_CLAIM_GRACE"  # seconds; overrides the default (every worker of a plan must agree)
HOST_ENV = "MOR_HOST"  # the host name a claim records (default: this machine's)


def host_name() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def grace_seconds(value: float | None = None) -> float:
    if value is not None:
        return float(value)
    return float(os.environ.get(GRACE_ENV) or DEFAULT_GRACE_SECONDS)


class Claim:
    """One claim on ``path``: :meth:`acquire` (True when this process now holds it), :meth:`release`.
    While held, a daemon thread refreshes the heartbeat; :attr:`lost` turns True if the file
    stopped being ours (taken over after a heartbeat was missed for the whole grace period)."""

    def __init__(self, path: Path, grace: float | None = None):
        self.path = Path(path)
        self.grace = grace_seconds(grace)
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------------

    def holder(self) -> dict | None:
        """What the claim file says (host, pid, started, token), or None when there is none."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def age(self, path: Path | None = None) -> float | None:
        """Seconds since the heartbeat of ``path`` (default: the claim), None when absent."""
        try:
            return time.time() - (path or self.path).stat().st_mtime
        except FileNotFoundError:
            return None

    def stale(self) -> bool:
        age = self.age()
        return age is not None and age > self.grace

    # -- taking and giving back ----------------------------------------------------------------------

    def _create(self, path: Path, content: dict) -> bool:
        """``path`` created atomically with ``content``; False when it exists."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{self.token}.tmp"
        tmp.write_text(json.dumps(content))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> bool:
        content = dict(host=host_name(), pid=os.getpid(), token=self.token,
                       started=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        if not self._create(self.path, content):
            if not self.stale() or not self._take_over(content):
                return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return True

    def _take_over(self, content: dict) -> bool:
        takeover = self.path.with_name(self.path.name + ".takeover")
        if not self._create(takeover, dict(content, taking=True)):
            age = self.age(takeover)  # a taker that died between its two steps leaves this behind
            if age is not None and age > self.grace:
                takeover.unlink(missing_ok=True)
            return False
        try:
            seen = self.holder()
            if seen is None or seen.get("token") == self.token or not self.stale():
                return False  # gone, or refreshed: not the stale claim we saw
            self.path.unlink(missing_ok=True)
            return self._create(self.path, content)  # a new claimant may have been faster: then it holds it
        finally:
            takeover.unlink(missing_ok=True)

    def _beat(self) -> None:
        interval = max(0.05, self.grace / 5)
        while not self._stop.wait(interval):
            if (self.holder() or {}).get("token") != self.token:
                self.lost = True
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if (self.holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def live_claims(folder: Path, grace: float | None = None) -> bool:
    """Whether any claim under ``folder`` has a fresh heartbeat."""
    if not folder.is_dir():
        return False
    return any(not Claim(lock, grace).stale() for lock in folder.glob("**/*.lock"))
