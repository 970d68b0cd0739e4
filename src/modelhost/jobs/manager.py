"""The job manager: turns download requests into jobs and runs them to a final state.

It lives on the event loop and never blocks it: planning, transfers, commits and database
writes run in worker threads. At most ``max_downloads`` jobs transfer at once; the rest wait
as ``pending`` in arrival order. Identical requests share one job (and so one transfer).
Unfinished jobs are persisted, so a restart picks them up where their partial files stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import shutil
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.catalog import speaks
from modelhost.config import PicklePolicy
from modelhost.convert import ConvertLimits, convert_pickles
from modelhost.errors import (
    Cancelled,
    Conflict,
    FetchError,
    InsufficientStorage,
    InvalidRequest,
    JobNotFound,
    ModelhostError,
    ModelNotFound,
    PickleRejected,
    UpstreamError,
)
from modelhost.fetch import CancelToken, FetchedFile, FetchEngine, FileSpec, Progress
from modelhost.fetch.archive import extract_zip, remove_tree
from modelhost.fetch.engine import set_thread_nice
from modelhost.fetch.ratelimit import RateLimiter
from modelhost.jobs.db import JobRepository
from modelhost.jobs.events import EventBus, EventKind, JobEvent
from modelhost.jobs.models import Job, JobState, JobView, utcnow
from modelhost.names import validate_name
from modelhost.packages import require_modules
from modelhost.runtime.device import check_requested_device
from modelhost.sources import (
    DownloadRequest,
    HubSettings,
    Plan,
    Source,
    SourceContext,
    get_source,
)
from modelhost.sources.base import FileChanges, check_file_paths, install_options
from modelhost.sources.gates import check_catalog_gates
from modelhost.spec import InstallOptions, ModelSpec, describe_differences
from modelhost.store import CommitFile, Manifest, Store
from modelhost.units import GB, MB

if TYPE_CHECKING:  # the registry imports torch; jobs need only its type
    from modelhost.runtime.lifecycle import ModelLifecycle
    from modelhost.runtime.registry import ModelRegistry, UnloadReport

log = logging.getLogger(__name__)

PROGRESS_FLUSH_S = 2.0
# Progress events go out at most this often per job (status events go out at once).
PROGRESS_EVENT_S = 0.25
# Transfers run at a lower CPU priority than the threads that answer requests, so that a
# saturated link never slows the API on a small machine.
TRANSFER_NICE = 10
THROUGHPUT_HISTORY = 5
FINISHED_CACHE = 1000
# How long stop() waits for cancelled jobs to record their state; a job still busy then
# (a commit's fsync) stays "downloading" in the database and resumes on the next start.
STOP_WAIT_S = 3.0
# A cancelled download's partial files are kept this long for a retry (retry_download resumes
# from them); then, unless a later download of the name took them over, they are removed.
CANCELLED_PARTIALS_KEEP_S = 24 * 3600.0
EXPIRY_SWEEP_S = 3600.0  # how often the kept partials of cancelled downloads are looked at


# Sources that cannot even plan without an optional module (they read its metadata).
SOURCE_MODULES: dict[str, tuple[str, ...]] = {
    "torchvision": ("torchvision",),
    "torchaudio": ("torchaudio",),
}


def check_modules(request: DownloadRequest) -> None:
    """Refuse (``MissingDependency``, 424) a request whose source, or whose requested load,
    needs an optional Python module this server lacks: known before any upstream request.
    Blocking (searches sys.path without importing): call it in a worker thread."""
    require_modules(SOURCE_MODULES.get(request.source, ()), f"The {request.source} source")
    if request.load and (request.load_as or "").startswith("torchvision:"):
        require_modules(("torchvision",), f"Loading a model as {request.load_as}")


def load_refusal(manifest: Manifest) -> str | None:
    """Why an installed model is not loadable at all, as a phrase ("download only: ...",
    "not loaded: ..."); None when a load may be tried."""
    if manifest.source == "url" and not manifest.spec.load_as:
        return (
            "not loaded: a bare weights file has no architecture to load it into "
            '(a TorchScript file loads with "load_as": "torchscript")'
        )
    if not manifest.spec.loadable:
        return "download only: " + "; ".join(manifest.spec.notes or ["no loader"])
    return None


def load_failed_message(name: str, reason: str) -> str:
    """A job's message when the install committed but the requested load failed."""
    return (
        f"Model '{name}' installed, but loading failed: {reason}; "
        f"retry with: modelhost load {name}"
    )


def request_key(request: DownloadRequest) -> str:
    """Requests with the same key are the same download: the same name, the same identity
    (every field that changes what gets installed) and the same expected digest."""
    relevant = install_options(request).model_dump()
    relevant.update(name=request.name, sha256=request.sha256)
    return hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()[:32]


def phase_of_files(statuses: list[str]) -> str | None:
    """A transferring job's phase from its files' statuses: ``downloading`` while any file
    still has bytes to come, ``verifying`` once all are in and a digest is being checked,
    None (no change) when every file is done."""
    if any(status in ("queued", "downloading") for status in statuses):
        return "downloading"
    return "verifying" if "verifying" in statuses else None


def planning_ended_by(exc: BaseException) -> str:
    """What a planning job that ended on ``exc`` says it ended on."""
    if isinstance(exc, ModelhostError):
        return exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "Planning interrupted (the request or the server stopped)"
    return f"Planning failed: internal error ({type(exc).__name__})"


def new_job(request: DownloadRequest, key: str, **fields: Any) -> Job:
    """A fresh job row for ``request`` (with a new id unless ``fields`` give one)."""
    fields.setdefault("id", secrets.token_hex(6))
    return Job(
        key=key,
        name=request.name,
        source=request.source,
        model_id=request.model_id,
        request=request.model_dump(),
        **fields,
    )


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as the jobs table stores it (JSON)."""
    return {
        "source": plan.source,
        "model_id": plan.model_id,
        "task": plan.task,
        "files": [dataclasses.asdict(spec) for spec in plan.files],
        "revision": plan.revision,
        "spec": plan.spec.model_dump(mode="json"),
        "convert": list(plan.convert),
        "archive": plan.archive,
        "changes": dataclasses.asdict(plan.changes) if plan.changes else None,
    }


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """A stored plan, including rows written before specs were typed (their ``extra``,
    ``model_type`` and ``description`` keys), so that old jobs still resume."""
    files = [FileSpec(**f) for f in data["files"]]
    if "spec" in data:
        spec = ModelSpec.model_validate(data["spec"])
        extra: dict[str, Any] = data
    else:
        extra = data.get("extra") or {}
        legacy = {"model_type": data.get("model_type"), "description": data.get("description")}
        spec = ModelSpec.from_legacy({**extra, **legacy})
    changes = extra.get("changes")
    return Plan(
        source=data["source"],
        model_id=data["model_id"],
        task=data.get("task"),
        files=files,
        revision=data.get("revision"),
        spec=spec,
        convert=list(extra.get("convert") or []),
        archive=extra.get("archive"),
        changes=FileChanges(**changes) if changes else None,
    )


def describe_changes(installed: Manifest, plan: Plan) -> FileChanges:
    """What an update changes, file by file, compared by content."""
    before = {f.path: (f.sha256, f.git_sha1) for f in installed.files}
    added, modified, unchanged = [], [], []
    for spec in plan.files:
        old = before.get(spec.path)
        if old is None:
            added.append(spec.path)
        elif (spec.sha256 and spec.sha256 == old[0]) or (spec.git_sha1 and spec.git_sha1 == old[1]):
            unchanged.append(spec.path)
        else:
            modified.append(spec.path)
    planned = {spec.path for spec in plan.files}
    removed = sorted(path for path in before if path not in planned)
    return FileChanges(
        from_revision=installed.revision,
        to_revision=plan.revision,
        added=added,
        modified=modified,
        removed=removed,
        unchanged=len(unchanged),
    )


def check_same_identity(installed: Manifest, request: DownloadRequest) -> None:
    """Raise ``Conflict`` (409) unless ``request`` asks for the model installed under its
    name: the same identity in every field the request sends, or (for manifests that did not
    record one) the same source and model id, as requested or as resolved."""
    asked = install_options(request)
    recorded = installed.spec.options
    if recorded is None:  # an older manifest: what it was installed from is all it knows
        recorded = InstallOptions(source=installed.source, model_id=installed.model_id)
        recorded = recorded.model_copy(update={"legacy": True})
    resolved = (installed.source, installed.model_id) == (request.source, request.model_id)
    # A field the request leaves out asks for nothing: `pull x --force` without the task it
    # was installed with means the installed model, not the default task.
    sent = request.model_fields_set | {"source", "model_id"}
    diffs = [diff for diff in recorded.differences(asked) if diff[0] in sent]
    if not diffs or (recorded.legacy and resolved):
        return
    if {"source", "model_id"} & {field for field, _, _ in diffs} and not resolved:
        raise Conflict(
            f"A different model is already installed as '{request.name}' "
            f"({installed.source}: {installed.model_id}); delete it first or pick another name",
            error="Name in use",
        )
    raise Conflict(describe_differences(request.name, diffs), error="Installed differently")


def request_of(installed: Manifest) -> DownloadRequest:
    """The request that installs ``installed`` again, when no job row remembers it: its
    recorded options, or (older manifests) its source, model id and task."""
    options = installed.spec.options
    if options is not None and not options.legacy:
        fields = options.model_dump(exclude={"legacy"}, exclude_none=True)
        if fields.get("task") == DownloadRequest.model_fields["task"].default:
            # The API's default task, left unset, so the model's own config decides again.
            del fields["task"]
        return DownloadRequest(name=installed.name, **fields)
    return DownloadRequest(
        source=installed.source,
        model_id=installed.model_id,
        name=installed.name,
        task=installed.task or "text-generation",
    )


@dataclass(frozen=True)
class SubmitResult:
    """What ``POST /models/download`` answers: a job, or the installed model."""

    job: Job | None
    installed: Manifest | None
    plan: Plan | None
    shared: bool = False  # an identical request was already running
    # Bytes of the plan's files that earlier attempts left and this job will not fetch again
    # (measured before the job started; 0 for a forced download).
    resumed_bytes: int = 0

    @property
    def already_exists(self) -> bool:
        return self.installed is not None


@dataclass(frozen=True)
class Removal:
    """What ``remove_model`` removed."""

    manifest: Manifest | None  # None when it was not installed
    freed: int  # bytes of blobs freed
    cancelled: Job | None  # the download it cancelled
    partial_bytes: int  # bytes of partial files of failed / cancelled downloads removed
    ended_jobs: int  # failed / cancelled downloads of the name whose partials it looked at
    unloaded: UnloadReport | None = None  # what unloading it from memory freed


@dataclass
class _Active:
    """A job that has not finished: its row plus what only the running process knows."""

    job: Job
    plan: Plan
    progress: Progress
    cancel: CancelToken
    task: asyncio.Task | None = None
    # While DOWNLOADING: downloading, verifying (every byte is in, digests being checked),
    # converting, committing. Other states are their own phase.
    phase: str = "downloading"
    # Whether a cancel keeps the partial files for a retry (a delete's cancel does not).
    keep_partials: bool = True


class JobManager:
    """Owns the job queue. Create it, ``await start()``, and ``await stop()`` on shutdown."""

    def __init__(
        self,
        store: Store,
        engine: FetchEngine,
        repository: JobRepository,
        *,
        max_downloads: int = 2,
        parallel_files: int = 4,
        cache_limit_bytes: int | None = None,
        disk_reserve_bytes: int = 0,
        hub: HubSettings | None = None,
        registry: ModelRegistry | None = None,
        lifecycle: ModelLifecycle | None = None,
        mirrors: dict[str, str | None] | None = None,
        torch_hub_allow: tuple[str, ...] = (),
        pickle_policy: PicklePolicy = "convert",
        convert_limits: ConvertLimits | None = None,
        import_roots: tuple[Path, ...] = (),
        cancelled_partials_keep_s: float = CANCELLED_PARTIALS_KEEP_S,
    ) -> None:
        self.cancelled_partials_keep_s = cancelled_partials_keep_s
        self._expired: set[str] = set()  # cancelled jobs whose kept partials were removed
        self.torch_hub_allow = torch_hub_allow
        self.pickle_policy = pickle_policy
        self.convert_limits = convert_limits or ConvertLimits()
        self.import_roots = import_roots
        self.hub = hub
        self.mirrors = mirrors or {}
        if lifecycle is None and registry is not None:
            from modelhost.runtime.lifecycle import ModelLifecycle

            lifecycle = ModelLifecycle(registry, store)
        # Loads after install, disk eviction and deletes go through the model's lifecycle.
        self.lifecycle = lifecycle
        self.registry = lifecycle.registry if lifecycle is not None else None
        self.store = store
        self.engine = engine
        self.repository = repository
        self.max_downloads = max_downloads
        self.parallel_files = parallel_files
        self.cache_limit_bytes = cache_limit_bytes
        self.disk_reserve_bytes = disk_reserve_bytes
        # What each started job still had to write when its disk check passed, and how many
        # bytes it had moved then: running jobs' claims on the free space.
        self._disk_claims: dict[str, tuple[int, int]] = {}
        self._disk_check_lock = asyncio.Lock()
        self._active: dict[str, _Active] = {}
        self._pending: deque[str] = deque()
        self._running: set[str] = set()
        self._planning: dict[str, asyncio.Future[SubmitResult]] = {}
        self._planning_names: dict[str, str] = {}
        # Cancel tokens of plans in progress (worker threads), so that stop() can abort their
        # metadata requests instead of waiting for a silent upstream.
        self._plan_cancels: set[CancelToken] = set()
        self._plan_cancels_lock = threading.Lock()
        # The token of each job being planned, by job id: a cancel of the job reaches its plan.
        self._planning_tokens: dict[str, CancelToken] = {}
        # Jobs this process finished, so status polls of them need no database round trip.
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._throughputs: deque[tuple[int, float]] = deque(maxlen=THROUGHPUT_HISTORY)
        self._flusher: asyncio.Task | None = None
        self._expirer: asyncio.Task | None = None
        self._progress_publisher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Live progress for the event streams; jobs being planned (during their POST) show
        # there as pending/planning before they have a row.
        self.events = EventBus()
        self._planning_jobs: dict[str, Job] = {}
        self._published: dict[str, tuple[JobState, str | None]] = {}
        self._published_version: dict[str, int] = {}
        self._stopping = False
        self.download_requests = 0
        self.cache_hits = 0
        self.bytes_transferred = 0

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover the store and resume every job a shutdown or crash interrupted."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.store.recover)
        unfinished = await asyncio.to_thread(
            self.repository.list, [JobState.PENDING, JobState.DOWNLOADING, JobState.LOADING]
        )
        finished = await asyncio.to_thread(self.repository.list, [JobState.COMPLETED], None, 20)
        for job in reversed(finished):
            self._record_throughput(job)
        for job in sorted(unfinished, key=lambda j: j.created_at):
            if job.state == JobState.LOADING:  # installed already; only the load was cut short
                await self._save(
                    job.evolve(
                        state=JobState.COMPLETED,
                        finished_at=utcnow(),
                        message="Download completed; loading was interrupted by a restart "
                        f"(load it with POST /models/{job.name}/load)",
                    )
                )
                continue
            if job.plan is None:
                await self._save(
                    job.evolve(
                        state=JobState.FAILED,
                        message="Interrupted before its plan was recorded; request it again",
                    )
                )
                continue
            job = job.evolve(state=JobState.PENDING, message="Resuming after restart")
            await self._save(job)
            self._enqueue(job, plan_from_dict(job.plan))
        self._flusher = asyncio.create_task(self._flush_progress_forever())
        self._expirer = asyncio.create_task(self._expire_cancelled_partials_forever())
        self._progress_publisher = asyncio.create_task(self._publish_progress_forever())
        self._maybe_start()

    async def stop(self) -> None:
        """Interrupt plans and running transfers, leaving jobs resumable (state ``pending``).

        Bounded: in-flight requests are aborted (their sockets shut), and jobs get
        ``STOP_WAIT_S`` to record their state."""
        self._stopping = True
        for task in (self._flusher, self._progress_publisher, self._expirer):
            if task:
                task.cancel()
        with self._plan_cancels_lock:
            planning = list(self._plan_cancels)
        for token in planning:
            token.cancel("server shutting down")
        tasks = []
        for active in list(self._active.values()):
            active.cancel.cancel("server shutting down")
            if active.task:
                tasks.append(active.task)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            if late:
                log.warning("%d job(s) still busy at shutdown; they resume on restart", len(late))
        await asyncio.to_thread(self.repository.close)

    # --- submitting ------------------------------------------------------------------------

    async def submit(
        self, request: DownloadRequest, *, force: bool = False, update: bool = False
    ) -> SubmitResult:
        """Start (or join) the download ``request`` describes.

        Answers at once with the installed model (``already_exists``), the identical job
        already running, or a new job; raises for a bad request before anything is recorded.
        An upstream failure while planning is recorded as a failed job (its id rides on the
        exception). ``force`` re-downloads an installed model; ``update`` installs the
        revision's newest commit over it, reusing unchanged files.
        """
        source = get_source(request.source)
        validate_name(request.name)
        # Before any upstream request: a device this server lacks would only fail the load
        # at the end (the check imports torch once, so it runs in a thread).
        await asyncio.to_thread(check_requested_device, request.device)
        if request.speak_with is not None:
            await asyncio.to_thread(self._check_speak_with, request)
        self.download_requests += 1
        key = request_key(request)

        installed = await asyncio.to_thread(self.store.get, request.name)
        if installed is not None and not (force or update):
            check_same_identity(installed, request)
            self.cache_hits += 1
            await asyncio.to_thread(self.store.touch, request.name)
            return SubmitResult(job=None, installed=installed, plan=None)
        # Before planning (the first upstream request): a module the source or the requested
        # load needs and this server lacks.
        await asyncio.to_thread(check_modules, request)
        for active in self._active.values():
            if active.job.key == key:
                return SubmitResult(job=active.job, installed=None, plan=active.plan, shared=True)
            if active.job.name == request.name:
                raise Conflict(
                    f"Another download for '{request.name}' is in progress "
                    f"(download_id {active.job.id}); cancel it or pick another name",
                    error="Name in use",
                )
        if key in self._planning:
            result = await asyncio.shield(self._planning[key])
            return dataclasses.replace(result, shared=True)
        if request.name in self._planning_names:
            raise Conflict(
                f"Another download for '{request.name}' is being prepared; retry in a moment",
                error="Name in use",
            )

        future: asyncio.Future[SubmitResult] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.exception())  # waiters get it; no stray warning
        self._planning[key] = future
        self._planning_names[request.name] = key
        planning = self._begin_planning(request, key, force)
        cancel = self._planning_tokens[planning.id] = CancelToken()
        try:
            result = await self._plan_and_create(
                source, request, planning, installed, update, cancel
            )
            future.set_result(result)
            return result
        except UpstreamError as exc:
            exc.download_id = await self._record_failure(planning, exc)
            future.set_exception(exc)
            raise
        except Cancelled as exc:
            if cancel.cancelled and not self._stopping:  # a cancel of this job, by request
                exc.download_id = await self._record_failure(planning, exc, JobState.CANCELLED)
            else:
                self._end_planning(planning, JobState.FAILED, exc.message)
            future.set_exception(exc)
            raise
        except BaseException as exc:
            future.set_exception(exc)
            # Whatever ended the plan, the streams that saw it planning see it end.
            self._end_planning(planning, JobState.FAILED, planning_ended_by(exc))
            raise
        finally:
            del self._planning[key]
            del self._planning_names[request.name]
            self._planning_jobs.pop(planning.id, None)
            self._planning_tokens.pop(planning.id, None)

    async def _plan_and_create(
        self,
        source: Source,
        request: DownloadRequest,
        planning: Job,
        installed: Manifest | None,
        update: bool,
        cancel: CancelToken,
    ) -> SubmitResult:
        """Plan ``request``, check the plan fits, and queue its job (the planning one's id)."""
        plan = await asyncio.to_thread(self._plan_cancellable, source, request, cancel)
        cancel.raise_if_cancelled()  # cancelled as the plan ended: no job starts
        # The manifest keeps the request's options: its identity, and what loading needs.
        options = install_options(request)
        if update and installed is not None and installed.spec.options is not None:
            options = installed.spec.options  # an update asks for the same model, newer
        plan = dataclasses.replace(plan, spec=plan.spec.model_copy(update={"options": options}))
        if update and installed is not None:
            if plan.revision == installed.revision:
                self._end_planning(planning, JobState.COMPLETED, "Already up to date")
                return SubmitResult(job=None, installed=installed, plan=plan)
            plan = dataclasses.replace(plan, changes=describe_changes(installed, plan))
        check_file_paths([spec.path for spec in plan.files])
        self._check_fits(plan)
        await self._check_disk_or_record(planning, plan)
        # Measured before the job starts writing: what the job will resume from.
        resumed = 0 if planning.force else await asyncio.to_thread(self.resumable_bytes, plan)
        job = await self._create_job(planning, plan)
        return SubmitResult(job=job, installed=None, plan=plan, resumed_bytes=resumed)

    def resumable_bytes(self, plan: Plan) -> int:
        """Bytes of ``plan``'s files that partial files hold and a fetch will resume from
        (``FetchEngine.resumable_bytes``). Blocking: stats files."""
        return sum(self.engine.resumable_bytes(spec) for spec in plan.files)

    def _begin_planning(self, request: DownloadRequest, key: str, force: bool) -> Job:
        """The job ``request`` becomes once planned, shown meanwhile as pending/planning."""
        job = new_job(
            request,
            key,
            state=JobState.PENDING,
            message="Planning: reading the upstream's file list",
            force=force,
        )
        self._planning_jobs[job.id] = job
        self._publish_status(self._view(job, phase="planning"))
        return job

    def _end_planning(self, planning: Job, state: JobState, message: str) -> None:
        """Tell the streams how a planning job that gets no row ended."""
        if self._planning_jobs.pop(planning.id, None) is None:
            return  # recorded (and published) as a failed job already
        ended = planning.evolve(state=state, message=message, finished_at=utcnow())
        self._publish_status(self._view(ended))

    def _check_speak_with(self, request: DownloadRequest) -> None:
        """``speak_with`` must name another installed model that can speak."""
        name = request.speak_with
        if not request.auto_convert_tts:
            raise InvalidRequest(
                "speak_with goes with auto_convert_tts: true (it names the TTS model that "
                "speaks this text model's output)",
                error="speak_with without auto_convert_tts",
            )
        if request.source != "huggingface":
            raise InvalidRequest(
                "speak_with applies to text generation models from the huggingface source",
                error="speak_with not applicable",
            )
        if name == request.name:
            raise InvalidRequest("speak_with must name another model", error="Invalid speak_with")
        tts = self.store.get(name)
        if tts is None:
            raise InvalidRequest(
                f"speak_with names '{name}', which is not installed: install a text-to-speech "
                "model first (e.g. source tts_auto, model_id mms-tts-eng)",
                error="speak_with model not installed",
            )
        if not speaks(tts) or not tts.spec.loadable:
            raise InvalidRequest(
                f"speak_with names '{name}' ({tts.source}: {tts.model_id}), which is not a "
                "text-to-speech model the server can run",
                error="speak_with model cannot speak",
            )

    def _source_context(self, cancel: CancelToken | None = None) -> SourceContext:
        return SourceContext(
            engine=self.engine,
            hub=self.hub,
            mirrors=self.mirrors,
            torch_hub_allow=self.torch_hub_allow,
            cancel=cancel,
            pickle_policy=self.pickle_policy,
            import_roots=self.import_roots,
        )

    def _plan_cancellable(
        self, source: Source, request: DownloadRequest, cancel: CancelToken | None = None
    ) -> Plan:
        """``source.plan`` with a cancel token ``stop()`` (and, given one, a cancel of the
        job) can reach (worker thread)."""
        cancel = cancel or CancelToken()
        with self._plan_cancels_lock:
            self._plan_cancels.add(cancel)
        try:
            if self._stopping:
                raise Cancelled("server shutting down")
            check_catalog_gates(request)
            return source.plan(request, self._source_context(cancel))
        finally:
            with self._plan_cancels_lock:
                self._plan_cancels.discard(cancel)

    def plan_only(self, request: DownloadRequest) -> Plan:
        """What ``request`` would fetch, from the upstream's metadata; no job, no bytes.
        Blocking (metadata requests): call it in a worker thread."""
        return self._plan_cancellable(get_source(request.source), request)

    async def _record_failure(
        self, planning: Job, exc: ModelhostError, state: JobState = JobState.FAILED
    ) -> str:
        """A job that failed (or was cancelled) before its first byte, so its reason stays
        observable."""
        now = utcnow()
        if state == JobState.CANCELLED:
            message = f"Download of model '{planning.name}' cancelled while planning"
        else:
            message = f"Failed to download model '{planning.name}': {exc.message}"
        job = planning.evolve(
            state=state,
            message=message,
            error=exc.error,
            started_at=now,
            finished_at=now,
        )
        self._planning_jobs.pop(planning.id, None)
        try:
            await asyncio.to_thread(self.repository.insert, job)
        finally:
            self._remember_finished(job)
            self._publish_status(self._view(job))
        return job.id

    def _check_fits(self, plan: Plan) -> None:
        size = plan.total_size
        if (
            self.cache_limit_bytes is not None
            and size is not None
            and size > self.cache_limit_bytes
        ):
            raise InsufficientStorage(
                f"The model is {size / MB:.1f} MB, more than the whole cache budget "
                f"(MODELHOST_CACHE_LIMIT_GB = {self.cache_limit_bytes / GB:g} GB)",
                error="Larger than the cache budget",
            )

    async def _check_disk_or_record(self, planning: Job, plan: Plan) -> None:
        """Refuse (507) a download the disk cannot hold, recording it as a failed job when
        the database can still be written; the 507 comes back either way."""
        claims = self._claimed_bytes()
        try:
            await asyncio.to_thread(self._check_disk, planning.name, plan, planning.force, claims)
        except InsufficientStorage as exc:
            try:
                exc.download_id = await self._record_failure(planning, exc)
            except InsufficientStorage:
                log.warning("could not record the refused download of %s", planning.name)
            raise

    def _claimed_bytes(self, exclude: str | None = None) -> int:
        """Bytes that started jobs still have to write (on the event loop: no locking)."""
        claimed = 0
        for job_id, (needed, moved_then) in self._disk_claims.items():
            active = self._active.get(job_id)
            if job_id == exclude or active is None:
                continue
            claimed += max(0, needed - (active.progress.transferred - moved_then))
        return claimed

    def bytes_to_write(self, plan: Plan, force: bool) -> int:
        """What ``plan`` still has to write to disk: its files' sizes minus the bytes already
        in partial files and the blobs the store already holds (blocking: stats files).

        Files of unknown size count zero (the transfer's own ENOSPC check covers them); an
        archive counts twice, since it is unpacked beside itself before the commit."""
        by_git_sha1 = {} if force else self.store.blobs_by_git_sha1()
        needed = 0
        for spec in plan.files:
            if spec.size is None:
                continue
            sha256 = spec.sha256 or by_git_sha1.get(spec.git_sha1 or "")
            if not force and sha256 and self.store.has_blob(sha256):
                continue
            present = 0 if force else self.engine.partial_size(spec)
            needed += max(0, spec.size - present)
            if plan.archive == "zip":
                needed += spec.size
        return needed

    def _check_disk(self, name: str, plan: Plan, force: bool, claimed: int) -> int:
        """Raise ``InsufficientStorage`` unless the home's free space, less what running jobs
        still write, covers this plan plus the reserve. Returns the bytes it needs."""
        needed = self.bytes_to_write(plan, force)
        free = shutil.disk_usage(self.engine.partial_dir).free
        if needed + self.disk_reserve_bytes <= free - claimed:
            return needed
        others = (
            f", of which running downloads still have to write {claimed / MB:.1f} MB"
            if claimed
            else ""
        )
        raise InsufficientStorage(
            f"Not enough disk space for '{name}': it needs {needed / MB:.1f} MB plus the "
            f"{self.disk_reserve_bytes / MB:g} MB reserve (MODELHOST_DISK_RESERVE_MB), "
            f"{free / MB:.1f} MB free under {self.store.root}{others}; free disk space or "
            "lower the reserve, then retry. Nothing was written",
            error="Insufficient storage",
        )

    async def _start_checked(self, active: _Active) -> None:
        """Run a job once the disk still has room for it: a job that waited in the queue
        may find the space taken by the jobs that ran before it."""
        async with self._disk_check_lock:  # one check at a time: each sees the others' claims
            claims = self._claimed_bytes(exclude=active.job.id)
            try:
                needed = await asyncio.to_thread(
                    self._check_disk, active.job.name, active.plan, active.job.force, claims
                )
            except InsufficientStorage as exc:
                await self._fail_before_start(active, exc)
                return
            self._disk_claims[active.job.id] = (needed, active.progress.transferred)
        try:
            await self._run(active)
        finally:
            self._disk_claims.pop(active.job.id, None)

    async def _fail_before_start(self, active: _Active, exc: ModelhostError) -> None:
        job = active.job.evolve(
            state=JobState.FAILED,
            message=f"Failed to download model '{active.job.name}': {exc.message}",
            error=exc.error,
            finished_at=utcnow(),
        )
        active.job = job
        try:
            await self._save(job)
        except Exception:  # the database's disk may be full too: the state stays in memory
            log.exception("could not persist the end of job %s", job.id)
        self._remember_finished(job)
        self._active.pop(job.id, None)
        self._running.discard(job.id)
        self._publish_ended(job, active.progress)
        self._maybe_start()

    async def _create_job(self, planning: Job, plan: Plan) -> Job:
        job = planning.evolve(
            message="Queued", plan=plan_to_dict(plan), bytes_total=plan.total_size
        )
        await asyncio.to_thread(self.repository.insert, job)
        self._planning_jobs.pop(job.id, None)
        active = self._enqueue(job, plan)
        self._maybe_start()
        return active.job

    def _enqueue(self, job: Job, plan: Plan) -> _Active:
        progress = Progress(plan.total_size, on_status=self._file_status_listener(job.id))
        for spec in plan.files:
            progress.track(spec.path, spec.size)
        active = _Active(job=job, plan=plan, progress=progress, cancel=CancelToken())
        self._active[job.id] = active
        self._pending.append(job.id)
        self._publish_active(active)
        return active

    def _maybe_start(self) -> None:
        while not self._stopping and self._pending and len(self._running) < self.max_downloads:
            job_id = self._pending.popleft()
            active = self._active.get(job_id)
            if active is None:
                continue
            self._running.add(job_id)
            # The state flips now, so the answer to the POST that started it is already true.
            active.job = active.job.evolve(
                state=JobState.DOWNLOADING, started_at=utcnow(), message="Downloading"
            )
            self._publish_active(active)
            active.task = asyncio.create_task(self._start_checked(active), name=f"job-{job_id}")

    # --- running ---------------------------------------------------------------------------

    async def _run(self, active: _Active) -> None:
        job = active.job
        try:
            await self._save(job)
            fetched, reused = await asyncio.to_thread(self._fetch_all, active)
            plan = active.plan
            manifest = Manifest(
                name=job.name,
                source=plan.source,  # the concrete source, when tts_auto resolved one
                model_id=plan.model_id,
                revision=plan.revision,
                task=plan.task,
                download_id=job.id,
                spec=plan.spec,
            )
            files = [
                CommitFile(
                    path=f.spec.path,
                    local_path=f.local_path,
                    size=f.size,
                    sha256=f.sha256,
                    git_sha1=f.spec.git_sha1,
                )
                for f in fetched
            ] + reused
            if plan.archive == "zip":  # its CRCs and sizes checked as it unpacks
                self._set_phase(active, "verifying")
                files = await asyncio.to_thread(self._unpack, job.id, files)
            if plan.convert:
                files, conversions = await self._convert(active, files, plan.convert)
                manifest = manifest.model_copy(update={"conversions": conversions})
            self._set_phase(active, "committing")
            manifest = await asyncio.to_thread(self.store.commit, manifest, files)
            await asyncio.to_thread(self._discard_partials, active.plan)  # their .json state
            remove_tree(self.engine.partial_dir / f"extract-{job.id}")
            evicted = await self._enforce_cache_limit(job.name)
            load_note, load_failure = await self._load_installed(active, manifest)
            transferred = sum(f.bytes_transferred for f in fetched)
            self.bytes_transferred += transferred
            message = "Download completed successfully"
            changes = plan.changes
            if changes:
                message = (
                    f"Updated from {str(changes.from_revision)[:12]} to "
                    f"{str(changes.to_revision)[:12]}: {len(changes.modified)} changed, "
                    f"{len(changes.added)} added, {len(changes.removed)} removed, "
                    f"{changes.unchanged} unchanged; {transferred} bytes transferred"
                )
            if reused:
                message += f" ({len(reused)} file(s) already in the cache were reused)"
            if manifest.conversions:
                converted = ", ".join(
                    f"{c.original_path} -> {c.converted_path}" for c in manifest.conversions
                )
                message += f"; pickled weights converted to safetensors: {converted}"
            if evicted:
                message += f"; evicted to stay within the cache budget: {', '.join(evicted)}"
            message += load_note
            total = sum(f.size for f in files)
            job = active.job.evolve(
                state=JobState.COMPLETED,
                message=message,
                bytes_done=total,
                bytes_total=total,
                bytes_transferred=transferred,
                finished_at=utcnow(),
            )
            self._record_throughput(job)
            if load_failure is not None:  # installed and committed; the load asked for failed
                job = job.evolve(
                    state=JobState.FAILED,
                    message=load_failed_message(job.name, load_failure.message),
                    error=load_failure.error,
                )
        except Cancelled as exc:
            if self._stopping:
                job = active.job.evolve(
                    state=JobState.PENDING,
                    message="Interrupted by shutdown; resumes on the next start",
                )
            else:
                job = active.job.evolve(
                    state=JobState.CANCELLED,
                    message=f"Download cancelled: {exc.message}"
                    + await self._after_cancel(active),
                    finished_at=utcnow(),
                )
        except ModelhostError as exc:
            job = active.job.evolve(
                state=JobState.FAILED,
                message=f"Failed to download model '{job.name}': {exc.message}",
                error=exc.error,
                finished_at=utcnow(),
            )
        except Exception as exc:  # a bug: record it on the job rather than lose it
            log.exception("job %s crashed", job.id)
            job = active.job.evolve(
                state=JobState.FAILED,
                message=f"Failed to download model '{job.name}': internal error: {exc!r}",
                error="Internal error",
                finished_at=utcnow(),
            )
        # Conversions not committed (a failure, a cancel) leave nothing behind.
        await asyncio.to_thread(remove_tree, self._convert_dir(job.id))
        # Committed, the manifest keeps the reused blobs; otherwise nothing needs them now.
        await asyncio.to_thread(self.store.release_blobs, job.id)
        snapshot = active.progress.snapshot()
        if job.state != JobState.COMPLETED:
            job = dataclasses.replace(job, bytes_done=snapshot.bytes_done)
        active.job = job
        try:
            await self._save(job)
        except Exception:  # e.g. the database's disk is full: keep serving the job's state
            log.exception("could not persist the end of job %s", job.id)
        if job.state.finished:
            self._remember_finished(job)
        self._active.pop(job.id, None)
        self._running.discard(job.id)
        self._publish_ended(job, active.progress)
        self._maybe_start()

    async def _after_cancel(self, active: _Active) -> str:
        """Keep a cancelled job's partial files for a retry (or discard them, for a delete's
        cancel); returns what the job's message adds about them."""
        if not active.keep_partials:
            await asyncio.to_thread(self._discard_partials, active.plan)
            return ""
        kept = await asyncio.to_thread(self.resumable_bytes, active.plan)
        if not kept:
            return ""
        hours = self.cancelled_partials_keep_s / 3600
        return (
            f"; {kept} bytes already fetched are kept for {hours:g} hours: retry_download "
            f"resumes from them, DELETE /models/download/{active.job.name} removes them"
        )

    async def _load_installed(
        self, active: _Active, manifest: Manifest
    ) -> tuple[str, ModelhostError | None]:
        """Load a just-installed model when the request asks (the default). Returns what to
        add to the job's message, and the error when the load failed (the job then fails;
        the model stays installed)."""
        request = active.job.request
        if self.lifecycle is None or not request.get("load", True):
            return "", None
        refusal = load_refusal(manifest)
        if refusal is not None:  # nothing to load: the install is the whole job
            return f"; {refusal}", None
        active.job = active.job.evolve(state=JobState.LOADING, message="Loading")
        self._publish_active(active)
        await self._save(active.job)
        try:
            loaded = await asyncio.to_thread(
                self.lifecycle.load,
                manifest,
                request.get("device"),
                request.get("pin", False),
                request.get("allow_pickle", False),
            )
        except ModelhostError as exc:  # every load failure is typed (lifecycle.load)
            if self.lifecycle.is_closing(manifest.name):  # deleted while loading
                raise Cancelled("the model was deleted while it was loading") from exc
            return "", exc
        if self.lifecycle.is_closing(manifest.name):  # a delete came once the load had ended
            raise Cancelled("the model was deleted while it was loading")
        return f"; loaded on {loaded.device}", None

    def _fetch_all(self, active: _Active) -> tuple[list[FetchedFile], list[CommitFile]]:
        """Fetch the plan's files in parallel (worker thread). Files whose blob the store
        already holds are reused, not fetched. The first failure cancels the rest."""
        to_fetch: list[FileSpec] = []
        reused: list[CommitFile] = []
        by_git_sha1 = {} if active.job.force else self.store.blobs_by_git_sha1()
        for spec in active.plan.files:
            sha256 = spec.sha256 or by_git_sha1.get(spec.git_sha1 or "")
            # Held, not just seen: a delete or an eviction of the model that also has this
            # blob must not take it before this job commits (released in _run).
            size = None
            if sha256 and not active.job.force:
                size = self.store.hold_blob(active.job.id, sha256)
            if sha256 and size is not None:
                active.progress.add_existing(size, spec.path)
                active.progress.set_status(spec.path, "cached")
                reused.append(CommitFile(spec.path, None, size, sha256, spec.git_sha1))
            else:
                if active.job.force:
                    self.engine.discard(spec)
                to_fetch.append(spec)
        if not to_fetch:
            return [], reused
        workers = min(self.parallel_files, len(to_fetch))
        # The request's cap, one bucket shared by all of this job's files and connections.
        limiter = RateLimiter.from_mbps(active.job.request.get("max_mbps"))
        with ThreadPoolExecutor(
            workers,
            thread_name_prefix=f"fetch-{active.job.id}",
            initializer=set_thread_nice,
            initargs=(TRANSFER_NICE,),
        ) as pool:
            futures = [
                pool.submit(self.engine.fetch, spec, active.progress, active.cancel, limiter)
                for spec in to_fetch
            ]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                first = failed[0].exception()
                if not isinstance(first, Cancelled):
                    active.cancel.cancel(f"another file failed: {first}")
                wait(futures)
                raise first  # type: ignore[misc]
            return [f.result() for f in futures], reused

    def _convert_dir(self, job_id: str) -> Path:
        return self.engine.partial_dir / f"convert-{job_id}"

    async def _convert(
        self, active: _Active, files: list[CommitFile], paths: list[str]
    ) -> tuple[list[CommitFile], list]:
        """The ``converting`` phase: the verified pickles become safetensors in an isolated
        worker process (``modelhost.convert``); a refused pickle fails the job and its
        bytes are discarded, so nothing of it stays."""
        active.job = active.job.evolve(
            message=f"Converting pickled weights to safetensors: {', '.join(paths[:4])}"
        )
        self._set_phase(active, "converting")
        await self._save(active.job)
        workdir = self._convert_dir(active.job.id)
        try:
            return await asyncio.to_thread(
                convert_pickles,
                files,
                paths,
                workdir,
                self.convert_limits,
                self.store.blob_path,
                active.cancel,
            )
        except PickleRejected:
            await asyncio.to_thread(self._discard_partials, active.plan)
            raise

    def _unpack(self, job_id: str, archives: list[CommitFile]) -> list[CommitFile]:
        """A repository archive's files, extracted safely, in place of the archive."""
        destination = self.engine.partial_dir / f"extract-{job_id}"
        remove_tree(destination)
        unpacked = []
        try:
            for archive in archives:
                source = archive.local_path or self.store.blob_path(archive.sha256)
                unpacked += [
                    CommitFile(item.path, item.local_path, item.size, item.sha256)
                    for item in extract_zip(source, destination)
                ]
        except BaseException as exc:
            remove_tree(destination)
            if isinstance(exc, FetchError):  # a corrupt archive: fetching it again is cleaner
                for archive in archives:
                    if archive.local_path is not None:
                        archive.local_path.unlink(missing_ok=True)
                        archive.local_path.with_suffix(".json").unlink(missing_ok=True)
                        archive.local_path.with_suffix(".parts.json").unlink(missing_ok=True)
            raise
        return unpacked

    def _discard_partials(self, plan: Plan) -> None:
        for spec in plan.files:
            self.engine.discard(spec)

    async def _enforce_cache_limit(self, keep: str) -> list[str]:
        """Evict least-recently-used models to the cache limit, never ``keep`` nor a loaded,
        loading or pinned model."""
        if self.cache_limit_bytes is None:
            return []
        keep_set = {keep} | (self.lifecycle.protected() if self.lifecycle else set())
        return await asyncio.to_thread(self.store.evict_to_fit, self.cache_limit_bytes, keep_set)

    async def _save(self, job: Job) -> None:
        """Persist ``job``; a job this process has seen end stays ended (the repository
        refuses too, for writes already on their way to it)."""
        ended = self._finished.get(job.id)
        if ended is not None and not job.state.finished:
            log.debug("job %s ended as %s: late %s write dropped", job.id, ended.state, job.state)
            return
        await asyncio.to_thread(self.repository.save, job)

    async def _expire_cancelled_partials_forever(self) -> None:
        """Now and every ``EXPIRY_SWEEP_S``: remove kept partials that have expired."""
        while True:
            try:
                await self.expire_cancelled_partials()
            except Exception:  # the next sweep tries again
                log.exception("could not expire the partial files of cancelled downloads")
            await asyncio.sleep(EXPIRY_SWEEP_S)

    async def expire_cancelled_partials(self) -> int:
        """Remove the partial files of downloads cancelled more than
        ``cancelled_partials_keep_s`` ago, unless a later download of the same name (which
        owns them now) exists. Returns the bytes removed."""
        cutoff = utcnow().timestamp() - self.cancelled_partials_keep_s
        cancelled = await asyncio.to_thread(self.repository.list, [JobState.CANCELLED])
        removed = 0
        for job in cancelled:
            ended = job.finished_at.timestamp() if job.finished_at else None
            if job.id in self._expired or ended is None or ended > cutoff:
                continue
            latest = await asyncio.to_thread(self.repository.list, None, job.name, 1)
            if latest and latest[0].id == job.id:
                removed += await asyncio.to_thread(self._discard_partials_of, [job])
            self._expired.add(job.id)
        return removed

    async def _flush_progress_forever(self) -> None:
        """Persist running jobs' byte counts now and then (status survives a restart)."""
        while True:
            await asyncio.sleep(PROGRESS_FLUSH_S)
            for active in list(self._active.values()):
                if active.job.state == JobState.DOWNLOADING:
                    done = active.progress.snapshot().bytes_done
                    active.job = dataclasses.replace(active.job, bytes_done=done)
                    try:
                        await self._save(active.job)
                    except Exception:  # the next flush tries again
                        log.exception("could not persist progress of %s", active.job.id)

    # --- reading ---------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobView:
        """The job's current state; raises ``JobNotFound``."""
        active = self._active.get(job_id)
        if active is not None:
            return self._view(active.job, active.progress, active.phase)
        planning = self._planning_jobs.get(job_id)
        if planning is not None:
            return self._view(planning, phase="planning")
        job = self._finished.get(job_id)
        if job is None:
            job = await asyncio.to_thread(self.repository.get, job_id)
        if job is None:
            raise JobNotFound(f"Download not found: {job_id}")
        return self._view(job, None)

    def _remember_finished(self, job: Job) -> None:
        self._finished[job.id] = job
        self._finished.move_to_end(job.id)
        while len(self._finished) > FINISHED_CACHE:
            self._finished.popitem(last=False)

    async def list(self, state: JobState | None = None) -> list[JobView]:
        jobs = await asyncio.to_thread(self.repository.list, [state] if state else None)
        views = []
        for job in jobs:
            active = self._active.get(job.id)
            views.append(
                self._view(active.job, active.progress, active.phase) if active else self._view(job)
            )
        return views

    def _view(
        self, job: Job, progress: Progress | None = None, phase: str | None = None
    ) -> JobView:
        if job.state != JobState.DOWNLOADING:
            phase = "planning" if phase == "planning" else job.state.value
        if progress is None or job.state.finished:
            return JobView(job, job.bytes_done, job.bytes_total, None, None, phase)
        snapshot = progress.snapshot()
        moving = job.state == JobState.DOWNLOADING and phase == "downloading"
        speed = snapshot.speed_bps if moving else None
        eta = snapshot.eta_s if moving else None
        return JobView(
            job, snapshot.bytes_done, snapshot.bytes_total, speed, eta, phase, snapshot.files
        )

    def unfinished(self) -> list[JobView]:
        """Every job being planned, queued or run, oldest first (a stream's opening state)."""
        views = [self._view(job, phase="planning") for job in self._planning_jobs.values()]
        views += [self._view(a.job, a.progress, a.phase) for a in self._active.values()]
        return sorted(views, key=lambda view: view.job.created_at)

    # --- events ----------------------------------------------------------------------------

    def _publish_status(self, view: JobView) -> None:
        """A status event, unless the streams have seen this state and phase already."""
        seen = (view.job.state, view.phase)
        if view.job.state.finished:  # the last one: nothing to compare the next with
            self._published.pop(view.job.id, None)
        elif self._published.get(view.job.id) == seen:
            return
        else:
            self._published[view.job.id] = seen
        self.events.publish(JobEvent(EventKind.STATUS, view))

    def _publish_active(self, active: _Active) -> None:
        self._publish_status(self._view(active.job, active.progress, active.phase))

    def _publish_ended(self, job: Job, progress: Progress) -> None:
        """The job's last status event (its files as they ended), and forget its bookkeeping."""
        snapshot = progress.snapshot()
        view = self._view(job)
        self._publish_status(dataclasses.replace(view, files=snapshot.files))
        self._published_version.pop(job.id, None)

    def _set_phase(self, active: _Active, phase: str) -> None:
        active.phase = phase
        self._publish_active(active)

    def _file_status_listener(self, job_id: str) -> Callable[[str, str], None]:
        """Called from transfer threads when a file's status changes. The phase it implies
        is decided there and then (a later look could miss a short ``verifying``) and handed
        to the loop, which applies the phases in order."""

        def changed(path: str, status: str) -> None:
            active, loop = self._active.get(job_id), self._loop
            if active is None or loop is None:
                return
            phase = phase_of_files(active.progress.file_statuses())
            if phase is None:
                return
            try:
                loop.call_soon_threadsafe(self._files_moved_phase, job_id, phase)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        return changed

    def _files_moved_phase(self, job_id: str, phase: str) -> None:
        active = self._active.get(job_id)
        if active is None or active.job.state != JobState.DOWNLOADING:
            return
        if active.phase in ("downloading", "verifying"):  # later phases are not the files'
            self._set_phase(active, phase)

    async def _publish_progress_forever(self) -> None:
        """Progress events for running jobs whose bytes moved, at most every PROGRESS_EVENT_S."""
        while True:
            await asyncio.sleep(PROGRESS_EVENT_S)
            for active in list(self._active.values()):
                job_id = active.job.id
                if active.job.state != JobState.DOWNLOADING or not self.events.has_subscribers(
                    job_id
                ):
                    continue
                version = active.progress.version
                if self._published_version.get(job_id) == version:
                    continue
                self._published_version[job_id] = version
                view = self._view(active.job, active.progress, active.phase)
                self.events.publish(JobEvent(EventKind.PROGRESS, view))

    def cache_hit_rate(self) -> float | None:
        """Share of download requests since start answered from the cache; None before any."""
        if not self.download_requests:
            return None
        return self.cache_hits / self.download_requests

    def recent_throughput(self) -> float | None:
        """Bytes per second over the last few completed transfers, or None if none measured."""
        if not self._throughputs:
            return None
        total_bytes = sum(b for b, _ in self._throughputs)
        total_seconds = sum(s for _, s in self._throughputs)
        return total_bytes / total_seconds if total_seconds > 0 else None

    def _record_throughput(self, job: Job) -> None:
        if job.started_at and job.finished_at and job.bytes_transferred >= MB:
            seconds = (job.finished_at - job.started_at).total_seconds()
            if seconds > 0:
                self._throughputs.append((job.bytes_transferred, seconds))

    # --- changing --------------------------------------------------------------------------

    async def cancel(self, job_id: str, keep_partials: bool = True) -> Job:
        """Cancel a pending or running job; returns it in its final state. Its partial
        files stay for a retry (``cancelled_partials_keep_s``) unless ``keep_partials`` is
        false."""
        if job_id in self._planning_jobs:
            ended = await self._cancel_planning(job_id)
            if ended is not None:
                return ended
        active = self._active.get(job_id)
        if active is None:
            job = await asyncio.to_thread(self.repository.get, job_id)
            if job is None:
                raise JobNotFound(f"Download not found: {job_id}")
            raise Conflict(
                f"Download {job_id} has already ended ({job.state.value}); nothing to cancel",
                error="Already finished",
            )
        if active.task is None:  # still queued: nothing runs, end it here
            self._pending.remove(job_id)
            self._active.pop(job_id, None)
            job = active.job.evolve(
                state=JobState.CANCELLED,
                message="Download cancelled before it started",
                finished_at=utcnow(),
            )
            await self._save(job)
            self._remember_finished(job)
            self._publish_ended(job, active.progress)
            return job
        active.keep_partials = keep_partials
        active.cancel.cancel("cancelled by request")
        await asyncio.shield(active.task)
        return active.job

    async def _cancel_planning(self, job_id: str) -> Job | None:
        """Cancel a job still being planned: its plan stops (a local source's hashing within
        a chunk) and the job is recorded cancelled. Returns it, or None when the plan had
        already become a queued job (which ``cancel`` then cancels as such)."""
        planning = self._planning_jobs[job_id]
        self._planning_tokens[job_id].cancel("cancelled by request")
        future = self._planning.get(planning.key)
        if future is not None:
            await asyncio.wait([future])  # its POST raises or answers; not ours to re-raise
        if job_id in self._active:
            return None
        job = self._finished.get(job_id)
        if job is None:
            job = await asyncio.to_thread(self.repository.get, job_id)
        if job is None:
            raise JobNotFound(f"Download not found: {job_id}")
        return job

    async def retry(self, name: str, force: bool) -> SubmitResult:
        """Run the last failed or cancelled download of ``name`` again.

        Without ``force`` it resumes from the bytes already fetched; with ``force`` it
        discards them (and re-downloads an installed model in full).
        """
        validate_name(name)
        for active in self._active.values():
            if active.job.name == name:
                raise Conflict(
                    f"A download for '{name}' is already in progress (download_id {active.job.id})",
                    error="Already running",
                )
        installed = await asyncio.to_thread(self.store.get, name)
        jobs = await asyncio.to_thread(self.repository.list, None, name, 1)
        if installed is not None and not force:
            raise Conflict(
                f"Model '{name}' is installed and complete; use force_redownload=true "
                f"to download it again (to load it: modelhost load {name})",
                error="Nothing to retry",
            )
        if not jobs:
            if installed is None:
                raise ModelNotFound(f"No download of '{name}' to retry", error="Unknown model")
            request = request_of(installed)
        else:
            last = jobs[0]
            if installed is None and last.state == JobState.COMPLETED:
                raise ModelNotFound(
                    f"Model '{name}' was deleted; download it again with POST /models/download",
                    error="Unknown model",
                )
            request = DownloadRequest(**last.request)
        if force:  # from byte 0: what earlier attempts left must not be resumed
            await asyncio.to_thread(self._discard_partials_of, jobs)
        return await self.submit(request, force=force)

    async def update(self, name: str) -> SubmitResult:
        """Install the newest commit of the revision ``name`` was installed from.

        Unchanged files are reused; the old version stays installed until the new one is
        verified and committed. ``SubmitResult.job`` is None when already up to date.
        """
        validate_name(name)
        installed = await asyncio.to_thread(self.store.require, name)
        if installed.source != "huggingface":
            raise InvalidRequest(
                f"Model '{name}' comes from the '{installed.source}' source, which has no "
                "revisions to update to; use retry_download with force_redownload=true",
                error="Nothing to update",
            )
        jobs = await asyncio.to_thread(self.repository.list, None, name, 1)
        request = DownloadRequest(**jobs[0].request) if jobs else request_of(installed)
        request = request.model_copy(
            update={"revision": installed.spec.requested_revision or "main"}
        )
        return await self.submit(request, update=True)

    async def remove_model(self, name: str) -> Removal:
        """Delete ``name`` everywhere: refuse new requests and loads of it, cancel its
        download (a load under way finishes, then is undone), unload it once its requests
        in flight end (bounded), delete it from the cache and remove the partial bytes its
        failed or cancelled downloads left.

        Raises ``ModelNotFound`` when there is none of these.
        """
        validate_name(name)
        if self.lifecycle is not None:
            self.lifecycle.close(name)
        try:
            return await self._remove_closed(name)
        finally:
            if self.lifecycle is not None:
                self.lifecycle.reopen(name)

    async def _remove_closed(self, name: str) -> Removal:
        cancelled = None
        for active in list(self._active.values()):
            if active.job.name == name:
                cancelled = await self.cancel(active.job.id, keep_partials=False)
        unloaded = None
        if self.lifecycle is not None:
            unloaded = await asyncio.to_thread(self.lifecycle.retire, name)
        ended = await asyncio.to_thread(
            self.repository.list, [JobState.FAILED, JobState.CANCELLED], name, 20
        )
        partial = await asyncio.to_thread(self._discard_partials_of, ended)
        try:
            manifest, freed = await asyncio.to_thread(self.store.delete, name)
        except ModelNotFound:
            if cancelled is None and not ended and unloaded is None:
                raise
            return Removal(None, 0, cancelled, partial, len(ended), unloaded)
        return Removal(manifest, freed, cancelled, partial, len(ended), unloaded)

    def _discard_partials_of(self, jobs: list[Job]) -> int:
        """Delete the partial files of these ended jobs' plans; returns the bytes removed.

        A partial file another unfinished job would write (same URL) is left alone."""
        busy = {spec for active in list(self._active.values()) for spec in active.plan.files}
        removed = 0
        for job in jobs:
            if job.state not in (JobState.FAILED, JobState.CANCELLED) or not job.plan:
                continue
            for spec in plan_from_dict(job.plan).files:
                if spec in busy:
                    continue
                removed += self.engine.partial_size(spec)
                self.engine.discard(spec)
            remove_tree(self.engine.partial_dir / f"extract-{job.id}")
        return removed

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def pending_count(self) -> int:
        return len(self._pending)
