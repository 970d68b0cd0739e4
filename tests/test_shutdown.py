"""SIGTERM ends ``modelhost serve`` within 10 s whatever runs: here a speech job of many
sentences and a streaming /v1/audio/speech, both on the tiny Bark with 8 layers (about 10 s
a sentence on the CPU), the inference worker busy throughout, and a download from a
throttled loopback file server.

Timing-sensitive (a bound on the exit): serial.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import serve_subprocess
from fileserver import FileServer
from test_crash_resume import free_port
from tiny_models import build_bark

pytestmark = [pytest.mark.serial, pytest.mark.slow]

EXIT_BOUND_S = 10.0
TEXT = " ".join(f"Sentence number {i} is spoken by Bark." for i in range(40))


def _stream(base: str, started: threading.Event) -> None:
    """A streaming speech request read slowly until the server goes away."""
    body = {"model": "bark", "input": TEXT, "voice": "alloy", "response_format": "pcm"}
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            with client.stream("POST", "/v1/audio/speech", json=body) as response:
                for _ in response.iter_bytes():
                    started.set()
    except httpx.HTTPError:
        pass  # the server ended the stream: what SIGTERM should do
    finally:
        started.set()


def test_sigterm_ends_the_server_within_bound_during_long_synthesis(tmp_path: Path) -> None:
    with FileServer(rate_bytes_per_s=200_000) as files:
        files.add("/big.bin", os.urandom(4_000_000))  # 20 s at this rate
        _sigterm_during_work(tmp_path, files.url("/big.bin"))


def _sigterm_during_work(tmp_path: Path, slow_url: str) -> None:
    root, port = tmp_path / "imports", free_port()
    build_bark(root / "bark", layers=8)  # about 10 s a sentence here
    env = {
        **os.environ,
        "MODELHOST_HOME": str(tmp_path / "home"),
        "MODELHOST_IMPORT_ROOTS": str(root),
        "MODELHOST_URL_ALLOW_DEFAULTS": "false",
        "MODELHOST_URL_ALLOW": "127.0.0.1",
        "MODELHOST_DEVICE": "cpu",
    }
    server = serve_subprocess(port, env, timeout_s=60, keep_stderr=False)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            body = {"source": "local", "model_id": str(root / "bark"), "name": "bark"}
            download = client.post("/models/download", json=body).json()["download_id"]
            deadline = time.monotonic() + 120
            while client.get(f"/models/download/status/{download}").json()["status"] != (
                "completed"
            ):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            job = client.post(
                "/v1/audio/speech/jobs", json={"model": "bark", "input": TEXT, "voice": "alloy"}
            )
            assert job.status_code in (200, 201, 202), job.text
            slow = {"source": "url", "model_id": slow_url, "name": "slow", "load": False}
            slow_job = client.post("/models/download", json=slow)
            assert slow_job.status_code == 202, slow_job.text
            slow_id = slow_job.json()["download_id"]
            started = threading.Event()
            streamer = threading.Thread(target=_stream, args=(base, started), daemon=True)
            streamer.start()
            time.sleep(2.0)  # a sentence of each is running or queued on the worker
            status = client.get(f"/models/download/status/{slow_id}").json()["status"]
            assert status == "downloading", status
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("modelhost serve still running 60 s after SIGTERM")
        took = time.monotonic() - start
        print(f"exit took {took:.1f} s after SIGTERM")
        assert took < EXIT_BOUND_S, f"exit took {took:.1f} s after SIGTERM"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
