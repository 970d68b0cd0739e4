"""What the mirror served since start: the counters of /metrics and of /models/cache/info."""

from __future__ import annotations

import threading
from collections import Counter


class MirrorStats:
    """Counters of the requests under /hf. Thread-safe (cheap: a lock around integers).

    - requests, by route kind (``info``, ``tree``, ``paths-info``, ``resolve``, ``other``)
      and status: every request under /hf, the guards' refusals (403, 401) included;
    - bytes served: file bytes the ``resolve`` answers handed to the server to send;
    - hits: answers served from the cache (2xx); misses: a repository, revision or file
      not installed (404 with the Hub's RepoNotFound / RevisionNotFound / EntryNotFound,
      or pull-through's 501). Other answers (refusals, bad ranges, the mirror off) are
      neither, so the hit rate is about what was asked of the cache only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._bytes = 0
        self._hits = 0
        self._misses = 0

    def record(self, kind: str, status: int, hit: bool | None) -> None:
        """One answered request; ``hit`` None when it was neither a hit nor a miss."""
        with self._lock:
            self._requests[(kind, status)] += 1
            if hit is True:
                self._hits += 1
            elif hit is False:
                self._misses += 1

    def add_bytes(self, count: int) -> None:
        with self._lock:
            self._bytes += count

    @property
    def requests(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._requests)

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self._requests.values())

    @property
    def bytes_served(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def hits(self) -> int:
        with self._lock:
            return self._hits

    @property
    def misses(self) -> int:
        with self._lock:
            return self._misses

    def hit_rate(self) -> float | None:
        """hits / (hits + misses); None before any (as the download cache's hit rate)."""
        with self._lock:
            asked = self._hits + self._misses
            return self._hits / asked if asked else None
