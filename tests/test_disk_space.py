"""Disk space is checked before bytes move; a full disk anywhere answers 507, never 500;
partial bytes of failed downloads are reported and removed on request."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from fileserver import DropAfter
from rawserver import RawServer

from modelhost.errors import InsufficientStorage
from modelhost.store import CommitFile, Manifest, Store

MiB = 1024 * 1024
FREE = re.compile(r", (\d+\.\d) MB free under ")


def post_url(server, url: str, name: str):
    return server.client.post(
        "/models/download", json={"source": "url", "model_id": url, "name": name}
    )


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a file into ``directory`` until its filesystem has at most ``leave`` bytes free."""
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        try:
            while shutil.disk_usage(directory).free > leave:
                handle.write(b"\0" * min(64 * 1024, shutil.disk_usage(directory).free - leave))
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.fixture
def raw():
    with RawServer() as server:
        yield server


# --- B: checked before bytes move ------------------------------------------------------------


def test_download_larger_than_free_space_is_refused_before_any_transfer(
    make_server, fileserver, small_disk, tmp_path
):
    fileserver.add("/big.safetensors", os.urandom(6 * MiB))
    server = make_server(
        [fileserver.host_port],
        home=small_disk,
        db_url=f"sqlite:///{tmp_path / 'state.db'}",
        disk_reserve_mb=0,
    )
    response = post_url(server, fileserver.url("/big.safetensors"), "big")
    assert response.status_code == 507, response.text
    body = response.json()
    assert body["success"] is False and body["error"] == "Insufficient storage"
    assert body["message"].startswith(
        "Not enough disk space for 'big': it needs 6.3 MB plus the 0 MB reserve "
        "(MODELHOST_DISK_RESERVE_MB), "
    )
    free_mb = float(FREE.search(body["message"]).group(1))
    assert abs(free_mb - shutil.disk_usage(small_disk).free / 1e6) < 0.15 and free_mb < 4.3
    assert body["message"].endswith("Nothing was written")
    assert fileserver.count("GET", "/big.safetensors") == 0  # the HEAD only
    assert list((small_disk / "partial").iterdir()) == []
    status = server.client.get(f"/models/download/status/{body['download_id']}").json()
    assert status["status"] == "failed" and "it needs 6.3 MB plus the 0 MB" in status["message"]


def test_the_reserve_is_part_of_the_need(make_server, fileserver, small_disk, tmp_path):
    fileserver.add("/one.safetensors", os.urandom(MiB))
    server = make_server(
        [fileserver.host_port],
        home=small_disk,
        db_url=f"sqlite:///{tmp_path / 'state.db'}",
        disk_reserve_mb=4,
    )
    response = post_url(server, fileserver.url("/one.safetensors"), "one")
    assert response.status_code == 507, response.text
    assert (
        "it needs 1.0 MB plus the 4 MB reserve (MODELHOST_DISK_RESERVE_MB)"
        in (response.json()["message"])
    )
    assert fileserver.count("GET", "/one.safetensors") == 0


def test_default_reserve_is_512_mb():
    from modelhost.config import Settings

    assert Settings().disk_reserve_mb == 512
    assert Settings(disk_reserve_mb=0).disk_reserve_bytes == 0
    with pytest.raises(ValueError):
        Settings(disk_reserve_mb=-1)


def test_a_queued_job_is_checked_again_when_it_starts(
    make_server, fileserver, raw, small_disk, tmp_path
):
    # The first download's size is unknown, so only its bytes on disk can count against the
    # second, which fitted when it was queued and no longer fits when its turn comes.
    gate = threading.Event()
    raw.route("HEAD", "/first.safetensors", [("ETag", '"v1"')])
    raw.route("GET", "/first.safetensors", [("ETag", '"v1"')], os.urandom(3 * MiB), gate=gate)
    fileserver.add("/second.safetensors", os.urandom(2 * MiB))
    server = make_server(
        [raw.host_port, fileserver.host_port],
        home=small_disk,
        db_url=f"sqlite:///{tmp_path / 'state.db'}",
        disk_reserve_mb=0,
        max_downloads=1,
    )
    first = post_url(server, raw.url("/first.safetensors"), "first").json()["download_id"]
    second = post_url(server, fileserver.url("/second.safetensors"), "second")
    assert second.status_code == 202, second.text
    assert second.json()["status"] == "pending"
    gate.set()
    assert server.wait_for(first)["status"] == "completed"
    status = server.wait_for(second.json()["download_id"])
    assert status["status"] == "failed"
    assert status["error"] == "Insufficient storage"
    assert (
        "Not enough disk space for 'second': it needs 2.1 MB plus the 0 MB reserve"
        in (status["message"])
    )
    assert fileserver.count("GET", "/second.safetensors") == 0


def test_what_running_jobs_still_write_is_not_free(make_server, raw, small_disk, tmp_path):
    gate = threading.Event()
    size = 2_600_000
    raw.route("HEAD", "/a.safetensors", [("Content-Length", str(size)), ("ETag", '"a"')])
    headers = [("Content-Length", str(size)), ("ETag", '"a"')]
    raw.route("GET", "/a.safetensors", headers, os.urandom(size), gate=gate)
    raw.route("HEAD", "/b.safetensors", [("Content-Length", "1700000"), ("ETag", '"b"')])
    server = make_server(
        [raw.host_port],
        home=small_disk,
        db_url=f"sqlite:///{tmp_path / 'state.db'}",
        disk_reserve_mb=0,
    )
    first = post_url(server, raw.url("/a.safetensors"), "a")
    assert first.status_code == 202, first.text
    deadline = time.monotonic() + 10
    while raw.count("GET", "/a.safetensors") == 0:  # its disk check passed: it is fetching
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = post_url(server, raw.url("/b.safetensors"), "b")
    gate.set()
    assert second.status_code == 507, second.text
    message = second.json()["message"]
    assert message.startswith("Not enough disk space for 'b': it needs 1.7 MB plus the 0 MB")
    assert ", of which running downloads still have to write 2.6 MB; " in message
    assert server.wait_for(first.json()["download_id"])["status"] == "completed"
    assert raw.count("GET", "/b.safetensors") == 0


# --- A5: a full disk anywhere is 507 ----------------------------------------------------------


def test_full_state_database_answers_507(make_server, fileserver, small_disk, tmp_path):
    fileserver.add("/w.safetensors", os.urandom(1000))
    server = make_server(
        [fileserver.host_port],
        home=tmp_path / "home",
        db_url=f"sqlite:///{small_disk / 'state.db'}",
        disk_reserve_mb=0,
    )
    fill(small_disk)
    response = post_url(server, fileserver.url("/w.safetensors"), "w")
    assert response.status_code == 507, response.text
    body = response.json()
    assert body["success"] is False and body["error"] == "Insufficient storage"
    assert body["message"].startswith("The state database cannot be written: its disk is full")
    assert "free disk space where MODELHOST_DB_URL / MODELHOST_HOME point" in body["message"]
    assert fileserver.count("GET", "/w.safetensors") == 0
    assert server.client.get("/health").status_code == 200  # still serving


def test_disk_already_full_when_a_transfer_starts_fails_the_job(
    make_server, raw, small_disk, tmp_path
):
    # Size unknown, so the check passes; the first write (the partial's state file) fails.
    raw.route("HEAD", "/u.safetensors", [("ETag", '"v1"')])
    raw.route("GET", "/u.safetensors", [("ETag", '"v1"')], b"w" * 10_000)
    server = make_server(
        [raw.host_port],
        home=small_disk,
        db_url=f"sqlite:///{tmp_path / 'state.db'}",
        disk_reserve_mb=0,
    )
    fill(small_disk)
    response = post_url(server, raw.url("/u.safetensors"), "u")
    assert response.status_code == 202, response.text
    status = server.wait_for(response.json()["download_id"])
    assert status["status"] == "failed"
    assert status["error"] == "Disk full"
    assert "No space left to write the download (No space left on device)" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0


def _blob_file(directory: Path, data: bytes) -> CommitFile:
    part = directory / f"{hashlib.sha256(data).hexdigest()[:8]}.part"
    part.write_bytes(data)
    return CommitFile("model.safetensors", part, len(data), hashlib.sha256(data).hexdigest())


def test_store_commit_on_a_full_disk_is_507_and_keeps_the_old_version(small_disk):
    store = Store(small_disk / "store")
    old = _blob_file(small_disk, b"old weights")
    store.commit(Manifest(name="m", source="url", model_id="u"), [old])
    new = _blob_file(small_disk, b"new weights")
    fill(small_disk)
    with pytest.raises(InsufficientStorage) as raised:
        store.commit(Manifest(name="m", source="url", model_id="u2"), [new])
    assert raised.value.status_code == 507
    assert raised.value.message.startswith("No space left to install the model (")
    installed = store.get("m")
    assert installed is not None and installed.model_id == "u"
    assert (store.model_path("m") / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in store.models_dir.iterdir()) == ["m"]
    assert sorted(p.name for p in store.manifests_dir.iterdir()) == ["m.json"]


# --- C: partial bytes -------------------------------------------------------------------------


@pytest.fixture
def failed_with_partial(make_server, fileserver):
    """A download that failed after 50,000 of its 300,000 bytes, and its server."""
    payload = os.urandom(300_000)
    fileserver.add("/w.safetensors", payload, faults=[DropAfter(50_000)])
    server = make_server([fileserver.host_port], fetch_retries=0, disk_reserve_mb=0)
    job = post_url(server, fileserver.url("/w.safetensors"), "w").json()["download_id"]
    assert server.wait_for(job)["status"] == "failed"
    return server, payload


def part_files(server) -> list[Path]:
    return list((server.settings.home / "partial").glob("*.part"))


def test_partial_bytes_are_reported_and_removed_by_delete(failed_with_partial):
    server, _ = failed_with_partial
    on_disk = sum(p.stat().st_size for p in part_files(server))
    assert on_disk == 50_000
    info = server.client.get("/models/cache/info").json()
    assert info["partial_bytes"] == on_disk and info["partial_mb"] == 0.05
    response = server.client.delete("/models/download/w")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["partial_bytes_removed"] == 50_000
    assert body["message"] == (
        "w was not installed; removed the partial bytes its failed or cancelled download(s) "
        "left (50000 partial bytes removed)"
    )
    assert server.client.get("/models/cache/info").json()["partial_bytes"] == 0
    assert part_files(server) == []
    missing = server.client.delete("/models/download/never-downloaded")
    assert missing.status_code == 404
    assert missing.json()["success"] is False


def test_forced_retry_discards_partial_bytes(failed_with_partial, fileserver):
    server, payload = failed_with_partial
    assert part_files(server)
    fileserver.reset_log()
    response = server.client.post(
        "/models/manage",
        params={"action": "retry_download", "model_name": "w", "force_redownload": "true"},
    )
    assert response.status_code == 200, response.text
    assert server.wait_for(response.json()["download_id"])["status"] == "completed"
    gets = [r for r in fileserver.requests if r.method == "GET"]
    assert len(gets) == 1
    assert gets[0].range_start is None and "range" not in {k.lower() for k in gets[0].headers}
    assert gets[0].body_bytes_sent == len(payload)  # served again from byte 0
    assert server.client.get("/models/cache/info").json()["partial_bytes"] == 0


def test_plain_retry_resumes_from_the_partial_bytes(failed_with_partial, fileserver):
    server, payload = failed_with_partial
    fileserver.reset_log()
    response = server.client.post(
        "/models/manage", params={"action": "retry_download", "model_name": "w"}
    )
    assert response.status_code == 200, response.text
    assert server.wait_for(response.json()["download_id"])["status"] == "completed"
    gets = [r for r in fileserver.requests if r.method == "GET"]
    assert [g.range_start for g in gets] == [50_000]
    assert gets[0].body_bytes_sent == len(payload) - 50_000
