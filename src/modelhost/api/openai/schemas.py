"""OpenAPI documentation of the /v1 speech routes' errors, in OpenAI's shape.

The same definitions as the "oairest" branch's ``api/openai/common.py`` (which documents the
other /v1 routes): once both are merged, the speech routes should import
``openai_error_responses`` from there and this module goes (two ``OpenAIErrorBody`` classes
would give the schema two components).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from modelhost.api.errors import ERROR_STATUSES, GUARD_STATUSES


class OpenAIError(BaseModel):
    message: str = Field(description="what went wrong and what to do about it")
    type: str = Field(description="OpenAI's error type: invalid_request_error, ...")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str | None = Field(description="model_not_found, invalid_api_key, ... or a slug")


class OpenAIErrorBody(BaseModel):
    """Every error answer on /v1, in OpenAI's shape (its clients raise from the status)."""

    error: OpenAIError


def openai_error_responses(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` for a /v1 route: the guard's statuses, ``statuses``, and every other
    4xx (a malformed body is a 400 here, never FastAPI's 422), all in OpenAI's shape."""
    codes: list[int | str] = sorted({*GUARD_STATUSES, *statuses})
    described = {
        code: {"model": OpenAIErrorBody, "description": ERROR_STATUSES[code]} for code in codes
    }
    described["4XX"] = {"model": OpenAIErrorBody, "description": "Any other invalid request"}
    return described
