"""Requests queued on a model that an unload or a delete takes away answer 409 / 404 with a
message, never a 500: VITS tokenizes before it takes the model's lock, so a request that waited
on the worker past the unload's drain found the processor released (``TypeError``, a 500).

The tiny VITS is imported with the local source; ``unload_drain_s`` is short, so the unload
frees the model while most requests still wait in the worker's queue.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tiny_models import build_vits

TEXT = "Hello there, my friend, how are you today? " * 8
QUEUED = 16


@pytest.fixture
def server(make_server, tmp_path):
    """A server with the tiny VITS installed and loaded, batching off (one request at a
    time, so most of them wait in the queue), a 0.2 s drain on unload and delete."""
    root = tmp_path / "imports"
    build_vits(root / "vits")
    running = make_server([], import_roots=(root,), device="cpu", unload_drain_s=0.2)
    body = {"source": "local", "model_id": str(root / "vits"), "name": "vits", "load": False}
    started = running.client.post("/models/download", json=body)
    assert started.status_code == 202, started.text
    assert running.wait_for(started.json()["download_id"], timeout=120)["status"] == "completed"
    return running


def _load(server) -> None:
    loaded = server.client.post("/models/vits/load", json={"max_batch_size": 1})
    assert loaded.status_code == 200, loaded.text


def _queue_then(server, take_away) -> list[httpx.Response]:
    """``QUEUED`` concurrent /synthesize requests; ``take_away()`` once the first has run."""

    def speak(seed: int) -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            return client.post(
                "/synthesize", json={"model_name": "vits", "text": TEXT, "seed": seed}
            )

    with ThreadPoolExecutor(QUEUED) as pool:
        futures = [pool.submit(speak, seed) for seed in range(QUEUED)]
        deadline = time.monotonic() + 60
        while not any(f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.01)
        take_away()
        return [f.result() for f in futures]


def _check(responses: list[httpx.Response], refused: int) -> None:
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, refused}, [(r.status_code, r.text[:200]) for r in responses]
    assert refused in statuses, statuses  # the race was really run
    for response in responses:
        if response.status_code == refused:
            assert response.json()["message"], response.text


def test_requests_queued_on_an_unloaded_vits_answer_409(server) -> None:
    _load(server)
    responses = _queue_then(server, lambda: server.client.post("/models/vits/unload"))
    _check(responses, 409)
    assert "unloaded" in next(r for r in responses if r.status_code == 409).json()["message"]


def test_requests_queued_on_a_deleted_vits_answer_404(server) -> None:
    _load(server)
    responses = _queue_then(server, lambda: server.client.delete("/models/download/vits"))
    _check(responses, 404)
    assert "deleted" in next(r for r in responses if r.status_code == 404).json()["message"]
