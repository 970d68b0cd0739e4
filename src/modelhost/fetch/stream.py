"""The single-stream strategy: one connection, appended to the ``.part`` file, resumable.

Each file streams into ``<partial_dir>/<key>.part`` beside a ``<key>.json`` that records the
URL and the validator (ETag / Last-Modified) the bytes came with. After a dropped connection,
or after the whole process was killed, the next attempt sends ``Range`` + ``If-Range`` and
appends; a server that answers 200 instead, or a validator that changed, restarts the file
from zero, so two versions are never spliced. The parts strategy also hands a ``200`` to its
first ranged request to ``SingleStream.receive``, which streams it whole.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
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
    WRITEBACK_EVERY,
    FileProgress,
    FileSpec,
    PartWriter,
    body_reader,
    content_length,
    error_for_status,
    range_total,
    ready_to_read,
    set_thread_nice,
    start_writeback,
    strong_etag,
    thread_nice,
    verify,
)

if TYPE_CHECKING:
    from modelhost.fetch.engine import FetchEngine


@dataclass
class PartialState:
    """What ``<key>.json`` records beside a single stream's ``.part``: the bytes' origin."""

    url: str
    etag: str | None
    last_modified: str | None
    total: int | None


class Hasher:
    """sha256 in a second thread, fed the buffers the network thread has written.

    hashlib releases the GIL on large updates, so hashing overlaps the next receive.
    """

    def __init__(self, buffers: int, git_size: int | None = None) -> None:
        self._nice = thread_nice()
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


class SingleStream:
    """The file over one connection (the ``Strategy`` the engine falls back to)."""

    def __init__(self, engine: FetchEngine) -> None:
        self.engine = engine

    def run(
        self, spec: FileSpec, progress: FileProgress, cancel: CancelToken
    ) -> tuple[Path, int, str]:
        """One attempt: resume the ``.part`` file if its state has a validator, else start
        from zero."""
        part, meta = self.engine.partial_paths(spec)
        offset, state = self._load_state(spec, part, meta)
        headers: dict[str, str] = {}
        if offset and state is not None:
            validator = strong_etag(state.etag) or state.last_modified
            if validator is None:
                # Without a validator a resumed range could belong to another version.
                offset, state = 0, None
            else:
                headers["Range"] = f"bytes={offset}-"
                headers["If-Range"] = validator
        response = self.engine.open(spec.url, headers=headers, cancel=cancel)
        progress.throttle.fit_socket(response.connection.sock)
        try:
            return self.receive(spec, response, part, meta, offset, state, progress, cancel)
        finally:
            response.close()

    def _load_state(
        self, spec: FileSpec, part: Path, meta: Path
    ) -> tuple[int, PartialState | None]:
        """How many bytes an earlier attempt left, and what they were validated by."""
        try:
            state = PartialState(**json.loads(meta.read_text()))
            offset = part.stat().st_size
        except (FileNotFoundError, ValueError, TypeError):
            part.unlink(missing_ok=True)
            return 0, None
        if state.url != spec.url or (state.total is not None and offset > state.total):
            part.unlink(missing_ok=True)
            return 0, None
        return offset, state

    def receive(
        self,
        spec: FileSpec,
        response: OpenResponse,
        part: Path,
        meta: Path,
        offset: int,
        state: PartialState | None,
        progress: FileProgress,
        cancel: CancelToken,
    ) -> tuple[Path, int, str]:
        etag = response.header("ETag")
        last_modified = response.header("Last-Modified")
        if response.status == 416 and offset and state and offset == state.total:
            total = offset  # the earlier attempt had everything; only verification is left
            progress.set_status("verifying")
        elif response.status == 206 and offset:
            match = CONTENT_RANGE.match(response.header("Content-Range") or "")
            same_version = state is not None and (
                etag is None or state.etag is None or etag == state.etag
            )
            if not match or match.group(1) != str(offset) or not same_version:
                # A range we did not ask for, or from another version: start over cleanly.
                self._discard_partial(part, meta)
                raise TransientFetchError(
                    f"{spec.url} changed or answered an unexpected range; restarting from zero"
                )
            total = range_total(match, response.url)
        elif response.status == 200:
            if offset:
                # The server sent the whole file: a new version, or no range support.
                self._discard_partial(part, meta)
                offset = 0
            total = content_length(response)
        else:
            if response.status == 416:
                self._discard_partial(part, meta)
            raise error_for_status(response)

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
        hasher = Hasher(buffers=4, git_size=git_size)
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

    def _stream(
        self,
        response: OpenResponse,
        part: Path,
        offset: int,
        total: int | None,
        hasher: Hasher,
        progress: FileProgress,
        cancel: CancelToken,
    ) -> int:
        """Append the body to ``part``, hashing what is already there first.

        Received bytes are written to ``part`` at once: whole blocks around the page cache
        (``PartWriter``, O_DIRECT) once ``DIRECT_MIN_WRITE`` bytes wait, and everything
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
        read_some = body_reader(response.response, total - offset if total is not None else None)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        writer: PartWriter | None = None
        try:
            # Never keep bytes past what was recorded, also from 0: a restart without a
            # validator (or of a shorter new version) overwrites a longer earlier .part, and
            # the size and digest come from the stream, so a stale tail would go unnoticed.
            os.ftruncate(fd, offset)
            writer = PartWriter(part, fd, offset)
            if writer.base:
                self._hash_existing(fd, writer.base, hasher, cancel)
            received = self._receive_into(
                read_some,
                ready_to_read(response),
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
        writer: PartWriter,
        hasher: Hasher,
        where: tuple[int, int | None, str],
        progress: FileProgress,
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
    def _hash_existing(fd: int, length: int, hasher: Hasher, cancel: CancelToken) -> None:
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
