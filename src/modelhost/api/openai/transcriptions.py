"""OpenAI-compatible /v1 route module: transcriptions (``POST /v1/audio/transcriptions``).

A multipart upload (``file``, ``model``, ``language``, ``prompt``, ``response_format``,
``temperature``) on an installed Whisper model. The file is decoded with PyAV (any format
FFmpeg reads) to 16 kHz mono in a thread, then transcribed on the model's own worker.
``response_format``: ``json`` (default, ``{"text"}``), ``text``, ``verbose_json`` (language,
duration, segments), ``srt``, ``vtt``.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.types import Message, Receive

from modelhost.api.deps import ServicesDep, require_api_key
from modelhost.api.inference import keep_alive_seconds, on_worker
from modelhost.api.openai.common import check_model, model_in_use, openai_error_responses
from modelhost.errors import InputTooLong, InvalidRequest, NotImplementedYet
from modelhost.names import NAME_SCHEMA
from modelhost.offloop import import_off_loop
from modelhost.runtime.batching import Work
from modelhost.units import DURATION_TEXT_PATTERN

if TYPE_CHECKING:  # annotations only: the server starts without torch
    from modelhost.runtime.transcription import Segment, TranscribeOptions, Transcript

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])

MAX_UPLOAD_BYTES = 25 * 1000 * 1000  # OpenAI's limit on the file
MAX_SECONDS = 30.0  # one Whisper window: runtime.compute.transcribe.MAX_AUDIO_SECONDS
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
FIELDS = {
    "file",
    "model",
    "language",
    "prompt",
    "response_format",
    "temperature",
    "timestamp_granularities[]",
    "timestamp_granularities",
    "stream",
    "keep_alive",  # modelhost's (Ollama's), not OpenAI's
}

# The request body, for the OpenAPI schema (the form is parsed by hand: each bad field gets a
# 400 naming it, as OpenAI answers).
_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "model"],
                    "additionalProperties": False,  # others: a 400 naming the field
                    "properties": {
                        "file": {"type": "string", "format": "binary", "minLength": 1},
                        "model": {"type": "string", **NAME_SCHEMA},
                        "language": {"type": "string", "description": "ISO-639-1, e.g. en"},
                        "prompt": {"type": "string"},
                        "response_format": {"type": "string", "enum": list(FORMATS)},
                        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
                        "keep_alive": {
                            "type": "string",
                            "pattern": DURATION_TEXT_PATTERN,
                            "description": "how long the model stays loaded once idle, from "
                            "now on: 5m, 30s, 1h or seconds; -1 never, 0 after this request",
                        },
                    },
                }
            }
        },
    }
}


class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class UploadTooLarge(InvalidRequest):
    """An upload over ``MAX_UPLOAD_BYTES`` (413, as OpenAI answers it). The answer closes
    the connection: the rest of the body is never read (the server would otherwise go on
    receiving and discarding it to reuse the connection)."""

    status_code = 413
    error = "File too large"
    headers = {"Connection": "close"}


class Transcription(BaseModel):
    text: str
    usage: DurationUsage


class SegmentObject(BaseModel):
    """A verbose_json segment. The probabilities OpenAI adds (avg_logprob, no_speech_prob)
    are not computed here, so they are not sent."""

    id: int
    seek: int = 0
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    compression_ratio: float


class VerboseTranscription(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[SegmentObject]
    usage: DurationUsage
    timestamps: Literal["whisper", "whole-clip"] = Field(
        description="where segment times come from: Whisper's timestamp tokens, or one "
        "segment for the whole clip (a model without timestamp tokens)"
    )


@dataclass(frozen=True)
class TranscriptionForm:
    """The form's fields, checked."""

    model: str
    response_format: str
    options: TranscribeOptions
    upload: UploadFile
    keep_alive_s: float | None = None


def _field(form, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a text field, not a file", param=name)
    return value.strip() or None


def _temperature(raw: str | None) -> float:
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise InvalidRequest(
            f"temperature must be a number from 0 to 1, not {raw!r}", param="temperature"
        )
    return value


def _check_unsupported(form) -> None:
    """Refuse what is not built (501) and fields OpenAI does not define (400)."""
    unknown = sorted(set(form.keys()) - FIELDS)
    if unknown:
        raise InvalidRequest(
            f"unknown field {unknown[0]!r}; this endpoint takes: {', '.join(sorted(FIELDS))}",
            param=unknown[0],
        )
    if (_field(form, "stream") or "false").lower() not in ("false", "0"):
        raise NotImplementedYet(
            "streaming transcription (stream=true) is not built yet: omit stream", param="stream"
        )
    granularities = form.getlist("timestamp_granularities[]") + form.getlist(
        "timestamp_granularities"
    )
    if any(g != "segment" for g in granularities):
        raise NotImplementedYet(
            "word timestamps are not built yet: use timestamp_granularities[]=segment",
            param="timestamp_granularities[]",
        )


def parse_form(form) -> TranscriptionForm:
    """The checked fields of the multipart form (400 naming the first bad one). Call it
    once ``modelhost.runtime.transcription`` is imported (``import_off_loop``): its first
    import (torch) must not run on the event loop."""
    from modelhost.runtime.transcription import TranscribeOptions

    _check_unsupported(form)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("file is required: the audio file to transcribe", param="file")
    model = _field(form, "model")
    if model is None:
        raise InvalidRequest("model is required: an installed Whisper model", param="model")
    response_format = _field(form, "response_format") or "json"
    if response_format not in FORMATS:
        raise InvalidRequest(
            f"response_format must be one of {', '.join(FORMATS)}, not {response_format!r}",
            param="response_format",
        )
    options = TranscribeOptions(
        language=_field(form, "language"),
        prompt=_field(form, "prompt"),
        temperature=_temperature(_field(form, "temperature")),
        segments=response_format in ("verbose_json", "srt", "vtt"),
    )
    return TranscriptionForm(
        model=model,
        response_format=response_format,
        options=options,
        upload=upload,
        keep_alive_s=keep_alive_seconds(_field(form, "keep_alive")),
    )


# The form's other fields and its multipart framing, on top of the file.
FORM_OVERHEAD = 64 * 1024


def limited_receive(receive: Receive, limit: int) -> Receive:
    """``receive`` that refuses a body passing ``limit`` bytes as it arrives: a chunked
    upload (no Content-Length) is stopped there, before more of it is spooled to disk."""
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise UploadTooLarge(
                    f"the upload passed {limit} bytes; the file may have at most "
                    f"{MAX_UPLOAD_BYTES}: split or compress the audio",
                    param="file",
                )
        return message

    return receive_within_limit


async def read_form(request: Request):
    """The multipart form, refusing an upload over ``MAX_UPLOAD_BYTES`` before reading it
    (by its Content-Length), or as soon as it passes the limit (a chunked one)."""
    limit = MAX_UPLOAD_BYTES + FORM_OVERHEAD
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise UploadTooLarge(
            f"the upload is {int(length)} bytes; the file may have at most {MAX_UPLOAD_BYTES}: "
            "split or compress the audio",
            param="file",
        )
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest(
            "send the request as multipart/form-data (fields file and model)", param="file"
        )
    # The parser closes (and so deletes) its spooled files when the limit stops it.
    limited = Request(request.scope, receive=limited_receive(request.receive, limit))
    try:
        return await limited.form(max_files=1, max_fields=len(FIELDS) + 4)
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}", param="file") from None


async def read_upload(upload: UploadFile) -> bytes:
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadTooLarge(
            f"the file is over {MAX_UPLOAD_BYTES} bytes: split or compress the audio",
            param="file",
        )
    if not data:
        raise InvalidRequest("the file is empty", param="file")
    return data


@router.post(
    "/audio/transcriptions",
    summary="OpenAI: transcribe an audio file with a Whisper model",
    openapi_extra=_FORM_SCHEMA,
    responses={
        200: {
            "model": Transcription,
            "description": "json / verbose_json: JSON (`text`, and for verbose_json language, "
            "duration, segments); text, srt, vtt: text/plain",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **openai_error_responses(400, 404, 409, 413, 501, 503),
    },
)
async def create_transcription(request: Request, services: ServicesDep) -> Response:
    # torch, numpy and PyAV behind these: imported in a thread, never on the loop.
    transcription = await import_off_loop("modelhost.runtime.transcription")
    decode_audio = (await import_off_loop("modelhost.runtime.decode")).decode_audio
    is_whisper, transcribe = transcription.is_whisper, transcription.transcribe
    form = await read_form(request)
    try:
        parsed = parse_form(form)
        check_prompt(parsed.options.prompt, services.settings.max_input_chars)
        data = await read_upload(parsed.upload)
    finally:
        await form.close()
    await check_model(services, parsed.model, lambda m: check_task(parsed.model, m.task))
    async with model_in_use(services, parsed.model, parsed.keep_alive_s) as loaded:
        if not is_whisper(loaded):
            raise not_whisper(parsed.model, loaded.task)
        rate = int(loaded.extra["input_sample_rate"])
        try:
            samples = await asyncio.to_thread(decode_audio, data, rate, MAX_SECONDS)
        except InvalidRequest as exc:
            exc.param = "file"
            raise
        options = parsed.options
        work = Work(lambda: transcribe(loaded, samples, options))
        transcript = await on_worker(services, loaded, work)
    return render(transcript, parsed.response_format, options)


def check_prompt(prompt: str | None, limit: int) -> None:
    """Refuse (413) a ``prompt`` longer than MODELHOST_MAX_INPUT_CHARS before the upload is
    read: the model's own bound (its decoder's positions) is checked on its worker, after
    the prompt is tokenized, which must not be a text of any size."""
    if prompt is not None and len(prompt) > limit:
        raise InputTooLong(
            f"prompt is {len(prompt):,} characters; at most {limit:,} "
            "(MODELHOST_MAX_INPUT_CHARS), and Whisper's decoder holds a few hundred tokens",
            param="prompt",
        )


def check_task(name: str, task: str | None) -> None:
    """Refuse, before loading anything, a model installed with another task."""
    from modelhost.runtime.errors import UnsupportedModel
    from modelhost.runtime.families.vocabulary import canonical_task

    try:
        canonical = canonical_task(task)
    except UnsupportedModel:
        return
    if canonical not in (None, "automatic-speech-recognition"):
        raise not_whisper(name, canonical)


def not_whisper(name: str, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"Model '{name}' serves {what}, not speech recognition: "
        "/v1/audio/transcriptions serves Whisper models",
        error="Not a speech recognition model",
        param="model",
    )


def render(transcript: Transcript, fmt: str, options: TranscribeOptions) -> Response:
    """The answer in ``response_format``."""
    if fmt == "json":
        usage = DurationUsage(seconds=round(transcript.duration, 3))
        return JSONResponse(Transcription(text=transcript.text, usage=usage).model_dump())
    if fmt == "text":
        return PlainTextResponse(transcript.text + "\n")
    if fmt == "srt":
        return PlainTextResponse(srt(transcript.segments))
    if fmt == "vtt":
        return PlainTextResponse(vtt(transcript.segments))
    body = VerboseTranscription(
        language=transcript.language or "",
        duration=round(transcript.duration, 3),
        text=transcript.text,
        segments=[
            SegmentObject(
                id=i,
                start=round(s.start, 3),
                end=round(s.end, 3),
                text=s.text,
                tokens=s.tokens,
                temperature=options.temperature,
                compression_ratio=round(s.compression_ratio, 4),
            )
            for i, s in enumerate(transcript.segments)
        ],
        usage=DurationUsage(seconds=round(transcript.duration, 3)),
        timestamps="whisper" if transcript.timestamped else "whole-clip",
    )
    return JSONResponse(body.model_dump())


def clock(seconds: float, separator: str) -> str:
    """``3.5`` -> ``00:00:03,500`` (SRT, ``separator`` ",") or ``00:00:03.500`` (VTT)."""
    millis = int(round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(segments: list[Segment]) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line after each."""
    return "".join(
        f"{i}\n{clock(s.start, ',')} --> {clock(s.end, ',')}\n{s.text.strip()}\n\n"
        for i, s in enumerate(segments, start=1)
    )


def vtt(segments: list[Segment]) -> str:
    """WebVTT: the header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``."""
    cues = "".join(
        f"{clock(s.start, '.')} --> {clock(s.end, '.')}\n{s.text.strip()}\n\n" for s in segments
    )
    return f"WEBVTT\n\n{cues}"
