"""OpenAI-style long-form speech as jobs: ``/v1/audio/speech/jobs``.

``POST /v1/audio/speech/jobs`` takes ``/v1/audio/speech``'s body (``SpeechRequest``) with an
input of any length (up to ``MAX_JOB_INPUT_CHARS``) and answers 202 at once with the job;
``GET .../jobs/{id}`` shows its status and progress, ``GET .../jobs`` lists them,
``POST .../jobs/{id}/cancel`` cancels, ``DELETE .../jobs/{id}`` removes a job and its audio,
``GET .../jobs/{id}/content`` gives the audio once completed (409 before). The jobs
themselves run in ``modelhost.speechjobs``; this module validates, shapes answers, and
supplies the per-sentence synthesis the runner calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from modelhost.api.deps import Services, ServicesDep, require_api_key, require_valid_text
from modelhost.api.inference import keep_alive_seconds, loaded_model
from modelhost.api.openai.common import model_in_use, openai_error_responses
from modelhost.audio.formats import FORMATS
from modelhost.audio.sentences import sentence_limit, split_sentences
from modelhost.audio.speech import (
    SpeechRequest,
    StreamFormat,
    apply_speed,
    resolve_voice,
    sentence_seed,
    synthesize_sentence,
)
from modelhost.errors import InvalidRequest, NotImplementedYet
from modelhost.names import validate_name
from modelhost.runtime.families.vocabulary import check_loadable
from modelhost.runtime.loaded import LoadedModel
from modelhost.speechjobs import SpeechJob, SpeechJobRunner, SpeechParams, Synthesize
from modelhost.speechjobs.runner import new_seed

if TYPE_CHECKING:  # numpy: imported by the first job, not at start
    from modelhost.runtime.wav import Audio

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key), Depends(require_valid_text)],
    tags=["openai"],
)

# A job's text may be far longer than /v1/audio/speech's 4,096 characters; this bound only
# keeps one request body (stored whole in the database) reasonable: about a novel.
MAX_JOB_INPUT_CHARS = 1_000_000


class JobProgress(BaseModel):
    sentences_done: int
    sentences_total: int


class JobError(BaseModel):
    message: str
    code: str = "speech_job_failed"


class SpeechJobObject(BaseModel):
    """A speech job as the API shows it."""

    id: str
    object: Literal["audio.speech.job"] = "audio.speech.job"
    status: Literal["pending", "running", "completed", "failed", "cancelled"]
    model: str
    created_at: int = Field(description="unix seconds")
    started_at: int | None = None
    finished_at: int | None = None
    progress: JobProgress
    message: str
    error: JobError | None = None
    resumed_from: int | None = Field(
        default=None,
        description="sentences already spoken when the job last resumed after a restart",
    )
    voice: str | None
    response_format: str
    speed: float
    seed: int = Field(description="sentence i is spoken with seed + i (drawn when not sent)")
    content_url: str | None = Field(
        default=None, description="where the audio is, once the job is completed"
    )
    sample_rate: int | None = None
    duration_s: float | None = None
    bytes: int | None = Field(default=None, description="the encoded audio's size")


class SpeechJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SpeechJobObject]
    has_more: bool


class SpeechJobDeleted(BaseModel):
    id: str
    object: Literal["audio.speech.job.deleted"] = "audio.speech.job.deleted"
    deleted: bool = True


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def job_object(job: SpeechJob) -> SpeechJobObject:
    """The API's view of ``job``."""
    completed = job.state.value == "completed"
    rate, samples = job.sample_rate, job.audio_samples
    return SpeechJobObject(
        id=job.id,
        status=job.state.value,
        model=job.model,
        created_at=_unix(job.created_at) or 0,
        started_at=_unix(job.started_at),
        finished_at=_unix(job.finished_at),
        progress=JobProgress(
            sentences_done=job.sentences_done, sentences_total=job.sentences_total
        ),
        message=job.message,
        error=JobError(message=job.error) if job.error else None,
        resumed_from=job.resumed_from,
        voice=job.params.voice,
        response_format=job.params.response_format,
        speed=job.params.speed,
        seed=job.params.seed,
        content_url=f"/v1/audio/speech/jobs/{job.id}/content" if completed else None,
        sample_rate=rate,
        duration_s=round(samples / rate, 6) if completed and rate and samples is not None else None,
        bytes=job.audio_bytes if completed else None,
    )


def runner_of(services: Services) -> SpeechJobRunner:
    if services.speech_jobs is None:
        raise NotImplementedYet("Speech jobs are not enabled in this server")
    return services.speech_jobs


class SpeechJobRequest(SpeechRequest):
    """``/v1/audio/speech``'s body as a job takes it. The schema shows the job's own rules
    (no ``sse``, its longer input); ``_check_request`` enforces them with a 400 naming each."""

    input: str = Field(
        min_length=1,
        description=f"the text to speak, up to {MAX_JOB_INPUT_CHARS:,} characters",
        json_schema_extra={"maxLength": MAX_JOB_INPUT_CHARS},
    )
    stream_format: StreamFormat = Field(
        default="audio",
        description="audio only: a job's audio is fetched whole from its content URL",
        json_schema_extra={"enum": ["audio"]},
    )


def _check_request(body: SpeechRequest) -> None:
    if len(body.input) > MAX_JOB_INPUT_CHARS:
        raise InvalidRequest(
            f"input is {len(body.input):,} characters; a speech job takes at most "
            f"{MAX_JOB_INPUT_CHARS:,}: split the text into several jobs",
            error="Input too long",
        )
    if body.stream_format != "audio":
        raise InvalidRequest(
            "stream_format 'sse' does not apply to jobs: a job's audio is fetched whole from "
            "GET /v1/audio/speech/jobs/{id}/content (stream with POST /v1/audio/speech)",
            error="Invalid stream_format",
        )


def _check_tts(loaded: LoadedModel) -> None:
    if not loaded.is_tts:
        raise InvalidRequest(
            f"Model '{loaded.name}' is a {loaded.task} model, not text-to-speech: speech jobs "
            "need a TTS model",
            error="Not a TTS model",
        )


@router.post(
    "/audio/speech/jobs",
    status_code=202,
    summary="Speak a text of any length as a job (progress, resume after restart, cancel)",
    responses=openai_error_responses(400, 404, 409),
)
async def create_speech_job(body: SpeechJobRequest, services: ServicesDep) -> SpeechJobObject:
    runner = runner_of(services)
    _check_request(body)
    # The /synthesize rule: the model must be loaded (or MODELHOST_LOAD_ON_DEMAND loads it);
    # its voice is checked now, so a bad one is a 400 here rather than a failed job later.
    keep_alive_s = keep_alive_seconds(body.keep_alive)
    async with model_in_use(services, body.model, keep_alive_s) as loaded:
        _check_tts(loaded)
        resolve_voice(loaded, body.voice)
    limit = sentence_limit(services.settings.max_input_chars)
    sentences = await asyncio.to_thread(split_sentences, body.input, limit)
    params = SpeechParams(
        voice=body.voice_name,
        response_format=body.response_format,
        speed=body.speed,
        seed=body.seed if body.seed is not None else new_seed(),
        instructions=body.instructions,
    )
    return job_object(await runner.submit(body.model, sentences, params))


@router.get(
    "/audio/speech/jobs",
    summary="List speech jobs, newest first",
    responses=openai_error_responses(400),
)
async def list_speech_jobs(
    services: ServicesDep, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> SpeechJobList:
    jobs = await runner_of(services).list(limit + 1)
    return SpeechJobList(data=[job_object(j) for j in jobs[:limit]], has_more=len(jobs) > limit)


@router.get(
    "/audio/speech/jobs/{job_id}",
    summary="A speech job's status and progress",
    responses=openai_error_responses(404),
)
async def get_speech_job(job_id: str, services: ServicesDep) -> SpeechJobObject:
    return job_object(await runner_of(services).get(job_id))


@router.post(
    "/audio/speech/jobs/{job_id}/cancel",
    summary="Cancel a speech job (the sentence being spoken may finish; no more start)",
    responses=openai_error_responses(404, 409),
)
async def cancel_speech_job(job_id: str, services: ServicesDep) -> SpeechJobObject:
    return job_object(await runner_of(services).cancel(job_id))


@router.delete(
    "/audio/speech/jobs/{job_id}",
    summary="Delete a speech job and its audio (cancelling it first if it runs)",
    responses=openai_error_responses(404),
)
async def delete_speech_job(job_id: str, services: ServicesDep) -> SpeechJobDeleted:
    await runner_of(services).delete(job_id)
    return SpeechJobDeleted(id=job_id)


@router.get(
    "/audio/speech/jobs/{job_id}/content",
    summary="A completed speech job's audio, in its response_format",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The audio, in the job's response_format",
            "content": {
                f.media_type: {"schema": {"type": "string", "format": "binary"}}
                for f in FORMATS.values()
            },
        },
        **openai_error_responses(404, 409),
    },
)
async def speech_job_content(job_id: str, services: ServicesDep) -> FileResponse:
    path, media_type = await runner_of(services).content(job_id)
    return FileResponse(path, media_type=media_type, filename=f"{job_id}{path.suffix}")


# --------------------------------------------------------------------------- synthesis


@asynccontextmanager
async def _job_model(services: Services, name: str, may_load: bool) -> AsyncIterator[LoadedModel]:
    """The model held in use for one sentence. ``may_load``: a job recovered at start loads
    its model (the restart unloaded it) before its first sentence; otherwise the
    /synthesize rule holds (an unloaded model fails the job unless MODELHOST_LOAD_ON_DEMAND)."""
    validate_name(name)
    lifecycle = services.lifecycle
    if may_load and not services.runtime.is_loaded(name) and not lifecycle.is_closing(name):
        manifest = await asyncio.to_thread(services.store.require, name)
        check_loadable(manifest)
        await asyncio.to_thread(lifecycle.load, manifest)
    async with loaded_model(services, name) as loaded:
        yield loaded


def job_synthesizer(services: Services) -> Synthesize:
    """The runner's per-sentence synthesis: the speech core's, as ``/v1/audio/speech``
    speaks each sentence (same voice resolution, seed ``seed + i``, speed per sentence)."""

    async def speak(job: SpeechJob, index: int, may_load: bool) -> Audio:
        async with _job_model(services, job.model, may_load) as loaded:
            _check_tts(loaded)
            voice = resolve_voice(loaded, job.params.voice)
            seed = sentence_seed(job.params.seed, index)
            audio = await synthesize_sentence(
                loaded,
                job.sentences[index],
                voice.speaker,
                seed,
                worker=services.lifecycle.worker(loaded),
                index=index,
            )
        if job.params.speed == 1.0:
            return audio
        samples = await asyncio.to_thread(
            apply_speed, audio.samples, audio.sample_rate, job.params.speed
        )
        return dataclasses.replace(audio, samples=samples)

    return speak
