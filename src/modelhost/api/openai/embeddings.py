"""OpenAI-compatible /v1 route module: embeddings (``POST /v1/embeddings``).

Each request runs on the model's own worker through the batching path: concurrent
requests coalesce into one forward (``runtime/embeddings.py``; the worker's counters show in
``/models/managed``). A request of more than ``CHUNK`` texts is queued as chunks of
``CHUNK``, which batch like any other requests. ``base64`` is the little-endian float32
bytes of each vector (the openai Python client asks for it by default and decodes it).
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from modelhost.api.deps import ServicesDep, require_api_key, require_valid_text
from modelhost.api.inference import keep_alive_field, keep_alive_seconds, on_worker
from modelhost.api.openai.common import check_model, model_in_use, openai_error_responses
from modelhost.errors import InputTooLong, InvalidRequest
from modelhost.names import NAME_SCHEMA
from modelhost.offloop import import_off_loop
from modelhost.runtime.batching import Work
from modelhost.runtime.errors import UnsupportedModel
from modelhost.runtime.families.vocabulary import canonical_task, family_name
from modelhost.runtime.loaded import LoadedModel

if TYPE_CHECKING:  # annotations only: the server starts without torch
    from modelhost.runtime.embeddings import EmbeddingRows

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key), Depends(require_valid_text)],
    tags=["openai"],
)

MAX_INPUTS = 2048  # OpenAI's limit on the texts of one request
CHUNK = 64  # texts per queued work item (runtime.compute.inputs.MAX_BATCH)
FORMATS = ("float", "base64")
INLINE_TEXTS = 8  # a response of at most this many vectors is built on the event loop


class EmbeddingsRequest(BaseModel):
    """The body of ``POST /v1/embeddings``, as OpenAI defines it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        description="an installed feature-extraction model's name", json_schema_extra=NAME_SCHEMA
    )
    # Checked by parse_input, not pydantic, so the 400 says what OpenAI's clients can send.
    input: Any = Field(
        description=f"a string or a list of up to {MAX_INPUTS} strings (token arrays are "
        "not accepted: their ids are another tokenizer's)",
        json_schema_extra={
            "anyOf": [
                {"type": "string", "pattern": r"\S"},  # not blank (parse_input)
                {
                    "type": "array",
                    "items": {"type": "string", "pattern": r"\S"},
                    "minItems": 1,
                    "maxItems": MAX_INPUTS,
                },
            ]
        },
    )
    encoding_format: str = Field(
        default="float", description="float or base64", json_schema_extra={"enum": list(FORMATS)}
    )
    dimensions: Any = Field(
        default=None, description="accepted when it equals the model's own dimension"
    )
    user: str | None = Field(default=None, description="accepted and ignored")
    keep_alive: Any = keep_alive_field()  # modelhost's (Ollama's): not an OpenAI field


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = Field(description="tokens embedded, by the model's own tokenizer")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingsUsage


def parse_input(value: Any, max_chars: int) -> list[str]:
    """The texts of ``input``: a non-empty string, or a list of 1 to ``MAX_INPUTS`` of them,
    each at most ``max_chars`` long (MODELHOST_MAX_INPUT_CHARS: 413 beyond it; 400 naming
    the offending item for anything else)."""

    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise InvalidRequest("input must be a string or a non-empty list of strings", param="input")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in texts) or all(
        isinstance(t, list) for t in texts
    ):
        raise InvalidRequest(
            "input as token ids is not supported: their ids belong to another tokenizer. "
            "Send the text (a string or a list of strings); with LangChain, set "
            "OpenAIEmbeddings(check_embedding_ctx_length=False)",
            param="input",
        )
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(
            f"input has {len(texts)} items; at most {MAX_INPUTS} per request", param="input"
        )
    for i, text in enumerate(texts):
        where = "input" if isinstance(value, str) else f"input[{i}]"
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest(f"{where} must be a non-empty string", param="input")
        if len(text) > max_chars:
            raise InputTooLong(
                f"{where} is {len(text):,} characters; one text may have at most "
                f"{max_chars:,} (MODELHOST_MAX_INPUT_CHARS): split it into several inputs",
                param="input",
            )
    return texts


def check_format(value: str) -> str:
    if value not in FORMATS:
        raise InvalidRequest(
            f"encoding_format must be 'float' or 'base64', not {value!r}",
            param="encoding_format",
        )
    return value


def check_task(name: str, task: str | None) -> None:
    """Refuse, before loading anything, a model installed with another task."""
    try:
        canonical = canonical_task(task)
    except UnsupportedModel:
        return  # the load answers for a task it has no loader for
    if canonical not in (None, "feature-extraction"):
        raise not_embedding(name, canonical)


def not_embedding(name: str, what: str, family: str | None = None) -> InvalidRequest:
    if what == "feature-extraction" and family:  # a registered family of that task
        what = f"feature-extraction through the registered family '{family}'"
    return InvalidRequest(
        f"Model '{name}' serves {what}, not embeddings: /v1/embeddings serves the built-in "
        "feature-extraction models (sentence-transformers or encoders)",
        error="Not an embedding model",
        param="model",
    )


def check_dimensions(loaded: LoadedModel, requested: Any) -> None:
    """``dimensions`` must equal the model's own: no installed model declares Matryoshka
    training, and cutting other vectors short gives worse ones silently."""
    if requested is None:
        return
    from modelhost.runtime.embeddings import dimension

    own = dimension(loaded)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise InvalidRequest("dimensions must be a positive integer", param="dimensions")
    if requested != own:
        raise InvalidRequest(
            f"Model '{loaded.name}' gives {own}-dimensional embeddings and cannot shorten "
            f"them (it declares no Matryoshka training): omit dimensions, or send {own}",
            param="dimensions",
        )


@router.post(
    "/embeddings",
    summary="OpenAI: embeddings of texts (batched with concurrent requests)",
    response_model=EmbeddingsResponse,
    responses=openai_error_responses(400, 404, 409, 413, 503),
)
async def create_embeddings(body: EmbeddingsRequest, services: ServicesDep) -> Response:
    # torch and transformers behind it: imported in a thread, never on the loop.
    runtime = await import_off_loop("modelhost.runtime.embeddings")
    embeddings_batch, embeds = runtime.embeddings_batch, runtime.embeds
    texts = parse_input(body.input, services.settings.max_input_chars)
    fmt = check_format(body.encoding_format)
    keep_alive_s = keep_alive_seconds(body.keep_alive)
    await check_model(services, body.model, lambda m: check_task(body.model, m.task))
    async with model_in_use(services, body.model, keep_alive_s) as loaded:
        if not embeds(loaded):
            raise not_embedding(body.model, loaded.task, family_name(loaded.family))
        check_dimensions(loaded, body.dimensions)
        chunks = []
        for start in range(0, len(texts), CHUNK):
            plan = embeddings_batch(loaded, texts[start : start + CHUNK])
            work = Work(plan.run_one, plan.group, plan.items, plan.payload)
            chunks.append(on_worker(services, loaded, work, plan.run))
        rows = await asyncio.gather(*chunks)
    if len(texts) <= INLINE_TEXTS:  # microseconds: not worth a thread hop
        content = response_json(body.model, rows, fmt)
    else:
        content = await asyncio.to_thread(response_json, body.model, rows, fmt)
    return Response(content, media_type="application/json")


def response_json(model: str, rows: list[EmbeddingRows], fmt: str) -> bytes:
    """The response body (built in a thread: a large request's JSON takes a while)."""
    data: list[EmbeddingObject] = []
    for part in rows:
        for vector in part.vectors:
            if fmt == "base64":
                encoded: list[float] | str = base64.b64encode(
                    vector.astype("<f4").tobytes()
                ).decode("ascii")
            else:
                encoded = vector.tolist()
            data.append(EmbeddingObject(index=len(data), embedding=encoded))
    tokens = sum(n for part in rows for n in part.tokens)
    usage = EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens)
    return EmbeddingsResponse(data=data, model=model, usage=usage).model_dump_json().encode()
