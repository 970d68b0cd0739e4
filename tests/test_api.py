"""The HTTP API end to end: a real modelhost server, a real upstream file server."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import pytest
from fileserver import DropAfter, Rate, Status

SIZE = 2 * 1024 * 1024 + 77


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def body(url: str, name: str, **extra) -> dict:
    return {"source": "url", "model_id": url, "name": name, **extra}


@pytest.fixture
def payload() -> bytes:
    return os.urandom(SIZE)


def test_download_installs_verified_model(make_server, fileserver, payload):
    fileserver.add("/m/model.safetensors", payload)
    server = make_server([fileserver.host_port])
    url = fileserver.url("/m/model.safetensors")

    response = server.client.post("/models/download", json=body(url, "tiny", sha256=sha(payload)))
    assert response.status_code == 202
    started = response.json()
    assert started["success"] is True
    assert started["status"] in ("downloading", "pending")
    assert started["download_info"]["size_bytes"] == SIZE
    assert started["download_info"]["estimated_size_mb"] == round(SIZE / 1e6, 3)
    assert started["estimated_time"] is None  # nothing measured yet

    done = server.wait_for(started["download_id"])
    assert done["status"] == "completed", done
    assert done["progress"] == 100.0
    assert done["bytes_downloaded"] == done["bytes_total"] == SIZE

    info = server.client.get("/models/download/tiny/info").json()
    assert info["files"] == [
        {"path": "model.safetensors", "size": SIZE, "sha256": sha(payload), "git_sha1": None}
    ]
    assert info["source"] == "url" and info["model_id"] == url
    assert info["revision"] == fileserver.etag("/m/model.safetensors")
    with open(os.path.join(info["path"], "model.safetensors"), "rb") as handle:
        assert handle.read() == payload
    assert list((server.settings.home / "partial").iterdir()) == []  # no leftover state

    cache = server.client.get("/models/cache/info").json()
    assert cache["cache_directory"] == str(server.settings.home)
    assert cache["total_models"] == 1 and cache["models"] == ["tiny"]
    assert cache["total_size_bytes"] == SIZE
    assert cache["cache_optimization"]["cache_hit_rate"] == 0.0

    again = server.client.post("/models/download", json=body(url, "tiny"))
    assert again.status_code == 200
    assert again.json()["status"] == "already_exists"
    # A bare weights file is installed, never loaded: the answer does not say "ready to use".
    assert again.json()["message"] == (
        "Model 'tiny' is already installed (not loaded: a bare weights file has no architecture "
        'to load it into (a TorchScript file loads with "load_as": "torchscript"))'
    )
    hits = server.client.get("/models/cache/info").json()["cache_optimization"]
    assert (hits["cache_hit_rate"], hits["download_requests"], hits["cache_hits"]) == (0.5, 2, 1)
    # Exactly one transfer happened.
    assert fileserver.count("GET", "/m/model.safetensors") == 1


def test_cache_hit_rate_is_null_before_any_request(make_server, fileserver):
    server = make_server([fileserver.host_port])
    assert (
        server.client.get("/models/cache/info").json()["cache_optimization"]["cache_hit_rate"]
        is None
    )


def test_twenty_identical_requests_share_one_job_and_one_transfer(make_server, fileserver, payload):
    fileserver.add("/w.safetensors", payload, faults=[Rate(8_000_000)])
    server = make_server([fileserver.host_port])
    request = body(fileserver.url("/w.safetensors"), "shared")

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            return client.post("/models/download", json=request)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    assert {r.status_code for r in responses} == {202}
    ids = {r.json()["download_id"] for r in responses}
    assert len(ids) == 1
    assert server.wait_for(ids.pop())["status"] == "completed"
    assert fileserver.count("GET", "/w.safetensors") == 1
    assert len(server.client.get("/models/downloads").json()["downloads"]) == 1


def test_at_most_max_downloads_transfer_at_once(make_server, fileserver, payload):
    for index in range(3):
        fileserver.add(f"/f{index}.safetensors", payload, faults=[Rate(3_000_000)])
    server = make_server([fileserver.host_port], max_downloads=2)
    ids = [
        server.client.post(
            "/models/download", json=body(fileserver.url(f"/f{i}.safetensors"), f"m{i}")
        ).json()["download_id"]
        for i in range(3)
    ]
    states = [server.client.get(f"/models/download/status/{i}").json()["status"] for i in ids]
    assert states == ["downloading", "downloading", "pending"]
    pending = server.client.get("/models/downloads", params={"status": "pending"}).json()
    assert [d["download_id"] for d in pending["downloads"]] == [ids[2]]
    assert server.client.get("/health").json()["downloads_pending"] == 1
    for job_id in ids:
        assert server.wait_for(job_id)["status"] == "completed"


@pytest.mark.serial  # timing-sensitive: run alone
def test_status_reports_live_progress(make_server, fileserver, payload):
    fileserver.add("/slow.safetensors", payload, faults=[Rate(1_000_000)])
    server = make_server([fileserver.host_port])
    job = server.client.post(
        "/models/download", json=body(fileserver.url("/slow.safetensors"), "slow")
    ).json()
    time.sleep(0.8)
    status = server.client.get(f"/models/download/status/{job['download_id']}").json()
    assert status["status"] == "downloading"
    assert 0 < status["bytes_downloaded"] < SIZE
    assert status["progress"] == round(100 * status["bytes_downloaded"] / SIZE, 1)
    assert 300_000 < status["speed_bytes_per_s"] < 3_000_000
    expected_eta = (SIZE - status["bytes_downloaded"]) / status["speed_bytes_per_s"]
    assert status["eta"] == pytest.approx(expected_eta, rel=0.05)
    server.client.post(f"/models/download/{job['download_id']}/cancel")


@pytest.mark.serial  # timing-sensitive: run alone
def test_cancel_ends_job_within_a_second_and_keeps_partial(make_server, fileserver, payload):
    fileserver.add("/c.safetensors", payload, faults=[Rate(500_000)])
    server = make_server([fileserver.host_port])
    job_id = server.client.post(
        "/models/download", json=body(fileserver.url("/c.safetensors"), "c")
    ).json()["download_id"]
    time.sleep(0.4)
    started = time.monotonic()
    cancelled = server.client.post(f"/models/download/{job_id}/cancel")
    assert time.monotonic() - started < 1.0
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    # The bytes fetched stay for a retry (a day), and are reported; DELETE removes them.
    kept = server.client.get("/models/cache/info").json()
    assert kept["total_models"] == 0 and 0 < kept["partial_bytes"] < SIZE
    assert f"; {kept['partial_bytes']} bytes already fetched are kept for 24 hours" in (
        cancelled.json()["message"]
    )
    assert server.client.delete("/models/download/c").json()["partial_bytes_removed"] == (
        kept["partial_bytes"]
    )
    assert not list((server.settings.home / "partial").glob("*.part"))
    again = server.client.post(f"/models/download/{job_id}/cancel")
    assert again.status_code == 409 and "already ended" in again.json()["message"]


def test_delete_cancels_running_download(make_server, fileserver, payload):
    fileserver.add("/d.safetensors", payload, faults=[Rate(500_000)])
    server = make_server([fileserver.host_port])
    job_id = server.client.post(
        "/models/download", json=body(fileserver.url("/d.safetensors"), "d")
    ).json()["download_id"]
    time.sleep(0.3)
    deleted = server.client.delete("/models/download/d").json()
    assert deleted["cancelled_download_id"] == job_id
    assert server.wait_for(job_id)["status"] == "cancelled"


def test_delete_installed_model_frees_its_blobs(make_server, fileserver, payload):
    fileserver.add("/e.safetensors", payload)
    server = make_server([fileserver.host_port])
    job_id = server.client.post(
        "/models/download", json=body(fileserver.url("/e.safetensors"), "e")
    ).json()["download_id"]
    server.wait_for(job_id)
    response = server.client.delete("/models/download/e")
    assert response.status_code == 200
    assert response.json()["message"] == "Successfully removed model from cache: e"
    assert response.json()["freed_mb"] == round(SIZE / 1e6, 3)
    assert list((server.settings.home / "blobs" / "sha256").iterdir()) == []
    missing = server.client.delete("/models/download/e")
    assert missing.status_code == 404
    assert missing.json() == {
        "success": False,
        "message": "Model not found in cache: e",
        "error": "Model does not exist",
    }


def test_wrong_digest_fails_and_installs_nothing(make_server, fileserver, payload):
    fileserver.add("/x.safetensors", payload)
    server = make_server([fileserver.host_port])
    job_id = server.client.post(
        "/models/download", json=body(fileserver.url("/x.safetensors"), "x", sha256="0" * 64)
    ).json()["download_id"]
    status = server.wait_for(job_id)
    assert status["status"] == "failed"
    assert sha(payload) in status["message"] and "0" * 64 in status["message"]
    assert status["error"] == "Digest mismatch"
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert server.client.get("/models/download/x/info").status_code == 404


def test_retry_download_resumes_and_force_starts_over(make_server, fileserver, payload):
    cut = 700_000
    fileserver.add("/r.safetensors", payload, faults=[DropAfter(cut), Status(500, times=4)])
    server = make_server([fileserver.host_port])  # 3 retries: the fourth 500 ends the job
    first = server.client.post(
        "/models/download", json=body(fileserver.url("/r.safetensors"), "r")
    ).json()["download_id"]
    failed = server.wait_for(first)
    assert failed["status"] == "failed"
    assert "500" in failed["message"] and "gave up after 4 attempts" in failed["message"]

    retried = server.client.post(
        "/models/manage", params={"action": "retry_download", "model_name": "r"}
    ).json()
    assert retried["action"] == "retry_download" and retried["download_id"] != first
    assert server.wait_for(retried["download_id"])["status"] == "completed"
    assert fileserver.requests[-1].range_start == cut  # resumed, not restarted

    # Installed now: a plain retry refuses, a forced one downloads everything again.
    refused = server.client.post(
        "/models/manage", params={"action": "retry_download", "model_name": "r"}
    )
    assert refused.status_code == 409
    before = fileserver.bytes_sent("/r.safetensors")
    forced = server.client.post(
        "/models/manage",
        params={"action": "retry_download", "model_name": "r", "force_redownload": "true"},
    ).json()
    assert server.wait_for(forced["download_id"])["status"] == "completed"
    assert fileserver.bytes_sent("/r.safetensors") - before == SIZE
    assert fileserver.requests[-1].range_start is None


def test_upstream_missing_file_is_a_failed_job_and_nothing_installed(make_server, fileserver):
    server = make_server([fileserver.host_port])
    response = server.client.post(
        "/models/download", json=body(fileserver.url("/nope.safetensors"), "nope")
    )
    assert response.status_code == 404
    answer = response.json()
    assert answer["success"] is False and answer["status"] == "failed"
    assert "404" in answer["message"]
    status = server.client.get(f"/models/download/status/{answer['download_id']}").json()
    assert status["status"] == "failed" and "404" in status["message"]
    assert server.client.get("/models/cache/info").json()["total_models"] == 0


def test_name_conflicts(make_server, fileserver, payload):
    fileserver.add("/a.safetensors", payload)
    fileserver.add("/b.safetensors", payload)
    server = make_server([fileserver.host_port])
    job_id = server.client.post(
        "/models/download", json=body(fileserver.url("/a.safetensors"), "same")
    ).json()["download_id"]
    server.wait_for(job_id)
    response = server.client.post(
        "/models/download", json=body(fileserver.url("/b.safetensors"), "same")
    )
    assert response.status_code == 409
    assert "already installed as 'same'" in response.json()["message"]


def test_cache_limit_evicts_least_recently_used(make_server, fileserver):
    blobs = {name: os.urandom(400_000) for name in ("one", "two", "three")}
    for name, data in blobs.items():
        fileserver.add(f"/{name}.safetensors", data)
    server = make_server([fileserver.host_port], cache_limit_gb=900_000 / 1024**3)
    for name in blobs:
        job_id = server.client.post(
            "/models/download", json=body(fileserver.url(f"/{name}.safetensors"), name)
        ).json()["download_id"]
        status = server.wait_for(job_id)
    assert "evicted to stay within the cache budget: one" in status["message"]
    cache = server.client.get("/models/cache/info").json()
    assert cache["models"] == ["three", "two"]
    assert cache["total_size_bytes"] == 800_000
    too_big = os.urandom(1_000_000)
    fileserver.add("/big.safetensors", too_big)
    refused = server.client.post(
        "/models/download", json=body(fileserver.url("/big.safetensors"), "big")
    )
    assert refused.status_code == 507
    assert "more than the whole cache budget" in refused.json()["message"]


BAD_REQUESTS = [
    (
        {"source": "invalid_source", "model_id": "x", "name": "n"},
        400,
        "Invalid source. Must be one of: [pytorch_hub, torchvision, huggingface, url, "
        "tts_auto, torchaudio, local]",
    ),
    ({"source": "url", "model_id": "URL", "name": "../x"}, 400, "Invalid model name"),
    ({"source": "url", "model_id": "URL", "name": ""}, 400, "Invalid model name"),
    ({"source": "url", "model_id": "URL", "name": "a" * 300}, 400, "Invalid model name"),
    ({"source": "url", "model_id": "URL", "name": "a/b"}, 400, "Invalid model name"),
    (
        {"source": "url", "model_id": "http://example.com/w.safetensors", "name": "n"},
        403,
        "not in MODELHOST_URL_ALLOW",
    ),
    (
        {"source": "url", "model_id": "http://10.1.2.3/w.safetensors", "name": "n"},
        403,
        "not in MODELHOST_URL_ALLOW",
    ),
    (
        {"source": "url", "model_id": "http://169.254.169.254/latest", "name": "n"},
        403,
        "not in MODELHOST_URL_ALLOW",
    ),
    (
        {"source": "url", "model_id": "ftp://127.0.0.1/w.safetensors", "name": "n"},
        403,
        "Only http and https",
    ),
    ({"source": "url", "model_id": "file:///etc/passwd", "name": "n"}, 403, "Only http and https"),
    ({"source": "url", "model_id": "URL", "name": "n", "sha256": "xyz"}, 422, "sha256"),
    ({"source": "url", "model_id": "URL", "name": "n", "bogus_field": 1}, 422, "bogus_field"),
    ({"source": "url", "name": "n"}, 422, "model_id: Field required"),
    # A TorchScript archive is code, not a state dict: never converted, always opt-in.
    (
        {"source": "url", "model_id": "URL_PTH", "name": "n", "load_as": "torchscript"},
        400,
        "allow_pickle",
    ),
]


@pytest.mark.parametrize("request_body, status, fragment", BAD_REQUESTS)
def test_bad_requests_get_clear_errors_and_change_nothing(
    make_server, fileserver, request_body, status, fragment
):
    fileserver.add("/w.safetensors", b"weights")
    fileserver.add("/w.pth", b"pickle")
    server = make_server([fileserver.host_port])
    replacements = {"URL": fileserver.url("/w.safetensors"), "URL_PTH": fileserver.url("/w.pth")}
    request_body = {k: replacements.get(v, v) for k, v in request_body.items()}
    response = server.client.post("/models/download", json=request_body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["success"] is False and fragment in answer["message"], answer
    assert isinstance(answer["error"], str) and answer["error"]
    assert server.client.get("/models/downloads").json()["total"] == 0
    assert server.client.get("/models/cache/info").json()["total_models"] == 0
    assert fileserver.count("GET") == 0


def test_malformed_json_is_422(make_server, fileserver):
    server = make_server([fileserver.host_port])
    response = server.client.post(
        "/models/download", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["message"]


@pytest.mark.parametrize(
    "method, path, status, fragment",
    [
        ("GET", "/models/download/status/doesnotexist", 404, "Download not found"),
        ("POST", "/models/download/doesnotexist/cancel", 404, "Download not found"),
        ("GET", "/models/download/ghost/info", 404, "Model not found in cache: ghost"),
        ("GET", "/models/downloads?status=weird", 400, "Unknown status 'weird'"),
        ("POST", "/models/manage?action=explode&model_name=a", 400, "Unknown action"),
        ("POST", "/models/manage?action=optimize&model_name=ghost", 404, "Model not found"),
        ("POST", "/models/manage?action=retry_download&model_name=ghost", 404, "No download"),
        ("POST", "/models/manage?action=optimize&model_name=..%2Fx", 400, "Invalid model name"),
        ("DELETE", "/models/download/..%2E", 400, "Invalid model name"),
        ("GET", "/no/such/route", 404, "Not Found"),
    ],
)
def test_unknown_things_are_clear_errors(make_server, fileserver, method, path, status, fragment):
    server = make_server([fileserver.host_port])
    response = server.client.request(method, path)
    assert response.status_code == status, response.text
    assert response.json()["success"] is False
    assert fragment in response.json()["message"]


def test_optimize_needs_a_loaded_model_and_update_needs_revisions(make_server, fileserver):
    fileserver.add("/o.safetensors", b"weights")
    server = make_server([fileserver.host_port])
    job_id = server.client.post(
        "/models/download", json=body(fileserver.url("/o.safetensors"), "o")
    ).json()["download_id"]
    server.wait_for(job_id)
    optimize = server.client.post(
        "/models/manage", params={"action": "optimize", "model_name": "o"}
    )
    # Optimize loads an installed model on demand; this one cannot be loaded, and says why.
    assert optimize.status_code == 400
    assert "Model 'o' is stored download-only" in optimize.json()["message"]
    status = server.client.get(f"/models/download/status/{job_id}").json()
    assert "not loaded: a bare weights file has no architecture" in status["message"]
    update = server.client.post("/models/manage", params={"action": "update", "model_name": "o"})
    assert update.status_code == 400
    assert "no revisions to update to" in update.json()["message"]


def test_api_key_guards_everything_but_health(make_server, fileserver):
    server = make_server([fileserver.host_port], api_key="s3cret")
    assert server.client.get("/health").status_code == 200
    refused = server.client.get("/models")
    assert refused.status_code == 401
    assert "Authorization: Bearer" in refused.json()["message"]
    assert (
        server.client.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    allowed = server.client.get("/models", headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 200 and allowed.json()["success"] is True


def test_seed_listing_endpoints_have_the_seed_fields(make_server, fileserver):
    server = make_server([fileserver.host_port])
    models = server.client.get("/models").json()
    assert set(models) >= {
        "success",
        "timestamp",
        "total_models",
        "available_models",
        "models_info",
        "specialized_models",
        "audio_models",
    }
    assert models["audio_models"]["loaded_audio_models"] == []
    available = server.client.get("/models/available").json()
    assert set(available) >= {
        "available_models",
        "total_available",
        "categories",
        "popular_tts_models",
        "download_recommendations",
    }
    assert available["available_models"]["speecht5_tts"]["model_id"] == "microsoft/speecht5_tts"
    managed = server.client.get("/models/managed").json()
    assert managed["total_models"] == 0 and managed["summary"]["total_loaded"] == 0
    assert managed["categories"] == {"tts_models": [], "other_models": []}


def test_graceful_restart_resumes_interrupted_job(make_server, fileserver, payload, tmp_path):
    fileserver.add("/g.safetensors", payload, faults=[Rate(1_500_000, times=1)])
    home = tmp_path / "shared-home"
    first = make_server([fileserver.host_port], home=home)
    job_id = first.client.post(
        "/models/download", json=body(fileserver.url("/g.safetensors"), "g", sha256=sha(payload))
    ).json()["download_id"]
    time.sleep(0.7)
    first.stop()
    kept = fileserver.bytes_sent("/g.safetensors")
    assert 0 < kept < SIZE

    second = make_server([fileserver.host_port], home=home)
    status = second.wait_for(job_id)
    assert status["status"] == "completed", status
    first_get, last_get = [r for r in fileserver.requests if r.method == "GET"]
    resumed_at = last_get.range_start
    # Resumed where the first server stopped; only what sat unread in socket buffers when
    # it stopped was sent twice.
    assert resumed_at is not None and 0 < resumed_at <= first_get.body_bytes_sent
    assert last_get.body_bytes_sent == SIZE - resumed_at
    assert first_get.body_bytes_sent - resumed_at < 0.1 * SIZE
    info = second.client.get("/models/download/g/info").json()
    assert info["files"][0]["sha256"] == sha(payload)


@pytest.mark.serial  # asserts a latency bound: run alone, not in the parallel pass
def test_event_loop_stays_responsive_during_transfers(make_server, fileserver):
    big = os.urandom(32 * 1024 * 1024)
    fileserver.add("/b1.safetensors", big)
    fileserver.add("/b2.safetensors", big + b"2")
    server = make_server([fileserver.host_port])
    ids = [
        server.client.post(
            "/models/download", json=body(fileserver.url(f"/b{i}.safetensors"), f"b{i}")
        ).json()["download_id"]
        for i in (1, 2)
    ]
    latencies = []
    stop = threading.Event()
    while not stop.is_set():
        started = time.perf_counter()
        status = server.client.get(f"/models/download/status/{ids[0]}").json()
        latencies.append(time.perf_counter() - started)
        if status["status"] == "completed":
            stop.set()
    assert max(latencies) < 0.5, max(latencies)
    for job_id in ids:
        assert server.wait_for(job_id)["status"] == "completed"


def test_metrics_count_what_happened(make_server, fileserver, payload):
    fileserver.add("/p.safetensors", payload)
    server = make_server([fileserver.host_port])
    request = body(fileserver.url("/p.safetensors"), "p")
    server.wait_for(server.client.post("/models/download", json=request).json()["download_id"])
    server.client.post("/models/download", json=request)  # a cache hit
    text = server.client.get("/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["modelhost_download_requests_total"] == 2
    assert values["modelhost_cache_hits_total"] == 1
    assert values["modelhost_bytes_transferred_total"] == SIZE
    assert values["modelhost_cache_bytes"] == SIZE
    assert values["modelhost_models_installed"] == 1
    assert values['modelhost_jobs{state="downloading"}'] == 0


def test_estimated_time_uses_measured_throughput(make_server, fileserver, payload):
    fileserver.add("/first.safetensors", payload, faults=[Rate(4_000_000)])
    second = os.urandom(3 * SIZE)
    fileserver.add("/second.safetensors", second)
    server = make_server([fileserver.host_port])
    first = server.client.post(
        "/models/download", json=body(fileserver.url("/first.safetensors"), "first")
    ).json()
    done = server.wait_for(first["download_id"])
    seconds = (
        datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])
    ).total_seconds()
    measured = SIZE / seconds
    answer = server.client.post(
        "/models/download", json=body(fileserver.url("/second.safetensors"), "second")
    ).json()
    # estimated_seconds is rounded to 0.1 s
    assert answer["estimated_seconds"] == pytest.approx(len(second) / measured, abs=0.051)
    assert answer["estimated_time"] == "under a minute"
