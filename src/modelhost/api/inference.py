"""Loaded models over HTTP: load, unload, ``/synthesize`` for TTS, predict for the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from types import ModuleType
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
from modelhost.api.tts_refusal import not_tts
from modelhost.audio.speech import SEED_LIMIT
from modelhost.errors import (
    Conflict,
    InputTooLong,
    InvalidRequest,
    ModelhostError,
    ModelNotFound,
)
from modelhost.names import DEVICE_SCHEMA, NAME_SCHEMA, validate_name
from modelhost.offloop import import_off_loop
from modelhost.runtime.batching import BatchFn, BatchSettings, Work
from modelhost.runtime.device import check_requested_device
from modelhost.runtime.errors import ModelNotLoaded
from modelhost.runtime.families.vocabulary import check_loadable
from modelhost.runtime.loaded import LoadedModel
from modelhost.units import DURATION_HELP, DURATION_SCHEMA, parse_duration

if TYPE_CHECKING:  # annotations only: numpy is imported by the first synthesis
    from modelhost.runtime.wav import Audio

router = APIRouter(
    dependencies=[Depends(require_api_key), Depends(require_valid_text)], tags=["inference"]
)

# A request may find its model unloaded between loading it and holding it (an idle or an
# explicit unload won the race); with on-demand loading it loads it again, this many times.
ACQUIRE_ATTEMPTS = 3


def keep_alive_field() -> Any:
    """The ``keep_alive`` field of the bodies that use a model (checked by
    ``keep_alive_seconds``: a 400 naming the syntax, not pydantic's 422)."""
    return Field(
        default=None,
        description="how long the model stays loaded once idle, from now on: a duration such "
        "as 5m, 30s, 1h or seconds; -1 keeps it loaded (and loads it again at start), 0 "
        "unloads it after this request (default: MODELHOST_KEEP_ALIVE)",
        examples=["5m", -1],
        json_schema_extra=DURATION_SCHEMA,
    )


def keep_alive_seconds(value: Any) -> float | None:
    """A request's ``keep_alive`` in seconds (-1: never unloaded), None when not given;
    ``InvalidRequest`` (400) naming the accepted syntax otherwise."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise InvalidRequest(
            DURATION_HELP, error="Invalid keep_alive", param="keep_alive"
        ) from None


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(
        default=None, description="auto, cpu, cuda, cuda:N or mps", json_schema_extra=DEVICE_SCHEMA
    )
    pin: bool = Field(default=False, description="never evict this model")
    keep_alive: Any = keep_alive_field()
    allow_pickle: bool = Field(default=False, description="allow pickled weights (weights_only)")
    # Checked by BatchSettings (a 400 saying the range), not here (pydantic would answer 422).
    max_batch_size: Any = Field(
        default=None,
        description="coalesce up to this many concurrent inputs into one forward, 1 to 256 "
        "(default 32; 1 turns batching off)",
        json_schema_extra={
            "anyOf": [{"type": "integer", "minimum": 1, "maximum": 256}, {"type": "null"}]
        },
    )
    max_batch_delay_ms: Any = Field(
        default=None,
        description="how long a busy model waits for more requests to fill a batch, 0 to 1000 "
        "ms (default 5); an idle model runs a lone request at once",
        json_schema_extra={
            "anyOf": [{"type": "number", "minimum": 0, "maximum": 1000}, {"type": "null"}]
        },
    )

    def batch_settings(self) -> BatchSettings:
        """The requested batching, defaults for what is not given (400 when out of range)."""
        default = BatchSettings()
        size = self.max_batch_size
        if isinstance(size, float) and size.is_integer():
            size = int(size)  # JSON's 87.0 is the integer 87 (as JSON Schema's "integer" says)
        return BatchSettings(
            default.max_batch_size if size is None else size,
            default.max_batch_delay_ms
            if self.max_batch_delay_ms is None
            else self.max_batch_delay_ms,
        )


class SynthesizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(json_schema_extra=NAME_SCHEMA)
    # Its upper bound is MODELHOST_MAX_INPUT_CHARS, checked by the route (413 saying where
    # long texts go), not here (pydantic would answer 422).
    text: str = Field(min_length=1)
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
    # Within the range torch.manual_seed takes (see SEED_LIMIT): beyond it torch raises.
    seed: int | None = Field(default=None, ge=0, le=SEED_LIMIT)
    keep_alive: Any = keep_alive_field()


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Any
    parameters: dict[str, Any] | None = None
    keep_alive: Any = keep_alive_field()


async def runtime_inference() -> ModuleType:
    """``modelhost.runtime.inference`` (torch, transformers, numpy), imported in a thread on
    the first request: on the loop it froze /health and SSE for seconds."""
    return await import_off_loop("modelhost.runtime.inference")


def check_text_length(text: str, limit: int) -> None:
    """Refuse (413), before any model is touched, a ``/synthesize`` text longer than
    MODELHOST_MAX_INPUT_CHARS: one forward over it could take the server's memory (a
    5,000-character VITS request grew it past 24 GB). Long texts are spoken sentence by
    sentence by /v1/audio/speech, or in the background by a speech job."""
    if len(text) > limit:
        raise InputTooLong(
            f"text is {len(text):,} characters; /synthesize speaks at most {limit:,} in one "
            "request (MODELHOST_MAX_INPUT_CHARS). For longer texts use POST /v1/audio/speech, "
            "which speaks them sentence by sentence, or POST /v1/audio/speech/jobs",
            param="text",
        )


def not_loaded(name: str) -> ModelNotLoaded:
    """The 409 for an installed model that is not loaded when on-demand loading is off."""
    return ModelNotLoaded(
        f"Model '{name}' is installed but not loaded, and MODELHOST_LOAD_ON_DEMAND is off: "
        f"load it first with `modelhost load {name}` or POST /models/{name}/load"
    )


@asynccontextmanager
async def loaded_model(
    services: Services,
    name: str,
    keep_alive_s: float | None = None,
    operation: str | None = None,
) -> AsyncIterator[LoadedModel]:
    """The loaded model ``name``, held in use (``lifecycle.acquire``) for the block: an
    unload or delete waits for the block to end, and a model being deleted answers 404.
    Every route that runs a model goes through here: an installed model that is not loaded
    is loaded first (MODELHOST_LOAD_ON_DEMAND; concurrent first requests share the load),
    else 409. ``keep_alive_s`` (a request's ``keep_alive``) sets how long it stays loaded
    once idle; ``operation`` is shown in ``/models/managed`` meanwhile."""
    validate_name(name)
    with ExitStack() as stack:
        loaded = await _hold(services, name, stack, operation)
        if keep_alive_s is not None:
            await asyncio.to_thread(services.lifecycle.set_keep_alive, loaded, keep_alive_s)
        try:
            yield loaded
        except ModelNotLoaded:  # released while the request was queued on its worker
            raise await _unloaded_or_deleted(services, name) from None


async def _unloaded_or_deleted(services: Services, name: str) -> ModelhostError:
    """What a request whose model was released under it answers: 404 when a delete took
    it (running, or done: no manifest any more), else the 409 of an unload."""
    deleting = services.lifecycle.is_closing(name)
    if deleting or await asyncio.to_thread(services.store.get, name) is None:
        return ModelNotFound(
            f"Model '{name}' was deleted while this request waited for it",
            error="Model being deleted",
        )
    return ModelNotLoaded(
        f"Model '{name}' was unloaded while this request waited for it; send it again "
        f"(it loads on demand when MODELHOST_LOAD_ON_DEMAND is on) or load it with "
        f"POST /models/{name}/load"
    )


async def _hold(
    services: Services, name: str, stack: ExitStack, operation: str | None
) -> LoadedModel:
    """``lifecycle.acquire(name)`` entered on ``stack``, loading the model first if needed;
    a model unloaded in between is loaded again (on demand only)."""
    lifecycle = services.lifecycle
    for attempt in range(1, ACQUIRE_ATTEMPTS + 1):
        if not services.runtime.is_loaded(name) and not lifecycle.is_closing(name):
            await load_on_demand(services, name)
        try:
            return stack.enter_context(lifecycle.acquire(name, operation))
        except ModelNotLoaded:
            if not services.settings.load_on_demand or attempt == ACQUIRE_ATTEMPTS:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


async def load_on_demand(services: Services, name: str) -> LoadedModel:
    """Load the installed model ``name`` for a request, sharing a load of it under way
    (``lifecycle.load_shared``: its own thread; this coroutine only awaits it). 404 when it
    is not installed, 400 when it is download-only, 409 when on-demand loading is off."""
    manifest = await asyncio.to_thread(services.store.require, name)
    check_loadable(manifest)
    if not services.settings.load_on_demand:
        raise not_loaded(name)
    return await asyncio.wrap_future(services.lifecycle.load_shared(manifest))


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
    keep_alive_s = keep_alive_seconds(body.keep_alive)
    await asyncio.to_thread(check_requested_device, body.device)  # imports torch once
    manifest = await asyncio.to_thread(services.store.require, model_name)
    loaded = await asyncio.to_thread(
        services.lifecycle.load,
        manifest,
        body.device,
        body.pin,
        body.allow_pickle,
        keep_alive_s,
    )
    loaded.batching = batching
    await asyncio.to_thread(services.store.touch, model_name)
    return {
        "success": True,
        "message": f"Model '{model_name}' loaded on {loaded.device}",
        **services.lifecycle.describe(loaded),
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
        **error_responses(400, 404, 409, 413, 422),
    },
)
async def synthesize(body: SynthesizeRequest, request: Request, services: ServicesDep) -> Response:
    synthesize_work = (await runtime_inference()).synthesize_work

    check_text_length(body.text, services.settings.max_input_chars)
    keep_alive_s = keep_alive_seconds(body.keep_alive)
    async with loaded_model(services, body.model_name, keep_alive_s) as loaded:
        pipeline: dict[str, str] = {}
        if loaded.is_tts:
            work, batch_fn = synthesize_work(
                loaded, body.text, body.speaker, max_new_tokens=body.max_new_tokens, seed=body.seed
            )
            audio = await on_worker(services, loaded, work, batch_fn)
        else:
            pipeline, audio = await _speak_generated_text(services, loaded, body)
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"model_name": body.model_name, **pipeline, **audio.to_json()})
    return Response(await asyncio.to_thread(audio.to_wav), media_type="audio/wav")


async def _speak_generated_text(
    services: Services, loaded: LoadedModel, body: SynthesizeRequest
) -> tuple[dict[str, str], Audio]:
    """A text model installed with ``speak_with``: its generated text, spoken by that model."""
    speak_generated = (await runtime_inference()).speak_generated

    manifest = await asyncio.to_thread(services.store.get, body.model_name)
    speak_with = manifest.spec.speak_with if manifest else None
    if not speak_with:
        raise await not_tts(
            services,
            body.model_name,
            loaded.task,
            hint=f"Use POST /models/{body.model_name}/predict (or install it with "
            'auto_convert_tts and "speak_with": "<a TTS model>" to have its output spoken)',
        )
    try:
        async with loaded_model(services, speak_with) as tts:
            # On the text model's worker (it then speaks on the TTS model, holding its lock).
            generated, audio = await on_worker(
                services,
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
    responses=error_responses(400, 404, 409, 413, 422),
)
async def predict(model_name: ModelNamePath, body: PredictRequest, services: ServicesDep) -> dict:
    predict_work = (await runtime_inference()).predict_work

    keep_alive_s = keep_alive_seconds(body.keep_alive)
    async with loaded_model(services, model_name, keep_alive_s) as loaded:
        work, batch_fn = predict_work(loaded, body.inputs, body.parameters)
        result = await on_worker(services, loaded, work, batch_fn)
    return {"model_name": model_name, "task": loaded.task, **result}


async def on_worker(
    services: Services, loaded: LoadedModel, work: Work, batch_fn: BatchFn | None = None
) -> Any:
    """Run ``work`` on ``loaded``'s own inference worker, which the lifecycle keeps (never
    asyncio's default pool, which the control plane needs); a full queue raises
    ``QueueFull`` (503)."""
    worker = services.lifecycle.worker(loaded)
    return await asyncio.wrap_future(worker.submit(work, batch_fn))
