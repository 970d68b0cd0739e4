"""Runs speech jobs: a small global limit, one job at a time per model, sentence by sentence.

Each sentence is one call of ``Synthesize`` (the API layer's: it holds the model in use and
runs on the model's own worker), so short ``/v1/audio/speech`` requests interleave with a
long job. A sentence's samples are on disk (``SentenceFiles``) before its counter is
committed; on start, every pending or running job resumes at its first sentence without a
file. Stopping the server leaves the rows as they are: the next start resumes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from modelhost.audio.formats import FORMATS
from modelhost.errors import Conflict, InvalidRequest, ModelhostError, SpeechJobNotFound
from modelhost.offloop import import_off_loop
from modelhost.speechjobs.db import SpeechJobRepository
from modelhost.speechjobs.files import SentenceFiles
from modelhost.speechjobs.models import SpeechJob, SpeechJobState, SpeechParams, utcnow

if TYPE_CHECKING:  # annotations only: the runtime (numpy) is not imported at start
    from modelhost.runtime.wav import Audio

log = logging.getLogger(__name__)

# (job, sentence index, may_load) -> that sentence's audio, speed applied. ``may_load``: the
# job was recovered at start and this is its first sentence since, so the model (unloaded
# by the restart) may be loaded again; otherwise the /synthesize rule holds.
Synthesize = Callable[[SpeechJob, int, bool], Awaitable["Audio"]]

QUEUE_FULL_RETRY_S = 0.2  # a full worker queue (503) is waited out, not failed
DELETE_WAIT_S = 30.0  # how long a delete waits for the running sentence to end
MAX_LIST = 500
STOP_WAIT_S = 1.5  # how long a shutdown waits for running speech jobs to stop


class JobStopped(Exception):
    """A sentence could not be spoken: the job fails with this message."""


def new_job_id() -> str:
    return f"speechjob_{secrets.token_hex(12)}"


def new_seed() -> int:
    """A random seed for a request without one (recorded: a resume reuses it)."""
    # 53 bits: a seed the job shows can be sent back in a request (the API's SEED_LIMIT).
    return int.from_bytes(os.urandom(8), "little") >> 11


class SpeechJobRunner:
    """The speech jobs of one server: submit, inspect, cancel, delete, and run them."""

    def __init__(
        self, repository: SpeechJobRepository, files: SentenceFiles, max_running: int = 2
    ) -> None:
        self.repository = repository
        self.files = files
        self.max_running = max_running
        self._synthesize: Synthesize | None = None
        self._queued: dict[str, str] = {}  # job id -> model, in run order
        self._running: dict[str, asyncio.Task] = {}
        self._busy_models: dict[str, str] = {}  # model -> the job id running on it
        self._recovered: set[str] = set()
        self._stopping: set[str] = set()  # cancelled or deleted while queued or running

    # ------------------------------------------------------------------ life

    async def start(self, synthesize: Synthesize) -> None:
        """Begin running jobs; every pending or running job in the database resumes."""
        self._synthesize = synthesize
        await asyncio.to_thread(self._sweep)
        unfinished = await asyncio.to_thread(
            self.repository.list, (SpeechJobState.PENDING, SpeechJobState.RUNNING), 100_000
        )
        for job in unfinished:
            self._queued[job.id] = job.model
            self._recovered.add(job.id)
        if unfinished:
            log.info("resuming %d speech job(s)", len(unfinished))
        self._kick()

    def _sweep(self) -> None:
        """What a crash can leave behind: the directory of a job whose row is gone (killed
        during a delete), the sentence files of a completed job (killed before they went)."""
        states = self.repository.states()
        for job_id in self.files.job_ids():
            state = states.get(job_id)
            if state is None:
                self.files.remove(job_id)
            elif state.finished:
                self.files.drop_sentences(job_id)

    async def stop(self) -> None:
        """Stop running jobs where they are (their rows stay running: the next start resumes
        at the first sentence without a file). Bounded by ``STOP_WAIT_S``: a job whose
        sentence is still running on the model's worker is left to end with the process."""
        self._synthesize = None
        self._queued.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            if late:
                log.warning("%d speech job(s) mid-sentence at shutdown; they resume", len(late))

    @property
    def running_count(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ requests

    async def submit(self, model: str, sentences: list[str], params: SpeechParams) -> SpeechJob:
        """Record a new job and queue it; it starts when its model and the limit allow."""
        if not sentences:
            raise InvalidRequest("input holds no text to speak", error="Empty input")
        if params.response_format not in FORMATS:
            raise InvalidRequest(
                f"Unknown response_format {params.response_format!r}; use one of: "
                f"{', '.join(FORMATS)}",
                error="Invalid response_format",
            )
        total = len(sentences)
        job = SpeechJob(
            id=new_job_id(),
            model=model,
            state=SpeechJobState.PENDING,
            params=params,
            sentences=tuple(sentences),
            message=f"Queued: {total} sentence{'s' if total != 1 else ''}",
        )
        await asyncio.to_thread(self.files.create, job.id)
        await asyncio.to_thread(self.repository.insert, job)
        self._queued[job.id] = model
        self._kick()
        return job

    async def get(self, job_id: str) -> SpeechJob:
        """The job ``job_id``, or 404."""
        job = await asyncio.to_thread(self.repository.get, job_id)
        if job is None:
            raise SpeechJobNotFound(
                f"No speech job {job_id!r}: GET /v1/audio/speech/jobs lists the jobs there are"
            )
        return job

    async def list(self, limit: int = 100) -> list[SpeechJob]:
        """The newest ``limit`` jobs, newest first."""
        return await asyncio.to_thread(self.repository.list, None, min(limit, MAX_LIST))

    async def cancel(self, job_id: str) -> SpeechJob:
        """Cancel a pending or running job: no further sentence starts (the one running may
        finish, its audio is dropped). Cancelling a cancelled job is a no-op; a completed or
        failed one answers 409."""
        job = await self.get(job_id)
        if job.state == SpeechJobState.CANCELLED:
            return job
        if job.state.finished:
            raise Conflict(
                f"Speech job {job_id} is {job.state.value}: only a pending or running job "
                "can be cancelled",
                error="Speech job finished",
            )
        cancelled = job.evolve(
            state=SpeechJobState.CANCELLED,
            finished_at=utcnow(),
            message=f"Cancelled after {job.sentences_done} of {job.sentences_total} sentences",
        )
        if not await asyncio.to_thread(self.repository.save, cancelled):
            return await self.cancel(job_id)  # it reached a final state meanwhile
        self._stop(job_id)
        await asyncio.to_thread(self.files.drop_sentences, job_id)  # it will have no audio
        return cancelled

    async def delete(self, job_id: str) -> None:
        """Remove a job and its audio; a pending or running one is cancelled first."""
        job = await self.get(job_id)
        if not job.state.finished:
            try:
                await self.cancel(job_id)
            except Conflict:
                pass  # it finished meanwhile: delete it all the same
        self._stop(job_id)
        task = self._running.get(job_id)
        if task is not None:
            await asyncio.wait({task}, timeout=DELETE_WAIT_S)
        await asyncio.to_thread(self.repository.delete, job_id)
        await asyncio.to_thread(self.files.remove, job_id)

    async def content(self, job_id: str) -> tuple[Path, str]:
        """The completed job's encoded audio and its media type; 409 before completion."""
        job = await self.get(job_id)
        fmt = job.params.response_format
        if job.state != SpeechJobState.COMPLETED:
            raise Conflict(_not_ready(job), error="Speech job not completed")
        path = self.files.audio_path(job_id, fmt)
        if not await asyncio.to_thread(path.is_file):
            raise Conflict(
                f"Speech job {job_id} is completed but its audio file is missing from "
                f"{path.parent}: submit the job again",
                error="Speech job audio missing",
            )
        return path, FORMATS[fmt].media_type

    # ------------------------------------------------------------------ scheduling

    def _stop(self, job_id: str) -> None:
        """No sentence of ``job_id`` starts from now on (a queued job never starts)."""
        self._queued.pop(job_id, None)
        if job_id in self._running:
            self._stopping.add(job_id)

    def _kick(self) -> None:
        """Start every queued job its model and the global limit allow, oldest first."""
        if self._synthesize is None:
            return
        for job_id, model in list(self._queued.items()):
            if len(self._running) >= self.max_running:
                return
            if model in self._busy_models:
                continue
            del self._queued[job_id]
            self._busy_models[model] = job_id
            task = asyncio.create_task(self._run(job_id), name=f"speech-job-{job_id}")
            self._running[job_id] = task
            task.add_done_callback(lambda _t, j=job_id, m=model: self._done(j, m))

    def _done(self, job_id: str, model: str) -> None:
        self._running.pop(job_id, None)
        if self._busy_models.get(model) == job_id:
            del self._busy_models[model]
        self._recovered.discard(job_id)
        self._stopping.discard(job_id)
        self._kick()

    # ------------------------------------------------------------------ running

    async def _run(self, job_id: str) -> None:
        job = await asyncio.to_thread(self.repository.get, job_id, True)
        if job is None or job.state.finished:
            return
        try:
            await self._run_sentences(job)
        except asyncio.CancelledError:
            raise  # the server is stopping: the row stays running, the next start resumes it
        except FileNotFoundError:
            if await asyncio.to_thread(self.files.exists, job_id):
                await self._fail(job_id, "Its audio files disappeared while it ran")
        except JobStopped as exc:
            await self._fail(job_id, str(exc))
        except ModelhostError as exc:
            await self._fail(job_id, exc.message)
        except Exception as exc:  # a bug: the job says so instead of hanging
            log.exception("speech job %s failed", job_id)
            await self._fail(job_id, f"Internal error ({exc!r}); this is a bug, please report it")

    async def _run_sentences(self, job: SpeechJob) -> None:
        total = job.sentences_total
        start = await asyncio.to_thread(self.files.first_missing, job.id, total)
        resumed = job.id in self._recovered and job.state == SpeechJobState.RUNNING
        if resumed:
            log.info("speech job %s resumes at sentence %d of %d", job.id, start + 1, total)
        job = job.evolve(
            state=SpeechJobState.RUNNING,
            started_at=job.started_at or utcnow(),
            sentences_done=start,
            resumed_from=start if resumed else job.resumed_from,
            message=f"Speaking: {start} of {total} sentences done",
        )
        if not await asyncio.to_thread(self.repository.save, job):
            return  # cancelled before it started
        may_load = job.id in self._recovered
        for index in range(start, total):
            if job.id in self._stopping:
                return
            audio = await self._sentence(job, index, may_load)
            may_load = False
            if job.id in self._stopping:
                return  # cancelled while the sentence ran: nothing more is written
            await self._write(job, index, audio)
            job = job.evolve(
                sentences_done=index + 1,
                sample_rate=audio.sample_rate,
                message=f"Speaking: {index + 1} of {total} sentences done",
            )
            if not await asyncio.to_thread(self.repository.save, job):
                return
        await self._complete(job)

    async def _sentence(self, job: SpeechJob, index: int, may_load: bool) -> Audio:
        assert self._synthesize is not None
        while True:
            try:
                return await self._synthesize(job, index, may_load)
            except ModelhostError as exc:
                if exc.status_code == 503 and job.id not in self._stopping:
                    await asyncio.sleep(QUEUE_FULL_RETRY_S)  # the worker's queue is full
                    continue
                raise JobStopped(
                    f"Stopped at sentence {index + 1} of {job.sentences_total}: {exc.message}"
                ) from exc

    async def _write(self, job: SpeechJob, index: int, audio: Audio) -> None:
        try:
            await asyncio.to_thread(
                self.files.write_sentence, job.id, index, audio.samples, audio.sample_rate
            )
        except ValueError as exc:  # another sample rate: the model changed under the job
            raise JobStopped(
                f"Stopped at sentence {index + 1} of {job.sentences_total}: {exc}; submit the "
                "job again"
            ) from exc

    async def _complete(self, job: SpeechJob) -> None:
        """Encode the whole audio once, keep it, then mark the job completed."""
        fmt = job.params.response_format
        rate = job.sample_rate or await asyncio.to_thread(self.files.sample_rate, job.id)
        assert rate is not None
        samples = await asyncio.to_thread(self.files.read_all, job.id, job.sentences_total)
        # numpy and PyAV: not at start, and imported in a thread, never on the loop.
        encode = await import_off_loop("modelhost.audio.encode")
        data = await asyncio.to_thread(encode.encode_audio, samples, rate, fmt)
        await asyncio.to_thread(self.files.write_audio, job.id, fmt, data)
        seconds = len(samples) / rate
        done = job.evolve(
            state=SpeechJobState.COMPLETED,
            finished_at=utcnow(),
            sample_rate=rate,
            audio_bytes=len(data),
            audio_samples=len(samples),
            message=f"Completed: {job.sentences_total} sentences, {seconds:.2f} s of audio",
        )
        if await asyncio.to_thread(self.repository.save, done):
            await asyncio.to_thread(self.files.drop_sentences, job.id)

    async def _fail(self, job_id: str, message: str) -> None:
        job = await asyncio.to_thread(self.repository.get, job_id)
        if job is None or job.state.finished:
            return
        failed = job.evolve(
            state=SpeechJobState.FAILED, finished_at=utcnow(), error=message, message=message
        )
        if await asyncio.to_thread(self.repository.save, failed):
            await asyncio.to_thread(self.files.drop_sentences, job_id)


def _not_ready(job: SpeechJob) -> str:
    progress = f"{job.sentences_done} of {job.sentences_total} sentences"
    if job.state == SpeechJobState.FAILED:
        return f"Speech job {job.id} failed ({job.error}); it has no audio: submit it again"
    if job.state == SpeechJobState.CANCELLED:
        return f"Speech job {job.id} was cancelled ({progress} done); it has no audio"
    return (
        f"Speech job {job.id} is {job.state.value} ({progress} done): its audio is ready "
        "when its status is completed"
    )
