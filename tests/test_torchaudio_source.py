"""The torchaudio source: a Tacotron2 bundle's weight files from a mirror, installed as one
model, loaded by torchaudio's own getters and spoken through /synthesize.

The bundles under test are tiny Tacotron2 + WaveRNN (and Griffin-Lim) models built with
torchaudio's classes (tests/tiny_models.py) and registered in ``torchaudio.pipelines`` beside
its own bundles, as a site's own bundle would be; random weights, so the speech is noise, but
every step is real.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys

import numpy as np
import pytest
import torch
from conftest import need_module
from fileserver import Status

from modelhost.runtime.wav import parse_wav

torchaudio = need_module("torchaudio", "pip install 'modelhost[audio]'")
from tiny_models import (  # noqa: E402
    TACOTRON2_PARAMS,
    WAVERNN_PARAMS,
    tacotron2_bundle,
    tacotron2_files,
)
from torchaudio.models import Tacotron2, WaveRNN  # noqa: E402
from torchaudio.pipelines._tts.impl import _WaveRNNVocoder  # noqa: E402

TACOTRON2_FILE = "mh_tiny_tacotron2_char.pth"
WAVERNN_FILE = "mh_tiny_wavernn_8bits.pth"

FILES = tacotron2_files(TACOTRON2_FILE, WAVERNN_FILE)
WAVERNN_BUNDLE = "MH_TINY_TACOTRON2_WAVERNN_CHAR"
GRIFFINLIM_BUNDLE = "MH_TINY_TACOTRON2_GRIFFINLIM_CHAR"
setattr(torchaudio.pipelines, WAVERNN_BUNDLE, tacotron2_bundle(TACOTRON2_FILE, WAVERNN_FILE))
setattr(torchaudio.pipelines, GRIFFINLIM_BUNDLE, tacotron2_bundle(TACOTRON2_FILE, None))


@pytest.fixture
def mirror(fileserver):
    for name, data in FILES.items():
        fileserver.add(f"/audio/{name}", data)
    return fileserver


@pytest.fixture
def server(make_server, mirror):
    return make_server([], torchaudio_mirror=mirror.url("/audio"), device="cpu")


def post(server, model_id: str, name: str = "taco", **extra):
    body = {"source": "torchaudio", "model_id": model_id, "name": name, "allow_pickle": True}
    return server.client.post("/models/download", json={**body, **extra})


def install(server, model_id: str, name: str = "taco") -> dict:
    answer = post(server, model_id, name)
    assert answer.status_code == 202, answer.text
    status = server.wait_for(answer.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status
    return status


def reference_speech(bundle_name: str, text: str, seed: int) -> np.ndarray:
    """The same synthesis done directly with torchaudio, from the served bytes."""
    bundle = getattr(torchaudio.pipelines, bundle_name)
    tacotron2 = Tacotron2(**TACOTRON2_PARAMS)
    tacotron2.load_state_dict(torch.load(io.BytesIO(FILES[TACOTRON2_FILE]), weights_only=True))
    tacotron2.eval()
    if bundle_name == WAVERNN_BUNDLE:
        wavernn = WaveRNN(**WAVERNN_PARAMS)
        wavernn.load_state_dict(torch.load(io.BytesIO(FILES[WAVERNN_FILE]), weights_only=True))
        vocoder = _WaveRNNVocoder(wavernn.eval())
    else:
        vocoder = bundle.get_vocoder()
    tokens, lengths = bundle.get_text_processor()(text)
    with torch.inference_mode():
        torch.manual_seed(seed)
        spectrogram, frames, _ = tacotron2.infer(tokens, lengths)
        waveform, _ = vocoder(spectrogram, frames)
    return waveform[0].numpy()


@pytest.mark.parametrize("bundle_name", [WAVERNN_BUNDLE, GRIFFINLIM_BUNDLE])
def test_bundle_installs_loads_and_speaks_what_torchaudio_would(server, mirror, bundle_name):
    answer = post(server, bundle_name)
    assert answer.status_code == 202, answer.text
    info = answer.json()["download_info"]
    wanted = [TACOTRON2_FILE, WAVERNN_FILE] if bundle_name == WAVERNN_BUNDLE else [TACOTRON2_FILE]
    assert sorted(info["files"]) == sorted(wanted)
    assert info["vocoder_models"] == wanted[1:] and info["vocoder_included"] is (len(wanted) > 1)
    status = server.wait_for(answer.json()["download_id"], timeout=120)
    assert status["status"] == "completed" and status["message"].endswith("loaded on cpu")

    manifest = server.client.get("/models/download/taco/info").json()
    # Under the default pickle policy (convert) the verified .pth files become safetensors.
    originals = {c["original_path"]: c["original_sha256"] for c in manifest["conversions"]}
    assert originals == {name: hashlib.sha256(FILES[name]).hexdigest() for name in wanted}
    assert sorted(f["path"] for f in manifest["files"]) == sorted(
        name.replace(".pth", ".safetensors") for name in wanted
    )
    assert mirror.count("GET", f"/audio/{TACOTRON2_FILE}") == 1

    text = "Hello, world!"
    response = server.client.post(
        "/synthesize",
        json={"model_name": "taco", "text": text, "seed": 7},
        headers={"accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sample_rate"] == 22050  # the bundle's vocoder rate
    audio = parse_wav(base64.b64decode(body["audio_base64"]))
    expected = reference_speech(bundle_name, text, seed=7)
    assert audio.sample_rate == 22050 and len(audio.samples) == len(expected) > 0
    # Same samples up to 16-bit rounding and float summation order (another seed is ~0.1 off).
    assert np.abs(audio.samples - np.clip(expected, -1, 1)).max() < 2e-4

    wav = server.client.post("/synthesize", json={"model_name": "taco", "text": text})
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    assert wav.content[:4] == b"RIFF" and parse_wav(wav.content).sample_rate == 22050

    refused = server.client.post(
        "/synthesize", json={"model_name": "taco", "text": "hi", "speaker": 1}
    )
    assert refused.status_code == 400 and "single speaker" in refused.json()["message"]
    nothing = server.client.post("/synthesize", json={"model_name": "taco", "text": "123 %%"})
    assert nothing.status_code == 400 and "no characters" in nothing.json()["message"]
    optimize = server.client.post("/models/manage?action=optimize&model_name=taco")
    assert optimize.status_code == 400
    assert "no representative input for tacotron2" in optimize.json()["message"]


def test_bundle_is_all_or_nothing_when_the_vocoder_file_fails(make_server, mirror):
    # One file at a time, in the plan's order: the Tacotron2 file surely arrives before the
    # vocoder's 404 (in parallel, the 404 may cancel it before its GET is sent).
    server = make_server(
        [], torchaudio_mirror=mirror.url("/audio"), device="cpu", fetch_parallel_files=1
    )
    mirror.set_faults(f"/audio/{WAVERNN_FILE}", [Status(404, times=99)])  # HEAD still answers
    answer = post(server, WAVERNN_BUNDLE)
    assert answer.status_code == 202, answer.text
    status = server.wait_for(answer.json()["download_id"], timeout=60)
    assert status["status"] == "failed" and "404" in status["message"], status
    assert mirror.count("GET", f"/audio/{TACOTRON2_FILE}") == 1  # the other file did arrive
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert not (server.settings.home / "models" / "taco").exists()


@pytest.mark.parametrize(
    "model_id, extra, status, fragment",
    [
        (WAVERNN_BUNDLE, {"vocoder_model": "microsoft/speecht5_hifigan"}, 400, "own vocoder"),
        ("TACOTRON2_WAVERNN_PHONE_LJSPEECH", {}, 400, "deep-phonemizer"),
        ("TACOTRON2_WAVERNN_CHAR_LJSPEEC", {}, 404, "close: TACOTRON2_WAVERNN_CHAR_LJSPEECH"),
        ("WAV2VEC2_ASR_BASE_960H", {}, 400, "not a text-to-speech bundle"),
        ("tacotron2", {}, 400, "in capitals"),
    ],
)
def test_bad_bundles_are_refused_and_change_nothing(server, mirror, model_id, extra, status,
                                                    fragment):  # fmt: skip
    response = post(server, model_id, **extra)
    assert response.status_code == status, response.text
    assert fragment in response.json()["message"]
    assert response.json()["success"] is False
    assert server.client.get("/models/managed").json()["total_models"] == 0
    assert not [r for r in mirror.requests if r.method == "GET"]


@pytest.mark.parametrize(
    "policy, extra, fragment",
    [("allow", {"allow_pickle": False}, "allow_pickle"), ("refuse", {}, "=refuse")],
)
def test_pickle_policies_allow_and_refuse(make_server, mirror, policy, extra, fragment):
    server = make_server(
        [], torchaudio_mirror=mirror.url("/audio"), device="cpu", pickle_policy=policy
    )
    response = post(server, WAVERNN_BUNDLE, **extra)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["message"] and response.json()["success"] is False
    assert not [r for r in mirror.requests if r.method == "GET"]


def test_without_torchaudio_the_download_names_the_extra(server, mirror, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # import torchaudio -> ImportError
    response = post(server, WAVERNN_BUNDLE)
    assert response.status_code == 424
    assert response.json()["error"] == "Missing Python package"
    assert "needs the Python module torchaudio" in response.json()["message"]
    assert "pip install torchaudio (the release built for your torch" in response.json()["message"]
    assert "pip install 'modelhost[audio]'" in response.json()["message"]
    assert not mirror.requests
