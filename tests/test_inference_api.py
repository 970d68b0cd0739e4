"""Loaded models over HTTP: install (which loads), managed figures, /synthesize, predict,
optimize, the budget, unload and delete — real tiny models from the test Hub."""

from __future__ import annotations

import base64
import io
import json
import threading
import wave

import pytest
from hubserver import HubServer
from tiny_models import HUB_REPOS, MINILM_REPO, minilm_dir, publish_all

MINILM = MINILM_REPO
REPOS = HUB_REPOS


@pytest.fixture(scope="module")
def hub(tiny_models):
    with HubServer() as server:
        publish_all(server, tiny_models)
        yield server


@pytest.fixture
def modelhost(make_server, hub, tmp_path):
    def start(**overrides):
        values = {
            "hf_endpoint": hub.base_url,
            "hf_hub_cache": tmp_path / "no-hf-cache",
            "device": "cpu",
        }
        values.update(overrides)
        return make_server([], **values)

    return start


def install(server, repo_id: str, name: str, **extra) -> dict:
    response = server.client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": repo_id, "name": name, **extra},
    )
    assert response.status_code == 202, response.text
    status = server.wait_for(response.json()["download_id"], timeout=180)
    assert status["status"] == "completed", status
    return status


def tensor_bytes(model) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def parse_wav(data: bytes) -> tuple[int, int, bytes]:
    with wave.open(io.BytesIO(data)) as reader:
        assert reader.getsampwidth() == 2 and reader.getnchannels() == 1
        return reader.getframerate(), reader.getnframes(), reader.readframes(reader.getnframes())


def test_download_loads_and_managed_reports_measured_figures(modelhost, tiny_models):
    import transformers

    server = modelhost()
    status = install(server, "test-org/tiny-bert", "bert", task="text-classification")
    assert status["message"].endswith("loaded on cpu"), status["message"]

    managed = server.client.get("/models/managed").json()
    reference = transformers.BertForSequenceClassification.from_pretrained(tiny_models["bert"])
    row = managed["downloaded_models"][0]
    assert (row["name"], row["device"], row["loaded"], row["is_tts"]) == (
        "bert",
        "cpu",
        True,
        False,
    )
    assert row["parameters"] == sum(p.numel() for p in reference.parameters())
    assert row["memory_usage"]["allocated_mb"] == round(tensor_bytes(reference) / 1e6, 3)
    assert managed["summary"]["total_parameters"] == row["parameters"]
    assert managed["categories"]["other_models"] == [
        {"name": "bert", "loaded": True, "is_tts": False}
    ]

    prediction = server.client.post("/models/bert/predict", json={"inputs": "hello world"})
    assert prediction.status_code == 200, prediction.text
    labels = prediction.json()["predictions"]
    assert {p["label"] for p in labels} == set(reference.config.id2label.values())
    assert abs(sum(p["score"] for p in labels) - 1) < 1e-5
    assert labels == sorted(labels, key=lambda p: -p["score"])


@pytest.mark.parametrize(
    "repo_id, extra, rate_of",
    [
        ("microsoft/speecht5_tts", {"include_vocoder": True}, lambda d: 16000),
        (
            "facebook/mms-tts-eng",
            {},
            lambda d: json.loads((d / "config.json").read_text())["sampling_rate"],
        ),
        ("suno/bark-small", {}, lambda d: 24000),
    ],
)
def test_synthesize_returns_real_wav(modelhost, tiny_models, repo_id, extra, rate_of):
    server = modelhost()
    # Named as in the packaged models.json, so GET /models reports it as a loaded audio model.
    name = {"microsoft/speecht5_tts": "speecht5_tts", "suno/bark-small": "bark_tts"}.get(
        repo_id, "mms-tts-eng"
    )
    install(server, repo_id, name, task="text-to-speech", **extra)
    loaded_audio = server.client.get("/models").json()["audio_models"]["loaded_audio_models"]
    assert loaded_audio == ([] if name == "mms-tts-eng" else [name])
    request = {"model_name": name, "text": "hello there", "max_new_tokens": 8, "seed": 1}
    response = server.client.post("/synthesize", json=request)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    rate, frames, pcm = parse_wav(response.content)
    assert rate == rate_of(tiny_models[REPOS[repo_id]])
    assert frames > 0 and any(pcm)

    as_json = server.client.post(
        "/synthesize", json=request, headers={"Accept": "application/json"}
    ).json()
    assert as_json["sample_rate"] == rate
    decoded_rate, decoded_frames, _ = parse_wav(base64.b64decode(as_json["audio_base64"]))
    assert decoded_rate == rate
    assert as_json["duration"] == pytest.approx(decoded_frames / rate, abs=1e-3)


def test_minilm_embeddings_equal_direct_computation(modelhost):
    from sentence_transformers import SentenceTransformer

    server = modelhost()
    install(server, MINILM, "minilm", task="feature-extraction")
    sentences = ["a model server", "that tells the truth"]
    answer = server.client.post("/models/minilm/predict", json={"inputs": sentences}).json()
    direct = SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences)
    assert answer["dimension"] == 384
    assert abs(direct - answer["embeddings"]).max() < 1e-5


def test_concurrent_predictions_are_consistent(modelhost):
    server = modelhost()
    install(server, MINILM, "minilm", task="feature-extraction")
    texts = [f"sentence number {i}" for i in range(8)]
    sequential = {
        t: server.client.post("/models/minilm/predict", json={"inputs": t}).json()["embeddings"]
        for t in texts
    }
    results: dict[str, list] = {}

    def ask(text: str) -> None:
        import httpx

        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            results[text] = client.post("/models/minilm/predict", json={"inputs": text}).json()[
                "embeddings"
            ]

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    import numpy as np

    for text in texts:
        assert np.abs(np.array(results[text]) - np.array(sequential[text])).max() < 1e-6


def test_optimize_on_cpu_reports_measurements(modelhost):
    server = modelhost()
    install(server, MINILM, "minilm", task="feature-extraction")
    answer = server.client.post(
        "/models/manage", params={"action": "optimize", "model_name": "minilm"}
    ).json()
    assert answer["latency_ms_before"] > 0 and answer["latency_ms_after"] > 0
    assert answer["memory_mb_before"] > 0
    managed = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert managed["optimized"] is answer["applied"] is answer["success"]
    if not answer["applied"]:
        assert "left unchanged" in answer["message"] or "differ" in answer["message"]


def test_budget_unloads_least_recently_used(modelhost):
    server = modelhost(max_loaded=2)
    for repo_id, name in [("test-org/tiny-bert", "bert"), ("test-org/tiny-bart", "bart")]:
        install(server, repo_id, name)
    touched = server.client.post("/models/bert/predict", json={"inputs": "touch bert"})
    assert touched.status_code == 200, touched.text  # bart is now the least recently used
    install(server, "test-org/tiny-whisper", "whisper", task="automatic-speech-recognition")
    loaded = {
        row["name"] for row in server.client.get("/models/managed").json()["downloaded_models"]
    }
    assert loaded == {"bert", "whisper"}
    # Used again, bart loads on demand, and the budget unloads the least recently used: bert.
    again = server.client.post("/models/bart/predict", json={"inputs": "x"})
    assert again.status_code == 200, again.text
    rows = {
        row["name"]: row for row in server.client.get("/models/managed").json()["downloaded_models"]
    }
    assert set(rows) == {"bart", "whisper"} and rows["bart"]["load_count"] == 2


def test_load_unload_and_delete(modelhost):
    server = modelhost(load_on_demand=False)
    install(server, "test-org/tiny-bert", "bert", load=False)
    assert server.client.get("/models/managed").json()["total_models"] == 0
    not_loaded = server.client.post("/models/bert/predict", json={"inputs": "x"})
    assert not_loaded.status_code == 409
    assert "modelhost load bert" in not_loaded.json()["message"]

    loaded = server.client.post("/models/bert/load", json={"pin": True})
    assert loaded.status_code == 200 and loaded.json()["pinned"] is True
    assert server.client.get("/models").json()["audio_models"]["loaded_audio_models"] == []
    unloaded = server.client.post("/models/bert/unload").json()
    assert unloaded["freed_mb"] > 0
    assert server.client.post("/models/bert/unload").status_code == 409

    server.client.post("/models/bert/load")
    deleted = server.client.delete("/models/download/bert").json()
    assert deleted["unloaded"]["name"] == "bert"
    assert server.client.get("/models/managed").json()["total_models"] == 0
    assert server.client.post("/models/bert/load").status_code == 404


def test_load_on_demand(modelhost):
    server = modelhost()  # MODELHOST_LOAD_ON_DEMAND is on by default
    install(server, "test-org/tiny-bert", "bert", load=False)
    answer = server.client.post("/models/bert/predict", json={"inputs": "x"})
    assert answer.status_code == 200 and answer.json()["predictions"]
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert (row["name"], row["load_count"]) == ("bert", 1)


def test_synthesize_refuses_a_text_model(modelhost):
    server = modelhost()
    install(server, "test-org/tiny-bert", "bert")
    response = server.client.post("/synthesize", json={"model_name": "bert", "text": "hi"})
    assert response.status_code == 400
    assert "not a text-to-speech model" in response.json()["message"]


def test_torchscript_file_from_the_url_source(make_server, fileserver, tmp_path):
    import torch

    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()))
    archive = tmp_path / "tiny.pt"
    torch.jit.save(module, str(archive))
    fileserver.add("/tiny.pt", archive.read_bytes())
    server = make_server([fileserver.host_port], device="cpu")
    request = {
        "source": "url",
        "model_id": fileserver.url("/tiny.pt"),
        "name": "ts",
        "load_as": "torchscript",
    }
    refused = server.client.post("/models/download", json=request)
    assert refused.status_code == 400 and "allow_pickle" in refused.json()["message"]

    job = server.client.post("/models/download", json={**request, "allow_pickle": True}).json()
    status = server.wait_for(job["download_id"])
    assert status["status"] == "completed" and status["message"].endswith("loaded on cpu")
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert row["parameters"] == 4 * 3 + 3
    assert row["memory_usage"]["allocated_mb"] == round(15 * 4 / 1e6, 3)

    inputs = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    answer = server.client.post("/models/ts/predict", json={"inputs": inputs}).json()
    expected = module(torch.tensor(inputs)).tolist()
    assert answer["shape"] == [2, 3]
    assert (
        max(
            abs(a - b)
            for ra, rb in zip(answer["outputs"], expected, strict=True)
            for a, b in zip(ra, rb, strict=True)
        )
        < 1e-6
    )
    wrong = server.client.post("/models/ts/predict", json={"inputs": [[1.0, 2.0]]})
    assert wrong.status_code == 400 and "shape [1, 2]" in wrong.json()["message"]


def test_torchvision_state_dict_from_the_url_source(make_server, fileserver, tmp_path):
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = torchvision.models.get_model("mobilenet_v3_small", weights=None).eval()
    save_file(reference.state_dict(), str(tmp_path / "mnv3.safetensors"))
    fileserver.add("/mnv3.safetensors", (tmp_path / "mnv3.safetensors").read_bytes())
    server = make_server([fileserver.host_port], device="cpu")
    job = server.client.post(
        "/models/download",
        json={
            "source": "url",
            "model_id": fileserver.url("/mnv3.safetensors"),
            "name": "mnv3",
            "load_as": "torchvision:mobilenet_v3_small",
        },
    ).json()
    status = server.wait_for(job["download_id"])
    assert status["message"].endswith("loaded on cpu"), status
    row = server.client.get("/models/managed").json()["downloaded_models"][0]
    assert row["parameters"] == sum(p.numel() for p in reference.parameters())

    pixels = torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(1))
    answer = server.client.post(
        "/models/mnv3/predict",
        json={"inputs": {"pixels": pixels.tolist()}, "parameters": {"top_k": 3}},
    ).json()
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    batch = weights.transforms()(pixels.to(torch.uint8).permute(2, 0, 1)).unsqueeze(0)
    with torch.no_grad():
        probs = reference(batch).softmax(-1)[0]
    top = torch.argsort(probs, descending=True)[:3].tolist()
    assert [p["class_id"] for p in answer["predictions"]] == top
    assert [p["label"] for p in answer["predictions"]] == [
        weights.meta["categories"][i] for i in top
    ]
    assert answer["predictions"][0]["score"] == pytest.approx(float(probs[top[0]]), abs=1e-5)


def test_state_dict_that_does_not_fit_is_installed_and_fails_the_job(
    make_server, fileserver, tmp_path
):
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "odd.safetensors"))
    fileserver.add("/odd.safetensors", (tmp_path / "odd.safetensors").read_bytes())
    server = make_server([fileserver.host_port], device="cpu")
    job = server.client.post(
        "/models/download",
        json={
            "source": "url",
            "model_id": fileserver.url("/odd.safetensors"),
            "name": "odd",
            "load_as": "torchvision:resnet18",
        },
    ).json()
    status = server.wait_for(job["download_id"])
    assert status["status"] == "failed"
    assert status["message"].startswith("Model 'odd' installed, but loading failed: ")
    assert status["message"].endswith("; retry with: modelhost load odd")
    assert "does not fit torchvision's resnet18" in status["message"]
    assert status["error"] == "Unsupported model"
    assert server.client.get("/models/download/odd/info").status_code == 200  # still installed
    assert server.client.get("/models/managed").json()["total_models"] == 0
