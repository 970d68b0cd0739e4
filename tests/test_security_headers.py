"""Host / Origin checks (DNS rebinding, cross-site writes) and the docs behind the API key."""

from __future__ import annotations

import hashlib
import socket

import httpx
import pytest

from modelhost.api.security import HostRule, split_host
from modelhost.config import Settings


def download_body(url: str, name: str, data: bytes) -> dict:
    sha = hashlib.sha256(data).hexdigest()
    return {"source": "url", "model_id": url, "name": name, "sha256": sha, "load": False}


def assert_refused(response: httpx.Response, setting: str, shown: str) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["success"] is False
    assert setting in body["message"] and shown in body["message"]


@pytest.mark.parametrize("path", ["/health", "/models", "/docs", "/openapi.json", "/no/such"])
def test_foreign_host_is_refused_on_every_route(make_server, path):
    server = make_server([])
    response = server.client.get(path, headers={"Host": "evil.example:8000"})
    assert_refused(response, "MODELHOST_ALLOWED_HOSTS", "Host 'evil.example:8000'")
    assert response.json()["error"] == "Host not allowed"


def test_loopback_hosts_with_the_actual_port_pass(make_server):
    server = make_server([])
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", "[::1]"):
        response = server.client.get("/health", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)
        assert response.json()["status"] == "ok"


def test_configured_allowed_hosts_replace_the_defaults(make_server):
    server = make_server([], allowed_hosts=("models.lan:9000", "box.lan"))
    assert server.client.get("/health", headers={"Host": "models.lan:9000"}).status_code == 200
    assert server.client.get("/health", headers={"Host": "box.lan:1234"}).status_code == 200
    # The port is part of an entry that names one, and loopback is no longer implied.
    assert_refused(
        server.client.get("/health", headers={"Host": "models.lan:9001"}),
        "MODELHOST_ALLOWED_HOSTS",
        "'models.lan:9001'",
    )
    assert server.client.get("/health").status_code == 403  # Host: 127.0.0.1:<port>


def test_cross_site_post_is_refused_and_records_nothing(make_server, fileserver):
    data = b"weights" * 1000
    fileserver.add("/m.safetensors", data)
    server = make_server([fileserver.host_port])
    body = download_body(fileserver.url("/m.safetensors"), "evil", data)

    response = server.client.post(
        "/models/download", json=body, headers={"Origin": "http://evil.example"}
    )
    assert_refused(response, "MODELHOST_CORS_ORIGINS", "Origin 'http://evil.example'")
    assert response.json()["error"] == "Origin not allowed"
    assert "access-control-allow-origin" not in response.headers
    listed = server.client.get("/models/downloads").json()
    assert listed == {"total": 0, "downloads": []}
    assert fileserver.count("GET", "/m.safetensors") == 0
    for method in ("PUT", "PATCH", "DELETE"):
        refused = server.client.request(
            method, "/models/download/evil", headers={"Origin": "http://evil.example"}
        )
        assert_refused(refused, "MODELHOST_CORS_ORIGINS", "may not " + method)


def test_allowed_origin_passes_with_cors_headers(make_server, fileserver):
    data = b"weights" * 1000
    fileserver.add("/m.safetensors", data)
    origin = "http://app.example:3000"
    server = make_server([fileserver.host_port], cors_origins=(origin + "/",))

    response = server.client.post(
        "/models/download",
        json=download_body(fileserver.url("/m.safetensors"), "ok", data),
        headers={"Origin": origin},
    )
    assert response.status_code == 202, response.text
    assert response.headers["access-control-allow-origin"] == origin
    assert server.wait_for(response.json()["download_id"])["status"] == "completed"

    preflight = server.client.options(
        "/models/download",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()


def test_read_only_request_with_foreign_origin_passes(make_server):
    server = make_server([])
    response = server.client.get("/models/downloads", headers={"Origin": "http://evil.example"})
    assert response.status_code == 200
    assert response.json() == {"total": 0, "downloads": []}
    assert "access-control-allow-origin" not in response.headers  # the page cannot read it


def test_same_origin_post_passes(make_server):
    """A page the server itself serves (Swagger UI's "Try it out") sends its own origin."""
    server = make_server([])
    response = server.client.post(
        "/models/download/nothing/cancel", headers={"Origin": server.base_url}
    )
    assert response.status_code == 404
    assert response.json()["error"] == "Download does not exist"


def test_docs_need_the_api_key_health_does_not(make_server):
    server = make_server([], api_key="sekrit")
    for path in ("/docs", "/redoc", "/openapi.json"):
        response = server.client.get(path)
        assert response.status_code == 401, path
        assert response.json()["success"] is False
        assert "MODELHOST_API_KEY" in response.json()["message"]
        wrong = server.client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
        ok = server.client.get(path, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200, path
    schema = server.client.get("/openapi.json", headers={"Authorization": "Bearer sekrit"})
    assert "/models/download" in schema.json()["paths"]
    assert (
        "swagger-ui" in server.client.get("/docs", headers={"Authorization": "Bearer sekrit"}).text
    )
    assert server.client.get("/health").status_code == 200


def test_docs_are_open_without_a_key(make_server):
    server = make_server([])
    assert server.client.get("/docs").status_code == 200
    assert server.client.get("/openapi.json").json()["info"]["title"] == "modelhost"


def test_default_allowed_hosts_name_loopback_and_the_bind_address():
    settings = Settings(host="10.1.2.3", port=8123, api_key="k")
    assert settings.effective_allowed_hosts == (
        "localhost",
        "localhost:8123",
        "127.0.0.1",
        "127.0.0.1:8123",
        "[::1]",
        "[::1]:8123",
        "10.1.2.3",
        "10.1.2.3:8123",
    )
    assert Settings(host="::1").effective_allowed_hosts[-2:] == ("[::1]", "[::1]:8000")


def test_allowed_hosts_and_origins_from_the_environment(monkeypatch):
    monkeypatch.setenv("MODELHOST_ALLOWED_HOSTS", " Models.LAN:9000, box.lan ,")
    monkeypatch.setenv("MODELHOST_CORS_ORIGINS", "https://App.example/, http://x.example:3000")
    settings = Settings()
    assert settings.effective_allowed_hosts == ("models.lan:9000", "box.lan")
    assert settings.cors_origins == ("https://app.example", "http://x.example:3000")


@pytest.mark.parametrize(
    "header, expected",
    [
        ("Example.org:8000", ("example.org", "8000")),
        ("example.org", ("example.org", None)),
        ("[::1]:80", ("[::1]", "80")),
        ("[::1]", ("[::1]", None)),
        ("", ("", None)),
    ],
)
def test_split_host(header, expected):
    assert split_host(header) == expected


def test_host_rule():
    rule = HostRule(["localhost", "models.lan:9000", "[::1]"])
    assert rule.allows("localhost:1") and rule.allows("LOCALHOST") and rule.allows("[::1]:5")
    assert rule.allows("models.lan:9000")
    assert not rule.allows("models.lan") and not rule.allows("models.lan:9001")
    assert not rule.allows("localhost.evil.example") and not rule.allows("")


KEYED_POSTS = [
    "/models/download",
    "/models/bert/predict",
    "/v1/embeddings",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
]


@pytest.mark.parametrize("path", KEYED_POSTS)
def test_a_malformed_body_without_the_key_is_401_not_a_json_error(make_server, path):
    """Authentication comes first: a caller without the key learns nothing of how the body
    is parsed (no 422 / 400 naming the JSON error)."""
    server = make_server([], api_key="sekrit")
    response = server.client.post(
        path, content=b'{"model": "x", ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401, response.text
    assert "MODELHOST_API_KEY" in response.text
    assert "JSON" not in response.text and "Validation" not in response.text
    keyed = server.client.post(
        path,
        content=b'{"model": "x", ',
        headers={"Content-Type": "application/json", "Authorization": "Bearer sekrit"},
    )
    assert keyed.status_code in (400, 422), keyed.text


@pytest.mark.parametrize("path", ["/models/download", "/v1/audio/transcriptions"])
def test_the_key_is_checked_before_the_body_is_read(make_server, path):
    """A request without the key that announces a megabyte and sends none of it is answered
    401 at once: nothing waits for (or reads) its body."""
    server = make_server([], api_key="sekrit")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n".encode()
        )
        answer = sock.recv(65536).decode("latin-1")
    assert answer.startswith("HTTP/1.1 401"), answer
