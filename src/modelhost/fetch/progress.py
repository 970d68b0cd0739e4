"""Transfer progress shared by all files of one job: bytes, measured speed, ETA, and each
file's own bytes and status (what a progress stream shows per file)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# The speed is the rate over about the last RECENT_S: a longer window averaged in a
# multi-connection download's start (before its connections were all added) and showed a
# third less than the link carried. Samples are kept SPEED_WINDOW_S, so a slow stream whose
# receives are far apart still has one to measure from.
RECENT_S = 1.0
SPEED_WINDOW_S = 5.0
SAMPLE_EVERY_S = 0.1

# A file's status, in the order it normally goes through them. "cached": the store already
# held its bytes, nothing was fetched.
FILE_STATUSES = ("queued", "downloading", "verifying", "done", "cached")


@dataclass(frozen=True)
class FileSnapshot:
    path: str
    bytes_done: int
    bytes_total: int | None
    status: str  # one of FILE_STATUSES


@dataclass(frozen=True)
class ProgressSnapshot:
    bytes_done: int
    bytes_total: int | None
    speed_bps: float | None  # bytes per second over the last few seconds of transfer
    eta_s: float | None
    files: tuple[FileSnapshot, ...] = ()
    version: int = 0  # grows with every change: equal versions, equal snapshots

    @property
    def percent(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)


@dataclass
class _FileCount:
    done: int
    total: int | None
    status: str


class Progress:
    """Thread-safe byte counter. ``add`` counts transferred bytes (they move the speed);
    ``add_existing`` counts bytes already on disk (resumed), which do not. Bytes given a
    ``path`` also count for that file; ``on_status(path, status)`` is called (in the calling
    thread, outside the lock) whenever a file's status changes."""

    def __init__(
        self,
        total: int | None = None,
        on_status: Callable[[str, str], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.total = total
        self._done = 0
        self._transferred = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._files: dict[str, _FileCount] = {}
        self._version = 0
        self._on_status = on_status

    def track(self, path: str, total: int | None, status: str = "queued") -> None:
        """Show ``path`` in the per-file progress (before its first byte)."""
        with self._lock:
            self._files[path] = _FileCount(0, total, status)
            self._version += 1

    def set_status(self, path: str, status: str) -> None:
        """Move a tracked file to ``status`` (one of FILE_STATUSES)."""
        with self._lock:
            count = self._files.get(path)
            if count is None or count.status == status:
                return
            count.status = status
            self._version += 1
        if self._on_status is not None:
            self._on_status(path, status)

    def add(self, nbytes: int, path: str | None = None) -> None:
        now = time.monotonic()
        started = False
        with self._lock:
            self._done += nbytes
            self._transferred += nbytes
            self._version += 1
            count = self._files.get(path) if path is not None else None
            if count is not None:
                count.done += nbytes
                if count.status == "queued":
                    count.status, started = "downloading", True
            if not self._samples or now - self._samples[-1][0] >= SAMPLE_EVERY_S:
                self._samples.append((now, self._transferred))
                while self._samples and now - self._samples[0][0] > SPEED_WINDOW_S:
                    self._samples.popleft()
        if started and self._on_status is not None:
            self._on_status(path, "downloading")

    def add_existing(self, nbytes: int, path: str | None = None) -> None:
        with self._lock:
            self._done += nbytes
            self._version += 1
            count = self._files.get(path) if path is not None else None
            if count is not None:
                count.done += nbytes

    def remove(self, nbytes: int, path: str | None = None) -> None:
        """Forget bytes that were discarded (a restart from zero)."""
        with self._lock:
            self._done = max(0, self._done - nbytes)
            self._version += 1
            count = self._files.get(path) if path is not None else None
            if count is not None:
                count.done = max(0, count.done - nbytes)

    @property
    def transferred(self) -> int:
        with self._lock:
            return self._transferred

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def file_statuses(self) -> list[str]:
        with self._lock:
            return [count.status for count in self._files.values()]

    def _speed(self, now: float) -> float | None:
        """Bytes per second since the newest sample at least ``RECENT_S`` old (the oldest
        kept when none is that old); None before 0.2 s of samples. Call under the lock."""
        if not self._samples:
            return None
        start = self._samples[0]
        for sample in reversed(self._samples):
            if now - sample[0] >= RECENT_S:
                start = sample
                break
        t0, b0 = start
        # The window ends now, so a stall shows as falling speed rather than a frozen one.
        elapsed = now - t0
        if elapsed < 0.2:
            return None
        return (self._transferred - b0) / elapsed

    def snapshot(self) -> ProgressSnapshot:
        now = time.monotonic()
        with self._lock:
            done, total, version = self._done, self.total, self._version
            files = tuple(
                FileSnapshot(path, count.done, count.total, count.status)
                for path, count in self._files.items()
            )
            speed = self._speed(now)
        eta = None
        if speed and total is not None and total >= done:
            eta = (total - done) / speed
        return ProgressSnapshot(done, total, speed, eta, files, version)
