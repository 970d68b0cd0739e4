"""The huggingface source end to end: a Hub-compatible loopback server, real tiny models,
installed through the API and loaded back with the real libraries, offline."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fileserver import Corrupt, DropAfter, Status
from hubserver import HubServer
from tiny_models import HUB_REPOS, LOADERS, MINILM_REPO, minilm_dir, publish_all

MINILM = MINILM_REPO
REPOS = HUB_REPOS


@pytest.fixture
def hub(tiny_models):
    with HubServer() as server:
        publish_all(server, tiny_models)
        yield server


@pytest.fixture
def modelhost(make_server, hub, tmp_path):
    def start(**overrides):
        values = {"hf_endpoint": hub.base_url, "hf_hub_cache": tmp_path / "no-hf-cache"}
        values.update(overrides)
        return make_server([], **values)

    return start


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(server, repo_id: str, name: str, **extra) -> dict:
    response = server.client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": repo_id, "name": name, **extra},
    )
    assert response.status_code == 202, response.text
    return response.json()


def installed_ok(server, repo_id: str, name: str, **extra) -> tuple[dict, dict]:
    started = install(server, repo_id, name, **extra)
    status = server.wait_for(started["download_id"], timeout=120)
    assert status["status"] == "completed", status
    return started, server.client.get(f"/models/download/{name}/info").json()


def assert_same_weights(loaded, reference) -> None:
    import torch

    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize(
    "repo_id",
    [
        "test-org/tiny-bert",
        "test-org/tiny-bart",
        "test-org/tiny-whisper",
        "suno/bark-small",
        "facebook/mms-tts-eng",
    ],
)
def test_install_then_load_offline(modelhost, hub, tiny_models, repo_id):
    import transformers

    server = modelhost()
    name = repo_id.split("/")[1]
    started, info = installed_ok(server, repo_id, name)

    assert info["revision"] == hub.commit_of(repo_id)
    assert started["download_info"]["revision"] == hub.commit_of(repo_id)
    served = hub.files(repo_id)
    expected_size = sum(f.size for path, f in served.items() if path != ".gitattributes")
    assert started["download_info"]["size_bytes"] == expected_size
    assert started["download_info"]["estimated_size_mb"] == round(expected_size / 1e6, 3)
    directory = Path(info["path"])
    for item in info["files"]:
        assert sha256_of(directory / item["path"]) == item["sha256"]
        assert (directory / item["path"]).read_bytes() == served[item["path"]].read()

    model_class, processor_class = LOADERS[REPOS[repo_id]]
    loaded = getattr(transformers, model_class).from_pretrained(directory)
    reference = getattr(transformers, model_class).from_pretrained(tiny_models[REPOS[repo_id]])
    assert_same_weights(loaded, reference)
    if processor_class:
        getattr(transformers, processor_class).from_pretrained(directory)


def test_speecht5_with_vocoder_is_one_model_that_speaks(modelhost, hub, tiny_models):
    import torch
    import transformers

    server = modelhost()
    started, info = installed_ok(
        server,
        "microsoft/speecht5_tts",
        "speecht5_tts",
        task="text-to-speech",
        include_vocoder=True,
    )
    download_info = started["download_info"]
    assert download_info["model_type"] == "tts"
    assert download_info["vocoder_included"] is True
    assert download_info["vocoder_models"] == ["microsoft/speecht5_hifigan"]
    assert download_info["supports_voice_cloning"] is False  # the catalog's entry
    assert info["spec"]["components"] == [
        {
            "role": "vocoder",
            "repo_id": "microsoft/speecht5_hifigan",
            "revision": hub.commit_of("microsoft/speecht5_hifigan"),
            "path": "vocoder",
        }
    ]
    directory = Path(info["path"])
    model = transformers.SpeechT5ForTextToSpeech.from_pretrained(directory)
    vocoder = transformers.SpeechT5HifiGan.from_pretrained(directory / "vocoder")
    assert_same_weights(
        vocoder, transformers.SpeechT5HifiGan.from_pretrained(tiny_models["hifigan"])
    )
    processor = transformers.SpeechT5Processor.from_pretrained(directory)
    ids = processor(text="hello", return_tensors="pt")["input_ids"]
    speaker = torch.zeros(1, model.config.speaker_embedding_dim)
    with torch.no_grad():
        audio = model.generate_speech(ids, speaker, vocoder=vocoder)
    assert audio.ndim == 1 and audio.numel() > 0


def test_minilm_embeddings_match_the_package(modelhost):
    from sentence_transformers import SentenceTransformer

    server = modelhost()
    _, info = installed_ok(server, MINILM, "minilm", task="feature-extraction")
    ours = SentenceTransformer(info["path"], device="cpu").encode(["modelhost verifies bytes"])
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        ["modelhost verifies bytes"]
    )
    assert ours.shape == (1, 384)
    assert abs(ours - reference).max() < 1e-6


def test_shared_vocoder_blobs_are_stored_once(modelhost, hub):
    server = modelhost()
    installed_ok(server, "microsoft/speecht5_tts", "a", include_vocoder=True)
    blobs = server.settings.home / "blobs" / "sha256"
    count = len(list(blobs.iterdir()))
    hub.reset_log()
    # load false: a vocoder alone installs but is no model to load (a requested load that
    # fails fails the job).
    installed_ok(server, "microsoft/speecht5_hifigan", "vocoder-alone", load=False)
    assert len(list(blobs.iterdir())) == count  # every file was already there
    # No file moved again; the one GET is planning reading the architecture from config.json.
    gets = [r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert [p.rsplit("/", 1)[1] for p in gets] == ["config.json"]


def test_bundle_is_all_or_nothing(modelhost, hub):
    hub.set_faults("microsoft/speecht5_hifigan", "config.json", [Status(404, times=99)])
    server = modelhost()
    job = install(server, "microsoft/speecht5_tts", "broken", include_vocoder=True)
    status = server.wait_for(job["download_id"])
    assert status["status"] == "failed"
    assert "vocoder/config.json" in status["message"] or "404" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert not (server.settings.home / "models" / "broken").exists()


def test_dropped_connection_resumes(modelhost, hub):
    weights = hub.file("test-org/tiny-bert", "model.safetensors")
    hub.set_faults("test-org/tiny-bert", "model.safetensors", [DropAfter(weights.size // 3)])
    server = modelhost()
    _, info = installed_ok(server, "test-org/tiny-bert", "bert")
    ranges = [
        r.range_start
        for r in hub.requests
        if r.method == "GET" and r.path.endswith("model.safetensors")
    ]
    assert ranges == [None, weights.size // 3]
    assert {f["path"]: f["sha256"] for f in info["files"]}["model.safetensors"] == weights.sha256


@pytest.mark.parametrize(
    "path, digest", [("model.safetensors", "sha256"), ("vocab.txt", "git blob id")]
)
def test_wrong_bytes_never_complete(modelhost, hub, path, digest):
    hub.set_faults("test-org/tiny-bert", path, [Corrupt()])
    server = modelhost()
    status = server.wait_for(install(server, "test-org/tiny-bert", "bert")["download_id"])
    assert status["status"] == "failed"
    assert status["error"] == "Digest mismatch"
    assert f"{path}: {digest}" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0


def test_corrupt_config_is_caught_while_planning(modelhost, hub):
    hub.set_faults("test-org/tiny-bert", "config.json", [Corrupt()])
    server = modelhost()
    response = server.client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": "test-org/tiny-bert", "name": "bert"},
    )
    assert response.status_code == 502
    assert "config.json: git blob id" in response.json()["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0


@pytest.mark.parametrize(
    "body, code, fragment",
    [
        ({"model_id": "test-org/missing"}, 404, "Repository test-org/missing not found"),
        ({"model_id": "test-org/tiny-bert", "revision": "v9"}, 404, "Revision 'v9' not found"),
        ({"model_id": "../../etc"}, 400, "Invalid model_id"),
        ({"model_id": "test-org/tiny-bert", "allow_patterns": ["*.none"]}, 400, "No files"),
    ],
)
def test_hub_errors_are_explained(modelhost, body, code, fragment):
    server = modelhost()
    response = server.client.post(
        "/models/download", json={"source": "huggingface", "name": "x", **body}
    )
    assert response.status_code == code, response.text
    answer = response.json()
    assert fragment in answer["message"], answer
    if code == 404:  # an upstream failure is kept as a failed job, with its reason
        status = server.client.get(f"/models/download/status/{answer['download_id']}").json()
        assert status["status"] == "failed" and fragment in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0


def test_private_repository_needs_the_token(modelhost, hub, tiny_models, tmp_path):
    hub.add_repo("test-org/private-bert", tiny_models["bert"], private=True, token="hf_good")
    refused = modelhost().client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": "test-org/private-bert", "name": "p"},
    )
    assert refused.status_code == 403
    assert "HF_TOKEN" in refused.json()["message"]

    server = modelhost(hf_token="hf_good", home=tmp_path / "home-with-token")
    _, info = installed_ok(server, "test-org/private-bert", "p")
    assert info["revision"] == hub.commit_of("test-org/private-bert")
    resolves = [r for r in hub.requests if "private-bert/resolve" in r.path]
    assert resolves and all(r.headers.get("Authorization") == "Bearer hf_good" for r in resolves)


def test_gated_repository_says_how_to_get_access(modelhost, hub, tiny_models):
    hub.add_repo(
        "test-org/gated-bert", tiny_models["bert"], private=True, gated=True, token="hf_good"
    )
    response = modelhost().client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": "test-org/gated-bert", "name": "g"},
    )
    assert response.status_code == 403
    assert (
        "gated" in response.json()["message"] and "accept its terms" in response.json()["message"]
    )


def test_file_disappearing_mid_install_fails_cleanly(modelhost, hub):
    hub.set_faults("test-org/tiny-bart", "model.safetensors", [Status(404, times=99)])
    server = modelhost()
    status = server.wait_for(install(server, "test-org/tiny-bart", "bart")["download_id"])
    assert status["status"] == "failed"
    assert "404" in status["message"] and "model.safetensors" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0


def test_update_fetches_only_what_changed(modelhost, hub):
    server = modelhost()
    _, before = installed_ok(server, "test-org/tiny-bert", "bert")
    up_to_date = server.client.post(
        "/models/manage", params={"action": "update", "model_name": "bert"}
    ).json()
    assert up_to_date["status"] == "up_to_date"

    new_config = hub.file("test-org/tiny-bert", "config.json").read().replace(b"}", b', "x": 1}', 1)
    hub.reset_log()
    new_sha = hub.push("test-org/tiny-bert", {"config.json": new_config, "extra.txt": b"new"})
    answer = server.client.post(
        "/models/manage", params={"action": "update", "model_name": "bert"}
    ).json()
    assert answer["changes"]["modified"] == ["config.json"]
    assert answer["changes"]["added"] == ["extra.txt"]
    assert answer["changes"]["to_revision"] == new_sha
    status = server.wait_for(answer["download_id"])
    assert status["status"] == "completed", status
    assert "1 changed, 1 added, 0 removed" in status["message"]
    assert f"{len(new_config) + 3} bytes transferred" in status["message"]
    fetched = {
        r.path.rsplit("/", 1)[1]
        for r in hub.requests
        if r.method == "GET" and "/resolve/" in r.path
    }
    assert fetched == {"config.json", "extra.txt"}  # the weights were reused

    after = server.client.get("/models/download/bert/info").json()
    assert after["revision"] == new_sha != before["revision"]
    assert (Path(after["path"]) / "config.json").read_bytes() == new_config


def test_existing_hf_cache_is_imported_not_downloaded(modelhost, hub, tmp_path):
    cache = tmp_path / "hf-cache"
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.base_url,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from huggingface_hub import snapshot_download as s; s('test-org/tiny-bert')",
        ],
        env=env,
        check=True,
        timeout=120,
    )
    hub.reset_log()
    server = modelhost(hf_hub_cache=cache)
    _, info = installed_ok(server, "test-org/tiny-bert", "bert")
    assert hub.count("GET", "/resolve/") == 0
    assert info["revision"] == hub.commit_of("test-org/tiny-bert")


def test_auto_convert_tts_does_not_pretend(modelhost):
    server = modelhost()
    response = server.client.post(
        "/models/download",
        json={
            "source": "huggingface",
            "model_id": "test-org/tiny-bart",
            "name": "bart",
            "auto_convert_tts": True,
        },
    )
    assert response.status_code == 202, response.text
    assert "has no speech head" in response.json()["message"]
    assert response.json()["download_info"]["model_type"] == "bart"
    server.wait_for(response.json()["download_id"])
