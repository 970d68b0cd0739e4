"""Tests of the loopback file server itself, with stdlib clients only."""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import pathlib
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from fileserver import (
    ChangeAfterFirst,
    Corrupt,
    DropAfter,
    FileServer,
    IgnoreIfRange,
    IgnoreRange,
    Rate,
    Stall,
    Status,
    corrupt_bytes,
    default_etag,
)

DATA = bytes((i * 7 + i // 256) % 256 for i in range(10_000))
DATA_SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def srv() -> Iterator[FileServer]:
    with FileServer() as server:
        server.add("/data.bin", DATA)
        yield server


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request(
    server: FileServer,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection; returns (status, headers, body)."""
    conn = http.client.HTTPConnection(server.host_port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def raw_get(server: FileServer, path: str, headers: dict[str, str] | None = None) -> bytes:
    """Send a GET over a bare socket and return everything received until EOF."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {server.host_port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = bytearray()
        while True:
            try:
                block = sock.recv(65536)
            except ConnectionResetError:
                break
            if not block:
                break
            received += block
    return bytes(received)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


# --------------------------------------------------------------------------- basics


def test_get_full_body_and_headers(srv: FileServer) -> None:
    status, headers, body = request(srv, "/data.bin")
    assert status == 200
    assert sha(body) == DATA_SHA
    assert headers["Content-Length"] == "10000"
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"] == f'"{DATA_SHA[:16]}"' == srv.etag("/data.bin")
    assert headers["ETag"] == default_etag(DATA)
    lm = email.utils.parsedate_to_datetime(headers["Last-Modified"])
    assert abs(lm.timestamp() - time.time()) < 120
    assert headers["Last-Modified"] == srv.last_modified("/data.bin")
    assert "Content-Range" not in headers


def test_addresses(srv: FileServer) -> None:
    assert srv.host_port == f"127.0.0.1:{srv.port}"
    assert srv.base_url == f"http://127.0.0.1:{srv.port}"
    assert srv.url("/data.bin") == f"http://127.0.0.1:{srv.port}/data.bin"
    assert srv.url("data.bin") == srv.url("/data.bin")
    srv.add("/dir/a b+c.txt", b"spaced")
    assert srv.url("/dir/a b+c.txt").endswith("/dir/a%20b%2Bc.txt")
    with urllib.request.urlopen(srv.url("/dir/a b+c.txt"), timeout=5) as resp:
        assert resp.read() == b"spaced"
    # The query string is ignored for matching and for the log path.
    assert request(srv, "/data.bin?revision=main")[2] == DATA
    assert srv.requests[-1].path == "/data.bin"


def test_head_same_headers_no_body(srv: FileServer) -> None:
    _, get_headers, _ = request(srv, "/data.bin")
    conn = http.client.HTTPConnection(srv.host_port, timeout=5)
    conn.request("HEAD", "/data.bin")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read() == b""
    for name in ("Content-Length", "ETag", "Last-Modified", "Accept-Ranges", "Content-Type"):
        assert resp.headers[name] == get_headers[name]
    # Keep-alive: the next request on the same connection works, so no stray body was sent.
    sock = conn.sock
    conn.request("GET", "/data.bin")
    assert conn.getresponse().read() == DATA
    assert conn.sock is sock
    conn.close()
    assert srv.count("HEAD") == 1
    assert srv.bytes_sent() == 2 * len(DATA)


def test_head_ignores_range(srv: FileServer) -> None:
    status, headers, body = request(srv, "/data.bin", {"Range": "bytes=5-"}, method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "10000", b"")


def test_unknown_path_404(srv: FileServer) -> None:
    status, headers, body = request(srv, "/missing")
    assert status == 404
    assert headers["Content-Length"] == str(len(body))
    assert srv.count(path="/missing") == 1
    assert srv.requests[-1].status == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(srv.url("/nope"), timeout=5)
    assert err.value.code == 404
    assert request(srv, "/missing", method="HEAD")[0] == 404


def test_keep_alive_reuses_connection(srv: FileServer) -> None:
    conn = http.client.HTTPConnection(srv.host_port, timeout=5)
    bodies = []
    socks = set()
    for rng in ("bytes=0-9", "bytes=10-19", "bytes=9990-"):
        conn.request("GET", "/data.bin", headers={"Range": rng})
        resp = conn.getresponse()
        bodies.append(resp.read())
        assert resp.status == 206
        socks.add(id(conn.sock))
    conn.close()
    assert bodies == [DATA[0:10], DATA[10:20], DATA[9990:]]
    assert len(socks) == 1


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=100-", 100, 9999),
        ("bytes=0-0", 0, 0),
        ("bytes=100-199", 100, 199),
        ("bytes=9999-", 9999, 9999),
        ("bytes=9000-20000", 9000, 9999),  # end clamped
        ("bytes=-500", 9500, 9999),  # suffix
        ("bytes=-20000", 0, 9999),  # suffix longer than the file
        ("Bytes = 5 - 9", 5, 9),  # case and spaces
    ],
)
def test_range_206(srv: FileServer, header: str, start: int, end: int) -> None:
    status, headers, body = request(srv, "/data.bin", {"Range": header})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/10000"
    assert headers["Content-Length"] == str(end - start + 1)
    assert body == DATA[start : end + 1]
    assert headers["ETag"] == srv.etag("/data.bin")


@pytest.mark.parametrize("header", ["bytes=10000-", "bytes=20000-30000", "bytes=-0"])
def test_range_416(srv: FileServer, header: str) -> None:
    status, headers, body = request(srv, "/data.bin", {"Range": header})
    assert status == 416
    assert headers["Content-Range"] == "bytes */10000"
    assert headers["Content-Length"] == "0"
    assert body == b""


def test_range_on_empty_file_416() -> None:
    with FileServer() as server:
        server.add("/empty", b"")
        assert request(server, "/empty")[1]["Content-Length"] == "0"
        status, headers, _ = request(server, "/empty", {"Range": "bytes=0-"})
        assert (status, headers["Content-Range"]) == (416, "bytes */0")


@pytest.mark.parametrize(
    "header", ["bytes=5-1", "bytes=0-1,5-9", "items=0-5", "bytes=x-", "bytes=-", "garbage"]
)
def test_invalid_range_ignored(srv: FileServer, header: str) -> None:
    status, headers, body = request(srv, "/data.bin", {"Range": header})
    assert status == 200
    assert "Content-Range" not in headers
    assert body == DATA


# --------------------------------------------------------------------------- If-Range


def test_if_range_etag_match_and_mismatch(srv: FileServer) -> None:
    etag = srv.etag("/data.bin")
    status, headers, body = request(srv, "/data.bin", {"Range": "bytes=10-", "If-Range": etag})
    assert (status, headers["Content-Range"], body) == (206, "bytes 10-9999/10000", DATA[10:])

    status, headers, body = request(
        srv, "/data.bin", {"Range": "bytes=10-", "If-Range": '"0000000000000000"'}
    )
    assert status == 200
    assert "Content-Range" not in headers
    assert body == DATA
    # A weak tag never matches (strong comparison), even with the same opaque value.
    status, _, body = request(srv, "/data.bin", {"Range": "bytes=10-", "If-Range": "W/" + etag})
    assert (status, body) == (200, DATA)
    # A mismatching If-Range also wins over an unsatisfiable range: full 200.
    status, _, body = request(srv, "/data.bin", {"Range": "bytes=99999-", "If-Range": '"x"'})
    assert (status, body) == (200, DATA)


def test_if_range_date(srv: FileServer) -> None:
    lm = srv.last_modified("/data.bin")
    status, _, body = request(srv, "/data.bin", {"Range": "bytes=9000-", "If-Range": lm})
    assert (status, body) == (206, DATA[9000:])
    earlier = email.utils.formatdate(
        email.utils.parsedate_to_datetime(lm).timestamp() - 1, usegmt=True
    )
    status, _, body = request(srv, "/data.bin", {"Range": "bytes=9000-", "If-Range": earlier})
    assert (status, body) == (200, DATA)


def test_explicit_validators() -> None:
    with FileServer() as server:
        lm = "Wed, 21 Oct 2015 07:28:00 GMT"
        server.add("/x", b"abc", etag='"v1"', last_modified=lm)
        _, headers, _ = request(server, "/x")
        assert (headers["ETag"], headers["Last-Modified"]) == ('"v1"', lm)
        status, _, body = request(server, "/x", {"Range": "bytes=1-", "If-Range": '"v1"'})
        assert (status, body) == (206, b"bc")
        status, _, body = request(server, "/x", {"Range": "bytes=1-", "If-Range": lm})
        assert (status, body) == (206, b"bc")


# --------------------------------------------------------------------------- versions


def test_replace_new_version(srv: FileServer) -> None:
    old_etag, old_lm = srv.etag("/data.bin"), srv.last_modified("/data.bin")
    srv.replace("/data.bin", b"version two")
    status, headers, body = request(srv, "/data.bin")
    assert (status, body) == (200, b"version two")
    assert headers["ETag"] == default_etag(b"version two") != old_etag
    new_lm = email.utils.parsedate_to_datetime(headers["Last-Modified"])
    assert new_lm > email.utils.parsedate_to_datetime(old_lm)
    # Resuming with the old validator yields the full new content.
    for validator in (old_etag, old_lm):
        status, _, body = request(srv, "/data.bin", {"Range": "bytes=3-", "If-Range": validator})
        assert (status, body) == (200, b"version two")
    srv.replace("/data.bin", b"three", etag='"custom"')
    assert request(srv, "/data.bin")[1]["ETag"] == '"custom"'
    with pytest.raises(KeyError):
        srv.replace("/not-there", b"x")


def test_path_data_streams_from_disk(tmp_path: pathlib.Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as f:  # 48 MiB, mostly sparse, with marks to check offsets
        f.truncate(48 << 20)
        for off in (0, 1 << 20, (48 << 20) - 8):
            f.seek(off)
            f.write(off.to_bytes(8, "big"))
    with FileServer() as server:
        server.add("/big", big)
        assert server.etag("/big") == default_etag(big)
        tracemalloc.start()
        try:
            conn = http.client.HTTPConnection(server.host_port, timeout=10)
            conn.request("GET", "/big")
            resp = conn.getresponse()
            h = hashlib.sha256()
            total = 0
            while block := resp.read(1 << 20):
                h.update(block)
                total += len(block)
            conn.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert total == 48 << 20
        assert h.hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
        assert peak < 8 << 20, f"peak traced memory {peak} bytes: not streamed"
        assert server.bytes_sent("/big") == 48 << 20
        status, headers, body = request(
            server, "/big", {"Range": f"bytes={1 << 20}-{(1 << 20) + 7}"}
        )
        assert status == 206
        assert body == (1 << 20).to_bytes(8, "big")
        assert headers["Content-Range"] == f"bytes {1 << 20}-{(1 << 20) + 7}/{48 << 20}"


# --------------------------------------------------------------------------- redirects


def test_redirects(srv: FileServer) -> None:
    srv.add_redirect("/latest", "/data.bin")
    srv.add_redirect("/perm", srv.url("/data.bin"), status=301)
    status, headers, body = request(srv, "/latest")
    assert (status, headers["Location"], headers["Content-Length"], body) == (
        302,
        "/data.bin",
        "0",
        b"",
    )
    status, headers, _ = request(srv, "/perm", method="HEAD")
    assert (status, headers["Location"]) == (301, srv.url("/data.bin"))
    with urllib.request.urlopen(srv.url("/latest"), timeout=5) as resp:
        assert resp.url == srv.url("/data.bin")
        assert resp.read() == DATA
    assert srv.count("GET", "/latest") == 2
    assert srv.count("GET", "/data.bin") == 1
    srv.set_faults("/latest", [Status(503)])
    assert request(srv, "/latest")[0] == 503
    assert request(srv, "/latest")[0] == 302


# --------------------------------------------------------------------------- faults


def test_status_fault_sequence(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [Status(503, times=2), Status(429), Status(500)])
    seen = []
    for _ in range(5):
        status, headers, body = request(srv, "/data.bin")
        seen.append((status, headers.get("Retry-After"), len(body)))
    assert seen[0] == (503, "0", len(b"injected 503\n"))
    assert seen[1] == seen[0]
    assert seen[2] == (429, "0", len(b"injected 429\n"))
    assert seen[3] == (500, None, len(b"injected 500\n"))
    assert seen[4] == (200, None, len(DATA))
    assert [r.status for r in srv.requests] == [503, 503, 429, 500, 200]
    assert srv.requests[0].faults == ("Status",)


def test_status_fault_retry_after_and_urllib(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [Status(503, retry_after=7)])
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(srv.url("/data.bin"), timeout=5)
    assert (err.value.code, err.value.headers["Retry-After"]) == (503, "7")


def test_head_is_never_faulted(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [Status(500), Corrupt()])
    assert request(srv, "/data.bin", method="HEAD")[0] == 200
    assert request(srv, "/data.bin", method="HEAD")[0] == 200
    assert request(srv, "/data.bin")[0] == 500
    status, _, body = request(srv, "/data.bin")
    assert status == 200 and body != DATA  # Corrupt still armed; Status used up


def test_drop_after_delivers_exactly_nbytes(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [DropAfter(1234)])
    conn = http.client.HTTPConnection(srv.host_port, timeout=5)
    conn.request("GET", "/data.bin")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "10000"
    with pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    assert err.value.partial == DATA[:1234]
    conn.close()
    assert srv.bytes_sent("/data.bin") == 1234
    assert srv.requests[-1].body_bytes_sent == 1234
    # Used up: the next GET is complete.
    assert request(srv, "/data.bin")[2] == DATA
    assert srv.bytes_sent("/data.bin") == 1234 + 10000


def test_drop_after_ranged_raw_socket(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [DropAfter(100, times=2)])
    for _ in range(2):
        status, headers, body = split_response(raw_get(srv, "/data.bin", {"Range": "bytes=5000-"}))
        assert status == 206
        assert headers["Content-Range"] == "bytes 5000-9999/10000"
        assert headers["Content-Length"] == "5000"
        assert body == DATA[5000:5100]
    status, _, body = split_response(
        raw_get(srv, "/data.bin", {"Range": "bytes=5000-", "Connection": "close"})
    )
    assert (status, body) == (206, DATA[5000:])
    assert [r.range_start for r in srv.requests] == [5000, 5000, 5000]
    assert srv.bytes_sent() == 100 + 100 + 5000


def test_drop_after_zero_and_urllib(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [DropAfter(0)])
    with urllib.request.urlopen(srv.url("/data.bin"), timeout=5) as resp:
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead) as err:
            resp.read()
    assert err.value.partial == b""
    assert srv.bytes_sent() == 0


@pytest.mark.serial  # timing-sensitive: run alone
def test_stall(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [Stall(after=4000, seconds=0.4)])
    conn = http.client.HTTPConnection(srv.host_port, timeout=5)
    conn.request("GET", "/data.bin")
    resp = conn.getresponse()
    t0 = time.monotonic()
    first = resp.read(4000)
    t_first = time.monotonic() - t0
    rest = resp.read()
    elapsed = time.monotonic() - t0
    conn.close()
    assert first + rest == DATA
    assert t_first < 0.3
    assert 0.35 <= elapsed < 3


def test_stall_triggers_client_timeout(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [Stall(after=10, seconds=1.0)])
    conn = http.client.HTTPConnection(srv.host_port, timeout=0.2)
    conn.request("GET", "/data.bin", headers={"Range": "bytes=100-"})
    resp = conn.getresponse()
    assert resp.status == 206
    assert resp.read(10) == DATA[100:110]
    with pytest.raises(TimeoutError):
        resp.read(1)
    conn.close()
    assert request(srv, "/data.bin", {"Range": "bytes=100-"})[2] == DATA[100:]


def test_corrupt(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [Corrupt(times=2)])
    _, h1, b1 = request(srv, "/data.bin")
    _, h2, b2 = request(srv, "/data.bin")
    _, h3, b3 = request(srv, "/data.bin")
    assert len(b1) == len(DATA) and sha(b1) != DATA_SHA
    assert b1 == b2  # deterministic
    assert b1 == corrupt_bytes(DATA, 0, 0)
    assert b3 == DATA  # used up
    assert h1["ETag"] == h2["ETag"] == h3["ETag"] == srv.etag("/data.bin")
    assert h1["Content-Length"] == "10000"
    flipped = [i for i in range(len(DATA)) if b1[i] != DATA[i]]
    assert flipped == list(range(0, 10000, 1024))
    assert all(b1[i] == DATA[i] ^ 0xFF for i in flipped)


def test_corrupt_ranged_and_forever(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [Corrupt()])
    for _ in range(3):
        status, _, body = request(srv, "/data.bin", {"Range": "bytes=1500-2100"})
        assert status == 206 and len(body) == 601
        flipped = [1500 + i for i in range(601) if body[i] != DATA[1500 + i]]
        assert flipped == [1500, 2048]  # first served byte + absolute 1024-multiples


def test_ignore_range(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [IgnoreRange(times=1)])
    status, headers, body = request(srv, "/data.bin", {"Range": "bytes=100-"})
    assert (status, body) == (200, DATA)
    assert "Content-Range" not in headers
    status, _, body = request(srv, "/data.bin", {"Range": "bytes=100-"})
    assert (status, body) == (206, DATA[100:])
    srv.set_faults("/data.bin", [IgnoreRange()])
    for rng in ("bytes=100-", "bytes=50000-"):
        assert request(srv, "/data.bin", {"Range": rng})[:1] == (200,)
    assert srv.requests[-1].range_start == 50000


def test_ignore_if_range(srv: FileServer) -> None:
    old_etag = srv.etag("/data.bin")
    srv.replace("/data.bin", DATA[::-1])
    srv.set_faults("/data.bin", [IgnoreIfRange()])
    status, headers, body = request(srv, "/data.bin", {"Range": "bytes=10-", "If-Range": old_etag})
    assert status == 206
    assert body == DATA[::-1][10:]
    assert headers["ETag"] == srv.etag("/data.bin") != old_etag
    assert headers["Content-Range"] == "bytes 10-9999/10000"


def test_change_after_first_with_drop(srv: FileServer) -> None:
    new = b"N" * 3000
    old_etag = srv.etag("/data.bin")
    srv.set_faults("/data.bin", [DropAfter(500), ChangeAfterFirst(new)])
    status, headers, body = split_response(raw_get(srv, "/data.bin"))
    assert (status, headers["ETag"], body) == (200, old_etag, DATA[:500])
    # Resume with the old validator: the server answers 200 with the whole new content.
    status, headers, body = request(srv, "/data.bin", {"Range": "bytes=500-", "If-Range": old_etag})
    assert (status, body) == (200, new)
    assert headers["ETag"] == default_etag(new) == srv.etag("/data.bin")
    # A compliant resume against the new version works.
    status, _, body = request(
        srv, "/data.bin", {"Range": "bytes=500-", "If-Range": headers["ETag"]}
    )
    assert (status, body) == (206, new[500:])
    assert srv.requests[0].faults == ("DropAfter", "ChangeAfterFirst")
    assert srv.bytes_sent() == 500 + 3000 + 2500


def test_change_after_first_complete_get(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [ChangeAfterFirst(b"second", etag='"v2"')])
    _, h1, b1 = request(srv, "/data.bin")
    _, h2, b2 = request(srv, "/data.bin")
    _, h3, b3 = request(srv, "/data.bin")
    assert (b1, b2, b3) == (DATA, b"second", b"second")
    assert (h2["ETag"], h3["ETag"]) == ('"v2"', '"v2"')
    assert h1["ETag"] != h2["ETag"]
    assert email.utils.parsedate_to_datetime(
        h2["Last-Modified"]
    ) > email.utils.parsedate_to_datetime(h1["Last-Modified"])


def test_outcome_queue_with_modifiers(srv: FileServer) -> None:
    srv.set_faults("/data.bin", [Status(503), Corrupt(times=1), DropAfter(10), IgnoreRange()])
    status, _, _ = request(srv, "/data.bin", {"Range": "bytes=100-"})
    assert status == 503  # Status answered: modifiers neither applied nor used
    status, headers, body = split_response(raw_get(srv, "/data.bin", {"Range": "bytes=100-"}))
    assert status == 200  # IgnoreRange
    assert body == corrupt_bytes(DATA[:10], 0, 0)  # DropAfter + Corrupt
    status, _, body = request(srv, "/data.bin", {"Range": "bytes=100-"})
    assert (status, body) == (200, DATA)  # only IgnoreRange left
    assert [r.faults for r in srv.requests] == [
        ("Status",),
        ("DropAfter", "Corrupt", "IgnoreRange"),
        ("IgnoreRange",),
    ]


def test_fault_instances_are_not_mutated(srv: FileServer) -> None:
    fault = Status(500, times=1)
    srv.set_faults("/data.bin", [fault])
    assert request(srv, "/data.bin")[0] == 500
    assert fault.times == 1
    srv.set_faults("/data.bin", [fault])  # re-armed: counts start over
    assert request(srv, "/data.bin")[0] == 500
    assert request(srv, "/data.bin")[0] == 200
    with pytest.raises(KeyError):
        srv.set_faults("/missing", [fault])


# --------------------------------------------------------------------------- throttling


def test_server_rate() -> None:
    body = bytes(200_000)
    with FileServer(rate_bytes_per_s=1_000_000) as server:
        server.add("/slow", body)
        t0 = time.monotonic()
        status, _, got = request(server, "/slow")
        elapsed = time.monotonic() - t0
    assert (status, got) == (200, body)
    assert 0.15 <= elapsed < 1.5


def test_rate_fault_per_path(srv: FileServer) -> None:
    srv.add("/slow", bytes(100_000), faults=[Rate(500_000)])
    t0 = time.monotonic()
    assert request(srv, "/data.bin")[2] == DATA
    fast = time.monotonic() - t0
    t0 = time.monotonic()
    status, _, got = request(srv, "/slow", {"Range": "bytes=0-"})
    slow = time.monotonic() - t0
    assert (status, len(got)) == (206, 100_000)
    assert fast < 0.1
    assert 0.15 <= slow < 1.5


def test_rate_with_stall_does_not_burst() -> None:
    with FileServer(rate_bytes_per_s=400_000) as server:
        server.add("/x", bytes(80_000), faults=[Stall(after=40_000, seconds=0.2)])
        t0 = time.monotonic()
        assert len(request(server, "/x")[2]) == 80_000
        elapsed = time.monotonic() - t0
    assert 0.35 <= elapsed < 2  # 0.1 + 0.2 stall + 0.1; no catch-up burst after the stall


# --------------------------------------------------------------------------- log, lifecycle


def test_request_log(srv: FileServer) -> None:
    srv.add("/other", b"xyz")
    request(srv, "/data.bin", {"Range": "bytes=10-19", "X-Test": "1"})
    request(srv, "/data.bin", method="HEAD")
    request(srv, "/other")
    request(srv, "/nope")
    assert srv.count() == 4
    assert srv.count("GET") == 3
    assert srv.count("get", "/data.bin") == 1
    assert srv.count("HEAD", "/data.bin") == 1
    assert srv.count(path="/data.bin") == 2
    assert srv.count(path="other") == 1
    rec = srv.requests[0]
    assert (rec.method, rec.path, rec.range_start, rec.status, rec.body_bytes_sent) == (
        "GET",
        "/data.bin",
        10,
        206,
        10,
    )
    assert rec.headers["Range"] == rec.headers["range"] == "bytes=10-19"
    assert rec.headers.get("x-test") == "1"
    assert "X-TEST" in rec.headers
    assert srv.requests[1].body_bytes_sent == 0  # HEAD
    assert srv.bytes_sent("/data.bin") == 10
    assert srv.bytes_sent("/other") == 3
    assert srv.bytes_sent() == 10 + 3 + len(b"not found\n")
    srv.reset_log()
    assert (srv.count(), srv.bytes_sent(), srv.requests) == (0, 0, [])
    request(srv, "/other")
    assert srv.count() == 1


def test_log_is_thread_safe(srv: FileServer) -> None:
    def worker() -> None:
        for i in range(10):
            assert request(srv, "/data.bin", {"Range": f"bytes={i}-{i}"})[2] == DATA[i : i + 1]

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert srv.count("GET", "/data.bin") == 80
    assert srv.bytes_sent() == 80


def test_stop_closes_idle_keepalive_and_stalls() -> None:
    server = FileServer()
    server.add("/x", bytes(1000), faults=[Stall(after=10, seconds=30)])
    server.start()
    idle = http.client.HTTPConnection(server.host_port, timeout=5)
    idle.request("HEAD", "/x")
    idle.getresponse().read()
    stalled = http.client.HTTPConnection(server.host_port, timeout=5)
    stalled.request("GET", "/x")
    resp = stalled.getresponse()
    assert resp.read(10) == bytes(10)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 2
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    server.stop()  # idempotent
    with pytest.raises(RuntimeError):
        server.start()


def test_not_started_has_no_address() -> None:
    server = FileServer()
    with pytest.raises(RuntimeError):
        _ = server.base_url
    server.add("/a", b"a")  # adding before start is fine
    with server:
        assert request(server, "/a")[2] == b"a"
