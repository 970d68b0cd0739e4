"""Request identity: every field that changes what gets installed is part of it. A name
installed with another identity answers 409 saying what differs; ``already_exists`` is for
the same identity only."""

from __future__ import annotations

import pytest
from hubserver import HubServer
from tiny_models import publish_all

from modelhost.jobs.manager import request_key
from modelhost.sources import DownloadRequest


@pytest.fixture
def hub(tiny_models):
    with HubServer() as server:
        publish_all(server, tiny_models)
        yield server


def tts_auto(server, model_id: str, name: str, **fields):
    body = {"source": "tts_auto", "model_id": model_id, "name": name, "load": False, **fields}
    return server.client.post("/models/download", json=body)


def test_bark_small_then_the_large_model_under_its_name_is_a_409(make_server, hub, tmp_path):
    server = make_server([], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "none")
    first = tts_auto(server, "bark-small", "bark")
    assert first.status_code == 202, first.text
    assert server.wait_for(first.json()["download_id"], timeout=120)["status"] == "completed"

    larger = tts_auto(server, "bark-small", "bark", enable_large_model=True)
    assert larger.status_code == 409, larger.text
    body = larger.json()
    assert body["success"] is False and body["error"] == "Installed differently"
    assert body["message"] == (
        "'bark' is installed with enable_large_model=false; this request asks for "
        "enable_large_model=true: delete it first or use another name"
    )
    # The same request again is the installed model.
    again = tts_auto(server, "bark-small", "bark")
    assert again.status_code == 200 and again.json()["status"] == "already_exists"
    info = server.client.get("/models/download/bark/info").json()
    assert info["spec"]["options"]["enable_large_model"] is False


@pytest.mark.parametrize(
    "change, named",
    [
        ({"task": "text-classification"}, 'task="text-classification"'),
        ({"allow_pickle": True}, "allow_pickle=true"),
        ({"filename": "other.safetensors"}, 'filename="other.safetensors"'),
        ({"load_as": "torchscript"}, 'load_as="torchscript"'),
    ],
)
def test_a_url_file_asked_for_with_other_options_is_a_409(make_server, fileserver, change, named):
    fileserver.add("/w.safetensors", b"\0" * 64)
    server = make_server([fileserver.host_port])
    body = {"source": "url", "model_id": fileserver.url("/w.safetensors"), "name": "w"}
    job = server.client.post("/models/download", json=body).json()
    assert server.wait_for(job["download_id"])["status"] == "completed"
    same = server.client.post("/models/download", json=body)
    assert same.status_code == 200 and same.json()["status"] == "already_exists"

    other = server.client.post("/models/download", json={**body, **change})
    assert other.status_code == 409, other.text
    message = other.json()["message"]
    assert message.startswith("'w' is installed with ") and f"asks for {named}" in message
    # Options that do not change what is installed are not the identity.
    for harmless in ({"load": False}, {"pin": True}, {"device": "cpu"}):
        answer = server.client.post("/models/download", json={**body, **harmless})
        assert answer.json()["status"] == "already_exists", harmless


def test_a_field_left_out_asks_for_what_is_installed(make_server, fileserver):
    """Asking again without an option it was installed with (the CLI's `pull NAME --force`)
    means the installed model; sending the option with another value is a 409."""
    fileserver.add("/w.safetensors", b"\0" * 64)
    server = make_server([fileserver.host_port])
    body = {"source": "url", "model_id": fileserver.url("/w.safetensors"), "name": "w"}
    job = server.client.post("/models/download", json={**body, "task": "text-classification"})
    assert server.wait_for(job.json()["download_id"])["status"] == "completed"
    left_out = server.client.post("/models/download", json=body)
    assert left_out.status_code == 200 and left_out.json()["status"] == "already_exists"
    default_sent = server.client.post("/models/download", json={**body, "task": "text-generation"})
    assert default_sent.status_code == 409, default_sent.text
    assert 'asks for task="text-generation"' in default_sent.json()["message"]


def test_a_different_model_under_the_name_is_still_name_in_use(make_server, fileserver):
    fileserver.add("/a.safetensors", b"\0" * 64)
    fileserver.add("/b.safetensors", b"\1" * 64)
    server = make_server([fileserver.host_port])
    body = {"source": "url", "model_id": fileserver.url("/a.safetensors"), "name": "w"}
    job = server.client.post("/models/download", json=body).json()
    assert server.wait_for(job["download_id"])["status"] == "completed"
    other = server.client.post(
        "/models/download", json={**body, "model_id": fileserver.url("/b.safetensors")}
    )
    assert other.status_code == 409 and other.json()["error"] == "Name in use"


VALUES = {
    "source": "huggingface",
    "model_id": "someone/else",
    "revision": "v2",
    "task": "text-classification",
    "filename": "x.bin",
    "include_vocoder": True,
    "vocoder_model": "microsoft/speecht5_hifigan",
    "enable_large_model": True,
    "experimental": True,
    "allow_patterns": ["*.json"],
    "ignore_patterns": ["*.md"],
    "load_as": "torchscript",
    "allow_pickle": True,
    "auto_convert_tts": True,
    "speak_with": "voice",
}


@pytest.mark.parametrize("field", list(VALUES))
def test_every_identity_field_makes_a_different_job(field):
    """Two requests that differ in what they install never share one job."""
    base = DownloadRequest(source="tts_auto", model_id="bark-small", name="bark")
    changed = base.model_copy(update={field: VALUES[field]})
    assert request_key(changed) != request_key(base)
    harmless = base.model_copy(update={"load": False, "pin": True, "device": "cpu"})
    assert request_key(harmless) == request_key(base)
    from modelhost.spec import IDENTITY_FIELDS  # (imported here: main has no such module)

    assert set(VALUES) == set(IDENTITY_FIELDS)
