"""What the /v1 resource modules share: finding the request's model, and its errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from pydantic import BaseModel, Field

from modelhost.api.deps import Services
from modelhost.api.errors import ERROR_STATUSES, GUARD_STATUSES
from modelhost.api.inference import loaded_model
from modelhost.errors import InvalidName, ModelhostError, ModelNotFound
from modelhost.names import validate_name
from modelhost.runtime.loaded import LoadedModel
from modelhost.store import Manifest


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


def model_not_found(name: str) -> ModelNotFound:
    """OpenAI's 404 for a model that is not installed (its clients raise ``NotFoundError``)."""
    return ModelNotFound(
        f"The model '{name}' does not exist: no installed model has that name "
        "(GET /v1/models lists them; POST /models/download installs one)",
        param="model",
    )


async def installed(services: Services, name: str) -> Manifest:
    """The manifest of the installed model ``name`` (404 when there is none, or it is being
    deleted; 400 for a name no model can have)."""
    try:
        validate_name(name)
    except InvalidName as exc:
        exc.param = "model"
        raise
    manifest = await asyncio.to_thread(services.store.get, name)
    if manifest is None or services.lifecycle.is_closing(name):
        raise model_not_found(name)
    return manifest


async def check_model(services: Services, name: str, check: Callable[[Manifest], None]) -> None:
    """Before a /v1 route uses ``name``: a loaded model needs no disk read (as ``predict``);
    otherwise its manifest must exist and pass ``check`` (its task), before anything loads."""
    if services.runtime.is_loaded(name) and not services.lifecycle.is_closing(name):
        return
    check(await installed(services, name))


@asynccontextmanager
async def model_in_use(
    services: Services, name: str, keep_alive_s: float | None = None
) -> AsyncIterator[LoadedModel]:
    """``loaded_model`` for a /v1 route: the model (loaded on demand) held in use for the
    block, ``keep_alive_s`` its keep-alive from now on when given; its errors (not
    installed, not loaded, unloaded meanwhile) name ``model`` as their param. Call
    ``check_model`` first."""
    try:
        async with loaded_model(services, name, keep_alive_s) as loaded:
            yield loaded
    except ModelNotFound:  # deleted since installed() saw it
        raise model_not_found(name) from None
    except ModelhostError as exc:
        if exc.status_code == 409 and exc.param is None:  # not loaded, being unloaded
            exc.param = "model"
        raise
