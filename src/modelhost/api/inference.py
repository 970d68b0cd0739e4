"""Loaded models over HTTP: load, unload, ``/synthesize`` for TTS, predict for the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from modelhost.api.deps import (
    ModelNamePath,
    Services,
    ServicesDep,
    require_api_key,
    require_valid_text,
)
from modelhost.api.errors import error_responses
from modelhost.errors import Conflict, InvalidRequest, ModelNotFound
from modelhost.names import validate_name
from modelhost.runtime.batching import BatchFn, BatchSettings, Work, worker_for
from modelhost.runtime.device import check_requested_device
from modelhost.runtime.errors import ModelNotLoaded
from modelhost.runtime.families import check_loadable
from modelhost.runtime.loaded import LoadedModel

if TYPE_CHECKING:  # annotations only: numpy is imported by the first synthesis
    from modelhost.runtime.wav import Audio

router = APIRouter(
    dependencies=[Depends(require_api_key), Depends(require_valid_text)], tags=["inference"]
)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(default=None, description="auto, cpu, cuda, cuda:N or mps")
    pin: bool = Field(default=False, description="never evict this model")
    allow_pickle: bool = Field(default=False, description="allow pickled weights (weights_only)")
    # Checked by BatchSettings (a 400 saying the range), not here (pydantic would answer 422).
    max_batch_size: Any = Field(
        default=None,
        description="coalesce up to this many concurrent inputs into one forward, 1 to 256 "
        "(default 32; 1 turns batching off)",
    )
    max_batch_delay_ms: Any = Field(
        default=None,
        description="how long a busy model waits for more requests to fill a batch, 0 to 1000 "
        "ms (default 5); an idle model runs a lone request at once",
    )

    def batch_settings(self) -> BatchSettings:
        """The requested batching, defaults for what is not given (400 when out of range)."""
        default = BatchSettings()
        return BatchSettings(
            default.max_batch_size if self.max_batch_size is None else self.max_batch_size,
            default.max_batch_delay_ms
            if self.max_batch_delay_ms is None
            else self.max_batch_delay_ms,
        )


class SynthesizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str
    text: str = Field(min_length=1, max_length=5000)
    speaker: Any = Field(
        default=None,
        description="SpeechT5: speaker embedding (list of floats); Bark: voice preset; "
        "VITS: speaker id",
    )
    output_format: str = Field(default="wav", pattern="^wav$")
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=2048,
        description="Bark: semantic tokens (audio length); a speak_with pipeline: the text "
        "model's new tokens",
    )
    # The range torch.manual_seed takes; beyond it torch raises instead of seeding.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Any
    parameters: dict[str, Any] | None = None


@asynccontextmanager
async def loaded_model(services: Services, name: str) -> AsyncIterator[LoadedModel]:
    """The loaded model ``name``, held in use (``lifecycle.acquire``) for the block: an
    unload or delete waits for the block to end, and a model being deleted answers 404.
    Loads it on demand when MODELHOST_LOAD_ON_DEMAND is set."""
    validate_name(name)
    lifecycle = services.lifecycle
    if not services.runtime.is_loaded(name) and not lifecycle.is_closing(name):
        manifest = await asyncio.to_thread(services.store.require, name)
        check_loadable(manifest)
        if not services.settings.load_on_demand:
            raise ModelNotLoaded(
                f"Model '{name}' is installed but not loaded: POST /models/{name}/load first "
                "(or set MODELHOST_LOAD_ON_DEMAND=true)"
            )
        await asyncio.to_thread(lifecycle.load, manifest)
    with lifecycle.acquire(name) as loaded:
        yield loaded


@router.post(
    "/models/{model_name}/load",
    summary="Load an installed model onto a device",
    responses=error_responses(400, 404, 409, 422, 424),
)
async def load_model(
    model_name: ModelNamePath, services: ServicesDep, body: LoadRequest | None = None
) -> dict:
    validate_name(model_name)
    body = body or LoadRequest()
    batching = body.batch_settings()
    await asyncio.to_thread(check_requested_device, body.device)  # imports torch once
    manifest = await asyncio.to_thread(services.store.require, model_name)
    loaded = await asyncio.to_thread(
        services.lifecycle.load, manifest, body.device, body.pin, body.allow_pickle
    )
    loaded.batching = batching
    await asyncio.to_thread(services.store.touch, model_name)
    return {
        "success": True,
        "message": f"Model '{model_name}' loaded on {loaded.device}",
        **loaded.describe(),
    }


@router.post(
    "/models/{model_name}/unload",
    summary="Unload a model and free its memory",
    responses=error_responses(400, 404, 409, 422),
)
async def unload_model(model_name: ModelNamePath, services: ServicesDep) -> dict:
    validate_name(model_name)
    report = await asyncio.to_thread(services.lifecycle.unload, model_name)
    return {"success": True, "message": f"Model '{model_name}' unloaded", **report.to_dict()}


@router.post(
    "/synthesize",
    summary="Text to speech: audio/wav, or JSON with base64 audio (Accept: application/json)",
    response_class=Response,
    responses={
        200: {
            "description": "The speech, as audio/wav (default) or JSON with base64 audio",
            "content": {
                "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object"}},
            },
        },
        **error_responses(400, 404, 409, 422),
    },
)
async def synthesize(body: SynthesizeRequest, request: Request, services: ServicesDep) -> Response:
    from modelhost.runtime.inference import synthesize_work

    async with loaded_model(services, body.model_name) as loaded:
        pipeline: dict[str, str] = {}
        if loaded.is_tts:
            work, batch_fn = synthesize_work(
                loaded, body.text, body.speaker, max_new_tokens=body.max_new_tokens, seed=body.seed
            )
            audio = await on_worker(loaded, work, batch_fn)
        else:
            pipeline, audio = await _speak_generated_text(services, loaded, body)
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"model_name": body.model_name, **pipeline, **audio.to_json()})
    return Response(await asyncio.to_thread(audio.to_wav), media_type="audio/wav")


async def _speak_generated_text(
    services: Services, loaded: LoadedModel, body: SynthesizeRequest
) -> tuple[dict[str, str], Audio]:
    """A text model installed with ``speak_with``: its generated text, spoken by that model."""
    from modelhost.runtime.inference import speak_generated

    manifest = await asyncio.to_thread(services.store.get, body.model_name)
    speak_with = manifest.spec.speak_with if manifest else None
    if not speak_with:
        raise InvalidRequest(
            f"Model '{body.model_name}' is a {loaded.task} model, not text-to-speech; use "
            f"POST /models/{body.model_name}/predict (or install it with auto_convert_tts "
            'and "speak_with": "<a TTS model>" to have its output spoken)',
            error="Not a TTS model",
        )
    try:
        async with loaded_model(services, speak_with) as tts:
            # On the text model's worker (it then speaks on the TTS model, holding its lock).
            generated, audio = await on_worker(
                loaded,
                Work(
                    lambda: speak_generated(
                        loaded,
                        tts,
                        body.text,
                        body.speaker,
                        max_new_tokens=body.max_new_tokens,
                        seed=body.seed,
                    )
                ),
            )
    except ModelNotFound:  # not installed, or being deleted
        raise Conflict(
            f"Model '{body.model_name}' speaks with '{speak_with}', which is no longer "
            f"installed: install it again, or reinstall '{body.model_name}' with another "
            "speak_with",
            error="speak_with model missing",
        ) from None
    return {"generated_text": generated, "spoken_by": speak_with}, audio


@router.post(
    "/models/{model_name}/predict",
    summary="Run a loaded model on inputs",
    responses=error_responses(400, 404, 409, 422),
)
async def predict(model_name: ModelNamePath, body: PredictRequest, services: ServicesDep) -> dict:
    from modelhost.runtime.inference import predict_work

    async with loaded_model(services, model_name) as loaded:
        work, batch_fn = predict_work(loaded, body.inputs, body.parameters)
        result = await on_worker(loaded, work, batch_fn)
    return {"model_name": model_name, "task": loaded.task, **result}


async def on_worker(loaded: LoadedModel, work: Work, batch_fn: BatchFn | None = None) -> Any:
    """Run ``work`` on ``loaded``'s own inference worker (never asyncio's default pool, which
    the control plane needs); a full queue raises ``QueueFull`` (503)."""
    return await asyncio.wrap_future(worker_for(loaded).submit(work, batch_fn))
