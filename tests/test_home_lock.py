"""One server per home: a second server on the same MODELHOST_HOME is refused, naming the
running one; a SIGKILLed server's lock does not block the next start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, make_settings

# Starts real `modelhost serve` processes: keep it out of the parallel pass.
pytestmark = pytest.mark.serial


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(home: Path, port: int, stderr_to: Path) -> subprocess.Popen:
    """``modelhost serve`` on ``home`` and ``port``, its stderr written to ``stderr_to``."""
    env = {**os.environ, "MODELHOST_URL_ALLOW_DEFAULTS": "false"}
    with open(stderr_to, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "modelhost", "serve", "--port", str(port), "--home", str(home)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def wait_healthy(process: subprocess.Popen, port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve exited with {process.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not start")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_second_server_on_the_same_home_is_refused_and_a_killed_ones_lock_is_free(tmp_path):
    home = tmp_path / "home"
    first_port, second_port, third_port = free_port(), free_port(), free_port()
    first = serve(home, first_port, tmp_path / "first.err")
    try:
        wait_healthy(first, first_port)
        # After the bind line: the dashboard, and how clients find a non-default port.
        announced = (tmp_path / "first.err").read_text()
        assert f"Dashboard: http://127.0.0.1:{first_port}/" in announced
        assert 'Next: modelhost run mms_tts_eng "Hello there"' in announced
        assert f"Clients: export MODELHOST_URL=http://127.0.0.1:{first_port}" in announced

        second = serve(home, second_port, tmp_path / "second.err")
        assert second.wait(timeout=60) == 1
        refused = (tmp_path / "second.err").read_text()
        assert refused.strip() == (
            f"modelhost: another server (pid {first.pid}, http://127.0.0.1:{first_port}) is "
            f"using home {home}; stop it or set MODELHOST_HOME"
        )
        assert "Traceback" not in refused
        # The refused server never bound its port, and the first one still serves.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{second_port}/health", timeout=1)
        assert httpx.get(f"http://127.0.0.1:{first_port}/health").status_code == 200

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        third = serve(home, third_port, tmp_path / "third.err")
        try:
            wait_healthy(third, third_port)  # the kernel dropped the killed server's lock
            record = (home / "server.lock").read_text()
            assert f'"pid": {third.pid}' in record
            assert f"http://127.0.0.1:{third_port}" in record
        finally:
            stop(third)
    finally:
        stop(first)


# uvicorn's failed startup ends its thread with SystemExit(3), which pytest reports.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_in_process_servers_take_the_lock_in_their_lifespan_and_release_it(tmp_path):
    home = tmp_path / "home"
    first = RunningServer(make_settings(home, [])).start()
    try:
        second = RunningServer(make_settings(home, []))
        with pytest.raises(RuntimeError, match="did not start"):
            second.start()
        second.stop()
        assert first.client.get("/health").status_code == 200
    finally:
        first.stop()
    # Released on shutdown: a server on the same home starts again in this process.
    again = RunningServer(make_settings(home, [])).start()
    try:
        assert again.client.get("/health").status_code == 200
    finally:
        again.stop()
