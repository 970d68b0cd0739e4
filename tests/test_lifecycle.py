"""Each model's life has one owner (runtime.lifecycle): delete at any moment leaves nothing,
requests in flight finish, disk eviction spares loaded and pinned models, one model's slow
load or unload never holds up another's, and optimize is an operation a delete waits for.

Models are copies of the tiny BERT imported through the local source; each copy carries a
file of its own bytes, so copies do not share every blob in the content-addressed store.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fileserver import Rate

from modelhost.runtime.registry import ModelRegistry
from modelhost.store import Manifest, Store

PAD = 1_000_000  # bytes of each copy's own file


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from tiny_models import build_bert

    return build_bert(tmp_path_factory.mktemp("lifecycle") / "bert")


@pytest.fixture
def imports(tmp_path, bert_dir) -> Callable[[str], str]:
    """``copy(name)``: a copy of the tiny BERT with its own pad file; returns its path."""
    root = tmp_path / "imports"

    def copy(name: str) -> str:
        target = root / name
        shutil.copytree(bert_dir, target)
        (target / "pad.dat").write_bytes(os.urandom(PAD))
        return str(target)

    copy.root = root  # type: ignore[attr-defined]
    root.mkdir()
    return copy


class Gate:
    """Wraps a function so that calls wait until ``release`` is set; ``entered`` tells a
    call has started."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.release.wait(30), "the test never released the gate"
            return function(*args, **kwargs)

        return gated


def services_of(server) -> Any:
    return server.server.config.app.state.services


def in_background(server, method: str, path: str, **kwargs: Any) -> Future[httpx.Response]:
    """Send a request from another thread (its own client); the future holds the answer."""

    def send() -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            return client.request(method, path, **kwargs)

    pool = ThreadPoolExecutor(1)
    future = pool.submit(send)
    pool.shutdown(wait=False)
    return future


def install(server, path: str, name: str, **extra: Any) -> dict:
    started = server.client.post(
        "/models/download", json={"source": "local", "model_id": path, "name": name, **extra}
    )
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status
    return status


def predict(server, name: str) -> httpx.Response:
    return server.client.post(f"/models/{name}/predict", json={"inputs": "hello world"})


def managed_names(server) -> list[str]:
    return [row["name"] for row in server.client.get("/models/managed").json()["downloaded_models"]]


def assert_gone(server, name: str) -> None:
    """Gone everywhere: no manifest, not managed, predict 404, no files on disk."""
    assert server.client.get(f"/models/download/{name}/info").status_code == 404
    assert name not in managed_names(server)
    answer = predict(server, name)
    assert answer.status_code == 404, answer.text
    assert answer.json()["success"] is False
    assert name not in server.client.get("/models/cache/info").json()["models"]
    assert not (server.settings.home / "models" / name).exists()


def settle(server, name: str, timeout: float = 5) -> None:
    """Give a DELETE sent in the background up to ``timeout`` to begin (no assertion: the
    tests' own checks say whether it behaved)."""
    deadline = time.monotonic() + timeout
    lifecycle = getattr(services_of(server), "lifecycle", None)
    while lifecycle is not None and not lifecycle.is_closing(name):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --------------------------------------------------------------------------- delete


def test_delete_while_loading_removes_it_everywhere(make_server, imports):
    server = make_server([], import_roots=(imports.root,), device="cpu")
    registry = services_of(server).runtime
    gate = Gate()
    registry._loader = gate.wrap(registry._loader)  # loading now waits for the test
    started = server.client.post(
        "/models/download", json={"source": "local", "model_id": imports("a"), "name": "a"}
    )
    job_id = started.json()["download_id"]
    assert gate.entered.wait(60)
    assert server.client.get(f"/models/download/status/{job_id}").json()["status"] == "loading"

    deleting = in_background(server, "DELETE", "/models/download/a")
    settle(server, "a")
    time.sleep(0.2)
    during = predict(server, "a")  # the delete has begun: requests are refused as gone
    gate.release.set()
    deleted = deleting.result(timeout=60)

    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["cancelled_download_id"] == job_id
    assert_gone(server, "a")
    assert during.status_code == 404, during.text
    assert server.wait_for(job_id)["status"] == "cancelled"
    assert registry.list() == []


def test_delete_mid_inference_lets_the_request_finish(make_server, imports, monkeypatch):
    import modelhost.runtime.inference as inference

    server = make_server([], import_roots=(imports.root,), device="cpu")
    install(server, imports("b"), "b", task="text-classification")
    expected = predict(server, "b").json()["predictions"]
    gate = Gate()
    monkeypatch.setattr(inference, "predict", gate.wrap(inference.predict))

    running = in_background(server, "POST", "/models/b/predict", json={"inputs": "hello world"})
    assert gate.entered.wait(30)
    deleting = in_background(server, "DELETE", "/models/download/b")
    settle(server, "b")
    time.sleep(0.4)  # time enough for the delete to have freed an unguarded model
    assert not deleting.done()  # waits for the request in flight
    gate.release.set()

    finished = running.result(timeout=30)
    assert finished.status_code == 200, finished.text
    assert finished.json()["predictions"] == expected
    assert deleting.result(timeout=30).status_code == 200
    assert deleting.result().json()["unloaded"]["name"] == "b"
    assert_gone(server, "b")


def test_delete_while_downloading_leaves_nothing(make_server, fileserver):
    payload = os.urandom(2_000_000)
    fileserver.add("/slow.safetensors", payload, faults=[Rate(400_000)])
    server = make_server([fileserver.host_port])
    job_id = server.client.post(
        "/models/download",
        json={"source": "url", "model_id": fileserver.url("/slow.safetensors"), "name": "c"},
    ).json()["download_id"]
    wait_until(
        lambda: (
            server.client.get(f"/models/download/status/{job_id}").json()["bytes_downloaded"] > 0
        )
    )
    deleted = server.client.delete("/models/download/c")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["cancelled_download_id"] == job_id
    assert server.wait_for(job_id)["status"] == "cancelled"
    assert_gone(server, "c")
    assert list((server.settings.home / "partial").iterdir()) == []


# --------------------------------------------------------------------------- disk and pin


def test_cache_eviction_spares_loaded_and_pinned_models(make_server, imports, bert_dir):
    base = sum(p.stat().st_size for p in bert_dir.rglob("*") if p.is_file())
    limit_gb = (base + 3.5 * PAD) / 1024**3  # room for the shared files and three pads
    server = make_server([], import_roots=(imports.root,), device="cpu", cache_limit_gb=limit_gb)
    install(server, imports("loaded"), "loaded", task="text-classification")  # oldest use
    install(server, imports("pinned"), "pinned", task="text-classification")
    assert server.client.post("/models/pinned/load", json={"pin": True}).status_code == 200
    assert server.client.post("/models/pinned/unload").status_code == 200
    install(server, imports("idle"), "idle", load=False)
    status = install(server, imports("new"), "new", load=False)

    assert "evicted to stay within the cache budget: idle" in status["message"], status
    models = server.client.get("/models/cache/info").json()["models"]
    assert sorted(models) == ["loaded", "new", "pinned"]
    assert predict(server, "loaded").status_code == 200
    info = server.client.get("/models/download/pinned/info").json()
    assert info["pinned"] is True


def test_pin_is_persisted_and_unpin_clears_it(make_server, imports, tmp_path):
    home = tmp_path / "home"
    server = make_server([], home=home, import_roots=(imports.root,), device="cpu")
    install(server, imports("p"), "p", load=False)
    pinned = server.client.post("/models/manage", params={"action": "pin", "model_name": "p"})
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["pinned"] is True and pinned.json()["loaded"] is False
    server.stop()

    again = make_server([], home=home, import_roots=(imports.root,), device="cpu")
    assert again.client.get("/models/download/p/info").json()["pinned"] is True
    loaded = again.client.post("/models/p/load")
    assert loaded.json()["pinned"] is True  # pinned on disk: pinned in memory too
    unpinned = again.client.post("/models/manage", params={"action": "unpin", "model_name": "p"})
    assert unpinned.json()["pinned"] is False
    assert again.client.get("/models/download/p/info").json()["pinned"] is False
    assert again.client.get("/models/managed").json()["downloaded_models"][0]["pinned"] is False
    missing = again.client.post("/models/manage", params={"action": "pin", "model_name": "zz"})
    assert missing.status_code == 404 and missing.json()["success"] is False


def test_store_eviction_keeps_the_protected_and_pinned(tmp_path):
    store = Store(tmp_path / "store")
    from modelhost.store import CommitFile

    for index, name in enumerate(["a", "b", "c"]):
        blob = tmp_path / f"{name}.bin"
        blob.write_bytes(bytes([index]) * 1000)
        digest = __import__("hashlib").sha256(blob.read_bytes()).hexdigest()
        store.commit(
            Manifest(name=name, source="url", model_id=name),
            [CommitFile("w.bin", blob, 1000, digest)],
        )
    store.set_pinned("b", True)
    assert store.evict_to_fit(1000, keep={"a"}) == ["c"]
    assert sorted(m.name for m in store.list()) == ["a", "b"]
    assert store.get("b").pinned is True


# --------------------------------------------------------------------------- concurrency


@pytest.mark.serial  # timing-sensitive: run alone
def test_slow_load_of_one_model_does_not_delay_another(bert_dir):
    from modelhost.runtime.loaders import load as real_load

    gate = Gate()

    def loader(manifest, path, device, allow_pickle):
        if manifest.name == "slow":
            gate.wrap(lambda: None)()
        return real_load(manifest, path, device, allow_pickle)

    registry = ModelRegistry(device_setting="cpu", loader=loader)

    def manifest(name: str) -> Manifest:
        return Manifest(name=name, source="local", model_id=name, task="text-classification")

    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(registry.load, manifest("slow"), bert_dir)
        assert gate.entered.wait(10)
        begun = time.monotonic()
        fast = pool.submit(registry.load, manifest("fast"), bert_dir)
        try:
            fast.result(timeout=10)
            took = time.monotonic() - begun
        finally:
            gate.release.set()
        slow.result(timeout=30)
    assert took < 5, f"loading 'fast' waited {took:.1f} s for 'slow'"
    assert {m.name for m in registry.list()} == {"slow", "fast"}


def test_unload_waits_for_requests_in_flight_and_refuses_new_ones(bert_dir):
    from modelhost.runtime.errors import ModelNotLoaded
    from modelhost.runtime.lifecycle import ModelLifecycle

    registry = ModelRegistry(device_setting="cpu", drain_timeout_s=10)
    lifecycle = ModelLifecycle(registry, Store(bert_dir.parent / "unused-store"))
    registry.load(
        Manifest(name="m", source="local", model_id="m", task="text-classification"), bert_dir
    )
    unloaded = threading.Event()
    with lifecycle.acquire("m") as model:
        worker = threading.Thread(target=lambda: (lifecycle.unload("m"), unloaded.set()))
        worker.start()
        time.sleep(0.2)
        assert not unloaded.is_set() and model.model is not None  # still serving
        with pytest.raises(ModelNotLoaded):
            with lifecycle.acquire("m"):
                pass
    worker.join(10)
    assert unloaded.is_set() and model.model is None and model.inflight == 0


# --------------------------------------------------------------------------- optimize


def test_optimize_is_observable_and_a_delete_waits_for_it(make_server, imports, monkeypatch):
    import modelhost.runtime.optimize as optimize_module

    server = make_server([], import_roots=(imports.root,), device="cpu")
    install(server, imports("o"), "o", task="text-classification")
    gate = Gate()
    monkeypatch.setattr(optimize_module, "optimize", gate.wrap(optimize_module.optimize))
    params = {"action": "optimize", "model_name": "o"}
    optimizing = in_background(server, "POST", "/models/manage", params=params)
    assert gate.entered.wait(30)
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert (row["name"], row["operation"], row["inflight"]) == ("o", "optimizing", 1)

    deleting = in_background(server, "DELETE", "/models/download/o")
    settle(server, "o")
    time.sleep(0.4)  # time enough for the delete to have freed an unguarded model
    assert not deleting.done()  # the delete waits for the optimize
    gate.release.set()
    optimized = optimizing.result(timeout=60)
    assert optimized.status_code == 200, optimized.text
    assert optimized.json()["action"] == "optimize"
    assert deleting.result(timeout=60).status_code == 200
    assert_gone(server, "o")
