"""``POST /v1/audio/speech``: OpenAI's text-to-speech endpoint, streamed sentence by sentence.

The input is split at sentence boundaries; each sentence is spoken on the model's own worker
(one worker call per sentence, so other requests interleave), sped up or slowed down without
changing pitch, encoded by the request's own ``StreamEncoder`` and sent as soon as it is
ready. The first sentence is spoken before the answer starts, so a bad model, voice or text
is a 4xx, not a broken stream; a later sentence that fails ends the body incomplete (SSE: an
``error`` event). A client that goes away stops the rest: the sentence being
spoken finishes, none after it starts.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from modelhost.api.deps import Services, ServicesDep, require_api_key, require_valid_text
from modelhost.api.inference import keep_alive_seconds
from modelhost.api.openai.common import model_in_use, openai_error_responses
from modelhost.api.openai.errors import openai_error_body
from modelhost.api.tts_refusal import not_tts
from modelhost.audio.formats import FORMATS
from modelhost.audio.sentences import sentence_limit, split_sentences
from modelhost.audio.speech import (
    MAX_INPUT_CHARS,
    SpeechRequest,
    apply_speed,
    resolve_voice,
    run_audio,
    sentence_seed,
    synthesize_sentence,
)
from modelhost.errors import InvalidRequest, ModelhostError
from modelhost.offloop import import_off_loop

if TYPE_CHECKING:  # the encoder (numpy, PyAV) is imported by the first request
    from modelhost.audio.encode import StreamEncoder

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key), Depends(require_valid_text)],
    tags=["openai"],
)

SSE_MEDIA_TYPE = "text/event-stream"
IGNORED_HEADER = "X-Modelhost-Ignored"
_BINARY = {"schema": {"type": "string", "format": "binary"}}


class _ClosingStream(StreamingResponse):
    """A streaming answer that always closes its source generator when it ends, also when
    the client went away before it was read (the generator holds the model in use)."""

    def __init__(self, source: AsyncIterator[bytes], first: bytes, **kwargs) -> None:
        self._source = source
        super().__init__(_prepend(first, source), **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ModelhostError as exc:
            # A later sentence failed after the answer started: the status cannot change,
            # so the body ends without its last chunk and the client sees it incomplete
            # (never a shorter file passed off as whole).
            log.warning("speech stream ended early: %s", exc.message)
        finally:
            await self._source.aclose()


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


@router.post(
    "/audio/speech",
    summary="Text to speech (OpenAI-compatible), streamed sentence by sentence",
    response_class=Response,
    responses={
        200: {
            "description": "The audio in response_format (or SSE events with stream_format sse)",
            "content": {
                **{f.media_type: _BINARY for f in FORMATS.values()},
                SSE_MEDIA_TYPE: {"schema": {"type": "string"}},
            },
        },
        **openai_error_responses(400, 404, 409, 413),
    },
)
async def create_speech(body: SpeechRequest, request: Request, services: ServicesDep) -> Response:
    """Speak ``body.input`` with ``body.model``: the audio bytes, or SSE events."""
    if len(body.input) > MAX_INPUT_CHARS:
        raise InvalidRequest(
            f"input is {len(body.input)} characters; POST /v1/audio/speech takes at most "
            f"{MAX_INPUT_CHARS} (as OpenAI's). For longer texts use POST /v1/audio/speech/jobs "
            "with the same body: it speaks the text in the background and keeps the audio",
            error="Input too long",
        )
    keep_alive_seconds(body.keep_alive)  # a bad one is a 400 before any audio
    sentences = split_sentences(body.input, sentence_limit(services.settings.max_input_chars))
    if not sentences:
        raise InvalidRequest("input has no text to speak (only whitespace)", error="Empty input")
    fmt = FORMATS[body.response_format]
    chunks = _speech_chunks(request, services, body, sentences)
    media_type = fmt.media_type
    if body.stream_format == "sse":
        chunks = _sse_events(chunks, len(body.input))
        media_type = SSE_MEDIA_TYPE
    first = await anext(chunks)  # the model held, the voice resolved, sentence 0 spoken
    headers = {"Cache-Control": "no-store", "X-Modelhost-Sentences": str(len(sentences))}
    if body.ignored_fields():
        headers[IGNORED_HEADER] = ", ".join(body.ignored_fields())
    return _ClosingStream(chunks, first, media_type=media_type, headers=headers)


async def _speech_chunks(
    request: Request, services: Services, body: SpeechRequest, sentences: list[str]
) -> AsyncIterator[bytes]:
    """The encoded audio, a chunk per sentence (the first one may be empty: nothing of the
    file is ready yet), then the encoder's last bytes. Holds the model in use throughout."""
    async with model_in_use(services, body.model, keep_alive_seconds(body.keep_alive)) as loaded:
        if not loaded.is_tts:
            raise await not_tts(services, body.model, loaded.task, param="model")
        voice = resolve_voice(loaded, body.voice)
        assert loaded.sample_rate is not None  # every speaking family records it
        # Off the loop: the module imports numpy (in a thread), and every encoder opens a muxer.
        stream_encoder = (await import_off_loop("modelhost.audio.encode")).StreamEncoder
        encoder = await run_audio(stream_encoder, body.response_format, loaded.sample_rate)
        for index, sentence in enumerate(sentences):
            if index and await request.is_disconnected():
                log.info("speech for %s: client gone after %d sentences", body.model, index)
                return
            audio = await synthesize_sentence(
                loaded,
                sentence,
                voice.speaker,
                sentence_seed(body.seed, index),
                worker=services.lifecycle.worker(loaded),
                index=index,
            )
            yield await run_audio(
                _encode_sentence, encoder, audio.samples, audio.sample_rate, body.speed
            )
        yield await run_audio(encoder.close)


def _encode_sentence(encoder: StreamEncoder, samples, rate: int, speed: float) -> bytes:
    """One sentence at the request's speed, through the request's encoder."""
    return encoder.feed(apply_speed(samples, rate, speed))


async def _sse_events(chunks: AsyncIterator[bytes], characters: int) -> AsyncIterator[bytes]:
    """OpenAI's speech SSE: a ``speech.audio.delta`` per chunk (base64 of the file's next
    bytes), then ``speech.audio.done`` with the usage (input characters as input tokens:
    the models here have no token count of their own; no output tokens)."""
    started = False
    try:
        async for chunk in chunks:
            started = True
            if chunk:
                audio = base64.b64encode(chunk).decode("ascii")
                yield _event("speech.audio.delta", {"audio": audio})
    except ModelhostError as exc:
        if not started:  # before the answer: a plain error status
            raise
        # After it started: an ``error`` event (OpenAI's error object) ends the stream.
        yield _event("error", openai_error_body(exc.status_code, exc.message, exc.error))
        return
    finally:
        await chunks.aclose()
    usage = {"input_tokens": characters, "output_tokens": 0, "total_tokens": characters}
    yield _event("speech.audio.done", {"usage": usage})


def _event(kind: str, fields: dict) -> bytes:
    payload = json.dumps({"type": kind, **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {payload}\n\n".encode()
