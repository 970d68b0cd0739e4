"""Health: open to all, even when an API key is set."""

from __future__ import annotations

from fastapi import APIRouter

from modelhost import __version__
from modelhost.api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness and a summary of the job queue")
async def health(services: ServicesDep) -> dict:
    jobs = services.jobs
    return {
        "status": "ok",
        "version": __version__,
        "downloads_running": jobs.running_count,
        "downloads_pending": jobs.pending_count,
    }
