"""The I/O both transfer strategies share: receive, write around the page cache, verify.

The single stream (``fetch/stream.py``) and the parts (``fetch/parts.py``) move bytes the
same way: a body is read one receive at a time (``body_reader``) into page-aligned pooled
buffers, written at once where it belongs in the ``.part`` file (``PartWriter``: whole
blocks with O_DIRECT, the rest through the ordinary descriptor, everything received written
before the stream waits for the network), counted and capped in ``FileProgress``, and the
whole file checked by ``verify``. Both are ``Strategy`` implementations the engine
(``fetch/engine.py``) chooses between per attempt. This module imports neither of them.
"""

from __future__ import annotations

import ctypes
import errno
import http.client
import os
import re
import select
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from modelhost.errors import (
    DISK_FULL_ERRNOS,
    DigestMismatch,
    FetchError,
    InsufficientStorage,
    SizeMismatch,
    TransientFetchError,
    UpstreamDenied,
    UpstreamError,
    UpstreamNotFound,
)
from modelhost.fetch.cancel import CancelToken
from modelhost.fetch.http import OpenResponse
from modelhost.fetch.progress import Progress
from modelhost.fetch.ratelimit import NO_THROTTLE, Throttle

CHUNK_SIZE = 4 * 1024 * 1024
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
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
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


def host_of(url: str) -> str:
    return urlsplit(url).netloc or url


def checked_length(value: str, url: str, header: str = "Content-Length") -> int:
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
        f"invalid {header} from {host_of(url)}: {shown!r} is not a byte count; "
        "the server's answer cannot be trusted, nothing was written",
        error=f"Invalid {header}",
    )


def content_length(response: OpenResponse) -> int | None:
    value = response.header("Content-Length")
    return None if value is None else checked_length(value, response.url)


def range_total(match: re.Match[str], url: str) -> int | None:
    """The total size a ``Content-Range`` match states, None for ``*``."""
    if match.group(3) == "*":
        return None
    return checked_length(match.group(3), url, "Content-Range")


def strong_etag(etag: str | None) -> str | None:
    return etag if etag and not etag.startswith("W/") else None


def error_for_status(response: OpenResponse) -> FetchError:
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


def thread_nice() -> int | None:
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


def pwrite_all(fd: int, view: memoryview, offset: int, slice_size: int) -> None:
    while view:
        n = os.pwrite(fd, view[:slice_size], offset)
        view, offset = view[n:], offset + n


def open_direct(path: Path) -> int | None:
    """A second descriptor of ``path`` that writes around the page cache, or None where the
    platform or the file system has no O_DIRECT."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def open_direct_read(path: Path) -> int | None:
    """A descriptor of ``path`` that reads around the page cache (parts read back what they
    wrote ahead of the hash: with O_DIRECT writes those pages are on disk only), or None."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None


class PartWriter:
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
        self.direct_fd = open_direct(part) if direct else None
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
            pwrite_all(self.fd, view, self.end, WRITE_SLICE)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk_full(exc) from exc
            raise
        self.end += len(view)

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None


def ready_to_read(response: OpenResponse) -> Callable[[], bool]:
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


def body_reader(
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


class FileProgress:
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


class Strategy(Protocol):
    """How one attempt moves a file: a single stream, or parts over several connections.

    ``run`` returns the ``.part`` file, its size and its sha256, all verified; or None when
    the strategy declines the file after all, and the engine falls back to the single
    stream (parts: the server honours ranges but gives no validator to ask the other parts
    with, or a saved part map is left for a file that no longer goes in parts; a server that
    ignores ranges has its 200 streamed whole by the parts strategy itself)."""

    def run(
        self, spec: FileSpec, progress: FileProgress, cancel: CancelToken
    ) -> tuple[Path, int, str] | None: ...
