"""Transfer progress shared by all files of one job: bytes, measured speed, ETA."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

SPEED_WINDOW_S = 5.0


@dataclass(frozen=True)
class ProgressSnapshot:
    bytes_done: int
    bytes_total: int | None
    speed_bps: float | None  # bytes per second over the last few seconds of transfer
    eta_s: float | None

    @property
    def percent(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)


class Progress:
    """Thread-safe byte counter. ``add`` counts transferred bytes (they move the speed);
    ``add_existing`` counts bytes already on disk (resumed), which do not."""

    def __init__(self, total: int | None = None) -> None:
        self._lock = threading.Lock()
        self.total = total
        self._done = 0
        self._transferred = 0
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, nbytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._done += nbytes
            self._transferred += nbytes
            if not self._samples or now - self._samples[-1][0] >= 0.1:
                self._samples.append((now, self._transferred))
                while self._samples and now - self._samples[0][0] > SPEED_WINDOW_S:
                    self._samples.popleft()

    def add_existing(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes

    def remove(self, nbytes: int) -> None:
        """Forget bytes that were discarded (a restart from zero)."""
        with self._lock:
            self._done = max(0, self._done - nbytes)

    @property
    def transferred(self) -> int:
        with self._lock:
            return self._transferred

    def snapshot(self) -> ProgressSnapshot:
        now = time.monotonic()
        with self._lock:
            done, total = self._done, self.total
            speed = None
            if self._samples:
                t0, b0 = self._samples[0]
                # The window ends now, so a stall shows as falling speed rather than a frozen one.
                elapsed = now - t0
                if elapsed >= 0.2:
                    speed = (self._transferred - b0) / elapsed
        eta = None
        if speed and total is not None and total >= done:
            eta = (total - done) / speed
        return ProgressSnapshot(done, total, speed, eta)
