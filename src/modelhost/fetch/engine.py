"""The fetch engine: the one place that moves bytes, for every source.

Each file streams into ``<partial_dir>/<key>.part`` beside a ``<key>.json`` that records the
URL and the validator (ETag / Last-Modified) the bytes came with. After a dropped connection,
or after the whole process was killed, the next attempt sends ``Range`` + ``If-Range`` and
appends; a server that answers 200 instead, or a validator that changed, restarts the file
from zero, so two versions are never spliced. Transient faults are retried with exponential
backoff and full jitter. Every file is verified: its size always, its sha256 when known.

All methods block; callers run them in worker threads.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import http.client
import json
import logging
import mmap
import os
import queue
import random
import re
import select
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from modelhost.errors import (
    DISK_FULL_ERRNOS,
    Cancelled,
    DigestMismatch,
    FetchError,
    FetchTimeout,
    InsufficientStorage,
    SizeMismatch,
    TransientFetchError,
    UpstreamDenied,
    UpstreamError,
    UpstreamNotFound,
    UpstreamTimeout,
)
from modelhost.fetch.cancel import CancelToken
from modelhost.fetch.http import TIMEOUT_SETTING, Authorizer, OpenResponse, open_url
from modelhost.fetch.policy import UrlPolicy
from modelhost.fetch.progress import Progress
from modelhost.fetch.ratelimit import NO_THROTTLE, RateLimiter, Throttle, throttle_of

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024
PROBE_RETRIES = 2  # retries of a metadata call someone waits for (fewer than a transfer)
# A metadata call (with its retries) ends within its timeout plus this much.
METADATA_GRACE_S = 3.0
MIN_ATTEMPT_S = 0.5  # no retry is started with less time than this left
METADATA_LIMIT = 16 * 1024 * 1024  # the largest metadata document read into memory
METADATA_READ = 64 * 1024
_T = TypeVar("_T")
WRITEBACK_EVERY = 64 * 1024 * 1024
# Writes go to the page cache in slices: measured on a 2-core VM, 1 GiB written in 16 KiB
# slices took 0.5 s where 4 MiB writes took 1.9 s (large writes into freshly reclaimed
# memory are slow there); the receive and hash buffers stay large.
WRITE_SLICE = 16 * 1024
# O_DIRECT writes (Linux) skip the page cache: measured on the same VM, 1 GiB written from
# 4 MiB buffers took 0.53-0.59 s and 0.05-0.08 s of system CPU, where buffered 16 KiB writes
# took 0.6-3.2 s and 0.44-1.3 s of CPU (the page cache's allocation and copy; the CPU is
# what a download shares with the server sending it on two cores). Buffer address, file
# offset and length must be multiples of DIRECT_ALIGN.
DIRECT_ALIGN = 4096
# While bytes keep arriving, direct writes wait for this many (each is a device round trip;
# tiny ones are slow); before the stream waits for the network, everything is written.
DIRECT_MIN_WRITE = 256 * 1024
TRANSIENT_STATUSES = {408, 425, 429, 500, 502, 503, 504}
# An attempt that moved at least this much resets the retry count: a long download over a
# flaky link keeps going as long as it keeps making progress.
PROGRESS_RESETS_RETRIES = 8 * 1024 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# Multi-connection downloads (fetch/parts.py): files of at least PART_THRESHOLD bytes go in
# parts over up to CONNECTIONS connections each, MAX_CONNECTIONS across all downloads.
CONNECTIONS = 8
MAX_CONNECTIONS = 16
PART_THRESHOLD = 64 * 1_000_000  # 64 MB (modelhost.units.MB), as the setting says
# A file in parts starts with one connection and adds more after this long of measuring
# whether they pay (fetch/parts.py, PROBE_SHARE).
# Measured on 1 GiB over 50 MB/s-capped connections: 0.5 s windows took 1.75 s to reach 16
# connections, 0.25 s windows 1.0 s (same decisions).
PROBE_WINDOW_S = 0.25
# No file is larger than the largest file offset (off_t); a length past it is a lie.
MAX_LENGTH = 2**63 - 1


@dataclass(frozen=True)
class FileSpec:
    """One file to fetch: where from, where it goes in the model, what it must be."""

    url: str
    path: str  # relative path inside the model directory
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None  # git blob id: what the Hub lists for files not in LFS
    sha256_prefix: str | None = None  # what torchvision's file names carry: sha256's start
    local_source: str | None = None  # a local copy to verify and import instead of fetching


@dataclass(frozen=True)
class RemoteInfo:
    """What a HEAD (or a one-byte GET) says about a URL."""

    url: str
    final_url: str
    size: int | None
    etag: str | None
    last_modified: str | None
    accept_ranges: bool


@dataclass(frozen=True)
class Document:
    """A metadata response read whole: a status that is not transient, headers, body."""

    url: str  # the final URL, after redirects
    status: int
    headers: Message
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(frozen=True)
class FetchedFile:
    """A complete, verified file in the partial directory, ready for the store to take."""

    spec: FileSpec
    local_path: Path
    size: int
    sha256: str
    bytes_transferred: int  # bytes this call moved over the network (resumed bytes excluded)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.backoff_max_s, self.backoff_s * (2**attempt)))


@dataclass
class _PartialState:
    url: str
    etag: str | None
    last_modified: str | None
    total: int | None


LOCAL_SCHEME = "file:"


def local_url(path: Path) -> str:
    """The URL a spec carries for a file that only exists locally (no network copy)."""
    return path.absolute().as_uri()


def is_local_only(spec: FileSpec) -> bool:
    """Whether ``spec`` names a local file with no network copy to fall back to."""
    return spec.url.startswith(LOCAL_SCHEME)


def partial_key(spec: FileSpec) -> str:
    """The partial file's name: stable across restarts for the same URL and digest."""
    return hashlib.sha256(f"{spec.url}\n{spec.sha256 or ''}".encode()).hexdigest()[:40]


class _Hasher:
    """sha256 in a second thread, fed the buffers the network thread has written.

    hashlib releases the GIL on large updates, so hashing overlaps the next receive.
    """

    def __init__(self, buffers: int, git_size: int | None = None) -> None:
        self._nice = _thread_nice()
        self.digest = hashlib.sha256()
        # The git blob id hashes a header before the content, so the size must be known.
        self.git_digest = None
        if git_size is not None:
            self.git_digest = hashlib.sha1(f"blob {git_size}\0".encode())
        # Page-aligned anonymous memory: O_DIRECT writes need aligned buffer addresses.
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(buffers):
            self.free.put(mmap.mmap(-1, CHUNK_SIZE))
        self._work: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="modelhost-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        set_thread_nice(self._nice)  # hash at the priority of the transfer it serves
        while (item := self._work.get()) is not None:
            buffer, length = item
            self.digest.update(memoryview(buffer)[:length])
            if self.git_digest is not None:
                self.git_digest.update(memoryview(buffer)[:length])
            self.free.put(buffer)

    def feed(self, buffer: mmap.mmap, length: int) -> None:
        self._work.put((buffer, length))

    def hexdigest(self) -> str:
        self._work.put(None)
        self._thread.join()
        return self.digest.hexdigest()

    def git_hexdigest(self) -> str | None:
        return None if self.git_digest is None else self.git_digest.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join()


def _host_of(url: str) -> str:
    return urlsplit(url).netloc or url


def _checked_length(value: str, url: str, header: str = "Content-Length") -> int:
    """A length an upstream sent, as a number; ``UpstreamError`` if it is not one.

    RFC 9110 lets a recipient accept a list of identical values ("16, 16"); anything else
    (differing values, non-digits, a number no file can have) is refused, never guessed at.
    """
    values = {part.strip() for part in value.split(",")}
    if len(values) == 1:
        (single,) = values
        # Length first: int() refuses strings of thousands of digits with a ValueError.
        if single.isascii() and single.isdigit() and len(single) <= 19:
            if int(single) <= MAX_LENGTH:
                return int(single)
    shown = value if len(value) <= 40 else f"{value[:40]}... ({len(value)} characters)"
    raise UpstreamError(
        f"invalid {header} from {_host_of(url)}: {shown!r} is not a byte count; "
        "the server's answer cannot be trusted, nothing was written",
        error=f"Invalid {header}",
    )


def _content_length(response: OpenResponse) -> int | None:
    value = response.header("Content-Length")
    return None if value is None else _checked_length(value, response.url)


def _range_total(match: re.Match[str], url: str) -> int | None:
    """The total size a ``Content-Range`` match states, None for ``*``."""
    if match.group(3) == "*":
        return None
    return _checked_length(match.group(3), url, "Content-Range")


def _strong_etag(etag: str | None) -> str | None:
    return etag if etag and not etag.startswith("W/") else None


def _error_for_status(response: OpenResponse) -> FetchError:
    reason = f"{response.status} {response.response.reason}".strip()
    message = f"Upstream answered {reason} for {response.url}"
    if response.status in TRANSIENT_STATUSES:
        return TransientFetchError(message)
    return FetchError(message, error=f"HTTP {response.status}")


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_sync_file_range = _load_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (Linux), without waiting for it,
    so that the fsync before commit has little left to do."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _thread_nice() -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return None


def set_thread_nice(nice: int | None) -> None:
    """Set the calling thread's CPU priority (Linux schedules threads individually)."""
    if nice is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


def disk_full(exc: OSError) -> InsufficientStorage:
    """The error a write that found no space raises, for the job's message."""
    return InsufficientStorage(
        f"No space left to write the download ({os.strerror(exc.errno or errno.ENOSPC)}); "
        "free disk space under MODELHOST_HOME, then retry: the bytes already fetched are kept",
        error="Disk full",
    )


def _write_all(fd: int, view: memoryview) -> None:
    try:
        while view:
            view = view[os.write(fd, view[:WRITE_SLICE]) :]
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full(exc) from exc
        raise


def _pwrite_all(fd: int, view: memoryview, offset: int, slice_size: int) -> None:
    while view:
        n = os.pwrite(fd, view[:slice_size], offset)
        view, offset = view[n:], offset + n


def _open_direct(path: Path) -> int | None:
    """A second descriptor of ``path`` that writes around the page cache, or None where the
    platform or the file system has no O_DIRECT."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _open_direct_read(path: Path) -> int | None:
    """A descriptor of ``path`` that reads around the page cache (parts read back what they
    wrote ahead of the hash: with O_DIRECT writes those pages are on disk only), or None."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None


class _PartWriter:
    """Writes one stream's bytes into its ``.part`` file as they arrive; the receive buffers
    map to the file one after another from ``base`` on.

    Where the file system allows, whole ``DIRECT_ALIGN`` blocks go through an O_DIRECT
    descriptor (see DIRECT_ALIGN), once ``DIRECT_MIN_WRITE`` bytes wait or a buffer is full;
    for that ``base`` is aligned, so a resume at an unaligned offset first reads the few bytes
    before it back into the first buffer (``head``). ``write(..., urgent=True)`` (the stream
    has nothing more to read right now, or it ended) also writes what waits and the unaligned
    tail, the tail through the ordinary descriptor: a process killed while it waits for the
    network has every received byte in the file, as with buffered writes. Without O_DIRECT,
    or once a direct write fails with EINVAL, every receive is written through the ordinary
    descriptor in ``WRITE_SLICE`` slices.
    """

    def __init__(self, part: Path, fd: int, offset: int, direct: bool = True) -> None:
        """``direct=False``: buffered writes only (a part whose first block another part
        shares, see fetch/parts.py)."""
        self.fd = fd
        self.direct_fd = _open_direct(part) if direct else None
        self.head = offset % DIRECT_ALIGN if self.direct_fd is not None else 0
        self.base = offset - self.head  # the file offset of the current buffer's byte 0
        self.direct_at = self.base  # direct writes go on from here (aligned)
        self.end = offset  # the file holds every byte before this

    def start(self, buffer: memoryview) -> int:
        """Put the head in the first buffer; returns how much of it is filled."""
        if self.head and os.preadv(self.fd, [buffer[: self.head]], self.base) != self.head:
            raise TransientFetchError("the partial file shrank while it was being resumed")
        return self.head

    def pending(self, fill: int) -> bool:
        """Whether some of ``buffer[:fill]`` is not in the file yet."""
        return self.base + fill > self.end

    def write(self, buffer: memoryview, fill: int, urgent: bool = False) -> None:
        """Write what of ``buffer[:fill]`` is not in the file yet: all of it when ``urgent``
        or without O_DIRECT, otherwise the whole blocks once enough wait."""
        if self.direct_fd is not None:
            aligned = self.base + fill - fill % DIRECT_ALIGN
            waiting = aligned - self.direct_at
            if waiting > 0 and (urgent or waiting >= DIRECT_MIN_WRITE or fill == len(buffer)):
                self._direct(buffer[self.direct_at - self.base : aligned - self.base])
            if not urgent:
                return
        if self.base + fill > self.end:
            self._buffered(buffer[self.end - self.base : fill])

    def next_buffer(self, length: int) -> None:
        """The buffer of ``length`` bytes is all written; the next one follows it."""
        self.base += length
        self.direct_at = max(self.direct_at, self.base)

    def _direct(self, view: memoryview) -> None:
        try:
            while view:
                n = os.pwrite(self.direct_fd, view, self.direct_at)  # type: ignore[arg-type]
                view, self.direct_at = view[n:], self.direct_at + n
                self.end = max(self.end, self.direct_at)
                if n % DIRECT_ALIGN:  # short and unaligned: the rest cannot go direct
                    break
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk_full(exc) from exc
            if exc.errno != errno.EINVAL:
                raise
        if view:  # refused (EINVAL: this file system wants another alignment) or misaligned
            self.close()
            self.end = min(self.end, self.direct_at)  # buffered writes go on from here
            self._buffered(view)

    def _buffered(self, view: memoryview) -> None:
        try:
            _pwrite_all(self.fd, view, self.end, WRITE_SLICE)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk_full(exc) from exc
            raise
        self.end += len(view)

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None


def _ready_to_read(response: OpenResponse) -> Callable[[], bool]:
    """A check whether the response's socket has bytes to read now (without waiting)."""
    sock = response.connection.sock
    if sock is None:
        return lambda: False
    fileno = sock.fileno()

    def ready() -> bool:
        try:
            return bool(select.select([fileno], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    return ready


def _body_reader(
    response: http.client.HTTPResponse, length: int | None
) -> Callable[[memoryview], int]:
    """A function reading *some* body bytes into a buffer: one receive, not a full buffer.

    With a known length it reads the socket directly (``readinto1``), which is both the
    fastest path and the one that never holds back bytes when the connection fails.
    """
    if length is not None and not response.chunked and response.fp is not None:
        return response.fp.readinto1

    def read_via_http_client(view: memoryview) -> int:
        data = response.read1(len(view))
        view[: len(data)] = data
        return len(data)

    return read_via_http_client


def digest_file(path: Path, git: bool = False) -> tuple[str, str | None]:
    """sha256 of a file, and its git blob id when ``git``."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {size}\0".encode()) if git else None
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), None if sha1 is None else sha1.hexdigest()


def verify(spec: FileSpec, size: int, sha256: str, git_sha1: str | None) -> None:
    """Raise ``SizeMismatch`` / ``DigestMismatch`` unless the bytes are what ``spec`` says."""
    if spec.size is not None and size != spec.size:
        raise SizeMismatch(f"{spec.path}: got {size} bytes, expected {spec.size}")
    if spec.sha256 is not None and sha256 != spec.sha256.lower():
        raise DigestMismatch(
            f"{spec.path}: sha256 of the downloaded bytes is {sha256}, expected "
            f"{spec.sha256.lower()}; the file was discarded"
        )
    if spec.sha256_prefix is not None and not sha256.startswith(spec.sha256_prefix.lower()):
        raise DigestMismatch(
            f"{spec.path}: sha256 of the downloaded bytes is {sha256}, which does not start "
            f"with {spec.sha256_prefix.lower()} as its file name says; the file was discarded"
        )
    if spec.git_sha1 is not None and git_sha1 != spec.git_sha1.lower():
        raise DigestMismatch(
            f"{spec.path}: git blob id of the downloaded bytes is {git_sha1}, expected "
            f"{spec.git_sha1.lower()}; the file was discarded"
        )


def upstream_error(status: int, message: str) -> UpstreamError:
    """An upstream HTTP error answered before any transfer, by what it means to the user."""
    if status in (404, 410):
        return UpstreamNotFound(message)
    if status in (401, 403):
        return UpstreamDenied(message)
    return UpstreamError(message, error=f"HTTP {status}")


def _gave_up(exc: TransientFetchError, url: str, tries: int, seconds: float) -> UpstreamError:
    """The error a metadata call ends with once its retries or its time are used up."""
    summary = f"gave up after {tries} {'try' if tries == 1 else 'tries'} in {seconds:.1f} s"
    if isinstance(exc, FetchTimeout):
        return UpstreamTimeout(
            f"{exc.message} for {url} ({summary})", error=f"Upstream timed out: {exc.host_port}"
        )
    return UpstreamError(f"{exc.message} ({summary})")


def _read_body(
    response: OpenResponse, limit: int, deadline: float, cancel: CancelToken | None
) -> bytes:
    """Read a metadata body whole, at most ``limit`` bytes, by ``deadline`` (a host that
    trickles bytes is as silent as one that sends none)."""
    host_port = UrlPolicy.host_port_of(response.url)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            left = deadline - time.monotonic()
            sock = response.connection.sock
            if left <= 0 or sock is None:
                raise TimeoutError
            sock.settimeout(left)
            chunk = response.response.read1(METADATA_READ)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise UpstreamError(f"{response.url} is larger than {limit} bytes; refused")
            chunks.append(chunk)
        if cancel is not None:
            cancel.raise_if_cancelled()  # a shut socket reads as the end of the body
        if response.response.length:  # Content-Length said more
            raise TransientFetchError(f"{response.url}: connection closed after {size} bytes")
    except TimeoutError as exc:
        raise FetchTimeout(
            f"{host_port} timed out (sending {response.url}; {size} bytes in time, "
            f"{TIMEOUT_SETTING})",
            host_port=host_port,
            timeout_s=0.0,
        ) from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        if cancel is not None:
            cancel.raise_if_cancelled()
        raise TransientFetchError(f"Reading {response.url} failed: {exc}") from exc
    return b"".join(chunks)


class _FileProgress:
    """One file's share of a job's progress, so that a retry can take back what it counted.

    It is also where bandwidth caps act: every receive is counted here (by the single
    stream and by every part's worker), and ``add`` sleeps as long as ``throttle`` says.
    """

    def __init__(
        self,
        progress: Progress,
        path: str,
        throttle: Throttle = NO_THROTTLE,
        cancel: CancelToken | None = None,
    ) -> None:
        self.progress = progress
        self.path = path
        self.throttle = throttle
        self.cancel = cancel
        self.counted = 0
        self.transferred = 0
        self._lock = threading.Lock()  # parts count from several threads

    def add(self, nbytes: int) -> None:
        self.progress.add(nbytes, self.path)
        with self._lock:
            self.counted += nbytes
            self.transferred += nbytes
        if self.throttle.active:
            self.throttle.consume(nbytes, self.cancel)

    def add_existing(self, nbytes: int) -> None:
        self.progress.add_existing(nbytes, self.path)
        with self._lock:
            self.counted += nbytes

    def reset(self) -> None:
        with self._lock:
            counted, self.counted = self.counted, 0
        self.progress.remove(counted, self.path)

    def set_status(self, status: str) -> None:
        self.progress.set_status(self.path, status)


class FetchEngine:
    """Moves bytes from allow-listed URLs into verified local files."""

    def __init__(
        self,
        partial_dir: Path,
        policy: UrlPolicy,
        retry: RetryPolicy | None = None,
        read_timeout_s: float = 30.0,
        authorization: Authorizer | None = None,
        *,
        upstream_timeout_s: float | None = None,
        read_timeout_setting: str = TIMEOUT_SETTING,
        connections: int = CONNECTIONS,
        max_connections: int = MAX_CONNECTIONS,
        part_threshold: int = PART_THRESHOLD,
        part_size: int | None = None,
        max_bytes_per_s: float | None = None,
        probe_window_s: float | None = PROBE_WINDOW_S,
    ) -> None:
        """``connections``: parallel ranged connections per file of at least
        ``part_threshold`` bytes (1: always one stream); ``max_connections``: transfer
        connections across all downloads; ``part_size``: bytes per part (None: about two
        parts per connection, 8-64 MiB); ``max_bytes_per_s``: a cap on all downloads
        together (None: none); ``probe_window_s``: a file in parts starts with one
        connection and adds more while they pay, measured over windows this long (None: all
        ``connections`` at once)."""
        from modelhost.fetch.parts import AHEAD_MEMORY, AheadMemory, Slots

        self.partial_dir = Path(partial_dir)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.policy = policy
        self.retry = retry or RetryPolicy()
        # Transfers read with read_timeout_s; connects and metadata use upstream_timeout_s.
        self.read_timeout_s = read_timeout_s
        self.upstream_timeout_s = upstream_timeout_s or read_timeout_s
        self.read_timeout_setting = read_timeout_setting
        self.authorization = authorization
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        if connections < 1 or max_connections < 1 or part_threshold < 1:
            raise ValueError("connections, max_connections and part_threshold must be >= 1")
        if part_size is not None and part_size < 1:
            raise ValueError("part_size must be >= 1")
        self.connections = connections
        self.part_threshold = part_threshold
        self.part_size = part_size
        if probe_window_s is not None and probe_window_s <= 0:
            raise ValueError("probe_window_s must be positive (or None: no probing)")
        self.probe_window_s = probe_window_s
        self.slots = Slots(max_connections)
        self.ahead_memory = AheadMemory(AHEAD_MEMORY)
        self.limiter = None if max_bytes_per_s is None else RateLimiter(max_bytes_per_s)

    def _open(
        self,
        url: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
        cancel: CancelToken | None = None,
    ) -> OpenResponse:
        """Open ``url``; ``timeout`` (a metadata call's) replaces the transfers' read timeout."""
        return open_url(
            url,
            self.policy,
            method=method,
            headers=headers,
            timeout=timeout or self.read_timeout_s,
            connect_timeout=min(self.upstream_timeout_s, timeout or self.upstream_timeout_s),
            authorization=self.authorization,
            cancel=cancel,
            timeout_setting=TIMEOUT_SETTING if timeout else self.read_timeout_setting,
        )

    # --- metadata -------------------------------------------------------------------------

    def bounded(
        self, url: str, once: Callable[[float], _T], cancel: CancelToken | None = None
    ) -> _T:
        """Run the metadata call ``once(timeout_s)`` with retries of transient faults, all
        within the upstream timeout plus ``METADATA_GRACE_S``: someone waits for the answer.

        A silent host ends as ``UpstreamTimeout`` (504, naming it), other transient faults
        as ``UpstreamError`` (502) once the retries or the time are used up.
        """
        cancel = cancel or CancelToken()
        started = time.monotonic()
        deadline = started + self.upstream_timeout_s + METADATA_GRACE_S
        attempt = 0
        while True:
            cancel.raise_if_cancelled()
            left = deadline - time.monotonic()
            try:
                return once(max(MIN_ATTEMPT_S, min(self.upstream_timeout_s, left)))
            except TransientFetchError as exc:
                delay = self.retry.delay(attempt)
                left = deadline - time.monotonic()
                tries_left = attempt < min(self.retry.retries, PROBE_RETRIES)
                if not tries_left or left < delay + MIN_ATTEMPT_S:
                    raise _gave_up(exc, url, attempt + 1, time.monotonic() - started) from exc
                log.info("retrying %s in %.2fs after: %s", url, delay, exc.message)
                cancel.sleep(delay)
                attempt += 1

    def get_metadata(
        self,
        url: str,
        *,
        cancel: CancelToken | None = None,
        limit: int = METADATA_LIMIT,
        headers: dict[str, str] | None = None,
    ) -> Document:
        """GET a metadata document (JSON, a config) whole, bounded like ``bounded`` says.

        Transient statuses (5xx, 429) are retried; any other status is returned with its
        body for the caller to explain. A body over ``limit`` is refused.
        """
        return self.bounded(
            url, lambda t: self._document_once(url, t, limit, headers, cancel), cancel
        )

    def _document_once(
        self,
        url: str,
        timeout: float,
        limit: int,
        headers: dict[str, str] | None,
        cancel: CancelToken | None,
    ) -> Document:
        deadline = time.monotonic() + timeout
        response = self._open(url, headers=headers, timeout=timeout, cancel=cancel)
        unregister = cancel.on_cancel(response.shutdown) if cancel else lambda: None
        try:
            if response.status >= 400:
                error = _error_for_status(response)
                if isinstance(error, TransientFetchError):
                    raise error
            body = _read_body(response, limit, deadline, cancel)
        finally:
            unregister()
            response.close()
        return Document(response.url, response.status, response.response.msg, body)

    def read_small(
        self, url: str, limit: int = 1024 * 1024, cancel: CancelToken | None = None
    ) -> bytes:
        """GET a small document (a config.json) into memory; refuses anything over ``limit``."""
        document = self.get_metadata(url, cancel=cancel, limit=limit)
        if document.status >= 400:
            raise upstream_error(
                document.status, f"Upstream answered {document.status} for {document.url}"
            )
        return document.body

    def probe(self, url: str, cancel: CancelToken | None = None) -> RemoteInfo:
        """Ask for a URL's size and validators without fetching its body (retries transients,
        bounded like ``bounded`` says)."""
        return self.bounded(url, lambda t: self._probe_once(url, t, cancel), cancel)

    def _probe_once(self, url: str, timeout: float, cancel: CancelToken | None) -> RemoteInfo:
        response = self._open(url, method="HEAD", timeout=timeout, cancel=cancel)
        try:
            if response.status in (403, 405, 501):
                # Some hosts refuse HEAD; a one-byte ranged GET tells the same.
                response.close()
                response = self._open(
                    url, headers={"Range": "bytes=0-0"}, timeout=timeout, cancel=cancel
                )
            if response.status >= 400:
                error = _error_for_status(response)
                if isinstance(error, TransientFetchError):
                    raise error
                raise upstream_error(response.status, error.message)
            size = None
            content_range = response.header("Content-Range")
            if response.status == 206 and content_range:
                match = _CONTENT_RANGE.match(content_range)
                if match:
                    size = _range_total(match, response.url)
            else:
                size = _content_length(response)
            return RemoteInfo(
                url=url,
                final_url=response.url,
                size=size,
                etag=response.header("ETag"),
                last_modified=response.header("Last-Modified"),
                accept_ranges=(response.header("Accept-Ranges") or "").lower() == "bytes"
                or response.status == 206,
            )
        finally:
            response.close()

    # --- transfer -------------------------------------------------------------------------

    def partial_paths(self, spec: FileSpec) -> tuple[Path, Path]:
        key = partial_key(spec)
        return self.partial_dir / f"{key}.part", self.partial_dir / f"{key}.json"

    def parts_map_path(self, spec: FileSpec) -> Path:
        """Where a multi-part download of ``spec`` keeps its part map."""
        return self.partial_dir / f"{partial_key(spec)}.parts.json"

    def partial_size(self, spec: FileSpec) -> int:
        part, _ = self.partial_paths(spec)
        return self._held_bytes(part)

    @staticmethod
    def _held_bytes(part: Path) -> int:
        """Bytes of a ``.part`` file that are really there: a multi-part download's map
        counts its parts' written bytes (the file has holes); otherwise its length."""
        from modelhost.fetch.parts import done_bytes

        try:
            length = part.stat().st_size
        except FileNotFoundError:
            return 0
        done = done_bytes(part.with_suffix(".parts.json"))
        return length if done is None else min(done, length)

    def resumable_bytes(self, spec: FileSpec) -> int:
        """Bytes of ``spec`` the next attempt will not fetch again, as ``_attempt`` decides:
        a part map's written bytes, or a single stream's offset when its state names the
        same URL and a validator (without one a resume starts from 0). Blocking (stats)."""
        part, meta = self.partial_paths(spec)
        if self.parts_map_path(spec).exists():
            return self._held_bytes(part)
        try:
            state = _PartialState(**json.loads(meta.read_text()))
            offset = part.stat().st_size
        except (OSError, ValueError, TypeError):
            return 0
        if state.url != spec.url or (state.total is not None and offset > state.total):
            return 0
        if (_strong_etag(state.etag) or state.last_modified) is None:
            return 0
        return offset

    def partial_bytes(self) -> int:
        """Bytes held in partial files (``*.part``) right now, measured."""
        return sum(self._held_bytes(part) for part in self.partial_dir.glob("*.part"))

    def discard(self, spec: FileSpec) -> None:
        """Forget any partial bytes of ``spec`` (cancel, force re-download)."""
        parts_map = self.parts_map_path(spec)
        temporary = parts_map.with_name(parts_map.name + ".tmp")
        for path in (*self.partial_paths(spec), parts_map, temporary):
            path.unlink(missing_ok=True)

    def fetch(
        self,
        spec: FileSpec,
        progress: Progress | None = None,
        cancel: CancelToken | None = None,
        limiter: RateLimiter | None = None,
    ) -> FetchedFile:
        """Fetch ``spec`` to a verified local file, resuming whatever an earlier attempt left.

        ``limiter`` caps this transfer (a job's ``max_mbps``, shared by its files) on top of
        the engine's global cap. Raises ``Cancelled``, ``DigestMismatch``, ``SizeMismatch``,
        ``SourceNotAllowed`` or ``FetchError`` (with the last transient error once retries
        are exhausted).
        """
        try:
            return self._fetch(spec, progress, cancel, throttle_of(limiter, self.limiter))
        except OSError as exc:
            # The state file, an fsync or a local import can find the disk full too.
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk_full(exc) from exc
            raise

    def _fetch(
        self,
        spec: FileSpec,
        progress: Progress | None,
        cancel: CancelToken | None,
        throttle: Throttle = NO_THROTTLE,
    ) -> FetchedFile:
        cancel = cancel or CancelToken()
        file_progress = _FileProgress(progress or Progress(), spec.path, throttle, cancel)
        with self._lock_for(partial_key(spec)):
            if is_local_only(spec):
                # No network copy to fall back to (an air-gapped cache, a local directory):
                # a local file that does not verify fails the file.
                return self.import_required(spec, progress)
            imported = self.import_local(spec, progress)
            if imported is not None:
                return imported
            attempt = 0
            while True:
                cancel.raise_if_cancelled()
                file_progress.reset()
                before = file_progress.transferred
                try:
                    local_path, size, digest = self._attempt_in_slot(spec, file_progress, cancel)
                    file_progress.set_status("done")
                    return FetchedFile(
                        spec=spec,
                        local_path=local_path,
                        size=size,
                        sha256=digest,
                        bytes_transferred=file_progress.transferred,
                    )
                except TransientFetchError as exc:
                    moved = file_progress.transferred - before
                    if moved >= PROGRESS_RESETS_RETRIES:
                        attempt = 0
                    if attempt >= self.retry.retries:
                        raise FetchError(
                            f"{exc.message} (gave up after {attempt + 1} attempts)",
                            error="Download failed",
                        ) from exc
                    delay = self.retry.delay(attempt)
                    log.info("retrying %s in %.2fs after: %s", spec.url, delay, exc.message)
                    cancel.sleep(delay)
                    attempt += 1

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _load_state(
        self, spec: FileSpec, part: Path, meta: Path
    ) -> tuple[int, _PartialState | None]:
        """How many bytes an earlier attempt left, and what they were validated by."""
        try:
            state = _PartialState(**json.loads(meta.read_text()))
            offset = part.stat().st_size
        except (FileNotFoundError, ValueError, TypeError):
            part.unlink(missing_ok=True)
            return 0, None
        if state.url != spec.url or (state.total is not None and offset > state.total):
            part.unlink(missing_ok=True)
            return 0, None
        return offset, state

    def _attempt_in_slot(
        self, spec: FileSpec, progress: _FileProgress, cancel: CancelToken
    ) -> tuple[Path, int, str]:
        """One attempt, holding one of the global connection slots (a multi-part download
        takes more for its other workers while they have parts to fetch)."""
        self.slots.acquire(cancel)
        try:
            return self._attempt(spec, progress, cancel)
        finally:
            self.slots.release()

    def _goes_in_parts(self, spec: FileSpec) -> bool:
        """A saved part map resumes as parts; a single stream's state resumes as one; a
        fresh file goes in parts when its size is known and at least the threshold."""
        if self.parts_map_path(spec).exists():
            return True
        if self.partial_paths(spec)[1].exists():
            return False
        return self.connections > 1 and spec.size is not None and spec.size >= self.part_threshold

    def _attempt(
        self, spec: FileSpec, progress: _FileProgress, cancel: CancelToken
    ) -> tuple[Path, int, str]:
        if self._goes_in_parts(spec):
            from modelhost.fetch.parts import fetch_in_parts

            done = fetch_in_parts(self, spec, progress, cancel)
            if done is not None:
                return done
        part, meta = self.partial_paths(spec)
        offset, state = self._load_state(spec, part, meta)
        headers: dict[str, str] = {}
        if offset and state is not None:
            validator = _strong_etag(state.etag) or state.last_modified
            if validator is None:
                # Without a validator a resumed range could belong to another version.
                offset, state = 0, None
            else:
                headers["Range"] = f"bytes={offset}-"
                headers["If-Range"] = validator
        response = self._open(spec.url, headers=headers, cancel=cancel)
        progress.throttle.fit_socket(response.connection.sock)
        try:
            return self._receive(spec, response, part, meta, offset, state, progress, cancel)
        finally:
            response.close()

    def _receive(
        self,
        spec: FileSpec,
        response: OpenResponse,
        part: Path,
        meta: Path,
        offset: int,
        state: _PartialState | None,
        progress: _FileProgress,
        cancel: CancelToken,
    ) -> tuple[Path, int, str]:
        etag = response.header("ETag")
        last_modified = response.header("Last-Modified")
        if response.status == 416 and offset and state and offset == state.total:
            total = offset  # the earlier attempt had everything; only verification is left
            progress.set_status("verifying")
        elif response.status == 206 and offset:
            match = _CONTENT_RANGE.match(response.header("Content-Range") or "")
            same_version = state is not None and (
                etag is None or state.etag is None or etag == state.etag
            )
            if not match or match.group(1) != str(offset) or not same_version:
                # A range we did not ask for, or from another version: start over cleanly.
                self._discard_partial(part, meta)
                raise TransientFetchError(
                    f"{spec.url} changed or answered an unexpected range; restarting from zero"
                )
            total = _range_total(match, response.url)
        elif response.status == 200:
            if offset:
                # The server sent the whole file: a new version, or no range support.
                self._discard_partial(part, meta)
                offset = 0
            total = _content_length(response)
        else:
            if response.status == 416:
                self._discard_partial(part, meta)
            raise _error_for_status(response)

        if spec.size is not None and total is not None and total != spec.size:
            raise SizeMismatch(
                f"{spec.url} is {total} bytes upstream, expected {spec.size}; "
                "the file changed upstream or the expected size is wrong"
            )
        meta.write_text(
            json.dumps(
                {"url": spec.url, "etag": etag, "last_modified": last_modified, "total": total}
            )
        )
        if offset:
            progress.add_existing(offset)

        git_size = (spec.size if spec.size is not None else total) if spec.git_sha1 else None
        hasher = _Hasher(buffers=4, git_size=git_size)
        unregister = cancel.on_cancel(response.shutdown)
        try:
            received = self._stream(response, part, offset, total, hasher, progress, cancel)
            size = offset + received
            if total is not None and size < total:
                raise TransientFetchError(
                    f"Connection closed after {size} of {total} bytes of {spec.url}"
                )
            progress.set_status("verifying")  # every byte is in; the hasher may still lag
            digest = hasher.hexdigest()
            git_digest = hasher.git_hexdigest()
        finally:
            unregister()
            hasher.close()
        try:
            verify(spec, size, digest, git_digest)
        except FetchError:
            self._discard_partial(part, meta)
            raise
        return part, size, digest

    def import_local(self, spec: FileSpec, progress: Progress | None = None) -> FetchedFile | None:
        """Copy ``spec.local_source`` into the partial directory if its digests verify.

        Returns None (and copies nothing) when the local file is missing or does not match:
        the caller then fetches over the network.
        """
        if not spec.local_source:
            return None
        try:
            size = Path(spec.local_source).stat().st_size
        except OSError:
            return None
        if spec.size is not None and size != spec.size:
            return None  # cheaply wrong: keep whatever partial download there is
        try:
            return self.import_required(spec, progress)
        except FetchError as exc:
            log.info("not importing %s: %s", spec.local_source, exc.message)
            return None

    def import_required(self, spec: FileSpec, progress: Progress | None = None) -> FetchedFile:
        """Copy ``spec.local_source`` into the partial directory, verified; there is no
        network copy, so a file that does not verify (or cannot be read) raises."""
        if not spec.local_source:
            raise FetchError(f"{spec.path}: no local copy to import", error="No local copy")
        source = Path(spec.local_source)
        part, meta = self.partial_paths(spec)
        meta.unlink(missing_ok=True)
        if progress is not None:
            progress.set_status(spec.path, "verifying")
        try:
            # Hash the copy, not the original: what is verified is what the store takes,
            # even if the original changes meanwhile.
            shutil.copyfile(source, part)
            size = part.stat().st_size
            sha256, git_sha1 = digest_file(part, git=spec.git_sha1 is not None)
            verify(spec, size, sha256, git_sha1)
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise FetchError(
                f"{spec.path}: cannot import {source}: {exc.strerror or exc}",
                error="Local file unreadable",
            ) from exc
        except FetchError:
            part.unlink(missing_ok=True)
            raise
        if progress is not None:
            progress.add_existing(size, spec.path)
            progress.set_status(spec.path, "done")
        return FetchedFile(spec, part, size, sha256, bytes_transferred=0)

    def _stream(
        self,
        response: OpenResponse,
        part: Path,
        offset: int,
        total: int | None,
        hasher: _Hasher,
        progress: _FileProgress,
        cancel: CancelToken,
    ) -> int:
        """Append the body to ``part``, hashing what is already there first.

        Received bytes are written to ``part`` at once: whole blocks around the page cache
        (``_PartWriter``, O_DIRECT) once ``DIRECT_MIN_WRITE`` bytes wait, and everything
        received before the stream waits for the network; the hasher is fed whole buffers
        (large updates release the GIL). Why write at once rather than per buffer: a resume
        starts from the ``.part`` file's length (``_load_state``), and written bytes survive
        the process being killed (SIGKILL, OOM). Bytes still in a buffer die with it: with
        4 MiB buffers, 20 kills over a 300 MB download re-fetched 18% of it; written before
        every wait, a kill loses only what was in flight (at most ``DIRECT_MIN_WRITE`` more
        while bytes keep arriving faster than they are read). Resuming stays safe: the range
        is asked with ``If-Range`` (same validator or the file restarts from zero, never
        spliced), and the whole file's sha256 and size are checked at the end, so a ``.part``
        that a power cut left with a bad tail is discarded, never installed.
        """
        read_some = _body_reader(response.response, total - offset if total is not None else None)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        writer: _PartWriter | None = None
        try:
            # Never keep bytes past what was recorded, also from 0: a restart without a
            # validator (or of a shorter new version) overwrites a longer earlier .part, and
            # the size and digest come from the stream, so a stale tail would go unnoticed.
            os.ftruncate(fd, offset)
            writer = _PartWriter(part, fd, offset)
            if writer.base:
                self._hash_existing(fd, writer.base, hasher, cancel)
            received = self._receive_into(
                read_some,
                _ready_to_read(response),
                writer,
                hasher,
                (offset, total, response.url),
                progress,
                cancel,
            )
            writer.close()
            os.fsync(fd)
            return received
        finally:
            if writer is not None:
                writer.close()
            os.close(fd)

    @staticmethod
    def _receive_into(
        read_some: Callable[[memoryview], int],
        ready: Callable[[], bool],
        writer: _PartWriter,
        hasher: _Hasher,
        where: tuple[int, int | None, str],
        progress: _FileProgress,
        cancel: CancelToken,
    ) -> int:
        """``_stream``'s loop: receive into the hasher's buffers, write, hand full buffers to
        the hasher; returns the bytes received. Before it waits for the network (``ready``
        says no bytes are there) every byte received is written, and when the connection
        fails too, so that a kill or a retry resumes after it. ``where``: the offset the body
        starts at, the file's total size (None: unknown) and the URL, for messages."""
        offset, total, url = where
        received = 0
        remaining = None if total is None else total - offset
        buffer = hasher.free.get()
        view = memoryview(buffer)
        fill = writer.start(view)
        flushed = offset
        try:
            while remaining is None or remaining > 0:
                if writer.pending(fill) and not ready():
                    writer.write(view, fill, urgent=True)  # we wait now: all of it to disk
                want = CHUNK_SIZE - fill if remaining is None else min(CHUNK_SIZE - fill, remaining)
                try:
                    n = read_some(view[fill : fill + want])
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    cancel.raise_if_cancelled()
                    raise TransientFetchError(
                        f"Connection lost after {offset + received} bytes of "
                        f"{url}: {exc or type(exc).__name__}"
                    ) from exc
                if not n:
                    cancel.raise_if_cancelled()
                    break
                fill += n
                received += n
                if remaining is not None:
                    remaining -= n
                writer.write(view, fill)
                progress.add(n)
                if fill == CHUNK_SIZE:
                    hasher.feed(buffer, fill)
                    writer.next_buffer(fill)
                    buffer, fill = hasher.free.get(), 0
                    view = memoryview(buffer)
                    written = offset + received
                    if writer.direct_fd is None and written - flushed >= WRITEBACK_EVERY:
                        start_writeback(writer.fd, flushed, written - flushed)
                        flushed = written
                if cancel.cancelled:
                    raise Cancelled(cancel.reason)
        finally:
            try:
                writer.write(view, fill, urgent=True)
            finally:
                if fill:
                    hasher.feed(buffer, fill)
                else:
                    hasher.free.put(buffer)
        return received

    @staticmethod
    def _hash_existing(fd: int, length: int, hasher: _Hasher, cancel: CancelToken) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        remaining = length
        while remaining:
            cancel.raise_if_cancelled()
            buffer = hasher.free.get()
            n = os.readv(fd, [memoryview(buffer)[: min(CHUNK_SIZE, remaining)]])
            if not n:
                hasher.free.put(buffer)
                break
            hasher.feed(buffer, n)
            remaining -= n

    @staticmethod
    def _discard_partial(part: Path, meta: Path) -> None:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
