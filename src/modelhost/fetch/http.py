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
from modelhost.errors import Cancelled, FetchError, FetchTimeout, TransientFetchError
from modelhost.fetch.cancel import CancelToken
from modelhost.fetch.policy import Target, UrlPolicy

MAX_REDIRECTS = 8
Authorizer = Callable[[Target], "str | None"]
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
USER_AGENT = f"modelhost/{__version__}"
# What timeout messages name, so that a user knows which setting to change.
TIMEOUT_SETTING = "MODELHOST_UPSTREAM_TIMEOUT_S"


def _connect(address: str, port: int, connect_timeout: float, read_timeout: float) -> socket.socket:
    """A TCP connection within ``connect_timeout``, then reads bounded by ``read_timeout``."""
    sock = socket.create_connection((address, port), connect_timeout)
    sock.settimeout(read_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, target: Target, address: str, timeout: float, connect_timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address
        self._connect_timeout = connect_timeout
        self.origin = _origin(target)

    def connect(self) -> None:
        self.sock = _connect(self._address, self.port, self._connect_timeout, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, target: Target, address: str, timeout: float, connect_timeout: float):
        super().__init__(
            target.host, target.port, timeout=timeout, context=ssl.create_default_context()
        )
        self._address = address
        self._connect_timeout = connect_timeout
        self.origin = _origin(target)

    def connect(self) -> None:
        sock = _connect(self._address, self.port, self._connect_timeout, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _origin(target: Target) -> tuple[str, str, int]:
    return (target.scheme, target.host, target.port)


def _shutdown_socket(connection: http.client.HTTPConnection) -> None:
    """Unblock a read or write in progress on another thread (a no-op before connecting)."""
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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
        _shutdown_socket(self.connection)

    def close(self) -> None:
        self.response.close()
        self.connection.close()

    def keep(self, body_bytes: int) -> http.client.HTTPConnection | None:
        """For a caller that read ``body_bytes`` of the body from the socket (not through
        ``response.read``): when that is the whole body (its ``Content-Length``), end the
        response and return its connection, open and ready for the next request to the
        same host (``open_url(..., reuse=...)``); else, or when the server closes the
        connection after this response, close both and return None."""
        response = self.response
        if (
            response.will_close
            or response.chunked
            or response.length != body_bytes
            or self.connection.sock is None
        ):
            self.close()
            return None
        response.length = 0  # read by the caller, from the socket directly
        response.close()  # the response only: the connection stays open
        return self.connection


def open_url(
    url: str,
    policy: UrlPolicy,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    authorization: Authorizer | None = None,
    connect_timeout: float | None = None,
    cancel: CancelToken | None = None,
    timeout_setting: str = TIMEOUT_SETTING,
    reuse: http.client.HTTPConnection | None = None,
) -> OpenResponse:
    """Send ``method`` to ``url`` following redirects, each hop checked against ``policy``.

    ``authorization`` gives the Authorization header for a hop's host (or None); it is asked
    again at every hop, so a token never follows a redirect to another host. ``timeout``
    bounds every read, ``connect_timeout`` (default: ``timeout``) the TCP connect; a
    ``cancel`` token aborts a hop that waits for its answer. Raises ``SourceNotAllowed`` for
    a refused hop (before connecting to it), ``FetchTimeout`` when a host is silent,
    ``TransientFetchError`` for other network errors, ``Cancelled``.
    ``reuse``: an open connection a response gave back (``OpenResponse.keep``), used for the
    first hop when it goes to the same scheme, host and port (its address was checked when
    it was opened); a connection the server has closed meanwhile is replaced by a new one.
    It is the caller's no longer: closed here when not used.
    The caller owns the returned response and must close it.
    """
    request_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    request_headers.update(headers or {})
    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            target = policy.check(current)
            request_headers.pop("Authorization", None)
            credentials = authorization(target) if authorization else None
            if credentials:
                request_headers["Authorization"] = credentials
            response = None
            if reuse is not None:
                conn, reuse = reuse, None
                if getattr(conn, "origin", None) == _origin(target):
                    response = _send_again(conn, target, method, request_headers, cancel)
                else:
                    conn.close()
            if response is None:
                address = policy.resolve(target, connect_timeout or timeout)
                https = target.scheme == "https"
                conn_class = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
                conn = conn_class(target, address, timeout, connect_timeout or timeout)
                response = _send(conn, target, method, request_headers, cancel, timeout_setting)
            location = response.getheader("Location")
            if response.status in REDIRECT_STATUSES and location:
                response.close()
                conn.close()
                current = urljoin(current, location)
                continue
            return OpenResponse(url=current, connection=conn, response=response)
    finally:
        if reuse is not None:  # not taken: a refused hop raised before
            reuse.close()
    raise FetchError(f"Too many redirects (more than {MAX_REDIRECTS}) starting at {url}")


def _send_again(
    conn: http.client.HTTPConnection,
    target: Target,
    method: str,
    headers: dict[str, str],
    cancel: CancelToken | None,
) -> http.client.HTTPResponse | None:
    """A request on a kept-alive connection; None (and the connection closed) when it fails,
    as it does when the server closed the idle connection: the caller opens a new one."""
    unregister = cancel.on_cancel(lambda: _shutdown_socket(conn)) if cancel else None
    try:
        if cancel is not None:
            cancel.raise_if_cancelled()
        conn.request(method, target.path, headers=headers)
        return conn.getresponse()
    except (OSError, http.client.HTTPException):
        conn.close()
        if cancel is not None:
            cancel.raise_if_cancelled()
        return None
    except Cancelled:
        conn.close()
        raise
    finally:
        if unregister is not None:
            unregister()


def _send(
    conn: http.client.HTTPConnection,
    target: Target,
    method: str,
    headers: dict[str, str],
    cancel: CancelToken | None,
    timeout_setting: str,
) -> http.client.HTTPResponse:
    """One hop: connect, send, read the status and headers; errors become ours."""
    host_port = UrlPolicy.host_port_of(target.url)
    unregister = cancel.on_cancel(lambda: _shutdown_socket(conn)) if cancel else None
    connected = False
    try:
        if cancel is not None:
            cancel.raise_if_cancelled()
        conn.connect()
        connected = True
        if cancel is not None:  # a cancel during the connect found no socket to shut
            cancel.raise_if_cancelled()
        conn.request(method, target.path, headers=headers)
        return conn.getresponse()
    except TimeoutError as exc:
        conn.close()
        if cancel is not None:
            cancel.raise_if_cancelled()
        phase = "waiting for an answer" if connected else "connecting"
        seconds = conn.timeout if connected else getattr(conn, "_connect_timeout", conn.timeout)
        raise FetchTimeout(
            f"{host_port} timed out ({phase}; no answer within {seconds:g} s, {timeout_setting})",
            host_port=host_port,
            timeout_s=float(seconds or 0),
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        if cancel is not None:
            cancel.raise_if_cancelled()
        raise TransientFetchError(f"Connection to {host_port} failed: {exc}") from exc
    except Cancelled:
        conn.close()
        raise
    finally:
        if unregister is not None:
            unregister()
