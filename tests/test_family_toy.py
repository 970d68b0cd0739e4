"""A model family added in one module (tests/toy_family.py) and one registration line,
served end to end by a real server: install (local source), load, predict, optimize (its
probe), unload. Plus the registry's promises: lazy, ordered, and no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from toy_family import ToyAdapter, write_toy_model

from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families import detect_family
from modelhost.runtime.families.base import BatchPlan, BatchSupport
from modelhost.runtime.families.registry import adapter_for, adapters, register, unregister
from modelhost.store.manifest import Manifest

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def toy_registered():
    register(ToyAdapter())  # the one registry line
    yield
    unregister("toy-doubler")


def _manifest(name: str = "toy") -> Manifest:
    return Manifest(name=name, source="local", model_id="/x")


def test_toy_family_is_served_end_to_end(toy_registered, make_server, tmp_path):
    # toy_registered first: the family stays registered until the server has stopped
    root = tmp_path / "imports"
    write_toy_model(root / "toy", factor=2.0)
    server = make_server([], import_roots=(root,), device="cpu")
    started = server.client.post(
        "/models/download",
        json={"source": "local", "model_id": str(root / "toy"), "name": "toy", "load": False},
    )
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=60)
    assert status["status"] == "completed", status

    loaded = server.client.post("/models/toy/load", json={})
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    assert (body["family"], body["task"], body["is_tts"]) == ("toy-doubler", "doubling", False)
    assert body["parameters"] == 1

    answer = server.client.post("/models/toy/predict", json={"inputs": [1, 2.5, -3]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == pytest.approx([2.0, 5.0, -6.0], abs=1e-6)
    bad = server.client.post("/models/toy/predict", json={"inputs": "two"})
    assert bad.status_code == 400 and "list of numbers" in bad.json()["message"]
    spoken = server.client.post("/synthesize", json={"model_name": "toy", "text": "hi"})
    assert 400 <= spoken.status_code < 500, spoken.text

    optimized = server.client.post(
        "/models/manage", params={"action": "optimize", "model_name": "toy"}
    )
    assert optimized.status_code == 200, optimized.text
    report = optimized.json()
    assert report["compared"] == "toy: 4 numbers through it"  # the toy's own probe ran
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] < 0.5
    assert report["runs"] > 0
    after = server.client.post("/models/toy/predict", json={"inputs": [4]})
    assert after.json()["outputs"] == pytest.approx([8.0], abs=0.1)  # int8 keeps it close

    unloaded = server.client.post("/models/toy/unload")
    assert unloaded.status_code == 200, unloaded.text
    managed = server.client.get("/models/managed").json()["downloaded_models"]
    assert [m["name"] for m in managed if m.get("loaded")] == []
    # Used again, it loads on demand: a second load, not optimized this time.
    again = server.client.post("/models/toy/predict", json={"inputs": [1]})
    assert again.status_code == 200 and again.json()["outputs"] == pytest.approx([2.0])
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert (row["name"], row["load_count"], row["optimized"]) == ("toy", 2, False)


def test_registered_family_is_asked_first_and_unregistered_cleanly(tmp_path):
    model = write_toy_model(tmp_path / "toy")
    with pytest.raises(UnsupportedModel, match="no task was recorded"):
        detect_family(_manifest(), model)  # no built-in family claims it
    register("toy_family:ToyAdapter")
    try:
        info = detect_family(_manifest(), model)
        assert (info.family, info.task, info.model_type) == (
            "toy-doubler",
            "doubling",
            "toy-doubler",
        )
        assert adapters()[0].name == "toy-doubler"
        assert adapter_for("toy-doubler").batching.predict is False
    finally:
        unregister("toy-doubler")
    with pytest.raises(UnsupportedModel, match="no model family 'toy-doubler'"):
        adapter_for("toy-doubler")


def test_family_named_in_the_environment(tmp_path, monkeypatch):
    model = write_toy_model(tmp_path / "toy")
    monkeypatch.setenv("MODELHOST_FAMILIES", "toy_family:ToyAdapter")
    assert detect_family(_manifest(), model).family == "toy-doubler"
    monkeypatch.setenv("MODELHOST_FAMILIES", "")
    assert "toy-doubler" not in [a.name for a in adapters()]


def test_batching_is_declared_for_the_three_batching_families():
    declared = {a.name: (a.batching.predict, a.batching.synthesize) for a in adapters()}
    assert {name for name, (p, s) in declared.items() if p or s} == {
        "text-classification",
        "feature-extraction",
        "vits",
    }
    assert declared["vits"] == (False, True)
    assert declared["feature-extraction"] == (True, False)


def _config_dir(path: Path, **config) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


BERT = {"model_type": "bert", "architectures": ["BertForSequenceClassification"]}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
WHISPER = {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]}


@pytest.mark.parametrize(
    ("config", "task", "message"),
    [
        (WHISPER, "text-to-speech", "text-to-speech needs a SpeechT5, Bark or VITS model"),
        (WHISPER, "text-classification", "a Whisper model serves speech recognition, not"),
        (BERT, "automatic-speech-recognition", "supported with Whisper models only"),
        (GPT2, "text2text-generation", "text2text-generation needs an encoder-decoder"),
        (BERT, "text-generation", "no causal language-model head"),
        (GPT2, "image-classification", "no image-classification head"),
        ({"model_type": "vits"}, "text-classification", "a vits model serves text-to-speech"),
        ({"model_type": "speecht5"}, None, "needs its HiFiGAN vocoder"),
        ({"model_type": "bert", "architectures": ["Bert"]}, None, "no task was recorded"),
    ],
)
def test_detection_refusals_name_the_reason(tmp_path, config, task, message):
    """The order the adapters are asked in keeps each refusal's reason (as before them)."""
    path = _config_dir(tmp_path / "m", **config)
    manifest = Manifest(name="m", source="local", model_id="/x", task=task)
    with pytest.raises(UnsupportedModel, match=message):
        detect_family(manifest, path)


@pytest.mark.parametrize(
    ("config", "task", "family"),
    [
        (BERT, None, "text-classification"),
        (GPT2, "text-generation", "text-generation"),
        (WHISPER, None, "whisper"),
        ({"model_type": "vits"}, "tts", "vits"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, None, "feature-extraction"),
    ],
)
def test_detection_picks_the_family(tmp_path, config, task, family):
    path = _config_dir(tmp_path / "m", **config)
    manifest = Manifest(name="m", source="local", model_id="/x", task=task)
    assert detect_family(manifest, path).family == family


def test_registry_and_detection_import_no_torch(tmp_path):
    """Every adapter module imports and detects without torch or transformers."""
    bert = _config_dir(tmp_path / "bert", **BERT)
    code = f"""
import json, sys
from modelhost.runtime.families import detect_family
from modelhost.runtime.families.registry import adapters
from modelhost.store.manifest import Manifest
names = [a.name for a in adapters()]
m = Manifest(name="b", source="local", model_id="/x")
info = detect_family(m, {str(bert)!r})
print(json.dumps([names, info.family, "torch" in sys.modules,
                  "transformers" in sys.modules]))
"""
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    names, family, torch_imported, transformers_imported = json.loads(run.stdout)
    assert len(names) == 13 and names[0] == "torchscript"
    assert family == "text-classification"
    assert (torch_imported, transformers_imported) == (False, False)


class NoiseAdapter(ToyAdapter):
    """A toy speaking family: noise scaled by the model's weight, from the seeded RNG."""

    name = "toy-noise"
    predict = None

    def synthesize(self, loaded, text, speaker, max_new_tokens, seed):
        import torch

        from modelhost.runtime.compute.speech import speak_one

        def run(model):
            return model(torch.randn(len(text), 1)).squeeze(-1)

        return speak_one(loaded, run, seed)


def test_registered_speaking_family_synthesizes_with_the_requests_seed():
    import numpy as np
    import torch

    from modelhost.runtime import inference
    from modelhost.runtime.loaded import LoadedModel

    register(NoiseAdapter())
    try:
        layer = torch.nn.Linear(1, 1, bias=False)
        layer.weight.data.fill_(3.0)
        # Built by hand, so what loaders.load resolves from the adapter is given here.
        loaded = LoadedModel(
            name="n",
            family="toy-noise",
            task="noise",
            is_tts=True,
            device="cpu",
            model=layer,
            sample_rate=8,
        )
        assert loaded.is_tts and loaded.describe()["family"] == "toy-noise"
        first = inference.synthesize(loaded, "hello", seed=7)
        again = inference.synthesize(loaded, "hello", seed=7)
        other = inference.synthesize(loaded, "hello", seed=8)
        assert first.sample_rate == 8 and first.samples.shape == (5,)
        assert np.array_equal(first.samples, again.samples)
        assert not np.array_equal(first.samples, other.samples)
        with pytest.raises(ValueError, match="use synthesize"):
            inference.predict(loaded, [1.0])
    finally:
        unregister("toy-noise")


class BatchingToyAdapter(ToyAdapter):
    """The toy, batching: concurrent predicts run as one forward over all their numbers."""

    batching = BatchSupport(predict=True)
    forwards: list[int] = []  # items per forward, recorded by the batch function

    def predict_batch(self, loaded, inputs, params) -> BatchPlan:
        import torch

        if not isinstance(inputs, list) or not inputs:
            raise ValueError("inputs must be a non-empty list of numbers")

        def run(payloads):
            flat = [x for numbers in payloads for x in numbers]
            BatchingToyAdapter.forwards.append(len(flat))
            with loaded.lock:
                column = loaded.model(torch.tensor(flat, dtype=torch.float32).unsqueeze(-1))
            out, start = [], 0
            for numbers in payloads:
                out.append({"outputs": column[start : start + len(numbers), 0].tolist()})
                start += len(numbers)
            return out

        return BatchPlan(("toy",), len(inputs), list(inputs), run)


def test_a_registered_family_batches_through_its_own_plan(make_server, tmp_path):
    """A family outside modelhost batches by declaring it and giving its batch plan: 12
    concurrent predicts queued behind a held model lock run in fewer forwards than
    requests, and each caller gets exactly its own numbers doubled."""
    import threading

    register(BatchingToyAdapter())
    BatchingToyAdapter.forwards.clear()
    try:
        root = tmp_path / "imports"
        write_toy_model(root / "toy", factor=2.0)
        server = make_server([], import_roots=(root,), device="cpu")
        body = {"source": "local", "model_id": str(root / "toy"), "name": "toy"}
        job = server.client.post("/models/download", json=body).json()
        assert server.wait_for(job["download_id"], timeout=60)["status"] == "completed"
        loaded = server.server.config.app.state.services.runtime.get("toy")
        answers: dict[int, list[float]] = {}

        def ask(i: int) -> None:
            answer = httpx.post(
                f"{server.base_url}/models/toy/predict", json={"inputs": [i, i + 0.5]}, timeout=60
            )
            answers[i] = answer.json()["outputs"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        with loaded.lock:  # the worker blocks in its first forward; the rest queue
            for thread in threads:
                thread.start()
            time.sleep(0.5)
        for thread in threads:
            thread.join(timeout=60)
        assert answers == {i: [2.0 * i, 2.0 * i + 1.0] for i in range(12)}
        # The worker takes what has queued when it wakes, then blocks on the held lock: so
        # at most two calls ran (what it took first, alone or batched, then the rest, batched
        # by the family's own function), never one per request.
        forwards = BatchingToyAdapter.forwards
        managed = server.client.get("/models/managed").json()["downloaded_models"]
        row = next(m for m in managed if m["name"] == "toy")
        alone = row["batches_run"] - len(forwards)  # requests the plain predict ran
        assert forwards and all(n % 2 == 0 for n in forwards), forwards
        assert row["items_run"] == sum(forwards) + 2 * alone == 24
        assert row["batches_run"] <= 2 and row["largest_batch"] == max(forwards) >= 12
    finally:
        unregister("toy-doubler")
