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
from fastapi.routing import APIRoute, APIRouter
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.api.deps import api_key_refusal, require_api_key
from modelhost.api.errors import error_body, modelhost_error_response
from modelhost.api.openai.errors import is_v1, openai_error_body
from modelhost.mirror.protocol import hub_error, is_mirror_path

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
    # In the shape the route's clients read: OpenAI's on /v1, the Hub's on the mirror's /hf,
    # modelhost's elsewhere.
    if is_mirror_path(scope.get("path", "")):
        body, headers = hub_error(403, message)
        return JSONResponse(body, status_code=403, headers=headers)
    if is_v1(scope.get("path", "")):
        return JSONResponse(openai_error_body(403, message, error), status_code=403)
    return JSONResponse(error_body(message, error), status_code=403)


def keyed_routes(routers: Iterable[APIRouter]) -> list[tuple[APIRoute, bool]]:
    """Each route of ``routers`` and whether it depends on ``require_api_key`` (its router's
    dependencies or its own); /health and the dashboard do not."""
    routes = []
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute):  # what app.include_router added is walked as given
                calls = [d.dependency for d in (*router.dependencies, *route.dependencies)]
                routes.append((route, require_api_key in calls))
    return routes


class ApiKeyGuard:
    """Pure ASGI middleware: on a route that needs the API key, checks it before anything
    reads the body. FastAPI parses a route's body before it runs the route's dependencies,
    so without this a caller with no key got 422 naming its JSON error, and a large upload
    was read (or spooled) before its 401."""

    def __init__(self, app: ASGIApp, routers: Iterable[APIRouter]) -> None:
        self.app = app
        self.routers = list(routers)
        self._routes: list[tuple[APIRoute, bool]] | None = None

    def needs_key(self, scope: Scope) -> bool:
        """Whether the route ``scope`` reaches needs the key; a path no route serves passes
        on (its 404 or 405 tells nothing)."""
        if self._routes is None:  # built on the first request: every router is included
            self._routes = keyed_routes(self.routers)
        for route, keyed in self._routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return keyed
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            expected = scope["app"].state.settings.api_key
            refusal = api_key_refusal(expected, Headers(scope=scope))
            if refusal is not None and self.needs_key(scope):
                response = modelhost_error_response(Request(scope), refusal)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_security(
    app: FastAPI,
    allowed_hosts: Iterable[str],
    cors_origins: Iterable[str],
    routers: Iterable[APIRouter],
) -> None:
    """The API key check (innermost, so its 401 carries CORS headers), CORS headers for the
    allowed origins, and outermost the Host/Origin guard (which runs first)."""
    origins = list(cors_origins)
    # ``routers``: those the app includes; the app's own router holds the docs' routes.
    app.add_middleware(ApiKeyGuard, routers=[app.router, *routers])
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=False,  # the API key travels in Authorization, never in a cookie
    )
    # Added last, so it is the outermost layer: a foreign Host never reaches CORS or a route.
    app.add_middleware(HostOriginGuard, allowed_hosts=allowed_hosts, cors_origins=origins)
