"""The server starts in a second: torch and transformers are off the startup path."""

from __future__ import annotations

import compileall
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import modelhost

# Timing-sensitive: run alone, after the parallel pass (see pyproject's markers).
pytestmark = pytest.mark.serial

MODELHOST = shutil.which("modelhost", path=str(Path(sys.executable).parent))
HEAVY = ("torch", "transformers", "torchvision", "torchaudio", "safetensors", "numpy", "av")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seconds_to_health(home: Path) -> float:
    """Launch ``modelhost serve``; seconds until ``GET /health`` answers 200."""
    port = _free_port()
    start = time.perf_counter()
    process = subprocess.Popen(
        [MODELHOST, "serve", "--port", str(port), "--home", str(home), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            assert process.poll() is None, "modelhost serve exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert r.status == 200
                    return time.perf_counter() - start
            except OSError:
                assert time.perf_counter() - start < 60, "no answer in 60 s"
                time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_importing_the_server_imports_no_torch():
    check = (
        "import sys, modelhost.api.app; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(MODELHOST is None, reason="the modelhost executable is not installed")
def test_serve_answers_health_within_a_second_and_a_half(tmp_path):
    # What an installed modelhost has: pip compiles a package's bytecode when it installs
    # it. A checkout installed with ``pip install -e`` under PYTHONDONTWRITEBYTECODE (as CI
    # runs) would otherwise compile every module from source on each start.
    assert compileall.compile_dir(Path(modelhost.__file__).parent, quiet=1)
    _seconds_to_health(tmp_path / "warm")  # untimed: the first start fills the OS file cache
    runs = [_seconds_to_health(tmp_path / f"home{i}") for i in range(5)]
    print(f"modelhost serve -> /health: {[round(r, 3) for r in runs]} s")
    assert statistics.median(runs) < 1.5
