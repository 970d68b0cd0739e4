"""Every call to another host is bounded and policed: a silent Hub answers 504 in time,
SIGTERM ends a server whose plan hangs, Hub redirects obey the allow-list, the token stays
with the Hub, and the Hub's error answers (a bare 404, a 503) mean what they say."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fileserver import FileServer
from hubserver import HubServer

from modelhost.errors import Cancelled, UpstreamTimeout
from modelhost.fetch import CancelToken, FetchEngine, RetryPolicy, UrlPolicy
from modelhost.sources.hub_api import HubApi

# Timing-sensitive: run alone, after the parallel pass (see pyproject's markers).
pytestmark = pytest.mark.serial

SRC = Path(__file__).resolve().parents[1] / "src"
REPO = "test-org/tiny"


class SilentServer:
    """Accepts TCP connections and never reads or answers (a hung upstream)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.host_port = f"127.0.0.1:{self.port}"
        self.base_url = f"http://{self.host_port}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read: the client waits

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def hub():
    with HubServer() as server:
        server.add_repo(REPO, {"config.json": b'{"model_type": "bert"}', "vocab.txt": b"a\nb\n"})
        yield server


def post_download(server, model_id: str = REPO, **extra) -> httpx.Response:
    body = {"source": "huggingface", "model_id": model_id, "name": "tiny", "load": False}
    return server.client.post("/models/download", json={**body, **extra})


def assert_failed_job(server, answer: dict) -> dict:
    status = server.client.get(f"/models/download/status/{answer['download_id']}").json()
    assert status["status"] == "failed", status
    assert answer["message"] in status["message"]
    return status


def test_silent_hub_answers_504_in_time_and_health_stays_fast(make_server, silent, tmp_path):
    server = make_server(
        [], hf_endpoint=silent.base_url, upstream_timeout_s=2, hf_hub_cache=tmp_path / "none"
    )
    result: dict = {}

    def post() -> None:
        started = time.monotonic()
        result["response"] = post_download(server)
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=post)
    thread.start()
    health_times = []
    while thread.is_alive():
        started = time.monotonic()
        assert server.client.get("/health").status_code == 200
        health_times.append(time.monotonic() - started)
        time.sleep(0.1)
    thread.join()

    response = result["response"]
    assert 2 <= result["seconds"] < 2 + 5, result["seconds"]
    assert len(health_times) >= 10 and max(health_times) < 1, health_times
    assert response.status_code == 504, response.text
    body = response.json()
    assert body["success"] is False
    assert silent.host_port in body["message"] and "timed out" in body["message"]
    assert "MODELHOST_UPSTREAM_TIMEOUT_S" in body["message"]
    assert body["error"] == f"Upstream timed out: {silent.host_port}"
    assert silent.accepted, "the request never reached the silent host"
    status = assert_failed_job(server, body)
    assert status["error"] == body["error"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a subprocess server: about 15 s on a small machine
def test_sigterm_ends_a_server_whose_plan_hangs(silent, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "MODELHOST_HOME": str(tmp_path / "home"),
        "HF_ENDPOINT": silent.base_url,
        "HF_HUB_CACHE": str(tmp_path / "none"),
        "MODELHOST_UPSTREAM_TIMEOUT_S": "60",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "modelhost", "serve", "--port", str(port), "--log-level", "info"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "no server"
            time.sleep(0.1)
        answers: list = []

        def post() -> None:
            try:
                body = {"source": "huggingface", "model_id": REPO, "name": "tiny"}
                answers.append(httpx.post(f"{base}/models/download", json=body, timeout=90))
            except httpx.HTTPError as exc:
                answers.append(exc)

        threading.Thread(target=post, daemon=True).start()
        deadline = time.monotonic() + 10
        while not silent.accepted:  # the plan is now waiting on the silent Hub
            assert time.monotonic() < deadline, "the plan never reached the silent Hub"
            time.sleep(0.05)
        time.sleep(0.5)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        took = time.monotonic() - sent
        assert took < 10, f"SIGTERM took {took:.1f} s"
        # uvicorn re-raises the signal it handled once it has shut down cleanly.
        assert code in (0, -signal.SIGTERM), process.stderr.read().decode()
        assert "Application shutdown complete" in process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_hub_redirect_to_a_host_not_allowed_is_refused(make_server, hub, tmp_path):
    hub.answer_api(REPO, 302, {"Location": "http://169.254.169.254/latest/meta-data/"})
    server = make_server([], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "none")
    response = post_download(server)
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["success"] is False
    assert "Host 169.254.169.254:80 is not in MODELHOST_URL_ALLOW" in body["message"]
    assert body["error"] == "Host not allowed: 169.254.169.254"
    assert hub.count("GET", f"/api/models/{REPO}") == 1  # refused, not retried


def _name_on_a_private_address() -> str:
    """A host name (not an IP literal, not 'localhost') this machine resolves locally to a
    loopback or private address; the test needs no DNS."""
    import ipaddress

    for name in (socket.gethostname(), "ip6-localhost", "ip6-loopback"):
        try:
            infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
        except OSError:
            continue
        addresses = [ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos]
        if name != "localhost" and addresses and not any(a.is_global for a in addresses):
            return name
    pytest.skip("no local host name resolving to a non-public address")


def test_hub_redirect_to_an_allowed_name_on_a_private_address_is_refused(
    make_server, hub, tmp_path
):
    name = _name_on_a_private_address()
    trap = SilentServer(host="0.0.0.0")  # would see any connection to a local address
    try:
        hub.answer_api(REPO, 307, {"Location": f"http://{name}:{trap.port}/api/x"})
        server = make_server([name], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "none")
        response = post_download(server)
        assert response.status_code == 403, response.text
        assert "non-public address" in response.json()["message"]
        assert name in response.json()["message"]
        assert trap.accepted == []
    finally:
        trap.close()


def test_plain_404_without_error_code_is_not_found(make_server, hub, tmp_path):
    hub.answer_api(REPO, 404)
    server = make_server([], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "none")
    response = post_download(server)
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["success"] is False and body["error"] == "Not found upstream"
    assert f"{REPO}@main not found" in body["message"]
    assert "answered 404" in body["message"]
    assert_failed_job(server, body)


def test_hub_5xx_is_retried_then_502(make_server, hub, tmp_path):
    hub.answer_api(REPO, 503)
    server = make_server([], hf_endpoint=hub.base_url, hf_hub_cache=tmp_path / "none")
    response = post_download(server)
    assert response.status_code == 502, response.text
    body = response.json()
    assert "503" in body["message"] and "gave up after 3 tries" in body["message"]
    assert hub.count("GET", f"/api/models/{REPO}/revision/main") == 3  # 1 + 2 retries
    assert_failed_job(server, body)


def test_token_goes_to_the_hub_only_not_to_its_cdn(make_server, tmp_path):
    weights = os.urandom(3000)
    with HubServer(page_size=2) as hub, FileServer() as cdn:
        sha = hub.add_repo(
            REPO,
            {
                "config.json": b'{"model_type": "bert"}',
                "a/b.txt": b"b",
                "a/c.txt": b"c",
                "model.safetensors": weights,
            },
        )
        for blob in hub.export_blobs(tmp_path / "blobs"):
            cdn.add(f"/{blob.name}", blob.read_bytes())
        hub.redirect_lfs_to(cdn.base_url)
        server = make_server(
            [cdn.host_port],
            hf_endpoint=hub.base_url,
            hf_token="hf_secret",
            hf_hub_cache=tmp_path / "none",
        )
        response = post_download(server)
        assert response.status_code == 202, response.text
        status = server.wait_for(response.json()["download_id"])
        assert status["status"] == "completed", status

        info = server.client.get("/models/download/tiny/info").json()
        assert info["revision"] == sha
        assert sorted(f["path"] for f in info["files"]) == [
            "a/b.txt",
            "a/c.txt",
            "config.json",
            "model.safetensors",
        ]
        # 5 entries (a directory among them) in pages of 2: three tree requests.
        assert hub.count("GET", f"/api/models/{REPO}/tree/{sha}") == 3
        hub_requests = [r for r in hub.requests if r.path.startswith(("/api/", f"/{REPO}/"))]
        assert hub_requests and all(
            r.headers.get("Authorization") == "Bearer hf_secret" for r in hub_requests
        )
        cdn_requests = cdn.requests
        assert [r.path for r in cdn_requests] == [f"/{hub.file(REPO, 'model.safetensors').sha256}"]
        assert all(r.headers.get("Authorization") is None for r in cdn_requests)


def test_cancel_aborts_a_hanging_metadata_call_at_once(silent, tmp_path):
    engine = FetchEngine(
        tmp_path / "partial",
        UrlPolicy.from_hosts([silent.host_port]),
        RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05),
        upstream_timeout_s=60,
    )
    cancel = CancelToken()
    api = HubApi(engine, silent.base_url, cancel)
    outcome: list = []

    def ask() -> None:
        try:
            outcome.append(api.commit(REPO, "main"))
        except Exception as exc:  # what the call ended with is the assertion
            outcome.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 10
    while not silent.accepted:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    cancelled_at = time.monotonic()
    cancel.cancel("server shutting down")
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < 1
    assert isinstance(outcome[0], Cancelled) and outcome[0].message == "server shutting down"


def test_metadata_call_times_out_within_timeout_plus_grace(silent, tmp_path):
    engine = FetchEngine(
        tmp_path / "partial",
        UrlPolicy.from_hosts([silent.host_port]),
        RetryPolicy(retries=6, backoff_s=0.01, backoff_max_s=0.05),
        upstream_timeout_s=1,
    )
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as raised:
        engine.read_small(f"{silent.base_url}/config.json")
    took = time.monotonic() - started
    assert 1 <= took < 1 + 3 + 0.5, took
    assert raised.value.status_code == 504
    assert f"{silent.host_port} timed out (waiting for an answer" in raised.value.message
    # Retried while time was left: more than one connection, all within the bound.
    assert len(silent.accepted) >= 2


def test_a_name_lookup_that_never_answers_is_bounded(monkeypatch):
    """getaddrinfo has no timeout of its own: a resolver that hangs (here: one that sleeps
    far past the timeout) must not hold a request beyond the connect timeout."""
    import socket as socket_module

    from modelhost.errors import FetchTimeout
    from modelhost.fetch.http import open_url
    from modelhost.fetch.policy import UrlPolicy

    real = socket_module.getaddrinfo
    released = threading.Event()

    def hanging(host, *args, **kwargs):
        if host == "hangs.example":
            released.wait(10)
            raise OSError("resolver gave up")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", hanging)
    policy = UrlPolicy.from_hosts(["hangs.example"])
    started = time.monotonic()
    with pytest.raises(FetchTimeout) as caught:
        open_url("http://hangs.example/config.json", policy, timeout=0.5)
    released.set()
    assert time.monotonic() - started < 1.5
    assert "Resolving hangs.example timed out" in caught.value.message
    assert caught.value.host_port == "hangs.example:80"
