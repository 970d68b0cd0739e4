"""Start a modelhost server subprocess for a benchmark and wait until it answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from fetch import BenchError, free_port


def start_modelhost(env: dict[str, str], timeout_s: float = 60) -> tuple[subprocess.Popen, str]:
    """``python -m modelhost serve`` on a free port with ``env`` added; returns it and its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modelhost", "serve", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/health", timeout=1)
            return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise BenchError("modelhost did not start")
