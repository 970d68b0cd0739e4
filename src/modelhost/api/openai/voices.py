"""The voices a text-to-speech model speaks with: ``GET /v1/audio/voices?model=NAME`` (the
shape Kokoro-FastAPI answers, ``{"voices": [...]}``) and ``GET /models/{name}/voices``.

A model's voices come from its family adapter (``voices``), so the model must be loaded (or
MODELHOST_LOAD_ON_DEMAND set), as for speaking.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from modelhost.api.deps import ModelNamePath, ServicesDep, require_api_key
from modelhost.api.errors import error_responses
from modelhost.api.openai.common import model_in_use, openai_error_responses
from modelhost.audio.speech import builtin_voices, model_voices
from modelhost.errors import InvalidRequest
from modelhost.names import NAME_SCHEMA

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])
models_router = APIRouter(dependencies=[Depends(require_api_key)], tags=["inference"])


class VoicesResponse(BaseModel):
    """A model's own voices (``voices``, the first is the default) and what OpenAI's
    built-in names map to (``openai_voices``)."""

    model_config = {"protected_namespaces": ()}

    model: str
    voices: list[str]
    default: str
    openai_voices: dict[str, str]


async def _voices(services: ServicesDep, name: str) -> VoicesResponse:
    async with model_in_use(services, name) as loaded:
        if not loaded.is_tts:
            raise InvalidRequest(
                f"Model '{name}' is a {loaded.task} model, not text-to-speech: it has no voices",
                error="Not a TTS model",
            )
        own = model_voices(loaded)
        return VoicesResponse(
            model=name, voices=own, default=own[0], openai_voices=builtin_voices(loaded)
        )


@router.get(
    "/audio/voices",
    summary="The voices of a text-to-speech model (for POST /v1/audio/speech's voice)",
    responses=openai_error_responses(400, 404, 409),
)
async def list_voices(
    services: ServicesDep,
    model: Annotated[
        str,
        Query(
            min_length=1, description="an installed TTS model's name", json_schema_extra=NAME_SCHEMA
        ),
    ],
) -> VoicesResponse:
    return await _voices(services, model)


@models_router.get(
    "/models/{model_name}/voices",
    summary="The voices of a text-to-speech model",
    responses=error_responses(400, 404, 409, 422),
)
async def model_voices_route(model_name: ModelNamePath, services: ServicesDep) -> VoicesResponse:
    return await _voices(services, model_name)
