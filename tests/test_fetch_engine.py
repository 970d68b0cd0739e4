"""The fetch engine against a real loopback server with injected faults."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from fileserver import (
    ChangeAfterFirst,
    Corrupt,
    DropAfter,
    FileServer,
    IgnoreIfRange,
    IgnoreRange,
    NoValidators,
    Rate,
    Stall,
    Status,
)

from modelhost.errors import (
    Cancelled,
    DigestMismatch,
    FetchError,
    SizeMismatch,
    SourceNotAllowed,
    TransientFetchError,
)
from modelhost.fetch import CancelToken, FetchEngine, FileSpec, Progress, RetryPolicy, UrlPolicy

SIZE = 3 * 1024 * 1024 + 123


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def payload() -> bytes:
    return os.urandom(SIZE)


def make_engine(tmp_path: Path, server: FileServer, **retry) -> FetchEngine:
    policy = UrlPolicy.from_hosts([server.host_port])
    retry_policy = RetryPolicy(retries=retry.get("retries", 3), backoff_s=0.01, backoff_max_s=0.05)
    return FetchEngine(tmp_path / "partial", policy, retry_policy, read_timeout_s=1.0)


def gets(server: FileServer, path: str):
    return [r for r in server.requests if r.method == "GET" and r.path == path]


def test_plain_fetch_verifies_and_reports(tmp_path, fileserver, payload):
    fileserver.add("/w.safetensors", payload)
    engine = make_engine(tmp_path, fileserver)
    progress = Progress(total=SIZE)
    spec = FileSpec(fileserver.url("/w.safetensors"), "w.safetensors", SIZE, sha(payload))
    fetched = engine.fetch(spec, progress)
    assert fetched.sha256 == sha(payload)
    assert fetched.local_path.read_bytes() == payload
    assert fetched.bytes_transferred == SIZE
    assert progress.snapshot().bytes_done == SIZE
    assert fileserver.count("GET", "/w.safetensors") == 1


def test_probe_reads_size_and_validators(tmp_path, fileserver, payload):
    fileserver.add("/w.bin", payload)
    info = make_engine(tmp_path, fileserver).probe(fileserver.url("/w.bin"))
    assert info.size == SIZE
    assert info.etag == fileserver.etag("/w.bin")
    assert info.accept_ranges
    assert fileserver.count("GET") == 0 and fileserver.count("HEAD") == 1


def test_dropped_connection_resumes_with_range(tmp_path, fileserver, payload):
    cut = 1_000_000
    fileserver.add("/w", payload, faults=[DropAfter(cut)])
    engine = make_engine(tmp_path, fileserver)
    fetched = engine.fetch(FileSpec(fileserver.url("/w"), "w", SIZE, sha(payload)))
    assert fetched.local_path.read_bytes() == payload
    requests = gets(fileserver, "/w")
    assert [r.range_start for r in requests] == [None, cut]
    assert requests[1].headers["If-Range"] == fileserver.etag("/w")
    # Nothing was fetched twice.
    assert fileserver.bytes_sent("/w") == SIZE


def test_server_error_then_success_is_retried(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Status(500), Status(503)])
    fetched = make_engine(tmp_path, fileserver).fetch(FileSpec(fileserver.url("/w"), "w"))
    assert fetched.sha256 == sha(payload)
    assert [r.status for r in gets(fileserver, "/w")] == [500, 503, 200]


def test_client_error_is_not_retried(tmp_path, fileserver):
    with pytest.raises(FetchError) as info:
        make_engine(tmp_path, fileserver).fetch(FileSpec(fileserver.url("/missing"), "m"))
    assert not isinstance(info.value, TransientFetchError)
    assert "404" in info.value.message
    assert fileserver.count("GET", "/missing") == 1


def test_retries_are_bounded(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Status(503, times=10)])
    engine = make_engine(tmp_path, fileserver, retries=2)
    with pytest.raises(FetchError, match="gave up after 3 attempts"):
        engine.fetch(FileSpec(fileserver.url("/w"), "w"))
    assert fileserver.count("GET", "/w") == 3


def test_stall_times_out_and_resumes(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Stall(after=500_000, seconds=3)])
    fetched = make_engine(tmp_path, fileserver).fetch(FileSpec(fileserver.url("/w"), "w"))
    assert fetched.sha256 == sha(payload)
    assert [r.range_start for r in gets(fileserver, "/w")] == [None, 500_000]


def test_wrong_bytes_with_right_length_fail_verification(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Corrupt()])
    engine = make_engine(tmp_path, fileserver)
    spec = FileSpec(fileserver.url("/w"), "w", SIZE, sha(payload))
    with pytest.raises(DigestMismatch, match=sha(payload)):
        engine.fetch(spec)
    # The bad bytes are gone: nothing can be committed or resumed from them.
    assert engine.partial_size(spec) == 0
    assert not any(engine.partial_dir.iterdir())


def test_changed_file_with_compliant_if_range_restarts_cleanly(tmp_path, fileserver, payload):
    new = os.urandom(SIZE)
    fileserver.add("/w", payload, faults=[DropAfter(800_000), ChangeAfterFirst(new)])
    fetched = make_engine(tmp_path, fileserver).fetch(FileSpec(fileserver.url("/w"), "w"))
    # The server saw the old ETag in If-Range and sent the whole new version.
    assert fetched.local_path.read_bytes() == new
    assert [r.status for r in gets(fileserver, "/w")] == [200, 200]


def test_changed_etag_on_non_compliant_server_never_splices(tmp_path, fileserver, payload):
    new = os.urandom(SIZE)
    fileserver.add(
        "/w", payload, faults=[DropAfter(800_000), ChangeAfterFirst(new), IgnoreIfRange()]
    )
    fetched = make_engine(tmp_path, fileserver).fetch(FileSpec(fileserver.url("/w"), "w"))
    assert fetched.sha256 == sha(new)
    statuses = [(r.status, r.range_start) for r in gets(fileserver, "/w")]
    # 206 with a different ETag is refused, then the file restarts from zero.
    assert statuses == [(200, None), (206, 800_000), (200, None)]


def test_restart_without_validator_truncates_a_longer_partial(tmp_path, fileserver, payload):
    """Nothing to resume with (no ETag, no Last-Modified): the second attempt starts from
    byte 0, and the file upstream shrank meanwhile. The committed bytes must be the short
    file's, without the first attempt's tail past its end."""
    short = os.urandom(SIZE // 4)
    fileserver.add(
        "/w", payload, faults=[NoValidators(), DropAfter(SIZE // 2), ChangeAfterFirst(short)]
    )
    fetched = make_engine(tmp_path, fileserver).fetch(FileSpec(fileserver.url("/w"), "w"))
    assert [r.status for r in gets(fileserver, "/w")] == [200, 200]
    assert "Range" not in gets(fileserver, "/w")[1].headers  # nothing to resume with
    assert fetched.size == len(short)
    assert fetched.sha256 == sha(short)
    assert fetched.local_path.read_bytes() == short


def test_server_ignoring_range_restarts_from_zero(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[DropAfter(600_000), IgnoreRange()])
    progress = Progress(SIZE)
    fetched = make_engine(tmp_path, fileserver).fetch(
        FileSpec(fileserver.url("/w"), "w", SIZE, sha(payload)), progress
    )
    assert fetched.local_path.read_bytes() == payload
    # The restart took back the discarded bytes: progress is exact, not inflated.
    assert progress.snapshot().bytes_done == SIZE


def test_size_mismatch_is_reported(tmp_path, fileserver, payload):
    fileserver.add("/w", payload)
    with pytest.raises(SizeMismatch, match=str(SIZE)):
        make_engine(tmp_path, fileserver).fetch(FileSpec(fileserver.url("/w"), "w", SIZE + 1))


@pytest.mark.serial  # timing-sensitive: run alone
def test_cancel_stops_within_a_second(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Rate(500_000)])
    engine = make_engine(tmp_path, fileserver)
    cancel = CancelToken()
    cancelled_at: list[float] = []

    def cancel_soon() -> None:
        time.sleep(0.5)
        cancelled_at.append(time.monotonic())
        cancel.cancel("test")

    threading.Thread(target=cancel_soon).start()
    with pytest.raises(Cancelled):
        engine.fetch(FileSpec(fileserver.url("/w"), "w"), cancel=cancel)
    assert time.monotonic() - cancelled_at[0] < 1.0


def test_partial_survives_a_new_engine_and_resumes(tmp_path, fileserver, payload):
    """What a process restart looks like to the engine: a new instance, the same directory."""
    fileserver.add("/w", payload, faults=[Rate(2_000_000, times=1)])
    spec = FileSpec(fileserver.url("/w"), "w", SIZE, sha(payload))
    first = make_engine(tmp_path, fileserver)
    cancel = CancelToken()
    threading.Timer(0.6, cancel.cancel).start()
    with pytest.raises(Cancelled):
        first.fetch(spec, cancel=cancel)
    kept = first.partial_size(spec)
    assert 0 < kept < SIZE

    second = make_engine(tmp_path, fileserver)
    progress = Progress(SIZE)
    fetched = second.fetch(spec, progress)
    assert fetched.local_path.read_bytes() == payload
    assert gets(fileserver, "/w")[-1].range_start == kept
    assert fetched.bytes_transferred == SIZE - kept
    assert progress.snapshot().bytes_done == SIZE


@pytest.mark.serial  # timing-sensitive: run alone
def test_progress_measures_speed_and_eta(tmp_path, fileserver, payload):
    fileserver.add("/w", payload, faults=[Rate(4_000_000)])
    engine = make_engine(tmp_path, fileserver)
    progress = Progress(SIZE)
    seen = []
    worker = threading.Thread(
        target=engine.fetch, args=(FileSpec(fileserver.url("/w"), "w"), progress)
    )
    worker.start()
    time.sleep(0.5)
    seen.append(progress.snapshot())
    worker.join()
    snapshot = seen[0]
    assert 0 < snapshot.bytes_done < SIZE
    assert 1_000_000 < snapshot.speed_bps < 12_000_000  # throttled to 4 MB/s
    expected_eta = (SIZE - snapshot.bytes_done) / snapshot.speed_bps
    assert snapshot.eta_s == pytest.approx(expected_eta)


def test_redirects_are_followed_and_rechecked(tmp_path, fileserver, payload):
    fileserver.add("/real", payload)
    fileserver.add_redirect("/moved", "/real")
    fileserver.add_redirect("/away", "http://198.51.100.7/x")
    engine = make_engine(tmp_path, fileserver)
    assert engine.fetch(FileSpec(fileserver.url("/moved"), "w")).sha256 == sha(payload)
    with pytest.raises(SourceNotAllowed, match="198.51.100.7"):
        engine.fetch(FileSpec(fileserver.url("/away"), "x"))


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("ftp://127.0.0.1/x", "Only http and https"),
        ("file:///etc/passwd", "Only http and https"),
        ("http://10.0.0.1/x", "not in MODELHOST_URL_ALLOW"),
        ("http://169.254.169.254/latest/meta-data", "not in MODELHOST_URL_ALLOW"),
        ("http://user:pw@127.0.0.1:9/x", "credentials"),
        ("not a url", "Only http and https"),
    ],
)
def test_policy_refuses(url, fragment):
    policy = UrlPolicy.from_hosts(["127.0.0.1:9", "huggingface.co"])
    with pytest.raises(SourceNotAllowed, match=fragment):
        policy.check(url)


def test_policy_matches_host_and_port():
    policy = UrlPolicy.from_hosts(["127.0.0.1:9000", "example.org"])
    assert policy.check("http://127.0.0.1:9000/a?b=1").path == "/a?b=1"
    assert policy.check("https://example.org/x").port == 443
    with pytest.raises(SourceNotAllowed):
        policy.check("http://127.0.0.1:9001/a")


def test_listed_name_resolving_to_private_address_is_refused():
    name = socket.gethostname()
    try:
        address = socket.getaddrinfo(name, 80)[0][4][0]
    except socket.gaierror:
        pytest.skip(f"host name {name} does not resolve here")
    if ipaddress.ip_address(address).is_global:
        pytest.skip(f"{name} resolves to a public address here")
    policy = UrlPolicy.from_hosts([name])
    with pytest.raises(SourceNotAllowed, match="non-public"):
        policy.resolve(policy.check(f"http://{name}/x"))
