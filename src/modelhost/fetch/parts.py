"""Multi-connection downloads: one large file as byte ranges over parallel connections.

A file of at least the engine's ``part_threshold`` bytes (known size) is split into parts.
The first request asks for part 0 only (``Range: bytes=0-N``): a 206 says the server honours
ranges and gives the validator (strong ETag, else Last-Modified) every later part is asked
with (``If-Range``); a 200 means it does not, and that response is streamed whole as one
connection, as before. Parts are claimed lowest first by workers (each holds one of the
engine's global connection slots): one at first, more while they pay (``_grow``: a
per-connection cap rewards them, a link one connection fills does not), up to
``connections``. Each writes its part where it belongs in the one ``.part`` file as the single
stream does (``PartWriter``: O_DIRECT whole blocks, everything received written before it
waits for the network), and ``<key>.parts.json`` records each part's range, the bytes of it
written (only bytes already in the file), and the validator; it is rewritten atomically every
``MAP_FLUSH_S`` while bytes arrive. So a restart after a SIGKILL resumes every unfinished part
from its recorded offset (with ``If-Range``), and the whole file's sha256 and size, checked at
the end, catch a power cut's bad tail.

A part answered with another version (200 to a ranged ``If-Range`` request, a different
ETag or Last-Modified, a Content-Range that does not fit) restarts the whole file from zero,
never splicing versions. A part answered 403/410 from a redirect target (an expired signed
CDN URL) re-resolves the original URL once, and carries on with the fresh target.

The sha256 is computed as the contiguous prefix grows: the worker of the first unfinished
part hands its buffers to the hashing thread as they fill; bytes written ahead of the
prefix are read back (from disk, with O_DIRECT) when the prefix reaches them.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelhost.errors import (
    Cancelled,
    FetchError,
    SizeMismatch,
    TransientFetchError,
)
from modelhost.fetch.cancel import CancelToken
from modelhost.fetch.http import OpenResponse
from modelhost.fetch.transfer import (
    CHUNK_SIZE,
    CONTENT_RANGE,
    DIRECT_ALIGN,
    PROGRESS_RESETS_RETRIES,
    FileProgress,
    FileSpec,
    PartWriter,
    body_reader,
    error_for_status,
    open_direct_read,
    ready_to_read,
    set_thread_nice,
    strong_etag,
    thread_nice,
    upstream_error,
    verify,
)

if TYPE_CHECKING:
    from modelhost.fetch.engine import FetchEngine
    from modelhost.fetch.stream import SingleStream

log = logging.getLogger(__name__)

MAP_VERSION = 1
MAP_FLUSH_S = 0.025  # the part map is rewritten at most this often while bytes arrive
# A worker's receive buffer (handed to the hasher when full): page-aligned anonymous memory,
# as the single stream's, so that whole blocks go to the file with O_DIRECT.
PART_BUFFER = CHUNK_SIZE
# Receive buffers kept for the hash ahead of its position, across the engine's downloads:
# with N connections, (N-1)/N of the bytes arrive ahead of the hashed prefix, and the window
# between the prefix and the front is about N parts (auto_part_size keeps N parts within it).
AHEAD_MEMORY = 256 * 1024 * 1024
READ_BACK = CHUNK_SIZE
# When the bytes kept ahead of the hash fill AHEAD_MEMORY, a worker's full buffer waits for
# the hash to free some (``PrefixHasher.offer``) rather than be left to be read back from the
# file, which costs more CPU and I/O than the wait when the hash is what limits (measured
# through the API, 1 GiB over 50 MB/s-capped connections on 2 cores: without the wait, 7 of
# 11 downloads read 38-323 MB back and took 2.6-3.4 s; with it, 0-8 MB in each of 6, and
# 2.4-2.9 s for the five at 16 connections, under a load average of 2-3). The wait looks again
# every OFFER_WAIT_S and ends after OFFER_WAIT_MAX_S, so that a slow part at the hash's
# position holds the others back at most that long per buffer.
OFFER_WAIT_S = 0.05
OFFER_WAIT_MAX_S = 0.5
# The part the hash waits for counts as arriving (the others wait for memory) while its
# worker wrote some of it this recently; a stalled part lets the others' bytes go to be read
# back, as before.
PREFIX_LIVE_S = 0.25
SLOT_POLL_S = 0.1  # how often a waiting worker checks for a cancel or for no work left
# Automatic part size: about PARTS_PER_CONNECTION parts per connection, within these bounds.
# Small parts keep the hashed prefix close behind the receiving front (workers take the
# lowest unclaimed part), so little is left to read back once the last byte is in (1 GiB over
# 16 capped connections: 32 MiB parts left ~0.75 s of hashing after the last byte, 8 MiB
# parts ~0.2 s). A new connection's start is slow (1 GiB uncapped over one connection, a
# new one per part: 8 MiB parts 431 MiB/s, 32 MiB 522, 64 MiB 529), so each worker asks for
# its next part on the connection its last one came over (``_Kept``), and small parts cost
# no new connections.
PARTS_PER_CONNECTION = 4
MIN_AUTO_PART = 8 * 1024 * 1024
MAX_AUTO_PART = 64 * 1024 * 1024
PART_ALIGN = 64 * 1024
# Connections are added while they pay: after PROBE_WINDOW_S (engine.probe_window_s) of one
# connection's rate, a second one is tried; then more, in the steps of ``probe_ramp`` (1, 2,
# 8, 16, 32, ... up to engine.connections, MODELHOST_FETCH_CONNECTIONS). A step is kept when
# the connections it added each carry at least ``probe_share`` of what each connection carried
# before it (PROBE_SHARE for the second connection, then PROBE_SHARE_LATER, then
# PROBE_SHARE_DOUBLING); otherwise the added ones finish their part and stop. Past 8, the
# probe doubles again only after a doubling whose added connections each carried at least
# PROBE_SHARE_MORE: while gains are about linear, the per-connection caps are what limits;
# once they fall off, the machine (or the link) is, and more connections cost CPU. A
# per-connection cap rewards every connection; on a fast link one connection already fills
# the machine, and a second is refused.
PROBE_SHARE = 0.5
# Once a second connection has paid that (a per-connection cap is evident), later steps need
# less: past 8 capped connections on 2 cores the CPU limits, and 16 still add 15-65% to 8
# once settled (measured 2026-12-07/08 over 50 MB/s connections, load average 1-10).
PROBE_SHARE_LATER = 0.25
PROBE_SHARE_DOUBLING = 0.1
# Measured on the same machine: 8 -> 16 carried 0.15-0.66 of a connection's share each; 32,
# when tried, were never faster than 16 (CPU-bound), and the trial cost 0.3-0.5 s of a 1 GiB
# download (the refused workers finish their parts among 32, and more bytes wait ahead of
# the hash than AHEAD_MEMORY keeps). So a doubling step is followed by another only when
# its added connections carried at least this share.
PROBE_SHARE_MORE = 0.75
# A new connection's first send arrives at once (a capped server waits only after it): the
# rate is measured this share of a window after the added connections' first bytes, so that
# bursts do not make the connections before look faster than they are (measured: 8 capped
# at 400 MB/s read 451 right after starting).
PROBE_SETTLE = 0.25
# Past 8, the added connections start among connections that already keep the CPU busy, and
# the rate right after is no guide (measured on 2 cores, 8 -> 16 capped connections: within
# 0.3 s of the start as fast as 8, or slower, in 2 of 5 downloads; 700 MB/s once settled).
# A doubling is measured after a whole window: time at the new count, which costs nothing
# when the step is kept.
PROBE_SETTLE_DOUBLING = 1.0
# The ramp: one connection, then two, then PROBE_GROWTH times as many up to PROBE_FAST_UNTIL
# (1, 2, 8: few windows at less than the caps allow), then doubling (16, 32, ...): past 8
# capped connections the machine's CPU, not the caps, may be what limits, and a step of 8 to
# 32 whose gain a CPU limit halves would be refused where 8 to 16 pays.
PROBE_GROWTH = 4
PROBE_FAST_UNTIL = 8
PROBE_START_WINDOWS = 4  # windows to wait for added connections' first bytes
# A refused step is tried again after PROBE_AGAIN_S (measuring the rate before it again),
# twice as long after each refusal, at most PROBE_AGAIN_MAX_S: on a shared machine a busy
# moment made 8 capped connections measure 71 MB/s (and 2, 117), and a download that stayed
# at 2 connections for good took 9.6 s where 16 took 2.4.
PROBE_AGAIN_S = 1.0
PROBE_AGAIN_MAX_S = 32.0
EXPIRED_STATUSES = (403, 410)
MAX_RESOLVES_PER_REQUEST = 3


class VersionChanged(TransientFetchError):
    """A part came from another version of the file: the file restarts from zero."""


@dataclass
class Part:
    """One byte range ``[start, end)`` of the file; ``done`` bytes of it are written."""

    start: int
    end: int
    done: int = 0

    @property
    def position(self) -> int:
        return self.start + self.done

    @property
    def finished(self) -> bool:
        return self.start + self.done >= self.end


@dataclass
class PartMap:
    """What ``<key>.parts.json`` holds: the file, its validator, and every part's state."""

    url: str
    total: int
    etag: str | None
    last_modified: str | None
    parts: list[Part] = field(default_factory=list)
    version: int = MAP_VERSION

    @property
    def validator(self) -> str | None:
        """What ``If-Range`` sends: the strong ETag, else the Last-Modified date."""
        return strong_etag(self.etag) or self.last_modified

    @property
    def done(self) -> int:
        return sum(part.done for part in self.parts)

    def to_json(self) -> str:
        # By hand, not dataclasses.asdict: the map is rewritten every MAP_FLUSH_S while bytes
        # arrive, and asdict's deep copies cost 0.5 ms a time for 64 parts (this: a tenth).
        data = {
            "url": self.url,
            "total": self.total,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "parts": [{"start": p.start, "end": p.end, "done": p.done} for p in self.parts],
            "version": self.version,
        }
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> PartMap:
        data = json.loads(text)
        parts = [Part(**part) for part in data.pop("parts")]
        return cls(parts=parts, **data)

    def is_consistent(self, spec: FileSpec) -> bool:
        """Whether the map describes ``spec``'s file: same URL and size, parts that tile
        ``[0, total)`` in order, each with a plausible count of bytes done."""
        if self.version != MAP_VERSION or self.url != spec.url or self.validator is None:
            return False
        if spec.size is not None and self.total != spec.size:
            return False
        position = 0
        for part in self.parts:
            if part.start != position or part.end <= part.start:
                return False
            if not 0 <= part.done <= part.end - part.start:
                return False
            position = part.end
        return position == self.total


def auto_part_size(total: int, connections: int) -> int:
    """About ``PARTS_PER_CONNECTION`` parts per connection (a worker that finishes early
    takes another), each between 8 and 64 MiB and small enough that one part per connection
    fits in ``AHEAD_MEMORY`` (the bytes ahead of the hash stay in memory), aligned to 64 KiB."""
    connections = max(1, connections)
    size = -(-total // (PARTS_PER_CONNECTION * connections))
    largest = max(MIN_AUTO_PART, min(MAX_AUTO_PART, AHEAD_MEMORY // connections))
    size = max(MIN_AUTO_PART, min(largest, size))
    return -(-size // PART_ALIGN) * PART_ALIGN


def probe_step(count: int) -> int:
    """How many connections the probe adds to ``count`` running ones (see PROBE_GROWTH)."""
    if count <= 1:
        return 1
    if count < PROBE_FAST_UNTIL:
        return min(count * (PROBE_GROWTH - 1), PROBE_FAST_UNTIL - count)
    return count


def probe_share(count: int) -> float:
    """What each connection added to ``count`` running ones must carry, as a share of what
    each of those carried, for the step to be kept (see PROBE_SHARE)."""
    if count <= 1:
        return PROBE_SHARE
    return PROBE_SHARE_LATER if count < PROBE_FAST_UNTIL else PROBE_SHARE_DOUBLING


def _carried(before: float, after: float, count: int, step: int) -> float:
    """What each of ``step`` connections added to ``count`` carried (the rate going from
    ``before`` to ``after``), as a share of what each of the ``count`` carried before."""
    if before <= 0:
        return float("inf") if after > 0 else 0.0
    return (after - before) * count / (step * before)


def probe_settle(count: int) -> float:
    """How long (in windows) the probe lets ``count`` connections, some just added, settle
    before it measures them (see PROBE_SETTLE_DOUBLING)."""
    return PROBE_SETTLE if count <= PROBE_FAST_UNTIL else PROBE_SETTLE_DOUBLING


def probe_ramp(connections: int) -> list[int]:
    """The connection counts the probe tries in turn, up to ``connections`` (each kept only
    while the added ones pay): 1, 2, 8, 16, 32 for 32."""
    counts = [1]
    while counts[-1] < connections:
        counts.append(min(connections, counts[-1] + probe_step(counts[-1])))
    return counts


def split(total: int, part_size: int) -> list[Part]:
    """The parts of a ``total``-byte file, ``part_size`` bytes each (the last one shorter)."""
    return [Part(start, min(total, start + part_size)) for start in range(0, total, part_size)]


def load_map(path: Path, spec: FileSpec) -> PartMap | None:
    """The saved part map of ``spec``, None when there is none or it does not fit."""
    try:
        saved = PartMap.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return saved if saved.is_consistent(spec) else None


def save_map(path: Path, state: PartMap) -> None:
    """Write the map atomically (a temporary file renamed over it): a kill mid-write leaves
    the previous map, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(state.to_json())
    os.replace(temporary, path)


def done_bytes(path: Path) -> int | None:
    """Bytes a saved part map says are written (None without a readable map)."""
    try:
        return PartMap.from_json(path.read_text()).done
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


class AheadMemory:
    """Bytes of receive buffers that one engine's parted downloads, together, may keep for
    the hash ahead of its position (``AHEAD_MEMORY``), beyond the buffers being filled."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, over: bool = False) -> bool:
        """Reserve ``nbytes`` if they fit, or with ``over`` (bytes the hash takes next and
        gives back at once) beyond a spent budget; False when they do not fit. A budget
        smaller than ``nbytes`` keeps nothing, ``over`` or not."""
        with self._lock:
            if self._held + nbytes > self.limit and not (over and nbytes <= self.limit):
                return False
            self._held += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes

    @property
    def held(self) -> int:
        with self._lock:
            return self._held


class PrefixHasher:
    """sha256 (and the git blob id when asked) of the file's contiguous written prefix.

    Workers report every write (``wrote``) and offer each full buffer (``offer``) once its
    bytes are in the file. A buffer at or ahead of the hash's position is kept (within the
    engine's ``AheadMemory``) until the prefix reaches it, and hashed from memory; anything
    else is read back from the file once the prefix reaches it (around the page cache where
    the file system allows: parts are written with O_DIRECT, so their pages are on disk
    only; measured: reading back 1 GiB so took 1.6 s, more than hashing it). Parts a worker
    is receiving are read back only up to the start of that worker's current buffer, which
    it will offer itself. Buffers come from and go back to a pool (``take``/``give``):
    page-aligned, so that workers write them with O_DIRECT, and reused, because faulting
    fresh anonymous pages in costs a small VM as much as the page cache does.
    """

    def __init__(
        self, path: Path, state: PartMap, git_size: int | None, memory: AheadMemory
    ) -> None:
        self._state = state
        self._memory = memory
        self._fd = os.open(path, os.O_RDONLY)
        self._direct_fd = open_direct_read(path)
        self.digest = hashlib.sha256()
        self.git_digest = hashlib.sha1(f"blob {git_size}\0".encode()) if git_size else None
        self._lock = threading.Condition()
        self._queued = 0  # the next byte to hash (everything before it is hashed or taken)
        self._kept: dict[int, tuple[mmap.mmap, int]] = {}  # offset -> (buffer, length)
        self._pool: list[mmap.mmap] = []
        self._receiving: dict[int, int] = {}  # part index -> start of its worker's buffer
        self._wrote_at: dict[int, float] = {}  # part start -> when its worker last wrote
        self._stopped = False
        self._error: BaseException | None = None
        self._nice = thread_nice()
        self.from_memory = 0  # bytes hashed from the workers' buffers
        self.read_back = 0  # bytes read back from the file
        self._thread = threading.Thread(target=self._run, name="modelhost-sha256-parts")
        self._thread.daemon = True
        self._thread.start()

    def take(self) -> mmap.mmap:
        """A free receive buffer (``PART_BUFFER`` bytes, page-aligned)."""
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return mmap.mmap(-1, PART_BUFFER)

    def give(self, buffer: mmap.mmap) -> None:
        """Return a buffer nobody uses any more to the pool."""
        with self._lock:
            self._pool.append(buffer)

    def receiving(self, index: int, buffer_start: int | None) -> None:
        """Part ``index``'s worker now fills a buffer from ``buffer_start`` (None: no worker)."""
        with self._lock:
            if buffer_start is None:
                self._receiving.pop(index, None)
            else:
                self._receiving[index] = buffer_start
            self._lock.notify_all()

    def wrote(self, part: Part, nbytes: int) -> None:
        """``nbytes`` more of ``part`` are in the file."""
        with self._lock:
            part.done += nbytes
            self._wrote_at[part.start] = time.monotonic()
            self._lock.notify_all()

    def offer(
        self, offset: int, buffer: mmap.mmap, length: int, stop: CancelToken | None = None
    ) -> bool:
        """Keep ``buffer[:length]`` (the bytes at ``offset``, already in the file) to hash
        from memory when the prefix gets there; True means the hasher took the buffer (it
        goes back to the pool once hashed) and the caller needs another. False: the hash
        is past ``offset`` already, or the memory budget is spent (read back instead).

        A spent budget is waited for (up to ``OFFER_WAIT_MAX_S``) while this hash is busy
        with the bytes before ``offset``, or they are arriving, and it holds buffers it will
        free: then the hash is what limits, and reading back costs more than waiting (the
        caller's connection waits meanwhile). While the part the hash needs stalls, the
        bytes are read back."""
        deadline = time.monotonic() + OFFER_WAIT_MAX_S
        with self._lock:
            while True:
                if offset < self._queued or self._stopped or offset in self._kept:
                    return False
                # The buffer the hash needs next is always kept: it is hashed at once.
                if self._memory.take(PART_BUFFER, over=offset == self._queued):
                    self._kept[offset] = (buffer, length)
                    self._lock.notify_all()
                    return True
                if not self._kept or not self._busy():
                    return False
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.cancelled):
                    return False
                self._lock.wait(min(left, OFFER_WAIT_S))

    def _busy(self) -> bool:
        """Whether the hash has bytes to hash now (kept, or to read back), or will have in
        a moment: the first part it lacks is arriving (its worker wrote some of it within
        ``PREFIX_LIVE_S``), under the lock. Not busy: that part stalls, or has no worker."""
        if self._queued in self._kept:
            return True
        if min(self._readable_until(), self._next_kept()) > self._queued:
            return True
        first = next((part for part in self._state.parts if not part.finished), None)
        if first is None or first.start not in self._wrote_at:
            return False
        return time.monotonic() - self._wrote_at[first.start] < PREFIX_LIVE_S

    def snapshot(self) -> list[Part]:
        """A consistent copy of the parts' progress (for the part map)."""
        with self._lock:
            return [Part(p.start, p.end, p.done) for p in self._state.parts]

    def _readable_until(self) -> int:
        """The end of what may be read back now (under the lock)."""
        for index, part in enumerate(self._state.parts):
            if part.finished:
                continue
            limit = self._receiving.get(index)
            return part.position if limit is None else min(limit, part.position)
        return self._state.total

    def _next(self) -> tuple[mmap.mmap, int] | tuple[int, int] | None:
        """The next piece of work: a kept buffer, a range to read back, or None to stop."""
        with self._lock:
            while True:
                self._drop_passed()
                kept = self._kept.pop(self._queued, None)
                if kept is not None:
                    self._memory.give(PART_BUFFER)
                    self._lock.notify_all()  # an offer may wait for the memory
                    self._queued += kept[1]
                    return kept
                if self._queued >= self._state.total or self._stopped:
                    return None
                until = min(self._readable_until(), self._next_kept())
                if until > self._queued:
                    start = self._queued
                    length = min(READ_BACK - start % DIRECT_ALIGN, until - start)
                    self._queued += length
                    self._lock.notify_all()
                    return start, length
                self._lock.wait()

    def _next_kept(self) -> int:
        """Where the first kept buffer ahead of the hash starts (under the lock): the
        read-back stops there."""
        return min(self._kept, default=self._state.total)

    def _drop_passed(self) -> None:
        """Return kept buffers the hash has gone past (a retried part's buffer that begins
        inside an earlier one) to the pool (under the lock)."""
        for offset in [o for o in self._kept if o < self._queued]:
            buffer, _ = self._kept.pop(offset)
            self._memory.give(PART_BUFFER)
            self._pool.append(buffer)

    def _update(self, data: memoryview) -> None:
        self.digest.update(data)
        if self.git_digest is not None:
            self.git_digest.update(data)

    def _read(self, scratch: mmap.mmap, start: int, length: int) -> memoryview:
        """``length`` bytes of the file at ``start``: whole blocks with O_DIRECT (the written
        bytes around them are in the file too), else through the page cache."""
        if self._direct_fd is not None:
            low = start - start % DIRECT_ALIGN
            high = -(-(start + length) // DIRECT_ALIGN) * DIRECT_ALIGN
            try:
                got = os.preadv(self._direct_fd, [memoryview(scratch)[: high - low]], low)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self._direct_fd)  # this file system wants another alignment
                self._direct_fd = None
            else:
                if got < start + length - low:
                    raise OSError(f"read back {got} of {high - low} bytes at {low}")
                return memoryview(scratch)[start - low : start - low + length]
        view = memoryview(scratch)[:length]
        got = os.preadv(self._fd, [view], start)
        if got != length:
            raise OSError(f"read back {got} of {length} bytes at {start}")
        return view

    def _run(self) -> None:
        set_thread_nice(self._nice)  # hash at the priority of the transfer it serves
        scratch = mmap.mmap(-1, READ_BACK)
        try:
            while (work := self._next()) is not None:
                first, length = work
                if isinstance(first, mmap.mmap):
                    self._update(memoryview(first)[:length])
                    self.from_memory += length
                    self.give(first)
                    continue
                self._update(self._read(scratch, first, length))
                self.read_back += length
        except BaseException as exc:  # reported by finish(); the download fails with it
            self._error = exc

    def finish(self) -> tuple[str, str | None]:
        """Wait for the whole file to be hashed; returns (sha256, git blob id)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.digest.hexdigest(), (
            None if self.git_digest is None else self.git_digest.hexdigest()
        )

    def close(self) -> None:
        """Stop hashing (an abandoned download), release the file and the kept buffers."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join()
        with self._lock:
            self._memory.give(PART_BUFFER * len(self._kept))
            self._kept.clear()
            self._pool.clear()
        os.close(self._fd)
        if self._direct_fd is not None:
            os.close(self._direct_fd)


class Slots:
    """The engine's global connection cap (``MODELHOST_FETCH_MAX_CONNECTIONS``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore = threading.Semaphore(limit)

    def acquire(self, cancel: CancelToken, wanted: threading.Event | None = None) -> bool:
        """Take a slot, waiting as long as needed; False if ``wanted`` is cleared meanwhile
        (no work left). Raises ``Cancelled``."""
        while True:
            cancel.raise_if_cancelled()
            if wanted is not None and not wanted.is_set():
                return False
            if self._semaphore.acquire(timeout=SLOT_POLL_S):
                return True

    def release(self) -> None:
        self._semaphore.release()


class _Kept:
    """A worker's kept-alive connection between two parts: a new connection's first
    megabytes are slow (measured, 1 GiB over loopback in 8 MiB parts: 850-900 MiB/s with a
    new connection per part, 1,400-1,460 on one kept connection), so parts may be small."""

    def __init__(self) -> None:
        self.connection: http.client.HTTPConnection | None = None

    def take(self) -> http.client.HTTPConnection | None:
        connection, self.connection = self.connection, None
        return connection

    def close(self) -> None:
        connection = self.take()
        if connection is not None:
            connection.close()


@dataclass
class _Shared:
    """What the workers of one download share, under ``lock``."""

    url: str | None  # the URL parts are asked from (a redirect's target), None: resolve
    next_index: int = 0
    claimed: set[int] = field(default_factory=set)
    error: BaseException | None = None
    resolutions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    resolve_lock: threading.Lock = field(default_factory=threading.Lock)


class PartedDownload:
    """One file fetched as parts by several workers; ``run`` blocks until it is verified."""

    def __init__(
        self,
        engine: FetchEngine,
        spec: FileSpec,
        state: PartMap,
        progress: FileProgress,
        cancel: CancelToken,
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.state = state
        self.progress = progress
        self.cancel = cancel
        self.part_path, self.meta_path = engine.partial_paths(spec)
        self.map_path = engine.parts_map_path(spec)
        self.shared = _Shared(url=None)
        # Stops every worker: the caller's cancel, or the first part that fails.
        self.stop = CancelToken()
        self.more_work = threading.Event()
        # Connection probing: at most ``allowed`` workers run; one too many leaves after its
        # part (``_stay``), and a new one starts only below it (``_join``).
        self.allowed = engine.connections
        self.peak_workers = 1  # the most workers running at once (for logs and tests)
        self._running = 1  # the first worker, the caller's thread
        self._gate = threading.Lock()
        self._live: set[int] = set()  # threads that have received bytes
        self._live_changed = threading.Condition()
        self._first_done = threading.Event()  # the first worker found no more work
        self._flushed_at = 0.0
        self._flush_lock = threading.Lock()
        self.hasher: PrefixHasher | None = None

    # --- the whole download ---------------------------------------------------------------

    def run(self, first: OpenResponse | None) -> tuple[Path, int, str]:
        """Fetch every unfinished part (``first``: part 0's open response), hash, verify;
        the caller holds one connection slot, used by the first worker."""
        unlink_cancel = self.cancel.on_cancel(lambda: self.stop.cancel(self.cancel.reason))
        self.progress.add_existing(self.state.done)
        git_size = self.state.total if self.spec.git_sha1 else None
        self.hasher = PrefixHasher(self.part_path, self.state, git_size, self.engine.ahead_memory)
        helpers: list[threading.Thread] = []
        prober: threading.Thread | None = None
        unlink_wake = self.stop.on_cancel(self._first_done.set)
        try:
            self.more_work.set()
            first_index = self._claim()
            if first_index is not None:
                opened = first or self._open_part(self.state.parts[first_index])
                prober = threading.Thread(
                    target=self._grow, args=(helpers,), name="modelhost-parts-probe", daemon=True
                )
                prober.start()
                self._work(first_index, opened, 0)
            self.more_work.clear()
            self._first_done.set()
            if prober is not None:
                prober.join()
            for helper in helpers:
                helper.join()
            self._raise_if_failed()
            self.progress.set_status("verifying")  # every byte is in; the hash may lag
            self._flush(force=True)
            digest, git_digest = self.hasher.finish()
            log.debug(
                "%s: %d bytes hashed as they arrived, %d read back",
                self.spec.path,
                self.hasher.from_memory,
                self.hasher.read_back,
            )
        finally:
            self.more_work.clear()
            self.stop.cancel("download ended")
            if prober is not None:
                prober.join()
            for helper in helpers:
                helper.join()
            unlink_wake()
            unlink_cancel()
            self.hasher.close()
        return self._verified(digest, git_digest)

    def _verified(self, digest: str, git_digest: str | None) -> tuple[Path, int, str]:
        fd = os.open(self.part_path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            verify(self.spec, size, digest, git_digest)
        except FetchError:
            self.engine.discard(self.spec)
            raise
        return self.part_path, size, digest

    def _raise_if_failed(self) -> None:
        error = self.shared.error
        if self.cancel.cancelled:
            self._flush(force=True)
            raise Cancelled(self.cancel.reason)
        if error is None:
            missing = [i for i, part in enumerate(self.state.parts) if not part.finished]
            if missing:  # no worker failed, yet parts are left: never hash a file with holes
                self._flush(force=True)
                raise TransientFetchError(f"{self.spec.url}: parts {missing} were not fetched")
            return
        if isinstance(error, VersionChanged):
            self.engine.discard(self.spec)  # never splice: the next attempt starts over
        else:
            self._flush(force=True)  # what is written stays, for a later resume
        raise error

    def _grow(self, helpers: list[threading.Thread]) -> None:
        """Start the other workers (into ``helpers``): all at once without probing, else
        adding more in the steps of ``probe_ramp`` while the added ones pay (see
        PROBE_SHARE, PROBE_SHARE_MORE). A refused step is tried again later (PROBE_AGAIN_S)."""
        target = min(self.engine.connections, len(self.state.parts))
        window = self.engine.probe_window_s
        if window is None:
            self._start_helpers(helpers, target - 1)
            return
        count = 1
        if not self._wait_live(1, window * PROBE_START_WINDOWS):
            return
        rate = self._measure(window)
        if rate is not None:
            log.debug("%s: 1 connection: %.2f MB/s", self.spec.path, rate / 1e6)
        pause = PROBE_AGAIN_S
        while count < target and rate is not None and self.more_work.is_set():
            step = min(probe_step(count), target - count)
            now = self._try(helpers, count, step, window)
            if now is None:
                return
            carried = _carried(rate, now, count, step)
            if carried >= probe_share(count):
                count, rate = count + step, now
                if count > PROBE_FAST_UNTIL and carried < PROBE_SHARE_MORE and count < target:
                    log.info(
                        "%s: the last %d connections carried %.2f of a connection's share "
                        "each: staying at %d", self.spec.path, step, carried, count,
                    )
                    self._allow(count)
                    return
                continue
            log.info(
                "%s: %d connections gave %.1f MB/s, %d gave %.1f: staying at %d, for %.0f s",
                self.spec.path, count, rate / 1e6, count + step, now / 1e6, count, pause,
            )
            self._allow(count)  # the added workers finish their part, then leave
            # A busy moment (of the CPU, of the network) can make a step look useless: the
            # same step is tried again later, less often each time it is refused.
            if self._first_done.wait(pause) or not self._wait_running(count):
                return
            pause = min(2 * pause, PROBE_AGAIN_MAX_S)
            rate = self._measure(window)

    def _try(
        self, helpers: list[threading.Thread], count: int, step: int, window: float
    ) -> float | None:
        """Run ``count + step`` workers (starting those missing) and measure their rate;
        None, back at ``count``, when they do not all start (no slot, no part left) or the
        download ends."""
        self._allow(count + step)
        with self._gate:
            missing = count + step - self._running
        self._start_helpers(helpers, missing)
        if not self._wait_live(count + step, window * PROBE_START_WINDOWS):
            log.debug(
                "%s: %d connections did not all start (no slot or no part left): "
                "staying at %d", self.spec.path, count + step, count,
            )
            self._allow(count)  # no slot or no work for them: do without
            return None
        now = self._measure(window, probe_settle(count + step))
        if now is None:
            self._allow(count)
            return None
        log.debug("%s: %d connections: %.2f MB/s", self.spec.path, count + step, now / 1e6)
        return now

    def _allow(self, count: int) -> None:
        with self._gate:
            self.allowed = count

    def _join(self) -> bool:
        """Whether a new worker may start (fewer than ``allowed`` run); it then runs."""
        with self._gate:
            if self._running >= self.allowed:
                return False
            self._running += 1
            self.peak_workers = max(self.peak_workers, self._running)
            return True

    def _stay(self) -> bool:
        """Whether a worker that finished its part may take another: not when more than
        ``allowed`` run (it then no longer counts as running)."""
        with self._gate:
            if self._running > self.allowed:
                self._running -= 1
                return False
            return True

    def _leave(self) -> None:
        with self._gate:
            self._running -= 1

    def _wait_running(self, count: int) -> bool:
        """Wait until at most ``count`` workers run (the refused ones have left); False at
        the end of the work."""
        while True:
            with self._gate:
                if self._running <= count:
                    return True
            if self._first_done.wait(SLOT_POLL_S) or not self.more_work.is_set():
                return False

    def _measure(self, window: float, settle: float = PROBE_SETTLE) -> float | None:
        """This file's receive rate over ``window`` seconds, from ``settle`` of a window on
        (None: it ended)."""
        if self._first_done.wait(window * settle):
            return None
        started, before = time.monotonic(), self.progress.transferred
        if self._first_done.wait(window):
            return None
        return (self.progress.transferred - before) / (time.monotonic() - started)

    def _wait_live(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` workers have received bytes; False at the timeout, the stop
        or the end of the work."""
        deadline = time.monotonic() + timeout
        with self._live_changed:
            while len(self._live) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._first_done.is_set() or not self.more_work.is_set():
                    return False
                self._live_changed.wait(min(left, SLOT_POLL_S))
        return True

    def _received(self, nbytes: int) -> None:
        """Note that this worker's connection delivers (the probe waits for that)."""
        ident = threading.get_ident()
        if nbytes and ident not in self._live:
            with self._live_changed:
                self._live.add(ident)
                self._live_changed.notify_all()

    def _start_helpers(self, helpers: list[threading.Thread], count: int) -> None:
        nice = thread_nice()
        for _ in range(max(0, count)):
            number = len(helpers) + 1
            helper = threading.Thread(
                target=self._helper,
                args=(nice, number),
                name=f"modelhost-part-{number}",
                daemon=True,
            )
            helper.start()
            helpers.append(helper)

    def _helper(self, nice: int | None, number: int) -> None:
        """A worker beyond the first: takes a global slot while there is work left, and
        runs while the probe allows it."""
        set_thread_nice(nice)
        try:
            if not self.engine.slots.acquire(self.stop, self.more_work):
                return
        except Cancelled:
            return
        try:
            if not self._join():
                return
            left = False
            try:
                index = self._claim()
                if index is not None:
                    left = self._work(index, None, number)
            finally:
                if not left:
                    self._leave()
                with self._live_changed:
                    self._live.discard(threading.get_ident())
        finally:
            self.engine.slots.release()

    def _claim(self) -> int | None:
        """The lowest unfinished part no worker has, now this worker's; None: no work."""
        with self.shared.lock:
            for index in range(self.shared.next_index, len(self.state.parts)):
                part = self.state.parts[index]
                if index in self.shared.claimed or part.finished:
                    continue
                self.shared.claimed.add(index)
                self.shared.next_index = index + 1
                return index
            self.more_work.clear()
            return None

    def _fail(self, error: BaseException) -> None:
        with self.shared.lock:
            if self.shared.error is None:
                self.shared.error = error
        self.stop.cancel(f"another part failed: {error}")

    def _work(self, index: int | None, opened: OpenResponse | None, number: int) -> bool:
        """Fetch claimed parts one after another until none is left (or the stop, or the
        probe runs fewer workers: the first, ``number`` 0, always stays). True: this worker
        left for the probe (it no longer counts as running)."""
        fd = os.open(self.part_path, os.O_RDWR)
        kept = _Kept()  # this worker's connection between parts
        try:
            while index is not None:
                try:
                    self._fetch_part(fd, index, opened, kept)
                except Cancelled:
                    return False
                except BaseException as exc:  # the first failure stops the others
                    self._fail(exc)
                    return False
                opened = None
                if number and not self._stay():
                    return True
                index = self._claim()
        finally:
            kept.close()
            os.close(fd)
        return False

    # --- one part -------------------------------------------------------------------------

    def _fetch_part(
        self, fd: int, index: int, opened: OpenResponse | None, kept: _Kept
    ) -> None:
        """Fetch part ``index`` to its end, resuming after transient faults with backoff
        (the retry count starts over whenever an attempt moved enough bytes). A response
        read to its end leaves its connection in ``kept`` for the worker's next part."""
        part = self.state.parts[index]
        retry = self.engine.retry
        attempt = 0
        while not part.finished:
            self.stop.raise_if_cancelled()
            before = part.done
            try:
                response = opened or self._open_part(part, kept.take())
                opened = None
                received = 0
                try:
                    self._check_part_response(part, response)
                    received = self._receive_part(fd, index, part, response)
                finally:
                    if part.finished:
                        kept.connection = response.keep(received)
                    else:
                        response.close()
            except VersionChanged:
                raise
            except TransientFetchError as exc:
                self.stop.raise_if_cancelled()
                if part.done - before >= PROGRESS_RESETS_RETRIES:
                    attempt = 0
                if attempt >= retry.retries:
                    raise FetchError(
                        f"{exc.message} (part {index + 1} of {len(self.state.parts)}: gave up "
                        f"after {attempt + 1} attempts)",
                        error="Download failed",
                    ) from exc
                delay = retry.delay(attempt)
                log.info("retrying part %d of %s in %.2fs: %s", index, self.spec.url, delay, exc)
                self.stop.sleep(delay)
                attempt += 1
        self._flush(force=True)

    def _part_headers(self, part: Part) -> dict[str, str]:
        validator = self.state.validator
        assert validator is not None  # a map without one is never used
        return {"Range": f"bytes={part.position}-{part.end - 1}", "If-Range": validator}

    def _open_part(
        self, part: Part, reuse: http.client.HTTPConnection | None = None
    ) -> OpenResponse:
        """Open the rest of ``part`` from the resolved URL (on ``reuse``, a kept-alive
        connection, when it goes there); a 403/410 there (an expired signed URL) re-resolves
        the original URL, whose redirects lead to a fresh one."""
        headers = self._part_headers(part)
        for _ in range(MAX_RESOLVES_PER_REQUEST):
            with self.shared.lock:
                url = self.shared.url
            if url is None:  # a resumed download: its old target may have expired
                if reuse is not None:
                    reuse.close()
                    reuse = None
                resolved = self._resolve(None, headers)
                if resolved is not None:
                    return resolved
                continue
            response = self.engine.open(url, headers=headers, cancel=self.stop, reuse=reuse)
            reuse = None
            if response.status not in EXPIRED_STATUSES or url == self.spec.url:
                return response
            response.close()
            log.info("%s answered %d: asking %s again", url, response.status, self.spec.url)
            resolved = self._resolve(url, headers)
            if resolved is not None:
                return resolved
        raise FetchError(
            f"{self.spec.url}: the URLs it redirects to kept expiring", error="Download failed"
        )

    def _resolve(self, stale: str | None, headers: dict[str, str]) -> OpenResponse | None:
        """Ask the original URL (following redirects) for this part, unless another worker
        already replaced ``stale`` meanwhile (then None: use theirs)."""
        with self.shared.resolve_lock:
            with self.shared.lock:
                if self.shared.url != stale:
                    return None
            response = self.engine.open(self.spec.url, headers=headers, cancel=self.stop)
            with self.shared.lock:
                if stale is not None:
                    self.shared.resolutions += 1
                if response.status not in EXPIRED_STATUSES:
                    self.shared.url = response.url
            if response.status in EXPIRED_STATUSES:
                status = response.status
                response.close()
                raise upstream_error(
                    status, f"Upstream answered {status} for {self.spec.url} (asked again)"
                )
            return response

    def _check_part_response(self, part: Part, response: OpenResponse) -> None:
        """Raise unless ``response`` is the asked range of the same version."""
        if response.status == 206:
            match = CONTENT_RANGE.match(response.header("Content-Range") or "")
            expected = (str(part.position), str(part.end - 1), str(self.state.total))
            if match is None or match.groups() != expected:
                raise VersionChanged(
                    f"{response.url} answered range {response.header('Content-Range')!r} for "
                    f"bytes {part.position}-{part.end - 1} of {self.state.total}; the file "
                    "changed: restarting it from zero"
                )
            etag, modified = response.header("ETag"), response.header("Last-Modified")
            if (etag is not None and self.state.etag is not None and etag != self.state.etag) or (
                self.state.etag is None and modified and modified != self.state.last_modified
            ):
                raise VersionChanged(
                    f"{response.url} is another version now (ETag {etag}, was "
                    f"{self.state.etag}); restarting the file from zero"
                )
            return
        if response.status in (200, 416):
            # If-Range did not match (a new version), or ranges are no longer honoured.
            raise VersionChanged(
                f"{response.url} answered {response.status} to a part's ranged request: the "
                "file changed upstream; restarting it from zero"
            )
        raise error_for_status(response)

    def _receive_part(self, fd: int, index: int, part: Part, response: OpenResponse) -> int:
        """Write the body where it belongs, as the single stream does (``PartWriter``: whole
        blocks with O_DIRECT once enough wait, everything received before waiting for the
        network, so a kill loses only what was in flight), counting in the map only bytes
        written, and handing full buffers to the hasher; raises at a short body. Returns the
        bytes received (the whole body)."""
        assert self.hasher is not None
        hasher, throttle = self.hasher, self.progress.throttle
        remaining = wanted = part.end - part.position
        throttle.fit_socket(response.connection.sock, self.engine.connections)
        read_some = body_reader(response.response, remaining)
        ready = ready_to_read(response)
        unregister = self.stop.on_cancel(response.shutdown)
        # Direct writes start at the block holding the resume offset; never in a block
        # that begins in the part before (its worker may still be writing it).
        aligned_start = part.position - part.position % DIRECT_ALIGN
        writer = PartWriter(self.part_path, fd, part.position, aligned_start >= part.start)
        buffer = hasher.take()
        view = memoryview(buffer)
        fill = writer.start(view)
        buffer_start = writer.base
        hasher.receiving(index, buffer_start)
        try:
            while remaining:
                if writer.pending(fill) and not ready():
                    self._write(writer, part, view, fill, urgent=True)  # we wait: all of it
                want = min(PART_BUFFER - fill, remaining, throttle.max_read(PART_BUFFER))
                try:
                    n = read_some(view[fill : fill + want])
                except (OSError, ValueError) as exc:
                    self.stop.raise_if_cancelled()
                    raise TransientFetchError(
                        f"Connection lost at byte {writer.base + fill} of {response.url}: "
                        f"{exc or type(exc).__name__}"
                    ) from exc
                if not n:
                    self.stop.raise_if_cancelled()
                    raise TransientFetchError(
                        f"Connection closed at byte {writer.base + fill} of {response.url} "
                        f"({remaining} bytes of part {index + 1} missing)"
                    )
                fill, remaining = fill + n, remaining - n
                self._write(writer, part, view, fill, urgent=not remaining)
                self._received(n)
                self.progress.add(n)  # sleeps here when a bandwidth cap says so
                if fill == PART_BUFFER or not remaining:
                    if hasher.offer(buffer_start, buffer, fill, self.stop):
                        buffer = hasher.take()
                        view = memoryview(buffer)
                    writer.next_buffer(fill)
                    fill, buffer_start = 0, writer.base
                    hasher.receiving(index, buffer_start)
                self._flush()
                self.stop.raise_if_cancelled()
        finally:
            try:
                self._write(writer, part, view, fill, urgent=True)
            finally:
                writer.close()
                unregister()
                hasher.receiving(index, None)
                hasher.give(buffer)
        return wanted

    def _write(
        self, writer: PartWriter, part: Part, view: memoryview, fill: int, urgent: bool
    ) -> None:
        """Let ``writer`` write what it will of ``view[:fill]``; the part's ``done`` grows by
        what reached the file, so that the map never records bytes still in memory."""
        before = writer.end
        writer.write(view, fill, urgent=urgent)
        if writer.end > before:
            assert self.hasher is not None
            self.hasher.wrote(part, writer.end - before)

    def _flush(self, force: bool = False) -> None:
        """Rewrite the part map (at most every ``MAP_FLUSH_S`` unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._flushed_at < MAP_FLUSH_S:
            return
        if not self._flush_lock.acquire(blocking=force):
            return  # another worker is writing it right now
        try:
            assert self.hasher is not None
            self._flushed_at = now
            snapshot = PartMap(
                url=self.state.url,
                total=self.state.total,
                etag=self.state.etag,
                last_modified=self.state.last_modified,
                parts=self.hasher.snapshot(),
            )
            save_map(self.map_path, snapshot)
        finally:
            self._flush_lock.release()


class InParts:
    """The parts strategy (``fetch/transfer.py: Strategy``): ``fetch_in_parts`` with the
    engine's single stream, which takes over a server's ``200`` to the first ranged request.
    The engine passes the single stream in, so that this module never imports it."""

    def __init__(self, engine: FetchEngine, single: SingleStream) -> None:
        self.engine = engine
        self.single = single

    def run(
        self, spec: FileSpec, progress: FileProgress, cancel: CancelToken
    ) -> tuple[Path, int, str] | None:
        """One attempt in parts, or None: the file goes as one stream after all."""
        return fetch_in_parts(self.engine, spec, progress, cancel, self.single)


def fetch_in_parts(
    engine: FetchEngine,
    spec: FileSpec,
    progress: FileProgress,
    cancel: CancelToken,
    single: SingleStream,
) -> tuple[Path, int, str] | None:
    """Fetch ``spec`` as parts: resume its saved part map, or start one by asking for part 0.

    A server that answers that first request with 200 (no range support) has its response
    streamed whole by ``single``, as one connection. Returns None when the server honours
    ranges but gives no validator to ask the other parts with: the caller then fetches it as
    one stream. The caller holds one connection slot.
    """
    part_path, meta_path = engine.partial_paths(spec)
    map_path = engine.parts_map_path(spec)
    saved = load_map(map_path, spec)
    if saved is not None and part_path.exists():
        meta_path.unlink(missing_ok=True)
        return PartedDownload(engine, spec, saved, progress, cancel).run(None)
    engine.discard(spec)  # a map that does not fit, or a .part without its map
    if spec.size is None or spec.size < engine.part_threshold or engine.connections < 2:
        return None  # a map was left for a file that no longer goes in parts
    part_size = engine.part_size or auto_part_size(spec.size, engine.connections)
    part_size = -(-part_size // DIRECT_ALIGN) * DIRECT_ALIGN  # parts own whole blocks
    layout = split(spec.size, part_size)
    headers = {"Range": f"bytes=0-{layout[0].end - 1}"}
    response = engine.open(spec.url, headers=headers, cancel=cancel)
    progress.throttle.fit_socket(response.connection.sock)
    handed_over = False
    try:
        if response.status == 200:
            log.info("%s ignores Range: fetching it as one stream", response.url)
            return single.receive(spec, response, part_path, meta_path, 0, None, progress, cancel)
        state = _first_part_state(spec, response, layout)
        if state is None:
            log.info("%s gives no validator: fetching it as one stream", response.url)
            return None
        with open(part_path, "wb"):
            pass  # an empty file the parts are written into
        save_map(map_path, state)
        download = PartedDownload(engine, spec, state, progress, cancel)
        download.shared.url = response.url
        handed_over = True  # the first worker reads and closes it
        return download.run(response)
    finally:
        if not handed_over:
            response.close()


def _first_part_state(spec: FileSpec, response: OpenResponse, layout: list[Part]) -> PartMap | None:
    """The part map a 206 for part 0 starts (None: no validator); raises for other answers."""
    if response.status != 206:
        raise error_for_status(response)
    match = CONTENT_RANGE.match(response.header("Content-Range") or "")
    total = spec.size
    if match is None or match.group(1) != "0" or match.group(2) != str(layout[0].end - 1):
        raise TransientFetchError(
            f"{response.url} answered range {response.header('Content-Range')!r} for "
            f"bytes 0-{layout[0].end - 1}"
        )
    if match.group(3) != str(total):
        raise SizeMismatch(
            f"{spec.url} is {match.group(3)} bytes upstream, expected {total}; "
            "the file changed upstream or the expected size is wrong"
        )
    state = PartMap(
        url=spec.url,
        total=int(match.group(3)),
        etag=response.header("ETag"),
        last_modified=response.header("Last-Modified"),
        parts=layout,
    )
    return state if state.validator is not None else None
