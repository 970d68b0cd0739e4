"""``modelhost pull`` in a real terminal (pexpect): the bar moves, Ctrl-C asks, y/n decide.

A 300 MB file on a throttled loopback Hub keeps the transfer going long enough to watch it
and interrupt it.
"""

from __future__ import annotations

import os
import re
import signal

import pexpect
import pytest
from conftest import RunningServer, make_settings
from hubserver import HubServer
from test_cli import MODELHOST, cli_env

MB = 1_000_000
SIZE = 300 * MB
RATE = 10 * MB  # per connection: the whole file would take tens of seconds
SHOWN = re.compile(r"(\d+\.\d)/300\.0 MB")

# Serial: in the parallel pass the Ctrl-C was lost (the pull ran to its end without asking)
# in 4 runs of 5 on 2 cores, never alone or beside two CPU hogs; the cause is not found yet.
pytestmark = [pytest.mark.slow, pytest.mark.serial]


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal's foreground program has it (a disposition or a
    mask inherited from the test process must not hide the Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with HubServer(rate_bytes_per_s=RATE) as hub:
        hub.add_repo("test-org/big-y", {"big.bin": os.urandom(SIZE)}, lfs_threshold=1000)
        hub.add_repo("test-org/big-n", {"big.bin": os.urandom(SIZE)}, lfs_threshold=1000)
        home = tmp_path_factory.mktemp("cli-interactive")
        # One connection per file: the test Hub caps each connection, and the probe would
        # otherwise add connections until the file is in before anyone can press Ctrl-C.
        settings = make_settings(
            home, [], hf_endpoint=hub.base_url, hf_hub_cache=home / "none", device="cpu",
            fetch_connections=1,
        )
        running = RunningServer(settings).start()
        yield running
        running.stop()


def spawn_pull(server, repo: str) -> tuple[pexpect.spawn, str]:
    """``modelhost pull`` in a pseudo-terminal; the child and its download id."""
    child = pexpect.spawn(
        str(MODELHOST),
        ["--url", server.base_url, "pull", f"huggingface:{repo}", "--no-load"],
        env=cli_env(TERM="xterm", COLUMNS="160", LINES="40"),
        dimensions=(40, 160),
        encoding="utf-8",
        timeout=30,
        preexec_fn=_default_sigint,
    )
    child.expect(r"\(id (\w+)\)")
    return child, child.match.group(1)


def watch_moving(child: pexpect.spawn, distinct: int = 3) -> list[float]:
    """The byte counts (MB) the bars show, until ``distinct`` different non-zero ones."""
    seen: list[float] = []
    while len(set(seen)) < distinct:
        child.expect(SHOWN)
        value = float(child.match.group(1))
        if value > 0:
            seen.append(value)
    return seen


def test_ctrl_c_then_y_cancels_the_job(server):
    child, download_id = spawn_pull(server, "test-org/big-y")
    seen = watch_moving(child)
    assert seen == sorted(seen) and seen[-1] < SIZE / MB, seen
    assert server.client.get(f"/models/download/status/{download_id}").json()["status"] == (
        "downloading"
    )
    child.sendintr()
    child.expect_exact("Cancel the download? [y/N]")
    child.sendline("y")
    child.expect("cancelled")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert server.wait_for(download_id, timeout=30)["status"] == "cancelled"
    assert server.client.get("/models/download/big-y/info").status_code == 404


def test_ctrl_c_then_n_leaves_it_running(server):
    child, download_id = spawn_pull(server, "test-org/big-n")
    watch_moving(child)
    child.sendintr()
    child.expect_exact("Cancel the download? [y/N]")
    child.sendline("n")
    child.expect(f"keeps running on the server \\(id {download_id}\\)")
    child.expect_exact(f"modelhost status {download_id}")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    status = server.client.get(f"/models/download/status/{download_id}").json()
    assert status["status"] == "downloading" and status["bytes_downloaded"] < SIZE
    cancelled = server.client.post(f"/models/download/{download_id}/cancel")
    assert cancelled.status_code == 200
    assert server.wait_for(download_id, timeout=30)["status"] == "cancelled"
