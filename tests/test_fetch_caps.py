"""Bandwidth caps (fetch/ratelimit.py): the global MODELHOST_FETCH_MAX_MBPS shared by every
connection of every download, and a request's max_mbps, measured on real transfers."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer
from fileserver import FileServer

from modelhost.errors import Cancelled
from modelhost.fetch import CancelToken, FetchEngine, FileSpec, Progress, RetryPolicy, UrlPolicy
from modelhost.fetch.ratelimit import RateLimiter, throttle_of
from modelhost.jobs.manager import request_key
from modelhost.sources import DownloadRequest
from modelhost.units import MB

# Timing-sensitive: run alone, after the parallel pass (see pyproject's markers).
pytestmark = pytest.mark.serial

MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_engine(partial: Path, server: FileServer, **options) -> FetchEngine:
    return FetchEngine(
        partial,
        UrlPolicy.from_hosts([server.host_port]),
        RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05),
        read_timeout_s=5.0,
        part_threshold=MIB,
        part_size=MIB,
        **options,
    )


class Sampled(Progress):
    """Progress that is sampled every 50 ms by a thread: (time, bytes received so far)."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.transferred))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self.transferred))

    def fastest_window(self, seconds: float) -> float:
        """The highest rate over any window of at least ``seconds`` (bytes/s)."""
        best = 0.0
        for i, (t0, b0) in enumerate(self.samples):
            for t1, b1 in self.samples[i:]:
                if t1 - t0 >= seconds:
                    best = max(best, (b1 - b0) / (t1 - t0))
                    break
        return best


def test_the_bucket_paces_at_its_rate_with_a_small_burst():
    now = [0.0]
    limiter = RateLimiter(1_000_000, clock=lambda: now[0])
    assert limiter.capacity == 100_000  # a tenth of a second
    assert limiter.reserve(100_000) == 0.0  # the burst
    assert limiter.reserve(50_000) == pytest.approx(0.05)  # debt, slept off by the caller
    now[0] = 0.05
    assert limiter.reserve(1_000_000) == pytest.approx(1.0)
    now[0] = 10.0  # idle: refills to the burst, never more
    assert limiter.reserve(100_000) == 0.0
    assert limiter.reserve(1) > 0
    assert throttle_of(None, limiter, RateLimiter(250_000)).bytes_per_s == 250_000
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_a_cap_sleep_wakes_on_cancel():
    limiter = RateLimiter(100_000)
    throttle = throttle_of(limiter)
    cancel = CancelToken()
    threading.Timer(0.2, cancel.cancel).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        throttle.consume(10_000_000, cancel)  # 100 s of debt
    assert time.monotonic() - started < 1.0


def test_the_global_cap_holds_for_all_parts_of_two_downloads(tmp_path, fileserver):
    """Two 12 MB files, four connections each, one 3 MB/s cap for all eight: together they
    take 8 s, and no 4 s window runs more than 10% over the cap."""
    cap = 3 * MB
    files = {name: os.urandom(12 * MB) for name in ("/a", "/b")}
    for name, data in files.items():
        fileserver.add(name, data)
    engine = make_engine(tmp_path, fileserver, connections=4, max_bytes_per_s=cap)
    progress = Sampled(24 * MB)
    errors: list[BaseException] = []

    def fetch(name: str) -> None:
        data = files[name]
        try:
            engine.fetch(FileSpec(fileserver.url(name), name[1:], len(data), sha(data)), progress)
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=fetch, args=(name,)) for name in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    progress.stop()
    assert errors == []
    assert progress.transferred == 24 * MB
    assert 24 * MB / elapsed == pytest.approx(cap, rel=0.10)
    assert progress.fastest_window(4.0) <= window_bound(cap, 4.0)
    # Both went in parts, side by side.
    assert len({r.range_start for r in fileserver.requests if r.path == "/a"}) == 12


def test_a_requests_cap_slows_a_single_stream(tmp_path, fileserver):
    data = os.urandom(9 * MB)
    fileserver.add("/w", data)
    engine = make_engine(tmp_path, fileserver, connections=1)
    progress = Sampled(len(data))
    started = time.monotonic()
    fetched = engine.fetch(
        FileSpec(fileserver.url("/w"), "w", len(data), sha(data)),
        progress,
        limiter=RateLimiter(3 * MB),
    )
    elapsed = time.monotonic() - started
    progress.stop()
    assert fetched.sha256 == sha(data)
    assert [r.range_start for r in fileserver.requests] == [None]
    assert len(data) / elapsed == pytest.approx(3 * MB, rel=0.10)
    assert progress.fastest_window(2.0) <= window_bound(3 * MB, 2.0)



def window_bound(cap: float, window_s: float) -> float:
    """The fastest rate a window of ``window_s`` may show if every 10 s window stays within
    10% of ``cap``: at most one second's worth of bytes ahead of the cap (the bucket's burst,
    one receive counted before its debt is slept off), which over 10 s is 10%. A short test
    checks the 10 s promise this way; an uncapped transfer is many times over it."""
    return cap * (1 + 1.0 / window_s)


def test_max_mbps_is_not_part_of_the_identity():
    base = {"source": "url", "model_id": "http://h/x.bin", "name": "x"}
    capped = DownloadRequest(**base, max_mbps=2.5)
    assert request_key(capped) == request_key(DownloadRequest(**base))
    assert request_key(capped) == request_key(DownloadRequest(**base, max_mbps=40))
    assert "max_mbps" not in capped.model_dump(include={"source"})


def test_the_api_caps_a_download_with_max_mbps(make_server, fileserver):
    data = os.urandom(3 * MB)
    fileserver.add("/w.safetensors", data)
    server: RunningServer = make_server([fileserver.host_port])
    body = {
        "source": "url",
        "model_id": fileserver.url("/w.safetensors"),
        "name": "capped",
        "sha256": sha(data),
        "max_mbps": 1.5,
    }
    started = time.monotonic()
    answer = httpx.post(f"{server.base_url}/models/download", json=body, timeout=30)
    assert answer.status_code in (200, 202), answer.text
    job_id = answer.json()["download_id"]
    # The same download with another cap joins the job (max_mbps changes how fast, not what).
    again = httpx.post(
        f"{server.base_url}/models/download", json={**body, "max_mbps": 50}, timeout=30
    ).json()
    assert again["download_id"] == job_id
    status = server.wait_for(job_id, timeout=30)
    elapsed = time.monotonic() - started
    assert status["status"] == "completed", status["message"]
    assert elapsed >= 0.9 * len(data) / (1.5 * MB)  # 2 s at 1.5 MB/s; uncapped: ~0.05 s
    assert fileserver.count("GET", "/w.safetensors") == 1


@pytest.mark.parametrize("value", [0, -1, "fast"])
def test_a_bad_max_mbps_is_refused_with_a_message(make_server, fileserver, value):
    server: RunningServer = make_server([fileserver.host_port])
    answer = httpx.post(
        f"{server.base_url}/models/download",
        json={"source": "url", "model_id": fileserver.url("/w"), "name": "x", "max_mbps": value},
        timeout=30,
    )
    assert answer.status_code in (400, 422), answer.text
    assert "max_mbps" in answer.text
    assert httpx.get(f"{server.base_url}/models/downloads", timeout=10).json()["total"] == 0


def test_the_settings_reach_the_engine(tmp_path):
    from conftest import make_settings

    from modelhost.api.app import build_services

    settings = make_settings(
        tmp_path / "home",
        [],
        fetch_connections=3,
        fetch_max_connections=5,
        fetch_part_threshold_mb=2,
        fetch_part_size_mb=1.5,
        fetch_max_mbps=7.5,
    )
    engine = build_services(settings).jobs.engine
    assert (engine.connections, engine.slots.limit) == (3, 5)
    assert (engine.part_threshold, engine.part_size) == (2_000_000, 1_500_000)
    assert engine.limiter is not None and engine.limiter.bytes_per_s == 7_500_000
    defaults = build_services(make_settings(tmp_path / "other", [])).jobs.engine
    assert (defaults.connections, defaults.slots.limit) == (32, 32)
    assert defaults.part_threshold == 64 * MB
    assert defaults.part_size is None and defaults.limiter is None
