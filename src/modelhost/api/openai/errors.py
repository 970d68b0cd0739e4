"""OpenAI's error shape for ``/v1`` routes: ``{"error": {message, type, param, code}}``.

The OpenAI clients raise their typed exceptions (``NotFoundError``, ``BadRequestError``,
``AuthenticationError`` ...) from the status and show ``error.message``; ``type`` follows
OpenAI's names, ``code`` is a short slug of modelhost's own ``error`` title.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field
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


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="what went wrong and what to do about it")
    type: str = Field(description="OpenAI's error type for the status")
    param: str | None = Field(default=None, description="the body field it is about")
    code: str | None = Field(default=None, description="a short slug of the error")


class OpenAIErrorBody(BaseModel):
    """Every error response of a /v1 route (``openai_error_body`` builds it)."""

    error: OpenAIErrorDetail


# Why each status is answered on /v1 routes (a malformed body is 400 there, never 422).
OPENAI_ERROR_STATUSES = {
    400: "Invalid request: a malformed body, a value out of range, an unknown voice",
    401: "MODELHOST_API_KEY is set and the request lacks 'Authorization: Bearer <key>'",
    403: "Host not in MODELHOST_ALLOWED_HOSTS, or a state change from an Origin not in "
    "MODELHOST_CORS_ORIGINS",
    404: "No such model or object",
    409: "Conflicts with the current state (a model not loaded, a job not completed)",
    501: "Part of the API but not built in this version",
    503: "The server cannot take the request now",
}


def openai_error_responses(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` for a /v1 route: the guard's 401/403 plus ``statuses``, each with
    OpenAI's error body, and ``4XX`` for the rest (which also keeps FastAPI from listing a
    422 that /v1 routes never answer)."""
    codes = sorted({401, 403, *statuses})
    body = {"model": OpenAIErrorBody}
    responses: dict[int | str, dict] = {
        code: {**body, "description": OPENAI_ERROR_STATUSES[code]} for code in codes
    }
    responses["4XX"] = {**body, "description": "Any other client error, in the same shape"}
    return responses
