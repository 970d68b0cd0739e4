"""The single stream's writes: whole blocks around the page cache (O_DIRECT), the rest
buffered, every received byte in the file before the stream waits for the network."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from fileserver import DropAfter, FileServer, Stall

from modelhost.fetch import FetchEngine, FileSpec, RetryPolicy, UrlPolicy, transfer
from modelhost.fetch.transfer import DIRECT_ALIGN, DIRECT_MIN_WRITE, PartWriter

PAGE = mmap.PAGESIZE


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_engine(tmp_path: Path, server: FileServer) -> FetchEngine:
    policy = UrlPolicy.from_hosts([server.host_port])
    retry = RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05)
    return FetchEngine(tmp_path / "partial", policy, retry, read_timeout_s=0.5)


def resident_pages(path: Path, start: int = 0) -> int:
    """How many of ``path``'s pages from byte ``start`` on are in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = (size + PAGE - 1) // PAGE
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as m:
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident = sum(v & 1 for v in vector[start // PAGE :])
        del address
    return resident


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def direct_writer(part: Path, fd: int, offset: int) -> PartWriter:
    writer = PartWriter(part, fd, offset)
    if writer.direct_fd is None:
        writer.close()
        pytest.skip("no O_DIRECT on this platform or file system")
    return writer


def test_blocks_wait_for_a_minimum_and_urgent_writes_everything(tmp_path):
    part = tmp_path / "w.part"
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    buffer = mmap.mmap(-1, 4 * 1024 * 1024)
    data = os.urandom(len(buffer))
    try:
        writer = direct_writer(part, fd, 0)
        view = memoryview(buffer)
        fill = writer.start(view)
        assert fill == 0
        view[:10_000] = data[:10_000]
        writer.write(view, 10_000)
        assert part.stat().st_size == 0  # fewer than DIRECT_MIN_WRITE bytes wait
        assert writer.pending(10_000)
        writer.write(view, 10_000, urgent=True)  # the stream is about to wait
        assert part.stat().st_size == 10_000
        assert not writer.pending(10_000)
        more = 10_000 + DIRECT_MIN_WRITE + 5
        view[10_000:more] = data[10_000:more]
        writer.write(view, more)
        # The whole blocks since the last aligned offset went direct; the tail waits.
        assert part.stat().st_size == more - more % DIRECT_ALIGN
        writer.write(view, more, urgent=True)
        writer.close()
        assert part.read_bytes() == data[:more]
    finally:
        os.close(fd)


def test_resume_at_an_unaligned_offset_rewrites_the_head_from_the_file(tmp_path):
    part = tmp_path / "w.part"
    data = os.urandom(3 * DIRECT_ALIGN + 777)
    offset = DIRECT_ALIGN + 904
    part.write_bytes(data[:offset])
    fd = os.open(part, os.O_RDWR)
    buffer = mmap.mmap(-1, 4 * 1024 * 1024)
    try:
        writer = direct_writer(part, fd, offset)
        assert (writer.base, writer.head) == (DIRECT_ALIGN, 904)
        view = memoryview(buffer)
        fill = writer.start(view)
        assert bytes(view[:fill]) == data[DIRECT_ALIGN:offset]  # read back, to write again
        rest = data[offset:]
        view[fill : fill + len(rest)] = rest
        writer.write(view, fill + len(rest), urgent=True)
        writer.close()
        assert part.read_bytes() == data
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT and mincore: Linux")
def test_fetched_file_skipped_the_page_cache_and_resumed_exactly(tmp_path):
    payload = os.urandom(8 * 1024 * 1024 + 123)
    cut = 3 * 1024 * 1024 + 1000  # unaligned: the resume reads its head back
    with FileServer() as server:
        server.add("/w", payload, faults=[DropAfter(cut)])
        engine = make_engine(tmp_path, server)
        fetched = engine.fetch(FileSpec(server.url("/w"), "w", len(payload), sha(payload)))
        starts = [r.range_start for r in server.requests if r.method == "GET"]
        sent = server.bytes_sent("/w")
    assert fetched.sha256 == sha(payload)
    assert starts == [None, cut]
    assert sent == len(payload)  # nothing fetched twice
    if transfer.open_direct(fetched.local_path) is None:
        pytest.skip("no O_DIRECT on this file system")
    # The resume read the first attempt's bytes back to hash them; after them only the pages
    # written buffered (around the resume point, the file's last block) are cached.
    assert resident_pages(fetched.local_path) >= cut // PAGE
    assert resident_pages(fetched.local_path, start=cut) <= 3
    with open(fetched.local_path, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == sha(payload)


def test_without_o_direct_every_receive_is_written_buffered(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "open_direct", lambda path: None)
    payload = os.urandom(5 * 1024 * 1024 + 17)
    with FileServer() as server:
        server.add("/w", payload, faults=[DropAfter(1_000_000)])
        engine = make_engine(tmp_path, server)
        fetched = engine.fetch(FileSpec(server.url("/w"), "w", len(payload), sha(payload)))
        starts = [r.range_start for r in server.requests if r.method == "GET"]
    assert starts == [None, 1_000_000]
    assert fetched.local_path.read_bytes() == payload
    drop_cache(fetched.local_path)
    assert resident_pages(fetched.local_path) == 0  # mincore measures what it should


def test_a_stalled_stream_has_every_received_byte_on_disk(tmp_path):
    """While the upstream is silent, what arrived is in the file (a kill then loses nothing
    received): the engine writes its pending bytes before it waits."""
    payload = os.urandom(2 * 1024 * 1024)
    received = 700_001  # unaligned, and above DIRECT_MIN_WRITE
    with FileServer() as server:
        server.add("/w", payload, faults=[Stall(received, seconds=2)])
        engine = make_engine(tmp_path, server)
        engine.read_timeout_s = 5.0
        spec = FileSpec(server.url("/w"), "w", len(payload), sha(payload))
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(engine.fetch(spec)))
        thread.start()
        deadline = time.monotonic() + 1.5
        while engine.partial_size(spec) < received and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = engine.partial_size(spec)
        thread.join(timeout=10)
    assert seen == received
    assert result and result[0].local_path.read_bytes() == payload


def test_a_refused_direct_write_falls_back_to_buffered_writes(tmp_path):
    """EINVAL from a direct write (here: a buffer address the kernel refuses) is not an
    error: the bytes go through the ordinary descriptor, and so does the rest."""
    part = tmp_path / "w.part"
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    buffer = mmap.mmap(-1, 4 * DIRECT_ALIGN)
    data = os.urandom(len(buffer))
    buffer[:] = data
    try:
        writer = direct_writer(part, fd, 0)
        writer._direct(memoryview(buffer)[1 : 1 + DIRECT_ALIGN])  # misaligned address
        assert writer.direct_fd is None
        assert part.read_bytes() == data[1 : 1 + DIRECT_ALIGN]
        writer.write(memoryview(buffer), len(buffer))  # buffered from here on, at once
        assert part.stat().st_size == len(buffer)
        writer.close()
    finally:
        os.close(fd)
