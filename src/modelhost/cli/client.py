"""A small HTTP client for the modelhost API: one place turns every failure into a message.

The command line imports nothing of the server: it speaks HTTP through the standard
library's ``http.client`` only, so it starts fast (no third-party HTTP stack to import) and
works against a server on another machine.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from json import dumps
from typing import Any
from urllib.parse import urlencode, urlsplit

DEFAULT_URL = "http://127.0.0.1:8000"
CONNECT_TIMEOUT_S = 3.0
# Loading a model or synthesizing can take minutes on a slow machine; the server answers
# every other request quickly.
READ_TIMEOUT_S = 600.0
# The progress streams send a keep-alive comment regularly; silence this long means trouble.
STREAM_READ_TIMEOUT_S = 120.0


class CliError(Exception):
    """A failure the command line reports as one line on stderr, then exits with ``code``."""

    code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ServerUnreachable(CliError):
    """Nothing answers at the URL (connection refused, unknown host, connect timeout)."""


class ApiError(CliError):
    """The server answered with an error status; ``message`` is the server's own."""

    def __init__(self, status: int, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


def unreachable_message(url: str) -> str:
    """The one line printed when no server answers."""
    return f"no modelhost server at {url}: start one with `modelhost serve`"


@dataclass
class Response:
    """A whole answer: status, reason and body bytes."""

    status_code: int
    reason_phrase: str
    content: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass
class StreamResponse:
    """An answer whose body is read line by line as it arrives (Server-Sent Events)."""

    status_code: int
    raw: http.client.HTTPResponse

    def iter_lines(self) -> Iterator[str]:
        """Each line of the body, without its line ending, until the server ends it."""
        while True:
            line = self.raw.readline()
            if not line:
                return
            yield line.decode("utf-8", errors="replace").rstrip("\r\n")


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type (an upload, as OpenAI's routes
    take it); the boundary is random, so no file's bytes can hold it by chance."""
    boundary = os.urandom(16).hex()
    parts = []
    for name, value in fields.items():
        head = f'Content-Disposition: form-data; name="{name}"'
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + value.encode() + b"\r\n")
    for name, (filename, data) in files.items():
        quoted = filename.replace('"', "%22")  # a quote would end the header's value
        head = f'Content-Disposition: form-data; name="{name}"; filename="{quoted}"'
        kind = "Content-Type: application/octet-stream"
        parts.append(f"--{boundary}\r\n{head}\r\n{kind}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def error_from(response: Response) -> ApiError:
    """The ``ApiError`` an error answer means; the server's ``message`` when it sent one."""
    if response.status_code == 401:
        return ApiError(
            401,
            "the server wants an API key: set MODELHOST_API_KEY or pass --api-key",
            "Unauthorized",
        )
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return ApiError(response.status_code, body["message"], body.get("error"))
    if isinstance(body, dict) and "detail" in body:  # a framework answer, not modelhost's own
        return ApiError(response.status_code, f"HTTP {response.status_code}: {body['detail']}")
    text = response.text.strip()[:200] or response.reason_phrase
    return ApiError(response.status_code, f"HTTP {response.status_code}: {text}")


class Client:
    """The modelhost API at ``url``, with ``api_key`` sent as a bearer token.

    One kept-alive connection, reopened when the server has closed it."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(f"not an http(s) URL: {self.url}")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.headers = {"User-Agent": "modelhost-cli"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,  # noqa: A002 - the name callers know from requests/httpx
        params: dict[str, Any] | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> Response:
        """Send one request (a JSON body, or ``content`` of ``content_type``); raise
        ``ServerUnreachable`` / ``ApiError`` instead of answering."""
        if json is not None:
            content, content_type = dumps(json).encode(), "application/json"
        with self._translated():
            raw = self._send(method, path, content, content_type, params, READ_TIMEOUT_S)
            response = Response(raw.status, raw.reason, raw.read(), dict(raw.getheaders()))
        if raw.will_close:
            self.close()
        if response.status_code >= 400:
            raise error_from(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a successful answer."""
        return self.request(method, path, **kwargs).json()

    def get(self, path: str, **kwargs: Any) -> Any:
        """``GET path`` -> JSON."""
        return self.json("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        """``POST path`` with a JSON body -> JSON."""
        return self.json("POST", path, json=body, **kwargs)

    def delete(self, path: str) -> Any:
        """``DELETE path`` -> JSON."""
        return self.json("DELETE", path)

    def post_form(
        self, path: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]
    ) -> Any:
        """``POST path`` as ``multipart/form-data`` (``files``: field -> (file name, bytes))
        -> JSON."""
        content, content_type = multipart(fields, files)
        return self.request("POST", path, content=content, content_type=content_type).json()

    def post_status(self, path: str, body: Any) -> tuple[int, Any]:
        """``POST path`` -> (status code, JSON): for answers whose 200 and 202 differ."""
        response = self.request("POST", path, json=body)
        return response.status_code, response.json()

    @contextmanager
    def stream(self, path: str) -> Iterator[StreamResponse]:
        """A streaming ``GET`` (Server-Sent Events), checked for an error status first.

        The stream has its own connection, closed when the block ends."""
        with self._translated():
            connection = self._open()
            try:
                connection.sock.settimeout(STREAM_READ_TIMEOUT_S)
                headers = {**self.headers, "Accept": "text/event-stream"}
                connection.request("GET", self._prefix + path, headers=headers)
                raw = connection.getresponse()
                if raw.status >= 400:
                    raise error_from(Response(raw.status, raw.reason, raw.read()))
                yield StreamResponse(raw.status, raw)
            finally:
                connection.close()

    def _open(self) -> http.client.HTTPConnection:
        https = self._scheme == "https"
        kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=CONNECT_TIMEOUT_S)
        try:
            connection.connect()
        except OSError as exc:  # refused, unknown host, connect timeout, no route
            raise ServerUnreachable(unreachable_message(self.url)) from exc
        return connection

    def _send(
        self,
        method: str,
        path: str,
        payload: bytes | None,
        content_type: str | None,
        params: dict[str, Any] | None,
        read_timeout_s: float,
    ) -> http.client.HTTPResponse:
        """Send on the kept-alive connection; once more on a fresh one if the server had
        closed it between requests (the keep-alive race every client meets)."""
        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        headers = dict(self.headers)
        if content_type is not None:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            reused = self._connection is not None
            if self._connection is None:
                self._connection = self._open()
            connection = self._connection
            connection.sock.settimeout(read_timeout_s)
            try:
                connection.request(method, target, body=payload, headers=headers)
                return connection.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Transport errors as the command line's errors."""
        try:
            yield
        except TimeoutError as exc:  # socket.timeout is TimeoutError
            self.close()
            raise CliError(f"the modelhost server at {self.url} stopped answering") from exc
        except (http.client.HTTPException, ConnectionError) as exc:
            self.close()
            raise CliError(f"the modelhost server at {self.url} closed the connection") from exc
