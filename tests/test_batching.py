"""Dynamic batching: concurrent requests coalesce into one forward, each caller gets its own
result equal to the unbatched one, and the load body sets and validates the batch limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build_bert, build_vits, minilm_dir

from modelhost.runtime.batching import BatchSettings, Workers
from modelhost.runtime.compute.vits import VitsCall, vits_batch
from modelhost.runtime.inference import predict, predict_work
from modelhost.runtime.loaders import load
from modelhost.store.manifest import Manifest

CPU = torch.device("cpu")
WORKERS = Workers()  # what a server's lifecycle holds (ModelLifecycle.workers)


def _load(name: str, task: str, path: Path):
    manifest = Manifest(
        name=name,
        source="huggingface",
        model_id=f"tests/{name}",
        task=task,
        extra={"architecture": "bert", "model_type": "bert"},
    )
    return load(manifest, path, CPU)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _load("bert", "text-classification", build_bert(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def minilm():
    return _load("minilm", "feature-extraction", minilm_dir())


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    path = build_vits(tmp_path_factory.mktemp("vits"))
    manifest = Manifest(name="vits", source="huggingface", model_id="t/vits", task="text-to-speech")
    return load(manifest, path, CPU)


TEXTS = ["hello world", "the model is a good test movie, is it", "bad", "a test"]


def _concurrently(loaded, inputs: list, params=None) -> list:
    """Submit every input to the model's worker at once (its thread blocked meanwhile, so
    all of them queue), and return each caller's result."""
    futures = []
    with loaded.lock:  # the worker's first forward waits here: the rest queue behind it
        for item in inputs:
            work, fn = predict_work(loaded, item, params)
            futures.append(WORKERS.worker_for(loaded).submit(work, fn))
    return [f.result(timeout=60) for f in futures]


def test_classification_batched_equals_alone(bert):
    bert.batching = BatchSettings(32, 50)
    alone = [predict(bert, t) for t in TEXTS]
    before = bert.batch_stats.batches_run
    together = _concurrently(bert, TEXTS)
    for a, b in zip(alone, together, strict=True):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        scores_a = np.array([p["score"] for p in a["predictions"]])
        scores_b = np.array([p["score"] for p in b["predictions"]])
        assert np.abs(scores_a - scores_b).max() < 1e-5
    # Fewer forwards than requests: the queued ones ran together (recomputed from the sizes).
    ran = bert.batch_stats.batches_run - before
    assert 1 <= ran <= 2 and bert.batch_stats.largest_batch >= 3


def test_embeddings_batched_equal_alone_and_lists_count_as_items(minilm):
    minilm.batching = BatchSettings(32, 50)
    inputs = ["a", "a much longer sentence, with many more tokens than the first one", TEXTS]
    alone = [predict(minilm, item)["embeddings"] for item in inputs]
    sizes_before = dict(minilm.batch_stats.batch_sizes)
    together = [r["embeddings"] for r in _concurrently(minilm, ["warm up", *inputs])][1:]
    for a, b in zip(alone, together, strict=True):
        assert np.array(a).shape == np.array(b).shape
        assert np.abs(np.array(a) - np.array(b)).max() < 1e-5  # padding masked
    grown = {
        k: v - sizes_before.get(k, 0)
        for k, v in minilm.batch_stats.batch_sizes.items()
        if v != sizes_before.get(k, 0)
    }
    # 7 items (a list of 4 counts as 4) in at most 2 forwards, one of at least 6.
    assert sum(size * n for size, n in grown.items()) == 7
    assert sum(grown.values()) <= 2 and max(grown) >= 6


def test_max_batch_size_one_runs_every_item_alone(bert):
    bert.batching = BatchSettings(1, 50)
    before = dict(bert.batch_stats.batch_sizes)
    results = _concurrently(bert, TEXTS)
    assert len(results) == len(TEXTS)
    after = bert.batch_stats.batch_sizes
    assert {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)} == {
        1: len(TEXTS)
    }


def test_a_bad_request_fails_alone(bert):
    bert.batching = BatchSettings(32, 50)
    with pytest.raises(ValueError, match="non-empty"):
        predict_work(bert, "", None)  # checked before it could join a batch
    good = _concurrently(bert, TEXTS[:2])
    assert all("predictions" in g for g in good)


def test_vits_batched_equals_alone(vits):
    texts = ["hello there", "a much longer sentence to speak, with commas", "hi"]
    calls = [VitsCall(t, None, 7 + i) for i, t in enumerate(texts)]
    alone = [vits_batch(vits, [c])[0] for c in calls]
    together = vits_batch(vits, calls)
    for a, b in zip(alone, together, strict=True):
        assert len(a.samples) == len(b.samples)  # each waveform cut to its own length
        # The prior network runs in float64 on the CPU, so batch shapes do not change the
        # rounding (in float32 the flow amplified it to 3.4e-5).
        assert np.abs(a.samples - b.samples).max() < 1e-5
    assert len({len(a.samples) for a in alone}) == 3


def test_vits_item_without_known_characters_fails_alone(vits):
    results = vits_batch(vits, [VitsCall("hello", None, 1), VitsCall("1234", None, 2)])
    assert len(results[0].samples) > 0
    assert isinstance(results[1], ValueError)


# --------------------------------------------------------------------------- over HTTP


def test_load_body_sets_and_validates_batching(make_server, fileserver, tmp_path):
    from test_workers import install_slow_model

    server = make_server([fileserver.host_port], device="cpu")
    install_slow_model(server, fileserver, tmp_path, rounds=1)
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert (row["max_batch_size"], row["max_batch_delay_ms"]) == (32, 5.0)
    for bad in ({"max_batch_size": 0}, {"max_batch_size": 257}, {"max_batch_delay_ms": 1001}):
        response = server.client.post("/models/slow/load", json=bad)
        assert response.status_code == 400, response.text
        assert response.json()["success"] is False
        assert next(iter(bad)) in response.json()["message"]
    ok = server.client.post(
        "/models/slow/load", json={"max_batch_size": 4, "max_batch_delay_ms": 0}
    )
    assert ok.status_code == 200, ok.text
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert (row["max_batch_size"], row["max_batch_delay_ms"]) == (4, 0)
    server.client.post("/models/slow/predict", json={"inputs": [[1.0] * 512]})
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert row["batches_run"] == 1 and row["items_run"] == 1


def test_vits_float64_prior_is_counted_in_memory(tmp_path):
    from modelhost.runtime.memory import weights_bytes

    manifest = Manifest(name="v2", source="huggingface", model_id="t/vits", task="text-to-speech")
    fresh = load(manifest, build_vits(tmp_path), CPU)
    before, allocated = fresh.weights_bytes, fresh.allocated_bytes
    vits_batch(fresh, [VitsCall("hello", None, 1)])
    prior = fresh.model._modelhost_float64_prior
    assert next(prior.parameters()).dtype == torch.float64
    added = weights_bytes(prior)
    # float64: twice the bytes of the model without its decoder
    assert added == 2 * (before - weights_bytes(fresh.model.decoder))
    assert (fresh.weights_bytes, fresh.allocated_bytes) == (before + added, allocated + added)
    vits_batch(fresh, [VitsCall("hello", None, 1)])  # built once
    assert fresh.weights_bytes == before + added
