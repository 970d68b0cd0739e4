"""Which URLs modelhost may fetch: scheme, allow-listed host, and the address it resolves to."""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from modelhost.errors import SourceNotAllowed

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """A checked URL, split into what a connection needs."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _lookup(host: str, port: int, timeout: float | None) -> list:
    """``getaddrinfo`` for a TCP connection, given up after ``timeout`` seconds: the lookup
    runs in a daemon thread, so a resolver that never answers cannot hold the caller."""
    from modelhost.errors import FetchTimeout, TransientFetchError

    answer: dict[str, object] = {}

    def ask() -> None:
        try:
            answer["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            answer["error"] = exc

    if timeout is None:
        ask()
    else:
        worker = threading.Thread(target=ask, name=f"resolve-{host}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise FetchTimeout(
                f"Resolving {host} timed out (no answer within {timeout:g} s, "
                "MODELHOST_UPSTREAM_TIMEOUT_S)",
                host_port=f"{host}:{port}",
                timeout_s=timeout,
            )
    if "error" in answer:
        raise TransientFetchError(f"Cannot resolve host {host}: {answer['error']}")
    return answer["infos"]  # type: ignore[return-value]


@dataclass(frozen=True)
class UrlPolicy:
    """The allow-list of ``MODELHOST_URL_ALLOW``: entries are ``host`` or ``host:port``.

    A listed host name that resolves to a loopback, private or link-local address is refused
    (that is how DNS rebinding reaches internal services); such addresses are reachable only
    when listed literally (``127.0.0.1:9000``) or as ``localhost``.
    """

    allowed: frozenset[str]

    @classmethod
    def from_hosts(cls, hosts: tuple[str, ...] | list[str]) -> UrlPolicy:
        return cls(frozenset(h.strip().lower() for h in hosts if h.strip()))

    @staticmethod
    def host_port_of(url: str) -> str:
        """``host:port`` of a URL, as an allow-list entry names it."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 443)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def check(self, url: str) -> Target:
        """Parse ``url`` and check its scheme and host; raises ``SourceNotAllowed``."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise SourceNotAllowed(
                f"Not a valid URL: {url!r} ({exc})", error="Invalid URL"
            ) from exc
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise SourceNotAllowed(
                f"Only http and https URLs can be fetched, not {scheme or 'a URL without scheme'}: "
                f"{url}",
                error=f"Unsupported scheme: {scheme or '(none)'}",
            )
        host = (parts.hostname or "").lower()
        if not host:
            raise SourceNotAllowed(f"URL has no host: {url}", error="Invalid URL")
        if parts.username or parts.password:
            raise SourceNotAllowed(
                "URLs with embedded credentials are refused; use a token setting instead",
                error="Credentials in URL",
            )
        port = port or DEFAULT_PORTS[scheme]
        host_port = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if host not in self.allowed and host_port not in self.allowed:
            raise SourceNotAllowed(
                f"Host {host_port} is not in MODELHOST_URL_ALLOW; add it there to allow "
                "downloads from it",
                error=f"Host not allowed: {host}",
            )
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return Target(url=url, scheme=scheme, host=host, port=port, path=path)

    def resolve(self, target: Target, timeout: float | None = None) -> str:
        """Resolve the target's host to one address this policy admits, and return it.

        The connection is then made to that address, so the check and the connect see the
        same answer. ``timeout`` bounds the lookup (``getaddrinfo`` has none of its own).
        """
        infos = _lookup(target.host, target.port, timeout)
        literal_ok = _is_ip_literal(target.host) or target.host == "localhost"
        refused = []
        for info in infos:
            address = info[4][0]
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if ip.is_global or literal_ok:
                return address
            refused.append(address)
        raise SourceNotAllowed(
            f"Host {target.host} resolves to non-public address(es) {', '.join(refused)}; "
            "list the address itself in MODELHOST_URL_ALLOW to allow it",
            error="Address not allowed",
        )
