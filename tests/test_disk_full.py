"""A disk that fills during a transfer fails the job with an actionable message, installs
nothing and keeps the bytes fetched so far.

The disk check before a transfer refuses what is known not to fit, so the fault here comes
from a file whose size the upstream does not say (no Content-Length): the check cannot count
it, and the disk really fills while it streams. The ``small_disk`` fixture is in conftest.
"""

from __future__ import annotations

import os

import pytest
from rawserver import RawServer


@pytest.fixture
def raw():
    with RawServer() as server:
        yield server


def test_full_disk_fails_clearly_and_keeps_fetched_bytes(make_server, raw, small_disk, tmp_path):
    payload = os.urandom(6 * 1024 * 1024)
    raw.route("HEAD", "/big.safetensors", [("ETag", '"v1"')])  # no size: it cannot be checked
    raw.route("GET", "/big.safetensors", [("ETag", '"v1"')], payload)
    server = make_server(
        [raw.host_port],
        home=small_disk,
        db_url=f"sqlite:///{tmp_path / 'state.db'}",
        disk_reserve_mb=0,
    )
    response = server.client.post(
        "/models/download",
        json={"source": "url", "model_id": raw.url("/big.safetensors"), "name": "big"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["download_info"]["size_bytes"] is None
    status = server.wait_for(response.json()["download_id"])
    assert status["status"] == "failed"
    assert status["error"] == "Disk full"
    assert "No space left" in status["message"] and "free disk space" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert raw.count("GET", "/big.safetensors") == 1  # not retried: it cannot help
    kept = sum(p.stat().st_size for p in (small_disk / "partial").glob("*.part"))
    assert kept > 1024 * 1024
    assert server.client.get("/models/cache/info").json()["partial_bytes"] == kept
