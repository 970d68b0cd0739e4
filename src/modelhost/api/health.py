"""Health: open to all, even when an API key is set."""

from __future__ import annotations

from fastapi import APIRouter

from modelhost import __version__
from modelhost.api.deps import ServicesDep
from modelhost.api.errors import error_responses

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    summary="Liveness and a summary of the job queue",
    responses=error_responses(api_key=False),
)
async def health(services: ServicesDep) -> dict:
    jobs = services.jobs
    return {
        "status": "ok",
        "version": __version__,
        "downloads_running": jobs.running_count,
        "downloads_pending": jobs.pending_count,
    }
