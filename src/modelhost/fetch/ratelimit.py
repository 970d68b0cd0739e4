"""Bandwidth caps: token buckets shared by every connection they limit.

A ``RateLimiter`` is one cap (``MODELHOST_FETCH_MAX_MBPS`` for all downloads together, or a
request's ``max_mbps`` for one job). Transfers call ``Throttle.consume`` with the bytes each
receive brought; the caller sleeps until the bucket has paid for them, so the next receive
waits and TCP's flow control slows the sender. Every connection of every part of every job
that shares a limiter draws on the same bucket, so the cap holds for them together.

The bucket may go into debt: a receive is never split, its bytes are taken at once and the
debt is slept off. Each caller's wait covers every byte reserved before it, so concurrent
callers are served in turn and the long-run rate is the cap; the burst (what an idle bucket
lets through at once) is a tenth of a second's worth, so a 10 s window sees at most ~1% more.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from modelhost.fetch.cancel import CancelToken
from modelhost.units import MB

BURST_S = 0.1  # an idle bucket holds this many seconds' worth of bytes
MIN_BURST = 64 * 1024
# Receives of a capped transfer are at most this fraction of a second's worth, so that no
# single receive is a burst (and a cancel is never stuck behind a long debt).
READ_SLICE_S = 0.02
MIN_READ = 16 * 1024
# A capped connection's receive buffer holds this many seconds' worth of its share of the
# cap: bytes the kernel accepted but the transfer has not yet paid for are bounded by it (the
# kernel's autotuning would let a slow reader's buffer hold megabytes), while a share still
# fills a link with up to this round-trip time.
RCVBUF_S = 0.1
MIN_RCVBUF = 64 * 1024
MAX_RCVBUF = 16 * 1024 * 1024


class RateLimiter:
    """A thread-safe token bucket of ``bytes_per_s`` with a small burst."""

    def __init__(
        self,
        bytes_per_s: float,
        burst_s: float = BURST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"a rate limit must be positive, not {bytes_per_s!r}")
        self.bytes_per_s = float(bytes_per_s)
        self.capacity = max(float(MIN_BURST), self.bytes_per_s * burst_s)
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock = threading.Lock()

    @classmethod
    def from_mbps(cls, mbps: float | None) -> RateLimiter | None:
        """A limiter for a cap in decimal megabytes per second (None: no cap)."""
        return None if mbps is None else cls(mbps * MB)

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` from the bucket; returns how long the caller must wait (seconds)
        before it may move more, zero when the bucket still had them."""
        with self._lock:
            now = self._clock()
            refill = (now - self._stamp) * self.bytes_per_s
            self._tokens = min(self.capacity, self._tokens + refill)
            self._stamp = now
            self._tokens -= nbytes
            return 0.0 if self._tokens >= 0 else -self._tokens / self.bytes_per_s


@dataclass(frozen=True)
class Throttle:
    """The caps one transfer obeys (its job's and the global one), applied together."""

    limiters: tuple[RateLimiter, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.limiters)

    @property
    def bytes_per_s(self) -> float | None:
        """The tightest cap, None when there is none."""
        return min((limiter.bytes_per_s for limiter in self.limiters), default=None)

    def max_read(self, default: int) -> int:
        """How many bytes one receive may ask for (``default`` when uncapped)."""
        rate = self.bytes_per_s
        if rate is None:
            return default
        return max(MIN_READ, min(default, int(rate * READ_SLICE_S)))

    def fit_socket(self, sock: socket.socket | None, connections: int = 1) -> None:
        """Bound a capped connection's receive buffer (see ``RCVBUF_S``); ``connections``
        share the cap. No-op without a cap or a socket."""
        rate = self.bytes_per_s
        if rate is None or sock is None:
            return
        size = int(rate * RCVBUF_S / max(1, connections))
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, max(MIN_RCVBUF, min(MAX_RCVBUF, size))
            )
        except OSError:  # a socket already closed: nothing to bound
            pass

    def consume(self, nbytes: int, cancel: CancelToken | None = None) -> None:
        """Pay for ``nbytes`` just received, sleeping as long as the caps say; a cancel
        wakes the sleep and raises ``Cancelled``."""
        for limiter in self.limiters:
            wait = limiter.reserve(nbytes)
            if wait <= 0:
                continue
            if cancel is None:
                time.sleep(wait)
            else:
                cancel.sleep(wait)


NO_THROTTLE = Throttle()


def throttle_of(*limiters: RateLimiter | None) -> Throttle:
    """The throttle of the given caps (None entries are no cap)."""
    return Throttle(tuple(limiter for limiter in limiters if limiter is not None))
