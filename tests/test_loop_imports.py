"""The first inference request imports torch off the event loop: /health keeps answering.

A fresh ``modelhost serve`` with the warm-up off (``MODELHOST_WARM_UP=false``) has not
imported torch, transformers, numpy or PyAV. Its first predict, /synthesize, embeddings or
transcription request imports them (seconds of CPU); done on the event loop, as the
handlers did, it froze /health, status and SSE for all of that, even for a request then
answered 404. Each route is checked on its own fresh server, /health polled meanwhile.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import serve_subprocess

# Timing-sensitive: run alone, after the parallel pass (see pyproject's markers).
pytestmark = pytest.mark.serial

WAV = (
    b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80>\x00\x00\x00}\x00\x00"
    b"\x02\x00\x10\x00data\x00\x00\x00\x00"
)
FIRST_REQUESTS = {
    "predict": lambda c: c.post("/models/absent/predict", json={"inputs": "hello"}),
    "synthesize": lambda c: c.post("/synthesize", json={"model_name": "absent", "text": "hi"}),
    "embeddings": lambda c: c.post("/v1/embeddings", json={"model": "absent", "input": "hi"}),
    "transcription": lambda c: c.post(
        "/v1/audio/transcriptions",
        data={"model": "absent"},
        files={"file": ("a.wav", WAV, "audio/wav")},
    ),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache
def _import_seconds() -> float:
    """How long importing the inference runtime takes in a fresh interpreter here (measured
    once for the four routes)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import modelhost.runtime.inference"], check=True)
    return time.perf_counter() - start


def _health_latencies(base_url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            out.append(time.perf_counter() - start)
            time.sleep(0.01)


@pytest.mark.parametrize("route", sorted(FIRST_REQUESTS))
def test_first_request_does_not_freeze_health(route: str, tmp_path: Path) -> None:
    import_s = _import_seconds()
    port = _free_port()
    env = {
        **os.environ,
        "MODELHOST_HOME": str(tmp_path / "home"),
        "MODELHOST_WARM_UP": "false",
        "MODELHOST_URL_ALLOW_DEFAULTS": "false",
    }
    server = serve_subprocess(port, env)
    base_url = f"http://127.0.0.1:{port}"
    latencies: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=_health_latencies, args=(base_url, stop, latencies))
    try:
        poller.start()
        time.sleep(0.2)
        with httpx.Client(base_url=base_url, timeout=120) as client:
            answer = FIRST_REQUESTS[route](client)
        assert answer.status_code == 404, answer.text  # no such model: answered, not a 500
        time.sleep(0.1)
    finally:
        stop.set()
        poller.join()
        server.terminate()
        server.wait(timeout=30)
    worst = max(latencies)
    # An import on the loop shows up whole in one /health answer; in a thread, /health
    # waits only for the GIL now and then (about 0.1 s measured).
    assert worst < max(0.5, import_s / 3), (route, worst, import_s)
