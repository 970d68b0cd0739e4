"""One place that turns errors into modelhost's error body: success false, message, error."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from modelhost.api.openai.errors import (
    is_openai_path,
    openai_code,
    openai_error_body,
    unknown_route_message,
)
from modelhost.errors import Cancelled, ModelhostError
from modelhost.mirror.protocol import hub_error, is_mirror_path

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every error response of the API (4xx and 5xx alike), as ``error_body`` builds it."""

    success: Literal[False] = Field(description="always false on an error")
    message: str = Field(description="what went wrong and what to do about it")
    error: str = Field(description="a short summary of the kind of error")
    download_id: str | None = Field(
        default=None, description="a failure recorded as a download job: that job's id"
    )
    status: str | None = Field(default=None, description="with download_id: 'failed'")


# Why each status is answered; the routes list the ones they can return (``error_responses``).
ERROR_STATUSES = {
    400: "Invalid request: a bad name, source, choice or input; the message says which",
    401: "MODELHOST_API_KEY is set and the request lacks 'Authorization: Bearer <key>'",
    403: "Host not in MODELHOST_ALLOWED_HOSTS, a state change from an Origin not in "
    "MODELHOST_CORS_ORIGINS, a URL outside MODELHOST_URL_ALLOW, or the upstream refused access",
    404: "No such model, download or upstream repository/file",
    409: "Conflicts with the current state (a running job, a model not loaded, a memory budget)",
    413: "Input too long: a text past MODELHOST_MAX_INPUT_CHARS or past what the model takes "
    "in one request, or an upload past its limit; the message names the limit",
    422: "The request does not match the schema (types, lengths, patterns, unknown fields), "
    "or (error 'Load failed') the installed model could not be loaded; the message says why",
    424: "A Python module the request needs is not installed on the server; the message "
    "names the pip install to run",
    501: "Part of the API but not built in this version",
    502: "The upstream host failed or could not be reached",
    503: "The server cannot take the request now",
    507: "Not enough disk space (or cache budget) for the download",
}

# Every route can answer these: the Host/Origin guard and the API key run before it.
GUARD_STATUSES = (401, 403)


def error_responses(*statuses: int, api_key: bool = True) -> dict[int | str, dict]:
    """``responses=`` for a route: the guard's statuses plus ``statuses``, each with the
    error body's schema, so the OpenAPI schema lists what the route really answers.
    ``api_key=False`` for a route open without the key (/health)."""
    guard = GUARD_STATUSES if api_key else tuple(s for s in GUARD_STATUSES if s != 401)
    codes = sorted({*guard, *statuses})
    return {code: {"model": ErrorBody, "description": ERROR_STATUSES[code]} for code in codes}


def error_body(message: str, error: str, **extra: object) -> dict:
    """The error body every error response carries (see ``ErrorBody``)."""
    return {"success": False, "message": message, "error": error, **extra}


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for item in exc.errors():
        if item.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', '')})")
            continue
        location = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{location or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def error_response(
    request: Request,
    status: int,
    message: str,
    error: str,
    /,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
    hub_code: str | None = None,
    **extra: object,
) -> JSONResponse:
    """An error answer in the shape the route's clients read: modelhost's error body,
    OpenAI's ``{"error": {...}}`` on the OpenAI-compatible ``/v1`` routes, or the Hub's
    (``{"error": ...}``, ``X-Error-Code`` = ``hub_code``) on the mirror's ``/hf``. The first
    four are positional-only, so ``extra`` may hold a body field named ``status`` (a failed
    download's ``"status": "failed"``)."""
    if is_mirror_path(request.url.path):
        body, hub_headers = hub_error(status, message, hub_code, headers or {})
        return JSONResponse(body, status_code=status, headers=hub_headers)
    if is_openai_path(request):
        body = openai_error_body(status, message, error, param=param, code=code)
    else:
        body = error_body(message, error, **extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _first_param(exc: RequestValidationError) -> str | None:
    """The body field a validation error is about (OpenAI's ``param``)."""
    for item in exc.errors():
        location = [str(p) for p in item.get("loc", ()) if p not in ("body", "query")]
        if location:
            return ".".join(location)
    return None


def modelhost_error_response(request: Request, exc: ModelhostError) -> JSONResponse:
    """The answer to a typed error: the handler's, and a middleware's that refuses a
    request before any route runs (``api.security.ApiKeyGuard``)."""
    extra = {}
    if getattr(exc, "download_id", None):
        # A failure recorded as a job: the documented "Download Failed" body, plus its id
        # (a job cancelled while it was planning is recorded cancelled).
        state = "cancelled" if isinstance(exc, Cancelled) else "failed"
        extra = {"status": state, "download_id": exc.download_id}
    return error_response(
        request,
        exc.status_code,
        exc.message,
        exc.error,
        headers=getattr(exc, "headers", None),  # e.g. Connection: close after a refused body
        param=exc.param,
        code=openai_code(exc),
        hub_code=getattr(exc, "hub_code", None),  # the mirror's errors (mirror/protocol.py)
        **extra,
    )


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (RFC 9110's ``Allow``).

    Starlette's 405 names only the methods of the first route whose path matched, while
    FastAPI makes one route per method set: ``GET`` and ``POST`` of one path are two routes,
    and the header must list both. Each method is asked of the app's routes as a request
    would be routed (``matches``), so included routers and path converters count."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in routes
        )
    ]


def install_error_handlers(app: FastAPI, v1_routers: Sequence[APIRouter] = ()) -> None:
    """Register the handlers; every error response of the API goes through them.
    ``v1_routers``: the OpenAI-compatible routers, which a 404 or 405 under /v1 lists."""

    @app.exception_handler(ModelhostError)
    async def _modelhost_error(request: Request, exc: ModelhostError) -> JSONResponse:
        return modelhost_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = f"Invalid request: {_describe_validation(exc)}"
        # OpenAI answers a malformed body with 400; modelhost's own routes keep 422.
        status = 400 if is_openai_path(request) else 422
        return error_response(
            request, status, message, "Validation error", param=_first_param(exc)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message, code = str(exc.detail), None
        if is_openai_path(request) and exc.status_code in (404, 405):
            message, code = unknown_route_message(request, exc.status_code, v1_routers)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(
            request,
            exc.status_code,
            message,
            f"HTTP {exc.status_code}",
            headers=headers or None,
            code=code,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(
            request, 500, "Internal server error; this is a bug, please report it", repr(exc)
        )
