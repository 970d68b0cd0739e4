"""OpenAI's error shape for ``/v1`` routes: ``{"error": {message, type, param, code}}``.

The OpenAI clients raise their typed exceptions (``NotFoundError``, ``BadRequestError``,
``AuthenticationError`` ...) from the status and show ``error.message``; ``type`` follows
OpenAI's names; ``code`` is OpenAI's where it has one (``model_not_found``,
``invalid_api_key``, ``unknown_url``), else a short slug of modelhost's own ``error`` title;
``param`` names the request field at fault (``ModelhostError.param``, or the field a
validation error is about).

It imports nothing of ``modelhost.api``: ``api/errors.py`` (the one error handler) and the
/v1 route modules both use it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fastapi import APIRouter
from starlette.requests import Request
from starlette.routing import Route

from modelhost.errors import ModelhostError, ModelNotFound, Unauthorized

V1_PREFIX = "/v1/"

# OpenAI's error types by status (what its API answers for each).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def is_openai_path(request: Request) -> bool:
    """Whether ``request`` is for an OpenAI-compatible route (its errors take OpenAI's shape)."""
    return is_v1(request.url.path)


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an HTTP status."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def slug(title: str) -> str:
    """``"Model does not exist"`` -> ``"model_does_not_exist"``."""
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "error"


def openai_error_body(
    status: int, message: str, error: str, param: str | None = None, code: str | None = None
) -> dict:
    """The body of an error answer on a /v1 route."""
    return {
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": code or slug(error),
        }
    }


# OpenAI's own codes for the errors it shares with modelhost (the rest get slug(error)).
_CODES: tuple[tuple[type[ModelhostError], str], ...] = (
    (ModelNotFound, "model_not_found"),
    (Unauthorized, "invalid_api_key"),
)


def openai_code(exc: ModelhostError) -> str | None:
    """OpenAI's ``code`` for ``exc`` where OpenAI has one; None: the slug of its title."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return None


def unknown_route_message(
    request: Request, status: int, routers: Sequence[APIRouter]
) -> tuple[str, str]:
    """The message and code of a 404 (no such route) or 405 (wrong method) under /v1, naming
    the routes there are (read from ``routers``, the /v1 routers the app includes, so the
    list is never stale)."""
    method, path = request.method, request.url.path
    routes = [r for router in routers for r in router.routes if isinstance(r, Route)]
    if status == 405:
        allowed = sorted({m for r in routes if r.path_regex.match(path) for m in r.methods or ()})
        return (
            f"Method {method} is not allowed on {path}; use {' or '.join(allowed) or 'another'}",
            "method_not_allowed",
        )
    served = ", ".join(
        f"{m} {_CONVERTER.sub('}', r.path)}"
        for r in routes
        for m in sorted((r.methods or set()) - {"HEAD"})
    )
    return f"Invalid URL ({method} {path}): the OpenAI-compatible routes are {served}", (
        "unknown_url"
    )


_CONVERTER = re.compile(r":[a-z]+}")  # "{model:path}" is shown as "{model}"


def is_v1(path: str) -> bool:
    """Whether a route path is under /v1."""
    return path == V1_PREFIX.rstrip("/") or path.startswith(V1_PREFIX)
