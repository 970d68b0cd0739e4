"""One request cannot take the server down: every inference path refuses, up front and with
a 413 naming the limit, a text longer than MODELHOST_MAX_INPUT_CHARS or than the model takes
in one forward, and says where long texts go (/v1/audio/speech, speech jobs).

Before: a 5,000-character /synthesize to the tiny VITS grew the server past 24 GB until the
kernel killed it (VITS's alignment grows with the square of the text). Models: the tiny VITS
and the tiny BERT (tests/tiny_models.py), imported with the local source.
"""

from __future__ import annotations

import pytest
from tiny_models import build_bark, build_bert, build_vits

WORDS = "hello there my friend how are you today "


def text_of(chars: int) -> str:
    """Words without a sentence boundary, ``chars`` characters long."""
    return (WORDS * (chars // len(WORDS) + 1))[:chars]


def install(server, root, name: str, **extra) -> None:
    body = {"source": "local", "model_id": str(root / name), "name": name, **extra}
    started = server.client.post("/models/download", json=body)
    assert started.status_code == 202, started.text
    assert server.wait_for(started.json()["download_id"], timeout=120)["status"] == "completed"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits-imports")
    build_vits(root / "vits")
    build_bert(root / "bert")
    return root


@pytest.fixture
def vits_server(make_server, roots):
    """The default limits, the tiny VITS installed and loaded."""
    server = make_server([], import_roots=(roots,), device="cpu")
    install(server, roots, "vits")
    return server


@pytest.fixture
def small_limit_server(make_server, roots):
    """MODELHOST_MAX_INPUT_CHARS=50; the tiny BERT as a classifier and as an embedder."""
    server = make_server([], import_roots=(roots,), device="cpu", max_input_chars=50)
    install(server, roots, "bert")
    body = {"source": "local", "model_id": str(roots / "bert"), "name": "bert-embed"}
    started = server.client.post("/models/download", json={**body, "task": "feature-extraction"})
    assert server.wait_for(started.json()["download_id"], timeout=120)["status"] == "completed"
    return server


def assert_too_long(response, *phrases: str) -> None:
    assert response.status_code == 413, (response.status_code, response.text[:300])
    message = response.json().get("message") or response.json()["error"]["message"]
    for phrase in phrases:
        assert phrase in message, message


def test_synthesize_beyond_the_setting_is_refused_before_any_model_runs(vits_server) -> None:
    answer = vits_server.client.post(
        "/synthesize", json={"model_name": "vits", "text": text_of(5000)}
    )
    assert_too_long(answer, "4,096", "MODELHOST_MAX_INPUT_CHARS", "/v1/audio/speech")
    assert vits_server.client.get("/health").status_code == 200


def test_synthesize_beyond_what_vits_takes_in_one_forward_is_refused(vits_server) -> None:
    # 1,500 characters are within the setting, but 3,001 tokens (VITS adds a blank between
    # characters) are past VITS_MAX_TOKENS: refused before the forward, not run.
    answer = vits_server.client.post(
        "/synthesize", json={"model_name": "vits", "text": text_of(1500)}
    )
    assert_too_long(answer, "3,001 tokens", "VITS speaks at most 2,048", "/v1/audio/speech")


def test_the_same_long_text_is_spoken_by_the_speech_endpoint(vits_server) -> None:
    # No sentence boundary at all: the splitter cuts it at spaces into pieces VITS takes.
    body = {"model": "vits", "input": text_of(1500), "voice": "alloy", "response_format": "pcm"}
    answer = vits_server.client.post("/v1/audio/speech", json=body)
    assert answer.status_code == 200, answer.text
    assert len(answer.content) > 0


def test_every_text_path_takes_the_setting(small_limit_server) -> None:
    client = small_limit_server.client
    long = text_of(51)
    assert client.post("/models/bert/predict", json={"inputs": text_of(50)}).status_code == 200
    assert_too_long(client.post("/models/bert/predict", json={"inputs": long}), "at most 50")
    listed = client.post("/models/bert/predict", json={"inputs": ["short", long]})
    assert_too_long(listed, "inputs[1]", "at most 50")
    embed = client.post("/v1/embeddings", json={"model": "bert-embed", "input": ["ok", long]})
    assert_too_long(embed, "input[1]", "at most 50")
    assert embed.json()["error"]["param"] == "input"
    speak = client.post("/synthesize", json={"model_name": "absent", "text": long})
    assert_too_long(speak, "at most 50")  # refused before the model is even looked up
    wav = b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80>\x00\x00\x00}"
    wav += b"\x00\x00\x02\x00\x10\x00data\x00\x00\x00\x00"
    heard = client.post(
        "/v1/audio/transcriptions",
        data={"model": "absent", "prompt": long},
        files={"file": ("a.wav", wav, "audio/wav")},
    )
    assert_too_long(heard, "prompt", "at most 50")
    assert heard.json()["error"]["param"] == "prompt"


def test_bark_refuses_what_its_processor_would_cut(make_server, roots) -> None:
    # BarkProcessor cuts at 256 tokens without a word: the speech would stop mid-text.
    build_bark(roots / "bark")
    server = make_server([], import_roots=(roots,), device="cpu")
    install(server, roots, "bark")
    answer = server.client.post("/synthesize", json={"model_name": "bark", "text": text_of(2000)})
    assert_too_long(answer, "Bark speaks at most 256", "/v1/audio/speech")
