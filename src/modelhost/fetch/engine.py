"""The fetch engine: the one place that moves bytes, for every source.

``FetchEngine.fetch`` retries transient faults with exponential backoff and full jitter,
and runs each attempt with one of two strategies (``fetch/transfer.py: Strategy``): a single
stream (``fetch/stream.py``) or parts over several connections (``fetch/parts.py``); both
use the I/O of ``fetch/transfer.py``. Every file is verified: its size always, its sha256
when known. The engine also answers metadata calls (``get_metadata``, ``probe``) and imports
verified local copies.

All methods block; callers run them in worker threads.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import TypeVar

from modelhost.errors import (
    DISK_FULL_ERRNOS,
    FetchError,
    FetchTimeout,
    TransientFetchError,
    UpstreamError,
    UpstreamTimeout,
)
from modelhost.fetch.cancel import CancelToken
from modelhost.fetch.http import TIMEOUT_SETTING, Authorizer, OpenResponse, open_url
from modelhost.fetch.parts import AHEAD_MEMORY, AheadMemory, InParts, Slots, done_bytes
from modelhost.fetch.policy import UrlPolicy
from modelhost.fetch.progress import Progress
from modelhost.fetch.ratelimit import NO_THROTTLE, RateLimiter, Throttle, throttle_of
from modelhost.fetch.stream import PartialState, SingleStream
from modelhost.fetch.transfer import (
    CHUNK_SIZE,
    CONTENT_RANGE,
    PROGRESS_RESETS_RETRIES,
    FileProgress,
    FileSpec,
    Strategy,
    content_length,
    disk_full,
    error_for_status,
    range_total,
    strong_etag,
    upstream_error,
    verify,
)

# Re-exported for the jobs layer and api/app.py, which import it from here.
from modelhost.fetch.transfer import set_thread_nice as set_thread_nice

log = logging.getLogger(__name__)

PROBE_RETRIES = 2  # retries of a metadata call someone waits for (fewer than a transfer)
# A metadata call (with its retries) ends within its timeout plus this much.
METADATA_GRACE_S = 3.0
MIN_ATTEMPT_S = 0.5  # no retry is started with less time than this left
METADATA_LIMIT = 16 * 1024 * 1024  # the largest metadata document read into memory
METADATA_READ = 64 * 1024
_T = TypeVar("_T")
# Multi-connection downloads (fetch/parts.py): files of at least PART_THRESHOLD bytes go in
# parts over up to CONNECTIONS connections each (the most the probe may reach: it starts at
# one and adds more while they pay, 1, 2, 8, 16, 32), MAX_CONNECTIONS across all downloads
# (as many, so that one file may use them all). On a 2-core machine, 1 GiB over 50 MB/s-capped
# connections: 8 connections carried 350-510 MB/s, 16 added 15-65% more, and the probe does
# not try 32 there (see parts.PROBE_SHARE_MORE); where 8 -> 16 pays near-linearly, it does.
CONNECTIONS = 32
MAX_CONNECTIONS = 32
PART_THRESHOLD = 64 * 1_000_000  # 64 MB (modelhost.units.MB), as the setting says
# A file in parts starts with one connection and adds more after this long of measuring
# whether they pay (fetch/parts.py, PROBE_SHARE).
# Measured on 1 GiB over 50 MB/s-capped connections: 0.5 s windows took 1.75 s to reach 16
# connections, 0.25 s windows 1.0 s (same decisions).
PROBE_WINDOW_S = 0.25


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
        # The two ways an attempt moves a file; the parts fall back to the single stream.
        self.single = SingleStream(self)
        self.in_parts: Strategy = InParts(self, self.single)

    def open(
        self,
        url: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
        cancel: CancelToken | None = None,
        reuse: http.client.HTTPConnection | None = None,
    ) -> OpenResponse:
        """Open ``url``; ``timeout`` (a metadata call's) replaces the transfers' read timeout;
        ``reuse``: a kept-alive connection to try first (``open_url``)."""
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
            reuse=reuse,
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
        response = self.open(url, headers=headers, timeout=timeout, cancel=cancel)
        unregister = cancel.on_cancel(response.shutdown) if cancel else lambda: None
        try:
            if response.status >= 400:
                error = error_for_status(response)
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
        response = self.open(url, method="HEAD", timeout=timeout, cancel=cancel)
        try:
            if response.status in (403, 405, 501):
                # Some hosts refuse HEAD; a one-byte ranged GET tells the same.
                response.close()
                response = self.open(
                    url, headers={"Range": "bytes=0-0"}, timeout=timeout, cancel=cancel
                )
            if response.status >= 400:
                error = error_for_status(response)
                if isinstance(error, TransientFetchError):
                    raise error
                raise upstream_error(response.status, error.message)
            size = None
            content_range = response.header("Content-Range")
            if response.status == 206 and content_range:
                match = CONTENT_RANGE.match(content_range)
                if match:
                    size = range_total(match, response.url)
            else:
                size = content_length(response)
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
            state = PartialState(**json.loads(meta.read_text()))
            offset = part.stat().st_size
        except (OSError, ValueError, TypeError):
            return 0
        if state.url != spec.url or (state.total is not None and offset > state.total):
            return 0
        if (strong_etag(state.etag) or state.last_modified) is None:
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
        file_progress = FileProgress(progress or Progress(), spec.path, throttle, cancel)
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

    def _attempt_in_slot(
        self, spec: FileSpec, progress: FileProgress, cancel: CancelToken
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
        self, spec: FileSpec, progress: FileProgress, cancel: CancelToken
    ) -> tuple[Path, int, str]:
        """One attempt with the strategy the file's state calls for (``_goes_in_parts``);
        parts that decline the file leave it to the single stream."""
        if self._goes_in_parts(spec):
            done = self.in_parts.run(spec, progress, cancel)
            if done is not None:
                return done
        return self.single.run(spec, progress, cancel)

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
