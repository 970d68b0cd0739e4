"""Models load when they are used, and unload when idle: on-demand loading (one shared load
for concurrent first requests), keep-alive (MODELHOST_KEEP_ALIVE and a request's
``keep_alive``), the figures of /models/managed, the reload of pinned and kept models at
start, and the 409 when on-demand loading is off.

Models are the tiny BERT imported through the local source (``tests/tiny_models.py``).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from modelhost.api.app import WARM_UP_DELAY_S
from modelhost.config import Settings
from modelhost.units import DURATION_HELP, NEVER, parse_duration

TEXT = "hello world"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from tiny_models import build_bert

    return build_bert(tmp_path_factory.mktemp("on-demand") / "bert")


@pytest.fixture
def imports(tmp_path, bert_dir) -> Callable[[str], str]:
    """``copy(name)``: a copy of the tiny BERT to import; returns its path."""
    root = tmp_path / "imports"
    root.mkdir()

    def copy(name: str) -> str:
        target = root / name
        shutil.copytree(bert_dir, target)
        return str(target)

    copy.root = root  # type: ignore[attr-defined]
    return copy


@pytest.fixture
def serve(make_server, imports, tmp_path):
    """A server on ``tmp_path/home`` that may import the copies; ``overrides`` are settings."""

    def start(**overrides: Any):
        values = {"import_roots": (imports.root,), "device": "cpu", **overrides}
        return make_server([], home=tmp_path / "home", **values)

    return start


def install(server, path: str, name: str, **extra: Any) -> None:
    """Install without loading (unless ``extra`` says otherwise)."""
    body = {"source": "local", "model_id": path, "name": name, "load": False, **extra}
    started = server.client.post("/models/download", json=body)
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status


def predict(client: httpx.Client, name: str, **extra: Any) -> httpx.Response:
    return client.post(f"/models/{name}/predict", json={"inputs": TEXT, **extra})


def managed(server) -> dict[str, dict]:
    rows = server.client.get("/models/managed").json()["downloaded_models"]
    return {row["name"]: row for row in rows}


def services_of(server) -> Any:
    return server.server.config.app.state.services


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition``; the seconds it took (fails after ``timeout``)."""
    begun = time.monotonic()
    while not condition():
        assert time.monotonic() - begun < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - begun


def reference_scores(bert_dir: Path) -> dict[str, float]:
    """The tiny BERT's label scores for TEXT, computed with transformers directly."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    tokens = AutoTokenizer.from_pretrained(bert_dir)(TEXT, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**tokens).logits.softmax(-1)[0]
    return {model.config.id2label[i]: float(p) for i, p in enumerate(probabilities)}


# --------------------------------------------------------------------------- durations


def test_durations_parse_as_ollama_writes_them():
    assert parse_duration("5m") == 300
    assert parse_duration("30s") == 30
    assert parse_duration("1h") == 3600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration("300") == 300
    assert parse_duration(45) == 45
    assert parse_duration("0") == 0
    assert parse_duration("-1") == NEVER
    assert parse_duration("-5m") == NEVER  # any negative duration: never
    for bad in ("5x", "", "m", "1h30", "--1", "nan", "inf", True, None, [1]):
        with pytest.raises(ValueError, match=DURATION_HELP):
            parse_duration(bad)


def test_settings_default_and_a_bad_env_value(monkeypatch):
    settings = Settings()
    assert settings.load_on_demand is True and settings.keep_alive == 300
    monkeypatch.setenv("MODELHOST_KEEP_ALIVE", "2h")
    assert Settings().keep_alive == 7200
    monkeypatch.setenv("MODELHOST_KEEP_ALIVE", "soon")
    with pytest.raises(ValidationError, match=DURATION_HELP):
        Settings()


# --------------------------------------------------------------------------- on demand


def test_concurrent_first_predicts_share_one_load(serve, imports, bert_dir):
    server = serve()
    install(server, imports("bert"), "bert", task="text-classification")
    assert managed(server) == {}

    # A slower load, so that all eight requests arrive while it runs.
    registry = services_of(server).runtime
    real_loader, calls = registry._loader, []

    def slow_loader(*args: Any) -> Any:
        calls.append(args[0].name)
        time.sleep(0.5)
        return real_loader(*args)

    registry._loader = slow_loader

    def first_predict(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            return predict(client, "bert")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(first_predict, range(8)))

    expected = reference_scores(bert_dir)
    for answer in answers:
        assert answer.status_code == 200, answer.text
        scores = {p["label"]: p["score"] for p in answer.json()["predictions"]}
        assert scores == pytest.approx(expected, abs=1e-5)
    assert calls == ["bert"]
    row = managed(server)["bert"]
    assert row["load_count"] == 1
    assert row["keep_alive_s"] == 300  # MODELHOST_KEEP_ALIVE's default
    assert row["idle_s"] is not None and 0 <= row["idle_s"] < 60
    assert 240 < row["unloads_in_s"] <= 300 and row["expires_at"] is not None


def test_every_inference_route_loads_on_demand(serve, imports):
    server = serve()
    install(server, imports("emb"), "emb", task="feature-extraction")
    answer = server.client.post(
        "/v1/embeddings", json={"model": "emb", "input": ["a b", "hello"], "keep_alive": "30s"}
    )
    assert answer.status_code == 200, answer.text
    assert [len(item["embedding"]) for item in answer.json()["data"]] == [32, 32]
    row = managed(server)["emb"]
    assert (row["load_count"], row["keep_alive_s"]) == (1, 30)

    install(server, imports("cls"), "cls", task="text-classification")
    optimized = server.client.post(
        "/models/manage", params={"action": "optimize", "model_name": "cls"}
    )
    assert optimized.status_code == 200, optimized.text
    assert managed(server)["cls"]["load_count"] == 1


def test_on_demand_off_answers_409_naming_both_ways_to_load(serve, imports):
    server = serve(load_on_demand=False)
    install(server, imports("bert"), "bert", task="text-classification")
    answer = predict(server.client, "bert")
    assert answer.status_code == 409
    body = answer.json()
    assert body["success"] is False and body["error"] == "Model not loaded"
    assert "modelhost load bert" in body["message"]
    assert "POST /models/bert/load" in body["message"]
    assert managed(server) == {}

    assert server.client.post("/models/bert/load").status_code == 200
    assert predict(server.client, "bert").status_code == 200


def test_a_bad_keep_alive_is_refused_with_its_syntax(serve, imports):
    server = serve()
    install(server, imports("bert"), "bert", task="text-classification")
    for where, answer in (
        ("predict", predict(server.client, "bert", keep_alive="5x")),
        ("load", server.client.post("/models/bert/load", json={"keep_alive": "soon"})),
        (
            "synthesize",
            server.client.post(
                "/synthesize", json={"model_name": "bert", "text": "hi", "keep_alive": True}
            ),
        ),
    ):
        assert answer.status_code == 400, (where, answer.text)
        body = answer.json()
        assert body == {
            "success": False,
            "message": DURATION_HELP,
            "error": "Invalid keep_alive",
        }, where
    assert managed(server) == {}  # refused before anything loaded

    openai = server.client.post(
        "/v1/embeddings", json={"model": "bert", "input": "x", "keep_alive": "1d"}
    )
    assert openai.status_code == 400
    assert openai.json()["error"]["param"] == "keep_alive"
    assert openai.json()["error"]["message"] == DURATION_HELP


# --------------------------------------------------------------------------- idle unload


@pytest.mark.serial  # asserts when the reaper unloads
def test_idle_models_unload_after_their_keep_alive(serve, imports):
    server = serve()
    for name in ("short", "forever", "pinned", "zero"):
        install(server, imports(name), name, task="text-classification")
    assert predict(server.client, "short", keep_alive="1s").status_code == 200
    assert predict(server.client, "forever", keep_alive=-1).status_code == 200
    pinned = server.client.post("/models/pinned/load", json={"pin": True, "keep_alive": "1s"})
    assert pinned.status_code == 200 and pinned.json()["keep_alive_s"] == 1

    rows = managed(server)
    assert rows["short"]["keep_alive_s"] == 1 and rows["short"]["unloads_in_s"] <= 1
    assert rows["forever"]["keep_alive_s"] == NEVER
    assert rows["forever"]["unloads_in_s"] is None and rows["forever"]["expires_at"] is None
    assert rows["pinned"]["unloads_in_s"] is None  # pinned: never idle-unloaded

    took = wait_until(lambda: "short" not in managed(server), 3, "short unloaded")
    assert took < 3
    time.sleep(1.0)  # past the pinned model's keep-alive too
    assert sorted(managed(server)) == ["forever", "pinned"]

    # keep_alive 0: unloaded right after the request, not at the reaper's next look.
    assert predict(server.client, "zero", keep_alive=0).status_code == 200
    wait_until(lambda: "zero" not in managed(server), 0.9, "zero unloaded")

    # Used again: loaded again (its second load), with the server's keep-alive.
    assert predict(server.client, "short").status_code == 200
    row = managed(server)["short"]
    assert (row["load_count"], row["keep_alive_s"]) == (2, 300)


@pytest.mark.serial  # asserts that a request in flight outlives a 0 s keep-alive
def test_a_model_in_use_is_never_unloaded(serve, imports):
    server = serve(keep_alive="0")
    install(server, imports("bert"), "bert", task="text-classification")
    assert predict(server.client, "bert").status_code == 200
    wait_until(lambda: managed(server) == {}, 2, "unloaded after the request")

    lifecycle = services_of(server).lifecycle
    assert predict(server.client, "bert", keep_alive="1h").status_code == 200
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with lifecycle.acquire("bert") as loaded:
            loaded.set_keep_alive(0)
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    time.sleep(1.5)  # more than one reaper look
    row = managed(server)["bert"]
    assert row["inflight"] == 1 and row["idle_s"] is None and row["unloads_in_s"] is None
    release.set()
    holder.join(5)
    wait_until(lambda: managed(server) == {}, 2, "unloaded once idle")


# --------------------------------------------------------------------------- restart


@pytest.mark.serial  # times /health while the models load again
def test_pinned_and_kept_models_load_again_at_start(serve, imports):
    server = serve()
    for name in ("pinned", "kept", "plain"):
        install(server, imports(name), name, task="text-classification")
    pin = server.client.post("/models/manage", params={"action": "pin", "model_name": "pinned"})
    assert pin.json()["loaded"] is False
    assert predict(server.client, "kept", keep_alive="-1").status_code == 200
    assert predict(server.client, "plain").status_code == 200
    assert server.client.get("/models/download/kept/info").json()["keep_loaded"] is True
    server.stop()

    again = serve()
    slowest = 0.0

    def restored() -> bool:
        nonlocal slowest
        begun = time.monotonic()
        assert again.client.get("/health").status_code == 200
        slowest = max(slowest, time.monotonic() - begun)
        return sorted(managed(again)) == ["kept", "pinned"]

    wait_until(restored, 60, "pinned and kept models loaded again")
    assert slowest < 1.0, f"/health took {slowest:.2f} s while models loaded"
    rows = managed(again)
    assert rows["kept"]["keep_alive_s"] == NEVER and rows["kept"]["device"] == "cpu"
    assert rows["pinned"]["pinned"] is True
    assert predict(again.client, "kept").status_code == 200
    assert rows["kept"]["load_count"] == 1

    # Unloaded on purpose: not loaded again at the next start (the pinned one is).
    assert again.client.post("/models/kept/unload").status_code == 200
    assert again.client.get("/models/download/kept/info").json()["keep_loaded"] is False
    again.stop()
    third = serve()
    wait_until(lambda: "pinned" in managed(third), 60, "pinned model loaded again")
    time.sleep(0.5)
    assert sorted(managed(third)) == ["pinned"]


@pytest.mark.serial  # waits past the start-up restore's delay
def test_a_pinned_model_unloaded_by_hand_after_start_stays_unloaded(serve, imports):
    """The start-up restore loads what the last run left pinned, not what a request since
    this start asked about: a load or unload after start wins (found flaky on the previous
    main: an unload in the restore's first second was undone by it)."""
    server = serve()
    install(server, imports("pinned"), "pinned", task="text-classification")
    assert server.client.post("/models/pinned/load", json={"pin": True}).status_code == 200
    server.stop()

    again = serve()
    # Before the restore runs (a second after start) the user unloads it: nothing is
    # loaded yet, so 409, and it must stay that way.
    first = again.client.post("/models/pinned/unload")
    time.sleep(WARM_UP_DELAY_S + 1.5)
    assert "pinned" not in managed(again), first.status_code
    assert again.client.get("/models/download/pinned/info").json()["pinned"] is True
