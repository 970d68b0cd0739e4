"""One place that turns errors into the seed's error body: success false, message, error."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelhost.errors import ModelhostError

log = logging.getLogger(__name__)


def error_body(message: str, error: str, **extra: object) -> dict:
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


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; every error response of the API goes through them."""

    @app.exception_handler(ModelhostError)
    async def _modelhost_error(_request: Request, exc: ModelhostError) -> JSONResponse:
        extra = {}
        if getattr(exc, "download_id", None):
            # A failure recorded as a job: the seed's "Download Failed" body, plus its id.
            extra = {"status": "failed", "download_id": exc.download_id}
        return JSONResponse(
            error_body(exc.message, exc.error, **extra), status_code=exc.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message = f"Invalid request: {_describe_validation(exc)}"
        return JSONResponse(error_body(message, "Validation error"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), f"HTTP {exc.status_code}"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body("Internal server error; this is a bug, please report it", repr(exc)),
            status_code=500,
        )
