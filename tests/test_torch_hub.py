"""pytorch_hub: an allow-listed repository's archive fetched, extracted safely, loaded."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

HUBCONF = b'''dependencies = ["torch"]

import torch


def tiny(**kwargs):
    """A linear layer with seeded weights: the test computes the same one."""
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)
'''


def archive(entries: dict[str, bytes], top: str = "tinyrepo-v1") -> bytes:
    """A zip laid out like GitHub's repository archives (one top-level directory)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for name, data in entries.items():
            zipped.writestr(f"{top}/{name}" if top else name, data)
    return buffer.getvalue()


@pytest.fixture
def server(make_server, fileserver):
    return make_server(
        [],
        torch_hub_allow=("acme/tinyrepo",),
        torch_hub_mirror=fileserver.base_url,
        device="cpu",
    )


def post(server, model_id: str, name: str = "hub"):
    return server.client.post(
        "/models/download", json={"source": "pytorch_hub", "model_id": model_id, "name": name}
    )


def test_allow_listed_repository_installs_loads_and_predicts(server, fileserver):
    fileserver.add("/acme/tinyrepo/zip/v1", archive({"hubconf.py": HUBCONF, "README.md": b"tiny"}))
    response = post(server, "acme/tinyrepo:v1/tiny")
    assert response.status_code == 202, response.text
    status = server.wait_for(response.json()["download_id"])
    assert status["status"] == "completed" and status["message"].endswith("loaded on cpu"), status
    info = server.client.get("/models/download/hub/info").json()
    assert sorted(f["path"] for f in info["files"]) == ["README.md", "hubconf.py"]
    assert info["revision"] == "v1"

    torch.manual_seed(0)
    expected = torch.nn.Linear(3, 2)(torch.tensor([[1.0, 2.0, 3.0]])).tolist()
    answer = server.client.post("/models/hub/predict", json={"inputs": [[1.0, 2.0, 3.0]]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["shape"] == [1, 2]
    assert answer.json()["outputs"][0] == pytest.approx(expected[0], abs=1e-6)


def test_unlisted_repository_is_refused_naming_the_setting(server, fileserver):
    response = post(server, "evil/repo:v1/tiny")
    assert response.status_code == 403
    assert "MODELHOST_TORCH_HUB_ALLOW" in response.json()["message"]
    assert fileserver.count() == 0


@pytest.mark.parametrize("model_id", ["acme/tinyrepo/tiny", "acme/tinyrepo:v1", "acme:v1/x"])
def test_model_id_must_pin_a_ref_and_name_an_entrypoint(server, model_id):
    response = post(server, model_id)
    assert response.status_code == 400 and "owner/repo:ref/entrypoint" in response.json()["message"]


def test_archive_escaping_the_directory_is_refused(server, fileserver):
    fileserver.add(
        "/acme/tinyrepo/zip/v2",
        archive({"hubconf.py": HUBCONF, "../../outside.py": b"import os"}, top=""),
    )
    status = server.wait_for(post(server, "acme/tinyrepo:v2/tiny").json()["download_id"])
    assert status["status"] == "failed"
    assert "would escape the model directory" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    partial = server.settings.home / "partial"
    assert not any(p.name.startswith("extract-") for p in partial.iterdir())


@pytest.mark.parametrize(
    "entries, clash",
    [
        ({"hubconf.py": HUBCONF, "utils": b"a file", "utils/x.py": b"x = 1"}, "utils"),
        ({"hubconf.py": HUBCONF, "utils/x.py": b"x = 1", "utils": b"a file"}, "utils"),
    ],
    ids=["file-first", "directory-first"],
)
def test_archive_whose_entries_collide_fails_with_a_message(server, fileserver, entries, clash):
    """A file and a directory of one name cannot both be unpacked: the job fails naming the
    entry, before anything is written, instead of an internal FileExistsError."""
    fileserver.add("/acme/tinyrepo/zip/v3", archive(entries))
    status = server.wait_for(post(server, "acme/tinyrepo:v3/tiny").json()["download_id"])
    assert status["status"] == "failed"
    assert "internal error" not in status["message"].lower()
    assert f"{clash!r} is both a file and a directory" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    partial = server.settings.home / "partial"
    assert not any(p.name.startswith("extract-") for p in partial.iterdir())


def test_archive_with_a_duplicate_entry_fails_with_a_message(server, fileserver):
    """Two entries of one name: which one would be installed is ambiguous, so neither is."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("tinyrepo-v1/hubconf.py", HUBCONF)
        zipped.writestr("tinyrepo-v1/hubconf.py", b"import os")
    fileserver.add("/acme/tinyrepo/zip/v4", buffer.getvalue())
    status = server.wait_for(post(server, "acme/tinyrepo:v4/tiny").json()["download_id"])
    assert status["status"] == "failed"
    assert "'hubconf.py' appears twice" in status["message"]
