"""Download endpoints: start, observe, list and cancel jobs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from modelhost.api.deps import Services, ServicesDep, parse_choice, require_api_key
from modelhost.api.errors import error_responses
from modelhost.jobs import JobState, JobView, SubmitResult, load_refusal
from modelhost.sources import DownloadRequest
from modelhost.store import Manifest
from modelhost.units import MB

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["downloads"])


def human_duration(seconds: float) -> str:
    """'under a minute', 'about 3 minutes', 'about 2 hours'."""
    if seconds < 60:
        return "under a minute"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"about {minutes} minute{'s' if minutes != 1 else ''}"
    hours = round(seconds / 3600, 1)
    return f"about {hours:g} hours"


def status_body(view: JobView) -> dict:
    """A job as ``GET /models/download/status/{id}`` shows it."""
    job = view.job
    return {
        "download_id": job.id,
        "status": job.state.value,
        "progress": view.progress_percent,
        "eta": None if view.eta_s is None else round(view.eta_s, 1),
        "message": job.message,
        "phase": view.phase,  # a running job's step: downloading, converting, loading
        "error": job.error,
        "model_name": job.name,
        "source": job.source,
        "model_id": job.model_id,
        "bytes_downloaded": view.bytes_done,
        "bytes_total": view.bytes_total,
        "speed_bytes_per_s": None if view.speed_bps is None else round(view.speed_bps),
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def already_installed_message(manifest: Manifest, services: Services) -> str:
    """What ``already_exists`` says: loaded (and where), or installed and not loaded, with
    the command that loads it; never "ready to use" for a model that is not loaded."""
    name = manifest.name
    loaded = next((m for m in services.runtime.list() if m.name == name), None)
    if loaded is not None and not services.lifecycle.is_closing(name):
        return f"Model '{name}' already exists and is loaded on {loaded.device}"
    refusal = load_refusal(manifest)
    if refusal is not None:
        return f"Model '{name}' is already installed ({refusal})"
    return f"Model '{name}' is already installed (not loaded); load it with: modelhost load {name}"


def _download_body(result: SubmitResult, request: DownloadRequest, services: Services) -> dict:
    if result.installed is not None:
        manifest = result.installed
        return {
            "success": True,
            "download_id": manifest.download_id,
            "message": already_installed_message(manifest, services),
            "model_name": manifest.name,
            "source": manifest.source,
            "model_id": manifest.model_id,
            "status": "already_exists",
            "estimated_time": None,
        }
    job, plan = result.job, result.plan
    assert job is not None and plan is not None
    size = plan.total_size
    throughput = services.jobs.recent_throughput()
    seconds = size / throughput if size is not None and throughput else None
    verb = "Joined the download already in progress of" if result.shared else "Started downloading"
    spec = plan.spec
    notes = list(spec.notes)
    return {
        "success": True,
        "download_id": job.id,
        "message": f"{verb} model '{job.name}'" + "".join(f"; {note}" for note in notes),
        "model_name": job.name,
        "source": job.source,
        "model_id": job.model_id,
        "status": job.state.value,
        "estimated_time": human_duration(seconds) if seconds is not None else None,
        "estimated_seconds": None if seconds is None else round(seconds, 1),
        "download_info": {
            "download_id": job.id,
            "model_type": plan.model_type,
            "description": plan.description,
            "estimated_size_mb": None if size is None else round(size / MB, 3),
            "size_bytes": size,
            "files": [f.path for f in plan.files],
            "revision": plan.revision,
            "requested_revision": spec.requested_revision,
            "supports_voice_cloning": spec.supports_voice_cloning,
            "vocoder_included": bool(spec.vocoder_models),
            "vocoder_models": spec.vocoder_models,
            "components": [component.model_dump() for component in spec.components],
            "loadable": spec.loadable,
            "speaker_embeddings": spec.speaker_embeddings,
            "notes": notes,
        },
    }


@router.post(
    "/models/download",
    summary="Download a model into the verified cache",
    status_code=202,
    responses={
        200: {"description": "Already installed: nothing was transferred"},
        **error_responses(400, 404, 409, 422, 424, 501, 502, 507),
    },
)
async def download(request: DownloadRequest, services: ServicesDep) -> JSONResponse:
    result = await services.jobs.submit(request)
    status = 200 if result.already_exists else 202
    return JSONResponse(_download_body(result, request, services), status_code=status)


@router.get(
    "/models/download/status/{download_id}",
    summary="Status of one download",
    responses=error_responses(404, 422),
)
async def download_status(download_id: str, services: ServicesDep) -> dict:
    return status_body(await services.jobs.get(download_id))


@router.get(
    "/models/downloads",
    summary="All downloads, newest first",
    responses=error_responses(400, 422),
)
async def list_downloads(
    services: ServicesDep,
    status: str | None = Query(
        default=None,
        description="pending, downloading, completed, ...",
        json_schema_extra={"enum": [s.value for s in JobState]},
    ),
) -> dict:
    state = None if status is None else parse_choice(JobState, status, "status")
    views = await services.jobs.list(state)
    return {"total": len(views), "downloads": [status_body(v) for v in views]}


@router.post(
    "/models/download/{download_id}/cancel",
    summary="Cancel a download",
    responses=error_responses(404, 409, 422),
)
async def cancel_download(download_id: str, services: ServicesDep) -> dict:
    job = await services.jobs.cancel(download_id)
    return {"success": True, **status_body(await services.jobs.get(job.id))}
