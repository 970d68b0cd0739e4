"""Blocking HTTP/1.1 requests for the engine: address pinning, redirects re-checked per hop.

Built on ``http.client`` because bulk transfer wants large ``readinto`` calls into reusable
buffers, which is where the engine's throughput comes from.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin

from modelhost import __version__
from modelhost.errors import FetchError, TransientFetchError
from modelhost.fetch.policy import Target, UrlPolicy

MAX_REDIRECTS = 8
Authorizer = Callable[[Target], "str | None"]
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
USER_AGENT = f"modelhost/{__version__}"


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, target: Target, address: str, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, target: Target, address: str, timeout: float) -> None:
        super().__init__(
            target.host, target.port, timeout=timeout, context=ssl.create_default_context()
        )
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass
class OpenResponse:
    """A response whose headers are read and whose body is ready to stream."""

    url: str  # the final URL, after redirects
    connection: http.client.HTTPConnection
    response: http.client.HTTPResponse

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str) -> str | None:
        return self.response.getheader(name)

    def shutdown(self) -> None:
        """Abort from another thread: unblocks a read in progress."""
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.response.close()
        self.connection.close()


def open_url(
    url: str,
    policy: UrlPolicy,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    authorization: Authorizer | None = None,
) -> OpenResponse:
    """Send ``method`` to ``url`` following redirects, each hop checked against ``policy``.

    ``authorization`` gives the Authorization header for a hop's host (or None); it is asked
    again at every hop, so a token never follows a redirect to another host.
    Raises ``SourceNotAllowed`` for a refused hop, ``TransientFetchError`` for network errors.
    The caller owns the returned response and must close it.
    """
    request_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    request_headers.update(headers or {})
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        target = policy.check(current)
        address = policy.resolve(target)
        request_headers.pop("Authorization", None)
        credentials = authorization(target) if authorization else None
        if credentials:
            request_headers["Authorization"] = credentials
        conn_class = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
        conn = conn_class(target, address, timeout)
        try:
            conn.request(method, target.path, headers=request_headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransientFetchError(
                f"Connection to {target.host}:{target.port} failed: {exc}"
            ) from exc
        location = response.getheader("Location")
        if response.status in REDIRECT_STATUSES and location:
            response.close()
            conn.close()
            current = urljoin(current, location)
            continue
        return OpenResponse(url=current, connection=conn, response=response)
    raise FetchError(f"Too many redirects (more than {MAX_REDIRECTS}) starting at {url}")
