"""A full disk fails the job with an actionable message, installs nothing, keeps the bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 4 MiB filesystem (tmpfs); needs root, skipped where mounting is not allowed."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_fails_clearly_and_keeps_fetched_bytes(
    make_server, fileserver, small_disk, tmp_path
):
    payload = os.urandom(6 * 1024 * 1024)
    fileserver.add("/big.safetensors", payload)
    server = make_server(
        [fileserver.host_port], home=small_disk, db_url=f"sqlite:///{tmp_path / 'state.db'}"
    )
    job_id = server.client.post(
        "/models/download",
        json={"source": "url", "model_id": fileserver.url("/big.safetensors"), "name": "big"},
    ).json()["download_id"]
    status = server.wait_for(job_id)
    assert status["status"] == "failed"
    assert status["error"] == "Disk full"
    assert "No space left" in status["message"] and "free disk space" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert fileserver.count("GET", "/big.safetensors") == 1  # not retried: it cannot help
    kept = sum(p.stat().st_size for p in (small_disk / "partial").glob("*.part"))
    assert kept > 1024 * 1024
