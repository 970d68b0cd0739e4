"""Multi-connection downloads (fetch/parts.py) against the real fault-injecting file server.

Files of a few MB with a 1 MiB threshold and 1 MiB parts, so every test takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
from fileserver import (
    ChangeAfterFirst,
    DropAfter,
    FileServer,
    IgnoreIfRange,
    IgnoreRange,
    Rate,
    Stall,
    Status,
)

from modelhost.errors import Cancelled, DigestMismatch, FetchError
from modelhost.fetch import CancelToken, FetchEngine, FileSpec, Progress, RetryPolicy, UrlPolicy
from modelhost.fetch.parts import Part, PartMap

MIB = 1024 * 1024
SIZE = 6 * MIB + 12345  # seven parts, the last one short


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def payload() -> bytes:
    return os.urandom(SIZE)


def make_engine(
    partial: Path, server: FileServer, connections: int = 4, retries: int = 3, **options
) -> FetchEngine:
    options.setdefault("part_size", MIB)
    # These tests count connections and parts side by side: every connection from the
    # start (tests/test_fetch_probe.py covers the probing that adds them one by one).
    options.setdefault("probe_window_s", None)
    return FetchEngine(
        partial,
        UrlPolicy.from_hosts([server.host_port]),
        RetryPolicy(retries=retries, backoff_s=0.01, backoff_max_s=0.05),
        read_timeout_s=2.0,
        connections=connections,
        part_threshold=MIB,
        **options,
    )


def gets(server: FileServer, path: str):
    return [r for r in server.requests if r.method == "GET" and r.path == path]


def spec_of(server: FileServer, path: str, data: bytes, digest: bool = True) -> FileSpec:
    return FileSpec(server.url(path), "w.bin", len(data), sha(data) if digest else None)


def test_a_large_file_comes_as_ranged_parts(tmp_path, fileserver, payload):
    fileserver.add("/w", payload)
    engine = make_engine(tmp_path, fileserver)
    fetched = engine.fetch(spec_of(fileserver, "/w", payload))
    assert fetched.local_path.read_bytes() == payload
    assert fetched.sha256 == sha(payload)
    assert fetched.bytes_transferred == SIZE
    requests = gets(fileserver, "/w")
    assert sorted(r.range_start for r in requests) == [i * MIB for i in range(7)]
    assert all(r.status == 206 for r in requests)
    assert requests[0].headers["Range"] == f"bytes=0-{MIB - 1}"
    # Every part after the first is asked with the first one's validator.
    assert all(r.headers["If-Range"] == fileserver.etag("/w") for r in requests[1:])
    assert fileserver.bytes_sent("/w") == SIZE
    saved = PartMap.from_json(engine.parts_map_path(fetched.spec).read_text())
    assert [(p.start, p.end, p.done) for p in saved.parts][-1] == (6 * MIB, SIZE, 12345)
    assert saved.done == SIZE and saved.etag == fileserver.etag("/w")


def test_each_worker_fetches_its_parts_over_one_kept_connection(tmp_path, fileserver, payload):
    """Two workers, seven parts: each worker asks for its next part on the connection its
    last one came over, so the server accepts two connections for seven requests."""
    fileserver.add("/w", payload)
    fetched = make_engine(tmp_path, fileserver, connections=2).fetch(
        spec_of(fileserver, "/w", payload)
    )
    assert fetched.sha256 == sha(payload)
    assert sorted(r.range_start for r in gets(fileserver, "/w")) == [i * MIB for i in range(7)]
    assert fileserver.connections_accepted() == 2


def test_a_kept_connection_the_server_closed_is_replaced(tmp_path, payload):
    """A server that closes every connection after its response without saying so (as an
    idle timeout does): each next part's request on the kept connection fails, and goes out
    again on a new connection, so the file still arrives with every part asked once."""
    with FileServer(keep_alive=False) as server:
        server.add("/w", payload)
        fetched = make_engine(tmp_path, server, connections=2).fetch(
            spec_of(server, "/w", payload)
        )
        requests = gets(server, "/w")
        accepted = server.connections_accepted()
    assert fetched.sha256 == sha(payload)
    assert sorted(r.range_start for r in requests) == [i * MIB for i in range(7)]
    assert accepted == 7


def test_small_files_and_one_connection_stay_one_stream(tmp_path, fileserver, payload):
    fileserver.add("/small", payload[: MIB - 1])
    fileserver.add("/w", payload)
    engine = make_engine(tmp_path / "a", fileserver)
    engine.fetch(spec_of(fileserver, "/small", payload[: MIB - 1]))
    single = make_engine(tmp_path / "b", fileserver, connections=1)
    assert single.fetch(spec_of(fileserver, "/w", payload)).sha256 == sha(payload)
    assert [r.range_start for r in fileserver.requests] == [None, None]


def test_a_dropped_part_resumes_where_it_broke(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[DropAfter(300_000, at=2 * MIB)])
    fetched = make_engine(tmp_path, fileserver).fetch(spec_of(fileserver, "/w", payload))
    assert fetched.local_path.read_bytes() == payload
    starts = [r.range_start for r in gets(fileserver, "/w")]
    assert 2 * MIB + 300_000 in starts  # resumed inside the part, not from its start
    assert starts.count(2 * MIB) == 1
    assert fileserver.bytes_sent("/w") < 1.05 * SIZE


def test_one_parts_500_is_retried(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Status(500, at=3 * MIB)])
    fetched = make_engine(tmp_path, fileserver).fetch(spec_of(fileserver, "/w", payload))
    assert fetched.sha256 == sha(payload)
    third = [r.status for r in gets(fileserver, "/w") if r.range_start == 3 * MIB]
    assert third == [500, 206]
    assert sum(r.body_bytes_sent for r in gets(fileserver, "/w") if r.status == 206) == SIZE


def test_a_part_that_keeps_failing_fails_the_file_and_keeps_the_rest(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Status(503, times=10, at=4 * MIB)])
    engine = make_engine(tmp_path, fileserver, retries=2)
    spec = spec_of(fileserver, "/w", payload)
    with pytest.raises(FetchError, match=r"part 5 of 7: gave up after 3 attempts"):
        engine.fetch(spec)
    # Every other part's bytes stay, recorded in the map, for the next attempt.
    saved = PartMap.from_json(engine.parts_map_path(spec).read_text())
    assert [p.done for p in saved.parts][4] == 0
    assert engine.partial_size(spec) == saved.done >= SIZE - MIB - 12345


@pytest.mark.parametrize("compliant", [True, False], ids=["if-range", "ignores-if-range"])
def test_a_new_version_between_parts_restarts_the_file(tmp_path, fileserver, payload, compliant):
    """Part 0 comes from the old version; every later request sees the new one: a compliant
    server answers 200 (If-Range fails), a non-compliant one 206 with the new ETag. Either
    way the file restarts and ends as the new version, whole, never a mix."""
    new = os.urandom(SIZE)
    faults = [ChangeAfterFirst(new), Rate(4 * MIB)]
    if not compliant:
        faults.append(IgnoreIfRange())
    fileserver.add("/w", payload, faults=faults)
    fetched = make_engine(tmp_path, fileserver).fetch(spec_of(fileserver, "/w", new, digest=False))
    assert fetched.sha256 == sha(new)
    assert fetched.local_path.read_bytes() == new
    requests = gets(fileserver, "/w")
    # The restart asked for part 0 again, without a validator, and got the new version.
    restart = [i for i, r in enumerate(requests) if r.range_start == 0][1]
    assert "If-Range" not in requests[restart].headers
    assert all(r.headers["If-Range"] == fileserver.etag("/w") for r in requests[restart + 1 :])


def test_a_new_version_with_the_old_digest_is_a_clear_error(tmp_path, fileserver, payload):
    new = os.urandom(SIZE)
    fileserver.add("/w", payload, faults=[ChangeAfterFirst(new)])
    engine = make_engine(tmp_path, fileserver)
    spec = spec_of(fileserver, "/w", payload)
    with pytest.raises(DigestMismatch, match=f"is {sha(new)}, expected {sha(payload)}"):
        engine.fetch(spec)
    assert not engine.parts_map_path(spec).exists()
    assert engine.partial_size(spec) == 0


def test_a_server_without_range_gets_exactly_one_get(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[IgnoreRange()])
    engine = make_engine(tmp_path, fileserver)
    spec = spec_of(fileserver, "/w", payload)
    fetched = engine.fetch(spec)
    assert fetched.local_path.read_bytes() == payload
    requests = gets(fileserver, "/w")
    assert [(r.range_start, r.status) for r in requests] == [(0, 200)]
    assert fileserver.bytes_sent("/w") == SIZE
    assert not engine.parts_map_path(spec).exists()


def test_an_expired_signed_url_is_resolved_again(tmp_path, fileserver, payload):
    """The redirect target's links last 0.7 s; the download takes ~2 s, so parts started
    later get 403 and the engine asks the original URL again for a fresh link."""
    fileserver.add("/cdn/w", payload, faults=[Rate(1_600_000)])
    fileserver.add_signed_redirect("/w", "/cdn/w", ttl_s=0.7)
    engine = make_engine(tmp_path, fileserver, connections=2)
    fetched = engine.fetch(spec_of(fileserver, "/w", payload))
    assert fetched.local_path.read_bytes() == payload
    cdn = gets(fileserver, "/cdn/w")
    expired = [r for r in cdn if r.status == 403]
    resolutions = fileserver.count("GET", "/w") - 1
    assert expired, [(r.range_start, r.status) for r in cdn]
    # Each 403 led to at most one new resolution (two workers share a fresh link).
    assert 1 <= resolutions <= len(expired)
    served = [r for r in cdn if r.status == 206]
    assert sorted(r.range_start for r in served) == [i * MIB for i in range(7)]
    assert sum(r.body_bytes_sent for r in served) == SIZE


def test_a_403_without_a_redirect_is_a_denial(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Status(403, at=MIB)])
    engine = make_engine(tmp_path, fileserver)
    with pytest.raises(FetchError, match="403"):
        engine.fetch(spec_of(fileserver, "/w", payload))
    assert fileserver.count("GET", "/w") <= 7  # no retries of a denial


def test_parts_resume_from_the_saved_map_in_a_new_engine(tmp_path, fileserver, payload):
    """A first engine breaks off (parts 2 and 5 cut, no retries); a second one, knowing
    nothing but the files, asks each unfinished part from its recorded offset."""
    fileserver.add(
        "/w", payload, faults=[DropAfter(400_000, at=2 * MIB), DropAfter(100_000, at=5 * MIB)]
    )
    spec = spec_of(fileserver, "/w", payload)
    with pytest.raises(FetchError):
        make_engine(tmp_path, fileserver, retries=0).fetch(spec)
    # The first engine's requests still on their way in are logged when the server reads
    # them: count them all as the first run's (under load, two landed after the count).
    deadline = time.monotonic() + 5
    while fileserver.open_connections() and time.monotonic() < deadline:
        time.sleep(0.01)
    first_run = len(fileserver.requests)
    fileserver.set_faults("/w", [])  # a fault the first run did not reach must not fire now
    engine = make_engine(tmp_path, fileserver)
    saved = PartMap.from_json(engine.parts_map_path(spec).read_text())
    unfinished = [p.start + p.done for p in saved.parts if p.start + p.done < p.end]
    progress = Progress(SIZE)
    fetched = engine.fetch(spec, progress)
    assert fetched.local_path.read_bytes() == payload
    resumed = [r for r in fileserver.requests[first_run:] if r.method == "GET"]
    assert sorted(r.range_start for r in resumed) == sorted(unfinished)
    assert all(r.headers["If-Range"] == fileserver.etag("/w") for r in resumed)
    assert fetched.bytes_transferred == SIZE - saved.done
    assert progress.snapshot().bytes_done == SIZE
    # The second engine is served exactly what the map says is missing. (What the first
    # run's other connections had in flight when it gave up depends on the machine's load.)
    assert sum(r.body_bytes_sent for r in resumed) == SIZE - saved.done


class RecordingProgress(Progress):
    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.seen: list[int] = []
        self.track("w.bin", total)

    def add(self, nbytes: int, path: str | None = None) -> None:
        super().add(nbytes, path)
        self.seen.append(self.snapshot().bytes_done)


def test_progress_counts_every_part_and_never_overshoots(tmp_path, fileserver, payload):
    fileserver.add(
        "/w", payload, faults=[DropAfter(200_000, at=MIB), Status(502, at=4 * MIB), Rate(8 * MIB)]
    )
    progress = RecordingProgress(SIZE)
    make_engine(tmp_path, fileserver).fetch(spec_of(fileserver, "/w", payload), progress)
    snapshot = progress.snapshot()
    assert snapshot.bytes_done == SIZE
    assert snapshot.files[0].bytes_done == SIZE and snapshot.files[0].status == "done"
    assert max(progress.seen) == SIZE and progress.seen == sorted(progress.seen)
    assert progress.transferred == SIZE
    assert snapshot.speed_bps is not None and snapshot.speed_bps > 0


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.serial  # timing-sensitive: run alone
def test_cancel_closes_every_connection_within_a_second(tmp_path, fileserver):
    data = os.urandom(16 * MIB)
    fileserver.add("/w", data, faults=[Rate(200_000)])
    engine = make_engine(tmp_path, fileserver, connections=8)
    cancel = CancelToken()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            engine.fetch(spec_of(fileserver, "/w", data), cancel=cancel)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    # A connection is open before its request is read and logged: wait for both.
    wait_until(
        lambda: fileserver.open_connections() == 8 and len(gets(fileserver, "/w")) == 8,
        10,
        "8 parts in flight",
    )
    started = time.monotonic()
    cancel.cancel("cancelled by the test")
    wait_until(lambda: fileserver.open_connections() == 0, 1.0, "connections closed")
    worker.join(1.0)
    assert not worker.is_alive()
    assert time.monotonic() - started < 1.0
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    assert len(gets(fileserver, "/w")) == 8  # nothing was started after the cancel


def test_the_global_connection_cap_holds_across_files(tmp_path, fileserver):
    data = {name: os.urandom(4 * MIB) for name in ("/a", "/b")}
    for name, body in data.items():
        fileserver.add(name, body, faults=[Rate(4 * MIB)])
    engine = make_engine(tmp_path, fileserver, connections=4, max_connections=3)
    most = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, fileserver.open_connections())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [
        threading.Thread(target=engine.fetch, args=(spec_of(fileserver, name, body),))
        for name, body in data.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    done.set()
    sampler.join()
    assert most == 3
    assert fileserver.bytes_sent() == 8 * MIB
    assert len(gets(fileserver, "/a")) == len(gets(fileserver, "/b")) == 4


def test_partial_size_counts_the_bytes_written_not_the_holes(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Status(404, at=0 + MIB)])
    engine = make_engine(tmp_path, fileserver, connections=1 + 1)
    spec = spec_of(fileserver, "/w", payload)
    with pytest.raises(FetchError):
        engine.fetch(spec)
    saved = json.loads(engine.parts_map_path(spec).read_text())
    done = sum(part["done"] for part in saved["parts"])
    assert engine.partial_size(spec) == engine.partial_bytes() == done
    engine.discard(spec)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def hashers(monkeypatch) -> list:
    """Every PrefixHasher a download makes, kept for its counters."""
    from modelhost.fetch import parts

    made: list[parts.PrefixHasher] = []

    class Recorded(parts.PrefixHasher):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(parts, "PrefixHasher", Recorded)
    return made


def test_bytes_ahead_of_the_prefix_are_hashed_from_memory(tmp_path, fileserver, hashers):
    """Four connections on a paced server, each part two receive buffers long: three
    quarters of the bytes arrive ahead of the hashed prefix. Their buffers are kept until
    the prefix reaches them, so (almost) nothing is read back from the file; the kept memory
    is all returned at the end."""
    from modelhost.fetch.parts import PART_BUFFER

    data = os.urandom(8 * PART_BUFFER)
    fileserver.add("/w", data, faults=[Rate(32 * MIB)])
    engine = make_engine(tmp_path, fileserver, connections=4, part_size=2 * PART_BUFFER)
    assert engine.fetch(spec_of(fileserver, "/w", data)).sha256 == sha(data)
    (hasher,) = hashers
    assert hasher.from_memory + hasher.read_back == len(data)
    # A buffer that ends its part can be read back before its worker offers it; the rest
    # comes from memory (reading back every byte ahead: about a quarter from memory).
    assert hasher.from_memory >= 6 * PART_BUFFER, (hasher.from_memory, hasher.read_back)
    assert engine.ahead_memory.held == 0


def test_without_memory_to_keep_the_bytes_ahead_are_read_back(tmp_path, fileserver, hashers):
    """With no memory budget, every buffer not at the prefix is read back from the file,
    and the hash is still that of the file."""
    from modelhost.fetch.parts import AheadMemory

    data = os.urandom(8 * MIB)
    fileserver.add("/w", data, faults=[Rate(16 * MIB)])
    engine = make_engine(tmp_path, fileserver, connections=4)
    engine.ahead_memory = AheadMemory(0)
    assert engine.fetch(spec_of(fileserver, "/w", data)).sha256 == sha(data)
    (hasher,) = hashers
    assert (hasher.from_memory, hasher.read_back) == (0, len(data))


def test_kept_buffers_survive_a_dropped_part_and_are_all_returned(tmp_path, fileserver, hashers):
    """A part that breaks mid-buffer resumes; what was kept before the break and what comes
    after it hash to the file's digest, and no kept memory is left held."""
    data = os.urandom(8 * MIB)
    drops = [DropAfter(300_001, at=3 * MIB), DropAfter(5, at=6 * MIB)]
    fileserver.add("/w", data, faults=[Rate(16 * MIB), *drops])
    engine = make_engine(tmp_path, fileserver, connections=4)
    fetched = engine.fetch(spec_of(fileserver, "/w", data))
    assert fetched.sha256 == sha(data)
    assert fetched.local_path.read_bytes() == data
    assert engine.ahead_memory.held == 0
    assert len([r for r in gets(fileserver, "/w") if r.range_start in (3 * MIB, 6 * MIB)]) == 2


def test_sigkill_during_a_multi_part_download_resumes_every_part(tmp_path):
    """A modelhost server (a subprocess) is SIGKILLed while four connections fetch a 32 MB
    file in 2 MB parts; the restarted server resumes each unfinished part from its recorded
    offset, and the server sends less than 1.05x the file in all."""
    import signal

    import httpx
    from test_crash_resume import free_port, start_server, wait_for_bytes, wait_until_finished

    from modelhost.units import MB

    size = 32 * MB
    data = os.urandom(size)
    expected = sha(data)
    home, port = tmp_path / "home", free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "MODELHOST_FETCH_CONNECTIONS": "4",
        "MODELHOST_FETCH_PART_THRESHOLD_MB": "1",
        "MODELHOST_FETCH_PART_SIZE_MB": "2",
    }
    with FileServer() as files:
        files.add("/big.safetensors", data, etag='"big-v1"', faults=[Rate(1_500_000)])
        server = start_server(home, port, files.host_port, env)
        try:
            job_id = httpx.post(
                f"{base}/models/download",
                json={
                    "source": "url",
                    "model_id": files.url("/big.safetensors"),
                    "name": "big",
                    "sha256": expected,
                },
                timeout=30,
            ).json()["download_id"]
            wait_for_bytes(base, job_id, 0.4 * size)
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
            before_kill = [r for r in files.requests if r.method == "GET"]
            (map_path,) = (home / "partial").glob("*.parts.json")
            saved = PartMap.from_json(map_path.read_text())
            # Parts write with O_DIRECT and deferred blocks: what the map recorded must be
            # on disk, byte for byte, after the kill (never a count ahead of the writes).
            on_disk = map_path.with_name(map_path.name.replace(".parts.json", ".part"))
            written = on_disk.read_bytes()
            for part in saved.parts:
                got = written[part.start : part.start + part.done]
                assert got == data[part.start : part.start + part.done], (part, len(got))
            assert saved.done > 0.3 * size
            server = start_server(home, port, files.host_port, env)
            status = wait_until_finished(base, job_id)
            assert status["status"] == "completed", status["message"]
            info = httpx.get(f"{base}/models/download/big/info", timeout=10).json()
        finally:
            server.kill()
            server.wait(timeout=30)
        requests = [r for r in files.requests if r.method == "GET"]

    assert len({r.range_start for r in before_kill}) >= 4  # parts side by side
    resumed = requests[len(before_kill) :]
    assert all(r.headers["If-Range"] == '"big-v1"' for r in resumed)
    # Every unfinished part was asked from the offset the map recorded, nothing else; at
    # least one of them inside itself (the parts in flight when the kill struck).
    unfinished = [p.start + p.done for p in saved.parts if not p.finished]
    assert sorted(r.range_start for r in resumed) == unfinished
    assert any(offset % (2 * MB) for offset in unfinished), unfinished
    served = sum(r.body_bytes_sent for r in requests)
    assert served < 1.05 * size, f"served {served / size:.3f}x the file"
    assert info["files"][0]["sha256"] == expected
    installed = Path(info["path"]) / "big.safetensors"
    assert sha(installed.read_bytes()) == expected


@pytest.mark.parametrize("connections", [2, 4, 8, 16])
def test_automatic_parts_keep_one_per_connection_within_the_kept_memory(connections):
    """The window between the hash and the receiving front is about one part per
    connection: automatic parts keep it within AHEAD_MEMORY, and within 8-64 MiB."""
    from modelhost.fetch.parts import AHEAD_MEMORY, auto_part_size

    for total in (100 * MIB, 1024 * MIB, 10 * 1024 * MIB):
        size = auto_part_size(total, connections)
        assert 8 * MIB <= size <= 64 * MIB and size % (64 * 1024) == 0
        assert connections * size <= AHEAD_MEMORY, (total, connections, size)
    largest = min(64 * MIB, AHEAD_MEMORY // connections)
    assert auto_part_size(10 * 1024 * MIB, connections) == largest


def test_the_part_map_json_holds_every_field_and_reads_back():
    """``to_json`` is written by hand (the map is rewritten every 25 ms): it must hold every
    field the dataclass has, and ``from_json`` must give the same map back."""
    import dataclasses

    state = PartMap(
        url="http://mirror.test/w.bin",
        total=3 * MIB,
        etag='"v1"',
        last_modified="Tue, 01 Dec 2026 10:00:00 GMT",
        parts=[Part(0, MIB, MIB), Part(MIB, 2 * MIB, 12345), Part(2 * MIB, 3 * MIB, 0)],
    )
    assert json.loads(state.to_json()) == dataclasses.asdict(state)
    assert PartMap.from_json(state.to_json()) == state


@pytest.mark.serial
def test_bytes_ahead_wait_for_the_hash_rather_than_be_read_back(tmp_path, fileserver, hashers):
    """Memory for two buffers ahead of the hash, four paced connections, parts two buffers
    long: the workers ahead of the part the hash waits for, while that part arrives, wait
    for the hash to take their buffers instead of leaving them to be read back from the file
    (which costs more than the wait when the hash is what limits). Only buffers that end a
    part can be read back (before their worker offers them)."""
    from modelhost.fetch.parts import PART_BUFFER, AheadMemory

    data = os.urandom(16 * PART_BUFFER)
    fileserver.add("/w", data, faults=[Rate(32 * MIB)])
    engine = make_engine(tmp_path, fileserver, connections=4, part_size=2 * PART_BUFFER)
    engine.ahead_memory = AheadMemory(2 * PART_BUFFER)
    assert engine.fetch(spec_of(fileserver, "/w", data)).sha256 == sha(data)
    (hasher,) = hashers
    assert hasher.from_memory + hasher.read_back == len(data)
    assert hasher.read_back <= 4 * PART_BUFFER, (hasher.from_memory, hasher.read_back)
    assert engine.ahead_memory.held == 0


@pytest.mark.serial
def test_a_stalled_part_lets_the_bytes_ahead_be_read_back(tmp_path, fileserver, hashers):
    """The same, but the first part stalls for a second after its first buffer: the hash has
    nothing to do, so the workers ahead do not wait for it; their bytes are read back once
    the part arrives, and the download takes about the stall, not the stall per buffer."""
    from modelhost.fetch.parts import PART_BUFFER, AheadMemory

    data = os.urandom(16 * PART_BUFFER)
    fileserver.add(
        "/w", data, faults=[Rate(32 * MIB), Stall(after=PART_BUFFER, seconds=1.0, at=0)]
    )
    engine = make_engine(tmp_path, fileserver, connections=4, part_size=2 * PART_BUFFER)
    engine.ahead_memory = AheadMemory(2 * PART_BUFFER)
    started = time.monotonic()
    assert engine.fetch(spec_of(fileserver, "/w", data)).sha256 == sha(data)
    elapsed = time.monotonic() - started
    (hasher,) = hashers
    assert hasher.read_back >= 4 * PART_BUFFER, (hasher.from_memory, hasher.read_back)
    assert elapsed < 3.0, elapsed
