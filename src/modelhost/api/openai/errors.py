"""OpenAI's error shape for ``/v1`` routes: ``{"error": {message, type, param, code}}``.

The OpenAI clients raise their typed exceptions (``NotFoundError``, ``BadRequestError``,
``AuthenticationError`` ...) from the status and show ``error.message``; ``type`` follows
OpenAI's names, ``code`` is a short slug of modelhost's own ``error`` title.
"""

from __future__ import annotations

import re

from starlette.requests import Request

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
    path = request.url.path
    return path == V1_PREFIX.rstrip("/") or path.startswith(V1_PREFIX)


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
