"""A small HTTP client for the modelhost API: one place turns every failure into a message.

The command line imports nothing of the server: it speaks HTTP through httpx only, so it
starts fast and works against a server on another machine. httpx itself is imported when
the first client is made (a tenth of a second that ``--help`` need not pay).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

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


def error_from(response: httpx.Response) -> ApiError:
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
    """The modelhost API at ``url``, with ``api_key`` sent as a bearer token."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"User-Agent": "modelhost-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; raise ``ServerUnreachable`` / ``ApiError`` instead of answering."""
        with self._translated():
            response = self.http.request(method, path, **kwargs)
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

    def post_status(self, path: str, body: Any) -> tuple[int, Any]:
        """``POST path`` -> (status code, JSON): for answers whose 200 and 202 differ."""
        response = self.request("POST", path, json=body)
        return response.status_code, response.json()

    @contextmanager
    def stream(self, path: str) -> Iterator[httpx.Response]:
        """A streaming ``GET`` (Server-Sent Events), checked for an error status first."""
        import httpx

        timeout = httpx.Timeout(STREAM_READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        with self._translated(), self.http.stream("GET", path, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise error_from(response)
            yield response

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """httpx's transport errors as the command line's errors."""
        import httpx

        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ServerUnreachable(unreachable_message(self.url)) from exc
        except httpx.TimeoutException as exc:
            raise CliError(f"the modelhost server at {self.url} stopped answering") from exc
        except httpx.RemoteProtocolError as exc:
            raise CliError(f"the modelhost server at {self.url} closed the connection") from exc
        except httpx.UnsupportedProtocol as exc:
            raise CliError(f"not an http(s) URL: {self.url}") from exc
