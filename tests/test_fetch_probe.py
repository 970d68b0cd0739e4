"""Connection probing (fetch/parts.py ``PartedDownload._grow``): a file in parts starts with one
connection and doubles them while the added ones pay, against the real file server."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from fileserver import FileServer, Rate

from modelhost.fetch import (
    CancelToken,
    FetchEngine,
    FileSpec,
    Progress,
    RetryPolicy,
    UrlPolicy,
    parts,
)
from modelhost.fetch.ratelimit import RateLimiter

# Timing-sensitive: run alone, after the parallel pass (see pyproject's markers).
pytestmark = pytest.mark.serial

MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def recorded(monkeypatch) -> list[parts.PartedDownload]:
    """Every PartedDownload the engine runs, to read its peak worker count."""
    seen: list[parts.PartedDownload] = []

    class Recorded(parts.PartedDownload):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(parts, "PartedDownload", Recorded)
    return seen


def make_engine(partial, server: FileServer, connections: int, window: float) -> FetchEngine:
    return FetchEngine(
        partial,
        UrlPolicy.from_hosts([server.host_port]),
        RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05),
        read_timeout_s=5.0,
        connections=connections,
        part_threshold=MIB,
        part_size=MIB,
        probe_window_s=window,
    )


def most_connections(server: FileServer, done: threading.Event) -> list[int]:
    """Sample the server's open connections until ``done`` (the most seen, in a list)."""
    most = [0]

    def sample() -> None:
        while not done.wait(0.01):
            most[0] = max(most[0], server.open_connections())

    threading.Thread(target=sample, daemon=True).start()
    return most


def fetch_under_link(engine: FetchEngine, server: FileServer, data: bytes, link_bps: int) -> None:
    """Fetch ``/w`` (``data``) through a link of ``link_bps`` bytes/s shared by every
    connection (a RateLimiter, as a real link is); checks the digest."""
    spec = FileSpec(server.url("/w"), "w.bin", len(data), sha(data))
    fetched = engine.fetch(spec, Progress(), CancelToken(), limiter=RateLimiter(link_bps))
    assert fetched.sha256 == sha(data)


def test_a_per_connection_cap_gets_every_connection(tmp_path, fileserver, recorded):
    """Each connection limited to 2 MB/s: every doubling doubles the rate, so the download
    goes from one connection to two to four, and is faster than one connection could be."""
    data = os.urandom(12 * MIB)
    fileserver.add("/w", data, faults=[Rate(2_000_000)])
    engine = make_engine(tmp_path, fileserver, connections=4, window=0.3)
    done = threading.Event()
    most = most_connections(fileserver, done)
    fetched = engine.fetch(FileSpec(fileserver.url("/w"), "w.bin", len(data), sha(data)))
    done.set()
    assert fetched.sha256 == sha(data)
    (download,) = recorded
    assert download.peak_workers == 4
    assert download.allowed == 4
    assert most[0] == 4
    starts = sorted(r.range_start for r in fileserver.requests if r.method == "GET")
    assert starts == [i * MIB for i in range(12)]  # each part asked once, nothing twice


def test_one_connection_that_fills_the_link_stays_alone(tmp_path, fileserver, recorded):
    """A link one connection already fills (here a 6 MB/s cap shared by every connection,
    as a real link is): the second connection adds nothing, so it finishes the part it took
    and the first connection fetches the rest alone."""
    data = os.urandom(12 * MIB)
    fileserver.add("/w", data)
    engine = make_engine(tmp_path, fileserver, connections=4, window=0.3)
    fetch_under_link(engine, fileserver, data, 6_000_000)
    (download,) = recorded
    assert download.peak_workers == 2
    assert download.allowed == 1
    gets = [r for r in fileserver.requests if r.method == "GET"]
    assert sorted(r.range_start for r in gets) == [i * MIB for i in range(12)]
    assert len(gets) == 12


def test_connections_paying_less_than_the_first_ones_are_still_added(
    tmp_path, fileserver, recorded
):
    """Each connection capped at 2 MB/s under a 5.4 MB/s link (as 16 capped connections are
    under what 2 cores can take): two connections double the rate, four add only another
    1.4 MB/s, about 0.35 of what each of the first two carried (longer windows: the link's
    burst is spent before the rate is measured). That still pays, so the download ends with
    four connections."""
    data = os.urandom(16 * MIB)
    fileserver.add("/w", data, faults=[Rate(2_000_000)])
    engine = make_engine(tmp_path, fileserver, connections=4, window=0.6)
    fetch_under_link(engine, fileserver, data, 5_400_000)
    (download,) = recorded
    assert (download.peak_workers, download.allowed) == (4, 4)


def test_a_server_whose_capacity_one_connection_fills_gets_one_connection(tmp_path, recorded):
    """The server's own capacity is the limit (a loopback server with one 4 MB/s uplink that
    every connection shares: as fast with one connection as with two). The probe measures the
    same rate with two connections as with one, so it stays at one of the eight it may use.

    The deterministic form of the uncapped-loopback check (which hung on the machine's load:
    with a busy core, more threads won more CPU and extra connections paid): the capacity
    here is set by the server's pacing, far below what one connection moves on loopback, so
    the decision does not depend on the load (fails if the probe grows on equal rates)."""
    data = os.urandom(16 * MIB)
    with FileServer(link_bytes_per_s=4_000_000) as server:
        server.add("/w", data)
        engine = make_engine(tmp_path, server, connections=8, window=0.3)
        fetched = engine.fetch(FileSpec(server.url("/w"), "w.bin", len(data), sha(data)))
    assert fetched.sha256 == sha(data)
    (download,) = recorded
    assert (download.peak_workers, download.allowed) == (2, 1)


def default_engine(partial, server: FileServer) -> FetchEngine:
    """An engine with the default connection settings and probe window (CONNECTIONS,
    MAX_CONNECTIONS, PROBE_WINDOW_S: nothing set by hand); only the part threshold and size
    are scaled down to a test-sized file."""
    return FetchEngine(
        partial,
        UrlPolicy.from_hosts([server.host_port]),
        RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05),
        read_timeout_s=5.0,
        part_threshold=MIB,
        part_size=MIB // 2,
    )


def test_default_settings_go_past_eight_connections_when_each_is_capped(tmp_path, fileserver):
    """Every connection capped at 1 MB/s (a CDN's per-connection cap, far below what the
    machine can take): each step of the probe multiplies the rate, so with the default
    settings the download goes past 8 connections, counted at the server as bodies it sends
    at the same time (on 8 connections at most before the default maximum was raised)."""
    data = os.urandom(24 * MIB)
    fileserver.add("/w", data, faults=[Rate(1_000_000)])
    engine = default_engine(tmp_path, fileserver)
    fetched = engine.fetch(FileSpec(fileserver.url("/w"), "w.bin", len(data), sha(data)))
    assert fetched.sha256 == sha(data)
    assert fileserver.most_bodies_at_once() > 8


def test_default_settings_stay_at_few_connections_when_one_fills_the_server(tmp_path):
    """The same engine against a server whose capacity one connection fills (a 4 MB/s uplink
    every connection shares: the deterministic form of an uncapped loopback link, as in
    the test above):
    a second connection adds nothing, so the download never has more than two at once."""
    data = os.urandom(8 * MIB)
    with FileServer(link_bytes_per_s=4_000_000) as server:
        server.add("/w", data)
        engine = default_engine(tmp_path, server)
        fetched = engine.fetch(FileSpec(server.url("/w"), "w.bin", len(data), sha(data)))
        most = server.most_bodies_at_once()
    assert fetched.sha256 == sha(data)
    assert most <= 2


def test_the_probe_ramp_doubles_past_eight():
    """The connection counts the probe tries: x4 up to 8 (few windows at low rates), then
    doubling, so that a machine-bound step (8 to 16) is still measured alone."""
    assert parts.probe_ramp(32) == [1, 2, 8, 16, 32]
    assert parts.probe_ramp(16) == [1, 2, 8, 16]
    assert parts.probe_ramp(4) == [1, 2, 4]
    assert parts.probe_ramp(1) == [1]


def test_a_refused_step_is_tried_again_and_kept_once_it_pays(tmp_path, caplog):
    """Each connection capped at 2 MB/s, behind a 2 MB/s link at first (one connection fills
    it: the second is refused, as on a busy moment of a shared machine), lifted after 1.2 s.
    The refused step is tried again a second later, now pays, and the download goes on to
    8 connections and more, instead of staying at one for good."""
    data = os.urandom(16 * MIB)
    with FileServer(link_bytes_per_s=2_000_000) as server:
        server.add("/w", data, faults=[Rate(2_000_000)])
        lift = threading.Timer(1.2, lambda: setattr(server, "link", None))
        lift.start()
        engine = default_engine(tmp_path, server)
        with caplog.at_level("INFO", logger="modelhost.fetch.parts"):
            fetched = engine.fetch(FileSpec(server.url("/w"), "w.bin", len(data), sha(data)))
        lift.join()
        most = server.most_bodies_at_once()
    assert fetched.sha256 == sha(data)
    assert any("staying at 1" in record.getMessage() for record in caplog.records)
    assert most >= 8, most
