"""What an upstream sends never becomes a 500 or a half-written model: file names the
filesystem cannot hold, listings whose paths collide, archives that lie, Content-Length
headers that are not byte counts."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest
from hubserver import HubServer
from rawserver import RawServer

CONFIG = b'{"model_type": "bert"}'


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_modelhost(make_server, hub, tmp_path):
    return make_server([], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "hf-cache")


def post_hf(server, repo_id: str, name: str = "m"):
    return server.client.post(
        "/models/download", json={"source": "huggingface", "model_id": repo_id, "name": name}
    )


def assert_nothing_written(server) -> None:
    home = server.settings.home
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert list((home / "models").iterdir()) == []
    assert list((home / "partial").iterdir()) == []


# --- A1: names over the filesystem's limits -------------------------------------------------


def test_component_over_255_bytes_is_refused_while_planning(hub, hub_modelhost):
    long_name = "a" * 300 + ".txt"
    hub.add_repo("org/long", {"config.json": CONFIG, long_name: b"tokens"})
    response = post_hf(hub_modelhost, "org/long")
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["success"] is False and body["error"] == "File name too long"
    message = body["message"]
    assert message.startswith("File name too long for the filesystem: ")
    assert "a component of 304 bytes (the limit is 255 bytes per component)" in message
    assert f"'{'a' * 30}...{'a' * 26}.txt (304 characters)'" in message  # shortened, named
    assert long_name not in message
    assert hub.count("GET", long_name[:50]) == 0
    assert_nothing_written(hub_modelhost)


def test_path_of_5000_characters_is_refused_naming_path_max(hub, hub_modelhost):
    deep = "/".join(["d" * 199] * 24) + "/" + "e" * 196 + ".txt"  # each component fits
    assert len(deep) == 5000
    hub.add_repo("org/deep", {"config.json": CONFIG, deep: b"x"})
    response = post_hf(hub_modelhost, "org/deep")
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "File name too long"
    assert body["message"].startswith("File path too long for the filesystem: ")
    assert "is 5000 bytes (PATH_MAX is 4096 bytes" in body["message"]
    assert "(5000 characters)" in body["message"]
    assert_nothing_written(hub_modelhost)


# --- A2: paths that cannot exist side by side -------------------------------------------------


def test_file_that_is_also_a_directory_is_refused(hub, hub_modelhost):
    hub.add_repo("org/clash", {"config.json": CONFIG, "model.safetensors": b"w" * 64})
    hub.add_listing_entries(
        "org/clash",
        [{"type": "file", "path": "config.json/inner.json", "size": 2, "oid": "1" * 40}],
    )
    response = post_hf(hub_modelhost, "org/clash")
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "Conflicting paths"
    assert body["message"] == (
        "Conflicting paths in the file listing: 'config.json' is a file and also the "
        "directory of 'config.json/inner.json'; nothing was installed"
    )
    assert hub.count("GET", "model.safetensors") == 0
    assert_nothing_written(hub_modelhost)


def test_duplicate_path_is_refused(hub, hub_modelhost):
    hub.add_repo("org/twice", {"config.json": CONFIG, "vocab.txt": b"a b c"})
    listed = hub.file("org/twice", "vocab.txt")
    hub.add_listing_entries(
        "org/twice", [{"type": "file", "path": "vocab.txt", "size": 5, "oid": listed.oid}]
    )
    response = post_hf(hub_modelhost, "org/twice")
    assert response.status_code == 400, response.text
    assert response.json()["message"] == (
        "Conflicting paths in the file listing: 'vocab.txt' appears twice; nothing was installed"
    )
    assert_nothing_written(hub_modelhost)


# --- A3: archives whose entries lie -----------------------------------------------------------

HUBCONF = b'dependencies = ["torch"]\n\n\ndef tiny():\n    return None\n'
ENTRY = "tinyrepo-v1/weights.txt"


def lying_archive(lie: str) -> bytes:
    """A GitHub-like archive (stored, uncompressed) whose weights.txt entry lies."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("tinyrepo-v1/hubconf.py", HUBCONF)
        zipped.writestr(ENTRY, b"0123456789" * 100)
    data = bytearray(buffer.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo(ENTRY)
    if lie == "crc":
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 :][:4])
        start = info.header_offset + 30 + name_len + extra_len
        data[start + 10] ^= 0xFF  # one byte of the content: the stored CRC no longer matches
    else:
        central = data.index(b"PK\x01\x02")
        while data[central + 46 : central + 46 + len(ENTRY)] != ENTRY.encode():
            central = data.index(b"PK\x01\x02", central + 4)
        declared = 1000 - 7 if lie == "size_smaller" else 1000 + 7
        data[central + 24 : central + 28] = struct.pack("<I", declared)
    return bytes(data)


@pytest.mark.parametrize("lie", ["crc", "size_smaller", "size_larger"])
def test_archive_entry_that_lies_fails_the_job_and_installs_nothing(make_server, fileserver, lie):
    server = make_server(
        [], torch_hub_allow=("acme/tinyrepo",), torch_hub_mirror=fileserver.base_url, device="cpu"
    )
    fileserver.add("/acme/tinyrepo/zip/v1", lying_archive(lie))
    response = server.client.post(
        "/models/download",
        json={"source": "pytorch_hub", "model_id": "acme/tinyrepo:v1/tiny", "name": "hub"},
    )
    assert response.status_code == 202, response.text
    status = server.wait_for(response.json()["download_id"])
    assert status["status"] == "failed"
    assert status["error"] == "Corrupt archive"
    assert f"corrupt archive: {ENTRY} (" in status["message"]
    assert "the extraction was removed and nothing was installed" in status["message"]
    assert_nothing_written(server)  # no extract-* directory, no archive kept to re-use


# --- A4: Content-Length values that are not byte counts ---------------------------------------

BAD_LENGTHS = ["16, 0", "abc", "1" + "0" * 30]


@pytest.fixture
def raw():
    with RawServer() as server:
        yield server


def post_url(server, raw):
    return server.client.post(
        "/models/download",
        json={"source": "url", "model_id": raw.url("/w.safetensors"), "name": "w"},
    )


@pytest.mark.parametrize("length", BAD_LENGTHS)
def test_bad_content_length_in_the_probe_fails_the_request(make_server, raw, length):
    raw.route("HEAD", "/w.safetensors", [("Content-Length", length), ("ETag", '"v1"')])
    server = make_server([raw.host_port])
    response = post_url(server, raw)
    assert response.status_code == 502, response.text
    body = response.json()
    assert body["error"] == "Invalid Content-Length"
    assert body["message"].startswith(f"invalid Content-Length from {raw.host_port}: ")
    assert body["status"] == "failed"
    status = server.client.get(f"/models/download/status/{body['download_id']}").json()
    assert (
        status["status"] == "failed"
        and f"invalid Content-Length from {raw.host_port}" in (status["message"])
    )
    assert raw.count("GET", "/w.safetensors") == 0
    assert_nothing_written(server)


@pytest.mark.parametrize("length", BAD_LENGTHS)
def test_bad_content_length_in_the_transfer_fails_the_job(make_server, raw, length):
    raw.route("HEAD", "/w.safetensors", [("Content-Length", "16"), ("ETag", '"v1"')])
    raw.route("GET", "/w.safetensors", [("Content-Length", length), ("ETag", '"v1"')], b"x" * 16)
    server = make_server([raw.host_port])
    response = post_url(server, raw)
    assert response.status_code == 202, response.text
    status = server.wait_for(response.json()["download_id"])
    assert status["status"] == "failed"
    assert status["error"] == "Invalid Content-Length"
    assert f"invalid Content-Length from {raw.host_port}: {length[:40]!r}" in status["message"]
    assert raw.count("GET", "/w.safetensors") == 1  # not retried: the answer is not a fault
    home = server.settings.home
    assert list((home / "models").iterdir()) == []
    assert not list((home / "partial").glob("*.part"))


def test_archive_entry_name_over_the_limit_fails_the_job(make_server, fileserver):
    server = make_server(
        [], torch_hub_allow=("acme/tinyrepo",), torch_hub_mirror=fileserver.base_url, device="cpu"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("tinyrepo-v1/hubconf.py", HUBCONF)
        zipped.writestr("tinyrepo-v1/" + "w" * 256, b"weights")
    fileserver.add("/acme/tinyrepo/zip/v1", buffer.getvalue())
    response = server.client.post(
        "/models/download",
        json={"source": "pytorch_hub", "model_id": "acme/tinyrepo:v1/tiny", "name": "hub"},
    )
    status = server.wait_for(response.json()["download_id"])
    assert status["status"] == "failed"
    assert status["error"] == "File name too long"
    assert "File name too long for the filesystem: " in status["message"]
    assert "a component of 256 bytes (the limit is 255 bytes per component)" in status["message"]
    home = server.settings.home
    assert list((home / "models").iterdir()) == []
    assert not any(p.name.startswith("extract-") for p in (home / "partial").iterdir())
