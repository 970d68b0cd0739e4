"""Host and Origin checks: a loopback server is still reachable from any web page a user opens.

DNS rebinding (Ollama CVE-2024-28224) points a hostile name at 127.0.0.1, so the browser's
requests arrive with that name in ``Host``: only the names in MODELHOST_ALLOWED_HOSTS are
answered. A page on another site may also send a "simple" POST straight to the loopback
address; the browser names that site in ``Origin``, so a state-changing request from an
origin outside MODELHOST_CORS_ORIGINS (and not the server's own) is refused before any
route runs. Requests without ``Origin`` (curl, SDKs, other servers) are not from a page.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.api.errors import error_body
from modelhost.api.openai.errors import is_v1, openai_error_body

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def split_host(value: str) -> tuple[str, str | None]:
    """``'Example.org:8000'`` -> ``('example.org', '8000')``; ``'[::1]'`` -> ``('[::1]', None)``."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal keeps its brackets, as Host headers write it
        end = value.find("]")
        if end == -1:
            return value, None
        rest = value[end + 1 :]
        return value[: end + 1], rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    return (host, port) if sep and host else (value, None)


class HostRule:
    """The allowed Host headers: ``host`` entries match any port, ``host:port`` only that one."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.any_port: set[str] = set()
        self.exact: set[tuple[str, str]] = set()
        for entry in entries:
            host, port = split_host(entry)
            if port is None:
                self.any_port.add(host)
            else:
                self.exact.add((host, port))

    def allows(self, header: str) -> bool:
        """Whether a request with this ``Host`` header is answered."""
        host, port = split_host(header)
        if not host:
            return False
        return host in self.any_port or (port is not None and (host, port) in self.exact)


class HostOriginGuard:
    """Pure ASGI middleware: refuses foreign ``Host`` headers (every route, /health and /docs
    included) and state-changing requests from foreign ``Origin`` s, with the error body."""

    def __init__(
        self, app: ASGIApp, allowed_hosts: Iterable[str], cors_origins: Iterable[str]
    ) -> None:
        self.app = app
        self.hosts = HostRule(allowed_hosts)
        self.origins = {origin.rstrip("/").lower() for origin in cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await refusal(scope, receive, send)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> JSONResponse | None:
        """The 403 to answer instead of running the app, or None when the request may pass."""
        host = headers.get("host", "")
        if not self.hosts.allows(host):
            return _forbidden(
                scope,
                f"Host {host!r} is not in MODELHOST_ALLOWED_HOSTS: this server answers only "
                "the names it is configured for (a guard against DNS rebinding). Add the name "
                "you use to reach it to MODELHOST_ALLOWED_HOSTS (host or host:port, "
                "comma-separated)",
                "Host not allowed",
            )
        origin = headers.get("origin")
        method = scope.get("method", "GET").upper()
        if origin is None or method not in STATE_CHANGING:
            return None
        normalized = origin.strip().rstrip("/").lower()
        same_origin = f"{scope.get('scheme', 'http')}://{host.strip().lower()}"
        if normalized in self.origins or normalized == same_origin:
            return None
        return _forbidden(
            scope,
            f"Origin {origin!r} is not in MODELHOST_CORS_ORIGINS: a web page from another "
            f"site may not {method} to this server. Add that origin (scheme://host[:port]) to "
            "MODELHOST_CORS_ORIGINS if you trust it; requests without an Origin header (curl, "
            "SDKs) are not affected",
            "Origin not allowed",
        )


def _forbidden(scope: Scope, message: str, error: str) -> JSONResponse:
    # In the shape the route's clients read: OpenAI's on /v1, modelhost's elsewhere.
    if is_v1(scope.get("path", "")):
        return JSONResponse(openai_error_body(403, message, error), status_code=403)
    return JSONResponse(error_body(message, error), status_code=403)


def install_security(
    app: FastAPI, allowed_hosts: Iterable[str], cors_origins: Iterable[str]
) -> None:
    """CORS headers for the allowed origins, inside the Host/Origin guard (which runs first)."""
    origins = list(cors_origins)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=False,  # the API key travels in Authorization, never in a cookie
    )
    # Added last, so it is the outermost layer: a foreign Host never reaches CORS or a route.
    app.add_middleware(HostOriginGuard, allowed_hosts=allowed_hosts, cors_origins=origins)
