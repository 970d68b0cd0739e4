"""One server per home: an exclusive ``flock`` on ``<home>/server.lock`` for the server's life.

Two servers on one ``MODELHOST_HOME`` would both resume the same jobs and write the same
partial files. The lock is an advisory ``flock`` (``LOCK_EX | LOCK_NB``) on an open file
description: the kernel drops it when the descriptor closes, so a server that is killed
(SIGKILL, a crash) never blocks the next start. After taking it, the holder writes its pid
and address into the file, so that a refused server can say who holds the home.

This module imports nothing of modelhost's heavy parts: ``modelhost serve`` takes the lock
before it imports the server.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from modelhost.errors import HomeInUse

LOCK_NAME = "server.lock"
# A holder writes its record right after taking the lock: how long a refused server waits
# for that record before naming an unknown holder.
HOLDER_WAIT_S = 0.5


@dataclass(frozen=True)
class Holder:
    """Who holds a home, as its lock file records it (None where not recorded yet)."""

    pid: int | None
    address: str | None


class HomeLock:
    """A held home lock; ``release`` (or the process's end) lets the next server start."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the ``flock``). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def lock_path(home: Path) -> Path:
    """The lock file of ``home``."""
    return Path(home) / LOCK_NAME


def acquire(home: Path, address: str) -> HomeLock:
    """Take ``home``'s lock for a server answering at ``address`` (blocking for a few ms at
    most). Raises ``HomeInUse`` naming the holder's pid and address when another server,
    in this process or another, holds it."""
    path = lock_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CLOEXEC: subprocesses (the pickle converter) must not inherit, and so keep, the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HomeInUse(in_use_message(Path(home), wait_for_holder(path))) from None
    except BaseException:
        os.close(fd)
        raise
    record = json.dumps({"pid": os.getpid(), "address": address}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return HomeLock(path, fd)


def read_holder(path: Path) -> Holder:
    """The record in a lock file (fields None when it is missing or unreadable)."""
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return Holder(None, None)
    if not isinstance(data, dict):
        return Holder(None, None)
    pid, address = data.get("pid"), data.get("address")
    return Holder(
        pid if isinstance(pid, int) else None, address if isinstance(address, str) else None
    )


def wait_for_holder(path: Path, wait_s: float = HOLDER_WAIT_S) -> Holder:
    """The holder's record, waiting briefly for a holder that has just taken the lock."""
    deadline = time.monotonic() + wait_s
    holder = read_holder(path)
    while holder.pid is None and time.monotonic() < deadline:
        time.sleep(0.05)
        holder = read_holder(path)
    return holder


def in_use_message(home: Path, holder: Holder) -> str:
    """What a refused server says: who holds the home, and what to do."""
    pid = "pid unknown" if holder.pid is None else f"pid {holder.pid}"
    where = f", {holder.address}" if holder.address else ""
    return f"another server ({pid}{where}) is using home {home}; stop it or set MODELHOST_HOME"
