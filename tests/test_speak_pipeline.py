"""auto_convert_tts with speak_with: a text model's generated text spoken by an installed TTS
model — a real two-model pipeline, never the text model's output called audio."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from hubserver import HubServer

from modelhost.runtime.wav import parse_wav

LETTERS_REPO = "test-org/tiny-bart-letters"


def letter_writing_bart(source: Path, target: Path) -> Path:
    """The tiny BART with its output bias pushed to the letter "a": greedy decoding then
    writes speakable text ("aaaa..."), so the pipeline's second model has something to say."""
    from transformers import BartForConditionalGeneration, BartTokenizer

    tokenizer = BartTokenizer.from_pretrained(source)
    model = BartForConditionalGeneration.from_pretrained(source)
    with torch.no_grad():
        model.final_logits_bias[0, tokenizer.convert_tokens_to_ids("a")] = 50.0
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture
def server(make_server, tiny_models, tmp_path):
    with HubServer() as hub:
        hub.add_repo("facebook/mms-tts-eng", tiny_models["vits"])
        hub.add_repo("test-org/tiny-bert", tiny_models["bert"])
        hub.add_repo(LETTERS_REPO, letter_writing_bart(tiny_models["bart"], tmp_path / "letters"))
        yield make_server(
            [], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "none", device="cpu"
        )


def install(server, model_id: str, name: str, **extra) -> dict:
    body = {"source": "huggingface", "model_id": model_id, "name": name, **extra}
    answer = server.client.post("/models/download", json=body)
    assert answer.status_code == 202, answer.text
    status = server.wait_for(answer.json()["download_id"], timeout=120)
    assert status["status"] == "completed" and status["message"].endswith("loaded on cpu")
    return answer.json()


def synthesize_json(server, name: str, **body) -> dict:
    response = server.client.post(
        "/synthesize",
        json={"model_name": name, **body},
        headers={"accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_text_model_output_is_spoken_by_the_named_tts_model(server):
    install(server, "facebook/mms-tts-eng", "voice", task="text-to-speech")
    answer = install(
        server,
        LETTERS_REPO,
        "writer",
        task="text2text-generation",
        auto_convert_tts=True,
        speak_with="voice",
    )
    assert "has no speech head" in answer["message"]
    assert "speak that text with 'voice'" in answer["message"]

    spoken = synthesize_json(server, "writer", text="hello there", max_new_tokens=6, seed=3)
    written = server.client.post(
        "/models/writer/predict",
        json={"inputs": "hello there", "parameters": {"max_new_tokens": 6}},
    ).json()["generated_text"]
    assert spoken["generated_text"] == written.strip() and set(written.strip()) == {"a"}
    assert spoken["spoken_by"] == "voice"
    direct = synthesize_json(server, "voice", text=written.strip(), seed=3)
    assert spoken["audio_base64"] == direct["audio_base64"]  # the TTS model said exactly that
    audio = parse_wav(base64.b64decode(spoken["audio_base64"]))
    assert audio.sample_rate == 16_000 and len(audio.samples) > 0

    assert server.client.delete("/models/download/voice").status_code == 200
    orphan = server.client.post("/synthesize", json={"model_name": "writer", "text": "hi"})
    assert orphan.status_code == 409 and "'voice', which is no longer" in orphan.json()["message"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"speak_with": "voice"}, "speak_with goes with auto_convert_tts"),
        ({"auto_convert_tts": True, "speak_with": "nobody"}, "'nobody', which is not installed"),
        ({"auto_convert_tts": True, "speak_with": "bert"}, "not a text-to-speech model"),
        ({"auto_convert_tts": True, "speak_with": "writer"}, "must name another model"),
    ],
)
def test_bad_speak_with_is_refused_and_changes_nothing(server, extra, fragment):
    install(server, "test-org/tiny-bert", "bert", task="text-classification")
    body = {"source": "huggingface", "model_id": LETTERS_REPO, "name": "writer", **extra}
    response = server.client.post("/models/download", json=body)
    assert response.status_code == 400 and fragment in response.json()["message"]
    assert server.client.get("/models/download/writer/info").status_code == 404


def test_speak_with_on_another_source_is_refused_not_ignored(server):
    install(server, "facebook/mms-tts-eng", "voice", task="text-to-speech")
    body = {"source": "url", "model_id": "http://127.0.0.1:9/w.safetensors", "name": "w",
            "auto_convert_tts": True, "speak_with": "voice"}  # fmt: skip
    response = server.client.post("/models/download", json=body)
    assert response.status_code == 400 and "huggingface source" in response.json()["message"]
    assert server.client.get("/models/download/w/info").status_code == 404


def test_a_speaking_model_takes_no_speak_with_and_a_plain_text_model_says_how(server):
    install(server, "facebook/mms-tts-eng", "voice", task="text-to-speech")
    refused = server.client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": "facebook/mms-tts-eng", "name": "voice2",
              "auto_convert_tts": True, "speak_with": "voice"},
    )  # fmt: skip
    assert refused.status_code == 400 and "speaks by itself" in refused.json()["message"]
    install(server, "test-org/tiny-bert", "bert", task="text-classification")
    plain = server.client.post("/synthesize", json={"model_name": "bert", "text": "hi"})
    assert plain.status_code == 400 and '"speak_with"' in plain.json()["message"]
