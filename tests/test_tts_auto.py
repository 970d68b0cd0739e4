"""tts_auto: names resolved through the catalog to concrete plans, installed as one model."""

from __future__ import annotations

import pytest
from hubserver import HubServer
from tiny_models import publish_all

from modelhost.catalog import load_catalog
from modelhost.errors import InvalidRequest, ModelNotFound
from modelhost.sources.tts_auto import resolve


@pytest.mark.parametrize(
    "spelling, entry",
    [
        ("speecht5", "speecht5_tts"),
        ("microsoft/speecht5_tts", "speecht5_tts"),
        ("SpeechT5_TTS", "speecht5_tts"),
        ("bark", "bark_tts"),
        ("suno/bark", "bark_tts"),
        ("bark-small", "bark_small_tts"),
        ("mms-tts-eng", "mms_tts_eng"),
        ("tacotron2", "tacotron2_tts"),
        ("vall-e-x", "vall_e_x"),
    ],
)
def test_names_resolve_to_catalog_entries(spelling, entry):
    assert resolve(spelling).name == entry


def test_every_catalog_tts_entry_resolves_by_its_name_and_id():
    for entry in load_catalog().models:
        if entry.task == "text-to-speech":
            assert resolve(entry.name) == entry
            assert resolve(entry.model_id) == entry


def test_unknown_and_speechless_names():
    with pytest.raises(ModelNotFound, match="close matches: speecht5"):
        resolve("speech5")
    with pytest.raises(InvalidRequest, match="no speech head"):
        resolve("facebook/bart-large")


@pytest.fixture
def hub(tiny_models):
    with HubServer() as server:
        publish_all(server, tiny_models)
        server.add_repo(
            "Plachta/VALL-E-X",
            {"vallex-checkpoint.pt": b"\x80\x02" + b"\0" * 62, "README.md": b"its own code"},
        )
        yield server


@pytest.fixture
def server(make_server, hub, tmp_path):
    return make_server([], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "none", device="cpu")


def post(server, model_id: str, name: str, **extra):
    return server.client.post(
        "/models/download", json={"source": "tts_auto", "model_id": model_id, "name": name, **extra}
    )


def test_speecht5_installs_with_its_vocoder_and_speaks(server, hub):
    answer = post(server, "speecht5", "voice")
    assert answer.status_code == 202, answer.text
    info = answer.json()["download_info"]
    assert info["vocoder_models"] == ["microsoft/speecht5_hifigan"] and info["model_type"] == "tts"
    status = server.wait_for(answer.json()["download_id"], timeout=120)
    assert status["status"] == "completed" and status["message"].endswith("loaded on cpu")
    manifest = server.client.get("/models/download/voice/info").json()
    assert (manifest["source"], manifest["model_id"]) == ("huggingface", "microsoft/speecht5_tts")
    options = manifest["spec"]["options"]
    assert (options["source"], options["model_id"]) == ("tts_auto", "speecht5")
    audio = server.client.post("/synthesize", json={"model_name": "voice", "text": "hi"})
    assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
    again = post(server, "speecht5", "voice")
    assert again.status_code == 200 and again.json()["status"] == "already_exists"


def test_large_variant_is_chosen_or_reported_ignored(server):
    larger = post(server, "bark-small", "bark", enable_large_model=True)
    # The test Hub has no suno/bark: the failure proves the large variant was planned.
    assert larger.status_code == 404 and "suno/bark not found" in larger.json()["message"]
    same = post(server, "mms-tts-eng", "mms", enable_large_model=True)
    assert same.status_code == 202
    assert "enable_large_model ignored" in same.json()["message"]


@pytest.mark.parametrize(
    "source, model_id", [("tts_auto", "vall-e-x"), ("huggingface", "Plachta/VALL-E-X")]
)
def test_an_experimental_entry_is_refused_without_the_opt_in_whichever_source_names_it(
    server, source, model_id
):
    """tts_auto fills in what the entry needs to speak, never the user's opt-ins: without
    ``experimental`` the catalog's gate refuses, saying why, as it does for the concrete
    source; with it but no ``allow_pickle``, the pickle gate refuses (fails before: tts_auto
    took both opt-ins from the entry, and huggingface had no experimental gate)."""
    body = {"source": source, "model_id": model_id, "name": "vallex"}
    refused = server.client.post("/models/download", json={**body, "allow_pickle": True})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "Experimental model"
    assert '"experimental": true' in refused.json()["message"]
    assert server.client.get("/models/download/vallex/info").status_code == 404
    if source == "tts_auto":  # a download-only entry's pickles are never converted
        no_pickle = server.client.post("/models/download", json={**body, "experimental": True})
        assert no_pickle.status_code == 400 and "allow_pickle" in no_pickle.json()["message"]


def test_experimental_entry_installs_download_only_with_the_users_opt_ins(server):
    answer = post(server, "vall-e-x", "vallex", experimental=True, allow_pickle=True)
    assert answer.status_code == 202, answer.text
    notes = answer.json()["download_info"]["notes"]
    assert not any("taken from the catalog entry" in note for note in notes)
    assert answer.json()["download_info"]["loadable"] is False
    status = server.wait_for(answer.json()["download_id"])
    assert status["status"] == "completed"
    assert "download only" in status["message"] and "never runs" in status["message"]
    assert server.client.get("/models/managed").json()["total_models"] == 0
    files = server.client.get("/models/download/vallex/info").json()["files"]
    assert [f["path"] for f in files] == ["README.md", "vallex-checkpoint.pt"]
    # Stored, never unpickled: /synthesize cannot use it, and says why.
    spoken = server.client.post("/synthesize", json={"model_name": "vallex", "text": "hi"})
    assert spoken.status_code == 400 and "stored download-only" in spoken.json()["message"]
    load = server.client.post("/models/vallex/load")
    assert load.status_code == 400 and "never runs" in load.json()["message"]
    available = server.client.get("/models/available").json()["available_models"]["vall_e_x"]
    assert available["installed_as"] == ["vallex"]
    assert available["tts_features"]["supports_tts"] is False
