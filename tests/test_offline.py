"""HF_HUB_OFFLINE: the huggingface source installs from a real huggingface_hub cache without
one request, verifying every blob against the digest the cache records in its name."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import HubServer

REPO = "test-org/tiny-bert"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(tiny_models):
    with HubServer() as server:
        server.add_repo(REPO, tiny_models["bert"])
        yield server


@pytest.fixture
def cache(hub, tmp_path) -> Path:
    """A huggingface_hub cache filled by the real ``snapshot_download`` from the test Hub."""
    directory = tmp_path / "hf-cache"
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.base_url,
        "HF_HUB_CACHE": str(directory),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("HF_HUB_OFFLINE", None)
    code = f"from huggingface_hub import snapshot_download as s; s({REPO!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    hub.reset_log()
    return directory


@pytest.fixture
def offline(make_server, hub, cache):
    def start(**overrides):
        values = {"hf_endpoint": hub.base_url, "hf_hub_cache": cache, "hf_hub_offline": True}
        return make_server([], **{**values, **overrides})

    return start


def install(server, repo_id: str, name: str, **extra):
    return server.client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": repo_id, "name": name, **extra},
    )


def test_offline_install_makes_no_request(offline, hub, tiny_models):
    server = offline()
    started = install(server, REPO, "bert")
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=120)
    assert status["status"] == "completed", status
    assert "loaded on cpu" in status["message"]
    assert hub.requests == []  # not one request reached the Hub

    info = server.client.get("/models/download/bert/info").json()
    assert info["revision"] == hub.commit_of(REPO)
    originals = {
        p.relative_to(tiny_models["bert"]).as_posix(): sha256_of(p)
        for p in tiny_models["bert"].rglob("*")
        if p.is_file()
    }
    assert {f["path"]: f["sha256"] for f in info["files"]} == originals
    for path, digest in originals.items():
        assert sha256_of(Path(info["path"]) / path) == digest

    prediction = server.client.post("/models/bert/predict", json={"inputs": "hello world"})
    assert prediction.status_code == 200, prediction.text
    assert hub.requests == []


def test_offline_revision_by_commit_and_missing_revision(offline, hub):
    server = offline()
    commit = hub.commit_of(REPO)
    started = install(server, REPO, "bert", revision=commit, load=False)
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=60)
    assert status["status"] == "completed", status

    missing = install(server, REPO, "bert2", revision="v9")
    assert missing.status_code == 404, missing.text
    assert "not in the local cache (offline)" in missing.json()["message"]
    assert "no revision 'v9'" in missing.json()["message"]
    assert hub.requests == []


def test_repo_not_in_the_cache_is_404_and_a_failed_job(offline, hub, cache):
    server = offline()
    response = install(server, "test-org/elsewhere", "elsewhere")
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["success"] is False
    assert body["message"] == (
        f"test-org/elsewhere is not in the local cache (offline): HF_HUB_CACHE={cache}; "
        "download it on a connected machine with huggingface_hub into that cache, or unset "
        "HF_HUB_OFFLINE"
    )
    status = server.client.get(f"/models/download/status/{body['download_id']}").json()
    assert status["status"] == "failed"
    assert "not in the local cache (offline)" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert hub.requests == []


@pytest.mark.parametrize("path", ["model.safetensors", "config.json"])
def test_tampered_blob_fails_digest_mismatch(offline, hub, cache, path):
    folder = cache / ("models--" + REPO.replace("/", "--"))
    blob = (folder / "snapshots" / hub.commit_of(REPO) / path).resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))

    server = offline()
    started = install(server, REPO, "bert", load=False)
    assert started.status_code == 202, started.text
    status = server.wait_for(started.json()["download_id"], timeout=60)
    assert status["status"] == "failed", status
    assert status["error"] == "Digest mismatch"
    kind = "sha256" if path.endswith(".safetensors") else "git blob id"
    assert f"{path}: {kind} of the downloaded bytes is" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert not (server.settings.home / "models" / "bert").exists()
    assert hub.requests == []
