"""The FastAPI application: built from Settings, services wired in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from modelhost import __version__
from modelhost.api import downloads, events, health, hf, inference, metrics, models, ui
from modelhost.api.deps import Services, require_api_key
from modelhost.api.errors import install_error_handlers
from modelhost.api.openai import speech_jobs as openai_speech_jobs
from modelhost.api.openai import voices as speech_voices
from modelhost.api.openai.routes import routers as openai_routers
from modelhost.api.security import install_security
from modelhost.catalog import load_catalog, load_models_config
from modelhost.config import Settings
from modelhost.convert import ConvertLimits
from modelhost.fetch import FetchEngine, RetryPolicy, UrlPolicy
from modelhost.fetch.engine import set_thread_nice
from modelhost.fetch.http import Authorizer
from modelhost.fetch.policy import Target
from modelhost.homelock import HomeLock
from modelhost.homelock import acquire as acquire_home
from modelhost.jobs import JobManager, JobRepository
from modelhost.mirror.index import MirrorIndex
from modelhost.offloop import import_whole
from modelhost.runtime.keepalive import IdleReaper, restore_later
from modelhost.runtime.lifecycle import ModelLifecycle
from modelhost.runtime.registry import ModelRegistry
from modelhost.sources import HubSettings
from modelhost.speechjobs import SentenceFiles, SpeechJobRepository, SpeechJobRunner
from modelhost.store import Store
from modelhost.units import GB

log = logging.getLogger(__name__)


def bearer_for(host_port: str, token: str | None) -> Authorizer | None:
    """Send ``token`` to ``host_port`` only (never to a CDN it redirects to)."""
    if not token:
        return None

    def authorize(target: Target) -> str | None:
        return f"Bearer {token}" if UrlPolicy.host_port_of(target.url) == host_port else None

    return authorize


def build_services(settings: Settings) -> Services:
    """Construct the layers (store, engine, jobs) a server runs on."""
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    store = Store(home)
    # The configured Hub endpoint is trusted as the operator set it; its token goes to it only.
    hub_host = UrlPolicy.host_port_of(settings.hf_endpoint)
    # A configured mirror is trusted like the Hub endpoint: the operator named it.
    mirrors = [
        UrlPolicy.host_port_of(url)
        for url in (
            settings.torchvision_mirror,
            settings.torchaudio_mirror,
            settings.torch_hub_mirror,
        )
        if url
    ]
    policy = UrlPolicy.from_hosts([*settings.effective_url_allow, hub_host, *mirrors])
    engine = FetchEngine(
        partial_dir=home / "partial",
        policy=policy,
        authorization=bearer_for(hub_host, settings.hf_token),
        retry=RetryPolicy(
            retries=settings.fetch_retries,
            backoff_s=settings.fetch_backoff_s,
            backoff_max_s=settings.fetch_backoff_max_s,
        ),
        # Every connect and metadata read waits MODELHOST_UPSTREAM_TIMEOUT_S; transfers' reads
        # too, unless MODELHOST_FETCH_READ_TIMEOUT_S overrides it.
        read_timeout_s=settings.fetch_read_timeout_s or settings.upstream_timeout_s,
        upstream_timeout_s=settings.upstream_timeout_s,
        read_timeout_setting=(
            "MODELHOST_FETCH_READ_TIMEOUT_S"
            if settings.fetch_read_timeout_s
            else "MODELHOST_UPSTREAM_TIMEOUT_S"
        ),
        connections=settings.fetch_connections,
        max_connections=settings.fetch_max_connections,
        part_threshold=settings.fetch_part_threshold_bytes,
        part_size=settings.fetch_part_size_bytes,
        max_bytes_per_s=settings.fetch_max_bytes_per_s,
    )
    hub = HubSettings(
        settings.hf_endpoint,
        settings.hf_token,
        settings.hub_cache_dir,
        offline=settings.hf_hub_offline,
    )
    mirrors_by_source = {
        "torchvision": settings.torchvision_mirror,
        "torchaudio": settings.torchaudio_mirror,
        "pytorch_hub": settings.torch_hub_mirror,
    }
    runtime = ModelRegistry(
        max_loaded=settings.max_loaded,
        gpu_memory_fraction=settings.gpu_memory_fraction,
        device_setting=settings.device,
        gpu_stream=settings.gpu_stream,
        cpu_memory_bytes=(
            int(settings.cpu_memory_limit_gb * GB) if settings.cpu_memory_limit_gb else None
        ),
        drain_timeout_s=settings.unload_drain_s,
        max_text_chars=settings.max_input_chars,
    )
    lifecycle = ModelLifecycle(runtime, store, keep_alive_s=settings.keep_alive)
    jobs = JobManager(
        store,
        engine,
        JobRepository(settings.database_url),
        max_downloads=settings.max_downloads,
        parallel_files=settings.fetch_parallel_files,
        cache_limit_bytes=settings.cache_limit_bytes,
        disk_reserve_bytes=settings.disk_reserve_bytes,
        hub=hub,
        lifecycle=lifecycle,
        mirrors=mirrors_by_source,
        torch_hub_allow=settings.torch_hub_allow,
        pickle_policy=settings.pickle_policy,
        convert_limits=ConvertLimits(
            timeout_s=settings.convert_timeout_s,
            address_space=(
                int(settings.convert_memory_gb * GB) if settings.convert_memory_gb else None
            ),
        ),
        import_roots=settings.import_roots,
    )
    return Services(
        settings=settings,
        store=store,
        jobs=jobs,
        models_config=load_models_config(settings.models_config),
        catalog=load_catalog(),
        runtime=runtime,
        lifecycle=lifecycle,
        speech_jobs=SpeechJobRunner(
            SpeechJobRepository(jobs.repository.engine),
            SentenceFiles(home / "speech"),
            max_running=settings.speech_jobs_max_running,
        ),
        mirror_index=MirrorIndex(store),
    )


# Imported by a background thread once the server answers: torch and transformers take
# seconds to import, which neither startup nor the first load should wait for.
WARM_UP_MODULES = ("transformers", "modelhost.runtime.loaders", "modelhost.runtime.inference")
WARM_UP_NICE = 19  # the lowest CPU priority: it yields to requests and to transfers
# Seconds after startup before the warm-up begins: importing torch holds the GIL, which
# would otherwise slow the server's first answers (measured: about 0.1 s on /health's).
WARM_UP_DELAY_S = 1.0
UNLOAD_AT_EXIT_S = 1.0  # shutdown's wait for models to unload (see unload_at_exit)
NEVER_S = 10.0**9  # MODELHOST_WARM_UP=false: the timer is cancelled at shutdown, never due


def warm_up_runtime(jobs: JobManager) -> threading.Thread | None:
    """Import the runtime (torch, transformers) in a daemon thread at the lowest priority.

    Skipped while downloads run or wait (the server resumed them on start): importing torch
    takes seconds of CPU and holds the GIL, and resumed transfers must not lose that time
    (measured: 20 SIGKILL/restart cycles served 1.21x a file with the warm-up, under 1.05x
    without). The first load imports the runtime then."""
    if jobs.running_count or jobs.pending_count:
        return None

    def warm_up() -> None:
        set_thread_nice(WARM_UP_NICE)
        for module in WARM_UP_MODULES:
            try:
                import_whole(module)  # one thread at a time (see offloop)
            except Exception:  # a broken torch install fails the first load, with its message
                log.exception("warming up %s failed", module)
                return

    thread = threading.Thread(target=warm_up, name="modelhost-warm-up", daemon=True)
    thread.start()
    return thread


def install_docs(app: FastAPI) -> None:
    """/openapi.json, /docs and /redoc (their scripts served by modelhost), needing the API
    key when MODELHOST_API_KEY is set (the schema maps the whole API; FastAPI's own routes
    for them take no dependencies)."""
    guarded = {"include_in_schema": False, "dependencies": [Depends(require_api_key)]}

    @app.get("/openapi.json", **guarded)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", **guarded)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url=f"{ui.DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{ui.DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{ui.DOCS_STATIC}/favicon.png",
        )

    @app.get("/redoc", **guarded)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ui.DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{ui.DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )


@asynccontextmanager
async def _serving(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """The services' life inside the lifespan: built and started, then stopped."""
    services = build_services(settings)
    app.state.services = services
    await services.jobs.start()
    await services.speech_jobs.start(openai_speech_jobs.job_synthesizer(services))
    log.info("modelhost %s serving from %s", __version__, settings.home)
    warm_up = asyncio.get_running_loop().call_later(
        WARM_UP_DELAY_S if settings.warm_up else NEVER_S, warm_up_runtime, services.jobs
    )
    reaper = IdleReaper(services.lifecycle)
    reaper.start()
    # Pinned and kept-for-ever models load again once the server answers (/health never
    # waits for them; their loads import torch in a thread).
    restore = asyncio.create_task(restore_later(services.lifecycle, WARM_UP_DELAY_S))
    try:
        yield
    finally:
        warm_up.cancel()
        restore.cancel()
        await asyncio.gather(restore, return_exceptions=True)
        await reaper.stop()
        await services.speech_jobs.stop()
        await services.jobs.stop()
        await unload_at_exit(services.runtime)


async def unload_at_exit(runtime: ModelRegistry) -> None:
    """Unload every model, waiting at most ``UNLOAD_AT_EXIT_S``: an unload waits for the
    inference running on its model, which a long synthesis makes minutes, and the process
    must end within seconds of SIGTERM. A daemon thread, so an unfinished one never holds
    the interpreter's exit; the memory goes with the process anyway."""
    thread = threading.Thread(target=runtime.unload_all, name="modelhost-unload", daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, UNLOAD_AT_EXIT_S)
    if thread.is_alive():
        log.warning("models still busy at shutdown: left to end with the process")


def create_app(settings: Settings | None = None, home_lock: HomeLock | None = None) -> FastAPI:
    """The modelhost ASGI app. Settings default to the environment (``MODELHOST_*``).

    The lifespan holds the home's lock (``homelock``) from startup to shutdown: ``home_lock``
    when ``modelhost serve`` took it already, else it takes one (``HomeInUse`` fails the
    startup while another server uses the home)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lock = home_lock
        if lock is None or not lock.held:
            address = f"http://{settings.host}:{settings.port}"
            lock = await asyncio.to_thread(acquire_home, settings.home, address)
        try:
            async with _serving(app, settings):
                yield
        finally:
            lock.release()  # the next server on this home may start

    app = FastAPI(
        title="modelhost",
        version=__version__,
        description="Model management and inference server: verified cache, resumable "
        "downloads, persistent jobs.",
        lifespan=lifespan,
        # Served by install_docs instead, behind the API key like every other route.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    v1_routers = openai_routers()
    install_error_handlers(app, v1_routers)
    routers = [
        health.router,
        downloads.router,
        events.router,
        models.router,
        metrics.router,
        inference.router,
        *v1_routers,
        # The speech API's voices: GET /v1/audio/voices and modelhost's GET /models/{name}/voices.
        speech_voices.router,
        speech_voices.models_router,
        # The Hugging Face mirror (/hf), in the Hub's protocol.
        hf.router,
        ui.router,
    ]
    install_security(app, settings.effective_allowed_hosts, settings.cors_origins, routers)
    # Outermost: the mirror counts its requests, the guards' refusals included.
    app.add_middleware(hf.MirrorCounter)
    install_docs(app)
    for router in routers:
        app.include_router(router)
    return app
