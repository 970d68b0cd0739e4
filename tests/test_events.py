"""Live progress streams (Server-Sent Events): one job's, and every job's.

A throttled loopback Hub makes the transfers last long enough to watch; every stream is
read with a real HTTP client and parsed as SSE.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hubserver import HubServer
from tiny_models import publish_all

from modelhost.cli import sse

MB = 1_000_000
RATE = 6 * MB  # per connection: two 12 MB files take about two seconds
BIG = {"a.bin": os.urandom(12 * MB), "b.bin": os.urandom(12 * MB)}
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def hub(tiny_models):
    with HubServer(rate_bytes_per_s=RATE) as server:
        publish_all(server, tiny_models)
        server.add_repo("test-org/two-files", BIG, lfs_threshold=1000)
        yield server


@pytest.fixture
def modelhost(make_server, hub, tmp_path):
    def start(**overrides):
        values = {"hf_endpoint": hub.base_url, "hf_hub_cache": tmp_path / "none", "device": "cpu"}
        values.update(overrides)
        return make_server([], **values)

    return start


def sse_messages(response: httpx.Response) -> Iterator[tuple[float, str, dict]]:
    """(arrival time, event name, data) for each message of an SSE response."""
    for message in sse.messages(response.iter_lines()):
        yield time.monotonic(), message.event, message.data


def read_stream(client: httpx.Client, path: str, until=None, limit_s: float = 60) -> list:
    """Every message of the stream at ``path``, until it ends (or ``until(message)``)."""
    messages = []
    deadline = time.monotonic() + limit_s
    with client.stream("GET", path, timeout=limit_s) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in sse_messages(response):
            messages.append(message)
            if until is not None and until(message):
                break
            assert time.monotonic() < deadline, "stream did not end"
    return messages


def post(server, **body) -> dict:
    response = server.client.post("/models/download", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def phases(messages) -> list[str]:
    """The phases the status events went through, repeats collapsed."""
    seen: list[str] = []
    for _, event, data in messages:
        if event == "status" and (not seen or seen[-1] != data["phase"]):
            seen.append(data["phase"])
    return seen


@pytest.mark.serial  # timing-sensitive: run alone
def test_job_stream_orders_phases_and_bytes_and_ends_after_the_final_status(modelhost):
    server = modelhost()
    job = post(server, source="huggingface", model_id="test-org/two-files", name="two", load=False)
    messages = read_stream(server.client, f"/models/download/{job['download_id']}/events")

    first_time, first_event, first = messages[0]
    assert first_event == "status" and first["download_id"] == job["download_id"]
    assert first["status"] == "downloading"
    # The stream ended by itself, right after the final status.
    assert messages[-1][1] == "status" and messages[-1][2]["status"] == "completed"
    assert all(data["status"] not in TERMINAL for _, _, data in messages[:-1])
    assert phases(messages) == ["downloading", "verifying", "committing", "completed"]

    progress = [(t, data) for t, event, data in messages if event == "progress"]
    assert len(progress) >= 4, [d["bytes_downloaded"] for _, d in progress]
    counts = [data["bytes_downloaded"] for _, data in progress]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    total = sum(len(data) for data in BIG.values())
    for _, data in progress:
        assert data["bytes_total"] == total and data["event"] == "progress"
        files = {f["path"]: f for f in data["files"]}
        assert set(files) == set(BIG)
        # The files' bytes add up to the job's, and none exceeds its size.
        assert sum(f["bytes_downloaded"] for f in files.values()) == data["bytes_downloaded"]
        for path, f in files.items():
            assert (
                f["bytes_total"] == len(BIG[path])
                and 0 <= f["bytes_downloaded"] <= f["bytes_total"]
            )
            assert f["status"] in {"queued", "downloading", "verifying", "done"}
    moving = [data for _, data in progress if 0 < data["bytes_downloaded"] < total]
    assert moving and all(d["speed_bytes_per_s"] and d["eta"] is not None for d in moving[2:])
    # Measured speed: close to the throttle (two connections at RATE each).
    assert 0.4 * 2 * RATE < moving[-1]["speed_bytes_per_s"] < 1.6 * 2 * RATE
    # At most one progress event per 250 ms (arrival times allow a little jitter).
    gaps = [b[0] - a[0] for a, b in zip(progress, progress[1:], strict=False)]
    assert min(gaps) > 0.15, gaps

    final = messages[-1][2]
    assert final["bytes_downloaded"] == total and final["progress"] == 100.0
    assert [f["status"] for f in final["files"]] == ["done", "done"]
    # The stream's final state is the status endpoint's.
    status = server.client.get(f"/models/download/status/{job['download_id']}").json()
    assert {k: status[k] for k in ("status", "bytes_downloaded", "message")} == {
        k: final[k] for k in ("status", "bytes_downloaded", "message")
    }
    info = server.client.get("/models/download/two/info").json()
    assert {f["path"]: f["sha256"] for f in info["files"]} == {
        path: hashlib.sha256(data).hexdigest() for path, data in BIG.items()
    }


def test_loading_phase_and_late_subscribers_get_the_current_state_first(modelhost):
    server = modelhost()
    job = post(server, source="huggingface", model_id="test-org/tiny-bert", name="bert")
    messages = read_stream(server.client, f"/models/download/{job['download_id']}/events")
    assert phases(messages)[-3:] == ["committing", "loading", "completed"]
    assert "loaded on cpu" in messages[-1][2]["message"]

    # A subscriber arriving after the end gets the final state alone, and the stream ends.
    late = read_stream(server.client, f"/models/download/{job['download_id']}/events")
    assert [(event, data["status"]) for _, event, data in late] == [("status", "completed")]
    assert late[0][2]["message"] == messages[-1][2]["message"]


def test_mid_download_subscriber_starts_from_the_bytes_already_moved(modelhost):
    server = modelhost()
    job = post(server, source="huggingface", model_id="test-org/two-files", name="two", load=False)
    path = f"/models/download/{job['download_id']}/events"
    time.sleep(1.0)
    messages = read_stream(server.client, path)
    _, event, first = messages[0]
    assert event == "status" and first["status"] == "downloading"
    assert first["phase"] == "downloading" and first["bytes_downloaded"] > 2 * MB
    assert messages[-1][2]["status"] == "completed"


def test_all_jobs_stream_shows_planning_then_each_jobs_events(modelhost, hub):
    server = modelhost()
    collected: list = []
    opened = threading.Event()

    def listen() -> None:
        with server.client.stream("GET", "/events", timeout=60) as response:
            opened.set()
            for message in sse_messages(response):
                collected.append(message)
                if message[2]["status"] == "completed" and message[1] == "status":
                    return

    listener = threading.Thread(target=listen)
    listener.start()
    assert opened.wait(10)
    time.sleep(0.2)  # the subscription is made when the response starts
    job = post(server, source="huggingface", model_id="test-org/two-files", name="two", load=False)
    listener.join(60)
    assert not listener.is_alive()
    ours = [
        (event, data) for _, event, data in collected if data["download_id"] == job["download_id"]
    ]
    assert ours[0][0] == "status" and (ours[0][1]["status"], ours[0][1]["phase"]) == (
        "pending",
        "planning",
    )
    assert [phase for phase in phases(collected)][:2] == ["planning", "pending"]
    assert ours[-1][1]["status"] == "completed"
    assert any(event == "progress" for event, _ in ours)

    # A job being downloaded is in the opening state of a stream opened later.
    job2 = post(
        server, source="huggingface", model_id="test-org/two-files", name="two-again", load=False
    )
    opening = read_stream(server.client, "/events", until=lambda m: True)
    assert opening[0][2]["download_id"] == job2["download_id"]
    assert opening[0][2]["status"] == "downloading"
    server.wait_for(job2["download_id"])


def test_failed_planning_ends_its_planning_event_as_failed(modelhost):
    server = modelhost()
    collected: list = []
    opened = threading.Event()

    def listen() -> None:
        with server.client.stream("GET", "/events", timeout=30) as response:
            opened.set()
            for message in sse_messages(response):
                collected.append(message)
                if message[2]["status"] == "failed":
                    return

    listener = threading.Thread(target=listen)
    listener.start()
    assert opened.wait(10)
    time.sleep(0.2)
    response = server.client.post(
        "/models/download",
        json={"source": "huggingface", "model_id": "test-org/no-such-repo", "name": "missing"},
    )
    assert response.status_code == 404
    listener.join(30)
    assert [(m[2]["status"], m[2]["phase"]) for m in collected] == [
        ("pending", "planning"),
        ("failed", "failed"),
    ]
    body = response.json()
    assert collected[-1][2]["message"].endswith(body["message"])
    # The failure is recorded under the id the planning event announced.
    assert collected[0][2]["download_id"] == collected[-1][2]["download_id"] == body["download_id"]
    status = server.client.get(f"/models/download/status/{body['download_id']}").json()
    assert status["status"] == "failed" and status["message"] == collected[-1][2]["message"]


def test_cancel_ends_the_stream_with_cancelled(modelhost):
    server = modelhost()
    job = post(server, source="huggingface", model_id="test-org/two-files", name="two", load=False)
    path = f"/models/download/{job['download_id']}/events"

    def cancel_soon() -> None:
        time.sleep(0.6)
        server.client.post(f"/models/download/{job['download_id']}/cancel")

    threading.Thread(target=cancel_soon).start()
    messages = read_stream(server.client, path)
    assert messages[-1][1] == "status" and messages[-1][2]["status"] == "cancelled"
    assert 0 < messages[-1][2]["bytes_downloaded"] < 24 * MB


def stream_count(server) -> float:
    text = server.client.get("/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("modelhost_event_streams "))
    return float(line.split()[1])


def test_disconnects_cost_nothing(modelhost):
    server = modelhost()
    job = post(server, source="huggingface", model_id="test-org/two-files", name="two", load=False)
    clients = [httpx.Client(base_url=server.base_url, timeout=10) for _ in range(10)]
    for index, client in enumerate(clients):
        path = "/events" if index % 2 else f"/models/download/{job['download_id']}/events"
        read_stream(client, path, until=lambda m: True)  # the first message, then hang up
    for client in clients:
        client.close()
    deadline = time.monotonic() + 5
    while stream_count(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stream_count(server) == 0
    assert server.wait_for(job["download_id"])["status"] == "completed"


def test_unknown_job_is_404_and_streams_need_the_key(modelhost):
    server = modelhost(api_key="sekrit")
    response = server.client.get("/models/download/nope/events")
    assert response.status_code == 401 and response.json()["success"] is False
    headers = {"Authorization": "Bearer sekrit"}
    response = server.client.get("/models/download/abcdef123456/events", headers=headers)
    assert response.status_code == 404
    body = response.json()
    assert body["success"] is False and "abcdef123456" in body["message"]
    assert (
        server.client.get("/events", headers={"Authorization": "Bearer wrong"}).status_code == 401
    )


def open_and_drop(port: int, path: str, behind: int = 0) -> None:
    """Send a stream's request and go away (a reset, as a closed browser tab leaves it)
    before any event. ``behind``: pipelined after that many large answers the client never
    reads, so the stream's answer waits for the server's paused writes when it goes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    host = f"Host: 127.0.0.1:{port}\r\n"
    requests = f"GET /openapi.json HTTP/1.1\r\n{host}\r\n" * behind
    sock.sendall(f"{requests}GET {path} HTTP/1.1\r\n{host}\r\n".encode())
    if behind:
        time.sleep(0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_streams_dropped_before_their_first_event_are_released(make_server, fileserver):
    """200 streams opened and dropped before their first event (half /events, half one
    finished job's; at once, behind unread answers, or once the headers came) leave no
    subscription on the bus, as /metrics counts them."""
    fileserver.add("/w.safetensors", b"x" * 1000)
    server = make_server([fileserver.host_port])
    url = fileserver.url("/w.safetensors")
    job = post(server, source="url", model_id=url, name="w", load=False)
    assert server.wait_for(job["download_id"])["status"] == "completed"
    paths = ["/events", f"/models/download/{job['download_id']}/events"]
    for index in range(160):
        open_and_drop(server.port, paths[index % 2])
    for index in range(20):
        open_and_drop(server.port, paths[index % 2], behind=20)
    for _ in range(20):
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            with client.stream("GET", "/events") as response:
                assert response.status_code == 200  # the headers, and no event yet
    deadline = time.monotonic() + 10
    while stream_count(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stream_count(server) == 0
