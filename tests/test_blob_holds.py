"""A blob a running job decided to reuse stays in the store until the job commits or ends,
even when the model that also held it is deleted or evicted meanwhile."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from fileserver import Rate
from hubserver import HubServer

SHARED = os.urandom(300_000)
BIG = os.urandom(1_500_000)
RATE = 500_000  # bytes/s for the big file: about 3 s, time to delete or evict meanwhile


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config(kind: str) -> bytes:
    return json.dumps({"model_type": "bert", "kind": kind}).encode()


@pytest.fixture
def hub():
    with HubServer() as server:
        server.add_repo("org/a", {"config.json": config("a"), "shared.safetensors": SHARED})
        server.add_repo(
            "org/b",
            {
                "config.json": config("b"),
                "shared.safetensors": SHARED,
                "big.safetensors": BIG,
            },
        )
        server.add_repo(
            "org/c", {"config.json": config("c"), "c.safetensors": os.urandom(1_900_000)}
        )
        server.set_faults("org/b", "big.safetensors", [Rate(RATE)])
        yield server


@pytest.fixture
def modelhost(make_server, hub, tmp_path):
    def start(**overrides):
        values = {"hf_endpoint": hub.base_url, "hf_hub_cache": tmp_path / "no-hf-cache"}
        values.update(overrides)
        return make_server([], **values)

    return start


def install(server, repo: str, name: str) -> str:
    answer = server.client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": repo, "name": name, "load": False},
    )
    assert answer.status_code == 202, answer.text
    return answer.json()["download_id"]


def started_big_file(hub: HubServer) -> None:
    """Wait until b's big file is on the wire: b's job has decided to reuse the shared blob."""
    deadline = time.monotonic() + 30
    while hub.count("GET", "big.safetensors") == 0:
        assert time.monotonic() < deadline, "b's big file never started"
        time.sleep(0.01)


def assert_installed_intact(server, name: str, expected: dict[str, bytes]) -> None:
    info = server.client.get(f"/models/download/{name}/info").json()
    directory = Path(info["path"])
    for path, data in expected.items():
        assert sha256((directory / path).read_bytes()) == sha256(data), path


def test_deleting_the_model_that_shares_a_reused_blob_does_not_fail_the_job(modelhost, hub):
    server = modelhost()
    assert server.wait_for(install(server, "org/a", "a"))["status"] == "completed"
    job = install(server, "org/b", "b")
    started_big_file(hub)
    deleted = server.client.delete("/models/download/a")
    assert deleted.status_code == 200, deleted.text
    status = server.wait_for(job)
    assert status["status"] == "completed", status["message"]
    assert "reused" in status["message"]
    assert_installed_intact(server, "b", {"shared.safetensors": SHARED, "big.safetensors": BIG})
    # Once b holds it by its manifest, deleting b frees the shared blob as usual.
    assert server.client.delete("/models/download/b").status_code == 200
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    blobs = Path(server.settings.home) / "blobs" / "sha256"
    assert not (blobs / sha256(SHARED)).exists()


def test_eviction_by_another_job_does_not_take_a_reused_blob(modelhost, hub):
    # Each model fits the budget; a and c together do not: c's commit evicts a, the least
    # recently used, while b still needs the blob a shared with it.
    server = modelhost(cache_limit_gb=0.002)
    assert server.wait_for(install(server, "org/a", "a"))["status"] == "completed"
    job = install(server, "org/b", "b")
    started_big_file(hub)
    evicting = server.wait_for(install(server, "org/c", "c"))
    assert evicting["status"] == "completed", evicting["message"]
    assert "evicted to stay within the cache budget: a" in evicting["message"]
    status = server.wait_for(job)
    assert status["status"] == "completed", status["message"]
    assert_installed_intact(server, "b", {"shared.safetensors": SHARED, "big.safetensors": BIG})


def test_a_job_that_ends_without_committing_lets_go_of_the_blob_it_held(modelhost, hub):
    """The hold ends with the job: cancelled after the model sharing its blob was deleted,
    it leaves no blob behind that nothing references."""
    server = modelhost()
    assert server.wait_for(install(server, "org/a", "a"))["status"] == "completed"
    job = install(server, "org/b", "b")
    started_big_file(hub)
    assert server.client.delete("/models/download/a").status_code == 200
    cancelled = server.client.post(f"/models/download/{job}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert server.wait_for(job)["status"] == "cancelled"
    blobs = Path(server.settings.home) / "blobs" / "sha256"
    deadline = time.monotonic() + 10
    while any(blobs.iterdir()):  # the job lets go as it ends, just after its status says so
        assert time.monotonic() < deadline, list(blobs.iterdir())
        time.sleep(0.02)
